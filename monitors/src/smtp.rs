//! SMTP probe (`smtp://[user@]host[:25]`, `smtps://…[:465]`), plus the
//! pieces the other line protocols share: the SMTP/FTP reply parser, the
//! TLS set-up, and small helpers.
//!
//! The probe reads the 220 banner, says EHLO, optionally upgrades with
//! STARTTLS, optionally authenticates (PLAIN or LOGIN, whichever the server
//! advertises), sends NOOP and QUIT (in one write when the server offers
//! PIPELINING). Every step runs under the deadline.

use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;

use crate::line::LineConn;
use crate::spec::{SpecContext, SpecError};
use crate::tls::TlsOptions;
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess, Secret};

/// Most lines accepted in one multi-line reply; EHLO answers have ~20.
pub const MAX_REPLY_LINES: usize = 128;

/// How continuation lines of a multi-line reply look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyStyle {
    /// RFC 5321: every line carries the code, `250-` continues, `250 ` ends.
    Smtp,
    /// RFC 959: after `220-`, lines in between may be free text; the reply
    /// ends with a line starting with the same code and a space.
    Ftp,
}

/// A complete reply: its code and the text of each line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text after `code-` / `code ` of each line, in order.
    pub lines: Vec<String>,
}

impl Reply {
    /// The code and the text of the first line, shortened, for messages.
    pub fn summary(&self) -> String {
        let first = self.lines.first().map(String::as_str).unwrap_or("");
        format!("{} {}", self.code, snippet(first, 120)).trim_end().to_string()
    }

    /// True for 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// A reply line or sequence that breaks the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// The line does not start with a three-digit code and a separator.
    #[error("malformed reply line {0:?} (expected a 3-digit code followed by a space or '-')")]
    Malformed(String),
    /// A continuation line carried a different code than the first line.
    #[error("reply code changed from {first} to {then} inside one multi-line reply")]
    CodeChanged {
        /// The first line's code.
        first: u16,
        /// The offending line's code.
        then: u16,
    },
    /// More than [`MAX_REPLY_LINES`] lines.
    #[error("multi-line reply longer than {0} lines")]
    TooManyLines(usize),
}

/// One parsed reply line: code, whether it is the last line, and its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLine<'a> {
    /// The three-digit code (100–599).
    pub code: u16,
    /// False for `code-` continuation lines.
    pub last: bool,
    /// Text after the separator.
    pub text: &'a str,
}

/// Parses one SMTP/FTP reply line (without CRLF).
pub fn parse_reply_line(line: &str) -> Result<ReplyLine<'_>, ReplyError> {
    let b = line.as_bytes();
    let malformed = || ReplyError::Malformed(snippet(line, 80));
    if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) || !(b'1'..=b'5').contains(&b[0]) {
        return Err(malformed());
    }
    let code = u16::from(b[0] - b'0') * 100 + u16::from(b[1] - b'0') * 10 + u16::from(b[2] - b'0');
    match b.get(3) {
        None => Ok(ReplyLine { code, last: true, text: "" }),
        // Bytes 0..4 are ASCII, so slicing at 4 is on a char boundary.
        Some(b' ') => Ok(ReplyLine { code, last: true, text: &line[4..] }),
        Some(b'-') => Ok(ReplyLine { code, last: false, text: &line[4..] }),
        Some(_) => Err(malformed()),
    }
}

/// Assembles multi-line replies from lines; pure, so it can be fuzzed.
#[derive(Debug, Clone)]
pub struct ReplyParser {
    style: ReplyStyle,
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyParser {
    /// A parser waiting for the first line of a reply.
    pub fn new(style: ReplyStyle) -> Self {
        Self { style, code: None, lines: Vec::new() }
    }

    /// Feeds one line; returns the reply once its last line arrived.
    pub fn push(&mut self, line: &str) -> Result<Option<Reply>, ReplyError> {
        if self.lines.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines(MAX_REPLY_LINES));
        }
        let parsed = match (self.code, self.style, parse_reply_line(line)) {
            (_, _, Ok(p)) => p,
            // RFC 959 allows free text between the first and the last line.
            (Some(_), ReplyStyle::Ftp, Err(_)) => {
                self.lines.push(line.to_string());
                return Ok(None);
            }
            (_, _, Err(e)) => return Err(e),
        };
        match self.code {
            None => self.code = Some(parsed.code),
            Some(first) if first != parsed.code => match self.style {
                ReplyStyle::Smtp => return Err(ReplyError::CodeChanged { first, then: parsed.code }),
                ReplyStyle::Ftp => {
                    self.lines.push(line.to_string());
                    return Ok(None);
                }
            },
            Some(_) => {}
        }
        self.lines.push(parsed.text.to_string());
        if parsed.last {
            let code = self.code.take().expect("set above");
            return Ok(Some(Reply { code, lines: std::mem::take(&mut self.lines) }));
        }
        Ok(None)
    }
}

/// Reads one complete reply from `conn`; malformed input is a
/// [`FailureClass::Protocol`] failure naming `stage`.
pub async fn read_reply(
    conn: &mut LineConn,
    style: ReplyStyle,
    deadline: Deadline,
    stage: &str,
) -> Result<Reply, ProbeFailure> {
    let mut parser = ReplyParser::new(style);
    loop {
        let line = conn.read_line(deadline, stage).await?;
        match parser.push(&line) {
            Ok(Some(reply)) => return Ok(reply),
            Ok(None) => {}
            Err(e) => return Err(ProbeFailure::critical(FailureClass::Protocol, format!("{stage}: {e}"))),
        }
    }
}

/// `text` cut to at most `max` characters, for messages.
pub fn snippet(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text.to_string(),
    }
}

/// Standard base64 (RFC 4648, padded), for SASL.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How a line protocol uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Plain text throughout.
    None,
    /// TLS from the first byte (smtps, imaps, pop3s).
    Implicit,
    /// Plain greeting, then an in-band upgrade (STARTTLS / STLS).
    StartTls,
}

/// TLS settings resolved at build time.
#[derive(Debug, Clone)]
pub struct TlsSetup {
    /// Implicit, upgrade, or none.
    pub mode: TlsMode,
    /// The rustls client configuration (only used when `mode` is not None).
    pub config: Arc<ClientConfig>,
    /// Name verified against the certificate and sent as SNI.
    pub server_name: String,
}

impl TlsSetup {
    /// Reads `starttls`, `ca_file`, `insecure` and `tls_server_name`;
    /// `implicit` comes from the URL scheme. `starttls` together with an
    /// implicit-TLS scheme is a configuration error.
    pub fn from_spec(ctx: &SpecContext<'_>, implicit: bool, host: &str) -> Result<Self, SpecError> {
        let starttls = ctx.opt_bool("starttls", false)?;
        let opts = TlsOptions::from_spec(ctx)?;
        let mode = match (implicit, starttls) {
            (true, true) => {
                return Err(SpecError::BadOption {
                    key: "starttls".into(),
                    value: "true".into(),
                    why: format!("{} already uses implicit TLS; use the plain scheme for STARTTLS", ctx.url().scheme()),
                });
            }
            (true, false) => TlsMode::Implicit,
            (false, true) => TlsMode::StartTls,
            (false, false) => TlsMode::None,
        };
        let server_name = opts.server_name.clone().unwrap_or_else(|| host.to_string());
        Ok(Self { mode, config: opts.client_config()?, server_name })
    }

    /// Connects, with implicit TLS if so configured.
    pub async fn connect(&self, host: &str, port: u16, deadline: Deadline) -> Result<LineConn, ProbeFailure> {
        match self.mode {
            TlsMode::Implicit => {
                LineConn::connect_tls(host, port, self.config.clone(), &self.server_name, deadline).await
            }
            TlsMode::None | TlsMode::StartTls => LineConn::connect(host, port, deadline).await,
        }
    }

    /// Upgrades after the server agreed to STARTTLS.
    pub async fn upgrade(&self, conn: LineConn, deadline: Deadline) -> Result<LineConn, ProbeFailure> {
        conn.starttls(self.config.clone(), &self.server_name, deadline).await
    }

    /// `+TLS` / `+STARTTLS` for success messages.
    pub fn describe(&self) -> &'static str {
        match self.mode {
            TlsMode::None => "",
            TlsMode::Implicit => " over TLS",
            TlsMode::StartTls => " with STARTTLS",
        }
    }
}

/// The password for a login, or a configuration error naming the user.
pub fn password_for(ctx: &SpecContext<'_>, user: Option<&str>) -> Result<Option<Secret>, SpecError> {
    if let Some(u) = user
        && u.chars().any(|c| c.is_control())
    {
        return Err(SpecError::Missing(format!("user name {u:?} contains control characters")));
    }
    let pw = ctx.password()?;
    if pw.as_ref().is_some_and(|p| p.expose().chars().any(|c| c.is_control())) {
        // Would break the line protocol (or inject commands); the value is not shown.
        return Err(SpecError::Missing("the password contains control characters".into()));
    }
    match (user, &pw) {
        (Some(u), None) => Err(SpecError::Missing(format!(
            "{}: user {u:?} given but no password; use --password-file or --password-env",
            ctx.url().scheme()
        ))),
        _ => Ok(pw),
    }
}

/// Longest wait for the answer to a goodbye (QUIT, LOGOUT).
const GOODBYE_WAIT: Duration = Duration::from_secs(1);

/// Sends a polite goodbye and waits briefly for the answer; the verdict
/// is already known, so errors and silence are ignored.
pub async fn say_goodbye(conn: &mut LineConn, command: &str, deadline: Deadline) {
    let short = Deadline::after(deadline.remaining().min(GOODBYE_WAIT));
    if conn.send(command, short, command).await.is_ok() {
        let _ = conn.read_line(short, "the goodbye").await;
    }
}

/// The SMTP probe.
#[derive(Debug, Clone)]
pub struct SmtpProbe {
    host: String,
    port: u16,
    ehlo: String,
    tls: TlsSetup,
    user: Option<String>,
    password: Option<Secret>,
}

/// Builds the SMTP probe: `smtp://[user@]host[:25]` or `smtps://…[:465]`;
/// options `ehlo`, `starttls`, `ca_file`, `insecure`, `tls_server_name`.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let implicit = ctx.url().scheme().eq_ignore_ascii_case("smtps");
    let host = ctx.host()?;
    let port = ctx.port_or(if implicit { 465 } else { 25 });
    let ehlo = ctx.opt("ehlo").unwrap_or_else(|| "tandem-probe".into());
    if ehlo.is_empty() || ehlo.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SpecError::BadOption {
            key: "ehlo".into(),
            value: ehlo,
            why: "expected a host name without spaces".into(),
        });
    }
    let tls = TlsSetup::from_spec(ctx, implicit, &host)?;
    let user = ctx.user();
    let password = password_for(ctx, user.as_deref())?;
    Ok(Box::new(SmtpProbe { host, port, ehlo, tls, user, password }))
}

fn unexpected(what: &str, reply: &Reply) -> ProbeFailure {
    ProbeFailure::critical(FailureClass::UnexpectedAnswer, format!("{what}: {}", reply.summary()))
}

/// The extension keywords (upper case) and their parameters from an EHLO reply.
fn extensions(reply: &Reply) -> Vec<(String, String)> {
    reply
        .lines
        .iter()
        .skip(1)
        .map(|l| {
            let l = l.trim();
            let (k, v) = l.split_once([' ', '=']).unwrap_or((l, ""));
            (k.to_ascii_uppercase(), v.to_ascii_uppercase())
        })
        .collect()
}

impl SmtpProbe {
    async fn command(
        &self,
        conn: &mut LineConn,
        line: &str,
        stage: &str,
        deadline: Deadline,
    ) -> Result<Reply, ProbeFailure> {
        conn.send(line, deadline, stage).await?;
        read_reply(conn, ReplyStyle::Smtp, deadline, &format!("the reply to {stage}")).await
    }

    async fn ehlo(&self, conn: &mut LineConn, deadline: Deadline) -> Result<Vec<(String, String)>, ProbeFailure> {
        let r = self.command(conn, &format!("EHLO {}", self.ehlo), "EHLO", deadline).await?;
        if r.code != 250 {
            return Err(unexpected("EHLO rejected", &r));
        }
        Ok(extensions(&r))
    }

    async fn auth(
        &self,
        conn: &mut LineConn,
        ext: &[(String, String)],
        user: &str,
        deadline: Deadline,
    ) -> Result<(), ProbeFailure> {
        let password = self.password.as_ref().expect("build requires a password with a user");
        let Some((_, mechs)) = ext.iter().find(|(k, _)| k == "AUTH") else {
            let hint = if conn.is_tls() { "" } else { " (many servers offer AUTH only after STARTTLS: starttls=true)" };
            return Err(ProbeFailure::critical(
                FailureClass::UnexpectedAnswer,
                format!("user {user:?} given but the server does not offer AUTH{hint}"),
            ));
        };
        let mechs: Vec<&str> = mechs.split_whitespace().collect();
        let reply = if mechs.contains(&"PLAIN") {
            let token = base64(format!("\0{user}\0{}", password.expose()).as_bytes());
            self.command(conn, &format!("AUTH PLAIN {token}"), "AUTH PLAIN", deadline).await?
        } else if mechs.contains(&"LOGIN") {
            let r = self.command(conn, "AUTH LOGIN", "AUTH LOGIN", deadline).await?;
            if r.code != 334 {
                return Err(unexpected("AUTH LOGIN refused", &r));
            }
            let r = self.command(conn, &base64(user.as_bytes()), "the AUTH LOGIN user name", deadline).await?;
            if r.code != 334 {
                return Err(auth_failure(user, &r));
            }
            self.command(conn, &base64(password.expose().as_bytes()), "the AUTH LOGIN password", deadline).await?
        } else {
            return Err(ProbeFailure::critical(
                FailureClass::UnexpectedAnswer,
                format!("no supported AUTH mechanism (server offers: {}; probe speaks PLAIN, LOGIN)", mechs.join(" ")),
            ));
        };
        if reply.code == 235 { Ok(()) } else { Err(auth_failure(user, &reply)) }
    }

    async fn session(&self, conn: &mut Option<LineConn>, deadline: Deadline) -> Result<ProbeSuccess, ProbeFailure> {
        let c = conn.as_mut().expect("connected");
        let greeting = read_reply(c, ReplyStyle::Smtp, deadline, "the 220 greeting").await?;
        match greeting.code {
            220 => {}
            400..=599 => return Err(unexpected("server refused the session", &greeting)),
            _ => {
                return Err(ProbeFailure::critical(
                    FailureClass::Protocol,
                    format!("expected a 220 greeting, got {}", greeting.summary()),
                ));
            }
        }
        let mut ext = self.ehlo(c, deadline).await?;
        if self.tls.mode == TlsMode::StartTls {
            if !ext.iter().any(|(k, _)| k == "STARTTLS") {
                return Err(ProbeFailure::critical(
                    FailureClass::UnexpectedAnswer,
                    "starttls=true but the server does not advertise STARTTLS",
                ));
            }
            let r = self.command(c, "STARTTLS", "STARTTLS", deadline).await?;
            if r.code != 220 {
                return Err(unexpected("STARTTLS refused", &r));
            }
            let plain = conn.take().expect("connected");
            *conn = Some(self.tls.upgrade(plain, deadline).await?);
            ext = self.ehlo(conn.as_mut().expect("upgraded"), deadline).await?;
        }
        let c = conn.as_mut().expect("connected");
        if let Some(user) = &self.user {
            self.auth(c, &ext, user, deadline).await?;
        }
        if ext.iter().any(|(k, _)| k == "PIPELINING") {
            // RFC 2920: NOOP and QUIT go out in one segment and the replies
            // come back in order, one round trip less per check. The NOOP
            // reply is read and judged exactly as when sent alone; the QUIT
            // reply, as in say_goodbye, only briefly waited for.
            c.send_lines(&["NOOP", "QUIT"], deadline, "NOOP and QUIT").await?;
            let r = read_reply(c, ReplyStyle::Smtp, deadline, "the reply to NOOP").await?;
            if !r.is_positive() {
                return Err(unexpected("NOOP refused", &r));
            }
            let short = Deadline::after(deadline.remaining().min(GOODBYE_WAIT));
            let _ = c.read_line(short, "the goodbye").await;
        } else {
            let r = self.command(c, "NOOP", "NOOP", deadline).await?;
            if !r.is_positive() {
                return Err(unexpected("NOOP refused", &r));
            }
            say_goodbye(c, "QUIT", deadline).await;
        }
        let login = self.user.as_ref().map(|u| format!(", AUTH as {u}")).unwrap_or_default();
        Ok(ProbeSuccess::new(format!("SMTP{} {}: EHLO{login}, NOOP ok", self.tls.describe(), greeting.summary())))
    }
}

fn auth_failure(user: &str, reply: &Reply) -> ProbeFailure {
    // 535: credentials invalid; 534: mechanism too weak; 454/535 are what
    // servers send for a wrong password. Anything else is an odd answer.
    let class = match reply.code {
        535 | 534 | 454 => FailureClass::Authentication,
        _ => FailureClass::UnexpectedAnswer,
    };
    ProbeFailure::critical(class, format!("authentication as {user:?} failed: {}", reply.summary()))
}

impl Probe for SmtpProbe {
    fn kind(&self) -> &'static str {
        "smtp"
    }

    fn target(&self) -> String {
        let scheme = if self.tls.mode == TlsMode::Implicit { "smtps" } else { "smtp" };
        let user = self.user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("{scheme}://{user}{}:{}", self.host, self.port)
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            let mut conn = Some(self.tls.connect(&self.host, self.port, deadline).await?);
            let out = self.session(&mut conn, deadline).await;
            if let Some(c) = conn {
                c.close().await;
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(parse_reply_line("250-SIZE 10").unwrap(), ReplyLine { code: 250, last: false, text: "SIZE 10" });
        assert_eq!(parse_reply_line("250").unwrap(), ReplyLine { code: 250, last: true, text: "" });
        assert!(parse_reply_line("25").is_err());
        assert!(parse_reply_line("250x").is_err());
        assert!(parse_reply_line("650 x").is_err());
        assert!(parse_reply_line("2é0 x").is_err());
    }

    #[test]
    fn multi_line_smtp_and_ftp() {
        let mut p = ReplyParser::new(ReplyStyle::Smtp);
        assert_eq!(p.push("220-hello").unwrap(), None);
        let r = p.push("220 there").unwrap().unwrap();
        assert_eq!((r.code, r.lines.len()), (220, 2));
        let mut p = ReplyParser::new(ReplyStyle::Smtp);
        p.push("250-a").unwrap();
        assert_eq!(p.push("251 b"), Err(ReplyError::CodeChanged { first: 250, then: 251 }));
        let mut p = ReplyParser::new(ReplyStyle::Smtp);
        p.push("250-a").unwrap();
        assert!(p.push("free text").is_err());
        let mut p = ReplyParser::new(ReplyStyle::Ftp);
        p.push("220-Welcome").unwrap();
        assert_eq!(p.push("  free text").unwrap(), None);
        assert_eq!(p.push("123 numbers in text").unwrap(), None);
        assert_eq!(p.push("220 ready").unwrap().unwrap().lines.len(), 4);
    }

    #[test]
    fn too_many_lines() {
        let mut p = ReplyParser::new(ReplyStyle::Smtp);
        let mut last = Ok(None);
        for _ in 0..=MAX_REPLY_LINES {
            last = p.push("250-x");
        }
        assert_eq!(last, Err(ReplyError::TooManyLines(MAX_REPLY_LINES)));
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
        assert_eq!(base64(b"\0u\0p"), "AHUAcA==");
    }

    #[test]
    fn snippet_cuts_on_char_boundaries() {
        assert_eq!(snippet("ééé", 2), "éé...");
        assert_eq!(snippet("ab", 2), "ab");
    }
}
