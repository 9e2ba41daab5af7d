//! Allocation usage from raw container counters. Pure; the caller passes `now`.
//!
//! A [`UsageTracker`] keeps the last reading of each container. Rates (CPU, network)
//! are deltas between two readings; the first reading of a container gives 0. To
//! keep a reading per second cheap for tens of containers,
//! [`UsageTracker::due`] picks which containers to read again: those never read,
//! then those whose reading is oldest, at most a few per call and none read very
//! recently; the others keep their last values.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use novacron_common::wire::AllocationUsage;

use super::StatsReading;

/// Usage of one container, as last computed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// CPU, percent of one core.
    pub cpu_percent: f32,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Receive rate, bytes per second.
    pub rx_bytes_per_sec: u64,
    /// Transmit rate, bytes per second.
    pub tx_bytes_per_sec: u64,
}

/// The last reading and usage of each container.
#[derive(Debug, Default)]
pub struct UsageTracker {
    entries: HashMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    reading: StatsReading,
    at: Instant,
    usage: Usage,
}

impl UsageTracker {
    /// Which of `containers` to read again at `now`: never-read ones first, then the
    /// oldest readings, leaving out those read less than `3/4 × refresh` ago; at most
    /// `max`.
    pub fn due(
        &self,
        now: Instant,
        containers: &[String],
        refresh: Duration,
        max: usize,
    ) -> Vec<String> {
        let fresh_enough = refresh.mul_f32(0.75);
        let mut due: Vec<(Option<Instant>, &String)> = containers
            .iter()
            .filter_map(|id| match self.entries.get(id) {
                None => Some((None, id)),
                Some(e) if now.saturating_duration_since(e.at) >= fresh_enough => {
                    Some((Some(e.at), id))
                }
                Some(_) => None,
            })
            .collect();
        // `None` (never read) sorts first, then the oldest.
        due.sort();
        due.into_iter()
            .take(max)
            .map(|(_, id)| id.clone())
            .collect()
    }

    /// Takes in a reading of `container` made at `at`.
    pub fn record(&mut self, container: &str, reading: StatsReading, at: Instant) {
        let usage = match self.entries.get(container) {
            Some(prev) => rates(&prev.reading, prev.at, &reading, at),
            None => Usage {
                memory_bytes: reading.memory_bytes,
                ..Usage::default()
            },
        };
        self.entries
            .insert(container.to_owned(), Entry { reading, at, usage });
    }

    /// Forgets every container not in `containers`.
    pub fn retain(&mut self, containers: &[String]) {
        self.entries
            .retain(|id, _| containers.iter().any(|c| c == id));
    }

    /// The usage of `container` as an allocation's, when it has been read.
    pub fn usage(
        &self,
        alloc: &str,
        container: &str,
        memory_limit_bytes: u64,
    ) -> Option<AllocationUsage> {
        let u = self.entries.get(container)?.usage;
        Some(AllocationUsage {
            id: alloc.to_owned(),
            cpu_percent: u.cpu_percent,
            memory_bytes: u.memory_bytes,
            memory_limit_bytes,
            rx_bytes_per_sec: u.rx_bytes_per_sec,
            tx_bytes_per_sec: u.tx_bytes_per_sec,
        })
    }
}

/// Usage between two readings.
///
/// CPU is Docker's formula when both readings carry the host's CPU time
/// (`container delta / host delta × online cpus × 100`), otherwise the container's
/// CPU time over the wall time between the readings. Either way, 100 is one core.
pub fn rates(prev: &StatsReading, prev_at: Instant, cur: &StatsReading, at: Instant) -> Usage {
    let wall = at.saturating_duration_since(prev_at);
    let cpu_delta = cur.cpu_total_ns.saturating_sub(prev.cpu_total_ns) as f64;
    let cpu_percent = match (prev.system_cpu_ns, cur.system_cpu_ns) {
        (Some(p), Some(c)) if c > p && cur.online_cpus > 0 => {
            cpu_delta / (c - p) as f64 * f64::from(cur.online_cpus) * 100.0
        }
        _ if !wall.is_zero() => cpu_delta / wall.as_nanos() as f64 * 100.0,
        _ => 0.0,
    };
    let per_sec = |before: u64, after: u64| -> u64 {
        if wall.is_zero() {
            0
        } else {
            (after.saturating_sub(before) as f64 / wall.as_secs_f64()) as u64
        }
    };
    Usage {
        cpu_percent: cpu_percent as f32,
        memory_bytes: cur.memory_bytes,
        rx_bytes_per_sec: per_sec(prev.rx_bytes, cur.rx_bytes),
        tx_bytes_per_sec: per_sec(prev.tx_bytes, cur.tx_bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(cpu: u64, system: Option<u64>, rx: u64, tx: u64) -> StatsReading {
        StatsReading {
            cpu_total_ns: cpu,
            system_cpu_ns: system,
            online_cpus: 4,
            memory_bytes: 10 << 20,
            rx_bytes: rx,
            tx_bytes: tx,
        }
    }

    #[test]
    fn docker_formula_and_wall_clock_fallback_agree_on_one_core() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        // One core busy for 1 s on a 4-core host: the host's CPU time grew by 4 s.
        let u = rates(
            &reading(0, Some(0), 0, 0),
            t0,
            &reading(1_000_000_000, Some(4_000_000_000), 1000, 500),
            t1,
        );
        assert!((u.cpu_percent - 100.0).abs() < 0.01, "{}", u.cpu_percent);
        assert_eq!((u.rx_bytes_per_sec, u.tx_bytes_per_sec), (1000, 500));
        let u = rates(
            &reading(0, None, 0, 0),
            t0,
            &reading(500_000_000, None, 0, 0),
            t1,
        );
        assert!((u.cpu_percent - 50.0).abs() < 0.01, "{}", u.cpu_percent);
        assert_eq!(u.memory_bytes, 10 << 20);
    }

    #[test]
    fn counters_going_back_give_zero_not_garbage() {
        let t0 = Instant::now();
        let u = rates(
            &reading(100, Some(100), 100, 100),
            t0,
            &reading(50, Some(50), 10, 10),
            t0 + Duration::from_secs(1),
        );
        assert_eq!(u.cpu_percent, 0.0);
        assert_eq!((u.rx_bytes_per_sec, u.tx_bytes_per_sec), (0, 0));
    }

    #[test]
    fn first_reading_has_memory_and_no_rates() {
        let mut t = UsageTracker::default();
        let now = Instant::now();
        t.record("c", reading(5, Some(5), 5, 5), now);
        let u = t.usage("a", "c", 7).expect("read");
        assert_eq!(u.id, "a");
        assert_eq!(u.memory_bytes, 10 << 20);
        assert_eq!(u.memory_limit_bytes, 7);
        assert_eq!(u.cpu_percent, 0.0);
        assert_eq!(t.usage("a", "other", 0), None);
    }

    #[test]
    fn due_spreads_readings() {
        let mut t = UsageTracker::default();
        let t0 = Instant::now();
        let ids: Vec<String> = (0..4).map(|i| format!("c{i}")).collect();
        let refresh = Duration::from_secs(1);
        assert_eq!(t.due(t0, &ids, refresh, 2), vec!["c0", "c1"]);
        t.record("c0", reading(0, None, 0, 0), t0);
        t.record("c1", reading(0, None, 0, 0), t0 + Duration::from_millis(10));
        // Never-read ones first; fresh ones are left out.
        assert_eq!(t.due(t0, &ids, refresh, 8), vec!["c2", "c3"]);
        t.record("c2", reading(0, None, 0, 0), t0);
        t.record("c3", reading(0, None, 0, 0), t0);
        let later = t0 + Duration::from_millis(800);
        assert_eq!(t.due(later, &ids, refresh, 1).len(), 1);
        assert_eq!(t.due(later, &ids, refresh, 8).len(), 4);
        t.retain(&ids[..1]);
        assert_eq!(t.due(later, &ids, refresh, 8), vec!["c1", "c2", "c3", "c0"]);
    }
}
