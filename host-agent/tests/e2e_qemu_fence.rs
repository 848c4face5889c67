//! Self-fencing of QEMU guests end to end: two real `tandem-host` agents, each in its own
//! network namespace with its own real libvirt daemon running QEMU (TCG), one HA VM (a real
//! QEMU guest with no OS). The evidence comes from outside the agents:
//!
//! * the QEMU process itself, found by the test in `/proc` and watched through a pidfd (the
//!   instant it exits);
//! * each libvirt daemon's own view, over connections of the test's own;
//! * the lease timeouts: the QEMU of a stalled agent must be dead before the earliest time at
//!   which another host may count that agent's host lease as dead, and the other host must
//!   run the VM only after that.

mod common;

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Cluster, RENEWAL_MS, qemu_pids, strip_ansi, vm, wait_registered};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_host::hypervisor::libvirt::LibvirtHypervisor;
use tandem_host::hypervisor::{DomainState, Hypervisor};
use tandem_lease::Timeouts;
use tandem_lease::fence::FencePlan;
use tandem_testkit::qemu::qemu_or_skip;

const BOUND: Duration = Duration::from_secs(60);

/// The clusters' VMs get UUIDs by position, so both tests' VMs have the same UUID, and the
/// test finds QEMU by UUID machine-wide: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// The `tandem-host` process of a host: the agent runs under `tini -s` in its namespace.
fn agent_pid(tini: u32) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(tini) && head.ends_with("(tandem-host") {
            return pid;
        }
    }
    panic!("no tandem-host child of {tini}");
}

fn pidfd(pid: i32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags; the result is a new fd we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(fd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    // SAFETY: just returned by pidfd_open, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Waits until the process behind `fd` exits; when it did.
fn wait_exit(fd: &OwnedFd, limit: Duration) -> Option<Instant> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::try_from(limit.as_millis() as i32).unwrap()).unwrap();
    (n == 1).then(Instant::now)
}

/// SIGKILLs `host`'s agent and waits for its guard to kill QEMU `qemu` (watched through
/// `qemu_fd`), which must happen within 1 s: the guard kills at once when its agent dies.
/// Returns when QEMU died.
fn kill_agent_and_wait_for_qemu(c: &Cluster, host: &str, h: &common::Host, qemu: i32, qemu_fd: &OwnedFd) -> Instant {
    let agent = agent_pid(h.agent.pid());
    let killed = Instant::now();
    kill(Pid::from_raw(agent), Signal::SIGKILL).unwrap();
    let died = wait_exit(qemu_fd, BOUND).unwrap_or_else(|| panic!("QEMU {qemu} still runs; logs:\n{}", c.logs()));
    eprintln!("{host}'s agent killed; its QEMU {qemu} died {} ms later", (died - killed).as_millis());
    assert!(died - killed < Duration::from_secs(1), "the guard kills at once when its agent dies");
    died
}

/// One round of the test's own view of both daemons.
#[derive(Debug, Clone)]
struct Round {
    sent: Instant,
    states: Vec<Option<DomainState>>,
}

/// Samples both daemons' views of the VM over connections of its own, until dropped.
struct Sampler {
    rounds: Arc<Mutex<Vec<Round>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(uris: Vec<String>, uuid: &str) -> Sampler {
        let rounds = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, st, uuid) = (rounds.clone(), stop.clone(), uuid.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut hvs = Vec::new();
                for uri in &uris {
                    hvs.push(LibvirtHypervisor::connect(uri).await.expect("sampler connects"));
                }
                let _ = ready_tx.send(());
                while !st.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    let mut states = Vec::new();
                    for hv in &hvs {
                        states.push(hv.state(&uuid).await.ok());
                    }
                    r.lock().unwrap().push(Round { sent, states });
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                for hv in hvs {
                    hv.close().await;
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(30)).expect("the sampler connected");
        Sampler { rounds, stop, thread: Some(thread) }
    }

    fn rounds(&self) -> Vec<Round> {
        self.rounds.lock().unwrap().clone()
    }

    fn wait(&self, what: &str, f: impl Fn(&Round) -> bool) -> Round {
        let start = Instant::now();
        loop {
            if let Some(r) = self.rounds().into_iter().find(|r| f(r)) {
                return r;
            }
            assert!(start.elapsed() < BOUND, "{what}: not within {BOUND:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn running(s: &Option<DomainState>) -> bool {
    s.as_ref().is_some_and(DomainState::is_running)
}

#[test]
fn the_guard_kills_qemu_of_a_stalled_or_killed_agent_before_another_host_may_start_the_vm() {
    if !qemu_or_skip("the_guard_kills_qemu_of_a_stalled_or_killed_agent_before_another_host_may_start_the_vm") {
        return;
    }
    let _serial = one_at_a_time();
    let timeouts = Timeouts::from_renewal_ms(RENEWAL_MS);
    // The guard's kill deadline is at most fence_ms + grace after the start of the agent's last
    // renewal, which began before the agent stopped.
    let kill_by = Duration::from_millis(timeouts.fence_ms + FencePlan::default_grace_ms(&timeouts));
    // Another host counts a host lease dead only host_dead_ms after it last saw it renewed;
    // the last renewal was at most one renewal interval before the stop.
    let takeover_earliest = Duration::from_millis(timeouts.host_dead_ms - timeouts.renewal_ms);
    eprintln!("timeouts {timeouts:?}; kill deadline <= stop + {kill_by:?}; takeover >= stop + {takeover_earliest:?}");

    let c = Cluster::in_netns_qemu(2, &[vm("qf", 32, 1, &["h1", "h2"])]);
    let uuid = c.uuid_of("qf");
    let h1 = c.start("h1");
    let h2 = c.start("h2");
    let sampler = Sampler::start(c.qemu.iter().map(|d| d.uri()).collect(), &uuid);
    sampler.wait("qf running on h1 per h1's libvirtd", |r| running(&r.states[0]));

    // The QEMU process, found by the test: exactly one on the machine, registered by h1.
    let pids = qemu_pids(&uuid);
    assert_eq!(pids.len(), 1, "one QEMU with the VM's UUID: {pids:?}");
    let qemu = pids[0];
    wait_registered(&c, "h1", qemu);
    // The cgroup registered with it (if any) is this VM's alone: never a slice or libvirt's
    // `machine` partition, whose later tenants (other VMs) fencing would kill too.
    let registered = strip_ansi(&c.log_of("h1"))
        .lines()
        .find(|l| l.contains("QEMU registered with the fencing guard") && l.contains(&format!("pid={qemu} ")))
        .map(str::to_owned)
        .unwrap();
    eprintln!("h1: {registered}");
    assert!(
        !registered.contains(".slice\")") && !registered.contains("/machine\")"),
        "a shared cgroup was registered: {registered}"
    );
    let qemu_fd = pidfd(qemu);

    // 1. SIGSTOP h1's agent: it cannot act, its guard must.
    let agent1 = agent_pid(h1.agent.pid());
    let stopped = Instant::now();
    kill(Pid::from_raw(agent1), Signal::SIGSTOP).unwrap();
    let died = wait_exit(&qemu_fd, BOUND).unwrap_or_else(|| panic!("QEMU {qemu} still runs; logs:\n{}", c.logs()));
    let after = died - stopped;
    eprintln!("h1's agent stopped; its QEMU {qemu} died {} ms later", after.as_millis());
    assert!(after <= kill_by + Duration::from_millis(300), "killed {after:?} after the stop, deadline {kill_by:?}");
    assert!(
        after < takeover_earliest,
        "killed {after:?} after the stop, after the earliest takeover {takeover_earliest:?}"
    );
    // h1's libvirtd, over the test's own connection: not running any more.
    let off_h1 = sampler.wait("h1's libvirtd to see qf not running", |r| r.sent > died && !running(&r.states[0]));
    eprintln!("h1's libvirtd: {:?} {} ms after the stop", off_h1.states[0], (off_h1.sent - stopped).as_millis());
    // h2 takes it over, and no round showed it running on h2 before QEMU on h1 was dead.
    let on_h2 = sampler.wait("qf running on h2", |r| running(&r.states[1]));
    eprintln!("qf runs on h2 {} ms after the stop", (on_h2.sent - stopped).as_millis());
    assert!(on_h2.sent > died, "h2 ran qf before h1's QEMU died");
    let rounds = sampler.rounds();
    let both: Vec<&Round> = rounds.iter().filter(|r| running(&r.states[0]) && running(&r.states[1])).collect();
    assert!(both.is_empty(), "qf ran on both hosts: {both:?}");
    let log1 = c.log_of("h1");
    assert!(log1.contains(&format!("SIGKILL sent to process {qemu}")), "h1's guard says it killed QEMU:\n{log1}");

    // 2. SIGKILL h2's agent: its guard sees its pipe close and kills QEMU at once.
    let pids = qemu_pids(&uuid);
    assert_eq!(pids.len(), 1, "one QEMU with the VM's UUID: {pids:?}");
    let qemu2 = pids[0];
    wait_registered(&c, "h2", qemu2);
    let qemu2_fd = pidfd(qemu2);
    let died2 = kill_agent_and_wait_for_qemu(&c, "h2", &h2, qemu2, &qemu2_fd);
    // libvirtd learns of QEMU's death a moment later (monitor EOF): rounds sent before it did
    // may still say running.
    let gone = sampler.wait("h2's libvirtd to see qf not running", |r| r.sent > died2 && !running(&r.states[1]));
    let log2 = c.log_of("h2");
    assert!(log2.contains(&format!("SIGKILL sent to process {qemu2}")), "h2's guard says it killed QEMU:\n{log2}");

    // h1 resumes: its lease is gone, it exits without starting anything.
    kill(Pid::from_raw(agent1), Signal::SIGCONT).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let rounds = sampler.rounds();
    let late: Vec<&Round> = rounds.iter().filter(|r| r.sent > gone.sent && r.states.iter().any(running)).collect();
    assert!(late.is_empty(), "qf ran again although both agents were fenced: {:?}", late.first());
    drop(sampler);
    drop(h1);
    drop(h2);
}

#[test]
fn a_vm_found_running_when_the_agent_starts_is_adopted_and_its_qemu_guarded() {
    if !qemu_or_skip("a_vm_found_running_when_the_agent_starts_is_adopted_and_its_qemu_guarded") {
        return;
    }
    let _serial = one_at_a_time();
    let c = Cluster::in_netns_qemu(2, &[vm("qa", 32, 1, &["h1", "h2"])]);
    let uuid = c.uuid_of("qa");
    // Running on h1 before any agent: started by hand with the cluster's own definition.
    let xml = c.path("qa.xml");
    c.qemu[0].virsh(&["define", &xml.display().to_string()]);
    c.qemu[0].virsh(&["start", "qa"]);
    let pids = qemu_pids(&uuid);
    assert_eq!(pids.len(), 1, "one QEMU with the VM's UUID: {pids:?}");
    let qemu = pids[0];
    let qemu_fd = pidfd(qemu);

    let h1 = c.start("h1");
    let _h2 = c.start("h2");
    // The same process is registered: adopted, not restarted.
    wait_registered(&c, "h1", qemu);
    let log1 = common::strip_ansi(&c.log_of("h1"));
    assert!(!log1.contains("starting the VM"), "h1 restarted the VM instead of adopting it:\n{log1}");
    assert!(wait_exit(&qemu_fd, Duration::ZERO).is_none(), "the adopted QEMU still runs");

    kill_agent_and_wait_for_qemu(&c, "h1", &h1, qemu, &qemu_fd);
    drop(h1);
}
