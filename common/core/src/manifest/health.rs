//! `spec.health`: liveness, readiness and startup checks, and what a failing
//! liveness check costs.
//!
//! ```yaml
//! health:
//!   liveness:  {http: {port: 8080, path: /healthz}, period: 5s, failureThreshold: 3}
//!   readiness: {tcp: {port: 8080}, period: 2s}
//!   startup:   {exec: {command: [test, -f, /ready]}, period: 1s, failureThreshold: 30}
//!   maxRestarts: 3        # liveness restarts before the allocation fails
//!   restartBackoff: 1s    # first wait before such a restart; doubles, at most 5m
//! ```
//!
//! The older form, one check at the top level (`health: {http: ..., interval,
//! timeout, retries}`), still works: it is the liveness check (every `interval`,
//! `retries` consecutive failures), and, without a `readiness` check, its result is
//! the allocation's reported health, as before. Unlike before, an allocation whose
//! check keeps failing is restarted, and fails once `maxRestarts` are used up.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ExecCheck, Health, HttpCheck, TcpCheck};
use novacron_wire::{HealthCheckKind, HealthSpec, ProbeSpec};

/// Default restarts for failed liveness or startup checks before the allocation
/// fails.
pub const DEFAULT_MAX_RESTARTS: u32 = 3;
/// Most restarts `maxRestarts` may allow.
pub const MAX_HEALTH_RESTARTS: u32 = 100;
/// Default wait before the first health restart.
pub const DEFAULT_RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// Shortest `restartBackoff`.
pub const MIN_RESTART_BACKOFF: Duration = Duration::from_millis(100);
/// Longest `restartBackoff`, and the ceiling the doubling wait stops at.
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);
/// Longest `initialDelay`.
pub const MAX_INITIAL_DELAY: Duration = Duration::from_secs(3600);
/// Default `failureThreshold` of a startup check (a slow start gets 30 periods).
pub const DEFAULT_STARTUP_THRESHOLD: u32 = 30;

/// One check of `health.liveness`, `health.readiness` or `health.startup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Probe {
    /// An HTTP GET that must answer 2xx or 3xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// A TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    /// A command in the container that must exit 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecCheck>,
    /// Time between checks (default 5s).
    #[serde(default = "default_period", with = "super::duration")]
    pub period: Duration,
    /// Time one check may take (default 2s); shorter than `period`.
    #[serde(default = "default_timeout", with = "super::duration")]
    pub timeout: Duration,
    /// Consecutive failures before the check counts as failed (default 3; 30 for
    /// a startup check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    /// Wait after the container started before the first check (default 0s).
    #[serde(default, with = "super::duration")]
    pub initial_delay: Duration,
}

/// Which check a [`Probe`] is (for defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProbeRole {
    Liveness,
    Readiness,
    Startup,
}

impl Probe {
    /// `failureThreshold` as written, or its default for `role`.
    pub(crate) fn threshold(&self, role: ProbeRole) -> u32 {
        self.failure_threshold.unwrap_or(match role {
            ProbeRole::Startup => DEFAULT_STARTUP_THRESHOLD,
            ProbeRole::Liveness | ProbeRole::Readiness => 3,
        })
    }
}

/// The wire form of a validated `health` (each check has exactly one kind).
pub(crate) fn health_spec(h: &Health) -> Option<HealthSpec> {
    let top = check_kind(&h.http, &h.tcp, &h.exec).map(|check| ProbeSpec {
        check,
        period_ms: millis(h.interval),
        timeout_ms: millis(h.timeout),
        failure_threshold: h.retries,
        // As before liveness existed: the first check one interval after the start.
        initial_delay_ms: millis(h.interval),
    });
    let probe = |p: &Option<Probe>, role| {
        p.as_ref().and_then(|p| {
            Some(ProbeSpec {
                check: check_kind(&p.http, &p.tcp, &p.exec)?,
                period_ms: millis(p.period),
                timeout_ms: millis(p.timeout),
                failure_threshold: p.threshold(role),
                initial_delay_ms: millis(p.initial_delay),
            })
        })
    };
    let liveness = top.or_else(|| probe(&h.liveness, ProbeRole::Liveness));
    let readiness = probe(&h.readiness, ProbeRole::Readiness);
    let startup = probe(&h.startup, ProbeRole::Startup);
    if liveness.is_none() && readiness.is_none() && startup.is_none() {
        return None;
    }
    let initial = h.restart_backoff.unwrap_or(DEFAULT_RESTART_BACKOFF);
    Some(HealthSpec {
        liveness,
        readiness,
        startup,
        max_restarts: h.max_restarts.unwrap_or(DEFAULT_MAX_RESTARTS),
        backoff_initial_ms: millis(initial),
        backoff_max_ms: millis(MAX_RESTART_BACKOFF.max(initial)),
    })
}

fn check_kind(
    http: &Option<HttpCheck>,
    tcp: &Option<TcpCheck>,
    exec: &Option<ExecCheck>,
) -> Option<HealthCheckKind> {
    Some(match (http, tcp, exec) {
        (Some(http), _, _) => HealthCheckKind::Http {
            port: http.port,
            path: http.path.clone(),
        },
        (None, Some(tcp), _) => HealthCheckKind::Tcp { port: tcp.port },
        (None, None, Some(exec)) => HealthCheckKind::Exec {
            command: exec.command.clone(),
        },
        (None, None, None) => return None,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn default_period() -> Duration {
    Duration::from_secs(5)
}

fn default_timeout() -> Duration {
    Duration::from_secs(2)
}

/// `Option<Duration>` written the humantime way.
pub(crate) mod optional_duration {
    use std::time::Duration;

    use super::super::duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        duration::deserialize(d).map(Some)
    }
}
