//! Who is behind a dashboard request ([`User`], from the session cookie) and
//! whether they may carry out an action ([`authorize`]: same origin, the
//! session's CSRF token, the role).

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use novacron_common::clock::unix_ms;
use novacron_common::pki::{Identity, Role};
use tracing::warn;

use super::Ui;
use super::html::{self, Viewer};
use super::session::{self, SessionId};
use crate::services::events::{NewEvent, kind};

/// A logged-in browser.
#[derive(Debug, Clone)]
pub struct User {
    /// Who logged in.
    pub identity: Identity,
    /// `operator:alice`, for page frames and events.
    pub who: String,
    /// Their session.
    pub id: SessionId,
    /// The session's CSRF token, for forms.
    pub csrf: String,
}

impl User {
    /// The page frame's view of this user.
    pub fn viewer(&self) -> Viewer<'_> {
        Viewer {
            who: &self.who,
            csrf: &self.csrf,
        }
    }

    /// Whether their role may act (scale, restart, drain, migrate): pages show
    /// the action buttons only then, and [`authorize`] checks it again.
    pub fn can_act(&self) -> bool {
        self.identity.role >= Role::Operator
    }

    /// An error page in this user's frame.
    pub fn error(&self, status: StatusCode, message: &str) -> Response {
        html::error_page(status, Some(self.viewer()), message)
    }
}

/// Finds the request's session and checks that the API token it was opened with
/// is still valid (a revoked or expired token ends it). Without one, a page
/// request is sent to the login page and anything else is refused (403).
impl FromRequestParts<Arc<Ui>> for User {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Arc<Ui>) -> Result<Self, Self::Rejection> {
        let now = SystemTime::now();
        let Some(id) = session::from_cookies(&parts.headers) else {
            return Err(no_session(ui, parts, "no dashboard session"));
        };
        let Some(s) = ui.sessions.get(&id, now) else {
            return Err(no_session(ui, parts, "the dashboard session ended"));
        };
        match ui.api.store.api_token(&s.token_id) {
            Ok(Some(record)) if !record.revoked && unix_ms(now) < record.expires_at_unix_ms => {}
            Ok(_) => {
                ui.sessions.remove(&id);
                return Err(no_session(
                    ui,
                    parts,
                    "the API token of the dashboard session was revoked or expired",
                ));
            }
            Err(e) => {
                warn!(error = %e, "reading an API token for a dashboard session failed");
                return Err(html::error_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    "the controller's store cannot be read now; retry",
                ));
            }
        }
        Ok(User {
            who: s.identity.to_string(),
            identity: s.identity,
            id,
            csrf: s.csrf,
        })
    }
}

/// A request without a live session: pages go to the login page, the rest is
/// refused and recorded.
fn no_session(ui: &Ui, parts: &Parts, why: &str) -> Response {
    if parts.method == Method::GET || parts.method == Method::HEAD {
        return Redirect::to("/ui/login").into_response();
    }
    refuse(ui, "anonymous", &parts.method, parts.uri.path(), why)
}

/// Refuses an action: a 403 page, a warning in the log and an `access.denied`
/// event (as the API records its refusals).
pub fn refuse(ui: &Ui, who: &str, method: &Method, path: &str, why: &str) -> Response {
    warn!(%who, %method, %path, %why, "dashboard action refused");
    ui.api.events.note(
        NewEvent::new(
            kind::ACCESS_DENIED,
            who,
            format!("refused {method} {path}: {why}"),
        )
        .detail("method", method)
        .detail("path", path)
        .detail("status", StatusCode::FORBIDDEN.as_u16()),
    );
    html::error_page(StatusCode::FORBIDDEN, None, why)
}

/// Checks an action form before it is carried out: it came from this origin,
/// carries the session's CSRF token, and the user's role is at least `need`.
/// A refusal is the 403 answer to send (boxed: a response is large).
pub fn authorize(
    ui: &Ui,
    user: &User,
    headers: &HeaderMap,
    uri: &Uri,
    csrf: &str,
    need: Role,
) -> Result<(), Box<Response>> {
    let refused = |why: String| Box::new(refuse(ui, &user.who, &Method::POST, uri.path(), &why));
    same_origin(headers, uri).map_err(refused)?;
    let Some(s) = ui.sessions.get(&user.id, SystemTime::now()) else {
        return Err(refused("the dashboard session ended".into()));
    };
    if !session::csrf_matches(&s, csrf) {
        return Err(refused(
            "the form's CSRF token is missing or wrong; reload the page and try again".into(),
        ));
    }
    if user.identity.role < need {
        return Err(refused(format!(
            "{} has role {} but this action needs {need}",
            user.identity.name, user.identity.role
        )));
    }
    Ok(())
}

/// Whether a form POST came from a page of this origin, by the headers browsers
/// set and scripts cannot: `Sec-Fetch-Site` must be `same-origin` and `Origin`
/// this host over HTTPS, each when present.
pub fn same_origin(headers: &HeaderMap, uri: &Uri) -> Result<(), String> {
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return Err(format!(
            "the form was sent from another site (Sec-Fetch-Site: {})",
            String::from_utf8_lossy(site.as_bytes())
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| uri.authority().map(|a| a.as_str()));
        let expected = host.map(|h| format!("https://{h}"));
        if expected.as_deref().map(str::as_bytes) != Some(origin.as_bytes()) {
            return Err(format!(
                "the form was sent from another origin ({})",
                String::from_utf8_lossy(origin.as_bytes())
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("value"));
        }
        h
    }

    #[test]
    fn a_form_from_this_origin_passes_and_one_from_elsewhere_does_not() {
        let uri: Uri = "/ui/jobs/web/scale".parse().expect("uri");
        let ok = headers(&[
            ("host", "ctl.example:8443"),
            ("origin", "https://ctl.example:8443"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(same_origin(&ok, &uri), Ok(()));
        // Old browsers send neither header: the CSRF token still guards them.
        assert_eq!(same_origin(&HeaderMap::new(), &uri), Ok(()));
        for bad in [
            headers(&[
                ("host", "ctl.example:8443"),
                ("origin", "https://evil.example"),
            ]),
            headers(&[
                ("host", "ctl.example:8443"),
                ("origin", "http://ctl.example:8443"),
            ]),
            headers(&[("host", "ctl.example:8443"), ("origin", "null")]),
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
        ] {
            assert!(same_origin(&bad, &uri).is_err(), "{bad:?}");
        }
        // HTTP/2 carries the host in the URI's authority.
        let h2: Uri = "https://ctl.example:8443/ui/x".parse().expect("uri");
        assert_eq!(
            same_origin(&headers(&[("origin", "https://ctl.example:8443")]), &h2),
            Ok(())
        );
    }
}
