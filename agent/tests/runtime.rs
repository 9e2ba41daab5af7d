//! The container runtime against the real Docker daemon (`DOCKER_HOST`, or
//! unix:///var/run/docker.sock).
//!
//! Every test runs its own [`Supervisor`] under a unique node name: containers are
//! labelled with it, so tests running in parallel never see (let alone remove) each
//! other's containers. A guard removes everything labelled with that node, plus the
//! volumes and extra containers a test registers, when the test ends, failed or not.
//!
//! The image `novacron-test/busybox:1` is built from
//! `packaging/images/busybox/Dockerfile` and the host's static `/bin/busybox`
//! (Debian's `busybox-static`) when it is missing; nothing is pulled.
//!
//! Modules:
//! - `support`: the test image, the harness with its cleanup guard, waiting helpers.
//! - `runtime`: the tests (named so that `cargo test runtime` selects them).

mod support {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use bollard::Docker;
    use bollard::query_parameters::{
        BuildImageOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
        RemoveVolumeOptionsBuilder,
    };
    use futures_util::StreamExt;
    use novacron_agent::runtime::{DockerRuntime, LABEL_NODE, Supervisor, SupervisorConfig};
    use novacron_common::wire::{
        AllocationReport, AllocationSpec, AllocationStatus, DesiredAllocations, RestartSpec,
        TaskSpec,
    };
    use tokio::sync::OnceCell;
    use tokio_util::sync::CancellationToken;

    /// The local test image.
    pub const TEST_IMAGE: &str = "novacron-test/busybox:1";
    /// How long a test waits for any one state.
    pub const WAIT: Duration = Duration::from_secs(30);

    static IMAGE: OnceCell<()> = OnceCell::const_new();

    /// The Docker endpoint of the tests.
    pub fn docker_host() -> Option<String> {
        std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty())
    }

    /// Builds [`TEST_IMAGE`] unless it is present.
    pub async fn ensure_test_image(docker: &Docker) {
        IMAGE
            .get_or_init(|| async {
                if docker.inspect_image(TEST_IMAGE).await.is_ok() {
                    return;
                }
                build_test_image(docker).await;
            })
            .await;
    }

    async fn build_test_image(docker: &Docker) {
        let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|e| {
            panic!("cannot read /bin/busybox ({e}); install it: apt-get install -y busybox-static")
        });
        assert!(
            !busybox.windows(7).any(|w| w == b"ld-linux"),
            "/bin/busybox is dynamically linked; install the static one: apt-get install -y busybox-static"
        );
        let dockerfile = include_str!("../../packaging/images/busybox/Dockerfile");
        let mut tar = tar::Builder::new(Vec::new());
        for (name, data, mode) in [
            ("Dockerfile", dockerfile.as_bytes(), 0o644),
            ("busybox", &busybox[..], 0o755),
        ] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(mode);
            header.set_cksum();
            tar.append_data(&mut header, name, data)
                .expect("tar entry in memory");
        }
        let context = tar.into_inner().expect("tar in memory");
        let options = BuildImageOptionsBuilder::default()
            .dockerfile("Dockerfile")
            .t(TEST_IMAGE)
            .rm(true)
            .build();
        let mut build = docker.build_image(options, None, Some(bollard::body_full(context.into())));
        while let Some(step) = build.next().await {
            let step = step.unwrap_or_else(|e| panic!("building {TEST_IMAGE}: {e}"));
            if let Some(detail) = step.error_detail {
                panic!("building {TEST_IMAGE}: {:?}", detail.message);
            }
        }
        docker
            .inspect_image(TEST_IMAGE)
            .await
            .unwrap_or_else(|e| panic!("{TEST_IMAGE} missing after the build: {e}"));
    }

    /// A supervisor on a unique node, with its guard.
    pub struct Harness {
        pub docker: Docker,
        pub node: String,
        pub supervisor: Supervisor<DockerRuntime>,
        pub cleanup: Cleanup,
        cancel: CancellationToken,
        generation: u64,
        test: String,
    }

    impl Harness {
        /// Builds the image if needed and starts a supervisor for `test`.
        pub async fn new(test: &str) -> Harness {
            Harness::publishing(test, None).await
        }

        /// As [`Harness::new`], its runtime publishing ports on `address` (Docker's
        /// default, every address, when `None`).
        pub async fn publishing(test: &str, address: Option<std::net::IpAddr>) -> Harness {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "novacron_agent=debug".into()),
                )
                .with_test_writer()
                .try_init();
            let mut runtime = DockerRuntime::connect(docker_host().as_deref())
                .await
                .expect("the Docker daemon answers");
            if let Some(address) = address {
                runtime = runtime.with_publish_address(address);
            }
            let docker = runtime.client().await.expect("client");
            ensure_test_image(&docker).await;
            let node = format!(
                "t-{test}-{}-{:06x}",
                std::process::id(),
                rand::random::<u32>() & 0xff_ffff
            );
            let cleanup = Cleanup {
                node: node.clone(),
                containers: Mutex::new(Vec::new()),
                volumes: Mutex::new(Vec::new()),
            };
            let supervisor = Supervisor::new(runtime, config(&node));
            let cancel = CancellationToken::new();
            supervisor.spawn(cancel.clone());
            Harness {
                docker,
                node,
                supervisor,
                cleanup,
                cancel,
                generation: 0,
                test: test.to_owned(),
            }
        }

        /// Stops this harness's supervisor loop (containers stay).
        pub fn stop_supervisor(&self) {
            self.cancel.cancel();
        }

        /// A second supervisor for the same node (an agent restart).
        pub fn restart_supervisor(&mut self, runtime: DockerRuntime) {
            self.cancel.cancel();
            self.cancel = CancellationToken::new();
            self.supervisor = Supervisor::new(runtime, config(&self.node));
            self.supervisor.spawn(self.cancel.clone());
        }

        /// An allocation of this test running `sh -c script`, restart policy
        /// `attempts` within a minute after 200 ms.
        pub fn alloc(&self, name: &str, script: &str, attempts: u32) -> AllocationSpec {
            AllocationSpec {
                restore: None,
                suspended: false,
                id: format!("{:08x}-{name}", rand::random::<u32>()),
                job: format!("{}-{name}", self.test),
                job_version: 1,
                task: TaskSpec {
                    image: TEST_IMAGE.into(),
                    command: vec!["sh".into(), "-c".into()],
                    args: vec![script.into()],
                    restart: RestartSpec {
                        attempts,
                        interval_ms: 60_000,
                        delay_ms: 200,
                        delay_mode: false,
                    },
                    ..TaskSpec::default()
                },
            }
        }

        /// Applies the next generation with `allocs`.
        pub fn apply(&mut self, allocs: Vec<AllocationSpec>) {
            self.generation += 1;
            assert!(self.supervisor.apply(DesiredAllocations {
                epoch: 1,
                generation: self.generation,
                allocations: allocs,
                prepull: Vec::new(),
            }));
        }

        /// Waits until `check` holds for the report.
        pub async fn until(
            &self,
            what: &str,
            check: impl Fn(&AllocationReport) -> bool,
        ) -> AllocationReport {
            let mut reports = self.supervisor.subscribe();
            let wait = async {
                loop {
                    let report = reports.borrow_and_update().clone();
                    if check(&report) {
                        return report;
                    }
                    if reports.changed().await.is_err() {
                        panic!("the supervisor went away");
                    }
                }
            };
            match tokio::time::timeout(WAIT, wait).await {
                Ok(report) => report,
                Err(_) => panic!(
                    "timed out waiting for {what}; last report: {:#?}",
                    self.supervisor.report()
                ),
            }
        }

        /// Waits until allocation `id` satisfies `check`, and returns its status.
        pub async fn until_alloc(
            &self,
            id: &str,
            what: &str,
            check: impl Fn(&AllocationStatus) -> bool,
        ) -> AllocationStatus {
            let report = self
                .until(&format!("{id}: {what}"), |r| {
                    status(r, id).is_some_and(|s| check(&s))
                })
                .await;
            status(&report, id).expect("present")
        }

        /// The containers labelled with this node, by name.
        pub async fn containers(&self) -> HashMap<String, String> {
            let filters = HashMap::from([("label", vec![format!("{LABEL_NODE}={}", self.node)])]);
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            self.docker
                .list_containers(Some(options))
                .await
                .expect("list")
                .into_iter()
                .filter_map(|c| Some((c.names?.first()?.trim_start_matches('/').to_owned(), c.id?)))
                .collect()
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.cancel.cancel();
        }
    }

    fn config(node: &str) -> SupervisorConfig {
        SupervisorConfig {
            poll_interval: Duration::from_millis(250),
            stop_grace: Duration::from_secs(1),
            ..SupervisorConfig::new(node)
        }
    }

    /// The status of `id` in `report`.
    pub fn status(report: &AllocationReport, id: &str) -> Option<AllocationStatus> {
        report.allocations.iter().find(|a| a.id == id).cloned()
    }

    /// Removes a test's containers and volumes when dropped, even on failure.
    pub struct Cleanup {
        node: String,
        containers: Mutex<Vec<String>>,
        volumes: Mutex<Vec<String>>,
    }

    impl Cleanup {
        /// Removes this container (by name or id) too.
        pub fn container(&self, name: &str) {
            self.containers
                .lock()
                .expect("cleanup list")
                .push(name.to_owned());
        }

        /// Removes this volume too.
        pub fn volume(&self, name: &str) {
            self.volumes
                .lock()
                .expect("cleanup list")
                .push(name.to_owned());
        }
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let node = self.node.clone();
            let containers =
                std::mem::take(&mut *self.containers.lock().unwrap_or_else(|p| p.into_inner()));
            let volumes =
                std::mem::take(&mut *self.volumes.lock().unwrap_or_else(|p| p.into_inner()));
            // Drop cannot await, and may run on the test's runtime thread: clean up on a
            // thread of our own with its own runtime.
            let cleaner = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("cleanup runtime");
                rt.block_on(remove_everything(node, containers, volumes));
            });
            if cleaner.join().is_err() {
                eprintln!("cleanup panicked");
            }
        }
    }

    async fn remove_everything(node: String, extra: Vec<String>, volumes: Vec<String>) {
        let Ok(runtime) = DockerRuntime::connect(docker_host().as_deref()).await else {
            eprintln!("cleanup: Docker unreachable");
            return;
        };
        let Ok(docker) = runtime.client().await else {
            return;
        };
        let force = || {
            RemoveContainerOptionsBuilder::default()
                .force(true)
                .v(true)
                .build()
        };
        let filters = HashMap::from([("label", vec![format!("{LABEL_NODE}={node}")])]);
        let deadline = Instant::now() + Duration::from_secs(2);
        // Twice: a create the supervisor had in flight may land after the first pass.
        for pass in 0..2 {
            if pass > 0 {
                tokio::time::sleep_until(
                    (deadline.min(Instant::now() + Duration::from_millis(300))).into(),
                )
                .await;
            }
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            for c in docker
                .list_containers(Some(options))
                .await
                .unwrap_or_default()
            {
                if let Some(id) = c.id {
                    let _ = docker.remove_container(&id, Some(force())).await;
                }
            }
        }
        for name in extra {
            let _ = docker.remove_container(&name, Some(force())).await;
        }
        for volume in volumes {
            let _ = docker
                .remove_volume(
                    &volume,
                    Some(RemoveVolumeOptionsBuilder::default().force(true).build()),
                )
                .await;
        }
    }
}

mod runtime {
    use std::collections::HashMap;
    use std::time::Duration;

    use bollard::models::{ContainerCreateBody, MountType, RestartPolicyNameEnum};
    use bollard::query_parameters::{
        CreateContainerOptionsBuilder, KillContainerOptionsBuilder, ListVolumesOptionsBuilder,
    };
    use futures_util::StreamExt;
    use novacron_agent::runtime::{
        ContainerRuntime, DockerRuntime, LABEL_ALLOC, LABEL_JOB, LABEL_MANAGED, LABEL_NODE,
        LABEL_SPEC, LABEL_VERSION, container_name, spec_hash,
    };
    use novacron_common::wire::{
        AllocState, AllocationSpec, FailureReason, HealthCheckKind, HealthSpec, LogChunk,
        LogRequest, PortMapping, ProbeSpec, VolumeMount,
    };

    use super::support::*;

    async fn kill(h: &Harness, container: &str) {
        h.docker
            .kill_container(
                container,
                Some(KillContainerOptionsBuilder::default().build()),
            )
            .await
            .expect("docker kill");
    }

    #[tokio::test]
    async fn two_allocations_run_with_limits_env_and_labels() {
        let mut h = Harness::new("limits").await;
        let mut a = h.alloc("a", "sleep 300", 1);
        a.task.cpu_millis = 250;
        a.task.memory_bytes = 64 << 20;
        a.task.env.insert("FOO".into(), "bar".into());
        let mut b = h.alloc("b", "sleep 300", 1);
        b.task.cpu_millis = 1500;
        b.task.memory_bytes = 32 << 20;
        h.apply(vec![a.clone(), b.clone()]);
        for (alloc, nano, memory) in [(&a, 250_000_000, 64 << 20), (&b, 1_500_000_000, 32 << 20)] {
            let s = h
                .until_alloc(&alloc.id, "running", |s| s.state == AllocState::Running)
                .await;
            assert!(s.started_at_unix_ms.is_some());
            let id = s.container_id.expect("container id");
            let inspect = h
                .docker
                .inspect_container(&id, None)
                .await
                .expect("inspect");
            assert_eq!(
                inspect.name.as_deref(),
                Some(format!("/{}", container_name(&h.node, &alloc.job, &alloc.id)).as_str())
            );
            let host = inspect.host_config.expect("host config");
            assert_eq!(host.nano_cpus, Some(nano));
            assert_eq!(host.memory, Some(memory));
            assert_eq!(
                host.restart_policy.and_then(|p| p.name),
                Some(RestartPolicyNameEnum::NO)
            );
            let config = inspect.config.expect("config");
            let labels = config.labels.expect("labels");
            assert_eq!(labels[LABEL_ALLOC], alloc.id);
            assert_eq!(labels[LABEL_JOB], alloc.job);
            assert_eq!(labels[LABEL_VERSION], "1");
            assert_eq!(labels[LABEL_SPEC], spec_hash(&alloc.task));
            assert_eq!(labels[LABEL_NODE], h.node);
            if alloc.id == a.id {
                let env = config.env.expect("env");
                assert!(env.iter().any(|e| e == "FOO=bar"), "{env:?}");
            }
        }
        assert_eq!(h.containers().await.len(), 2);
    }

    /// The report says where each port is published, as Docker bound it: the
    /// runtime's publish address and the host port, for the container port; and
    /// that address reaches the container.
    #[tokio::test]
    async fn the_report_carries_the_published_addresses_docker_bound() {
        let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
        let mut h = Harness::publishing("published", Some(loopback)).await;
        let mut web = h.alloc(
            "web",
            "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
            1,
        );
        // No host port from the controller: Docker picks one.
        web.task.ports = vec![PortMapping {
            name: "http".into(),
            container_port: 8080,
            host_port: None,
            udp: false,
        }];
        h.apply(vec![web.clone()]);
        let s = h
            .until_alloc(&web.id, "running and published", |s| {
                s.state == AllocState::Running && !s.published.is_empty()
            })
            .await;
        let id = s.container_id.clone().expect("container id");
        let ports = h
            .docker
            .inspect_container(&id, None)
            .await
            .expect("inspect")
            .network_settings
            .and_then(|n| n.ports)
            .expect("a port map");
        let bindings = ports["8080/tcp"].clone().expect("8080/tcp is published");
        let docker_says: Vec<(String, String)> = bindings
            .iter()
            .map(|b| {
                (
                    b.host_ip.clone().unwrap_or_default(),
                    b.host_port.clone().unwrap_or_default(),
                )
            })
            .collect();
        let reported: Vec<(String, String)> = s
            .published
            .iter()
            .map(|p| (p.host_ip.to_string(), p.host_port.to_string()))
            .collect();
        assert_eq!(reported, docker_says);
        for p in &s.published {
            assert_eq!(p.host_ip, loopback);
            assert_eq!((p.container_port, p.udp), (8080, false));
        }
        // The address answers with the container's page.
        let address = std::net::SocketAddr::new(loopback, s.published[0].host_port);
        let page = tokio::time::timeout(WAIT, async {
            loop {
                if let Ok(mut stream) = tokio::net::TcpStream::connect(address).await {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let _ = stream.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
                    let mut body = String::new();
                    let _ = stream.read_to_string(&mut body).await;
                    if body.contains("hello") {
                        return body;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await
        .expect("the published address serves the container's page");
        assert!(
            page.lines().next().is_some_and(|l| l.ends_with("200 OK")),
            "{page}"
        );
        // Stopped: nothing is published any more.
        h.apply(vec![]);
        h.until(&format!("{} gone", web.id), |r| {
            status(r, &web.id).is_none_or(|s| s.published.is_empty())
        })
        .await;
    }

    #[tokio::test]
    async fn killed_container_is_restarted_then_fails_past_attempts() {
        let mut h = Harness::new("kill").await;
        let a = h.alloc("a", "sleep 300", 1);
        h.apply(vec![a.clone()]);
        let first = h
            .until_alloc(&a.id, "running", |s| s.state == AllocState::Running)
            .await;
        let container = first.container_id.clone().expect("container");
        kill(&h, &container).await;
        let second = h
            .until_alloc(&a.id, "restarted", |s| {
                s.restarts == 1 && s.state == AllocState::Running
            })
            .await;
        assert_eq!(
            second.container_id, first.container_id,
            "the same container, started again"
        );
        assert_ne!(second.started_at_unix_ms, first.started_at_unix_ms);
        assert_eq!(second.exit_code, Some(137));

        kill(&h, &container).await;
        let failed = h
            .until_alloc(&a.id, "failed", |s| s.state == AllocState::Failed)
            .await;
        assert_eq!(failed.restarts, 1);
        assert_eq!(failed.exit_code, Some(137));
        assert!(failed.message.contains("giving up"), "{}", failed.message);
    }

    #[tokio::test]
    async fn batch_exit_zero_completes_without_restart() {
        let mut h = Harness::new("exit0").await;
        let mut a = h.alloc("a", "exit 0", 3);
        a.task.batch = true;
        h.apply(vec![a.clone()]);
        let done = h
            .until_alloc(&a.id, "complete", |s| s.state == AllocState::Complete)
            .await;
        assert_eq!(done.exit_code, Some(0));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let later = status(&h.supervisor.report(), &a.id).expect("present");
        assert_eq!(later.state, AllocState::Complete);
        assert_eq!(later.restarts, 0);
    }

    #[tokio::test]
    async fn a_service_exiting_zero_is_restarted_then_fails() {
        let mut h = Harness::new("svc0").await;
        let a = h.alloc("a", "exit 0", 1);
        h.apply(vec![a.clone()]);
        let failed = h
            .until_alloc(&a.id, "failed", |s| s.state == AllocState::Failed)
            .await;
        assert_eq!(failed.exit_code, Some(0));
        assert_eq!(failed.restarts, 1);
    }

    #[tokio::test]
    async fn exit_three_restarts_then_fails_with_its_code() {
        let mut h = Harness::new("exit3").await;
        let mut a = h.alloc("a", "exit 3", 1);
        a.task.batch = true;
        h.apply(vec![a.clone()]);
        let failed = h
            .until_alloc(&a.id, "failed", |s| s.state == AllocState::Failed)
            .await;
        assert_eq!(failed.exit_code, Some(3));
        assert_eq!(failed.restarts, 1);
        assert!(
            failed.message.contains("exited with code 3"),
            "{}",
            failed.message
        );
    }

    #[tokio::test]
    async fn a_command_that_cannot_start_fails_with_the_runtime_error() {
        let mut h = Harness::new("nocmd").await;
        let mut a = h.alloc("a", "", 1);
        a.task.command = vec!["/no/such/binary".into()];
        a.task.args.clear();
        h.apply(vec![a.clone()]);
        let failed = h
            .until_alloc(&a.id, "failed", |s| s.state == AllocState::Failed)
            .await;
        assert_eq!(failed.restarts, 1, "{}", failed.message);
        assert!(
            failed.message.contains("could not restart")
                && failed.message.contains("/no/such/binary"),
            "{}",
            failed.message
        );
        assert_eq!(
            h.containers().await.len(),
            1,
            "one container, started twice"
        );
    }

    #[tokio::test]
    async fn missing_image_fails_with_a_clear_message() {
        let mut h = Harness::new("noimage").await;
        let mut a = h.alloc("a", "true", 5);
        a.task.image = "busybox:nope".into();
        a.task.pull_policy = novacron_common::wire::PullPolicy::Never;
        h.apply(vec![a.clone()]);
        let failed = h
            .until_alloc(&a.id, "failed", |s| s.state == AllocState::Failed)
            .await;
        assert_eq!(
            failed.message,
            format!(
                "image \"busybox:nope\" is not present on node {} and its pullPolicy is never; build or load it there, or let the node pull it",
                h.node
            )
        );
        // No retry storm: it stays failed and nothing is created.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let later = status(&h.supervisor.report(), &a.id).expect("present");
        assert_eq!((later.state, later.restarts), (AllocState::Failed, 0));
        assert!(h.containers().await.is_empty());
    }

    /// A registry that cannot be reached is a failed start with its reason.
    #[tokio::test]
    async fn an_unreachable_registry_fails_the_start_with_its_reason() {
        let mut h = Harness::new("nopull").await;
        let mut a = h.alloc("a", "true", 5);
        a.task.image = "127.0.0.1:1/novacron-test/nope:1".into();
        h.apply(vec![a.clone()]);
        let failed = h
            .until_alloc(&a.id, "a failed pull", |s| {
                s.message.contains("could not pull image")
            })
            .await;
        assert!(
            failed.message.contains("registry unreachable"),
            "{}",
            failed.message
        );
        // It counts as a failed start (the task's restart policy applies) and
        // leaves no container behind.
        let failed = h
            .until_alloc(&a.id, "restarts used up", |s| s.state == AllocState::Failed)
            .await;
        assert!(failed.restarts >= 1, "{failed:?}");
        assert!(h.containers().await.is_empty());
    }

    #[tokio::test]
    async fn a_new_supervisor_adopts_running_containers() {
        let mut h = Harness::new("adopt").await;
        let a = h.alloc("a", "sleep 300", 1);
        let b = h.alloc("b", "sleep 300", 1);
        h.apply(vec![a.clone(), b.clone()]);
        let mut before = Vec::new();
        for alloc in [&a, &b] {
            before.push(
                h.until_alloc(&alloc.id, "running", |s| s.state == AllocState::Running)
                    .await,
            );
        }
        let docker = h.docker.clone();
        let docker_started = |id: String| {
            let docker = docker.clone();
            async move {
                docker
                    .inspect_container(&id, None)
                    .await
                    .expect("inspect")
                    .state
                    .and_then(|s| s.started_at)
            }
        };
        let started_before = docker_started(before[0].container_id.clone().expect("id")).await;

        // The agent restarts: a new supervisor, the same desired set.
        h.stop_supervisor();
        let runtime = DockerRuntime::connect(docker_host().as_deref())
            .await
            .expect("docker");
        h.restart_supervisor(runtime);
        h.apply(vec![a.clone(), b.clone()]);
        for (alloc, old) in [&a, &b].into_iter().zip(&before) {
            let s = h
                .until_alloc(&alloc.id, "adopted", |s| s.state == AllocState::Running)
                .await;
            assert_eq!(s.container_id, old.container_id);
            assert_eq!(s.started_at_unix_ms, old.started_at_unix_ms);
            assert_eq!(s.restarts, 0);
            assert!(s.message.contains("adopted"), "{}", s.message);
        }
        let started_after = docker_started(before[0].container_id.clone().expect("id")).await;
        assert_eq!(started_before, started_after, "not restarted");
        assert_eq!(h.containers().await.len(), 2);
    }

    #[tokio::test]
    async fn orphans_are_removed_and_unlabelled_containers_untouched() {
        let mut h = Harness::new("orphans").await;
        let create = |name: String, labels: HashMap<String, String>| {
            let docker = h.docker.clone();
            async move {
                let body = ContainerCreateBody {
                    image: Some(TEST_IMAGE.into()),
                    cmd: Some(vec!["sleep".into(), "300".into()]),
                    labels: Some(labels),
                    ..ContainerCreateBody::default()
                };
                let options = CreateContainerOptionsBuilder::default().name(&name).build();
                let id = docker
                    .create_container(Some(options), body)
                    .await
                    .expect("create")
                    .id;
                docker.start_container(&id, None).await.expect("start");
                id
            }
        };
        let orphan = create(
            format!("{}-orphan", h.node),
            HashMap::from([
                (LABEL_ALLOC.into(), "not-desired".into()),
                (LABEL_NODE.into(), h.node.clone()),
            ]),
        )
        .await;
        let plain_name = format!("{}-plain", h.node);
        h.cleanup.container(&plain_name);
        let plain = create(plain_name, HashMap::new()).await;
        let other_name = format!("{}-other-node", h.node);
        h.cleanup.container(&other_name);
        let other = create(
            other_name,
            HashMap::from([
                (LABEL_ALLOC.into(), "elsewhere".into()),
                (LABEL_NODE.into(), format!("{}-x", h.node)),
            ]),
        )
        .await;

        let a = h.alloc("a", "sleep 300", 1);
        h.apply(vec![a.clone()]);
        h.until("the orphan gone and the allocation running", |r| {
            r.allocations.len() == 1 && r.allocations[0].state == AllocState::Running
        })
        .await;
        let gone = h.docker.inspect_container(&orphan, None).await;
        assert!(gone.is_err(), "the orphan is removed");
        for untouched in [&plain, &other] {
            let state = h
                .docker
                .inspect_container(untouched, None)
                .await
                .expect("still there")
                .state
                .expect("state");
            assert_eq!(state.running, Some(true));
        }
    }

    #[tokio::test]
    async fn a_new_spec_replaces_the_container_and_removal_stops_it() {
        let mut h = Harness::new("respec").await;
        let a = h.alloc("a", "sleep 300", 1);
        h.apply(vec![a.clone()]);
        let first = h
            .until_alloc(&a.id, "running", |s| s.state == AllocState::Running)
            .await;
        let mut b = a.clone();
        b.task.env.insert("V".into(), "2".into());
        h.apply(vec![b.clone()]);
        let second = h
            .until_alloc(&a.id, "replaced", |s| {
                s.state == AllocState::Running && s.container_id != first.container_id
            })
            .await;
        let old = first.container_id.expect("id");
        assert!(
            h.docker.inspect_container(&old, None).await.is_err(),
            "old one removed"
        );
        assert_eq!(h.containers().await.len(), 1);

        h.apply(vec![]);
        h.until("the allocation gone", |r| r.allocations.is_empty())
            .await;
        let new = second.container_id.expect("id");
        assert!(h.docker.inspect_container(&new, None).await.is_err());
    }

    #[tokio::test]
    async fn named_volumes_are_created_and_bind_mounts_used() {
        let mut h = Harness::new("volumes").await;
        let volume = format!("{}-data", h.node);
        h.cleanup.volume(&volume);
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("in"), "from the host").expect("write");
        let mut a = h.alloc("a", "cp /host/in /data/copy && sleep 300", 1);
        a.task.volumes = vec![
            VolumeMount {
                source: volume.clone(),
                target: "/data".into(),
                read_only: false,
            },
            VolumeMount {
                source: dir.path().display().to_string(),
                target: "/host".into(),
                read_only: true,
            },
        ];
        h.apply(vec![a.clone()]);
        let s = h
            .until_alloc(&a.id, "running", |s| s.state == AllocState::Running)
            .await;
        let inspect = h
            .docker
            .inspect_container(&s.container_id.expect("id"), None)
            .await
            .expect("inspect");
        let mounts = inspect.host_config.and_then(|c| c.mounts).expect("mounts");
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[1].typ, Some(MountType::BIND));
        let filters = HashMap::from([("name", vec![volume.clone()])]);
        let volumes = h
            .docker
            .list_volumes(Some(
                ListVolumesOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .expect("volumes")
            .volumes
            .unwrap_or_default();
        let created = volumes
            .iter()
            .find(|v| v.name == volume)
            .expect("volume created");
        assert_eq!(
            created.labels.get(LABEL_MANAGED).map(String::as_str),
            Some("true")
        );
    }

    /// A check every 300 ms, failed after 2 failures in a row.
    fn fast_probe(check: HealthCheckKind) -> ProbeSpec {
        ProbeSpec {
            check,
            period_ms: 300,
            timeout_ms: 1000,
            failure_threshold: 2,
            initial_delay_ms: 0,
        }
    }

    /// `readiness` or `liveness` (the other unset), 2 health restarts 200 ms apart
    /// at first.
    fn checks(liveness: Option<ProbeSpec>, readiness: Option<ProbeSpec>) -> Option<HealthSpec> {
        Some(HealthSpec {
            liveness,
            readiness,
            startup: None,
            max_restarts: 2,
            backoff_initial_ms: 200,
            backoff_max_ms: 1_000,
        })
    }

    /// Serves /www over HTTP on 8080. With `once`, /www/health is written on the
    /// first start only (a check on it that fails after `docker exec rm` keeps
    /// failing across restarts); otherwise on every start.
    fn web(h: &Harness, name: &str, once: bool) -> AllocationSpec {
        let write = if once {
            "[ -f /www/started ] || echo ok > /www/health; touch /www/started"
        } else {
            "echo ok > /www/health"
        };
        h.alloc(
            name,
            &format!("mkdir -p /www && {write} && exec httpd -f -p 8080 -h /www"),
            1,
        )
    }

    fn http_health() -> HealthCheckKind {
        HealthCheckKind::Http {
            port: 8080,
            path: "/health".into(),
        }
    }

    /// Deletes /www/health in the container.
    fn break_health(container: &str) {
        let out = std::process::Command::new("docker")
            .args(["exec", container, "rm", "/www/health"])
            .output()
            .expect("docker runs");
        assert!(
            out.status.success(),
            "docker exec rm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[tokio::test]
    async fn a_failing_liveness_check_restarts_the_container_then_fails_the_allocation() {
        let mut h = Harness::new("liveness").await;
        let mut recovers = web(&h, "recovers", false);
        recovers.task.health = checks(Some(fast_probe(http_health())), None);
        let mut broken = web(&h, "broken", true);
        broken.task.health = checks(Some(fast_probe(http_health())), None);
        h.apply(vec![recovers.clone(), broken.clone()]);
        let mut before = Vec::new();
        for alloc in [&recovers, &broken] {
            let s = h
                .until_alloc(&alloc.id, "live", |s| s.healthy == Some(true))
                .await;
            before.push(s.clone());
            break_health(&s.container_id.expect("container"));
        }
        // The one whose start writes the file again: restarted once, live again.
        let s = h
            .until_alloc(&recovers.id, "restarted and live again", |s| {
                s.restarts == 1 && s.healthy == Some(true)
            })
            .await;
        assert_eq!(s.state, AllocState::Running);
        assert_eq!(
            s.container_id, before[0].container_id,
            "the same container, started again"
        );
        assert_ne!(
            s.started_at_unix_ms, before[0].started_at_unix_ms,
            "a new run"
        );
        // The other keeps failing: 2 health restarts, then failed as unhealthy.
        let s = h
            .until_alloc(&broken.id, "failed", |s| s.state == AllocState::Failed)
            .await;
        assert_eq!(s.failure, Some(FailureReason::Unhealthy), "{}", s.message);
        assert_eq!(s.restarts, 2, "{}", s.message);
        assert_eq!(s.healthy, Some(false));
        assert!(s.message.contains("liveness check failed"), "{}", s.message);
        // It stays failed (and stopped): nothing restarts it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = status(&h.supervisor.report(), &broken.id).expect("present");
        assert_eq!((after.state, after.restarts), (AllocState::Failed, 2));
        let inspect = h
            .docker
            .inspect_container(&s.container_id.expect("container"), None)
            .await
            .expect("inspect");
        assert_eq!(inspect.state.and_then(|st| st.running), Some(false));
    }

    #[tokio::test]
    async fn a_failing_readiness_check_marks_not_ready_and_never_restarts() {
        let mut h = Harness::new("readiness").await;
        let mut ready = web(&h, "ready", false);
        ready.task.health = checks(None, Some(fast_probe(http_health())));
        h.apply(vec![ready.clone()]);
        let before = h
            .until_alloc(&ready.id, "ready", |s| s.healthy == Some(true))
            .await;
        break_health(before.container_id.as_deref().expect("container"));
        h.until_alloc(&ready.id, "not ready", |s| s.healthy == Some(false))
            .await;
        // Ten more periods: still the same run, never restarted.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let s = status(&h.supervisor.report(), &ready.id).expect("present");
        assert_eq!(
            (s.state, s.healthy, s.restarts, s.failure),
            (AllocState::Running, Some(false), 0, None),
            "{}",
            s.message
        );
        assert_eq!(s.container_id, before.container_id);
        assert_eq!(s.started_at_unix_ms, before.started_at_unix_ms);
    }

    async fn h_wait_running(h: &Harness, ids: &[&String]) {
        for id in ids {
            h.until_alloc(id, "running", |s| s.state == AllocState::Running)
                .await;
        }
    }

    #[tokio::test]
    async fn one_allocation_runs_under_two_nodes_sharing_a_daemon() {
        // As during a migration between two agents on one Docker daemon: the same
        // allocation id on both nodes must not clash on the container name.
        let mut a = Harness::new("shared-a").await;
        let mut b = Harness::new("shared-b").await;
        let mut alloc = a.alloc("moving", "sleep 300", 1);
        // An id alike in its first 8 characters to another allocation of the job.
        let twin_id = format!("{}-twin", &alloc.id[..8]);
        let mut twin = alloc.clone();
        twin.id = twin_id;
        alloc.id = format!("{}-orig", &alloc.id[..8]);
        // Regression: names used the first 8 characters of the id, so the twin
        // fell back to its whole id on node a, and the same allocation on node b
        // found both names taken.
        a.apply(vec![alloc.clone(), twin.clone()]);
        h_wait_running(&a, &[&alloc.id, &twin.id]).await;
        b.apply(vec![twin.clone()]);
        h_wait_running(&b, &[&twin.id]).await;
        let mut names = Vec::new();
        for (h, id) in [(&a, &alloc.id), (&a, &twin.id), (&b, &twin.id)] {
            let s = h
                .until_alloc(id, "running", |s| s.state == AllocState::Running)
                .await;
            let inspect = h
                .docker
                .inspect_container(&s.container_id.expect("id"), None)
                .await
                .expect("inspect");
            let name = inspect.name.expect("name");
            assert!(name.contains(id.as_str()), "{name} has the whole id {id}");
            assert!(
                name.ends_with(&h.node),
                "{name} ends with the node {}",
                h.node
            );
            names.push(name);
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 3, "{names:?}");
        // A restarted agent (a new supervisor on node a) adopts its containers.
        let running = a.supervisor.report();
        let runtime = DockerRuntime::connect(docker_host().as_deref())
            .await
            .expect("the Docker daemon answers");
        a.restart_supervisor(runtime);
        a.apply(vec![alloc.clone(), twin.clone()]);
        for id in [&alloc.id, &twin.id] {
            let s = a
                .until_alloc(id, "adopted", |s| s.state == AllocState::Running)
                .await;
            assert_eq!(
                s.container_id,
                status(&running, id).and_then(|s| s.container_id),
                "adopted, not replaced"
            );
            assert_eq!(s.restarts, 0);
        }
    }

    #[tokio::test]
    async fn a_missing_docker_socket_is_waited_for_not_fatal() {
        // Regression: the agent exited 64 (bad configuration, never restarted by
        // systemd) when Docker's socket did not exist yet at its start.
        let real = docker_host().unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let Some(real) = real.strip_prefix("unix://").map(str::to_owned) else {
            eprintln!("skipped: the Docker daemon of the tests is not on a Unix socket");
            return;
        };
        let dir = std::env::temp_dir().join(format!(
            "novacron-nosock-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let socket = dir.join("docker.sock");
        let runtime = DockerRuntime::new(Some(&format!("unix://{}", socket.display())))
            .expect("a missing socket is not bad configuration");
        let err = runtime
            .list("t-nosock")
            .await
            .expect_err("no daemon behind a missing socket");
        assert!(err.to_string().contains("does not exist"), "{err}");
        // Docker comes up: the same runtime reaches it.
        std::os::unix::fs::symlink(&real, &socket).expect("symlink to the socket");
        let listed = runtime.list("t-nosock").await;
        let _ = std::fs::remove_dir_all(&dir);
        listed.expect("the daemon answers once its socket exists");
        // An address no client can use is still refused at once.
        assert!(DockerRuntime::new(Some("ftp://docker")).is_err());
    }

    #[tokio::test]
    async fn health_checks_report_healthy_and_unhealthy() {
        let mut h = Harness::new("health").await;
        // Readiness checks: they report health and never restart.
        let check = |check| checks(None, Some(fast_probe(check)));
        let mut web = h.alloc(
            "web",
            "echo ok > /tmp/index.html && exec httpd -f -p 8080 -h /tmp",
            1,
        );
        web.task.health = check(HealthCheckKind::Http {
            port: 8080,
            path: "/".into(),
        });
        let mut closed = h.alloc("closed", "sleep 300", 1);
        closed.task.health = check(HealthCheckKind::Tcp { port: 8081 });
        let mut exec_ok = h.alloc("exec", "sleep 300", 1);
        exec_ok.task.health = check(HealthCheckKind::Exec {
            command: vec!["sh".into(), "-c".into(), "test -d /tmp".into()],
        });
        let mut exec_bad = h.alloc("execbad", "sleep 300", 1);
        exec_bad.task.health = check(HealthCheckKind::Exec {
            command: vec!["false".into()],
        });
        h.apply(vec![
            web.clone(),
            closed.clone(),
            exec_ok.clone(),
            exec_bad.clone(),
        ]);
        for (alloc, healthy) in [
            (&web, true),
            (&closed, false),
            (&exec_ok, true),
            (&exec_bad, false),
        ] {
            let s = h
                .until_alloc(&alloc.id, "a health verdict", |s| s.healthy.is_some())
                .await;
            assert_eq!(s.healthy, Some(healthy), "{}: {}", alloc.id, s.message);
            assert_eq!(s.state, AllocState::Running);
        }
    }

    #[tokio::test]
    async fn logs_come_back_and_follow_streams_new_lines() {
        let mut h = Harness::new("logs").await;
        let hello = h.alloc("hello", "echo hello; echo oops >&2; sleep 300", 1);
        let ticker = h.alloc(
            "ticker",
            "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.2; done",
            1,
        );
        h.apply(vec![hello.clone(), ticker.clone()]);
        for alloc in [&hello, &ticker] {
            h.until_alloc(&alloc.id, "running", |s| s.state == AllocState::Running)
                .await;
        }
        let request = |allocation: &str, follow, tail| LogRequest {
            request_id: 1,
            allocation: allocation.into(),
            follow,
            tail,
        };
        // The output may lag the start by a moment.
        let mut chunks: Vec<LogChunk> = Vec::new();
        for _ in 0..50 {
            chunks = h
                .supervisor
                .logs(request(&hello.id, false, 0))
                .collect()
                .await;
            if chunks.iter().any(|c| c.stderr) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let stdout: Vec<u8> = chunks
            .iter()
            .filter(|c| !c.stderr)
            .flat_map(|c| c.data.clone())
            .collect();
        let stderr: Vec<u8> = chunks
            .iter()
            .filter(|c| c.stderr)
            .flat_map(|c| c.data.clone())
            .collect();
        assert_eq!(stdout, b"hello\n");
        assert_eq!(stderr, b"oops\n");
        assert_eq!(chunks.last().and_then(|c| c.end.clone()), Some(Ok(())));

        // The ticker's first line may lag its start too (seen in CI: an
        // empty tail right after the start).
        let mut text: Vec<u8> = Vec::new();
        for _ in 0..50 {
            let tail: Vec<LogChunk> = h
                .supervisor
                .logs(request(&ticker.id, false, 1))
                .collect()
                .await;
            text = tail.iter().flat_map(|c| c.data.clone()).collect();
            if !text.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            text.iter().filter(|b| **b == b'\n').count(),
            1,
            "tail 1: {:?}",
            String::from_utf8_lossy(&text)
        );

        // Follow: lines that did not exist when the stream opened arrive on it.
        let mut follow = Box::pin(h.supervisor.logs(request(&ticker.id, true, 1)));
        let first = tokio::time::timeout(Duration::from_secs(5), follow.next())
            .await
            .expect("a first chunk")
            .expect("open");
        let first_line = String::from_utf8_lossy(&first.data).trim().to_owned();
        let first_n: u32 = first_line
            .trim_start_matches("line")
            .parse()
            .unwrap_or_else(|_| panic!("unexpected output {first_line:?}"));
        let mut seen = String::new();
        let wait = async {
            while let Some(chunk) = follow.next().await {
                assert!(chunk.end.is_none(), "the stream ended early: {chunk:?}");
                seen.push_str(&String::from_utf8_lossy(&chunk.data));
                if seen.contains(&format!("line{}\n", first_n + 5)) {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("no new lines followed; got {seen:?}"));
    }

    #[tokio::test]
    async fn usage_reports_memory_of_running_containers() {
        let mut h = Harness::new("usage").await;
        let mut a = h.alloc("a", "while true; do :; done", 1);
        a.task.memory_bytes = 64 << 20;
        a.task.cpu_millis = 500;
        h.apply(vec![a.clone()]);
        h.until_alloc(&a.id, "running", |s| s.state == AllocState::Running)
            .await;
        let first = h.supervisor.usage().await;
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].id, a.id);
        assert!(first[0].memory_bytes > 0, "{first:?}");
        assert_eq!(first[0].memory_limit_bytes, 64 << 20);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let second = h.supervisor.usage().await;
        let cpu = second[0].cpu_percent;
        // A busy loop capped at half a core.
        assert!(cpu > 10.0 && cpu < 80.0, "cpu {cpu}% of one core");
    }
}
