//! Process probe: is a daemon running, judged from `/proc`.
//!
//! Two URL forms:
//!
//! * `process:///run/postgresql/15-main.pid`: read the pid from the pid
//!   file (its first line, so PostgreSQL's multi-line `postmaster.pid`
//!   works too) and check that the process exists and is not a zombie.
//!   With the option `name`, its command name must also match, which
//!   catches a stale pid file whose pid was reused by another program.
//! * `process://name/postgres`: count the live processes whose command
//!   name is exactly `postgres`; options `min` (default 1) and `max`.
//!
//! The command name is the kernel's `comm` (the executable's file name,
//! truncated to 15 bytes), read from `/proc/PID/stat` together with the
//! process state, in one read.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::spec::{SpecContext, SpecError};
use crate::{CheckFuture, Deadline, FailureClass, PerfDatum, Probe, ProbeFailure, ProbeSuccess};

/// The kernel keeps 15 bytes of a command name (TASK_COMM_LEN 16 with NUL).
pub const COMM_MAX: usize = 15;

/// Pid files larger than this are not pid files.
const PID_FILE_MAX: u64 = 4096;

/// Why a pid file gave no pid.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    /// The file does not exist: daemons remove it on a clean stop.
    #[error("pid file {0} does not exist")]
    Missing(PathBuf),
    /// The file exists but cannot be read (permissions, a directory…).
    #[error("cannot read pid file {path}")]
    Unreadable {
        /// The pid file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is empty (a daemon that has not written it yet, or a crash).
    #[error("pid file {0} is empty")]
    Empty(PathBuf),
    /// The first line is not a positive process id.
    #[error("pid file {path} does not start with a process id: {first_line:?}")]
    Garbage {
        /// The pid file.
        path: PathBuf,
        /// Its first line, bounded.
        first_line: String,
    },
    /// The file is too large to be a pid file.
    #[error("pid file {0} is larger than 4 KiB; not a pid file")]
    TooLarge(PathBuf),
}

/// Reads the pid from the first line of `path`.
pub fn read_pid_file(path: &Path) -> Result<i32, PidFileError> {
    let f = std::fs::File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => PidFileError::Missing(path.to_path_buf()),
        _ => PidFileError::Unreadable { path: path.to_path_buf(), source: e },
    })?;
    let mut buf = Vec::new();
    f.take(PID_FILE_MAX + 1)
        .read_to_end(&mut buf)
        .map_err(|e| PidFileError::Unreadable { path: path.to_path_buf(), source: e })?;
    if buf.len() as u64 > PID_FILE_MAX {
        return Err(PidFileError::TooLarge(path.to_path_buf()));
    }
    let text = String::from_utf8_lossy(&buf);
    if text.trim().is_empty() {
        return Err(PidFileError::Empty(path.to_path_buf()));
    }
    let first = text.lines().next().unwrap_or_default().trim();
    match first.parse::<i32>() {
        Ok(pid) if pid > 0 => Ok(pid),
        _ => Err(PidFileError::Garbage { path: path.to_path_buf(), first_line: first.chars().take(40).collect() }),
    }
}

/// A process as `/proc/PID/stat` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcInfo {
    /// The process id.
    pub pid: i32,
    /// The command name (`comm`).
    pub comm: String,
    /// The state letter (`R`, `S`, `D`, `Z`, …).
    pub state: char,
}

impl ProcInfo {
    /// A zombie (exited, not reaped) or dead task does not provide a service.
    pub fn is_defunct(&self) -> bool {
        matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses `/proc/PID/stat`: `pid (comm) state …`. The command name may
/// contain spaces and parentheses, so it ends at the last `)`.
pub fn parse_stat(pid: i32, text: &str) -> Option<ProcInfo> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    if close < open {
        return None;
    }
    let comm = text[open + 1..close].to_string();
    let state = text[close + 1..].trim_start().chars().next()?;
    Some(ProcInfo { pid, comm, state })
}

/// Reads one process; `Ok(None)` when it does not exist.
pub fn proc_info(pid: i32) -> io::Result<Option<ProcInfo>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => Ok(parse_stat(pid, &t)),
        // ESRCH shows up when the process exits between open and read.
        Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The live (not zombie) processes whose command name is exactly `name`,
/// by pid.
pub fn live_processes_named(name: &str) -> io::Result<Vec<i32>> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // Processes come and go during the scan; a vanished one is skipped.
        if let Ok(Some(info)) = proc_info(pid)
            && info.comm == name
            && !info.is_defunct()
        {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

/// What to look for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessTarget {
    /// A pid file, optionally with the expected command name.
    PidFile {
        /// Absolute path of the pid file.
        path: PathBuf,
        /// Expected command name.
        name: Option<String>,
    },
    /// Processes by exact command name, with count bounds.
    Name {
        /// The command name.
        name: String,
        /// Fewest live processes that count as running.
        min: u32,
        /// Most live processes allowed.
        max: Option<u32>,
    },
}

/// `process:///PIDFILE` or `process://name/COMMAND`.
#[derive(Debug, Clone)]
pub struct ProcessProbe {
    target: ProcessTarget,
    /// Set while a check's blocking reads run. A pid file on a hung file
    /// system blocks its reader thread for good; later checks then fail at
    /// once instead of stranding one more thread each.
    busy: Arc<AtomicBool>,
}

impl ProcessProbe {
    /// A probe for `target`.
    pub fn new(target: ProcessTarget) -> Self {
        Self { target, busy: Arc::new(AtomicBool::new(false)) }
    }
}

/// Why `value` can never be a kernel command name, if it cannot.
fn comm_problem(value: &str) -> Option<&'static str> {
    if value.is_empty() {
        Some("a command name must not be empty")
    } else if value.len() > COMM_MAX {
        Some("the kernel keeps only the first 15 bytes of a command name (see /proc/PID/comm); give those")
    } else if value.contains('/') {
        Some("a command name has no '/'; give the executable's file name, e.g. postgres")
    } else {
        None
    }
}

/// Builds a [`ProcessProbe`] from a spec.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let url = ctx.url();
    let usage = "use process:///ABSOLUTE/PATH/TO/PIDFILE or process://name/COMMAND_NAME";
    if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
        return Err(SpecError::Target {
            target: crate::spec::redact_url(url),
            why: format!("no user, password or port; {usage}"),
        });
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(SpecError::Target {
            target: url.to_string(),
            why: format!("no query or fragment; pass options separately; {usage}"),
        });
    }
    let path = crate::spec::percent_decode(url.path());
    let target = match url.host_str().unwrap_or("") {
        "" => {
            if path.len() < 2 || path.ends_with('/') {
                return Err(SpecError::Target { target: url.to_string(), why: format!("no pid file path; {usage}") });
            }
            let name = ctx.opt("name");
            if let Some((n, why)) = name.as_deref().and_then(|n| Some((n, comm_problem(n)?))) {
                return Err(SpecError::BadOption { key: "name".into(), value: n.into(), why: why.into() });
            }
            ProcessTarget::PidFile { path: PathBuf::from(path), name }
        }
        "name" => {
            let name = path.trim_start_matches('/').to_string();
            if let Some(why) = comm_problem(&name) {
                return Err(SpecError::Target { target: url.to_string(), why: format!("{why}; {usage}") });
            }
            let min = ctx.opt_parse::<u32>("min")?.unwrap_or(1);
            let max = ctx.opt_parse::<u32>("max")?;
            if let Some(m) = max
                && m < min
            {
                return Err(SpecError::BadOption {
                    key: "max".into(),
                    value: m.to_string(),
                    why: format!("must be at least min ({min})"),
                });
            }
            ProcessTarget::Name { name, min, max }
        }
        other => {
            return Err(SpecError::Target { target: url.to_string(), why: format!("unknown host {other:?}; {usage}") });
        }
    };
    Ok(Box::new(ProcessProbe::new(target)))
}

fn pid_file_failure(e: PidFileError) -> ProbeFailure {
    // The reason is one line for humans: the error and its cause.
    let msg = match std::error::Error::source(&e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    };
    match e {
        PidFileError::Missing(_) => ProbeFailure::critical(FailureClass::NotRunning, format!("{msg} (not running)")),
        PidFileError::Unreadable { .. } => ProbeFailure::unknown(FailureClass::Config, msg),
        PidFileError::Empty(_) | PidFileError::Garbage { .. } | PidFileError::TooLarge(_) => {
            ProbeFailure::critical(FailureClass::Protocol, msg)
        }
    }
}

fn proc_failure(e: io::Error) -> ProbeFailure {
    ProbeFailure::unknown(FailureClass::Io, format!("cannot read /proc: {e}"))
}

fn check_pid_file(path: &Path, name: Option<&str>) -> Result<ProbeSuccess, ProbeFailure> {
    let shown = path.display();
    let pid = read_pid_file(path).map_err(pid_file_failure)?;
    let info = proc_info(pid).map_err(proc_failure)?.ok_or_else(|| {
        ProbeFailure::critical(
            FailureClass::NotRunning,
            format!("stale pid file {shown}: process {pid} does not exist"),
        )
    })?;
    if info.is_defunct() {
        return Err(ProbeFailure::critical(
            FailureClass::NotRunning,
            format!("process {pid} ({}) from {shown} has exited (zombie, not yet reaped by its parent)", info.comm),
        ));
    }
    if let Some(want) = name
        && info.comm != want
    {
        return Err(ProbeFailure::critical(
            FailureClass::NotRunning,
            format!("stale pid file {shown}: pid {pid} is now {:?}, not {want:?} (pid reused)", info.comm),
        ));
    }
    Ok(ProbeSuccess::new(format!("process {pid} ({}) from {shown} is running (state {})", info.comm, info.state)))
}

fn check_name(name: &str, min: u32, max: Option<u32>) -> Result<ProbeSuccess, ProbeFailure> {
    let pids = live_processes_named(name).map_err(proc_failure)?;
    let n = pids.len() as u32;
    let mut listed: Vec<String> = pids.iter().take(5).map(|p| p.to_string()).collect();
    if pids.len() > 5 {
        listed.push("…".into());
    }
    let listed = listed.join(", ");
    if n < min {
        let msg = if n == 0 {
            format!("no process named {name:?} is running")
        } else {
            format!("{n} process(es) named {name:?} running (pids {listed}), at least {min} required")
        };
        return Err(ProbeFailure::critical(FailureClass::NotRunning, msg));
    }
    if let Some(m) = max
        && n > m
    {
        return Err(ProbeFailure::critical(
            FailureClass::UnexpectedAnswer,
            format!("{n} processes named {name:?} running (pids {listed}), at most {m} allowed"),
        ));
    }
    let mut ok = ProbeSuccess::new(if n == 0 {
        format!("no process named {name:?} running, as allowed (min 0)")
    } else {
        format!("{n} process(es) named {name:?} running (pids {listed})")
    });
    ok.perfdata.push(PerfDatum {
        label: "procs".into(),
        value: n as f64,
        unit: String::new(),
        warn: None,
        crit: None,
        min: Some(0.0),
        max: None,
    });
    Ok(ok)
}

impl Probe for ProcessProbe {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn target(&self) -> String {
        match &self.target {
            ProcessTarget::PidFile { path, .. } => format!("process://{}", path.display()),
            ProcessTarget::Name { name, .. } => format!("process://name/{name}"),
        }
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            let target = self.target.clone();
            if self.busy.swap(true, Ordering::AcqRel) {
                return Err(ProbeFailure::critical(
                    FailureClass::Timeout,
                    format!("the previous check of {} is still blocked reading (hung file system?)", self.target()),
                ));
            }
            let busy = Arc::clone(&self.busy);
            // /proc reads do not block for long, but a pid file on a hung
            // NFS mount can: keep them off the runtime and under the deadline.
            let job = tokio::task::spawn_blocking(move || {
                let outcome = match &target {
                    ProcessTarget::PidFile { path, name } => check_pid_file(path, name.as_deref()),
                    ProcessTarget::Name { name, min, max } => check_name(name, *min, *max),
                };
                busy.store(false, Ordering::Release);
                outcome
            });
            match deadline.run("reading the pid file and /proc", job).await? {
                Ok(outcome) => outcome,
                Err(e) => Err(ProbeFailure::unknown(FailureClass::Io, format!("process check failed: {e}"))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_command_names() {
        let i = parse_stat(7, "7 (a) b (c)) S 1 7 7 0 -1").unwrap();
        assert_eq!((i.comm.as_str(), i.state), ("a) b (c)", 'S'));
        assert!(parse_stat(7, "7 ) (x").is_none());
        assert!(parse_stat(7, "7 (x)").is_none());
        assert!(parse_stat(7, "7 (x) Z 1").unwrap().is_defunct());
    }

    #[test]
    fn self_is_visible() {
        let me = proc_info(std::process::id() as i32).unwrap().unwrap();
        assert!(!me.is_defunct());
        assert!(live_processes_named(&me.comm).unwrap().contains(&(std::process::id() as i32)));
    }
}
