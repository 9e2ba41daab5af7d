//! `GET /ui/jobs` (every job), `GET /ui/jobs/{name}` (a job: rollout state,
//! placement explanation, charts, allocations, versions, and for operators the
//! scale form and restart buttons) and `GET /ui/jobs/{name}/chart/{metric}`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use novacron_common::manifest::JobType;

use super::Ui;
use super::auth::User;
use super::chart;
use super::html::{self, Section, esc, seg};
use super::metrics::{self, JOB_CHARTS, RANGES, Subject};
use super::node::{AllocColumn, RangeQuery, alloc_table, svg_answer};

/// Every job.
pub async fn list(State(ui): State<Arc<Ui>>, user: User) -> Response {
    let now = SystemTime::now();
    let jobs = ui.api.workloads.jobs();
    let mut body = String::from("<h1>Jobs</h1>");
    if jobs.is_empty() {
        body.push_str(
            "<p class=\"empty\">No jobs; <code>novacron apply -f job.yaml</code> submits one.</p>",
        );
    } else {
        body.push_str(
            "<div class=\"scroll\"><table class=\"grid\" id=\"jobs\"><thead><tr><th>Job</th><th>Type</th>\
             <th>Status</th><th class=\"num\">Replicas</th><th class=\"num\">Running</th>\
             <th class=\"num\">Healthy</th><th class=\"num\">Version</th><th>Submitted</th></tr></thead><tbody>",
        );
        for j in &jobs {
            let _ = write!(
                body,
                "<tr data-job=\"{name}\"><td><a href=\"/ui/jobs/{link}\">{name}</a></td><td>{ty}</td>\
                 <td>{status}</td><td class=\"num\">{replicas}</td><td class=\"num\">{running}</td>\
                 <td class=\"num\">{healthy}</td><td class=\"num\">{version}</td><td>{ago} by {by}</td></tr>",
                name = esc(&j.name),
                link = esc(&seg(&j.name)),
                ty = esc(&job_type(j.job_type)),
                status = html::badge(&j.status),
                replicas = j.replicas,
                running = j.running,
                healthy = j.healthy,
                version = j.version,
                ago = html::ago(j.submitted_at_unix_ms, now),
                by = esc(&j.submitted_by),
            );
        }
        body.push_str("</tbody></table></div>");
    }
    html::page(
        StatusCode::OK,
        "Jobs",
        Some(Section::Jobs),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        &body,
    )
}

/// A job's page.
pub async fn page(
    State(ui): State<Arc<Ui>>,
    user: User,
    Path(name): Path<String>,
    Query(query): Query<RangeQuery>,
) -> Response {
    let detail = match ui.api.workloads.job(&name) {
        Ok(d) => d,
        Err(e) => return user.error(StatusCode::NOT_FOUND, &e.to_string()),
    };
    let now = SystemTime::now();
    let (range, range_ms) = metrics::range(query.range.as_deref());
    let s = &detail.summary;
    let link = seg(&s.name);
    let mut body = String::with_capacity(16 * 1024);
    let _ = write!(
        body,
        "<h1>Job <span class=\"name\">{}</span> {}</h1>",
        esc(&s.name),
        html::badge(&s.status)
    );
    let rollout = match s.stable_version {
        Some(v) if v == s.version => format!("version {} is current and stable", s.version),
        Some(v) => format!("rolling out version {} (last stable: {v})", s.version),
        None => format!("rolling out version {} (none stable yet)", s.version),
    };
    let scaled = match &s.scaled_by {
        Some(by) => format!(
            " (set by {}{})",
            esc(by),
            s.scale_reason
                .as_deref()
                .map(|r| format!(": {}", esc(r)))
                .unwrap_or_default()
        ),
        None => String::new(),
    };
    let _ = write!(
        body,
        "<dl class=\"details\"><dt>Type</dt><dd>{ty}</dd>\
         <dt>Replicas</dt><dd><span id=\"replicas\">{replicas}</span> wanted{scaled}; manifest asks {manifest}</dd>\
         <dt>Running</dt><dd>{running} running, {healthy} healthy</dd>\
         <dt>Rollout</dt><dd>{rollout}</dd>\
         <dt>Placement</dt><dd class=\"msg\">{message}</dd>\
         <dt>Submitted</dt><dd>{ago} by {by}</dd></dl>",
        ty = esc(&job_type(s.job_type)),
        replicas = s.replicas,
        manifest = s.manifest_replicas,
        running = s.running,
        healthy = s.healthy,
        message = if s.message.is_empty() {
            "–".to_string()
        } else {
            esc(&s.message).to_string()
        },
        ago = html::ago(s.submitted_at_unix_ms, now),
        by = esc(&s.submitted_by),
    );
    if user.can_act() && s.job_type != JobType::System {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/ui/jobs/{}/scale\" class=\"scale\" id=\"scale\">{}\
             <label for=\"replicas-input\">Replicas</label>\
             <input id=\"replicas-input\" name=\"replicas\" type=\"number\" min=\"0\" max=\"10000\" value=\"{}\" required>\
             <button type=\"submit\">Scale</button></form>",
            esc(&link),
            html::csrf_field(&user.csrf),
            s.replicas
        );
    }

    body.push_str("<section><h2>Utilisation</h2><nav class=\"ranges\" aria-label=\"time range\">");
    for (value, label, _) in RANGES {
        let on = if *value == range {
            " class=\"on\" aria-current=\"true\""
        } else {
            ""
        };
        let _ = write!(
            body,
            "<a href=\"/ui/jobs/{}?range={value}\"{on}>{label}</a>",
            esc(&link)
        );
    }
    body.push_str("</nav><div class=\"charts\">");
    for c in JOB_CHARTS {
        let svg = match metrics::series(&ui, Subject::Job(s.name.clone()), c.metric, range_ms).await
        {
            Ok(series) => {
                chart::line_chart(&format!("chart-{}", c.metric), c.title, c.scale, &series)
            }
            Err((_, e)) => format!("<p class=\"error\">{}</p>", esc(&e)),
        };
        let _ = write!(
            body,
            "<figure class=\"chart-box\" data-refresh=\"/ui/jobs/{}/chart/{}?range={range}\">\
             <figcaption>{}</figcaption>{svg}</figure>",
            esc(&link),
            c.metric,
            c.title
        );
    }
    body.push_str("</div></section>");

    let allocs = ui.api.workloads.allocations(Some(&s.name), None);
    body.push_str("<section><h2>Allocations</h2>");
    alloc_table(&mut body, &allocs, &user, AllocColumn::Node, now);
    body.push_str("</section>");

    if let Ok(versions) = ui.api.workloads.versions(&s.name) {
        body.push_str(
            "<section><h2>Versions</h2><div class=\"scroll\"><table class=\"grid\"><thead><tr>\
             <th class=\"num\">Version</th><th>Submitted</th><th>By</th><th>From</th><th>State</th>\
             <th>Changes</th></tr></thead><tbody>",
        );
        for v in &versions {
            let state = match (v.current, v.stable) {
                (true, true) => html::badge("current") + " " + &html::badge("stable"),
                (true, false) => html::badge("current"),
                (false, true) => html::badge("stable"),
                (false, false) => String::new(),
            };
            let changes: Vec<String> = v.changes.iter().map(|c| c.path.clone()).collect();
            let _ = write!(
                body,
                "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{state}</td><td class=\"msg\">{}</td></tr>",
                v.version,
                html::time(v.submitted_at_unix_ms),
                esc(&v.by),
                esc(&v.file),
                esc(&changes.join(", "))
            );
        }
        body.push_str("</tbody></table></div></section>");
    }
    html::page(
        StatusCode::OK,
        &format!("Job {}", s.name),
        Some(Section::Jobs),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        &body,
    )
}

/// One chart of a job as a standalone SVG document.
pub async fn chart(
    State(ui): State<Arc<Ui>>,
    _user: User,
    Path((name, metric)): Path<(String, String)>,
    Query(query): Query<RangeQuery>,
) -> Response {
    let Some(c) = JOB_CHARTS.iter().find(|c| c.metric == metric) else {
        return (StatusCode::NOT_FOUND, "no such chart").into_response();
    };
    if ui.api.workloads.job(&name).is_err() {
        return (StatusCode::NOT_FOUND, "no such job").into_response();
    }
    let (_, range_ms) = metrics::range(query.range.as_deref());
    svg_answer(
        metrics::series(&ui, Subject::Job(name), c.metric, range_ms)
            .await
            .map(|s| chart::line_chart(&format!("chart-{}", c.metric), c.title, c.scale, &s)),
    )
}

fn job_type(t: JobType) -> String {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{t:?}").to_lowercase())
}
