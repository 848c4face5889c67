//! An SMTP set-up on loopback made of two real servers:
//!
//! * OpenSMTPD, plain SMTP only (port [`Smtpd::port`]);
//! * dovecot's submission service in front of it (ports
//!   [`Smtpd::submission_port`] with STARTTLS and [`Smtpd::submissions_port`]
//!   with implicit TLS), offering AUTH PLAIN/LOGIN for [`SMTP_USER`] and
//!   relaying to OpenSMTPD.
//!
//! Why not OpenSMTPD alone: Debian 12's OpenSMTPD 6.8 cannot complete a TLS
//! handshake with OpenSSL 3 (its privilege-separated key engine fails, the
//! client gets an "internal error" alert for RSA and ECDSA keys alike;
//! upstream issues #1171, #1239), and it offers AUTH only over TLS.
//!
//! OpenSMTPD has fixed paths for its control socket (`/run/smtpd.sock`) and
//! spool (`/var/spool/smtpd`) and refuses to start when another instance
//! owns the socket. It therefore runs in a private mount namespace
//! (`unshare --mount`) with temporary directories bind-mounted over both,
//! so fixtures run in parallel and leave no system-wide state.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::certs::TestPki;
use crate::dovecot::Dovecot;
use crate::{ChildGuard, require_program, wait_for_port};

/// The user the submission service authenticates.
pub const SMTP_USER: &str = "probeuser";
/// Its password.
pub const SMTP_PASSWORD: &str = "smtp-Secret-4711";

/// A running OpenSMTPD with dovecot submission in front.
#[derive(Debug)]
pub struct Smtpd {
    /// OpenSMTPD, plain SMTP (no STARTTLS, no AUTH).
    pub port: u16,
    /// Dovecot submission: STARTTLS offered, AUTH.
    pub submission_port: u16,
    /// Dovecot submission over implicit TLS, AUTH.
    pub submissions_port: u16,
    /// The PKI of the TLS ports (clients trust `pki.ca_cert`).
    pub pki: TestPki,
    log: PathBuf,
    child: ChildGuard,
    dovecot: Dovecot,
    _dir: tempfile::TempDir,
}

impl Smtpd {
    /// Starts both servers and waits until all ports accept.
    pub fn start() -> Self {
        let smtpd = require_program("smtpd", "opensmtpd", &[]);
        let unshare = require_program("unshare", "util-linux", &[]);
        require_program("submission-login", "dovecot-submissiond", &["/usr/lib/dovecot"]);
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (run, spool) = (d.join("run"), d.join("spool"));
        for p in [&run, &spool] {
            std::fs::create_dir(p).expect("mkdir");
        }
        set_mode(&spool, 0o711); // smtpd insists on this mode
        // The bind-mount target must exist; smtpd creates it on first start too.
        std::fs::create_dir_all("/var/spool/smtpd").expect("mkdir /var/spool/smtpd");
        let [port] = distinct_ports();
        let conf = d.join("smtpd.conf");
        std::fs::write(
            &conf,
            format!(
                "listen on 127.0.0.1 port {port} hostname localhost\n\
                 action \"local\" mbox\n\
                 match from any for local action \"local\"\n"
            ),
        )
        .expect("write smtpd.conf");
        let log = d.join("smtpd.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let script = format!(
            "mount --bind '{run}' /run && mount --bind '{spool}' /var/spool/smtpd && exec '{smtpd}' -d -f '{conf}'",
            run = run.display(),
            spool = spool.display(),
            smtpd = smtpd.display(),
            conf = conf.display(),
        );
        let mut cmd = Command::new(unshare);
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        let child = ChildGuard::spawn("smtpd", cmd);
        wait_for_port(port, Duration::from_secs(20), "smtpd", Some(&log));
        let dovecot = Dovecot::start_with_submission(port);
        Self {
            port,
            submission_port: dovecot.submission_port.expect("submission enabled"),
            submissions_port: dovecot.submissions_port.expect("submission enabled"),
            pki: dovecot.pki.clone(),
            log,
            child,
            dovecot,
            _dir: dir,
        }
    }

    /// Stops both servers now (their ports then refuse connections).
    pub fn stop(&mut self) {
        self.child.kill();
        wait_until_closed(self.port);
        self.dovecot.stop();
    }

    /// Both servers' logs so far, for assertion messages.
    pub fn log(&self) -> String {
        format!(
            "--- smtpd:\n{}\n--- dovecot:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            self.dovecot.log()
        )
    }
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `N` distinct ports that were free a moment ago (all are bound at once,
/// so two calls to [`crate::free_port`] cannot return the same port).
pub(crate) fn distinct_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> =
        (0..N).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0")).collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr").port())
}

/// Waits until nothing accepts on `port` any more: killed daemons' worker
/// processes may hold the listening socket for a moment after the kill.
pub(crate) fn wait_until_closed(port: u16) {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    panic!("port {port} still accepts connections 10 s after the server was killed");
}
