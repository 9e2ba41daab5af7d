//! Blob storage: large or controller-local data (checkpoint bundles today; images,
//! metrics history and outboxes later), kept apart from the record
//! [`Store`](crate::state::store::Store) because it is too large for a record, or
//! belongs to this controller only and is not replicated with the records.
//!
//! A blob is named by a [`BlobKey`]: a space (a kind of data, such as a bundle's
//! `sha256/`, `partial/` and `meta/`) and a name inside it. [`FsBlobs`], the
//! filesystem backend, keeps a space as a directory and a blob as a file in it.
//!
//! **Architecture Invariant:** a key's space and name are checked by the caller
//! before they reach a backend (bundles check digests); [`FsBlobs`] still refuses
//! a name with a path separator or `..`, so no key names a file outside its root.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use novacron_common::files;

/// A blob's name: a space and a name in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobKey<'a> {
    /// The kind of data (a directory for [`FsBlobs`]).
    pub space: &'a str,
    /// The blob's name in its space.
    pub name: &'a str,
}

impl<'a> BlobKey<'a> {
    /// `space/name`.
    pub fn new(space: &'a str, name: &'a str) -> BlobKey<'a> {
        BlobKey { space, name }
    }
}

impl fmt::Display for BlobKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.space, self.name)
    }
}

/// Why [`BlobStore::write_at`] wrote nothing, or less than asked.
#[derive(Debug, thiserror::Error)]
pub enum BlobWriteError {
    /// The blob could not be opened or its length read.
    #[error("cannot open: {0}")]
    Open(io::Error),
    /// The write did not start at the blob's end.
    #[error("the blob has {have} bytes; a write must start there")]
    Offset {
        /// The blob's length.
        have: u64,
    },
    /// The write failed; the blob was cut back to `kept` bytes where that worked.
    #[error("{source}")]
    Write {
        /// The length the blob was cut back to (`None`: cutting back failed too).
        kept: Option<u64>,
        /// The write's error.
        source: io::Error,
    },
}

/// Blob storage. Methods block (call them off the async workers); each is one
/// step that either happens or reports an error.
pub trait BlobStore: Send + Sync + fmt::Debug {
    /// The length of blob `key`; `None` when there is none.
    fn len(&self, key: BlobKey<'_>) -> io::Result<Option<u64>>;
    /// Appends `data` to blob `key` (created empty when missing) at `offset`,
    /// which must be its current length. A failed write cuts the blob back to
    /// `offset`, so that the writer can resume there.
    fn write_at(&self, key: BlobKey<'_>, offset: u64, data: &[u8]) -> Result<(), BlobWriteError>;
    /// Replaces blob `key` with `data` at once: a reader sees the old or the new
    /// blob, never a part.
    fn put(&self, key: BlobKey<'_>, data: &[u8]) -> io::Result<()>;
    /// Blob `key` whole; refused (`InvalidData`) when longer than `max` bytes.
    fn read(&self, key: BlobKey<'_>, max: u64) -> io::Result<Vec<u8>>;
    /// A reader of blob `key`, from its start.
    fn open(&self, key: BlobKey<'_>) -> io::Result<Box<dyn Read + Send>>;
    /// Renames blob `from` to `to` at once (replacing `to`).
    fn rename(&self, from: BlobKey<'_>, to: BlobKey<'_>) -> io::Result<()>;
    /// Removes blob `key`; whether there was one.
    fn remove(&self, key: BlobKey<'_>) -> io::Result<bool>;
    /// The names of the blobs in `space`, in no order.
    fn list(&self, space: &str) -> io::Result<Vec<String>>;
    /// Where blob `key` is kept, for messages; for [`FsBlobs`] its file, which a
    /// server may stream from directly.
    fn locate(&self, key: BlobKey<'_>) -> PathBuf;
}

/// Blobs as files: `<root>/<space>/<name>`.
#[derive(Debug, Clone)]
pub struct FsBlobs {
    root: PathBuf,
}

impl FsBlobs {
    /// The store at `root`, creating the directories of `spaces`.
    pub fn open(root: &Path, spaces: &[&str]) -> io::Result<FsBlobs> {
        for space in spaces {
            std::fs::create_dir_all(root.join(space))?;
        }
        Ok(FsBlobs {
            root: root.to_path_buf(),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file(&self, key: BlobKey<'_>) -> io::Result<PathBuf> {
        let plain =
            |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains(['/', '\\', '\0']);
        if !plain(key.space) || !plain(key.name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("blob key {key} is not a plain name"),
            ));
        }
        Ok(self.root.join(key.space).join(key.name))
    }
}

impl BlobStore for FsBlobs {
    fn len(&self, key: BlobKey<'_>) -> io::Result<Option<u64>> {
        match std::fs::metadata(self.file(key)?) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_at(&self, key: BlobKey<'_>, offset: u64, data: &[u8]) -> Result<(), BlobWriteError> {
        let path = self.file(key).map_err(BlobWriteError::Open)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(BlobWriteError::Open)?;
        let have = file.metadata().map_err(BlobWriteError::Open)?.len();
        if have != offset {
            return Err(BlobWriteError::Offset { have });
        }
        let written = file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(data))
            .and_then(|()| file.flush());
        match written {
            Ok(()) => Ok(()),
            Err(source) => Err(BlobWriteError::Write {
                kept: file.set_len(offset).ok().map(|()| offset),
                source,
            }),
        }
    }

    fn put(&self, key: BlobKey<'_>, data: &[u8]) -> io::Result<()> {
        let text = std::str::from_utf8(data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        files::write_atomic(&self.file(key)?, text, 0o600)
    }

    fn read(&self, key: BlobKey<'_>, max: u64) -> io::Result<Vec<u8>> {
        let path = self.file(key)?;
        let len = std::fs::metadata(&path)?.len();
        if len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{len} bytes, over the {max} byte limit"),
            ));
        }
        std::fs::read(path)
    }

    fn open(&self, key: BlobKey<'_>) -> io::Result<Box<dyn Read + Send>> {
        Ok(Box::new(std::fs::File::open(self.file(key)?)?))
    }

    fn rename(&self, from: BlobKey<'_>, to: BlobKey<'_>) -> io::Result<()> {
        std::fs::rename(self.file(from)?, self.file(to)?)
    }

    fn remove(&self, key: BlobKey<'_>) -> io::Result<bool> {
        match std::fs::remove_file(self.file(key)?) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self, space: &str) -> io::Result<Vec<String>> {
        let dir = self.root.join(space);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn locate(&self, key: BlobKey<'_>) -> PathBuf {
        self.root.join(key.space).join(key.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_resume_at_the_end_and_nowhere_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = FsBlobs::open(dir.path(), &["partial"]).expect("open");
        let key = BlobKey::new("partial", "b1");
        assert_eq!(blobs.len(key).expect("len"), None);
        blobs.write_at(key, 0, b"hello ").expect("write");
        blobs.write_at(key, 6, b"world").expect("write");
        let err = blobs.write_at(key, 3, b"x").expect_err("not at the end");
        assert!(matches!(err, BlobWriteError::Offset { have: 11 }), "{err}");
        assert_eq!(blobs.read(key, 64).expect("read"), b"hello world");
        assert!(blobs.read(key, 4).is_err(), "over the limit");
        let mut text = String::new();
        blobs
            .open(key)
            .expect("open")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "hello world");
    }

    #[test]
    fn rename_put_list_and_remove() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = FsBlobs::open(dir.path(), &["a", "b"]).expect("open");
        blobs
            .write_at(BlobKey::new("a", "x"), 0, b"1")
            .expect("write");
        blobs
            .rename(BlobKey::new("a", "x"), BlobKey::new("b", "x"))
            .expect("rename");
        blobs.put(BlobKey::new("b", "x.json"), b"{}").expect("put");
        let mut names = blobs.list("b").expect("list");
        names.sort();
        assert_eq!(names, ["x", "x.json"]);
        assert!(blobs.list("a").expect("list").is_empty());
        assert!(blobs.remove(BlobKey::new("b", "x")).expect("remove"));
        assert!(!blobs.remove(BlobKey::new("b", "x")).expect("remove"));
        assert_eq!(
            blobs.locate(BlobKey::new("b", "x.json")),
            dir.path().join("b").join("x.json")
        );
    }

    #[test]
    fn a_key_cannot_name_a_file_outside_the_root() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = FsBlobs::open(&dir.path().join("root"), &["a"]).expect("open");
        for (space, name) in [
            ("a", "../x"),
            ("..", "x"),
            ("a", ""),
            ("a/b", "x"),
            ("a", ".."),
        ] {
            let key = BlobKey::new(space, name);
            assert!(blobs.len(key).is_err(), "{key}");
            assert!(blobs.write_at(key, 0, b"x").is_err(), "{key}");
        }
    }
}
