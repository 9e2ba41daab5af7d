//! A live migration's files, copied before the freeze: the writable layer and
//! the volumes go out while the container still serves ([`send_files`], which
//! records a [`Snapshot`] of what it sent), and inside the freeze only what
//! changed since is carried ([`copy_files`](super::oci::copy_files) given the
//! snapshot), with the paths that went away ([`Snapshot::removed`]). The
//! target moves the early copy into place ([`place_files`]) and applies the
//! delta over it.
//!
//! A file counts as unchanged when its inode, type, mode, owner, size, and
//! modification and change times are those seen before the freeze, and its
//! change time was not within [`RACY_NS`] of the walk's start: file times
//! move in clock ticks, so a write in the same tick as the first look could
//! leave them as they were (git's "racy" entries); those are carried again.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::CheckpointError;
use super::rootfs::{safe_relative, through_link};

/// Where the early copy sits in a migration's stream and incoming directory.
pub(crate) const EARLY_DIR: &str = "early";
/// The record of the delta: the paths removed since the early copy.
pub(crate) const REMOVED: &str = "removed.json";
/// How close to the walk's start a change time must be to count as racy: more
/// than a kernel tick (at most 10 ms at 100 Hz).
const RACY_NS: i128 = 50_000_000;

/// What the early copy saw of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    pub(crate) fn of(m: &std::fs::Metadata) -> Self {
        Self {
            ino: m.ino(),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            size: if m.is_file() { m.len() } else { 0 },
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }

    fn is_dir(&self) -> bool {
        rustix::fs::FileType::from_raw_mode(self.mode) == rustix::fs::FileType::Directory
    }
}

/// What the early copy sent, keyed by the path in the stream
/// (`rootfs/<path>`, `volumes/<n>/<path>`).
#[derive(Debug, Default, Clone)]
pub(crate) struct Snapshot {
    entries: BTreeMap<String, Stamp>,
    /// Change times from here on are racy.
    racy_from_ns: i128,
}

impl Snapshot {
    pub(crate) fn new(walk_started_ns: i128) -> Self {
        Self {
            entries: BTreeMap::new(),
            racy_from_ns: walk_started_ns - RACY_NS,
        }
    }

    pub(crate) fn record(&mut self, key: String, stamp: Stamp) {
        self.entries.insert(key, stamp);
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether `key`, now `stamp`, is as the early copy sent it.
    pub(crate) fn unchanged(&self, key: &str, stamp: &Stamp) -> bool {
        self.entries
            .get(key)
            .is_some_and(|s| s == stamp && s.ctime_ns < self.racy_from_ns)
    }

    /// The paths of the early copy to remove before the delta is applied:
    /// those not `seen` in the frozen walk, and those that turned from a
    /// directory into something else or back (the delta could not unpack
    /// over them). Topmost only: a removed directory takes what it holds.
    pub(crate) fn removed(&self, seen: &BTreeMap<String, Stamp>) -> Vec<String> {
        let mut out: BTreeSet<&str> = BTreeSet::new();
        for (key, was) in &self.entries {
            let gone = match seen.get(key) {
                None => true,
                Some(now) => now.is_dir() != was.is_dir(),
            };
            let mut under_removed = false;
            let mut cur = Path::new(key.as_str()).parent();
            while let Some(p) = cur.and_then(Path::to_str) {
                if out.contains(p) {
                    under_removed = true;
                    break;
                }
                cur = Path::new(p).parent();
            }
            if gone && !under_removed {
                out.insert(key);
            }
        }
        out.into_iter().map(str::to_owned).collect()
    }
}

/// The host directory mounted at volume target `target`, among `mounts`
/// (`(target, host directory)`).
pub(crate) fn mount_of<'a>(mounts: &'a [(String, PathBuf)], target: &str) -> Option<&'a Path> {
    mounts
        .iter()
        .find(|(t, _)| t == target)
        .map(|(_, s)| s.as_path())
}

/// The stream key of path `rel` of the writable layer, or of volume `n`.
pub(crate) fn key(volume: Option<usize>, rel: &Path) -> String {
    match volume {
        None => format!("rootfs/{}", rel.display()),
        Some(n) => format!("volumes/{n}/{}", rel.display()),
    }
}

/// Appends the writable layer `upper` (less its whiteouts, which the frozen
/// walk reports) and each volume target's mounted directory to `tar` under
/// [`EARLY_DIR`], while the container runs: a path that vanishes meanwhile is
/// skipped, and a file read while it grows or shrinks goes in at the size
/// first seen (the delta carries it again, as its times moved).
pub(crate) fn send_files<W: Write>(
    tar: &mut tar::Builder<W>,
    upper: &Path,
    mounts: &[(String, PathBuf)],
    targets: &[String],
    walk_started_ns: i128,
) -> Result<(Snapshot, u64), CheckpointError> {
    let mut snap = Snapshot::new(walk_started_ns);
    let mut bytes = 0u64;
    let mut roots = vec![(None, upper.to_path_buf())];
    for (n, target) in targets.iter().enumerate() {
        if let Some(source) = mount_of(mounts, target) {
            roots.push((Some(n), source.to_path_buf()));
        }
    }
    for (volume, root) in roots {
        walk_live(&root, Path::new(""), &mut |rel, full, meta| {
            if meta.file_type().is_char_device() && meta.rdev() == 0 {
                return Ok(());
            }
            let key = key(volume, rel);
            let name = Path::new(EARLY_DIR).join(&key);
            if meta.is_file() {
                let file = match File::open(full) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(e),
                };
                let meta = file.metadata()?;
                let mut header = tar::Header::new_gnu();
                header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
                tar.append_data(&mut header, &name, Exact::new(file, meta.len()))?;
                bytes += meta.len();
                snap.record(key, Stamp::of(&meta));
            } else {
                match tar.append_path_with_name(full, &name) {
                    Ok(()) => snap.record(key, Stamp::of(meta)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
        .map_err(|source| CheckpointError::Io {
            what: "copying before the freeze",
            path: root.clone(),
            source,
        })?;
    }
    Ok((snap, bytes))
}

/// Calls `visit` for everything under `dir` (parents before children,
/// symbolic links not followed), skipping what vanishes during the walk.
pub(super) fn walk_live(
    dir: &Path,
    rel: &Path,
    visit: &mut dyn FnMut(&Path, &Path, &std::fs::Metadata) -> io::Result<()>,
) -> io::Result<()> {
    walk_tree(dir, rel, true, &|_, e| e, visit)
}

/// Calls `visit(relative, full, metadata)` for everything under `dir`,
/// parents before children, names in order, symbolic links not followed.
/// What vanishes meanwhile is skipped when `vanished_ok`; other reading
/// errors become `E` through `failed(path, error)`.
pub(super) fn walk_tree<E>(
    dir: &Path,
    rel: &Path,
    vanished_ok: bool,
    failed: &dyn Fn(&Path, io::Error) -> E,
    visit: &mut dyn FnMut(&Path, &Path, &std::fs::Metadata) -> Result<(), E>,
) -> Result<(), E> {
    let here = dir.join(rel);
    let gone = |e: &io::Error| vanished_ok && e.kind() == io::ErrorKind::NotFound;
    let entries = match std::fs::read_dir(&here) {
        Ok(e) => e,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(failed(&here, e)),
    };
    let mut names: Vec<_> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let full = dir.join(&rel);
        let meta = match std::fs::symlink_metadata(&full) {
            Ok(m) => m,
            Err(e) if gone(&e) => continue,
            Err(e) => return Err(failed(&full, e)),
        };
        visit(&rel, &full, &meta)?;
        if meta.is_dir() {
            walk_tree(dir, &rel, vanished_ok, failed, visit)?;
        }
    }
    Ok(())
}

/// Reads exactly `left` bytes: the file's, then zeros if it shrank.
struct Exact<R> {
    inner: R,
    left: u64,
    ended: bool,
}

impl<R: Read> Exact<R> {
    fn new(inner: R, len: u64) -> Self {
        Self {
            inner,
            left: len,
            ended: false,
        }
    }
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let want = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(out.len());
        if want == 0 {
            return Ok(0);
        }
        let n = if self.ended {
            0
        } else {
            self.inner.read(&mut out[..want])?
        };
        let n = if n == 0 {
            self.ended = true;
            out[..want].fill(0);
            want
        } else {
            n
        };
        self.left -= n as u64;
        Ok(n)
    }
}

/// The target's side: moves the early copy in `early` (as unpacked from the
/// stream) into the created container's writable layer `upper` and the
/// directories mounted at the volume targets, then removes the paths of
/// `removed`. Renames within one filesystem; `cp -a` across filesystems.
pub(crate) fn place_files(
    pre: &Path,
    upper: &Path,
    mounts: &[(String, PathBuf)],
    targets: &[String],
    removed: &[String],
) -> Result<(), CheckpointError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| CheckpointError::Io {
            what,
            path: path.clone(),
            source,
        }
    };
    let root_of = |volume: Option<usize>| -> Option<PathBuf> {
        match volume {
            None => Some(upper.to_path_buf()),
            Some(n) => mount_of(mounts, targets.get(n)?).map(Path::to_path_buf),
        }
    };
    let from_root = pre.join("rootfs");
    if from_root.exists() {
        merge_tree(&from_root, upper).map_err(io("placing the early copy in", upper))?;
    }
    for n in 0..targets.len() {
        let from = pre.join("volumes").join(n.to_string());
        if let (true, Some(into)) = (from.exists(), root_of(Some(n))) {
            merge_tree(&from, &into).map_err(io("placing the early copy in", &into))?;
        }
    }
    for key in removed {
        let Some((volume, rel)) = parse_key(key) else {
            return Err(CheckpointError::BadBundle {
                bundle: REMOVED.to_owned(),
                reason: format!("{key:?} is not a path of the writable layer or a volume"),
            });
        };
        let Some(root) = root_of(volume) else {
            continue;
        };
        // The container's own symbolic links may lead anywhere on this host:
        // a path through one is not the container's to remove.
        if through_link(&root, &rel) {
            return Err(CheckpointError::BadBundle {
                bundle: REMOVED.to_owned(),
                reason: format!("{key:?} leads through a symbolic link"),
            });
        }
        let at = root.join(&rel);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&at),
            Ok(_) => std::fs::remove_file(&at),
            Err(_) => Ok(()),
        }
        .map_err(io("removing", &at))?;
    }
    Ok(())
}

/// `rootfs/<path>` or `volumes/<n>/<path>`, with `<path>` relative and within.
fn parse_key(key: &str) -> Option<(Option<usize>, PathBuf)> {
    let (volume, rest) = if let Some(rest) = key.strip_prefix("rootfs/") {
        (None, rest)
    } else {
        let rest = key.strip_prefix("volumes/")?;
        let (n, rest) = rest.split_once('/')?;
        (Some(n.parse().ok()?), rest)
    };
    let rel = safe_relative(Path::new(rest))?;
    (!rel.as_os_str().is_empty()).then_some((volume, rel))
}

/// Moves everything under `from` into `into`: what `into` lacks is renamed
/// in whole, directories on both sides are merged, anything else in `into`
/// is replaced.
fn merge_tree(from: &Path, into: &Path) -> io::Result<()> {
    std::fs::create_dir_all(into)?;
    for entry in std::fs::read_dir(from)? {
        let name = entry?.file_name();
        let (src, dst) = (from.join(&name), into.join(&name));
        let src_dir = std::fs::symlink_metadata(&src)?.is_dir();
        match std::fs::symlink_metadata(&dst) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => move_path(&src, &dst)?,
            Err(e) => return Err(e),
            Ok(d) if d.is_dir() && src_dir => merge_tree(&src, &dst)?,
            Ok(d) => {
                if d.is_dir() {
                    std::fs::remove_dir_all(&dst)?;
                } else {
                    std::fs::remove_file(&dst)?;
                }
                move_path(&src, &dst)?;
            }
        }
    }
    Ok(())
}

fn move_path(src: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::rename(src, dst) {
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg("--")
                .arg(src)
                .arg(dst)
                .status()?;
            if status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!(
                    "cp -a {} {} failed ({status})",
                    src.display(),
                    dst.display()
                )))
            }
        }
        other => other,
    }
}

/// Now, in nanoseconds since the epoch (file times' scale).
pub(crate) fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, mode: u32, ctime_ns: i128) -> Stamp {
        Stamp {
            ino,
            mode,
            uid: 0,
            gid: 0,
            size: 1,
            mtime_ns: ctime_ns,
            ctime_ns,
        }
    }

    const FILE: u32 = 0o100_644;
    const DIR: u32 = 0o040_755;

    #[test]
    fn a_change_time_near_the_walk_s_start_is_racy_and_carried_again() {
        let mut snap = Snapshot::new(1_000_000_000);
        snap.record("rootfs/old".into(), stamp(1, FILE, 100));
        snap.record("rootfs/racy".into(), stamp(2, FILE, 990_000_000));
        assert!(snap.unchanged("rootfs/old", &stamp(1, FILE, 100)));
        assert!(!snap.unchanged("rootfs/old", &stamp(1, FILE, 101)));
        assert!(!snap.unchanged("rootfs/old", &stamp(9, FILE, 100)));
        assert!(!snap.unchanged("rootfs/racy", &stamp(2, FILE, 990_000_000)));
        assert!(!snap.unchanged("rootfs/new", &stamp(3, FILE, 100)));
    }

    #[test]
    fn removed_paths_are_the_topmost_gone_and_those_that_changed_type() {
        let mut snap = Snapshot::new(0);
        for (k, m) in [
            ("rootfs/a", DIR),
            ("rootfs/a/b", FILE),
            ("rootfs/a-x", FILE),
            ("rootfs/keep", FILE),
            ("rootfs/turned", FILE),
            ("volumes/0/v", DIR),
            ("volumes/0/v/w", FILE),
        ] {
            snap.record(k.into(), stamp(1, m, 0));
        }
        let seen: BTreeMap<String, Stamp> = [
            ("rootfs/a-x", FILE),
            ("rootfs/keep", FILE),
            ("rootfs/turned", DIR),
            ("volumes/0/v", FILE),
        ]
        .into_iter()
        .map(|(k, m)| (k.to_owned(), stamp(2, m, 5)))
        .collect();
        assert_eq!(
            snap.removed(&seen),
            vec!["rootfs/a", "rootfs/turned", "volumes/0/v"]
        );
    }

    #[test]
    fn keys_that_leave_their_root_are_refused() {
        assert_eq!(
            parse_key("rootfs/etc/app"),
            Some((None, PathBuf::from("etc/app")))
        );
        assert_eq!(
            parse_key("volumes/2/x/y"),
            Some((Some(2), PathBuf::from("x/y")))
        );
        for bad in [
            "rootfs/../etc/passwd",
            "rootfs/",
            "volumes/x/a",
            "volumes/1",
            "other/a",
            "/rootfs/a",
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }

    /// A volume on another filesystem than the agent's state (a data disk):
    /// the early copy cannot be renamed there, so it is copied (`cp -a`),
    /// keeping modes, owners and symbolic links, and merged as a rename would.
    #[test]
    fn the_early_copy_crosses_to_a_volume_on_another_filesystem() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().expect("tempdir");
        // /dev/shm is a tmpfs on these machines (Debian mounts one).
        let volume = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
        let dev = |p: &Path| std::fs::metadata(p).expect("stat").dev();
        assert_ne!(
            dev(dir.path()),
            dev(volume.path()),
            "this test needs {} and /dev/shm on two filesystems",
            dir.path().display()
        );
        let (early, upper) = (dir.path().join("early"), dir.path().join("upper"));
        let from = early.join("volumes").join("0");
        for d in [from.join("new"), from.join("kept"), upper.clone()] {
            std::fs::create_dir_all(d).expect("dirs");
        }
        std::fs::write(from.join("new").join("a"), "new file").expect("file");
        std::fs::set_permissions(
            from.join("new").join("a"),
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        std::os::unix::fs::chown(from.join("new").join("a"), Some(1234), Some(1234))
            .expect("chown (the tests run as root)");
        std::fs::write(from.join("kept").join("b"), "b").expect("file");
        std::fs::write(from.join("replaced"), "new").expect("file");
        std::os::unix::fs::symlink("new/a", from.join("link")).expect("symlink");
        // What the volume already holds.
        std::fs::create_dir_all(volume.path().join("kept")).expect("dir");
        std::fs::write(volume.path().join("kept").join("old"), "old").expect("file");
        std::fs::write(volume.path().join("replaced"), "old").expect("file");

        let mounts = [("/data".to_owned(), volume.path().to_path_buf())];
        place_files(&early, &upper, &mounts, &["/data".into()], &[]).expect("placed");

        let v = volume.path();
        let a = v.join("new").join("a");
        assert_eq!(std::fs::read_to_string(&a).expect("a"), "new file");
        let meta = std::fs::metadata(&a).expect("a");
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o640, 1234, 1234)
        );
        assert_eq!(
            std::fs::read_to_string(v.join("kept").join("b")).expect("b"),
            "b"
        );
        assert_eq!(
            std::fs::read_to_string(v.join("kept").join("old")).expect("old"),
            "old",
            "a directory on both sides is merged"
        );
        assert_eq!(
            std::fs::read_to_string(v.join("replaced")).expect("file"),
            "new"
        );
        assert_eq!(
            std::fs::read_link(v.join("link")).expect("a symbolic link"),
            Path::new("new/a")
        );
    }

    #[test]
    fn a_removal_through_the_container_s_symbolic_link_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (upper, outside, early) = (
            dir.path().join("upper"),
            dir.path().join("outside"),
            dir.path().join("early"),
        );
        for d in [&upper, &outside, &early] {
            std::fs::create_dir_all(d).expect("dirs");
        }
        std::fs::write(outside.join("precious"), "host file").expect("file");
        std::os::unix::fs::symlink(&outside, upper.join("link")).expect("symlink");
        std::fs::write(upper.join("mine"), "x").expect("file");
        let refused = place_files(&early, &upper, &[], &[], &["rootfs/link/precious".into()]);
        assert!(
            matches!(&refused, Err(CheckpointError::BadBundle { reason, .. }) if reason.contains("symbolic link")),
            "{refused:?}"
        );
        assert!(outside.join("precious").exists());
        // The link itself, and the container's own files, may go.
        place_files(
            &early,
            &upper,
            &[],
            &[],
            &["rootfs/link".into(), "rootfs/mine".into()],
        )
        .expect("removed");
        assert!(!upper.join("link").exists() && !upper.join("mine").exists());
        assert!(outside.join("precious").exists());
        // Nor does a deleted path replayed as a whiteout through the link.
        std::os::unix::fs::symlink(&outside, upper.join("link2")).expect("symlink");
        let refused =
            crate::checkpoint::rootfs::write_whiteouts(&upper, &["/link2/precious".into()]);
        assert!(refused.is_err(), "{refused:?}");
        assert_eq!(
            std::fs::read_to_string(outside.join("precious")).expect("still a file"),
            "host file"
        );
    }

    #[test]
    fn a_file_read_while_it_changes_size_goes_in_at_the_size_first_seen() {
        let mut out = Vec::new();
        Exact::new(&b"abcdef"[..], 4)
            .read_to_end(&mut out)
            .expect("read");
        assert_eq!(out, b"abcd");
        out.clear();
        Exact::new(&b"ab"[..], 5)
            .read_to_end(&mut out)
            .expect("read");
        assert_eq!(out, b"ab\0\0\0");
    }
}
