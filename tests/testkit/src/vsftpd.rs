//! vsftpd on loopback in the foreground: anonymous login (with a password
//! prompt) into an empty read-only root, and a local system user
//! [`FTP_USER`] authenticated through PAM.
//!
//! The local user is a real system account (vsftpd's PAM stack checks
//! /etc/shadow). It is created once with `useradd` (home `/`, shell
//! /bin/sh so pam_shells accepts it) and its password set with `chpasswd`
//! on every run; both are idempotent.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use crate::smtpd::{set_mode, wait_until_closed};
use crate::{ChildGuard, free_port, require_program, run_ok, wait_for_port};

/// The local FTP user.
pub const FTP_USER: &str = "tandemftp";
/// Its password.
pub const FTP_PASSWORD: &str = "ftp-Secret-0815";

/// A running vsftpd.
#[derive(Debug)]
pub struct Vsftpd {
    /// The control port.
    pub port: u16,
    log: PathBuf,
    child: ChildGuard,
    _dir: tempfile::TempDir,
}

static USER: Once = Once::new();

fn ensure_user() {
    USER.call_once(|| {
        let exists = Command::new("id").arg(FTP_USER).output().is_ok_and(|o| o.status.success());
        // vsftpd changes into the home directory before `local_root`, so
        // it must exist: "/" (read-only for the user anyway).
        if exists {
            run_ok("usermod", Command::new(require_program("usermod", "passwd", &[])).args(["--home", "/", FTP_USER]));
        } else {
            run_ok(
                "useradd",
                Command::new(require_program("useradd", "passwd", &[]))
                    .args(["--system", "--no-create-home", "--home-dir", "/", "--shell", "/bin/sh"])
                    .arg(FTP_USER),
            );
        }
        let mut child = Command::new(require_program("chpasswd", "passwd", &[]))
            .stdin(Stdio::piped())
            .spawn()
            .expect("run chpasswd");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{FTP_USER}:{FTP_PASSWORD}\n").as_bytes())
            .expect("write chpasswd");
        assert!(child.wait().expect("wait chpasswd").success(), "chpasswd failed for {FTP_USER}");
    });
}

impl Vsftpd {
    /// Starts vsftpd and waits until the port accepts.
    pub fn start() -> Self {
        let vsftpd = require_program("vsftpd", "vsftpd", &[]);
        ensure_user();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        set_mode(d, 0o755);
        let (root, empty) = (d.join("root"), d.join("empty"));
        for p in [&root, &empty] {
            std::fs::create_dir(p).expect("mkdir");
            set_mode(p, 0o555); // vsftpd refuses writable roots
        }
        let port = free_port();
        let log = d.join("vsftpd.log");
        let conf = d.join("vsftpd.conf");
        std::fs::write(
            &conf,
            format!(
                "listen=YES\nlisten_ipv6=NO\nbackground=NO\nlisten_address=127.0.0.1\nlisten_port={port}\n\
                 anonymous_enable=YES\nanon_root={root}\nno_anon_password=NO\n\
                 local_enable=YES\nlocal_root={root}\nwrite_enable=NO\n\
                 pasv_enable=NO\nport_enable=NO\nseccomp_sandbox=NO\nsecure_chroot_dir={empty}\n\
                 pam_service_name=vsftpd\nxferlog_enable=NO\nsyslog_enable=NO\n\
                 log_ftp_protocol=YES\nvsftpd_log_file={log}\nftpd_banner=Tandem test FTP\n",
                root = root.display(),
                empty = empty.display(),
                log = log.display(),
            ),
        )
        .expect("write vsftpd.conf");
        let stderr = std::fs::File::create(d.join("stderr.log")).expect("log file");
        let mut cmd = Command::new(vsftpd);
        cmd.arg(&conf).stdin(Stdio::null()).stdout(stderr.try_clone().expect("dup")).stderr(stderr);
        let child = ChildGuard::spawn("vsftpd", cmd);
        wait_for_port(port, Duration::from_secs(20), "vsftpd", Some(&d.join("stderr.log")));
        Self { port, log, child, _dir: dir }
    }

    /// Stops the server now.
    pub fn stop(&mut self) {
        self.child.kill();
        wait_until_closed(self.port);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
