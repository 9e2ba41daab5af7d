//! `GET /ui/alerts`: active alerts, with silence and acknowledge buttons for
//! operators.
//!
//! **Integration point for the alert engine:** this page and its navigation
//! entry exist so that the alert engine fills them; until it does, the page says
//! that no alert rules are defined. Its buttons, when added, post forms like the
//! other actions and go through [`super::auth::authorize`].

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::Ui;
use super::auth::User;
use super::html::{self, Section};

/// The alerts page.
pub async fn page(State(ui): State<Arc<Ui>>, user: User) -> Response {
    let body = "<h1>Alerts</h1><p class=\"empty\" id=\"no-alerts\">No alert rules are defined, \
                so no alert can fire.</p>";
    html::page(
        StatusCode::OK,
        "Alerts",
        Some(Section::Alerts),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        body,
    )
}
