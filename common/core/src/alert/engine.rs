//! The alert state machine and notification planning, pure functions of `now`,
//! the previous states and what was observed.
//!
//! Each (rule, subject) is inactive, pending (the condition holds, not yet for
//! `for`) or firing. [`step`] moves every subject of a rule one evaluation
//! forward and says which moved; [`plan`] turns that into the notifications due
//! per channel (Alertmanager's grouping: one message per rule and channel that
//! lists every firing alert of the rule, sent when one starts firing, resolves,
//! or the repeat interval passes unacknowledged). Silenced alerts keep their
//! state but are not sent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::expr::Truth;
use super::rule::{AlertRule, Channel, NoData, render};

/// Most subjects one rule may keep active; the rest are counted, not kept (a
/// rule over 10,000 nodes that all match still fits).
pub const MAX_INSTANCES: usize = 20_000;
/// Most silences.
pub const MAX_SILENCES: usize = 1_000;
/// Most alerts listed in one notification (the rest are counted in
/// `truncatedAlerts`, as Alertmanager does).
pub const MAX_ALERTS_PER_MESSAGE: usize = 100;

/// An active alert's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum State {
    /// The condition holds, not yet for `for`.
    Pending,
    /// The condition has held for `for`.
    Firing,
}

/// One subject of one rule that is pending or firing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The subject: a node, allocation, job, pool or migration name, or `fleet`.
    pub subject: String,
    /// Pending or firing.
    pub state: State,
    /// Since when the condition holds (Unix ms).
    pub active_since_ms: u64,
    /// When it started firing.
    pub firing_since_ms: Option<u64>,
    /// The value of the condition's first comparison at the last evaluation.
    pub value: Option<f64>,
    /// The rule's labels plus `subject` and the subject's own (`node`, `job`).
    pub labels: BTreeMap<String, String>,
    /// The rule's annotations, rendered.
    pub annotations: BTreeMap<String, String>,
    /// When each channel was last sent this alert as firing (Unix ms).
    #[serde(default)]
    pub notified_ms: BTreeMap<String, u64>,
    /// Who acknowledged it: no repeats until it resolves.
    #[serde(default)]
    pub acked_by: Option<String>,
}

/// What one subject showed at an evaluation (borrowed: a round observes every
/// subject for every rule, and only the few that match are copied).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation<'a> {
    /// The subject's name.
    pub subject: &'a str,
    /// Its labels (`node`, `job`, `pool`).
    pub labels: &'a BTreeMap<String, String>,
    /// The condition's outcome (`None`: missing data).
    pub truth: Truth,
    /// The first comparison's value.
    pub value: Option<f64>,
}

/// A change of one alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// The rule.
    pub rule: String,
    /// The subject.
    pub subject: String,
    /// What happened.
    pub change: Change,
    /// The value then.
    pub value: Option<f64>,
    /// The alert's labels.
    pub labels: BTreeMap<String, String>,
    /// Its rendered annotations.
    pub annotations: BTreeMap<String, String>,
    /// Since when it was active (Unix ms).
    pub active_since_ms: u64,
    /// The channels it had been sent to as firing (a resolution is news there).
    pub sent_to: Vec<String>,
}

/// What happened to an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// Inactive → pending.
    Pending,
    /// → firing.
    Firing,
    /// Firing → inactive.
    Resolved,
    /// Pending → inactive before `for` passed (a flap; nobody is told).
    Cleared,
}

impl Change {
    /// As events name it.
    pub fn name(self) -> &'static str {
        match self {
            Change::Pending => "pending",
            Change::Firing => "firing",
            Change::Resolved => "resolved",
            Change::Cleared => "cleared",
        }
    }
}

/// The result of one evaluation of one rule.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Step {
    /// The active alerts after it, by subject.
    pub active: BTreeMap<String, Instance>,
    /// What changed.
    pub transitions: Vec<Transition>,
    /// Subjects that matched beyond [`MAX_INSTANCES`].
    pub dropped: usize,
}

/// Moves `rule`'s alerts one evaluation forward at `now_ms`. `observed` holds
/// every subject that exists now; an active subject missing from it has gone (a
/// node deleted, an allocation stopped) and resolves. With `warming_up` (just
/// after a controller start, before fresh data has arrived), a subject without
/// data keeps its state whatever the rule's `noData` says, so a restart neither
/// resolves nor fires anything by itself.
pub fn step(
    now_ms: u64,
    rule: &AlertRule,
    prev: BTreeMap<String, Instance>,
    observed: &[Observation<'_>],
    warming_up: bool,
) -> Step {
    let mut out = Step::default();
    let for_ms = u64::try_from(rule.for_.as_millis()).unwrap_or(u64::MAX);
    let no_data = if warming_up {
        NoData::Keep
    } else {
        rule.no_data
    };
    // The observations in subject order (as the controller gathers them, so
    // usually no sort), walked beside the previous alerts (a map, so in order
    // too): each previous alert is met once, moved rather than copied, and one
    // that no observation meets has gone.
    let mut order: Vec<usize> = (0..observed.len()).collect();
    if !observed.windows(2).all(|w| w[0].subject < w[1].subject) {
        order.sort_by(|&a, &b| observed[a].subject.cmp(observed[b].subject));
    }
    let mut prev = prev.into_iter().peekable();
    let mut active: Vec<(String, Instance)> = Vec::new();
    for &i in &order {
        let o = &observed[i];
        while let Some((k, _)) = prev.peek() {
            if k.as_str() >= o.subject {
                break;
            }
            if let Some((_, gone)) = prev.next() {
                out.transitions.push(ended(rule, &gone, None));
            }
        }
        let before = match prev.peek() {
            Some((k, _)) if k.as_str() == o.subject => prev.next(),
            _ => None,
        };
        let holds = match (o.truth, no_data) {
            (Some(t), _) => t,
            (None, NoData::Ok) => false,
            (None, NoData::Alerting) => true,
            (None, NoData::Keep) => {
                active.extend(before);
                continue;
            }
        };
        if !holds {
            if let Some((_, b)) = before {
                out.transitions.push(ended(rule, &b, o.value));
            }
            continue;
        }
        let new = before.is_none();
        let (key, mut inst) = match before {
            Some(kept) => kept,
            None => {
                if active.len() >= MAX_INSTANCES {
                    out.dropped += 1;
                    continue;
                }
                let mut labels = rule.labels.clone();
                labels.extend(o.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
                labels.insert("subject".into(), o.subject.to_string());
                let inst = Instance {
                    subject: o.subject.to_string(),
                    state: State::Pending,
                    active_since_ms: now_ms,
                    firing_since_ms: None,
                    value: o.value,
                    labels,
                    annotations: BTreeMap::new(),
                    notified_ms: BTreeMap::new(),
                    acked_by: None,
                };
                (o.subject.to_string(), inst)
            }
        };
        inst.value = o.value;
        if !rule.annotations.is_empty() || !inst.annotations.is_empty() {
            inst.annotations = rule
                .annotations
                .iter()
                .map(|(k, t)| (k.clone(), render(t, o.subject, o.value, &inst.labels)))
                .collect();
        }
        if new && for_ms > 0 {
            out.transitions
                .push(transition(rule, &inst, Change::Pending, o.value));
        }
        if inst.state == State::Pending && now_ms.saturating_sub(inst.active_since_ms) >= for_ms {
            inst.state = State::Firing;
            inst.firing_since_ms = Some(now_ms);
            out.transitions
                .push(transition(rule, &inst, Change::Firing, o.value));
        }
        active.push((key, inst));
    }
    for (_, gone) in prev {
        out.transitions.push(ended(rule, &gone, None));
    }
    out.active = active.into_iter().collect();
    out
}

/// The transition of an alert whose condition stopped holding (or whose
/// subject has gone): a pending one is cleared, a firing one resolved.
fn ended(rule: &AlertRule, i: &Instance, value: Option<f64>) -> Transition {
    let change = match i.state {
        State::Pending => Change::Cleared,
        State::Firing => Change::Resolved,
    };
    transition(rule, i, change, value)
}

fn transition(rule: &AlertRule, i: &Instance, change: Change, value: Option<f64>) -> Transition {
    Transition {
        rule: rule.name.clone(),
        subject: i.subject.clone(),
        change,
        value,
        labels: i.labels.clone(),
        annotations: i.annotations.clone(),
        active_since_ms: i.active_since_ms,
        sent_to: i.notified_ms.keys().cloned().collect(),
    }
}

/// A silence: alerts whose labels have all of `matchers` are not sent between
/// `starts_ms` and `ends_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Silence {
    /// Its id.
    pub id: String,
    /// Label equalities (`alertname`, `subject`, `node`, `severity`, ...).
    pub matchers: BTreeMap<String, String>,
    /// From (Unix ms).
    pub starts_ms: u64,
    /// Until (Unix ms).
    pub ends_ms: u64,
    /// Who.
    pub created_by: String,
    /// Why.
    pub comment: String,
}

impl Silence {
    /// Whether it silences an alert with `labels` at `now_ms`.
    pub fn covers(&self, labels: &BTreeMap<String, String>, now_ms: u64) -> bool {
        (self.starts_ms..self.ends_ms).contains(&now_ms)
            && !self.matchers.is_empty()
            && self.matchers.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The silence that covers `labels` now, if any.
pub fn silenced<'a>(
    silences: &'a [Silence],
    labels: &BTreeMap<String, String>,
    now_ms: u64,
) -> Option<&'a Silence> {
    silences.iter().find(|s| s.covers(labels, now_ms))
}

/// One alert in a notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notified {
    /// `firing` or `resolved`.
    pub status: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// Since when (Unix ms).
    pub starts_ms: u64,
    /// When it resolved (Unix ms).
    pub ends_ms: Option<u64>,
    /// The value.
    pub value: Option<f64>,
}

/// A notification due to one channel about one rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// The channel.
    pub channel: String,
    /// The rule (the group).
    pub rule: String,
    /// `firing` when any listed alert fires, else `resolved`.
    pub status: String,
    /// The alerts, firing first, at most [`MAX_ALERTS_PER_MESSAGE`].
    pub alerts: Vec<Notified>,
    /// How many more were left out.
    pub truncated: usize,
    /// The rule's labels (the group's common labels).
    pub common_labels: BTreeMap<String, String>,
    /// When it was planned (Unix ms).
    pub at_ms: u64,
}

/// The notifications due after `step` for `rule`, and the active alerts with
/// their send times updated. A group is sent to a channel when one of its
/// alerts starts firing or resolves (after having been sent firing there), or
/// when an unacknowledged firing alert was last sent longer than the channel's
/// repeat interval ago. Silenced alerts are left out; a group with nothing left
/// is not sent.
pub fn plan(
    now_ms: u64,
    rule: &AlertRule,
    channels: &[Channel],
    step: &mut Step,
    silences: &[Silence],
) -> Vec<Notification> {
    let mut out = Vec::new();
    for ch in channels.iter().filter(|c| c.routes(rule)) {
        let repeat_ms = u64::try_from(ch.repeat.as_millis()).unwrap_or(u64::MAX);
        let firing: Vec<&Instance> = step
            .active
            .values()
            .filter(|i| i.state == State::Firing && silenced(silences, &i.labels, now_ms).is_none())
            .collect();
        let resolved: Vec<&Transition> = step
            .transitions
            .iter()
            .filter(|t| t.change == Change::Resolved)
            .filter(|t| silenced(silences, &t.labels, now_ms).is_none())
            .collect();
        let newly = firing.iter().any(|i| !i.notified_ms.contains_key(&ch.name));
        let repeat = firing.iter().any(|i| {
            i.acked_by.is_none()
                && i.notified_ms
                    .get(&ch.name)
                    .is_some_and(|&t| now_ms.saturating_sub(t) >= repeat_ms)
        });
        // A resolution is news only where the firing was sent.
        let resolved_news: Vec<&&Transition> = resolved
            .iter()
            .filter(|t| t.sent_to.contains(&ch.name))
            .collect();
        if !newly && !repeat && resolved_news.is_empty() {
            continue;
        }
        let mut alerts: Vec<Notified> = firing
            .iter()
            .map(|i| Notified {
                status: "firing".into(),
                labels: i.labels.clone(),
                annotations: i.annotations.clone(),
                starts_ms: i.active_since_ms,
                ends_ms: None,
                value: i.value,
            })
            .collect();
        alerts.extend(resolved_news.iter().map(|t| Notified {
            status: "resolved".into(),
            labels: t.labels.clone(),
            annotations: t.annotations.clone(),
            starts_ms: t.active_since_ms,
            ends_ms: Some(now_ms),
            value: t.value,
        }));
        let truncated = alerts.len().saturating_sub(MAX_ALERTS_PER_MESSAGE);
        alerts.truncate(MAX_ALERTS_PER_MESSAGE);
        out.push(Notification {
            channel: ch.name.clone(),
            rule: rule.name.clone(),
            status: if firing.is_empty() {
                "resolved"
            } else {
                "firing"
            }
            .into(),
            alerts,
            truncated,
            common_labels: rule.labels.clone(),
            at_ms: now_ms,
        });
        let sent: Vec<String> = firing.iter().map(|i| i.subject.clone()).collect();
        for s in sent {
            if let Some(i) = step.active.get_mut(&s) {
                i.notified_ms.insert(ch.name.clone(), now_ms);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::alert::rule::{Target, parse_rules};

    fn rule(extra: &str) -> AlertRule {
        let y = format!(
            "apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: hot\nspec:\n  condition: node.cpu_percent > 90 and node.memory_percent > 90\n  for: 30s\n  notify: [ops]\n  annotations:\n    summary: '{{{{ subject }}}} at {{{{ value }}}}'\n{extra}"
        );
        parse_rules("r.yaml", &y).expect("accepted").remove(0)
    }

    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

    fn channel(repeat_s: u64) -> Channel {
        Channel {
            name: "ops".into(),
            target: Target::Webhook("http://127.0.0.1:1/".into()),
            match_labels: None,
            repeat: Duration::from_secs(repeat_s),
        }
    }

    /// Evaluates `rule` on the virtual clock: `cpu` per second for node n1
    /// (memory stays at 95), returning every transition and notification.
    type Run = (
        Vec<(u64, Change)>,
        Vec<(u64, Notification)>,
        BTreeMap<String, Instance>,
    );

    fn run(rule: &AlertRule, cpu: &[Option<f64>], silences: &[Silence]) -> Run {
        let mut active = BTreeMap::new();
        let (mut changes, mut sent) = (Vec::new(), Vec::new());
        let node_labels = BTreeMap::from([("node".to_string(), "n1".to_string())]);
        for (i, c) in cpu.iter().enumerate() {
            let now = i as u64 * 1000;
            let truth = rule.expr.eval(&mut |v, _| match v.metric.as_str() {
                "cpu_percent" => *c,
                _ => Some(95.0),
            });
            let obs = Observation {
                subject: "n1",
                labels: &node_labels,
                truth,
                value: *c,
            };
            let mut s = step(now, rule, std::mem::take(&mut active), &[obs], false);
            for n in plan(now, rule, &[channel(10)], &mut s, silences) {
                sent.push((now, n));
            }
            changes.extend(s.transitions.iter().map(|t| (now, t.change)));
            active = s.active;
        }
        (changes, sent, active)
    }

    #[test]
    fn pending_then_firing_after_for_then_resolved() {
        let r = rule("");
        let mut cpu = vec![Some(95.0); 40];
        cpu.extend([Some(10.0)]);
        let (changes, sent, active) = run(&r, &cpu, &[]);
        assert_eq!(
            changes,
            vec![
                (0, Change::Pending),
                (30_000, Change::Firing),
                (40_000, Change::Resolved)
            ]
        );
        // Firing at 30 s, repeated at 40 s? No: 10 s after 30 s is 40 s, when it
        // resolved; the resolution is sent instead.
        let times: Vec<(u64, &str)> = sent.iter().map(|(t, n)| (*t, n.status.as_str())).collect();
        assert_eq!(times, vec![(30_000, "firing"), (40_000, "resolved")]);
        assert_eq!(sent[0].1.alerts[0].annotations["summary"], "n1 at 95");
        assert_eq!(sent[1].1.alerts[0].ends_ms, Some(40_000));
        assert!(active.is_empty());
    }

    #[test]
    fn a_flap_shorter_than_for_tells_nobody() {
        let r = rule("");
        let mut cpu = vec![Some(95.0); 10];
        cpu.push(Some(50.0));
        cpu.extend(vec![Some(95.0); 10]);
        let (changes, sent, _) = run(&r, &cpu, &[]);
        assert_eq!(
            changes,
            vec![
                (0, Change::Pending),
                (10_000, Change::Cleared),
                (11_000, Change::Pending)
            ]
        );
        assert!(sent.is_empty());
    }

    #[test]
    fn repeats_until_acknowledged() {
        let r = rule("");
        let (_, sent, _) = run(&r, &vec![Some(95.0); 55], &[]);
        let times: Vec<u64> = sent.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, vec![30_000, 40_000, 50_000]);
        // Acknowledged at 35 s: no repeats.
        let mut active = BTreeMap::new();
        let mut sends = Vec::new();
        for i in 0..55u64 {
            let obs = Observation {
                subject: "n1",
                labels: &NO_LABELS,
                truth: Some(true),
                value: Some(95.0),
            };
            let mut s = step(i * 1000, &r, std::mem::take(&mut active), &[obs], false);
            if i == 35 {
                s.active.get_mut("n1").expect("accepted").acked_by = Some("op".into());
            }
            sends.extend(
                plan(i * 1000, &r, &[channel(10)], &mut s, &[])
                    .into_iter()
                    .map(|_| i),
            );
            active = s.active;
        }
        assert_eq!(sends, vec![30]);
    }

    #[test]
    fn no_data_follows_the_rule() {
        let mut cpu = vec![Some(95.0); 31];
        cpu.extend(vec![None; 5]);
        let (changes, _, _) = run(&rule(""), &cpu, &[]);
        assert_eq!(changes.last(), Some(&(31_000, Change::Resolved)));
        let (changes, _, active) = run(&rule("  noData: keep\n"), &cpu, &[]);
        assert_eq!(changes.last(), Some(&(30_000, Change::Firing)));
        assert_eq!(active["n1"].state, State::Firing);
        // Just after a restart, missing data changes nothing.
        let r = rule("");
        let mut active = BTreeMap::new();
        for i in 0..31u64 {
            let obs = Observation {
                subject: "n1",
                labels: &NO_LABELS,
                truth: Some(true),
                value: Some(95.0),
            };
            active = step(i * 1000, &r, std::mem::take(&mut active), &[obs], false).active;
        }
        let missing = Observation {
            subject: "n1",
            labels: &NO_LABELS,
            truth: None,
            value: None,
        };
        let s = step(
            40_000,
            &r,
            active.clone(),
            std::slice::from_ref(&missing),
            true,
        );
        assert!(s.transitions.is_empty());
        assert_eq!(s.active["n1"].state, State::Firing);
        let s = step(40_000, &r, active, &[missing], false);
        assert_eq!(s.transitions[0].change, Change::Resolved);
        let (changes, _, _) = run(&rule("  noData: alerting\n"), &[None; 31], &[]);
        assert_eq!(
            changes,
            vec![(0, Change::Pending), (30_000, Change::Firing)]
        );
    }

    #[test]
    fn or_fires_on_either_side() {
        let y = "apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: either\nspec:\n  condition: node.cpu_percent > 90 or node.memory_percent > 90\n";
        let r = parse_rules("r.yaml", y).expect("accepted").remove(0);
        let truth = |cpu: f64, mem: Option<f64>| {
            r.expr.eval(&mut |v, _| {
                if v.metric == "cpu_percent" {
                    Some(cpu)
                } else {
                    mem
                }
            })
        };
        assert_eq!(truth(95.0, None), Some(true));
        assert_eq!(truth(5.0, Some(95.0)), Some(true));
        assert_eq!(truth(5.0, Some(5.0)), Some(false));
        // `for: 0`: firing at the first evaluation, with no pending step.
        let obs = Observation {
            subject: "n1",
            labels: &NO_LABELS,
            truth: truth(95.0, None),
            value: Some(95.0),
        };
        let s = step(0, &r, BTreeMap::new(), &[obs], false);
        assert_eq!(s.transitions.len(), 1);
        assert_eq!(s.transitions[0].change, Change::Firing);
    }

    #[test]
    fn silences_hold_messages_not_state() {
        let r = rule("");
        let silence = Silence {
            id: "s1".into(),
            matchers: BTreeMap::from([("node".into(), "n1".into())]),
            starts_ms: 0,
            ends_ms: 45_000,
            created_by: "op".into(),
            comment: "maintenance".into(),
        };
        let (changes, sent, _) = run(&r, &vec![Some(95.0); 50], &[silence]);
        assert!(changes.contains(&(30_000, Change::Firing)));
        // Sent once the silence ends, as newly firing there.
        let times: Vec<u64> = sent.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, vec![45_000]);
        let empty = Silence {
            id: "s2".into(),
            matchers: BTreeMap::new(),
            starts_ms: 0,
            ends_ms: u64::MAX,
            created_by: "op".into(),
            comment: String::new(),
        };
        assert!(
            !empty.covers(&BTreeMap::new(), 1),
            "an empty silence silences nothing"
        );
    }

    #[test]
    fn observations_in_any_order_meet_their_previous_alerts() {
        let y = "apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: up\nspec:\n  condition: node.up == 1\n";
        let r = parse_rules("r.yaml", y).expect("accepted").remove(0);
        let obs = |subject: &'static str, t: bool| Observation {
            subject,
            labels: &NO_LABELS,
            truth: Some(t),
            value: Some(1.0),
        };
        let first = step(
            0,
            &r,
            BTreeMap::new(),
            &[obs("c", true), obs("a", true), obs("b", true)],
            false,
        );
        assert_eq!(first.active.len(), 3);
        // Out of order again, b gone, a stops holding, c still holds.
        let s = step(
            1000,
            &r,
            first.active,
            &[obs("c", true), obs("a", false)],
            false,
        );
        let mut changes: Vec<(String, Change)> = s
            .transitions
            .iter()
            .map(|t| (t.subject.clone(), t.change))
            .collect();
        changes.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(
            changes,
            vec![
                ("a".to_string(), Change::Resolved),
                ("b".to_string(), Change::Resolved)
            ]
        );
        assert_eq!(s.active.keys().collect::<Vec<_>>(), vec!["c"]);
        assert_eq!(s.active["c"].active_since_ms, 0, "kept, not made anew");
    }

    #[test]
    fn a_subject_that_goes_away_resolves() {
        let r = rule("");
        let obs = |t| Observation {
            subject: "n1",
            labels: &NO_LABELS,
            truth: Some(t),
            value: Some(95.0),
        };
        let mut active = BTreeMap::new();
        for i in 0..31 {
            active = step(
                i * 1000,
                &r,
                std::mem::take(&mut active),
                &[obs(true)],
                false,
            )
            .active;
        }
        let s = step(32_000, &r, active, &[], false);
        assert_eq!(s.transitions[0].change, Change::Resolved);
        assert!(s.active.is_empty());
    }
}
