//! `GET /ui/costs` (hourly cost per pool, job, capacity type and node, with the
//! budgets drawn as lines on their bars) and `GET /ui/migrations` (migrations in
//! progress and recent ones).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use novacron_api::GroupCost;
use novacron_common::cost::BudgetStatus;

use super::Ui;
use super::auth::User;
use super::html::{self, Section, esc, seg};
use crate::services::costs::live_report;

/// Nodes listed on the costs page (the most expensive first).
pub const NODES_SHOWN: usize = 100;

/// The costs page.
pub async fn page(State(ui): State<Arc<Ui>>, user: User) -> Response {
    let report = live_report(&ui.api);
    let cur = esc(&report.currency).to_string();
    let mut body = String::with_capacity(16 * 1024);
    let _ = write!(
        body,
        "<h1>Costs</h1><p class=\"total\">The fleet costs <b id=\"total\">{:.2} {cur}</b> per hour.</p>",
        report.total_hourly
    );
    if !report.budgets.is_empty() {
        body.push_str(
            "<section><h2>Budgets</h2><div class=\"scroll\"><table class=\"grid\"><thead><tr><th>Budget of</th>\
             <th class=\"num\">Now</th><th class=\"num\">Budget</th><th>Against the budget</th><th>Status</th>\
             </tr></thead><tbody>",
        );
        for b in &report.budgets {
            let _ = write!(
                body,
                "<tr><td>{}</td><td class=\"num\">{:.2} {cur}</td><td class=\"num\">{:.2} {cur}</td><td>{}</td><td>{}</td></tr>",
                esc(&b.subject()),
                b.hourly,
                b.budget,
                bar(b.hourly, Some(b.budget), b.budget.max(b.hourly)),
                html::badge(if b.exceeded { "exceeded" } else { "within" })
            );
        }
        body.push_str("</tbody></table></div></section>");
    }
    groups(
        &mut body,
        "Per pool",
        "pool",
        &report.pools,
        &report.budgets,
        &cur,
    );
    groups(
        &mut body,
        "Per job",
        "job",
        &report.jobs,
        &report.budgets,
        &cur,
    );
    groups(
        &mut body,
        "Per capacity type",
        "",
        &report.capacity,
        &[],
        &cur,
    );

    let mut nodes = report.nodes.clone();
    nodes.sort_by(|a, b| b.hourly.total_cmp(&a.hourly));
    let _ = write!(
        body,
        "<section><h2>Per node</h2><div class=\"scroll\"><table class=\"grid\"><thead><tr><th>Node</th>\
         <th>Pool</th><th>Capacity</th><th class=\"num\">Per hour</th><th class=\"num\">Allocated</th>\
         <th>Price from</th></tr></thead><tbody>"
    );
    for n in nodes.iter().take(NODES_SHOWN) {
        let _ = write!(
            body,
            "<tr><td><a href=\"/ui/nodes/{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"num\">{:.4} {cur}</td>\
             <td class=\"num\">{:.0}%</td><td class=\"msg\">{}</td></tr>",
            esc(&seg(&n.node)),
            esc(&n.node),
            esc(&n.pool),
            esc(&n.capacity),
            n.hourly,
            n.allocated * 100.0,
            esc(&n.source)
        );
    }
    body.push_str("</tbody></table></div>");
    if nodes.len() > NODES_SHOWN {
        let _ = write!(
            body,
            "<p class=\"note\">The {NODES_SHOWN} most expensive of {} nodes; <code>novacron cost</code> lists all.</p>",
            nodes.len()
        );
    }
    body.push_str("</section>");
    html::page(
        StatusCode::OK,
        "Costs",
        Some(Section::Costs),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        &body,
    )
}

/// A table of group costs, each with a bar, and the group's budget drawn on it
/// when `scope` has one.
fn groups(
    out: &mut String,
    title: &str,
    scope: &str,
    rows: &[GroupCost],
    budgets: &[BudgetStatus],
    cur: &str,
) {
    if rows.is_empty() {
        return;
    }
    let budget_of = |name: &str| {
        budgets
            .iter()
            .find(|b| b.scope == scope && b.name == name)
            .map(|b| b.budget)
    };
    let largest = rows
        .iter()
        .map(|r| r.hourly.max(budget_of(&r.name).unwrap_or(0.0)))
        .fold(0.0_f64, f64::max);
    let _ = write!(
        out,
        "<section><h2>{}</h2><div class=\"scroll\"><table class=\"grid\"><thead><tr><th>Name</th>\
         <th class=\"num\">Count</th><th class=\"num\">Per hour</th><th>Against the largest (budget in red)</th></tr></thead><tbody>",
        esc(title)
    );
    for r in rows {
        let name = if scope == "job" {
            format!(
                "<a href=\"/ui/jobs/{}\">{}</a>",
                esc(&seg(&r.name)),
                esc(&r.name)
            )
        } else {
            esc(&r.name).to_string()
        };
        let _ = write!(
            out,
            "<tr><td>{name}</td><td class=\"num\">{}</td><td class=\"num\">{:.4} {cur}</td><td>{}</td></tr>",
            r.count,
            r.hourly,
            bar(r.hourly, budget_of(&r.name), largest)
        );
    }
    out.push_str("</tbody></table></div></section>");
}

/// A horizontal bar of `value` out of `max`, with a red line at `budget`.
fn bar(value: f64, budget: Option<f64>, max: f64) -> String {
    let max = if max > 0.0 { max } else { 1.0 };
    let w = (value / max).clamp(0.0, 1.0) * 200.0;
    let over = budget.is_some_and(|b| value > b);
    let mut svg = format!(
        "<svg class=\"bar\" viewBox=\"0 0 200 12\" width=\"200\" height=\"12\" role=\"img\" aria-label=\"{value:.2}\">\
         <rect x=\"0\" y=\"1\" width=\"200\" height=\"10\" fill=\"#eef1f4\"/>\
         <rect x=\"0\" y=\"1\" width=\"{w:.1}\" height=\"10\" fill=\"{}\"/>",
        if over { "#d1242f" } else { "#1f6feb" }
    );
    if let Some(b) = budget {
        let x = (b / max).clamp(0.0, 1.0) * 200.0;
        let _ = write!(
            svg,
            "<line class=\"budget\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"0\" y2=\"12\" stroke=\"#d1242f\" stroke-width=\"2\"><title>budget {b:.2}</title></line>"
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Migrations, newest first.
pub async fn migrations(State(ui): State<Arc<Ui>>, user: User) -> Response {
    let now = SystemTime::now();
    let list = ui.api.migrations.list();
    let mut body = String::from("<h1>Migrations</h1>");
    if list.is_empty() {
        body.push_str("<p class=\"empty\">No migrations since the controller started.</p>");
    } else {
        body.push_str(
            "<div class=\"scroll\"><table class=\"grid\" id=\"migrations\"><thead><tr><th>Id</th><th>Allocation</th>\
             <th>Job</th><th>From</th><th>To</th><th>Mode</th><th>Phase</th><th>Moved</th><th>Started</th>\
             <th class=\"num\">Downtime</th><th>Error</th></tr></thead><tbody>",
        );
        for m in &list {
            let phase = word(&m.phase);
            let moved = if m.bytes_total > 0 {
                format!(
                    "<meter min=\"0\" max=\"{}\" value=\"{}\"></meter> {} of {}",
                    m.bytes_total,
                    m.bytes_done.min(m.bytes_total),
                    html::bytes(m.bytes_done),
                    html::bytes(m.bytes_total)
                )
            } else {
                html::bytes(m.bytes_done)
            };
            let _ = write!(
                body,
                "<tr><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td><a href=\"/ui/jobs/{}\">{}</a></td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{moved}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"msg\">{}</td></tr>",
                esc(&m.id),
                esc(&m.alloc),
                esc(&seg(&m.job)),
                esc(&m.job),
                esc(&m.from),
                esc(&m.to),
                esc(&word(&m.mode)),
                html::badge(&phase),
                html::ago(m.started_unix_ms, now),
                m.downtime_ms
                    .map(|d| format!("{d} ms"))
                    .unwrap_or_else(|| "–".into()),
                esc(m.error.as_deref().unwrap_or(""))
            );
        }
        body.push_str("</tbody></table></div>");
    }
    html::page(
        StatusCode::OK,
        "Migrations",
        Some(Section::Migrations),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        &body,
    )
}

/// A unit enum's serialized name (`rolled_back`, `live`).
fn word(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_over_its_budget_is_red_with_the_budget_drawn() {
        let over = bar(3.0, Some(2.0), 4.0);
        assert!(
            over.contains("width=\"150.0\" height=\"10\" fill=\"#d1242f\""),
            "{over}"
        );
        assert!(
            over.contains("<line class=\"budget\" x1=\"100.0\""),
            "{over}"
        );
        let within = bar(1.0, Some(2.0), 4.0);
        assert!(within.contains("fill=\"#1f6feb\""), "{within}");
        assert!(!bar(1.0, None, 0.0).contains("budget"));
        assert!(!over.contains("style="));
    }
}
