//! Alert rules as a Prometheus rule file (`promtool check rules` accepts it),
//! for teams that alert from Prometheus: each comparison becomes the PromQL of
//! its metric ([`super::catalog`]), `avg(m, 5m)` a subquery
//! `avg_over_time((m)[5m:])`, `and`/`or` PromQL's set operators on the same
//! labels, `for` and the labels and annotations as they are (templates in
//! Prometheus's syntax). A rule that reads a metric without a PromQL form is
//! left out and named.

use std::fmt::Write as _;

use super::catalog;
use super::expr::{Agg, Expr, ValueRef};
use super::rule::AlertRule;

/// The file's text and the rules left out with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// The rule file (YAML).
    pub text: String,
    /// `(rule, why)` for each rule not in it.
    pub skipped: Vec<(String, String)>,
}

/// Writes `rules` as one Prometheus rule group named `novacron`.
pub fn prometheus(rules: &[AlertRule]) -> Exported {
    let mut text = String::from(
        "# Written by `novacron alert export`: NovaCron's alert rules for Prometheus.\ngroups:\n  - name: novacron\n    rules:\n",
    );
    let mut skipped = Vec::new();
    let mut any = false;
    for r in rules {
        let expr = match promql(&r.expr) {
            Ok(e) => e,
            Err(why) => {
                skipped.push((r.name.clone(), why));
                continue;
            }
        };
        any = true;
        let _ = writeln!(text, "      - alert: {}", quote(&prom_name(&r.name)));
        let _ = writeln!(text, "        expr: {}", quote(&expr));
        if !r.for_.is_zero() {
            let _ = writeln!(text, "        for: {}s", r.for_.as_secs().max(1));
        }
        text.push_str("        labels:\n");
        for (k, v) in r.labels.iter().filter(|(k, _)| k.as_str() != "alertname") {
            let _ = writeln!(text, "          {k}: {}", quote(v));
        }
        if !r.annotations.is_empty() {
            text.push_str("        annotations:\n");
            for (k, v) in &r.annotations {
                let _ = writeln!(text, "          {k}: {}", quote(&prom_template(v)));
            }
        }
    }
    if !any {
        text.push_str("      []\n");
        text = text.replace("    rules:\n      []\n", "    rules: []\n");
    }
    Exported { text, skipped }
}

/// The PromQL of a condition.
pub fn promql(e: &Expr) -> Result<String, String> {
    match e {
        Expr::Cmp {
            value,
            op,
            threshold,
        } => Ok(format!(
            "({}) {} {threshold}",
            value_promql(value)?,
            op.symbol()
        )),
        Expr::And(parts) => join(parts, " and "),
        Expr::Or(parts) => join(parts, " or "),
    }
}

fn join(parts: &[Expr], sep: &str) -> Result<String, String> {
    let parts: Result<Vec<String>, String> = parts
        .iter()
        .map(|p| promql(p).map(|s| format!("({s})")))
        .collect();
    Ok(parts?.join(sep))
}

fn value_promql(v: &ValueRef) -> Result<String, String> {
    let m = catalog::find(v.subject, &v.metric)
        .ok_or_else(|| format!("{}.{} is not a known metric", v.subject, v.metric))?;
    let q = m.promql.ok_or_else(|| {
        format!(
            "{}.{} has no equivalent in the controller's /metrics",
            v.subject, v.metric
        )
    })?;
    Ok(match v.window {
        None => q.to_string(),
        Some((agg, w)) => {
            let f = match agg {
                Agg::Avg => "avg_over_time",
                Agg::Min => "min_over_time",
                Agg::Max => "max_over_time",
            };
            format!("{f}(({q})[{}s:])", w.as_secs().max(1))
        }
    })
}

/// `{{ subject }}` and `{{ value }}` in Prometheus's template syntax.
fn prom_template(t: &str) -> String {
    t.replace(
        "{{ subject }}",
        "{{ $labels.node }}{{ $labels.alloc }}{{ $labels.job }}",
    )
    .replace(
        "{{subject}}",
        "{{ $labels.node }}{{ $labels.alloc }}{{ $labels.job }}",
    )
    .replace("{{ value }}", "{{ $value }}")
    .replace("{{value}}", "{{ $value }}")
    .replace("{{ labels.", "{{ $labels.")
    .replace("{{ rule }}", "{{ $labels.alertname }}")
    .replace("{{ severity }}", "{{ $labels.severity }}")
}

/// A Prometheus alert name (`[a-zA-Z_][a-zA-Z0-9_]*` by convention).
fn prom_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// A YAML double-quoted string.
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c if c.is_control() => {
                let _ = write!(q, "\\u{:04x}", u32::from(c));
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::rule::{builtin_rules, parse_rules};

    #[test]
    fn rules_become_promql() {
        let y = "apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: node-hot\nspec:\n  condition: avg(node.cpu_percent, 5m) > 90 and node.memory_percent > 90\n  for: 5m\n  annotations:\n    summary: '{{ subject }} \"hot\" at {{ value }}'\n";
        let r = parse_rules("r.yaml", y).expect("accepted");
        let e = prometheus(&r);
        assert!(e.skipped.is_empty());
        assert!(
            e.text.contains(
                "expr: \"((avg_over_time((novacron_node_cpu_usage_ratio * 100)[300s:])) > 90) and ((novacron_node_memory_used_bytes / novacron_node_memory_total_bytes * 100) > 90)\""
            ),
            "{}",
            e.text
        );
        assert!(e.text.contains("for: 300s"));
        assert!(e.text.contains("{{ $value }}"));
        assert!(e.text.contains("\\\"hot\\\""));
    }

    #[test]
    fn rules_without_promql_are_named() {
        let e = prometheus(&builtin_rules());
        let names: Vec<&str> = e.skipped.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec!["builtin-migration-failed", "builtin-budget-exceeded"]
        );
        assert!(e.text.contains("alert: \"builtin_node_down\""));
    }
}
