//! `GET /ui/` (the fleet overview: nodes with health, pool, labels, capacity,
//! utilisation and GPUs, [`PAGE_SIZE`] to a page) and `GET /ui/fleet/live` (the
//! utilisation of the same page's nodes as JSON, which the script polls).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use novacron_api::NodeView;
use serde::{Deserialize, Serialize};

use super::Ui;
use super::auth::User;
use super::html::{self, Section, esc, seg};

/// Nodes on one page of the overview.
pub const PAGE_SIZE: usize = 100;

/// `?page=` (from 1) and `?q=` (a filter on names and labels).
#[derive(Debug, Default, Deserialize)]
pub struct FleetQuery {
    /// The page, from 1.
    #[serde(default)]
    pub page: Option<usize>,
    /// Only nodes whose name, pool or a label (`key=value`) contains this.
    #[serde(default)]
    pub q: Option<String>,
}

/// The fleet overview.
pub async fn page(
    State(ui): State<Arc<Ui>>,
    user: User,
    Query(query): Query<FleetQuery>,
) -> Response {
    let now = SystemTime::now();
    let all = ui.api.registry.views(Instant::now());
    let ready = all
        .iter()
        .filter(|n| n.status.to_string() == "ready")
        .count();
    let down = all
        .iter()
        .filter(|n| n.status.to_string() == "down")
        .count();
    let cordoned = all.iter().filter(|n| n.cordoned).count();
    let filter = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let matching: Vec<&NodeView> = all.iter().filter(|n| matches(n, filter)).collect();
    let pages = matching.len().div_ceil(PAGE_SIZE).max(1);
    let page = query.page.unwrap_or(1).clamp(1, pages);
    let shown = &matching
        [((page - 1) * PAGE_SIZE).min(matching.len())..(page * PAGE_SIZE).min(matching.len())];

    let mut body = String::with_capacity(shown.len() * 1024 + 4096);
    let _ = write!(
        body,
        "<h1>Fleet</h1><ul class=\"stats\">\
         <li><b>{}</b> nodes</li><li><b>{ready}</b> ready</li><li><b>{down}</b> down</li>\
         <li><b>{cordoned}</b> cordoned</li></ul>\
         <form method=\"get\" action=\"/ui/\" class=\"filter\">\
         <label for=\"q\">Filter</label><input id=\"q\" name=\"q\" value=\"{}\" placeholder=\"name, pool or label=value\">\
         <button type=\"submit\">Filter</button></form>",
        all.len(),
        esc(filter.unwrap_or(""))
    );
    let live = format!(
        "/ui/fleet/live?page={page}{}",
        filter.map(|q| format!("&q={}", seg(q))).unwrap_or_default()
    );
    let _ = write!(
        body,
        "<div class=\"scroll\"><table id=\"nodes\" class=\"grid\" data-live=\"{}\">\
         <thead><tr><th>Node</th><th>Health</th><th>Pool</th><th>Labels</th>\
         <th class=\"num\">CPU</th><th class=\"num\">Memory</th><th>CPU use</th><th>Memory use</th>\
         <th>GPUs</th><th>Last seen</th></tr></thead><tbody>",
        esc(&live)
    );
    if shown.is_empty() {
        body.push_str("<tr><td colspan=\"10\" class=\"empty\">No node matches.</td></tr>");
    }
    for n in shown {
        row(&mut body, n, now);
    }
    body.push_str("</tbody></table></div>");
    pager(&mut body, page, pages, filter);
    html::page(
        StatusCode::OK,
        "Fleet",
        Some(Section::Fleet),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        &body,
    )
}

/// One node's live numbers, as the script reads them.
#[derive(Debug, Serialize)]
pub struct LiveNode {
    /// Its name.
    pub name: String,
    /// `ready`, `disconnected`, `down`.
    pub status: String,
    /// Whole-host CPU use, percent.
    pub cpu: Option<f64>,
    /// Memory in use, percent.
    pub memory: Option<f64>,
}

/// The utilisation of one page of nodes.
pub async fn live(
    State(ui): State<Arc<Ui>>,
    _user: User,
    Query(query): Query<FleetQuery>,
) -> Response {
    let all = ui.api.registry.views(Instant::now());
    let filter = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty());
    let page = query.page.unwrap_or(1).max(1);
    let nodes: Vec<LiveNode> = all
        .iter()
        .filter(|n| matches(n, filter))
        .skip((page - 1).saturating_mul(PAGE_SIZE))
        .take(PAGE_SIZE)
        .map(|n| LiveNode {
            name: n.name.clone(),
            status: n.status.to_string(),
            cpu: cpu(n),
            memory: memory(n),
        })
        .collect();
    Json(nodes).into_response()
}

/// Whether node `n` passes the filter (name, pool or `key=value` contains it).
fn matches(n: &NodeView, filter: Option<&str>) -> bool {
    let Some(f) = filter else { return true };
    n.name.contains(f) || n.labels.iter().any(|(k, v)| format!("{k}={v}").contains(f))
}

fn cpu(n: &NodeView) -> Option<f64> {
    n.latest.as_ref().map(|s| f64::from(s.cpu.total_percent))
}

fn memory(n: &NodeView) -> Option<f64> {
    n.latest
        .as_ref()
        .filter(|s| s.memory.total_bytes > 0)
        .map(|s| s.memory.used_bytes as f64 * 100.0 / s.memory.total_bytes as f64)
}

fn row(out: &mut String, n: &NodeView, now: SystemTime) {
    let mut health = html::badge(&n.status.to_string());
    if n.cordoned {
        health.push(' ');
        health.push_str(&html::badge("cordoned"));
    }
    if n.warm {
        health.push(' ');
        health.push_str(&html::badge("warm"));
    }
    let pool = n.labels.get("pool").map(String::as_str).unwrap_or("–");
    let labels: String = n
        .labels
        .iter()
        .filter(|(k, _)| k.as_str() != "pool")
        .map(|(k, v)| format!("<span class=\"chip\">{}={}</span>", esc(k), esc(v)))
        .collect();
    let gpus = gpu_cell(n);
    let seen = n
        .last_seen_unix_ms
        .map(|t| html::ago(t, now))
        .unwrap_or_else(|| "never".into());
    let (c, m) = (cpu(n), memory(n));
    let _ = write!(
        out,
        "<tr data-node=\"{name}\"><td><a href=\"/ui/nodes/{link}\">{name}</a></td>\
         <td class=\"st\">{health}</td><td>{pool}</td><td class=\"labels\">{labels}</td>\
         <td class=\"num\">{cores}</td><td class=\"num\">{mem}</td>\
         <td class=\"use\">{cm}<span class=\"cpu\">{cp}</span></td>\
         <td class=\"use\">{mm}<span class=\"mem\">{mp}</span></td><td>{gpus}</td><td>{seen}</td></tr>",
        name = esc(&n.name),
        link = esc(&seg(&n.name)),
        pool = esc(pool),
        cores = html::cores(n.capacity.cpu_millis),
        mem = html::bytes(n.capacity.memory_bytes),
        cm = html::meter(c, "cpu"),
        cp = html::percent(c),
        mm = html::meter(m, "mem"),
        mp = html::percent(m),
    );
}

/// `2 × A100 · 35% · 61°C`: the GPUs' count and model, with the latest
/// utilisation and temperature (the hottest) when sampled.
fn gpu_cell(n: &NodeView) -> String {
    let gpus = &n.capacity.gpus;
    if gpus.is_empty() {
        return "–".into();
    }
    let model = gpus.first().map(|g| g.model.as_str()).unwrap_or("");
    let mut text = format!("{} × {}", gpus.len(), esc(model));
    if let Some(s) = n.latest.as_ref().filter(|s| !s.gpus.is_empty()) {
        let util = s.gpus.iter().map(|g| g.utilization_percent).sum::<u32>() / s.gpus.len() as u32;
        let hottest = s
            .gpus
            .iter()
            .map(|g| g.temperature_celsius)
            .max()
            .unwrap_or(0);
        let _ = write!(text, " · {util}% · {hottest}°C");
    }
    text
}

fn pager(out: &mut String, page: usize, pages: usize, filter: Option<&str>) {
    if pages <= 1 {
        return;
    }
    let q = filter.map(|q| format!("&q={}", seg(q))).unwrap_or_default();
    out.push_str("<nav class=\"pager\" aria-label=\"pages\">");
    if page > 1 {
        let _ = write!(
            out,
            "<a href=\"/ui/?page={}{}\" rel=\"prev\">Previous</a>",
            page - 1,
            esc(&q)
        );
    }
    let _ = write!(out, "<span>page {page} of {pages}</span>");
    if page < pages {
        let _ = write!(
            out,
            "<a href=\"/ui/?page={}{}\" rel=\"next\">Next</a>",
            page + 1,
            esc(&q)
        );
    }
    out.push_str("</nav>");
}

#[cfg(test)]
mod tests {
    use novacron_common::fleet::NodeStatus;
    use novacron_common::wire::{Capacity, GpuInfo};

    use super::*;

    fn node(name: &str, labels: &[(&str, &str)]) -> NodeView {
        NodeView {
            name: name.into(),
            status: NodeStatus::Ready,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: Capacity {
                cpu_millis: 4000,
                memory_bytes: 16 << 30,
                ..Capacity::default()
            },
            capabilities: Default::default(),
            agent_version: String::new(),
            address: None,
            enrolled_at_unix_ms: 0,
            last_seen_unix_ms: None,
            cert_expires_unix_ms: None,
            samples_dropped: 0,
            cordoned: true,
            warm: false,
            latest: None,
            images: 0,
            image_bytes: 0,
        }
    }

    /// Labels come from agents, which a hostile host controls: the row shows
    /// them as text, in element content and in attributes alike.
    #[test]
    fn a_hostile_node_label_and_name_are_escaped_in_the_row() {
        let mut n = node(
            "n1\"><script>x()</script>",
            &[("pool", "<b>gpu</b>"), ("zone", "\"onmouseover=\"x()")],
        );
        n.capacity.gpus = vec![GpuInfo {
            index: 0,
            uuid: "GPU-1".into(),
            model: "<i>A100</i>".into(),
            memory_bytes: 40 << 30,
            vfio_address: None,
        }];
        let mut row_html = String::new();
        row(&mut row_html, &n, SystemTime::UNIX_EPOCH);
        assert!(!row_html.contains("<script>"), "{row_html}");
        assert!(!row_html.contains("<b>"), "{row_html}");
        assert!(!row_html.contains("<i>"), "{row_html}");
        assert!(!row_html.contains("\"onmouseover"), "{row_html}");
        assert!(row_html.contains("data-node=\"n1&quot;&gt;&lt;script&gt;x()&lt;/script&gt;\""));
        assert!(row_html.contains("href=\"/ui/nodes/n1%22%3E%3Cscript%3Ex%28%29%3C%2Fscript%3E\""));
        assert!(row_html.contains("&lt;b&gt;gpu&lt;/b&gt;"));
        assert!(row_html.contains("zone=&quot;onmouseover=&quot;x()"));
        assert!(row_html.contains("1 × &lt;i&gt;A100&lt;/i&gt;"));
        assert!(row_html.contains(">cordoned</span>"));
        assert!(row_html.contains(">4</td>"), "4 cores: {row_html}");
    }

    #[test]
    fn the_filter_matches_names_pools_and_labels() {
        let n = node("web-1", &[("pool", "batch"), ("zone", "eu-1a")]);
        assert!(matches(&n, None));
        assert!(matches(&n, Some("web")));
        assert!(matches(&n, Some("pool=batch")));
        assert!(matches(&n, Some("zone=eu")));
        assert!(!matches(&n, Some("gpu")));
    }
}
