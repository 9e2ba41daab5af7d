//! The load engines, generic over how a request reaches the target
//! ([`Connector`]), so that tests can drive them with a fake target on tokio's
//! paused (virtual) clock.
//!
//! - [`open_loop`]: a scheduler puts request `i` on a bounded queue at
//!   `start + i / rate` ([`Plan::offset`]); a pool of connection tasks takes
//!   requests off the queue in order. A request's latency runs from its
//!   scheduled time, so waiting in the queue counts. A full queue drops the
//!   request; a request still unanswered at its scheduled time plus the timeout
//!   fails as a timeout, whether it was on the wire or still queued. Every
//!   request therefore ends by the last one's deadline, and the run ends there
//!   (plus a short grace for the tasks to report).
//! - [`closed_loop`]: each connection task sends its next request as soon as the
//!   last one ended, for the maximum throughput; latency from the actual send.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::schedule::Plan;
use crate::stats::{Failure, Mode, Report, Tally, latency_histogram, record_us};

/// How long, past the last deadline, the engine waits for its tasks to report
/// before it stops them and counts what they had not ended as timeouts.
const GRACE: Duration = Duration::from_secs(1);

/// After a failed connect, how long a closed-loop task waits before the next
/// try, so that a target that refuses does not turn the loop into a spin.
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// Opens connections to the target.
pub trait Connector: Clone + Send + Sync + 'static {
    /// One open connection.
    type Conn: Connection;
    /// Opens a connection (TCP connect and handshake).
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, Failure>> + Send;
}

/// One keep-alive connection to the target.
pub trait Connection: Send + 'static {
    /// Sends one request and reads the whole response; returns its status.
    fn request(&mut self) -> impl Future<Output = Result<u16, Failure>> + Send;
    /// Whether the connection can no longer carry requests (the peer closed it).
    fn is_closed(&self) -> bool;
}

/// How the scheduler waits for the next request's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacer {
    /// A tokio timer. Its resolution is one millisecond, so requests go out up
    /// to a millisecond late (in bursts, each still timed from its own
    /// schedule); it follows tokio's paused clock, which is what tests need.
    Timer,
    /// An OS thread of its own sleeping with the kernel's high-resolution timer:
    /// tens of microseconds late instead of up to a millisecond. Real runs use it.
    Thread,
}

/// The settings of an open-loop run.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    /// The schedule.
    pub plan: Plan,
    /// How the scheduler waits.
    pub pacer: Pacer,
    /// The number of connections (and connection tasks).
    pub connections: usize,
    /// How many scheduled requests may wait for a connection; more are dropped.
    pub queue: usize,
    /// How long after its scheduled time a request fails as a timeout.
    pub timeout: Duration,
}

/// The settings of a closed-loop run.
#[derive(Debug, Clone)]
pub struct ClosedLoop {
    /// Requests that end before this are left out of the report.
    pub warmup: Duration,
    /// The measured window after the warmup.
    pub measured: Duration,
    /// The number of connections, each with one request in flight at a time.
    pub connections: usize,
    /// How long one request may take before it fails as a timeout.
    pub timeout: Duration,
}

/// Runs `config` against `connector`; `url` only labels the report.
pub async fn open_loop<C: Connector>(connector: C, config: &OpenLoop, url: &str) -> Report {
    let plan = config.plan;
    let connections = config.connections.max(1);
    let start = Instant::now();
    let window = (start + plan.warmup, start + plan.length());
    let (tx, rx) = mpsc::channel::<Job>(config.queue.max(1));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));

    let tallies: Vec<Arc<Mutex<Tally>>> = (0..connections)
        .map(|_| Arc::new(Mutex::new(Tally::new())))
        .collect();
    let mut workers = tokio::task::JoinSet::new();
    for tally in &tallies {
        let worker = OpenWorker {
            connector: connector.clone(),
            queue: rx.clone(),
            tally: tally.clone(),
            timeout: config.timeout,
            window,
        };
        workers.spawn(worker.run());
    }
    drop(rx);

    let emitter = Emitter::new(plan, start, tx);
    let emitter = match config.pacer {
        Pacer::Timer => pace_on_timer(emitter).await,
        // The thread ends with the schedule; if it panicked, there is no
        // report to make.
        Pacer::Thread => tokio::task::spawn_blocking(move || pace_on_thread(emitter))
            .await
            .expect("the scheduler thread does not panic"),
    };
    let Emitter {
        dropped,
        lag_us,
        queue,
        ..
    } = emitter;
    // Closing the queue lets the workers end once it is empty.
    drop(queue);

    let last_deadline = start + plan.offset(plan.total().saturating_sub(1)) + config.timeout;
    let all_ended = async { while workers.join_next().await.is_some() {} };
    if tokio::time::timeout_at(last_deadline + GRACE, all_ended)
        .await
        .is_err()
    {
        workers.abort_all();
    }

    let mut tally = merged(&tallies);
    let scheduled = plan.total() - plan.first_measured();
    // Requests that had not ended when the run stopped missed their deadline.
    let unended = scheduled.saturating_sub(dropped + tally.ended());
    tally.errors_timeout += unended;
    Report {
        mode: Mode::Open {
            rate: plan.rate.get(),
        },
        url: url.to_owned(),
        connections,
        warmup: plan.warmup,
        window: plan.measured,
        scheduled,
        dropped,
        tally,
        lag_us: Some(lag_us),
    }
}

/// Runs `config` against `connector`; `url` only labels the report.
pub async fn closed_loop<C: Connector>(connector: C, config: &ClosedLoop, url: &str) -> Report {
    let connections = config.connections.max(1);
    let start = Instant::now();
    let window = (
        start + config.warmup,
        start + config.warmup + config.measured,
    );
    let tallies: Vec<Arc<Mutex<Tally>>> = (0..connections)
        .map(|_| Arc::new(Mutex::new(Tally::new())))
        .collect();
    let mut workers = tokio::task::JoinSet::new();
    for tally in &tallies {
        let worker = ClosedWorker {
            connector: connector.clone(),
            tally: tally.clone(),
            timeout: config.timeout,
            window,
        };
        workers.spawn(worker.run());
    }
    let all_ended = async { while workers.join_next().await.is_some() {} };
    if tokio::time::timeout_at(window.1 + config.timeout + GRACE, all_ended)
        .await
        .is_err()
    {
        workers.abort_all();
    }
    let tally = merged(&tallies);
    Report {
        mode: Mode::Closed,
        url: url.to_owned(),
        connections,
        warmup: config.warmup,
        window: config.measured,
        scheduled: tally.ended(),
        dropped: 0,
        tally,
        lag_us: None,
    }
}

/// One scheduled request.
#[derive(Debug, Clone, Copy)]
struct Job {
    /// When it was due: its latency runs from here.
    scheduled: Instant,
    /// Whether it is reported (not in the warmup).
    measured: bool,
}

/// The scheduler's state: puts each request of the plan on the queue once it
/// is due, whichever pacer wakes it.
struct Emitter {
    plan: Plan,
    start: Instant,
    queue: mpsc::Sender<Job>,
    /// The next request to put on the queue.
    next: u64,
    /// Reported requests that found the queue full.
    dropped: u64,
    /// For reported requests, how late the scheduler put them on the queue.
    lag_us: Histogram<u64>,
}

impl Emitter {
    fn new(plan: Plan, start: Instant, queue: mpsc::Sender<Job>) -> Self {
        Emitter {
            plan,
            start,
            queue,
            next: 0,
            dropped: 0,
            lag_us: latency_histogram(),
        }
    }

    /// Puts every request due by `now` on the queue, each with its own
    /// scheduled time; returns when the next one is due, or `None` when the
    /// schedule is done (or every worker has gone).
    fn emit_due(&mut self, now: Instant) -> Option<Instant> {
        let due = self.plan.due(now.saturating_duration_since(self.start));
        while self.next < due {
            let scheduled = self.start + self.plan.offset(self.next);
            let job = Job {
                scheduled,
                measured: self.plan.is_measured(self.next),
            };
            if job.measured {
                record_us(&mut self.lag_us, now.saturating_duration_since(scheduled));
            }
            match self.queue.try_send(job) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(job)) => {
                    self.dropped += u64::from(job.measured);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return None,
            }
            self.next += 1;
        }
        (self.next < self.plan.total()).then(|| self.start + self.plan.offset(self.next))
    }
}

async fn pace_on_timer(mut emitter: Emitter) -> Emitter {
    while let Some(at) = emitter.emit_due(Instant::now()) {
        tokio::time::sleep_until(at).await;
    }
    emitter
}

fn pace_on_thread(mut emitter: Emitter) -> Emitter {
    while let Some(at) = emitter.emit_due(Instant::now()) {
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }
    emitter
}

struct OpenWorker<C: Connector> {
    connector: C,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>,
    tally: Arc<Mutex<Tally>>,
    timeout: Duration,
    window: (Instant, Instant),
}

impl<C: Connector> OpenWorker<C> {
    async fn run(self) {
        let mut conn: Option<C::Conn> = None;
        loop {
            // Whoever holds the lock waits for the next job; the others wait for
            // the lock in turn (tokio's mutex is fair), so jobs go out in order.
            let job = self.queue.lock().await.recv().await;
            let Some(job) = job else { return };
            let deadline = job.scheduled + self.timeout;
            let outcome = if Instant::now() >= deadline {
                // Expired while queued: it is not sent at all, and the
                // connection stays as it is.
                Err(Failure::Timeout)
            } else {
                let outcome =
                    tokio::time::timeout_at(deadline, exchange(&self.connector, &mut conn))
                        .await
                        .unwrap_or(Err(Failure::Timeout));
                if outcome.is_err() {
                    // A broken connection, or one with a request abandoned on
                    // it, is not reused.
                    conn = None;
                }
                outcome
            };
            if !job.measured {
                continue;
            }
            let now = Instant::now();
            let in_window = self.window.0 <= now && now <= self.window.1;
            record(&self.tally, outcome, now - job.scheduled, in_window);
        }
    }
}

struct ClosedWorker<C: Connector> {
    connector: C,
    tally: Arc<Mutex<Tally>>,
    timeout: Duration,
    window: (Instant, Instant),
}

impl<C: Connector> ClosedWorker<C> {
    async fn run(self) {
        let mut conn: Option<C::Conn> = None;
        loop {
            let sent = Instant::now();
            if sent >= self.window.1 {
                return;
            }
            let outcome = tokio::time::timeout(self.timeout, exchange(&self.connector, &mut conn))
                .await
                .unwrap_or(Err(Failure::Timeout));
            if outcome.is_err() {
                conn = None;
            }
            let now = Instant::now();
            if sent >= self.window.0 {
                let in_window = now <= self.window.1;
                record(&self.tally, outcome, now - sent, in_window);
            }
            if outcome == Err(Failure::Connect) {
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

/// Sends one request on `conn`, (re)connecting first when there is none or the
/// peer has closed it.
async fn exchange<C: Connector>(connector: &C, conn: &mut Option<C::Conn>) -> Result<u16, Failure> {
    if conn.as_ref().is_some_and(Connection::is_closed) {
        *conn = None;
    }
    let open = match conn {
        Some(open) => open,
        None => conn.insert(connector.connect().await?),
    };
    open.request().await
}

fn record(tally: &Mutex<Tally>, outcome: Result<u16, Failure>, latency: Duration, in_window: bool) {
    // The lock is only ever held for a counter update: a poisoned one still
    // holds valid counts.
    let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
    match outcome {
        Ok(status) => tally.response(status, latency, in_window),
        Err(failure) => tally.failure(failure),
    }
}

fn merged(tallies: &[Arc<Mutex<Tally>>]) -> Tally {
    let mut all = Tally::new();
    for tally in tallies {
        all.merge(&tally.lock().unwrap_or_else(|e| e.into_inner()));
    }
    all
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A target on the virtual clock: the `n`th request (counted over all
    /// connections) takes `delay(n)`, and connects fail while `refuse` is set.
    #[derive(Clone)]
    struct Fake {
        served: Arc<AtomicU64>,
        delay: fn(u64) -> Duration,
        refuse: bool,
    }

    impl Fake {
        fn new(delay: fn(u64) -> Duration) -> Self {
            Fake {
                served: Arc::new(AtomicU64::new(0)),
                delay,
                refuse: false,
            }
        }
    }

    impl Connector for Fake {
        type Conn = Fake;
        async fn connect(&self) -> Result<Fake, Failure> {
            if self.refuse {
                Err(Failure::Connect)
            } else {
                Ok(self.clone())
            }
        }
    }

    impl Connection for Fake {
        async fn request(&mut self) -> Result<u16, Failure> {
            let n = self.served.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep((self.delay)(n)).await;
            Ok(200)
        }
        fn is_closed(&self) -> bool {
            false
        }
    }

    fn open(rate: u32, measured_ms: u64, connections: usize, queue: usize) -> OpenLoop {
        OpenLoop {
            plan: Plan {
                rate: NonZeroU32::new(rate).expect("non-zero rate"),
                warmup: Duration::ZERO,
                measured: Duration::from_millis(measured_ms),
            },
            pacer: Pacer::Timer,
            connections,
            queue,
            timeout: Duration::from_secs(5),
        }
    }

    fn count_at_least(report: &Report, us: u64) -> u64 {
        report.tally.latency_us.count_between(us, u64::MAX)
    }

    /// One connection, 100 req/s, the first request stalls 100 ms: requests 1
    /// to 9 were due every 10 ms meanwhile, so their latencies include the wait
    /// (90, 80, ... 10 ms). A closed-loop measurement would see one slow request.
    #[tokio::test(start_paused = true)]
    async fn a_stall_delays_the_requests_scheduled_behind_it() {
        let stall_first = |n| {
            if n == 0 {
                Duration::from_millis(100)
            } else {
                Duration::ZERO
            }
        };
        let report = open_loop(Fake::new(stall_first), &open(100, 200, 1, 100), "fake").await;
        assert_eq!(report.scheduled, 20);
        assert_eq!(report.tally.ok, 20);
        let lat = &report.tally.latency_us;
        assert!(lat.equivalent(lat.max(), 100_000), "max {}", lat.max());
        // 100, 90, 80, 70, 60 and 50 ms: six requests waited at least 50 ms.
        assert_eq!(count_at_least(&report, 49_900), 6);
        // 100 down to 10 ms: ten requests waited at least 10 ms.
        assert_eq!(count_at_least(&report, 9_990), 10);
        // The rest were served at their scheduled time.
        assert_eq!(lat.count_between(0, 0), 10);
    }

    /// With a free connection for every request, latency is service time alone.
    #[tokio::test(start_paused = true)]
    async fn latency_is_service_time_when_nothing_waits() {
        let report = open_loop(
            Fake::new(|_| Duration::from_millis(3)),
            &open(1000, 100, 8, 80),
            "fake",
        )
        .await;
        assert_eq!((report.scheduled, report.tally.ok), (100, 100));
        let lat = &report.tally.latency_us;
        assert_eq!(lat.min(), 3000);
        assert!(lat.equivalent(lat.max(), 3000));
    }

    /// One connection stuck for longer than the timeout and a queue of two:
    /// request 0 is on the wire, 1 and 2 wait, the other 7 are dropped. All
    /// three that were sent time out, and the run still ends.
    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_and_a_stuck_target_times_out() {
        let mut config = open(100, 100, 1, 2);
        config.timeout = Duration::from_secs(1);
        let started = Instant::now();
        let report = open_loop(Fake::new(|_| Duration::from_secs(3600)), &config, "fake").await;
        assert_eq!(report.scheduled, 10);
        assert_eq!(report.dropped, 7);
        assert_eq!(report.sent(), 3);
        assert_eq!(report.tally.errors_timeout, 3);
        assert_eq!(report.tally.ended(), report.sent());
        // Every request ended by its deadline: the run did not need the grace.
        assert!(Instant::now() - started <= Duration::from_millis(90) + config.timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn warmup_requests_are_sent_but_not_reported() {
        let mut config = open(100, 100, 2, 20);
        config.plan.warmup = Duration::from_millis(50);
        let fake = Fake::new(|_| Duration::from_millis(1));
        let report = open_loop(fake.clone(), &config, "fake").await;
        assert_eq!(fake.served.load(Ordering::SeqCst), 15);
        assert_eq!((report.scheduled, report.tally.ok), (10, 10));
        assert_eq!(report.tally.ok_in_window, 10);
        assert_eq!(report.throughput(), 100.0);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_connects_count_as_errors() {
        let mut fake = Fake::new(|_| Duration::ZERO);
        fake.refuse = true;
        let report = open_loop(fake, &open(100, 100, 2, 20), "fake").await;
        assert_eq!(report.tally.errors_connect, 10);
        assert_eq!(report.tally.ended(), report.sent());
    }

    /// Closed loop on 2 connections, 1 ms per request, 100 ms window after a
    /// 10 ms warmup: 2 requests per millisecond.
    #[tokio::test(start_paused = true)]
    async fn closed_loop_keeps_every_connection_busy() {
        let config = ClosedLoop {
            warmup: Duration::from_millis(10),
            measured: Duration::from_millis(100),
            connections: 2,
            timeout: Duration::from_secs(1),
        };
        let report = closed_loop(Fake::new(|_| Duration::from_millis(1)), &config, "fake").await;
        assert_eq!(report.tally.ok, 200);
        assert_eq!(report.tally.ok_in_window, 200);
        assert_eq!(report.throughput(), 2000.0);
        assert_eq!(report.tally.latency_us.max(), 1000);
    }
}
