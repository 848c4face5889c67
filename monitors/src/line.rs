//! A line-oriented connection for the text protocols (SMTP, IMAP, POP3,
//! FTP): bounded line length, every read and write under the deadline,
//! and an in-place STARTTLS upgrade.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::{Deadline, FailureClass, ProbeFailure};

/// Longest line accepted from a peer; longer is a protocol violation
/// (RFC 5321 allows 512 octets for SMTP replies; IMAP lines can be longer).
pub const MAX_LINE: usize = 16 * 1024;

/// A TCP stream, plain or TLS.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (implicit TLS or after STARTTLS).
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A buffered line connection.
#[derive(Debug)]
pub struct LineConn {
    io: BufReader<Stream>,
}

impl LineConn {
    /// Connects over plain TCP.
    pub async fn connect(host: &str, port: u16, deadline: Deadline) -> Result<Self, ProbeFailure> {
        let tcp = crate::tcp::connect(host, port, deadline).await?;
        Ok(Self { io: BufReader::new(Stream::Plain(tcp)) })
    }

    /// Connects with implicit TLS (smtps, imaps, pop3s).
    pub async fn connect_tls(
        host: &str,
        port: u16,
        config: Arc<ClientConfig>,
        server_name: &str,
        deadline: Deadline,
    ) -> Result<Self, ProbeFailure> {
        let tcp = crate::tcp::connect(host, port, deadline).await?;
        let tls = crate::tls::handshake(tcp, config, server_name, deadline).await?;
        Ok(Self { io: BufReader::new(Stream::Tls(Box::new(tls))) })
    }

    /// Wraps an existing stream (tests).
    pub fn from_stream(stream: Stream) -> Self {
        Self { io: BufReader::new(stream) }
    }

    /// True once the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.io.get_ref(), Stream::Tls(_))
    }

    /// Reads one line, without its CRLF. EOF, an over-long line or a
    /// read error is a classified failure naming `stage`.
    pub async fn read_line(&mut self, deadline: Deadline, stage: &str) -> Result<String, ProbeFailure> {
        let mut buf = Vec::new();
        // The stage text is formatted only on a timeout: this runs several
        // times per probe.
        tokio::time::timeout_at(deadline.instant(), read_bounded_line(&mut self.io, &mut buf))
            .await
            .map_err(|_| ProbeFailure::critical(FailureClass::Timeout, format!("timeout waiting for {stage}")))?
            .map_err(|e| match e {
                LineError::Eof => {
                    ProbeFailure::critical(FailureClass::Protocol, format!("connection closed waiting for {stage}"))
                }
                LineError::TooLong => ProbeFailure::critical(
                    FailureClass::Protocol,
                    format!("line longer than {MAX_LINE} bytes waiting for {stage}"),
                ),
                LineError::Io(e) => io_failure(e, stage),
            })?;
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Sends `line` followed by CRLF. The line is never logged, since it
    /// may carry credentials.
    pub async fn send(&mut self, line: &str, deadline: Deadline, stage: &str) -> Result<(), ProbeFailure> {
        self.send_lines(&[line], deadline, stage).await
    }

    /// Sends `lines`, each followed by CRLF, in one write: one segment for
    /// a pipelined group (RFC 2920) instead of one per command. Never
    /// logged, like [`LineConn::send`].
    pub async fn send_lines(&mut self, lines: &[&str], deadline: Deadline, stage: &str) -> Result<(), ProbeFailure> {
        let mut data = Vec::with_capacity(lines.iter().map(|l| l.len() + 2).sum());
        for line in lines {
            data.extend_from_slice(line.as_bytes());
            data.extend_from_slice(b"\r\n");
        }
        let io = self.io.get_mut();
        tokio::time::timeout_at(deadline.instant(), async {
            io.write_all(&data).await?;
            io.flush().await
        })
        .await
        .map_err(|_| ProbeFailure::critical(FailureClass::Timeout, format!("timeout sending {stage}")))?
        .map_err(|e| io_failure(e, stage))
    }

    /// Upgrades a plain connection to TLS after the server agreed to
    /// STARTTLS. Bytes the server sent before the handshake are refused
    /// (they would be unauthenticated plaintext injected into the session).
    pub async fn starttls(
        self,
        config: Arc<ClientConfig>,
        server_name: &str,
        deadline: Deadline,
    ) -> Result<Self, ProbeFailure> {
        if !self.io.buffer().is_empty() {
            return Err(ProbeFailure::critical(
                FailureClass::Protocol,
                "server sent data before the STARTTLS handshake (possible injection)",
            ));
        }
        match self.io.into_inner() {
            Stream::Plain(tcp) => {
                let tls = crate::tls::handshake(tcp, config, server_name, deadline).await?;
                Ok(Self { io: BufReader::new(Stream::Tls(Box::new(tls))) })
            }
            Stream::Tls(_) => Err(ProbeFailure::critical(FailureClass::Config, "STARTTLS on a TLS connection")),
        }
    }

    /// Best-effort close; errors are ignored because the verdict is known.
    /// TLS sends its close_notify first. Plain TCP is just closed: the
    /// kernel sends the FIN on close(2) as a shutdown(2) would, one syscall
    /// less, and nothing waits for the server's FIN.
    pub async fn close(mut self) {
        if let Stream::Tls(tls) = self.io.get_mut() {
            let _ = tokio::time::timeout(std::time::Duration::from_millis(200), tls.shutdown()).await;
        }
    }
}

enum LineError {
    Eof,
    TooLong,
    Io(io::Error),
}

async fn read_bounded_line<R: AsyncBufReadExt + Unpin>(r: &mut R, out: &mut Vec<u8>) -> Result<(), LineError> {
    loop {
        let chunk = r.fill_buf().await.map_err(LineError::Io)?;
        if chunk.is_empty() {
            return Err(LineError::Eof);
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if out.len() + take > MAX_LINE {
            return Err(LineError::TooLong);
        }
        out.extend_from_slice(&chunk[..take]);
        r.consume(take);
        if done {
            return Ok(());
        }
    }
}

/// Classifies an I/O error on an established connection.
pub fn io_failure(e: io::Error, stage: &str) -> ProbeFailure {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe => {
            ProbeFailure::critical(FailureClass::Protocol, format!("connection reset while {stage}: {e}"))
        }
        io::ErrorKind::InvalidData => {
            ProbeFailure::critical(FailureClass::Tls, format!("TLS error while {stage}: {e}"))
        }
        _ => ProbeFailure::critical(FailureClass::Io, format!("I/O error while {stage}: {e}")),
    }
}
