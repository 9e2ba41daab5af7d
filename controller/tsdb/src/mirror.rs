//! A copy of another history's files, kept by a follower of a controller
//! group so that it holds the history when it takes over.
//!
//! A history only ever appends whole records to a segment file, or replaces
//! the file at once (a compacted raw hour, a rollup written aside and
//! renamed), and a file is named by its tier and the start of its span. So a
//! copy follows each file by appending the records it lacks (checked by their
//! CRCs, and only after the source confirmed that the copy's last record is
//! its own), and fetches a file whole, beside the copy and renamed when
//! complete, when the copy has diverged (the file was replaced, or the source
//! is a new leader whose file ends elsewhere). [`plan`] decides from the two
//! listings; [`Mirror`] holds the copies and applies the writes.
//!
//! The copy lags by what the source has not yet written (its open chunks)
//! and by the follower's polling interval.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use tracing::warn;

use crate::segment::{self, MAX_RECORD, RECORD_HEADER, header_word};
use crate::{FileInfo, Tier};

/// A file's place: its tier and the start of its span.
pub type FileKey = (Tier, i64);

/// What a copy of one file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Copied {
    /// Bytes: whole records only.
    pub len: u64,
    /// The first record's header as one word (0: empty).
    pub first: u64,
    /// Where the last record starts, and its CRC (`None`: empty).
    pub last: Option<(u64, u32)>,
}

/// One thing to do for the copy to match the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Fetch the records after the copy's end (up to the source's listed
    /// length) and append them.
    Append {
        /// The file.
        key: FileKey,
        /// The copy as it is.
        copy: Copied,
        /// The source's length when listed.
        to: u64,
    },
    /// Fetch the file whole (the copy is missing or has diverged).
    Whole {
        /// The file.
        key: FileKey,
        /// The source's length when listed.
        to: u64,
    },
    /// Delete the copy: the source no longer has the file (retention).
    Remove {
        /// The file.
        key: FileKey,
    },
}

/// The steps that bring `copies` to `source`: removals first, then fetches,
/// the newest span first (after a failover, recent history matters most).
pub fn plan(copies: &BTreeMap<FileKey, Copied>, source: &[FileInfo]) -> Vec<Step> {
    let listed: BTreeMap<FileKey, &FileInfo> =
        source.iter().map(|f| ((f.tier, f.start), f)).collect();
    let mut steps: Vec<Step> = copies
        .keys()
        .filter(|k| !listed.contains_key(k))
        .map(|&key| Step::Remove { key })
        .collect();
    let mut fetches: Vec<Step> = Vec::new();
    for (&key, f) in &listed {
        match copies.get(&key) {
            None if f.len == 0 => {}
            None => fetches.push(Step::Whole { key, to: f.len }),
            Some(c) if c.first != f.first || c.len > f.len => {
                fetches.push(Step::Whole { key, to: f.len })
            }
            Some(c) if c.len < f.len => fetches.push(Step::Append {
                key,
                copy: *c,
                to: f.len,
            }),
            Some(_) => {}
        }
    }
    fetches.sort_by_key(|s| match s {
        Step::Append { key, .. } | Step::Whole { key, .. } | Step::Remove { key } => {
            (std::cmp::Reverse(key.1), key.0)
        }
    });
    steps.extend(fetches);
    steps
}

/// Why the copy refused a write.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The bytes are not whole, intact records: nothing was written.
    #[error("the source sent bad records: {0}")]
    Bad(String),
    /// The write does not continue the copy.
    #[error("the write starts at {at}, the copy ends at {len}")]
    OutOfStep {
        /// Where the write starts.
        at: u64,
        /// Where the copy ends.
        len: u64,
    },
    /// The disk refused it.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Why a fetch from the source sent nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The copy is not a prefix of the source's file: fetch it whole.
    #[error("the copy diverged from the source")]
    Diverged,
    /// The source no longer has the file.
    #[error("the source no longer has the file")]
    Missing,
    /// Anything else (the network, the source's disk); the round stops.
    #[error("{0}")]
    Failed(String),
}

/// Fetches whole records of a source's file: `(file, offset, the copy's last
/// record)` → bytes (empty when there are none after `offset`).
pub type Fetch<'a> =
    dyn FnMut(FileKey, u64, Option<(u64, u32)>) -> Result<Vec<u8>, FetchError> + 'a;

/// What a [`Mirror::sync`] round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Synced {
    /// Bytes written to copies.
    pub bytes: u64,
    /// Files fetched whole.
    pub whole: u64,
    /// Copies deleted.
    pub removed: u64,
    /// Whether `stop` ended the round early.
    pub stopped: bool,
}

/// The copies under a history directory (`raw/`, `1m/`, `1h/`, as
/// [`crate::History::open`] reads them).
#[derive(Debug)]
pub struct Mirror {
    dir: PathBuf,
    copies: BTreeMap<FileKey, Copied>,
    /// A file being fetched whole, into `<start>.mirror.tmp`.
    partial: Option<(FileKey, Copied)>,
}

fn tier_dir(dir: &Path, tier: Tier) -> PathBuf {
    dir.join(tier.name())
}

fn seg_path(dir: &Path, (tier, start): FileKey) -> PathBuf {
    tier_dir(dir, tier).join(format!("{start}.seg"))
}

fn tmp_path(dir: &Path, (tier, start): FileKey) -> PathBuf {
    tier_dir(dir, tier).join(format!("{start}.mirror.tmp"))
}

/// Reads a file's record headers: what it holds whole. A torn tail is cut.
fn scan(path: &Path) -> io::Result<Copied> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 16, file.try_clone()?);
    let mut c = Copied::default();
    let mut pos = 0u64;
    loop {
        let mut head = [0u8; RECORD_HEADER as usize];
        if pos + RECORD_HEADER > file_len || reader.read_exact(&mut head).is_err() {
            break;
        }
        let (len, crc) = segment::split_header(&head);
        let end = pos + RECORD_HEADER + u64::from(len);
        if len == 0 || len > MAX_RECORD || end > file_len {
            break;
        }
        if pos == 0 {
            c.first = header_word(len, crc);
        }
        c.last = Some((pos, crc));
        reader.seek_relative(i64::from(len))?;
        pos = end;
    }
    if pos < file_len {
        warn!(file = %path.display(), kept = pos, cut = file_len - pos, "history copy: cutting a torn write");
        file.set_len(pos)?;
    }
    c.len = pos;
    Ok(c)
}

impl Mirror {
    /// The copies in `dir`, read from their files (a torn tail is cut, an
    /// unfinished whole fetch deleted).
    pub fn open(dir: &Path) -> io::Result<Mirror> {
        let mut copies = BTreeMap::new();
        for tier in Tier::ALL {
            let tdir = tier_dir(dir, tier);
            std::fs::create_dir_all(&tdir)?;
            for (start, path) in segment::list(&tdir)? {
                copies.insert((tier, start), scan(&path)?);
            }
        }
        Ok(Mirror {
            dir: dir.to_owned(),
            copies,
            partial: None,
        })
    }

    /// The copies.
    pub fn copies(&self) -> &BTreeMap<FileKey, Copied> {
        &self.copies
    }

    /// The steps toward `source` ([`plan`]).
    pub fn plan(&self, source: &[FileInfo]) -> Vec<Step> {
        plan(&self.copies, source)
    }

    /// Appends `bytes` (whole records, checked) to the copy of `key` at
    /// `at`, its end; with `whole`, to the file being fetched whole instead
    /// (`at` 0 starts it afresh). Returns the copy as it now is.
    pub fn write(
        &mut self,
        key: FileKey,
        whole: bool,
        at: u64,
        bytes: &[u8],
    ) -> Result<Copied, MirrorError> {
        let records = segment::check_records(bytes).map_err(MirrorError::Bad)?;
        let (path, mut copy) = if whole {
            if at == 0 {
                let _ = std::fs::remove_file(tmp_path(&self.dir, key));
                self.partial = Some((key, Copied::default()));
            }
            match self.partial {
                Some((k, c)) if k == key => (tmp_path(&self.dir, key), c),
                _ => return Err(MirrorError::OutOfStep { at, len: 0 }),
            }
        } else {
            let copy = self.copies.get(&key).copied().unwrap_or_default();
            (seg_path(&self.dir, key), copy)
        };
        if at != copy.len {
            return Err(MirrorError::OutOfStep { at, len: copy.len });
        }
        if bytes.is_empty() {
            return Ok(copy);
        }
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        if let Err(e) = file.write_all(bytes) {
            let _ = file.set_len(copy.len);
            return Err(e.into());
        }
        if copy.len == 0 {
            let (len, crc) = segment::split_header(bytes);
            copy.first = header_word(len, crc);
        }
        if let Some(&(pos, crc)) = records.last() {
            copy.last = Some((copy.len + pos as u64, crc));
        }
        copy.len += bytes.len() as u64;
        if whole {
            self.partial = Some((key, copy));
        } else {
            self.copies.insert(key, copy);
        }
        Ok(copy)
    }

    /// Puts the file fetched whole in place of the copy of `key`.
    pub fn finish(&mut self, key: FileKey) -> io::Result<()> {
        let Some((k, copy)) = self.partial.take() else {
            return Err(io::Error::other("no file is being fetched whole"));
        };
        if k != key {
            return Err(io::Error::other("another file is being fetched whole"));
        }
        let tmp = tmp_path(&self.dir, key);
        if copy.len == 0 {
            File::create(&tmp)?;
        }
        std::fs::rename(&tmp, seg_path(&self.dir, key))?;
        self.copies.insert(key, copy);
        Ok(())
    }

    /// Drops a file being fetched whole.
    pub fn abandon(&mut self) {
        if let Some((key, _)) = self.partial.take() {
            let _ = std::fs::remove_file(tmp_path(&self.dir, key));
        }
    }

    /// One round toward `source` (a listing of its files): applies
    /// [`plan`]'s steps through `fetch`, checking `stop` between fetches. A
    /// copy that diverged is fetched whole; a failed fetch ends the round
    /// (the copies stay consistent: each write is whole records).
    pub fn sync(
        &mut self,
        source: &[FileInfo],
        fetch: &mut Fetch<'_>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Synced, FetchError> {
        let mut done = Synced::default();
        for step in self.plan(source) {
            if stop() {
                done.stopped = true;
                break;
            }
            let fetched = match step {
                Step::Remove { key } => {
                    self.remove(key)
                        .map_err(|e| FetchError::Failed(e.to_string()))?;
                    done.removed += 1;
                    continue;
                }
                Step::Append { key, copy, to } => match self.follow(key, copy, to, fetch, stop) {
                    Err(FetchError::Diverged) => self.fetch_whole(key, to, fetch, stop, &mut done),
                    other => other,
                },
                Step::Whole { key, to } => self.fetch_whole(key, to, fetch, stop, &mut done),
            };
            match fetched {
                Ok(n) => done.bytes += n,
                // Gone since the listing: the next round removes the copy.
                Err(FetchError::Missing) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn follow(
        &mut self,
        key: FileKey,
        mut copy: Copied,
        to: u64,
        fetch: &mut Fetch<'_>,
        stop: &dyn Fn() -> bool,
    ) -> Result<u64, FetchError> {
        let mut got = 0;
        while copy.len < to && !stop() {
            let bytes = fetch(key, copy.len, copy.last)?;
            if bytes.is_empty() {
                break;
            }
            copy = self
                .write(key, false, copy.len, &bytes)
                .map_err(|e| FetchError::Failed(e.to_string()))?;
            got += bytes.len() as u64;
        }
        Ok(got)
    }

    fn fetch_whole(
        &mut self,
        key: FileKey,
        to: u64,
        fetch: &mut Fetch<'_>,
        stop: &dyn Fn() -> bool,
        done: &mut Synced,
    ) -> Result<u64, FetchError> {
        let fail = |e: MirrorError| FetchError::Failed(e.to_string());
        let mut copy = self.write(key, true, 0, &[]).map_err(fail)?;
        let mut got = 0;
        while copy.len < to {
            if stop() {
                self.abandon();
                return Ok(got);
            }
            let bytes = match fetch(key, copy.len, copy.last) {
                Ok(b) => b,
                Err(e) => {
                    self.abandon();
                    return Err(e);
                }
            };
            if bytes.is_empty() {
                break;
            }
            copy = match self.write(key, true, copy.len, &bytes) {
                Ok(c) => c,
                Err(e) => {
                    self.abandon();
                    return Err(fail(e));
                }
            };
            got += bytes.len() as u64;
        }
        self.finish(key)
            .map_err(|e| FetchError::Failed(e.to_string()))?;
        done.whole += 1;
        Ok(got)
    }

    /// Deletes the copy of `key`.
    pub fn remove(&mut self, key: FileKey) -> io::Result<()> {
        self.copies.remove(&key);
        match std::fs::remove_file(seg_path(&self.dir, key)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
