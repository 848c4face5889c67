//! PostgreSQL probe: `postgresql://USER@HOST:PORT/DB`.
//!
//! Levels (option `level`):
//! * `connect` (default): log in and run `SELECT 1`;
//! * `write`: update a row of a monitor table (option `table`, default
//!   `tandem_monitor`, created if missing) to a fresh random value and read
//!   it back;
//! * `ddl`: create and drop a uniquely named table in one transaction.
//!
//! The write levels fail with [`FailureClass::ReadOnly`] on a hot standby
//! (`pg_is_in_recovery()`) or when transactions are read-only
//! (`default_transaction_read_only=on`, SQLSTATE 25006). TLS follows
//! `sslmode` (`disable`, `require`, `verify-full`). The password comes only
//! from the spec's password source.
//!
//! SCRAM-SHA-256's PBKDF2 was most of a login's CPU; the workspace's patched
//! postgres-protocol (third_party/postgres-protocol/TANDEM-PATCH.md) derives
//! the SaltedPassword once per (password, salt, iterations) and reuses it, as
//! this probe logs in with the same password again and again. tokio-postgres
//! has no hook for it, so nothing here changes.

use std::error::Error as _;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::spec::{SpecContext, SpecError};
use crate::tls::TlsOptions;
use crate::{CheckFuture, Deadline, FailureClass, Probe, ProbeFailure, ProbeSuccess, Secret};

/// Default PostgreSQL port.
pub const DEFAULT_PORT: u16 = 5432;
/// Default name of the table the `write` level updates.
pub const DEFAULT_TABLE: &str = "tandem_monitor";

/// How deep the probe goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Log in and `SELECT 1`.
    Connect,
    /// Update a row and read it back.
    Write,
    /// Create and drop a table.
    Ddl,
}

impl Level {
    fn as_str(self) -> &'static str {
        match self {
            Level::Connect => "connect",
            Level::Write => "write",
            Level::Ddl => "ddl",
        }
    }
}

/// `sslmode`, as far as the probe supports it.
#[derive(Debug, Clone)]
enum Tls {
    /// Plain TCP.
    Disable,
    /// TLS with this client configuration, whether it verifies the
    /// certificate, and the name to verify (`tls_server_name` or host).
    Rustls(Arc<rustls::ClientConfig>, bool, String),
}

/// A PostgreSQL probe.
#[derive(Debug)]
pub struct PostgresProbe {
    host: String,
    port: u16,
    user: String,
    dbname: String,
    password: Option<Secret>,
    level: Level,
    /// Already validated and double-quoted for SQL.
    table_sql: String,
    tls: Tls,
}

/// Builds a [`PostgresProbe`] from a spec.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let host = ctx.host()?;
    let port = ctx.port_or(DEFAULT_PORT);
    let user = ctx.user().ok_or_else(|| {
        SpecError::Missing(format!(
            "{}: the postgresql probe needs a user name (postgresql://USER@HOST:PORT/DB)",
            crate::spec::redact_url(ctx.url())
        ))
    })?;
    let path = ctx.url().path().trim_start_matches('/');
    let dbname = if path.is_empty() { user.clone() } else { path.to_string() };
    let password = ctx.password()?;
    let level = match ctx.opt("level").as_deref() {
        None | Some("connect") => Level::Connect,
        Some("write") => Level::Write,
        Some("ddl") => Level::Ddl,
        Some(other) => {
            return Err(SpecError::BadOption {
                key: "level".into(),
                value: other.into(),
                why: "expected connect, write or ddl".into(),
            });
        }
    };
    let table = ctx.opt("table").unwrap_or_else(|| DEFAULT_TABLE.to_string());
    let table_sql = quote_table(&table)?;
    let tls_opts = TlsOptions::from_spec(ctx)?;
    let tls = match ctx.opt("sslmode").as_deref() {
        None | Some("disable") => {
            if tls_opts != TlsOptions::default() {
                return Err(SpecError::BadOption {
                    key: "sslmode".into(),
                    value: "disable".into(),
                    why: "ca_file/insecure/tls_server_name need sslmode=require or verify-full".into(),
                });
            }
            Tls::Disable
        }
        Some("require") => {
            // As libpq: require encrypts; it verifies only when a CA is given.
            let mut o = tls_opts;
            if o.ca_file.is_none() {
                o.insecure = true;
            }
            let name = o.server_name.clone().unwrap_or_else(|| host.clone());
            Tls::Rustls(o.client_config()?, !o.insecure, name)
        }
        Some("verify-full") => {
            if tls_opts.insecure {
                return Err(SpecError::BadOption {
                    key: "insecure".into(),
                    value: "true".into(),
                    why: "contradicts sslmode=verify-full; use sslmode=require to skip verification".into(),
                });
            }
            let name = tls_opts.server_name.clone().unwrap_or_else(|| host.clone());
            Tls::Rustls(tls_opts.client_config()?, true, name)
        }
        Some(other) => {
            return Err(SpecError::BadOption {
                key: "sslmode".into(),
                value: other.into(),
                why: "expected disable, require or verify-full".into(),
            });
        }
    };
    Ok(Box::new(PostgresProbe { host, port, user, dbname, password, level, table_sql, tls }))
}

/// Validates `[schema.]name` as plain identifiers and quotes each part, so
/// the option can never inject SQL.
fn quote_table(table: &str) -> Result<String, SpecError> {
    let bad = |why: &str| SpecError::BadOption { key: "table".into(), value: table.into(), why: why.into() };
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 {
        return Err(bad("expected NAME or SCHEMA.NAME"));
    }
    let mut out = Vec::new();
    for p in parts {
        let valid = !p.is_empty()
            && p.len() <= 63
            && p.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(bad("each part must be 1-63 of [A-Za-z0-9_], not starting with a digit"));
        }
        out.push(format!("\"{p}\""));
    }
    Ok(out.join("."))
}

/// Most bytes one check may read from the server. A probe exchanges a few
/// KiB; a hostile peer announcing a 2 GiB message would otherwise make the
/// driver buffer whatever it streams until the deadline.
pub const MAX_READ_BYTES: u64 = 4 * 1024 * 1024;

/// A stream that fails reads once the peer has sent more than its budget.
#[derive(Debug)]
struct Capped<S> {
    inner: S,
    left: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Capped<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > self.left {
            self.left = 0;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the server sent more than {MAX_READ_BYTES} bytes in one check"),
            )));
        }
        self.left -= n;
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Capped<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Aborts the connection task when the check ends, however it ends (also
/// when the scheduler drops the check future at its backstop timeout).
struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PostgresProbe {
    fn config(&self) -> Config {
        let mut c = Config::new();
        c.host(&self.host).port(self.port).user(&self.user).dbname(&self.dbname).application_name("tandem-monitor");
        if let Some(pw) = &self.password {
            c.password(pw.expose());
        }
        c.ssl_mode(match self.tls {
            Tls::Disable => SslMode::Disable,
            Tls::Rustls(..) => SslMode::Require,
        });
        c
    }

    /// Connects (TCP with classified failures, then TLS and login) and
    /// spawns the connection task.
    async fn connect(&self, deadline: Deadline) -> Result<(Client, ConnTask), ProbeFailure> {
        let tcp = crate::tcp::connect(&self.host, self.port, deadline).await?;
        let stream = Capped { inner: tcp, left: MAX_READ_BYTES };
        let config = self.config();
        let stage = "logging in";
        let (client, task) = match &self.tls {
            Tls::Disable => {
                let (client, conn) =
                    deadline.run(stage, config.connect_raw(stream, NoTls)).await?.map_err(|e| classify(&e, stage))?;
                (client, ConnTask(tokio::spawn(async move { drop(conn.await) })))
            }
            Tls::Rustls(cfg, _, name) => {
                let mut make = MakeRustlsConnect::new((**cfg).clone());
                let tls = <MakeRustlsConnect as MakeTlsConnect<Capped<tokio::net::TcpStream>>>::make_tls_connect(
                    &mut make, name,
                )
                .map_err(|e| {
                    ProbeFailure::critical(FailureClass::Config, format!("invalid TLS server name {name:?}: {e}"))
                })?;
                let (client, conn) =
                    deadline.run(stage, config.connect_raw(stream, tls)).await?.map_err(|e| classify(&e, stage))?;
                (client, ConnTask(tokio::spawn(async move { drop(conn.await) })))
            }
        };
        Ok((client, task))
    }

    async fn run(&self, deadline: Deadline) -> Result<ProbeSuccess, ProbeFailure> {
        let (client, _task) = self.connect(deadline).await?;
        let stage = "running SELECT 1";
        let row = deadline
            .run(
                stage,
                client.query_one(
                    "SELECT 1::int4, current_setting('server_version'), pg_is_in_recovery(), \
                     current_setting('transaction_read_only')",
                    &[],
                ),
            )
            .await?
            .map_err(|e| classify(&e, stage))?;
        let (one, version, in_recovery, read_only) = (
            row.try_get::<_, i32>(0),
            row.try_get::<_, String>(1),
            row.try_get::<_, bool>(2),
            row.try_get::<_, String>(3),
        );
        let (Ok(1), Ok(version), Ok(in_recovery), Ok(read_only)) = (one, version, in_recovery, read_only) else {
            return Err(ProbeFailure::critical(
                FailureClass::UnexpectedAnswer,
                "SELECT 1 returned an unexpected row".to_string(),
            ));
        };
        let read_only = read_only == "on";
        let role = match (in_recovery, read_only) {
            (true, _) => " (standby)",
            (false, true) => " (read-only transactions)",
            (false, false) => "",
        };
        let tls = match self.tls {
            Tls::Disable => "",
            Tls::Rustls(_, true, _) => ", TLS (certificate verified)",
            Tls::Rustls(_, false, _) => ", TLS (certificate not verified)",
        };
        if self.level != Level::Connect && in_recovery {
            return Err(ProbeFailure::critical(
                FailureClass::ReadOnly,
                format!(
                    "PostgreSQL {version} is a hot standby (pg_is_in_recovery() = true): level {} needs a writable primary",
                    self.level.as_str()
                ),
            ));
        }
        let what = match self.level {
            Level::Connect => "SELECT 1 ok".to_string(),
            Level::Write => {
                self.write(&client, deadline).await?;
                format!("write to {} read back ok", self.table_sql.replace('"', ""))
            }
            Level::Ddl => {
                let name = self.ddl(&client, deadline).await?;
                format!("created and dropped table {name}")
            }
        };
        Ok(ProbeSuccess::new(format!("PostgreSQL {version}{role}{tls}: {what}")))
    }

    async fn write(&self, client: &Client, deadline: Deadline) -> Result<(), ProbeFailure> {
        let t = &self.table_sql;
        // Look before creating: CREATE TABLE IF NOT EXISTS needs the CREATE
        // privilege on the schema even when the table exists, and a monitor
        // role often only has rights on a table prepared for it.
        let stage = format!("looking up {t}");
        let exists = deadline
            .run(&stage, client.query_one("SELECT to_regclass($1) IS NOT NULL", &[t]))
            .await?
            .map_err(|e| classify(&e, &stage))?;
        if !exists.try_get::<_, bool>(0).unwrap_or(false) {
            let stage = format!("creating {t}");
            let create = format!(
                "CREATE TABLE IF NOT EXISTS {t} (id integer PRIMARY KEY, value text NOT NULL, \
                 updated_at timestamptz NOT NULL DEFAULT now())"
            );
            deadline.run(&stage, client.batch_execute(&create)).await?.map_err(|e| classify(&e, &stage))?;
        }
        let value = format!("{:032x}", rand::random::<u128>());
        let stage = format!("updating {t}");
        let upsert = format!(
            "INSERT INTO {t} (id, value, updated_at) VALUES (1, $1, now()) \
             ON CONFLICT (id) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at"
        );
        deadline.run(&stage, client.execute(&upsert, &[&value])).await?.map_err(|e| classify(&e, &stage))?;
        let stage = format!("reading back {t}");
        let select = format!("SELECT value FROM {t} WHERE id = 1");
        let row = deadline.run(&stage, client.query_opt(&select, &[])).await?.map_err(|e| classify(&e, &stage))?;
        let got: Option<String> = row.and_then(|r| r.try_get(0).ok());
        if got.as_deref() != Some(value.as_str()) {
            return Err(ProbeFailure::critical(
                FailureClass::UnexpectedAnswer,
                format!("read back {got:?} from {t} after writing {value:?}"),
            ));
        }
        Ok(())
    }

    async fn ddl(&self, client: &Client, deadline: Deadline) -> Result<String, ProbeFailure> {
        // In one transaction, so a check cut off by its deadline rolls back
        // instead of leaving a table behind; the commit still writes the
        // catalog and WAL.
        let name = format!("tandem_ddl_{:016x}", rand::random::<u64>());
        let sql = format!("BEGIN; CREATE TABLE \"{name}\" (id integer); DROP TABLE \"{name}\"; COMMIT;");
        let stage = format!("creating and dropping {name}");
        deadline.run(&stage, client.batch_execute(&sql)).await?.map_err(|e| classify(&e, &stage))?;
        Ok(name)
    }
}

/// Maps a tokio-postgres error to a failure class. The driver's error kind
/// is private; SQLSTATE, the source type and the display text tell them
/// apart.
fn classify(e: &tokio_postgres::Error, stage: &str) -> ProbeFailure {
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        let class = if *code == SqlState::INVALID_PASSWORD || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            FailureClass::Authentication
        } else if *code == SqlState::READ_ONLY_SQL_TRANSACTION {
            return ProbeFailure::critical(
                FailureClass::ReadOnly,
                format!(
                    "{stage}: server refuses writes (SQLSTATE 25006 read_only_sql_transaction, e.g. \
                     default_transaction_read_only = on): {}",
                    db.message()
                ),
            );
        } else {
            FailureClass::UnexpectedAnswer
        };
        let sev = db.severity();
        let msg = db.message();
        return ProbeFailure::critical(class, format!("{stage}: server said {sev} {}: {msg}", code.code()));
    }
    let text = e.to_string();
    let detail = e.source().map(|s| format!(": {s}")).unwrap_or_default();
    let class = match text.as_str() {
        "error performing TLS handshake" => FailureClass::Tls,
        "authentication error" => FailureClass::Authentication,
        "invalid configuration" => FailureClass::Config,
        "timeout waiting for server" => FailureClass::Timeout,
        // After the TCP connect succeeded, an I/O error, an early close or
        // an unparsable message all mean the peer broke the protocol.
        _ => match e.source().and_then(|s| s.downcast_ref::<io::Error>()).map(io::Error::kind) {
            Some(io::ErrorKind::TimedOut) => FailureClass::Timeout,
            _ => FailureClass::Protocol,
        },
    };
    let hint = match class {
        FailureClass::Config => " (is a password source configured?)",
        _ => "",
    };
    ProbeFailure::critical(class, format!("{stage}: {text}{detail}{hint}"))
}

impl Probe for PostgresProbe {
    fn kind(&self) -> &'static str {
        "postgresql"
    }

    fn target(&self) -> String {
        format!(
            "postgresql://{}@{}:{}/{} (level {})",
            self.user,
            self.host,
            self.port,
            self.dbname,
            self.level.as_str()
        )
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(self.run(deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated_and_quoted() {
        assert_eq!(quote_table("tandem_monitor").unwrap(), "\"tandem_monitor\"");
        assert_eq!(quote_table("ops.mon_1").unwrap(), "\"ops\".\"mon_1\"");
        for bad in ["", "a.b.c", "1abc", "x;drop table y", "a\"b", "a b"] {
            assert!(quote_table(bad).is_err(), "{bad:?} accepted");
        }
    }
}
