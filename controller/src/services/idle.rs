//! Cost policies that act, each opted into per job with a label
//! (`metadata.labels`):
//!
//! - `idleStop: <duration>`: the job is stopped once its replicas' CPU stayed
//!   under [`IDLE_FRACTION`] of their request for that long, with a
//!   `cost.idle_stopped` event that says what was measured; applying the job
//!   again runs it (remove the label to keep it running).
//! - `rightsize: apply` (window `rightsizeWindow`, default [`RIGHTSIZE_WINDOW`]):
//!   once every replica of the current version has run for the window, its
//!   right-sizing is applied as a new version of the job (rolled out like any
//!   change), within [`ApplyBounds`]: at most half a request a change, never
//!   under the observed p99 plus 20%; a `cost.rightsized` event says why.
//!
//! Every [`TICK`] the leader reads, off the async workers, each labelled job's
//! usage from the metrics history (or the registry's short window when the
//! history is off) and asks the pure [`novacron_common::cost::idle_verdict`],
//! [`novacron_common::cost::rightsize`] and
//! [`novacron_common::cost::bounded_rightsize`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use novacron_common::clock::unix_ms;
use novacron_common::cost::{
    ApplyBounds, IdleVerdict, RightsizeConfig, bounded_rightsize, idle_verdict, rightsize,
};
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
/// The job label that applies right-sizing (`apply`; anything else only
/// recommends).
pub const RIGHTSIZE_LABEL: &str = "rightsize";
/// The job label for the span right-sizing reads (default [`RIGHTSIZE_WINDOW`]).
pub const RIGHTSIZE_WINDOW_LABEL: &str = "rightsizeWindow";
/// The default span right-sizing reads before it applies.
pub const RIGHTSIZE_WINDOW: Duration = Duration::from_secs(3600);
/// Who resizes, in events.
pub const RIGHTSIZE_ACTOR: &str = "cost policy (rightsize)";

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
        let st3 = st.clone();
        let resize = tokio::task::spawn_blocking(move || resizes(&st3, SystemTime::now()))
            .await
            .unwrap_or_default();
        for (job, manifest, why) in resize {
            let message = format!("job {job} right-sized: {why}");
            match st.workloads.apply(
                &format!("{job}.yaml"),
                &manifest,
                RIGHTSIZE_ACTOR,
                SystemTime::now(),
            ) {
                Ok(applied) => {
                    info!(%job, version = applied.version, %why, "right-sizing applied");
                    st.events.note(
                        NewEvent::new(kind::RIGHTSIZED, RIGHTSIZE_ACTOR, message)
                            .job(&job)
                            .detail("version", applied.version),
                    );
                }
                Err(e) => warn!(%job, error = %e, "cannot apply a right-sizing"),
            }
        }
        for (job, period, why) in idle {
            let message = format!(
                "job {job} stopped: idle ({why}); its label {LABEL}: {period} asks for it \
                 (`novacron apply` runs it again; remove the label to keep it running)"
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
        // A suspended VM is idle by the operator's choice, and stopping it
        // would lose the memory the suspension keeps.
        if st.workloads.is_stopped(&j.name) || st.workloads.is_suspended(&j.name) {
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
        let allocs = holding(st, &j.name);
        let Some(newest) = allocs.iter().max_by_key(|a| (a.version, a.created_unix_ms)) else {
            continue;
        };
        let since = now_ms.saturating_sub(u64::try_from(period.as_millis()).unwrap_or(u64::MAX));
        let samples = timed_cpu(st, &allocs, since, now);
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

/// The jobs labelled `rightsize: apply` whose bounded right-sizing changes their
/// requests now: (job, the new manifest, why).
fn resizes(st: &ApiState, now: SystemTime) -> Vec<(String, String, String)> {
    let now_ms = unix_ms(now);
    let mut out = Vec::new();
    for j in st.workloads.jobs() {
        if st.workloads.is_stopped(&j.name)
            || job_label(&st.workloads, &j.name, RIGHTSIZE_LABEL)
                .is_none_or(|v| !v.trim().eq_ignore_ascii_case("apply"))
        {
            continue;
        }
        let window = job_label(&st.workloads, &j.name, RIGHTSIZE_WINDOW_LABEL)
            .and_then(|v| humantime::parse_duration(v.trim()).ok())
            .filter(|w| *w >= MIN_PERIOD)
            .unwrap_or(RIGHTSIZE_WINDOW);
        let since = now_ms.saturating_sub(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        let allocs = holding(st, &j.name);
        // Every replica runs the current version and has run for the window:
        // the samples describe what the change would resize, and a change rolled
        // out waits a whole window before the next.
        if allocs.is_empty()
            || allocs
                .iter()
                .any(|a| a.version != j.version || a.created_unix_ms > since)
        {
            continue;
        }
        let (cpu, mem) = usage(st, &allocs, since, now);
        let newest = &allocs[0];
        let Some(r) = rightsize(
            newest.cpu_millis,
            newest.memory_bytes,
            &cpu,
            &mem,
            &RightsizeConfig::default(),
        ) else {
            continue;
        };
        let Some((new_cpu, new_mem, why)) =
            bounded_rightsize(&r, &cpu, &mem, &ApplyBounds::default())
        else {
            continue;
        };
        let Ok(detail) = st.workloads.job(&j.name) else {
            continue;
        };
        match resized_manifest(&detail.manifest, new_cpu, new_mem) {
            Ok(text) => out.push((j.name, text, why)),
            Err(e) => warn!(job = %j.name, error = %e, "cannot right-size the manifest"),
        }
    }
    out
}

/// The allocations of `job` that hold resources.
fn holding(st: &ApiState, job: &str) -> Vec<crate::state::store::AllocRecord> {
    st.workloads
        .allocations(Some(job), None)
        .into_iter()
        .filter(holds_resources)
        .collect()
}

/// The replicas' CPU samples since `since_ms`: (Unix ms, millicores).
fn timed_cpu(
    st: &ApiState,
    allocs: &[crate::state::store::AllocRecord],
    since_ms: u64,
    now: SystemTime,
) -> Vec<(u64, f64)> {
    let mut out = Vec::new();
    each_usage(st, allocs, since_ms, now, |at, cpu, _| out.push((at, cpu)));
    out
}

/// The replicas' CPU (millicores) and memory (bytes) samples since `since_ms`.
fn usage(
    st: &ApiState,
    allocs: &[crate::state::store::AllocRecord],
    since_ms: u64,
    now: SystemTime,
) -> (Vec<f64>, Vec<u64>) {
    let (mut cpu, mut mem) = (Vec::new(), Vec::new());
    each_usage(st, allocs, since_ms, now, |_, c, m| {
        cpu.push(c);
        mem.push(m);
    });
    (cpu, mem)
}

/// Calls `f(at, cpu millicores, memory bytes)` for each sample of each replica
/// since `since_ms`, from the metrics history (or the registry's window).
fn each_usage(
    st: &ApiState,
    allocs: &[crate::state::store::AllocRecord],
    since_ms: u64,
    now: SystemTime,
    mut f: impl FnMut(u64, f64, u64),
) {
    let ids: BTreeSet<&str> = allocs.iter().map(|a| a.id.as_str()).collect();
    let nodes: BTreeSet<&str> = allocs.iter().map(|a| a.node.as_str()).collect();
    for node in nodes {
        let window = match &st.history {
            Some(h) => Some(h.window(node, since_ms, now)),
            None => st.registry.window(node),
        };
        for s in window.map(|w| w.samples).unwrap_or_default() {
            if s.at_unix_ms <= since_ms {
                continue;
            }
            for u in s.allocations.iter().filter(|u| ids.contains(u.id.as_str())) {
                // cpu_percent is percent of one core: 100% = 1000 millicores.
                f(
                    s.at_unix_ms,
                    f64::from(u.cpu_percent) * 10.0,
                    u.memory_bytes,
                );
            }
        }
    }
}

/// `manifest` with `spec.resources.cpu` and `memory` set (written out again from
/// its parsed value: comments are lost, the meaning is kept).
pub fn resized_manifest(
    manifest: &str,
    cpu_millis: u64,
    memory_bytes: u64,
) -> Result<String, String> {
    let mut docs = novacron_common::manifest::yaml_documents("manifest", manifest)
        .map_err(|e| e.to_string())?;
    let doc = docs.next().ok_or("the stored manifest is empty")?;
    let mut value =
        <serde_json::Value as serde::Deserialize>::deserialize(doc).map_err(|e| e.to_string())?;
    let resources = value
        .get_mut("spec")
        .and_then(|s| s.get_mut("resources"))
        .and_then(serde_json::Value::as_object_mut)
        .ok_or("the manifest has no spec.resources mapping")?;
    resources.insert("cpu".into(), format!("{cpu_millis}m").into());
    resources.insert(
        "memory".into(),
        format!("{}Mi", memory_bytes.div_ceil(1 << 20)).into(),
    );
    yaml_serde::to_string(&value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resized_manifest_changes_the_requests_only() {
        let text = "apiVersion: novacron.io/v1\nkind: Job\nmetadata:\n  name: api\n  labels: {rightsize: apply}\nspec:\n  type: service\n  replicas: 2\n  task: {image: busybox}\n  resources:\n    cpu: 1000m # too much\n    memory: 512Mi\n";
        let out = resized_manifest(text, 500, 256 << 20).expect("resized");
        let job = novacron_common::manifest::parse_job("j.yaml", &out).expect("valid");
        assert_eq!(job.spec.resources.cpu.0, 500);
        assert_eq!(job.spec.resources.memory.0, 256 << 20);
        assert_eq!(job.spec.replicas, 2);
        assert!(resized_manifest("kind: Job\nspec: {}\n", 1, 1).is_err());
    }
}
