//! Checkpoints of agent-owned (runc) containers, CRIU driven directly: `runc
//! checkpoint` writes the CRIU image straight into the bundle's stage, with no
//! copy through Docker's content store, and `runc restore` reads it from the
//! unpacked bundle.
//!
//! The bundle has the same members as a Docker container's: `criu/` (live),
//! `rootfs.tar` (the paths the container added or changed: its overlay upper
//! directory less the whiteouts, which become `deleted`) and
//! `volumes/<n>.tar`. So a filesystem checkpoint restores into either
//! runtime; a live one only into an agent-owned container ([`BundleMeta::runc`]).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use novacron_common::checkpoint::{BUNDLE_FORMAT, BundleInfo, BundleMeta, CheckpointMode};
use tracing::{info, warn};

use super::bundle::{CRIU_DIR, ROOTFS_TAR, VOLUMES_DIR, unpack};
use super::cache::ensure_space;
use super::early::{self, Snapshot, Stamp};
use super::rootfs::{container_path, safe_relative, write_whiteouts};
use super::{CheckpointError, Checkpointer, blocking, mkdir, now_ms};
use crate::runtime::oci::OciDriver;

/// The overlay's marker of a directory that hides the lower layer's.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

fn failed(id: &str) -> impl Fn(crate::runtime::RuntimeError) -> CheckpointError + '_ {
    move |e| CheckpointError::Daemon {
        op: "runc",
        target: id.to_owned(),
        message: e.to_string(),
    }
}

impl Checkpointer {
    /// Checkpoints agent-owned container `id` into a bundle. Live: a CRIU dump
    /// (the container stops, or with `keep_running` goes on once dumped). Fs:
    /// the container stops (`grace` before it is killed), or with
    /// `keep_running` is paused while its files are copied. `dump_ms` runs from
    /// the dump or stop until the files are copied.
    #[allow(clippy::too_many_arguments)]
    pub async fn checkpoint_oci(
        &self,
        oci: &OciDriver,
        id: &str,
        alloc: &str,
        job: &str,
        node: &str,
        mode: CheckpointMode,
        volume_targets: &[String],
        keep_running: bool,
        grace: Duration,
    ) -> Result<BundleInfo, CheckpointError> {
        for target in volume_targets {
            container_path(target)?;
        }
        let stage = self.temp_dir(".stage-")?;
        let created_unix_ms = now_ms();
        let mounts = oci.mounts(id).await.map_err(failed(id))?;
        let started = Instant::now();
        let halted = match (mode, keep_running) {
            (CheckpointMode::Live, false) => oci
                .checkpoint(id, &stage.path().join(CRIU_DIR), false)
                .await
                .map(|_| false),
            (CheckpointMode::Live, true) => {
                match oci.checkpoint(id, &stage.path().join(CRIU_DIR), true).await {
                    Ok(_) => oci.pause(id).await.map(|()| true),
                    Err(e) => Err(e),
                }
            }
            (_, false) => oci.stop(id, grace).await.map(|()| false),
            (_, true) => oci.pause(id).await.map(|()| true),
        }
        .map_err(failed(id))?;
        let upper = oci.upper_dir(id);
        let dest = stage.path().to_path_buf();
        let targets = volume_targets.to_vec();
        let copied = blocking(move || copy_files(&upper, &mounts, &targets, &dest, None)).await;
        if halted && let Err(e) = oci.resume(id).await {
            warn!(container = %id, error = %e, "cannot resume the container after its checkpoint");
        }
        let Copied {
            bytes: staged,
            deleted,
            ..
        } = copied?;
        let dump_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let meta = BundleMeta {
            format: BUNDLE_FORMAT,
            mode,
            alloc: alloc.to_owned(),
            job: job.to_owned(),
            image: oci.image_of(id).unwrap_or_default(),
            criu_name: (mode == CheckpointMode::Live).then(|| "runc".to_owned()),
            deleted,
            volumes: volume_targets.to_vec(),
            created_unix_ms,
            container: None,
            vm: false,
            runc: mode == CheckpointMode::Live,
            vm_address: None,
        };
        let bundle = self.seal(stage, &meta, staged, node, dump_ms).await?;
        info!(container = %id, alloc, %mode, digest = %bundle.digest, size = bundle.size, dump_ms, total_ms = started.elapsed().as_millis(), "runc container checkpoint written");
        Ok(bundle)
    }

    /// Restores the cached bundle `digest` into agent-owned container `id`,
    /// created and never started, and starts it: its files go into the
    /// container's writable layer and volumes, then `runc restore` (live) or
    /// `runc run` (fs). An error can leave the container partly filled, so the
    /// caller removes it.
    pub async fn restore_oci(
        &self,
        oci: &OciDriver,
        digest: &str,
        id: &str,
    ) -> Result<CheckpointMode, CheckpointError> {
        let size = self.verify(digest).await?;
        ensure_space(&self.cache_dir, size)?;
        let stage = self.temp_dir(".restore-")?;
        let bundle = self.bundle_path(digest)?;
        let dest = stage.path().to_path_buf();
        let limit = self.max_bytes;
        let started = Instant::now();
        let meta = blocking(move || unpack(&bundle, &dest, limit)).await?;
        if meta.vm {
            return Err(CheckpointError::BadBundle {
                bundle: digest.to_owned(),
                reason: "it is a virtual machine's snapshot, not a container's checkpoint"
                    .to_owned(),
            });
        }
        if meta.mode == CheckpointMode::Live && !meta.runc {
            return Err(CheckpointError::BadBundle {
                bundle: digest.to_owned(),
                reason: "its CRIU image was made through Docker's checkpoint API and restores only into a Docker container; this node runs its containers under runc (restore it on a node with container_runtime docker, or take a filesystem checkpoint)".to_owned(),
            });
        }
        let unpacked_ms = started.elapsed().as_millis();
        let mounts = oci.mounts(id).await.map_err(failed(id))?;
        let (from, upper, m) = (stage.path().to_path_buf(), oci.upper_dir(id), meta.clone());
        blocking(move || apply_files(&from, &upper, &mounts, &m)).await?;
        let copied_ms = started.elapsed().as_millis();
        if meta.mode == CheckpointMode::Live {
            oci.restore(id, &stage.path().join(CRIU_DIR))
                .await
                .map_err(failed(id))?;
        } else {
            oci.start(id).await.map_err(failed(id))?;
        }
        info!(container = %id, digest, mode = %meta.mode, unpacked_ms, copied_ms, total_ms = started.elapsed().as_millis(), "runc container restored from checkpoint");
        Ok(meta.mode)
    }
}

/// What [`copy_files`] staged.
#[derive(Debug, Default)]
pub(crate) struct Copied {
    /// The bytes of the files staged.
    pub(crate) bytes: u64,
    /// Paths deleted from the image (the upper directory's whiteouts).
    pub(crate) deleted: Vec<String>,
    /// With an early copy: its paths that are gone ([`Snapshot::removed`]).
    pub(crate) removed: Vec<String>,
    /// With an early copy: the paths left out as unchanged since.
    pub(crate) unchanged: usize,
}

/// Writes `rootfs.tar` (the upper directory less its whiteouts) and one tar
/// per volume target into `dest`. Given the [`Snapshot`] of an early copy
/// ([`super::early::send_files`]), only what changed since goes in.
pub(crate) fn copy_files(
    upper: &Path,
    mounts: &[(String, PathBuf)],
    targets: &[String],
    dest: &Path,
    since: Option<&Snapshot>,
) -> Result<Copied, CheckpointError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| CheckpointError::Io {
            what,
            path: path.clone(),
            source,
        }
    };
    let rootfs = dest.join(ROOTFS_TAR);
    let mut tar = tar::Builder::new(BufWriter::new(
        File::create(&rootfs).map_err(io("creating", &rootfs))?,
    ));
    tar.follow_symlinks(false);
    let mut out = Copied::default();
    let mut seen = BTreeMap::new();
    // Whether `rel` of root `volume` is left out as the early copy sent it.
    let mut skip = |volume: Option<usize>, rel: &Path, meta: &std::fs::Metadata| {
        let Some(snap) = since else {
            return false;
        };
        let key = early::key(volume, rel);
        let stamp = Stamp::of(meta);
        let same = snap.unchanged(&key, &stamp);
        seen.insert(key, stamp);
        same
    };
    let mut unchanged = 0usize;
    let mut deleted = Vec::new();
    let mut bytes = 0u64;
    walk(upper, Path::new(""), &mut |rel, full, meta| {
        if meta.file_type().is_char_device() && meta.rdev() == 0 {
            deleted.push(format!("/{}", rel.display()));
            return Ok(());
        }
        if skip(None, rel, meta) {
            unchanged += 1;
            return Ok(());
        }
        if meta.is_dir()
            && rustix::fs::getxattr(full, OPAQUE_XATTR, &mut [0u8; 4]).is_ok_and(|n| n > 0)
        {
            warn!(path = %rel.display(), "a directory the container replaced is carried without hiding the image's files under it (overlay opaque directories are not carried yet)");
        }
        bytes += meta.len();
        tar.append_path_with_name(full, rel)
            .map_err(io("archiving", full))
    })?;
    tar.into_inner()
        .map_err(io("writing", &rootfs))
        .and_then(|w| {
            w.into_inner()
                .map_err(|e| io("writing", &rootfs)(e.into_error()))
        })?;
    let volumes = dest.join(VOLUMES_DIR);
    mkdir(&volumes)?;
    for (n, target) in targets.iter().enumerate() {
        let out = volumes.join(format!("{n}.tar"));
        let mut tar = tar::Builder::new(BufWriter::new(
            File::create(&out).map_err(io("creating", &out))?,
        ));
        tar.follow_symlinks(false);
        if let Some(source) = early::mount_of(mounts, target) {
            walk(source, Path::new(""), &mut |rel, full, meta| {
                if skip(Some(n), rel, meta) {
                    unchanged += 1;
                    return Ok(());
                }
                bytes += meta.len();
                tar.append_path_with_name(full, rel)
                    .map_err(io("archiving", full))
            })?;
        } else {
            warn!(volume = %target, "the container has no mount at this volume target; its tar is empty");
        }
        tar.into_inner()
            .map_err(io("writing", &out))
            .and_then(|w| {
                w.into_inner()
                    .map_err(|e| io("writing", &out)(e.into_error()))
            })?;
    }
    out.bytes = bytes;
    out.deleted = deleted;
    out.unchanged = unchanged;
    if let Some(snap) = since {
        out.removed = snap.removed(&seen);
    }
    Ok(out)
}

/// Calls `visit(relative, full, metadata)` for everything under `dir`, parents
/// before children, symbolic links not followed.
fn walk(
    dir: &Path,
    rel: &Path,
    visit: &mut dyn FnMut(&Path, &Path, &std::fs::Metadata) -> Result<(), CheckpointError>,
) -> Result<(), CheckpointError> {
    let failed = |path: &Path, source| CheckpointError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    };
    early::walk_tree(dir, rel, false, &failed, visit)
}

/// Unpacks a bundle's files into a created container: `rootfs.tar` and the
/// whiteouts of `deleted` into its upper directory, each volume tar into the
/// host directory mounted at its target.
pub(crate) fn apply_files(
    from: &Path,
    upper: &Path,
    mounts: &[(String, PathBuf)],
    meta: &BundleMeta,
) -> Result<(), CheckpointError> {
    let unpack_into = |tar_path: &Path, into: &Path| -> Result<(), CheckpointError> {
        let file = File::open(tar_path).map_err(|source| CheckpointError::Io {
            what: "opening",
            path: tar_path.to_path_buf(),
            source,
        })?;
        let mut archive = tar::Archive::new(file);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_overwrite(true);
        let io = |source| CheckpointError::Io {
            what: "unpacking",
            path: tar_path.to_path_buf(),
            source,
        };
        for entry in archive.entries().map_err(io)? {
            let mut entry = entry.map_err(io)?;
            let path = entry.path().map_err(io)?.into_owned();
            if safe_relative(&path).is_none() {
                return Err(CheckpointError::BadBundle {
                    bundle: tar_path.display().to_string(),
                    reason: format!("member {} escapes its directory", path.display()),
                });
            }
            entry.unpack_in(into).map_err(io)?;
        }
        Ok(())
    };
    unpack_into(&from.join(ROOTFS_TAR), upper)?;
    write_whiteouts(upper, &meta.deleted)?;
    for (n, target) in meta.volumes.iter().enumerate() {
        let tar = from.join(VOLUMES_DIR).join(format!("{n}.tar"));
        match early::mount_of(mounts, target) {
            Some(source) => unpack_into(&tar, source)?,
            None => {
                warn!(volume = %target, "the restored container has no mount at this volume target; its data is not restored")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::early::{EARLY_DIR, now_ns, place_files, send_files, walk_live};
    use crate::checkpoint::rootfs::write_whiteouts;

    #[test]
    fn whiteouts_become_deleted_paths_and_come_back_as_whiteouts() {
        assert!(
            rustix::process::geteuid().is_root(),
            "whiteouts are character devices: run the agent's tests as root (as .ci/run does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let upper = dir.path().join("upper");
        std::fs::create_dir_all(upper.join("etc/app")).expect("dirs");
        std::fs::write(upper.join("etc/app/conf"), b"x=1").expect("file");
        write_whiteouts(&upper, &["/etc/gone".to_owned()]).expect("whiteout");
        let vol = dir.path().join("vol");
        std::fs::create_dir_all(vol.join("sub")).expect("vol");
        std::fs::write(vol.join("sub/data"), b"42").expect("data");
        let stage = dir.path().join("stage");
        std::fs::create_dir_all(&stage).expect("stage");
        let mounts = vec![("/data".to_owned(), vol.clone())];
        let Copied { bytes, deleted, .. } =
            copy_files(&upper, &mounts, &["/data".to_owned()], &stage, None).expect("copy");
        assert_eq!(deleted, vec!["/etc/gone".to_owned()]);
        assert!(bytes >= 5);

        let upper2 = dir.path().join("upper2");
        let vol2 = dir.path().join("vol2");
        std::fs::create_dir_all(&upper2).expect("upper2");
        std::fs::create_dir_all(&vol2).expect("vol2");
        let meta = BundleMeta {
            format: BUNDLE_FORMAT,
            mode: CheckpointMode::Fs,
            alloc: "a".into(),
            job: "j".into(),
            image: "i".into(),
            criu_name: None,
            deleted,
            volumes: vec!["/data".into()],
            created_unix_ms: 0,
            container: None,
            vm: false,
            runc: false,
            vm_address: None,
        };
        apply_files(
            &stage,
            &upper2,
            &[("/data".to_owned(), vol2.clone())],
            &meta,
        )
        .expect("apply");
        assert_eq!(
            std::fs::read(upper2.join("etc/app/conf")).expect("conf"),
            b"x=1"
        );
        let gone = std::fs::symlink_metadata(upper2.join("etc/gone")).expect("whiteout");
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
        assert_eq!(std::fs::read(vol2.join("sub/data")).expect("data"), b"42");
    }

    /// Every path under `root` with its kind and contents.
    fn tree(root: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        walk_live(root, Path::new(""), &mut |rel, full, meta| {
            let what = if meta.file_type().is_char_device() {
                format!("whiteout {}", meta.rdev())
            } else if meta.is_dir() {
                format!("dir {:o}", meta.mode() & 0o7777)
            } else if meta.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(full)?.display())
            } else {
                format!(
                    "file {:o} {}",
                    meta.mode() & 0o7777,
                    String::from_utf8_lossy(&std::fs::read(full)?)
                )
            };
            out.insert(rel.display().to_string(), what);
            Ok(())
        })
        .expect("walk");
        out
    }

    #[test]
    fn the_early_copy_and_the_delta_leave_the_target_as_the_frozen_source() {
        assert!(
            rustix::process::geteuid().is_root(),
            "whiteouts are character devices: run the agent's tests as root (as .ci/run does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let (upper, vol) = (dir.path().join("upper"), dir.path().join("vol"));
        let w = |p: PathBuf, s: &str| {
            std::fs::create_dir_all(p.parent().expect("parent")).expect("dirs");
            std::fs::write(p, s).expect("write");
        };
        w(upper.join("keep"), "same");
        w(upper.join("edit"), "old1");
        w(upper.join("drop"), "x");
        w(upper.join("tree/leaf"), "y");
        w(upper.join("turns"), "file");
        w(upper.join("app/log"), "line1\n");
        std::os::unix::fs::symlink("keep", upper.join("link")).expect("symlink");
        w(vol.join("db/a"), "1");
        w(vol.join("db/b"), "2");
        let mounts = vec![("/data".to_owned(), vol.clone())];
        let targets = vec!["/data".to_owned()];
        // Older than the racy margin, so what stays is left out of the delta.
        std::thread::sleep(std::time::Duration::from_millis(120));

        let mut tar = tar::Builder::new(Vec::new());
        tar.follow_symlinks(false);
        let (snap, bytes) =
            send_files(&mut tar, &upper, &mounts, &targets, now_ns()).expect("early copy");
        let stream = tar.into_inner().expect("tar");
        assert_eq!(bytes, 4 + 4 + 1 + 1 + 4 + 6 + 1 + 1);

        // The container goes on, then freezes.
        w(upper.join("edit"), "new2");
        std::fs::remove_file(upper.join("drop")).expect("rm");
        std::fs::remove_dir_all(upper.join("tree")).expect("rm");
        std::fs::remove_file(upper.join("turns")).expect("rm");
        w(upper.join("turns/inside"), "dir now");
        w(upper.join("app/log"), "line1\nline2\n");
        w(upper.join("fresh"), "new");
        write_whiteouts(&upper, &["/etc/motd".to_owned()]).expect("whiteout");
        w(vol.join("db/b"), "22");
        w(vol.join("db/c"), "3");
        let stage = dir.path().join("stage");
        std::fs::create_dir_all(&stage).expect("stage");
        let Copied {
            deleted,
            removed,
            unchanged,
            bytes: delta_bytes,
        } = copy_files(&upper, &mounts, &targets, &stage, Some(&snap)).expect("delta");
        assert_eq!(removed, vec!["rootfs/drop", "rootfs/tree", "rootfs/turns"]);
        assert_eq!(deleted, vec!["/etc/motd"]);
        // keep, link, app (written in place below it) and db/a.
        assert_eq!(unchanged, 4);
        let members = |tar: PathBuf| {
            let mut archive = tar::Archive::new(File::open(tar).expect("tar"));
            let mut out = Vec::new();
            for e in archive.entries().expect("entries") {
                let path = e
                    .expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string();
                out.push(path.trim_end_matches('/').to_owned());
            }
            out
        };
        assert_eq!(
            members(stage.join("rootfs.tar")),
            ["app/log", "edit", "etc", "fresh", "turns", "turns/inside"]
        );
        // db goes again, as an entry was added to it.
        assert_eq!(members(stage.join("volumes/0.tar")), ["db", "db/b", "db/c"]);
        let files: u64 = [12, 4, 3, 7, 2, 1].iter().sum();
        assert!(delta_bytes >= files, "{delta_bytes}");

        // The target: the stream unpacked, the early copy placed, the delta applied.
        let incoming = dir.path().join("incoming");
        let mut archive = tar::Archive::new(&stream[..]);
        archive.set_preserve_permissions(true);
        archive.unpack(&incoming).expect("unpack");
        let (upper2, vol2) = (dir.path().join("upper2"), dir.path().join("vol2"));
        std::fs::create_dir_all(&upper2).expect("upper2");
        std::fs::create_dir_all(vol2.join("db")).expect("vol2");
        std::fs::write(vol2.join("db/stale"), "from before").expect("stale");
        let mounts2 = vec![("/data".to_owned(), vol2.clone())];
        place_files(
            &incoming.join(EARLY_DIR),
            &upper2,
            &mounts2,
            &targets,
            &removed,
        )
        .expect("place");
        let meta = BundleMeta {
            format: BUNDLE_FORMAT,
            mode: CheckpointMode::Live,
            alloc: "a".into(),
            job: String::new(),
            image: "i".into(),
            criu_name: None,
            deleted,
            volumes: targets.clone(),
            created_unix_ms: 0,
            container: None,
            vm: false,
            runc: true,
            vm_address: None,
        };
        apply_files(&stage, &upper2, &mounts2, &meta).expect("apply");
        assert_eq!(tree(&upper2), tree(&upper));
        let mut want = tree(&vol);
        want.insert("db/stale".into(), "file 644 from before".into());
        assert_eq!(tree(&vol2), want);
    }
}
