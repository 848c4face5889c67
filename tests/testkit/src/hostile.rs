//! A hostile TCP peer on an ephemeral loopback port: silent, garbage,
//! custom greetings, endless lines, or an immediate close. Runs on plain
//! threads so it works under any (or no) async runtime; stopped on drop.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the server does with each connection it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behaviour {
    /// Accepts, never sends anything, keeps the connection open (reading
    /// and discarding whatever the client sends).
    Silent,
    /// Accepts and closes at once.
    CloseImmediately,
    /// Sends these bytes, then stays silent (as [`Behaviour::Silent`]).
    SendThenSilent(Vec<u8>),
    /// Sends these bytes, then closes.
    SendThenClose(Vec<u8>),
    /// Sends one line without end: `x` bytes until the client closes or
    /// 64 MiB were sent.
    EndlessLine,
}

impl Behaviour {
    /// Sends `lines`, each followed by CRLF, then stays silent; e.g. a
    /// greeting such as `554 go away` or `* BYE shutting down`.
    pub fn greeting(lines: &[&str]) -> Self {
        let mut data = Vec::new();
        for l in lines {
            data.extend_from_slice(l.as_bytes());
            data.extend_from_slice(b"\r\n");
        }
        Behaviour::SendThenSilent(data)
    }
}

/// The running server.
#[derive(Debug)]
pub struct HostileServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl HostileServer {
    /// Starts a server on 127.0.0.1 with an ephemeral port.
    pub fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hostile server");
        let addr = listener.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop2, accepted2) = (stop.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                accepted2.fetch_add(1, Ordering::SeqCst);
                let (b, s) = (behaviour.clone(), stop2.clone());
                std::thread::spawn(move || serve(conn, b, s));
            }
        });
        Self { addr, stop, accepted, thread: Some(thread) }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for HostileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, behaviour: Behaviour, stop: Arc<AtomicBool>) {
    match behaviour {
        Behaviour::CloseImmediately => {
            let _ = conn.shutdown(Shutdown::Both);
        }
        Behaviour::Silent => silent(conn, &stop),
        Behaviour::SendThenSilent(data) => {
            let _ = conn.write_all(&data);
            silent(conn, &stop);
        }
        Behaviour::SendThenClose(data) => {
            let _ = conn.write_all(&data);
            let _ = conn.flush();
            let _ = conn.shutdown(Shutdown::Write);
            // Give the client a moment to read before the socket is dropped
            // (dropping with unread input would turn FIN into RST).
            let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
            let mut buf = [0u8; 4096];
            for _ in 0..20 {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(_) if !stop.load(Ordering::SeqCst) => {}
                    Err(_) => break,
                }
            }
        }
        Behaviour::EndlessLine => {
            let chunk = [b'x'; 8192];
            let _ = conn.set_write_timeout(Some(Duration::from_millis(200)));
            let mut sent = 0usize;
            while sent < 64 << 20 && !stop.load(Ordering::SeqCst) {
                match conn.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        }
    }
}

/// Reads and discards until the client closes or the server stops.
fn silent(mut conn: TcpStream, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break,
        }
    }
}
