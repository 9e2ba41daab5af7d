//! A deterministic simulation of the whole control loop, FoundationDB-style: the
//! real controller services (`Workloads` with its reconciler and scheduler, the
//! `Registry`, the `EventLog`, on a `MemoryStore` that outlives controller
//! "processes") and the real agent decision core (`runtime::reconcile::Reconciler`),
//! on a virtual clock, with a simulated link and container runtime. A seeded
//! schedule injects controller crashes and restarts, agent crashes, link drops,
//! slow container starts, full disks (the store refuses every write for a while),
//! rollouts to a missing image and operator actions (apply, rollout, stop,
//! purge, scale, suspend and resume a VM); the invariants are checked after
//! every step.
//!
//! - CI runs [`DEFAULT_SEEDS`] seeds of [`SIM_MINUTES`] simulated minutes each.
//! - `NOVACRON_SIM_SEEDS=10000 cargo nextest run -p novacron-tests --test control_loop_sim`
//!   runs more (seeds are split over the available cores).
//! - `NOVACRON_SIM_SEED=N` replays one seed; a failing seed prints that command.
//!
//! Invariants:
//! 1. no acknowledged job is lost (every applied job is listed, across restarts,
//!    until it is purged);
//! 2. never two running copies of one allocation;
//! 3. a rolling update never leaves fewer serving replicas than
//!    `replicas - maxParallel` (checked while no crash or link fault disturbs the
//!    fleet);
//! 4. every desired change reaches its node within 2 heartbeats after its link is
//!    up (the agent applies the controller's newest `(epoch, generation)`);
//! 5. after the faults stop, the store and the runtime converge: every running
//!    allocation has exactly one running container, on its node, and every running
//!    container is a desired allocation's;
//! 6. the API never lists a job (or a job version) that is not in the store;
//! 7. a suspended VM's paused guest is never stopped for failing its health
//!    checks (it answers none while paused);
//! 8. after the faults stop, the VM's running guest is paused exactly when its
//!    last acknowledged suspension says so, and the controller's view of its
//!    allocation (`suspended`) agrees.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use novacron_agent::runtime::ContainerStatus;
use novacron_agent::runtime::reconcile::{
    Action, LaunchError, Observed, Outcome, Reconciler, ReconcilerConfig, Run,
};
use novacron_common::pki::CertInfo;
use novacron_common::wire::{
    AllocState, Capabilities, Capacity, CloseCode, DesiredAllocations, Hello, PROTOCOL_VERSION,
    VmCapability,
};
use novacron_controller::events::EventLog;
use novacron_controller::registry::{LiveLink, Registry, RegistryConfig};
use novacron_controller::store::{MemoryStore, Store};
use novacron_controller::workloads::Workloads;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

/// Seeds every CI run checks.
const DEFAULT_SEEDS: u64 = 200;
/// Simulated minutes per seed.
const SIM_MINUTES: u64 = 10;
/// One step of the virtual clock (and the agents' heartbeat).
const STEP: Duration = Duration::from_secs(1);
/// The last minute has no faults: the fleet must converge in it.
const QUIET: Duration = Duration::from_secs(60);
/// Nodes of the simulated fleet.
const NODES: usize = 3;
/// The service whose rollouts are watched (invariant 3).
const WEB: &str = "web";
const WEB_REPLICAS: u32 = 3;
const WEB_MAX_PARALLEL: u32 = 1;
/// An image no node has.
const MISSING_IMAGE: &str = "registry.invalid/missing:404";
/// The virtual machine job, suspended and resumed by the operator.
const VM: &str = "vmy";

#[test]
fn the_control_loop_keeps_its_invariants_under_seeded_faults() {
    let seeds: Vec<u64> = match std::env::var("NOVACRON_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("NOVACRON_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("NOVACRON_SIM_SEEDS")
                .ok()
                .map_or(DEFAULT_SEEDS, |s| {
                    s.parse().expect("NOVACRON_SIM_SEEDS is a number")
                });
            (0..n).collect()
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| seeds.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let results: Vec<Result<Stats, (u64, String)>> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|seed| match Sim::new(seed).run() {
                            Ok(stats) => {
                                if std::env::var_os("NOVACRON_SIM_SEED").is_some() {
                                    eprintln!("seed {seed}: {stats:?}");
                                }
                                Ok(stats)
                            }
                            Err(e) => Err((seed, e)),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a simulation thread panicked"))
            .collect()
    });
    let (done, failures): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    let done: Vec<Stats> = done.into_iter().filter_map(Result::ok).collect();
    let mut failures: Vec<(u64, String)> = failures.into_iter().filter_map(Result::err).collect();
    failures.sort();
    for (seed, why) in &failures {
        eprintln!(
            "seed {seed} failed: {why}\n  replay: NOVACRON_SIM_SEED={seed} cargo nextest run -p novacron-tests --test control_loop_sim"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} seeds broke an invariant (first: seed {} — {})",
        failures.len(),
        seeds.len(),
        failures[0].0,
        failures[0].1
    );
    // Checked once every seed passed, so that a broken invariant is what a
    // failing run reports.
    // The seeds together must have exercised the loop: served the watched job in
    // full, restarted controllers, rolled out (a single seed may legitimately do
    // none of it, e.g. when its first rollout uses the missing image before any
    // version was stable, so the job never serves).
    if seeds.len() >= 20 {
        assert!(
            done.iter().any(|s| s.web_full_steps > 0),
            "{WEB} never served in any seed"
        );
        assert!(
            done.iter()
                .any(|s| s.controller_restarts > 0 && s.rollouts > 0 && s.disk_full > 0)
        );
        assert!(
            done.iter()
                .any(|s| s.suspensions > 1 && s.agent_crashes > 0),
            "no seed suspended and resumed the VM across an agent crash"
        );
        assert!(
            done.iter().any(|s| s.purges > 0),
            "no seed purged a stopped job"
        );
    }
}

/// A seed replays exactly: the same faults, decisions and allocation ids.
#[test]
fn a_seed_replays_identically() {
    for seed in [0, 1, 23] {
        let first = Sim::new(seed).run().expect("a passing seed");
        let again = Sim::new(seed).run().expect("a passing seed");
        assert_eq!(format!("{first:?}"), format!("{again:?}"), "seed {seed}");
    }
}

/// A link as the registry sees it: closing it is recorded, nothing else.
#[derive(Debug, Default)]
struct SimLink;

impl LiveLink for SimLink {
    fn close(&self, _code: CloseCode, _reason: &str) {}
}

/// One container of the simulated runtime.
#[derive(Debug, Clone)]
struct Container {
    alloc: String,
    spec_hash: String,
    image: String,
    running: bool,
    /// Started at this step or later (a slow start).
    ready_at: Duration,
    /// Paused (a suspended guest).
    paused: bool,
}

/// One node: the agent's real decision core and the node's containers.
#[derive(Debug)]
struct Node {
    name: String,
    agent: Reconciler,
    containers: BTreeMap<String, Container>,
    link_up: bool,
    /// How long the link has been up, in steps.
    up_steps: u32,
    /// Down until this time (link drop or agent crash).
    down_until: Duration,
    conn: Option<u64>,
    rx: Option<watch::Receiver<Arc<DesiredAllocations>>>,
    /// The oldest desired set the agent has not applied yet, and since when.
    pending: Option<((u64, u64), Duration)>,
}

/// A controller "process": its in-memory services over the shared store.
struct Controller {
    registry: Arc<Registry>,
    workloads: Arc<Workloads>,
}

struct Sim {
    seed: u64,
    rng: StdRng,
    store: Arc<MemoryStore>,
    controller: Controller,
    nodes: Vec<Node>,
    base: Instant,
    wall0: SystemTime,
    now: Duration,
    /// Jobs the API acknowledged and did not purge since.
    acknowledged: BTreeSet<String>,
    /// Until when a crash or link fault may legitimately lower serving replicas.
    disturbed_until: Duration,
    /// The web job's version whose rollout invariant 3 is armed for (after it
    /// was serving `WEB_REPLICAS` replicas undisturbed).
    web_armed: bool,
    next_container: u64,
    versions: u32,
    stats: Stats,
    /// The disk is full until then.
    full_until: Duration,
    /// The VM's suspension as last acknowledged by the API.
    suspended: bool,
    /// A broken invariant seen while an action was applied (checked next).
    broken: Option<String>,
}

/// What a seed did, so that a run that exercised nothing cannot pass.
#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    controller_restarts: u32,
    agent_crashes: u32,
    link_drops: u32,
    rollouts: u32,
    bad_rollouts: u32,
    disk_full: u32,
    /// Acknowledged suspensions and resumptions of the VM.
    suspensions: u32,
    /// Acknowledged purges of the other job.
    purges: u32,
    /// Steps in which web served all its replicas.
    web_full_steps: u32,
    containers_started: u64,
    /// A digest of the final allocations (ids, nodes, states): the same seed
    /// gives the same digest.
    fingerprint: u64,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let store = Arc::new(MemoryStore::new());
        let base = Instant::now();
        let wall0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let controller = Controller::start(store.clone(), base, seed);
        let nodes = (0..NODES)
            .map(|i| {
                let name = format!("n{i}");
                controller
                    .registry
                    .enrolled(
                        &name,
                        &CertInfo {
                            serial: format!("{i:02x}"),
                            not_before: wall0,
                            not_after: wall0 + Duration::from_secs(86_400 * 90),
                        },
                        wall0,
                    )
                    .expect("enroll");
                Node {
                    agent: Reconciler::new(ReconcilerConfig::new(&name)),
                    name,
                    containers: BTreeMap::new(),
                    link_up: false,
                    up_steps: 0,
                    down_until: Duration::ZERO,
                    conn: None,
                    rx: None,
                    pending: None,
                }
            })
            .collect();
        Sim {
            seed,
            rng: StdRng::seed_from_u64(seed),
            store,
            controller,
            nodes,
            base,
            wall0,
            now: Duration::ZERO,
            acknowledged: BTreeSet::new(),
            disturbed_until: Duration::ZERO,
            web_armed: false,
            next_container: 0,
            versions: 0,
            stats: Stats::default(),
            full_until: Duration::ZERO,
            suspended: false,
            broken: None,
        }
    }

    fn instant(&self) -> Instant {
        self.base + self.now
    }

    fn wall(&self) -> SystemTime {
        self.wall0 + self.now
    }

    fn run(mut self) -> Result<Stats, String> {
        self.apply(&web_manifest("v0", "busybox:1", WEB_REPLICAS))?;
        self.apply(&other_manifest("batchy", 1))?;
        self.apply(&vm_manifest())?;
        let end = Duration::from_secs(SIM_MINUTES * 60);
        while self.now < end {
            let faults = self.now + QUIET < end;
            self.store.set_full(self.full_until > self.now);
            if faults {
                self.inject();
            } else {
                self.heal();
            }
            self.step();
            self.check(faults)
                .map_err(|e| format!("at {:?}: {e}", self.now))?;
            self.now += STEP;
        }
        self.converged()
            .map_err(|e| format!("after the quiet minute: {e}"))?;
        self.stats.containers_started = self.next_container;
        self.stats.fingerprint = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for a in self.controller.workloads.allocations(None, None) {
                (a.id, a.node, a.state.to_string(), a.desired_run).hash(&mut h);
            }
            h.finish()
        };
        Ok(self.stats)
    }

    fn apply(&mut self, manifest: &(String, String)) -> Result<(), String> {
        let (name, text) = manifest;
        match self
            .controller
            .workloads
            .apply("sim.yaml", text, "sim", self.wall())
        {
            Ok(_) => {
                self.acknowledged.insert(name.clone());
                Ok(())
            }
            Err(e) => Err(format!("apply {name} refused: {e}")),
        }
    }

    /// Draws this step's faults and operator actions.
    fn inject(&mut self) {
        let roll = self.rng.random_range(0..1000);
        match roll {
            // Controller crash (or restart): its memory is gone, the store stays.
            // (Not while the disk is full: a controller that cannot raise its
            // link epoch does not start.)
            0..=4 if self.full_until <= self.now => {
                self.stats.controller_restarts += 1;
                let ids = self.rng.random();
                self.controller = Controller::start(self.store.clone(), self.instant(), ids);
                for n in &mut self.nodes {
                    n.link_up = false;
                    n.up_steps = 0;
                    n.conn = None;
                    n.rx = None;
                }
                self.disturb(30);
            }
            // An agent crash: its decision core restarts empty; containers stay.
            5..=9 => {
                let i = self.rng.random_range(0..NODES);
                let down = Duration::from_secs(self.rng.random_range(1..20));
                let node = &mut self.nodes[i];
                node.agent = Reconciler::new(ReconcilerConfig::new(&node.name));
                self.stats.agent_crashes += 1;
                self.drop_link(i, down);
                self.disturb(60);
            }
            // A link drop (partition) of a few seconds.
            10..=17 => {
                let i = self.rng.random_range(0..NODES);
                let down = Duration::from_secs(self.rng.random_range(1..15));
                self.stats.link_drops += 1;
                self.drop_link(i, down);
                self.disturb(60);
            }
            // A rollout of web to a new version.
            18..=22 => {
                self.versions += 1;
                let v = format!("v{}", self.versions);
                self.stats.rollouts += 1;
                let _ = self.apply(&web_manifest(&v, "busybox:1", WEB_REPLICAS));
            }
            // A rollout of web to an image that does not exist.
            23..=25 => {
                self.versions += 1;
                let v = format!("v{}", self.versions);
                self.stats.bad_rollouts += 1;
                let _ = self.apply(&web_manifest(&v, MISSING_IMAGE, WEB_REPLICAS));
            }
            // Scale or re-apply the other job, or stop it.
            26..=29 => {
                let replicas = self.rng.random_range(0..4);
                let _ = self.apply(&other_manifest("batchy", replicas));
            }
            30 => {
                let _ = self.controller.workloads.stop("batchy", "sim");
            }
            // The operator purges the other job: refused unless it is stopped
            // with every allocation ended; then it is gone (not lost).
            38..=40 if self.controller.workloads.purge("batchy", "sim").is_ok() => {
                self.acknowledged.remove("batchy");
                self.stats.purges += 1;
            }
            // The operator suspends or resumes the VM.
            34..=37 => {
                let want = !self.suspended;
                if self
                    .controller
                    .workloads
                    .set_suspended(VM, want, "sim")
                    .is_ok()
                {
                    self.suspended = want;
                    self.stats.suspensions += 1;
                }
            }
            // The disk fills up for a while.
            31..=33 => {
                self.stats.disk_full += 1;
                self.full_until = self.now + Duration::from_secs(self.rng.random_range(3..30));
            }
            _ => {}
        }
    }

    fn disturb(&mut self, secs: u64) {
        self.disturbed_until = self
            .disturbed_until
            .max(self.now + Duration::from_secs(secs));
        self.web_armed = false;
    }

    fn drop_link(&mut self, i: usize, down: Duration) {
        let now = self.instant();
        let node = &mut self.nodes[i];
        if let Some(conn) = node.conn.take() {
            self.controller
                .registry
                .disconnect(&node.name, conn, now, false);
        }
        node.link_up = false;
        node.up_steps = 0;
        node.rx = None;
        node.down_until = self.now + down;
    }

    fn heal(&mut self) {
        self.full_until = self.full_until.min(self.now);
        for n in &mut self.nodes {
            n.down_until = n.down_until.min(self.now);
        }
    }

    /// One step: links come up, desired sets are delivered, agents act, report,
    /// and the controller reconciles.
    fn step(&mut self) {
        let now = self.instant();
        let wall = self.wall();
        self.store.set_full(self.full_until > self.now);
        for i in 0..self.nodes.len() {
            if !self.nodes[i].link_up && self.nodes[i].down_until <= self.now {
                let name = self.nodes[i].name.clone();
                let hello = Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: "sim".into(),
                    node_name: name.clone(),
                    instance: self.seed,
                    labels: BTreeMap::from([("zone".into(), format!("z{i}"))]),
                    capacity: Capacity {
                        cpu_millis: 4000,
                        memory_bytes: 8 << 30,
                        disk_bytes: 100 << 30,
                        ..Capacity::default()
                    },
                    capabilities: Capabilities {
                        vm: Some(VmCapability {
                            qemu_version: "7.2.0".into(),
                            accelerator: "tcg".into(),
                            kvm_unusable: None,
                            probed: true,
                            bridge: None,
                        }),
                        ..Capabilities::default()
                    },
                };
                let addr: SocketAddr = ([127, 0, 0, 1], 7000 + i as u16).into();
                match self.controller.registry.connect(
                    &name,
                    &hello,
                    Arc::new(SimLink),
                    addr,
                    now,
                    wall,
                ) {
                    Ok((conn, _)) => {
                        let node = &mut self.nodes[i];
                        node.conn = Some(conn);
                        node.link_up = true;
                        node.up_steps = 0;
                        node.rx = Some(self.controller.workloads.subscribe(&name));
                    }
                    // A full disk refuses the connection (the node record cannot be
                    // saved); the agent tries again, as the real one does.
                    Err(novacron_controller::registry::RegistryError::Store(e))
                        if e.is_disk_full() => {}
                    Err(e) => panic!("connect {name}: {e}"),
                }
            }
        }
        for i in 0..self.nodes.len() {
            self.agent_step(i);
        }
        if let Err(e) = self.controller.workloads.tick(now, wall) {
            assert!(
                e.is_disk_full(),
                "the simulated store fails only when full: {e}"
            );
        }
        for n in &mut self.nodes {
            if n.link_up {
                n.up_steps += 1;
            }
        }
    }

    fn agent_step(&mut self, i: usize) {
        let now = self.instant();
        let at = self.now;
        let node = &mut self.nodes[i];
        if node.link_up
            && let Some(rx) = &node.rx
        {
            let desired = (**rx.borrow()).clone();
            node.agent.apply(desired);
        }
        let observed: Vec<Observed> = node
            .containers
            .iter()
            .map(|(id, c)| Observed {
                container_id: id.clone(),
                alloc_id: c.alloc.clone(),
                spec_hash: c.spec_hash.clone(),
                status: if c.running && c.ready_at <= at {
                    ContainerStatus::Running
                } else if c.running {
                    ContainerStatus::Created
                } else {
                    ContainerStatus::Exited {
                        code: 137,
                        oom_killed: false,
                        error: String::new(),
                    }
                },
                started_at_unix_ms: None,
                ip: None,
                published: Vec::new(),
                paused: c.paused,
            })
            .collect();
        let token = node.agent.observe_begin();
        node.agent.observe(now, token, observed);
        for action in node.agent.plan(now, 16) {
            let outcome = match action {
                Action::Launch {
                    alloc,
                    spec,
                    spec_hash,
                    replace,
                } => {
                    if let Some(old) = replace {
                        node.containers.remove(&old);
                    }
                    let result = if spec.task.image == MISSING_IMAGE {
                        Err(LaunchError::ImageMissing {
                            image: spec.task.image.clone(),
                        })
                    } else {
                        self.next_container += 1;
                        let id = format!("c{}", self.next_container);
                        let slow = self.rng.random_range(0..10) == 0;
                        node.containers.insert(
                            id.clone(),
                            Container {
                                alloc: alloc.clone(),
                                spec_hash: spec_hash.clone(),
                                image: spec.task.image.clone(),
                                running: true,
                                ready_at: at + if slow { 3 * STEP } else { Duration::ZERO },
                                paused: false,
                            },
                        );
                        Ok(Run {
                            container_id: id,
                            started_at_unix_ms: None,
                            ip: None,
                            published: Vec::new(),
                            image_digest: None,
                        })
                    };
                    Outcome::Launched {
                        alloc,
                        spec_hash,
                        result,
                    }
                }
                Action::Start {
                    alloc,
                    container_id,
                } => {
                    let result = match node.containers.get_mut(&container_id) {
                        Some(c) => {
                            c.running = true;
                            Ok(Run {
                                container_id: container_id.clone(),
                                started_at_unix_ms: None,
                                ip: None,
                                published: Vec::new(),
                                image_digest: None,
                            })
                        }
                        None => Err(novacron_agent::runtime::RuntimeError::NotFound {
                            op: "start",
                            message: container_id.clone(),
                        }),
                    };
                    Outcome::Started {
                        alloc,
                        container_id,
                        result,
                    }
                }
                Action::Remove {
                    alloc,
                    container_id,
                } => {
                    node.containers.remove(&container_id);
                    Outcome::Removed {
                        alloc,
                        container_id,
                        result: Ok(()),
                    }
                }
                Action::Stop {
                    alloc,
                    container_id,
                } => {
                    if let Some(c) = node.containers.get_mut(&container_id) {
                        if c.paused && self.broken.is_none() {
                            self.broken = Some(format!(
                                "the paused guest {container_id} of {alloc} on {} was stopped for its health",
                                node.name
                            ));
                        }
                        c.running = false;
                    }
                    Outcome::Stopped {
                        alloc,
                        container_id,
                        result: Ok(()),
                    }
                }
                Action::Pause {
                    alloc,
                    container_id,
                    paused,
                } => {
                    let result = match node.containers.get_mut(&container_id) {
                        Some(c) if c.running => {
                            c.paused = paused;
                            Ok(())
                        }
                        _ => Err(novacron_agent::runtime::RuntimeError::NotFound {
                            op: "pause",
                            message: "no such running container".into(),
                        }),
                    };
                    Outcome::Paused {
                        alloc,
                        container_id,
                        paused,
                        result,
                    }
                }
                Action::Probe {
                    alloc,
                    container_id,
                    role,
                    ..
                } => {
                    let healthy = node
                        .containers
                        .get(&container_id)
                        .is_some_and(|c| c.running && c.ready_at <= at && !c.paused);
                    Outcome::Probed {
                        alloc,
                        container_id,
                        role,
                        result: if healthy {
                            Ok(())
                        } else {
                            Err("connection refused".into())
                        },
                    }
                }
            };
            node.agent.complete(now, outcome);
        }
        if node.link_up {
            let report = node.agent.report();
            self.controller
                .workloads
                .report(&node.name, &report, self.wall0 + at);
        }
    }

    /// Invariants 1 to 4, after every step.
    fn check(&mut self, faults: bool) -> Result<(), String> {
        // 7. (seen while the agents acted).
        if let Some(why) = self.broken.take() {
            return Err(why);
        }
        // 1. No acknowledged job lost.
        let listed: BTreeSet<String> = self
            .controller
            .workloads
            .jobs()
            .into_iter()
            .map(|j| j.name)
            .collect();
        if let Some(lost) = self.acknowledged.difference(&listed).next() {
            return Err(format!("acknowledged job {lost} is gone"));
        }
        // 6. What the API lists is on disk.
        let stored: BTreeMap<String, u64> = self
            .store
            .jobs()
            .expect("reads work on a full disk")
            .into_iter()
            .map(|j| (j.name, j.current))
            .collect();
        for j in self.controller.workloads.jobs() {
            if stored.get(&j.name) != Some(&j.version) {
                return Err(format!(
                    "the API lists job {} at version {}, the store has {:?}",
                    j.name,
                    j.version,
                    stored.get(&j.name)
                ));
            }
        }
        // 2. Never two running copies of one allocation.
        let mut running: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for n in &self.nodes {
            for c in n.containers.values().filter(|c| c.running) {
                running.entry(&c.alloc).or_default().push(&n.name);
            }
        }
        if let Some((alloc, on)) = running.iter().find(|(_, on)| on.len() > 1) {
            return Err(format!(
                "allocation {alloc} runs {} times: {on:?}",
                on.len()
            ));
        }
        // 3. Rollouts never go below replicas - maxParallel while undisturbed.
        let serving = self.serving(WEB);
        if serving >= WEB_REPLICAS {
            self.stats.web_full_steps += 1;
        }
        if self.now >= self.disturbed_until && faults {
            if self.web_armed && serving + WEB_MAX_PARALLEL < WEB_REPLICAS {
                return Err(format!(
                    "{WEB} serves {serving} of {WEB_REPLICAS} replicas during a rollout (maxParallel {WEB_MAX_PARALLEL})"
                ));
            }
            if serving >= WEB_REPLICAS {
                self.web_armed = true;
            }
        }
        // 4. Desired sets reach nodes within 2 heartbeats of their link being up.
        let now = self.now;
        for n in &mut self.nodes {
            let Some(rx) = n.rx.as_ref().filter(|_| n.link_up) else {
                n.pending = None;
                continue;
            };
            let want = {
                let d = rx.borrow();
                (d.epoch, d.generation)
            };
            let have = (
                n.agent.controller_epoch().unwrap_or(0),
                n.agent.generation().unwrap_or(0),
            );
            if n.pending.is_some_and(|(p, _)| have >= p) {
                n.pending = None;
            }
            if have < want && n.pending.is_none() {
                n.pending = Some((want, now));
            }
            if let Some((p, since)) = n.pending
                && now.saturating_sub(since) > 2 * STEP
                && n.up_steps >= 2
            {
                return Err(format!(
                    "node {} has applied desired set {have:?}; the controller's {p:?} is {:?} old",
                    n.name,
                    now - since
                ));
            }
        }
        Ok(())
    }

    /// Running containers of `job` on a good image, ready (a stand-in for "answers").
    fn serving(&self, job: &str) -> u32 {
        let prefix = format!("{job}-");
        self.nodes
            .iter()
            .flat_map(|n| n.containers.values())
            .filter(|c| {
                c.running
                    && c.ready_at <= self.now
                    && c.image != MISSING_IMAGE
                    && c.alloc.starts_with(&prefix)
            })
            .count() as u32
    }

    /// Invariant 5: the store and the runtime agree once the faults stopped.
    fn converged(&self) -> Result<(), String> {
        let allocs = self.controller.workloads.allocations(None, None);
        let mut containers: BTreeMap<(&str, &str), u32> = BTreeMap::new();
        for n in &self.nodes {
            for c in n.containers.values().filter(|c| c.running) {
                *containers
                    .entry((n.name.as_str(), c.alloc.as_str()))
                    .or_default() += 1;
            }
        }
        for a in &allocs {
            let wanted = a.desired_run && a.state == AllocState::Running;
            let have = containers
                .get(&(a.node.as_str(), a.id.as_str()))
                .copied()
                .unwrap_or(0);
            if wanted && have != 1 {
                return Err(format!(
                    "allocation {} is running on {} in the store, with {have} containers there",
                    a.id, a.node
                ));
            }
        }
        // 8. The VM sleeps exactly when it was last told to, as its node says.
        let vm_prefix = format!("{VM}-");
        for n in &self.nodes {
            for c in n
                .containers
                .values()
                .filter(|c| c.running && c.alloc.starts_with(&vm_prefix))
            {
                if c.paused != self.suspended {
                    return Err(format!(
                        "the VM's guest {} on {} is {}, but its last acknowledged suspension says {}",
                        c.alloc,
                        n.name,
                        if c.paused { "paused" } else { "running" },
                        self.suspended
                    ));
                }
            }
        }
        for a in allocs
            .iter()
            .filter(|a| a.job == VM && a.desired_run && a.state == AllocState::Running)
        {
            if a.suspended != self.suspended {
                return Err(format!(
                    "the controller shows the VM's allocation {} suspended={}, its suspension says {}",
                    a.id, a.suspended, self.suspended
                ));
            }
        }
        for ((node, alloc), _) in containers {
            let desired = allocs
                .iter()
                .any(|a| a.id == alloc && a.node == node && a.desired_run);
            if !desired {
                return Err(format!(
                    "a container of {alloc} runs on {node}, which the store does not want"
                ));
            }
        }
        Ok(())
    }
}

impl Controller {
    fn start(store: Arc<MemoryStore>, now: Instant, ids: u64) -> Controller {
        let store: Arc<dyn Store> = store;
        let registry = Arc::new(
            Registry::load(
                store.clone(),
                RegistryConfig::new(60, Duration::from_secs(3)),
                now,
            )
            .expect("registry"),
        );
        let events = Arc::new(EventLog::open(store.clone(), 10_000).expect("events"));
        let workloads =
            Arc::new(Workloads::load(store, registry.clone(), events).expect("workloads"));
        workloads.seed_ids(ids);
        Controller {
            registry,
            workloads,
        }
    }
}

/// The watched service at a version label (an env change) and image.
fn web_manifest(version: &str, image: &str, replicas: u32) -> (String, String) {
    (
        WEB.into(),
        format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata: {{name: {WEB}}}
spec:
  type: service
  replicas: {replicas}
  task:
    image: {image}
    env: {{VERSION: {version}}}
  resources: {{cpu: 100m, memory: 32Mi}}
  health:
    tcp: {{port: 8080}}
    interval: 1s
    timeout: 500ms
  update: {{maxParallel: {WEB_MAX_PARALLEL}, minHealthyTime: 2s, healthyDeadline: 20s, autoRevert: true}}
"
        ),
    )
}

/// A one-replica VM with a health check (the simulated runtime runs it as a
/// container; its pause is the guest's).
fn vm_manifest() -> (String, String) {
    (
        VM.into(),
        format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata: {{name: {VM}}}
spec:
  type: service
  replicas: 1
  task:
    image: busybox:1
    vm: {{memory: 64Mi}}
  resources: {{cpu: 100m, memory: 128Mi}}
  health:
    tcp: {{port: 8080}}
    interval: 1s
    timeout: 500ms
"
        ),
    )
}

fn other_manifest(name: &str, replicas: u32) -> (String, String) {
    (
        name.into(),
        format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata: {{name: {name}}}
spec:
  type: service
  replicas: {replicas}
  task: {{image: busybox:1}}
  resources: {{cpu: 100m, memory: 32Mi}}
"
        ),
    )
}
