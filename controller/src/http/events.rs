//! `GET /v1/events` (a page of the event log) and `GET /v1/events/stream` (live
//! server-sent events that catch up from the store when they fall behind).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use novacron_api::{ApiError, Event, EventPage};
use novacron_common::pki::Role;
use tokio::sync::broadcast;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem, internal};
use crate::services::events::{EventLog, EventQuery};

/// The event routes: `GET /v1/events` (a page) and `GET /v1/events/stream`
/// (server-sent events, resumable with `Last-Event-ID`).
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(follow))
}

#[utoipa::path(get, path = "/v1/events", operation_id = "list_events", tag = "events", params(EventQuery), responses((status = 200, body = EventPage), (status = 400, description = "a bad filter or limit", content_type = "application/problem+json", body = ApiError), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError)))]
async fn list(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Query(query): Query<EventQuery>,
) -> Result<Json<EventPage>, Problem> {
    caller.require(Role::Viewer)?;
    query.validate().map_err(Problem::bad_request)?;
    let scan = st.events.read(&query).map_err(internal)?;
    Ok(Json(EventPage {
        events: scan.events,
        next_after: scan.last_scanned,
        more: scan.more,
    }))
}

/// One server-sent event of `/v1/events/stream`, as the OpenAPI document describes
/// it (the stream itself is written by axum's SSE encoder).
#[derive(Debug, utoipa::ToSchema)]
pub struct SseFrame {
    /// The event's position (resume with `Last-Event-ID`).
    pub id: String,
    /// `event`, or `error` when reading the log failed (the stream then ends).
    pub event: String,
    /// An [`Event`] as JSON (or the error message).
    pub data: String,
}

/// What a follower has read and what it still owes its client.
struct Follower {
    log: Arc<EventLog>,
    query: EventQuery,
    live: broadcast::Receiver<Event>,
    backlog: VecDeque<Event>,
    caught_up: bool,
}

#[utoipa::path(get, path = "/v1/events/stream", tag = "events", params(EventQuery), responses((status = 200, description = "server-sent events: `event: event`, `id` the position, `data` one JSON Event; a reconnecting client sends `Last-Event-ID` to resume after that position", content_type = "text/event-stream", body = SseFrame), (status = 400, content_type = "application/problem+json", body = ApiError), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError)))]
async fn follow(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    headers: HeaderMap,
    Query(query): Query<EventQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, Problem> {
    caller.require(Role::Viewer)?;
    stream(&st, &headers, query)
}

/// The event stream of `query` for a caller already authorized to read events
/// (`GET /v1/events/stream`, and the dashboard's stream under its session),
/// resumed after `Last-Event-ID` when `headers` carry one.
pub(crate) fn stream(
    st: &ApiState,
    headers: &HeaderMap,
    mut query: EventQuery,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>> + use<>>, Problem> {
    query.validate().map_err(Problem::bad_request)?;
    if let Some(id) = headers.get("last-event-id") {
        query.after = id
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                Problem::bad_request(format!(
                    "Last-Event-ID: {id:?} is not an event position; send the `id` of the last event received"
                ))
            })?;
    }
    // Only the tail was asked for: start from there, then follow forward.
    if query.newest {
        let tail = st.events.read(&query).map_err(internal)?;
        query.newest = false;
        query.after = tail.last_scanned;
        let backlog = tail.events.into();
        return Ok(sse(Follower {
            live: st.events.subscribe(),
            log: st.events.clone(),
            query,
            backlog,
            caught_up: false,
        }));
    }
    Ok(sse(Follower {
        live: st.events.subscribe(),
        log: st.events.clone(),
        query,
        backlog: VecDeque::new(),
        caught_up: false,
    }))
}

fn sse(follower: Follower) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let stream = futures_util::stream::unfold(Some(follower), |state| async move {
        let mut f = state?;
        loop {
            if let Some(event) = f.backlog.pop_front() {
                let item = SseEvent::default()
                    .id(event.seq.to_string())
                    .event("event")
                    .json_data(&event)
                    .unwrap_or_else(|e| SseEvent::default().event("error").data(e.to_string()));
                return Some((Ok(item), Some(f)));
            }
            if !f.caught_up {
                match f.log.read(&f.query) {
                    Ok(scan) => {
                        f.query.after = scan.last_scanned;
                        f.caught_up = !scan.more;
                        f.backlog.extend(scan.events);
                    }
                    Err(error) => {
                        let item = SseEvent::default()
                            .event("error")
                            .data(format!("reading the event log failed: {error}"));
                        return Some((Ok(item), None));
                    }
                }
                continue;
            }
            match f.live.recv().await {
                Ok(event) if event.seq <= f.query.after => {}
                Ok(event) if event.seq == f.query.after + 1 => {
                    f.query.after = event.seq;
                    if f.query.matches(&event) {
                        f.backlog.push_back(event);
                    }
                }
                // A gap (this follower lagged): read it back from the store.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => f.caught_up = false,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
