//! Idle jobs stopped: a job labelled `idleStop: <duration>` (`metadata.labels`)
//! is stopped once its replicas' CPU stayed under [`IDLE_FRACTION`] of their
//! request for that long, with a `cost.idle_stopped` event that says what was
//! measured. Opt-in per job; removing the label (or `novacron job start`) undoes
//! it.
//!
//! Every [`TICK`] the leader reads, off the async workers, each labelled job's
//! usage over its period from the metrics history (or the registry's short
//! window when the history is off) and asks the pure
//! [`novacron_common::cost::idle_verdict`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use novacron_common::clock::unix_ms;
use novacron_common::cost::{IdleVerdict, idle_verdict};
use novacron_common::ticker::Ticker;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::services::context::ApiState;
use crate::services::costs::{holds_resources, job_label};
use crate::services::events::{NewEvent, kind};

/// The job label that opts a job in, with the idle period as its value.
pub const LABEL: &str = "idleStop";
/// A replica is idle below this share of its CPU request (as right-sizing's).
pub const IDLE_FRACTION: f64 = 0.05;
/// How often the leader looks.
pub const TICK: Duration = Duration::from_secs(10);
/// The shortest idle period accepted.
pub const MIN_PERIOD: Duration = Duration::from_secs(10);
/// Who stops them, in events.
pub const ACTOR: &str = "cost policy (idleStop)";

/// Runs until `cancel`.
pub async fn run(st: Arc<ApiState>, cancel: CancellationToken) {
    let mut ticker = Ticker::new(TICK, MissedTickBehavior::Delay, cancel.cancelled());
    while ticker.tick().await {
        let st2 = st.clone();
        let idle =
            match tokio::task::spawn_blocking(move || idle_jobs(&st2, SystemTime::now())).await {
                Ok(idle) => idle,
                Err(e) => {
                    warn!(error = %e, "idle check failed");
                    continue;
                }
            };
        for (job, period, why) in idle {
            let message = format!(
                "job {job} stopped: idle ({why}); its label {LABEL}: {period} asks for it \
                 (remove the label and `novacron job start {job}` to run it again)"
            );
            match st.workloads.stop(&job, ACTOR) {
                Ok(()) => {
                    info!(%job, %why, "idle job stopped");
                    st.events.note(
                        NewEvent::new(kind::IDLE_STOPPED, ACTOR, message)
                            .job(&job)
                            .detail("period", &period),
                    );
                }
                Err(e) => warn!(%job, error = %e, "cannot stop an idle job"),
            }
        }
    }
}

/// The labelled jobs idle over their whole period: (job, period as written, why).
fn idle_jobs(st: &ApiState, now: SystemTime) -> Vec<(String, String, String)> {
    let now_ms = unix_ms(now);
    let mut out = Vec::new();
    for j in st.workloads.jobs() {
        if st.workloads.is_stopped(&j.name) {
            continue;
        }
        let Some(written) = job_label(&st.workloads, &j.name, LABEL) else {
            continue;
        };
        let period = match humantime::parse_duration(written.trim()) {
            Ok(p) if p >= MIN_PERIOD => p,
            _ => {
                warn!(job = %j.name, label = %written, "{LABEL} is not a duration of 10s or more; ignored");
                continue;
            }
        };
        let allocs: Vec<_> = st
            .workloads
            .allocations(Some(&j.name), None)
            .into_iter()
            .filter(holds_resources)
            .collect();
        let Some(newest) = allocs.iter().max_by_key(|a| (a.version, a.created_unix_ms)) else {
            continue;
        };
        let since = now_ms.saturating_sub(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        let ids: BTreeSet<&str> = allocs.iter().map(|a| a.id.as_str()).collect();
        let nodes: BTreeSet<&str> = allocs.iter().map(|a| a.node.as_str()).collect();
        let mut samples = Vec::new();
        for node in nodes {
            let window = match &st.history {
                Some(h) => Some(h.window(node, since, now)),
                None => st.registry.window(node),
            };
            for s in window.map(|w| w.samples).unwrap_or_default() {
                for u in s.allocations.iter().filter(|u| ids.contains(u.id.as_str())) {
                    // cpu_percent is percent of one core: 100% = 1000 millicores.
                    samples.push((s.at_unix_ms, f64::from(u.cpu_percent) * 10.0));
                }
            }
        }
        // A replica younger than the period has not been idle for it.
        if allocs.iter().any(|a| a.created_unix_ms > since) {
            continue;
        }
        if let IdleVerdict::Idle { explanation, .. } =
            idle_verdict(newest.cpu_millis, &samples, since, now_ms, IDLE_FRACTION)
        {
            out.push((j.name, written.trim().to_string(), explanation));
        }
    }
    out
}
