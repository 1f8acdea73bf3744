#![allow(dead_code)]
//! Pieces the open-loop load scripts share: a child process killed on drop, env knobs, a
//! minimal raw-socket HTTP/1.1 keep-alive client (cheap: the generator shares the two cores
//! with the server), and the latency report.

use std::time::Duration;

pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Child(pub std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub async fn connect(addr: &str) -> Conn {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: Vec::with_capacity(4096),
        }
    }

    /// Sends one request; returns (status, body).
    pub async fn roundtrip(&mut self, request: &[u8]) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(request).await.ok()?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            let n = self.stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&self.buf);
            if let Some(end) = text.find("\r\n\r\n") {
                let head = &text[..end];
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok())?;
                    return Some((status, text[end + 4..end + 4 + len].to_string()));
                }
            }
        }
    }
}

/// Prints the latency percentiles of `(request->response, from schedule)` pairs.
pub fn report(pairs: &[(Duration, Duration)]) {
    let mut service: Vec<Duration> = pairs.iter().map(|p| p.0).collect();
    let mut from_schedule: Vec<Duration> = pairs.iter().map(|p| p.1).collect();
    service.sort();
    from_schedule.sort();
    let pct = |l: &[Duration], p: f64| -> Duration {
        if l.is_empty() {
            return Duration::ZERO;
        }
        l[((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1]
    };
    for (name, l) in [
        ("request->response", &service),
        ("from schedule   ", &from_schedule),
    ] {
        println!(
            "  {name}: p50={:?} p90={:?} p99={:?} p99.9={:?} max={:?}",
            pct(l, 0.50),
            pct(l, 0.90),
            pct(l, 0.99),
            pct(l, 0.999),
            l.last().copied().unwrap_or_default()
        );
    }
}
