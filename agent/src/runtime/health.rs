//! HTTP and TCP health probes against a container's address. (Exec checks go
//! through [`ContainerRuntime::exec`](super::ContainerRuntime::exec).)
//!
//! The HTTP probe is a minimal HTTP/1.0 `GET`: it sends the request, reads the status
//! line and closes. 2xx and 3xx are healthy.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most bytes read while looking for the status line.
const MAX_STATUS_LINE: usize = 1024;

/// Connects to `addr` within `timeout`.
pub async fn tcp_check(addr: SocketAddr, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp {addr}: {e}")),
        Err(_) => Err(format!("tcp {addr}: no connection within {timeout:?}")),
    }
}

/// `GET path` on `addr`; healthy on a 2xx or 3xx status within `timeout`.
pub async fn http_check(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let path = if path.is_empty() { "/" } else { path };
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!(
            "http check path {path:?} is invalid: expected an absolute path without spaces"
        ));
    }
    match tokio::time::timeout(timeout, http_status(addr, path)).await {
        Ok(Ok(status)) if (200..400).contains(&status) => Ok(()),
        Ok(Ok(status)) => Err(format!("http {addr}{path}: status {status}")),
        Ok(Err(e)) => Err(format!("http {addr}{path}: {e}")),
        Err(_) => Err(format!("http {addr}{path}: no answer within {timeout:?}")),
    }
}

async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: novacron-agent\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            return parse_status_line(&buf[..end]);
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err("no status line in the first 1 KiB".into());
        }
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return if buf.is_empty() {
                Err("connection closed without an answer".into())
            } else {
                parse_status_line(&buf)
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `HTTP/1.1 200 OK` → 200.
fn parse_status_line(line: &[u8]) -> Result<u16, String> {
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_ascii_whitespace();
    match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/") => code
            .parse::<u16>()
            .map_err(|_| format!("bad status line {line:?}")),
        _ => Err(format!("bad status line {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    async fn serve_once(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 204 No Content"), Ok(204));
        assert_eq!(parse_status_line(b"HTTP/1.0 302"), Ok(302));
        assert!(parse_status_line(b"SSH-2.0-OpenSSH").is_err());
        assert!(parse_status_line(b"HTTP/1.1 abc").is_err());
    }

    #[tokio::test]
    async fn http_2xx_and_3xx_are_healthy() {
        let t = Duration::from_secs(2);
        let ok = serve_once(b"HTTP/1.0 200 OK\r\n\r\nhi").await;
        assert_eq!(http_check(ok, "/", t).await, Ok(()));
        let redirect = serve_once(b"HTTP/1.1 301 Moved\r\n").await;
        assert_eq!(http_check(redirect, "/x", t).await, Ok(()));
        let missing = serve_once(b"HTTP/1.1 404 Not Found\r\n\r\n").await;
        let err = http_check(missing, "/", t).await.expect_err("404");
        assert!(err.contains("404"), "{err}");
    }

    #[tokio::test]
    async fn silence_times_out_and_closed_ports_fail() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let err = http_check(addr, "/", Duration::from_millis(200))
            .await
            .expect_err("no answer");
        assert!(err.contains("no answer"), "{err}");
        assert_eq!(tcp_check(addr, Duration::from_secs(1)).await, Ok(()));
        drop(listener);
        assert!(tcp_check(addr, Duration::from_secs(1)).await.is_err());
    }

    #[tokio::test]
    async fn bad_paths_are_refused_before_connecting() {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("addr");
        let err = http_check(addr, "/a b\r\nX: y", Duration::from_secs(1))
            .await
            .expect_err("invalid");
        assert!(err.contains("invalid"), "{err}");
    }
}
