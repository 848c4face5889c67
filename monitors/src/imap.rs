//! IMAP probe (`imap://[user@]host[:143]`, `imaps://…[:993]`): greeting
//! (`* OK` / `* PREAUTH`; `* BYE` is a failure), CAPABILITY, optional
//! STARTTLS, optional LOGIN, NOOP and LOGOUT. Tagged responses are parsed;
//! untagged ones are skipped (literals included), up to a bound.

use crate::line::LineConn;
use crate::smtp::{TlsMode, TlsSetup, password_for, snippet};
use crate::spec::{SpecContext, SpecError};
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess, Secret};

/// Most untagged lines accepted before a command's tagged completion.
pub const MAX_UNTAGGED: usize = 1000;

/// Largest literal skipped inside an untagged response.
pub const MAX_LITERAL: u64 = 1 << 20;

/// A tagged completion status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// `OK`
    Ok,
    /// `NO`: the command failed (for LOGIN: bad credentials).
    No,
    /// `BAD`: the command was not understood.
    Bad,
}

/// The server greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Greeting {
    /// `* OK …`: not authenticated yet.
    Ok(String),
    /// `* PREAUTH …`: already authenticated.
    Preauth(String),
    /// `* BYE …`: the server refuses the connection.
    Bye(String),
}

/// One server line, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImapLine {
    /// `* …`; `literal` is the size of a trailing `{n}` literal to skip.
    Untagged {
        /// The text after `* `.
        text: String,
        /// Octets of literal data that follow the line.
        literal: Option<u64>,
    },
    /// `+ …` continuation request.
    Continuation,
    /// `TAG OK|NO|BAD text` for our tag.
    Tagged {
        /// The completion status.
        status: Completion,
        /// The text after the status.
        text: String,
    },
}

/// A line that breaks the IMAP grammar (for what the probe needs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImapError {
    /// Not untagged, not a continuation, not our tag.
    #[error("malformed IMAP response line {0:?}")]
    Malformed(String),
    /// A tagged line with a status other than OK/NO/BAD.
    #[error("tagged response with an invalid status: {0:?}")]
    BadStatus(String),
    /// A literal larger than [`MAX_LITERAL`].
    #[error("literal of {0} octets is larger than the probe accepts")]
    LiteralTooLarge(u64),
}

/// Splits `text` into its first word and the rest (after one space).
fn word(text: &str) -> (&str, &str) {
    text.split_once(' ').unwrap_or((text, ""))
}

fn parse_completion(w: &str) -> Option<Completion> {
    match w.to_ascii_uppercase().as_str() {
        "OK" => Some(Completion::Ok),
        "NO" => Some(Completion::No),
        "BAD" => Some(Completion::Bad),
        _ => None,
    }
}

/// Size of a literal announced at the end of `line` (`{12}` or `{12+}`).
fn trailing_literal(line: &str) -> Result<Option<u64>, ImapError> {
    let Some(body) = line.strip_suffix('}') else { return Ok(None) };
    let Some(open) = body.rfind('{') else { return Ok(None) };
    let digits = body[open + 1..].trim_end_matches('+');
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match digits.parse::<u64>() {
        Ok(n) if n <= MAX_LITERAL => Ok(Some(n)),
        _ => Err(ImapError::LiteralTooLarge(digits.parse().unwrap_or(u64::MAX))),
    }
}

/// Classifies one response line (without CRLF) against our `tag`.
pub fn parse_line(line: &str, tag: &str) -> Result<ImapLine, ImapError> {
    if let Some(text) = line.strip_prefix("* ") {
        return Ok(ImapLine::Untagged { text: text.to_string(), literal: trailing_literal(line)? });
    }
    if line == "+" || line.starts_with("+ ") {
        return Ok(ImapLine::Continuation);
    }
    let (t, rest) = word(line);
    if !tag.is_empty() && t == tag {
        let (status, text) = word(rest);
        return match parse_completion(status) {
            Some(status) => Ok(ImapLine::Tagged { status, text: text.to_string() }),
            None => Err(ImapError::BadStatus(snippet(line, 80))),
        };
    }
    Err(ImapError::Malformed(snippet(line, 80)))
}

/// Parses the greeting line.
pub fn parse_greeting(line: &str) -> Result<Greeting, ImapError> {
    let malformed = || ImapError::Malformed(snippet(line, 80));
    let text = line.strip_prefix("* ").ok_or_else(malformed)?;
    let (status, rest) = word(text);
    match status.to_ascii_uppercase().as_str() {
        "OK" => Ok(Greeting::Ok(rest.to_string())),
        "PREAUTH" => Ok(Greeting::Preauth(rest.to_string())),
        "BYE" => Ok(Greeting::Bye(rest.to_string())),
        _ => Err(malformed()),
    }
}

/// Capabilities (upper case) from `* CAPABILITY a b` text or a
/// `[CAPABILITY a b]` response code; None if the text has neither.
pub fn parse_capabilities(text: &str) -> Option<Vec<String>> {
    let list = if let Some(rest) = text.strip_prefix("[CAPABILITY ") {
        rest.split(']').next().unwrap_or("")
    } else {
        let (w, rest) = word(text);
        if !w.eq_ignore_ascii_case("CAPABILITY") {
            return None;
        }
        rest
    };
    Some(list.split_whitespace().map(str::to_ascii_uppercase).collect())
}

/// An IMAP quoted string, or None if the value cannot be quoted (CR, LF,
/// NUL are not allowed in quoted strings).
pub fn quote(s: &str) -> Option<String> {
    if s.chars().any(|c| matches!(c, '\r' | '\n' | '\0')) {
        return None;
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    Some(out)
}

/// The IMAP probe.
#[derive(Debug, Clone)]
pub struct ImapProbe {
    host: String,
    port: u16,
    tls: TlsSetup,
    user: Option<String>,
    password: Option<Secret>,
}

/// Builds the IMAP probe; options `starttls`, `ca_file`, `insecure`,
/// `tls_server_name`.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let implicit = ctx.url().scheme().eq_ignore_ascii_case("imaps");
    let host = ctx.host()?;
    let port = ctx.port_or(if implicit { 993 } else { 143 });
    let tls = TlsSetup::from_spec(ctx, implicit, &host)?;
    let user = ctx.user();
    let password = password_for(ctx, user.as_deref())?;
    Ok(Box::new(ImapProbe { host, port, tls, user, password }))
}

/// A session's command state: the tag counter.
struct Session {
    conn: Option<LineConn>,
    next: u32,
}

/// What a command returned: its completion and the untagged lines seen.
struct Response {
    status: Completion,
    text: String,
    untagged: Vec<String>,
}

impl Session {
    fn conn(&mut self) -> &mut LineConn {
        self.conn.as_mut().expect("connected")
    }

    /// Sends `TAG command` (`shown` names it in messages, since the
    /// command itself may hold a password) and reads to its completion.
    async fn command(&mut self, command: &str, shown: &str, deadline: Deadline) -> Result<Response, ProbeFailure> {
        self.next += 1;
        let tag = format!("tnd{}", self.next);
        let conn = self.conn.as_mut().expect("connected");
        conn.send(&format!("{tag} {command}"), deadline, shown).await?;
        let stage = format!("the reply to {shown}");
        let mut untagged = Vec::new();
        loop {
            let line = conn.read_line(deadline, &stage).await?;
            let parsed = parse_line(&line, &tag)
                .map_err(|e| ProbeFailure::critical(FailureClass::Protocol, format!("{stage}: {e}")))?;
            match parsed {
                ImapLine::Tagged { status, text } => return Ok(Response { status, text, untagged }),
                ImapLine::Continuation => {
                    return Err(ProbeFailure::critical(
                        FailureClass::Protocol,
                        format!("unexpected continuation request in {stage}"),
                    ));
                }
                ImapLine::Untagged { text, literal } => {
                    if untagged.len() >= MAX_UNTAGGED {
                        return Err(ProbeFailure::critical(
                            FailureClass::Protocol,
                            format!("more than {MAX_UNTAGGED} untagged lines in {stage}"),
                        ));
                    }
                    if let Some(n) = literal {
                        skip_literal(conn, n, deadline, &stage).await?;
                    }
                    untagged.push(text);
                }
            }
        }
    }

    async fn capabilities(&mut self, deadline: Deadline) -> Result<Vec<String>, ProbeFailure> {
        let r = self.command("CAPABILITY", "CAPABILITY", deadline).await?;
        if r.status != Completion::Ok {
            return Err(refused("CAPABILITY", &r));
        }
        Ok(r.untagged.iter().filter_map(|l| parse_capabilities(l)).flatten().collect())
    }
}

/// Skips a literal of `n` octets (and the rest of the line after it).
/// Lines are counted with their CRLF; the read is bounded by the line
/// reader and the deadline.
async fn skip_literal(conn: &mut LineConn, n: u64, deadline: Deadline, stage: &str) -> Result<(), ProbeFailure> {
    let mut seen = 0u64;
    while seen < n {
        let line = conn.read_line(deadline, stage).await?;
        seen += line.len() as u64 + 2;
    }
    Ok(())
}

fn refused(what: &str, r: &Response) -> ProbeFailure {
    let status = match r.status {
        Completion::Ok => "OK",
        Completion::No => "NO",
        Completion::Bad => "BAD",
    };
    ProbeFailure::critical(
        FailureClass::UnexpectedAnswer,
        format!("{what} refused: {status} {}", snippet(&r.text, 120)),
    )
}

impl ImapProbe {
    async fn session(&self, s: &mut Session, deadline: Deadline) -> Result<ProbeSuccess, ProbeFailure> {
        let line = s.conn().read_line(deadline, "the greeting").await?;
        let greeting = parse_greeting(&line)
            .map_err(|e| ProbeFailure::critical(FailureClass::Protocol, format!("the greeting: {e}")))?;
        let (preauth, text) = match greeting {
            Greeting::Ok(t) => (false, t),
            Greeting::Preauth(t) => (true, t),
            Greeting::Bye(t) => {
                return Err(ProbeFailure::critical(
                    FailureClass::UnexpectedAnswer,
                    format!("server refused the session: * BYE {}", snippet(&t, 120)),
                ));
            }
        };
        let mut caps = s.capabilities(deadline).await?;
        if self.tls.mode == TlsMode::StartTls {
            if !caps.iter().any(|c| c == "STARTTLS") {
                return Err(ProbeFailure::critical(
                    FailureClass::UnexpectedAnswer,
                    "starttls=true but the server does not advertise STARTTLS",
                ));
            }
            let r = s.command("STARTTLS", "STARTTLS", deadline).await?;
            if r.status != Completion::Ok {
                return Err(refused("STARTTLS", &r));
            }
            let plain = s.conn.take().expect("connected");
            s.conn = Some(self.tls.upgrade(plain, deadline).await?);
            // Capabilities seen before TLS cannot be trusted (RFC 3501 6.2.1).
            caps = s.capabilities(deadline).await?;
        }
        if let (Some(user), false) = (&self.user, preauth) {
            if caps.iter().any(|c| c == "LOGINDISABLED") {
                let hint = if self.tls.mode == TlsMode::None { " (try starttls=true or imaps://)" } else { "" };
                return Err(ProbeFailure::critical(
                    FailureClass::UnexpectedAnswer,
                    format!("server advertises LOGINDISABLED{hint}"),
                ));
            }
            let pw = self.password.as_ref().expect("build requires a password with a user");
            let (Some(qu), Some(qp)) = (quote(user), quote(pw.expose())) else {
                return Err(ProbeFailure::unknown(
                    FailureClass::Config,
                    "user name or password contains CR, LF or NUL, which IMAP LOGIN cannot carry",
                ));
            };
            let r = s.command(&format!("LOGIN {qu} {qp}"), "LOGIN", deadline).await?;
            match r.status {
                Completion::Ok => {}
                Completion::No => {
                    return Err(ProbeFailure::critical(
                        FailureClass::Authentication,
                        format!("login as {user:?} failed: NO {}", snippet(&r.text, 120)),
                    ));
                }
                Completion::Bad => return Err(refused("LOGIN", &r)),
            }
        }
        let r = s.command("NOOP", "NOOP", deadline).await?;
        if r.status != Completion::Ok {
            return Err(refused("NOOP", &r));
        }
        // LOGOUT: BYE then the tagged OK; best effort, the verdict is known.
        let short = Deadline::after(deadline.remaining().min(std::time::Duration::from_secs(1)));
        let _ = s.command("LOGOUT", "LOGOUT", short).await;
        let login = match (&self.user, preauth) {
            (_, true) => ", PREAUTH".to_string(),
            (Some(u), false) => format!(", LOGIN as {u}"),
            (None, false) => String::new(),
        };
        Ok(ProbeSuccess::new(format!(
            "IMAP{} OK {}: CAPABILITY{login}, NOOP ok",
            self.tls.describe(),
            snippet(&text, 120)
        )))
    }
}

impl Probe for ImapProbe {
    fn kind(&self) -> &'static str {
        "imap"
    }

    fn target(&self) -> String {
        let scheme = if self.tls.mode == TlsMode::Implicit { "imaps" } else { "imap" };
        let user = self.user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("{scheme}://{user}{}:{}", self.host, self.port)
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            let conn = self.tls.connect(&self.host, self.port, deadline).await?;
            let mut s = Session { conn: Some(conn), next: 0 };
            let out = self.session(&mut s, deadline).await;
            if let Some(c) = s.conn {
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
    fn lines() {
        assert_eq!(
            parse_line("tnd1 OK done", "tnd1").unwrap(),
            ImapLine::Tagged { status: Completion::Ok, text: "done".into() }
        );
        assert_eq!(
            parse_line("tnd1 no", "tnd1").unwrap(),
            ImapLine::Tagged { status: Completion::No, text: String::new() }
        );
        assert!(matches!(parse_line("tnd1 MAYBE x", "tnd1"), Err(ImapError::BadStatus(_))));
        assert!(matches!(parse_line("tnd2 OK x", "tnd1"), Err(ImapError::Malformed(_))));
        assert_eq!(parse_line("+ go", "t").unwrap(), ImapLine::Continuation);
        assert_eq!(
            parse_line("* 1 FETCH (BODY {12}", "t").unwrap(),
            ImapLine::Untagged { text: "1 FETCH (BODY {12}".into(), literal: Some(12) }
        );
        assert!(matches!(parse_line("* X {99999999999}", "t"), Err(ImapError::LiteralTooLarge(_))));
        assert!(parse_line("", "t").is_err());
    }

    #[test]
    fn greetings_and_capabilities() {
        assert_eq!(parse_greeting("* BYE shutting down").unwrap(), Greeting::Bye("shutting down".into()));
        assert!(matches!(parse_greeting("* PREAUTH hi").unwrap(), Greeting::Preauth(_)));
        assert!(parse_greeting("+OK pop").is_err());
        assert_eq!(
            parse_capabilities("[CAPABILITY IMAP4rev1 starttls] ready").unwrap(),
            vec!["IMAP4REV1".to_string(), "STARTTLS".into()]
        );
        assert_eq!(parse_capabilities("CAPABILITY IMAP4rev1 LOGINDISABLED").unwrap().len(), 2);
        assert_eq!(parse_capabilities("3 EXISTS"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote(r#"a"b\c"#).unwrap(), r#""a\"b\\c""#);
        assert_eq!(quote("a\r\nb"), None);
    }
}
