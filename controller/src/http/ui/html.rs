//! HTML output: the escape every value goes through, the page frame (navigation,
//! who is logged in, the logout form) and the small formatters the pages share.
//!
//! **Invariant:** text that came from outside the controller's own code (node
//! names and labels from agents, job names and messages from manifests and
//! operators, event messages) is written into HTML only through [`esc`]; pages
//! carry no inline script and no `style` attribute (the CSP forbids both).

use std::fmt::{self, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// `text` escaped for HTML element content and for quoted attribute values.
pub fn esc(text: &str) -> Escaped<'_> {
    Escaped(text)
}

/// See [`esc`].
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// `text` as one path segment of a URL (percent-encoded), to be escaped with
/// [`esc`] like any attribute value.
pub fn seg(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The sections of the navigation bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// Nodes.
    Fleet,
    /// Jobs.
    Jobs,
    /// The event log.
    Events,
    /// Hourly cost.
    Costs,
    /// Migrations.
    Migrations,
    /// Alerts (filled by the alert engine).
    Alerts,
}

const NAV: &[(Section, &str, &str)] = &[
    (Section::Fleet, "/ui/", "Fleet"),
    (Section::Jobs, "/ui/jobs", "Jobs"),
    (Section::Events, "/ui/events", "Events"),
    (Section::Costs, "/ui/costs", "Costs"),
    (Section::Migrations, "/ui/migrations", "Migrations"),
    (Section::Alerts, "/ui/alerts", "Alerts"),
];

/// Who is looking at a page, for its frame.
#[derive(Debug, Clone, Copy)]
pub struct Viewer<'a> {
    /// `operator:alice`.
    pub who: &'a str,
    /// The session's CSRF token, for the logout form.
    pub csrf: &'a str,
}

/// A whole page: the frame around `body`.
pub fn page(
    status: StatusCode,
    title: &str,
    section: Option<Section>,
    viewer: Option<Viewer<'_>>,
    flash: Option<&str>,
    body: &str,
) -> Response {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · NovaCron</title>\
         <link rel=\"icon\" href=\"/ui/assets/icon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/ui/assets/app.css\">\
         <script src=\"/ui/assets/app.js\" defer></script></head><body>\
         <header class=\"top\"><a class=\"brand\" href=\"/ui/\">NovaCron</a>",
        esc(title)
    );
    if let Some(v) = viewer {
        out.push_str("<nav>");
        for (s, href, label) in NAV {
            let on = if section == Some(*s) {
                " class=\"on\" aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(out, "<a href=\"{href}\"{on}>{label}</a>");
        }
        let _ = write!(
            out,
            "</nav><div class=\"who\"><span id=\"who\">{}</span>\
             <form method=\"post\" action=\"/ui/logout\">{}\
             <button type=\"submit\" class=\"link\">Log out</button></form></div>",
            esc(v.who),
            csrf_field(v.csrf)
        );
    }
    out.push_str("</header><main>");
    if let Some(message) = flash {
        let _ = write!(
            out,
            "<p class=\"flash\" role=\"status\">{}</p>",
            esc(message)
        );
    }
    out.push_str(body);
    out.push_str("</main></body></html>\n");
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        out,
    )
        .into_response()
}

/// The hidden field that carries a session's CSRF token in a form.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// A one-button form posting to `action` (operators' actions).
pub fn button_form(action: &str, csrf: &str, label: &str, class: &str) -> String {
    format!(
        "<form method=\"post\" action=\"{}\" class=\"inline\">{}\
         <button type=\"submit\" class=\"{class}\">{}</button></form>",
        esc(action),
        csrf_field(csrf),
        esc(label)
    )
}

/// `1.5 GiB`, `512 MiB`, `0 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else if value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Millicores as cores: `4`, `0.5`, `2.25`.
pub fn cores(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{}", millis / 1000)
    } else {
        let text = format!("{:.3}", millis as f64 / 1000.0);
        text.trim_end_matches('0').to_string()
    }
}

/// A Unix-ms time as `2026-12-06 02:11:35 UTC`.
pub fn time(unix_ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(unix_ms);
    let text = humantime::format_rfc3339_seconds(t).to_string();
    format!("{} UTC", text.trim_end_matches('Z').replace('T', " "))
}

/// How long before `now` a Unix-ms time was: `5s ago`, `3m ago`, `2h ago`.
pub fn ago(unix_ms: u64, now: SystemTime) -> String {
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let secs = now_ms.saturating_sub(unix_ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// A percentage with one decimal, or `–` when unknown.
pub fn percent(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.1}%"),
        _ => "–".into(),
    }
}

/// A `<meter>` of a 0–100 value (empty when unknown): no style needed.
pub fn meter(value: Option<f64>, class: &str) -> String {
    let v = value
        .filter(|v| v.is_finite())
        .unwrap_or(0.0)
        .clamp(0.0, 100.0);
    format!(
        "<meter class=\"{class}\" min=\"0\" max=\"100\" low=\"70\" high=\"90\" optimum=\"0\" value=\"{v:.1}\"></meter>"
    )
}

/// A status word as a badge (`ready`, `down`, `running`, `failed`, ...).
pub fn badge(word: &str) -> String {
    let tone = match word {
        "ready" | "running" | "healthy" | "completed" | "stable" => "ok",
        "down" | "failed" | "lost" | "rolled_back" | "exceeded" => "bad",
        "disconnected" | "cordoned" | "pending" | "starting" | "stopping" | "degraded" => "warn",
        _ => "info",
    };
    format!("<span class=\"badge {tone}\">{}</span>", esc(word))
}

/// An error page with a way back.
pub fn error_page(status: StatusCode, viewer: Option<Viewer<'_>>, message: &str) -> Response {
    let reason = status.canonical_reason().unwrap_or("Error");
    let body = format!(
        "<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/ui/\">Back to the fleet</a></p>",
        esc(reason),
        esc(message)
    );
    page(status, reason, None, viewer, None, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostile_label_is_escaped_in_text_and_attributes() {
        let label = r#"zone"><script>alert('x')</script>&amp;"#;
        let html = format!("<td title=\"{0}\">{0}</td>", esc(label));
        assert_eq!(
            html,
            "<td title=\"zone&quot;&gt;&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;amp;\">\
             zone&quot;&gt;&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;amp;</td>"
        );
        assert!(!html.contains("<script"));
        assert_eq!(esc("plain-name.1").to_string(), "plain-name.1");
        assert_eq!(esc("").to_string(), "");
        assert_eq!(esc("é<ü>").to_string(), "é&lt;ü&gt;");
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(seg("web-1.a_b~"), "web-1.a_b~");
        assert_eq!(seg("a/b?c#d e"), "a%2Fb%3Fc%23d%20e");
        assert_eq!(seg("\"><"), "%22%3E%3C");
    }

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(8 << 30), "8.0 GiB");
        assert_eq!(bytes(512 << 20), "512 MiB");
        assert_eq!(cores(4000), "4");
        assert_eq!(cores(500), "0.5");
        assert_eq!(cores(2250), "2.25");
        assert_eq!(percent(Some(42.345)), "42.3%");
        assert_eq!(percent(None), "–");
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        let now = UNIX_EPOCH + Duration::from_secs(7200);
        assert_eq!(ago(7_195_000, now), "5s ago");
        assert_eq!(ago(0, now), "2h ago");
    }

    #[tokio::test]
    async fn a_page_has_no_inline_script_or_style() {
        let r = page(
            StatusCode::OK,
            "t<",
            Some(Section::Fleet),
            Some(Viewer {
                who: "operator:a<b",
                csrf: "c",
            }),
            Some("done <b>"),
            "<p>x</p>",
        );
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 1 << 20)
            .await
            .expect("body");
        let html = String::from_utf8(body.to_vec()).expect("utf-8");
        assert!(html.contains("<title>t&lt; · NovaCron</title>"));
        assert!(html.contains("operator:a&lt;b"));
        assert!(html.contains("done &lt;b&gt;"));
        assert!(!html.contains("style="));
        assert!(!html.contains("<script>"));
        assert!(html.contains("<script src=\"/ui/assets/app.js\" defer></script>"));
    }
}
