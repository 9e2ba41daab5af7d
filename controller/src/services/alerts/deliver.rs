//! Delivery of the notification outbox: every second (or at once when the
//! evaluation queued something), each due entry is sent to its channel. A
//! success removes it from the store; a failure is retried with exponential
//! backoff (1 s doubling to 5 min) for a day, then given up with an event. The
//! store holds every entry until it is delivered or given up, so a controller
//! restart (or a failover) sends what was queued before it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lettre::message::header::ContentType;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use novacron_common::alert::engine::Notification;
use novacron_common::alert::message;
use novacron_common::alert::rule::{EmailSpec, SmtpTls};
use novacron_common::alert::{Channel, Target};
use novacron_common::clock::unix_ms;
use novacron_common::sync::lock;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Alerts, OutboxEntry};
use crate::services::events::{CONTROLLER, NewEvent, kind};
use crate::state::store::AlertingKind;

/// How long one delivery may take.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest wait between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long an entry is retried.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(86_400);
/// Deliveries in flight at once.
const PARALLEL: usize = 8;
/// The most bytes of an error answer kept.
const ERROR_BODY: usize = 512;

/// Sends due entries until `cancel`.
pub async fn run(alerts: Arc<Alerts>, cancel: CancellationToken) {
    let client = match client() {
        Ok(c) => c,
        Err(error) => {
            warn!(%error, "alert notifications are off: cannot build the HTTP client");
            return;
        }
    };
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = alerts.wake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let due = alerts.due(unix_ms(SystemTime::now()));
        let results: Vec<(OutboxEntry, Attempt)> =
            futures_util::stream::iter(due.into_iter().map(|(entry, channel)| {
                let (client, alerts) = (client.clone(), alerts.clone());
                async move {
                    let attempt = match &channel {
                        None => Attempt::Undeliverable("its channel was deleted".into()),
                        Some(ch) => {
                            match send(&client, ch, &entry.notification, &alerts.external_url).await
                            {
                                Ok(()) => Attempt::Delivered,
                                Err(e) => Attempt::Failed(e),
                            }
                        }
                    };
                    (entry, attempt)
                }
            }))
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        if results.is_empty() {
            continue;
        }
        let me = alerts.clone();
        let done = tokio::task::spawn_blocking(move || {
            for (entry, attempt) in results {
                me.settle(entry, attempt, unix_ms(SystemTime::now()));
            }
        })
        .await;
        if let Err(error) = done {
            warn!(%error, "settling notifications panicked");
        }
    }
}

/// How one delivery attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The channel took it.
    Delivered,
    /// It failed and may succeed later (the error).
    Failed(String),
    /// It can never be delivered (why): given up at once.
    Undeliverable(String),
}

impl Alerts {
    /// The entries due at `now_ms`, each with its channel (`None`: deleted).
    pub fn due(&self, now_ms: u64) -> Vec<(OutboxEntry, Option<Channel>)> {
        let inner = lock(&self.inner);
        inner
            .outbox
            .values()
            .filter(|e| e.next_attempt_ms <= now_ms)
            .take(64)
            .map(|e| {
                let ch = inner
                    .channels
                    .get(&e.notification.channel)
                    .map(|(c, _)| c.clone());
                (e.clone(), ch)
            })
            .collect()
    }

    /// Records how `entry`'s attempt went: delivered (removed), retried later,
    /// or given up (removed, with an event).
    pub fn settle(&self, mut entry: OutboxEntry, attempt: Attempt, now_ms: u64) {
        let n = &entry.notification;
        let channel = n.channel.clone();
        let retried_enough = now_ms.saturating_sub(n.at_ms)
            >= u64::try_from(GIVE_UP_AFTER.as_millis()).unwrap_or(u64::MAX);
        let attempt = match attempt {
            Attempt::Failed(e) if retried_enough => Attempt::Undeliverable(format!(
                "{e} (retried for {})",
                novacron_common::units::duration(GIVE_UP_AFTER)
            )),
            other => other,
        };
        let mut inner = lock(&self.inner);
        match attempt {
            Attempt::Delivered => {
                inner.last_error.remove(&channel);
                inner.outbox.remove(&entry.id);
                drop(inner);
                if let Err(error) = self.store.delete_alerting(AlertingKind::Outbox, &entry.id) {
                    warn!(%error, id = %entry.id, "cannot remove a delivered notification; it may be sent again");
                }
                info!(channel = %channel, rule = %n.rule, status = %n.status, "notification delivered");
                self.events.note(
                    NewEvent::new(
                        kind::ALERT_NOTIFIED,
                        CONTROLLER,
                        format!(
                            "notified {channel} of {} ({}, {} alert(s)) after {} attempt(s)",
                            n.rule,
                            n.status,
                            n.alerts.len() + n.truncated,
                            entry.attempts + 1
                        ),
                    )
                    .detail("channel", &channel)
                    .detail("rule", &n.rule)
                    .detail("status", &n.status),
                );
            }
            Attempt::Undeliverable(why) => {
                inner.outbox.remove(&entry.id);
                drop(inner);
                if let Err(error) = self.store.delete_alerting(AlertingKind::Outbox, &entry.id) {
                    warn!(%error, id = %entry.id, "cannot remove a notification given up");
                }
                self.events.note(
                    NewEvent::new(
                        kind::ALERT_NOTIFY_FAILED,
                        CONTROLLER,
                        format!("notification to {channel} about {} given up: {why}", n.rule),
                    )
                    .detail("channel", &channel)
                    .detail("rule", &n.rule),
                );
            }
            Attempt::Failed(e) => {
                entry.attempts += 1;
                entry.last_error = Some(e.clone());
                entry.next_attempt_ms = now_ms + backoff(entry.attempts);
                inner.last_error.insert(channel.clone(), e.clone());
                if inner.outbox.contains_key(&entry.id) {
                    inner.outbox.insert(entry.id.clone(), entry.clone());
                }
                drop(inner);
                warn!(channel = %channel, attempts = entry.attempts, error = %e, "notification not delivered; will retry");
                if let Err(error) = self.store.put_alerting(
                    AlertingKind::Outbox,
                    &entry.id,
                    &super::to_json(&entry),
                ) {
                    warn!(%error, id = %entry.id, "cannot save a notification's retry");
                }
            }
        }
    }
}

/// Milliseconds before attempt `attempts + 1`: 1 s doubling, at most
/// [`MAX_BACKOFF`].
pub fn backoff(attempts: u32) -> u64 {
    let max = u64::try_from(MAX_BACKOFF.as_millis()).unwrap_or(u64::MAX);
    1000u64
        .checked_shl(attempts.saturating_sub(1).min(20))
        .unwrap_or(max)
        .min(max)
}

fn client() -> anyhow::Result<reqwest::Client> {
    novacron_common::tls::install_crypto_provider();
    Ok(reqwest::Client::builder()
        .user_agent(concat!("novacron-controller/", env!("CARGO_PKG_VERSION")))
        .timeout(SEND_TIMEOUT)
        .connect_timeout(SEND_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// Sends one notification to `ch`.
pub async fn send(
    client: &reqwest::Client,
    ch: &Channel,
    n: &Notification,
    external_url: &str,
) -> Result<(), String> {
    match &ch.target {
        Target::Webhook(url) => post(client, url, &message::webhook(n, external_url)).await,
        Target::Slack(url) => {
            post(
                client,
                url,
                &serde_json::json!({ "text": message::text(n) }),
            )
            .await
        }
        Target::Email(e) => email(e, n).await,
    }
}

async fn post<T: serde::Serialize>(
    client: &reqwest::Client,
    url: &str,
    body: &T,
) -> Result<(), String> {
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| crate::services::remote_write::error_chain(&e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    let mut cut = text.len().min(ERROR_BODY);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Err(format!(
        "{url_host} answered {status}: {}",
        &text[..cut],
        url_host = host(url)
    ))
}

fn host(url: &str) -> &str {
    url.split_once("://")
        .map_or(url, |(_, r)| r)
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("")
}

async fn email(e: &EmailSpec, n: &Notification) -> Result<(), String> {
    let (host, port) = e
        .smtp
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
        .ok_or_else(|| format!("{:?} is not host:port", e.smtp))?;
    let mut builder = Message::builder()
        .from(
            e.from
                .parse()
                .map_err(|err| format!("from {:?}: {err}", e.from))?,
        )
        .subject(message::email_subject(n))
        .header(ContentType::TEXT_PLAIN);
    for to in &e.to {
        builder = builder.to(to.parse().map_err(|err| format!("to {to:?}: {err}"))?);
    }
    let mail = builder
        .body(message::text(n))
        .map_err(|err| format!("cannot build the message: {err}"))?;
    let tls = match e.tls {
        SmtpTls::None => Tls::None,
        SmtpTls::Starttls | SmtpTls::Tls => {
            let params =
                TlsParameters::new(host.clone()).map_err(|err| format!("TLS to {host}: {err}"))?;
            if e.tls == SmtpTls::Tls {
                Tls::Wrapper(params)
            } else {
                Tls::Required(params)
            }
        }
    };
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&host)
        .port(port)
        .tls(tls)
        .timeout(Some(SEND_TIMEOUT))
        .build();
    transport.send(mail).await.map(|_| ()).map_err(|err| {
        format!(
            "SMTP {host}:{port}: {}",
            crate::services::remote_write::error_chain(&err)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        assert_eq!(backoff(1), 1000);
        assert_eq!(backoff(2), 2000);
        assert_eq!(backoff(5), 16_000);
        assert_eq!(backoff(9), 256_000);
        assert_eq!(backoff(10), 300_000);
        assert_eq!(backoff(100), 300_000);
    }
}
