//! Dovecot (IMAP and POP3) on loopback, self-contained: base_dir, state,
//! mail and the passwd-file live in a temporary directory; listeners for
//! imap, imaps, pop3 and pop3s on ephemeral ports; TLS from
//! [`crate::certs::make_pki`]. Mail is owned by `nobody`.
//!
//! Optionally also dovecot's SMTP submission service (STARTTLS, implicit
//! TLS, AUTH against the same passwd-file), relaying to another SMTP
//! server: see [`crate::smtpd`].

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::certs::{TestPki, make_pki};
use crate::smtpd::{distinct_ports, set_mode, wait_until_closed};
use crate::{ChildGuard, require_program, run_ok, wait_for_port};

/// The user the passwd-file knows.
pub const MAIL_USER: &str = "mailuser";
/// Its password (with a quote and a backslash, to exercise IMAP quoting).
pub const MAIL_PASSWORD: &str = "imap\"Pass\\42";

/// A running dovecot.
#[derive(Debug)]
pub struct Dovecot {
    /// IMAP (STARTTLS offered).
    pub imap_port: u16,
    /// IMAP over implicit TLS.
    pub imaps_port: u16,
    /// POP3 (STLS offered).
    pub pop3_port: u16,
    /// POP3 over implicit TLS.
    pub pop3s_port: u16,
    /// SMTP submission (STARTTLS and AUTH offered), when enabled.
    pub submission_port: Option<u16>,
    /// SMTP submission over implicit TLS, when enabled.
    pub submissions_port: Option<u16>,
    /// The PKI (clients trust `pki.ca_cert`).
    pub pki: TestPki,
    log: PathBuf,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Dovecot {
    /// Starts dovecot (IMAP and POP3) in the foreground and waits until
    /// all ports accept.
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// Like [`Dovecot::start`], plus the SMTP submission service relaying
    /// to the SMTP server on 127.0.0.1:`relay_port`. The passwd-file also
    /// knows [`crate::smtpd::SMTP_USER`].
    pub fn start_with_submission(relay_port: u16) -> Self {
        Self::start_inner(Some(relay_port))
    }

    fn start_inner(relay_port: Option<u16>) -> Self {
        let dovecot = require_program("dovecot", "dovecot-imapd dovecot-pop3d", &[]);
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // Login and mail processes run unprivileged and must reach the files.
        set_mode(d, 0o755);
        let pki = make_pki(d);
        let passwd = d.join("passwd");
        std::fs::write(
            &passwd,
            format!(
                "{MAIL_USER}:{{PLAIN}}{MAIL_PASSWORD}\n{}:{{PLAIN}}{}\n",
                crate::smtpd::SMTP_USER,
                crate::smtpd::SMTP_PASSWORD
            ),
        )
        .expect("passwd");
        let mail = d.join("mail");
        std::fs::create_dir(&mail).expect("mkdir mail");
        run_ok("chown mail dir", Command::new("chown").arg("nobody:nogroup").arg(&mail));
        let ports: [u16; 6] = distinct_ports();
        let [imap_port, imaps_port, pop3_port, pop3s_port, sub_port, subs_port] = ports;
        let submission = match relay_port {
            None => String::new(),
            Some(relay) => format!(
                r#"hostname = localhost
submission_relay_host = 127.0.0.1
submission_relay_port = {relay}
service submission-login {{
  inet_listener submission {{
    address = 127.0.0.1
    port = {sub_port}
  }}
  inet_listener submissions {{
    address = 127.0.0.1
    port = {subs_port}
    ssl = yes
  }}
}}
"#
            ),
        };
        let protocols = if relay_port.is_some() { "imap pop3 submission" } else { "imap pop3" };
        let conf = d.join("dovecot.conf");
        let p = |x: &std::path::Path| x.display().to_string();
        std::fs::write(
            &conf,
            format!(
                r#"base_dir = {dir}/run
state_dir = {dir}/state
instance_name = tandem-test-{imap_port}
log_path = /dev/stderr
protocols = {protocols}
listen = 127.0.0.1
ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_failure_delay = 0
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {passwd}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home={mail}/%u
}}
mail_location = maildir:{mail}/%u/Maildir
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3_port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {pop3s_port}
    ssl = yes
  }}
}}
{submission}"#,
                dir = p(d),
                cert = p(&pki.server_cert),
                key = p(&pki.server_key),
                passwd = p(&passwd),
                mail = p(&mail),
            ),
        )
        .expect("write dovecot.conf");
        let log = d.join("dovecot.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(dovecot);
        cmd.arg("-F").arg("-c").arg(&conf).stdin(Stdio::null()).stdout(logf.try_clone().expect("dup log")).stderr(logf);
        let child = ChildGuard::spawn("dovecot", cmd);
        let (submission_port, submissions_port) = match relay_port {
            Some(_) => (Some(sub_port), Some(subs_port)),
            None => (None, None),
        };
        for port in
            [imap_port, imaps_port, pop3_port, pop3s_port].into_iter().chain(submission_port).chain(submissions_port)
        {
            wait_for_port(port, Duration::from_secs(20), "dovecot", Some(&log));
        }
        Self {
            imap_port,
            imaps_port,
            pop3_port,
            pop3s_port,
            submission_port,
            submissions_port,
            pki,
            log,
            child,
            _dir: dir,
        }
    }

    /// Stops the server now.
    pub fn stop(&mut self) {
        self.child.kill();
        let ports = [self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port];
        for port in ports.into_iter().chain(self.submission_port).chain(self.submissions_port) {
            wait_until_closed(port);
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
