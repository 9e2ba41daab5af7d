//! Segment files: append-only records of serialized chunks.
//!
//! A record is `len u32 | crc32 u32 | payload` (little-endian; the CRC covers
//! the payload). A crash can tear only the last record: opening a segment
//! truncates a tail that does not hold a whole record whose CRC matches. A
//! corrupt record inside the file (its length fits but its CRC does not) is
//! skipped with a logged error.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, warn};

use crate::chunk::{self, Chunk};

/// The largest record read back; a larger length is corruption.
pub const MAX_RECORD: u32 = 64 << 20;
/// A record header's bytes: length and CRC-32, little-endian.
pub const RECORD_HEADER: u64 = 8;

/// Where one chunk lies in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// The record's payload offset.
    pub offset: u64,
    /// The payload's length.
    pub len: u32,
    /// The payload's CRC-32, as its record header holds it (kept here so a
    /// read is one `pread` of the payload).
    pub crc: u32,
    /// The chunk's earliest point.
    pub t_min: i64,
    /// Its latest point.
    pub t_max: i64,
}

/// An open segment file and the index of its chunks by source.
#[derive(Debug)]
pub struct Segment {
    path: PathBuf,
    file: File,
    len: u64,
    /// Chunks by source (sorted, so that a query finds the sources under a
    /// prefix without walking them all), in file order.
    pub index: BTreeMap<Arc<str>, Vec<Loc>>,
    /// The earliest point of any chunk (`i64::MAX` when empty).
    pub t_min: i64,
    /// The latest point of any chunk.
    pub t_max: i64,
    /// Values the chunks hold.
    pub values: u64,
    /// When set, a chunk of a source with the same first time replaces the
    /// earlier one (the 1-hour tier, where a repeated rollup is rewritten).
    replace: bool,
    /// The first record's header (length and CRC, as one little-endian
    /// `u64`); 0 while the file holds no record. It tells two copies of a
    /// file apart without reading them (a compacted file starts differently).
    first: u64,
}

/// What opening a segment found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    /// Records skipped as corrupt.
    pub corrupt: u64,
    /// Bytes cut off a torn tail.
    pub truncated: u64,
}

/// What reading a chunk back hit.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The bytes are not the chunk written.
    #[error("{path} at {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// The record's offset.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

/// Why [`Segment::records_after`] sent nothing.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    /// The copy is not a prefix of this file: fetch the file whole.
    #[error("the copy diverged: {0}")]
    Diverged(String),
    /// Reading failed.
    #[error("{0}")]
    Io(io::Error),
}

/// A record header's length and CRC as one word (the file's first 8 bytes).
pub fn header_word(len: u32, crc: u32) -> u64 {
    u64::from(len) | (u64::from(crc) << 32)
}

/// A record header's length and CRC (`head` holds at least its 8 bytes).
pub fn split_header(head: &[u8]) -> (u32, u32) {
    (
        u32::from_le_bytes([head[0], head[1], head[2], head[3]]),
        u32::from_le_bytes([head[4], head[5], head[6], head[7]]),
    )
}

/// The length of the whole records at the start of `buf` (framing only).
pub fn whole_records(buf: &[u8]) -> usize {
    let mut pos = 0usize;
    while pos + RECORD_HEADER as usize <= buf.len() {
        let (len, _) = split_header(&buf[pos..]);
        if len == 0 || len > MAX_RECORD {
            break;
        }
        let end = pos + RECORD_HEADER as usize + len as usize;
        if end > buf.len() {
            break;
        }
        pos = end;
    }
    pos
}

/// The records of `buf`: each one's start and CRC, checked against its
/// payload; an error names the first that is cut or does not match.
pub fn check_records(buf: &[u8]) -> Result<Vec<(usize, u32)>, String> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < buf.len() {
        if pos + RECORD_HEADER as usize > buf.len() {
            return Err(format!("a record header cut at byte {pos}"));
        }
        let (len, crc) = split_header(&buf[pos..]);
        if len == 0 || len > MAX_RECORD {
            return Err(format!("a record of {len} bytes at byte {pos}"));
        }
        let body = pos + RECORD_HEADER as usize;
        let end = body + len as usize;
        if end > buf.len() {
            return Err(format!("the record at byte {pos} is cut"));
        }
        if crc32fast::hash(&buf[body..end]) != crc {
            return Err(format!("the record at byte {pos} fails its checksum"));
        }
        out.push((pos, crc));
        pos = end;
    }
    Ok(out)
}

/// The segment files in `dir` (`<start>.seg`) by their start, deleting the
/// unfinished files a crash left (`.tmp`: a rollup, a compaction or a copy
/// fetched whole, each redone later).
pub fn list(dir: &Path) -> io::Result<Vec<(i64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.ends_with(".tmp") {
            warn!(file = %path.display(), "metrics history: removing an unfinished file");
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if let Some(start) = name
            .strip_suffix(".seg")
            .and_then(|s| s.parse::<i64>().ok())
        {
            out.push((start, path));
        }
    }
    Ok(out)
}

impl Segment {
    /// Opens (or creates) the segment at `path`, indexing its records and
    /// cutting a torn tail.
    pub fn open(path: &Path, replace: bool) -> io::Result<(Segment, Scan)> {
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)?;
        let file_len = file.metadata()?.len();
        let mut seg = Segment {
            path: path.to_owned(),
            file,
            len: 0,
            index: BTreeMap::new(),
            t_min: i64::MAX,
            t_max: i64::MIN,
            values: 0,
            replace,
            first: 0,
        };
        let mut scan = Scan::default();
        let mut reader = BufReader::with_capacity(1 << 20, seg.file.try_clone()?);
        let mut pos = 0u64;
        let mut payload = Vec::new();
        loop {
            let mut head = [0u8; RECORD_HEADER as usize];
            if pos + RECORD_HEADER > file_len || reader.read_exact(&mut head).is_err() {
                break;
            }
            let (len, crc) = split_header(&head);
            let end = pos + RECORD_HEADER + u64::from(len);
            // A zero length is a zero-filled tail (power loss), not a record.
            if len == 0 || len > MAX_RECORD || end > file_len {
                break;
            }
            if pos == 0 {
                seg.first = header_word(len, crc);
            }
            payload.resize(len as usize, 0);
            if reader.read_exact(&mut payload).is_err() {
                break;
            }
            if crc32fast::hash(&payload) != crc {
                error!(file = %path.display(), offset = pos, "metrics history: skipping a corrupt chunk (checksum mismatch)");
                scan.corrupt += 1;
            } else {
                match chunk::read_header(&payload) {
                    Ok(h) => seg.add(
                        Arc::from(h.source.as_str()),
                        Loc {
                            offset: pos + RECORD_HEADER,
                            len,
                            crc,
                            t_min: h.t_min,
                            t_max: h.t_max,
                        },
                        u64::from(h.count) * h.columns.len() as u64,
                    ),
                    Err(e) => {
                        error!(file = %path.display(), offset = pos, error = %e, "metrics history: skipping a corrupt chunk");
                        scan.corrupt += 1;
                    }
                }
            }
            pos = end;
        }
        if pos < file_len {
            warn!(file = %path.display(), kept = pos, cut = file_len - pos, "metrics history: cutting a torn write at the end of a segment");
            seg.file.set_len(pos)?;
            scan.truncated = file_len - pos;
        }
        seg.len = pos;
        Ok((seg, scan))
    }

    fn add(&mut self, source: Arc<str>, loc: Loc, values: u64) {
        let locs = self.index.entry(source).or_default();
        if self.replace
            && let Some(old) = locs.iter_mut().find(|l| l.t_min == loc.t_min)
        {
            *old = loc;
            return;
        }
        locs.push(loc);
        self.t_min = self.t_min.min(loc.t_min);
        self.t_max = self.t_max.max(loc.t_max);
        self.values += values;
    }

    /// Appends `chunk` and indexes it under `source` (the caller's interned key).
    pub fn append(&mut self, chunk: &Chunk, source: Arc<str>) -> io::Result<()> {
        self.append_payload(
            &chunk.encode(),
            source,
            chunk.t_min,
            chunk.t_max,
            chunk.values(),
        )
    }

    /// Appends an encoded chunk and indexes it.
    pub fn append_payload(
        &mut self,
        payload: &[u8],
        source: Arc<str>,
        t_min: i64,
        t_max: i64,
        values: u64,
    ) -> io::Result<()> {
        let crc = crc32fast::hash(payload);
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_RECORD)
            .ok_or_else(|| io::Error::other("chunk too large for a record"))?;
        let mut rec = Vec::with_capacity(payload.len() + RECORD_HEADER as usize);
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&crc.to_le_bytes());
        rec.extend_from_slice(payload);
        if let Err(e) = self.file.write_all(&rec) {
            // Cut what part of the record reached the file, so the next append
            // does not follow garbage.
            let _ = self.file.set_len(self.len);
            return Err(e);
        }
        if self.len == 0 {
            self.first = header_word(len, crc);
        }
        let loc = Loc {
            offset: self.len + RECORD_HEADER,
            len,
            crc,
            t_min,
            t_max,
        };
        self.len += rec.len() as u64;
        self.add(source, loc, values);
        Ok(())
    }

    /// The payloads of the records from byte `offset` (a record boundary this
    /// segment reached earlier, [`Segment::bytes`]) to its end, CRC-checked;
    /// a corrupt one is skipped and counted in the second value.
    pub fn records_from(&self, offset: u64) -> io::Result<(Vec<Vec<u8>>, u64)> {
        let mut out = Vec::new();
        let mut corrupt = 0;
        let mut pos = offset;
        while pos + RECORD_HEADER <= self.len {
            let mut head = [0u8; RECORD_HEADER as usize];
            self.file.read_exact_at(&mut head, pos)?;
            let (len, crc) = split_header(&head);
            let end = pos + RECORD_HEADER + u64::from(len);
            if len > MAX_RECORD || end > self.len {
                return Err(io::Error::other(format!(
                    "{}: no record at {pos}",
                    self.path.display()
                )));
            }
            let mut payload = vec![0u8; len as usize];
            self.file.read_exact_at(&mut payload, pos + RECORD_HEADER)?;
            if crc32fast::hash(&payload) == crc {
                out.push(payload);
            } else {
                corrupt += 1;
            }
            pos = end;
        }
        Ok((out, corrupt))
    }

    /// Renames its file to `to` (replacing what is there); it stays open.
    pub fn rename(&mut self, to: &Path) -> io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.path = to.to_owned();
        Ok(())
    }

    /// Reads the chunk at `loc`, checking its CRC (the one its record header
    /// had when the index was built).
    pub fn read(&self, loc: Loc) -> Result<Vec<u8>, ReadError> {
        let path = || self.path.display().to_string();
        let mut payload = vec![0u8; loc.len as usize];
        self.file
            .read_exact_at(&mut payload, loc.offset)
            .map_err(|source| ReadError::Io {
                path: path(),
                source,
            })?;
        if crc32fast::hash(&payload) != loc.crc {
            return Err(ReadError::Corrupt {
                path: path(),
                offset: loc.offset,
                reason: "checksum mismatch".into(),
            });
        }
        Ok(payload)
    }

    /// Forces what was appended to disk.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// The file's length.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// The first record's header as one word (0: no record yet).
    pub fn first(&self) -> u64 {
        self.first
    }

    /// Whole records from byte `offset` (where a copy of this file ends), at
    /// most `max` bytes of them but at least one record when there is one.
    /// `last` is where the copy's last record starts and its CRC: that record
    /// must be this file's too, ending at `offset`, or the copy has diverged.
    pub fn records_after(
        &self,
        offset: u64,
        last: Option<(u64, u32)>,
        max: u64,
    ) -> Result<Vec<u8>, RangeError> {
        if offset > self.len {
            return Err(RangeError::Diverged(format!(
                "the copy has {offset} bytes, the file {}",
                self.len
            )));
        }
        if offset > 0 {
            let (at, crc) = last.ok_or_else(|| {
                RangeError::Diverged("a copy that is not empty must name its last record".into())
            })?;
            let mut head = [0u8; RECORD_HEADER as usize];
            if at + RECORD_HEADER > offset {
                return Err(RangeError::Diverged(format!(
                    "no record at {at} can end at {offset}"
                )));
            }
            self.file
                .read_exact_at(&mut head, at)
                .map_err(RangeError::Io)?;
            let (len, have) = split_header(&head);
            if at + RECORD_HEADER + u64::from(len) != offset || have != crc {
                return Err(RangeError::Diverged(format!(
                    "the record at {at} is not the copy's last one"
                )));
            }
        }
        if offset == self.len {
            return Ok(Vec::new());
        }
        let want = (self.len - offset).min(max.max(RECORD_HEADER));
        let mut buf = vec![0u8; want as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(RangeError::Io)?;
        let whole = whole_records(&buf);
        if whole > 0 {
            buf.truncate(whole);
            return Ok(buf);
        }
        // The first record alone is larger than `max`: send it whole.
        let (len, _) = split_header(&buf);
        let end = offset + RECORD_HEADER + u64::from(len);
        if len == 0 || len > MAX_RECORD || end > self.len {
            return Err(RangeError::Io(io::Error::other(format!(
                "{}: no record at {offset}",
                self.path.display()
            ))));
        }
        let mut rec = vec![0u8; (end - offset) as usize];
        self.file
            .read_exact_at(&mut rec, offset)
            .map_err(RangeError::Io)?;
        Ok(rec)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
