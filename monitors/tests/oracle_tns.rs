//! The Oracle TNS probe against a replaying peer.
//!
//! No Oracle server can run here. The peer below decodes what the probe
//! sends with its own minimal decoder (written from Wireshark's
//! `packet-tns.c` and python-oracledb's `messages/connect.pyx`, sharing no
//! code with the probe) and answers with packets built by hand from the
//! same sources. This verifies the probe against the protocol as those
//! sources describe it, not against a live listener.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use tandem_monitors::oracle::{self, Packet};
use tandem_monitors::{FailureClass, ProbeResult, ProbeSpec, RunLimits, Status, build_probe, run_probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------------
// Golden packets, built by hand. Header (Wireshark dissect_tns_pdu):
// length u16 BE, packet checksum u16, type u8, flags u8, header checksum u16.
// ---------------------------------------------------------------------

/// The tnsping CONNECT the probe must send for `oracle://HOST:PORT`.
/// Body layout: python-oracledb `ConnectMessage.send`, Wireshark
/// `dissect_tns_connect`.
fn golden_ping_connect() -> Vec<u8> {
    let mut v: Vec<u8> = vec![
        0x00, 0x67, // packet length 103 = 74 + 29
        0x00, 0x00, // packet checksum (unused)
        0x01, // type 1 = CONNECT
        0x00, // flags
        0x00, 0x00, // header checksum (unused)
        0x01, 0x3f, // version 319 (TNS_VERSION_DESIRED)
        0x01, 0x2c, // version compatible 300 (TNS_VERSION_MINIMUM)
        0x00, 0x01, // service options: TNS_GSO_DONT_CARE
        0x20, 0x00, // SDU 8192
        0x20, 0x00, // TDU (python-oracledb sends the SDU here too)
        0x4f, 0x98, // NT protocol characteristics (TNS_PROTOCOL_CHARACTERISTICS)
        0x00, 0x00, // line turnaround value
        0x00, 0x01, // value of 1 in hardware
        0x00, 0x1d, // connect data length 29
        0x00, 0x4a, // connect data offset 74
        0x00, 0x00, 0x00, 0x00, // max receivable connect data
        0x84, // connect flags 0: NSI support security renegotiation (0x80) | NA disabled (0x04)
        0x84, // connect flags 1: same
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // trace cross facility item 1 + 2 (obsolete)
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // trace unique connection id (obsolete)
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // third obsolete u64
        0x00, 0x00, 0x20, 0x00, // SDU, 32-bit
        0x00, 0x00, 0x20, 0x00, // TDU, 32-bit
        0x00, 0x00, 0x00, 0x00, // connect flags 1 (32-bit)
        0x00, 0x00, 0x00, 0x00, // connect flags 2 (32-bit): no OOB check
    ];
    assert_eq!(v.len(), 74, "hand-counted fixed part");
    v.extend_from_slice(b"(CONNECT_DATA=(COMMAND=ping))");
    assert_eq!(v.len(), 0x67, "hand-counted length");
    v
}

/// The documented tnsping answer: REFUSE carrying ERR=0.
fn golden_ping_refuse() -> Vec<u8> {
    let mut v: Vec<u8> = vec![
        0x00, 0x49, // packet length 73 = 8 + 4 + 61
        0x00, 0x00, // packet checksum
        0x04, // type 4 = REFUSE
        0x00, // flags
        0x00, 0x00, // header checksum
        0x22, // user reason (not interpreted by the references)
        0x00, // system reason
        0x00, 0x3d, // refuse data length 61
    ];
    v.extend_from_slice(b"(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=0)(ALIAS=LISTENER))");
    assert_eq!(v.len(), 0x49);
    v
}

/// REFUSE for an unknown service (ORA-12514).
fn golden_refuse_12514() -> Vec<u8> {
    let mut v: Vec<u8> = vec![
        0x00, 0x67, // packet length 103 = 8 + 4 + 91
        0x00, 0x00, // packet checksum
        0x04, // type 4 = REFUSE
        0x00, // flags
        0x00, 0x00, // header checksum
        0x22, // user reason
        0x00, // system reason
        0x00, 0x5b, // refuse data length 91
    ];
    v.extend_from_slice(b"(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=12514)(ERROR_STACK=(ERROR=(CODE=12514)(EMFI=4))))");
    assert_eq!(v.len(), 0x67);
    v
}

/// ACCEPT, with the fields python-oracledb's `ConnectMessage.process`
/// reads (version, options, flags at body offset 14, 32-bit SDU at 24,
/// flags2 at 33 for version >= 318) and Wireshark's `dissect_tns_accept`.
fn golden_accept() -> Vec<u8> {
    let v: Vec<u8> = vec![
        0x00, 0x2d, // packet length 45 = 8 + 37
        0x00, 0x00, // packet checksum
        0x02, // type 2 = ACCEPT
        0x00, // flags
        0x00, 0x00, // header checksum
        0x01, 0x3f, // version 319
        0x00, 0x01, // service options
        0x20, 0x00, // SDU 8192
        0xff, 0xff, // TDU 65535
        0x00, 0x01, // value of 1 in hardware
        0x00, 0x00, // accept data length 0
        0x00, 0x2d, // accept data offset 45 (end of packet)
        0x04, // connect flags 0 (NA disabled; NA_REQUIRED 0x10 clear)
        0x04, // connect flags 1
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // skipped by python-oracledb
        0x00, 0x00, 0x20, 0x00, // SDU, 32-bit
        0x00, 0x00, 0xff, 0xff, // TDU, 32-bit
        0x00, // skipped
        0x00, 0x00, 0x00, 0x01, // flags2: check OOB
    ];
    assert_eq!(v.len(), 0x2d);
    v
}

const REDIRECT_TEXT: &[u8] =
    b"(ADDRESS=(PROTOCOL=TCP)(HOST=10.0.0.7)(PORT=1522))\0(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME=ORCLPDB1)))";

/// REDIRECT as python-oracledb reads it: the length in the REDIRECT, the
/// text in the DATA packet that follows.
fn golden_redirect_split() -> Vec<u8> {
    let mut v: Vec<u8> = vec![
        0x00, 0x0a, // packet length 10
        0x00, 0x00, // packet checksum
        0x05, // type 5 = REDIRECT
        0x00, // flags
        0x00, 0x00, // header checksum
        0x00, 0x67, // redirect data length 103 (50 + NUL + 52)
        // second packet
        0x00, 0x71, // packet length 113 = 8 + 2 + 103
        0x00, 0x00, // packet checksum
        0x06, // type 6 = DATA
        0x00, // flags
        0x00, 0x00, // header checksum
        0x00, 0x00, // data flags
    ];
    v.extend_from_slice(REDIRECT_TEXT);
    assert_eq!(v.len(), 10 + 0x71);
    v
}

/// REDIRECT with the text inline, as Wireshark's dissector shows it.
fn golden_redirect_inline() -> Vec<u8> {
    let mut v: Vec<u8> = vec![
        0x00, 0x71, // packet length 113 = 8 + 2 + 103
        0x00, 0x00, // packet checksum
        0x05, // type 5 = REDIRECT
        0x00, // flags
        0x00, 0x00, // header checksum
        0x00, 0x67, // redirect data length 103
    ];
    v.extend_from_slice(REDIRECT_TEXT);
    assert_eq!(v.len(), 0x71);
    v
}

/// RESEND: a bare header.
fn golden_resend() -> Vec<u8> {
    vec![
        0x00, 0x08, // packet length 8
        0x00, 0x00, // packet checksum
        0x0b, // type 11 = RESEND
        0x00, // flags
        0x00, 0x00, // header checksum
    ]
}

/// A REFUSE with any ERR code, built field by field like the golden ones.
fn refuse_with(code: u32) -> Vec<u8> {
    let text = format!("(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR={code})(ERROR_STACK=(ERROR=(CODE={code})(EMFI=4))))");
    let len = 8 + 4 + text.len();
    let mut v = vec![(len >> 8) as u8, len as u8, 0, 0, 0x04, 0, 0, 0, 0x22, 0, 0, text.len() as u8];
    v.extend_from_slice(text.as_bytes());
    v
}

// ---------------------------------------------------------------------
// The peer's own decoder for what the probe sends.
// ---------------------------------------------------------------------

#[derive(Debug, Clone)]
struct SeenConnect {
    /// The CONNECT packet as received.
    raw: Vec<u8>,
    /// The DATA packet that carried long connect data, if any.
    data_packet: Option<Vec<u8>>,
    connect_data: String,
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).await.expect("peer: reading from the probe");
    v
}

/// Reads one CONNECT (plus its DATA follow-up) and checks every field the
/// references define.
async fn read_connect(s: &mut TcpStream) -> SeenConnect {
    let mut raw = read_exactly(s, 8).await;
    let len = be16(&raw, 0) as usize;
    assert_eq!(be16(&raw, 2), 0, "packet checksum");
    assert_eq!(raw[4], 1, "packet type must be CONNECT");
    assert_eq!(be16(&raw, 6), 0, "header checksum");
    assert!(len >= 74, "CONNECT shorter than its fixed part: {len}");
    raw.extend(read_exactly(s, len - 8).await);
    assert_eq!(raw.len(), len, "header length matches the packet");
    let version = be16(&raw, 8);
    let compat = be16(&raw, 10);
    assert!((300..=319).contains(&compat) && compat <= version && version <= 319, "versions {version}/{compat}");
    assert_eq!(be16(&raw, 12) & 0x0001, 1, "service options: don't care");
    assert!(be16(&raw, 14) >= 512, "SDU");
    assert_eq!(be16(&raw, 22), 1, "value of 1 in hardware");
    let cd_len = be16(&raw, 24) as usize;
    let cd_off = be16(&raw, 26) as usize;
    assert_eq!(cd_off, 74, "connect data offset");
    let (connect_data, data_packet) = if cd_len <= 230 {
        assert_eq!(cd_off + cd_len, len, "connect data must end the packet");
        (raw[cd_off..].to_vec(), None)
    } else {
        assert_eq!(len, cd_off, "long connect data must not be in the CONNECT");
        let mut d = read_exactly(s, 8).await;
        let dlen = be16(&d, 0) as usize;
        assert_eq!(d[4], 6, "long connect data follows in a DATA packet");
        d.extend(read_exactly(s, dlen - 8).await);
        assert_eq!(be16(&d, 8), 0, "data flags");
        assert_eq!(dlen - 10, cd_len, "DATA payload is exactly the announced connect data");
        (d[10..].to_vec(), Some(d))
    };
    SeenConnect { raw, data_packet, connect_data: String::from_utf8(connect_data).expect("connect data is text") }
}

#[derive(Debug, Clone)]
enum Step {
    /// Read and decode a CONNECT.
    ExpectConnect,
    /// Write these bytes.
    Send(Vec<u8>),
    /// Close the connection.
    Close,
    /// Stay silent for this long.
    Silence(Duration),
    /// Read until EOF and keep what came.
    ReadToEnd,
}

#[derive(Debug, Default)]
struct Transcript {
    connects: Vec<SeenConnect>,
    trailing: Vec<u8>,
}

async fn peer(script: Vec<Step>) -> (u16, tokio::task::JoinHandle<Transcript>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let h = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut t = Transcript::default();
        for step in script {
            match step {
                Step::ExpectConnect => t.connects.push(read_connect(&mut s).await),
                Step::Send(b) => s.write_all(&b).await.unwrap(),
                Step::Close => return t,
                Step::Silence(d) => tokio::time::sleep(d).await,
                Step::ReadToEnd => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut t.trailing)).await;
                }
            }
        }
        t
    });
    (port, h)
}

/// Surfaces a panic of the peer (a failed check of what the probe sent);
/// a peer still sleeping in a `Silence` step passed its checks and is
/// stopped.
async fn finish(h: tokio::task::JoinHandle<Transcript>) {
    if h.is_finished() {
        h.await.expect("the peer's checks of the CONNECT failed");
    } else {
        h.abort();
    }
}

fn spec(target: String, opts: &[(&str, &str)]) -> ProbeSpec {
    ProbeSpec {
        target,
        options: opts.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    }
}

async fn probe(target: String, timeout_ms: u64) -> ProbeResult {
    probe_with(target, &[], timeout_ms).await
}

async fn probe_with(target: String, opts: &[(&str, &str)], timeout_ms: u64) -> ProbeResult {
    let p = build_probe(&spec(target, opts)).expect("spec builds");
    run_probe(p.as_ref(), RunLimits { timeout: Duration::from_millis(timeout_ms), warning: None }).await
}

fn assert_class(r: &ProbeResult, status: Status, class: Option<FailureClass>) {
    assert_eq!((r.status, r.class), (status, class), "{r:?}");
}

// ---------------------------------------------------------------------
// Listener ping.
// ---------------------------------------------------------------------

#[tokio::test]
async fn ping_sends_the_golden_connect_and_accepts_err_0() {
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(golden_ping_refuse()), Step::Close]).await;
    let r = probe(format!("oracle://127.0.0.1:{port}"), 3000).await;
    assert_class(&r, Status::Ok, None);
    assert!(r.reason.contains("LISTENER") && r.reason.contains("19.0.0.0.0"), "{}", r.reason);
    let t = h.await.unwrap();
    assert_eq!(t.connects.len(), 1);
    assert_eq!(t.connects[0].raw, golden_ping_connect(), "byte-exact tnsping CONNECT");
    assert_eq!(t.connects[0].connect_data, "(CONNECT_DATA=(COMMAND=ping))");
}

#[tokio::test]
async fn ping_answered_with_an_error_is_critical() {
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(refuse_with(12508)), Step::Close]).await;
    let r = probe(format!("oracle://127.0.0.1:{port}"), 3000).await;
    assert_class(&r, Status::Critical, Some(FailureClass::UnexpectedAnswer));
    assert!(r.reason.contains("ORA-12508") && r.reason.contains("COMMAND"), "{}", r.reason);
    h.await.unwrap();
}

#[tokio::test]
async fn ping_answered_with_accept_is_a_protocol_failure() {
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(golden_accept()), Step::Close]).await;
    let r = probe(format!("oracle://127.0.0.1:{port}"), 3000).await;
    assert_class(&r, Status::Critical, Some(FailureClass::Protocol));
    h.await.unwrap();
}

// ---------------------------------------------------------------------
// Service check.
// ---------------------------------------------------------------------

#[tokio::test]
async fn accept_means_registered_and_the_session_is_closed_politely() {
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(golden_accept()), Step::ReadToEnd, Step::Close]).await;
    let r = probe(format!("oracle://127.0.0.1:{port}/XE"), 3000).await;
    assert_class(&r, Status::Ok, None);
    assert!(r.reason.contains("XE") && r.reason.contains("319"), "{}", r.reason);
    let t = h.await.unwrap();
    let c = &t.connects[0];
    assert!(c.data_packet.is_none(), "short connect data stays in the CONNECT");
    assert!(c.connect_data.starts_with("(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME=XE)(CID=(PROGRAM=tandem)(HOST="));
    assert!(c.connect_data.ends_with(&format!("(ADDRESS=(PROTOCOL=TCP)(HOST=127.0.0.1)(PORT={port})))")));
    assert_eq!(c.connect_data.matches('(').count(), c.connect_data.matches(')').count(), "balanced");
    // Version 319 >= 315: the EOF DATA packet uses the 32-bit length.
    assert_eq!(
        t.trailing,
        vec![
            0x00, 0x00, 0x00, 0x0a, /* length 10 */ 0x06, /* DATA */ 0x00, 0x00, 0x00, 0x00,
            0x40 /* EOF */
        ]
    );
}

#[tokio::test]
async fn long_connect_data_is_sent_in_a_data_packet() {
    let service = "S".repeat(200);
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(golden_accept()), Step::Close]).await;
    let r = probe(format!("oracle://127.0.0.1:{port}/{service}"), 3000).await;
    assert_class(&r, Status::Ok, None);
    let t = h.await.unwrap();
    let c = &t.connects[0];
    assert!(c.data_packet.is_some(), "connect data > 230 bytes must follow in DATA");
    assert_eq!(c.raw.len(), 74);
    assert!(c.connect_data.contains(&format!("(SERVICE_NAME={service})")));
}

#[tokio::test]
async fn redirect_means_registered_both_forms() {
    for reply in [golden_redirect_split(), golden_redirect_inline()] {
        let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(reply), Step::Close]).await;
        let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 3000).await;
        assert_class(&r, Status::Ok, None);
        assert!(r.reason.contains("HOST=10.0.0.7") && !r.reason.contains("CONNECT_DATA"), "{}", r.reason);
        h.await.unwrap();
    }
}

#[tokio::test]
async fn resend_then_accept() {
    let (port, h) = peer(vec![
        Step::ExpectConnect,
        Step::Send(golden_resend()),
        Step::ExpectConnect,
        Step::Send(golden_accept()),
        Step::Close,
    ])
    .await;
    let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 3000).await;
    assert_class(&r, Status::Ok, None);
    let t = h.await.unwrap();
    assert_eq!(t.connects.len(), 2);
    assert_eq!(t.connects[0].raw, t.connects[1].raw, "the same CONNECT is resent");
}

#[tokio::test]
async fn endless_resend_is_bounded() {
    let mut script = Vec::new();
    for _ in 0..4 {
        script.push(Step::ExpectConnect);
        script.push(Step::Send(golden_resend()));
    }
    script.push(Step::ReadToEnd);
    let (port, h) = peer(script).await;
    let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 3000).await;
    assert_class(&r, Status::Critical, Some(FailureClass::Protocol));
    assert!(r.reason.contains("resend"), "{}", r.reason);
    let t = h.await.unwrap();
    assert_eq!(t.connects.len(), 4, "1 CONNECT + 3 resends (default max_resends)");
    assert!(t.trailing.is_empty(), "no fifth CONNECT");
}

#[tokio::test]
async fn refuse_12514_is_service_not_registered() {
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(golden_refuse_12514()), Step::Close]).await;
    let r = probe(format!("oracle://127.0.0.1:{port}/NOSUCH"), 3000).await;
    assert_class(&r, Status::Critical, Some(FailureClass::UnexpectedAnswer));
    assert!(r.reason.contains("service NOSUCH not registered") && r.reason.contains("12514"), "{}", r.reason);
    h.await.unwrap();
}

#[tokio::test]
async fn sid_form_sends_sid_and_reports_12505_as_not_registered() {
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(refuse_with(12505)), Step::Close]).await;
    let r = probe_with(format!("oracle://127.0.0.1:{port}/ORCL"), &[("sid", "true")], 3000).await;
    assert_class(&r, Status::Critical, Some(FailureClass::UnexpectedAnswer));
    assert!(r.reason.contains("SID ORCL not registered") && r.reason.contains("12505"), "{}", r.reason);
    let t = h.await.unwrap();
    assert!(t.connects[0].connect_data.starts_with("(DESCRIPTION=(CONNECT_DATA=(SID=ORCL)(CID="));

    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(golden_accept()), Step::Close]).await;
    let r = probe_with(format!("oracle://127.0.0.1:{port}/ORCL"), &[("sid", "true")], 3000).await;
    assert_class(&r, Status::Ok, None);
    assert!(r.reason.contains("SID ORCL registered"), "{}", r.reason);
    h.await.unwrap();
}

#[tokio::test]
async fn other_refuse_codes_name_code_and_meaning() {
    for (code, words) in [
        (12505, "SID"),
        (12516, "matching protocol stack"),
        (12519, "no appropriate service handler"),
        (12520, "requested type of server"),
        (12528, "blocking new connections"),
        (12345, "unknown listener error"),
    ] {
        let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(refuse_with(code)), Step::Close]).await;
        let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 3000).await;
        assert_class(&r, Status::Critical, Some(FailureClass::UnexpectedAnswer));
        assert!(r.reason.contains(&format!("ORA-{code}")) && r.reason.contains(words), "{code}: {}", r.reason);
        h.await.unwrap();
    }
}

#[tokio::test]
async fn refuse_without_err_code_is_a_protocol_failure() {
    let text = b"(DESCRIPTION=(TMP=))";
    let mut p = vec![0x00, (12 + text.len()) as u8, 0, 0, 0x04, 0, 0, 0, 0, 0, 0x00, text.len() as u8];
    p.extend_from_slice(text);
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(p), Step::Close]).await;
    let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 3000).await;
    assert_class(&r, Status::Critical, Some(FailureClass::Protocol));
    h.await.unwrap();
}

// ---------------------------------------------------------------------
// Broken peers: always a classified failure, never a hang.
// ---------------------------------------------------------------------

async fn expect_protocol(reply: Vec<u8>, close: bool) -> ProbeResult {
    let mut script = vec![Step::ExpectConnect, Step::Send(reply)];
    script.push(if close { Step::Close } else { Step::Silence(Duration::from_secs(10)) });
    let (port, h) = peer(script).await;
    let start = Instant::now();
    let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 3000).await;
    if close {
        h.await.expect("peer");
    } else {
        finish(h).await;
    }
    assert_class(&r, Status::Critical, Some(FailureClass::Protocol));
    assert!(start.elapsed() < Duration::from_secs(3), "decided without waiting for the deadline");
    r
}

#[tokio::test]
async fn truncated_packet_then_close() {
    let mut p = golden_refuse_12514();
    p.truncate(30);
    let r = expect_protocol(p, true).await;
    assert!(r.reason.contains("30 of 103"), "{}", r.reason);
    let r = expect_protocol(vec![0x00, 0x67, 0x00], true).await;
    assert!(r.reason.contains("3 of 8"), "{}", r.reason);
}

#[tokio::test]
async fn closed_without_answer() {
    let r = expect_protocol(Vec::new(), true).await;
    assert!(r.reason.contains("without answering"), "{}", r.reason);
}

#[tokio::test]
async fn length_field_that_lies() {
    // Smaller than the header itself.
    let mut p = golden_ping_refuse();
    p[0] = 0;
    p[1] = 4;
    expect_protocol(p, false).await;
    // Header says 16 bytes, but the REFUSE data length inside says 61.
    let mut p = golden_ping_refuse();
    p[1] = 16;
    p.truncate(16);
    let r = expect_protocol(p, false).await;
    assert!(r.reason.contains("61"), "{}", r.reason);
    // REDIRECT announcing more data than its DATA packet carries.
    let mut p = golden_redirect_split();
    p[9] = 0xff;
    expect_protocol(p, true).await;
}

#[tokio::test]
async fn oversized_packet_is_refused_without_reading_it() {
    let r = expect_protocol(vec![0xff, 0xff, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00], false).await;
    assert!(r.reason.contains("65535"), "{}", r.reason);
    // A web server on the port: "HT" is 18516 bytes.
    expect_protocol(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec(), false).await;
}

#[tokio::test]
async fn unexpected_packet_types() {
    // MARKER in answer to CONNECT.
    expect_protocol(vec![0x00, 0x0b, 0, 0, 0x0c, 0, 0, 0, 0x01, 0x00, 0x02], true).await;
    // ACCEPT shorter than its fixed fields.
    expect_protocol(vec![0x00, 0x0c, 0, 0, 0x02, 0, 0, 0, 0x01, 0x3f, 0x00, 0x01], true).await;
}

#[tokio::test]
async fn random_bytes_are_protocol_failures() {
    for seed in 0..20u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n = rng.random_range(1..200);
        let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
        let (port, h) = peer(vec![Step::ExpectConnect, Step::Send(bytes), Step::Close]).await;
        let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 3000).await;
        assert_class(&r, Status::Critical, Some(FailureClass::Protocol));
        h.await.expect("peer");
    }
}

#[tokio::test]
async fn silent_listener_times_out_within_deadline() {
    let (port, h) = peer(vec![Step::ExpectConnect, Step::Silence(Duration::from_secs(30))]).await;
    let start = Instant::now();
    let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 500).await;
    finish(h).await;
    assert_class(&r, Status::Critical, Some(FailureClass::Timeout));
    assert!(start.elapsed() < Duration::from_millis(1500), "{:?}", start.elapsed());
    assert!(r.reason.contains("CONNECT"), "{}", r.reason);
}

#[tokio::test]
async fn refused_port() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let r = probe(format!("oracle://127.0.0.1:{port}/ORCLPDB1"), 3000).await;
    assert_class(&r, Status::Critical, Some(FailureClass::Refused));
}

// ---------------------------------------------------------------------
// Spec validation.
// ---------------------------------------------------------------------

#[test]
fn bad_specs_are_rejected_with_reasons() {
    for (target, words) in [
        ("oracle://db/ORCL)(X=Y", "not an Oracle service name"),
        ("oracle://db/a/b", "not an Oracle service name"),
        ("oracle://db/ORCL?x=1", "query"),
        ("oracle:///ORCL", "no host"),
        ("oracle://scott@db/ORCL", "never logs in"),
    ] {
        let e = build_probe(&spec(target.into(), &[])).unwrap_err().to_string();
        assert!(e.contains(words), "{target}: {e}");
    }
    let e = build_probe(&spec("oracle://scott:tiger@db/ORCL".into(), &[])).unwrap_err().to_string();
    assert!(!e.contains("tiger"), "{e}");
    let e = build_probe(&spec("oracle://db/ORCL".into(), &[("bogus", "1")])).unwrap_err().to_string();
    assert!(e.contains("bogus") && e.contains("max_resends"), "{e}");
    let e = build_probe(&spec("oracle://db".into(), &[("sid", "true")])).unwrap_err().to_string();
    assert!(e.contains("SID in the URL path"), "{e}");
    let p = build_probe(&spec("oracle://db".into(), &[])).unwrap();
    assert_eq!(p.target(), "oracle://db:1521");
}

// ---------------------------------------------------------------------
// The parser never panics.
// ---------------------------------------------------------------------

proptest! {
    #[test]
    fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok((p, used)) = oracle::parse_packet(&bytes) {
            prop_assert!(used >= 8 && used <= bytes.len());
            if let Ok(oracle::Reply::Refuse { data, .. }) = oracle::decode_reply(&p) {
                let _ = oracle::refuse_error_code(&data);
                let _ = oracle::descriptor_value(&data, "VSNNUM");
            }
        }
    }

    #[test]
    fn any_body_decodes_or_errors(ptype in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = oracle::decode_reply(&Packet { packet_type: ptype, flags: 0, body });
    }

    #[test]
    fn refuse_text_never_panics(text in ".{0,200}") {
        let _ = oracle::refuse_error_code(&text);
        let _ = oracle::descriptor_value(&text, "err");
    }
}
