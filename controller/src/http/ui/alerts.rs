//! `GET /ui/alerts`: the active alerts (firing first) with acknowledge and
//! silence buttons for operators, the silences in force (with a remove
//! button), the rules with their pending and firing counts, and the channels
//! with what waits in their outbox. The buttons post forms that go through
//! [`authorize`] (origin, CSRF token, operator role) and then the same service
//! calls as `/v1/alerts/ack` and `/v1/alerts/silences`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use novacron_api::SilenceRequest;
use novacron_common::alert::rule::format_value;
use novacron_common::pki::Role;
use serde::Deserialize;

use super::Ui;
use super::auth::{User, authorize};
use super::html::{self, Section, esc, seg};
use crate::services::alerts::AlertError;
use crate::services::events::{NewEvent, kind};

/// The silences a button offers.
const SILENCE_CHOICES: [&str; 3] = ["1h", "4h", "24h"];

/// The alerts page.
pub async fn page(State(ui): State<Arc<Ui>>, user: User) -> Response {
    let now = SystemTime::now();
    let alerts = ui.api.alerts.active(now);
    let silences = ui.api.alerts.silences(now);
    let rules = ui.api.alerts.rule_views();
    let channels = ui.api.alerts.channel_views();
    let act = user.can_act();
    let firing = alerts.iter().filter(|a| a.state == "firing").count();
    let mut body = format!(
        "<h1>Alerts</h1><ul class=\"stats\"><li><b id=\"firing\">{firing}</b> firing</li>\
         <li><b id=\"pending\">{}</b> pending</li><li><b>{}</b> rules</li><li><b>{}</b> silences</li></ul>",
        alerts.len() - firing,
        rules.len(),
        silences.len()
    );
    if alerts.is_empty() {
        body.push_str("<p class=\"empty\" id=\"no-alerts\">No alert is pending or firing.</p>");
    } else {
        body.push_str(
            "<div class=\"scroll\"><table class=\"grid\" id=\"alerts\"><thead><tr><th>Rule</th>\
             <th>Subject</th><th>State</th><th>Severity</th><th class=\"num\">Value</th>\
             <th>Since</th><th>Summary</th><th>Silenced</th><th>Acked</th>",
        );
        if act {
            body.push_str("<th>Actions</th>");
        }
        body.push_str("</tr></thead><tbody>");
        for a in &alerts {
            body.push_str(&format!(
                "<tr data-rule=\"{}\" data-subject=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td class=\"num\">{}</td><td>{}</td><td class=\"msg\">{}</td><td>{}</td><td>{}</td>",
                esc(&a.rule),
                esc(&a.subject),
                esc(&a.rule),
                subject_link(&a.labels, &a.subject),
                html::badge(&a.state),
                html::badge(&a.severity),
                a.value.map_or_else(|| "-".into(), format_value),
                html::ago(a.active_since_unix_ms, now),
                esc(a.annotations.get("summary").map_or("", String::as_str)),
                esc(a.silenced_by.as_deref().unwrap_or("-")),
                esc(a.acked_by.as_deref().unwrap_or("-")),
            ));
            if act {
                body.push_str("<td class=\"actions\">");
                if a.state == "firing" && a.acked_by.is_none() {
                    body.push_str(&alert_form(
                        "/ui/alerts/ack",
                        &user.csrf,
                        &a.rule,
                        &a.subject,
                        None,
                        "Acknowledge",
                    ));
                }
                if a.silenced_by.is_none() {
                    for d in SILENCE_CHOICES {
                        body.push_str(&alert_form(
                            "/ui/alerts/silence",
                            &user.csrf,
                            &a.rule,
                            &a.subject,
                            Some(d),
                            &format!("Silence {d}"),
                        ));
                    }
                }
                body.push_str("</td>");
            }
            body.push_str("</tr>");
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str("<section><h2>Silences</h2>");
    if silences.is_empty() {
        body.push_str("<p class=\"empty\">None in force.</p>");
    } else {
        body.push_str(
            "<div class=\"scroll\"><table class=\"grid\" id=\"silences\"><thead><tr><th>Id</th>\
             <th>Matchers</th><th>Until</th><th class=\"num\">Covers</th><th>By</th><th>Comment</th>",
        );
        if act {
            body.push_str("<th>Actions</th>");
        }
        body.push_str("</tr></thead><tbody>");
        for s in &silences {
            let matchers: Vec<String> =
                s.matchers.iter().map(|(k, v)| format!("{k}={v}")).collect();
            body.push_str(&format!(
                "<tr><td class=\"mono\">{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"msg\">{}</td>",
                esc(&s.id),
                esc(&matchers.join(", ")),
                html::time(s.ends_unix_ms),
                s.covers,
                esc(&s.created_by),
                esc(&s.comment),
            ));
            if act {
                body.push_str("<td class=\"actions\">");
                body.push_str(&html::button_form(
                    &format!("/ui/alerts/silences/{}/delete", seg(&s.id)),
                    &user.csrf,
                    "Remove",
                    "danger",
                ));
                body.push_str("</td>");
            }
            body.push_str("</tr>");
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str(
        "</section><section><h2>Rules</h2><div class=\"scroll\"><table class=\"grid\" id=\"rules\"><thead><tr>\
         <th>Name</th><th>Condition</th><th class=\"num\">For</th><th>Severity</th>\
         <th class=\"num\">Pending</th><th class=\"num\">Firing</th><th>Notify</th></tr></thead><tbody>",
    );
    for r in &rules {
        body.push_str(&format!(
            "<tr><td>{}</td><td class=\"msg mono\">{}</td><td class=\"num\">{}s</td><td>{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            esc(&r.name),
            esc(&r.condition),
            r.for_secs,
            html::badge(&r.severity),
            r.pending,
            r.firing,
            esc(&if r.notify.is_empty() {
                "-".to_string()
            } else {
                r.notify.join(", ")
            }),
        ));
    }
    body.push_str("</tbody></table></div></section><section><h2>Channels</h2>");
    if channels.is_empty() {
        body.push_str(
            "<p class=\"empty\">No notification channel: apply a NotificationChannel manifest with <code>novacron apply -f</code>.</p>",
        );
    } else {
        body.push_str(
            "<div class=\"scroll\"><table class=\"grid\" id=\"channels\"><thead><tr><th>Name</th><th>Kind</th>\
             <th>Target</th><th class=\"num\">Queued</th><th>Last error</th></tr></thead><tbody>",
        );
        for c in &channels {
            body.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td class=\"mono\">{}</td><td class=\"num\">{}</td><td class=\"msg\">{}</td></tr>",
                esc(&c.name),
                esc(&c.kind),
                esc(&c.target),
                c.queued,
                esc(c.last_error.as_deref().unwrap_or("-")),
            ));
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str("</section>");
    html::page(
        StatusCode::OK,
        "Alerts",
        Some(Section::Alerts),
        Some(user.viewer()),
        ui.sessions.take_flash(&user.id).as_deref(),
        &body,
    )
}

/// The subject, linked to its node or job page where there is one.
fn subject_link(labels: &BTreeMap<String, String>, subject: &str) -> String {
    let alertname_subject = |k: &str| labels.get(k).is_some_and(|v| v == subject);
    if alertname_subject("node") {
        format!(
            "<a href=\"/ui/nodes/{}\">{}</a>",
            seg(subject),
            esc(subject)
        )
    } else if alertname_subject("job") {
        format!("<a href=\"/ui/jobs/{}\">{}</a>", seg(subject), esc(subject))
    } else if let Some(job) = labels.get("job") {
        format!(
            "{} <span class=\"note\">of <a href=\"/ui/jobs/{}\">{}</a></span>",
            esc(subject),
            seg(job),
            esc(job)
        )
    } else {
        esc(subject).to_string()
    }
}

/// A one-button form naming an alert (and a silence's length).
fn alert_form(
    action: &str,
    csrf: &str,
    rule: &str,
    subject: &str,
    duration: Option<&str>,
    label: &str,
) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\">{}\
         <input type=\"hidden\" name=\"rule\" value=\"{}\">\
         <input type=\"hidden\" name=\"subject\" value=\"{}\">{}\
         <button type=\"submit\">{}</button></form>",
        esc(action),
        html::csrf_field(csrf),
        esc(rule),
        esc(subject),
        duration.map_or_else(String::new, |d| format!(
            "<input type=\"hidden\" name=\"duration\" value=\"{}\">",
            esc(d)
        )),
        esc(label)
    )
}

/// The acknowledge and silence forms.
#[derive(Debug, Deserialize)]
pub struct AlertForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
    /// The rule.
    #[serde(default)]
    pub rule: String,
    /// The subject.
    #[serde(default)]
    pub subject: String,
    /// For a silence: how long.
    #[serde(default)]
    pub duration: String,
}

/// A form with only the CSRF token.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
}

/// `POST /ui/alerts/ack`.
pub async fn ack(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<AlertForm>,
) -> Response {
    if let Err(refusal) = authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Operator) {
        return *refusal;
    }
    if let Err(e) = ui.api.alerts.ack(&form.rule, &form.subject, &user.who) {
        return refused(&user, e);
    }
    ui.api.events.note(
        NewEvent::new(
            kind::ALERT_CONFIG,
            user.who.clone(),
            format!(
                "alert {} for {} acknowledged from the dashboard",
                form.rule, form.subject
            ),
        )
        .detail("rule", &form.rule)
        .detail("subject", &form.subject),
    );
    done(
        &ui,
        &user,
        format!("alert {} for {} acknowledged", form.rule, form.subject),
    )
}

/// `POST /ui/alerts/silence`: silences this rule's alert for this subject.
pub async fn silence(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Form(form): Form<AlertForm>,
) -> Response {
    if let Err(refusal) = authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Operator) {
        return *refusal;
    }
    let req = SilenceRequest {
        matchers: BTreeMap::from([
            ("alertname".to_string(), form.rule.clone()),
            ("subject".to_string(), form.subject.clone()),
        ]),
        duration: form.duration.clone(),
        comment: "from the dashboard".into(),
    };
    let s = match ui.api.alerts.silence(&req, &user.who, SystemTime::now()) {
        Ok(s) => s,
        Err(e) => return refused(&user, e),
    };
    ui.api.events.note(
        NewEvent::new(
            kind::ALERT_CONFIG,
            user.who.clone(),
            format!(
                "silence {} of alertname={},subject={} for {} from the dashboard",
                s.id, form.rule, form.subject, form.duration
            ),
        )
        .detail("silence", &s.id),
    );
    done(
        &ui,
        &user,
        format!(
            "alert {} for {} silenced for {} ({})",
            form.rule, form.subject, form.duration, s.id
        ),
    )
}

/// `POST /ui/alerts/silences/{id}/delete`.
pub async fn unsilence(
    State(ui): State<Arc<Ui>>,
    user: User,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(refusal) = authorize(&ui, &user, &headers, &uri, &form.csrf, Role::Operator) {
        return *refusal;
    }
    if let Err(e) = ui.api.alerts.unsilence(&id) {
        return refused(&user, e);
    }
    ui.api.events.note(
        NewEvent::new(
            kind::ALERT_CONFIG,
            user.who.clone(),
            format!("silence {id} removed from the dashboard"),
        )
        .detail("silence", &id),
    );
    done(&ui, &user, format!("silence {id} removed"))
}

fn refused(user: &User, e: AlertError) -> Response {
    let status = match &e {
        AlertError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        AlertError::Unknown(_) => StatusCode::NOT_FOUND,
        AlertError::Builtin(_) => StatusCode::CONFLICT,
        AlertError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    user.error(status, &e.to_string())
}

fn done(ui: &Ui, user: &User, message: String) -> Response {
    ui.sessions.flash(&user.id, message);
    Redirect::to("/ui/alerts").into_response()
}
