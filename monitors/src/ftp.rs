//! FTP probe (`ftp://[user@]host[:21]`): the 220 greeting (multi-line
//! and `120 ready in n minutes` handled), an optional USER/PASS login
//! (`anonymous` logs in anonymously), NOOP when logged in, and QUIT, all under the deadline.

use crate::line::LineConn;
use crate::smtp::{Reply, ReplyStyle, password_for, read_reply, say_goodbye};
use crate::spec::{SpecContext, SpecError};
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess, Secret};

/// Password sent for an anonymous login when none is configured
/// (by convention an e-mail address).
pub const ANONYMOUS_PASSWORD: &str = "tandem-probe@localhost";

/// The FTP probe.
#[derive(Debug, Clone)]
pub struct FtpProbe {
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<Secret>,
}

/// Builds the FTP probe from `ftp://[user@]host[:21]`. A user other than
/// `anonymous`/`ftp` needs a password source.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let host = ctx.host()?;
    let port = ctx.port_or(21);
    let user = ctx.user();
    let anonymous = user.as_deref().is_some_and(is_anonymous);
    let password = if anonymous {
        password_for(ctx, None)?.or_else(|| Some(Secret::new(ANONYMOUS_PASSWORD)))
    } else {
        password_for(ctx, user.as_deref())?
    };
    Ok(Box::new(FtpProbe { host, port, user, password }))
}

fn is_anonymous(user: &str) -> bool {
    user.eq_ignore_ascii_case("anonymous") || user.eq_ignore_ascii_case("ftp")
}

fn unexpected(what: &str, reply: &Reply) -> ProbeFailure {
    ProbeFailure::critical(FailureClass::UnexpectedAnswer, format!("{what}: {}", reply.summary()))
}

fn login_failure(user: &str, reply: &Reply) -> ProbeFailure {
    let class = if reply.code == 530 { FailureClass::Authentication } else { FailureClass::UnexpectedAnswer };
    ProbeFailure::critical(class, format!("login as {user:?} failed: {}", reply.summary()))
}

/// At most this many `120 ready in n minutes` preliminaries before 220.
const MAX_PRELIMINARY: usize = 3;

impl FtpProbe {
    async fn command(
        &self,
        conn: &mut LineConn,
        line: &str,
        stage: &str,
        deadline: Deadline,
    ) -> Result<Reply, ProbeFailure> {
        conn.send(line, deadline, stage).await?;
        read_reply(conn, ReplyStyle::Ftp, deadline, &format!("the reply to {stage}")).await
    }

    async fn session(&self, conn: &mut LineConn, deadline: Deadline) -> Result<ProbeSuccess, ProbeFailure> {
        let mut greeting = read_reply(conn, ReplyStyle::Ftp, deadline, "the 220 greeting").await?;
        for _ in 0..MAX_PRELIMINARY {
            if greeting.code != 120 {
                break;
            }
            greeting = read_reply(conn, ReplyStyle::Ftp, deadline, "the 220 greeting after 120").await?;
        }
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
        if let Some(user) = &self.user {
            let r = self.command(conn, &format!("USER {user}"), "USER", deadline).await?;
            match r.code {
                230 => {}
                331 => {
                    let pw = self.password.as_ref().expect("build sets a password for every user");
                    let r = self.command(conn, &format!("PASS {}", pw.expose()), "PASS", deadline).await?;
                    match r.code {
                        230 | 202 => {}
                        332 => return Err(unexpected("login needs an ACCT, which the probe does not send", &r)),
                        _ => return Err(login_failure(user, &r)),
                    }
                }
                _ => return Err(login_failure(user, &r)),
            }
            // NOOP only once logged in: before, servers answer 530 (vsftpd).
            let r = self.command(conn, "NOOP", "NOOP", deadline).await?;
            if !r.is_positive() {
                return Err(unexpected("NOOP refused", &r));
            }
        }
        say_goodbye(conn, "QUIT", deadline).await;
        let login = self.user.as_ref().map(|u| format!(", login as {u}, NOOP")).unwrap_or_default();
        Ok(ProbeSuccess::new(format!("FTP {}{login} ok", greeting.summary())))
    }
}

impl Probe for FtpProbe {
    fn kind(&self) -> &'static str {
        "ftp"
    }

    fn target(&self) -> String {
        let user = self.user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("ftp://{user}{}:{}", self.host, self.port)
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            let mut conn = LineConn::connect(&self.host, self.port, deadline).await?;
            let out = self.session(&mut conn, deadline).await;
            conn.close().await;
            out
        })
    }
}
