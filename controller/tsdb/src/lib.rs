//! NovaCron's metrics history: a small time-series store.
//!
//! - **Head**: one open [`chunk::OpenChunk`] per source (a node, an
//!   allocation), every column compressed as points arrive ([`codec`]). A
//!   chunk closes after [`Config::chunk_points`] points, at a segment
//!   boundary, when its columns change, or early when the head is over its
//!   memory budget; closed chunks go to a writer thread and onto disk.
//! - **Disk**: three tiers of [`segment`] files under the history directory:
//!   `raw/` (one file per hour of full-resolution chunks), `1m/` (one file per
//!   hour of 1-minute rollups: min, max, last, mean, count) and `1h/` (one
//!   file per day of 1-hour rollups). [`History::maintain`] rolls up each hour
//!   once it has ended and deletes what is past its tier's retention.
//! - **Queries** ([`History::query`]) read one metric of the sources a filter
//!   selects over a range, choosing per hour the tier that answers the step
//!   (raw below a minute, 1m below an hour, else 1h) among those that still
//!   hold that hour, and reduce each step's points to one value.
//!
//! A crash loses the open chunks (at most `chunk_points` points per source)
//! and cuts a torn record at the end of a file; nothing else.

pub mod bits;
pub mod chunk;
pub mod codec;
pub mod mirror;
pub mod segment;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use tracing::{error, warn};

pub use chunk::{Column, ColumnRef};
pub use codec::Encoding;

use chunk::{Chunk, ColumnPoints, OpenChunk, RollupPoint};
use segment::{Loc, Segment};

/// One minute, milliseconds.
pub const MINUTE_MS: i64 = 60_000;
/// One hour, milliseconds: the span of a raw or 1m segment file.
pub const HOUR_MS: i64 = 3_600_000;
/// One day, milliseconds: the span of a 1h segment file.
pub const DAY_MS: i64 = 86_400_000;
/// The most cells (series × steps) one query may build.
pub const MAX_CELLS: usize = 20_000_000;
/// How long after an hour ends its rollups are built (late chunks land first).
pub const ROLLUP_GRACE_MS: i64 = 2 * MINUTE_MS;

/// The history's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The directory (`raw/`, `1m/`, `1h/` are made under it).
    pub dir: PathBuf,
    /// How long full-resolution points are kept.
    pub raw_retention_ms: i64,
    /// How long 1-minute rollups are kept.
    pub minute_retention_ms: i64,
    /// How long 1-hour rollups are kept.
    pub hour_retention_ms: i64,
    /// The head's memory budget, bytes.
    pub head_budget_bytes: usize,
    /// Points per chunk.
    pub chunk_points: u32,
    /// How far behind a source's newest point a late point is still taken.
    pub out_of_order_ms: i64,
    /// Closed chunks waiting for the writer, at most.
    pub writer_queue: usize,
}

impl Config {
    /// The defaults: 24 h raw, 30 days of 1-minute and 90 of 1-hour rollups,
    /// a 128 MiB head, 120-point chunks, 60 s out of order.
    pub fn new(dir: PathBuf) -> Config {
        Config {
            dir,
            raw_retention_ms: 24 * HOUR_MS,
            minute_retention_ms: 30 * DAY_MS,
            hour_retention_ms: 90 * DAY_MS,
            head_budget_bytes: 128 << 20,
            chunk_points: 120,
            out_of_order_ms: 60_000,
            writer_queue: 65_536,
        }
    }
}

/// The storage tiers, finest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    /// Full resolution.
    Raw,
    /// 1-minute rollups.
    Minute,
    /// 1-hour rollups.
    Hour,
}

impl Tier {
    /// Every tier, finest first.
    pub const ALL: [Tier; 3] = [Tier::Raw, Tier::Minute, Tier::Hour];

    /// The tier named `name` (`raw`, `1m`, `1h`).
    pub fn from_name(name: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Its name in answers: `raw`, `1m`, `1h`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Raw => "raw",
            Tier::Minute => "1m",
            Tier::Hour => "1h",
        }
    }

    fn file_span(self) -> i64 {
        match self {
            Tier::Raw | Tier::Minute => HOUR_MS,
            Tier::Hour => DAY_MS,
        }
    }
}

/// How a step's points become one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduce {
    /// Their mean.
    #[default]
    Mean,
    /// The smallest.
    Min,
    /// The largest.
    Max,
    /// The newest.
    Last,
}

/// A range query over one metric.
pub struct Query<'a> {
    /// The metric.
    pub metric: &'a str,
    /// Which sources (by key) take part.
    pub sources: &'a dyn Fn(&str) -> bool,
    /// The range's start (aligned down to the step).
    pub from_ms: i64,
    /// The range's end (inclusive).
    pub to_ms: i64,
    /// The step.
    pub step_ms: i64,
    /// Within a step.
    pub reduce: Reduce,
    /// The time now (which hours are still raw-only).
    pub now_ms: i64,
    /// The tier to read first; `None`: by the step (raw below a minute, 1m
    /// below an hour, else 1h).
    pub tier: Option<Tier>,
    /// Only sources whose key starts with one of these are offered to
    /// `sources` (`None`: every source). A query of one node then reads that
    /// node's entries instead of walking every source's.
    pub prefixes: Option<&'a [&'a str]>,
}

impl std::fmt::Debug for Query<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("metric", &self.metric)
            .field("from_ms", &self.from_ms)
            .field("to_ms", &self.to_ms)
            .field("step_ms", &self.step_ms)
            .field("reduce", &self.reduce)
            .finish_non_exhaustive()
    }
}

/// A query's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The first step's start.
    pub from_ms: i64,
    /// The step.
    pub step_ms: i64,
    /// Steps.
    pub steps: usize,
    /// The tiers that answered, finest first.
    pub tiers: Vec<Tier>,
    /// One entry per series, sorted by source then label.
    pub series: Vec<SeriesAnswer>,
}

/// One series of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesAnswer {
    /// The source.
    pub source: Arc<str>,
    /// The column's label value.
    pub label: String,
    /// One value per step.
    pub values: Vec<Option<f64>>,
}

/// What a query could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// The range or step is not usable.
    #[error("{0}")]
    Range(String),
    /// Too many series × steps.
    #[error(
        "the query would build {cells} cells (series × steps), more than {MAX_CELLS}: narrow the selection, shorten the range or raise the step"
    )]
    TooLarge {
        /// How many.
        cells: usize,
    },
}

/// One segment file as [`History::files`] lists it, for a copy to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    /// Its tier.
    pub tier: Tier,
    /// The start of the span it holds (its name).
    pub start: i64,
    /// Its length: whole records only.
    pub len: u64,
    /// Its first record's header as one word (0: empty); a file replaced by
    /// compaction starts differently.
    pub first: u64,
}

/// Why [`History::read_file`] sent nothing.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// No such file (expired, or never written).
    #[error("no {0} file starts at {1}")]
    Missing(&'static str, i64),
    /// The copy is not a prefix of the file: fetch it whole.
    #[error(transparent)]
    Range(#[from] segment::RangeError),
}

/// Counters and sizes, for `/metrics` and `GET /v1/metrics/storage`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Open chunks.
    pub head_sources: u64,
    /// Columns in open chunks.
    pub head_series: u64,
    /// Values in open chunks.
    pub head_values: u64,
    /// Bytes open chunks take.
    pub head_bytes: u64,
    /// The budget.
    pub head_budget_bytes: u64,
    /// Values in raw files.
    pub disk_values: u64,
    /// Bytes of raw files.
    pub disk_bytes: u64,
    /// Bytes of rollup files.
    pub rollup_bytes: u64,
    /// Chunks closed early for the budget.
    pub budget_evictions: u64,
    /// Chunks dropped: the writer queue was full or the disk refused them.
    pub dropped_chunks: u64,
    /// Points refused: older than the out-of-order bound.
    pub late_points: u64,
    /// Corrupt chunks skipped.
    pub corrupt_chunks: u64,
    /// The oldest raw point.
    pub oldest_raw_ms: Option<i64>,
    /// Values appended since start.
    pub appended_values: u64,
}

#[derive(Debug, Default)]
struct Counters {
    budget_evictions: AtomicU64,
    dropped_chunks: AtomicU64,
    late_points: AtomicU64,
    corrupt_chunks: AtomicU64,
    appended_values: AtomicU64,
}

#[derive(Debug, Default)]
struct Head {
    /// Open chunks by source (sorted: see [`each_under`]).
    open: BTreeMap<Arc<str>, OpenChunk>,
    bytes: usize,
}

#[derive(Debug)]
struct TierFiles {
    dir: PathBuf,
    segments: BTreeMap<i64, Segment>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    head: Mutex<Head>,
    tiers: [RwLock<TierFiles>; 3],
    in_flight: Mutex<Vec<Arc<Chunk>>>,
    counters: Counters,
    sources: Mutex<BTreeSet<Arc<str>>>,
    /// Held by a maintenance round for its whole length; `true` once closed.
    /// [`History::close`] takes it, so that when it returns no rollup or
    /// compaction is still writing (another controller may then take the
    /// directory over) and none starts.
    maintenance: Mutex<bool>,
    /// Set by [`History::close`] before it waits: a rollup stops at its next
    /// source (its `.tmp` files removed; the hour is rolled up again later).
    closing: std::sync::atomic::AtomicBool,
}

/// The writer thread and the queue to it.
type Writer = (SyncSender<Arc<Chunk>>, JoinHandle<()>);

/// The metrics history. Cheap to clone; [`History::close`] flushes it.
#[derive(Debug, Clone)]
pub struct History {
    inner: Arc<Inner>,
    writer: Arc<Mutex<Option<Writer>>>,
}

/// Calls `f` on the entries of `map` whose key starts with one of `prefixes`
/// (every entry when `None`), each once, in key order within a prefix.
fn each_under<V, E>(
    map: &BTreeMap<Arc<str>, V>,
    prefixes: Option<&[&str]>,
    mut f: impl FnMut(&Arc<str>, &V) -> Result<(), E>,
) -> Result<(), E> {
    let Some(prefixes) = prefixes else {
        for (k, v) in map {
            f(k, v)?;
        }
        return Ok(());
    };
    // Sorted, without a prefix that another one covers: the ranges are
    // disjoint, so no source is offered twice.
    let mut sorted: Vec<&str> = prefixes.to_vec();
    sorted.sort_unstable();
    let mut kept: Vec<&str> = Vec::with_capacity(sorted.len());
    for p in sorted {
        if kept.last().is_none_or(|l| !p.starts_with(l)) {
            kept.push(p);
        }
    }
    for p in kept {
        for (k, v) in
            map.range::<str, _>((std::ops::Bound::Included(p), std::ops::Bound::Unbounded))
        {
            if !k.starts_with(p) {
                break;
            }
            f(k, v)?;
        }
    }
    Ok(())
}

fn floor(t: i64, span: i64) -> i64 {
    t.div_euclid(span) * span
}

fn tier_index(t: Tier) -> usize {
    match t {
        Tier::Raw => 0,
        Tier::Minute => 1,
        Tier::Hour => 2,
    }
}

impl Inner {
    fn tier(&self, t: Tier) -> &RwLock<TierFiles> {
        &self.tiers[tier_index(t)]
    }

    fn intern(&self, s: &str) -> Arc<str> {
        let mut set = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = set.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        set.insert(a.clone());
        a
    }

    /// Appends a chunk to its tier's segment (opening the segment if needed).
    fn write(&self, tier: Tier, chunk: &Chunk) -> std::io::Result<()> {
        // A raw chunk never crosses into the next hour (its late points may
        // reach back into the one before): its file is its newest point's hour.
        let start = floor(
            match tier {
                Tier::Raw => chunk.t_max,
                _ => chunk.t_min,
            },
            tier.file_span(),
        );
        let source = self.intern(&chunk.source);
        let mut files = self.tier(tier).write().unwrap_or_else(|e| e.into_inner());
        if !files.segments.contains_key(&start) {
            let path = files.dir.join(format!("{start}.seg"));
            let (seg, scan) = Segment::open(&path, tier == Tier::Hour)?;
            self.counters
                .corrupt_chunks
                .fetch_add(scan.corrupt, Ordering::Relaxed);
            files.segments.insert(start, seg);
        }
        let done = match files.segments.get_mut(&start) {
            Some(seg) => seg.append(chunk, source),
            None => Err(std::io::Error::other("segment vanished")),
        };
        if tier == Tier::Raw {
            // Under the tier's lock: a query sees the chunk in the file or in
            // flight, never both and never neither.
            self.written(chunk);
        }
        done
    }

    fn written(&self, chunk: &Chunk) {
        let mut f = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = f.iter().position(|c| std::ptr::eq(&**c, chunk)) {
            f.swap_remove(i);
        }
    }

    fn write_raw(&self, chunk: &Chunk) {
        if let Err(e) = self.write(Tier::Raw, chunk) {
            self.counters.dropped_chunks.fetch_add(1, Ordering::Relaxed);
            error!(source = %chunk.source, error = %e, "metrics history: cannot write a chunk; its points are lost");
        }
    }

    /// Takes `chunk` out of the head into the in-flight list (call with the
    /// head locked, so a query always finds it in one place).
    fn hand_over(&self, chunk: OpenChunk) -> Arc<Chunk> {
        let c = Arc::new(chunk.close());
        self.in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(c.clone());
        c
    }
}

fn writer_loop(inner: Arc<Inner>, rx: Receiver<Arc<Chunk>>) {
    while let Ok(chunk) = rx.recv() {
        inner.write_raw(&chunk);
    }
}

impl History {
    /// Opens the history in `config.dir`, reading what earlier runs left, and
    /// starts its writer thread.
    pub fn open(config: Config) -> std::io::Result<History> {
        let mut tiers = Vec::new();
        let mut corrupt = 0;
        for tier in Tier::ALL {
            let dir = config.dir.join(tier.name());
            std::fs::create_dir_all(&dir)?;
            let mut segments = BTreeMap::new();
            for (start, path) in segment::list(&dir)? {
                let (seg, scan) = Segment::open(&path, tier == Tier::Hour)?;
                corrupt += scan.corrupt;
                segments.insert(start, seg);
            }
            tiers.push(RwLock::new(TierFiles { dir, segments }));
        }
        let mut it = tiers.into_iter();
        let (Some(raw), Some(minute), Some(hour)) = (it.next(), it.next(), it.next()) else {
            return Err(std::io::Error::other("tiers"));
        };
        let queue = config.writer_queue.max(1);
        let inner = Arc::new(Inner {
            config,
            head: Mutex::new(Head::default()),
            tiers: [raw, minute, hour],
            in_flight: Mutex::new(Vec::new()),
            counters: Counters::default(),
            sources: Mutex::new(BTreeSet::new()),
            maintenance: Mutex::new(false),
            closing: std::sync::atomic::AtomicBool::new(false),
        });
        inner
            .counters
            .corrupt_chunks
            .store(corrupt, Ordering::Relaxed);
        let (tx, rx) = std::sync::mpsc::sync_channel(queue);
        let thread_inner = inner.clone();
        let handle = std::thread::Builder::new()
            .name("novacron-history".into())
            .spawn(move || writer_loop(thread_inner, rx))?;
        Ok(History {
            inner,
            writer: Arc::new(Mutex::new(Some((tx, handle)))),
        })
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    fn send(&self, chunk: Arc<Chunk>) {
        let sent = {
            let w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            match w.as_ref() {
                Some((tx, _)) => match tx.try_send(chunk.clone()) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => false,
                    Err(TrySendError::Disconnected(_)) => false,
                },
                None => {
                    // Closed: write in place (shutdown flush).
                    self.inner.write_raw(&chunk);
                    return;
                }
            }
        };
        if !sent {
            self.inner
                .counters
                .dropped_chunks
                .fetch_add(1, Ordering::Relaxed);
            warn!(source = %chunk.source, "metrics history: the writer is behind; dropping a closed chunk");
            self.inner.written(&chunk);
        }
    }

    /// Appends one point of every column of `source` at `t_ms`. Never blocks
    /// on disk: closed chunks go to the writer thread.
    pub fn append(&self, source: &str, t_ms: i64, columns: &[ColumnRef<'_>], values: &[f64]) {
        if columns.len() != values.len() || columns.is_empty() {
            return;
        }
        let cfg = &self.inner.config;
        let mut closed = Vec::new();
        {
            let mut head = self.inner.head.lock().unwrap_or_else(|e| e.into_inner());
            let head = &mut *head;
            let mut before = 0;
            let mut reopen = true;
            if let Some(open) = head.open.get_mut(source) {
                if t_ms < open.t_max - cfg.out_of_order_ms {
                    self.inner
                        .counters
                        .late_points
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let same_hour =
                    floor(t_ms, HOUR_MS) == floor(open.t_first, HOUR_MS) || t_ms < open.t_first;
                if open.fits(columns) && same_hour {
                    reopen = false;
                    before = open.heap_bytes();
                }
            }
            if reopen {
                if let Some(old) = head.open.remove(source) {
                    head.bytes = head.bytes.saturating_sub(old.heap_bytes());
                    closed.push(self.inner.hand_over(old));
                }
                let key = self.inner.intern(source);
                head.open
                    .insert(key.clone(), OpenChunk::new(key, columns, t_ms));
            }
            if let Some(open) = head.open.get_mut(source) {
                open.push(t_ms, values);
                let after = open.heap_bytes();
                head.bytes = head.bytes.saturating_sub(before) + after;
                if open.count >= cfg.chunk_points
                    && let Some(full) = head.open.remove(source)
                {
                    head.bytes = head.bytes.saturating_sub(full.heap_bytes());
                    closed.push(self.inner.hand_over(full));
                }
            }
            if head.bytes > cfg.head_budget_bytes {
                let mut by_age: Vec<(i64, Arc<str>)> = head
                    .open
                    .values()
                    .map(|o| (o.t_first, o.source.clone()))
                    .collect();
                by_age.sort();
                let goal = cfg.head_budget_bytes / 10 * 9;
                for (_, key) in by_age {
                    if head.bytes <= goal {
                        break;
                    }
                    if let Some(o) = head.open.remove(&key) {
                        head.bytes = head.bytes.saturating_sub(o.heap_bytes());
                        self.inner
                            .counters
                            .budget_evictions
                            .fetch_add(1, Ordering::Relaxed);
                        closed.push(self.inner.hand_over(o));
                    }
                }
            }
        }
        self.inner
            .counters
            .appended_values
            .fetch_add(values.len() as u64, Ordering::Relaxed);
        for c in closed {
            self.send(c);
        }
    }

    /// Closes open chunks that began in an hour that has ended by `now_ms`
    /// (a source that stopped reporting), writing them in place.
    fn flush_stale(&self, now_ms: i64) {
        let stale: Vec<Arc<Chunk>> = {
            let mut head = self.inner.head.lock().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<Arc<str>> = head
                .open
                .values()
                .filter(|o| floor(o.t_first, HOUR_MS) + HOUR_MS <= now_ms)
                .map(|o| o.source.clone())
                .collect();
            let mut out = Vec::new();
            for k in keys {
                if let Some(o) = head.open.remove(&k) {
                    head.bytes = head.bytes.saturating_sub(o.heap_bytes());
                    out.push(self.inner.hand_over(o));
                }
            }
            out
        };
        for c in stale {
            self.inner.write_raw(&c);
        }
    }

    /// Waits for a maintenance round in progress, writes every open chunk and
    /// stops the writer thread (shutdown). Appends after this write in place;
    /// maintenance does nothing any more.
    pub fn close(&self) {
        // Waits for a maintenance round in progress (told to stop at its next
        // source); none starts after this.
        self.inner.closing.store(true, Ordering::SeqCst);
        *self
            .inner
            .maintenance
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = true;
        let taken = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some((tx, handle)) = taken {
            drop(tx);
            let _ = handle.join();
        }
        let open: Vec<Arc<Chunk>> = {
            let mut head = self.inner.head.lock().unwrap_or_else(|e| e.into_inner());
            head.bytes = 0;
            let open: Vec<OpenChunk> = std::mem::take(&mut head.open).into_values().collect();
            open.into_iter().map(|o| self.inner.hand_over(o)).collect()
        };
        for c in open {
            self.inner.write_raw(&c);
        }
        for t in Tier::ALL {
            let files = self.inner.tier(t).read().unwrap_or_else(|e| e.into_inner());
            for seg in files.segments.values() {
                let _ = seg.sync();
            }
        }
    }

    /// Builds the rollups of every hour that ended at least
    /// [`ROLLUP_GRACE_MS`] before `now_ms` and has none yet, and deletes the
    /// files past their retention. Reads and writes files: call it from a
    /// blocking thread, about once a minute. After [`History::close`] it does
    /// nothing.
    pub fn maintain(&self, now_ms: i64) -> std::io::Result<()> {
        let closed = self
            .inner
            .maintenance
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *closed {
            return Ok(());
        }
        self.flush_stale(now_ms - ROLLUP_GRACE_MS);
        let cfg = &self.inner.config;
        let due: Vec<i64> = {
            let raw = self
                .inner
                .tier(Tier::Raw)
                .read()
                .unwrap_or_else(|e| e.into_inner());
            let minute = self
                .inner
                .tier(Tier::Minute)
                .read()
                .unwrap_or_else(|e| e.into_inner());
            raw.segments
                .keys()
                .copied()
                .filter(|h| {
                    h + HOUR_MS + ROLLUP_GRACE_MS <= now_ms && !minute.segments.contains_key(h)
                })
                .filter(|h| h + HOUR_MS > now_ms - cfg.minute_retention_ms)
                .collect()
        };
        for hour in due {
            // Not while a chunk of that hour still waits for the writer.
            let waiting = self
                .inner
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .any(|c| floor(c.t_max, HOUR_MS) <= hour);
            if !waiting {
                self.roll_up(hour)?;
            }
        }
        for (tier, keep) in [
            (Tier::Raw, cfg.raw_retention_ms),
            (Tier::Minute, cfg.minute_retention_ms),
            (Tier::Hour, cfg.hour_retention_ms),
        ] {
            let mut files = self
                .inner
                .tier(tier)
                .write()
                .unwrap_or_else(|e| e.into_inner());
            let span = tier.file_span();
            let old: Vec<i64> = files
                .segments
                .keys()
                .copied()
                .filter(|s| s + span <= now_ms - keep)
                .collect();
            for s in old {
                if let Some(seg) = files.segments.remove(&s) {
                    let path = seg.path().to_owned();
                    drop(seg);
                    if let Err(e) = std::fs::remove_file(&path) {
                        warn!(file = %path.display(), error = %e, "metrics history: cannot delete an expired file");
                    }
                }
            }
        }
        Ok(())
    }

    /// Rolls up the raw hour starting at `hour` into its 1m file (written
    /// aside and renamed, so it exists only whole) and its 1h points, and
    /// compacts the hour's raw file: each source's chunks become one (written
    /// aside and swapped in; chunks appended meanwhile are carried over), so a
    /// query reads one chunk per source and hour instead of one per 120 points.
    /// Reads one source at a time: memory stays at one source's hour.
    fn roll_up(&self, hour: i64) -> std::io::Result<()> {
        let (snapshot_len, sources, raw_dir) = {
            let raw = self
                .inner
                .tier(Tier::Raw)
                .read()
                .unwrap_or_else(|e| e.into_inner());
            let Some(seg) = raw.segments.get(&hour) else {
                return Ok(());
            };
            let sources: Vec<(Arc<str>, Vec<Loc>)> = seg
                .index
                .iter()
                .map(|(s, l)| (s.clone(), l.clone()))
                .collect();
            (seg.bytes(), sources, raw.dir.clone())
        };
        let dir = self
            .inner
            .tier(Tier::Minute)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .dir
            .clone();
        let tmp = dir.join(format!("{hour}.seg.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let (mut minute_seg, _) = Segment::open(&tmp, false)?;
        let raw_tmp = raw_dir.join(format!("{hour}.seg.tmp"));
        let _ = std::fs::remove_file(&raw_tmp);
        let (mut compacted, _) = Segment::open(&raw_tmp, false)?;
        for (source, locs) in sources {
            if self.inner.closing.load(Ordering::SeqCst) {
                drop((minute_seg, compacted));
                let _ = std::fs::remove_file(&tmp);
                let _ = std::fs::remove_file(&raw_tmp);
                return Ok(());
            }
            let bufs: Vec<Vec<u8>> = {
                let raw = self
                    .inner
                    .tier(Tier::Raw)
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                let Some(seg) = raw.segments.get(&hour) else {
                    return Ok(());
                };
                locs.iter()
                    .filter_map(|loc| match seg.read(*loc) {
                        Ok(b) => Some(b),
                        Err(e) => {
                            self.inner
                                .counters
                                .corrupt_chunks
                                .fetch_add(1, Ordering::Relaxed);
                            error!(error = %e, "metrics history: skipping a chunk in a rollup");
                            None
                        }
                    })
                    .collect()
            };
            let mut parts = Vec::with_capacity(bufs.len());
            for buf in &bufs {
                match chunk::decode(buf) {
                    Ok(x) => parts.push(x),
                    Err(e) => {
                        self.inner
                            .counters
                            .corrupt_chunks
                            .fetch_add(1, Ordering::Relaxed);
                        error!(error = %e, source = %source, "metrics history: skipping a corrupt chunk in a rollup");
                    }
                }
            }
            // One chunk already: copied as it is.
            if let ([buf], [(h, _)]) = (bufs.as_slice(), parts.as_slice()) {
                compacted.append_payload(
                    buf,
                    source.clone(),
                    h.t_min,
                    h.t_max,
                    u64::from(h.count) * h.columns.len() as u64,
                )?;
            } else if let Some(merged) = chunk::merge_raw(source.clone(), &parts) {
                compacted.append(&merged, source.clone())?;
            }
            // Per column (metric, label, encoding): per minute, the rollup.
            let mut cols: Vec<(Column, BTreeMap<i64, Acc>)> = Vec::new();
            for (h, points) in parts {
                for (col, pts) in h.columns.iter().zip(points) {
                    let i = match cols.iter().position(|(c, _)| c == col) {
                        Some(i) => i,
                        None => {
                            cols.push((col.clone(), BTreeMap::new()));
                            cols.len() - 1
                        }
                    };
                    if let ColumnPoints::Raw(pts) = pts {
                        for (t, v) in pts {
                            cols[i].1.entry(floor(t, MINUTE_MS)).or_default().add(t, v);
                        }
                    }
                }
            }
            if cols.is_empty() {
                continue;
            }
            let minutes: Vec<i64> = cols
                .iter()
                .flat_map(|(_, m)| m.keys().copied())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut per_col = Vec::with_capacity(cols.len());
            let mut hour_points = Vec::with_capacity(cols.len());
            for (_, m) in &cols {
                let mut total = Acc::default();
                per_col.push(
                    minutes
                        .iter()
                        .map(|t| {
                            let a = m.get(t).copied().unwrap_or_default();
                            total.merge_acc(&a);
                            a.point(*t)
                        })
                        .collect::<Vec<_>>(),
                );
                hour_points.push(vec![total.point(hour)]);
            }
            let columns: Vec<Column> = cols.into_iter().map(|(c, _)| c).collect();
            let minute_chunk =
                chunk::rollup_chunk(source.clone(), columns.clone(), &minutes, &per_col);
            minute_seg.append(&minute_chunk, source.clone())?;
            let hour_chunk = chunk::rollup_chunk(source.clone(), columns, &[hour], &hour_points);
            self.inner.write(Tier::Hour, &hour_chunk)?;
        }
        // The compacted raw file replaces the hour's, with what was appended
        // to it since the snapshot (late chunks), under the tier's lock.
        {
            let mut raw = self
                .inner
                .tier(Tier::Raw)
                .write()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(old) = raw.segments.get(&hour) {
                let (late, corrupt) = old.records_from(snapshot_len)?;
                self.inner
                    .counters
                    .corrupt_chunks
                    .fetch_add(corrupt, Ordering::Relaxed);
                for payload in late {
                    match chunk::read_header(&payload) {
                        Ok(h) => compacted.append_payload(
                            &payload,
                            self.inner.intern(&h.source),
                            h.t_min,
                            h.t_max,
                            u64::from(h.count) * h.columns.len() as u64,
                        )?,
                        Err(e) => {
                            error!(error = %e, "metrics history: dropping a corrupt late chunk in a compaction")
                        }
                    }
                }
                compacted.sync()?;
                let path = old.path().to_owned();
                compacted.rename(&path)?;
                raw.segments.insert(hour, compacted);
            } else {
                // Deleted meanwhile (retention): nothing to replace.
                drop(compacted);
                let _ = std::fs::remove_file(&raw_tmp);
            }
        }
        minute_seg.sync()?;
        {
            let hours = self
                .inner
                .tier(Tier::Hour)
                .read()
                .unwrap_or_else(|e| e.into_inner());
            for seg in hours.segments.values() {
                seg.sync()?;
            }
        }
        drop(minute_seg);
        let path = dir.join(format!("{hour}.seg"));
        std::fs::rename(&tmp, &path)?;
        let (seg, _) = Segment::open(&path, false)?;
        self.inner
            .tier(Tier::Minute)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .segments
            .insert(hour, seg);
        Ok(())
    }

    /// Which tier answers the hour starting at `hour`.
    fn tier_for(&self, hour: i64, base: Tier, now_ms: i64) -> Option<Tier> {
        let has = |t: Tier| {
            let files = self.inner.tier(t).read().unwrap_or_else(|e| e.into_inner());
            files
                .segments
                .get(&floor(hour, t.file_span()))
                // A day's 1h file holds this hour only if its points reach it.
                .is_some_and(|seg| t != Tier::Hour || (seg.t_min <= hour && hour <= seg.t_max))
        };
        let recent = hour + 2 * HOUR_MS > now_ms;
        let raw = recent || has(Tier::Raw);
        let rolled = has(Tier::Minute);
        let hourly = has(Tier::Hour);
        let order: [Tier; 3] = match base {
            Tier::Raw => [Tier::Raw, Tier::Minute, Tier::Hour],
            Tier::Minute => [Tier::Minute, Tier::Raw, Tier::Hour],
            Tier::Hour => [Tier::Hour, Tier::Minute, Tier::Raw],
        };
        order.into_iter().find(|t| match t {
            Tier::Raw => raw,
            Tier::Minute => rolled,
            // Before its hour is rolled up, the 1h tier holds nothing for it.
            Tier::Hour => hourly && (rolled || !raw),
        })
    }

    /// Answers `q`.
    pub fn query(&self, q: &Query<'_>) -> Result<Answer, QueryError> {
        self.query_many(q, &[q.metric])?
            .pop()
            .ok_or_else(|| QueryError::Range("no metric".into()))
    }

    /// Answers `q` for each of `metrics` (its own `metric` aside), one
    /// answer per metric in their order, reading each chunk once: a chunk
    /// holds all its source's columns.
    pub fn query_many(&self, q: &Query<'_>, metrics: &[&str]) -> Result<Vec<Answer>, QueryError> {
        if q.step_ms <= 0 {
            return Err(QueryError::Range("the step must be positive".into()));
        }
        if q.to_ms < q.from_ms {
            return Err(QueryError::Range("the range ends before it starts".into()));
        }
        let from = floor(q.from_ms, q.step_ms);
        let steps = usize::try_from((q.to_ms - from) / q.step_ms + 1)
            .map_err(|_| QueryError::Range("range too long".into()))?;
        let base = if let Some(t) = q.tier {
            t
        } else if q.step_ms >= HOUR_MS {
            Tier::Hour
        } else if q.step_ms >= MINUTE_MS {
            Tier::Minute
        } else {
            Tier::Raw
        };
        // Per hour of the range, the tier that answers it.
        let mut plan: BTreeMap<i64, Tier> = BTreeMap::new();
        let mut h = floor(from, HOUR_MS);
        while h <= q.to_ms {
            if let Some(t) = self.tier_for(h, base, q.now_ms) {
                plan.insert(h, t);
            }
            h += HOUR_MS;
        }
        let tiers: Vec<Tier> = plan
            .values()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut series: Vec<SeriesCells> = metrics.iter().map(|_| BTreeMap::new()).collect();
        let reduce = q.reduce;
        let mut cells = 0usize;
        let wanted = |c: &Column| metrics.contains(&c.metric.as_str());
        let metric_of = |c: &Column| metrics.iter().position(|m| *m == c.metric);
        let mut add = |m: usize,
                       source: &Arc<str>,
                       label: &str,
                       pts: ColumnPoints,
                       tier: Tier|
         -> Result<(), QueryError> {
            let Some(series) = series.get_mut(m) else {
                return Ok(());
            };
            let key = (source.clone(), label.to_owned());
            if !series.contains_key(&key) {
                cells += steps;
                if cells > MAX_CELLS {
                    return Err(QueryError::TooLarge { cells });
                }
            }
            let accs = series
                .entry(key)
                .or_insert_with(|| vec![Cell::empty(reduce); steps]);
            // Whether `t`'s hour is answered by `tier`, looked up once per
            // hour met (a chunk's points are in time order).
            let mut hour = (i64::MIN, false);
            let mut slot = |t: i64| -> Option<usize> {
                if t < from || t > q.to_ms {
                    return None;
                }
                if t < hour.0 || t >= hour.0.saturating_add(HOUR_MS) {
                    let h = floor(t, HOUR_MS);
                    hour = (h, plan.get(&h) == Some(&tier));
                }
                if !hour.1 {
                    return None;
                }
                usize::try_from((t - from) / q.step_ms)
                    .ok()
                    .filter(|i| *i < steps)
            };
            match pts {
                ColumnPoints::Raw(p) => {
                    for (t, v) in p {
                        if let Some(i) = slot(t) {
                            accs[i].add(reduce, t, v);
                        }
                    }
                }
                ColumnPoints::Rollup(p) => {
                    for r in p {
                        if let Some(i) = slot(r.t) {
                            accs[i].merge(reduce, &r);
                        }
                    }
                }
            }
            Ok(())
        };
        for tier in &tiers {
            let files = self
                .inner
                .tier(*tier)
                .read()
                .unwrap_or_else(|e| e.into_inner());
            if *tier == Tier::Raw {
                // Under the raw tier's lock, head first: a chunk moves from the
                // head to in flight (head locked) to a file (raw locked).
                let head = self.inner.head.lock().unwrap_or_else(|e| e.into_inner());
                each_under(&head.open, q.prefixes, |source, open| {
                    if !(q.sources)(source) || open.t_max < from || open.t_min > q.to_ms {
                        return Ok(());
                    }
                    for (i, pts) in open.read_columns(wanted) {
                        let col = &open.columns[i];
                        if let Some(m) = metric_of(col) {
                            add(m, source, &col.label, pts, Tier::Raw)?;
                        }
                    }
                    Ok(())
                })?;
                // Copied before the head is unlocked: a chunk closed after
                // this is in neither copy, never in both.
                let in_flight: Vec<Arc<Chunk>> = self
                    .inner
                    .in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                drop(head);
                for c in in_flight {
                    let under = q
                        .prefixes
                        .is_none_or(|ps| ps.iter().any(|p| c.source.starts_with(p)));
                    if !under || !(q.sources)(&c.source) || c.t_max < from || c.t_min > q.to_ms {
                        continue;
                    }
                    if let Ok(cols) = chunk::read_metrics(&c.encode(), metrics) {
                        for (m, label, pts) in cols {
                            add(m, &c.source, &label, pts, Tier::Raw)?;
                        }
                    }
                }
            }
            for (start, seg) in files
                .segments
                // One span past the end too: a late point is filed with the
                // chunk that took it, which may have begun in the next span.
                .range(
                    floor(from, tier.file_span()) - tier.file_span()
                        ..=q.to_ms.saturating_add(tier.file_span()),
                )
            {
                let _ = start;
                if seg.t_max < from || seg.t_min > q.to_ms {
                    continue;
                }
                each_under(&seg.index, q.prefixes, |source, locs| {
                    if !(q.sources)(source) {
                        return Ok(());
                    }
                    for loc in locs {
                        if loc.t_max < from || loc.t_min > q.to_ms {
                            continue;
                        }
                        let read = seg.read(*loc).map_err(|e| e.to_string()).and_then(|b| {
                            chunk::read_metrics(&b, metrics).map_err(|e| e.to_string())
                        });
                        match read {
                            Ok(cols) => {
                                for (m, label, pts) in cols {
                                    add(m, source, &label, pts, *tier)?;
                                }
                            }
                            Err(e) => {
                                self.inner
                                    .counters
                                    .corrupt_chunks
                                    .fetch_add(1, Ordering::Relaxed);
                                error!(error = %e, "metrics history: skipping a chunk in a query");
                            }
                        }
                    }
                    Ok(())
                })?;
            }
        }
        Ok(series
            .into_iter()
            .map(|series| Answer {
                from_ms: from,
                step_ms: q.step_ms,
                steps,
                tiers: tiers.clone(),
                series: series
                    .into_iter()
                    .map(|((source, label), accs)| SeriesAnswer {
                        source,
                        label,
                        values: accs.iter().map(|a| a.value(reduce)).collect(),
                    })
                    .collect(),
            })
            .collect())
    }

    /// Counters and sizes.
    pub fn stats(&self) -> Stats {
        let c = &self.inner.counters;
        let mut s = Stats {
            head_budget_bytes: self.inner.config.head_budget_bytes as u64,
            budget_evictions: c.budget_evictions.load(Ordering::Relaxed),
            dropped_chunks: c.dropped_chunks.load(Ordering::Relaxed),
            late_points: c.late_points.load(Ordering::Relaxed),
            corrupt_chunks: c.corrupt_chunks.load(Ordering::Relaxed),
            appended_values: c.appended_values.load(Ordering::Relaxed),
            ..Stats::default()
        };
        {
            let head = self.inner.head.lock().unwrap_or_else(|e| e.into_inner());
            s.head_sources = head.open.len() as u64;
            s.head_bytes = head.bytes as u64;
            for o in head.open.values() {
                s.head_series += o.columns.len() as u64;
                s.head_values += o.values();
            }
        }
        for t in Tier::ALL {
            let files = self.inner.tier(t).read().unwrap_or_else(|e| e.into_inner());
            for seg in files.segments.values() {
                if t == Tier::Raw {
                    s.disk_bytes += seg.bytes();
                    s.disk_values += seg.values;
                    if seg.t_min != i64::MAX {
                        s.oldest_raw_ms =
                            Some(s.oldest_raw_ms.map_or(seg.t_min, |o: i64| o.min(seg.t_min)));
                    }
                } else {
                    s.rollup_bytes += seg.bytes();
                }
            }
        }
        s
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.inner.config.dir
    }

    /// Every segment file with its length and first record, for another
    /// controller that keeps a copy ([`mirror`]).
    pub fn files(&self) -> Vec<FileInfo> {
        let mut out = Vec::new();
        for tier in Tier::ALL {
            let files = self
                .inner
                .tier(tier)
                .read()
                .unwrap_or_else(|e| e.into_inner());
            out.extend(files.segments.iter().map(|(start, seg)| FileInfo {
                tier,
                start: *start,
                len: seg.bytes(),
                first: seg.first(),
            }));
        }
        out
    }

    /// Whole records of the `tier` file starting at `start`, from byte
    /// `offset` on, about `max` bytes of them ([`Segment::records_after`]).
    /// Blocks on a read: call it off the async workers.
    pub fn read_file(
        &self,
        tier: Tier,
        start: i64,
        offset: u64,
        last: Option<(u64, u32)>,
        max: u64,
    ) -> Result<Vec<u8>, FileError> {
        let files = self
            .inner
            .tier(tier)
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let seg = files
            .segments
            .get(&start)
            .ok_or(FileError::Missing(tier.name(), start))?;
        Ok(seg.records_after(offset, last, max)?)
    }
}

/// One metric's series of a query by source and label, a cell per step.
type SeriesCells = BTreeMap<(Arc<str>, String), Vec<Cell>>;

/// A query step's accumulated points, holding only what its reduction needs
/// (16 bytes, where an [`Acc`] takes 48: a fleet query has one per series and
/// step): the sum and count for the mean, the extreme and a count for min and
/// max, the newest time (as bits) and value for last.
#[derive(Debug, Clone, Copy)]
struct Cell([f64; 2]);

impl Cell {
    fn empty(r: Reduce) -> Cell {
        Cell(match r {
            Reduce::Mean => [0.0, 0.0],
            Reduce::Min => [f64::INFINITY, 0.0],
            Reduce::Max => [f64::NEG_INFINITY, 0.0],
            Reduce::Last => [f64::from_bits(i64::MIN as u64), f64::NAN],
        })
    }

    fn last_t(&self) -> i64 {
        self.0[0].to_bits() as i64
    }

    fn add(&mut self, r: Reduce, t: i64, v: f64) {
        if v.is_nan() {
            return;
        }
        let c = &mut self.0;
        match r {
            Reduce::Mean => {
                c[0] += v;
                c[1] += 1.0;
            }
            Reduce::Min => {
                c[0] = c[0].min(v);
                c[1] += 1.0;
            }
            Reduce::Max => {
                c[0] = c[0].max(v);
                c[1] += 1.0;
            }
            Reduce::Last => {
                if t >= c[0].to_bits() as i64 {
                    *c = [f64::from_bits(t as u64), v];
                }
            }
        }
    }

    fn merge(&mut self, r: Reduce, p: &RollupPoint) {
        if p.count <= 0.0 || p.count.is_nan() {
            return;
        }
        let c = &mut self.0;
        match r {
            Reduce::Mean => {
                c[0] += p.mean * p.count;
                c[1] += p.count;
            }
            Reduce::Min => {
                c[0] = c[0].min(p.min);
                c[1] += p.count;
            }
            Reduce::Max => {
                c[0] = c[0].max(p.max);
                c[1] += p.count;
            }
            Reduce::Last => {
                if p.t >= c[0].to_bits() as i64 {
                    *c = [f64::from_bits(p.t as u64), p.last];
                }
            }
        }
    }

    fn value(&self, r: Reduce) -> Option<f64> {
        let c = &self.0;
        match r {
            Reduce::Mean => (c[1] > 0.0).then(|| c[0] / c[1]),
            Reduce::Min | Reduce::Max => (c[1] > 0.0).then_some(c[0]),
            Reduce::Last => (self.last_t() != i64::MIN).then_some(c[1]),
        }
    }
}

/// A rollup interval's accumulated points.
#[derive(Debug, Clone, Copy)]
struct Acc {
    min: f64,
    max: f64,
    sum: f64,
    count: f64,
    last_t: i64,
    last: f64,
}

impl Default for Acc {
    fn default() -> Acc {
        Acc {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            sum: 0.0,
            count: 0.0,
            last_t: i64::MIN,
            last: f64::NAN,
        }
    }
}

impl Acc {
    fn add(&mut self, t: i64, v: f64) {
        if v.is_nan() {
            return;
        }
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        self.count += 1.0;
        if t >= self.last_t {
            self.last_t = t;
            self.last = v;
        }
    }

    fn merge_acc(&mut self, a: &Acc) {
        if a.count <= 0.0 {
            return;
        }
        self.min = self.min.min(a.min);
        self.max = self.max.max(a.max);
        self.sum += a.sum;
        self.count += a.count;
        if a.last_t >= self.last_t {
            self.last_t = a.last_t;
            self.last = a.last;
        }
    }

    fn point(&self, t: i64) -> RollupPoint {
        if self.count <= 0.0 {
            return RollupPoint {
                t,
                min: f64::NAN,
                max: f64::NAN,
                last: f64::NAN,
                mean: f64::NAN,
                count: 0.0,
            };
        }
        RollupPoint {
            t,
            min: self.min,
            max: self.max,
            last: self.last,
            mean: self.sum / self.count,
            count: self.count,
        }
    }
}

#[cfg(test)]
mod tests;
