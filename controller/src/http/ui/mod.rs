//! The web dashboard, served by the controller on the API's port and TLS under
//! `/ui/`: server-rendered HTML pages with server-rendered SVG charts, and one
//! small script (`assets/app.js`) that keeps them live (the event feed over
//! server-sent events, utilisation and charts by periodic refresh).
//!
//! - **Login** ([`login`]): a form takes an API token, checks it as the API's
//!   `Caller` does, and starts a server-side session ([`session`]); the browser
//!   holds only the session's random id, in a `__Host-` cookie that is
//!   `Secure; HttpOnly; SameSite=Strict`. The token is never stored, put in a
//!   cookie or in a URL.
//! - **Every request** ([`auth`]) finds its session and checks that the API
//!   token it was opened with is still valid (revoking the token ends the
//!   session). Pages are read-only; a page request without a session is sent to
//!   the login page.
//! - **Actions** ([`actions`]) are HTML form POSTs to `/ui/...` that carry the
//!   session's CSRF token; the server checks it, the `Origin` and
//!   `Sec-Fetch-Site` headers when present, and the role (operator), whatever the
//!   page showed. Refusals are 403 and `access.denied` events.
//! - **Headers**: every answer carries a strict Content-Security-Policy
//!   ([`CSP`]: scripts, styles and connections only from this origin, no inline
//!   script or style, no framing), `nosniff` and a `same-origin` referrer
//!   policy (no dashboard URL leaks to another site); pages are `no-store`.
//! - **Assets** are compiled into the binary ([`assets`]); nothing is fetched
//!   from elsewhere.
//!
//! These routes are HTML, not API: they are not in the OpenAPI document and do
//! not pass through the API's problem-document layer.
//!
//! The alerts page ([`alerts`]) shows the alert engine's active alerts,
//! silences, rules and channels, with acknowledge and silence buttons.

pub mod actions;
pub mod alerts;
pub mod assets;
pub mod auth;
pub mod chart;
pub mod costs;
pub mod events;
pub mod fleet;
pub mod html;
pub mod jobs;
pub mod login;
pub mod metrics;
pub mod node;
pub mod session;

use std::sync::Arc;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Redirect, Response};
use axum::routing::{get, post};

use crate::services::context::ApiState;
use session::Sessions;

/// The Content-Security-Policy of every dashboard answer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The largest form body accepted (a token, a CSRF token and a number).
pub const MAX_FORM_BYTES: usize = 16 * 1024;

/// The dashboard's state: the controller's handles and the sessions.
#[derive(Debug)]
pub struct Ui {
    /// The controller's state, as the API handlers see it.
    pub api: Arc<ApiState>,
    /// Logged-in browsers.
    pub sessions: Sessions,
}

/// The dashboard's routes (and `/`, which leads to it), with their own layers:
/// security headers, the API's request deadline and a small body limit.
pub fn router(api: Arc<ApiState>) -> Router {
    let ui = Arc::new(Ui {
        api,
        sessions: Sessions::default(),
    });
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/") }))
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(fleet::page))
        .route("/ui/fleet/live", get(fleet::live))
        .route("/ui/login", get(login::form).post(login::submit))
        .route("/ui/logout", post(login::logout))
        .route("/ui/nodes/{name}", get(node::page))
        .route("/ui/nodes/{name}/chart/{metric}", get(node::chart))
        .route("/ui/nodes/{name}/drain", post(actions::drain))
        .route("/ui/nodes/{name}/uncordon", post(actions::uncordon))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{name}", get(jobs::page))
        .route("/ui/jobs/{name}/chart/{metric}", get(jobs::chart))
        .route("/ui/jobs/{name}/scale", post(actions::scale))
        .route("/ui/allocations/{id}/restart", post(actions::restart))
        .route("/ui/allocations/{id}/migrate", post(actions::migrate))
        .route("/ui/events", get(events::page))
        .route("/ui/events/stream", get(events::stream))
        .route("/ui/costs", get(costs::page))
        .route("/ui/migrations", get(costs::migrations))
        .route("/ui/alerts", get(alerts::page))
        .route("/ui/alerts/ack", post(alerts::ack))
        .route("/ui/alerts/silence", post(alerts::silence))
        .route("/ui/alerts/silences/{id}/delete", post(alerts::unsilence))
        .route("/ui/assets/{file}", get(assets::serve))
        .route("/ui/{*rest}", get(not_found))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn_with_state(
            super::REQUEST_DEADLINE,
            super::deadline,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(ui)
}

/// Any other page under `/ui/`: a 404 page (no session needed; it tells
/// nothing).
async fn not_found() -> Response {
    html::error_page(
        axum::http::StatusCode::NOT_FOUND,
        None,
        "there is no such page; the fleet page links to the others",
    )
}

/// Adds the security headers to every dashboard answer; what does not say how
/// to cache it (pages, fragments, redirects) is `no-store`.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // `same-origin`, not `no-referrer`: no URL of the dashboard leaks to another
    // site either way, but under `no-referrer` browsers send `Origin: null` on
    // form posts, and the origin check of every action needs the real one.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}
