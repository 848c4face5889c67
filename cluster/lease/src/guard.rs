//! The fencing guard: a small separate process that SIGKILLs registered process groups and cgroups
//! when the lease holder stops proving that its lease is still valid.
//!
//! Self-fencing must not depend on the agent being scheduled: an agent that is stopped (SIGSTOP, a
//! stalled VM, a hung disk read in uninterruptible sleep) cannot kill anything. So the agent hands
//! the kill to a guard process that does nothing but wait in `poll(2)` on a pipe:
//!
//! * `reg <pgid>` / `unreg <pgid>`: (un)register a process group to kill when fencing.
//! * `regcg <path>` / `unregcg <path>`: (un)register a cgroup v2 directory to kill when fencing
//!   (absolute, strictly below a cgroup2 mount, not containing the guard; others are refused and
//!   logged). A cgroup also holds daemons that left their process group with `setsid()`. Killing
//!   writes `1` to its `cgroup.kill`, or where the kernel lacks it (before 5.14) freezes it and
//!   SIGKILLs every pid listed in it and its descendants until they are empty (bounded); see
//!   [`crate::cgroup`].
//! * `regpid <pid> <start>` / `unregpid <pid> <start>`: (un)register one process to kill when
//!   fencing, named by its pid and its start time (field 22 of `/proc/<pid>/stat`, clock ticks
//!   since boot). The guard opens a pidfd for it at once and keeps it: the kill goes through the
//!   pidfd, so it can never hit another process that reused the pid later. A pid whose start
//!   time does not match (the process ended and the pid was reused before the guard opened it),
//!   or for which no pidfd can be opened (no `pidfd_open`, out of file descriptors), is refused
//!   and logged. The guard answers every `regpid` on its stdout with `regpid <pid> <start> ok`
//!   or `regpid <pid> <start> refused <why>`, and [`GuardHandle::register_process`] waits for
//!   that answer: a refused process is the caller's error, never silently unguarded.
//!   `unregpid` removes only the registration with that same start time, so a late
//!   unregistration of an ended process cannot remove a newer process that reused its pid.
//!   For processes the agent does not start itself and that have no cgroup of their own (a
//!   QEMU started by libvirtd, see the host agent).
//! * `regaddr <iface> <addr>/<prefix>` / `unregaddr …`: (un)register a floating IP address to
//!   remove from that interface when fencing (after the kills): the application is gone, so its
//!   address must go too, or the node's kernel keeps answering for it and the next holder's
//!   duplicate-address check refuses to bring it up. Removed with `ip addr del`.
//! * `pet <ms>`: the kill deadline, an absolute time in milliseconds on the lease clock
//!   ([`crate::clock::monotonic_now`], CLOCK_BOOTTIME: system-wide, counts through suspend). The agent
//!   computes it from the *start* of its last successful renewal plus the fence deadline, so the
//!   deadline is never later than the lease allows, however late the pet arrives.
//! * `bye`: orderly shutdown; the following end of file does not fence.
//!
//! The guard SIGKILLs every registered group and cgroup when the deadline passes without a newer pet, and at
//! once when its input reaches end of file without a `bye` (the agent died). Both ends run on the
//! same machine, so both read the same clock.
//!
//! [`run_guard`] is the guard's side (blocking, called by the process that is the guard, e.g.
//! `tandemctl lease guard`); [`GuardHandle`] is the agent's side.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigHandler, Signal, kill, signal};
use nix::unistd::Pid;

use crate::cgroup::{CgroupError, KillMethod, check_path, check_registrable, kill_path};
use crate::clock::{Millis, monotonic_now};
use crate::watchdog::{Watchdog, timeout_for_pet};

/// Errors of the guard and of its client handle.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    /// The guard process could not be started.
    #[error("cannot start the fencing guard process `{program}`; check that the binary exists and is executable")]
    Spawn {
        /// The program that was executed.
        program: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A message could not be delivered to the guard: it died, or it stopped reading.
    #[error(
        "cannot send `{message}` to the fencing guard (pid {pid}); the guard is gone or stalled, so \
         the resources it protects must be stopped by the caller"
    )]
    Send {
        /// The message that was not delivered.
        message: String,
        /// The guard's process id.
        pid: u32,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// Waiting for the guard to exit failed.
    #[error("cannot wait for the fencing guard (pid {pid}) to exit")]
    Wait {
        /// The guard's process id.
        pid: u32,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// An address the guard cannot remove: a bad interface name or address.
    #[error(
        "refusing to guard address {address:?} on interface {interface:?}: give an interface name (1-15 \
         characters, no `/` or spaces) and an address with its prefix length, e.g. 10.0.0.50/24"
    )]
    BadAddress {
        /// The interface as given.
        interface: String,
        /// The address as given.
        address: String,
    },
    /// The guard's input could not be polled or read.
    #[error("the fencing guard cannot read its command pipe")]
    Input(#[source] io::Error),
    /// A line on the guard's input was not a valid message.
    #[error(
        "the fencing guard received an invalid message {line:?}; expected `reg PGID`, `unreg PGID`, \
         `regcg PATH`, `unregcg PATH`, `regpid PID START`, `unregpid PID START`, `regaddr IFACE ADDR`, \
         `unregaddr IFACE ADDR`, `pet MS` or `bye`"
    )]
    Protocol {
        /// The offending line (lossily decoded).
        line: String,
    },
    /// The guard process started but ended, or did not say it was ready, within its limit (a
    /// watchdog it could not open, a bad argument: its own message is on stderr).
    #[error("the fencing guard `{program}` did not become ready: {detail}")]
    NotReady {
        /// The program.
        program: String,
        /// Its exit status, or that it did not answer in time.
        detail: String,
    },
    /// The configured hardware watchdog cannot be opened (`--watchdog PATH`).
    #[error("cannot open the watchdog device {}; check the path and that no other program holds it", path.display())]
    Watchdog {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The guard's command line is not understood.
    #[error("invalid guard arguments: {0}")]
    Args(String),
    /// A process group id that cannot be killed safely (0, 1 or negative would hit other processes).
    #[error("refusing to guard process group {0}: only ids above 1 name a single process group")]
    BadPgid(i32),
    /// A cgroup that cannot be guarded (not absolute, not under a cgroup2 mount, missing, or
    /// containing the guard itself).
    #[error("refusing to guard this cgroup")]
    BadCgroup(#[source] CgroupError),
    /// A process that cannot be guarded: pid 0 or 1, this process or the guard, or a process
    /// that is gone (or whose pid now names another process: its start time differs).
    #[error("refusing to guard process {pid}: {why}")]
    BadProcess {
        /// The pid as given.
        pid: i32,
        /// Why.
        why: String,
    },
    /// The guard did not confirm a `regpid` in time (stalled or gone): the process may be
    /// unguarded.
    #[error("the fencing guard did not confirm guarding process {pid}: {detail}")]
    Unconfirmed {
        /// The pid.
        pid: i32,
        /// What happened instead.
        detail: String,
    },
}

/// A floating IP address the guard removes when fencing: `address` (with its prefix length) on
/// `interface`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GuardedAddress {
    /// The interface name.
    pub interface: String,
    /// The address and prefix length, e.g. `10.0.0.50/24` or `fd00::50/64`.
    pub address: String,
}

impl GuardedAddress {
    /// Checks the interface name and the address, so that the wire line and the `ip` command
    /// built from them are well formed.
    pub fn new(interface: &str, address: &str) -> Result<Self, GuardError> {
        let bad = || GuardError::BadAddress { interface: interface.to_owned(), address: address.to_owned() };
        let iface_ok = !interface.is_empty()
            && interface.len() <= 15
            && interface.chars().all(|c| !c.is_whitespace() && !c.is_control() && c != '/');
        let (addr, prefix) = address.split_once('/').ok_or_else(bad)?;
        let ip: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let prefix_ok = prefix.parse::<u8>().is_ok_and(|p| p <= max) && !prefix.starts_with('+');
        if !iface_ok || !prefix_ok {
            return Err(bad());
        }
        Ok(GuardedAddress { interface: interface.to_owned(), address: format!("{ip}/{prefix}") })
    }
}

/// Now on the clock of kill deadlines, the lease clock (CLOCK_BOOTTIME), in milliseconds.
fn monotonic_ms() -> u64 {
    monotonic_now().0
}

/// One message from the agent to the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardMessage {
    /// Kill this process group when fencing.
    Register(i32),
    /// Stop guarding this process group (it exited, or was stopped in an orderly way).
    Unregister(i32),
    /// Kill everything in this cgroup (and its descendants) when fencing.
    RegisterCgroup(PathBuf),
    /// Stop guarding this cgroup.
    UnregisterCgroup(PathBuf),
    /// Kill this process (pid and start time, see [`process_start_time`]) when fencing.
    RegisterProcess {
        /// Its pid.
        pid: i32,
        /// Its start time in clock ticks since boot.
        start: u64,
    },
    /// Stop guarding this process (only if it is the one that started at `start`).
    UnregisterProcess {
        /// Its pid.
        pid: i32,
        /// Its start time, as registered.
        start: u64,
    },
    /// Remove this address from this interface when fencing.
    RegisterAddress(GuardedAddress),
    /// Stop guarding this address.
    UnregisterAddress(GuardedAddress),
    /// Kill every registered group when the lease clock reaches this many milliseconds.
    Pet(u64),
    /// Orderly shutdown: end of input after this does not fence.
    Bye,
}

impl GuardMessage {
    /// The wire form: one short ASCII line (well below `PIPE_BUF`, so every write is atomic).
    pub fn encode(&self) -> String {
        match self {
            GuardMessage::Register(pgid) => format!("reg {pgid}\n"),
            GuardMessage::Unregister(pgid) => format!("unreg {pgid}\n"),
            // Paths were checked to be UTF-8 without newlines and short enough (check_path).
            GuardMessage::RegisterCgroup(p) => format!("regcg {}\n", p.display()),
            GuardMessage::UnregisterCgroup(p) => format!("unregcg {}\n", p.display()),
            GuardMessage::RegisterProcess { pid, start } => format!("regpid {pid} {start}\n"),
            GuardMessage::UnregisterProcess { pid, start } => format!("unregpid {pid} {start}\n"),
            // Checked by GuardedAddress::new: no spaces or newlines in either part.
            GuardMessage::RegisterAddress(a) => format!("regaddr {} {}\n", a.interface, a.address),
            GuardMessage::UnregisterAddress(a) => format!("unregaddr {} {}\n", a.interface, a.address),
            GuardMessage::Pet(ms) => format!("pet {ms}\n"),
            GuardMessage::Bye => "bye\n".to_owned(),
        }
    }

    /// Parses one line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, GuardError> {
        let bad = || GuardError::Protocol { line: String::from_utf8_lossy(line).into_owned() };
        let text = std::str::from_utf8(line).map_err(|_| bad())?.trim();
        let (verb, arg) = text.split_once(' ').unwrap_or((text, ""));
        match verb {
            "reg" => Ok(GuardMessage::Register(arg.parse().map_err(|_| bad())?)),
            "unreg" => Ok(GuardMessage::Unregister(arg.parse().map_err(|_| bad())?)),
            "regcg" if arg.starts_with('/') => Ok(GuardMessage::RegisterCgroup(PathBuf::from(arg))),
            "unregcg" if arg.starts_with('/') => Ok(GuardMessage::UnregisterCgroup(PathBuf::from(arg))),
            "regpid" | "unregpid" => {
                let (pid, start) = arg.split_once(' ').ok_or_else(bad)?;
                let (pid, start) = (pid.parse().map_err(|_| bad())?, start.parse().map_err(|_| bad())?);
                Ok(if verb == "regpid" {
                    GuardMessage::RegisterProcess { pid, start }
                } else {
                    GuardMessage::UnregisterProcess { pid, start }
                })
            }
            "regaddr" | "unregaddr" => {
                let (iface, addr) = arg.split_once(' ').ok_or_else(bad)?;
                let a = GuardedAddress::new(iface, addr).map_err(|_| bad())?;
                Ok(if verb == "regaddr" {
                    GuardMessage::RegisterAddress(a)
                } else {
                    GuardMessage::UnregisterAddress(a)
                })
            }
            "pet" => Ok(GuardMessage::Pet(arg.parse().map_err(|_| bad())?)),
            "bye" if arg.is_empty() => Ok(GuardMessage::Bye),
            _ => Err(bad()),
        }
    }
}

/// How [`run_guard`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardExit {
    /// The agent said `bye` and closed the pipe; nothing was killed at the end.
    Bye,
    /// The pipe reached end of file without `bye`: the agent died. `killed` lists the groups that
    /// were registered then and were sent SIGKILL.
    AgentGone {
        /// Process groups that were killed at end of input.
        killed: Vec<i32>,
        /// Cgroups that were registered then and were killed.
        killed_cgroups: Vec<PathBuf>,
        /// Single processes (`regpid`) that were registered then and were sent SIGKILL.
        killed_processes: Vec<i32>,
        /// Addresses that were registered then and were removed (or already absent).
        removed_addresses: Vec<GuardedAddress>,
    },
}

/// Best-effort real-time hardening of the guard process, reported as human-readable notes.
///
/// Locks memory (no page-in stalls while fencing) and raises the scheduling priority (SCHED_RR,
/// falling back to nice -10). Each step may fail without privileges; the guard still works, only
/// with weaker timing under heavy load, so the failure is logged and not fatal.
pub fn harden_current_process() -> Vec<String> {
    let mut notes = Vec::new();
    // SAFETY: mlockall takes only flags and affects this process's memory locking.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } != 0 {
        notes.push(format!("mlockall failed ({}); guard memory may be paged out", io::Error::last_os_error()));
    }
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: `param` is a valid sched_param; pid 0 means this thread.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_RR, &param) } != 0 {
        let rr_err = io::Error::last_os_error();
        // SAFETY: setpriority takes plain integers; 0 means the calling process.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) } != 0 {
            notes.push(format!(
                "cannot raise priority (SCHED_RR: {rr_err}; nice -10: {}); the guard runs at normal priority",
                io::Error::last_os_error()
            ));
        } else {
            notes.push(format!("SCHED_RR unavailable ({rr_err}); running at nice -10 instead"));
        }
    }
    notes
}

/// Sends SIGKILL to each process group; a group that no longer exists is not an error.
fn kill_groups(groups: &BTreeSet<i32>, why: &str, log: &mut dyn FnMut(&str)) -> Vec<i32> {
    let mut killed = Vec::new();
    for &pgid in groups {
        match kill(Pid::from_raw(-pgid), Signal::SIGKILL) {
            Ok(()) => {
                log(&format!("{why}: SIGKILL sent to process group {pgid}"));
                killed.push(pgid);
            }
            Err(Errno::ESRCH) => log(&format!("{why}: process group {pgid} had already exited")),
            Err(e) => log(&format!("{why}: cannot kill process group {pgid}: {e}")),
        }
    }
    killed
}

/// The start time of process `pid` in clock ticks since boot (field 22 of `/proc/<pid>/stat`):
/// with the pid, it names one process for good (a reused pid has a later start time).
/// `None` when there is no such process.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid …: comm may hold spaces and parentheses; field 22 is the 20th after it.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A pidfd of a registered process: signals sent through it reach that process or nothing,
/// never a later process with the same pid.
#[derive(Debug)]
struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid` and checks that it names the process that started at `start`.
    fn open(pid: i32, start: u64) -> Result<PidFd, GuardError> {
        let bad = |why: String| GuardError::BadProcess { pid, why };
        if pid <= 1 || pid as u32 == std::process::id() {
            return Err(bad("only a process other than init and the guard can be guarded".into()));
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(bad(format!("pidfd_open: {}", io::Error::last_os_error())));
        }
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
        let fd = PidFd(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) });
        // The pidfd names whatever held `pid` when it was opened. If that process is still alive
        // after the start time was read, the start time was its own: a pid has one holder at a time.
        let now = process_start_time(pid);
        if now.is_none()
            && let Err(e) = std::fs::File::open(format!("/proc/{pid}/stat"))
            && e.kind() != io::ErrorKind::NotFound
        {
            return Err(bad(format!("cannot read its start time: {e}")));
        }
        if now != Some(start) {
            return Err(bad(format!("its start time is {now:?}, not {start}: the process is gone")));
        }
        if !fd.alive() {
            return Err(bad("the process is gone".into()));
        }
        Ok(fd)
    }

    /// Sends `signal` (0: only checks) through the pidfd.
    fn signal(&self, signal: i32) -> Result<(), Errno> {
        // SAFETY: the fd is a pidfd we own; a null siginfo is allowed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 { Ok(()) } else { Err(Errno::last()) }
    }

    /// Whether the process has not exited (a pidfd turns readable when it exits).
    fn alive(&self) -> bool {
        let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => true,
            Ok(_) => false,
            Err(_) => self.signal(0).is_ok(),
        }
    }
}

/// SIGKILLs each registered process through its pidfd; one that has exited is not an error.
fn kill_processes(processes: &BTreeMap<(i32, u64), PidFd>, why: &str, log: &mut dyn FnMut(&str)) -> Vec<i32> {
    let mut killed = Vec::new();
    for (&(pid, _), fd) in processes {
        match fd.signal(libc::SIGKILL) {
            Ok(()) => {
                log(&format!("{why}: SIGKILL sent to process {pid}"));
                killed.push(pid);
            }
            Err(Errno::ESRCH) => log(&format!("{why}: process {pid} had already exited")),
            Err(e) => log(&format!("{why}: cannot kill process {pid}: {e}")),
        }
    }
    killed
}

/// Kills everything in each cgroup; a cgroup that no longer exists is not an error.
fn kill_cgroups(cgroups: &BTreeSet<PathBuf>, why: &str, log: &mut dyn FnMut(&str)) -> Vec<PathBuf> {
    let mut killed = Vec::new();
    for path in cgroups {
        match kill_path(path) {
            Ok(KillMethod::Gone) => log(&format!("{why}: cgroup {} no longer exists", path.display())),
            Ok(how) => {
                log(&format!("{why}: cgroup {} killed ({how:?})", path.display()));
                killed.push(path.clone());
            }
            Err(e) => log(&format!("{why}: cannot kill cgroup {}: {e}", path.display())),
        }
    }
    killed
}

/// The hardware watchdog a guard keeps alive, and `M − grace`: how long after a kill deadline
/// the watchdog may fire at the latest (see [`crate::watchdog`]).
#[derive(Debug)]
pub struct GuardWatchdog {
    /// The open device.
    pub device: Watchdog,
    /// `M − grace` in milliseconds (at least 1000).
    pub extra_ms: u64,
}

impl GuardWatchdog {
    /// Keeps the watchdog alive for a pet with kill deadline `pet_ms`.
    fn pet(&mut self, pet_ms: u64, log: &mut dyn FnMut(&str)) {
        match timeout_for_pet(pet_ms, self.extra_ms, monotonic_ms()) {
            Some(t) => match self.device.keepalive(t) {
                Ok(Some(note)) => log(&note),
                Ok(None) => {}
                Err(e) => log(&format!("cannot keep the watchdog {} alive: {e}", self.device.path().display())),
            },
            // Too late for a whole second: the previous setting fires no later than this one would.
            None => log("a pet came with under a second left before dead_by; the watchdog was not kept alive"),
        }
    }

    /// After fencing: disarms the watchdog if everything guarded is confirmed dead by
    /// `dead_by − 500 ms`, else leaves it to reset the machine.
    fn after_kill(&mut self, guarded: Guarded<'_>, dead_by: u64, log: &mut dyn FnMut(&str)) {
        if !self.device.armed() {
            return;
        }
        if confirm_dead(guarded, dead_by.saturating_sub(500)) {
            match self.device.disarm() {
                Ok(()) => log("everything guarded is dead: watchdog disarmed (no reset)"),
                Err(e) => log(&format!("everything guarded is dead, but the watchdog cannot be disarmed: {e}")),
            }
        } else {
            log("guarded processes survived SIGKILL: the watchdog is left to reset this machine");
        }
    }
}

/// Whether some process other than a zombie is in process group `pgid` (scans /proc).
fn group_alive(pgid: i32) -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else { return true };
    rd.flatten().any(|e| {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { return false };
        // pid (comm) state ppid pgrp …; comm may hold spaces and parentheses.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return false };
        let mut f = rest.split_whitespace();
        let (state, _ppid, pgrp) = (f.next(), f.next(), f.next());
        state != Some("Z") && state != Some("X") && pgrp.and_then(|p| p.parse::<i32>().ok()) == Some(pgid)
    })
}

/// Whether a cgroup still lists a process (a removed cgroup lists none).
fn cgroup_alive(path: &Path) -> bool {
    match std::fs::read_to_string(path.join("cgroup.procs")) {
        Ok(t) => !t.trim().is_empty(),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

/// What a guard kills: process groups, cgroups and single processes.
#[derive(Clone, Copy)]
struct Guarded<'a> {
    groups: &'a BTreeSet<i32>,
    cgroups: &'a BTreeSet<PathBuf>,
    processes: &'a BTreeMap<(i32, u64), PidFd>,
}

/// Waits until nothing guarded runs any more, or `until` passes.
fn confirm_dead(g: Guarded<'_>, until: u64) -> bool {
    loop {
        if !g.groups.iter().any(|&p| group_alive(p))
            && !g.cgroups.iter().any(|c| cgroup_alive(c))
            && !g.processes.values().any(PidFd::alive)
        {
            return true;
        }
        if monotonic_ms() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where the guard finds `ip` (iproute2).
fn ip_program() -> Option<PathBuf> {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"].iter().map(PathBuf::from).find(|p| p.is_file())
}

/// How long one `ip addr del` may take before the guard kills it and moves on.
const ADDRESS_REMOVAL_LIMIT: Duration = Duration::from_secs(2);

/// Removes each address from its interface with `ip addr del` (bounded); an address that is
/// not there is not an error (the node did not hold it).
fn remove_addresses(addresses: &BTreeSet<GuardedAddress>, why: &str, log: &mut dyn FnMut(&str)) -> Vec<GuardedAddress> {
    let mut removed = Vec::new();
    if addresses.is_empty() {
        return removed;
    }
    let Some(ip) = ip_program() else {
        log(&format!("{why}: cannot remove floating addresses: `ip` not found (install iproute2)"));
        return removed;
    };
    for a in addresses {
        let child = Command::new(&ip)
            .args(["addr", "del", &a.address, "dev", &a.interface])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                log(&format!("{why}: cannot run {}: {e}", ip.display()));
                continue;
            }
        };
        let until = monotonic_ms() + ADDRESS_REMOVAL_LIMIT.as_millis() as u64;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if monotonic_ms() < until => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        match status {
            Some(s) if s.success() => {
                log(&format!("{why}: address {} removed from {}", a.address, a.interface));
                removed.push(a.clone());
            }
            // The node did not hold it ("ipv4: Address not found", EADDRNOTAVAIL from older
            // kernels), or has no such interface.
            Some(_)
                if err.contains("ddress not found")
                    || err.contains("Cannot assign requested address")
                    || err.contains("Cannot find device") =>
            {
                removed.push(a.clone());
            }
            Some(s) => {
                log(&format!("{why}: cannot remove address {} from {} ({s}): {}", a.address, a.interface, err.trim()))
            }
            None => log(&format!(
                "{why}: `ip addr del {} dev {}` did not finish within {} ms; killed",
                a.address,
                a.interface,
                ADDRESS_REMOVAL_LIMIT.as_millis()
            )),
        }
    }
    removed
}

/// Runs the guard on `input` until the agent says `bye` or disappears. Blocking.
///
/// The loop only ever blocks in `poll` with a timeout that ends at the current kill deadline, and
/// reads at most what `poll` reported as available. Pending messages are applied before the
/// deadline is checked, so a pet that the agent sent in time counts even if this process was
/// itself delayed; the deadline in it is absolute, so a late pet cannot extend the lease.
///
/// After fencing on a missed deadline the killed groups are forgotten (their ids may be reused
/// once reaped) and the guard keeps serving the agent, which may register new groups later.
/// Registered addresses stay registered: they name configuration, not processes, and removing
/// an address the node does not hold is harmless.
/// `log` receives one line per event worth an operator's attention.
pub fn run_guard(input: BorrowedFd<'_>, log: &mut dyn FnMut(&str)) -> Result<GuardExit, GuardError> {
    run_guard_with(input, None, log)
}

/// [`run_guard`] keeping a hardware watchdog alive from the agent's pets (see
/// [`crate::watchdog`]): it fires by `dead_by` once pets stop, unless the guard confirmed that
/// everything it killed is dead; `bye` disarms it.
pub fn run_guard_with(
    input: BorrowedFd<'_>,
    watchdog: Option<GuardWatchdog>,
    log: &mut dyn FnMut(&str),
) -> Result<GuardExit, GuardError> {
    run_guard_replying(input, None, watchdog, log)
}

/// Writes one answer line to `out` if it can be written without blocking (the guard must
/// never wait on its agent); an answer that cannot is dropped and logged, and the agent,
/// which waits for it with a limit, reports the process as unconfirmed.
fn reply(out: Option<BorrowedFd<'_>>, line: &str, log: &mut dyn FnMut(&str)) {
    let Some(out) = out else { return };
    let mut fds = [PollFd::new(out, PollFlags::POLLOUT)];
    if !matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        || !fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLOUT))
    {
        log(&format!("cannot answer the agent (its reply pipe is full or closed): {}", line.trim_end()));
        return;
    }
    // SAFETY: `out` is an open fd; the buffer is valid for its length. One short line
    // (below PIPE_BUF) into a pipe with room is written whole.
    let n = unsafe { libc::write(out.as_raw_fd(), line.as_ptr().cast(), line.len()) };
    if n != line.len() as isize {
        log(&format!("cannot answer the agent ({}): {}", io::Error::last_os_error(), line.trim_end()));
    }
}

/// [`run_guard_with`] answering each `regpid` on `replies` (the guard's stdout, read by
/// [`GuardHandle::register_process`]): `regpid PID START ok` or `regpid PID START refused WHY`.
pub fn run_guard_replying(
    input: BorrowedFd<'_>,
    replies: Option<BorrowedFd<'_>>,
    mut watchdog: Option<GuardWatchdog>,
    log: &mut dyn FnMut(&str),
) -> Result<GuardExit, GuardError> {
    let mut groups: BTreeSet<i32> = BTreeSet::new();
    let mut cgroups: BTreeSet<PathBuf> = BTreeSet::new();
    // Keyed by pid and start time: an unregistration names exactly one process.
    let mut processes: BTreeMap<(i32, u64), PidFd> = BTreeMap::new();
    let mut addresses: BTreeSet<GuardedAddress> = BTreeSet::new();
    let mut deadline: Option<u64> = None;
    let mut said_bye = false;
    let mut pending: Vec<u8> = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    // Reading through a File would close the fd on drop; borrow it instead.
    let raw = input.as_raw_fd();
    loop {
        let timeout = match deadline {
            // Wake at the deadline; cap the wait so a clock oddity cannot park the guard for long.
            Some(d) => PollTimeout::try_from(d.saturating_sub(monotonic_ms()).min(1000)).unwrap_or(PollTimeout::ZERO),
            None => PollTimeout::NONE,
        };
        let mut fds = [PollFd::new(input, PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(GuardError::Input(e.into())),
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if revents.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            // SAFETY: `raw` is a valid open fd for the lifetime of `input`; `buf` is writable.
            let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    return Err(GuardError::Input(e));
                }
            } else if n == 0 {
                if said_bye {
                    return Ok(GuardExit::Bye);
                }
                let why = "agent gone (pipe closed without bye)";
                let killed = kill_groups(&groups, why, log);
                let killed_cgroups = kill_cgroups(&cgroups, why, log);
                let killed_processes = kill_processes(&processes, why, log);
                let removed_addresses = remove_addresses(&addresses, why, log);
                if let Some(w) = watchdog.as_mut() {
                    // No deadline to wait for: confirm within the time the watchdog may wait.
                    let dead_by = deadline.map_or(monotonic_ms() + w.extra_ms, |d| d.max(monotonic_ms()) + w.extra_ms);
                    w.after_kill(Guarded { groups: &groups, cgroups: &cgroups, processes: &processes }, dead_by, log);
                }
                return Ok(GuardExit::AgentGone { killed, killed_cgroups, killed_processes, removed_addresses });
            } else {
                pending.extend_from_slice(&buf[..n as usize]);
                while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    match GuardMessage::parse(&line[..line.len() - 1]) {
                        Ok(GuardMessage::Register(pgid)) if pgid > 1 => {
                            groups.insert(pgid);
                        }
                        Ok(GuardMessage::Register(pgid)) => log(&GuardError::BadPgid(pgid).to_string()),
                        Ok(GuardMessage::Unregister(pgid)) => {
                            groups.remove(&pgid);
                        }
                        Ok(GuardMessage::RegisterCgroup(path)) => match check_registrable(&path) {
                            Ok(clean) => {
                                cgroups.insert(clean);
                            }
                            // Refused, not fenced: the agent checked it too, so this is a race with
                            // a removal or a misconfiguration, and the agent still runs.
                            Err(e) => log(&format!("refusing to guard a cgroup: {e}")),
                        },
                        Ok(GuardMessage::UnregisterCgroup(path)) => {
                            let clean: PathBuf = path.components().collect();
                            cgroups.remove(&clean);
                        }
                        Ok(GuardMessage::RegisterProcess { pid, start }) => match PidFd::open(pid, start) {
                            Ok(fd) => {
                                // An earlier holder of this pid has ended (a pid has one holder
                                // at a time): its pidfd can go.
                                processes.retain(|&(p, s), _| p != pid || s == start);
                                processes.insert((pid, start), fd);
                                reply(replies, &format!("regpid {pid} {start} ok\n"), log);
                            }
                            // Refused, not fenced: the agent learns it from the answer and does
                            // not run the process unguarded.
                            Err(e) => {
                                log(&e.to_string());
                                let why: String =
                                    e.to_string().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
                                reply(replies, &format!("regpid {pid} {start} refused {why}\n"), log);
                            }
                        },
                        Ok(GuardMessage::UnregisterProcess { pid, start }) => {
                            processes.remove(&(pid, start));
                        }
                        Ok(GuardMessage::RegisterAddress(a)) => {
                            addresses.insert(a);
                        }
                        Ok(GuardMessage::UnregisterAddress(a)) => {
                            addresses.remove(&a);
                        }
                        Ok(GuardMessage::Pet(ms)) => {
                            deadline = Some(ms);
                            if let Some(w) = watchdog.as_mut() {
                                w.pet(ms, log);
                            }
                        }
                        Ok(GuardMessage::Bye) => {
                            said_bye = true;
                            deadline = None;
                            if let Some(w) = watchdog.as_mut()
                                && let Err(e) = w.device.disarm()
                            {
                                log(&format!("cannot disarm the watchdog {}: {e}", w.device.path().display()));
                            }
                        }
                        // A garbled line means the agent is broken: fence rather than guess.
                        Err(e) => {
                            log(&e.to_string());
                            kill_groups(&groups, "protocol error", log);
                            kill_cgroups(&cgroups, "protocol error", log);
                            kill_processes(&processes, "protocol error", log);
                            remove_addresses(&addresses, "protocol error", log);
                            if let Some(w) = watchdog.as_mut() {
                                let dead_by = monotonic_ms() + w.extra_ms;
                                let guarded = Guarded { groups: &groups, cgroups: &cgroups, processes: &processes };
                                w.after_kill(guarded, dead_by, log);
                            }
                            groups.clear();
                            cgroups.clear();
                            processes.clear();
                            deadline = None;
                        }
                    }
                }
                if pending.len() > 4096 {
                    log("over-long line on the guard pipe; fencing");
                    kill_groups(&groups, "protocol error", log);
                    kill_cgroups(&cgroups, "protocol error", log);
                    kill_processes(&processes, "protocol error", log);
                    remove_addresses(&addresses, "protocol error", log);
                    groups.clear();
                    cgroups.clear();
                    processes.clear();
                    pending.clear();
                }
            }
        }
        if let Some(d) = deadline {
            let now = monotonic_ms();
            if now >= d {
                let late = now - d;
                let why = format!("kill deadline passed {late} ms ago without a newer pet");
                kill_groups(&groups, &why, log);
                kill_cgroups(&cgroups, &why, log);
                kill_processes(&processes, &why, log);
                remove_addresses(&addresses, &why, log);
                if let Some(w) = watchdog.as_mut() {
                    let guarded = Guarded { groups: &groups, cgroups: &cgroups, processes: &processes };
                    w.after_kill(guarded, d + w.extra_ms, log);
                }
                groups.clear();
                cgroups.clear();
                processes.clear();
                deadline = None;
            }
        }
    }
}

/// Runs the guard on this process's standard input, after hardening and after ignoring the
/// signals a terminal or session leader might send. This is what a guard executable's `main`
/// calls; it logs to stderr with a `tandem-guard` prefix.
///
/// `options` may name a hardware watchdog (the guard command's `--watchdog PATH
/// --watchdog-extra-ms N`, see [`GuardHandle::watchdog_args`]); it is opened before anything
/// else, and a device that cannot be opened is an error.
pub fn run_guard_on_stdin(options: &GuardOptions) -> Result<GuardExit, GuardError> {
    let pid = std::process::id();
    let mut log = |msg: &str| eprintln!("tandem-guard[{pid}]: {msg}");
    let watchdog = options.open_watchdog()?;
    if let Some(w) = &watchdog {
        log(&format!(
            "keeping the watchdog {} alive (fires {} ms after a missed kill deadline)",
            w.device.path().display(),
            w.extra_ms
        ));
    }
    for note in harden_current_process() {
        log(&note);
    }
    for sig in [Signal::SIGINT, Signal::SIGHUP, Signal::SIGPIPE, Signal::SIGQUIT] {
        // SAFETY: installing SIG_IGN runs no code in signal context.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    // Tells the agent that the watchdog (if any) is armed and the guard is serving.
    let mut out = io::stdout();
    let _ = out.write_all(READY.as_bytes()).and_then(|()| out.flush());
    let stdin = io::stdin();
    run_guard_replying(stdin.as_fd(), Some(out.as_fd()), watchdog, &mut log)
}

/// The line a guard prints on stdout once it serves.
const READY: &str = "tandem-guard ready\n";

/// How long [`GuardHandle::spawn`] waits for the guard's [`READY`] line.
const READY_LIMIT: Duration = Duration::from_secs(10);

/// Waits for the [`READY`] line on `out` (other lines are skipped: a test harness may print
/// first), until end of file or `READY_LIMIT`.
fn wait_ready(out: &std::process::ChildStdout) -> Result<(), String> {
    let until = monotonic_ms() + READY_LIMIT.as_millis() as u64;
    let mut seen: Vec<u8> = Vec::new();
    let mut buf = [0u8; 256];
    let fd = out.as_fd();
    loop {
        let left = until.saturating_sub(monotonic_ms());
        if left == 0 {
            return Err(format!("no answer within {} s", READY_LIMIT.as_secs()));
        }
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::try_from(left.min(1000)).unwrap_or(PollTimeout::ZERO)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(format!("cannot read its output: {e}")),
        }
        // SAFETY: `fd` is the open read end of the guard's stdout; `buf` is writable.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return Err("it exited".into()),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("cannot read its output: {e}"));
                }
            }
            n => {
                seen.extend_from_slice(&buf[..n as usize]);
                // A line ending with it: libtest prints "test NAME ... " without a newline
                // before a test helper runs the guard.
                if seen.split(|&b| b == b'\n').any(|l| l.ends_with(READY.trim_end().as_bytes())) {
                    return Ok(());
                }
                if seen.len() > 64 * 1024 {
                    return Err("it printed too much before it was ready".into());
                }
            }
        }
    }
}

/// The guard command's options (`--watchdog PATH --watchdog-extra-ms N`; each binary's
/// `guard` subcommand takes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardOptions {
    /// The hardware watchdog device to keep alive.
    pub watchdog: Option<PathBuf>,
    /// `M − grace` in milliseconds: how long after a missed kill deadline it may fire.
    pub watchdog_extra_ms: Option<u64>,
}

impl GuardOptions {
    /// The watchdog, opened (armed); `None` without `watchdog`.
    pub fn open_watchdog(&self) -> Result<Option<GuardWatchdog>, GuardError> {
        let Some(path) = &self.watchdog else { return Ok(None) };
        let Some(extra_ms) = self.watchdog_extra_ms else {
            return Err(GuardError::Args("--watchdog needs --watchdog-extra-ms".into()));
        };
        if extra_ms < 1000 {
            return Err(GuardError::Args(format!(
                "--watchdog-extra-ms {extra_ms} is under the watchdog's 1 s granularity"
            )));
        }
        let device = Watchdog::open(path).map_err(|source| GuardError::Watchdog { path: path.clone(), source })?;
        Ok(Some(GuardWatchdog { device, extra_ms }))
    }
}

/// The agent's handle on its guard process.
///
/// Dropping the handle without [`GuardHandle::bye`] closes the pipe, which the guard treats as the
/// agent's death: every registered group is killed. That is deliberate: a panic in the agent must
/// not leave guarded resources running unfenced.
#[derive(Debug)]
pub struct GuardHandle {
    child: Child,
    pipe: Option<ChildStdin>,
    /// The guard's stdout: its answers to `regpid`.
    replies: std::process::ChildStdout,
    /// Read from `replies` but not yet a whole line.
    partial: Vec<u8>,
}

/// How long [`GuardHandle::register_process`] waits for the guard's answer. The guard answers
/// as soon as it reads the line; only a stalled guard (which could not fence either) is slower.
const REPLY_LIMIT: Duration = Duration::from_secs(2);

impl GuardHandle {
    /// Starts `cmd` as the guard: its stdin becomes the command pipe, it gets a process group of
    /// its own (terminal signals to the agent's group do not reach it), and its stdout carries
    /// its ready line and its answers to `regpid`.
    ///
    /// `cmd` must run [`run_guard_on_stdin`], e.g. `tandemctl lease guard`, and take the
    /// [`GuardHandle::watchdog_args`] of its plan.
    pub fn spawn(mut cmd: Command) -> Result<Self, GuardError> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut child = cmd.spawn().map_err(|source| GuardError::Spawn { program: program.clone(), source })?;
        let pipe = child.stdin.take().expect("stdin was configured as piped");
        // Serving (and its watchdog armed) before anything relies on it. Its stdout stays open:
        // the guard answers `regpid` there.
        let replies = child.stdout.take().expect("stdout was configured as piped");
        if let Err(detail) = wait_ready(&replies) {
            drop(pipe);
            let _ = child.kill();
            let status = child.wait().map(|s| format!(" ({s})")).unwrap_or_default();
            return Err(GuardError::NotReady { program, detail: format!("{detail}{status}") });
        }
        // Never block the agent on a stalled guard: a full pipe is reported as an error instead.
        let fd = pipe.as_raw_fd();
        // SAFETY: `fd` is the open write end we own; F_GETFL/F_SETFL only change its flags.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Ok(GuardHandle { child, pipe: Some(pipe), replies, partial: Vec::new() })
    }

    /// Arguments to add to the guard's command so that it keeps the plan's watchdog alive
    /// (none without a watchdog).
    pub fn watchdog_args(plan: &crate::fence::FencePlan) -> Vec<String> {
        match plan.watchdog() {
            Some(w) => vec![
                "--watchdog".into(),
                w.device.display().to_string(),
                "--watchdog-extra-ms".into(),
                plan.watchdog_extra_ms().to_string(),
            ],
            None => vec![],
        }
    }

    /// The guard's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, msg: GuardMessage) -> Result<(), GuardError> {
        let line = msg.encode();
        let pid = self.child.id();
        let err = |source| GuardError::Send { message: line.trim_end().to_owned(), pid, source };
        let pipe = self
            .pipe
            .as_mut()
            .ok_or_else(|| err(io::Error::new(io::ErrorKind::BrokenPipe, "the guard pipe is closed")))?;
        // Lines are shorter than PIPE_BUF, so the write is all-or-nothing.
        pipe.write_all(line.as_bytes()).map_err(err)
    }

    /// Makes `cmd`'s child put itself in a process group of its own and register that group with
    /// this guard *before* it execs, so the program never runs unguarded (not even if the agent
    /// dies between `spawn` and a later [`GuardHandle::register`]). Unregister with the child's pid.
    pub fn register_in_child(&self, cmd: &mut Command) {
        let fd = self.pipe.as_ref().map_or(-1, |p| p.as_raw_fd());
        let hook = move || -> io::Result<()> {
            // Only async-signal-safe calls here: this runs between fork and exec.
            // SAFETY: setpgid/getpid take plain integers.
            let pid = unsafe {
                if libc::setpgid(0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::getpid()
            };
            let mut line = [0u8; 32];
            line[..4].copy_from_slice(b"reg ");
            let mut digits = [0u8; 12];
            let (mut n, mut i) = (pid as u32, digits.len());
            loop {
                i -= 1;
                digits[i] = b'0' + (n % 10) as u8;
                n /= 10;
                if n == 0 {
                    break;
                }
            }
            let len = digits.len() - i;
            line[4..4 + len].copy_from_slice(&digits[i..]);
            line[4 + len] = b'\n';
            // SAFETY: `fd` is the guard pipe, inherited and still open until exec; the buffer is valid.
            let w = unsafe { libc::write(fd, line.as_ptr().cast(), 5 + len) };
            if w != (5 + len) as isize {
                return Err(io::Error::other("cannot register with the fencing guard"));
            }
            Ok(())
        };
        // SAFETY: the hook only calls async-signal-safe functions and does not allocate.
        unsafe { std::os::unix::process::CommandExt::pre_exec(cmd, hook) };
    }

    /// Asks the guard to kill process group `pgid` when fencing.
    pub fn register(&mut self, pgid: i32) -> Result<(), GuardError> {
        if pgid <= 1 {
            return Err(GuardError::BadPgid(pgid));
        }
        self.send(GuardMessage::Register(pgid))
    }

    /// Stops guarding `pgid`. Send this before reaping the group leader, so the id cannot be reused
    /// by an unrelated process while the guard still holds it.
    pub fn unregister(&mut self, pgid: i32) -> Result<(), GuardError> {
        self.send(GuardMessage::Unregister(pgid))
    }

    /// Asks the guard to kill everything in cgroup `path` (a cgroup v2 directory, e.g. a
    /// [`crate::cgroup::Cgroup`]) when fencing. Refused unless the path is absolute, strictly below
    /// a cgroup2 mount, exists, and does not contain the guard (checked here; the guard checks again).
    pub fn register_cgroup(&mut self, path: &Path) -> Result<(), GuardError> {
        let clean = check_registrable(path).map_err(GuardError::BadCgroup)?;
        self.send(GuardMessage::RegisterCgroup(clean))
    }

    /// Stops guarding cgroup `path`. Send it before removing the cgroup.
    pub fn unregister_cgroup(&mut self, path: &Path) -> Result<(), GuardError> {
        let clean = check_path(path).map_err(GuardError::BadCgroup)?;
        self.send(GuardMessage::UnregisterCgroup(clean))
    }

    /// Asks the guard to kill process `pid` when fencing, through a pidfd the guard opens now:
    /// `start` is the process's start time ([`process_start_time`]), read when the caller
    /// identified the process, so that a pid reused meanwhile is refused instead of guarded.
    /// For a process the caller did not start and that has no cgroup of its own.
    ///
    /// Waits (up to 2 s) for the guard's answer: `Ok` only once the guard holds the pidfd.
    /// A process the guard refused (gone, start time differs, no pidfd: an old kernel or
    /// seccomp without `pidfd_open`, out of file descriptors) is [`GuardError::BadProcess`];
    /// no answer in time is [`GuardError::Unconfirmed`]. Either way the process is not
    /// known to be guarded, and the caller must not rely on it.
    pub fn register_process(&mut self, pid: i32, start: u64) -> Result<(), GuardError> {
        if pid <= 1 || pid as u32 == self.child.id() || pid as u32 == std::process::id() {
            return Err(GuardError::BadProcess { pid, why: "init, the guard and its agent cannot be guarded".into() });
        }
        self.send(GuardMessage::RegisterProcess { pid, start })?;
        self.await_reply(pid, start)
    }

    /// Waits for the guard's answer to `regpid PID START`. Answers to other registrations (a
    /// late one whose wait timed out earlier) are skipped.
    fn await_reply(&mut self, pid: i32, start: u64) -> Result<(), GuardError> {
        let unconfirmed = |detail: String| GuardError::Unconfirmed { pid, detail };
        let until = monotonic_ms() + REPLY_LIMIT.as_millis() as u64;
        let prefix = format!("regpid {pid} {start} ");
        let mut buf = [0u8; 512];
        loop {
            while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line[..nl]);
                let Some(answer) = line.strip_prefix(&prefix) else { continue };
                return match answer.split_once(' ').unwrap_or((answer, "")) {
                    ("ok", _) => Ok(()),
                    ("refused", why) => {
                        Err(GuardError::BadProcess { pid, why: format!("the guard refused it: {why}") })
                    }
                    _ => Err(unconfirmed(format!("unexpected answer {line:?}"))),
                };
            }
            let left = until.saturating_sub(monotonic_ms());
            if left == 0 {
                return Err(unconfirmed(format!("no answer within {} ms", REPLY_LIMIT.as_millis())));
            }
            let fd = self.replies.as_fd();
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::try_from(left.min(1000)).unwrap_or(PollTimeout::ZERO)) {
                Ok(0) | Err(Errno::EINTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(unconfirmed(format!("cannot read its answers: {e}"))),
            }
            // SAFETY: `fd` is the open read end of the guard's stdout; `buf` is writable.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                0 => return Err(unconfirmed("the guard closed its answers (it exited)".into())),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(unconfirmed(format!("cannot read its answers: {e}")));
                    }
                }
                n => {
                    self.partial.extend_from_slice(&buf[..n as usize]);
                    if self.partial.len() > 64 * 1024 {
                        self.partial.clear();
                        return Err(unconfirmed("its answers make no sense (an over-long line)".into()));
                    }
                }
            }
        }
    }

    /// Stops guarding process `pid` that started at `start` (the guard closes its pidfd). A
    /// registration of another process with the same pid (a newer one, the pid was reused) stays.
    pub fn unregister_process(&mut self, pid: i32, start: u64) -> Result<(), GuardError> {
        self.send(GuardMessage::UnregisterProcess { pid, start })
    }

    /// Asks the guard to remove `address` from its interface when fencing (after killing what
    /// it guards), so that the node stops answering for a floating IP it no longer holds.
    pub fn register_address(&mut self, address: &GuardedAddress) -> Result<(), GuardError> {
        self.send(GuardMessage::RegisterAddress(address.clone()))
    }

    /// Stops guarding `address`.
    pub fn unregister_address(&mut self, address: &GuardedAddress) -> Result<(), GuardError> {
        self.send(GuardMessage::UnregisterAddress(address.clone()))
    }

    /// Sets the kill deadline to `deadline` on the lease clock ([`monotonic_now`]).
    pub fn pet(&mut self, deadline: Millis) -> Result<(), GuardError> {
        self.send(GuardMessage::Pet(deadline.0))
    }

    /// Orderly shutdown: tells the guard to exit without killing, and waits up to `wait` for it.
    /// If it does not exit in time it is killed (its groups are then no longer guarded, which is
    /// what `bye` asked for anyway).
    pub fn bye(mut self, wait: Duration) -> Result<ExitStatus, GuardError> {
        self.send(GuardMessage::Bye)?;
        drop(self.pipe.take());
        let pid = self.child.id();
        let until = monotonic_ms() + wait.as_millis() as u64;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if monotonic_ms() < until => std::thread::sleep(Duration::from_millis(5)),
                Ok(None) => {
                    let _ = self.child.kill();
                    return self.child.wait().map_err(|source| GuardError::Wait { pid, source });
                }
                Err(source) => return Err(GuardError::Wait { pid, source }),
            }
        }
    }
}

impl Drop for GuardHandle {
    fn drop(&mut self) {
        // Closing without `bye` fences (see the type's docs); reap the guard when it is done so it
        // does not linger as a zombie. It exits right after killing, so this does not block long.
        if self.pipe.take().is_some() {
            let _ = self.child.wait();
        }
    }
}

/// Reads a whole guard script from `r`; used by tests and tools that replay a message log.
pub fn parse_script(mut r: impl Read) -> Result<Vec<GuardMessage>, GuardError> {
    let mut text = Vec::new();
    r.read_to_end(&mut text).map_err(GuardError::Input)?;
    text.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(GuardMessage::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Cgroup;
    use std::os::unix::process::CommandExt;
    use std::time::Instant;

    /// Environment variable that turns this test binary into a guard or an agent (re-exec trick:
    /// forking a multi-threaded test process is unsafe, so helpers are fresh processes).
    const ROLE: &str = "TANDEM_GUARD_TEST_ROLE";

    /// Entry point of the re-executed helper processes; a no-op in a normal test run.
    #[test]
    fn helper_process_entry() {
        match std::env::var(ROLE).as_deref() {
            Ok("guard") => {
                let exit = run_guard_on_stdin(&GuardOptions::default());
                std::process::exit(match exit {
                    Ok(GuardExit::Bye) => 0,
                    Ok(GuardExit::AgentGone { .. }) => 3,
                    Err(_) => 4,
                });
            }
            Ok("guard-wd") => {
                // libtest owns this binary's arguments: the watchdog comes by environment.
                let path = std::env::var("TANDEM_GUARD_TEST_WD").unwrap();
                let device = Watchdog::open(Path::new(&path)).unwrap();
                let mut log = |m: &str| eprintln!("tandem-guard: {m}");
                println!("{}", READY.trim_end());
                let out = io::stdout();
                let _ = out.lock().flush();
                let watchdog = Some(GuardWatchdog { device, extra_ms: 1500 });
                let exit = run_guard_replying(io::stdin().as_fd(), Some(out.as_fd()), watchdog, &mut log);
                std::process::exit(if exit.is_ok() { 0 } else { 4 });
            }
            Ok("agent") => agent_main(),
            _ => {}
        }
    }

    fn self_command(role: &str) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "guard::tests::helper_process_entry", "--nocapture", "--test-threads=1"]);
        cmd.env(ROLE, role);
        cmd
    }

    /// A FIFO standing in for a watchdog device, its reader (everything written until the
    /// guard closes it), and a guard with a log file keeping it alive.
    fn guard_with_fifo_watchdog(dir: &Path) -> (GuardHandle, std::thread::JoinHandle<Vec<(u8, u64)>>, PathBuf) {
        let fifo = dir.join("watchdog");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || {
                let mut f = std::fs::File::open(&fifo).unwrap();
                let mut out = Vec::new();
                let mut b = [0u8; 1];
                while f.read(&mut b).unwrap() == 1 {
                    out.push((b[0], monotonic_ms()));
                }
                out
            }
        });
        let log = dir.join("guard.log");
        let mut cmd = self_command("guard-wd");
        cmd.env("TANDEM_GUARD_TEST_WD", &fifo).stderr(std::fs::File::create(&log).unwrap());
        (GuardHandle::spawn(cmd).unwrap(), reader, log)
    }

    #[test]
    fn the_watchdog_is_kept_alive_by_pets_and_disarmed_by_bye() {
        let dir = tempfile::tempdir().unwrap();
        let (mut guard, reader, log) = guard_with_fifo_watchdog(dir.path());
        for _ in 0..3 {
            guard.pet(monotonic_now() + 3000).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(guard.bye(Duration::from_secs(5)).unwrap().success());
        let bytes: Vec<u8> = reader.join().unwrap().into_iter().map(|(b, _)| b).collect();
        assert_eq!(bytes, b"kkkV", "three keepalives, then the magic close");
        let log = std::fs::read_to_string(log).unwrap();
        assert!(log.contains("cannot set its timeout"), "a FIFO refuses the ioctl, reported: {log}");
    }

    #[test]
    fn after_a_missed_deadline_the_watchdog_is_disarmed_only_once_the_victim_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        let (mut guard, reader, log) = guard_with_fifo_watchdog(dir.path());
        let mut victim = spawn_victim();
        guard.register(victim.id() as i32).unwrap();
        let deadline = monotonic_now() + 300;
        guard.pet(deadline).unwrap();
        // No more pets: the guard kills the victim at the deadline, confirms it dead, disarms.
        let status = victim.wait().unwrap();
        let reaped = monotonic_ms();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9));
        let bytes = reader.join().unwrap();
        assert_eq!(bytes.iter().map(|(b, _)| *b).collect::<Vec<_>>(), b"kV", "{bytes:?}");
        let (_, disarmed_at) = bytes[1];
        assert!(disarmed_at >= deadline.0, "disarmed before the kill deadline");
        // Disarming waits for the victim to be gone; the reaping here is what makes it gone
        // (a zombie does not count as alive), so both happen close together.
        assert!(disarmed_at + 1000 >= reaped, "disarmed at {disarmed_at}, victim reaped at {reaped}");
        // The guard logs the disarm after closing the device, which is what ended the reader.
        let logged = Instant::now();
        let text = loop {
            let text = std::fs::read_to_string(&log).unwrap();
            if text.contains("watchdog disarmed (no reset)") || logged.elapsed() > Duration::from_secs(5) {
                break text;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(text.contains("watchdog disarmed (no reset)"), "{text}");
        guard.bye(Duration::from_secs(5)).unwrap();
    }

    #[test]
    fn guard_watchdog_options_are_checked() {
        let open = |w: Option<&str>, extra: Option<u64>| {
            GuardOptions { watchdog: w.map(PathBuf::from), watchdog_extra_ms: extra }.open_watchdog()
        };
        assert!(open(None, None).unwrap().is_none());
        assert!(matches!(open(Some("/dev/null"), None), Err(GuardError::Args(_))));
        assert!(matches!(open(Some("/dev/null"), Some(500)), Err(GuardError::Args(_))));
        let e = open(Some("/nonexistent/watchdog"), Some(1500)).unwrap_err();
        assert!(matches!(e, GuardError::Watchdog { .. }), "{e}");
    }

    /// A victim: `sleep` in a process group of its own.
    fn spawn_victim() -> Child {
        let mut cmd = Command::new("sleep");
        cmd.arg("600").process_group(0);
        cmd.spawn().expect("spawn sleep")
    }

    /// The agent helper: spawns a guard and a victim, registers it, prints the victim's pid, then
    /// pets every 100 ms with a 1 s deadline, or stops petting when its stdin says so.
    // The agent never returns; its victim is reaped by whoever inherits it.
    #[allow(clippy::zombie_processes)]
    fn agent_main() -> ! {
        let mut guard = GuardHandle::spawn(self_command("guard")).unwrap();
        let out = std::env::var("TANDEM_GUARD_TEST_OUT").unwrap();
        // With a cgroup: the victim is a setsid() daemon in it, guarded through the cgroup only.
        let victim = match std::env::var_os(CGROUP_ENV) {
            Some(path) => {
                let cg = Cgroup::open(Path::new(&path)).unwrap();
                let daemon = spawn_daemon_in(&cg, Path::new(&format!("{out}.pid")));
                guard.register_cgroup(cg.path()).unwrap();
                daemon
            }
            None => {
                let victim = spawn_victim();
                guard.register(victim.id() as i32).unwrap();
                victim.id()
            }
        };
        guard.pet(monotonic_now() + 1000).unwrap();
        std::fs::write(format!("{out}.tmp"), format!("victim {} guard {}\n", victim, guard.pid())).unwrap();
        std::fs::rename(format!("{out}.tmp"), &out).unwrap();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            guard.pet(monotonic_now() + 1000).unwrap();
        }
    }

    /// Tells the agent helper to guard a setsid() daemon through this cgroup.
    const CGROUP_ENV: &str = "TANDEM_GUARD_TEST_CGROUP";

    /// A fresh child cgroup of the cgroup2 mount for one test.
    fn test_cgroup(tag: &str) -> Cgroup {
        let mount = crate::cgroup::cgroup2_mount().expect("the test machines mount cgroup2");
        Cgroup::create(&mount, &format!("tandem-test-{tag}-{}-{}", std::process::id(), monotonic_ms())).unwrap()
    }

    /// Starts, inside `cg`, a shell that double-forks a `sleep` through `setsid` (a daemon in a
    /// session and process group of its own, reparented away from us) and returns its pid.
    fn spawn_daemon_in(cg: &Cgroup, pidfile: &Path) -> u32 {
        let _ = std::fs::remove_file(pidfile);
        let mut cmd = Command::new("sh");
        cmd.args(["-c", r#"setsid sh -c "sleep 600 & echo \$! > '$0.tmp' && mv '$0.tmp' '$0'" &"#])
            .arg(pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cg.enter_in_child(&mut cmd);
        let mut sh = cmd.spawn().expect("spawn sh");
        sh.wait().unwrap();
        let start = Instant::now();
        let pid: u32 = loop {
            if let Ok(t) = std::fs::read_to_string(pidfile)
                && let Ok(p) = t.trim().parse()
            {
                break p;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "the daemon did not start");
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = std::fs::remove_file(pidfile);
        // It really escaped: a session of its own, so a process-group kill would miss it.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        let (pgrp, session): (i32, i32) = (fields[2].parse().unwrap(), fields[3].parse().unwrap());
        assert_ne!(session, nix::unistd::getsid(None).unwrap().as_raw(), "daemon still in our session");
        assert_ne!(pgrp, nix::unistd::getpgrp().as_raw());
        assert!(cg.pids().unwrap().contains(&(pid as i32)), "daemon not in the cgroup");
        pid
    }

    /// True once `pid` no longer runs: gone, or a zombie waiting to be reaped by someone else.
    fn process_gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(false),
        }
    }

    fn wait_gone(pid: u32, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if process_gone(pid) {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    fn reap_within(child: &mut Child, within: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    #[test]
    fn messages_round_trip_and_garbage_is_rejected() {
        for m in [GuardMessage::Register(42), GuardMessage::Unregister(7), GuardMessage::Pet(123456), GuardMessage::Bye]
        {
            let line = m.encode();
            assert!(line.len() < 64);
            assert_eq!(GuardMessage::parse(line.trim_end().as_bytes()).unwrap(), m);
        }
        for bad in ["", "reg", "reg x", "pet -1", "bye now", "kill 3"] {
            assert!(GuardMessage::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
        let script = parse_script(&b"reg 5\npet 10\nbye\n"[..]).unwrap();
        assert_eq!(script, vec![GuardMessage::Register(5), GuardMessage::Pet(10), GuardMessage::Bye]);
    }

    #[test]
    fn cgroup_messages_round_trip_and_bad_cgroups_are_refused() {
        for m in
            [GuardMessage::RegisterCgroup("/sys/fs/cgroup/a b/c".into()), GuardMessage::UnregisterCgroup("/x".into())]
        {
            assert_eq!(GuardMessage::parse(m.encode().trim_end().as_bytes()).unwrap(), m);
        }
        for bad in ["regcg", "regcg relative/path", "unregcg "] {
            assert!(GuardMessage::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
        let mut guard = GuardHandle::spawn(self_command("guard")).unwrap();
        let mount = crate::cgroup::cgroup2_mount().unwrap();
        for bad in [PathBuf::from("/tmp"), mount.clone(), mount.join("tandem-missing")] {
            let e = guard.register_cgroup(&bad).unwrap_err();
            assert!(matches!(e, GuardError::BadCgroup(_)), "{bad:?}: {e}");
        }
        assert!(guard.bye(Duration::from_secs(5)).unwrap().success());
    }

    #[test]
    fn address_messages_round_trip_and_bad_addresses_are_refused() {
        let a = GuardedAddress::new("eth0", "10.0.0.50/24").unwrap();
        let b = GuardedAddress::new("br-lan.7", "fd00::50/64").unwrap();
        for m in [GuardMessage::RegisterAddress(a), GuardMessage::UnregisterAddress(b)] {
            assert_eq!(GuardMessage::parse(m.encode().trim_end().as_bytes()).unwrap(), m);
        }
        for (iface, addr) in [
            ("", "10.0.0.1/24"),
            ("eth0 x", "10.0.0.1/24"),
            ("a/b", "10.0.0.1/24"),
            ("averyveryverylongname", "10.0.0.1/24"),
            ("eth0", "10.0.0.1"),
            ("eth0", "10.0.0.1/33"),
            ("eth0", "fd00::1/129"),
            ("eth0", "host/24"),
        ] {
            assert!(GuardedAddress::new(iface, addr).is_err(), "{iface:?} {addr:?} accepted");
        }
        for bad in ["regaddr", "regaddr eth0", "regaddr eth0 10.0.0.1", "unregaddr eth0 x/24"] {
            assert!(GuardMessage::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
    }

    /// A network namespace with an interface `d0` (one end of a veth pair: the test machines
    /// cannot load the dummy module) holding `addrs`, removed on drop.
    struct AddressNs(String);

    impl AddressNs {
        fn new(tag: &str, addrs: &[&str]) -> Self {
            let ns = format!("tdg-{tag}-{}", std::process::id());
            let ip = |args: &[&str]| {
                let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
                assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            };
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
            ip(&["-n", &ns, "link", "set", "d0", "up"]);
            ip(&["-n", &ns, "link", "set", "d1", "up"]);
            for a in addrs {
                ip(&["-n", &ns, "addr", "add", a, "dev", "d0"]);
            }
            AddressNs(ns)
        }

        fn addrs(&self) -> String {
            let out = Command::new("ip").args(["-n", &self.0, "-o", "addr", "show", "dev", "d0"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        /// A guard helper started inside the namespace.
        fn guard(&self) -> GuardHandle {
            let mut cmd = Command::new("nsenter");
            let own = self_command("guard");
            cmd.arg(format!("--net=/run/netns/{}", self.0)).arg("--").arg(own.get_program()).args(own.get_args());
            cmd.env(ROLE, "guard");
            GuardHandle::spawn(cmd).unwrap()
        }
    }

    impl Drop for AddressNs {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }

    #[test]
    fn removes_registered_addresses_at_the_deadline_and_when_the_agent_is_gone() {
        // The floating address is removed, an unregistered one and the node's own stay, and an
        // address the node does not hold is no obstacle.
        let ns = AddressNs::new("addr", &["10.88.0.1/24", "10.88.0.50/24", "10.88.0.51/24", "fd88::50/64"]);
        let mut guard = ns.guard();
        for (iface, a) in
            [("d0", "10.88.0.50/24"), ("d0", "10.88.0.60/24"), ("d0", "fd88::50/64"), ("d0", "10.88.0.51/24")]
        {
            guard.register_address(&GuardedAddress::new(iface, a).unwrap()).unwrap();
        }
        guard.unregister_address(&GuardedAddress::new("d0", "10.88.0.51/24").unwrap()).unwrap();
        guard.pet(monotonic_now() + 300).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(ns.addrs().contains("10.88.0.50/24"), "removed before the deadline: {}", ns.addrs());
        let start = Instant::now();
        while ns.addrs().contains("10.88.0.50/24") || ns.addrs().contains("fd88::50/64") {
            assert!(start.elapsed() < Duration::from_secs(5), "not removed at the deadline: {}", ns.addrs());
            std::thread::sleep(Duration::from_millis(20));
        }
        let left = ns.addrs();
        assert!(left.contains("10.88.0.1/24") && left.contains("10.88.0.51/24"), "{left}");

        // The agent dies (the pipe closes without bye): the address goes at once.
        let ns2 = AddressNs::new("addr-gone", &["10.89.0.50/24"]);
        let mut guard2 = ns2.guard();
        guard2.register_address(&GuardedAddress::new("d0", "10.89.0.50/24").unwrap()).unwrap();
        guard2.pet(monotonic_now() + 60_000).unwrap();
        drop(guard2);
        assert!(!ns2.addrs().contains("10.89.0.50"), "still there after the agent went: {}", ns2.addrs());
        assert!(guard.bye(Duration::from_secs(5)).unwrap().success());
    }

    #[test]
    fn kills_a_setsid_daemon_in_a_registered_cgroup_at_the_deadline() {
        let cg = test_cgroup("deadline");
        let pidfile = std::env::temp_dir().join(format!("tandem-daemon-{}-a", std::process::id()));
        let daemon = spawn_daemon_in(&cg, &pidfile);
        let mut guard = GuardHandle::spawn(self_command("guard")).unwrap();
        guard.register_cgroup(cg.path()).unwrap();
        let deadline = monotonic_now() + 300;
        guard.pet(deadline).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(!process_gone(daemon), "killed before the deadline");
        wait_gone(daemon, Duration::from_secs(10)).expect("daemon survived the deadline");
        assert!(monotonic_now() >= deadline, "killed before the deadline");
        assert!(guard.bye(Duration::from_secs(5)).unwrap().success());
        cg.remove(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn unregistered_cgroup_is_spared_and_dropping_the_handle_kills_registered_ones() {
        let (keep, doomed) = (test_cgroup("keep"), test_cgroup("doomed"));
        let dir = std::env::temp_dir();
        let kept = spawn_daemon_in(&keep, &dir.join(format!("tandem-daemon-{}-k", std::process::id())));
        let victim = spawn_daemon_in(&doomed, &dir.join(format!("tandem-daemon-{}-d", std::process::id())));
        let mut guard = GuardHandle::spawn(self_command("guard")).unwrap();
        guard.register_cgroup(keep.path()).unwrap();
        guard.register_cgroup(doomed.path()).unwrap();
        guard.unregister_cgroup(keep.path()).unwrap();
        guard.pet(monotonic_now() + 600_000).unwrap();
        drop(guard); // the agent dies without bye
        wait_gone(victim, Duration::from_secs(10)).expect("daemon survived the agent's exit");
        assert!(!process_gone(kept), "unregistered cgroup was killed");
        assert_eq!(keep.kill().unwrap(), crate::cgroup::KillMethod::CgroupKill);
        wait_gone(kept, Duration::from_secs(10)).expect("cgroup.kill did not kill");
        keep.remove(Duration::from_secs(10)).unwrap();
        doomed.remove(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn fallback_kill_signals_every_pid_until_the_cgroup_is_empty() {
        let cg = test_cgroup("fallback");
        let sub = Cgroup::create(cg.path(), "child").unwrap();
        let dir = std::env::temp_dir();
        let a = spawn_daemon_in(&cg, &dir.join(format!("tandem-daemon-{}-f1", std::process::id())));
        let b = spawn_daemon_in(&sub, &dir.join(format!("tandem-daemon-{}-f2", std::process::id())));
        // The daemons' short-lived parent shells may still be exiting: check the daemons only.
        let pids = cg.pids().unwrap();
        assert!(pids.contains(&(a as i32)) && pids.contains(&(b as i32)), "descendant cgroups are included");
        match cg.kill_by_signals().unwrap() {
            crate::cgroup::KillMethod::Signals { rounds } => assert!(rounds >= 1),
            other => panic!("{other:?}"),
        }
        assert!(cg.pids().unwrap().is_empty());
        wait_gone(a, Duration::from_secs(10)).unwrap();
        wait_gone(b, Duration::from_secs(10)).unwrap();
        // Thawed again: a new process in it runs.
        let c = spawn_daemon_in(&cg, &dir.join(format!("tandem-daemon-{}-f3", std::process::id())));
        assert_eq!(cg.kill().unwrap(), crate::cgroup::KillMethod::CgroupKill);
        wait_gone(c, Duration::from_secs(10)).unwrap();
        cg.remove(Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn kills_the_cgroup_when_the_agent_is_sigstopped_or_sigkilled() {
        for stop in [Signal::SIGSTOP, Signal::SIGKILL] {
            let cg = test_cgroup("agent");
            let (mut agent, victim, guard) = start_agent_with(Some(cg.path()));
            std::thread::sleep(Duration::from_millis(300));
            assert!(!process_gone(victim), "victim died while the agent was healthy");
            kill(Pid::from_raw(agent.id() as i32), stop).unwrap();
            wait_gone(victim, Duration::from_secs(10)).unwrap_or_else(|| panic!("daemon survived {stop:?}"));
            kill(Pid::from_raw(agent.id() as i32), Signal::SIGKILL).unwrap();
            agent.wait().unwrap();
            wait_gone(guard, Duration::from_secs(10)).expect("guard did not exit after the agent died");
            cg.remove(Duration::from_secs(10)).unwrap();
        }
    }

    #[test]
    fn kills_the_group_when_pets_stop() {
        let mut guard = GuardHandle::spawn(self_command("guard")).unwrap();
        let mut victim = spawn_victim();
        guard.register(victim.id() as i32).unwrap();
        let deadline = monotonic_now() + 300;
        guard.pet(deadline).unwrap();
        let status = reap_within(&mut victim, Duration::from_secs(10)).expect("victim not killed");
        assert!(monotonic_now() >= deadline, "killed before the deadline");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // The guard stays up after fencing and still exits cleanly on bye.
        assert!(guard.bye(Duration::from_secs(5)).unwrap().success());
    }

    #[test]
    fn process_messages_round_trip() {
        for m in [
            GuardMessage::RegisterProcess { pid: 4242, start: 987654321 },
            GuardMessage::UnregisterProcess { pid: 4242, start: 987654321 },
        ] {
            assert_eq!(GuardMessage::parse(m.encode().trim_end().as_bytes()).unwrap(), m);
        }
        for bad in [
            "regpid",
            "regpid 5",
            "regpid x 5",
            "regpid 5 -1",
            "unregpid",
            "unregpid x",
            "unregpid 5",
            "unregpid 5 x",
            "unregpid 5 6 7",
        ] {
            assert!(GuardMessage::parse(bad.as_bytes()).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn kills_a_registered_process_through_its_pidfd_and_refuses_a_stale_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("guard.log");
        let mut cmd = self_command("guard");
        cmd.stderr(std::fs::File::create(&log).unwrap());
        let mut guard = GuardHandle::spawn(cmd).unwrap();
        // Plain children in this test's own process group: only the per-process kill reaches them.
        let sleep = || Command::new("sleep").arg("600").spawn().unwrap();
        let (mut doomed, mut stale, mut unregistered) = (sleep(), sleep(), sleep());
        let start_of = |c: &Child| process_start_time(c.id() as i32).expect("a running child has a start time");
        guard.register_process(doomed.id() as i32, start_of(&doomed)).unwrap();
        // A start time that is not the process's: what the guard sees when the pid was reused.
        // The guard refuses it, and says so: the caller learns the process is not guarded.
        match guard.register_process(stale.id() as i32, start_of(&stale) + 1) {
            Err(GuardError::BadProcess { pid, why }) => {
                assert_eq!(pid, stale.id() as i32);
                assert!(why.contains("the guard refused it") && why.contains("start time"), "{why}");
            }
            other => panic!("a stale start time was accepted: {other:?}"),
        }
        guard.register_process(unregistered.id() as i32, start_of(&unregistered)).unwrap();
        // An unregistration of an earlier holder of the same pid (another start time) leaves
        // this registration alone; only the exact one removes it.
        guard.unregister_process(doomed.id() as i32, start_of(&doomed) - 1).unwrap();
        guard.unregister_process(unregistered.id() as i32, start_of(&unregistered)).unwrap();
        assert!(matches!(guard.register_process(1, 1), Err(GuardError::BadProcess { .. })));
        let own = std::process::id() as i32;
        assert!(matches!(
            guard.register_process(own, process_start_time(own).unwrap()),
            Err(GuardError::BadProcess { .. })
        ));
        let deadline = monotonic_now() + 300;
        guard.pet(deadline).unwrap();
        let status = reap_within(&mut doomed, Duration::from_secs(10)).expect("registered process not killed");
        assert!(monotonic_now() >= deadline, "killed before the deadline");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        std::thread::sleep(Duration::from_millis(100));
        assert!(stale.try_wait().unwrap().is_none(), "a process registered with another start time was killed");
        assert!(unregistered.try_wait().unwrap().is_none(), "an unregistered process was killed");
        assert!(guard.bye(Duration::from_secs(5)).unwrap().success());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(&format!("refusing to guard process {}", stale.id())), "{text}");
        assert!(text.contains(&format!("SIGKILL sent to process {}", doomed.id())), "{text}");
        for mut c in [stale, unregistered] {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A guard that cannot open a pidfd (here: out of file descriptors; elsewhere an old
    /// kernel or a seccomp filter without `pidfd_open`) refuses the process, and the caller
    /// learns it instead of believing the process guarded.
    #[test]
    fn a_process_the_guard_cannot_open_a_pidfd_for_is_refused_to_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("guard.log");
        let mut cmd = self_command("guard");
        cmd.stderr(std::fs::File::create(&log).unwrap());
        // Room for stdin, stdout, stderr and the loader's one file at a time: nothing for a
        // pidfd once the guard runs.
        let hook = || {
            let lim = libc::rlimit { rlim_cur: 4, rlim_max: 4 };
            // SAFETY: setrlimit is async-signal-safe and only changes this child's limit.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the hook only calls setrlimit.
        unsafe { cmd.pre_exec(hook) };
        let mut guard = GuardHandle::spawn(cmd).unwrap();
        let mut victim = Command::new("sleep").arg("600").spawn().unwrap();
        let pid = victim.id() as i32;
        let start = process_start_time(pid).unwrap();
        // The pidfd takes the one free slot; checking the start time needs another.
        match guard.register_process(pid, start) {
            Err(GuardError::BadProcess { pid: p, why }) => {
                assert_eq!(p, pid);
                assert!(why.contains("the guard refused it") && why.contains("Too many open files"), "{why}");
            }
            other => panic!("registration without room for a pidfd answered {other:?}"),
        }
        assert!(guard.bye(Duration::from_secs(5)).unwrap().success());
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.contains(&format!("refusing to guard process {pid}")), "{text}");
        victim.kill().unwrap();
        victim.wait().unwrap();
    }

    #[test]
    fn does_not_kill_while_pets_continue_and_bye_leaves_group_alone() {
        let mut guard = GuardHandle::spawn(self_command("guard")).unwrap();
        let mut victim = spawn_victim();
        guard.register(victim.id() as i32).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {
            guard.pet(monotonic_now() + 400).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            assert!(victim.try_wait().unwrap().is_none(), "victim killed although pets continued");
        }
        assert!(guard.bye(Duration::from_secs(5)).unwrap().success());
        std::thread::sleep(Duration::from_millis(200));
        assert!(victim.try_wait().unwrap().is_none(), "victim killed after an orderly bye");
        victim.kill().unwrap();
        victim.wait().unwrap();
    }

    #[test]
    fn unregistered_group_is_not_killed() {
        let mut guard = GuardHandle::spawn(self_command("guard")).unwrap();
        let mut keep = spawn_victim();
        let mut doomed = spawn_victim();
        guard.register(keep.id() as i32).unwrap();
        guard.register(doomed.id() as i32).unwrap();
        guard.unregister(keep.id() as i32).unwrap();
        guard.pet(monotonic_now() + 100).unwrap();
        reap_within(&mut doomed, Duration::from_secs(10)).expect("registered group not killed");
        assert!(keep.try_wait().unwrap().is_none(), "unregistered group was killed");
        keep.kill().unwrap();
        keep.wait().unwrap();
        drop(guard);
    }

    #[test]
    fn dropping_the_handle_without_bye_fences() {
        let mut guard = GuardHandle::spawn(self_command("guard")).unwrap();
        let mut victim = spawn_victim();
        guard.register(victim.id() as i32).unwrap();
        guard.pet(monotonic_now() + 600_000).unwrap();
        drop(guard);
        reap_within(&mut victim, Duration::from_secs(10)).expect("victim survived the agent's exit");
    }

    /// Starts the agent helper and reads the victim's and guard's pids from the file it writes.
    fn start_agent() -> (Child, u32, u32) {
        start_agent_with(None)
    }

    fn start_agent_with(cgroup: Option<&Path>) -> (Child, u32, u32) {
        let dir = std::env::temp_dir().join(format!("tandem-guard-test-{}-{}", std::process::id(), monotonic_ms()));
        let mut cmd = self_command("agent");
        if let Some(cg) = cgroup {
            cmd.env(CGROUP_ENV, cg);
        }
        cmd.env("TANDEM_GUARD_TEST_OUT", &dir).stdout(Stdio::null()).stdin(Stdio::null());
        let mut agent = cmd.spawn().unwrap();
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&dir) {
                let _ = std::fs::remove_file(&dir);
                let f: Vec<&str> = text.split_whitespace().collect();
                return (agent, f[1].parse().unwrap(), f[3].parse().unwrap());
            }
            assert!(agent.try_wait().unwrap().is_none(), "agent exited before reporting its victim");
            assert!(start.elapsed() < Duration::from_secs(30), "agent did not report its victim");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn kills_the_group_when_the_agent_is_sigkilled() {
        let (mut agent, victim, guard) = start_agent();
        std::thread::sleep(Duration::from_millis(300));
        assert!(!process_gone(victim), "victim died while the agent was healthy");
        kill(Pid::from_raw(agent.id() as i32), Signal::SIGKILL).unwrap();
        agent.wait().unwrap();
        // EOF on the pipe fences at once; allow a generous bound for a loaded machine.
        wait_gone(victim, Duration::from_secs(10)).expect("victim survived the agent's SIGKILL");
        wait_gone(guard, Duration::from_secs(10)).expect("guard did not exit after fencing");
    }

    #[test]
    fn kills_the_group_when_the_agent_is_sigstopped() {
        let (mut agent, victim, guard) = start_agent();
        std::thread::sleep(Duration::from_millis(300));
        assert!(!process_gone(victim));
        let stopped_at = Instant::now();
        kill(Pid::from_raw(agent.id() as i32), Signal::SIGSTOP).unwrap();
        let took = wait_gone(victim, Duration::from_secs(10)).expect("victim survived while the agent was stopped");
        // Killed by the deadline (1 s after the last pet), not before the agent stopped petting.
        assert!(took <= Duration::from_secs(10));
        assert!(!process_gone(guard), "the guard should keep running while the agent is stopped");
        let _ = stopped_at;
        kill(Pid::from_raw(agent.id() as i32), Signal::SIGKILL).unwrap();
        agent.wait().unwrap();
        wait_gone(guard, Duration::from_secs(10)).expect("guard did not exit after the agent died");
    }
}
