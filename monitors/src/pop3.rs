//! POP3 probe (`pop3://[user@]host[:110]`, `pop3s://…[:995]`): the +OK
//! greeting, CAPA (an -ERR is tolerated: CAPA is an extension), optional
//! STLS, optional USER/PASS, NOOP when logged in, and QUIT.

use crate::line::LineConn;
use crate::smtp::{TlsMode, TlsSetup, password_for, say_goodbye, snippet};
use crate::spec::{SpecContext, SpecError};
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess, Secret};

/// Most lines accepted in a CAPA listing.
pub const MAX_CAPA_LINES: usize = 256;

/// A parsed status line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pop3Status {
    /// `+OK` (true) or `-ERR` (false).
    pub ok: bool,
    /// The text after the indicator.
    pub text: String,
}

/// A status line that is neither `+OK` nor `-ERR`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed POP3 status line {0:?} (expected +OK or -ERR)")]
pub struct Pop3Error(pub String);

/// Parses a POP3 status line (without CRLF). The indicator is matched
/// case-insensitively and must be followed by a space or the line end.
pub fn parse_status(line: &str) -> Result<Pop3Status, Pop3Error> {
    for (indicator, ok) in [("+OK", true), ("-ERR", false)] {
        let n = indicator.len();
        if line.len() >= n && line.is_char_boundary(n) && line[..n].eq_ignore_ascii_case(indicator) {
            let rest = &line[n..];
            if rest.is_empty() {
                return Ok(Pop3Status { ok, text: String::new() });
            }
            if let Some(text) = rest.strip_prefix(' ') {
                return Ok(Pop3Status { ok, text: text.to_string() });
            }
        }
    }
    Err(Pop3Error(snippet(line, 80)))
}

/// The POP3 probe.
#[derive(Debug, Clone)]
pub struct Pop3Probe {
    host: String,
    port: u16,
    tls: TlsSetup,
    user: Option<String>,
    password: Option<Secret>,
}

/// Builds the POP3 probe; options `starttls` (sends STLS), `ca_file`,
/// `insecure`, `tls_server_name`.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let implicit = ctx.url().scheme().eq_ignore_ascii_case("pop3s");
    let host = ctx.host()?;
    let port = ctx.port_or(if implicit { 995 } else { 110 });
    let tls = TlsSetup::from_spec(ctx, implicit, &host)?;
    let user = ctx.user();
    let password = password_for(ctx, user.as_deref())?;
    Ok(Box::new(Pop3Probe { host, port, tls, user, password }))
}

async fn read_status(conn: &mut LineConn, deadline: Deadline, stage: &str) -> Result<Pop3Status, ProbeFailure> {
    let line = conn.read_line(deadline, stage).await?;
    parse_status(&line).map_err(|e| ProbeFailure::critical(FailureClass::Protocol, format!("{stage}: {e}")))
}

async fn command(conn: &mut LineConn, line: &str, stage: &str, deadline: Deadline) -> Result<Pop3Status, ProbeFailure> {
    conn.send(line, deadline, stage).await?;
    read_status(conn, deadline, &format!("the reply to {stage}")).await
}

fn refused(what: &str, st: &Pop3Status) -> ProbeFailure {
    ProbeFailure::critical(FailureClass::UnexpectedAnswer, format!("{what}: -ERR {}", snippet(&st.text, 120)))
}

/// Sends CAPA; returns the capability names (upper case), or None on -ERR.
async fn capa(conn: &mut LineConn, deadline: Deadline) -> Result<Option<Vec<String>>, ProbeFailure> {
    if !command(conn, "CAPA", "CAPA", deadline).await?.ok {
        return Ok(None);
    }
    let mut caps = Vec::new();
    loop {
        let line = conn.read_line(deadline, "the CAPA listing").await?;
        if line == "." {
            return Ok(Some(caps));
        }
        if caps.len() >= MAX_CAPA_LINES {
            return Err(ProbeFailure::critical(
                FailureClass::Protocol,
                format!("CAPA listing longer than {MAX_CAPA_LINES} lines"),
            ));
        }
        caps.push(line.split_whitespace().next().unwrap_or("").to_ascii_uppercase());
    }
}

impl Pop3Probe {
    async fn session(&self, conn: &mut Option<LineConn>, deadline: Deadline) -> Result<ProbeSuccess, ProbeFailure> {
        let c = conn.as_mut().expect("connected");
        let greeting = read_status(c, deadline, "the +OK greeting").await?;
        if !greeting.ok {
            return Err(refused("server refused the session", &greeting));
        }
        let caps = capa(c, deadline).await?;
        if self.tls.mode == TlsMode::StartTls {
            if caps.as_ref().is_some_and(|c| !c.iter().any(|x| x == "STLS")) {
                return Err(ProbeFailure::critical(
                    FailureClass::UnexpectedAnswer,
                    "starttls=true but the server does not advertise STLS",
                ));
            }
            let st = command(c, "STLS", "STLS", deadline).await?;
            if !st.ok {
                return Err(refused("STLS refused", &st));
            }
            let plain = conn.take().expect("connected");
            *conn = Some(self.tls.upgrade(plain, deadline).await?);
        }
        let c = conn.as_mut().expect("connected");
        if let Some(user) = &self.user {
            let pw = self.password.as_ref().expect("build requires a password with a user");
            let st = command(c, &format!("USER {user}"), "USER", deadline).await?;
            if !st.ok {
                return Err(login_failure(user, &st));
            }
            let st = command(c, &format!("PASS {}", pw.expose()), "PASS", deadline).await?;
            if !st.ok {
                return Err(login_failure(user, &st));
            }
            let st = command(c, "NOOP", "NOOP", deadline).await?;
            if !st.ok {
                return Err(refused("NOOP refused", &st));
            }
        }
        say_goodbye(c, "QUIT", deadline).await;
        let login = self.user.as_ref().map(|u| format!(", login as {u}, NOOP")).unwrap_or_default();
        let capa = if caps.is_some() { ", CAPA" } else { "" };
        Ok(ProbeSuccess::new(format!(
            "POP3{} +OK {}{capa}{login} ok",
            self.tls.describe(),
            snippet(&greeting.text, 120)
        )))
    }
}

fn login_failure(user: &str, st: &Pop3Status) -> ProbeFailure {
    ProbeFailure::critical(
        FailureClass::Authentication,
        format!("login as {user:?} failed: -ERR {}", snippet(&st.text, 120)),
    )
}

impl Probe for Pop3Probe {
    fn kind(&self) -> &'static str {
        "pop3"
    }

    fn target(&self) -> String {
        let scheme = if self.tls.mode == TlsMode::Implicit { "pop3s" } else { "pop3" };
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
    fn status_lines() {
        assert_eq!(parse_status("+OK ready").unwrap(), Pop3Status { ok: true, text: "ready".into() });
        assert_eq!(parse_status("+OK").unwrap(), Pop3Status { ok: true, text: String::new() });
        assert_eq!(parse_status("-err no").unwrap(), Pop3Status { ok: false, text: "no".into() });
        assert!(parse_status("+OKAY").is_err());
        assert!(parse_status("OK").is_err());
        assert!(parse_status("+O").is_err());
        assert!(parse_status("-ER\u{e9}").is_err());
    }
}
