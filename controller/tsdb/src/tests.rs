use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

const CPU: ColumnRef<'static> = ColumnRef {
    metric: "cpu_percent",
    label: "",
    encoding: Encoding::Int { scale: 0.01 },
};
const MEM: ColumnRef<'static> = ColumnRef {
    metric: "memory_used_bytes",
    label: "",
    encoding: Encoding::Int { scale: 1024.0 },
};

/// 2026-01-01T00:00:00Z, on an hour.
const T0: i64 = 1_767_225_600_000;

fn open(dir: &Path, f: impl FnOnce(&mut Config)) -> History {
    let mut c = Config::new(dir.to_owned());
    f(&mut c);
    History::open(c).expect("opens")
}

fn all(_: &str) -> bool {
    true
}

fn query(
    h: &History,
    metric: &str,
    from: i64,
    to: i64,
    step: i64,
    reduce: Reduce,
    now: i64,
) -> Answer {
    h.query(&Query {
        metric,
        sources: &all,
        from_ms: from,
        to_ms: to,
        step_ms: step,
        reduce,
        now_ms: now,
        tier: None,
        prefixes: None,
    })
    .expect("query")
}

/// Points of one series as a query at 1 ms steps gives them back.
fn points(a: &Answer, source: &str) -> Vec<(i64, f64)> {
    let s = a
        .series
        .iter()
        .find(|s| &*s.source == source)
        .expect("series");
    s.values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (a.from_ms + i as i64 * a.step_ms, v)))
        .collect()
}

fn cpu(i: i64) -> f64 {
    ((i * 37) % 10_000) as f64 / 100.0
}

fn fill(h: &History, source: &str, from: i64, n: i64, every: i64) {
    for i in 0..n {
        let t = from + i * every;
        h.append(
            source,
            t,
            &[CPU, MEM],
            &[cpu(i), (1 << 30) as f64 + (i * 4096) as f64],
        );
    }
}

fn wait_written(h: &History) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !h.inner.in_flight.lock().expect("lock").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer never caught up"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn points_come_back_from_head_and_disk_and_after_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |_| {});
    fill(&h, "n1", T0, 500, 1000);
    fill(&h, "n2", T0, 500, 1000);
    wait_written(&h);
    let s = h.stats();
    assert_eq!(s.head_sources, 2);
    assert!(s.disk_values > 0 && s.head_values > 0, "{s:?}");
    let now = T0 + 600_000;
    let want: Vec<(i64, f64)> = (0..500).map(|i| (T0 + i * 1000, cpu(i))).collect();
    let a = query(&h, "cpu_percent", T0, T0 + 499_000, 1000, Reduce::Last, now);
    assert_eq!(a.tiers, vec![Tier::Raw]);
    assert_eq!(a.series.len(), 2);
    assert_eq!(points(&a, "n1"), want);
    h.close();
    drop(h);
    let h = open(dir.path(), |_| {});
    let a = query(&h, "cpu_percent", T0, T0 + 499_000, 1000, Reduce::Last, now);
    assert_eq!(points(&a, "n2"), want, "history survives a restart");
    let m = query(
        &h,
        "memory_used_bytes",
        T0,
        T0 + 499_000,
        1000,
        Reduce::Last,
        now,
    );
    assert_eq!(
        points(&m, "n1")[499].1,
        (1u64 << 30) as f64 + (499 * 4096) as f64
    );
}

#[test]
fn a_torn_tail_loses_only_the_last_chunk_and_a_corrupt_chunk_is_skipped() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |c| c.chunk_points = 100);
    fill(&h, "n1", T0, 1000, 1000);
    h.close();
    drop(h);
    let file = dir.path().join("raw").join(format!("{T0}.seg"));
    let len = std::fs::metadata(&file).expect("file").len();
    // A crash in the middle of the last record's write.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .expect("open");
    f.set_len(len - 7).expect("truncate");
    drop(f);
    let now = T0 + 2 * HOUR_MS;
    let h = open(dir.path(), |_| {});
    let a = query(&h, "cpu_percent", T0, T0 + 999_000, 1000, Reduce::Last, now);
    let got = points(&a, "n1");
    assert_eq!(
        got.len(),
        900,
        "the torn chunk (100 points) is gone, the rest stays"
    );
    assert_eq!(got[899], (T0 + 899_000, cpu(899)));
    // Appending after the cut works.
    fill(&h, "n1", T0 + 1_000_000, 10, 1000);
    h.close();
    drop(h);
    // Flip a byte inside the second record: that chunk is skipped, with a count.
    let mut bytes = std::fs::read(&file).expect("read");
    let first_len = u32::from_le_bytes(bytes[0..4].try_into().expect("4")) as usize;
    let second = 8 + first_len;
    bytes[second + 8 + 40] ^= 0xff;
    std::fs::write(&file, &bytes).expect("write");
    let h = open(dir.path(), |_| {});
    assert_eq!(h.stats().corrupt_chunks, 1);
    let a = query(
        &h,
        "cpu_percent",
        T0,
        T0 + 1_009_000,
        1000,
        Reduce::Last,
        now,
    );
    assert_eq!(points(&a, "n1").len(), 810);
}

#[test]
fn rollups_answer_past_raw_retention_and_queries_join_the_tiers() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |c| c.raw_retention_ms = HOUR_MS);
    // Three hours at one point every 10 s.
    fill(&h, "n1", T0, 3 * 360, 10_000);
    let now = T0 + 3 * HOUR_MS + 10 * MINUTE_MS;
    wait_written(&h);
    h.maintain(now).expect("maintain");
    // Hour 0 and 1 rolled up; the hour that ended less than an hour ago keeps
    // its raw file, the older ones are past raw retention.
    let files = |t: &str| {
        let mut v: Vec<String> = std::fs::read_dir(dir.path().join(t))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(files("1m").len(), 3, "{:?}", files("1m"));
    assert_eq!(files("raw"), vec![format!("{}.seg", T0 + 2 * HOUR_MS)]);
    assert_eq!(files("1h").len(), 1);
    // Per minute: the mean of the 6 points.
    let expected_mean =
        |minute: i64| -> f64 { (0..6).map(|k| cpu(minute * 6 + k)).sum::<f64>() / 6.0 };
    let a = query(
        &h,
        "cpu_percent",
        T0,
        T0 + 3 * HOUR_MS - 1,
        MINUTE_MS,
        Reduce::Mean,
        now,
    );
    assert_eq!(a.steps, 180);
    assert_eq!(a.tiers, vec![Tier::Minute]);
    let s = &a.series[0].values;
    for m in 0..180 {
        let got = s[m as usize].expect("value");
        assert!((got - expected_mean(m)).abs() < 1e-9, "minute {m}: {got}");
    }
    // At a 10 s step the first two hours come from rollups (no raw any more),
    // the last from raw points.
    let b = query(
        &h,
        "cpu_percent",
        T0,
        T0 + 3 * HOUR_MS - 1,
        10_000,
        Reduce::Max,
        now,
    );
    assert_eq!(b.tiers, vec![Tier::Raw, Tier::Minute]);
    let v = &b.series[0].values;
    assert_eq!(
        v[2 * 360 + 5],
        Some(cpu(2 * 360 + 5)),
        "raw hour: every point"
    );
    let rolled_max = (0..6).map(cpu).fold(f64::MIN, f64::max);
    assert_eq!(
        v[0],
        Some(rolled_max),
        "rolled hour: the minute's max at its start"
    );
    assert_eq!(v[1], None);
    // Hourly step: 1h rollups for the rolled hours, raw for the last.
    let c = query(
        &h,
        "cpu_percent",
        T0,
        T0 + 3 * HOUR_MS - 1,
        HOUR_MS,
        Reduce::Mean,
        now,
    );
    let want_hour = |k: i64| (0..360).map(|i| cpu(k * 360 + i)).sum::<f64>() / 360.0;
    for k in 0..3 {
        let got = c.series[0].values[k as usize].expect("hour");
        assert!(
            (got - want_hour(k)).abs() < 1e-6,
            "hour {k}: {got} vs {}",
            want_hour(k)
        );
    }
    assert!(c.tiers.contains(&Tier::Hour), "{:?}", c.tiers);
    // Rollups survive a restart, and a second maintain does not redo them.
    h.close();
    drop(h);
    let h = open(dir.path(), |c| c.raw_retention_ms = HOUR_MS);
    h.maintain(now).expect("maintain");
    let c2 = query(
        &h,
        "cpu_percent",
        T0,
        T0 + 3 * HOUR_MS - 1,
        HOUR_MS,
        Reduce::Mean,
        now,
    );
    assert_eq!(c2.series, c.series);
    // Past every retention, nothing is left.
    h.maintain(now + 200 * DAY_MS).expect("maintain");
    assert!(files("raw").is_empty() && files("1m").is_empty() && files("1h").is_empty());
}

#[test]
fn the_head_stays_within_its_budget_under_a_flood_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let budget = 256 << 10;
    let h = open(dir.path(), |c| c.head_budget_bytes = budget);
    let sources: Vec<String> = (0..2000).map(|i| format!("n{i}")).collect();
    let mut max_seen = 0;
    for round in 0..20 {
        for s in &sources {
            h.append(s, T0 + round * 1000, &[CPU, MEM], &[cpu(round), 1e9]);
            max_seen = max_seen.max(h.inner.head.lock().expect("lock").bytes);
        }
    }
    assert!(
        max_seen <= budget + 4096,
        "head grew to {max_seen} over a {budget} budget"
    );
    let s = h.stats();
    assert!(s.budget_evictions > 0);
    wait_written(&h);
    let a = query(
        &h,
        "cpu_percent",
        T0,
        T0 + 19_000,
        1000,
        Reduce::Last,
        T0 + 60_000,
    );
    assert_eq!(a.series.len(), 2000);
    assert!(
        a.series
            .iter()
            .all(|s| s.values.iter().all(Option::is_some)),
        "an early-closed chunk lost points"
    );
}

#[test]
fn late_points_within_the_bound_are_kept_and_older_ones_counted() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |c| c.out_of_order_ms = 6000);
    for t in [10_000, 11_000, 13_000, 12_000, 14_000, 8_000, 1_000] {
        h.append("n1", T0 + t, &[CPU], &[t as f64 / 1000.0]);
    }
    assert_eq!(h.stats().late_points, 1, "1 s is more than 6 s behind 14 s");
    let a = query(
        &h,
        "cpu_percent",
        T0,
        T0 + 20_000,
        1000,
        Reduce::Last,
        T0 + 30_000,
    );
    let got: Vec<f64> = points(&a, "n1").into_iter().map(|(_, v)| v).collect();
    assert_eq!(got, vec![8.0, 10.0, 11.0, 12.0, 13.0, 14.0]);
}

#[test]
fn a_change_of_columns_starts_a_new_chunk() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |_| {});
    let disk = |m: &'static str| ColumnRef {
        metric: "disk_used_bytes",
        label: m,
        encoding: Encoding::Int { scale: 1.0 },
    };
    h.append("n1", T0, &[CPU, disk("/")], &[1.0, 100.0]);
    h.append(
        "n1",
        T0 + 1000,
        &[CPU, disk("/"), disk("/data")],
        &[2.0, 101.0, 5.0],
    );
    let a = query(
        &h,
        "disk_used_bytes",
        T0,
        T0 + 1000,
        1000,
        Reduce::Last,
        T0 + 5000,
    );
    let labels: Vec<&str> = a.series.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, vec!["/", "/data"]);
    assert_eq!(a.series[0].values, vec![Some(100.0), Some(101.0)]);
    assert_eq!(a.series[1].values, vec![None, Some(5.0)]);
}

#[test]
fn bad_queries_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |_| {});
    let q = |from, to, step| {
        h.query(&Query {
            metric: "cpu_percent",
            sources: &all,
            from_ms: from,
            to_ms: to,
            step_ms: step,
            reduce: Reduce::Mean,
            now_ms: T0,
            tier: None,
            prefixes: None,
        })
    };
    assert!(matches!(q(T0, T0 + 1, 0), Err(QueryError::Range(_))));
    assert!(matches!(q(T0, T0 - 1, 1), Err(QueryError::Range(_))));
    h.append("n1", T0, &[CPU], &[1.0]);
    assert!(matches!(
        q(T0, T0 + 100 * DAY_MS, 1),
        Err(QueryError::TooLarge { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    /// Random series (gaps, NaN, late points within the bound) come back
    /// identical, from the head, from disk and after a restart.
    #[test]
    fn random_series_round_trip(
        steps in proptest::collection::vec((1i64..5_000, prop_oneof![
            6 => (-1e6f64..1e6).prop_map(|v| (v * 100.0).round() / 100.0),
            1 => Just(f64::NAN),
        ], proptest::bool::weighted(0.1)), 1..400),
        chunk_points in 2u32..150,
    ) {
        let dir = tempfile::tempdir().expect("tmp");
        let h = open(dir.path(), |c| { c.chunk_points = chunk_points; c.out_of_order_ms = 10_000; });
        let mut t = T0;
        let mut expected: BTreeMap<i64, f64> = BTreeMap::new();
        let mut newest = t;
        for (gap, v, late) in steps {
            t += gap;
            // A late point: 1..gap ms before the previous one (still unique).
            let at = if late && t - 2 * gap > newest - 10_000 && !expected.contains_key(&(t - 2 * gap)) && t - 2 * gap > T0 { t - 2 * gap } else { t };
            if expected.contains_key(&at) { continue; }
            h.append("s", at, &[CPU], &[v]);
            newest = newest.max(at);
            expected.insert(at, v);
        }
        let want: Vec<(i64, f64)> = expected.iter().filter(|(_, v)| !v.is_nan()).map(|(t, v)| (*t, *v)).collect();
        let to = newest;
        let now = to + 1000;
        let a = query(&h, "cpu_percent", T0, to, 1, Reduce::Last, now);
        prop_assert_eq!(points(&a, "s"), want.clone());
        h.close();
        drop(h);
        let h = open(dir.path(), |_| {});
        let a = query(&h, "cpu_percent", T0, to, 1, Reduce::Last, now);
        prop_assert_eq!(points(&a, "s"), want);
    }
}

#[test]
fn a_one_point_chunk_after_a_column_change_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |_| {});
    let disk = |m: &'static str| ColumnRef {
        metric: "disk_used_bytes",
        label: m,
        encoding: Encoding::Int { scale: 1.0 },
    };
    for i in 0..20 {
        h.append("n1", T0 + i * 200, &[CPU, disk("/")], &[1.0, 100.0]);
    }
    h.append(
        "n1",
        T0 + 20 * 200,
        &[CPU, disk("/"), disk("/x")],
        &[2.0, 101.0, 5.0],
    );
    let q = |h: &History| {
        let a = query(h, "cpu_percent", T0, T0 + 4000, 1, Reduce::Last, T0 + 5000);
        points(&a, "n1")
    };
    let before = q(&h);
    assert_eq!(before.len(), 21);
    h.close();
    drop(h);
    let h = open(dir.path(), |_| {});
    assert_eq!(q(&h), before);
}

#[test]
fn an_ended_hour_is_compacted_to_one_chunk_per_source_and_answers_the_same() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |c| c.chunk_points = 50);
    let disk = |m: &'static str| ColumnRef {
        metric: "disk_used_bytes",
        label: m,
        encoding: Encoding::Int { scale: 1.0 },
    };
    // n1: 400 points, a second disk from point 300 on; n2: 3 points.
    for i in 0..400i64 {
        let t = T0 + i * 1000;
        if i < 300 {
            h.append("n1", t, &[CPU, disk("/")], &[cpu(i), i as f64]);
        } else {
            h.append(
                "n1",
                t,
                &[CPU, disk("/"), disk("/data")],
                &[cpu(i), i as f64, 7.0 * i as f64],
            );
        }
    }
    fill(&h, "n2", T0 + 5000, 3, 1000);
    // Points of the next hour keep the writer's hour open.
    fill(&h, "n2", T0 + HOUR_MS, 1, 1000);
    wait_written(&h);
    let now = T0 + HOUR_MS + 10 * MINUTE_MS;
    let ask = |h: &History, metric: &str| {
        h.query(&Query {
            metric,
            sources: &all,
            from_ms: T0,
            to_ms: T0 + HOUR_MS - 1,
            step_ms: 1000,
            reduce: Reduce::Last,
            now_ms: now,
            tier: Some(Tier::Raw),
            prefixes: None,
        })
        .expect("query")
    };
    let before: Vec<Answer> = ["cpu_percent", "disk_used_bytes"]
        .iter()
        .map(|m| ask(&h, m))
        .collect();
    let chunks = |h: &History| -> Vec<(String, usize)> {
        let raw = h.inner.tier(Tier::Raw).read().expect("lock");
        let mut v: Vec<(String, usize)> = raw.segments[&T0]
            .index
            .iter()
            .map(|(s, l)| (s.to_string(), l.len()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(chunks(&h)[0], ("n1".to_string(), 8));
    h.maintain(now).expect("maintain");
    assert_eq!(
        chunks(&h),
        vec![("n1".to_string(), 1), ("n2".to_string(), 1)]
    );
    let after: Vec<Answer> = ["cpu_percent", "disk_used_bytes"]
        .iter()
        .map(|m| ask(&h, m))
        .collect();
    assert_eq!(after, before, "compaction changed the answers");
    let n1 = points(&after[0], "n1");
    assert_eq!(n1.len(), 400);
    assert_eq!(n1[399], (T0 + 399_000, cpu(399)));
    h.close();
    drop(h);
    let h = open(dir.path(), |_| {});
    assert_eq!(chunks(&h)[0], ("n1".to_string(), 1));
    let again: Vec<Answer> = ["cpu_percent", "disk_used_bytes"]
        .iter()
        .map(|m| ask(&h, m))
        .collect();
    assert_eq!(
        again, before,
        "the compacted file answers the same after a restart"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("raw"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Fetches from `h` in pieces of at most `max` bytes, as a follower does over
/// the API.
fn fetch_from(h: &History, max: u64) -> Box<mirror::Fetch<'_>> {
    Box::new(
        move |(tier, start), offset, last| match h.read_file(tier, start, offset, last, max) {
            Ok(b) => Ok(b),
            Err(FileError::Missing(..)) => Err(mirror::FetchError::Missing),
            Err(FileError::Range(segment::RangeError::Diverged(_))) => {
                Err(mirror::FetchError::Diverged)
            }
            Err(e) => Err(mirror::FetchError::Failed(e.to_string())),
        },
    )
}

/// The bytes of every segment file under `dir`, by tier and name.
fn file_bytes(dir: &Path) -> BTreeMap<(String, String), Vec<u8>> {
    let mut out = BTreeMap::new();
    for t in Tier::ALL {
        for e in std::fs::read_dir(dir.join(t.name())).expect("dir") {
            let e = e.expect("entry");
            let name = e.file_name().to_string_lossy().into_owned();
            out.insert(
                (t.name().to_owned(), name),
                std::fs::read(e.path()).expect("read"),
            );
        }
    }
    out
}

#[test]
fn a_mirror_follows_appends_compaction_rollups_and_retention_and_opens_as_a_history() {
    let src = tempfile::tempdir().expect("tmp");
    let copy = tempfile::tempdir().expect("tmp");
    let h = open(src.path(), |c| {
        c.chunk_points = 20;
        c.raw_retention_ms = 2 * HOUR_MS;
    });
    let mut m = mirror::Mirror::open(copy.path()).expect("mirror");
    let never = || false;
    // Small pieces: a file takes several fetches, each of whole records.
    let mut fetch = fetch_from(&h, 600);
    fill(&h, "n1", T0, 300, 1000);
    fill(&h, "n2", T0, 300, 1000);
    wait_written(&h);
    let first = m.sync(&h.files(), &mut fetch, &never).expect("sync");
    assert!(first.whole >= 1 && first.bytes > 600, "{first:?}");
    assert_eq!(file_bytes(copy.path()), file_bytes(src.path()));
    // More points of the same hour: only the new records are fetched.
    fill(&h, "n1", T0 + 300_000, 200, 1000);
    wait_written(&h);
    let before = file_bytes(copy.path())[&("raw".to_owned(), format!("{T0}.seg"))].len() as u64;
    let second = m.sync(&h.files(), &mut fetch, &never).expect("sync");
    assert_eq!(second.whole, 0, "{second:?}");
    let after = file_bytes(src.path())[&("raw".to_owned(), format!("{T0}.seg"))].len() as u64;
    assert_eq!(second.bytes, after - before);
    assert_eq!(file_bytes(copy.path()), file_bytes(src.path()));
    // The hour ends: compaction replaces the raw file, rollups appear; three
    // hours later retention deletes it.
    fill(&h, "n1", T0 + HOUR_MS, 30, 1000);
    wait_written(&h);
    h.maintain(T0 + HOUR_MS + 10 * MINUTE_MS).expect("maintain");
    let third = m.sync(&h.files(), &mut fetch, &never).expect("sync");
    assert!(
        third.whole >= 3,
        "compacted raw, 1m and 1h files: {third:?}"
    );
    assert_eq!(file_bytes(copy.path()), file_bytes(src.path()));
    h.maintain(T0 + 3 * HOUR_MS + 10 * MINUTE_MS)
        .expect("maintain");
    let fourth = m.sync(&h.files(), &mut fetch, &never).expect("sync");
    assert!(fourth.removed >= 1, "{fourth:?}");
    assert_eq!(file_bytes(copy.path()), file_bytes(src.path()));
    // The copy opens as a history that answers what the source answers (of
    // what the source had written; its open chunks are its own).
    let now = T0 + 3 * HOUR_MS + 10 * MINUTE_MS;
    let two_hours = |h: &History| {
        query(
            h,
            "cpu_percent",
            T0,
            T0 + 2 * HOUR_MS,
            MINUTE_MS,
            Reduce::Mean,
            now,
        )
    };
    let want = two_hours(&h);
    let got = two_hours(&open(copy.path(), |_| {}));
    assert_eq!(got, want);
    assert!(!points(&got, "n1").is_empty());
}

#[test]
fn a_copy_that_diverged_is_fetched_whole_and_bad_records_are_refused() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let copy = tempfile::tempdir().expect("tmp");
    let never = || false;
    // The copy follows leader A, which then dies; B (a copy of an earlier
    // moment of A) takes over and appends its own chunks.
    let ha = open(a.path(), |c| c.chunk_points = 10);
    fill(&ha, "n1", T0, 100, 1000);
    wait_written(&ha);
    let mut mb = mirror::Mirror::open(b.path()).expect("mirror");
    mb.sync(&ha.files(), &mut *fetch_from(&ha, 1 << 20), &never)
        .expect("b copies a");
    fill(&ha, "n1", T0 + 100_000, 50, 1000);
    wait_written(&ha);
    let mut m = mirror::Mirror::open(copy.path()).expect("mirror");
    m.sync(&ha.files(), &mut *fetch_from(&ha, 1 << 20), &never)
        .expect("the copy follows a further");
    drop(mb);
    let hb = open(b.path(), |c| c.chunk_points = 10);
    // Other points than A wrote after the copy B took.
    fill(&hb, "n1", T0 + 100_500, 80, 1000);
    wait_written(&hb);
    let b_len = hb.files()[0].len;
    let c_len = m.copies()[&(Tier::Raw, T0)].len;
    assert!(b_len > c_len, "B's file outgrew the copy: {b_len} {c_len}");
    // Same first record, a longer file: an append is tried, B refuses it
    // (the copy's last record is not B's), and the file comes whole.
    let synced = m
        .sync(&hb.files(), &mut *fetch_from(&hb, 1 << 20), &never)
        .expect("sync");
    assert_eq!(synced.whole, 1, "{synced:?}");
    assert_eq!(file_bytes(copy.path()), file_bytes(b.path()));

    // Bytes that are not whole, intact records are refused and change nothing.
    let key = (Tier::Raw, T0);
    let have = m.copies()[&key];
    let mut good = hb.read_file(Tier::Raw, T0, 0, None, 1 << 20).expect("read");
    good.truncate(segment::whole_records(&good[..good.len() / 2]));
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0xff;
    for bad in [flipped, good[..good.len() - 3].to_vec()] {
        let e = m.write(key, false, have.len, &bad).expect_err("refused");
        assert!(matches!(e, mirror::MirrorError::Bad(_)), "{e}");
    }
    let e = m
        .write(key, false, have.len + 1, &[])
        .expect_err("out of step");
    assert!(matches!(e, mirror::MirrorError::OutOfStep { .. }), "{e}");
    assert_eq!(m.copies()[&key], have);
    assert_eq!(file_bytes(copy.path()), file_bytes(b.path()));
}

#[test]
fn a_torn_copy_is_cut_to_whole_records_and_an_unfinished_fetch_is_dropped() {
    let src = tempfile::tempdir().expect("tmp");
    let copy = tempfile::tempdir().expect("tmp");
    let h = open(src.path(), |c| c.chunk_points = 10);
    fill(&h, "n1", T0, 100, 1000);
    wait_written(&h);
    let mut m = mirror::Mirror::open(copy.path()).expect("mirror");
    m.sync(&h.files(), &mut *fetch_from(&h, 1 << 20), &|| false)
        .expect("sync");
    let whole = m.copies()[&(Tier::Raw, T0)];
    drop(m);
    let path = copy.path().join("raw").join(format!("{T0}.seg"));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open");
    std::io::Write::write_all(&mut f, &[9, 0, 0, 0, 1, 2]).expect("torn");
    std::fs::write(copy.path().join("raw").join("5.mirror.tmp"), b"half").expect("tmp");
    let m = mirror::Mirror::open(copy.path()).expect("mirror");
    assert_eq!(m.copies()[&(Tier::Raw, T0)], whole);
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), whole.len);
    assert!(!copy.path().join("raw").join("5.mirror.tmp").exists());
    // A stop between fetches leaves no partial file behind.
    let h2 = tempfile::tempdir().expect("tmp");
    let mut m2 = mirror::Mirror::open(h2.path()).expect("mirror");
    let calls = std::cell::Cell::new(0);
    let stop = || {
        calls.set(calls.get() + 1);
        calls.get() > 2
    };
    let s = m2
        .sync(&h.files(), &mut *fetch_from(&h, 100), &stop)
        .expect("sync");
    assert!(s.whole == 0 && m2.copies().is_empty(), "{s:?}");
    assert!(file_bytes(h2.path()).is_empty());
}

#[test]
fn prefixes_narrow_a_query_to_the_sources_under_them_each_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |c| c.chunk_points = 50);
    for s in ["n1", "n10", "n2", "m1"] {
        fill(&h, s, T0, 120, 1000);
    }
    wait_written(&h);
    let ask = |prefixes: Option<&[&str]>| -> Vec<String> {
        let a = h
            .query(&Query {
                metric: "cpu_percent",
                sources: &all,
                from_ms: T0,
                to_ms: T0 + 119_000,
                step_ms: 1000,
                reduce: Reduce::Mean,
                now_ms: T0 + 200_000,
                tier: None,
                prefixes,
            })
            .expect("query");
        for s in &a.series {
            assert_eq!(points(&a, &s.source).len(), 120, "{}", s.source);
        }
        a.series.iter().map(|s| s.source.to_string()).collect()
    };
    assert_eq!(ask(None), vec!["m1", "n1", "n10", "n2"]);
    assert_eq!(ask(Some(&["n1"])), vec!["n1", "n10"]);
    assert_eq!(ask(Some(&["n10", "n1", "n1"])), vec!["n1", "n10"]);
    assert_eq!(ask(Some(&["n2", "m"])), vec!["m1", "n2"]);
    assert!(ask(Some(&["x"])).is_empty());
    assert!(ask(Some(&[])).is_empty());
}

#[test]
fn query_many_answers_each_metric_as_its_own_query_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |c| c.chunk_points = 40);
    fill(&h, "n1", T0, 300, 1000);
    fill(&h, "n2", T0 + 50_000, 100, 1000);
    wait_written(&h);
    let q = |metric| Query {
        metric,
        sources: &all,
        from_ms: T0,
        to_ms: T0 + 299_000,
        step_ms: 10_000,
        reduce: Reduce::Max,
        now_ms: T0 + 400_000,
        tier: None,
        prefixes: None,
    };
    let many = h
        .query_many(&q("ignored"), &["memory_used_bytes", "nope", "cpu_percent"])
        .expect("query");
    assert_eq!(many.len(), 3);
    assert_eq!(many[0], h.query(&q("memory_used_bytes")).expect("memory"));
    assert!(many[1].series.is_empty());
    assert_eq!(many[2], h.query(&q("cpu_percent")).expect("cpu"));
    assert_eq!(many[2].series.len(), 2);
}

#[test]
fn close_waits_for_a_maintenance_round_and_none_runs_after_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |_| {});
    // A few hours of 20 sources: a round that takes a while.
    for s in 0..20 {
        fill(&h, &format!("n{s}"), T0, 3 * 360, 10_000);
    }
    wait_written(&h);
    let now = T0 + 3 * HOUR_MS + 10 * MINUTE_MS;
    let files = |t: &str| {
        let mut v: Vec<(String, u64)> = std::fs::read_dir(dir.path().join(t))
            .expect("dir")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.file_name().to_string_lossy().into_owned(),
                    e.metadata().expect("meta").len(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let round = {
        let h = h.clone();
        std::thread::spawn(move || h.maintain(now))
    };
    // Let the round start, then close: close returns only once it is over.
    while files("1m").is_empty() && !round.is_finished() {
        std::thread::yield_now();
    }
    h.close();
    let after_close = (files("raw"), files("1m"), files("1h"));
    round.join().expect("thread").expect("maintain");
    assert_eq!(
        (files("raw"), files("1m"), files("1h")),
        after_close,
        "a file changed after close returned"
    );
    assert!(
        after_close.1.iter().all(|(n, _)| !n.ends_with(".tmp")),
        "{after_close:?}"
    );
    // A round asked for after close writes nothing.
    h.maintain(now + 200 * DAY_MS).expect("maintain");
    assert_eq!((files("raw"), files("1m"), files("1h")), after_close);
}

#[test]
fn a_late_point_filed_in_the_next_hour_is_found_by_a_query_that_ends_before_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let h = open(dir.path(), |c| c.chunk_points = 5);
    let end = T0 + HOUR_MS;
    // Points every 10 s up to 20 s before the hour, then into the next hour
    // (a new chunk, filed under the next hour), then a late point 10 s before
    // the hour that lands in that chunk.
    for i in 0..6 {
        h.append("n1", end - 80_000 + i * 10_000, &[CPU], &[1.0 + i as f64]);
    }
    for i in 0..3 {
        h.append("n1", end + i * 1000, &[CPU], &[50.0]);
    }
    h.append("n1", end - 10_000, &[CPU], &[99.0]);
    h.close();
    drop(h);
    let h = open(dir.path(), |_| {});
    let got = |h: &History, now: i64| {
        points(
            &query(
                h,
                "cpu_percent",
                end - 80_000,
                end - 1,
                10_000,
                Reduce::Max,
                now,
            ),
            "n1",
        )
    };
    let now = end + 5 * MINUTE_MS;
    let raw = got(&h, now);
    assert_eq!(raw.len(), 7, "{raw:?}");
    assert_eq!(raw.last(), Some(&(end - 10_000, 99.0)), "{raw:?}");
    // The same from the 1-minute rollups once the hours are rolled up.
    h.maintain(end + 2 * HOUR_MS).expect("maintain");
    let rolled = query(
        &h,
        "cpu_percent",
        end - 2 * MINUTE_MS,
        end - 1,
        MINUTE_MS,
        Reduce::Max,
        end + 2 * HOUR_MS,
    );
    assert_eq!(rolled.tiers, vec![Tier::Minute]);
    assert_eq!(
        points(&rolled, "n1"),
        vec![(end - 2 * MINUTE_MS, 2.0), (end - MINUTE_MS, 99.0)]
    );
}
