//! The bundle file: a zstd-compressed tar of `bundle.json`, `criu/`, `rootfs.tar`
//! and `volumes/<n>.tar`, named by the SHA-256 of its bytes. Packing hashes as it
//! writes; unpacking checks every member (names, kinds, sizes) before anything is
//! used, since bundles come from peers.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use novacron_common::checkpoint::{BUNDLE_FORMAT, BundleMeta, CheckpointMode};
use sha2::{Digest, Sha256};

use super::rootfs::{container_path, safe_relative};
use super::{BUNDLE_EXT, CheckpointError, create, mkdir};

pub(super) const META_FILE: &str = "bundle.json";
pub(super) const CRIU_DIR: &str = "criu";
pub(super) const ROOTFS_TAR: &str = "rootfs.tar";
pub(super) const VOLUMES_DIR: &str = "volumes";
/// A VM snapshot's QEMU migration stream.
pub(super) const VM_STATE: &str = "vm/state";
/// A VM snapshot's disk, when the VM has one: its qcow2 overlay.
pub(super) const VM_DISK: &str = "vm/disk.qcow2";
/// The largest `bundle.json` read.
const MAX_META_BYTES: u64 = 4 * 1024 * 1024;
pub(super) const CHUNK: usize = 256 * 1024;
/// A byte budget for what goes into one bundle.
#[derive(Debug)]
pub(super) struct Budget {
    pub(super) used: u64,
    limit: u64,
}

impl Budget {
    pub(super) fn new(limit: u64) -> Self {
        Budget { used: 0, limit }
    }

    pub(super) fn add(&mut self, n: u64, what: &str) -> Result<(), CheckpointError> {
        self.used = self.used.saturating_add(n);
        if self.used > self.limit {
            return Err(CheckpointError::TooLarge {
                what: format!("the checkpoint (at {what})"),
                bytes: self.used,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

/// A writer that hashes and counts what passes and refuses to pass more than
/// `limit` bytes.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(io::Error::other("bundle size limit reached"));
        }
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that refuses to yield more than `limit` bytes.
struct LimitedReader<R> {
    inner: R,
    read: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(io::Error::other("decompressed bundle size limit reached"));
        }
        Ok(n)
    }
}

/// Packs the staged directory `stage` (bundle.json, criu/, rootfs.tar, volumes/)
/// into `<cache_dir>/<digest>.ncb`; returns the digest and size.
pub(super) fn pack(
    stage: &Path,
    cache_dir: &Path,
    limit: u64,
) -> Result<(String, u64), CheckpointError> {
    let tmp = tempfile::Builder::new()
        .prefix(".pack-")
        .tempfile_in(cache_dir)
        .map_err(|source| CheckpointError::Io {
            what: "creating a temporary bundle in",
            path: cache_dir.to_path_buf(),
            source,
        })?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|source| CheckpointError::Io {
            what: "opening",
            path: tmp.path().to_path_buf(),
            source,
        })?;
    let exceeded = Arc::new(AtomicBool::new(false));
    let writer = HashingWriter {
        inner: BufWriter::new(file),
        hasher: Sha256::new(),
        written: 0,
        limit,
        exceeded: exceeded.clone(),
    };
    let result = (|| -> io::Result<HashingWriter<BufWriter<File>>> {
        let mut encoder = zstd::stream::Encoder::new(writer, 3)?;
        // Two workers: compression overlaps reading; a failure here only costs speed.
        let _ = encoder.multithread(2);
        let mut builder = tar::Builder::new(encoder);
        builder.follow_symlinks(false);
        builder.append_path_with_name(stage.join(META_FILE), META_FILE)?;
        if stage.join(CRIU_DIR).is_dir() {
            builder.append_dir_all(CRIU_DIR, stage.join(CRIU_DIR))?;
        }
        if stage.join(ROOTFS_TAR).is_file() {
            builder.append_path_with_name(stage.join(ROOTFS_TAR), ROOTFS_TAR)?;
        }
        for member in [VM_STATE, VM_DISK] {
            if stage.join(member).is_file() {
                builder.append_path_with_name(stage.join(member), member)?;
            }
        }
        if stage.join(VOLUMES_DIR).is_dir() {
            builder.append_dir_all(VOLUMES_DIR, stage.join(VOLUMES_DIR))?;
        }
        let encoder = builder.into_inner()?;
        let mut writer = encoder.finish()?;
        writer.flush()?;
        Ok(writer)
    })();
    let writer = match result {
        Ok(w) => w,
        Err(_) if exceeded.load(Ordering::Relaxed) => {
            return Err(CheckpointError::TooLarge {
                what: "the compressed bundle".to_owned(),
                bytes: limit,
                limit,
            });
        }
        Err(source) => {
            return Err(CheckpointError::Io {
                what: "packing",
                path: stage.to_path_buf(),
                source,
            });
        }
    };
    let size = writer.written;
    let digest = hex::encode(writer.hasher.finalize());
    let path = cache_dir.join(format!("{digest}.{BUNDLE_EXT}"));
    tmp.as_file()
        .sync_all()
        .map_err(|source| CheckpointError::Io {
            what: "writing",
            path: tmp.path().to_path_buf(),
            source,
        })?;
    tmp.persist(&path).map_err(|e| CheckpointError::Io {
        what: "naming",
        path: path.clone(),
        source: e.error,
    })?;
    Ok((digest, size))
}

/// Streams the SHA-256 of `path` and compares it with `expected`.
pub(super) fn verify_file(path: &Path, expected: &str) -> Result<u64, CheckpointError> {
    let err = |source| CheckpointError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(CheckpointError::DigestMismatch {
            path: path.to_path_buf(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(size)
}

/// Unpacks the bundle at `bundle` into the empty directory `dest` and checks it
/// whole: member names and kinds, the inner tars, and `bundle.json`.
pub(super) fn unpack(
    bundle: &Path,
    dest: &Path,
    limit: u64,
) -> Result<BundleMeta, CheckpointError> {
    let name = bundle
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bad = |reason: String| CheckpointError::BadBundle {
        bundle: name.clone(),
        reason,
    };
    let file = File::open(bundle).map_err(|source| CheckpointError::Io {
        what: "opening",
        path: bundle.to_path_buf(),
        source,
    })?;
    let exceeded = Arc::new(AtomicBool::new(false));
    let decoder = zstd::stream::Decoder::new(file)
        .map_err(|e| bad(format!("it is not zstd-compressed: {e}")))?;
    let reader = LimitedReader {
        inner: decoder,
        read: 0,
        limit,
        exceeded: exceeded.clone(),
    };
    let too_large = || CheckpointError::TooLarge {
        what: format!("bundle {name} once decompressed"),
        bytes: limit,
        limit,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("it is not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            if exceeded.load(Ordering::Relaxed) {
                too_large()
            } else {
                bad(format!("reading a member: {e}"))
            }
        })?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("a member name is not valid: {e}")))?
            .into_owned();
        let rel = safe_relative(&raw)
            .filter(|r| !r.as_os_str().is_empty())
            .ok_or_else(|| {
                bad(format!(
                    "member {raw:?} is absolute or leaves the bundle (`..`); only relative paths inside it are accepted"
                ))
            })?;
        let at = dest.join(&rel);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            mkdir(&at)?;
        } else if kind.is_file() {
            if let Some(parent) = at.parent() {
                mkdir(parent)?;
            }
            let mut out = create(&at)?;
            io::copy(&mut entry, &mut out).map_err(|e| {
                if exceeded.load(Ordering::Relaxed) {
                    too_large()
                } else {
                    bad(format!("reading member {raw:?}: {e}"))
                }
            })?;
        } else {
            return Err(bad(format!(
                "member {raw:?} is a {kind:?}; only files and directories are accepted"
            )));
        }
    }

    let meta_path = dest.join(META_FILE);
    let mut json = Vec::new();
    File::open(&meta_path)
        .map_err(|_| bad(format!("it has no {META_FILE}")))?
        .take(MAX_META_BYTES)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("reading {META_FILE}: {e}")))?;
    let meta: BundleMeta =
        serde_json::from_slice(&json).map_err(|e| bad(format!("{META_FILE} is not valid: {e}")))?;
    if meta.format != BUNDLE_FORMAT {
        return Err(bad(format!(
            "format {} is not supported; this agent reads format {BUNDLE_FORMAT}",
            meta.format
        )));
    }
    if meta.vm {
        if meta.mode != CheckpointMode::Live || meta.criu_name.is_some() {
            return Err(bad(
                "a VM snapshot is live and has no CRIU checkpoint name".to_owned()
            ));
        }
        if !dest.join(VM_STATE).is_file() {
            return Err(bad(format!("a VM snapshot without {VM_STATE}")));
        }
        return Ok(meta);
    }
    match (&meta.mode, &meta.criu_name) {
        (CheckpointMode::Live, Some(n)) => {
            let ok = !n.is_empty()
                && n.len() <= 128
                && n != "."
                && n != ".."
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad(format!(
                    "CRIU checkpoint name {n:?} is not valid; expected letters, digits, '.', '_' or '-'"
                )));
            }
            if !dest.join(CRIU_DIR).is_dir() {
                return Err(bad(format!("mode live but no {CRIU_DIR}/ directory")));
            }
        }
        (CheckpointMode::Live, None) => {
            return Err(bad("mode live but no CRIU checkpoint name".to_owned()));
        }
        (CheckpointMode::Fs, _) => {}
        (CheckpointMode::Auto, _) => {
            return Err(bad("mode auto; a bundle is live or fs".to_owned()));
        }
    }
    for path in meta.deleted.iter().chain(&meta.volumes) {
        container_path(path).map_err(|e| bad(e.to_string()))?;
    }
    let mut inner = vec![dest.join(ROOTFS_TAR)];
    inner.extend((0..meta.volumes.len()).map(|n| dest.join(VOLUMES_DIR).join(format!("{n}.tar"))));
    for tar in inner.iter().filter(|t| t.exists()) {
        check_inner_tar(tar).map_err(bad)?;
    }
    Ok(meta)
}

/// Checks that every member of an inner tar has a relative name without `..`.
fn check_inner_tar(path: &Path) -> Result<(), String> {
    let shown = path.file_name().unwrap_or_default().to_string_lossy();
    let file = File::open(path).map_err(|e| format!("opening {shown}: {e}"))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let entries = archive
        .entries()
        .map_err(|e| format!("{shown} is not a tar archive: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {shown}: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| format!("a member name in {shown} is not valid: {e}"))?;
        if safe_relative(&name).is_none() {
            return Err(format!(
                "{shown} member {name:?} is absolute or leaves its root (`..`); only relative paths are accepted"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use novacron_common::checkpoint::MAX_BUNDLE_BYTES;

    use super::*;
    use crate::checkpoint::rootfs::tar_has_members;
    use crate::checkpoint::tests::checkpointer;

    fn fs_meta(volumes: Vec<String>) -> BundleMeta {
        BundleMeta {
            format: BUNDLE_FORMAT,
            mode: CheckpointMode::Fs,
            alloc: "a1".into(),
            job: "j1".into(),
            image: "img".into(),
            criu_name: None,
            deleted: vec!["/bin/vi".into()],
            volumes,
            created_unix_ms: 7,
            container: None,
            vm: false,
            runc: false,
            vm_address: None,
        }
    }

    fn tar_with(path: &Path, files: &[(&str, &[u8])]) {
        let mut b = tar::Builder::new(File::create(path).expect("create tar"));
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.finish().expect("finish tar");
    }

    /// A stage directory as `checkpoint` leaves it before packing.
    fn stage(dir: &Path, live: bool) -> BundleMeta {
        let mut meta = fs_meta(vec!["/data".into()]);
        if live {
            meta.mode = CheckpointMode::Live;
            meta.criu_name = Some("nc-1".into());
            std::fs::create_dir_all(dir.join("criu/sub")).expect("mkdir");
            std::fs::write(dir.join("criu/pages-1.img"), vec![7u8; 100_000]).expect("w");
            std::fs::write(dir.join("criu/sub/x.img"), b"x").expect("w");
        }
        std::fs::write(
            dir.join(META_FILE),
            serde_json::to_vec(&meta).expect("json"),
        )
        .expect("w");
        tar_with(&dir.join(ROOTFS_TAR), &[("etc/marker", b"hello")]);
        std::fs::create_dir_all(dir.join(VOLUMES_DIR)).expect("mkdir");
        tar_with(&dir.join("volumes/0.tar"), &[("counter", b"41")]);
        meta
    }

    /// Writes `tar_bytes` zstd-compressed into the cache under its digest.
    fn cache_raw(cache: &Path, tar_bytes: &[u8]) -> String {
        let z = zstd::encode_all(tar_bytes, 3).expect("zstd");
        let digest = hex::encode(Sha256::digest(&z));
        std::fs::write(cache.join(format!("{digest}.{BUNDLE_EXT}")), z).expect("w");
        digest
    }

    #[tokio::test]
    async fn bundles_pack_and_unpack_to_the_same_content() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (st, cache, out) = (
            tmp.path().join("s"),
            tmp.path().join("c"),
            tmp.path().join("o"),
        );
        for d in [&st, &out] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let meta = stage(&st, true);
        let cp = checkpointer(&cache);
        let (digest, size) = pack(&st, &cache, MAX_BUNDLE_BYTES).expect("pack");
        assert_eq!(cp.verify(&digest).await.expect("verify"), size);
        let back = unpack(
            &cp.bundle_path(&digest).expect("path"),
            &out,
            MAX_BUNDLE_BYTES,
        )
        .expect("unpack");
        assert_eq!(back, meta);
        for rel in [
            "criu/pages-1.img",
            "criu/sub/x.img",
            ROOTFS_TAR,
            "volumes/0.tar",
        ] {
            assert_eq!(
                std::fs::read(st.join(rel)).expect("read"),
                std::fs::read(out.join(rel)).expect("read"),
                "{rel}"
            );
        }
        assert!(tar_has_members(&out.join(ROOTFS_TAR)).expect("tar"));
        assert!(size < 100_000, "zstd compressed the image: {size}");
    }

    #[tokio::test]
    async fn a_vm_snapshot_carries_its_state_and_must_have_it() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (st, cache) = (tmp.path().join("s"), tmp.path().join("c"));
        std::fs::create_dir_all(st.join("vm")).expect("mkdir");
        let mut meta = fs_meta(Vec::new());
        meta.mode = CheckpointMode::Live;
        meta.deleted.clear();
        meta.vm = true;
        std::fs::write(st.join(META_FILE), serde_json::to_vec(&meta).expect("json")).expect("w");
        std::fs::write(st.join(VM_STATE), vec![0x51u8; 300_000]).expect("w");
        let cp = checkpointer(&cache);
        let (digest, _) = pack(&st, &cache, MAX_BUNDLE_BYTES).expect("pack");
        let out = tmp.path().join("o");
        std::fs::create_dir_all(&out).expect("mkdir");
        let back = unpack(
            &cp.bundle_path(&digest).expect("path"),
            &out,
            MAX_BUNDLE_BYTES,
        )
        .expect("unpack");
        assert_eq!(back, meta);
        assert_eq!(
            std::fs::read(out.join(VM_STATE)).expect("state").len(),
            300_000
        );
        assert!(!out.join(ROOTFS_TAR).exists(), "a VM has no rootfs diff");
        // A snapshot that says VM but has no state is refused.
        std::fs::remove_file(st.join(VM_STATE)).expect("rm");
        let (digest, _) = pack(&st, &cache, MAX_BUNDLE_BYTES).expect("pack");
        let out = tmp.path().join("o2");
        std::fs::create_dir_all(&out).expect("mkdir");
        let err = unpack(
            &cp.bundle_path(&digest).expect("path"),
            &out,
            MAX_BUNDLE_BYTES,
        )
        .expect_err("no state");
        assert!(err.to_string().contains("vm/state"), "{err}");
    }

    #[tokio::test]
    async fn a_flipped_byte_fails_verify_naming_both_digests() {
        let tmp = tempfile::tempdir().expect("tmp");
        let st = tmp.path().join("s");
        std::fs::create_dir_all(&st).expect("mkdir");
        stage(&st, false);
        let cp = checkpointer(&tmp.path().join("c"));
        let (digest, _) = pack(&st, cp.cache_dir(), MAX_BUNDLE_BYTES).expect("pack");
        let path = cp.bundle_path(&digest).expect("path");
        let mut bytes = std::fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&path, bytes).expect("write");
        let err = cp.verify(&digest).await.expect_err("corrupt bundle passed");
        let CheckpointError::DigestMismatch { actual, .. } = &err else {
            panic!("unexpected error {err}");
        };
        let msg = err.to_string();
        assert!(
            msg.contains(&digest) && msg.contains(actual.as_str()),
            "{msg}"
        );
        assert_ne!(actual, &digest);
        // Restore refuses before it touches Docker (the socket here does not exist).
        let err = cp
            .restore(&digest, "c1")
            .await
            .expect_err("restored corrupt");
        assert!(
            matches!(err, CheckpointError::DigestMismatch { .. }),
            "{err}"
        );
        // Bad names never become paths.
        assert!(matches!(
            cp.verify("../../etc/passwd").await,
            Err(CheckpointError::Invalid { .. })
        ));
        assert!(matches!(
            cp.verify(&"0".repeat(64)).await,
            Err(CheckpointError::NotFound { .. })
        ));
    }

    /// A tar whose one member is named `name` verbatim (tar::Builder refuses `..`).
    fn raw_tar(name: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.push(b'x');
        out.resize(1024 + 1536, 0);
        out
    }

    #[test]
    fn members_that_escape_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("o");
        for name in [&b"../x"[..], b"/etc/passwd", b"criu/../../x"] {
            std::fs::create_dir_all(&out).expect("mkdir");
            let digest = cache_raw(tmp.path(), &raw_tar(name));
            let bundle = tmp.path().join(format!("{digest}.{BUNDLE_EXT}"));
            let err = unpack(&bundle, &out, MAX_BUNDLE_BYTES).expect_err("escaped");
            let msg = err.to_string();
            assert!(
                matches!(err, CheckpointError::BadBundle { .. }) && msg.contains("`..`"),
                "{msg}"
            );
            assert!(!tmp.path().join("x").exists());
            std::fs::remove_dir_all(&out).expect("rm");
        }
        // Inside the inner tars too.
        let inner = tmp.path().join("rootfs.tar");
        std::fs::write(&inner, raw_tar(b"../../etc/shadow")).expect("w");
        assert!(
            check_inner_tar(&inner)
                .expect_err("escaped")
                .contains("`..`")
        );
    }

    #[test]
    fn unpacking_stops_at_the_decompressed_limit() {
        let tmp = tempfile::tempdir().expect("tmp");
        let st = tmp.path().join("s");
        std::fs::create_dir_all(&st).expect("mkdir");
        stage(&st, true);
        let (digest, size) = pack(&st, tmp.path(), MAX_BUNDLE_BYTES).expect("pack");
        let bundle = tmp.path().join(format!("{digest}.{BUNDLE_EXT}"));
        let out = tmp.path().join("o");
        std::fs::create_dir_all(&out).expect("mkdir");
        let err = unpack(&bundle, &out, 50_000).expect_err("bomb unpacked");
        assert!(
            matches!(err, CheckpointError::TooLarge { limit: 50_000, .. }),
            "{err}"
        );
        let err = pack(&st, tmp.path(), size / 2).expect_err("over the limit");
        assert!(matches!(err, CheckpointError::TooLarge { .. }), "{err}");
    }
}
