//! The rules a manifest's types cannot express: ranges, the arity of label
//! operators, uniqueness, and checks across fields.
//!
//! [`check`] runs every rule and returns every [`Issue`], each naming its field by
//! path. Where the YAML is at hand it also tells a value that was written from one
//! that was defaulted, so that a missing `cpu` reads "missing", not "0".

use std::collections::HashMap;
use std::time::Duration;

use crate::units::duration as human;
use yaml_serde::Value;

use super::checkpoint; // checkpoint: spec.checkpoint rules.
use super::health::{
    MAX_HEALTH_RESTARTS, MAX_INITIAL_DELAY, MAX_RESTART_BACKOFF, MIN_RESTART_BACKOFF, Probe,
    ProbeRole,
};
use super::locate::{FieldPath, Seg};
use super::{
    API_VERSION, ExecCheck, GpuRequest, Health, HttpCheck, JobManifest, JobSpec, JobType, KIND,
    Lifecycle, MAX_GPUS, MAX_HEALTH_RETRIES, MAX_PRIORITY, MAX_REPLICAS, MAX_RESTART_ATTEMPTS,
    MAX_WEIGHT, MIN_HEALTH_INTERVAL, MIN_MAX_RUNTIME, MIN_MEMORY, Metadata, Operator, Placement,
    Protocol, Resources, Restart, TaskTemplate, TcpCheck, Update,
};
use crate::cron::parse_cron;
use crate::names::{self, NameError};

/// The longest `spec.task.shutdownDelay`.
pub const MAX_SHUTDOWN_DELAY: Duration = Duration::from_secs(300);

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Issue {
    /// The field.
    pub path: FieldPath,
    /// Point at the field's key rather than its value (the key is what is wrong).
    pub at_key: bool,
    /// The bad value and what is accepted.
    pub message: String,
}

/// Checks every rule; `source` is the document as written, when there is one.
pub(super) fn check(m: &JobManifest, source: Option<&Value>) -> Vec<Issue> {
    let mut c = Checker {
        source,
        issues: Vec::new(),
    };
    let root = FieldPath::root();
    if m.api_version != API_VERSION {
        c.bad(
            root.key("apiVersion"),
            format!(
                "{:?} is not supported; expected {API_VERSION}",
                m.api_version
            ),
        );
    }
    if m.kind != KIND {
        c.bad(
            root.key("kind"),
            format!("{:?} is not supported; expected {KIND}", m.kind),
        );
    }
    c.metadata(&m.metadata, &root.key("metadata"));
    c.spec(&m.spec, &root.key("spec"));
    c.issues
}

/// What a whole-number field accepts, by its key; also used to explain type errors
/// (`replicas: three`) in the same words as range errors.
pub(super) fn accepted_number(key: &str) -> Option<&'static str> {
    Some(match key {
        "replicas" => REPLICAS,
        "priority" => PRIORITY,
        "containerPort" | "port" => PORT,
        "hostPort" => HOST_PORT,
        "attempts" => ATTEMPTS,
        "retries" | "failureThreshold" => RETRIES,
        "maxRestarts" => HEALTH_RESTARTS,
        "maxParallel" => MAX_PARALLEL,
        "canary" => CANARY,
        "weight" => WEIGHT,
        "count" => GPU_COUNT,
        // checkpoint: spec.checkpoint.keep.
        "keep" => checkpoint::KEEP_ACCEPTED,
        _ => return None,
    })
}

const REPLICAS: &str = "a whole number from 1 to 10000 (system jobs ignore replicas)";
const PRIORITY: &str = "a whole number from 0 to 1000";
const PORT: &str = "a port number from 1 to 65535";
const HOST_PORT: &str =
    "a port number from 1 to 65535, or no hostPort to get a free port of the node's dynamic range";
const ATTEMPTS: &str = "a whole number from 0 to 100";
const RETRIES: &str = "a whole number from 1 to 100";
const HEALTH_RESTARTS: &str = "a whole number from 0 to 100";
const MAX_PARALLEL: &str = "a whole number of at least 1";
const CANARY: &str = "a whole number from 0 up to replicas";
const WEIGHT: &str = "a whole number from 1 to 100";
const GPU_COUNT: &str = "a whole number from 1 to 16 (leave out gpus for none)";
const ONE_CHECK: &str = "expected exactly one of http, tcp or exec";

struct Checker<'a> {
    source: Option<&'a Value>,
    issues: Vec<Issue>,
}

impl Checker<'_> {
    fn bad(&mut self, path: FieldPath, message: String) {
        self.issues.push(Issue {
            path,
            at_key: false,
            message,
        });
    }

    fn bad_key(&mut self, path: FieldPath, message: String) {
        self.issues.push(Issue {
            path,
            at_key: true,
            message,
        });
    }

    /// Whether the field is known not to be written (so its value is a default).
    fn absent(&self, path: &FieldPath) -> bool {
        let Some(mut v) = self.source else {
            return false;
        };
        for seg in path.segs() {
            let next = match seg {
                Seg::Key(k) => v.get(k.as_str()),
                Seg::Index(i) => v.get(*i),
            };
            match next {
                Some(n) => v = n,
                None => return true,
            }
        }
        false
    }

    fn range(&mut self, path: FieldPath, n: u32, ok: std::ops::RangeInclusive<u32>, what: &str) {
        if !ok.contains(&n) {
            self.bad(path, format!("{n} is out of range; expected {what}"));
        }
    }

    fn metadata(&mut self, m: &Metadata, p: &FieldPath) {
        if let Err(NameError { name, why }) = names::validate_name(&m.name) {
            let message = format!(
                "{name:?} is not a valid job name: {why}; expected 1 to 63 characters of \
                 a-z, 0-9, '-' and '.', starting and ending with a letter or digit"
            );
            self.bad(p.key("name"), message);
        }
        for key in m.labels.keys().filter(|k| k.trim().is_empty()) {
            self.bad_key(
                p.key("labels").key(key),
                format!("{key:?} is an empty label key; expected a key like team or tier"),
            );
        }
    }

    fn spec(&mut self, s: &JobSpec, p: &FieldPath) {
        if s.job_type != JobType::System {
            self.range(p.key("replicas"), s.replicas, 1..=MAX_REPLICAS, REPLICAS);
        }
        self.range(p.key("priority"), s.priority, 0..=MAX_PRIORITY, PRIORITY);
        self.task(&s.task, &p.key("task"));
        self.resources(&s.resources, &p.key("resources"));
        // The template's memory is checked when the job is applied (the
        // controller resolves it); the job's own is checked here.
        if let Some(vm) = s.task.vm.as_ref().filter(|v| v.template.is_none())
            && let Some(m) =
                super::vm::resources_problem(&super::vm::resolve(vm, None), &s.resources)
        {
            self.bad(p.key("resources").key("memory"), m);
        }
        // A template's limit is checked when the job is applied, with it.
        if let Some(vm) = s.task.vm.as_ref().filter(|v| v.network_bandwidth.is_some())
            && let Some(m) = super::vm::network_problem(&super::vm::resolve(vm, None))
        {
            self.bad(p.key("task").key("vm").key("networkBandwidth"), m);
        }
        if s.task.vm.is_some()
            && let Some(g) = s.resources.gpus.as_ref().filter(|g| g.count > 0)
        {
            // A VM's GPUs pass through whole, bound to vfio-pci.
            if g.memory.is_some() {
                self.bad(
                    p.key("resources").key("gpus").key("memory"),
                    "a virtual machine's GPUs pass through bound to vfio-pci, whose memory the host does not know; choose them by model instead".into(),
                );
            }
            if s.checkpoint.is_some() {
                self.bad(
                    p.key("checkpoint"),
                    "a virtual machine with passthrough GPUs cannot be snapshotted (QEMU cannot save a passed-through device's state); leave out checkpoint".into(),
                );
            }
        }
        self.placement(&s.placement, &p.key("placement"));
        self.restart(&s.restart, &p.key("restart"));
        if let Some(h) = &s.health {
            self.health(h, &p.key("health"));
        }
        self.update(&s.update, s, &p.key("update"));
        if let Some(l) = &s.lifecycle {
            self.lifecycle(l, &p.key("lifecycle"));
        }
        self.services(s, &p.key("services"));
        // checkpoint: the rules live with the type, in the checkpoint module.
        if let Some(c) = &s.checkpoint {
            for (path, message) in checkpoint::problems(c, &p.key("checkpoint")) {
                self.bad(path, message);
            }
        }
    }

    fn services(&mut self, s: &JobSpec, p: &FieldPath) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut ingress_ports: HashMap<u16, usize> = HashMap::new();
        for (i, service) in s.services.iter().enumerate() {
            let at = p.index(i);
            if !is_port_name(&service.name) || service.name.len() > 63 {
                self.bad(
                    at.key("name"),
                    format!(
                        "{:?} is not a valid service name; expected a DNS label: a-z, 0-9 and \
                         '-', starting with a letter or digit, at most 63 (like web)",
                        service.name
                    ),
                );
            } else if let Some(first) = names.insert(&service.name, i) {
                names.insert(&service.name, first);
                self.bad(
                    at.key("name"),
                    format!(
                        "{:?} is already the name of {p}[{first}]; expected a unique name for \
                         each service",
                        service.name
                    ),
                );
            }
            if !s.task.ports.iter().any(|port| port.name == service.port) {
                let declared: Vec<&str> = s.task.ports.iter().map(|p| p.name.as_str()).collect();
                self.bad(
                    at.key("port"),
                    format!(
                        "{:?} is not a port of this task; expected one of the names in \
                         spec.task.ports [{}]",
                        service.port,
                        declared.join(", ")
                    ),
                );
            }
            if let Some(w) = service.weight
                && !(1..=crate::manifest::MAX_SERVICE_WEIGHT).contains(&w)
            {
                self.bad(
                    at.key("weight"),
                    format!(
                        "{w} is out of range; expected 1 to {} (default {})",
                        crate::manifest::MAX_SERVICE_WEIGHT,
                        crate::manifest::DEFAULT_SERVICE_WEIGHT
                    ),
                );
            }
            if let Some(ingress) = &service.ingress {
                let ip = at.key("ingress");
                if ingress.port == 0 {
                    self.bad(
                        ip.key("port"),
                        "0 is not a port; expected the node port to listen on, 1 to 65535".into(),
                    );
                } else if let Some(first) = ingress_ports.insert(ingress.port, i) {
                    ingress_ports.insert(ingress.port, first);
                    self.bad(
                        ip.key("port"),
                        format!(
                            "{} is already the ingress port of {p}[{first}]; expected one \
                             port per service",
                            ingress.port
                        ),
                    );
                }
                if let Some(tls) = &ingress.tls {
                    for (key, file) in [("certFile", &tls.cert_file), ("keyFile", &tls.key_file)] {
                        if !file.starts_with('/') || file.len() > 4096 {
                            self.bad(
                                ip.key("tls").key(key),
                                format!(
                                    "{file:?} is not an absolute path; expected the PEM file's \
                                     path on every node (like /etc/novacron/web.pem)"
                                ),
                            );
                        }
                    }
                }
            }
            for (t, tag) in service.tags.iter().enumerate() {
                if tag.is_empty() || tag.len() > 63 || tag.chars().any(char::is_whitespace) {
                    self.bad(
                        at.key("tags").index(t),
                        format!("{tag:?} is not a tag; expected 1 to 63 characters without spaces"),
                    );
                }
            }
        }
    }

    fn lifecycle(&mut self, l: &Lifecycle, p: &FieldPath) {
        if let Some(sc) = &l.schedule {
            let sp = p.key("schedule");
            let start = parse_cron(&sc.start).map_err(|e| self.bad(sp.key("start"), e));
            let stop = parse_cron(&sc.stop).map_err(|e| self.bad(sp.key("stop"), e));
            if start.is_ok()
                && stop.is_ok()
                && sc.start.split_whitespace().eq(sc.stop.split_whitespace())
            {
                self.bad(
                    sp.key("stop"),
                    format!(
                        "{:?} is the same as start, so the window would never open; expected \
                         a stop expression different from start, like 0 20 * * 1-5",
                        sc.stop
                    ),
                );
            }
        }
        if let Some(max) = l.max_runtime
            && max < MIN_MAX_RUNTIME
        {
            self.bad(
                p.key("maxRuntime"),
                format!(
                    "{} is too short; expected a duration of at least {}, like 8h, or no \
                     maxRuntime for no limit",
                    human(max),
                    human(MIN_MAX_RUNTIME)
                ),
            );
        }
    }

    fn task(&mut self, t: &TaskTemplate, p: &FieldPath) {
        const IMAGE: &str = "expected an image reference like busybox:latest";
        if let Some(d) = t.shutdown_delay
            && d > MAX_SHUTDOWN_DELAY
        {
            self.bad(
                p.key("shutdownDelay"),
                format!(
                    "{} is longer than {}; expected at most 5m",
                    human(d),
                    human(MAX_SHUTDOWN_DELAY)
                ),
            );
        }
        if t.image.trim().is_empty() {
            self.bad(p.key("image"), format!("{:?} is empty; {IMAGE}", t.image));
        } else if t.image.chars().any(char::is_whitespace) {
            self.bad(
                p.key("image"),
                format!("{:?} contains whitespace; {IMAGE}", t.image),
            );
        }
        if t.command.first().is_some_and(|c| c.trim().is_empty()) {
            self.bad(
                p.key("command").index(0),
                "\"\" is an empty program; expected a program like /bin/sh, or no command to \
                 use the image's entrypoint"
                    .into(),
            );
        }
        for key in t.env.keys().filter(|k| !is_env_name(k)) {
            self.bad_key(
                p.key("env").key(key),
                format!(
                    "{key:?} is not a valid variable name; expected letters, digits and '_', \
                     not starting with a digit (like LOG_LEVEL)"
                ),
            );
        }
        self.ports(t, &p.key("ports"));
        self.volumes(t, &p.key("volumes"));
        self.secrets(t, p);
        if let Some(vm) = &t.vm {
            self.vm(t, vm, p);
        }
        if let Some(dir) = &t.working_dir
            && !dir.starts_with('/')
        {
            self.bad(
                p.key("workingDir"),
                format!("{dir:?} is not an absolute path; expected a path like /app"),
            );
        }
    }

    fn vm(&mut self, t: &TaskTemplate, vm: &super::VmTask, task: &FieldPath) {
        let p = &task.key("vm");
        if let Some(name) = &vm.template
            && let Some(m) = names::problem(name, "template")
        {
            self.bad(p.key("template"), m);
        }
        for (key, message) in super::vm::problems(&vm.shape()) {
            self.bad(p.key(key), message);
        }
        if vm.template.is_none() && vm.disk.is_none() {
            for (key, set) in [
                ("diskSize", vm.disk_size.is_some()),
                ("diskBandwidth", vm.disk_bandwidth.is_some()),
                ("diskIops", vm.disk_iops.is_some()),
            ] {
                if set {
                    self.bad(p.key(key), format!("{key} needs a base disk (disk)"));
                }
            }
        }
        for (key, set) in [
            ("command", !t.command.is_empty()),
            ("args", !t.args.is_empty()),
            ("volumes", !t.volumes.is_empty()),
            ("secrets", !t.secrets.is_empty()),
            ("workingDir", t.working_dir.is_some()),
        ] {
            if set {
                self.bad(
                    task.key(key),
                    "a virtual machine takes no container settings; set the guest's through vm.cmdline or its image".into(),
                );
            }
        }
    }

    fn ports(&mut self, t: &TaskTemplate, p: &FieldPath) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut host: HashMap<(u16, bool), usize> = HashMap::new();
        for (i, port) in t.ports.iter().enumerate() {
            let at = p.index(i);
            if !is_port_name(&port.name) {
                self.bad(
                    at.key("name"),
                    format!(
                        "{:?} is not a valid port name; expected a-z, 0-9 and '-', starting \
                         with a letter or digit (like http)",
                        port.name
                    ),
                );
            } else if let Some(first) = names.insert(&port.name, i) {
                names.insert(&port.name, first);
                self.bad(
                    at.key("name"),
                    format!(
                        "{:?} is already the name of {p}[{first}]; expected a unique name for \
                         each port",
                        port.name
                    ),
                );
            }
            if port.container_port == 0 {
                self.bad(
                    at.key("containerPort"),
                    format!("0 is out of range; expected {PORT}"),
                );
            }
            match port.host_port {
                Some(0) => self.bad(
                    at.key("hostPort"),
                    format!("0 is out of range; expected {HOST_PORT}"),
                ),
                Some(h) => {
                    let udp = port.protocol == Protocol::Udp;
                    if let Some(first) = host.insert((h, udp), i) {
                        host.insert((h, udp), first);
                        let proto = match port.protocol {
                            Protocol::Tcp => "tcp",
                            Protocol::Udp => "udp",
                        };
                        self.bad(
                            at.key("hostPort"),
                            format!(
                                "{h}/{proto} is already published by {p}[{first}]; expected \
                                 each host port at most once per protocol"
                            ),
                        );
                    }
                }
                None => {}
            }
        }
    }

    fn secrets(&mut self, t: &TaskTemplate, p: &FieldPath) {
        use crate::names::{MAX_SECRET_KEYS, is_secret_key};
        if let Some(name) = &t.image_pull_secret
            && let Some(m) = crate::names::problem(name, "secret")
        {
            self.bad(p.key("imagePullSecret"), m);
        }
        let p = p.key("secrets");
        if t.secrets.len() > MAX_SECRET_KEYS {
            self.bad(
                p.clone(),
                format!(
                    "{} secret references is too many; expected at most {MAX_SECRET_KEYS}",
                    t.secrets.len()
                ),
            );
        }
        let mut envs: HashMap<&str, usize> = HashMap::new();
        let mut files: HashMap<&str, usize> = HashMap::new();
        for (i, r) in t.secrets.iter().enumerate() {
            let at = p.index(i);
            if let Some(m) = crate::names::problem(&r.secret, "secret") {
                self.bad(at.key("secret"), m);
            }
            if !is_secret_key(&r.key) {
                self.bad(
                    at.key("key"),
                    format!(
                        "{:?} is not a valid key; expected letters, digits, '.', '_' and '-'",
                        r.key
                    ),
                );
            }
            match (&r.env, &r.file) {
                (Some(env), None) => {
                    if !is_env_name(env) {
                        self.bad(
                            at.key("env"),
                            format!(
                                "{env:?} is not a valid variable name; expected letters, digits \
                                 and '_', not starting with a digit (like DB_PASSWORD)"
                            ),
                        );
                    } else if t.env.contains_key(env) {
                        self.bad(
                            at.key("env"),
                            format!(
                                "{env:?} is also set in {}; expected each variable once",
                                "spec.task.env"
                            ),
                        );
                    } else if let Some(first) = envs.insert(env, i) {
                        envs.insert(env, first);
                        self.bad(
                            at.key("env"),
                            format!("{env:?} is already set by {p}[{first}]; expected each variable once"),
                        );
                    }
                }
                (None, Some(file)) => {
                    let normal = file.trim_end_matches('/');
                    if !file.starts_with('/')
                        || normal.is_empty()
                        || file.split('/').any(|c| c == "..")
                    {
                        self.bad(
                            at.key("file"),
                            format!(
                                "{file:?} is not an absolute file path; expected a path in the \
                                 container like /run/secrets/db-password"
                            ),
                        );
                    } else if let Some(first) = files.insert(normal, i) {
                        files.insert(normal, first);
                        self.bad(
                            at.key("file"),
                            format!("{file:?} is already written by {p}[{first}]; expected each file once"),
                        );
                    }
                }
                _ => self.bad(
                    at.clone(),
                    "expected exactly one of env (a variable) or file (a path in the container)"
                        .into(),
                ),
            }
        }
    }

    fn volumes(&mut self, t: &TaskTemplate, p: &FieldPath) {
        let mut targets: HashMap<&str, usize> = HashMap::new();
        for (i, v) in t.volumes.iter().enumerate() {
            let at = p.index(i);
            if !v.source.starts_with('/') && !is_volume_name(&v.source) {
                self.bad(
                    at.key("source"),
                    format!(
                        "{:?} is neither a volume name nor an absolute path; expected a name of \
                         a-z, 0-9, '_', '.' and '-' starting with a letter or digit (like data), \
                         or a host path (like /srv/data)",
                        v.source
                    ),
                );
            }
            if !v.target.starts_with('/') {
                self.bad(
                    at.key("target"),
                    format!(
                        "{:?} is not an absolute path; expected a path in the container like \
                         /data",
                        v.target
                    ),
                );
                continue;
            }
            let target = match v.target.trim_end_matches('/') {
                "" => "/",
                t => t,
            };
            if let Some(first) = targets.insert(target, i) {
                targets.insert(target, first);
                self.bad(
                    at.key("target"),
                    format!(
                        "{:?} is already mounted by {p}[{first}]; expected each target at most \
                         once",
                        v.target
                    ),
                );
            }
        }
    }

    fn resources(&mut self, r: &Resources, p: &FieldPath) {
        let cpu = p.key("cpu");
        if r.cpu.0 == 0 {
            let message = if self.absent(&cpu) {
                "missing; expected the CPU each replica needs, like 500m or 2 (every replica \
                 must ask for some CPU)"
                    .to_string()
            } else {
                "0 is not enough; expected more than 0, like 500m or 2 (every replica must ask \
                 for some CPU)"
                    .to_string()
            };
            self.bad(cpu, message);
        }
        let memory = p.key("memory");
        if r.memory < MIN_MEMORY {
            let message = if self.absent(&memory) {
                format!(
                    "missing; expected the memory each replica needs, at least {MIN_MEMORY} \
                     (Docker's minimum), like 256Mi"
                )
            } else {
                format!(
                    "{} is below Docker's minimum of {MIN_MEMORY}; expected at least \
                     {MIN_MEMORY}, like 256Mi or 1Gi",
                    r.memory
                )
            };
            self.bad(memory, message);
        }
        if let Some(g) = &r.gpus {
            self.gpus(g, &p.key("gpus"));
        }
    }

    fn gpus(&mut self, g: &GpuRequest, p: &FieldPath) {
        self.range(p.key("count"), g.count, 1..=MAX_GPUS, GPU_COUNT);
        if g.model.as_deref().is_some_and(|m| m.trim().is_empty()) {
            self.bad(
                p.key("model"),
                "\"\" is empty; expected part of a model name like A100, or no model".into(),
            );
        }
        if g.memory.is_some_and(|m| m.0 == 0) {
            self.bad(
                p.key("memory"),
                "0 is not a GPU memory size; expected the least memory per GPU like 40Gi, or no \
                 memory"
                    .into(),
            );
        }
    }

    fn placement(&mut self, pl: &Placement, p: &FieldPath) {
        for (i, c) in pl.constraints.iter().enumerate() {
            self.rule(
                &c.key,
                c.operator,
                &c.values,
                &p.key("constraints").index(i),
            );
        }
        for (name, rules) in [
            ("affinity", &pl.affinity),
            ("antiAffinity", &pl.anti_affinity),
        ] {
            for (i, r) in rules.iter().enumerate() {
                let at = p.key(name).index(i);
                self.rule(&r.key, r.operator, &r.values, &at);
                self.range(at.key("weight"), r.weight, 1..=MAX_WEIGHT, WEIGHT);
            }
        }
        let mut keys: HashMap<&str, usize> = HashMap::new();
        for (i, s) in pl.spread.iter().enumerate() {
            let at = p.key("spread").index(i);
            if s.key.trim().is_empty() {
                self.bad(at.key("key"), empty_label_key(&s.key));
            } else if let Some(first) = keys.insert(&s.key, i) {
                keys.insert(&s.key, first);
                self.bad(
                    at.key("key"),
                    format!(
                        "{:?} is already spread over by {}[{first}]; expected each key at most \
                         once",
                        s.key,
                        p.key("spread")
                    ),
                );
            }
            self.range(at.key("weight"), s.weight, 1..=MAX_WEIGHT, WEIGHT);
        }
    }

    /// A label rule: `key <operator> values`.
    fn rule(&mut self, key: &str, op: Operator, values: &[String], p: &FieldPath) {
        if key.trim().is_empty() {
            self.bad(p.key("key"), empty_label_key(key));
        }
        let n = values.len();
        let problem = match op {
            Operator::In | Operator::NotIn if n == 0 => Some(format!(
                "{op} needs at least one value; expected values like [a, b]"
            )),
            Operator::Equal | Operator::NotEqual if n != 1 => Some(format!(
                "{op} takes exactly one value, got {n}; expected values like [a]"
            )),
            Operator::Exists | Operator::DoesNotExist if n != 0 => {
                Some(format!("{op} takes no values, got {n}; expected no values"))
            }
            _ => None,
        };
        if let Some(message) = problem {
            self.bad(p.key("values"), message);
        }
    }

    fn restart(&mut self, r: &Restart, p: &FieldPath) {
        self.range(
            p.key("attempts"),
            r.attempts,
            0..=MAX_RESTART_ATTEMPTS,
            ATTEMPTS,
        );
        if r.delay > r.interval {
            self.bad(
                p.key("delay"),
                format!(
                    "{} is longer than the interval ({}); expected a delay no longer than the \
                     interval",
                    human(r.delay),
                    human(r.interval)
                ),
            );
        }
    }

    fn health(&mut self, h: &Health, p: &FieldPath) {
        let top = h.http.is_some() || h.tcp.is_some() || h.exec.is_some();
        let any_probe = h.liveness.is_some() || h.readiness.is_some() || h.startup.is_some();
        if top || !any_probe {
            self.check_kind(&h.http, &h.tcp, &h.exec, p);
            self.schedule(h.interval, h.timeout, p, "interval");
            self.range(p.key("retries"), h.retries, 1..=MAX_HEALTH_RETRIES, RETRIES);
        }
        if top && h.liveness.is_some() {
            self.bad_key(
                p.key("liveness"),
                "given alongside a check at the top of health (the older form of liveness); \
                 expected either http/tcp/exec at the top of health or health.liveness, not both"
                    .into(),
            );
        }
        for (key, probe, role) in [
            ("liveness", &h.liveness, ProbeRole::Liveness),
            ("readiness", &h.readiness, ProbeRole::Readiness),
            ("startup", &h.startup, ProbeRole::Startup),
        ] {
            if let Some(probe) = probe {
                self.probe(probe, role, &p.key(key));
            }
        }
        if let Some(n) = h.max_restarts {
            self.range(
                p.key("maxRestarts"),
                n,
                0..=MAX_HEALTH_RESTARTS,
                HEALTH_RESTARTS,
            );
        }
        if let Some(b) = h.restart_backoff
            && !(MIN_RESTART_BACKOFF..=MAX_RESTART_BACKOFF).contains(&b)
        {
            self.bad(
                p.key("restartBackoff"),
                format!(
                    "{} is out of range; expected a duration from {} to {}",
                    human(b),
                    human(MIN_RESTART_BACKOFF),
                    human(MAX_RESTART_BACKOFF)
                ),
            );
        }
    }

    fn probe(&mut self, probe: &Probe, role: ProbeRole, p: &FieldPath) {
        self.check_kind(&probe.http, &probe.tcp, &probe.exec, p);
        self.schedule(probe.period, probe.timeout, p, "period");
        self.range(
            p.key("failureThreshold"),
            probe.threshold(role),
            1..=MAX_HEALTH_RETRIES,
            RETRIES,
        );
        if probe.initial_delay > MAX_INITIAL_DELAY {
            self.bad(
                p.key("initialDelay"),
                format!(
                    "{} is too long; expected at most {}",
                    human(probe.initial_delay),
                    human(MAX_INITIAL_DELAY)
                ),
            );
        }
    }

    /// Exactly one kind of check, each well formed.
    fn check_kind(
        &mut self,
        http: &Option<HttpCheck>,
        tcp: &Option<TcpCheck>,
        exec: &Option<ExecCheck>,
        p: &FieldPath,
    ) {
        let given: Vec<&str> = [
            ("http", http.is_some()),
            ("tcp", tcp.is_some()),
            ("exec", exec.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        match given.as_slice() {
            [] => self.bad(p.clone(), format!("no check given; {ONE_CHECK}")),
            [_] => {}
            [first, rest @ ..] => {
                for extra in rest {
                    self.bad_key(
                        p.key(extra),
                        format!("{extra} given alongside {first}; {ONE_CHECK}"),
                    );
                }
            }
        }
        if let Some(HttpCheck { port, path }) = http {
            self.check_port(p.key("http").key("port"), *port);
            if !path.starts_with('/') {
                self.bad(
                    p.key("http").key("path"),
                    format!("{path:?} does not start with '/'; expected a path like /healthz"),
                );
            }
        }
        if let Some(tcp) = tcp {
            self.check_port(p.key("tcp").key("port"), tcp.port);
        }
        if let Some(ExecCheck { command }) = exec
            && command.first().is_none_or(|c| c.trim().is_empty())
        {
            self.bad(
                p.key("exec").key("command"),
                "the command is empty; expected a program and its arguments, like \
                 [pg_isready, -q]"
                    .into(),
            );
        }
    }

    /// The time between checks (`every`, named `key`) and the timeout of one.
    fn schedule(&mut self, every: Duration, timeout: Duration, p: &FieldPath, key: &str) {
        if every < MIN_HEALTH_INTERVAL {
            self.bad(
                p.key(key),
                format!(
                    "{} is too short; expected at least {}",
                    human(every),
                    human(MIN_HEALTH_INTERVAL)
                ),
            );
        }
        if timeout >= every {
            self.bad(
                p.key("timeout"),
                format!(
                    "{} is not shorter than the {key} ({}); expected a timeout shorter than \
                     the {key}",
                    human(timeout),
                    human(every)
                ),
            );
        }
    }

    fn check_port(&mut self, path: FieldPath, port: u16) {
        if port == 0 {
            self.bad(path, format!("0 is out of range; expected {PORT}"));
        }
    }

    fn update(&mut self, u: &Update, s: &JobSpec, p: &FieldPath) {
        if u.max_parallel == 0 {
            self.bad(
                p.key("maxParallel"),
                format!("0 is out of range; expected {MAX_PARALLEL}"),
            );
        }
        if s.job_type != JobType::System && u.canary > s.replicas {
            self.bad(
                p.key("canary"),
                format!(
                    "{} is more than the replicas ({}); expected {CANARY}",
                    u.canary, s.replicas
                ),
            );
        }
        if u.min_healthy_time >= u.healthy_deadline {
            self.bad(
                p.key("minHealthyTime"),
                format!(
                    "{} is not shorter than the healthyDeadline ({}); expected a minHealthyTime \
                     shorter than the healthyDeadline",
                    human(u.min_healthy_time),
                    human(u.healthy_deadline)
                ),
            );
        }
    }
}

fn empty_label_key(key: &str) -> String {
    format!("{key:?} is an empty label key; expected a node label key like zone")
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(s: &str) -> bool {
    let mut b = s.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

/// `[a-z0-9][a-z0-9-]*`, at most 63 characters.
fn is_port_name(s: &str) -> bool {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    s.len() <= 63 && s.bytes().next().is_some_and(ok) && s.bytes().all(|c| ok(c) || c == b'-')
}

/// `[a-z0-9][a-z0-9_.-]*`.
fn is_volume_name(s: &str) -> bool {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    s.bytes().next().is_some_and(ok) && s.bytes().all(|c| ok(c) || b"_.-".contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        for ok in ["A", "_", "LOG_LEVEL", "a1", "_9"] {
            assert!(is_env_name(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A B", "É"] {
            assert!(!is_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn services_name_a_port_of_the_task_and_are_unique() {
        let job = |services: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: web}}\nspec:\n  task:\n    \
                 image: busybox\n    ports: [{{name: http, containerPort: 80}}]\n  resources: {{cpu: 100m, memory: 32Mi}}\n  services: {services}\n"
            )
        };
        let ok =
            crate::manifest::parse_job("ok.yaml", &job("[{name: web, port: http, tags: [v1]}]"))
                .expect("valid");
        assert_eq!(ok.spec.services[0].port, "http");
        let errors = crate::manifest::parse_job(
            "bad.yaml",
            &job("[{name: web, port: grpc}, {name: web, port: http}, {name: Web, port: http, tags: ['a b']}]"),
        )
        .expect_err("invalid")
        .to_string();
        for wanted in [
            "spec.services[0].port: \"grpc\" is not a port of this task; expected one of the names in spec.task.ports [http]",
            "spec.services[1].name: \"web\" is already the name of spec.services[0]",
            "spec.services[2].name: \"Web\" is not a valid service name",
            "spec.services[2].tags[0]: \"a b\" is not a tag",
        ] {
            assert!(errors.contains(wanted), "{wanted}\n{errors}");
        }
    }

    #[test]
    fn a_vm_s_gpus_pass_through_by_model_and_never_with_snapshots() {
        let job = |gpus: &str, extra: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: vm}}\nspec:\n  task:\n    \
                 image: novacron/guest-tiny:1\n    vm: {{memory: 256Mi}}\n  \
                 resources: {{cpu: 1, memory: 512Mi, gpus: {gpus}}}\n{extra}"
            )
        };
        crate::manifest::parse_job("ok.yaml", &job("{count: 1, model: H100}", ""))
            .expect("a passthrough GPU by model");
        let errors = crate::manifest::parse_job(
            "bad.yaml",
            &job("{count: 1, memory: 80Gi}", "  checkpoint: {interval: 1h}\n"),
        )
        .expect_err("invalid")
        .to_string();
        for wanted in [
            "spec.resources.gpus.memory: a virtual machine's GPUs pass through bound to vfio-pci",
            "spec.checkpoint: a virtual machine with passthrough GPUs cannot be snapshotted",
        ] {
            assert!(errors.contains(wanted), "{wanted}\n{errors}");
        }
        // A container's GPU may ask for memory (NVML reports it).
        let container = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: c}\nspec:\n  task:\n    \
             image: app:1\n  resources: {cpu: 1, memory: 512Mi, gpus: {count: 1, memory: 80Gi}}\n";
        crate::manifest::parse_job("c.yaml", container).expect("a container's GPU memory");
    }

    #[test]
    fn a_vm_task_is_checked_and_reaches_the_agent() {
        let job = |vm: &str, extra: &str, memory: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: vm}}\nspec:\n  task:\n    \
                 image: novacron/guest-tiny:1\n    vm: {vm}\n{extra}  resources: {{cpu: 1, memory: {memory}}}\n"
            )
        };
        let ok = crate::manifest::parse_job(
            "ok.yaml",
            &job("{vcpus: 2, memory: 256Mi, initrd: /boot/initrd.img, disk: /disk/root.qcow2, diskSize: 2Gi, diskBandwidth: 20Mi, diskIops: 500}", "", "320Mi"),
        )
        .expect("valid");
        let spec = ok.task_spec().vm.expect("a VM spec");
        assert_eq!(
            (
                spec.vcpus,
                spec.memory_mib,
                spec.kernel.as_str(),
                spec.cmdline.as_str()
            ),
            (2, 256, "/boot/vmlinuz", "console=ttyS0")
        );
        assert_eq!(spec.disk_bytes, 2 << 30);
        assert_eq!((spec.disk_bytes_per_sec, spec.disk_iops), (20 << 20, 500));
        assert_eq!(spec.machine, "q35");
        let errors = crate::manifest::parse_job(
            "bad.yaml",
            &job(
                "{vcpus: 0, memory: 1Mi, kernel: boot/vmlinuz, initrd: /../x, machine: virt, diskSize: 1Gi, diskBandwidth: 1Ki, diskIops: 0}",
                "    command: [/bin/sh]\n",
                "64Mi",
            ),
        )
        .expect_err("invalid")
        .to_string();
        for wanted in [
            "spec.task.vm.vcpus: 0 is out of range",
            "spec.task.vm.memory: 1048576 bytes is out of range",
            "spec.task.vm.kernel: \"boot/vmlinuz\" is not an absolute path",
            "spec.task.vm.initrd: \"/../x\" is not an absolute path",
            "spec.task.vm.machine: \"virt\" is not a machine",
            "spec.task.vm.diskSize: diskSize needs a base disk",
            "spec.task.vm.diskBandwidth: 1024 bytes per second is too little",
            "spec.task.vm.diskBandwidth: diskBandwidth needs a base disk",
            "spec.task.vm.diskIops: 0 is out of range",
            "spec.task.command: a virtual machine takes no container settings",
        ] {
            assert!(errors.contains(wanted), "{wanted}\n{errors}");
        }
        let small = crate::manifest::parse_job("small.yaml", &job("{memory: 512Mi}", "", "256Mi"))
            .expect_err("resources below the guest's memory")
            .to_string();
        assert!(
            small
                .contains("spec.resources.memory: 268435456 bytes is less than the guest's memory"),
            "{small}"
        );
        // A network limit: on the bridge network only, and not below 64Ki.
        let limited = crate::manifest::parse_job(
            "net.yaml",
            &job("{network: bridge, networkBandwidth: 2Mi}", "", "512Mi"),
        )
        .expect("valid");
        let spec = limited.task_spec().vm.expect("a VM spec");
        assert_eq!(spec.net_bytes_per_sec, 2 << 20);
        for (vm, wanted) in [
            (
                "{networkBandwidth: 2Mi}",
                "spec.task.vm.networkBandwidth: a network limit applies to a guest on the bridge network",
            ),
            (
                "{network: bridge, networkBandwidth: 1Ki}",
                "spec.task.vm.networkBandwidth: 1024 bytes per second is too little",
            ),
        ] {
            let errors = crate::manifest::parse_job("net.yaml", &job(vm, "", "512Mi"))
                .expect_err("invalid")
                .to_string();
            assert!(errors.contains(wanted), "{wanted}\n{errors}");
        }
    }

    #[test]
    fn shutdown_delay_is_bounded_and_reaches_the_task() {
        let job = |delay: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: web}}\nspec:\n  task:\n    \
                 image: busybox\n    shutdownDelay: {delay}\n  resources: {{cpu: 100m, memory: 32Mi}}\n"
            )
        };
        let ok = crate::manifest::parse_job("ok.yaml", &job("3s")).expect("valid");
        assert_eq!(ok.task_spec().shutdown_delay_ms, 3000);
        let errors = crate::manifest::parse_job("bad.yaml", &job("10m"))
            .expect_err("too long")
            .to_string();
        assert!(
            errors.contains("spec.task.shutdownDelay: 10m is longer than 5m"),
            "{errors}"
        );
    }

    #[test]
    fn ingress_ports_are_unique_and_tls_files_absolute() {
        let job = |services: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: web}}\nspec:\n  task:\n    \
                 image: busybox\n    ports: [{{name: http, containerPort: 80}}]\n  resources: {{cpu: 100m, memory: 32Mi}}\n  services: {services}\n"
            )
        };
        let ok = crate::manifest::parse_job(
            "ok.yaml",
            &job("[{name: web, port: http, ingress: {port: 8080, tls: {certFile: /etc/w.pem, keyFile: /etc/w.key}}}, {name: raw, port: http, ingress: {port: 9000, protocol: tcp}}]"),
        )
        .expect("valid");
        let ingress = ok.spec.services[0].ingress.as_ref().expect("ingress");
        assert_eq!(ingress.protocol, novacron_wire::IngressProtocol::Http);
        assert_eq!(
            ok.spec.services[1].ingress.as_ref().map(|i| i.protocol),
            Some(novacron_wire::IngressProtocol::Tcp)
        );
        let errors = crate::manifest::parse_job(
            "bad.yaml",
            &job("[{name: a, port: http, ingress: {port: 0}}, {name: b, port: http, ingress: {port: 81, tls: {certFile: w.pem, keyFile: /k}}}, {name: c, port: http, ingress: {port: 81}}]"),
        )
        .expect_err("invalid")
        .to_string();
        for wanted in [
            "spec.services[0].ingress.port: 0 is not a port",
            "spec.services[1].ingress.tls.certFile: \"w.pem\" is not an absolute path",
            "spec.services[2].ingress.port: 81 is already the ingress port of spec.services[1]",
        ] {
            assert!(errors.contains(wanted), "{wanted}\n{errors}");
        }
        let unknown = crate::manifest::parse_job(
            "bad.yaml",
            &job("[{name: a, port: http, ingress: {port: 80, protocol: udp}}]"),
        )
        .expect_err("invalid")
        .to_string();
        assert!(unknown.contains("udp"), "{unknown}");
    }

    #[test]
    fn a_service_weight_is_1_to_256() {
        let job = |services: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: web}}\nspec:\n  task:\n    \
                 image: busybox\n    ports: [{{name: http, containerPort: 80}}]\n  resources: {{cpu: 100m, memory: 32Mi}}\n  services: {services}\n"
            )
        };
        let ok = crate::manifest::parse_job(
            "ok.yaml",
            &job("[{name: a, port: http, weight: 10}, {name: b, port: http}]"),
        )
        .expect("valid");
        assert_eq!(
            (ok.spec.services[0].weight(), ok.spec.services[1].weight()),
            (10, 100)
        );
        let errors = crate::manifest::parse_job(
            "bad.yaml",
            &job("[{name: a, port: http, weight: 0}, {name: b, port: http, weight: 257}]"),
        )
        .expect_err("invalid")
        .to_string();
        for wanted in [
            "spec.services[0].weight: 0 is out of range; expected 1 to 256 (default 100)",
            "spec.services[1].weight: 257 is out of range",
        ] {
            assert!(errors.contains(wanted), "{wanted}\n{errors}");
        }
    }

    #[test]
    fn volume_and_port_names() {
        assert!(is_volume_name("data"));
        assert!(is_volume_name("pg_data.v-2"));
        assert!(!is_volume_name("Data"));
        assert!(!is_volume_name("-data"));
        assert!(!is_volume_name(""));
        assert!(is_port_name("http"));
        assert!(is_port_name("grpc-web"));
        assert!(!is_port_name("HTTP"));
        assert!(!is_port_name("-x"));
        assert!(!is_port_name(""));
    }

    #[test]
    fn every_number_key_has_an_accepted_range() {
        for key in [
            "replicas",
            "priority",
            "containerPort",
            "hostPort",
            "port",
            "weight",
        ] {
            assert!(accepted_number(key).is_some(), "{key}");
        }
        assert_eq!(accepted_number("image"), None);
    }
}
