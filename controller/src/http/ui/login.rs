//! `GET /ui/login` (the form), `POST /ui/login` (an API token in, a session
//! cookie out) and `POST /ui/logout`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Form;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use novacron_common::pki::Role;
use serde::Deserialize;
use tracing::{info, warn};

use super::Ui;
use super::auth::{self, User};
use super::html::{self, esc};
use super::session;
use crate::state::api_tokens::{self, ApiToken};

/// The login form.
pub async fn form(State(ui): State<Arc<Ui>>, headers: HeaderMap) -> Response {
    // Already logged in: straight to the fleet.
    if session::from_cookies(&headers)
        .and_then(|id| ui.sessions.get(&id, SystemTime::now()))
        .is_some()
    {
        return Redirect::to("/ui/").into_response();
    }
    login_page(StatusCode::OK, None)
}

/// `POST /ui/login` body.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// An API token (`nca_…`).
    #[serde(default)]
    pub token: String,
}

/// Checks the token as the API does and starts a session.
pub async fn submit(
    State(ui): State<Arc<Ui>>,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<LoginForm>,
) -> Response {
    // A login form posted from elsewhere would log the browser in as someone
    // else (login CSRF).
    if let Err(why) = auth::same_origin(&headers, &uri) {
        return auth::refuse(
            &ui,
            "anonymous",
            &axum::http::Method::POST,
            uri.path(),
            &why,
        );
    }
    let now = SystemTime::now();
    let refused = |message: String| login_page(StatusCode::UNAUTHORIZED, Some(&message));
    let token: ApiToken = match form.token.trim().parse() {
        Ok(t) => t,
        Err(e) => return refused(format!("{e}")),
    };
    let record = match ui.api.store.api_token(token.id()) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "reading an API token for a dashboard login failed");
            return html::error_page(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "the controller's store cannot be read now; retry",
            );
        }
    };
    let identity = match api_tokens::authenticate(record.as_ref(), &token, now) {
        Ok(id) if id.role >= Role::Viewer => id,
        Ok(id) => return refused(format!("{id} may not use the dashboard")),
        Err(e) => {
            warn!(token = token.id(), error = %e, "dashboard login refused");
            return refused(e.to_string());
        }
    };
    let token_expires = record.as_ref().map_or(now, |r| {
        UNIX_EPOCH + Duration::from_millis(r.expires_at_unix_ms)
    });
    // A session this browser had before ends: one login, one live session.
    if let Some(old) = session::from_cookies(&headers) {
        ui.sessions.remove(&old);
    }
    let (id, s) = ui
        .sessions
        .create(identity.clone(), token.id(), token_expires, now);
    info!(who = %identity, token = token.id(), "dashboard login");
    (
        [(header::SET_COOKIE, session::set_cookie(&id, now, s.expires))],
        Redirect::to("/ui/"),
    )
        .into_response()
}

/// `POST /ui/logout` body.
#[derive(Debug, Deserialize)]
pub struct LogoutForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
}

/// Ends the session and clears the cookie.
pub async fn logout(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<LogoutForm>,
) -> Response {
    if let Err(refusal) = auth::authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Viewer) {
        return *refusal;
    }
    ui.sessions.remove(&user.id);
    info!(who = %user.who, "dashboard logout");
    (
        [(header::SET_COOKIE, session::clear_cookie())],
        Redirect::to("/ui/login"),
    )
        .into_response()
}

fn login_page(status: StatusCode, error: Option<&str>) -> Response {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    let body = format!(
        "<section class=\"login\"><h1>Log in</h1>\
         <p>Paste an API token (<code>novacron-controller admin token</code> creates one). \
         The dashboard keeps it only to open a session: the browser gets a session cookie, \
         never the token.</p>{error}\
         <form method=\"post\" action=\"/ui/login\" id=\"login\">\
         <label for=\"token\">API token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" \
         placeholder=\"nca_…\" required>\
         <button type=\"submit\">Log in</button></form></section>"
    );
    html::page(status, "Log in", None, None, None, &body)
}
