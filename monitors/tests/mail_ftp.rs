//! SMTP, IMAP, POP3 and FTP probes against real servers (OpenSMTPD,
//! dovecot, vsftpd) and hostile peers, all on loopback; plus a
//! differential test against the monitoring-plugins programs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tandem_monitors::{FailureClass, ProbeResult, ProbeSpec, RunLimits, SecretSource, Status, build_probe, run_probe};
use tandem_testkit::dovecot::{Dovecot, MAIL_PASSWORD, MAIL_USER};
use tandem_testkit::hostile::{Behaviour, HostileServer};
use tandem_testkit::smtpd::{SMTP_PASSWORD, SMTP_USER, Smtpd};
use tandem_testkit::vsftpd::{FTP_PASSWORD, FTP_USER, Vsftpd};
use tandem_testkit::{free_port, require_program};

const TIMEOUT: Duration = Duration::from_secs(8);
const WRONG_PASSWORD: &str = "Wr0ng-Pa55word-xyz";

/// A directory for password files, alive for the whole test binary.
fn secrets_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir")).path()
}

fn password_file(pw: &str) -> SecretSource {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let p = secrets_dir().join(format!("pw{n}"));
    std::fs::write(&p, format!("{pw}\n")).expect("write password file");
    SecretSource::File(p)
}

/// A spec for `target` with options and an optional password.
fn spec(target: String, opts: &[(&str, &str)], password: Option<&str>) -> ProbeSpec {
    ProbeSpec {
        target,
        options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        limits: RunLimits { timeout: TIMEOUT, warning: None },
        password: password.map(password_file),
        ..Default::default()
    }
}

async fn run(s: &ProbeSpec) -> ProbeResult {
    let probe = build_probe(s).unwrap_or_else(|e| panic!("build {}: {e}", s.target));
    run_probe(probe.as_ref(), s.limits).await
}

/// Runs the probe and checks status and failure class; returns the result.
async fn expect(s: &ProbeSpec, status: Status, class: Option<FailureClass>, log: &dyn Fn() -> String) -> ProbeResult {
    let r = run(s).await;
    assert_eq!((r.status, r.class), (status, class), "{} {:?}: {r:?}\nserver log:\n{}", s.target, s.options, log());
    r
}

/// Log stand-in once the server was stopped.
fn stopped() -> String {
    "(server stopped)".into()
}

fn ca(pki_ca: &Path) -> String {
    pki_ca.display().to_string()
}

fn assert_no_secret(r: &ProbeResult, secret: &str) {
    let dbg = format!("{r:?}");
    assert!(!dbg.contains(secret), "password leaked into the result: {dbg}");
}

// ---------------------------------------------------------------- SMTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_against_opensmtpd_and_dovecot_submission() {
    let mut srv = Smtpd::start();
    let log = || srv.log();
    let caf = ca(&srv.pki.ca_cert);
    let plain = format!("smtp://127.0.0.1:{}", srv.port);
    let sub = format!("smtp://127.0.0.1:{}", srv.submission_port);
    let smtps = format!("smtps://127.0.0.1:{}", srv.submissions_port);
    let with_user = |scheme: &str, port: u16| format!("{scheme}://{SMTP_USER}@127.0.0.1:{port}");

    // OpenSMTPD, plain.
    let r = expect(&spec(plain.clone(), &[], None), Status::Ok, None, &log).await;
    assert!(r.reason.contains("220") && r.reason.contains("OpenSMTPD"), "{r:?}");
    expect(&spec(plain.clone(), &[("ehlo", "probe.example")], None), Status::Ok, None, &log).await;
    // It offers neither STARTTLS nor AUTH.
    expect(
        &spec(plain.clone(), &[("starttls", "true")], None),
        Status::Critical,
        Some(FailureClass::UnexpectedAnswer),
        &log,
    )
    .await;
    let r = expect(
        &spec(with_user("smtp", srv.port), &[], Some(SMTP_PASSWORD)),
        Status::Critical,
        Some(FailureClass::UnexpectedAnswer),
        &log,
    )
    .await;
    assert!(r.reason.contains("AUTH"), "{r:?}");

    // Dovecot submission: STARTTLS, implicit TLS, AUTH.
    expect(&spec(sub.clone(), &[], None), Status::Ok, None, &log).await;
    expect(&spec(sub.clone(), &[("starttls", "true"), ("ca_file", &caf)], None), Status::Ok, None, &log).await;
    expect(&spec(smtps.clone(), &[("ca_file", &caf)], None), Status::Ok, None, &log).await;
    // Without the test CA the web PKI roots do not trust the certificate...
    expect(&spec(smtps.clone(), &[], None), Status::Critical, Some(FailureClass::Tls), &log).await;
    expect(&spec(sub.clone(), &[("starttls", "true")], None), Status::Critical, Some(FailureClass::Tls), &log).await;
    // ... unless verification is explicitly off.
    expect(&spec(smtps.clone(), &[("insecure", "true")], None), Status::Ok, None, &log).await;
    let tls_opts = [("starttls", "true"), ("ca_file", caf.as_str())];
    let r =
        expect(&spec(with_user("smtp", srv.submission_port), &tls_opts, Some(SMTP_PASSWORD)), Status::Ok, None, &log)
            .await;
    assert!(r.reason.contains("AUTH"), "{r:?}");
    expect(
        &spec(with_user("smtps", srv.submissions_port), &[("ca_file", &caf)], Some(SMTP_PASSWORD)),
        Status::Ok,
        None,
        &log,
    )
    .await;
    let r = expect(
        &spec(with_user("smtp", srv.submission_port), &tls_opts, Some(WRONG_PASSWORD)),
        Status::Critical,
        Some(FailureClass::Authentication),
        &log,
    )
    .await;
    assert_no_secret(&r, WRONG_PASSWORD);
    let p = build_probe(&spec(with_user("smtp", srv.submission_port), &tls_opts, Some(WRONG_PASSWORD))).unwrap();
    assert!(!format!("{p:?} {}", p.target()).contains(WRONG_PASSWORD));

    srv.stop();
    for target in [plain, sub] {
        expect(&spec(target, &[], None), Status::Critical, Some(FailureClass::Refused), &stopped).await;
    }
    expect(&spec(smtps, &[("ca_file", &caf)], None), Status::Critical, Some(FailureClass::Refused), &stopped).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_starttls_refused_when_not_advertised() {
    // A server that answers EHLO without STARTTLS.
    let srv = HostileServer::start(Behaviour::greeting(&["220 tiny ESMTP", "250-tiny", "250 8BITMIME"]));
    let r = run(&spec(format!("smtp://127.0.0.1:{}", srv.port()), &[("starttls", "true")], None)).await;
    assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::UnexpectedAnswer)), "{r:?}");
    assert!(r.reason.contains("STARTTLS"), "{r:?}");
}

// ---------------------------------------------------------------- IMAP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imap_against_dovecot() {
    let mut srv = Dovecot::start();
    let log = || srv.log();
    let caf = ca(&srv.pki.ca_cert);
    let plain = format!("imap://127.0.0.1:{}", srv.imap_port);
    let imaps = format!("imaps://127.0.0.1:{}", srv.imaps_port);
    let user_plain = format!("imap://{MAIL_USER}@127.0.0.1:{}", srv.imap_port);
    let user_imaps = format!("imaps://{MAIL_USER}@127.0.0.1:{}", srv.imaps_port);

    expect(&spec(plain.clone(), &[], None), Status::Ok, None, &log).await;
    expect(&spec(plain.clone(), &[("starttls", "yes"), ("ca_file", &caf)], None), Status::Ok, None, &log).await;
    expect(&spec(imaps.clone(), &[("ca_file", &caf)], None), Status::Ok, None, &log).await;
    expect(&spec(imaps.clone(), &[], None), Status::Critical, Some(FailureClass::Tls), &log).await;
    expect(&spec(plain.clone(), &[("starttls", "yes")], None), Status::Critical, Some(FailureClass::Tls), &log).await;
    // The password holds a quote and a backslash: LOGIN must quote them.
    let r = expect(&spec(user_plain.clone(), &[], Some(MAIL_PASSWORD)), Status::Ok, None, &log).await;
    assert!(r.reason.contains("LOGIN"), "{r:?}");
    expect(&spec(user_imaps.clone(), &[("ca_file", &caf)], Some(MAIL_PASSWORD)), Status::Ok, None, &log).await;
    expect(
        &spec(user_plain.clone(), &[("starttls", "yes"), ("ca_file", &caf)], Some(MAIL_PASSWORD)),
        Status::Ok,
        None,
        &log,
    )
    .await;
    let r = expect(
        &spec(user_plain.clone(), &[], Some(WRONG_PASSWORD)),
        Status::Critical,
        Some(FailureClass::Authentication),
        &log,
    )
    .await;
    assert_no_secret(&r, WRONG_PASSWORD);

    srv.stop();
    expect(&spec(plain, &[], None), Status::Critical, Some(FailureClass::Refused), &stopped).await;
    expect(&spec(imaps, &[("ca_file", &caf)], None), Status::Critical, Some(FailureClass::Refused), &stopped).await;
}

// ---------------------------------------------------------------- POP3

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop3_against_dovecot() {
    let mut srv = Dovecot::start();
    let log = || srv.log();
    let caf = ca(&srv.pki.ca_cert);
    let plain = format!("pop3://127.0.0.1:{}", srv.pop3_port);
    let pop3s = format!("pop3s://127.0.0.1:{}", srv.pop3s_port);
    let user_plain = format!("pop3://{MAIL_USER}@127.0.0.1:{}", srv.pop3_port);
    let user_pop3s = format!("pop3s://{MAIL_USER}@127.0.0.1:{}", srv.pop3s_port);

    expect(&spec(plain.clone(), &[], None), Status::Ok, None, &log).await;
    expect(&spec(plain.clone(), &[("starttls", "true"), ("ca_file", &caf)], None), Status::Ok, None, &log).await;
    expect(&spec(pop3s.clone(), &[("ca_file", &caf)], None), Status::Ok, None, &log).await;
    expect(&spec(pop3s.clone(), &[], None), Status::Critical, Some(FailureClass::Tls), &log).await;
    expect(&spec(plain.clone(), &[("starttls", "true")], None), Status::Critical, Some(FailureClass::Tls), &log).await;
    let r = expect(&spec(user_plain.clone(), &[], Some(MAIL_PASSWORD)), Status::Ok, None, &log).await;
    assert!(r.reason.contains("login"), "{r:?}");
    expect(&spec(user_pop3s.clone(), &[("ca_file", &caf)], Some(MAIL_PASSWORD)), Status::Ok, None, &log).await;
    expect(
        &spec(user_plain.clone(), &[("starttls", "true"), ("ca_file", &caf)], Some(MAIL_PASSWORD)),
        Status::Ok,
        None,
        &log,
    )
    .await;
    let r = expect(
        &spec(user_plain.clone(), &[], Some(WRONG_PASSWORD)),
        Status::Critical,
        Some(FailureClass::Authentication),
        &log,
    )
    .await;
    assert_no_secret(&r, WRONG_PASSWORD);

    srv.stop();
    expect(&spec(plain, &[], None), Status::Critical, Some(FailureClass::Refused), &stopped).await;
    expect(&spec(pop3s, &[("ca_file", &caf)], None), Status::Critical, Some(FailureClass::Refused), &stopped).await;
}

// ---------------------------------------------------------------- FTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ftp_against_vsftpd() {
    let mut srv = Vsftpd::start();
    let log = || srv.log();
    let plain = format!("ftp://127.0.0.1:{}", srv.port);
    let r = expect(&spec(plain.clone(), &[], None), Status::Ok, None, &log).await;
    assert!(r.reason.contains("Tandem test FTP"), "{r:?}");
    let r = expect(&spec(format!("ftp://anonymous@127.0.0.1:{}", srv.port), &[], None), Status::Ok, None, &log).await;
    assert!(r.reason.contains("login as anonymous"), "{r:?}");
    let user = format!("ftp://{FTP_USER}@127.0.0.1:{}", srv.port);
    expect(&spec(user.clone(), &[], Some(FTP_PASSWORD)), Status::Ok, None, &log).await;
    let r = expect(&spec(user, &[], Some(WRONG_PASSWORD)), Status::Critical, Some(FailureClass::Authentication), &log)
        .await;
    assert_no_secret(&r, WRONG_PASSWORD);
    srv.stop();
    expect(&spec(plain, &[], None), Status::Critical, Some(FailureClass::Refused), &stopped).await;
}

// ---------------------------------------------------------------- configuration

#[test]
fn configuration_errors_name_the_problem() {
    let err = |target: &str, opts: &[(&str, &str)], pw: Option<&str>| {
        build_probe(&spec(target.to_string(), opts, pw)).map(|_| ()).unwrap_err().to_string()
    };
    let e = err("smtps://h", &[("starttls", "true")], None);
    assert!(e.contains("starttls") && e.contains("implicit TLS"), "{e}");
    let e = err("imap://bob@h", &[], None);
    assert!(e.contains("bob") && e.contains("password"), "{e}");
    let e = err("smtp://h", &[("ehlo", "two words")], None);
    assert!(e.contains("ehlo"), "{e}");
    let e = err("pop3://h", &[("expect", "x")], None);
    assert!(e.contains("expect") && e.contains("starttls"), "{e}");
    let e = err("ftp://bob@h", &[], Some("pw\rQUIT"));
    assert!(e.contains("control characters") && !e.contains("QUIT"), "{e}");
    let e = err("ftp://bob:inline@h", &[], None);
    assert!(!e.contains("inline"), "{e}");
    // Default ports and anonymous FTP need no password.
    for (target, port) in [("smtp://h", 25), ("smtps://h", 465), ("imap://h", 143), ("imaps://h", 993)] {
        let p = build_probe(&spec(target.into(), &[], None)).unwrap();
        assert!(p.target().ends_with(&format!(":{port}")), "{}", p.target());
    }
    for (target, port) in [("pop3://h", 110), ("pop3s://h", 995), ("ftp://anonymous@h", 21)] {
        let p = build_probe(&spec(target.into(), &[], None)).unwrap();
        assert!(p.target().ends_with(&format!(":{port}")), "{}", p.target());
    }
}

// ---------------------------------------------------------------- hostile peers

/// Targets of every probe at `port`.
fn all_targets(port: u16) -> Vec<String> {
    ["smtp", "imap", "pop3", "ftp"].iter().map(|s| format!("{s}://127.0.0.1:{port}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_times_out_within_deadline() {
    let srv = HostileServer::start(Behaviour::Silent);
    for scheme in ["smtp", "smtps", "imap", "imaps", "pop3", "pop3s", "ftp"] {
        let mut s = spec(format!("{scheme}://127.0.0.1:{}", srv.port()), &[], None);
        s.limits.timeout = Duration::from_millis(800);
        let t = Instant::now();
        let r = run(&s).await;
        let took = t.elapsed();
        assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::Timeout)), "{scheme}: {r:?}");
        assert!(took < s.limits.timeout + Duration::from_secs(1), "{scheme} took {took:?}");
    }
    assert!(srv.accepted() >= 7, "the silent server saw {} connections", srv.accepted());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_greetings_are_critical_with_server_text() {
    let cases = [
        ("smtp", vec!["554 go away"], "554 go away"),
        ("smtp", vec!["421-busy", "421 try later"], "421 busy"),
        ("imap", vec!["* BYE shutting down"], "shutting down"),
        ("pop3", vec!["-ERR no"], "-ERR no"),
        ("ftp", vec!["421 busy"], "421 busy"),
        ("ftp", vec!["530-Not", " allowed here", "530 from your network"], "530 Not"),
    ];
    for (scheme, lines, text) in cases {
        let srv = HostileServer::start(Behaviour::greeting(&lines));
        let r = run(&spec(format!("{scheme}://127.0.0.1:{}", srv.port()), &[], None)).await;
        assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::UnexpectedAnswer)), "{scheme}: {r:?}");
        assert!(r.reason.contains(text), "{scheme}: reason {:?} lacks {text:?}", r.reason);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_a_protocol_failure() {
    let behaviours = [
        Behaviour::SendThenSilent(b"\x00\xff\x13garbage\x07\r\nmore garbage\r\n".to_vec()),
        Behaviour::SendThenClose(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
        Behaviour::EndlessLine,
        Behaviour::CloseImmediately,
    ];
    for b in behaviours {
        let srv = HostileServer::start(b.clone());
        for target in all_targets(srv.port()) {
            let t = Instant::now();
            let r = run(&spec(target.clone(), &[], None)).await;
            assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::Protocol)), "{target} {b:?}: {r:?}");
            assert!(t.elapsed() < TIMEOUT, "{target} {b:?} took {:?}", t.elapsed());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_a_good_greeting() {
    let cases = [
        ("smtp", vec!["220 ok", "250-x", "251 changed code"]),
        ("imap", vec!["* OK ready", "tnd1 MAYBE"]),
        ("imap", vec!["* OK ready", "+ send more"]),
        ("pop3", vec!["+OK ready", "+OKAY"]),
        ("ftp", vec!["220 ok", "USER? what"]),
    ];
    for (scheme, lines) in cases {
        let srv = HostileServer::start(Behaviour::greeting(&lines));
        // As anonymous, so the FTP probe sends a command after the greeting.
        let r = run(&spec(format!("{scheme}://anonymous@127.0.0.1:{}", srv.port()), &[], Some("x"))).await;
        assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::Protocol)), "{scheme} {lines:?}: {r:?}");
    }
}

/// Canned dialogues: a peer that sends all its answers at once; the probe
/// reads them in order, which exercises paths the real servers do not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canned_dialogues() {
    let cases: Vec<(&str, Vec<&str>, Status, Option<FailureClass>)> = vec![
        // AUTH LOGIN when PLAIN is not offered, success and failure.
        (
            "smtp://u@",
            vec![
                "220 x",
                "250-x",
                "250 AUTH LOGIN",
                "334 VXNlcm5hbWU6",
                "334 UGFzc3dvcmQ6",
                "235 ok",
                "250 ok",
                "221 bye",
            ],
            Status::Ok,
            None,
        ),
        (
            "smtp://u@",
            vec!["220 x", "250-x", "250 AUTH LOGIN", "334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "535 5.7.8 no"],
            Status::Critical,
            Some(FailureClass::Authentication),
        ),
        // Only mechanisms the probe does not speak.
        (
            "smtp://u@",
            vec!["220 x", "250-x", "250 AUTH CRAM-MD5"],
            Status::Critical,
            Some(FailureClass::UnexpectedAnswer),
        ),
        // EHLO refused.
        ("smtp://", vec!["220 x", "502 no EHLO"], Status::Critical, Some(FailureClass::UnexpectedAnswer)),
        // POP3 without CAPA support.
        ("pop3://u@", vec!["+OK hi", "-ERR what", "+OK", "+OK in", "+OK", "+OK bye"], Status::Ok, None),
        (
            "pop3://u@",
            vec!["+OK hi", "-ERR what", "-ERR no such user"],
            Status::Critical,
            Some(FailureClass::Authentication),
        ),
        // IMAP: PREAUTH skips LOGIN; untagged noise and a literal are skipped.
        (
            "imap://u@",
            vec!["* PREAUTH hi", "* CAPABILITY IMAP4rev1", "tnd1 OK", "* 1 FETCH (BODY {5}", "tnd9 )", "tnd2 OK"],
            Status::Ok,
            None,
        ),
        (
            "imap://u@",
            vec!["* OK hi", "* CAPABILITY IMAP4rev1 LOGINDISABLED", "tnd1 OK"],
            Status::Critical,
            Some(FailureClass::UnexpectedAnswer),
        ),
        (
            "imap://u@",
            vec!["* OK hi", "tnd1 OK", "tnd2 BAD syntax"],
            Status::Critical,
            Some(FailureClass::UnexpectedAnswer),
        ),
        // FTP: 120 then 220; an account requirement.
        ("ftp://", vec!["120 in 1 minute", "220 now"], Status::Ok, None),
        ("ftp://u@", vec!["220 x", "331 pass", "332 account"], Status::Critical, Some(FailureClass::UnexpectedAnswer)),
        ("ftp://u@", vec!["220 x", "230 welcome", "200 ok"], Status::Ok, None),
    ];
    for (prefix, lines, status, class) in cases {
        let srv = HostileServer::start(Behaviour::greeting(&lines));
        let r = run(&spec(format!("{prefix}127.0.0.1:{}", srv.port()), &[], Some(WRONG_PASSWORD))).await;
        assert_eq!((r.status, r.class), (status, class), "{prefix} {lines:?}: {r:?}");
        assert_no_secret(&r, WRONG_PASSWORD);
    }
}

/// SMTP with PIPELINING: NOOP and QUIT go out in one write. The NOOP reply
/// is judged as when sent alone, a missing or odd QUIT reply does not
/// change the verdict, and nothing waits past the deadline or hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_pipelined_noop_and_quit() {
    let ehlo = ["220 x", "250-x", "250-PIPELINING", "250 8BITMIME"];
    let with = |tail: &[&'static str]| ehlo.iter().chain(tail).copied().collect::<Vec<&str>>();
    let cases: Vec<(&str, Behaviour, Status, Option<FailureClass>, &str)> = vec![
        ("both replies", Behaviour::greeting(&with(&["250 2.0.0 ok", "221 bye"])), Status::Ok, None, "NOOP ok"),
        (
            "NOOP refused",
            Behaviour::greeting(&with(&["502 5.5.1 no NOOP here", "221 bye"])),
            Status::Critical,
            Some(FailureClass::UnexpectedAnswer),
            "NOOP refused: 502",
        ),
        (
            "NOOP answered with garbage",
            Behaviour::greeting(&with(&["2x0 what", "221 bye"])),
            Status::Critical,
            Some(FailureClass::Protocol),
            "malformed",
        ),
        (
            "NOOP reply changes code mid-reply",
            Behaviour::greeting(&with(&["250-ok", "221 bye"])),
            Status::Critical,
            Some(FailureClass::Protocol),
            "code changed",
        ),
        (
            "closed before the NOOP reply",
            Behaviour::SendThenClose(with(&[]).iter().flat_map(|l| [l.as_bytes(), b"\r\n"].concat()).collect()),
            Status::Critical,
            Some(FailureClass::Protocol),
            "connection closed waiting for the reply to NOOP",
        ),
        // The verdict is known after the NOOP reply; the goodbye is polite only.
        ("no QUIT reply, silent", Behaviour::greeting(&with(&["250 ok"])), Status::Ok, None, "NOOP ok"),
        (
            "garbage instead of the QUIT reply",
            Behaviour::greeting(&with(&["250 ok", "\x07?"])),
            Status::Ok,
            None,
            "NOOP ok",
        ),
    ];
    for (name, behaviour, status, class, text) in cases {
        let srv = HostileServer::start(behaviour);
        let mut s = spec(format!("smtp://127.0.0.1:{}", srv.port()), &[], None);
        s.limits.timeout = Duration::from_secs(3);
        let t = Instant::now();
        let r = run(&s).await;
        assert_eq!((r.status, r.class), (status, class), "{name}: {r:?}");
        assert!(r.reason.contains(text), "{name}: reason {:?} lacks {text:?}", r.reason);
        // A silent peer costs at most the 1 s goodbye wait, never the deadline.
        assert!(t.elapsed() < Duration::from_millis(2500), "{name} took {:?}", t.elapsed());
    }
    // Without PIPELINING, NOOP goes alone and a refusal is classified the same.
    let srv = HostileServer::start(Behaviour::greeting(&["220 x", "250 x", "500 no"]));
    let r = run(&spec(format!("smtp://127.0.0.1:{}", srv.port()), &[], None)).await;
    assert_eq!((r.status, r.class), (Status::Critical, Some(FailureClass::UnexpectedAnswer)), "{r:?}");
}

// ---------------------------------------------------------------- differential

fn plugin(name: &str) -> PathBuf {
    require_program(name, "monitoring-plugins-basic / monitoring-plugins-standard", &["/usr/lib/nagios/plugins"])
}

/// Runs a monitoring-plugins program; returns its status and output.
fn run_plugin(name: &str, args: &[String]) -> (Status, String) {
    let out = Command::new(plugin(name)).args(args).output().unwrap_or_else(|e| panic!("run {name}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (Status::from_exit_code(out.status.code().unwrap_or(3)), text)
}

/// Service verdict for an HA monitor: OK and WARNING mean "serving".
fn serving(s: Status) -> bool {
    matches!(s, Status::Ok | Status::Warning)
}

/// Whether Tandem and the plugin agree on a case, or differ on purpose.
#[derive(Debug, Clone, Copy)]
enum Agreement {
    Same,
    /// Differs on purpose; the string is the reason (docs/monitors-mail-ftp.md).
    Differs(&'static str),
}

struct Case {
    name: &'static str,
    spec: ProbeSpec,
    plugin: &'static str,
    args: Vec<String>,
    agreement: Agreement,
}

fn args(port: u16, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["-H", "127.0.0.1", "-t", "3", "-p"].iter().map(|s| s.to_string()).collect();
    v.push(port.to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

async fn check_cases(cases: Vec<Case>) {
    let mut report = Vec::new();
    for c in cases {
        let r = run(&c.spec).await;
        let (pstatus, pout) = tokio::task::spawn_blocking({
            let (p, a) = (c.plugin, c.args.clone());
            move || run_plugin(p, &a)
        })
        .await
        .expect("plugin thread");
        let (ours, theirs) = (serving(r.status), serving(pstatus));
        let ok = match c.agreement {
            Agreement::Same => ours == theirs,
            Agreement::Differs(why) => {
                eprintln!("{} / {}: differs on purpose: {why}", c.plugin, c.name);
                ours != theirs
            }
        };
        if !ok {
            report.push(format!(
                "{}: expected {:?}; tandem {} ({:?}: {}), {} {pstatus} ({})",
                c.name,
                c.agreement,
                r.status,
                r.class,
                r.reason,
                c.plugin,
                pout.trim()
            ));
        }
    }
    assert!(report.is_empty(), "differential mismatches:\n{}", report.join("\n"));
}

/// A spec for a hostile peer, with the same 3 s timeout the plugins get.
fn hostile_spec(target: String) -> ProbeSpec {
    let mut s = spec(target, &[], None);
    s.limits.timeout = Duration::from_secs(3);
    s
}

/// The hostile states every protocol is compared in; (name, behaviour).
fn hostile_states(greeting: &'static str) -> Vec<(&'static str, Behaviour)> {
    vec![
        ("silent", Behaviour::Silent),
        ("hostile greeting", Behaviour::greeting(&[greeting])),
        ("garbage", Behaviour::SendThenSilent(b"\x00\xffgarbage\r\n".to_vec())),
        ("close immediately", Behaviour::CloseImmediately),
    ]
}

const BYE_WARNING: &str = "the plugin reports an unexpected greeting only as WARNING (expect mismatch); \
     for failover a server that refuses sessions is down";
const GARBAGE_WARNING: &str = "the plugin reports garbage only as WARNING (expect mismatch)";
const CLOSE_WARNING: &str = "check_smtp reports a server that closes at once only as WARNING (recv() failed)";
const NO_STARTTLS_WARNING: &str = "check_smtp -S reports a server without STARTTLS only as WARNING; \
     TLS was configured as required, so Tandem fails the check";
const NO_LOGIN: &str = "the plugin cannot log in, so it cannot see bad credentials";
const NO_VERIFY: &str = "the plugin does not verify the certificate chain";

fn hostile_agreement(plugin: &str, state: &str) -> Agreement {
    match state {
        "close immediately" if plugin == "check_smtp" => Agreement::Differs(CLOSE_WARNING),
        // check_smtp waits for its expected "220" and times out: CRITICAL.
        _ if plugin == "check_smtp" => Agreement::Same,
        "hostile greeting" => Agreement::Differs(BYE_WARNING),
        "garbage" => Agreement::Differs(GARBAGE_WARNING),
        _ => Agreement::Same,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_smtp() {
    let mut srv = Smtpd::start();
    let caf = ca(&srv.pki.ca_cert);
    let p = srv.submission_port;
    let u = format!("smtp://{SMTP_USER}@127.0.0.1:{p}");
    let tls = [("starttls", "true"), ("ca_file", caf.as_str())];
    let mut cases = vec![
        Case {
            name: "healthy (OpenSMTPD)",
            spec: spec(format!("smtp://127.0.0.1:{}", srv.port), &[], None),
            plugin: "check_smtp",
            args: args(srv.port, &[]),
            agreement: Agreement::Same,
        },
        Case {
            name: "healthy (dovecot submission)",
            spec: spec(format!("smtp://127.0.0.1:{p}"), &[], None),
            plugin: "check_smtp",
            args: args(p, &[]),
            agreement: Agreement::Same,
        },
        Case {
            name: "starttls not offered (OpenSMTPD)",
            spec: spec(format!("smtp://127.0.0.1:{}", srv.port), &tls, None),
            plugin: "check_smtp",
            args: args(srv.port, &["-S"]),
            agreement: Agreement::Differs(NO_STARTTLS_WARNING),
        },
        Case {
            name: "starttls",
            spec: spec(format!("smtp://127.0.0.1:{p}"), &tls, None),
            plugin: "check_smtp",
            args: args(p, &["-S"]),
            agreement: Agreement::Same,
        },
        Case {
            name: "starttls without the CA",
            spec: spec(format!("smtp://127.0.0.1:{p}"), &[("starttls", "true")], None),
            plugin: "check_smtp",
            args: args(p, &["-S"]),
            agreement: Agreement::Differs(NO_VERIFY),
        },
        Case {
            name: "login",
            spec: spec(u.clone(), &tls, Some(SMTP_PASSWORD)),
            plugin: "check_smtp",
            args: args(p, &["-S", "-A", "LOGIN", "-U", SMTP_USER, "-P", SMTP_PASSWORD]),
            agreement: Agreement::Same,
        },
        Case {
            name: "wrong password",
            spec: spec(u.clone(), &tls, Some(WRONG_PASSWORD)),
            plugin: "check_smtp",
            args: args(p, &["-S", "-A", "LOGIN", "-U", SMTP_USER, "-P", WRONG_PASSWORD]),
            agreement: Agreement::Same,
        },
    ];
    let hostile: Vec<(&str, HostileServer)> =
        hostile_states("554 go away").into_iter().map(|(n, b)| (n, HostileServer::start(b))).collect();
    for (name, h) in &hostile {
        cases.push(Case {
            name,
            spec: hostile_spec(format!("smtp://127.0.0.1:{}", h.port())),
            plugin: "check_smtp",
            args: args(h.port(), &[]),
            agreement: hostile_agreement("check_smtp", name),
        });
    }
    check_cases(cases).await;
    let plain_port = srv.port;
    srv.stop();
    check_cases(vec![
        Case {
            name: "stopped (OpenSMTPD)",
            spec: spec(format!("smtp://127.0.0.1:{plain_port}"), &[], None),
            plugin: "check_smtp",
            args: args(plain_port, &[]),
            agreement: Agreement::Same,
        },
        Case {
            name: "stopped (submission)",
            spec: spec(format!("smtp://127.0.0.1:{p}"), &tls, None),
            plugin: "check_smtp",
            args: args(p, &["-S"]),
            agreement: Agreement::Same,
        },
    ])
    .await;
}

/// Shared cases for check_imap / check_pop against dovecot's ports.
fn mail_cases(
    scheme: &'static str,
    plugin: &'static str,
    ssl_plugin: &'static str,
    port: u16,
    tls_port: u16,
    caf: &str,
) -> Vec<Case> {
    let user = format!("{scheme}://{MAIL_USER}@127.0.0.1:{port}");
    vec![
        Case {
            name: "healthy",
            spec: spec(format!("{scheme}://127.0.0.1:{port}"), &[], None),
            plugin,
            args: args(port, &[]),
            agreement: Agreement::Same,
        },
        Case {
            name: "implicit TLS",
            spec: spec(format!("{scheme}s://127.0.0.1:{tls_port}"), &[("ca_file", caf)], None),
            plugin: ssl_plugin,
            args: args(tls_port, &[]),
            agreement: Agreement::Same,
        },
        Case {
            name: "implicit TLS without the CA",
            spec: spec(format!("{scheme}s://127.0.0.1:{tls_port}"), &[], None),
            plugin: ssl_plugin,
            args: args(tls_port, &[]),
            agreement: Agreement::Differs(NO_VERIFY),
        },
        Case {
            name: "login",
            spec: spec(user.clone(), &[], Some(MAIL_PASSWORD)),
            plugin,
            args: args(port, &[]),
            agreement: Agreement::Same,
        },
        Case {
            name: "wrong password",
            spec: spec(user, &[], Some(WRONG_PASSWORD)),
            plugin,
            args: args(port, &[]),
            agreement: Agreement::Differs(NO_LOGIN),
        },
    ]
}

fn hostile_cases(scheme: &'static str, plugin: &'static str, hostile: &[(&'static str, HostileServer)]) -> Vec<Case> {
    hostile
        .iter()
        .map(|(name, h)| Case {
            name,
            spec: hostile_spec(format!("{scheme}://127.0.0.1:{}", h.port())),
            plugin,
            args: args(h.port(), &[]),
            agreement: hostile_agreement(plugin, name),
        })
        .collect()
}

fn stopped_case(scheme: &'static str, plugin: &'static str) -> Case {
    let port = free_port();
    Case {
        name: "stopped",
        spec: spec(format!("{scheme}://127.0.0.1:{port}"), &[], None),
        plugin,
        args: args(port, &[]),
        agreement: Agreement::Same,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_imap_and_pop3() {
    let srv = Dovecot::start();
    let caf = ca(&srv.pki.ca_cert);
    let mut cases = mail_cases("imap", "check_imap", "check_simap", srv.imap_port, srv.imaps_port, &caf);
    cases.extend(mail_cases("pop3", "check_pop", "check_spop", srv.pop3_port, srv.pop3s_port, &caf));
    let imap_hostile: Vec<_> =
        hostile_states("* BYE shutting down").into_iter().map(|(n, b)| (n, HostileServer::start(b))).collect();
    let pop_hostile: Vec<_> =
        hostile_states("-ERR no").into_iter().map(|(n, b)| (n, HostileServer::start(b))).collect();
    cases.extend(hostile_cases("imap", "check_imap", &imap_hostile));
    cases.extend(hostile_cases("pop3", "check_pop", &pop_hostile));
    cases.push(stopped_case("imap", "check_imap"));
    cases.push(stopped_case("pop3", "check_pop"));
    check_cases(cases).await;
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn differential_ftp() {
    let srv = Vsftpd::start();
    let p = srv.port;
    let mut cases = vec![
        Case {
            name: "healthy",
            spec: spec(format!("ftp://127.0.0.1:{p}"), &[], None),
            plugin: "check_ftp",
            args: args(p, &[]),
            agreement: Agreement::Same,
        },
        Case {
            name: "anonymous login",
            spec: spec(format!("ftp://anonymous@127.0.0.1:{p}"), &[], None),
            plugin: "check_ftp",
            args: args(p, &[]),
            agreement: Agreement::Same,
        },
        Case {
            name: "wrong password",
            spec: spec(format!("ftp://{FTP_USER}@127.0.0.1:{p}"), &[], Some(WRONG_PASSWORD)),
            plugin: "check_ftp",
            args: args(p, &[]),
            agreement: Agreement::Differs(NO_LOGIN),
        },
    ];
    let hostile: Vec<_> = hostile_states("421 busy").into_iter().map(|(n, b)| (n, HostileServer::start(b))).collect();
    cases.extend(hostile_cases("ftp", "check_ftp", &hostile));
    cases.push(stopped_case("ftp", "check_ftp"));
    check_cases(cases).await;
    drop(srv);
}
