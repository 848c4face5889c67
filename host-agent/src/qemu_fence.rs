//! Self-fencing of QEMU guests: the fencing guard must kill a VM's QEMU process when this
//! host's lease is about to end, like it kills the agent's own processes.
//!
//! With a local QEMU hypervisor (`qemu:///system`) the QEMU processes are started by
//! libvirtd and daemonize away from it: they are neither in the agent's process groups nor
//! in its group cgroups, so the guard would not stop them when the agent stalls or dies,
//! and another host could start the same VM while it still runs here. So a VM resource
//! registers its QEMU with the guard after starting (or resuming, or adopting) it:
//!
//! * the process is found in `/proc` by its command line (`-uuid <domain uuid>`, which
//!   libvirt always passes), restricted to the PID namespace of the libvirt daemon the
//!   agent talks to (its pid comes from `SO_PEERCRED` on the daemon's socket), so a QEMU of
//!   another daemon on the same machine (test namespaces; an incoming migration copy) is
//!   never taken for ours. `/proc` works wherever libvirt keeps its run directory, which
//!   libvirt's pid file would not;
//! * it is registered as a process (`regpid`): the guard holds a pidfd opened after
//!   checking the process's start time, so a pid reused after QEMU ended is never killed;
//! * if QEMU sits in a cgroup of its own (libvirt's machine scope with systemd), that cgroup
//!   is registered too, so helpers QEMU started die with it: libvirt's cgroup of this one
//!   machine, or else the lowest cgroup holding QEMU's process tree; only cgroups holding
//!   nothing but QEMU and its children, and never a slice or libvirt's `machine` partition
//!   (later they may hold other VMs or containers), nor this agent's or libvirtd's.
//!
//! Registration happens while the guest's vCPUs are paused where the agent controls the
//! start (a fresh start is made paused, an incoming migration is paused until resumed), so
//! no guest code runs unguarded.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use tandem_lease::cgroup::{Cgroup, cgroup2_mount, check_path, own_cgroup};
use tandem_lease::guard::process_start_time;

/// Where `/proc` is.
const PROC: &str = "/proc";

/// Why the QEMU process of a domain cannot be found.
#[derive(Debug, thiserror::Error)]
pub enum QemuFindError {
    /// The libvirt daemon's socket cannot be reached, so its identity is unknown.
    #[error("cannot reach the libvirt daemon at {}", socket.display())]
    Daemon {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `/proc` cannot be listed.
    #[error("cannot list {PROC}")]
    Proc(#[source] io::Error),
    /// No process has the domain's UUID on its command line.
    #[error("no QEMU process with `-uuid {uuid}` runs under the libvirt daemon (pid {daemon:?})")]
    NotFound {
        /// The domain's UUID.
        uuid: String,
        /// The daemon's pid, if known.
        daemon: Option<i32>,
    },
    /// More than one process has it: the agent cannot tell which one to guard.
    #[error("several processes have `-uuid {uuid}` on their command line: {pids:?}")]
    Ambiguous {
        /// The domain's UUID.
        uuid: String,
        /// Their pids.
        pids: Vec<i32>,
    },
}

/// A domain's QEMU process as found in `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuProcess {
    /// Its pid (in this agent's PID namespace).
    pub pid: i32,
    /// Its start time in clock ticks since boot: with the pid, it names this process only.
    pub start: u64,
    /// The cgroup of this VM alone that holds QEMU's process tree, if any (see
    /// [`dedicated_cgroup`]).
    pub cgroup: Option<PathBuf>,
}

/// The socket of the local libvirt daemon behind `uri`, when the URI names a local QEMU
/// driver (`qemu:///system`, `qemu+unix:///system`, with or without `?socket=`). `None` for
/// anything else: the test driver (its domains live inside the agent), remote URIs (their
/// QEMU runs on another machine, out of this guard's reach) and session daemons.
pub fn local_daemon_socket(uri: &str) -> Option<PathBuf> {
    let (scheme, rest) = uri.split_once("://")?;
    if scheme != "qemu" && scheme != "qemu+unix" {
        return None;
    }
    let (host_path, query) = rest.split_once('?').unwrap_or((rest, ""));
    // A host part names another machine.
    let path = host_path.strip_prefix('/')?;
    let path = format!("/{path}");
    if path != "/system" {
        return None;
    }
    if let Some(socket) = query.split('&').find_map(|kv| kv.strip_prefix("socket=")) {
        return Some(PathBuf::from(socket));
    }
    // Modular daemons (virtqemud) first, as libvirt's client does.
    let modular = Path::new("/run/libvirt/virtqemud-sock");
    Some(if modular.exists() { modular.to_path_buf() } else { PathBuf::from("/run/libvirt/libvirt-sock") })
}

/// The pid of the process listening on Unix socket `socket` (`SO_PEERCRED`, translated into
/// this process's PID namespace by the kernel). Connects and closes at once.
pub fn daemon_pid(socket: &Path) -> Result<i32, QemuFindError> {
    let err = |source| QemuFindError::Daemon { socket: socket.to_path_buf(), source };
    let stream = std::os::unix::net::UnixStream::connect(socket).map_err(err)?;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given; the fd is open.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    if cred.pid <= 0 {
        return Err(err(io::Error::other("the daemon runs in a PID namespace this agent cannot see")));
    }
    Ok(cred.pid)
}

/// Whether `args` (a NUL-separated command line) has `-uuid UUID`.
fn has_uuid(cmdline: &[u8], uuid: &str) -> bool {
    let mut args = cmdline.split(|&b| b == 0);
    while let Some(a) = args.next() {
        if a == b"-uuid" {
            return args.next().is_some_and(|u| u.eq_ignore_ascii_case(uuid.as_bytes()));
        }
    }
    false
}

fn pid_namespace(pid: i32) -> Option<PathBuf> {
    std::fs::read_link(format!("{PROC}/{pid}/ns/pid")).ok()
}

/// The parent pid of `pid`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("{PROC}/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

/// Whether `pid` is `root` or one of its descendants.
fn within(pid: i32, root: i32) -> bool {
    let mut at = pid;
    for _ in 0..64 {
        if at == root {
            return true;
        }
        match parent_of(at) {
            Some(p) if p > 1 => at = p,
            _ => return false,
        }
    }
    false
}

/// The cgroup v2 directory of `pid`.
fn cgroup_of(pid: i32, mount: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("{PROC}/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    // A process whose cgroup lies outside this namespace's view shows `/..`-paths.
    let path = mount.join(rel.trim_start_matches('/'));
    check_path(&path).ok()
}

/// Whether `name` is libvirt's cgroup of one machine: `machine-qemu…scope` (under systemd)
/// or `….libvirt-qemu` (libvirt's own cgroup layout). libvirt never puts another machine there.
fn is_machine_cgroup(name: &str) -> bool {
    (name.starts_with("machine-qemu") && name.ends_with(".scope")) || name.ends_with(".libvirt-qemu")
}

/// Whether `name` is a cgroup meant to hold many units or machines (a systemd slice,
/// libvirt's `machine` partition): never registered, however empty it is now, because what
/// starts there later (another VM, a container) is not this VM's.
fn is_shared_cgroup(name: &str) -> bool {
    name.ends_with(".slice") || name == "machine"
}

/// `pid` and its descendants.
fn process_tree(pid: i32) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(PROC) else { return vec![pid] };
    let mut tree: Vec<i32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&p| within(p, pid))
        .collect();
    if !tree.contains(&pid) {
        tree.push(pid);
    }
    tree
}

/// The cgroup to register for QEMU process `pid`, so that fencing kills QEMU's helpers too
/// but nothing that is not this VM's: the lowest cgroup that holds `pid`'s whole process tree,
/// or, within libvirt's cgroup of this one machine (see [`is_machine_cgroup`]), that machine
/// cgroup. Only cgroups that hold nothing but `pid` and its descendants qualify; never a slice
/// or libvirt's `machine` partition (shared between machines even when only one runs now),
/// nor an ancestor of this process's own cgroup (the guard lives there). `None` when `pid`
/// shares its cgroup with others (libvirtd's, or the machine's root).
pub fn dedicated_cgroup(pid: i32) -> Option<PathBuf> {
    let mount = cgroup2_mount().ok()?;
    let own = own_cgroup(&mount).ok()?;
    let tree = process_tree(pid);
    let mut at = cgroup_of(pid, &mount)?;
    // Inside libvirt's machine cgroup, climb to it (it belongs to this machine alone).
    let in_machine = |at: &Path| {
        at.strip_prefix(&mount)
            .is_ok_and(|rel| rel.components().any(|c| c.as_os_str().to_str().is_some_and(is_machine_cgroup)))
    };
    let mut best = None;
    while at != mount && at.starts_with(&mount) {
        let name = at.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if own.starts_with(&at) || is_shared_cgroup(name) {
            break;
        }
        let Ok(pids) = Cgroup::open(&at).and_then(|cg| cg.pids()) else { break };
        if pids.is_empty() || !pids.iter().all(|&p| within(p, pid)) {
            break;
        }
        best = Some(at.clone());
        let whole_tree = tree.iter().all(|p| pids.contains(p));
        if is_machine_cgroup(name) || (whole_tree && !in_machine(&at)) {
            break;
        }
        match at.parent() {
            Some(parent) => at = parent.to_path_buf(),
            None => break,
        }
    }
    best
}

/// Finds the QEMU process of the domain with `uuid`: the one process with `-uuid UUID` on its
/// command line, in the PID namespace of `daemon` (the libvirt daemon's pid) when given.
pub fn find_qemu(uuid: &str, daemon: Option<i32>) -> Result<QemuProcess, QemuFindError> {
    let ns = daemon.and_then(pid_namespace);
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir(PROC).map_err(QemuFindError::Proc)?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        // Processes come and go while we read: a vanished one is simply not it.
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if !has_uuid(&cmdline, uuid) {
            continue;
        }
        if let Some(ns) = &ns
            && pid_namespace(pid).as_ref() != Some(ns)
        {
            continue;
        }
        found.push(pid);
    }
    match found.as_slice() {
        [] => Err(QemuFindError::NotFound { uuid: uuid.to_string(), daemon }),
        &[pid] => {
            let start = process_start_time(pid).ok_or(QemuFindError::NotFound { uuid: uuid.to_string(), daemon })?;
            Ok(QemuProcess { pid, start, cgroup: dedicated_cgroup(pid) })
        }
        _ => Err(QemuFindError::Ambiguous { uuid: uuid.to_string(), pids: found }),
    }
}

/// Whether process `pid` still is the one that started at `start`.
pub fn same_process(pid: i32, start: u64) -> bool {
    process_start_time(pid) == Some(start)
}

/// One VM's QEMU as registered with the node's fencing guard.
#[derive(Debug)]
pub struct QemuGuard {
    guard: tandem_node::resources::GuardAccess,
    socket: PathBuf,
    registered: std::sync::Mutex<Option<QemuProcess>>,
}

impl QemuGuard {
    /// The guard of VMs on hypervisor `uri`, or `None` where no local QEMU runs them (see
    /// [`local_daemon_socket`]).
    pub fn for_uri(uri: &str, guard: tandem_node::resources::GuardAccess) -> Option<QemuGuard> {
        let socket = local_daemon_socket(uri)?;
        Some(QemuGuard { guard, socket, registered: std::sync::Mutex::new(None) })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<QemuProcess>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registered process, if any.
    pub fn registered(&self) -> Option<QemuProcess> {
        self.slot().clone()
    }

    /// Whether a registered QEMU process still runs (the same process, not a reused pid).
    pub fn holds_live_process(&self) -> bool {
        self.slot().as_ref().is_some_and(|q| same_process(q.pid, q.start))
    }

    /// Finds the QEMU process of domain `uuid` and registers it (and its cgroup, if it has
    /// one of its own) with the guard, replacing an earlier registration. Idempotent: the
    /// flag says whether this call registered it (false: it was registered already).
    pub fn register(&self, uuid: &str) -> Result<(QemuProcess, bool), String> {
        let daemon = daemon_pid(&self.socket).map_err(|e| crate::error_chain(&e))?;
        let found = find_qemu(uuid, Some(daemon)).map_err(|e| crate::error_chain(&e))?;
        let mut slot = self.slot();
        if slot.as_ref() == Some(&found) {
            return Ok((found, false));
        }
        if let Some(old) = slot.take() {
            self.forget(&old);
        }
        self.guard.register_process(found.pid, found.start).map_err(|e| {
            format!("cannot register QEMU process {} with the fencing guard: {}", found.pid, crate::error_chain(&e))
        })?;
        if let Some(cg) = &found.cgroup
            && let Err(e) = self.guard.register_cgroup(cg)
        {
            // The process itself is guarded; only helpers it started would be missed.
            tracing::warn!(pid = found.pid, cgroup = %cg.display(),
                "cannot register the QEMU cgroup with the fencing guard: {}", crate::error_chain(&e));
        }
        *slot = Some(found.clone());
        Ok((found, true))
    }

    /// Stops guarding the registered QEMU (the VM stopped or left this host).
    pub fn unregister(&self) {
        if let Some(old) = self.slot().take() {
            self.forget(&old);
        }
    }

    fn forget(&self, q: &QemuProcess) {
        if let Err(e) = self.guard.unregister_process(q.pid, q.start) {
            tracing::warn!(pid = q.pid, "cannot unregister QEMU from the fencing guard: {}", crate::error_chain(&e));
        }
        if let Some(cg) = &q.cgroup
            && let Err(e) = self.guard.unregister_cgroup(cg)
        {
            tracing::warn!(cgroup = %cg.display(), "cannot unregister a QEMU cgroup from the fencing guard: {}",
                crate::error_chain(&e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_qemu_uris_have_a_daemon_socket() {
        assert_eq!(
            local_daemon_socket("qemu+unix:///system?socket=/tmp/x/libvirt-sock"),
            Some(PathBuf::from("/tmp/x/libvirt-sock"))
        );
        assert_eq!(local_daemon_socket("qemu:///system?socket=/s"), Some(PathBuf::from("/s")));
        let default = local_daemon_socket("qemu:///system").unwrap();
        assert!(default.starts_with("/run/libvirt"), "{default:?}");
        for other in [
            "test:///default",
            "test:///tmp/host.xml",
            "qemu+ssh://host/system",
            "qemu+tcp://10.0.0.1/system",
            "qemu:///session",
            "xen:///system",
        ] {
            assert_eq!(local_daemon_socket(other), None, "{other}");
        }
    }

    /// A stand-in for QEMU: a real process with `-uuid UUID` on its command line (a shell
    /// with one child, as QEMU may have helpers), moved into `cgroup` before it execs.
    fn fake_qemu(uuid: &str, cgroup: Option<&Cgroup>) -> std::process::Child {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", "sleep 600 & wait", "qemu-system-x86_64", "-uuid", uuid]);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        if let Some(cg) = cgroup {
            cg.enter_in_child(&mut cmd);
        }
        let child = cmd.spawn().expect("spawn sh");
        // Until its child runs, the cgroup holds the shell only; both count as QEMU's.
        std::thread::sleep(std::time::Duration::from_millis(100));
        child
    }

    fn end(mut c: std::process::Child) {
        // The shell's `sleep` child is in its process group: end both.
        // SAFETY: kill(2) with a negative pid signals that process group only.
        unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
        let _ = c.wait();
    }

    fn uuid() -> String {
        format!("7f000000-0000-4000-8000-{:012}", std::process::id())
    }

    #[test]
    fn finds_the_one_process_with_the_uuid_and_its_pid_and_start_time() {
        let u = uuid();
        let q = fake_qemu(&u, None);
        let found = find_qemu(&u, Some(std::process::id() as i32)).unwrap();
        assert_eq!(found.pid, q.id() as i32);
        assert!(same_process(found.pid, found.start));
        assert!(!same_process(found.pid, found.start + 1));
        // In this test's own cgroup (shared with the test and everything else): none of its own.
        assert_eq!(found.cgroup, None);
        let other = "7f000000-0000-4000-8000-ffffffffffff";
        assert!(matches!(find_qemu(other, None), Err(QemuFindError::NotFound { .. })));
        // Two with the same UUID: refused, never a guess.
        let twin = fake_qemu(&u, None);
        match find_qemu(&u, None) {
            Err(QemuFindError::Ambiguous { pids, .. }) => assert_eq!(pids.len(), 2, "{pids:?}"),
            other => panic!("expected ambiguity, got {other:?}"),
        }
        end(twin);
        end(q);
        assert!(matches!(find_qemu(&u, None), Err(QemuFindError::NotFound { .. })));
    }

    #[test]
    fn next_to_another_vm_the_vms_own_scope_is_registered() {
        let Ok(mount) = cgroup2_mount() else {
            eprintln!("SKIPPED: no cgroup2 mount");
            return;
        };
        let u = format!("7f000000-0000-4000-8001-{:012}", std::process::id());
        // libvirt's layout under systemd: machine.slice/<scope>/libvirt/emulator, next to other VMs.
        let slice = Cgroup::create(&mount, &format!("tandem-qf-test-{}", std::process::id())).unwrap();
        let scope = Cgroup::create(slice.path(), "machine-qemu-1-vm.scope").unwrap();
        let libvirt = Cgroup::create(scope.path(), "libvirt").unwrap();
        let emulator = Cgroup::create(libvirt.path(), "emulator").unwrap();
        let neighbour_scope = Cgroup::create(slice.path(), "machine-qemu-2-other.scope").unwrap();
        let q = fake_qemu(&u, Some(&emulator));
        let neighbour = fake_qemu("7f000000-0000-4000-8001-00000000000f", Some(&neighbour_scope));
        let found = find_qemu(&u, None).unwrap();
        assert_eq!(found.pid, q.id() as i32);
        assert_eq!(found.cgroup.as_deref(), Some(scope.path()), "the VM's scope, not the slice shared with another VM");
        // The guard accepts it (it does not contain the guard or this agent).
        tandem_lease::cgroup::check_registrable(scope.path()).unwrap();
        end(neighbour);
        end(q);
        for cg in [emulator, libvirt, neighbour_scope, scope, slice] {
            cg.remove(std::time::Duration::from_secs(5)).unwrap();
        }
    }

    /// Creates the cgroups of `path` (relative, `/`-separated) below `base`, outermost first.
    fn cgroup_chain(base: &Path, path: &str) -> Vec<Cgroup> {
        let mut out: Vec<Cgroup> = Vec::new();
        for name in path.split('/') {
            let parent = out.last().map_or(base.to_path_buf(), |c| c.path().to_path_buf());
            out.push(Cgroup::create(&parent, name).unwrap());
        }
        out
    }

    /// One VM alone in its slice or partition (the common case): its machine cgroup, never the
    /// slice or partition, which would kill whatever starts there later; and where libvirt's
    /// naming is unknown, the lowest cgroup holding QEMU's process tree.
    #[test]
    fn a_single_vm_gets_its_own_cgroup_never_the_shared_one_above() {
        let Ok(mount) = cgroup2_mount() else {
            eprintln!("SKIPPED: no cgroup2 mount");
            return;
        };
        let me = std::process::id();
        for (n, layout, expect) in [
            // systemd: machine.slice/machine-qemu\x2d1\x2dvm.scope/libvirt/emulator
            (2, format!("tandem-qf-{me}-sd.slice/machine-qemu-1-vm.scope/libvirt/emulator"), 1),
            // libvirt's cgroup layout without systemd: /machine/qemu-1-vm.libvirt-qemu/emulator
            (3, format!("tandem-qf-{me}-lv/machine/qemu-1-vm.libvirt-qemu/emulator"), 2),
            // An unknown layout: QEMU's own cgroup holds its whole tree; nothing above it.
            (4, format!("tandem-qf-{me}-other/vms/vm1"), 2),
        ] {
            let chain = cgroup_chain(&mount, &layout);
            let u = format!("7f000000-0000-4000-800{n}-{me:012}");
            let q = fake_qemu(&u, chain.last());
            let found = find_qemu(&u, None).unwrap();
            assert_eq!(found.pid, q.id() as i32);
            assert_eq!(found.cgroup.as_deref(), Some(chain[expect].path()), "layout {layout}");
            end(q);
            for cg in chain.into_iter().rev() {
                cg.remove(std::time::Duration::from_secs(5)).unwrap();
            }
        }
    }

    #[test]
    fn the_daemon_is_the_peer_of_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("libvirt-sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(daemon_pid(&path).unwrap(), std::process::id() as i32);
        assert!(matches!(daemon_pid(&dir.path().join("missing")), Err(QemuFindError::Daemon { .. })));
    }

    #[test]
    fn the_uuid_argument_is_matched_exactly() {
        let line = b"/usr/bin/qemu-system-x86_64\0-name\0guest=a\0-uuid\0AbC-1\0-m\x0032\0";
        assert!(has_uuid(line, "abc-1"));
        assert!(!has_uuid(line, "abc-10"));
        assert!(!has_uuid(b"qemu\0-name\0-uuid\0", "x"));
        assert!(!has_uuid(b"sh\0echo -uuid abc-1\0", "abc-1"));
    }
}
