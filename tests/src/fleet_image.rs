//! The fleet image: `novacron-fleet:<hash>`, the controller and the agent as already
//! built in `target/<profile>/` (plus the shared libraries `ldd` lists, the loader, a
//! static busybox and the packaged `/etc/novacron/*.toml`), built locally with the
//! classic builder from `packaging/images/fleet/Dockerfile`: no second compile and
//! no registry. The fleet tests run controllers and agents from it; the node pool
//! tests give it to the `docker` provider as the image of its nodes.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use novacron_cli::dev::DEMO_IMAGE;

use crate::{bin_dir, docker};

/// Image repository of the fleet image; the tag is a hash of its contents.
pub const IMAGE_REPO: &str = "novacron-fleet";
/// The demo image's Dockerfile (the same as `novacron dev` builds).
pub const DEMO_DOCKERFILE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"/bin/sh\"]\n";

/// Builds the fleet image from the binaries in `target/<profile>/` once per content
/// (the tag is a hash of the inputs); concurrent test processes take a file lock.
pub fn fleet_image() -> Result<String> {
    let _lock = lock()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bins = ["novacron-agent", "novacron-controller"].map(|b| bin_dir().join(b));
    let files = [
        root.join("packaging/images/fleet/Dockerfile"),
        root.join("packaging/etc/agent.toml"),
        root.join("packaging/etc/controller.toml"),
        PathBuf::from("/bin/busybox"),
    ];
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for path in bins.iter().chain(&files) {
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "{} is missing (build with `cargo build --workspace --bins`; busybox comes from Debian's busybox-static)",
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
    let tag = format!("{IMAGE_REPO}:{:016x}", hasher.finish());
    if docker(&["image", "inspect", "-f", "{{.Id}}", &tag]).is_ok() {
        return Ok(tag);
    }
    let ctx = tempfile::Builder::new()
        .prefix("novacron-fleet-ctx-")
        .tempdir()?;
    let rootfs = ctx.path().join("rootfs");
    std::fs::copy(&files[0], ctx.path().join("Dockerfile"))?;
    for bin in &bins {
        let name = bin.file_name().context("binary name")?;
        place(bin, &rootfs.join("usr/bin").join(name))?;
        for lib in shared_libraries(bin)? {
            let target = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
            if !target.exists() {
                place(&lib, &target)?;
            }
        }
    }
    place(&files[1], &rootfs.join("etc/novacron/agent.toml"))?;
    place(&files[2], &rootfs.join("etc/novacron/controller.toml"))?;
    place(&files[3], &rootfs.join("bin/busybox"))?;
    let out = Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args([
            "build",
            "-q",
            "--label",
            "novacron.fleet-image=1",
            "-t",
            &tag,
        ])
        .arg(ctx.path())
        .output()
        .context("running docker build")?;
    if !out.status.success() {
        bail!(
            "docker build of {tag} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Older fleet images are of older binaries; remove them (best effort: one in use
    // by a running test stays).
    if let Ok(old) = docker(&["images", IMAGE_REPO, "--format", "{{.Repository}}:{{.Tag}}"]) {
        for image in old.lines().filter(|i| *i != tag) {
            let _ = docker(&["rmi", image]);
        }
    }
    Ok(tag)
}

/// Builds `novacron-dev/busybox:1` (what `novacron dev` runs) when missing.
pub fn ensure_demo_image() -> Result<()> {
    let _lock = lock()?;
    if docker(&["image", "inspect", "-f", "{{.Id}}", DEMO_IMAGE]).is_ok() {
        return Ok(());
    }
    let ctx = tempfile::tempdir()?;
    std::fs::write(ctx.path().join("Dockerfile"), DEMO_DOCKERFILE)?;
    std::fs::copy("/bin/busybox", ctx.path().join("busybox"))
        .context("copying /bin/busybox (install Debian's busybox-static)")?;
    let out = Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", DEMO_IMAGE])
        .arg(ctx.path())
        .output()?;
    if !out.status.success() {
        bail!(
            "docker build failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// An exclusive lock shared by the test processes that build images.
pub(crate) fn lock() -> Result<std::fs::File> {
    let path = std::env::temp_dir().join("novacron-fleet-image.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(file)
}

/// The absolute paths `ldd` lists for `bin`, the dynamic loader included.
pub(crate) fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; linux-vdso has no file.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    if !libs
        .iter()
        .any(|l| l.to_string_lossy().contains("ld-linux"))
    {
        bail!("ldd listed no dynamic loader for {}: {text}", bin.display());
    }
    Ok(libs)
}

/// Hard-links `from` to `to` (same file system), else copies it.
pub(crate) fn place(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let from = std::fs::canonicalize(from)?;
    if std::fs::hard_link(&from, to).is_err() {
        std::fs::copy(&from, to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}
