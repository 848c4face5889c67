//! Application probes and the monitor scheduler.
//!
//! A [`Probe`] checks one application once, within a hard deadline that
//! covers DNS, connect, TLS and every read and write, and returns a
//! [`ProbeResult`]: a Nagios-style [`Status`], the latency, a one-line
//! reason and, when not OK, a [`FailureClass`]. Garbage from the peer is a
//! classified failure, never a panic or a hang.
//!
//! Probes are built from a [`ProbeSpec`] (a URL plus options) by
//! [`build_probe`]; the [`scheduler`] runs many of them on their intervals.

pub mod deadline;
pub mod exec;
pub mod ftp;
pub mod http;
pub mod imap;
pub mod line;
pub mod ocf;
pub mod oracle;
pub mod pop3;
pub mod postgres;
pub mod process;
pub mod scheduler;
pub mod secret;
pub mod smtp;
pub mod spec;
pub mod tcp;
pub mod tls;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use deadline::Deadline;
pub use secret::{Secret, SecretSource};
pub use spec::{ProbeSpec, SpecError, build_probe};

/// Nagios-compatible probe status. The numeric value is the plugin exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// The application answered as expected.
    Ok = 0,
    /// The application works but something is off (slow, a soft refusal).
    Warning = 1,
    /// The application does not provide its service.
    Critical = 2,
    /// The probe could not tell (bad arguments, a plugin that crashed).
    Unknown = 3,
}

impl Status {
    /// The Nagios plugin exit code for this status.
    pub fn exit_code(self) -> i32 {
        self as i32
    }

    /// Maps a plugin exit code to a status; anything but 0–3 is UNKNOWN.
    pub fn from_exit_code(code: i32) -> Self {
        match code {
            0 => Status::Ok,
            1 => Status::Warning,
            2 => Status::Critical,
            _ => Status::Unknown,
        }
    }

    /// Upper-case name, as Nagios prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
            Status::Unknown => "UNKNOWN",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a probe did not report OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The connection was refused (nothing listens) or reset at once.
    Refused,
    /// The deadline passed (connect, TLS, or waiting for an answer).
    Timeout,
    /// TLS handshake or certificate verification failed.
    Tls,
    /// The server rejected the credentials.
    Authentication,
    /// The peer broke the protocol (garbage, truncated or oversized answers).
    Protocol,
    /// The peer spoke the protocol but answered something other than expected
    /// (an error reply, a wrong HTTP status, a body that does not match).
    UnexpectedAnswer,
    /// Everything worked, but slower than the warning threshold.
    Slow,
    /// The host name could not be resolved.
    Resolve,
    /// A local or network I/O error other than the above.
    Io,
    /// A process or resource is not running (process probe, OCF 7).
    NotRunning,
    /// A database accepted reads but refused writes (standby, read-only).
    ReadOnly,
    /// The probe itself is misconfigured (missing program, bad option).
    Config,
}

impl FailureClass {
    /// snake_case name, as in `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Refused => "refused",
            FailureClass::Timeout => "timeout",
            FailureClass::Tls => "tls",
            FailureClass::Authentication => "authentication",
            FailureClass::Protocol => "protocol",
            FailureClass::UnexpectedAnswer => "unexpected_answer",
            FailureClass::Slow => "slow",
            FailureClass::Resolve => "resolve",
            FailureClass::Io => "io",
            FailureClass::NotRunning => "not_running",
            FailureClass::ReadOnly => "read_only",
            FailureClass::Config => "config",
        }
    }
}

impl fmt::Display for FailureClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One Nagios performance datum (`label=value[unit];warn;crit;min;max`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PerfDatum {
    /// The label, unquoted.
    pub label: String,
    /// The measured value.
    pub value: f64,
    /// Unit of measure (`s`, `ms`, `%`, `B`, `c`, or empty).
    pub unit: String,
    /// Warning threshold, when the plugin gave a plain number.
    pub warn: Option<f64>,
    /// Critical threshold, when the plugin gave a plain number.
    pub crit: Option<f64>,
    /// Minimum possible value.
    pub min: Option<f64>,
    /// Maximum possible value.
    pub max: Option<f64>,
}

/// The failure half of a probe run: what went wrong and how bad it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    /// How bad: usually CRITICAL; WARNING for soft answers; UNKNOWN for a
    /// probe that could not judge.
    pub status: Status,
    /// The classification.
    pub class: FailureClass,
    /// One line for humans; never contains a secret.
    pub reason: String,
}

impl ProbeFailure {
    /// A CRITICAL failure of the given class.
    pub fn critical(class: FailureClass, reason: impl Into<String>) -> Self {
        Self { status: Status::Critical, class, reason: one_line(reason.into()) }
    }

    /// A WARNING failure of the given class.
    pub fn warning(class: FailureClass, reason: impl Into<String>) -> Self {
        Self { status: Status::Warning, class, reason: one_line(reason.into()) }
    }

    /// An UNKNOWN failure of the given class.
    pub fn unknown(class: FailureClass, reason: impl Into<String>) -> Self {
        Self { status: Status::Unknown, class, reason: one_line(reason.into()) }
    }
}

/// What a successful check reports, before latency is attached.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProbeSuccess {
    /// One line for humans, e.g. `PostgreSQL 15.4: SELECT 1 ok`.
    pub reason: String,
    /// Performance data, for plugins that print it.
    pub perfdata: Vec<PerfDatum>,
}

impl ProbeSuccess {
    /// Success with a reason and no performance data.
    pub fn new(reason: impl Into<String>) -> Self {
        Self { reason: one_line(reason.into()), perfdata: Vec::new() }
    }
}

/// The outcome of one probe run.
pub type CheckOutcome = Result<ProbeSuccess, ProbeFailure>;

/// The future a [`Probe`] returns. Boxed so probes can be stored as
/// `Box<dyn Probe>` and run by the scheduler.
pub type CheckFuture<'a> = Pin<Box<dyn Future<Output = CheckOutcome> + Send + 'a>>;

/// One application check.
///
/// Implementations must honour `deadline` at every await point (use
/// [`Deadline::run`]); [`run_probe`] also enforces it from outside, so a
/// probe that forgets still cannot hang, but it would lose the precise
/// reason ("timeout waiting for the 220 greeting").
pub trait Probe: Send + Sync + fmt::Debug {
    /// Short protocol name, e.g. `smtp`.
    fn kind(&self) -> &'static str;

    /// What is probed, for messages; never contains a password.
    fn target(&self) -> String;

    /// Runs the check once.
    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a>;
}

/// A finished probe run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProbeResult {
    /// The Nagios-style verdict.
    pub status: Status,
    /// Wall time from start to verdict.
    #[serde(serialize_with = "ser_ms", rename = "latency_ms")]
    pub latency: Duration,
    /// One line for humans; never contains a secret.
    pub reason: String,
    /// Why it is not OK; `None` when OK.
    #[serde(rename = "failure_class")]
    pub class: Option<FailureClass>,
    /// Performance data.
    pub perfdata: Vec<PerfDatum>,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1000.0)
}

/// Bounds for one probe run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLimits {
    /// Hard deadline for the whole run.
    pub timeout: Duration,
    /// A success slower than this is WARNING / [`FailureClass::Slow`].
    pub warning: Option<Duration>,
}

impl Default for RunLimits {
    fn default() -> Self {
        Self { timeout: Duration::from_secs(10), warning: None }
    }
}

/// Runs `probe` once under `limits`: the deadline is enforced both inside
/// the probe and from outside, and a slow success becomes a WARNING.
pub async fn run_probe(probe: &dyn Probe, limits: RunLimits) -> ProbeResult {
    let start = tokio::time::Instant::now();
    let deadline = Deadline::after(limits.timeout);
    // The outer timeout is a backstop with a small grace, so the probe's own
    // more precise timeout message wins when it is honoured.
    let grace = Duration::from_millis(50);
    let outcome = match tokio::time::timeout(limits.timeout + grace, probe.check(deadline)).await {
        Ok(o) => o,
        Err(_) => Err(ProbeFailure::critical(FailureClass::Timeout, format!("no verdict within {:?}", limits.timeout))),
    };
    let latency = start.elapsed();
    match outcome {
        Ok(ok) => match limits.warning {
            Some(w) if latency > w => ProbeResult {
                status: Status::Warning,
                latency,
                reason: format!("{} (slow: {} ms > {} ms)", ok.reason, latency.as_millis(), w.as_millis()),
                class: Some(FailureClass::Slow),
                perfdata: ok.perfdata,
            },
            _ => ProbeResult { status: Status::Ok, latency, reason: ok.reason, class: None, perfdata: ok.perfdata },
        },
        Err(f) => {
            ProbeResult { status: f.status, latency, reason: f.reason, class: Some(f.class), perfdata: Vec::new() }
        }
    }
}

/// Collapses a reason to one printable line of bounded length, so hostile
/// peers cannot inject newlines or megabytes into logs.
pub fn one_line(s: String) -> String {
    const MAX: usize = 300;
    let needs_work = s.len() > MAX || s.chars().any(|c| c.is_control());
    if !needs_work {
        return s;
    }
    let mut out = String::with_capacity(s.len().min(MAX + 3));
    for c in s.chars() {
        if out.len() >= MAX {
            out.push_str("...");
            break;
        }
        if c == '\n' || c == '\r' || c == '\t' {
            out.push(' ');
        } else if c.is_control() {
            out.push('?');
        } else {
            out.push(c);
        }
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_strips_controls_and_bounds_length() {
        assert_eq!(one_line("a\r\nb\x07".into()), "a  b?");
        let long = "x".repeat(10_000);
        let l = one_line(long);
        assert!(l.len() <= 303, "{}", l.len());
        assert!(l.ends_with("..."));
    }

    #[test]
    fn exit_codes_round_trip() {
        for s in [Status::Ok, Status::Warning, Status::Critical, Status::Unknown] {
            assert_eq!(Status::from_exit_code(s.exit_code()), s);
        }
        assert_eq!(Status::from_exit_code(139), Status::Unknown);
    }
}
