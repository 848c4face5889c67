//! Property tests: the SMTP/FTP, IMAP and POP3 reply parsers never panic
//! on arbitrary input and agree with simple models; and every probe facing
//! a peer that sends random bytes reaches a classified failure within its
//! deadline.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use tandem_monitors::imap::{self, ImapLine};
use tandem_monitors::pop3;
use tandem_monitors::smtp::{self, MAX_REPLY_LINES, ReplyParser, ReplyStyle};
use tandem_monitors::{ProbeSpec, RunLimits, Status, build_probe, run_probe};
use tandem_testkit::hostile::{Behaviour, HostileServer};

/// Lines as a server would send them: arbitrary bytes, lossily decoded
/// (as LineConn does), without the line end.
fn line() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..80).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        // Near-misses of valid lines find more edge cases than pure noise.
        "[0-9]{0,4}[ -]?[ -~]{0,20}",
        "(\\* |\\+|tnd1 )(OK|NO|BAD|BYE|PREAUTH|ok|MAYBE)?[ -~{}0-9+]{0,20}",
        "[+-](OK|ERR|ok|err|O)[ A-Za-z]{0,10}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn reply_line_parser_never_panics_and_is_consistent(l in line()) {
        if let Ok(p) = smtp::parse_reply_line(&l) {
            prop_assert!((100..600).contains(&p.code));
            let prefix = format!("{:03}", p.code);
            prop_assert!(l.starts_with(&prefix), "{l:?} lacks its code");
            prop_assert!(l.ends_with(p.text));
        }
    }

    #[test]
    fn reply_parser_never_panics_and_bounds_lines(lines in prop::collection::vec(line(), 0..40), ftp in any::<bool>()) {
        let style = if ftp { ReplyStyle::Ftp } else { ReplyStyle::Smtp };
        let mut p = ReplyParser::new(style);
        let mut pending = 0usize;
        for l in &lines {
            match p.push(l) {
                Ok(Some(r)) => {
                    prop_assert!(r.lines.len() <= MAX_REPLY_LINES);
                    prop_assert!((100..600).contains(&r.code));
                    pending = 0;
                }
                Ok(None) => pending += 1,
                Err(_) => { p = ReplyParser::new(style); pending = 0; }
            }
            prop_assert!(pending <= MAX_REPLY_LINES);
        }
    }

    #[test]
    fn long_continuations_hit_the_line_bound(n in 100usize..160, tail in prop::collection::vec(line(), 0..5)) {
        let mut p = ReplyParser::new(ReplyStyle::Smtp);
        let mut outcome = Ok(None);
        let mut pushed = 0usize;
        for l in std::iter::repeat_n("250-x".to_string(), n).chain(tail) {
            pushed += 1;
            outcome = p.push(&l);
            if !matches!(outcome, Ok(None)) {
                break;
            }
        }
        // The bound is checked before a line is taken: line MAX+1 is refused.
        match outcome {
            Ok(Some(r)) => prop_assert!(r.lines.len() <= MAX_REPLY_LINES),
            Ok(None) => prop_assert!(pushed <= MAX_REPLY_LINES),
            Err(smtp::ReplyError::TooManyLines(_)) => prop_assert!(pushed > MAX_REPLY_LINES),
            Err(_) => {}
        }
    }

    #[test]
    fn well_formed_multi_line_replies_round_trip(code in 200u16..600, texts in prop::collection::vec("[ -~]{0,30}", 1..20)) {
        let mut p = ReplyParser::new(ReplyStyle::Smtp);
        let n = texts.len();
        for (i, t) in texts.iter().enumerate() {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let got = p.push(&format!("{code}{sep}{t}")).unwrap();
            if i + 1 == n {
                let r = got.expect("complete after the last line");
                prop_assert_eq!(r.code, code);
                prop_assert_eq!(&r.lines, &texts);
            } else {
                prop_assert!(got.is_none());
            }
        }
    }

    #[test]
    fn imap_parsers_never_panic(l in line(), tag in "tnd[0-9]{1,3}") {
        let _ = imap::parse_greeting(&l);
        let _ = imap::parse_capabilities(&l);
        if let Ok(ImapLine::Tagged { .. }) = imap::parse_line(&l, &tag) {
            let prefix = format!("{tag} ");
            prop_assert!(l.starts_with(&prefix), "{l:?} is not tagged {tag}");
        }
        if let Ok(ImapLine::Untagged { literal: Some(n), .. }) = imap::parse_line(&l, &tag) {
            prop_assert!(n <= imap::MAX_LITERAL);
        }
    }

    #[test]
    fn imap_quote_round_trips(s in any::<String>()) {
        match imap::quote(&s) {
            None => prop_assert!(s.contains(['\r', '\n', '\0'])),
            Some(q) => {
                // Unquote: strip the quotes, undo backslash escapes.
                let inner = &q[1..q.len() - 1];
                let mut out = String::new();
                let mut esc = false;
                for c in inner.chars() {
                    if esc { out.push(c); esc = false; } else if c == '\\' { esc = true; } else {
                        prop_assert!(c != '"', "unescaped quote in {q:?}");
                        out.push(c);
                    }
                }
                prop_assert!(!esc);
                prop_assert_eq!(out, s);
            }
        }
    }

    #[test]
    fn pop3_status_never_panics(l in line()) {
        if let Ok(st) = pop3::parse_status(&l) {
            let up = l.to_ascii_uppercase();
            let indicator = if st.ok { "+OK" } else { "-ERR" };
            prop_assert!(up.starts_with(indicator), "{l:?} parsed as {st:?}");
        }
    }
}

/// A password file shared by all cases.
fn password_file() -> tandem_monitors::SecretSource {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("pw"), "not-a-real-password\n").expect("write pw");
        d
    });
    tandem_monitors::SecretSource::File(dir.path().join("pw"))
}

fn random_stream() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..2048),
        // Plausible-looking prefixes followed by noise.
        (
            prop::sample::select(vec![&b"220 hi\r\n"[..], b"* OK hi\r\n", b"+OK hi\r\n", b"220-a\r\n"]),
            prop::collection::vec(any::<u8>(), 0..512)
        )
            .prop_map(|(p, mut r)| {
                let mut v = p.to_vec();
                v.append(&mut r);
                v
            }),
    ]
}

proptest! {
    // Each case starts a server and runs four probes; keep the count modest.
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn probes_classify_random_streams_within_the_deadline(data in random_stream(), close in any::<bool>()) {
        let behaviour = if close { Behaviour::SendThenClose(data) } else { Behaviour::SendThenSilent(data) };
        let srv = HostileServer::start(behaviour);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let timeout = Duration::from_millis(500);
        for scheme in ["smtp", "imap", "pop3", "ftp"] {
            // With a user, so each probe goes as far into the dialogue as the peer lets it.
            let s = ProbeSpec {
                target: format!("{scheme}://u@127.0.0.1:{}", srv.port()),
                limits: RunLimits { timeout, warning: None },
                password: Some(password_file()),
                ..Default::default()
            };
            let probe = build_probe(&s).unwrap();
            let t = Instant::now();
            let r = rt.block_on(run_probe(probe.as_ref(), s.limits));
            prop_assert!(r.status != Status::Ok, "{scheme}: random bytes accepted: {r:?}");
            prop_assert!(r.class.is_some(), "{scheme}: unclassified: {r:?}");
            prop_assert!(t.elapsed() < timeout + Duration::from_secs(1), "{scheme} took {:?}", t.elapsed());
        }
    }
}
