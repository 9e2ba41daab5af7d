//! Alert conditions: `node.cpu_percent > 90 and avg(node.memory_percent, 5m) > 90`.
//!
//! ```text
//! expr  := and ("or" and)*
//! and   := atom ("and" atom)*
//! atom  := "(" expr ")" | value op number
//! value := metric | ("avg" | "min" | "max") "(" metric "," duration ")"
//! op    := > | >= | < | <= | == | !=
//! ```
//!
//! `and` binds tighter than `or`; keywords are case-insensitive (`AND`, `OR`).
//! Every metric is `subject.name` with a subject of [`Subject`]; a condition
//! speaks of one subject (plus `fleet.` values, which are the same for every
//! subject). The parse is bounded ([`MAX_LEN`], [`MAX_DEPTH`], [`MAX_TERMS`]), so
//! a hostile condition gets an error, never a deep recursion.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest condition, in bytes.
pub const MAX_LEN: usize = 4096;
/// The deepest nesting of parentheses.
pub const MAX_DEPTH: usize = 16;
/// The most comparisons in one condition.
pub const MAX_TERMS: usize = 64;
/// The longest window of `avg`, `min` and `max`.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// What an alert is about; each firing alert is one subject of its rule's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Subject {
    /// A node (`node.cpu_percent`).
    Node,
    /// An allocation (`alloc.cpu_percent`).
    Alloc,
    /// A job (`job.cost_per_hour`).
    Job,
    /// A node pool (`pool.cost_per_hour`).
    Pool,
    /// A migration (`migration.failed`).
    Migration,
    /// The whole fleet, one subject (`fleet.cost_per_hour`).
    Fleet,
}

impl Subject {
    /// Every subject, as written in conditions.
    pub const ALL: [Subject; 6] = [
        Subject::Node,
        Subject::Alloc,
        Subject::Job,
        Subject::Pool,
        Subject::Migration,
        Subject::Fleet,
    ];

    /// Its prefix in conditions.
    pub fn name(self) -> &'static str {
        match self {
            Subject::Node => "node",
            Subject::Alloc => "alloc",
            Subject::Job => "job",
            Subject::Pool => "pool",
            Subject::Migration => "migration",
            Subject::Fleet => "fleet",
        }
    }

    fn from_name(s: &str) -> Option<Subject> {
        Subject::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a window of points becomes one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Agg {
    /// The mean.
    Avg,
    /// The smallest.
    Min,
    /// The largest.
    Max,
}

impl Agg {
    fn name(self) -> &'static str {
        match self {
            Agg::Avg => "avg",
            Agg::Min => "min",
            Agg::Max => "max",
        }
    }
}

/// One value a condition reads: a metric now, or aggregated over a window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValueRef {
    /// Whose metric.
    pub subject: Subject,
    /// The metric's name after the subject: `cpu_percent`.
    pub metric: String,
    /// `None`: the newest value; else the aggregate over the window.
    pub window: Option<(Agg, Duration)>,
}

impl fmt::Display for ValueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.window {
            None => write!(f, "{}.{}", self.subject, self.metric),
            Some((agg, w)) => write!(
                f,
                "{}({}.{}, {})",
                agg.name(),
                self.subject,
                self.metric,
                crate::units::duration(w)
            ),
        }
    }
}

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `==`
    Eq,
    /// `!=`
    Ne,
}

impl Op {
    /// As written.
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }

    /// Whether `value op threshold` holds.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Gt => value > threshold,
            Op::Ge => value >= threshold,
            Op::Lt => value < threshold,
            Op::Le => value <= threshold,
            Op::Eq => value == threshold,
            Op::Ne => value != threshold,
        }
    }
}

/// A parsed condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Expr {
    /// `value op threshold`.
    Cmp {
        /// What is compared.
        value: ValueRef,
        /// How.
        op: Op,
        /// With what.
        threshold: f64,
    },
    /// Every part holds.
    And(Vec<Expr>),
    /// Some part holds.
    Or(Vec<Expr>),
}

/// The outcome of a condition for one subject: `None` when a value it needs is
/// missing and the rest does not decide it.
pub type Truth = Option<bool>;

impl Expr {
    /// Evaluates with `value` giving each comparison's value (`None`: no data);
    /// it is told the comparison, so a metric with several series (one per
    /// disk) can answer the one that decides it.
    /// `and` is false as soon as one part is false and unknown when a part is
    /// unknown and none is false; `or` the other way round (Kleene's logic).
    pub fn eval(&self, value: &mut dyn FnMut(&ValueRef, Op) -> Option<f64>) -> Truth {
        match self {
            Expr::Cmp {
                value: v,
                op,
                threshold,
            } => value(v, *op).map(|x| op.holds(x, *threshold)),
            Expr::And(parts) => {
                let mut unknown = false;
                for p in parts {
                    match p.eval(value) {
                        Some(false) => return Some(false),
                        None => unknown = true,
                        Some(true) => {}
                    }
                }
                if unknown { None } else { Some(true) }
            }
            Expr::Or(parts) => {
                let mut unknown = false;
                for p in parts {
                    match p.eval(value) {
                        Some(true) => return Some(true),
                        None => unknown = true,
                        Some(false) => {}
                    }
                }
                if unknown { None } else { Some(false) }
            }
        }
    }

    /// Every value the condition reads, in order, without repeats.
    pub fn values(&self) -> Vec<&ValueRef> {
        let mut out: Vec<&ValueRef> = Vec::new();
        self.walk(&mut |v, _, _| {
            if !out.contains(&v) {
                out.push(v);
            }
        });
        out
    }

    /// Calls `f` on every comparison.
    pub fn walk<'a>(&'a self, f: &mut dyn FnMut(&'a ValueRef, Op, f64)) {
        match self {
            Expr::Cmp {
                value,
                op,
                threshold,
            } => f(value, *op, *threshold),
            Expr::And(parts) | Expr::Or(parts) => parts.iter().for_each(|p| p.walk(f)),
        }
    }

    /// The subject the condition speaks of: the one non-fleet subject of its
    /// values, or [`Subject::Fleet`] when it reads only fleet values.
    pub fn subject(&self) -> Result<Subject, String> {
        let mut kinds: Vec<Subject> = Vec::new();
        self.walk(&mut |v, _, _| {
            if v.subject != Subject::Fleet && !kinds.contains(&v.subject) {
                kinds.push(v.subject);
            }
        });
        match kinds.as_slice() {
            [] => Ok(Subject::Fleet),
            [one] => Ok(*one),
            many => Err(format!(
                "the condition reads {} values; one rule speaks of one subject (plus fleet values), so split it into one rule per subject",
                many.iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Cmp {
                value,
                op,
                threshold,
            } => write!(f, "{value} {} {threshold}", op.symbol()),
            Expr::And(parts) => join(f, parts, " and ", false),
            Expr::Or(parts) => join(f, parts, " or ", true),
        }
    }
}

fn join(f: &mut fmt::Formatter<'_>, parts: &[Expr], sep: &str, or: bool) -> fmt::Result {
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            f.write_str(sep)?;
        }
        // An `or` inside an `and` needs parentheses to read back the same.
        let paren = !or && matches!(p, Expr::Or(_));
        if paren {
            write!(f, "({p})")?;
        } else {
            write!(f, "{p}")?;
        }
    }
    Ok(())
}

/// Parses a condition; the error says where and what is expected.
pub fn parse(text: &str) -> Result<Expr, String> {
    if text.len() > MAX_LEN {
        return Err(format!(
            "the condition is {} bytes; the limit is {MAX_LEN}",
            text.len()
        ));
    }
    let tokens = lex(text)?;
    if tokens.is_empty() {
        return Err("the condition is empty; write one like `node.cpu_percent > 90`".into());
    }
    let mut p = Parser {
        tokens,
        pos: 0,
        depth: 0,
        terms: 0,
    };
    let e = p.or()?;
    if let Some(t) = p.tokens.get(p.pos) {
        return Err(format!(
            "unexpected {} at character {}; expected `and`, `or` or the end",
            t.tok, t.at
        ));
    }
    Ok(e)
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Num(f64),
    Dur(Duration),
    Op(Op),
    Open,
    Close,
    Comma,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Num(n) => write!(f, "`{n}`"),
            Tok::Dur(d) => write!(f, "`{}`", crate::units::duration(*d)),
            Tok::Op(o) => write!(f, "`{}`", o.symbol()),
            Tok::Open => f.write_str("`(`"),
            Tok::Close => f.write_str("`)`"),
            Tok::Comma => f.write_str("`,`"),
        }
    }
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// 1-based character position.
    at: usize,
}

fn lex(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let at = i + 1;
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let two: String = chars[i..chars.len().min(i + 2)].iter().collect();
        let op = match two.as_str() {
            ">=" => Some((Op::Ge, 2)),
            "<=" => Some((Op::Le, 2)),
            "==" => Some((Op::Eq, 2)),
            "!=" => Some((Op::Ne, 2)),
            _ => match c {
                '>' => Some((Op::Gt, 1)),
                '<' => Some((Op::Lt, 1)),
                _ => None,
            },
        };
        if let Some((op, n)) = op {
            out.push(Token {
                tok: Tok::Op(op),
                at,
            });
            i += n;
            continue;
        }
        match c {
            '(' => out.push(Token { tok: Tok::Open, at }),
            ')' => out.push(Token {
                tok: Tok::Close,
                at,
            }),
            ',' => out.push(Token {
                tok: Tok::Comma,
                at,
            }),
            _ => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '.' | '-'))
                {
                    // A `-` only leads a number.
                    if chars[i] == '-' && i != start {
                        break;
                    }
                    i += 1;
                }
                if i == start {
                    return Err(format!(
                        "unexpected {c:?} at character {at}; a condition holds metrics, numbers, durations, comparisons, `and`, `or` and parentheses"
                    ));
                }
                let word: String = chars[start..i].iter().collect();
                out.push(Token {
                    tok: word_token(&word, at)?,
                    at,
                });
                continue;
            }
        }
        i += 1;
    }
    Ok(out)
}

fn word_token(word: &str, at: usize) -> Result<Tok, String> {
    let first = word.chars().next().unwrap_or('x');
    if first.is_ascii_digit() || first == '-' || first == '.' {
        if let Ok(n) = word.parse::<f64>() {
            if !n.is_finite() {
                return Err(format!("{word} at character {at} is not a finite number"));
            }
            return Ok(Tok::Num(n));
        }
        return humantime::parse_duration(word).map(Tok::Dur).map_err(|_| {
            format!(
                "{word:?} at character {at} is neither a number (90, 0.5) nor a duration (30s, 5m)"
            )
        });
    }
    Ok(Tok::Ident(word.to_string()))
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
    terms: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|t| &t.tok)
    }

    fn keyword(&self, k: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(k))
    }

    fn next(&mut self, expected: &str) -> Result<Token, String> {
        let t = self
            .tokens
            .get(self.pos)
            .cloned()
            .ok_or_else(|| format!("the condition ends where {expected} is expected"))?;
        self.pos += 1;
        Ok(t)
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut parts = vec![self.and()?];
        while self.keyword("or") {
            self.pos += 1;
            parts.push(self.and()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Expr::Or(parts)
        })
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut parts = vec![self.atom()?];
        while self.keyword("and") {
            self.pos += 1;
            parts.push(self.atom()?);
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            Expr::And(parts)
        })
    }

    fn atom(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(&Tok::Open) {
            let open = self.next("`(`")?;
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(format!(
                    "parentheses nest deeper than {MAX_DEPTH} at character {}",
                    open.at
                ));
            }
            let e = self.or()?;
            let close = self.next("`)`")?;
            if close.tok != Tok::Close {
                return Err(format!(
                    "expected `)` at character {} to close the `(` at character {}, found {}",
                    close.at, open.at, close.tok
                ));
            }
            self.depth -= 1;
            return Ok(e);
        }
        let value = self.value()?;
        let op = self.next("a comparison (>, >=, <, <=, ==, !=)")?;
        let Tok::Op(op) = op.tok else {
            return Err(format!(
                "expected a comparison (>, >=, <, <=, ==, !=) at character {}, found {}",
                op.at, op.tok
            ));
        };
        let n = self.next("a number")?;
        let Tok::Num(threshold) = n.tok else {
            return Err(format!(
                "expected a number at character {}, found {}",
                n.at, n.tok
            ));
        };
        self.terms += 1;
        if self.terms > MAX_TERMS {
            return Err(format!(
                "the condition has more than {MAX_TERMS} comparisons"
            ));
        }
        Ok(Expr::Cmp {
            value,
            op,
            threshold,
        })
    }

    fn value(&mut self) -> Result<ValueRef, String> {
        let t = self.next("a metric such as node.cpu_percent")?;
        let Tok::Ident(word) = t.tok else {
            return Err(format!(
                "expected a metric such as node.cpu_percent at character {}, found {}",
                t.at, t.tok
            ));
        };
        let agg = match word.to_ascii_lowercase().as_str() {
            "avg" => Some(Agg::Avg),
            "min" => Some(Agg::Min),
            "max" => Some(Agg::Max),
            _ => None,
        };
        let Some(agg) = agg else {
            let (subject, metric) = metric(&word, t.at)?;
            return Ok(ValueRef {
                subject,
                metric,
                window: None,
            });
        };
        let open = self.next("`(`")?;
        if open.tok != Tok::Open {
            return Err(format!(
                "expected `(` after {word} at character {}, as in {word}(node.cpu_percent, 5m)",
                open.at
            ));
        }
        let m = self.next("a metric")?;
        let Tok::Ident(name) = m.tok else {
            return Err(format!(
                "expected a metric at character {}, found {}",
                m.at, m.tok
            ));
        };
        let (subject, metric) = metric(&name, m.at)?;
        let comma = self.next("`,`")?;
        if comma.tok != Tok::Comma {
            return Err(format!(
                "expected `,` and a window at character {}, as in {word}({name}, 5m)",
                comma.at
            ));
        }
        let d = self.next("a window such as 5m")?;
        let window = match d.tok {
            Tok::Dur(w) => w,
            Tok::Num(0.0) => Duration::ZERO,
            other => {
                return Err(format!(
                    "expected a window such as 5m at character {}, found {other}",
                    d.at
                ));
            }
        };
        if window.is_zero() || window > MAX_WINDOW {
            return Err(format!(
                "the window at character {} must be more than 0 and at most 24h",
                d.at
            ));
        }
        let close = self.next("`)`")?;
        if close.tok != Tok::Close {
            return Err(format!(
                "expected `)` at character {}, found {}",
                close.at, close.tok
            ));
        }
        Ok(ValueRef {
            subject,
            metric,
            window: Some((agg, window)),
        })
    }
}

fn metric(word: &str, at: usize) -> Result<(Subject, String), String> {
    let Some((subject, name)) = word.split_once('.') else {
        return Err(format!(
            "{word:?} at character {at} is not a metric; write subject.metric, e.g. node.cpu_percent (subjects: {})",
            subjects()
        ));
    };
    let Some(subject) = Subject::from_name(subject) else {
        return Err(format!(
            "{subject:?} at character {at} is not a subject; expected one of {}",
            subjects()
        ));
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(format!(
            "{name:?} at character {at} is not a metric name; expected lowercase letters, digits and _"
        ));
    }
    Ok((subject, name.to_string()))
}

fn subjects() -> String {
    Subject::ALL
        .iter()
        .map(|s| s.name())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(subject: Subject, metric: &str) -> ValueRef {
        ValueRef {
            subject,
            metric: metric.into(),
            window: None,
        }
    }

    #[test]
    fn and_binds_tighter_than_or_and_reads_back() {
        let e = parse("node.cpu_percent > 90 AND node.memory_percent >= 90 or node.up == 0")
            .expect("accepted");
        let Expr::Or(parts) = &e else { panic!("{e:?}") };
        assert!(matches!(parts[0], Expr::And(_)));
        assert_eq!(
            e.to_string(),
            "node.cpu_percent > 90 and node.memory_percent >= 90 or node.up == 0"
        );
        let p =
            parse("node.up == 0 and (node.cpu_percent > 1 or node.load1 > 2)").expect("accepted");
        assert_eq!(parse(&p.to_string()).expect("accepted"), p);
        assert_eq!(p.subject(), Ok(Subject::Node));
    }

    #[test]
    fn windows_parse() {
        let e = parse("avg(alloc.cpu_percent, 5m) > 80").expect("accepted");
        assert_eq!(
            e.values()[0].window,
            Some((Agg::Avg, Duration::from_secs(300)))
        );
        assert_eq!(e.to_string(), "avg(alloc.cpu_percent, 5m) > 80");
        assert!(
            parse("avg(alloc.cpu_percent, 0) > 80")
                .expect_err("refused")
                .contains("more than 0")
        );
        assert!(parse("avg(alloc.cpu_percent, 48h) > 1").is_err());
    }

    #[test]
    fn errors_say_where_and_what() {
        assert!(parse("").expect_err("refused").contains("empty"));
        assert!(
            parse("cpu > 90")
                .expect_err("refused")
                .contains("subject.metric")
        );
        assert!(
            parse("host.cpu > 90")
                .expect_err("refused")
                .contains("not a subject")
        );
        assert!(
            parse("node.cpu_percent >")
                .expect_err("refused")
                .contains("ends where a number")
        );
        assert!(
            parse("node.cpu_percent 90")
                .expect_err("refused")
                .contains("character 18")
        );
        assert!(
            parse("node.cpu_percent > 90 node")
                .expect_err("refused")
                .contains("end")
        );
        assert!(
            parse("node.a > 1 ; x")
                .expect_err("refused")
                .contains("';'")
        );
        assert!(
            parse("node.cpu_percent > 1 and alloc.cpu_percent > 1")
                .expect("accepted")
                .subject()
                .expect_err("refused")
                .contains("one subject")
        );
    }

    #[test]
    fn hostile_input_is_bounded() {
        let deep = format!("{}node.a > 1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(parse(&deep).expect_err("refused").contains("limit"));
        let deep = format!("{}node.a > 1{}", "(".repeat(40), ")".repeat(40));
        assert!(parse(&deep).expect_err("refused").contains("deeper"));
        let many = vec!["node.a > 1"; 65].join(" or ");
        assert!(parse(&many).expect_err("refused").contains("64"));
        assert!(
            parse("node.a > 1e999")
                .expect_err("refused")
                .contains("finite")
        );
    }

    #[test]
    fn kleene_logic_on_missing_values() {
        let e = parse("node.a > 1 and node.b > 1").expect("accepted");
        let eval = |a: Option<f64>, b: Option<f64>| {
            e.eval(&mut |r, _| if r.metric == "a" { a } else { b })
        };
        assert_eq!(eval(Some(2.0), Some(2.0)), Some(true));
        assert_eq!(eval(Some(0.0), None), Some(false));
        assert_eq!(eval(Some(2.0), None), None);
        let o = parse("node.a > 1 or node.b > 1").expect("accepted");
        let eval = |a: Option<f64>, b: Option<f64>| {
            o.eval(&mut |r, _| if r.metric == "a" { a } else { b })
        };
        assert_eq!(eval(Some(2.0), None), Some(true));
        assert_eq!(eval(Some(0.0), None), None);
        assert_eq!(eval(Some(0.0), Some(0.0)), Some(false));
        assert_eq!(
            parse("fleet.cost_per_hour > 3").expect("accepted").values(),
            vec![&v(Subject::Fleet, "cost_per_hour")]
        );
    }
}
