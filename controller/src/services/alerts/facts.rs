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

    /// Each (value, comparison direction) the rules read, as one value per
    /// subject in subject order: built once per evaluation, so that rules
    /// reading the same metric share it and a rule's evaluation indexes a
    /// vector instead of looking each subject up.
    pub fn cache(&self, rules: &[AlertRule]) -> Cache {
        let mut cache = Cache::default();
        for r in rules {
            r.expr.walk(&mut |v, op, _| {
                let key = (v.clone(), Pick::of(op));
                if cache.aligned.contains_key(&key) {
                    return;
                }
                let series = self.values.get(v);
                let aligned: Vec<Option<f64>> = if v.subject == Subject::Fleet {
                    vec![
                        series
                            .and_then(|m| m.get("fleet"))
                            .and_then(|vals| pick(vals, op)),
                    ]
                } else {
                    self.subjects
                        .get(&v.subject)
                        .into_iter()
                        .flat_map(|subjects| subjects.keys())
                        .map(|name| {
                            series
                                .and_then(|m| m.get(name))
                                .and_then(|vals| pick(vals, op))
                        })
                        .collect()
                };
                cache.aligned.insert(key, aligned);
            });
        }
        cache
    }

    /// Every subject of `rule`'s kind with the condition's outcome, in subject
    /// order, reading `cache` (made by [`Facts::cache`] with this rule).
    pub fn observations<'a>(&'a self, rule: &AlertRule, cache: &Cache) -> Vec<Observation<'a>> {
        static FLEET_LABELS: BTreeMap<String, String> = BTreeMap::new();
        let subjects: Vec<(&str, &BTreeMap<String, String>)> = if rule.subject == Subject::Fleet {
            vec![("fleet", &FLEET_LABELS)]
        } else {
            match self.subjects.get(&rule.subject) {
                Some(s) => s.iter().map(|(k, v)| (k.as_str(), v)).collect(),
                None => return Vec::new(),
            }
        };
        // Each comparison's values, found once per rule (by address: the
        // evaluation hands back the comparisons of this very expression).
        let mut lookups: Vec<(*const ValueRef, Pick, Option<&Aligned>)> = Vec::new();
        rule.expr.walk(&mut |v, op, _| {
            let p = Pick::of(op);
            lookups.push((v as *const ValueRef, p, cache.aligned.get(&(v.clone(), p))));
        });
        subjects
            .into_iter()
            .enumerate()
            .map(|(index, (name, labels))| {
                let mut first = None;
                let mut seen_first = false;
                let truth = rule.expr.eval(&mut |v, op| {
                    let p = Pick::of(op);
                    let at = if v.subject == Subject::Fleet {
                        0
                    } else {
                        index
                    };
                    let x = lookups
                        .iter()
                        .find(|(ptr, lp, _)| std::ptr::eq(*ptr, v) && *lp == p)
                        .and_then(|(_, _, aligned)| *aligned)
                        .and_then(|aligned| aligned.get(at).copied().flatten());
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

/// Which of several series' values decides a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pick {
    /// The largest (`>`, `>=`).
    Max,
    /// The smallest (`<`, `<=`).
    Min,
    /// The first (`==`, `!=`).
    First,
}

impl Pick {
    fn of(op: Op) -> Pick {
        match op {
            Op::Gt | Op::Ge => Pick::Max,
            Op::Lt | Op::Le => Pick::Min,
            Op::Eq | Op::Ne => Pick::First,
        }
    }
}

/// One value per subject, in subject order.
pub type Aligned = Vec<Option<f64>>;

/// The values of one evaluation aligned with the subjects ([`Facts::cache`]).
#[derive(Debug, Default)]
pub struct Cache {
    aligned: HashMap<(ValueRef, Pick), Aligned>,
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
