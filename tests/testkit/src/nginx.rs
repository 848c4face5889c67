//! A real nginx on 127.0.0.1 in a temporary directory, with one plain HTTP
//! and one HTTPS listener (test PKI) serving fixed answers:
//!
//! | path        | answer                               |
//! |-------------|--------------------------------------|
//! | `/ok`       | 200, body [`OK_BODY`]                |
//! | `/error`    | 500, body `internal trouble`         |
//! | `/missing`  | 404                                  |
//! | `/redirect` | 301 to `/ok`                         |
//! | `/big`      | 200, about 3 MiB of `x` then [`OK_BODY`] |
//! | `/private`  | basic auth ([`BASIC_USER`], [`Nginx::basic_password`]), then 200 `private ok` |

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::certs::{TestPki, make_pki};
use crate::{ChildGuard, free_port, require_program, wait_for_port};

/// The user `/private` accepts.
pub const BASIC_USER: &str = "tandem";

/// The body of `/ok`.
pub const OK_BODY: &str = "tandem-ok: all systems nominal\n";

/// A running nginx; killed on drop.
#[derive(Debug)]
pub struct Nginx {
    child: Option<ChildGuard>,
    http_port: u16,
    https_port: u16,
    pki: TestPki,
    basic_password: String,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Writes the configuration and starts nginx; panics with its error
    /// log if it does not listen within 20 s.
    pub fn start() -> Self {
        let nginx = require_program("nginx", "nginx-light", &[]);
        let dir = tempfile::Builder::new().prefix("tandem-nginx-").tempdir().expect("tempdir");
        let d = dir.path();
        fs::create_dir_all(d.join("tmp")).expect("mkdir tmp");
        fs::create_dir_all(d.join("html")).expect("mkdir html");
        let pki = make_pki(d);
        let mut big = "x".repeat(3 * 1024 * 1024);
        big.push_str(OK_BODY);
        fs::write(d.join("html/big.txt"), big).expect("write big.txt");
        fs::write(d.join("html/private.txt"), "private ok\n").expect("write private.txt");
        let basic_password = format!("pw-{:016x}", crate::postgres::random_u64());
        fs::write(d.join("htpasswd"), format!("{BASIC_USER}:{{PLAIN}}{basic_password}\n")).expect("write htpasswd");
        // nginx workers drop to nobody; they must be able to read the docroot.
        for p in [d, &d.join("html"), &d.join("html/big.txt"), &d.join("html/private.txt"), &d.join("htpasswd")] {
            use std::os::unix::fs::PermissionsExt;
            let mode = if p.is_dir() { 0o755 } else { 0o644 };
            fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let http_port = free_port();
        let https_port = std::iter::repeat_with(free_port).find(|&p| p != http_port).expect("a second free port");
        let conf = format!(
            r#"worker_processes 1;
error_log {d}/error.log info;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log off;
    default_type text/plain;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {d}/html;
        location = /ok {{ return 200 "{ok}"; }}
        location = /error {{ return 500 "internal trouble\n"; }}
        location = /missing {{ return 404; }}
        location = /redirect {{ return 301 /ok; }}
        location = /big {{ try_files /big.txt =404; }}
        location = /private {{
            auth_basic "tandem";
            auth_basic_user_file {d}/htpasswd;
            try_files /private.txt =404;
        }}
    }}
}}
"#,
            d = d.display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
            ok = OK_BODY.replace('\n', "\\n"),
        );
        let conf_path = d.join("nginx.conf");
        fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(d)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = ChildGuard::spawn("nginx", cmd);
        let log = d.join("error.log");
        wait_for_port(http_port, Duration::from_secs(20), "nginx (http)", Some(&log));
        wait_for_port(https_port, Duration::from_secs(20), "nginx (https)", Some(&log));
        Self { child: Some(child), http_port, https_port, pki, basic_password, dir }
    }

    /// Port of the plain HTTP listener.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// Port of the HTTPS listener.
    pub fn https_port(&self) -> u16 {
        self.https_port
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// `https://127.0.0.1:PORT{path}`.
    pub fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https_port)
    }

    /// The password `/private` accepts for [`BASIC_USER`].
    pub fn basic_password(&self) -> &str {
        &self.basic_password
    }

    /// The PKI whose server certificate nginx presents.
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops nginx now and waits (up to 10 s) until both ports refuse
    /// connections: killed workers may hold the listening sockets a moment
    /// longer than the reaped master.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
        let start = Instant::now();
        for port in [self.http_port, self.https_port] {
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                assert!(start.elapsed() < Duration::from_secs(10), "nginx still accepts on {port} after SIGKILL");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
