//! The checkpoint bundle store: content-addressed files on the controller's disk.
//!
//! Layout under the store's directory:
//! - `sha256/<digest>`: complete bundles, named by the SHA-256 of their bytes;
//! - `partial/<digest>`: uploads in progress (resumable at their current length);
//! - `meta/<digest>.json`: one [`BundleInfo`] per complete bundle, written
//!   atomically (temporary file, then rename).
//!
//! An upload goes [`begin`](BundleStore::begin) (where does it stand?),
//! [`write_at`](BundleStore::write_at) (append at the current length), then
//! [`finish`](BundleStore::finish) (hash, then move into `sha256/`). A bundle whose
//! bytes do not hash to its name is discarded, never stored.
//!
//! **Architecture Invariant:** only this module knows the layout, and every digest
//! passes [`check_digest`] before it becomes part of a path, so nothing outside the
//! store's directory can be named.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use novacron_common::checkpoint::{
    BundleInfo, CheckpointMode, MAX_BUNDLE_BYTES, check_digest, retain,
};
use novacron_common::sync::lock;
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use crate::state::blobs::{BlobKey, BlobStore, BlobWriteError, FsBlobs};

/// Most complete bundles one store holds; [`BundleStore::begin`] refuses more.
pub const MAX_BUNDLES: usize = 65_536;
/// Most uploads whose declared [`BundleInfo`] is remembered at once; beyond it the
/// oldest is forgotten (its partial file stays, and `begin` picks it up again).
pub const MAX_UPLOADS: usize = 256;
/// Largest `meta/<digest>.json` read at open.
pub const MAX_META_BYTES: u64 = 64 * 1024;
/// Complete bundles, named by digest.
const SHA256: &str = "sha256";
/// Uploads in progress, named by digest.
const PARTIAL: &str = "partial";
/// One `<digest>.json` per complete bundle.
const META: &str = "meta";
/// The blob spaces of a bundle store.
const SPACES: [&str; 3] = [SHA256, PARTIAL, META];
/// Read size while hashing a finished upload.
const HASH_CHUNK: usize = 1 << 20;

/// A store error. Every message names the bundle or the path, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The digest is not 64 lowercase hex digits (and so never becomes a path).
    #[error("{0}")]
    Invalid(String),
    /// The declared size is zero or above [`MAX_BUNDLE_BYTES`].
    #[error("bundle {digest} declares {size} bytes; expected 1 to {MAX_BUNDLE_BYTES} bytes")]
    Size {
        /// The bundle.
        digest: String,
        /// Its declared size.
        size: u64,
    },
    /// The declared mode is `auto`: a bundle is taken live or fs.
    #[error("bundle {digest} declares mode auto; expected the mode it was taken in, live or fs")]
    Mode {
        /// The bundle.
        digest: String,
    },
    /// The store holds [`MAX_BUNDLES`] bundles already.
    #[error(
        "the bundle store holds {MAX_BUNDLES} bundles, its limit; prune or delete some \
         before uploading {digest}"
    )]
    Full {
        /// The bundle refused.
        digest: String,
    },
    /// Bytes came for a bundle whose upload was not begun.
    #[error("no upload of bundle {digest} is in progress; begin it first")]
    NotBegun {
        /// The bundle.
        digest: String,
    },
    /// Bytes came for a bundle that is stored already.
    #[error("bundle {digest} is stored already; there is nothing to upload")]
    Stored {
        /// The bundle.
        digest: String,
    },
    /// A write did not start where the partial upload ends.
    #[error(
        "upload of bundle {digest} resumes at byte {offset}, but {have} bytes are stored; \
         resume at byte {have}"
    )]
    Offset {
        /// The bundle.
        digest: String,
        /// Where the write asked to start.
        offset: u64,
        /// The partial's current length.
        have: u64,
    },
    /// A write would go past the declared size.
    #[error(
        "a write to bundle {digest} would end at byte {end}, past its declared size of \
         {size} bytes"
    )]
    Overflow {
        /// The bundle.
        digest: String,
        /// Where the write would end.
        end: u64,
        /// The declared size.
        size: u64,
    },
    /// `finish` came before every byte did.
    #[error(
        "upload of bundle {digest} is incomplete: {have} of {size} bytes received; send \
         the rest from byte {have}"
    )]
    Incomplete {
        /// The bundle.
        digest: String,
        /// Bytes received.
        have: u64,
        /// The declared size.
        size: u64,
    },
    /// The bytes do not hash to the bundle's name; the partial was deleted.
    #[error(
        "bundle {expected} failed its checksum: its bytes hash to {actual}; the upload \
         was discarded, send the bundle again from byte 0"
    )]
    Digest {
        /// The bundle's name, the digest it should have.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// No complete bundle by that digest.
    #[error("no bundle {digest} is stored")]
    NotFound {
        /// The bundle.
        digest: String,
    },
    /// A write to a partial upload failed (disk full, say). The partial was cut back
    /// to its last good length when `kept` is set.
    #[error(
        "could not write {}: {source}; {}",
        path.display(),
        match kept {
            Some(n) => format!("the partial upload was cut back to {n} bytes; free space, then resume at byte {n}"),
            None => "cutting the partial back failed too; begin the upload again to learn where it stands".to_string(),
        }
    )]
    Write {
        /// The partial file.
        path: PathBuf,
        /// Its length after the failure, when known.
        kept: Option<u64>,
        /// The OS error.
        source: io::Error,
    },
    /// Any other file operation failed.
    #[error("could not {action} {}: {source}", path.display())]
    Io {
        /// What was being done: `read`, `create`, `rename`, `delete`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Where an upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Have {
    /// The bundle is stored; nothing to send.
    Complete,
    /// This many bytes are received; send the rest from here.
    Partial(u64),
}

/// The bundle store. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct BundleStore {
    /// Where the bytes and the meta are kept.
    blobs: Arc<dyn BlobStore>,
    /// Complete bundles by digest.
    index: Mutex<BTreeMap<String, BundleInfo>>,
    /// Uploads in progress by digest.
    uploads: Mutex<HashMap<String, Upload>>,
    /// Counts `begin`s, to forget the oldest upload first.
    begun: Mutex<u64>,
}

/// An upload in progress: what was declared, and a lock held by each write.
#[derive(Debug, Clone)]
struct Upload {
    info: BundleInfo,
    lock: Arc<tokio::sync::Mutex<()>>,
    seq: u64,
}

impl BundleStore {
    /// Opens (creating) the store at `dir` and reads its index. Unreadable or
    /// inconsistent meta files are skipped with a warning, not fatal.
    pub fn open(dir: &Path) -> Result<Self, BundleError> {
        for space in SPACES {
            let d = dir.join(space);
            std::fs::create_dir_all(&d).map_err(|source| io_err("create", &d, source))?;
        }
        let blobs = FsBlobs::open(dir, &SPACES).map_err(|source| io_err("create", dir, source))?;
        BundleStore::on(Arc::new(blobs))
    }

    /// The store over `blobs` (spaces `sha256`, `partial` and `meta`); reads its
    /// index as [`BundleStore::open`] does.
    pub fn on(blobs: Arc<dyn BlobStore>) -> Result<Self, BundleError> {
        let meta = blobs.locate(BlobKey::new(META, ""));
        let names = blobs
            .list(META)
            .map_err(|source| io_err("read", &meta, source))?;
        let mut index = BTreeMap::new();
        for name in names {
            let key = BlobKey::new(META, &name);
            let path = blobs.locate(key);
            if name.ends_with(".tmp") {
                // A write interrupted before its rename.
                let _ = blobs.remove(key);
                continue;
            }
            if index.len() >= MAX_BUNDLES {
                warn!(path = %path.display(), max = MAX_BUNDLES, "bundle index full; skipped");
                continue;
            }
            match read_meta(blobs.as_ref(), &name) {
                Ok(info) => {
                    index.insert(info.digest.clone(), info);
                }
                Err(why) => warn!(path = %path.display(), %why, "bundle meta skipped"),
            }
        }
        debug!(blobs = ?blobs, bundles = index.len(), "bundle store opened");
        Ok(BundleStore {
            blobs,
            index: Mutex::new(index),
            uploads: Mutex::new(HashMap::new()),
            begun: Mutex::new(0),
        })
    }

    /// Where a (resumable) upload of `info.digest` stands: `Complete` when stored,
    /// else `Partial(n)` with `n` bytes already received. Checks the digest, the
    /// size (1 to [`MAX_BUNDLE_BYTES`]) and the mode (live or fs).
    pub fn begin(&self, info: &BundleInfo) -> Result<Have, BundleError> {
        check_info(info)?;
        let digest = &info.digest;
        {
            let index = lock(&self.index);
            if index.contains_key(digest) {
                return Ok(Have::Complete);
            }
            if index.len() >= MAX_BUNDLES {
                return Err(BundleError::Full {
                    digest: digest.clone(),
                });
            }
        }
        let partial = BlobKey::new(PARTIAL, digest);
        let mut have = self
            .blobs
            .len(partial)
            .map_err(|source| io_err("read", &self.blobs.locate(partial), source))?
            .unwrap_or(0);
        if have > info.size {
            // Longer than declared: it cannot be this bundle. Start again.
            warn!(bundle = %digest, have, size = info.size, "partial longer than declared; discarded");
            self.remove_if_present(partial)?;
            have = 0;
        }
        let seq = {
            let mut n = lock(&self.begun);
            *n += 1;
            *n
        };
        let mut uploads = lock(&self.uploads);
        if !uploads.contains_key(digest)
            && uploads.len() >= MAX_UPLOADS
            && let Some(oldest) = uploads
                .iter()
                .min_by_key(|(_, u)| u.seq)
                .map(|(d, _)| d.clone())
        {
            debug!(bundle = %oldest, "upload forgotten to make room; begin resumes it");
            uploads.remove(&oldest);
        }
        let lock = uploads
            .get(digest)
            .map(|u| u.lock.clone())
            .unwrap_or_default();
        uploads.insert(
            digest.clone(),
            Upload {
                info: info.clone(),
                lock,
                seq,
            },
        );
        Ok(Have::Partial(have))
    }

    /// Appends `data` to the partial upload of `digest` at `offset`, which must be
    /// its current length; the upload must have begun, and the write must not go
    /// past the declared size. Returns the new length.
    ///
    /// A failed write (disk full) cuts the partial back to `offset` and reports the
    /// path and the OS error, so the upload can resume there.
    pub async fn write_at(
        &self,
        digest: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, BundleError> {
        check_digest(digest).map_err(BundleError::Invalid)?;
        if lock(&self.index).contains_key(digest) {
            return Err(BundleError::Stored {
                digest: digest.to_string(),
            });
        }
        let upload =
            lock(&self.uploads)
                .get(digest)
                .cloned()
                .ok_or_else(|| BundleError::NotBegun {
                    digest: digest.to_string(),
                })?;
        let size = upload.info.size;
        let end = u64::try_from(data.len())
            .ok()
            .and_then(|n| offset.checked_add(n))
            .filter(|end| *end <= size)
            .ok_or_else(|| BundleError::Overflow {
                digest: digest.to_string(),
                end: offset.saturating_add(data.len() as u64),
                size,
            })?;
        let _guard = upload.lock.lock().await;
        let path = self.blobs.locate(BlobKey::new(PARTIAL, digest));
        let (blobs, name, data_owned) = (self.blobs.clone(), digest.to_owned(), data.to_vec());
        let written = tokio::task::spawn_blocking(move || {
            blobs.write_at(BlobKey::new(PARTIAL, &name), offset, &data_owned)
        })
        .await
        .map_err(|e| io_err("write", &path, io::Error::other(e)))?;
        match written {
            Ok(()) => {}
            Err(BlobWriteError::Open(source)) => return Err(io_err("open", &path, source)),
            Err(BlobWriteError::Offset { have }) => {
                return Err(BundleError::Offset {
                    digest: digest.to_string(),
                    offset,
                    have,
                });
            }
            Err(BlobWriteError::Write { kept, source }) => {
                if kept.is_none() {
                    warn!(path = %path.display(), "could not cut a failed partial back");
                }
                warn!(bundle = %digest, path = %path.display(), error = %source, "bundle write failed");
                return Err(BundleError::Write { path, kept, source });
            }
        }
        Ok(end)
    }

    /// Completes an upload whose partial reached `info.size`: hashes it, and on a
    /// match moves it into `sha256/` and records its meta. On a mismatch the partial
    /// is deleted and [`BundleError::Digest`] says so. Finishing a stored bundle
    /// again is a no-op.
    pub async fn finish(&self, info: &BundleInfo) -> Result<(), BundleError> {
        check_info(info)?;
        let digest = info.digest.clone();
        if lock(&self.index).contains_key(&digest) {
            return Ok(());
        }
        let write_lock = lock(&self.uploads)
            .get(&digest)
            .map(|u| u.lock.clone())
            .unwrap_or_default();
        let _guard = write_lock.lock().await;
        let partial = BlobKey::new(PARTIAL, &digest);
        let partial_path = self.blobs.locate(partial);
        let have = self
            .blobs
            .len(partial)
            .map_err(|source| io_err("read", &partial_path, source))?
            .unwrap_or(0);
        if have != info.size {
            return Err(BundleError::Incomplete {
                digest,
                have,
                size: info.size,
            });
        }
        let (blobs, name) = (self.blobs.clone(), digest.clone());
        let actual =
            tokio::task::spawn_blocking(move || sha256(blobs.open(BlobKey::new(PARTIAL, &name))?))
                .await
                .map_err(|e| io_err("hash", &partial_path, io::Error::other(e)))?
                .map_err(|source| io_err("read", &partial_path, source))?;
        if actual != digest {
            self.remove_if_present(partial)?;
            lock(&self.uploads).remove(&digest);
            warn!(bundle = %digest, %actual, "bundle failed its checksum; discarded");
            return Err(BundleError::Digest {
                expected: digest,
                actual,
            });
        }
        self.blobs
            .rename(partial, BlobKey::new(SHA256, &digest))
            .map_err(|source| io_err("rename", &partial_path, source))?;
        let meta_name = meta_name(&digest);
        let meta = self.blobs.locate(BlobKey::new(META, &meta_name));
        let json = serde_json::to_string_pretty(info)
            .map_err(|e| io_err("encode", &meta, io::Error::other(e)))?;
        let blobs = self.blobs.clone();
        tokio::task::spawn_blocking(move || {
            blobs.put(BlobKey::new(META, &meta_name), json.as_bytes())
        })
        .await
        .map_err(|e| io_err("write", &meta, io::Error::other(e)))?
        .map_err(|source| io_err("write", &meta, source))?;
        lock(&self.index).insert(digest.clone(), info.clone());
        lock(&self.uploads).remove(&digest);
        info!(bundle = %digest, job = %info.job, alloc = %info.alloc, size = info.size, "bundle stored");
        Ok(())
    }

    /// A complete bundle's record.
    pub fn get(&self, digest: &str) -> Option<BundleInfo> {
        lock(&self.index).get(digest).cloned()
    }

    /// The file of a complete bundle.
    pub fn path(&self, digest: &str) -> Result<PathBuf, BundleError> {
        check_digest(digest).map_err(BundleError::Invalid)?;
        if lock(&self.index).contains_key(digest) {
            Ok(self.blobs.locate(BlobKey::new(SHA256, digest)))
        } else {
            Err(BundleError::NotFound {
                digest: digest.to_string(),
            })
        }
    }

    /// Complete bundles, of `job` and of `alloc` where given, newest first (ties by
    /// digest, descending, as [`retain`] orders them).
    pub fn list(&self, job: Option<&str>, alloc: Option<&str>) -> Vec<BundleInfo> {
        let mut out: Vec<BundleInfo> = lock(&self.index)
            .values()
            .filter(|b| job.is_none_or(|j| b.job == j) && alloc.is_none_or(|a| b.alloc == a))
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then_with(|| b.digest.cmp(&a.digest))
        });
        out
    }

    /// The newest bundle of `alloc`.
    pub fn latest(&self, alloc: &str) -> Option<BundleInfo> {
        self.list(None, Some(alloc)).into_iter().next()
    }

    /// Applies [`retain`] to `job`'s bundles with `keep`, deleting the files and
    /// meta of the rest; returns the deleted digests, oldest first.
    pub fn prune(&self, job: &str, keep: u32) -> Result<Vec<String>, BundleError> {
        let doomed = retain(&self.list(Some(job), None), keep);
        for digest in &doomed {
            self.delete(digest)?;
        }
        if !doomed.is_empty() {
            info!(%job, keep, deleted = doomed.len(), "bundles pruned");
        }
        Ok(doomed)
    }

    /// Deletes a bundle: the complete file and its meta, and any partial upload.
    /// Returns whether there was anything to delete.
    pub fn delete(&self, digest: &str) -> Result<bool, BundleError> {
        check_digest(digest).map_err(BundleError::Invalid)?;
        let mut existed = self.remove_if_present(BlobKey::new(META, &meta_name(digest)))?;
        existed |= self.remove_if_present(BlobKey::new(SHA256, digest))?;
        existed |= self.remove_if_present(BlobKey::new(PARTIAL, digest))?;
        existed |= lock(&self.index).remove(digest).is_some();
        existed |= lock(&self.uploads).remove(digest).is_some();
        if existed {
            debug!(bundle = %digest, "bundle deleted");
        }
        Ok(existed)
    }

    /// Removes a blob; `false` when it was not there.
    fn remove_if_present(&self, key: BlobKey<'_>) -> Result<bool, BundleError> {
        self.blobs
            .remove(key)
            .map_err(|source| io_err("delete", &self.blobs.locate(key), source))
    }
}

/// The checks every declared [`BundleInfo`] passes.
fn check_info(info: &BundleInfo) -> Result<(), BundleError> {
    check_digest(&info.digest).map_err(BundleError::Invalid)?;
    if info.size == 0 || info.size > MAX_BUNDLE_BYTES {
        return Err(BundleError::Size {
            digest: info.digest.clone(),
            size: info.size,
        });
    }
    if info.mode == CheckpointMode::Auto {
        return Err(BundleError::Mode {
            digest: info.digest.clone(),
        });
    }
    Ok(())
}

/// One `meta/<name>`, checked against its name and its bundle file.
fn read_meta(blobs: &dyn BlobStore, name: &str) -> Result<BundleInfo, String> {
    let digest = name.strip_suffix(".json").ok_or("not a .json file")?;
    check_digest(digest)?;
    let bytes = blobs
        .read(BlobKey::new(META, name), MAX_META_BYTES)
        .map_err(|e| e.to_string())?;
    let info: BundleInfo = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if info.digest != digest {
        return Err(format!("records digest {}, not its name", info.digest));
    }
    if !matches!(blobs.len(BlobKey::new(SHA256, digest)), Ok(Some(_))) {
        return Err("its bundle file is missing".into());
    }
    Ok(info)
}

/// `<digest>.json`, the name of a bundle's meta; `digest` is checked already.
fn meta_name(digest: &str) -> String {
    format!("{digest}.json")
}

/// Lowercase hex SHA-256 of what `reader` yields, read in [`HASH_CHUNK`]s. Blocking.
fn sha256(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> BundleError {
    BundleError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    fn info(bytes: &[u8], alloc: &str, at: u64) -> BundleInfo {
        BundleInfo {
            digest: sha(bytes),
            size: bytes.len() as u64,
            mode: CheckpointMode::Fs,
            alloc: alloc.into(),
            job: "train".into(),
            node: "n1".into(),
            created_unix_ms: at,
            dump_ms: 7,
        }
    }

    /// Uploads `bytes` in one write.
    async fn put(store: &BundleStore, bytes: &[u8], alloc: &str, at: u64) -> BundleInfo {
        let i = info(bytes, alloc, at);
        assert_eq!(store.begin(&i).expect("begin"), Have::Partial(0));
        store.write_at(&i.digest, 0, bytes).await.expect("write");
        store.finish(&i).await.expect("finish");
        i
    }

    #[tokio::test]
    async fn an_upload_resumes_at_its_offset_across_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let i = info(&bytes, "a1", 1);
        {
            let store = BundleStore::open(dir.path()).expect("open");
            assert_eq!(store.begin(&i).expect("begin"), Have::Partial(0));
            assert_eq!(
                store
                    .write_at(&i.digest, 0, &bytes[..40_000])
                    .await
                    .expect("write"),
                40_000
            );
            let e = store.finish(&i).await.expect_err("incomplete").to_string();
            assert!(
                e.contains("40000 of 100000 bytes") && e.contains("from byte 40000"),
                "{e}"
            );
        }
        let store = BundleStore::open(dir.path()).expect("reopen");
        let e = store
            .write_at(&i.digest, 40_000, &bytes[40_000..])
            .await
            .expect_err("not begun after a restart")
            .to_string();
        assert!(e.contains("begin it first"), "{e}");
        assert_eq!(store.begin(&i).expect("begin"), Have::Partial(40_000));
        assert_eq!(
            store
                .write_at(&i.digest, 40_000, &bytes[40_000..])
                .await
                .expect("write"),
            100_000
        );
        store.finish(&i).await.expect("finish");
        assert_eq!(store.begin(&i).expect("begin"), Have::Complete);
        assert_eq!(store.get(&i.digest), Some(i.clone()));
        let path = store.path(&i.digest).expect("path");
        assert_eq!(std::fs::read(&path).expect("read"), bytes);
        assert!(!dir.path().join("partial").join(&i.digest).exists());
        // Finishing again is a no-op; writing again is refused.
        store.finish(&i).await.expect("again");
        assert!(matches!(
            store.write_at(&i.digest, 0, b"x").await,
            Err(BundleError::Stored { .. })
        ));
        // The index survives a restart.
        let store = BundleStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(&i.digest), Some(i));
    }

    #[tokio::test]
    async fn a_wrong_offset_or_an_overlong_write_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BundleStore::open(dir.path()).expect("open");
        let bytes = b"hello bundle";
        let i = info(bytes, "a1", 1);
        store.begin(&i).expect("begin");
        store
            .write_at(&i.digest, 0, &bytes[..5])
            .await
            .expect("write");
        let e = store
            .write_at(&i.digest, 3, &bytes[3..])
            .await
            .expect_err("rewind");
        assert!(
            matches!(
                e,
                BundleError::Offset {
                    offset: 3,
                    have: 5,
                    ..
                }
            ),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(
            e.contains("resumes at byte 3, but 5 bytes are stored; resume at byte 5"),
            "{e}"
        );
        let e = store
            .write_at(&i.digest, 9, b"x")
            .await
            .expect_err("gap")
            .to_string();
        assert!(e.contains("byte 9") && e.contains("5 bytes"), "{e}");
        let e = store
            .write_at(&i.digest, 5, b"far too many bytes")
            .await
            .expect_err("overflow")
            .to_string();
        assert!(
            e.contains("end at byte 23, past its declared size of 12 bytes"),
            "{e}"
        );
        // Nothing was written by the refused calls.
        assert_eq!(store.begin(&i).expect("begin"), Have::Partial(5));
    }

    #[tokio::test]
    async fn a_bad_digest_is_discarded_with_a_clear_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BundleStore::open(dir.path()).expect("open");
        let mut i = info(b"the real bytes", "a1", 1);
        let sent = b"other bytes!!!";
        assert_eq!(sent.len() as u64, i.size);
        store.begin(&i).expect("begin");
        store.write_at(&i.digest, 0, sent).await.expect("write");
        let e = store.finish(&i).await.expect_err("mismatch");
        match &e {
            BundleError::Digest { expected, actual } => {
                assert_eq!(expected, &i.digest);
                assert_eq!(actual, &sha(sent));
            }
            other => panic!("{other:?}"),
        }
        let e = e.to_string();
        assert!(
            e.contains(&i.digest) && e.contains(&sha(sent)) && e.contains("discarded"),
            "{e}"
        );
        assert!(!dir.path().join("partial").join(&i.digest).exists());
        assert_eq!(store.get(&i.digest), None);
        assert_eq!(store.begin(&i).expect("begin"), Have::Partial(0));
        // A partial longer than declared cannot be this bundle: it starts again.
        store.write_at(&i.digest, 0, sent).await.expect("write");
        i.size = 4;
        assert_eq!(store.begin(&i).expect("begin"), Have::Partial(0));
    }

    #[tokio::test]
    async fn retention_and_list_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BundleStore::open(dir.path()).expect("open");
        let a1 = put(&store, b"one", "a", 1).await;
        let a2 = put(&store, b"two", "a", 2).await;
        let a3 = put(&store, b"three", "a", 3).await;
        let b1 = put(&store, b"four", "b", 1).await;
        let mut other = info(b"five", "c", 9);
        other.job = "other".into();
        store.begin(&other).expect("begin");
        store
            .write_at(&other.digest, 0, b"five")
            .await
            .expect("write");
        store.finish(&other).await.expect("finish");

        let digests = |v: Vec<BundleInfo>| v.into_iter().map(|b| b.digest).collect::<Vec<_>>();
        assert_eq!(
            digests(store.list(Some("train"), None)),
            // Newest first; b1 and a1 tie on time and go by digest, descending.
            {
                let mut tail = [a1.digest.clone(), b1.digest.clone()];
                tail.sort();
                tail.reverse();
                [vec![a3.digest.clone(), a2.digest.clone()], tail.to_vec()].concat()
            }
        );
        assert_eq!(store.list(None, None).len(), 5);
        assert_eq!(
            digests(store.list(None, Some("a"))),
            [a3.digest.clone(), a2.digest.clone(), a1.digest.clone()]
        );
        assert_eq!(store.latest("a"), Some(a3.clone()));
        assert_eq!(store.latest("zzz"), None);

        assert_eq!(
            store.prune("train", 2).expect("prune"),
            vec![a1.digest.clone()]
        );
        assert_eq!(store.get(&a1.digest), None);
        assert!(!dir.path().join("sha256").join(&a1.digest).exists());
        assert!(
            !dir.path()
                .join("meta")
                .join(format!("{}.json", a1.digest))
                .exists()
        );
        assert_eq!(
            store.prune("train", 1).expect("prune"),
            vec![a2.digest.clone()]
        );
        assert!(store.prune("train", 1).expect("prune").is_empty());
        assert_eq!(store.list(Some("train"), None).len(), 2);
        // Other jobs are untouched, and the pruning survives a restart.
        let store = BundleStore::open(dir.path()).expect("reopen");
        assert_eq!(store.get(&other.digest), Some(other.clone()));
        assert_eq!(store.list(None, None).len(), 3);

        assert!(store.delete(&other.digest).expect("delete"));
        assert!(!store.delete(&other.digest).expect("delete again"));
        assert!(matches!(
            store.path(&other.digest),
            Err(BundleError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn traversal_looking_digests_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BundleStore::open(dir.path()).expect("open");
        let outside = dir.path().join("secret");
        std::fs::write(&outside, b"keep me").expect("write");
        for bad in [
            "../secret".to_string(),
            format!("../../{}", "a".repeat(58)),
            format!("{}/..", "a".repeat(61)),
            "A".repeat(64),
            String::new(),
        ] {
            let mut i = info(b"x", "a", 1);
            i.digest = bad.clone();
            let e = store.begin(&i).expect_err(&bad).to_string();
            assert!(e.contains("expected 64 lowercase hex digits"), "{bad}: {e}");
            assert!(matches!(
                store.write_at(&bad, 0, b"x").await,
                Err(BundleError::Invalid(_))
            ));
            assert!(matches!(
                store.finish(&i).await,
                Err(BundleError::Invalid(_))
            ));
            assert!(matches!(store.path(&bad), Err(BundleError::Invalid(_))));
            assert!(matches!(store.delete(&bad), Err(BundleError::Invalid(_))));
            assert_eq!(store.get(&bad), None);
        }
        assert_eq!(std::fs::read(&outside).expect("still there"), b"keep me");
    }

    #[test]
    fn declared_sizes_and_modes_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = BundleStore::open(dir.path()).expect("open");
        let mut i = info(b"x", "a", 1);
        i.size = MAX_BUNDLE_BYTES + 1;
        let e = store.begin(&i).expect_err("too big").to_string();
        assert!(
            e.contains(&format!("expected 1 to {MAX_BUNDLE_BYTES} bytes")),
            "{e}"
        );
        i.size = 0;
        assert!(matches!(store.begin(&i), Err(BundleError::Size { .. })));
        i.size = 1;
        i.mode = CheckpointMode::Auto;
        let e = store.begin(&i).expect_err("auto").to_string();
        assert!(e.contains("live or fs"), "{e}");
    }

    #[test]
    fn corrupt_meta_is_skipped_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        BundleStore::open(dir.path()).expect("create");
        let d = "b".repeat(64);
        std::fs::write(
            dir.path().join("meta").join(format!("{d}.json")),
            "{not json",
        )
        .expect("write");
        std::fs::write(dir.path().join("meta").join("x.tmp"), "").expect("write");
        let store = BundleStore::open(dir.path()).expect("open");
        assert!(store.list(None, None).is_empty());
        assert!(!dir.path().join("meta").join("x.tmp").exists());
    }

    #[test]
    fn write_errors_name_the_path_and_where_to_resume() {
        let e = BundleError::Write {
            path: PathBuf::from("/var/lib/novacron/bundles/partial/abc"),
            kept: Some(4096),
            source: io::Error::from_raw_os_error(28),
        }
        .to_string();
        assert!(
            e.starts_with("could not write /var/lib/novacron/bundles/partial/abc: No space left")
                && e.contains("cut back to 4096 bytes")
                && e.contains("resume at byte 4096"),
            "{e}"
        );
    }
}
