//! Feeds arbitrary text to the manifest pre-scan and, when it passes, to the job
//! loader, as a hostile operator (or a compromised CI) would.
//!
//! Properties checked, for every input:
//! - `guard::check` never panics, and refuses or passes the same text the same way;
//! - text it passes parses (or fails with located errors) without panicking: the
//!   pre-scan's limits keep the parse small (libFuzzer's `-timeout` and
//!   `-rss_limit_mb` catch one that is not);
//! - a refusal names the file and a line within the text.

#![no_main]

use libfuzzer_sys::fuzz_target;
use novacron_core::manifest::{guard, parse_jobs};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let first = guard::check("fuzz.yaml", text);
    assert_eq!(first, guard::check("fuzz.yaml", text), "deterministic");
    match first {
        Ok(()) => {
            let _ = parse_jobs("fuzz.yaml", text);
        }
        Err(e) => {
            assert_eq!(e.file, "fuzz.yaml");
            let lines = text.split('\n').count();
            assert!(e.line.is_some_and(|l| l >= 1 && l <= lines), "{e}");
        }
    }
});
