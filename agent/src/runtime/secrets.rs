//! Secret values of a task on the node: variables go into the container's
//! environment; files are written under the supervisor's secrets directory
//! (`/run/novacron-agent/secrets/<node>` by default: a tmpfs, so values never
//! reach a disk) and bind-mounted read-only at their paths. Each allocation has
//! its own directory (mode 0700), removed once the allocation is gone.
//!
//! **Invariant:** no value is logged; errors name paths and secrets, never values.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use novacron_common::wire::{AllocationSpec, SecretBytes, SecretTarget};

use super::MountConfig;

/// The default secrets directory of a node (under `/run`, a tmpfs on systemd
/// hosts).
pub fn default_dir(node: &str) -> PathBuf {
    PathBuf::from("/run/novacron-agent/secrets").join(sanitize(node))
}

/// The secret variables of `spec`: name and value.
pub fn env(spec: &AllocationSpec) -> Vec<(String, SecretBytes)> {
    spec.task
        .secrets
        .iter()
        .filter_map(|s| match &s.target {
            SecretTarget::Env(name) => Some((name.clone(), s.value.clone())),
            SecretTarget::File(_) => None,
        })
        .collect()
}

/// Writes `spec`'s secret files afresh into `dir/<alloc>/` (mode 0444 each, the
/// directory 0700) and returns their read-only bind mounts. Nothing to write:
/// no directory, no mounts.
/// With `tmpfs`, `dir` is made a tmpfs first when it is not one
/// ([`ensure_tmpfs`]).
pub async fn write_files(
    dir: &Path,
    spec: &AllocationSpec,
    tmpfs: bool,
) -> Result<Vec<MountConfig>, String> {
    let files: Vec<(&str, &SecretBytes)> = spec
        .task
        .secrets
        .iter()
        .filter_map(|s| match &s.target {
            SecretTarget::File(path) => Some((path.as_str(), &s.value)),
            SecretTarget::Env(_) => None,
        })
        .collect();
    if files.is_empty() {
        return Ok(Vec::new());
    }
    let alloc_dir = dir.join(sanitize(&spec.id));
    let owned: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|(p, v)| (p.to_string(), v.0.clone()))
        .collect();
    let d = alloc_dir.clone();
    tokio::task::spawn_blocking(move || write_all(&d, &owned, tmpfs))
        .await
        .map_err(|e| format!("writing secret files: {e}"))?
        .map_err(|e| format!("writing secret files under {}: {e}", alloc_dir.display()))?;
    Ok(files
        .iter()
        .enumerate()
        .map(|(i, (target, _))| MountConfig::Bind {
            source: alloc_dir.join(i.to_string()).display().to_string(),
            target: (*target).to_string(),
            read_only: true,
        })
        .collect())
}

/// The statfs type of a tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Makes `dir` a tmpfs of its own when it is on another filesystem (mode 0700,
/// 64 MiB, no exec, devices or setuid), so that values never reach a disk: hosts
/// whose `/run` is not a tmpfs (containers, some images) included. Needs root;
/// otherwise the files stay where `dir` is, and a warning says so once.
pub fn ensure_tmpfs(dir: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if is_tmpfs(dir)? {
        return Ok(true);
    }
    use rustix::mount::{MountFlags, mount};
    match mount(
        "tmpfs",
        dir,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        Some(c"mode=0700,size=64m"),
    ) {
        Ok(()) => Ok(true),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "the secrets directory is not a tmpfs and cannot be made one; secret files are written to its disk");
            Ok(false)
        }
    }
}

fn is_tmpfs(dir: &Path) -> std::io::Result<bool> {
    let st = rustix::fs::statfs(dir).map_err(std::io::Error::from)?;
    Ok(st.f_type as i64 == TMPFS_MAGIC)
}

fn write_all(dir: &Path, files: &[(String, Vec<u8>)], tmpfs: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if tmpfs && let Some(parent) = dir.parent() {
        ensure_tmpfs(parent)?;
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    for (i, (_, value)) in files.iter().enumerate() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(dir.join(i.to_string()))?;
        f.write_all(value)?;
    }
    Ok(())
}

/// Removes the directories under `dir` of allocations not in `keep`.
pub async fn sweep(dir: &Path, keep: HashSet<String>) {
    let dir = dir.to_path_buf();
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        let keep: HashSet<String> = keep.iter().map(|k| sanitize(k)).collect();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name)
                && let Err(e) = std::fs::remove_dir_all(entry.path())
            {
                tracing::warn!(path = %entry.path().display(), error = %e, "cannot remove the secret files of a finished allocation");
            }
        }
    })
    .await;
}

/// Keeps `[A-Za-z0-9_.-]`, so that an id is one path component.
fn sanitize(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s == "." || s == ".." { "_".into() } else { s }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use novacron_common::wire::{SecretUse, TaskSpec};

    use super::*;

    fn spec() -> AllocationSpec {
        let use_ = |key: &str, target: SecretTarget, value: &str| SecretUse {
            secret: "db".into(),
            version: 1,
            key: key.into(),
            target,
            value: SecretBytes(value.as_bytes().to_vec()),
        };
        AllocationSpec {
            id: "api-1".into(),
            job: "api".into(),
            job_version: 1,
            task: TaskSpec {
                secrets: vec![
                    use_("password", SecretTarget::Env("DB_PASSWORD".into()), "pw"),
                    use_(
                        "cert",
                        SecretTarget::File("/run/secrets/cert".into()),
                        "CERT",
                    ),
                ],
                ..TaskSpec::default()
            },
            restore: None,
            suspended: false,
        }
    }

    #[tokio::test]
    async fn files_are_written_private_and_swept_once_gone() {
        let dir = tempfile::tempdir().expect("dir");
        let spec = spec();
        assert_eq!(env(&spec).len(), 1);
        assert!(
            !format!("{:?}", env(&spec)).contains("pw"),
            "values stay out of Debug"
        );
        let mounts = write_files(dir.path(), &spec, false)
            .await
            .expect("written");
        let [
            MountConfig::Bind {
                source,
                target,
                read_only,
            },
        ] = mounts.as_slice()
        else {
            panic!("one bind mount: {mounts:?}");
        };
        assert_eq!((target.as_str(), *read_only), ("/run/secrets/cert", true));
        assert_eq!(std::fs::read_to_string(source).expect("read"), "CERT");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(Path::new(source)), 0o444);
        assert_eq!(mode(&dir.path().join("api-1")), 0o700);
        write_files(dir.path(), &spec, false)
            .await
            .expect("rewritten on a restart");
        sweep(dir.path(), HashSet::from(["api-1".to_string()])).await;
        assert!(dir.path().join("api-1").exists());
        sweep(dir.path(), HashSet::new()).await;
        assert!(!dir.path().join("api-1").exists());
    }
}
