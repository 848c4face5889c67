//! A real PostgreSQL 15 server on 127.0.0.1 in a temporary directory.
//!
//! PostgreSQL refuses to run as root, so every server program runs as the
//! `postgres` system user (the Debian package creates it) in a directory
//! owned by it. The test user is created by initdb with a SCRAM password;
//! pg_hba requires that password on TCP. SSL is on with the test PKI.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::certs::{TestPki, make_pki};
use crate::{ChildGuard, free_port, run_ok};

/// Where Debian puts the PostgreSQL 15 server programs.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The test user (a superuser created by initdb).
pub const USER: &str = "tandem";
/// The database the probes use.
pub const DATABASE: &str = "postgres";

/// Builder for [`PgServer`].
#[derive(Debug, Default, Clone)]
pub struct PgBuilder {
    read_only: bool,
}

impl PgBuilder {
    /// Sets `default_transaction_read_only = on`.
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    /// Runs initdb and starts the server; panics with its log on failure.
    pub fn start(self) -> PgServer {
        let postgres = postgres_user();
        let dir = tempfile::Builder::new().prefix("tandem-pg-").tempdir().expect("tempdir");
        chown(dir.path(), postgres);
        let password = format!("pw-{:016x}", random_u64());
        let pwfile = dir.path().join("pwfile");
        fs::write(&pwfile, format!("{password}\n")).expect("write pwfile");
        chown(&pwfile, postgres);
        let data = dir.path().join("data");
        run_ok(
            "initdb",
            as_postgres(&mut Command::new(program("initdb")), dir.path(), postgres)
                .arg("-D")
                .arg(&data)
                .args(["-U", USER, "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
                .arg(format!("--pwfile={}", pwfile.display())),
        );
        let pki = make_pki(dir.path());
        for f in [&pki.server_cert, &pki.server_key, &pki.ca_cert] {
            chown(f, postgres);
        }
        let port = free_port();
        let mut conf = format!(
            "\n# tandem testkit\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{dir}'\n\
             ssl = on\nssl_cert_file = '{cert}'\nssl_key_file = '{key}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 16MB\nmax_connections = 30\n\
             max_wal_senders = 4\nwal_level = replica\nhot_standby = on\nlogging_collector = off\n",
            dir = dir.path().display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
        );
        if self.read_only {
            conf.push_str("default_transaction_read_only = on\n");
        }
        append(&data.join("postgresql.conf"), &conf);
        let mut server = PgServer {
            child: None,
            port,
            password,
            data,
            log: dir.path().join("postgres.log"),
            pki,
            standby: false,
            dir,
        };
        server.spawn();
        server
    }
}

/// A running PostgreSQL server; stopped (fast shutdown) on drop.
#[derive(Debug)]
pub struct PgServer {
    child: Option<ChildGuard>,
    port: u16,
    password: String,
    data: PathBuf,
    log: PathBuf,
    pki: TestPki,
    standby: bool,
    dir: tempfile::TempDir,
}

impl PgServer {
    /// A primary with default settings.
    pub fn start() -> Self {
        PgBuilder::default().start()
    }

    /// A builder for other set-ups.
    pub fn builder() -> PgBuilder {
        PgBuilder::default()
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The test user's password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The test PKI whose server certificate the server presents.
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// The temporary directory (for password files and the like).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server log, for assertion messages.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether this server is a hot standby.
    pub fn is_standby(&self) -> bool {
        self.standby
    }

    /// Creates a hot standby of this server with pg_basebackup and starts
    /// it on a port of its own.
    pub fn start_standby(&self) -> PgServer {
        let postgres = postgres_user();
        let dir = tempfile::Builder::new().prefix("tandem-pg-standby-").tempdir().expect("tempdir");
        chown(dir.path(), postgres);
        let data = dir.path().join("data");
        run_ok(
            "pg_basebackup",
            as_postgres(&mut Command::new(program("pg_basebackup")), dir.path(), postgres)
                .env("PGPASSWORD", &self.password)
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER, "-X", "stream", "-D"])
                .arg(&data),
        );
        let port = free_port();
        // Later settings override the primary's copied ones.
        append(
            &data.join("postgresql.conf"),
            &format!(
                "\n# standby\nport = {port}\nunix_socket_directories = '{}'\n\
                 primary_conninfo = 'host=127.0.0.1 port={} user={USER} password={}'\n",
                dir.path().display(),
                self.port,
                self.password
            ),
        );
        let signal = data.join("standby.signal");
        File::create(&signal).expect("standby.signal");
        chown(&signal, postgres);
        let mut server = PgServer {
            child: None,
            port,
            password: self.password.clone(),
            data,
            log: dir.path().join("postgres.log"),
            pki: self.pki.clone(),
            standby: true,
            dir,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let postgres = postgres_user();
        let log = File::create(&self.log).expect("create postgres log");
        let mut cmd = Command::new(program("postgres"));
        as_postgres(&mut cmd, self.dir.path(), postgres).arg("-D").arg(&self.data);
        cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("dup log")).stderr(log);
        self.child = Some(ChildGuard::spawn("postgres", cmd));
        self.wait_ready();
    }

    /// Waits until pg_isready says the server accepts connections.
    fn wait_ready(&self) {
        let start = Instant::now();
        let timeout = Duration::from_secs(60);
        while start.elapsed() < timeout {
            let st = Command::new(program("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-d", DATABASE, "-U", USER])
                .status()
                .expect("run pg_isready");
            if st.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("PostgreSQL on port {} not ready within {timeout:?}; log:\n{}", self.port, self.log());
    }

    /// Stops the server (fast shutdown, then SIGKILL after 20 s). The port
    /// then refuses connections.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.pid() as libc::pid_t;
        // SAFETY: kill(2) on the postmaster we spawned; no memory is touched.
        unsafe { libc::kill(pid, libc::SIGINT) };
        // The postmaster removes its pid file on a clean exit.
        let pidfile = self.data.join("postmaster.pid");
        let start = Instant::now();
        while pidfile.exists() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        child.kill();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn program(name: &str) -> PathBuf {
    crate::require_program(name, "postgresql", &[PG_BIN])
}

/// uid and gid of the `postgres` system user.
fn postgres_user() -> (u32, u32) {
    let user = nix::unistd::User::from_name("postgres")
        .expect("look up the postgres user")
        .unwrap_or_else(|| panic!("no `postgres` system user: install the Debian package postgresql"));
    (user.uid.as_raw(), user.gid.as_raw())
}

fn as_postgres<'a>(cmd: &'a mut Command, cwd: &Path, (uid, gid): (u32, u32)) -> &'a mut Command {
    // std drops supplementary groups when uid/gid are set by root.
    cmd.uid(uid).gid(gid).current_dir(cwd).env("HOME", cwd).env_remove("PGPASSWORD").env("LC_ALL", "C.UTF-8")
}

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    if path.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).expect("chmod 700");
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f =
        fs::OpenOptions::new().append(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(text.as_bytes()).expect("append config");
}

/// A fresh random value (std's per-instance SipHash keys), for passwords.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}
