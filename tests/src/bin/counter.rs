//! `novacron-counter`: a tiny stateful HTTP/1.1 server, the workload of the live
//! checkpoint (CRIU) tests. Its state lives in memory, so a test can tell a live
//! restore (the count goes on) from a restart (the count starts again at 0).
//!
//! - `GET /` increments the counter and answers the new count (`text/plain`, no
//!   trailing newline) and appends it as a line to `$DATA_FILE`;
//! - `GET /count` answers the current count without incrementing;
//! - `GET /health` answers `ok`;
//! - `GET /ballast` answers the wrapping `u64` sum of the ballast read as
//!   little-endian `u64` words (`0` without ballast);
//! - `GET /dirty` checks the dirtied region (below) and answers `ok <round>
//!   <page>` (where the writer is) or `corrupt ...` (`off` without one).
//!
//! Environment: `PORT` (default 8080, listening on `0.0.0.0`), `DATA_FILE` (default
//! `/data/count.log`), `BALLAST_MB` (default 0): that many MiB allocated at start and
//! filled with xorshift64 pseudo-random bytes (not zeros, so neither CRIU's nor a
//! transport's compression can shrink it), so a test can move a process of a known
//! size and check that its memory survived. `DIRTY_MB` (default 0) and
//! `DIRTY_KBPS` (default 4096): a second region of that many MiB whose pages a
//! thread rewrites in order at that rate, each with the number of its round, so
//! a migration meets memory that changes while it copies; `/dirty` checks that
//! every page before the writer holds this round and every page after it the
//! last one.
//!
//! The data file is opened, appended to and closed on every write, never kept open:
//! CRIU records the size of open files and refuses to restore when it changed (the
//! volume is copied separately).
//!
//! Bounded: request line plus headers at most 8 KiB (else 431), one response per
//! connection (`Connection: close`), one thread per connection with at most 64 live
//! (more are closed unanswered), 10 s read and write timeouts. Std only, no panics
//! on bad input; it prints one line to stdout when it listens.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most bytes of request line plus headers.
const MAX_HEAD: usize = 8 * 1024;
/// Most connections served at once.
const MAX_LIVE: usize = 64;
/// Read and write timeout per connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Seed of the ballast's xorshift64 (fixed: the checksum of N MiB is always the same).
const BALLAST_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

#[derive(Debug)]
struct State {
    /// The counter; the lock also orders the data file's lines.
    count: Mutex<u64>,
    data_file: PathBuf,
    ballast: Vec<u8>,
    dirty: Option<Mutex<Dirty>>,
}

/// The region the dirtying thread rewrites: one `u64` round number at the
/// start of each 4 KiB page.
#[derive(Debug)]
struct Dirty {
    pages: Vec<u8>,
    /// The round being written (the first is 1; untouched pages hold 0).
    round: u64,
    /// The next page to write.
    next: usize,
}

const PAGE: usize = 4096;

impl Dirty {
    fn pages(&self) -> usize {
        self.pages.len() / PAGE
    }

    fn read(&self, page: usize) -> u64 {
        let at = page * PAGE;
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.pages[at..at + 8]);
        u64::from_le_bytes(word)
    }

    /// Writes the next `n` pages.
    fn write(&mut self, n: usize) {
        for _ in 0..n {
            let at = self.next * PAGE;
            self.pages[at..at + 8].copy_from_slice(&self.round.to_le_bytes());
            self.next += 1;
            if self.next == self.pages() {
                self.next = 0;
                self.round += 1;
            }
        }
    }

    fn check(&self) -> String {
        for page in 0..self.pages() {
            let want = if page < self.next {
                self.round
            } else {
                self.round - 1
            };
            let got = self.read(page);
            if got != want {
                return format!(
                    "corrupt page {page}: {got}, not {want} (round {}, writer at {})",
                    self.round, self.next
                );
            }
        }
        format!("ok {} {}", self.round, self.next)
    }
}

/// Rewrites the region's pages in order at `kbps` KiB/s, forever.
fn dirty_forever(state: &State, kbps: u64) {
    let Some(dirty) = &state.dirty else { return };
    // 64 pages (256 KiB) at a time, paced to the rate.
    const BATCH: usize = 64;
    let pause = Duration::from_micros((BATCH * PAGE) as u64 * 1_000_000 / 1024 / kbps.max(1));
    loop {
        dirty.lock().unwrap_or_else(|p| p.into_inner()).write(BATCH);
        std::thread::sleep(pause);
    }
}

impl State {
    fn increment(&self) -> u64 {
        let mut count = self.count.lock().unwrap_or_else(|p| p.into_inner());
        *count += 1;
        let n = *count;
        if let Err(e) = append_line(&self.data_file, n) {
            eprintln!(
                "novacron-counter: appending {n} to {}: {e}",
                self.data_file.display()
            );
        }
        n
    }

    fn current(&self) -> u64 {
        *self.count.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Opens `path` for appending, writes `n` as a line and closes it again.
fn append_line(path: &Path, n: u64) -> std::io::Result<()> {
    let mut file = OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(format!("{n}\n").as_bytes())
}

/// `mb` MiB of xorshift64 output.
fn make_ballast(mb: usize) -> Result<Vec<u8>, String> {
    let len = mb
        .checked_mul(1024 * 1024)
        .ok_or_else(|| format!("BALLAST_MB={mb} is too large"))?;
    let mut ballast = Vec::new();
    ballast
        .try_reserve_exact(len)
        .map_err(|e| format!("allocating {mb} MiB of ballast: {e}"))?;
    ballast.resize(len, 0);
    let mut x = BALLAST_SEED;
    for chunk in ballast.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    Ok(ballast)
}

/// Where `DISK_MB` of pseudo-random bytes go: the container's writable layer.
const DISK_FILE: &str = "/counter-disk.bin";

/// Writes `DISK_MB` MiB of pseudo-random bytes to [`DISK_FILE`] (once: a
/// file already there, as after a migration, is kept), so a migration has a
/// writable layer of that size to carry; `/disk` answers its length and sum.
fn write_disk(mb: usize) -> Result<(), String> {
    if std::path::Path::new(DISK_FILE).exists() {
        return Ok(());
    }
    let tmp = format!("{DISK_FILE}.tmp");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(&tmp).map_err(|e| format!("creating {tmp}: {e}"))?,
    );
    let mut x = BALLAST_SEED.rotate_left(17);
    for _ in 0..mb * 1024 * 1024 / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.write_all(&x.to_le_bytes())
            .map_err(|e| format!("writing {tmp}: {e}"))?;
    }
    out.flush().map_err(|e| format!("writing {tmp}: {e}"))?;
    drop(out);
    std::fs::rename(&tmp, DISK_FILE).map_err(|e| format!("renaming {tmp}: {e}"))
}

/// [`DISK_FILE`]'s length and [`checksum`], read 1 MiB at a time (the
/// file may be larger than the container's memory limit leaves room for).
fn disk_sum() -> std::io::Result<(u64, u64)> {
    let mut file = std::fs::File::open(DISK_FILE)?;
    let mut buf = vec![0u8; 1024 * 1024];
    let (mut len, mut sum) = (0u64, 0u64);
    loop {
        // Whole buffers keep the words aligned; only the last read is short.
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            return Ok((len, sum));
        }
        len += filled as u64;
        sum = sum.wrapping_add(checksum(&buf[..filled]));
    }
}

/// The wrapping sum of `data` as little-endian `u64` words (a short tail is
/// zero-padded).
fn checksum(data: &[u8]) -> u64 {
    data.chunks(8).fold(0u64, |sum, chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        sum.wrapping_add(u64::from_le_bytes(word))
    })
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not valid")),
        _ => Ok(default),
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("novacron-counter: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let port: u16 = env_or("PORT", 8080)?;
    let data_file =
        PathBuf::from(std::env::var("DATA_FILE").unwrap_or_else(|_| "/data/count.log".into()));
    let ballast_mb: usize = env_or("BALLAST_MB", 0)?;
    let dirty_mb: usize = env_or("DIRTY_MB", 0)?;
    let dirty_kbps: u64 = env_or("DIRTY_KBPS", 4096)?;
    let disk_mb: usize = env_or("DISK_MB", 0)?;
    if let Some(dir) = data_file.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Best effort: a missing directory shows up as an error on each append.
        let _ = std::fs::create_dir_all(dir);
    }
    let ballast = make_ballast(ballast_mb)?;
    if disk_mb > 0 {
        write_disk(disk_mb)?;
    }
    let sum = checksum(&ballast);
    let listener =
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| format!("binding 0.0.0.0:{port}: {e}"))?;
    let dirty = match dirty_mb {
        0 => None,
        mb => Some(Mutex::new(Dirty {
            pages: vec![
                0u8;
                mb.checked_mul(1024 * 1024)
                    .ok_or_else(|| format!("DIRTY_MB={mb} is too large"))?
            ],
            round: 1,
            next: 0,
        })),
    };
    let state = Arc::new(State {
        count: Mutex::new(0),
        data_file,
        ballast,
        dirty,
    });
    if state.dirty.is_some() {
        let state = Arc::clone(&state);
        std::thread::Builder::new()
            .name("dirty".into())
            .spawn(move || dirty_forever(&state, dirty_kbps))
            .map_err(|e| format!("spawning the dirtying thread: {e}"))?;
    }
    println!(
        "novacron-counter listening on 0.0.0.0:{port} (data file {}, ballast {ballast_mb} MiB, checksum {sum})",
        state.data_file.display()
    );
    let _ = std::io::stdout().flush();
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("novacron-counter: accept: {e}");
                // EMFILE and friends: back off instead of spinning.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_LIVE {
            live.fetch_sub(1, Ordering::SeqCst);
            drop(stream);
            continue;
        }
        let state = Arc::clone(&state);
        let guard = LiveGuard(Arc::clone(&live));
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                let _guard = guard;
                if let Err(e) = serve(stream, &state)
                    && !matches!(
                        e.kind(),
                        ErrorKind::BrokenPipe
                            | ErrorKind::ConnectionReset
                            | ErrorKind::WouldBlock
                            | ErrorKind::TimedOut
                    )
                {
                    eprintln!("novacron-counter: connection: {e}");
                }
            });
        if let Err(e) = spawned {
            // The closure (and with it the guard) was dropped: the slot is free again.
            eprintln!("novacron-counter: spawning a connection thread: {e}");
        }
    }
    Ok(())
}

/// Frees a connection slot when dropped.
#[derive(Debug)]
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Reads one request head and writes one response.
fn serve(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        if head.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "request head over 8 KiB",
            );
        }
        // A read on a socket with a timeout is not restarted after an
        // interruption, such as CRIU's freeze for a live checkpoint: it fails
        // with EINTR, which is no reason to drop the client.
        let n = match stream.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        if n == 0 {
            if head.is_empty() {
                return Ok(());
            }
            return respond(&mut stream, "400 Bad Request", "incomplete request");
        }
        head.extend_from_slice(&buf[..n]);
    }
    let end = head
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(head.len());
    if end > MAX_HEAD {
        return respond(
            &mut stream,
            "431 Request Header Fields Too Large",
            "request head over 8 KiB",
        );
    }
    let text = String::from_utf8_lossy(&head[..end]);
    let line = text.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return respond(&mut stream, "400 Bad Request", "bad request line");
    };
    if !version.starts_with("HTTP/1.") {
        return respond(
            &mut stream,
            "505 HTTP Version Not Supported",
            "HTTP/1.x only",
        );
    }
    if method != "GET" {
        return respond(&mut stream, "405 Method Not Allowed", "GET only");
    }
    let path = target.split('?').next().unwrap_or(target);
    match path {
        "/" => respond(&mut stream, "200 OK", &state.increment().to_string()),
        "/count" => respond(&mut stream, "200 OK", &state.current().to_string()),
        "/health" => respond(&mut stream, "200 OK", "ok"),
        "/ballast" => respond(&mut stream, "200 OK", &checksum(&state.ballast).to_string()),
        "/disk" => {
            let answer = match disk_sum() {
                Ok((len, sum)) => format!("{len} {sum}"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "off".to_owned(),
                Err(e) => format!("error: {e}"),
            };
            respond(&mut stream, "200 OK", &answer)
        }
        "/dirty" => {
            let answer = match &state.dirty {
                Some(d) => d.lock().unwrap_or_else(|p| p.into_inner()).check(),
                None => "off".to_owned(),
            };
            respond(&mut stream, "200 OK", &answer)
        }
        _ => respond(&mut stream, "404 Not Found", "not found"),
    }
}

fn respond(stream: &mut TcpStream, status: &str, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ballast_is_not_zeros_and_checksum_is_stable() {
        let b = make_ballast(1).expect("1 MiB");
        assert_eq!(b.len(), 1024 * 1024);
        assert!(b.iter().filter(|&&x| x == 0).count() < b.len() / 100);
        assert_eq!(checksum(&b), checksum(&make_ballast(1).expect("1 MiB")));
        assert_eq!(checksum(&[]), 0);
    }

    #[test]
    fn the_dirtied_region_checks_round_by_round_and_finds_a_bad_page() {
        let mut d = Dirty {
            pages: vec![0u8; 4 * PAGE],
            round: 1,
            next: 0,
        };
        assert_eq!(d.check(), "ok 1 0");
        d.write(3);
        assert_eq!(d.check(), "ok 1 3");
        d.write(2);
        assert_eq!(d.check(), "ok 2 1");
        // A page from an older round (a page lost in a copy) is found.
        d.pages[2 * PAGE] = 0;
        assert!(
            d.check().starts_with("corrupt page 2: 0, not 1"),
            "{}",
            d.check()
        );
    }
}
