//! Budget and spot-mix alerts: every [`DEFAULT_INTERVAL`] the cost report of the
//! live fleet is checked against the catalog's `[budgets]` and `[mix]`, and an
//! event is recorded only when a budget or a class changes side (exceeded ↔ ok,
//! off target ↔ on target). The state is in memory: after a restart a budget
//! already exceeded (a class already off target) is reported once more.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use novacron_common::ticker::Ticker;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::services::context::ApiState;
use crate::services::costs::{self, CostReport};
use crate::services::events::{CONTROLLER, NewEvent, kind};

/// How often budgets and mixes are checked.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// What was exceeded and off target at the previous check.
#[derive(Debug, Default)]
pub struct Watch {
    exceeded: BTreeSet<(String, String)>,
    off_target: BTreeSet<String>,
}

impl Watch {
    /// The events of the changes since the previous report (none at the first
    /// check for what is within its budget and on target).
    pub fn step(&mut self, report: &CostReport) -> Vec<NewEvent> {
        let mut out = Vec::new();
        let mut exceeded = BTreeSet::new();
        for b in &report.budgets {
            let key = (b.scope.clone(), b.name.clone());
            let was = self.exceeded.contains(&key);
            if b.exceeded != was {
                let k = if b.exceeded {
                    kind::BUDGET_EXCEEDED
                } else {
                    kind::BUDGET_RECOVERED
                };
                let mut e = NewEvent::new(k, CONTROLLER, b.message.clone())
                    .detail("scope", &b.scope)
                    .detail("hourly", format!("{:.4}", b.hourly))
                    .detail("budget", format!("{:.4}", b.budget));
                if b.scope == "job" {
                    e = e.job(b.name.clone());
                } else if b.scope == "pool" {
                    e = e.detail("pool", &b.name);
                }
                out.push(e);
            }
            if b.exceeded {
                exceeded.insert(key);
            }
        }
        let mut off = BTreeSet::new();
        for m in &report.mix {
            let was = self.off_target.contains(&m.class);
            if m.off_target != was {
                let k = if m.off_target {
                    kind::MIX_OFF_TARGET
                } else {
                    kind::MIX_ON_TARGET
                };
                out.push(
                    NewEvent::new(k, CONTROLLER, m.message.clone())
                        .detail("class", &m.class)
                        .detail("target_spot", format!("{:.2}", m.target_spot))
                        .detail("actual_spot", format!("{:.2}", m.actual_spot)),
                );
            }
            if m.off_target {
                off.insert(m.class.clone());
            }
        }
        self.exceeded = exceeded;
        self.off_target = off;
        out
    }
}

/// Checks every `interval` until cancelled.
pub async fn run(st: Arc<ApiState>, interval: Duration, cancel: CancellationToken) {
    if st.pricing.budgets == Default::default() && st.pricing.mix.is_empty() {
        return;
    }
    let mut watch = Watch::default();
    let mut ticker = Ticker::new(interval, MissedTickBehavior::Delay, cancel.cancelled());
    while ticker.tick().await {
        let report = costs::live_report(&st);
        for event in watch.step(&report) {
            st.events.note(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use novacron_common::cost::{BudgetStatus, MixStatus};

    use super::*;

    fn report(pool_hourly: f64, spot_share: f64) -> CostReport {
        let exceeded = pool_hourly > 3.0;
        CostReport {
            currency: "USD".into(),
            total_hourly: pool_hourly,
            nodes: Vec::new(),
            jobs: Vec::new(),
            pools: Vec::new(),
            capacity: Vec::new(),
            budgets: vec![BudgetStatus {
                scope: "pool".into(),
                name: "web".into(),
                hourly: pool_hourly,
                budget: 3.0,
                exceeded,
                over: if exceeded { pool_hourly - 3.0 } else { 0.0 },
                message: format!("pool web costs {pool_hourly:.2}/h"),
            }],
            mix: vec![MixStatus {
                class: "web".into(),
                target_spot: 0.7,
                actual_spot: spot_share,
                replicas: 10,
                spot_replicas: (spot_share * 10.0) as u32,
                off_target: (spot_share - 0.7).abs() > 0.2,
                message: String::new(),
            }],
        }
    }

    fn kinds(events: &[NewEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| format!("{e:?}"))
            .map(|d| {
                [
                    kind::BUDGET_EXCEEDED,
                    kind::BUDGET_RECOVERED,
                    kind::MIX_OFF_TARGET,
                    kind::MIX_ON_TARGET,
                ]
                .into_iter()
                .find(|k| d.contains(&format!("kind: \"{k}\"")))
                .unwrap_or("?")
                .to_string()
            })
            .collect()
    }

    #[test]
    fn events_only_on_transitions() {
        let mut w = Watch::default();
        assert!(w.step(&report(2.0, 0.7)).is_empty(), "ok at start: nothing");
        assert_eq!(kinds(&w.step(&report(4.2, 0.7))), [kind::BUDGET_EXCEEDED]);
        assert!(w.step(&report(4.5, 0.6)).is_empty(), "still exceeded");
        assert_eq!(
            kinds(&w.step(&report(2.5, 0.2))),
            [kind::BUDGET_RECOVERED, kind::MIX_OFF_TARGET]
        );
        assert!(w.step(&report(2.5, 0.1)).is_empty());
        assert_eq!(kinds(&w.step(&report(2.5, 0.8))), [kind::MIX_ON_TARGET]);
    }
}
