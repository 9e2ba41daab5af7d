//! The container's filesystem state: which paths of the writable layer a bundle
//! carries ([`plan_rootfs`], pure), the tars that hold them, and replaying deleted
//! paths as overlay whiteouts on restore.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::{Component, Path, PathBuf};

use tracing::warn;

use super::{CheckpointError, create, mkdir, remove_file};
pub(super) use crate::runtime::docker::checkpoint::ChangeKind;
use crate::runtime::docker::checkpoint::Inspected;

/// Paths Docker manages in every container; never carried in a bundle.
const DOCKER_MANAGED: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/proc",
    "/sys",
    "/dev",
];

/// What to carry of the writable layer.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct RootfsPlan {
    /// Paths to download whole (added paths, and modified paths without changed
    /// descendants), ancestors before descendants.
    pub(super) copy: Vec<String>,
    /// Paths deleted from the image (topmost only).
    pub(super) deleted: Vec<String>,
}

pub(super) fn plan_rootfs(changes: &[(String, ChangeKind)], volumes: &[String]) -> RootfsPlan {
    let skipped = |p: &str| {
        DOCKER_MANAGED
            .iter()
            .copied()
            .chain(volumes.iter().map(String::as_str))
            .any(|m| p == m || is_under(p, m))
            || container_path(p).is_err()
            || p == "/"
    };
    let all: BTreeMap<&str, ChangeKind> = changes
        .iter()
        .filter(|(p, _)| !skipped(p))
        .map(|(p, k)| (p.as_str(), *k))
        .collect();
    let ancestor_is = |p: &str, kind: ChangeKind| {
        let mut cur = Path::new(p).parent();
        while let Some(a) = cur.and_then(Path::to_str) {
            if all.get(a) == Some(&kind) {
                return true;
            }
            cur = Path::new(a).parent();
        }
        false
    };
    let mut plan = RootfsPlan::default();
    for (&p, &kind) in &all {
        match kind {
            ChangeKind::Deleted => {
                if !ancestor_is(p, ChangeKind::Deleted) {
                    plan.deleted.push(p.to_owned());
                }
            }
            ChangeKind::Added | ChangeKind::Modified => {
                if ancestor_is(p, ChangeKind::Added) {
                    continue;
                }
                let prefix = format!("{p}/");
                let has_descendants = all
                    .range(prefix.as_str()..)
                    .next()
                    .is_some_and(|(d, _)| d.starts_with(&prefix));
                if kind == ChangeKind::Added || !has_descendants {
                    plan.copy.push(p.to_owned());
                }
            }
        }
    }
    plan
}

fn is_under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir.trim_end_matches('/'))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// An absolute path inside a container, as a relative path without `..`.
pub(super) fn container_path(path: &str) -> Result<PathBuf, CheckpointError> {
    let bad = || CheckpointError::Invalid {
        what: "container path",
        value: path.to_owned(),
        expected: "an absolute path without `..`, e.g. /data",
    };
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    let rel = safe_relative(Path::new(rest)).ok_or_else(bad)?;
    if rel.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(rel)
}

/// `path` when it is relative and has only normal components (`.` is dropped).
pub(super) fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Whether a directory on the way from `root` to `rel` (`rel` itself not
/// counted) is a symbolic link.
pub(super) fn through_link(root: &Path, rel: &Path) -> bool {
    let mut at = root.to_path_buf();
    let mut parts = rel.components().peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            return false;
        }
        at.push(part);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return true;
        }
    }
    false
}

/// Replays deleted paths into a created container's overlay upper directory as
/// whiteouts (the archive API cannot delete).
pub(super) fn remove_deleted(
    inspect: &Inspected,
    deleted: &[String],
) -> Result<(), CheckpointError> {
    let driver = inspect.driver.as_deref();
    let upper = (driver == Some("overlay2"))
        .then_some(inspect.upper_dir.as_ref())
        .flatten();
    let Some(upper) = upper else {
        warn!(
            driver = driver.unwrap_or("unknown"),
            count = deleted.len(),
            "paths deleted in the checkpointed container are not removed: that needs the overlay2 storage driver"
        );
        return Ok(());
    };
    write_whiteouts(Path::new(upper), deleted)
}

/// Writes each of `deleted` into the overlay upper directory `upper` as a
/// whiteout (a character device 0/0), replacing what is there.
pub(super) fn write_whiteouts(upper: &Path, deleted: &[String]) -> Result<(), CheckpointError> {
    for path in deleted {
        let rel = container_path(path)?;
        // A symbolic link of the container's leads anywhere on this host.
        if through_link(upper, &rel) {
            return Err(CheckpointError::BadBundle {
                bundle: "deleted paths".to_owned(),
                reason: format!("{path} leads through a symbolic link"),
            });
        }
        let at = upper.join(rel);
        if let Some(parent) = at.parent() {
            mkdir(parent)?;
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&at),
            Ok(_) => std::fs::remove_file(&at),
            Err(_) => Ok(()),
        }
        .map_err(|source| CheckpointError::Io {
            what: "removing",
            path: at.clone(),
            source,
        })?;
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &at,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(|e| CheckpointError::Io {
            what: "creating a whiteout at",
            path: at.clone(),
            source: e.into(),
        })?;
    }
    Ok(())
}

fn tar_io(path: &Path) -> impl Fn(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        what: "copying tar members of",
        path: path.to_path_buf(),
        source,
    }
}

fn finish_tar(out: tar::Builder<BufWriter<File>>, path: &Path) -> Result<(), CheckpointError> {
    out.into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .map_err(tar_io(path))
}

/// Joins the downloaded archives `pieces` (each with the directory its members
/// are relative to) into the tar `rootfs`, members relative to `/`; deletes them.
pub(super) fn merge_rootfs(
    pieces: &[(PathBuf, PathBuf)],
    rootfs: &Path,
) -> Result<(), CheckpointError> {
    let mut out = tar::Builder::new(BufWriter::new(create(rootfs)?));
    for (raw, parent) in pieces {
        retar(raw, &mut out, |member| Some(parent.join(member)))?;
        remove_file(raw)?;
    }
    finish_tar(out, rootfs)
}

/// Rewrites the downloaded archive `raw` of a volume into the tar `out`, members
/// relative to the volume's target; deletes `raw`.
pub(super) fn volume_tar(raw: &Path, out_path: &Path) -> Result<(), CheckpointError> {
    let mut out = tar::Builder::new(BufWriter::new(create(out_path)?));
    // Members come as `<basename>/...`; keep them relative to the target.
    retar(raw, &mut out, |member| {
        let rest: PathBuf = member.components().skip(1).collect();
        (!rest.as_os_str().is_empty()).then_some(rest)
    })?;
    remove_file(raw)?;
    finish_tar(out, out_path)
}

/// Copies the members of the tar file `src` into `out`, renamed by `rename`
/// (`None` drops a member). Hard link targets are renamed the same way.
fn retar(
    src: &Path,
    out: &mut tar::Builder<BufWriter<File>>,
    rename: impl Fn(&Path) -> Option<PathBuf>,
) -> Result<(), CheckpointError> {
    let err = tar_io(src);
    let file = File::open(src).map_err(&err)?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    for entry in archive.entries().map_err(&err)? {
        let mut entry = entry.map_err(&err)?;
        let name = entry.path().map_err(&err)?.into_owned();
        let Some(name) = safe_relative(&name).and_then(|n| rename(&n)) else {
            continue;
        };
        let mut header = entry.header().clone();
        let kind = header.entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry.link_name().map_err(&err)?.map(|t| t.into_owned());
            let Some(mut target) = target else { continue };
            if kind.is_hard_link() {
                match safe_relative(&target).and_then(|t| rename(&t)) {
                    Some(t) => target = t,
                    None => continue,
                }
            }
            header.set_size(0);
            out.append_link(&mut header, &name, &target).map_err(&err)?;
        } else if kind.is_file() || kind.is_dir() || kind == tar::EntryType::Fifo {
            header.set_size(if kind.is_file() { entry.size() } else { 0 });
            out.append_data(&mut header, &name, &mut entry)
                .map_err(&err)?;
        }
    }
    Ok(())
}

/// Whether a tar file exists and holds at least one member.
pub(super) fn tar_has_members(path: &Path) -> Result<bool, CheckpointError> {
    let Ok(file) = File::open(path) else {
        return Ok(false);
    };
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries = archive.entries().map_err(tar_io(path))?;
    Ok(entries.next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rootfs_plan_copies_each_change_once() {
        use ChangeKind::*;
        let changes: Vec<(String, ChangeKind)> = [
            ("/etc", Modified),
            ("/etc/marker", Added),
            ("/etc/hosts", Modified),
            ("/app", Added),
            ("/app/lib", Added),
            ("/app/lib/x", Added),
            ("/bin", Modified),
            ("/bin/vi", Deleted),
            ("/opt", Deleted),
            ("/opt/y", Deleted),
            ("/root/.ash_history", Modified),
            ("/root", Modified),
            ("/data", Added),
            ("/data/counter", Added),
            ("/../x", Added),
        ]
        .into_iter()
        .map(|(p, k)| (p.to_owned(), k))
        .collect();
        let plan = plan_rootfs(&changes, &["/data".to_owned()]);
        assert_eq!(plan.copy, ["/app", "/etc/marker", "/root/.ash_history"]);
        assert_eq!(plan.deleted, ["/bin/vi", "/opt"]);
        assert!(container_path("/data").is_ok());
        for bad in ["data", "/", "/a/../b", ""] {
            assert!(container_path(bad).is_err(), "{bad}");
        }
    }
}
