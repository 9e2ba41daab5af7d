//! `GET /ui/nodes/{name}` (a node: details, GPUs, CPU and memory charts over a
//! picked range, its allocations, and for operators drain, uncordon, restart and
//! migrate) and `GET /ui/nodes/{name}/chart/{metric}` (one chart as SVG, which the
//! script fetches to refresh it).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use novacron_api::NodeView;
use serde::Deserialize;

use super::Ui;
use super::auth::User;
use super::chart;
use super::html::{self, Section, esc, seg};
use super::metrics::{self, NODE_CHARTS, RANGES, Subject};
use crate::state::store::AllocRecord;

/// `?range=15m|1h|6h|24h`.
#[derive(Debug, Default, Deserialize)]
pub struct RangeQuery {
    /// The charts' range.
    #[serde(default)]
    pub range: Option<String>,
}

/// A node's page.
pub async fn page(
    State(ui): State<Arc<Ui>>,
    user: User,
    Path(name): Path<String>,
    Query(query): Query<RangeQuery>,
) -> Response {
    let Some(n) = ui.api.registry.view(&name, Instant::now()) else {
        return user.error(
            StatusCode::NOT_FOUND,
            &format!("there is no node {name:?}; the fleet page lists the enrolled nodes"),
        );
    };
    let now = SystemTime::now();
    let (range, range_ms) = metrics::range(query.range.as_deref());
    let link = seg(&n.name);
    let mut body = String::with_capacity(16 * 1024);
    let mut status = html::badge(&n.status.to_string());
    if n.cordoned {
        status.push(' ');
        status.push_str(&html::badge("cordoned"));
    }
    let _ = write!(
        body,
        "<h1>Node <span class=\"name\">{}</span> {status}</h1>",
        esc(&n.name)
    );
    if user.can_act() {
        body.push_str("<div class=\"actions\">");
        if n.cordoned {
            body.push_str(&html::button_form(
                &format!("/ui/nodes/{link}/uncordon"),
                &user.csrf,
                "Uncordon",
                "",
            ));
        }
        body.push_str(&html::button_form(
            &format!("/ui/nodes/{link}/drain"),
            &user.csrf,
            "Drain",
            "danger",
        ));
        body.push_str("</div>");
    }
    details(&mut body, &n, now);
    gpus(&mut body, &n);

    // Charts, with the range picker.
    body.push_str("<section><h2>Utilisation</h2><nav class=\"ranges\" aria-label=\"time range\">");
    for (value, label, _) in RANGES {
        let on = if *value == range {
            " class=\"on\" aria-current=\"true\""
        } else {
            ""
        };
        let _ = write!(
            body,
            "<a href=\"/ui/nodes/{}?range={value}\"{on}>{label}</a>",
            esc(&link)
        );
    }
    body.push_str("</nav><div class=\"charts\">");
    for c in NODE_CHARTS {
        let svg =
            match metrics::series(&ui, Subject::Node(n.name.clone()), c.metric, range_ms).await {
                Ok(series) => {
                    chart::line_chart(&format!("chart-{}", c.metric), c.title, c.scale, &series)
                }
                Err((_, e)) => format!("<p class=\"error\">{}</p>", esc(&e)),
            };
        let _ = write!(
            body,
            "<figure class=\"chart-box\" data-refresh=\"/ui/nodes/{}/chart/{}?range={range}\">\
             <figcaption>{}</figcaption>{svg}</figure>",
            esc(&link),
            c.metric,
            c.title
        );
    }
    body.push_str("</div></section>");

    let allocs = ui.api.workloads.allocations(None, Some(&n.name));
    body.push_str("<section><h2>Allocations</h2>");
    alloc_table(&mut body, &allocs, &user, AllocColumn::Job, now);
    body.push_str("</section>");
    html::page(
        StatusCode::OK,
        &format!("Node {}", n.name),
        Some(Section::Fleet),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        &body,
    )
}

/// One chart of a node as a standalone SVG document.
pub async fn chart(
    State(ui): State<Arc<Ui>>,
    _user: User,
    Path((name, metric)): Path<(String, String)>,
    Query(query): Query<RangeQuery>,
) -> Response {
    let Some(c) = NODE_CHARTS.iter().find(|c| c.metric == metric) else {
        return (StatusCode::NOT_FOUND, "no such chart").into_response();
    };
    if ui.api.registry.view(&name, Instant::now()).is_none() {
        return (StatusCode::NOT_FOUND, "no such node").into_response();
    }
    let (_, range_ms) = metrics::range(query.range.as_deref());
    svg_answer(
        metrics::series(&ui, Subject::Node(name), c.metric, range_ms)
            .await
            .map(|s| chart::line_chart(&format!("chart-{}", c.metric), c.title, c.scale, &s)),
    )
}

/// A chart as an SVG answer, or the query's error as text.
pub fn svg_answer(svg: Result<String, (StatusCode, String)>) -> Response {
    match svg {
        Ok(svg) => ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response(),
        Err((status, e)) => (status, e).into_response(),
    }
}

/// Which column an allocation table links to: the job (on a node's page) or
/// the node (on a job's page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocColumn {
    /// Link each allocation's job.
    Job,
    /// Link each allocation's node.
    Node,
}

/// A table of allocations, newest first, with restart and migrate buttons for
/// operators on those that are wanted.
pub fn alloc_table(
    out: &mut String,
    allocs: &[AllocRecord],
    user: &User,
    column: AllocColumn,
    now: SystemTime,
) {
    if allocs.is_empty() {
        out.push_str("<p class=\"empty\">No allocations.</p>");
        return;
    }
    let other = match column {
        AllocColumn::Job => "Job",
        AllocColumn::Node => "Node",
    };
    let _ = write!(
        out,
        "<div class=\"scroll\"><table class=\"grid allocs\"><thead><tr><th>Allocation</th><th>{other}</th>\
         <th>State</th><th>Version</th><th class=\"num\">CPU</th><th class=\"num\">Memory</th>\
         <th class=\"num\">Restarts</th><th>Updated</th><th>Message</th>{}</tr></thead><tbody>",
        if user.can_act() {
            "<th>Actions</th>"
        } else {
            ""
        }
    );
    let mut sorted: Vec<&AllocRecord> = allocs.iter().collect();
    sorted.sort_by_key(|a| std::cmp::Reverse(a.created_unix_ms));
    for a in sorted {
        let (href, text) = match column {
            AllocColumn::Job => (format!("/ui/jobs/{}", seg(&a.job)), &a.job),
            AllocColumn::Node => (format!("/ui/nodes/{}", seg(&a.node)), &a.node),
        };
        let mut state = html::badge(&a.state.to_string());
        if !a.desired_run {
            state.push(' ');
            state.push_str(&html::badge("not wanted"));
        }
        if a.healthy == Some(true) {
            state.push(' ');
            state.push_str(&html::badge("healthy"));
        }
        let _ = write!(
            out,
            "<tr data-alloc=\"{id}\"><td class=\"mono\">{id}</td><td><a href=\"{href}\">{text}</a></td>\
             <td>{state}</td><td class=\"num\">{version}</td><td class=\"num\">{cpu}</td>\
             <td class=\"num\">{mem}</td><td class=\"num\">{restarts}</td><td>{updated}</td>\
             <td class=\"msg\">{message}</td>",
            id = esc(&a.id),
            href = esc(&href),
            text = esc(text),
            version = a.version,
            cpu = html::cores(a.cpu_millis),
            mem = html::bytes(a.memory_bytes),
            restarts = a.restarts,
            updated = html::ago(a.updated_unix_ms, now),
            message = esc(&a.message),
        );
        if user.can_act() {
            out.push_str("<td class=\"actions\">");
            if a.desired_run {
                let id = seg(&a.id);
                out.push_str(&html::button_form(
                    &format!("/ui/allocations/{id}/restart"),
                    &user.csrf,
                    "Restart",
                    "restart",
                ));
                if a.state.to_string() == "running" {
                    out.push_str(&html::button_form(
                        &format!("/ui/allocations/{id}/migrate"),
                        &user.csrf,
                        "Migrate",
                        "migrate",
                    ));
                }
            }
            out.push_str("</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table></div>");
}

fn details(out: &mut String, n: &NodeView, now: SystemTime) {
    let labels: String = n
        .labels
        .iter()
        .map(|(k, v)| format!("<span class=\"chip\">{}={}</span>", esc(k), esc(v)))
        .collect();
    let caps = &n.capabilities;
    let latest = n.latest.as_ref();
    let cpu = latest.map(|s| f64::from(s.cpu.total_percent));
    let mem = latest
        .filter(|s| s.memory.total_bytes > 0)
        .map(|s| s.memory.used_bytes as f64 * 100.0 / s.memory.total_bytes as f64);
    let rows: Vec<(&str, String)> = vec![
        ("Health", esc(&n.status.to_string()).to_string()),
        (
            "Pool",
            esc(n.labels.get("pool").map(String::as_str).unwrap_or("–")).to_string(),
        ),
        (
            "Labels",
            if labels.is_empty() {
                "–".into()
            } else {
                labels
            },
        ),
        (
            "Capacity",
            format!(
                "{} CPU ({} millicores), {} memory, {} disk",
                html::cores(n.capacity.cpu_millis),
                n.capacity.cpu_millis,
                html::bytes(n.capacity.memory_bytes),
                html::bytes(n.capacity.disk_bytes)
            ),
        ),
        (
            "CPU use",
            format!(
                "{}<span id=\"node-cpu\">{}</span>",
                html::meter(cpu, "cpu"),
                html::percent(cpu)
            ),
        ),
        (
            "Memory use",
            format!(
                "{}<span id=\"node-mem\">{}</span>",
                html::meter(mem, "mem"),
                html::percent(mem)
            ),
        ),
        (
            "Address",
            esc(n.address.as_deref().unwrap_or("–")).to_string(),
        ),
        ("Agent", esc(&n.agent_version).to_string()),
        (
            "Runtime",
            format!(
                "Docker {}, {}{}",
                esc(caps.docker_version.as_deref().unwrap_or("unknown")),
                esc(&caps.os),
                if caps.live_checkpoint {
                    ", live checkpoint"
                } else {
                    ""
                }
            ),
        ),
        (
            "Last seen",
            n.last_seen_unix_ms
                .map(|t| format!("{} ({})", html::ago(t, now), html::time(t)))
                .unwrap_or_else(|| "never".into()),
        ),
        ("Enrolled", html::time(n.enrolled_at_unix_ms)),
        (
            "Certificate expires",
            n.cert_expires_unix_ms
                .map(html::time)
                .unwrap_or_else(|| "–".into()),
        ),
        (
            "Images",
            format!("{} ({})", n.images, html::bytes(n.image_bytes)),
        ),
    ];
    out.push_str("<dl class=\"details\">");
    for (k, v) in rows {
        let _ = write!(out, "<dt>{k}</dt><dd>{v}</dd>");
    }
    out.push_str("</dl>");
}

fn gpus(out: &mut String, n: &NodeView) {
    if n.capacity.gpus.is_empty() {
        return;
    }
    out.push_str(
        "<section><h2>GPUs</h2><div class=\"scroll\"><table class=\"grid\"><thead><tr><th>#</th><th>Model</th>\
         <th class=\"num\">Memory</th><th class=\"num\">Use</th><th class=\"num\">Memory used</th>\
         <th class=\"num\">Temperature</th><th class=\"num\">Power</th></tr></thead><tbody>",
    );
    for g in &n.capacity.gpus {
        let s = n
            .latest
            .as_ref()
            .and_then(|s| s.gpus.iter().find(|x| x.uuid == g.uuid));
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            g.index,
            esc(&g.model),
            html::bytes(g.memory_bytes),
            s.map(|s| format!("{}%", s.utilization_percent))
                .unwrap_or_else(|| "–".into()),
            s.map(|s| html::bytes(s.memory_used_bytes))
                .unwrap_or_else(|| "–".into()),
            s.map(|s| format!("{}°C", s.temperature_celsius))
                .unwrap_or_else(|| "–".into()),
            s.map(|s| format!("{:.0} W", f64::from(s.power_milliwatts) / 1000.0))
                .unwrap_or_else(|| "–".into()),
        );
    }
    out.push_str("</tbody></table></div></section>");
}
