//! Cron expressions, the one parser schedules use (the autoscaler's schedules and a
//! job's lifecycle rules alike), with errors in our words.

use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// Parses a 5-field cron expression (UTC), with an error in our words.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    const ACCEPTED: &str = "a 5-field cron expression: minute hour day-of-month month \
                            day-of-week, like 0 8 * * 1-5";
    let fields = expr.split_whitespace().count();
    if fields != 5 {
        return Err(format!("{expr:?} has {fields} fields; expected {ACCEPTED}"));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
        .map_err(|e| format!("{expr:?} is not a cron expression ({e}); expected {ACCEPTED}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cron_needs_five_fields() {
        assert!(parse_cron("0 8 * * 1-5").is_ok());
        let e = parse_cron("0 0 8 * * 1-5").expect_err("six fields");
        assert!(e.contains("has 6 fields"), "{e}");
        let e = parse_cron("61 8 * * *").expect_err("minute 61");
        assert!(e.contains("is not a cron expression"), "{e}");
        assert!(e.contains("like 0 8 * * 1-5"), "{e}");
    }
}
