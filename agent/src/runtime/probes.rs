//! Liveness, readiness and startup checks of one running container, and the budget
//! of restarts that failing checks may cost. Pure: the caller passes `now` and
//! carries out what comes back ([`Verdict`], [`HealthRestart`]).
//!
//! - Until the **startup** check passes, no other check runs. It failing
//!   `failure_threshold` times in a row restarts the container.
//! - **Liveness** failing `failure_threshold` times in a row restarts the container.
//! - **Readiness** failing `failure_threshold` times in a row marks the allocation
//!   not healthy; it never restarts anything.
//! - A restart for a failed check waits `backoff_initial_ms`, doubling with each
//!   one ([`Backoff`], without jitter: one container's restarts do not herd), at
//!   most `backoff_max_ms`. After `max_restarts` of them the allocation fails. A
//!   container that then stays live for [`BUDGET_RESET`] gets its whole budget back.

use std::time::{Duration, Instant};

use novacron_common::backoff::Backoff;
use novacron_common::wire::{HealthSpec, ProbeSpec};

/// The shortest time between two runs of one check.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// The timeout of a check whose spec says 0.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a container must stay live after a health restart before the restart
/// budget is whole again.
pub const BUDGET_RESET: Duration = Duration::from_secs(600);

/// Which check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeRole {
    /// Gates the others until it first passes.
    Startup,
    /// Restarts the container when it keeps failing.
    Liveness,
    /// Marks the allocation not ready when it keeps failing.
    Readiness,
}

impl ProbeRole {
    /// `startup`, `liveness` or `readiness`.
    pub fn name(self) -> &'static str {
        match self {
            ProbeRole::Startup => "startup",
            ProbeRole::Liveness => "liveness",
            ProbeRole::Readiness => "readiness",
        }
    }

    /// This check's spec in `health`, when it has one.
    pub fn spec(self, health: &HealthSpec) -> Option<&ProbeSpec> {
        match self {
            ProbeRole::Startup => health.startup.as_ref(),
            ProbeRole::Liveness => health.liveness.as_ref(),
            ProbeRole::Readiness => health.readiness.as_ref(),
        }
    }
}

/// What a check's result asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing beyond the (possibly changed) health.
    Keep,
    /// Restart the container: `role` failed `failures` times in a row.
    Restart {
        /// The check that failed.
        role: ProbeRole,
        /// Consecutive failures.
        failures: u32,
        /// The last failure, for people.
        why: String,
    },
}

/// The checks of one run of a container.
#[derive(Debug, Clone)]
pub struct Probes {
    started_at: Instant,
    /// The startup check passed (or there is none).
    started: bool,
    startup: Slot,
    liveness: Slot,
    readiness: Slot,
}

#[derive(Debug, Clone, Default)]
struct Slot {
    failures: u32,
    next_at: Option<Instant>,
    in_flight: bool,
    /// `None` before its first verdict; `Some(false)` after `failure_threshold`
    /// failures in a row; `Some(true)` after a pass.
    passing: Option<bool>,
}

impl Probes {
    /// The checks of a container that began running at `now`.
    pub fn start(health: &HealthSpec, now: Instant) -> Probes {
        let mut probes = Probes {
            started_at: now,
            started: health.startup.is_none(),
            startup: Slot::default(),
            liveness: Slot::default(),
            readiness: Slot::default(),
        };
        if probes.started {
            probes.schedule_after_startup(health, now);
        } else {
            probes.startup.next_at = health
                .startup
                .as_ref()
                .map(|s| now + Duration::from_millis(s.initial_delay_ms));
        }
        probes
    }

    /// The checks due at `now` that are not running yet: only startup until it has
    /// passed.
    pub fn due(&self, health: &HealthSpec, now: Instant) -> Vec<ProbeRole> {
        let roles: &[ProbeRole] = if self.started {
            &[ProbeRole::Liveness, ProbeRole::Readiness]
        } else {
            &[ProbeRole::Startup]
        };
        roles
            .iter()
            .copied()
            .filter(|r| r.spec(health).is_some())
            .filter(|r| {
                let slot = self.slot(*r);
                !slot.in_flight && slot.next_at.is_some_and(|t| t <= now)
            })
            .collect()
    }

    /// `role` is being checked now; it is not due again until its result is in.
    pub fn begin(&mut self, role: ProbeRole) {
        self.slot_mut(role).in_flight = true;
    }

    /// A `role` check was abandoned without a result: it may run again.
    pub fn abandon(&mut self, role: ProbeRole) {
        self.slot_mut(role).in_flight = false;
    }

    /// Takes in the result of a `role` check that finished at `now`.
    pub fn record(
        &mut self,
        health: &HealthSpec,
        role: ProbeRole,
        result: Result<(), String>,
        now: Instant,
    ) -> Verdict {
        let Some(spec) = role.spec(health) else {
            return Verdict::Keep;
        };
        let started = self.started;
        let slot = self.slot_mut(role);
        slot.in_flight = false;
        if role == ProbeRole::Startup && started {
            return Verdict::Keep;
        }
        slot.next_at = Some(now + interval(spec));
        match result {
            Ok(()) => {
                slot.failures = 0;
                slot.passing = Some(true);
                if role == ProbeRole::Startup {
                    self.started = true;
                    self.startup.next_at = None;
                    self.schedule_after_startup(health, now);
                }
                Verdict::Keep
            }
            Err(why) => {
                slot.failures = slot.failures.saturating_add(1);
                if slot.failures < spec.failure_threshold.max(1) {
                    return Verdict::Keep;
                }
                slot.passing = Some(false);
                match role {
                    ProbeRole::Readiness => Verdict::Keep,
                    ProbeRole::Startup | ProbeRole::Liveness => Verdict::Restart {
                        role,
                        failures: slot.failures,
                        why,
                    },
                }
            }
        }
    }

    /// When a check is next due (none while all are running).
    pub fn next_deadline(&self) -> Option<Instant> {
        [&self.startup, &self.liveness, &self.readiness]
            .into_iter()
            .filter(|s| !s.in_flight)
            .filter_map(|s| s.next_at)
            .min()
    }

    /// The health to report: readiness when there is such a check, otherwise
    /// liveness, otherwise whether startup passed. `None` before a verdict.
    pub fn healthy(&self, health: &HealthSpec) -> Option<bool> {
        if health.readiness.is_some() {
            // Not ready before the startup check passed, whatever readiness said
            // in an earlier run.
            return if self.started {
                self.readiness.passing
            } else {
                None
            };
        }
        if health.liveness.is_some() {
            return if self.started {
                self.liveness.passing
            } else {
                None
            };
        }
        self.started.then_some(true)
    }

    /// Whether this run has lasted [`BUDGET_RESET`] at `now`, past its startup
    /// check and with its liveness check not failing.
    pub fn settled(&self, now: Instant) -> bool {
        self.started
            && self.liveness.failures == 0
            && now.saturating_duration_since(self.started_at) >= BUDGET_RESET
    }

    fn schedule_after_startup(&mut self, health: &HealthSpec, now: Instant) {
        for role in [ProbeRole::Liveness, ProbeRole::Readiness] {
            let at = role
                .spec(health)
                .map(|s| (self.started_at + Duration::from_millis(s.initial_delay_ms)).max(now));
            self.slot_mut(role).next_at = at;
        }
    }

    fn slot(&self, role: ProbeRole) -> &Slot {
        match role {
            ProbeRole::Startup => &self.startup,
            ProbeRole::Liveness => &self.liveness,
            ProbeRole::Readiness => &self.readiness,
        }
    }

    fn slot_mut(&mut self, role: ProbeRole) -> &mut Slot {
        match role {
            ProbeRole::Startup => &mut self.startup,
            ProbeRole::Liveness => &mut self.liveness,
            ProbeRole::Readiness => &mut self.readiness,
        }
    }
}

/// What follows a restart-asking [`Verdict`] once the container is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthRestart {
    /// Start it again at `at`; this is health restart number `attempt` (1-based).
    RestartAt {
        /// When.
        at: Instant,
        /// Which health restart this is.
        attempt: u32,
    },
    /// The budget is spent: the allocation fails.
    Fail,
}

/// The health restarts an allocation made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartBudget {
    used: u32,
}

impl RestartBudget {
    /// Health restarts made and not yet forgiven.
    pub fn used(&self) -> u32 {
        self.used
    }

    /// What to do about a container whose check failed at `now`: restart after a
    /// backoff that doubles with each restart, or, with `max_restarts` used, fail.
    pub fn decide(&self, health: &HealthSpec, now: Instant) -> HealthRestart {
        if self.used >= health.max_restarts {
            return HealthRestart::Fail;
        }
        let backoff = Backoff {
            initial: Duration::from_millis(health.backoff_initial_ms),
            max: Duration::from_millis(health.backoff_max_ms.max(health.backoff_initial_ms)),
        };
        HealthRestart::RestartAt {
            at: now + backoff.delay(self.used, 1.0).max(MIN_PROBE_INTERVAL),
            attempt: self.used + 1,
        }
    }

    /// Records a health restart.
    pub fn record(&mut self) {
        self.used = self.used.saturating_add(1);
    }

    /// Gives the budget back once the container's current run has stayed live
    /// for [`BUDGET_RESET`] ([`Probes::settled`]).
    pub fn settle(&mut self, probes: &Probes, now: Instant) {
        if self.used > 0 && probes.settled(now) {
            *self = RestartBudget::default();
        }
    }
}

/// The time between two runs of a check.
pub fn interval(spec: &ProbeSpec) -> Duration {
    Duration::from_millis(spec.period_ms).max(MIN_PROBE_INTERVAL)
}

/// How long one run of a check may take.
pub fn timeout(spec: &ProbeSpec) -> Duration {
    match spec.timeout_ms {
        0 => DEFAULT_PROBE_TIMEOUT,
        ms => Duration::from_millis(ms),
    }
}

#[cfg(test)]
mod tests {
    use novacron_common::wire::HealthCheckKind;

    use super::*;

    fn probe(port: u16, period_ms: u64, threshold: u32) -> ProbeSpec {
        ProbeSpec {
            check: HealthCheckKind::Tcp { port },
            period_ms,
            timeout_ms: 500,
            failure_threshold: threshold,
            initial_delay_ms: 0,
        }
    }

    fn health(
        liveness: Option<ProbeSpec>,
        readiness: Option<ProbeSpec>,
        startup: Option<ProbeSpec>,
    ) -> HealthSpec {
        HealthSpec {
            liveness,
            readiness,
            startup,
            max_restarts: 2,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 3_000,
        }
    }

    fn fail() -> Result<(), String> {
        Err("tcp 10.0.0.2:80: connection refused".into())
    }

    /// Runs every due check with `result`, returning the verdicts.
    fn run_due(
        p: &mut Probes,
        h: &HealthSpec,
        now: Instant,
        result: &dyn Fn(ProbeRole) -> Result<(), String>,
    ) -> Vec<Verdict> {
        let due = p.due(h, now);
        due.into_iter()
            .map(|role| {
                p.begin(role);
                p.record(h, role, result(role), now)
            })
            .collect()
    }

    #[test]
    fn liveness_restarts_after_threshold_consecutive_failures_only() {
        let h = health(Some(probe(80, 1_000, 3)), None, None);
        let t0 = Instant::now();
        let mut p = Probes::start(&h, t0);
        assert_eq!(p.due(&h, t0), vec![ProbeRole::Liveness]);
        let s = Duration::from_secs(1);
        // Two failures, a pass, two failures: never three in a row.
        for (i, ok) in [false, false, true, false, false].into_iter().enumerate() {
            let now = t0 + s * i as u32;
            let v = run_due(&mut p, &h, now, &|_| if ok { Ok(()) } else { fail() });
            assert_eq!(v, vec![Verdict::Keep], "check {i}");
        }
        assert_eq!(p.healthy(&h), Some(true), "no verdict of failure yet");
        let v = run_due(&mut p, &h, t0 + s * 5, &|_| fail());
        assert!(
            matches!(&v[..], [Verdict::Restart { role: ProbeRole::Liveness, failures: 3, why }] if why.contains("refused")),
            "{v:?}"
        );
        assert_eq!(p.healthy(&h), Some(false));
    }

    #[test]
    fn checks_wait_their_period_and_are_not_due_while_running() {
        let h = health(Some(probe(80, 2_000, 1)), None, None);
        let t0 = Instant::now();
        let mut p = Probes::start(&h, t0);
        p.begin(ProbeRole::Liveness);
        assert!(
            p.due(&h, t0 + Duration::from_secs(9)).is_empty(),
            "in flight"
        );
        assert_eq!(p.next_deadline(), None);
        p.record(&h, ProbeRole::Liveness, Ok(()), t0);
        assert_eq!(p.next_deadline(), Some(t0 + Duration::from_secs(2)));
        assert!(p.due(&h, t0 + Duration::from_millis(1_999)).is_empty());
        assert_eq!(
            p.due(&h, t0 + Duration::from_secs(2)),
            vec![ProbeRole::Liveness]
        );
    }

    #[test]
    fn readiness_failures_mark_not_ready_and_never_restart() {
        let h = health(None, Some(probe(80, 1_000, 2)), None);
        let t0 = Instant::now();
        let mut p = Probes::start(&h, t0);
        assert_eq!(p.healthy(&h), None, "no result yet");
        run_due(&mut p, &h, t0, &|_| Ok(()));
        assert_eq!(p.healthy(&h), Some(true));
        for i in 1..=50u32 {
            let v = run_due(&mut p, &h, t0 + Duration::from_secs(u64::from(i)), &|_| {
                fail()
            });
            assert_eq!(v, vec![Verdict::Keep], "readiness never restarts");
        }
        assert_eq!(p.healthy(&h), Some(false));
        run_due(&mut p, &h, t0 + Duration::from_secs(51), &|_| Ok(()));
        assert_eq!(p.healthy(&h), Some(true), "ready again after one pass");
    }

    #[test]
    fn readiness_decides_health_while_liveness_decides_restarts() {
        let h = health(Some(probe(81, 1_000, 1)), Some(probe(80, 1_000, 1)), None);
        let t0 = Instant::now();
        let mut p = Probes::start(&h, t0);
        let v = run_due(&mut p, &h, t0, &|role| match role {
            ProbeRole::Readiness => fail(),
            _ => Ok(()),
        });
        assert_eq!(v, vec![Verdict::Keep, Verdict::Keep]);
        assert_eq!(p.healthy(&h), Some(false), "not ready though live");
        let v = run_due(
            &mut p,
            &h,
            t0 + Duration::from_secs(1),
            &|role| match role {
                ProbeRole::Liveness => fail(),
                _ => Ok(()),
            },
        );
        assert!(
            v.contains(&Verdict::Restart {
                role: ProbeRole::Liveness,
                failures: 1,
                why: "tcp 10.0.0.2:80: connection refused".into()
            }),
            "{v:?}"
        );
    }

    #[test]
    fn startup_gates_liveness_until_it_passes() {
        let mut live = probe(80, 1_000, 1);
        live.initial_delay_ms = 5_000;
        let h = health(
            Some(live),
            Some(probe(80, 1_000, 1)),
            Some(probe(80, 1_000, 10)),
        );
        let t0 = Instant::now();
        let mut p = Probes::start(&h, t0);
        // Startup fails for a while: liveness (which would restart at once) is
        // never run, and the allocation is not ready.
        for i in 0..9u32 {
            let now = t0 + Duration::from_secs(u64::from(i));
            assert_eq!(p.due(&h, now), vec![ProbeRole::Startup], "at {i}s");
            let v = run_due(&mut p, &h, now, &|_| fail());
            assert_eq!(v, vec![Verdict::Keep]);
            assert_eq!(p.healthy(&h), None);
        }
        let now = t0 + Duration::from_secs(9);
        assert_eq!(run_due(&mut p, &h, now, &|_| Ok(())), vec![Verdict::Keep]);
        // Startup passed at 9s: readiness is due now, liveness not before its
        // initial delay (counted from the start, so at once here).
        let mut due = p.due(&h, now);
        due.sort_by_key(|r| r.name());
        assert_eq!(due, vec![ProbeRole::Liveness, ProbeRole::Readiness]);
        assert!(
            !p.due(&h, now + Duration::from_secs(60))
                .contains(&ProbeRole::Startup),
            "startup runs no more once passed"
        );
    }

    #[test]
    fn liveness_waits_for_its_initial_delay() {
        let mut live = probe(80, 1_000, 1);
        live.initial_delay_ms = 5_000;
        let h = health(Some(live), None, None);
        let t0 = Instant::now();
        let p = Probes::start(&h, t0);
        assert!(p.due(&h, t0 + Duration::from_millis(4_999)).is_empty());
        assert_eq!(
            p.due(&h, t0 + Duration::from_secs(5)),
            vec![ProbeRole::Liveness]
        );
    }

    #[test]
    fn startup_past_its_threshold_restarts() {
        let h = health(Some(probe(80, 1_000, 1)), None, Some(probe(80, 1_000, 3)));
        let t0 = Instant::now();
        let mut p = Probes::start(&h, t0);
        let mut verdicts = Vec::new();
        for i in 0..3u32 {
            verdicts.extend(run_due(
                &mut p,
                &h,
                t0 + Duration::from_secs(u64::from(i)),
                &|_| fail(),
            ));
        }
        assert_eq!(&verdicts[..2], &[Verdict::Keep, Verdict::Keep]);
        assert!(
            matches!(
                verdicts[2],
                Verdict::Restart {
                    role: ProbeRole::Startup,
                    failures: 3,
                    ..
                }
            ),
            "{verdicts:?}"
        );
    }

    #[test]
    fn the_budget_backs_off_exponentially_then_fails() {
        let h = health(Some(probe(80, 1_000, 1)), None, None);
        let mut h4 = h.clone();
        h4.max_restarts = 4;
        let t0 = Instant::now();
        let mut b = RestartBudget::default();
        let mut waits = Vec::new();
        for _ in 0..4 {
            match b.decide(&h4, t0) {
                HealthRestart::RestartAt { at, attempt } => {
                    assert_eq!(attempt, b.used() + 1);
                    waits.push(at - t0);
                    b.record();
                }
                HealthRestart::Fail => panic!("budget of 4 spent after {}", b.used()),
            }
        }
        // 1s, 2s, then capped at 3s.
        let s = Duration::from_secs;
        assert_eq!(waits, vec![s(1), s(2), s(3), s(3)]);
        assert_eq!(b.decide(&h4, t0), HealthRestart::Fail);
        let none = HealthSpec {
            max_restarts: 0,
            ..h
        };
        assert_eq!(
            RestartBudget::default().decide(&none, t0),
            HealthRestart::Fail,
            "a budget of 0 fails at the first verdict"
        );
    }

    #[test]
    fn a_container_live_long_enough_gets_its_budget_back() {
        let h = health(Some(probe(80, 1_000, 1)), None, None);
        let t0 = Instant::now();
        let mut b = RestartBudget::default();
        b.record();
        b.record();
        assert_eq!(b.decide(&h, t0), HealthRestart::Fail);
        let restarted = t0 + Duration::from_secs(1);
        let mut p = Probes::start(&h, restarted);
        run_due(&mut p, &h, restarted, &|_| Ok(()));
        b.settle(&p, restarted + Duration::from_secs(60));
        assert_eq!(b.used(), 2, "not live for long enough yet");
        b.settle(&p, restarted + BUDGET_RESET);
        assert_eq!(b.used(), 0);
        assert!(matches!(
            b.decide(&h, t0),
            HealthRestart::RestartAt { attempt: 1, .. }
        ));
    }
}
