//! What the rules read at one evaluation: the subjects that exist (nodes,
//! allocations, jobs, pools, migrations) with their labels, and every value
//! the rules' conditions name (gathered by
//! [`alert_eval`](crate::services::alert_eval)).

use std::collections::{BTreeMap, HashMap};

use novacron_common::alert::AlertRule;
use novacron_common::alert::engine::Observation;
use novacron_common::alert::expr::{Op, Subject, ValueRef};

/// How far back the newest point of a history metric is looked for.
pub const INSTANT_LOOKBACK_MS: u64 = 60_000;

/// Each subject's values of one metric (several for one series per disk or
/// GPU).
pub type Series = HashMap<String, Vec<f64>>;

/// The subjects and values of one evaluation.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    /// Per kind: each subject's labels.
    pub subjects: BTreeMap<Subject, BTreeMap<String, BTreeMap<String, String>>>,
    /// Per value: each subject's values (several for a metric with one series
    /// per disk or GPU).
    pub values: HashMap<ValueRef, Series>,
}

impl Facts {
    /// Records `value` of `v` for `subject`.
    pub fn put(&mut self, v: &ValueRef, subject: &str, value: f64) {
        if value.is_finite() {
            self.values
                .entry(v.clone())
                .or_default()
                .entry(subject.to_string())
                .or_default()
                .push(value);
        }
    }

    /// The value of `v` for `subject` that decides `op`: the largest for
    /// `>`/`>=`, the smallest for `<`/`<=`, else the first. Fleet values are
    /// the same for every subject.
    pub fn value(&self, v: &ValueRef, subject: &str, op: Op) -> Option<f64> {
        let key = if v.subject == Subject::Fleet {
            "fleet"
        } else {
            subject
        };
        pick(self.values.get(v)?.get(key)?, op)
    }

    /// Every subject of `rule`'s kind with the condition's outcome.
    pub fn observations<'a>(&'a self, rule: &AlertRule) -> Vec<Observation<'a>> {
        static FLEET_LABELS: BTreeMap<String, String> = BTreeMap::new();
        let subjects: Vec<(&str, &BTreeMap<String, String>)> = if rule.subject == Subject::Fleet {
            vec![("fleet", &FLEET_LABELS)]
        } else {
            match self.subjects.get(&rule.subject) {
                Some(s) => s.iter().map(|(k, v)| (k.as_str(), v)).collect(),
                None => return Vec::new(),
            }
        };
        // Each value's map, looked up once per rule rather than per subject.
        let maps: Vec<(&ValueRef, Option<&Series>)> = rule
            .expr
            .values()
            .into_iter()
            .map(|v| (v, self.values.get(v)))
            .collect();
        subjects
            .into_iter()
            .map(|(name, labels)| {
                let mut first = None;
                let mut seen_first = false;
                let truth = rule.expr.eval(&mut |v, op| {
                    let key = if v.subject == Subject::Fleet {
                        "fleet"
                    } else {
                        name
                    };
                    let map = maps
                        .iter()
                        .find(|(m, _)| std::ptr::eq(*m, v) || *m == v)
                        .and_then(|(_, m)| *m);
                    let x = map.and_then(|m| m.get(key)).and_then(|vals| pick(vals, op));
                    if !seen_first {
                        seen_first = true;
                        first = x;
                    }
                    x
                });
                Observation {
                    subject: name,
                    labels,
                    truth,
                    value: first,
                }
            })
            .collect()
    }
}

/// The value of several series that decides `op`: the largest for `>`/`>=`,
/// the smallest for `<`/`<=`, else the first.
fn pick(vals: &[f64], op: Op) -> Option<f64> {
    match op {
        Op::Gt | Op::Ge => vals.iter().copied().reduce(f64::max),
        Op::Lt | Op::Le => vals.iter().copied().reduce(f64::min),
        Op::Eq | Op::Ne => vals.first().copied(),
    }
}
