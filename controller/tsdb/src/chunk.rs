//! Chunks: one source's points over a stretch of time, one column per series.
//!
//! A *raw* chunk holds the points as sampled. A *rollup* chunk holds, per
//! column and per interval (a minute or an hour), five sub-columns: min, max
//! and last in the column's encoding, the mean as a float and the count.
//!
//! Serialized (the payload of a segment record, little-endian):
//! `version u8 | kind u8 | source str16 | t_min i64 | t_max i64 | count u32 |
//! columns u16 | per column: metric str16, label str16, encoding u8, scale f64 |
//! time: bits u64, len u32, bytes | per (sub-)column: bits u64, len u32, bytes`.

use std::sync::Arc;

use crate::codec::{self, Encoding, TimeEncoder, ValueEncoder};

const VERSION: u8 = 1;

/// Whether a chunk holds samples or rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Points as sampled.
    Raw,
    /// Per interval: min, max, last, mean, count.
    Rollup,
}

/// The sub-columns of a rollup column, in their stored order.
pub const ROLLUP_PARTS: usize = 5;

/// One series of a source: a metric and the value of its own label (a disk's
/// mount, an interface; empty when the metric has none).
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    /// The metric's name.
    pub metric: String,
    /// The label value.
    pub label: String,
    /// How values are stored.
    pub encoding: Encoding,
}

/// A column as a caller names it for one point, without allocating.
#[derive(Debug, Clone, Copy)]
pub struct ColumnRef<'a> {
    /// The metric's name.
    pub metric: &'a str,
    /// The label value ("" for none).
    pub label: &'a str,
    /// How values are stored.
    pub encoding: Encoding,
}

impl ColumnRef<'_> {
    fn is(&self, c: &Column) -> bool {
        self.metric == c.metric && self.label == c.label && self.encoding == c.encoding
    }

    fn owned(&self) -> Column {
        Column {
            metric: self.metric.to_owned(),
            label: self.label.to_owned(),
            encoding: self.encoding,
        }
    }
}

impl Column {
    /// The column as [`OpenChunk`] takes it.
    pub fn borrowed(&self) -> ColumnRef<'_> {
        ColumnRef {
            metric: &self.metric,
            label: &self.label,
            encoding: self.encoding,
        }
    }
}

/// One raw chunk holding every point of `parts` (the decoded raw chunks of one
/// source, in file order): the union of their columns, each point once (a
/// time written twice keeps the later chunk's value), a column a chunk lacks
/// stored as NaN (no value) at that chunk's times. `None` when no point is
/// left. Compaction joins an hour's chunks of a source with it.
pub fn merge_raw(source: Arc<str>, parts: &[(Header, Vec<ColumnPoints>)]) -> Option<Chunk> {
    let mut columns: Vec<Column> = Vec::new();
    let mut points: Vec<Vec<(i64, f64)>> = Vec::new();
    for (h, cols) in parts {
        if h.kind != Kind::Raw {
            continue;
        }
        for (col, pts) in h.columns.iter().zip(cols) {
            let ColumnPoints::Raw(pts) = pts else {
                continue;
            };
            let i = match columns.iter().position(|c| c == col) {
                Some(i) => i,
                None => {
                    columns.push(col.clone());
                    points.push(Vec::new());
                    columns.len() - 1
                }
            };
            points[i].extend_from_slice(pts);
        }
    }
    let mut times: Vec<i64> = Vec::new();
    for pts in &mut points {
        // Stable: of two points at one time, the later chunk's comes last.
        pts.sort_by_key(|p| p.0);
        let mut kept: Vec<(i64, f64)> = Vec::with_capacity(pts.len());
        for p in pts.drain(..) {
            match kept.last_mut() {
                Some(last) if last.0 == p.0 => *last = p,
                _ => kept.push(p),
            }
        }
        times.extend(kept.iter().map(|p| p.0));
        *pts = kept;
    }
    times.sort_unstable();
    times.dedup();
    let first = *times.first()?;
    let refs: Vec<ColumnRef<'_>> = columns.iter().map(Column::borrowed).collect();
    let mut open = OpenChunk::new(source, &refs, first);
    let mut at = vec![0usize; points.len()];
    let mut row = vec![f64::NAN; points.len()];
    for t in times {
        for (i, pts) in points.iter().enumerate() {
            row[i] = match pts.get(at[i]) {
                Some(&(pt, v)) if pt == t => {
                    at[i] += 1;
                    v
                }
                _ => f64::NAN,
            };
        }
        open.push(t, &row);
    }
    Some(open.close())
}

/// An encoded column: its bits and how many of them count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bits {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// The bits that count.
    pub bits: u64,
}

/// A closed, immutable chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Raw or rollup.
    pub kind: Kind,
    /// The source's key.
    pub source: Arc<str>,
    /// The earliest point.
    pub t_min: i64,
    /// The latest point.
    pub t_max: i64,
    /// Points.
    pub count: u32,
    /// The columns.
    pub columns: Vec<Column>,
    /// The timestamps.
    pub times: Bits,
    /// The values: one per column (raw) or [`ROLLUP_PARTS`] per column.
    pub values: Vec<Bits>,
}

/// What a chunk could not be read as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt chunk: {0}")]
pub struct Corrupt(pub &'static str);

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Corrupt> {
        let end = self.pos.checked_add(n).ok_or(Corrupt("length overflow"))?;
        let s = self.buf.get(self.pos..end).ok_or(Corrupt("ends early"))?;
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Corrupt> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, Corrupt> {
        let b: [u8; 4] = self.take(4)?.try_into().map_err(|_| Corrupt("u32"))?;
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, Corrupt> {
        let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| Corrupt("u64"))?;
        Ok(u64::from_le_bytes(b))
    }
    fn str(&mut self) -> Result<&'a str, Corrupt> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| Corrupt("text is not UTF-8"))
    }
    fn bits(&mut self) -> Result<(u64, &'a [u8]), Corrupt> {
        let bits = self.u64()?;
        let len = self.u32()? as usize;
        if bits > len as u64 * 8 {
            return Err(Corrupt("more bits than bytes"));
        }
        Ok((bits, self.take(len)?))
    }
    fn skip_bits(&mut self) -> Result<(), Corrupt> {
        self.u64()?;
        let len = self.u32()? as usize;
        self.take(len).map(|_| ())
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

fn put_bits(out: &mut Vec<u8>, b: &Bits) {
    out.extend_from_slice(&b.bits.to_le_bytes());
    out.extend_from_slice(&(b.bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&b.bytes);
}

/// A chunk's header: what it holds, without its points.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Raw or rollup.
    pub kind: Kind,
    /// The source.
    pub source: String,
    /// The earliest point.
    pub t_min: i64,
    /// The latest point.
    pub t_max: i64,
    /// Points.
    pub count: u32,
    /// The columns.
    pub columns: Vec<Column>,
}

/// The points of one column of a chunk.
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnPoints {
    /// `(time, value)`, as stored (readers sort).
    Raw(Vec<(i64, f64)>),
    /// `(interval start, min, max, last, mean, count)`.
    Rollup(Vec<RollupPoint>),
}

/// One interval of a rollup column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RollupPoint {
    /// The interval's start.
    pub t: i64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// The newest value.
    pub last: f64,
    /// The mean.
    pub mean: f64,
    /// How many points.
    pub count: f64,
}

impl Chunk {
    /// The encoded bytes this chunk takes.
    pub fn encoded_bytes(&self) -> usize {
        self.times.bytes.len() + self.values.iter().map(|b| b.bytes.len()).sum::<usize>()
    }

    /// Values it holds (points × columns; rollups count one per interval).
    pub fn values(&self) -> u64 {
        u64::from(self.count) * self.columns.len() as u64
    }

    /// Serializes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.encoded_bytes() + 32 * self.columns.len());
        out.push(VERSION);
        out.push(match self.kind {
            Kind::Raw => 0,
            Kind::Rollup => 1,
        });
        put_str(&mut out, &self.source);
        out.extend_from_slice(&self.t_min.to_le_bytes());
        out.extend_from_slice(&self.t_max.to_le_bytes());
        out.extend_from_slice(&self.count.to_le_bytes());
        out.extend_from_slice(&(self.columns.len() as u16).to_le_bytes());
        for c in &self.columns {
            put_str(&mut out, &c.metric);
            put_str(&mut out, &c.label);
            match c.encoding {
                Encoding::Int { scale } => {
                    out.push(0);
                    out.extend_from_slice(&scale.to_le_bytes());
                }
                Encoding::Float => {
                    out.push(1);
                    out.extend_from_slice(&0f64.to_le_bytes());
                }
            }
        }
        put_bits(&mut out, &self.times);
        for v in &self.values {
            put_bits(&mut out, v);
        }
        out
    }
}

fn parts(kind: Kind) -> usize {
    match kind {
        Kind::Raw => 1,
        Kind::Rollup => ROLLUP_PARTS,
    }
}

/// A chunk's header as it lies in the buffer (nothing allocated per column).
struct View<'a> {
    kind: Kind,
    source: &'a str,
    t_min: i64,
    t_max: i64,
    count: u32,
    /// Each column's metric, label and encoding.
    columns: Vec<(&'a str, &'a str, Encoding)>,
}

fn view<'a>(c: &mut Cursor<'a>) -> Result<View<'a>, Corrupt> {
    if c.u8()? != VERSION {
        return Err(Corrupt("unknown version"));
    }
    let kind = match c.u8()? {
        0 => Kind::Raw,
        1 => Kind::Rollup,
        _ => return Err(Corrupt("unknown kind")),
    };
    let source = c.str()?;
    let t_min = c.u64()? as i64;
    let t_max = c.u64()? as i64;
    let count = c.u32()?;
    let n = c.u16()? as usize;
    let mut columns = Vec::with_capacity(n);
    for _ in 0..n {
        let metric = c.str()?;
        let label = c.str()?;
        let enc = c.u8()?;
        let scale = f64::from_bits(c.u64()?);
        let encoding = match enc {
            0 if scale.is_finite() && scale > 0.0 => Encoding::Int { scale },
            1 => Encoding::Float,
            _ => return Err(Corrupt("bad column encoding")),
        };
        columns.push((metric, label, encoding));
    }
    Ok(View {
        kind,
        source,
        t_min,
        t_max,
        count,
        columns,
    })
}

impl View<'_> {
    fn owned(&self) -> Header {
        Header {
            kind: self.kind,
            source: self.source.to_owned(),
            t_min: self.t_min,
            t_max: self.t_max,
            count: self.count,
            columns: self
                .columns
                .iter()
                .map(|(metric, label, encoding)| Column {
                    metric: (*metric).to_owned(),
                    label: (*label).to_owned(),
                    encoding: *encoding,
                })
                .collect(),
        }
    }
}

/// Decodes the columns (by index) `pick` selects, skipping the others' bits
/// without decoding them; `c` stands after the header.
fn decode_picked(
    c: &mut Cursor<'_>,
    v: &View<'_>,
    pick: impl Fn(usize) -> bool,
) -> Result<Vec<(usize, ColumnPoints)>, Corrupt> {
    let (tbits, tbytes) = c.bits()?;
    let mut out = Vec::new();
    let mut times: Option<Vec<i64>> = None;
    for (i, (_, _, encoding)) in v.columns.iter().enumerate() {
        if !pick(i) {
            for _ in 0..parts(v.kind) {
                c.skip_bits()?;
            }
            continue;
        }
        if times.is_none() {
            times = Some(codec::decode_times(tbytes, tbits, v.count).ok_or(Corrupt("times"))?);
        }
        let ts = times.as_deref().unwrap_or_default();
        let mut read = |enc: Encoding| -> Result<Vec<f64>, Corrupt> {
            let (bits, bytes) = c.bits()?;
            codec::decode_values(enc, bytes, bits, v.count).ok_or(Corrupt("values"))
        };
        let points = match v.kind {
            Kind::Raw => ColumnPoints::Raw(ts.iter().copied().zip(read(*encoding)?).collect()),
            Kind::Rollup => {
                let min = read(*encoding)?;
                let max = read(*encoding)?;
                let last = read(*encoding)?;
                let mean = read(Encoding::Float)?;
                let count = read(Encoding::Int { scale: 1.0 })?;
                ColumnPoints::Rollup(
                    (0..ts.len())
                        .map(|k| RollupPoint {
                            t: ts[k],
                            min: min[k],
                            max: max[k],
                            last: last[k],
                            mean: mean[k],
                            count: count[k],
                        })
                        .collect(),
                )
            }
        };
        out.push((i, points));
    }
    Ok(out)
}

/// Decodes the columns of `metric` from a serialized chunk, as `(label,
/// points)`, without allocating for the columns it skips (the query path).
pub fn read_metric(buf: &[u8], metric: &str) -> Result<Vec<(String, ColumnPoints)>, Corrupt> {
    Ok(read_metrics(buf, &[metric])?
        .into_iter()
        .map(|(_, label, points)| (label, points))
        .collect())
}

/// Decodes the columns of any of `metrics` from a serialized chunk, as
/// `(index in metrics, label, points)`, the times once for all of them.
pub fn read_metrics(
    buf: &[u8],
    metrics: &[&str],
) -> Result<Vec<(usize, String, ColumnPoints)>, Corrupt> {
    let mut c = Cursor { buf, pos: 0 };
    let v = view(&mut c)?;
    let picked = decode_picked(&mut c, &v, |i| metrics.contains(&v.columns[i].0))?;
    Ok(picked
        .into_iter()
        .filter_map(|(i, points)| {
            let m = metrics.iter().position(|m| *m == v.columns[i].0)?;
            Some((m, v.columns[i].1.to_owned(), points))
        })
        .collect())
}

/// Reads a serialized chunk's header.
pub fn read_header(buf: &[u8]) -> Result<Header, Corrupt> {
    view(&mut Cursor { buf, pos: 0 }).map(|v| v.owned())
}

/// Decodes the columns `wanted` selects (by index) from a serialized chunk,
/// skipping the others without decoding them.
pub fn read_columns(
    buf: &[u8],
    wanted: impl Fn(&Column) -> bool,
) -> Result<(Header, Vec<(usize, ColumnPoints)>), Corrupt> {
    let mut c = Cursor { buf, pos: 0 };
    let v = view(&mut c)?;
    let h = v.owned();
    let picked = decode_picked(&mut c, &v, |i| wanted(&h.columns[i]))?;
    Ok((h, picked))
}

/// Decodes a whole serialized chunk.
pub fn decode(buf: &[u8]) -> Result<(Header, Vec<ColumnPoints>), Corrupt> {
    let (h, cols) = read_columns(buf, |_| true)?;
    Ok((h, cols.into_iter().map(|(_, p)| p).collect()))
}

/// A chunk being written: the newest points of one source.
#[derive(Debug)]
pub struct OpenChunk {
    /// The source.
    pub source: Arc<str>,
    /// The columns.
    pub columns: Vec<Column>,
    times: TimeEncoder,
    values: Vec<ValueEncoder>,
    /// Points so far.
    pub count: u32,
    /// The earliest point.
    pub t_min: i64,
    /// The latest point.
    pub t_max: i64,
    /// The first point's time (the chunk's place in segment files).
    pub t_first: i64,
}

/// Bytes an open chunk takes beyond its encoded bits (its structs, its
/// columns' names, the head's map entry).
const OPEN_OVERHEAD: usize = 160;
const COLUMN_OVERHEAD: usize = 96;

impl OpenChunk {
    /// A chunk for `columns`, starting at `t`.
    pub fn new(source: Arc<str>, columns: &[ColumnRef<'_>], t: i64) -> OpenChunk {
        OpenChunk {
            source,
            columns: columns.iter().map(ColumnRef::owned).collect(),
            times: TimeEncoder::default(),
            values: columns
                .iter()
                .map(|c| ValueEncoder::new(c.encoding))
                .collect(),
            count: 0,
            t_min: t,
            t_max: t,
            t_first: t,
        }
    }

    /// Whether the points given have exactly this chunk's columns.
    pub fn fits(&self, columns: &[ColumnRef<'_>]) -> bool {
        self.columns.len() == columns.len()
            && columns.iter().zip(&self.columns).all(|(r, c)| r.is(c))
    }

    /// Appends one point per column.
    pub fn push(&mut self, t: i64, values: &[f64]) {
        self.times.push(t);
        for (e, v) in self.values.iter_mut().zip(values) {
            e.push(*v);
        }
        self.count += 1;
        self.t_min = self.t_min.min(t);
        self.t_max = self.t_max.max(t);
    }

    /// The bytes it takes in memory, spare capacity included.
    pub fn heap_bytes(&self) -> usize {
        OPEN_OVERHEAD
            + self.source.len()
            + self.times.bits().heap_bytes()
            + self
                .columns
                .iter()
                .map(|c| COLUMN_OVERHEAD + c.metric.len() + c.label.len())
                .sum::<usize>()
            + self
                .values
                .iter()
                .map(|v| v.bits().heap_bytes())
                .sum::<usize>()
    }

    /// Values it holds.
    pub fn values(&self) -> u64 {
        u64::from(self.count) * self.columns.len() as u64
    }

    /// Its points in the columns `wanted` selects, as a raw chunk would give.
    pub fn read_columns(&self, wanted: impl Fn(&Column) -> bool) -> Vec<(usize, ColumnPoints)> {
        let mut out = Vec::new();
        let mut times: Option<Vec<i64>> = None;
        for (i, col) in self.columns.iter().enumerate() {
            if !wanted(col) {
                continue;
            }
            if times.is_none() {
                times = codec::decode_times(
                    self.times.bits().bytes(),
                    self.times.bits().len_bits(),
                    self.count,
                );
            }
            let ts = times.as_deref().unwrap_or_default();
            let v = &self.values[i];
            let vals = codec::decode_values(
                v.encoding(),
                v.bits().bytes(),
                v.bits().len_bits(),
                self.count,
            )
            .unwrap_or_default();
            out.push((i, ColumnPoints::Raw(ts.iter().copied().zip(vals).collect())));
        }
        out
    }

    /// Closes it.
    pub fn close(mut self) -> Chunk {
        self.times.shrink();
        let bits = |b: &crate::bits::BitWriter| Bits {
            bytes: b.bytes().to_vec(),
            bits: b.len_bits(),
        };
        Chunk {
            kind: Kind::Raw,
            times: bits(self.times.bits()),
            values: self.values.iter().map(|v| bits(v.bits())).collect(),
            source: self.source,
            t_min: self.t_min,
            t_max: self.t_max,
            count: self.count,
            columns: self.columns,
        }
    }
}

/// Builds a rollup chunk from per-column intervals (each column's list has the
/// same interval starts, `times`).
pub fn rollup_chunk(
    source: Arc<str>,
    columns: Vec<Column>,
    times: &[i64],
    per_column: &[Vec<RollupPoint>],
) -> Chunk {
    let mut te = TimeEncoder::default();
    for t in times {
        te.push(*t);
    }
    let mut values = Vec::with_capacity(columns.len() * ROLLUP_PARTS);
    for (col, points) in columns.iter().zip(per_column) {
        let mut parts = [
            ValueEncoder::new(col.encoding),
            ValueEncoder::new(col.encoding),
            ValueEncoder::new(col.encoding),
            ValueEncoder::new(Encoding::Float),
            ValueEncoder::new(Encoding::Int { scale: 1.0 }),
        ];
        for p in points {
            parts[0].push(p.min);
            parts[1].push(p.max);
            parts[2].push(p.last);
            parts[3].push(p.mean);
            parts[4].push(p.count);
        }
        for e in &parts {
            values.push(Bits {
                bytes: e.bits().bytes().to_vec(),
                bits: e.bits().len_bits(),
            });
        }
    }
    Chunk {
        kind: Kind::Rollup,
        source,
        t_min: times.first().copied().unwrap_or(0),
        t_max: times.last().copied().unwrap_or(0),
        count: times.len() as u32,
        columns,
        times: Bits {
            bytes: te.bits().bytes().to_vec(),
            bits: te.bits().len_bits(),
        },
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_chunks_keep_each_time_once_the_later_value_and_every_column() {
        let a = ColumnRef {
            metric: "a",
            label: "",
            encoding: Encoding::Int { scale: 1.0 },
        };
        let b = ColumnRef {
            metric: "b",
            label: "x",
            encoding: Encoding::Float,
        };
        let chunk = |cols: &[ColumnRef<'_>], rows: &[(i64, &[f64])]| {
            let mut o = OpenChunk::new(Arc::from("s"), cols, rows[0].0);
            for (t, v) in rows {
                o.push(*t, v);
            }
            decode(&o.close().encode()).expect("decodes")
        };
        let parts = [
            chunk(&[a], &[(10, &[1.0]), (20, &[2.0])]),
            // A restart wrote t = 20 again, then a column appeared.
            chunk(&[a, b], &[(20, &[5.0, 0.5]), (30, &[3.0, f64::NAN])]),
        ];
        let merged = merge_raw(Arc::from("s"), &parts).expect("points");
        let (h, cols) = decode(&merged.encode()).expect("decodes");
        assert_eq!(h.count, 3);
        assert_eq!((h.t_min, h.t_max), (10, 30));
        assert_eq!(h.columns.len(), 2);
        let ColumnPoints::Raw(pa) = &cols[0] else {
            panic!("raw")
        };
        assert_eq!(pa, &vec![(10, 1.0), (20, 5.0), (30, 3.0)]);
        let ColumnPoints::Raw(pb) = &cols[1] else {
            panic!("raw")
        };
        let present: Vec<(i64, f64)> = pb.iter().copied().filter(|p| !p.1.is_nan()).collect();
        assert_eq!(present, vec![(20, 0.5)]);
        assert_eq!(merge_raw(Arc::from("s"), &[]), None);
    }

    #[test]
    fn a_chunk_round_trips_and_garbage_is_an_error() {
        let cols = [
            ColumnRef {
                metric: "cpu_percent",
                label: "",
                encoding: Encoding::Int { scale: 0.01 },
            },
            ColumnRef {
                metric: "disk_used_bytes",
                label: "/",
                encoding: Encoding::Int { scale: 4096.0 },
            },
            ColumnRef {
                metric: "x",
                label: "",
                encoding: Encoding::Float,
            },
        ];
        let mut open = OpenChunk::new(Arc::from("n\u{1f}n1"), &cols, 1000);
        for i in 0..50 {
            open.push(
                1000 + i * 1000,
                &[i as f64 * 0.5, 4096.0 * i as f64, f64::NAN],
            );
        }
        let from_head = open.read_columns(|c| c.metric == "disk_used_bytes");
        let chunk = open.close();
        let buf = chunk.encode();
        let (h, cols_read) = read_columns(&buf, |c| c.metric == "disk_used_bytes").expect("reads");
        assert_eq!(h.count, 50);
        assert_eq!(h.source, "n\u{1f}n1");
        assert_eq!(cols_read, from_head);
        let by_metric = read_metric(&buf, "disk_used_bytes").expect("reads");
        assert_eq!(by_metric, vec![("/".to_string(), cols_read[0].1.clone())]);
        assert!(read_metric(&buf, "nothing").expect("reads").is_empty());
        let (_, all) = decode(&buf).expect("decodes");
        let ColumnPoints::Raw(cpu) = &all[0] else {
            panic!("raw")
        };
        assert_eq!(cpu[3], (4000, 1.5));
        for cut in 0..buf.len() {
            assert!(decode(&buf[..cut]).is_err(), "a chunk cut at {cut} decoded");
        }
    }
}
