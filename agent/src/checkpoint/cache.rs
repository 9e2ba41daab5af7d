//! The local bundle cache: `<sha256>.ncb` files in one directory, and `index.json`
//! listing the bundles this node made (for listing and pruning).

use std::io;
use std::path::{Path, PathBuf};

use novacron_common::checkpoint::{BundleInfo, check_digest};
use novacron_common::sync::lock;
use serde::{Deserialize, Serialize};
use tracing::debug;

use super::bundle::verify_file;
use super::{BUNDLE_EXT, CheckpointError, Checkpointer, FREE_SPACE_MARGIN, INDEX_FILE, blocking};

/// One entry of `index.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Index {
    pub(super) bundles: Vec<BundleInfo>,
}

impl Checkpointer {
    /// The path of the cached bundle `digest` (which need not exist yet).
    pub fn bundle_path(&self, digest: &str) -> Result<PathBuf, CheckpointError> {
        check_digest(digest).map_err(|_| CheckpointError::Invalid {
            what: "bundle digest",
            value: digest.to_owned(),
            expected: "64 lowercase hex digits (SHA-256)",
        })?;
        Ok(self.cache_dir.join(format!("{digest}.{BUNDLE_EXT}")))
    }

    /// Checks that the cached bundle `digest` hashes to its name; returns its size.
    pub async fn verify(&self, digest: &str) -> Result<u64, CheckpointError> {
        let path = self.bundle_path(digest)?;
        if !path.is_file() {
            return Err(CheckpointError::NotFound {
                digest: digest.to_owned(),
                dir: self.cache_dir.clone(),
            });
        }
        let expected = digest.to_owned();
        blocking(move || verify_file(&path, &expected)).await
    }

    /// The bundles this node made that are still listed in the index, oldest first.
    pub fn bundles(&self) -> Result<Vec<BundleInfo>, CheckpointError> {
        let _guard = lock(&self.index_lock);
        let mut list = self.index_load()?.bundles;
        list.sort_by_key(|b| b.created_unix_ms);
        Ok(list)
    }

    /// Deletes the cached bundles of `alloc` except the newest `keep`.
    pub fn prune(&self, alloc: &str, keep: usize) -> Result<(), CheckpointError> {
        let mut doomed = Vec::new();
        self.index_update(|index| {
            let mut mine: Vec<&BundleInfo> =
                index.bundles.iter().filter(|b| b.alloc == alloc).collect();
            mine.sort_by(|a, b| {
                b.created_unix_ms
                    .cmp(&a.created_unix_ms)
                    .then_with(|| b.digest.cmp(&a.digest))
            });
            doomed = mine
                .iter()
                .skip(keep)
                .map(|b| b.digest.clone())
                .collect::<Vec<_>>();
            index.bundles.retain(|b| !doomed.contains(&b.digest));
        })?;
        for digest in doomed {
            let path = self.bundle_path(&digest)?;
            match std::fs::remove_file(&path) {
                Ok(()) => debug!(alloc, %digest, "pruned checkpoint"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CheckpointError::Io {
                        what: "deleting",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Checkpointer {
    pub(super) fn temp_dir(&self, prefix: &str) -> Result<tempfile::TempDir, CheckpointError> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.cache_dir)
            .map_err(|source| CheckpointError::Io {
                what: "creating a work directory in",
                path: self.cache_dir.clone(),
                source,
            })
    }

    fn index_load(&self) -> Result<Index, CheckpointError> {
        let path = self.cache_dir.join(INDEX_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Io {
                what: "reading the bundle index",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(source) => Err(CheckpointError::Io {
                what: "reading",
                path,
                source,
            }),
        }
    }

    pub(super) fn index_update(
        &self,
        change: impl FnOnce(&mut Index),
    ) -> Result<(), CheckpointError> {
        let _guard = lock(&self.index_lock);
        let mut index = self.index_load()?;
        change(&mut index);
        let path = self.cache_dir.join(INDEX_FILE);
        let tmp = self.cache_dir.join(format!(".{INDEX_FILE}.tmp"));
        let io_err = |source| CheckpointError::Io {
            what: "writing",
            path: tmp.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(&index).map_err(|e| io_err(io::Error::other(e)))?;
        std::fs::write(&tmp, json).map_err(io_err)?;
        std::fs::rename(&tmp, &path).map_err(io_err)
    }
}

pub(super) fn ensure_space(dir: &Path, bytes: u64) -> Result<(), CheckpointError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| CheckpointError::Io {
        what: "reading free space of",
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let needed = bytes.saturating_add(FREE_SPACE_MARGIN);
    if free < needed {
        return Err(CheckpointError::NoSpace {
            dir: dir.to_path_buf(),
            free,
            needed,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use novacron_common::checkpoint::CheckpointMode;

    use super::*;
    use crate::checkpoint::tests::checkpointer;

    #[test]
    fn prune_keeps_the_newest_of_an_allocation() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cp = checkpointer(tmp.path());
        let info = |alloc: &str, d: char, at: u64| BundleInfo {
            digest: d.to_string().repeat(64),
            size: 1,
            mode: CheckpointMode::Fs,
            alloc: alloc.into(),
            job: "j".into(),
            node: "n".into(),
            created_unix_ms: at,
            dump_ms: 1,
        };
        let all = [
            info("a", '1', 1),
            info("a", '2', 3),
            info("a", '3', 2),
            info("b", '4', 1),
        ];
        for b in &all {
            std::fs::write(cp.bundle_path(&b.digest).expect("p"), b"x").expect("w");
        }
        cp.index_update(|i| i.bundles.extend(all.iter().cloned()))
            .expect("index");
        cp.prune("a", 1).expect("prune");
        let left: Vec<String> = cp
            .bundles()
            .expect("list")
            .into_iter()
            .map(|b| b.digest)
            .collect();
        assert_eq!(left, ["4".repeat(64), "2".repeat(64)]);
        assert!(!cp.bundle_path(&"1".repeat(64)).expect("p").exists());
        assert!(!cp.bundle_path(&"3".repeat(64)).expect("p").exists());
        assert!(cp.bundle_path(&"2".repeat(64)).expect("p").exists());
    }
}
