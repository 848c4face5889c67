//! PostgreSQL and HTTP/HTTPS probes against real PostgreSQL 15 and nginx
//! servers started by the tests, hostile TCP peers, and a differential
//! comparison with the Nagios plugins check_pgsql and check_http.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_monitors::{FailureClass, ProbeResult, ProbeSpec, RunLimits, SecretSource, Status, build_probe, run_probe};
use tandem_testkit::nginx::{BASIC_USER, Nginx, OK_BODY};
use tandem_testkit::postgres::{DATABASE, PgServer, USER};
use tandem_testkit::{free_port, require_program};

const NAGIOS: &str = "/usr/lib/nagios/plugins";

fn limits(secs: f64) -> RunLimits {
    RunLimits { timeout: Duration::from_secs_f64(secs), warning: None }
}

fn write_password(dir: &Path, name: &str, pw: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{pw}\n")).unwrap();
    p
}

fn pg_spec(port: u16, pwfile: Option<&Path>, opts: &[(&str, &str)]) -> ProbeSpec {
    ProbeSpec {
        target: format!("postgresql://{USER}@127.0.0.1:{port}/{DATABASE}"),
        options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        password: pwfile.map(|p| SecretSource::File(p.to_path_buf())),
        limits: limits(10.0),
        ..Default::default()
    }
}

fn http_spec(url: &str, opts: &[(&str, &str)]) -> ProbeSpec {
    ProbeSpec {
        target: url.to_string(),
        options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        limits: limits(10.0),
        ..Default::default()
    }
}

async fn run(spec: &ProbeSpec) -> ProbeResult {
    let probe = build_probe(spec).unwrap_or_else(|e| panic!("build {}: {e}", spec.target));
    run_probe(probe.as_ref(), spec.limits).await
}

#[track_caller]
fn assert_ok(r: &ProbeResult, needle: &str) {
    assert_eq!((r.status, r.class), (Status::Ok, None), "{r:?}");
    assert!(r.reason.contains(needle), "reason lacks {needle:?}: {r:?}");
}

#[track_caller]
fn assert_fail(r: &ProbeResult, class: FailureClass, needle: &str) {
    assert_eq!((r.status, r.class), (Status::Critical, Some(class)), "{r:?}");
    assert!(r.reason.contains(needle), "reason lacks {needle:?}: {r:?}");
}

/// A TCP peer (on its own OS thread, independent of any runtime) that
/// accepts connections and never says anything.
fn silent_peer() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    port
}

/// A TCP peer that reads a little and answers bytes that are neither HTTP
/// nor the PostgreSQL protocol, then closes.
fn garbage_peer() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let mut junk = b"\x00\xff\x13GARBAGE \x7f\x01 not a protocol\r\n".to_vec();
                junk.extend((0..2000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
                let _ = s.write_all(&junk);
                std::thread::sleep(Duration::from_millis(100));
            });
        }
    });
    port
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    free_port()
}

// ---------------------------------------------------------------- PostgreSQL

#[tokio::test]
async fn postgres_healthy_at_every_level_and_over_tls() {
    let pg = PgServer::start();
    let pw = write_password(pg.dir(), "pw", pg.password());
    let ca = pg.pki().ca_cert.display().to_string();

    let r = run(&pg_spec(pg.port(), Some(&pw), &[])).await;
    assert_ok(&r, "PostgreSQL 15");
    assert!(r.reason.contains("SELECT 1 ok"), "{r:?}");

    // Two writes in a row: each writes a new random value and reads it back.
    for _ in 0..2 {
        let r = run(&pg_spec(pg.port(), Some(&pw), &[("level", "write")])).await;
        assert_ok(&r, "write to tandem_monitor read back ok");
    }
    let r = run(&pg_spec(pg.port(), Some(&pw), &[("level", "write"), ("table", "ops_probe")])).await;
    assert_ok(&r, "ops_probe");

    for _ in 0..2 {
        let r = run(&pg_spec(pg.port(), Some(&pw), &[("level", "ddl")])).await;
        assert_ok(&r, "created and dropped table tandem_ddl_");
    }
    // The ddl level leaves no tables behind.
    let out = psql(&pg, "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'tandem_ddl_%'");
    assert_eq!(out.trim(), "0", "ddl tables left behind");
    let out = psql(&pg, "SELECT count(*) FROM tandem_monitor");
    assert_eq!(out.trim(), "1", "write level should keep exactly one row");

    let r = run(&pg_spec(pg.port(), Some(&pw), &[("sslmode", "verify-full"), ("ca_file", &ca)])).await;
    assert_ok(&r, "TLS (certificate verified)");
    eprintln!("verify-full: {}", r.reason);
    // The certificate is for localhost/127.0.0.1, not for another name.
    let r = run(&pg_spec(
        pg.port(),
        Some(&pw),
        &[("sslmode", "verify-full"), ("ca_file", &ca), ("tls_server_name", "db.example.org")],
    ))
    .await;
    assert_fail(&r, FailureClass::Tls, "TLS");
    let r = run(&pg_spec(pg.port(), Some(&pw), &[("sslmode", "require"), ("level", "write")])).await;
    assert_ok(&r, "TLS (certificate not verified)");
    // verify-full against the public web PKI roots: the test CA is unknown.
    let r = run(&pg_spec(pg.port(), Some(&pw), &[("sslmode", "verify-full")])).await;
    assert_fail(&r, FailureClass::Tls, "TLS");
}

fn psql(pg: &PgServer, sql: &str) -> String {
    let psql = require_program("psql", "postgresql-client", &[]);
    let out = Command::new(psql)
        .args(["-h", "127.0.0.1", "-p", &pg.port().to_string(), "-U", USER, "-d", DATABASE, "-tAc", sql])
        .env("PGPASSWORD", pg.password())
        .output()
        .unwrap();
    assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn postgres_stopped_is_refused() {
    let mut pg = PgServer::start();
    let pw = write_password(pg.dir(), "pw", pg.password());
    let spec = pg_spec(pg.port(), Some(&pw), &[]);
    assert_ok(&run(&spec).await, "SELECT 1");
    pg.stop();
    for level in ["connect", "write", "ddl"] {
        let r = run(&pg_spec(pg.port(), Some(&pw), &[("level", level)])).await;
        assert_fail(&r, FailureClass::Refused, "refused");
    }
}

#[tokio::test]
async fn postgres_silent_peer_times_out_within_the_deadline() {
    let port = silent_peer();
    let mut spec = pg_spec(port, None, &[("level", "write")]);
    spec.limits = limits(1.0);
    let start = Instant::now();
    let r = run(&spec).await;
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    assert_fail(&r, FailureClass::Timeout, "timeout");
}

#[tokio::test]
async fn postgres_garbage_peer_is_a_protocol_failure() {
    let port = garbage_peer();
    // Without TLS the reply to the startup message is garbage.
    let r = run(&pg_spec(port, None, &[])).await;
    assert_fail(&r, FailureClass::Protocol, "");
    let r = run(&pg_spec(port, None, &[("level", "write")])).await;
    assert_fail(&r, FailureClass::Protocol, "");
    // With sslmode=require the answer to SSLRequest is neither S nor N: the
    // driver reports that as a server without TLS, which is what it would
    // mean from a real server.
    let r = run(&pg_spec(port, None, &[("sslmode", "require")])).await;
    assert_fail(&r, FailureClass::Tls, "does not support TLS");
}

/// The salt (decoded) and iteration count of a role's SCRAM verifier
/// (`SCRAM-SHA-256$ITERATIONS:SALT$STOREDKEY:SERVERKEY` in pg_authid).
fn scram_salt(pg: &PgServer, role: &str) -> (Vec<u8>, u32) {
    let out = psql(
        pg,
        &format!(
            "SELECT split_part(v, ':', 1), encode(decode(split_part(v, ':', 2), 'base64'), 'hex') \
             FROM (SELECT split_part(rolpassword, '$', 2) AS v FROM pg_authid WHERE rolname = '{role}') s"
        ),
    );
    let (iterations, hex) = out.trim().split_once('|').unwrap_or_else(|| panic!("verifier of {role}: {out:?}"));
    let salt = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    (salt, iterations.parse().unwrap())
}

/// Whether the patched postgres-protocol's process-wide SCRAM cache holds
/// the SaltedPassword of this password for the role's current verifier.
fn scram_cached(pg: &PgServer, role: &str, password: &str) -> bool {
    let (salt, iterations) = scram_salt(pg, role);
    postgres_protocol::authentication::sasl::salted_password_is_cached(password.as_bytes(), &salt, iterations)
}

#[tokio::test]
async fn postgres_wrong_password_is_authentication_and_never_printed() {
    let pg = PgServer::start();
    // The right password first: its SaltedPassword is then cached, and must
    // not let a wrong password in (see third_party/postgres-protocol).
    let right = write_password(pg.dir(), "right", pg.password());
    assert_ok(&run(&pg_spec(pg.port(), Some(&right), &[])).await, "SELECT 1");
    assert!(scram_cached(&pg, USER, pg.password()));
    let wrong = format!("{}-but-wrong", pg.password());
    let pw = write_password(pg.dir(), "wrong", &wrong);
    let spec = pg_spec(pg.port(), Some(&pw), &[]);
    let probe = build_probe(&spec).unwrap();
    let debug = format!("{probe:?} {}", probe.target());
    let r = run_probe(probe.as_ref(), spec.limits).await;
    assert_fail(&r, FailureClass::Authentication, "28P01");
    for secret in [wrong.as_str(), pg.password()] {
        assert!(!r.reason.contains(secret), "password in reason: {r:?}");
        assert!(!debug.contains(secret), "password in Debug output: {debug}");
        assert!(!format!("{r:?}").contains(secret), "password in result Debug");
    }
    // Also over TLS (SCRAM with channel binding).
    let r = run(&pg_spec(pg.port(), Some(&pw), &[("sslmode", "require")])).await;
    assert_fail(&r, FailureClass::Authentication, "password authentication failed");
    // No password at all: the server asks for one; that is a configuration problem.
    let r = run(&pg_spec(pg.port(), None, &[])).await;
    assert_eq!(r.status, Status::Critical, "{r:?}");
    assert_eq!(r.class, Some(FailureClass::Config), "{r:?}");
    // A rejected login caches nothing; the right password still works.
    assert!(!scram_cached(&pg, USER, &wrong));
    assert_ok(&run(&pg_spec(pg.port(), Some(&right), &[])).await, "SELECT 1");
}

#[tokio::test]
async fn postgres_password_changed_on_the_server() {
    // The probe caches the SCRAM SaltedPassword per (password, salt,
    // iterations); a password change on the server (new salt) must be seen
    // at the next login, whichever side changes first.
    let pg = PgServer::start();
    psql(&pg, "CREATE ROLE rotating LOGIN PASSWORD 'first-pw'");
    let first = write_password(pg.dir(), "first", "first-pw");
    let second = write_password(pg.dir(), "second", "second-pw");
    let spec = |pw: &Path| {
        let mut s = pg_spec(pg.port(), Some(pw), &[]);
        s.target = format!("postgresql://rotating@127.0.0.1:{}/{DATABASE}", pg.port());
        s
    };
    for _ in 0..2 {
        assert_ok(&run(&spec(&first)).await, "SELECT 1");
    }
    assert!(scram_cached(&pg, "rotating", "first-pw"));
    let (old_salt, _) = scram_salt(&pg, "rotating");

    psql(&pg, "ALTER ROLE rotating PASSWORD 'second-pw'");
    assert_ne!(scram_salt(&pg, "rotating").0, old_salt, "a new verifier has a new salt");
    assert_fail(&run(&spec(&first)).await, FailureClass::Authentication, "28P01");
    assert!(!scram_cached(&pg, "rotating", "first-pw"));
    assert_ok(&run(&spec(&second)).await, "SELECT 1");
    assert!(scram_cached(&pg, "rotating", "second-pw"));

    // Back to the first password (a new salt again): the entry from its
    // first verifier is not what the login uses, and it works.
    psql(&pg, "ALTER ROLE rotating PASSWORD 'first-pw'");
    assert!(!scram_cached(&pg, "rotating", "first-pw"));
    assert_fail(&run(&spec(&second)).await, FailureClass::Authentication, "28P01");
    assert_ok(&run(&spec(&first)).await, "SELECT 1");
    assert!(scram_cached(&pg, "rotating", "first-pw"));
}

#[tokio::test]
async fn postgres_read_only_server_fails_write_levels_only() {
    let pg = PgServer::builder().read_only(true).start();
    let pw = write_password(pg.dir(), "pw", pg.password());
    let r = run(&pg_spec(pg.port(), Some(&pw), &[])).await;
    assert_ok(&r, "read-only transactions");
    for level in ["write", "ddl"] {
        let r = run(&pg_spec(pg.port(), Some(&pw), &[("level", level)])).await;
        assert_fail(&r, FailureClass::ReadOnly, "25006");
    }
}

#[tokio::test]
async fn postgres_hot_standby_fails_write_levels_only() {
    let primary = PgServer::start();
    let standby = primary.start_standby();
    assert!(standby.is_standby());
    let pw = write_password(primary.dir(), "pw", primary.password());
    let r = run(&pg_spec(standby.port(), Some(&pw), &[])).await;
    assert_ok(&r, "(standby)");
    for level in ["write", "ddl"] {
        let r = run(&pg_spec(standby.port(), Some(&pw), &[("level", level)])).await;
        assert_fail(&r, FailureClass::ReadOnly, "pg_is_in_recovery");
    }
    // The primary beside it is writable.
    let r = run(&pg_spec(primary.port(), Some(&pw), &[("level", "write")])).await;
    assert_ok(&r, "read back ok");
}

#[tokio::test]
async fn postgres_connection_task_does_not_outlive_the_check() {
    // A check cut off by its deadline, and one that succeeds, leave no
    // server session behind: the connection task is aborted either way.
    let pg = PgServer::start();
    let pw = write_password(pg.dir(), "pw", pg.password());
    for _ in 0..5 {
        assert_ok(&run(&pg_spec(pg.port(), Some(&pw), &[("level", "write")])).await, "read back ok");
    }
    let mut spec = pg_spec(pg.port(), Some(&pw), &[("level", "ddl")]);
    spec.limits = limits(0.001);
    for _ in 0..5 {
        let r = run(&spec).await;
        assert_eq!(r.class, Some(FailureClass::Timeout), "{r:?}");
    }
    let start = Instant::now();
    loop {
        let n = psql(&pg, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tandem-monitor'");
        if n.trim() == "0" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{} monitor sessions still open", n.trim());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- HTTP

#[tokio::test]
async fn http_statuses_bodies_and_redirects() {
    let ngx = Nginx::start();
    let r = run(&http_spec(&ngx.http_url("/ok"), &[])).await;
    assert_ok(&r, "200");

    let r = run(&http_spec(&ngx.http_url("/error"), &[])).await;
    assert_fail(&r, FailureClass::UnexpectedAnswer, "500");
    let r = run(&http_spec(&ngx.http_url("/error"), &[("expect", "500")])).await;
    assert_ok(&r, "500");
    let r = run(&http_spec(&ngx.http_url("/missing"), &[])).await;
    assert_fail(&r, FailureClass::UnexpectedAnswer, "404");

    let r = run(&http_spec(&ngx.http_url("/ok"), &[("body_regex", "all systems nomin[a]l")])).await;
    assert_ok(&r, "body matches");
    let r = run(&http_spec(&ngx.http_url("/ok"), &[("body_regex", "^degraded")])).await;
    assert_fail(&r, FailureClass::UnexpectedAnswer, "does not match");

    // Redirects are not followed by default; 3xx is in the default set.
    let r = run(&http_spec(&ngx.http_url("/redirect"), &[])).await;
    assert_ok(&r, "301");
    let r = run(&http_spec(&ngx.http_url("/redirect"), &[("expect", "200")])).await;
    assert_fail(&r, FailureClass::UnexpectedAnswer, "301");
    let r = run(&http_spec(
        &ngx.http_url("/redirect"),
        &[("follow_redirects", "true"), ("expect", "200"), ("body_regex", "nominal")],
    ))
    .await;
    assert_ok(&r, "after redirects");

    // HEAD, custom headers.
    let r =
        run(&http_spec(&ngx.http_url("/ok"), &[("method", "HEAD"), ("header", "X-Probe: tandem\nAccept: */*")])).await;
    assert_ok(&r, "200");

    // The body read is bounded: the marker after 3 MiB is not seen...
    let r = run(&http_spec(&ngx.http_url("/big"), &[("body_regex", "nominal")])).await;
    assert_fail(&r, FailureClass::UnexpectedAnswer, "first 1048576 bytes");
    // ...unless max_body allows it.
    let r = run(&http_spec(&ngx.http_url("/big"), &[("body_regex", "nominal"), ("max_body", "4000000")])).await;
    assert_ok(&r, "body matches");
    assert!(OK_BODY.contains("nominal"));
}

#[tokio::test]
async fn https_verification() {
    let ngx = Nginx::start();
    let ca = ngx.pki().ca_cert.display().to_string();
    let r = run(&http_spec(&ngx.https_url("/ok"), &[("ca_file", &ca), ("body_regex", "nominal")])).await;
    assert_ok(&r, "200");
    let r = run(&http_spec(&ngx.https_url("/ok"), &[])).await;
    assert_fail(&r, FailureClass::Tls, "");
    let r = run(&http_spec(&ngx.https_url("/ok"), &[("insecure", "true")])).await;
    assert_ok(&r, "200");
    // Speaking TLS to the plain port, and plain HTTP to the TLS port.
    let r = run(&http_spec(&format!("https://127.0.0.1:{}/ok", ngx.http_port()), &[("ca_file", &ca)])).await;
    assert_eq!(r.status, Status::Critical, "{r:?}");
    assert!(matches!(r.class, Some(FailureClass::Tls | FailureClass::Protocol)), "{r:?}");
    let r = run(&http_spec(&format!("http://127.0.0.1:{}/ok", ngx.https_port()), &[])).await;
    // nginx answers plain HTTP on a TLS port with a 400 page.
    assert_fail(&r, FailureClass::UnexpectedAnswer, "400");
}

#[tokio::test]
async fn http_stopped_silent_and_garbage_peers() {
    let mut ngx = Nginx::start();
    let url = ngx.http_url("/ok");
    let spec = http_spec(&url, &[]);
    let probe = build_probe(&spec).unwrap();
    // The same probe (one client) is reused across checks, as the scheduler does.
    assert_ok(&run_probe(probe.as_ref(), spec.limits).await, "200");
    ngx.stop();
    let r = run_probe(probe.as_ref(), spec.limits).await;
    assert_fail(&r, FailureClass::Refused, "");
    let r = run(&http_spec(&format!("https://127.0.0.1:{}/", closed_port()), &[("insecure", "true")])).await;
    assert_fail(&r, FailureClass::Refused, "");

    let silent = silent_peer();
    for scheme in ["http", "https"] {
        let mut spec = http_spec(&format!("{scheme}://127.0.0.1:{silent}/"), &[("insecure", "true")]);
        spec.limits = limits(1.0);
        let start = Instant::now();
        let r = run(&spec).await;
        assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
        assert_fail(&r, FailureClass::Timeout, "timeout");
    }

    let garbage = garbage_peer();
    let r = run(&http_spec(&format!("http://127.0.0.1:{garbage}/"), &[])).await;
    assert_fail(&r, FailureClass::Protocol, "");
    let r = run(&http_spec(&format!("https://127.0.0.1:{garbage}/"), &[("insecure", "true")])).await;
    assert_fail(&r, FailureClass::Tls, "");
}

#[test]
fn bad_options_are_rejected_at_build_time() {
    for (url, key, value) in [
        ("http://127.0.0.1:1/", "expect", "2xx"),
        ("http://127.0.0.1:1/", "body_regex", "("),
        ("http://127.0.0.1:1/", "header", "no colon"),
        ("http://127.0.0.1:1/", "method", "GE T"),
        ("postgresql://u@127.0.0.1:1/db", "level", "deep"),
        ("postgresql://u@127.0.0.1:1/db", "sslmode", "prefer"),
        ("postgresql://u@127.0.0.1:1/db", "table", "x; DROP TABLE y"),
    ] {
        let e = build_probe(&http_spec(url, &[(key, value)])).unwrap_err().to_string();
        assert!(e.contains(key), "{url} {key}={value}: {e}");
    }
    let e = build_probe(&http_spec("postgresql://127.0.0.1:1/db", &[])).unwrap_err().to_string();
    assert!(e.contains("user"), "{e}");
}

// ---------------------------------------------------------------- differential

/// Cases where Tandem's OK/not-OK verdict differs from the Nagios plugin's
/// on purpose (see docs/monitors-postgresql-http.md). Every other case must
/// agree, and these must keep differing, so the table stays true.
const DELIBERATE_DIFFERENCES: &[(&str, &str)] = &[
    ("pg: write level on a read-only server", "check_pgsql only connects; Tandem's write level needs writes"),
    ("pg: ddl level on a hot standby", "check_pgsql only connects; Tandem's ddl level needs writes"),
    ("http: https without ca_file", "check_http -S does not verify certificates; Tandem verifies by default"),
    ("http: body_regex beyond max_body", "check_http reads the whole body; Tandem reads at most max_body (1 MiB)"),
];

struct Case {
    name: &'static str,
    tandem: ProbeResult,
    nagios_status: Status,
    nagios_output: String,
}

fn nagios(plugin: &str, args: &[String]) -> (Status, String) {
    let path = require_program(plugin, "monitoring-plugins-standard", &[NAGIOS]);
    let out = Command::new(path).args(args).output().unwrap();
    let code = out.status.code().unwrap_or(3);
    (Status::from_exit_code(code), String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn check_pgsql(port: u16, password: &str, db: &str) -> (Status, String) {
    let args: Vec<String> =
        ["-H", "127.0.0.1", "-P", &port.to_string(), "-d", db, "-l", USER, "-p", password, "-t", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    nagios("check_pgsql", &args)
}

fn check_http(port: u16, path: &str, extra: &[&str]) -> (Status, String) {
    let mut args: Vec<String> =
        ["-I", "127.0.0.1", "-p", &port.to_string(), "-u", path, "-t", "3"].iter().map(|s| s.to_string()).collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    nagios("check_http", &args)
}

/// Tandem's own verdict for each differential case: None = OK, else the
/// failure class (always CRITICAL).
fn tandem_expected(name: &str) -> Option<FailureClass> {
    use FailureClass::*;
    match name {
        "pg: healthy" | "pg: healthy, write level" | "pg: read-only server, connect" | "pg: hot standby, connect" => {
            None
        }
        "pg: wrong password" => Some(Authentication),
        "pg: unknown database" => Some(UnexpectedAnswer),
        "pg: write level on a read-only server" | "pg: ddl level on a hot standby" => Some(ReadOnly),
        "pg: silent peer" | "http: silent peer" => Some(Timeout),
        "pg: garbage peer" | "http: garbage peer" => Some(Protocol),
        "pg: stopped" | "http: stopped" | "https: stopped" => Some(Refused),
        "http: 200"
        | "http: body regex matches"
        | "http: 301 not followed"
        | "http: 301 followed"
        | "http: https with ca_file"
        | "http: https insecure" => None,
        "http: 500"
        | "http: 404"
        | "http: body regex does not match"
        | "http: 301 with expect=200"
        | "http: body_regex beyond max_body" => Some(UnexpectedAnswer),
        "http: https without ca_file" => Some(Tls),
        other => panic!("differential case {other:?} has no expected Tandem verdict"),
    }
}

fn judge(cases: &[Case]) {
    let mut report = String::new();
    let mut wrong = Vec::new();
    for c in cases {
        let (t, n) = (c.tandem.status == Status::Ok, c.nagios_status == Status::Ok);
        let deliberate = DELIBERATE_DIFFERENCES.iter().find(|(name, _)| *name == c.name);
        report.push_str(&format!(
            "{:<40} tandem={:<8} nagios={:<8} {}\n    tandem: {}\n    nagios: {}\n",
            c.name,
            c.tandem.status.as_str(),
            c.nagios_status.as_str(),
            if deliberate.is_some() { "(deliberate difference)" } else { "" },
            c.tandem.reason,
            c.nagios_output.lines().next().unwrap_or(""),
        ));
        let ok = match deliberate {
            Some(_) => t != n,
            None => t == n,
        };
        let expected = tandem_expected(c.name);
        let expected_status = if expected.is_some() { Status::Critical } else { Status::Ok };
        if (c.tandem.status, c.tandem.class) != (expected_status, expected) {
            wrong.push(format!("{}: tandem {:?}, expected {expected_status} {expected:?}", c.name, c.tandem));
        }
        if !ok {
            wrong.push(format!("{}: tandem {:?} / nagios {:?} {}", c.name, c.tandem, c.nagios_status, c.nagios_output));
        }
    }
    eprintln!("{report}");
    assert!(wrong.is_empty(), "verdicts disagree with the differential table:\n{}", wrong.join("\n"));
}

#[tokio::test]
async fn differential_postgres_vs_check_pgsql() {
    let mut pg = PgServer::start();
    let ro = PgServer::builder().read_only(true).start();
    let standby = pg.start_standby();
    let pw = write_password(pg.dir(), "pw", pg.password());
    let wrong = write_password(pg.dir(), "wrong", "definitely-wrong");
    let silent = silent_peer();
    let garbage = garbage_peer();
    let ro_pw = write_password(ro.dir(), "pw", ro.password());
    let p = pg.password().to_string();
    let spec_db = |port: u16, pwf: &Path, db: &str, opts: &[(&str, &str)]| {
        let mut s = pg_spec(port, Some(pwf), opts);
        s.target = format!("postgresql://{USER}@127.0.0.1:{port}/{db}");
        s.limits = limits(3.0);
        s
    };

    let mut cases = Vec::new();
    macro_rules! case {
        ($name:expr, $spec:expr, $nagios:expr) => {{
            let tandem = run(&$spec).await;
            let (nagios_status, nagios_output) = $nagios;
            cases.push(Case { name: $name, tandem, nagios_status, nagios_output });
        }};
    }
    case!("pg: healthy", spec_db(pg.port(), &pw, DATABASE, &[]), check_pgsql(pg.port(), &p, DATABASE));
    case!(
        "pg: healthy, write level",
        spec_db(pg.port(), &pw, DATABASE, &[("level", "write")]),
        check_pgsql(pg.port(), &p, DATABASE)
    );
    case!(
        "pg: wrong password",
        spec_db(pg.port(), &wrong, DATABASE, &[]),
        check_pgsql(pg.port(), "definitely-wrong", DATABASE)
    );
    case!("pg: unknown database", spec_db(pg.port(), &pw, "no_such_db", &[]), check_pgsql(pg.port(), &p, "no_such_db"));
    case!("pg: read-only server, connect", spec_db(ro.port(), &ro_pw, DATABASE, &[]), {
        check_pgsql(ro.port(), ro.password(), DATABASE)
    });
    case!(
        "pg: write level on a read-only server",
        spec_db(ro.port(), &ro_pw, DATABASE, &[("level", "write")]),
        check_pgsql(ro.port(), ro.password(), DATABASE)
    );
    case!("pg: hot standby, connect", spec_db(standby.port(), &pw, DATABASE, &[]), {
        check_pgsql(standby.port(), &p, DATABASE)
    });
    case!(
        "pg: ddl level on a hot standby",
        spec_db(standby.port(), &pw, DATABASE, &[("level", "ddl")]),
        check_pgsql(standby.port(), &p, DATABASE)
    );
    case!("pg: silent peer", spec_db(silent, &pw, DATABASE, &[]), check_pgsql(silent, &p, DATABASE));
    case!("pg: garbage peer", spec_db(garbage, &pw, DATABASE, &[]), check_pgsql(garbage, &p, DATABASE));
    let port = pg.port();
    pg.stop();
    case!("pg: stopped", spec_db(port, &pw, DATABASE, &[]), check_pgsql(port, &p, DATABASE));
    drop(standby);
    judge(&cases);
}

#[tokio::test]
async fn differential_http_vs_check_http() {
    let mut ngx = Nginx::start();
    let ca = ngx.pki().ca_cert.display().to_string();
    let (hp, sp) = (ngx.http_port(), ngx.https_port());
    let silent = silent_peer();
    let garbage = garbage_peer();
    let spec = |url: String, opts: &[(&str, &str)]| {
        let mut s = http_spec(&url, opts);
        s.limits = limits(3.0);
        s
    };
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");
    let surl = |port: u16, path: &str| format!("https://127.0.0.1:{port}{path}");

    let mut cases = Vec::new();
    macro_rules! case {
        ($name:expr, $spec:expr, $nagios:expr) => {{
            let tandem = run(&$spec).await;
            let (nagios_status, nagios_output) = $nagios;
            cases.push(Case { name: $name, tandem, nagios_status, nagios_output });
        }};
    }
    case!("http: 200", spec(url(hp, "/ok"), &[]), check_http(hp, "/ok", &[]));
    case!("http: 500", spec(url(hp, "/error"), &[]), check_http(hp, "/error", &[]));
    case!("http: 404", spec(url(hp, "/missing"), &[]), check_http(hp, "/missing", &[]));
    case!(
        "http: body regex matches",
        spec(url(hp, "/ok"), &[("body_regex", "nominal")]),
        check_http(hp, "/ok", &["-r", "nominal"])
    );
    case!(
        "http: body regex does not match",
        spec(url(hp, "/ok"), &[("body_regex", "degraded")]),
        check_http(hp, "/ok", &["-r", "degraded"])
    );
    case!("http: 301 not followed", spec(url(hp, "/redirect"), &[]), check_http(hp, "/redirect", &[]));
    case!(
        "http: 301 with expect=200",
        spec(url(hp, "/redirect"), &[("expect", "200")]),
        check_http(hp, "/redirect", &["-e", "200"])
    );
    case!(
        "http: 301 followed",
        spec(url(hp, "/redirect"), &[("follow_redirects", "true"), ("body_regex", "nominal")]),
        check_http(hp, "/redirect", &["-f", "follow", "-r", "nominal"])
    );
    case!(
        "http: body_regex beyond max_body",
        spec(url(hp, "/big"), &[("body_regex", "nominal")]),
        check_http(hp, "/big", &["-r", "nominal"])
    );
    case!(
        "http: https with ca_file",
        spec(surl(sp, "/ok"), &[("ca_file", &ca)]),
        check_http(sp, "/ok", &["-S", "--sni", "-H", "localhost"])
    );
    case!("http: https without ca_file", spec(surl(sp, "/ok"), &[]), check_http(sp, "/ok", &["-S"]));
    case!("http: https insecure", spec(surl(sp, "/ok"), &[("insecure", "true")]), check_http(sp, "/ok", &["-S"]));
    case!("http: silent peer", spec(url(silent, "/"), &[]), check_http(silent, "/", &[]));
    case!("http: garbage peer", spec(url(garbage, "/"), &[]), check_http(garbage, "/", &[]));
    ngx.stop();
    case!("http: stopped", spec(url(hp, "/ok"), &[]), check_http(hp, "/ok", &[]));
    case!("https: stopped", spec(surl(sp, "/ok"), &[("ca_file", &ca)]), check_http(sp, "/ok", &["-S"]));
    judge(&cases);
}

#[tokio::test]
async fn http_basic_auth_uses_the_password_source_only() {
    let ngx = Nginx::start();
    let url = format!("http://{BASIC_USER}@127.0.0.1:{}/private", ngx.http_port());
    let good = write_password(ngx.dir(), "pw", ngx.basic_password());
    let bad = write_password(ngx.dir(), "bad", "not-the-password");
    let with = |pw: &Path| {
        let mut s = http_spec(&url, &[("body_regex", "private ok")]);
        s.password = Some(SecretSource::File(pw.to_path_buf()));
        s
    };
    let r = run(&with(&good)).await;
    assert_ok(&r, "body matches");
    let probe = build_probe(&with(&bad)).unwrap();
    let r = run_probe(probe.as_ref(), limits(10.0)).await;
    assert_fail(&r, FailureClass::UnexpectedAnswer, "401");
    let shown = format!("{r:?} {probe:?} {}", probe.target());
    assert!(!shown.contains("not-the-password") && !shown.contains(ngx.basic_password()), "{shown}");
    // No credentials at all.
    let r = run(&http_spec(&ngx.http_url("/private"), &[])).await;
    assert_fail(&r, FailureClass::UnexpectedAnswer, "401");
    // A password inline in the URL is refused at build time, without echoing it.
    let e = build_probe(&http_spec(&format!("http://u:inline-secret@127.0.0.1:{}/", ngx.http_port()), &[]))
        .unwrap_err()
        .to_string();
    assert!(!e.contains("inline-secret"), "{e}");
}

/// A peer that answers the startup message with a header announcing a
/// 2 GiB message and then streams zeros as fast as it can.
fn flood_peer() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"R\x7f\xff\xff\xf0");
                let zeros = vec![0u8; 64 * 1024];
                while s.write_all(&zeros).is_ok() {}
            });
        }
    });
    port
}

#[tokio::test]
async fn postgres_flooding_peer_is_cut_off_early() {
    let port = flood_peer();
    let start = Instant::now();
    let r = run(&pg_spec(port, None, &[])).await;
    assert_fail(&r, FailureClass::Protocol, "more than");
    // Cut off by the read budget, not by the 10 s deadline.
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
}

#[tokio::test]
async fn postgres_write_level_works_for_a_role_without_create_rights() {
    let pg = PgServer::start();
    psql(
        &pg,
        "CREATE ROLE monitor LOGIN PASSWORD 'monitor-pw'; \
         CREATE TABLE tandem_monitor (id integer PRIMARY KEY, value text NOT NULL, \
                                      updated_at timestamptz NOT NULL DEFAULT now()); \
         GRANT SELECT, INSERT, UPDATE ON tandem_monitor TO monitor; \
         REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    );
    let pw = write_password(pg.dir(), "monitor-pw", "monitor-pw");
    let spec = |level: &str| {
        let mut s = pg_spec(pg.port(), Some(&pw), &[("level", level)]);
        s.target = format!("postgresql://monitor@127.0.0.1:{}/{DATABASE}", pg.port());
        s
    };
    assert_ok(&run(&spec("write")).await, "read back ok");
    assert_ok(&run(&spec("write")).await, "read back ok");
    // The ddl level needs CREATE on the schema; the server's refusal is an
    // unexpected answer, with its SQLSTATE (42501 insufficient_privilege).
    assert_fail(&run(&spec("ddl")).await, FailureClass::UnexpectedAnswer, "42501");
}
