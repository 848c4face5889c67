//! TCP connect probe (optional send/expect) and the classified connect
//! every network probe uses.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::spec::{SpecContext, SpecError};
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess};

/// Resolves `host` and connects to the first address that accepts, within
/// the deadline. Failures are classified: resolve, refused, timeout, I/O.
pub async fn connect(host: &str, port: u16, deadline: Deadline) -> Result<TcpStream, ProbeFailure> {
    let addrs: Vec<SocketAddr> = deadline
        .run(&format!("resolving {host}"), tokio::net::lookup_host((host, port)))
        .await?
        .map_err(|e| ProbeFailure::critical(FailureClass::Resolve, format!("cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(ProbeFailure::critical(FailureClass::Resolve, format!("{host} has no address")));
    }
    let mut last: Option<ProbeFailure> = None;
    for addr in addrs {
        match deadline.run(&format!("connecting to {addr}"), TcpStream::connect(addr)).await? {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(connect_failure(e, addr)),
        }
    }
    Err(last.expect("at least one address was tried"))
}

fn connect_failure(e: io::Error, addr: SocketAddr) -> ProbeFailure {
    match e.kind() {
        // A reset during the handshake is a refusal too (a listener that is
        // being torn down, or a firewall answering with RST).
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {
            ProbeFailure::critical(FailureClass::Refused, format!("connection refused by {addr}"))
        }
        io::ErrorKind::TimedOut => {
            ProbeFailure::critical(FailureClass::Timeout, format!("connect to {addr} timed out"))
        }
        _ => ProbeFailure::critical(FailureClass::Io, format!("cannot connect to {addr}: {e}")),
    }
}

/// `tcp://HOST:PORT` with options `send` (a string, `\r\n` escapes
/// honoured) and `expect` (a substring of the first bytes received).
#[derive(Debug, Clone)]
pub struct TcpProbe {
    host: String,
    port: u16,
    send: Option<String>,
    expect: Option<String>,
}

/// Builds a [`TcpProbe`] from a spec.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let host = ctx.host()?;
    let port = ctx.url().port().ok_or_else(|| SpecError::Missing(format!("{}: tcp:// needs a port", ctx.url())))?;
    Ok(Box::new(TcpProbe {
        host,
        port,
        send: ctx.opt("send").map(|s| unescape(&s)),
        expect: ctx.opt("expect").map(|s| unescape(&s)),
    }))
}

fn unescape(s: &str) -> String {
    s.replace("\\r", "\r").replace("\\n", "\n").replace("\\t", "\t")
}

impl Probe for TcpProbe {
    fn kind(&self) -> &'static str {
        "tcp"
    }

    fn target(&self) -> String {
        format!("tcp://{}:{}", self.host, self.port)
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            let mut s = connect(&self.host, self.port, deadline).await?;
            if let Some(data) = &self.send {
                deadline
                    .run("sending", s.write_all(data.as_bytes()))
                    .await?
                    .map_err(|e| crate::line::io_failure(e, "sending"))?;
            }
            let Some(expect) = &self.expect else {
                return Ok(ProbeSuccess::new(format!("TCP connect to {}:{} ok", self.host, self.port)));
            };
            // Read until the expected text shows up, EOF, or 64 KiB.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = deadline
                    .run(&format!("waiting for {expect:?}"), s.read(&mut buf))
                    .await?
                    .map_err(|e| crate::line::io_failure(e, "reading"))?;
                got.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&got).contains(expect.as_str()) {
                    return Ok(ProbeSuccess::new(format!("TCP {}:{} answered {expect:?}", self.host, self.port)));
                }
                if n == 0 || got.len() > 64 * 1024 {
                    let seen = String::from_utf8_lossy(&got[..got.len().min(80)]).into_owned();
                    return Err(ProbeFailure::critical(
                        FailureClass::UnexpectedAnswer,
                        format!("expected {expect:?}, got {seen:?}"),
                    ));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ProbeSpec, RunLimits, Status, build_probe, run_probe};
    use std::time::Duration;
    use tokio::net::TcpListener;

    fn spec(target: String, opts: &[(&str, &str)]) -> ProbeSpec {
        ProbeSpec {
            target,
            options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    fn limits(ms: u64) -> RunLimits {
        RunLimits { timeout: Duration::from_millis(ms), warning: None }
    }

    #[tokio::test]
    async fn refused_when_nothing_listens() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let p = build_probe(&spec(format!("tcp://127.0.0.1:{port}"), &[])).unwrap();
        let r = run_probe(p.as_ref(), limits(2000)).await;
        assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::Refused)), "{r:?}");
    }

    #[tokio::test]
    async fn send_expect_and_silent_peer() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut b = [0u8; 16];
                    let n = s.read(&mut b).await.unwrap_or(0);
                    if &b[..n] == b"ping\n" {
                        let _ = s.write_all(b"pong\n").await;
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                });
            }
        });
        let ok =
            build_probe(&spec(format!("tcp://127.0.0.1:{port}"), &[("send", "ping\\n"), ("expect", "pong")])).unwrap();
        let r = run_probe(ok.as_ref(), limits(2000)).await;
        assert_eq!(r.status, Status::Ok, "{r:?}");

        let silent =
            build_probe(&spec(format!("tcp://127.0.0.1:{port}"), &[("send", "x"), ("expect", "pong")])).unwrap();
        let t = std::time::Instant::now();
        let r = run_probe(silent.as_ref(), limits(300)).await;
        assert_eq!(r.class, Some(FailureClass::Timeout), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
