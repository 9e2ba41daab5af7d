//! Pre-copy planning for runc live migration (issue 14), pure. While the
//! source serves, CRIU's `pre-dump` rounds (`--track-mem`, each with
//! `--prev-images-dir` of the one before) copy the memory, then only what was
//! dirtied since; the freeze then dumps the last delta. After each round,
//! [`next`] decides from the rounds so far whether another one is worth it or
//! the source freezes now, and how the rest moves: stop-copy of the last
//! delta, or post-copy of it (the two combined) where the rounds do not
//! converge and both nodes have lazy pages.
//!
//! **Not run yet.** The kernels of the machines this was built on lack
//! soft-dirty tracking (`criu check --feature mem_dirty_track`: "Dirty
//! tracking is OFF"), so no agent runs pre-dump rounds and [`super::plan_copy`]
//! never chooses pre-copy; these decisions are proven by their unit tests
//! only, as the issue asks, ready for the executor on a kernel that tracks.

use std::time::Duration;

/// One pre-dump round as the source reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Bytes of pages it wrote (the whole resident memory for the first; what
    /// was dirtied since the round before for the others).
    pub bytes: u64,
    /// How long it took, the copy to the target included.
    pub elapsed: Duration,
}

/// The bounds of a pre-copy migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// The freeze the operator accepts: the final delta must move within it.
    pub downtime: Duration,
    /// The most rounds (the first, full one included).
    pub max_rounds: usize,
    /// A round must shrink the delta by at least this share of the one before
    /// (0.2: to 80 % or less), or memory is dirtied about as fast as it moves.
    pub min_shrink: f64,
    /// The longest the rounds may take altogether.
    pub max_total: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            downtime: Duration::from_millis(300),
            max_rounds: 8,
            min_shrink: 0.2,
            max_total: Duration::from_secs(120),
        }
    }
}

/// How the rest moves once the source freezes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The last delta is dumped and copied inside the freeze.
    StopCopy,
    /// The freeze dumps everything but the pages; the target fetches the last
    /// delta's pages on demand (lazy pages), so the freeze stays short even
    /// though the rounds did not converge.
    PostCopy,
}

/// Why the rounds end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The expected last delta moves within the downtime.
    Converged,
    /// The delta no longer shrinks enough.
    NotShrinking,
    /// [`Limits::max_rounds`] rounds ran.
    RoundsUsedUp,
    /// [`Limits::max_total`] passed.
    TimeUsedUp,
}

/// What to do after the rounds so far.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Run another pre-dump round while the source serves.
    Round,
    /// Freeze the source now.
    Freeze {
        /// How the rest moves.
        finish: Finish,
        /// Why now.
        why: Why,
    },
}

/// What the rounds so far say about the workload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Bytes per second the last round moved.
    pub bandwidth: f64,
    /// Bytes per second the workload dirties (the last round's delta over the
    /// round before's duration, in which it was dirtied); `None` after one
    /// round.
    pub dirty_rate: Option<f64>,
    /// The freeze the last delta would take now, at `bandwidth`.
    pub freeze: Option<Duration>,
}

/// The estimate after `rounds` (none before the first).
pub fn estimate(rounds: &[Round]) -> Option<Estimate> {
    let last = rounds.last()?;
    let bandwidth = last.bytes as f64 / last.elapsed.as_secs_f64().max(1e-3);
    let dirty_rate = rounds
        .len()
        .checked_sub(2)
        .map(|i| last.bytes as f64 / rounds[i].elapsed.as_secs_f64().max(1e-3));
    // What the next delta would hold: dirtied at `dirty_rate` while the last
    // round ran, moved at `bandwidth`.
    let freeze = dirty_rate.map(|d| {
        let bytes = d * last.elapsed.as_secs_f64();
        Duration::from_secs_f64((bytes / bandwidth.max(1.0)).min(86_400.0))
    });
    Some(Estimate {
        bandwidth,
        dirty_rate,
        freeze,
    })
}

/// What follows `rounds` (oldest first) under `limits`; `post_copy`: both
/// nodes have lazy pages, so a migration that does not converge may end in
/// post-copy instead of a long freeze.
pub fn next(rounds: &[Round], limits: &Limits, post_copy: bool) -> Next {
    let Some(est) = estimate(rounds) else {
        return Next::Round;
    };
    let total: Duration = rounds.iter().map(|r| r.elapsed).sum();
    let freeze = |why: Why, converged: bool| Next::Freeze {
        finish: if post_copy && !converged {
            Finish::PostCopy
        } else {
            Finish::StopCopy
        },
        why,
    };
    // The last delta already moves within the downtime (an idle workload, or
    // one small enough after the first round).
    let last = rounds[rounds.len() - 1];
    let last_freeze = Duration::from_secs_f64(last.bytes as f64 / est.bandwidth.max(1.0));
    if rounds.len() >= 2 && last_freeze <= limits.downtime {
        return freeze(Why::Converged, true);
    }
    if est.freeze.is_some_and(|f| f <= limits.downtime) {
        // One more round brings the delta within the downtime.
        return if rounds.len() < limits.max_rounds && total < limits.max_total {
            Next::Round
        } else {
            freeze(Why::Converged, true)
        };
    }
    if rounds.len() >= 2 {
        let before = rounds[rounds.len() - 2].bytes as f64;
        if last.bytes as f64 > before * (1.0 - limits.min_shrink) {
            return freeze(Why::NotShrinking, false);
        }
    }
    if rounds.len() >= limits.max_rounds {
        return freeze(Why::RoundsUsedUp, false);
    }
    if total >= limits.max_total {
        return freeze(Why::TimeUsedUp, false);
    }
    Next::Round
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn round(mib: u64, ms: u64) -> Round {
        Round {
            bytes: mib * MIB,
            elapsed: Duration::from_millis(ms),
        }
    }

    #[test]
    fn the_first_round_always_runs_and_the_second_measures_the_dirty_rate() {
        let limits = Limits::default();
        assert_eq!(next(&[], &limits, false), Next::Round);
        // After one round the dirty rate is unknown: another round measures it.
        assert_eq!(next(&[round(1024, 4000)], &limits, true), Next::Round);
        let e = estimate(&[round(1024, 4000), round(64, 250)]).expect("an estimate");
        assert!((e.bandwidth - 256.0 * MIB as f64).abs() < 1.0, "{e:?}");
        // 64 MiB dirtied during the 4 s first round: 16 MiB/s.
        let dirty = e.dirty_rate.expect("a dirty rate");
        assert!((dirty - 16.0 * MIB as f64).abs() < 1.0, "{e:?}");
    }

    #[test]
    fn an_idle_workload_freezes_after_its_second_round_with_stop_copy() {
        let limits = Limits::default();
        // 256 MiB/s; the second round found 8 MiB dirtied: a 31 ms freeze.
        let rounds = [round(1024, 4000), round(8, 31)];
        assert_eq!(
            next(&rounds, &limits, true),
            Next::Freeze {
                finish: Finish::StopCopy,
                why: Why::Converged
            }
        );
    }

    #[test]
    fn a_shrinking_delta_runs_rounds_until_it_fits_the_downtime() {
        let limits = Limits::default();
        // 100 MiB/s, dirtying 20 MiB/s: each delta is a fifth of the one before.
        let mut rounds = vec![round(1000, 10_000)];
        let mut decisions = Vec::new();
        loop {
            let n = next(&rounds, &limits, false);
            decisions.push(n);
            if n != Next::Round {
                break;
            }
            let last = rounds.last().expect("a round");
            let bytes = last.elapsed.as_secs_f64() * 20.0; // MiB dirtied meanwhile
            rounds.push(round(bytes as u64, (bytes * 10.0) as u64));
            assert!(rounds.len() < 20, "never froze: {rounds:?}");
        }
        assert_eq!(
            decisions.last(),
            Some(&Next::Freeze {
                finish: Finish::StopCopy,
                why: Why::Converged
            })
        );
        // 1000 → 200 → 40 MiB (400 ms) → 8 MiB (80 ms): four rounds.
        assert_eq!(rounds.len(), 4, "{rounds:?}");
    }

    #[test]
    fn memory_dirtied_as_fast_as_it_moves_ends_in_post_copy_where_both_can() {
        let limits = Limits::default();
        // 100 MiB/s moved, about 90 MiB/s dirtied: the delta barely shrinks.
        let rounds = [round(1000, 10_000), round(900, 9_000)];
        assert_eq!(
            next(&rounds, &limits, true),
            Next::Freeze {
                finish: Finish::PostCopy,
                why: Why::NotShrinking
            }
        );
        // Without lazy pages the rest is a long stop-copy: the operator asked
        // for a migration, which still happens.
        assert_eq!(
            next(&rounds, &limits, false),
            Next::Freeze {
                finish: Finish::StopCopy,
                why: Why::NotShrinking
            }
        );
    }

    #[test]
    fn rounds_and_time_are_bounded() {
        let few = Limits {
            max_rounds: 3,
            ..Limits::default()
        };
        // Shrinking by half each time, never within 300 ms at 10 MiB/s.
        let rounds = [round(800, 80_000), round(400, 40_000), round(200, 20_000)];
        assert_eq!(
            next(&rounds, &few, true),
            Next::Freeze {
                finish: Finish::PostCopy,
                why: Why::RoundsUsedUp
            }
        );
        let short = Limits {
            max_total: Duration::from_secs(60),
            ..Limits::default()
        };
        assert_eq!(
            next(&rounds[..2], &short, false),
            Next::Freeze {
                finish: Finish::StopCopy,
                why: Why::TimeUsedUp
            }
        );
        let long = Limits {
            max_total: Duration::from_secs(600),
            ..Limits::default()
        };
        assert_eq!(next(&rounds[..2], &long, false), Next::Round);
    }

    #[test]
    fn a_zero_length_round_does_not_divide_by_zero() {
        let rounds = [round(0, 0), round(0, 0)];
        assert!(matches!(
            next(&rounds, &Limits::default(), false),
            Next::Freeze {
                why: Why::Converged,
                ..
            }
        ));
    }
}
