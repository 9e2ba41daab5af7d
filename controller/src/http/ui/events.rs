//! `GET /ui/events` (the newest events) and `GET /ui/events/stream` (the events
//! after them as server-sent events, for the page's script: the API's own
//! stream, under the dashboard's session).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::Ui;
use super::auth::User;
use super::html::{self, Section, esc, seg};
use crate::services::events::EventQuery;

/// Events shown when the page loads.
pub const SHOWN: usize = 100;

/// The event log, newest first; new events appear live.
pub async fn page(State(ui): State<Arc<Ui>>, user: User) -> Response {
    let query = EventQuery {
        limit: SHOWN,
        newest: true,
        ..EventQuery::default()
    };
    let scan = match ui.api.events.read(&query) {
        Ok(scan) => scan,
        Err(e) => {
            return user.error(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("reading the event log failed: {e}"),
            );
        }
    };
    let mut body = String::with_capacity(SHOWN * 512 + 2048);
    let _ = write!(
        body,
        "<h1>Events</h1><p class=\"live-note\"><span id=\"feed-state\" class=\"badge info\">connecting</span> \
         new events appear at the top as they happen.</p>\
         <div class=\"scroll\"><table class=\"grid\" id=\"events\" data-stream=\"/ui/events/stream?after={}\">\
         <thead><tr><th>#</th><th>Time</th><th>Kind</th><th>Actor</th><th>Node</th><th>Job</th>\
         <th>Message</th></tr></thead><tbody>",
        scan.last_scanned
    );
    for e in scan.events.iter().rev() {
        let node = e
            .node
            .as_deref()
            .map(|n| format!("<a href=\"/ui/nodes/{}\">{}</a>", esc(&seg(n)), esc(n)))
            .unwrap_or_default();
        let job = e
            .job
            .as_deref()
            .map(|j| format!("<a href=\"/ui/jobs/{}\">{}</a>", esc(&seg(j)), esc(j)))
            .unwrap_or_default();
        let _ = write!(
            body,
            "<tr data-seq=\"{}\"><td class=\"num\">{}</td><td>{}</td><td class=\"mono\">{}</td><td>{}</td>\
             <td>{node}</td><td>{job}</td><td class=\"msg\">{}</td></tr>",
            e.seq,
            e.seq,
            html::time(e.time_unix_ms),
            esc(&e.kind),
            esc(&e.actor),
            esc(&e.message)
        );
    }
    body.push_str("</tbody></table></div>");
    html::page(
        StatusCode::OK,
        "Events",
        Some(Section::Events),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        &body,
    )
}

/// `?after=`: the last event the page shows.
#[derive(Debug, Default, Deserialize)]
pub struct StreamQuery {
    /// Send the events after this position.
    #[serde(default)]
    pub after: u64,
}

/// The events after `after`, then live ones, as server-sent events.
pub async fn stream(
    State(ui): State<Arc<Ui>>,
    _user: User,
    headers: HeaderMap,
    Query(q): Query<StreamQuery>,
) -> Response {
    let query = EventQuery {
        after: q.after,
        ..EventQuery::default()
    };
    match crate::http::events::stream(&ui.api, &headers, query) {
        Ok(sse) => sse.into_response(),
        Err(problem) => problem.into_response(),
    }
}
