//! The command runner every process-based probe and resource uses, the
//! Nagios plugin output parser, and the `exec` probe (any Nagios /
//! monitoring-plugins program, unmodified).
//!
//! The runner starts the program in a process group of its own, captures
//! bounded stdout/stderr, and on timeout (or when its future is dropped)
//! kills the whole group, so that a plugin that forks a grandchild and
//! hangs never leaves anything behind.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use crate::spec::{SpecContext, SpecError};
use crate::{CheckFuture, Deadline, FailureClass, PerfDatum, Probe, ProbeFailure, ProbeSuccess};

/// Default cap on captured stdout and on captured stderr.
pub const DEFAULT_OUTPUT_LIMIT: usize = 64 * 1024;

/// Default time between SIGTERM and SIGKILL.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_millis(1500);

/// Where the exec probe looks for a program given without a `/`, after PATH.
pub const PLUGIN_DIRS: &[&str] =
    &["/usr/lib/nagios/plugins", "/usr/lib/monitoring-plugins", "/usr/local/nagios/libexec"];

/// What happens to processes still in the group after the program itself
/// exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Leftovers {
    /// Terminate them (SIGTERM, then SIGKILL after the grace): right for
    /// checks, where anything left behind is an orphan.
    #[default]
    Kill,
    /// Leave them running: right for actions that start a service (an OCF
    /// `start` whose daemon stays in the group). Output is then read only
    /// for a short drain period after the program exits.
    Keep,
}

/// A program to run: argv, environment, working directory and limits.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    /// The program; a path, or a name looked up in PATH.
    pub program: PathBuf,
    /// Arguments after the program name.
    pub args: Vec<OsString>,
    /// Variables added to (or overriding) the environment.
    pub env: Vec<(OsString, OsString)>,
    /// Start from an empty environment instead of ours.
    pub clear_env: bool,
    /// Working directory; ours when `None`.
    pub cwd: Option<PathBuf>,
    /// Time after which the whole process group gets SIGTERM.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Cap on captured stdout and on captured stderr; the rest is read and
    /// discarded so the program never blocks on a full pipe.
    pub output_limit: usize,
    /// What to do with group members left after the program exits.
    pub leftovers: Leftovers,
    /// Code run in the child just before `exec` (cgroup placement, dropping
    /// privileges); a failure there fails the spawn.
    pub child_setup: Option<ChildSetup>,
    /// Bytes written to the program's stdin (then closed); stdin is
    /// `/dev/null` when `None`. Fence agents read their parameters,
    /// passwords included, from here, so `Debug` shows only the length.
    pub stdin: Option<StdinBytes>,
}

/// Data for a program's stdin. It may hold a password: `Debug` prints its
/// length only.
#[derive(Clone, PartialEq, Eq)]
pub struct StdinBytes(pub Vec<u8>);

impl std::fmt::Debug for StdinBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StdinBytes({} bytes, not shown)", self.0.len())
    }
}

/// Code run in a child process between `fork` and `exec`, after the working
/// directory and process group are set: the resources use it to put every
/// program they start into a cgroup and to switch users.
#[derive(Clone)]
pub struct ChildSetup(Arc<dyn Fn() -> io::Result<()> + Send + Sync>);

impl ChildSetup {
    /// Wraps `f`.
    ///
    /// # Safety
    /// `f` runs in the child of a fork of a multi-threaded process: it must only
    /// make async-signal-safe calls (raw syscalls on data prepared beforehand),
    /// never allocate, lock, or touch state other threads may have held.
    pub unsafe fn new(f: impl Fn() -> io::Result<()> + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Installs the setup on `cmd`.
    pub fn install(&self, cmd: &mut tokio::process::Command) {
        let f = Arc::clone(&self.0);
        // SAFETY: `ChildSetup::new`'s contract makes the closure async-signal-safe,
        // which is what `pre_exec` requires.
        unsafe { cmd.pre_exec(move || f()) };
    }
}

impl std::fmt::Debug for ChildSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChildSetup(..)")
    }
}

/// Two setups are equal when they are the same closure.
impl PartialEq for ChildSetup {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ChildSetup {}

impl CommandSpec {
    /// A spec for `program` with no arguments, a 10 s timeout and the defaults.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            clear_env: false,
            cwd: None,
            timeout: Duration::from_secs(10),
            kill_grace: DEFAULT_KILL_GRACE,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            leftovers: Leftovers::Kill,
            child_setup: None,
            stdin: None,
        }
    }

    /// Feeds `data` to the program's stdin, then closes it.
    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(StdinBytes(data.into()));
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets one environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Sets the SIGTERM → SIGKILL grace.
    pub fn kill_grace(mut self, g: Duration) -> Self {
        self.kill_grace = g;
        self
    }

    /// Sets the leftover policy.
    pub fn leftovers(mut self, l: Leftovers) -> Self {
        self.leftovers = l;
        self
    }

    /// Sets the code run in the child before `exec`.
    pub fn child_setup(mut self, s: ChildSetup) -> Self {
        self.child_setup = Some(s);
        self
    }
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
}

impl std::fmt::Display for Termination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Termination::Exited(c) => write!(f, "exit code {c}"),
            Termination::Signaled(s) => write!(f, "killed by signal {s}"),
        }
    }
}

impl From<ExitStatus> for Termination {
    fn from(s: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (s.code(), s.signal()) {
            (Some(c), _) => Termination::Exited(c),
            (None, Some(sig)) => Termination::Signaled(sig),
            // Stopped/continued statuses are not returned by wait(); be total anyway.
            (None, None) => Termination::Signaled(0),
        }
    }
}

/// The result of one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// How the program (the group leader) ended.
    pub termination: Termination,
    /// Captured stdout, at most `output_limit` bytes.
    pub stdout: Vec<u8>,
    /// Captured stderr, at most `output_limit` bytes.
    pub stderr: Vec<u8>,
    /// stdout was longer than the limit.
    pub stdout_truncated: bool,
    /// stderr was longer than the limit.
    pub stderr_truncated: bool,
    /// The timeout passed and the group was killed.
    pub timed_out: bool,
    /// Wall time from spawn to the end of clean-up.
    pub elapsed: Duration,
    /// The process group id (the program's pid).
    pub pgid: i32,
}

impl RunOutput {
    /// The exit code, if the program exited rather than being killed.
    pub fn exit_code(&self) -> Option<i32> {
        match self.termination {
            Termination::Exited(c) => Some(c),
            Termination::Signaled(_) => None,
        }
    }
}

/// Why a program could not be run at all.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The program (or its `#!` interpreter, or the working directory) does not exist.
    #[error("cannot run {program}: not found (check the path, its #! interpreter and the working directory)")]
    NotFound {
        /// The program.
        program: String,
    },
    /// The program is not executable by us.
    #[error("cannot run {program}: permission denied (is it executable? chmod +x)")]
    PermissionDenied {
        /// The program.
        program: String,
    },
    /// Spawning failed otherwise.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Waiting for the program failed (should not happen).
    #[error("waiting for {program} failed")]
    Wait {
        /// The program.
        program: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Kills the process group when dropped while armed: the cancellation path
/// (a scheduler dropping a probe future mid-run) must not leave orphans.
#[derive(Debug)]
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

/// Sends `sig` to process group `pgid`; ESRCH (group gone) is fine.
fn signal_group(pgid: i32, sig: libc::c_int) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid signals the process group we created for the
    // child; it touches no memory of ours.
    unsafe { libc::kill(-pgid, sig) };
}

/// Pids of the processes of group `pgid` that are still alive (zombies
/// excluded: they are dead, and reaping orphans is PID 1's job).
pub fn live_group_members(pgid: i32) -> Vec<i32> {
    if pgid <= 1 {
        return Vec::new();
    }
    // Fast path: no process at all (not even a zombie) is in the group.
    // SAFETY: kill(2) with signal 0 only checks for existence; nothing is delivered.
    if unsafe { libc::kill(-pgid, 0) } != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        let Some(close) = stat.rfind(')') else { continue };
        let mut f = stat[close + 1..].split_whitespace();
        let state = f.next().unwrap_or("");
        let _ppid = f.next();
        let pgrp = f.next().and_then(|s| s.parse::<i32>().ok());
        if pgrp == Some(pgid) && state != "Z" && state != "X" {
            out.push(pid);
        }
    }
    out
}

/// Waits until group `pgid` has no live member or `until` passes; true when empty.
async fn group_gone_by(pgid: i32, until: Instant) -> bool {
    loop {
        if live_group_members(pgid).is_empty() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGTERM the group, wait up to `grace` for it to empty, then SIGKILL and
/// wait (bounded) until the kernel has removed every member.
async fn terminate_group(pgid: i32, grace: Duration) {
    signal_group(pgid, libc::SIGTERM);
    if group_gone_by(pgid, Instant::now() + grace).await {
        return;
    }
    signal_group(pgid, libc::SIGKILL);
    // SIGKILL cannot be ignored; this only waits for the kernel to tear down.
    if !group_gone_by(pgid, Instant::now() + Duration::from_secs(2)).await {
        tracing::warn!(pgid, "processes of group survived SIGKILL (uninterruptible sleep?)");
    }
}

#[derive(Debug)]
struct Captured {
    data: Vec<u8>,
    limit: usize,
    truncated: bool,
}

impl Captured {
    fn push(&mut self, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.data.len());
        if chunk.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }
}

async fn read_bounded<R: AsyncRead + Unpin>(r: Option<R>, cap: &mut Captured) {
    let Some(mut r) = r else { return };
    let mut chunk = [0u8; 8192];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => cap.push(&chunk[..n]),
        }
    }
}

/// How long output is still read after the program exited while members
/// that keep the pipes open stay alive ([`Leftovers::Keep`]).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// Runs `spec` to completion: own process group, bounded capture, timeout
/// with SIGTERM → grace → SIGKILL of the whole group, and no live member
/// of the group left on return (with [`Leftovers::Kill`]). Dropping the
/// future SIGKILLs the group.
pub async fn run_command(spec: &CommandSpec) -> Result<RunOutput, RunError> {
    let program = spec.program.display().to_string();
    let start = Instant::now();
    let deadline = start + spec.timeout;

    let mut cmd = tokio::process::Command::new(&spec.program);
    cmd.args(&spec.args)
        .stdin(if spec.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if spec.clear_env {
        cmd.env_clear();
    }
    for (k, v) in &spec.env {
        cmd.env(k, v);
    }
    if let Some(d) = &spec.cwd {
        cmd.current_dir(d);
    }
    if let Some(s) = &spec.child_setup {
        s.install(&mut cmd);
    }
    // ETXTBSY: the program was just written and another thread's fork still
    // holds it open for writing for a moment (config management, tests).
    let mut tries = 0;
    let spawned = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => break other,
        }
    };
    let mut child = spawned.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => RunError::NotFound { program: program.clone() },
        io::ErrorKind::PermissionDenied => RunError::PermissionDenied { program: program.clone() },
        _ => RunError::Spawn { program: program.clone(), source: e },
    })?;
    let pgid = child.id().map(|p| p as i32).unwrap_or(0);
    let mut guard = GroupGuard { pgid, armed: true };

    let mut out = Captured { data: Vec::new(), limit: spec.output_limit, truncated: false };
    let mut err = Captured { data: Vec::new(), limit: spec.output_limit, truncated: false };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let (status, timed_out) = {
        let stdin = child.stdin.take();
        let feeding = async {
            if let (Some(mut w), Some(data)) = (stdin, &spec.stdin) {
                use tokio::io::AsyncWriteExt;
                // EPIPE (the program exited without reading) is not our error; dropping `w` closes
                // the pipe so the program sees EOF.
                let _ = w.write_all(&data.0).await;
            }
        };
        let reading = async {
            tokio::join!(feeding, read_bounded(stdout, &mut out), read_bounded(stderr, &mut err));
        };
        let waiting = async {
            match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(r) => (r, false),
                Err(_) => {
                    terminate_group(pgid, spec.kill_grace).await;
                    // Everything got SIGKILL at the latest: the leader's status is at hand.
                    (child.wait().await, true)
                }
            }
        };
        tokio::pin!(reading, waiting);
        let mut read_done = false;
        let (status, timed_out) = loop {
            tokio::select! {
                r = &mut waiting => break r,
                _ = &mut reading, if !read_done => read_done = true,
            }
        };
        let status = status.map_err(|e| RunError::Wait { program: program.clone(), source: e })?;
        if spec.leftovers == Leftovers::Kill && !live_group_members(pgid).is_empty() {
            // The program exited (or was killed) but left members behind.
            terminate_group(pgid, spec.kill_grace).await;
        }
        // The leader is reaped and, with Kill, the group is empty; with Keep,
        // what is left is the started service, which a cancelled drain below
        // must not kill.
        guard.armed = false;
        if !read_done {
            let drain = match spec.leftovers {
                // Every member is dead, so the pipes are at EOF unless a process
                // that left the group (setsid) holds them: do not wait for it
                // past the timeout.
                Leftovers::Kill => {
                    deadline.saturating_duration_since(Instant::now()).clamp(DRAIN_AFTER_EXIT, Duration::from_secs(1))
                }
                Leftovers::Keep => DRAIN_AFTER_EXIT,
            };
            let _ = tokio::time::timeout(drain, &mut reading).await;
        }
        (status, timed_out)
    };
    Ok(RunOutput {
        termination: status.into(),
        stdout: out.data,
        stderr: err.data,
        stdout_truncated: out.truncated,
        stderr_truncated: err.truncated,
        timed_out,
        elapsed: start.elapsed(),
        pgid,
    })
}

/// Resolves a program name: a path is used as is; a bare name is looked up
/// in PATH and then in `extra_dirs`.
pub fn resolve_program(name: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .chain(extra_dirs.iter().copied())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// A Nagios plugin's output, split per the plugin guidelines:
/// `TEXT | PERFDATA` on the first line, then long text lines, and after the
/// first `|` in the long text, more perfdata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PluginOutput {
    /// The first line's text part, trimmed.
    pub text: String,
    /// The long-text lines (without their perfdata parts).
    pub long_text: Vec<String>,
    /// Every performance datum that parsed; malformed items are skipped.
    pub perfdata: Vec<PerfDatum>,
}

/// Parses plugin output. Never fails: garbage yields text and skipped perfdata.
pub fn parse_plugin_output(out: &str) -> PluginOutput {
    let mut lines = out.lines();
    let first = lines.next().unwrap_or("");
    let (text, perf) = match first.split_once('|') {
        Some((t, p)) => (t, p),
        None => (first, ""),
    };
    let mut res = PluginOutput { text: text.trim().to_string(), long_text: Vec::new(), perfdata: parse_perfdata(perf) };
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            res.perfdata.extend(parse_perfdata(line));
        } else if let Some((t, p)) = line.split_once('|') {
            res.long_text.push(t.trim_end().to_string());
            res.perfdata.extend(parse_perfdata(p));
            in_perf = true;
        } else {
            res.long_text.push(line.to_string());
        }
    }
    res
}

/// Parses a perfdata string: whitespace-separated
/// `'label'=value[UOM];[warn];[crit];[min];[max]` items. Labels may be
/// quoted with `'` (a doubled `''` is a literal quote). A value of `U`
/// (undetermined) parses as NaN. Thresholds that are ranges (`10:20`, `@5`)
/// are kept as `None`. Malformed items are skipped.
pub fn parse_perfdata(s: &str) -> Vec<PerfDatum> {
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < chars.len() {
        if chars[i].is_whitespace() {
            i += 1;
            continue;
        }
        let mut label = String::new();
        let mut ok = true;
        if chars[i] == '\'' {
            i += 1;
            loop {
                match chars.get(i) {
                    None => {
                        ok = false;
                        break;
                    }
                    Some('\'') if chars.get(i + 1) == Some(&'\'') => {
                        label.push('\'');
                        i += 2;
                    }
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some(&c) => {
                        label.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
                label.push(chars[i]);
                i += 1;
            }
        }
        if !ok || chars.get(i) != Some(&'=') || label.is_empty() {
            // Not an item: skip to the next whitespace.
            while i < chars.len() && !chars[i].is_whitespace() {
                i += 1;
            }
            continue;
        }
        i += 1;
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() {
            i += 1;
        }
        let item: String = chars[start..i].iter().collect();
        if let Some(d) = parse_item(label, &item) {
            out.push(d);
        }
    }
    out
}

fn parse_item(label: String, item: &str) -> Option<PerfDatum> {
    let mut fields = item.split(';');
    let vu = fields.next()?;
    let (value, unit) = if let Some(unit) = vu.strip_prefix('U') {
        (f64::NAN, unit.to_string())
    } else {
        let (v, rest) = leading_number(vu)?;
        (v, rest.to_string())
    };
    if unit.chars().any(|c| c.is_ascii_digit() || c.is_control()) {
        return None;
    }
    let mut num = || fields.next().and_then(|f| leading_number(f).filter(|(_, rest)| rest.is_empty()).map(|(v, _)| v));
    let (warn, crit, min, max) = (num(), num(), num(), num());
    Some(PerfDatum { label, value, unit, warn, crit, min, max })
}

/// The longest leading decimal number of `s` (a `,` decimal separator is
/// accepted, as some locales print it) and the rest.
fn leading_number(s: &str) -> Option<(f64, &str)> {
    let end =
        s.find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | ',' | '-' | '+' | 'e' | 'E'))).unwrap_or(s.len());
    // Shrink until it parses: "5e" in "5eggs" or a trailing "-" are not part of the number.
    let mut n = end;
    while n > 0 {
        if s.is_char_boundary(n)
            && let Ok(v) = s[..n].replace(',', ".").parse::<f64>()
            && v.is_finite()
        {
            return Some((v, &s[n..]));
        }
        n -= 1;
    }
    None
}

/// `exec`: runs a Nagios plugin (spec.args = PROGRAM ARGS…) and maps its
/// exit code and output. Options: `cwd`, `kill_grace` (seconds), and
/// `env.NAME=VALUE` for extra environment variables.
#[derive(Debug, Clone)]
pub struct ExecProbe {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<PathBuf>,
    kill_grace: Duration,
}

/// Builds an [`ExecProbe`] from a spec.
pub fn build(ctx: &SpecContext<'_>) -> Result<Box<dyn Probe>, SpecError> {
    let mut argv = ctx.spec.args.iter();
    let program = argv
        .next()
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| SpecError::Missing("exec: no program given (spec args = PROGRAM ARGS...)".into()))?
        .clone();
    let mut env = Vec::new();
    for k in ctx.spec.options.keys().filter(|k| k.starts_with("env.")) {
        let name = &k["env.".len()..];
        if name.is_empty() || name.contains('=') {
            return Err(SpecError::BadOption {
                key: k.clone(),
                value: String::new(),
                why: "expected env.NAME with a non-empty NAME without '='".into(),
            });
        }
        env.push((name.to_string(), ctx.opt(k).unwrap_or_default()));
    }
    Ok(Box::new(ExecProbe {
        program,
        args: argv.cloned().collect(),
        env,
        cwd: ctx.opt("cwd").map(PathBuf::from),
        kill_grace: ctx.opt_secs("kill_grace")?.unwrap_or(DEFAULT_KILL_GRACE),
    }))
}

impl ExecProbe {
    /// A probe for `program` with `args`, default options.
    pub fn new(program: impl Into<String>, args: Vec<String>) -> Self {
        Self { program: program.into(), args, env: Vec::new(), cwd: None, kill_grace: DEFAULT_KILL_GRACE }
    }
}

/// The grace that fits in `remaining`: the probe sends SIGTERM at
/// `deadline - grace` so that SIGKILL lands by the deadline itself.
fn fitted_grace(remaining: Duration, grace: Duration) -> Duration {
    grace.min(remaining / 4)
}

impl Probe for ExecProbe {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn target(&self) -> String {
        std::iter::once(self.program.as_str()).chain(self.args.iter().map(String::as_str)).collect::<Vec<_>>().join(" ")
    }

    fn check<'a>(&'a self, deadline: Deadline) -> CheckFuture<'a> {
        Box::pin(async move {
            let Some(path) = resolve_program(&self.program, PLUGIN_DIRS) else {
                return Err(ProbeFailure::unknown(
                    FailureClass::Config,
                    format!("plugin {} not found in PATH or {}", self.program, PLUGIN_DIRS.join(", ")),
                ));
            };
            let remaining = deadline.remaining();
            let grace = fitted_grace(remaining, self.kill_grace);
            let mut spec = CommandSpec::new(path).args(&self.args).timeout(remaining - grace).kill_grace(grace);
            spec.cwd = self.cwd.clone();
            spec.env = self.env.iter().map(|(k, v)| (k.into(), v.into())).collect();
            let out = match run_command(&spec).await {
                Ok(o) => o,
                Err(e @ (RunError::NotFound { .. } | RunError::PermissionDenied { .. })) => {
                    return Err(ProbeFailure::unknown(FailureClass::Config, e.to_string()));
                }
                Err(e) => return Err(ProbeFailure::unknown(FailureClass::Io, error_chain(&e))),
            };
            plugin_outcome(&self.program, &out, remaining)
        })
    }
}

/// An error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The first non-empty line of `b`, lossily decoded and trimmed.
pub(crate) fn first_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b).lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string()
}

/// Maps a finished plugin run to a verdict per the plugin API.
fn plugin_outcome(program: &str, out: &RunOutput, timeout: Duration) -> crate::CheckOutcome {
    let parsed = parse_plugin_output(&String::from_utf8_lossy(&out.stdout));
    let text = if parsed.text.is_empty() {
        let err = first_line(&out.stderr);
        if err.is_empty() {
            format!("{program}: {} without output", out.termination)
        } else {
            format!("{program}: {} without output; stderr: {err}", out.termination)
        }
    } else {
        parsed.text
    };
    if out.timed_out {
        return Err(ProbeFailure::critical(
            FailureClass::Timeout,
            format!(
                "{program} timed out after {:.1} s; its process group was killed (last output: {text})",
                timeout.as_secs_f64()
            ),
        ));
    }
    match out.termination {
        Termination::Exited(0) => Ok(ProbeSuccess { reason: crate::one_line(text), perfdata: parsed.perfdata }),
        Termination::Exited(1) => Err(ProbeFailure::warning(FailureClass::UnexpectedAnswer, text)),
        Termination::Exited(2) => Err(ProbeFailure::critical(FailureClass::UnexpectedAnswer, text)),
        Termination::Exited(3) => Err(ProbeFailure::unknown(FailureClass::UnexpectedAnswer, text)),
        other => Err(ProbeFailure::unknown(
            FailureClass::Protocol,
            format!("{program}: {other}, outside the plugin API's 0-3 ({text})"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stdin_is_fed_then_closed_and_never_printed() {
        let spec = CommandSpec::new("cat").stdin("password=hunter2\n").timeout(Duration::from_secs(10));
        assert!(!format!("{spec:?}").contains("hunter2"), "{spec:?}");
        // `cat` only exits once stdin is closed.
        let out = run_command(&spec).await.unwrap();
        assert_eq!(
            (out.exit_code(), out.stdout.as_slice(), out.timed_out),
            (Some(0), &b"password=hunter2\n"[..], false)
        );
    }

    #[test]
    fn perfdata_items() {
        let p = parse_perfdata("time=0.003s;1.0;2;0;10 'a b''c'=5% size=12B;;;0 bad x=U");
        assert_eq!(p.len(), 4, "{p:?}");
        assert_eq!(p[0].label, "time");
        assert_eq!(p[0].value, 0.003);
        assert_eq!(p[0].unit, "s");
        assert_eq!((p[0].warn, p[0].crit, p[0].min, p[0].max), (Some(1.0), Some(2.0), Some(0.0), Some(10.0)));
        assert_eq!(p[1].label, "a b'c");
        assert_eq!(p[1].unit, "%");
        assert_eq!((p[2].warn, p[2].crit, p[2].min), (None, None, Some(0.0)));
        assert!(p[3].value.is_nan());
    }

    #[test]
    fn ranges_are_not_plain_thresholds() {
        let p = parse_perfdata("load=1.5;10:20;@5;0");
        assert_eq!((p[0].warn, p[0].crit, p[0].min), (None, None, Some(0.0)));
    }

    #[test]
    fn multi_line_output() {
        let o = parse_plugin_output(
            "DISK OK - free | /=2643MB;5948;5958;0;5968\n/ 15272 MB\n/boot 68 MB | /boot=68MB;88;93;0;98\n/home=69357MB;253404;253409;0;253414\n",
        );
        assert_eq!(o.text, "DISK OK - free");
        assert_eq!(o.long_text, vec!["/ 15272 MB", "/boot 68 MB"]);
        let labels: Vec<_> = o.perfdata.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(labels, ["/", "/boot", "/home"]);
        assert_eq!(o.perfdata[0].value, 2643.0);
        assert_eq!(o.perfdata[0].unit, "MB");
    }

    #[test]
    fn comma_decimal_and_trailing_garbage() {
        let p = parse_perfdata("a=0,5s b=5eggs c=-3 d=");
        assert_eq!(p[0].value, 0.5);
        assert_eq!(p[1].value, 5.0);
        assert_eq!(p[1].unit, "eggs");
        assert_eq!(p[2].value, -3.0);
        assert_eq!(p.len(), 3);
    }
}
