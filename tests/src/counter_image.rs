//! The counter image: `novacron-counter:<hash>`, the stateful test workload of the
//! live checkpoint tests (`tests/src/bin/counter.rs`) as already built in
//! `target/<profile>/`, plus the shared libraries `ldd` lists for it (the loader
//! included) and Debian's static busybox with its applets as symlinks in `/bin` (so
//! `docker exec <c> cat /data/count.log` works). Built `FROM scratch` with the
//! classic builder and no `RUN` step (no container is needed to build it, so it
//! builds on any daemon, also one with `--bridge=none`), on the daemon a test
//! names: the live checkpoint daemons are separate from the host's.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};

use crate::bin_dir;
use crate::fleet_image::{lock, place, shared_libraries};

/// Image repository of the counter image; the tag is a hash of its contents.
pub const COUNTER_IMAGE_REPO: &str = "novacron-counter";

/// The Dockerfile; the context holds `rootfs/`.
const DOCKERFILE: &str = "FROM scratch\n\
COPY rootfs/ /\n\
ENV PATH=/usr/bin:/bin PORT=8080 DATA_FILE=/data/count.log\n\
EXPOSE 8080\n\
VOLUME [\"/data\"]\n\
CMD [\"/usr/bin/novacron-counter\"]\n";

/// Runs `docker <args>` against `docker_host` (`None`: the CLI's default daemon) and
/// returns its trimmed standard output.
fn docker_at(docker_host: Option<&str>, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("docker");
    if let Some(host) = docker_host {
        cmd.env("DOCKER_HOST", host);
    }
    let out = cmd.args(args).output().context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {:?} (DOCKER_HOST {:?}) failed: {}",
            args,
            docker_host,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The shared libraries of `bin`; none for a static binary.
fn libraries_of(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    shared_libraries(bin)
}

/// Builds `novacron-counter:<hash>` on `docker_host` (`None`: the default daemon)
/// from `target/<profile>/novacron-counter`, once per content (skipped when the tag
/// exists there), and returns the tag.
pub fn counter_image(docker_host: Option<&str>) -> Result<String> {
    let _lock = lock()?;
    let bin = bin_dir().join("novacron-counter");
    let busybox = PathBuf::from("/bin/busybox");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    DOCKERFILE.hash(&mut hasher);
    for path in [&bin, &busybox] {
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "{} is missing (build with `cargo build -p novacron-tests --bin novacron-counter`; busybox comes from Debian's busybox-static)",
                path.display()
            )
        })?;
        path.hash(&mut hasher);
        meta.len().hash(&mut hasher);
        meta.modified()
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .hash(&mut hasher);
    }
    let tag = format!("{COUNTER_IMAGE_REPO}:{:016x}", hasher.finish());
    if docker_at(docker_host, &["image", "inspect", "-f", "{{.Id}}", &tag]).is_ok() {
        return Ok(tag);
    }

    let ctx = tempfile::Builder::new()
        .prefix("novacron-counter-ctx-")
        .tempdir()?;
    std::fs::write(ctx.path().join("Dockerfile"), DOCKERFILE)?;
    let rootfs = ctx.path().join("rootfs");
    place(&bin, &rootfs.join("usr/bin/novacron-counter"))?;
    for lib in libraries_of(&bin)? {
        let target = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
        if !target.exists() {
            place(&lib, &target)?;
        }
    }
    place(&busybox, &rootfs.join("bin/busybox"))?;
    // The applets as symlinks, as `busybox --install -s /bin` would make them.
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    if !list.status.success() {
        bail!("busybox --list failed");
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = rootfs.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("/bin/busybox", &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    for dir in ["data", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    }

    let mut cmd = Command::new("docker");
    if let Some(host) = docker_host {
        cmd.env("DOCKER_HOST", host);
    }
    let out = cmd
        .env("DOCKER_BUILDKIT", "0")
        .args([
            "build",
            "-q",
            "--label",
            "novacron.counter-image=1",
            "-t",
            &tag,
        ])
        .arg(ctx.path())
        .output()
        .context("running docker build")?;
    if !out.status.success() {
        bail!(
            "docker build of {tag} (DOCKER_HOST {docker_host:?}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(tag)
}

/// What a counter job looks like: name, image, ballast, published port, data volume
/// and checkpoint policy.
#[derive(Debug, Clone)]
pub struct CounterJob<'a> {
    /// Job name.
    pub job: &'a str,
    /// Image (from [`counter_image`]).
    pub image: &'a str,
    /// `BALLAST_MB`.
    pub ballast_mb: u64,
    /// `DIRTY_MB` (rewritten at 4 MiB/s; 0: none).
    pub dirty_mb: u64,
    /// `DISK_MB`: a file of this many MiB in the writable layer (0: none).
    pub disk_mb: u64,
    /// Host port published for container port 8080.
    pub port: u16,
    /// Named volume mounted at `/data`.
    pub volume: &'a str,
    /// CPU in millicores.
    pub cpu_millis: u64,
    /// `checkpoint.mode`.
    pub mode: &'a str,
    /// Extra lines of the `checkpoint:` block (indented four spaces).
    pub checkpoint_extra: &'a str,
}

impl CounterJob<'_> {
    /// The job manifest: one replica, an HTTP health check on `/health`, memory
    /// for the ballast plus 256 MiB.
    pub fn manifest(&self) -> String {
        let CounterJob {
            job,
            image,
            ballast_mb,
            dirty_mb,
            disk_mb,
            port,
            volume,
            cpu_millis,
            mode,
            checkpoint_extra,
        } = self;
        let memory = ballast_mb + dirty_mb + 256;
        format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
spec:
  type: service
  replicas: 1
  task:
    image: {image}
    env:
      BALLAST_MB: \"{ballast_mb}\"
      DIRTY_MB: \"{dirty_mb}\"
      DISK_MB: \"{disk_mb}\"
    ports:
      - name: http
        containerPort: 8080
        hostPort: {port}
    volumes:
      - source: {volume}
        target: /data
  resources:
    cpu: {cpu_millis}m
    memory: {memory}Mi
  health:
    http:
      port: 8080
      path: /health
    interval: 1s
    timeout: 500ms
  checkpoint:
    mode: {mode}
    keep: 2
{checkpoint_extra}"
        )
    }
}
