//! `tandemctl lease`: initialise and inspect a lease area, and run a command under a resource lease
//! (a cluster-wide flock with self-fencing). See docs/lease-cli.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::{Args, Subcommand};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::{Id, WaitPidFlag, waitid};
use nix::unistd::Pid;
use serde_json::json;
use tandem_lease::fence::{FencePlan, FenceStep, signal_group};
use tandem_lease::format::DeltaState;
use tandem_lease::guard::{GuardHandle, GuardOptions, run_guard_on_stdin};
use tandem_lease::lockspace::{AreaParams, ResourceDump};
use tandem_lease::monotonic_now;
use tandem_lease::{DiskError, FileDisk, Header, HostLease, IoMode, LeaseDisk, LeaseError, Lockspace, Timeouts};

/// Exit status: bad usage, or the lease area is unusable (missing, corrupted, wrong cluster id,
/// wrong sector size, truncated, I/O error while opening/joining).
pub const EXIT_USAGE: i32 = 64;
/// Exit status of `run`: the lease was not acquired within `--timeout`. COMMAND never ran.
pub const EXIT_TIMEOUT: i32 = 75;
/// Exit status of `run`: the lease was lost while COMMAND ran; COMMAND was fenced (killed).
pub const EXIT_LOST: i32 = 76;
/// Exit status: internal failure (the guard could not be started, ...).
pub const EXIT_INTERNAL: i32 = 70;

/// Test hook: fault injection into lease I/O (see docs/lease-cli.md).
const FAULTS_ENV: &str = "TANDEM_LEASE_FAULTS";

/// Arguments of `tandemctl lease`.
#[derive(Debug, Args)]
pub struct LeaseArgs {
    #[command(subcommand)]
    command: LeaseCommand,
}

#[derive(Debug, Subcommand)]
enum LeaseCommand {
    /// Write a new, empty lease area (refuses an initialised or non-empty area without --force).
    Init(InitArgs),
    /// Show the header, host slots and resource leases of an area.
    Dump(DumpArgs),
    /// Run COMMAND while holding resource lease NAME (cluster-wide flock with self-fencing).
    Run(RunArgs),
    /// The fencing guard process (internal: started by `run`, reads commands on stdin).
    #[command(hide = true)]
    Guard {
        /// Hardware watchdog device to keep alive while the agent pets.
        #[arg(long)]
        watchdog: Option<std::path::PathBuf>,
        /// Milliseconds after a missed kill deadline by which the watchdog fires (M − grace).
        #[arg(long)]
        watchdog_extra_ms: Option<u64>,
    },
}

#[derive(Debug, Args)]
struct InitArgs {
    /// Block device or file holding the area (a missing file is created).
    #[arg(long)]
    device: PathBuf,
    /// Number of host ids (1..=255).
    #[arg(long, default_value_t = 16)]
    hosts: u32,
    /// Number of resource slots (1..=4096).
    #[arg(long, default_value_t = 64)]
    resources: u32,
    /// Sector size: 512 or 4096 (a multiple of the device's logical block size).
    #[arg(long, default_value_t = 512, value_parser = clap::builder::PossibleValuesParser::new(["512", "4096"]).map(|s| s.parse::<u32>().unwrap()))]
    sector_size: u32,
    /// Cluster id recorded in the header; every user of the area must give the same one.
    #[arg(long, default_value = "tandem")]
    cluster_id: String,
    /// Renewal interval R in ms; the other timeouts derive from it (I=1.5R, K=3.5R, M=R, T=6.5R).
    /// 300 gives a takeover of about 3 s, 1000 (default) about 7 s.
    #[arg(long, default_value_t = 1000)]
    renewal_ms: u64,
    /// Overwrite an initialised or non-empty area. Stop every host using it first.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DumpArgs {
    /// Block device or file holding the area.
    #[arg(long)]
    device: PathBuf,
    /// Cluster id the area must belong to.
    #[arg(long, default_value = "tandem")]
    cluster_id: String,
    /// Watch the host slots for the host-dead time T to report alive/dead (otherwise liveness is
    /// "unknown": it can only be judged from changes over time).
    #[arg(long)]
    observe: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Block device or file holding the area.
    #[arg(long)]
    device: PathBuf,
    /// Cluster id the area must belong to.
    #[arg(long, default_value = "tandem")]
    cluster_id: String,
    /// This host's id in the lockspace (unique per host).
    #[arg(long)]
    host_id: u32,
    /// Name of the resource lease to hold while COMMAND runs.
    #[arg(long)]
    resource: String,
    /// Give up acquiring after this many seconds (exit 75). Default: wait forever.
    #[arg(long)]
    timeout: Option<f64>,
    /// Graceful-stop period in ms between SIGTERM and the guard's SIGKILL once the lease is lost
    /// (at most half the kill margin; default half of it).
    #[arg(long)]
    grace_ms: Option<u64>,
    /// Hardware watchdog device (e.g. /dev/watchdog) that the guard keeps alive while the lease
    /// is renewed: it resets the machine by K + M when COMMAND survives the SIGKILL (needs a
    /// kill margin of at least grace + 1 s).
    #[arg(long)]
    watchdog: Option<PathBuf>,
    /// Print a JSON summary on stderr when done.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    command: Vec<String>,
}

/// Runs `tandemctl lease ...` and returns the process exit status.
pub fn main(args: LeaseArgs) -> i32 {
    let res = match args.command {
        LeaseCommand::Init(a) => init(a),
        LeaseCommand::Dump(a) => dump(a),
        LeaseCommand::Run(a) => return run(a),
        LeaseCommand::Guard { watchdog, watchdog_extra_ms } => {
            return match run_guard_on_stdin(&GuardOptions { watchdog, watchdog_extra_ms }) {
                Ok(_) => 0,
                Err(e) => {
                    eprintln!("tandem-guard: {e}");
                    EXIT_INTERNAL
                }
            };
        }
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tandemctl lease: {e:#}");
            EXIT_USAGE
        }
    }
}

/// A `LeaseDisk` that injects faults (test hook, from `TANDEM_LEASE_FAULTS`):
/// `fail-io-after=N` fails every I/O after the first N; `fail-if-exists=PATH` fails I/O while PATH
/// exists; `stall-if-exists=PATH` blocks I/O while PATH exists. Items are comma-separated.
#[derive(Debug)]
struct FaultyDisk {
    inner: FileDisk,
    fail_after: Option<u64>,
    fail_file: Option<PathBuf>,
    stall_file: Option<PathBuf>,
    count: AtomicU64,
}

impl FaultyDisk {
    fn check(&self) -> Result<(), DiskError> {
        if let Some(p) = &self.stall_file {
            while p.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        if self.fail_after.is_some_and(|max| n >= max) {
            return Err(DiskError::Injected(format!("I/O number {} after fail-io-after", n + 1)));
        }
        if let Some(p) = &self.fail_file
            && p.exists()
        {
            return Err(DiskError::Injected(format!("fault file {} exists", p.display())));
        }
        Ok(())
    }
}

impl LeaseDisk for FaultyDisk {
    fn alignment(&self) -> usize {
        self.inner.alignment()
    }
    fn size(&self) -> Result<u64, DiskError> {
        self.inner.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.check()?;
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        self.check()?;
        self.inner.write_at(offset, data)
    }
    fn io_mode(&self) -> IoMode {
        self.inner.io_mode()
    }
}

fn open_disk(path: &Path) -> anyhow::Result<Arc<dyn LeaseDisk>> {
    let inner = FileDisk::open(path).with_context(|| format!("opening lease device {}", path.display()))?;
    let Ok(spec) = std::env::var(FAULTS_ENV) else {
        return Ok(Arc::new(inner));
    };
    let mut d = FaultyDisk { inner, fail_after: None, fail_file: None, stall_file: None, count: AtomicU64::new(0) };
    for item in spec.split(',').filter(|s| !s.is_empty()) {
        match item.split_once('=') {
            Some(("fail-io-after", n)) => d.fail_after = Some(n.parse().context("fail-io-after=N needs a number")?),
            Some(("fail-if-exists", p)) => d.fail_file = Some(p.into()),
            Some(("stall-if-exists", p)) => d.stall_file = Some(p.into()),
            _ => anyhow::bail!(
                "{FAULTS_ENV}: unknown item {item:?}; expected fail-io-after=N, fail-if-exists=PATH or stall-if-exists=PATH"
            ),
        }
    }
    Ok(Arc::new(d))
}

fn init(a: InitArgs) -> anyhow::Result<()> {
    let timeouts = Timeouts::from_renewal_ms(a.renewal_ms);
    timeouts.validate().context("--renewal-ms gives invalid lease timeouts")?;
    let params = AreaParams {
        cluster_id: a.cluster_id.clone(),
        sector_size: a.sector_size,
        host_slots: a.hosts,
        resource_slots: a.resources,
        timeouts,
    };
    let probe = Header {
        sector_size: a.sector_size,
        host_slots: a.hosts,
        resource_slots: a.resources,
        timeouts,
        area_id: 1,
        cluster_id: a.cluster_id.clone(),
    };
    probe.check().context("invalid lease area parameters")?;
    let needed = probe.layout().area_len();
    if !a.device.exists() {
        let f = std::fs::File::create(&a.device).with_context(|| format!("creating {}", a.device.display()))?;
        f.set_len(needed)?;
    } else if a.device.metadata()?.is_file() && a.device.metadata()?.len() < needed && a.force {
        // Without --force the file is left alone: init refuses an existing area before writing.
        std::fs::OpenOptions::new().write(true).open(&a.device)?.set_len(needed)?;
    }
    let disk = open_disk(&a.device)?;
    let header = Lockspace::init(&*disk, &params, a.force)
        .with_context(|| format!("initialising lease area on {}", a.device.display()))?;
    if a.json {
        println!("{}", json!({"device": a.device, "header": header_json(&header), "bytes": needed}));
    } else {
        println!(
            "initialised {} for cluster {:?}: {} host slots, {} resource slots, {}-byte sectors, {} bytes",
            a.device.display(),
            header.cluster_id,
            header.host_slots,
            header.resource_slots,
            header.sector_size,
            needed
        );
        print_timeouts(&header.timeouts);
    }
    Ok(())
}

fn header_json(h: &Header) -> serde_json::Value {
    let t = &h.timeouts;
    json!({
        "cluster_id": h.cluster_id, "area_id": format!("{:#x}", h.area_id), "sector_size": h.sector_size,
        "host_slots": h.host_slots, "resource_slots": h.resource_slots,
        "timeouts_ms": {"renewal": t.renewal_ms, "io": t.io_timeout_ms, "fence": t.fence_ms,
            "kill_margin": t.kill_margin_ms, "host_dead": t.host_dead_ms},
    })
}

fn print_timeouts(t: &Timeouts) {
    println!(
        "timeouts: renewal R={} ms, I/O I={} ms, fence K={} ms, kill margin M={} ms, host dead T={} ms",
        t.renewal_ms, t.io_timeout_ms, t.fence_ms, t.kill_margin_ms, t.host_dead_ms
    );
}

fn dump(a: DumpArgs) -> anyhow::Result<()> {
    let disk = open_disk(&a.device)?;
    let first = Lockspace::dump(&*disk, &a.cluster_id).with_context(|| format!("reading {}", a.device.display()))?;
    let t = first.header.timeouts;
    // Liveness can only be judged from change over time (clocks are not comparable across hosts).
    let mut liveness: Vec<String> = first
        .hosts
        .iter()
        .map(|h| match &h.record {
            Ok(r) if r.state == DeltaState::Free => "free".into(),
            Ok(_) => format!("unknown (observe for {} ms)", t.host_dead_ms),
            Err(_) => "unreadable".into(),
        })
        .collect();
    if a.observe {
        let start = Instant::now();
        let mut changed = vec![false; first.hosts.len()];
        while start.elapsed() < Duration::from_millis(t.host_dead_ms + t.renewal_ms) {
            std::thread::sleep(Duration::from_millis(t.poll_interval_ms()));
            let now = Lockspace::dump(&*disk, &a.cluster_id)?;
            for (i, (old, new)) in first.hosts.iter().zip(&now.hosts).enumerate() {
                if old.record != new.record {
                    changed[i] = true;
                }
            }
        }
        for (i, h) in first.hosts.iter().enumerate() {
            if let Ok(r) = &h.record
                && r.state == DeltaState::Live
            {
                liveness[i] = if changed[i] { "alive".into() } else { "dead".into() };
            }
        }
    }
    let res: Vec<_> = first.resources.iter().filter(|r| r.name().is_some() || r.leader.is_err()).collect();
    if a.json {
        let hosts: Vec<_> = first
            .hosts
            .iter()
            .zip(&liveness)
            .filter(|(h, _)| !matches!(&h.record, Ok(r) if r.state == DeltaState::Free && r.generation == 0))
            .map(|(h, l)| match &h.record {
                Ok(r) => json!({"host_id": h.host_id, "state": format!("{:?}", r.state).to_lowercase(),
                    "generation": r.generation, "renew_seq": r.renew_seq, "timestamp_ms": r.timestamp_ms,
                    "liveness": l}),
                Err(e) => json!({"host_id": h.host_id, "error": e}),
            })
            .collect();
        let resources: Vec<_> = res
            .iter()
            .map(|r| match &r.leader {
                Ok(l) => json!({"slot": r.slot, "name": l.value.name, "state": format!("{:?}", l.state).to_lowercase(),
                    "owner": r.holder().map(|h| h.0), "token": l.lver, "max_ballot_lver": r.max_ballot_lver,
                    "value": value_json(r)}),
                Err(e) => json!({"slot": r.slot, "error": e}),
            })
            .collect();
        println!("{}", json!({"header": header_json(&first.header), "hosts": hosts, "resources": resources}));
        return Ok(());
    }
    let h = &first.header;
    println!(
        "lease area {} cluster {:?} area id {:#x}: {} host slots, {} resource slots, {}-byte sectors",
        a.device.display(),
        h.cluster_id,
        h.area_id,
        h.host_slots,
        h.resource_slots,
        h.sector_size
    );
    print_timeouts(&t);
    println!("hosts (slots never used are omitted):");
    for (hs, l) in first.hosts.iter().zip(&liveness) {
        match &hs.record {
            Ok(r) if r.state == DeltaState::Free && r.generation == 0 => {}
            Ok(r) => println!(
                "  host {:>3}: {:?} generation {} renewals {} last write at {} ms (its clock) — {}",
                hs.host_id, r.state, r.generation, r.renew_seq, r.timestamp_ms, l
            ),
            Err(e) => println!("  host {:>3}: unreadable: {e}", hs.host_id),
        }
    }
    println!("resources:");
    for r in res {
        match &r.leader {
            Ok(l) => match r.holder() {
                Some((owner, token)) => {
                    println!("  {:?}: held by host {owner}, token {token}; {}", l.value.name, value_text(r))
                }
                None => println!("  {:?}: {:?}, last token {}; {}", l.value.name, l.state, l.lver, value_text(r)),
            },
            Err(e) => println!("  slot {}: unreadable: {e}", r.slot),
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The value block in `dump --json`: hex bytes and who wrote them, null if never written.
fn value_json(r: &ResourceDump) -> serde_json::Value {
    match &r.value {
        Ok(Some(v)) => json!({"len": v.data.len(), "hex": hex(&v.data), "token": v.lver, "writer": v.owner,
            "seq": v.seq, "bad_copies": r.bad_values.len()}),
        Ok(None) => serde_json::Value::Null,
        Err(e) => json!({"error": e}),
    }
}

/// The value block in human output: length and the first 32 bytes in hex.
fn value_text(r: &ResourceDump) -> String {
    match &r.value {
        Ok(Some(v)) => {
            let shown = &v.data[..v.data.len().min(32)];
            let more = if v.data.len() > shown.len() { "…" } else { "" };
            format!(
                "value {} bytes {}{more} (set under token {} by host {})",
                v.data.len(),
                hex(shown),
                v.lver,
                v.owner
            )
        }
        Ok(None) => "no value".to_string(),
        Err(e) => format!("value unreadable: {e}"),
    }
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

fn log(msg: &str) {
    eprintln!("tandemctl lease run: {msg}");
}

struct RunOutcome {
    code: i32,
    status: &'static str,
    token: Option<u64>,
}

fn run(a: RunArgs) -> i32 {
    let json = a.json;
    let out = run_inner(a);
    if json {
        eprintln!("{}", json!({"status": out.status, "exit_code": out.code, "token": out.token}));
    }
    out.code
}

fn run_inner(a: RunArgs) -> RunOutcome {
    let fail = |code, status, msg: String| {
        log(&msg);
        RunOutcome { code, status, token: None }
    };
    let disk = match open_disk(&a.device) {
        Ok(d) => d,
        Err(e) => return fail(EXIT_USAGE, "area-error", format!("{e:#}")),
    };
    let header = match Lockspace::open(&*disk, &a.cluster_id) {
        Ok(h) => h,
        Err(e) => {
            return fail(
                EXIT_USAGE,
                "area-error",
                format!("{:#}", anyhow::Error::new(e).context(a.device.display().to_string())),
            );
        }
    };
    let t = header.timeouts;
    let grace = a.grace_ms.unwrap_or_else(|| FencePlan::default_grace_ms(&t));
    let watchdog = a.watchdog.clone().map(|device| tandem_lease::fence::WatchdogConfig { device });
    let plan = match FencePlan::new(t, grace, watchdog) {
        Ok(p) => p,
        Err(e) => return fail(EXIT_USAGE, "area-error", format!("{:#}", anyhow::Error::new(e))),
    };
    // The guard first: nothing may run under the lease without it.
    let mut guard_cmd = Command::new("/proc/self/exe");
    guard_cmd.args(["lease", "guard"]).args(GuardHandle::watchdog_args(&plan));
    let guard = match GuardHandle::spawn(guard_cmd) {
        Ok(g) => Arc::new(Mutex::new(Some(g))),
        Err(e) => return fail(EXIT_INTERNAL, "internal-error", format!("{:#}", anyhow::Error::new(e))),
    };
    log(&format!("joining the lockspace of {} as host {}", a.device.display(), a.host_id));
    let join_start = Instant::now();
    let lease = match HostLease::join(disk, &a.cluster_id, a.host_id) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            return fail(
                EXIT_USAGE,
                "area-error",
                format!("cannot join as host {}: {:#}", a.host_id, anyhow::Error::new(e)),
            );
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let guard_broken = Arc::new(AtomicBool::new(false));
    let renewer = {
        let (lease, stop, guard, guard_broken, plan) =
            (lease.clone(), stop.clone(), guard.clone(), guard_broken.clone(), plan.clone());
        std::thread::spawn(move || {
            lease.renewal_loop(&stop, |res| match res {
                Ok(valid_until) => {
                    let mut g = guard.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(g) = g.as_mut()
                        && let Err(e) = g.pet(plan.kill_deadline(*valid_until))
                    {
                        log(&format!("{e}"));
                        guard_broken.store(true, Ordering::SeqCst);
                    }
                }
                Err(e) => log(&format!("renewal failed: {e}")),
            })
        })
    };
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        let act = SigAction::new(SigHandler::Handler(on_stop_signal), SaFlags::SA_RESTART, SigSet::empty());
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { sigaction(sig, &act) };
    }

    let join_ms = join_start.elapsed().as_millis();
    // Acquire, printing progress while waiting.
    let started = Instant::now();
    let limit = a.timeout.map(Duration::from_secs_f64);
    let token = loop {
        let remaining = limit.map(|l| l.saturating_sub(started.elapsed()));
        let chunk = remaining.map_or(Duration::from_secs(5), |r| r.min(Duration::from_secs(5)));
        match lease.acquire(&a.resource, Some(chunk)) {
            Ok(tok) => break tok,
            Err(e) if e.is_wait_timeout() => {
                if remaining.is_some_and(|r| r <= chunk) || STOP_REQUESTED.load(Ordering::SeqCst) {
                    stop.store(true, Ordering::SeqCst);
                    let _ = renewer.join();
                    if let Ok(l) = Arc::try_unwrap(lease) {
                        let _ = l.leave();
                    }
                    bye(&guard);
                    return fail(
                        EXIT_TIMEOUT,
                        "timeout",
                        format!("gave up acquiring {:?} after {:.1} s", a.resource, started.elapsed().as_secs_f64()),
                    );
                }
                let why = match &e {
                    LeaseError::WaitTimeout { last, .. } => last.to_string(),
                    other => other.to_string(),
                };
                log(&format!(
                    "still waiting for {:?} after {:.0} s: {why}",
                    a.resource,
                    started.elapsed().as_secs_f64()
                ));
            }
            Err(e) if e.is_lost() => return fail(EXIT_LOST, "lost", format!("host lease lost while acquiring: {e}")),
            Err(e) => {
                return fail(
                    EXIT_USAGE,
                    "area-error",
                    format!("cannot acquire {:?}: {:#}", a.resource, anyhow::Error::new(e)),
                );
            }
        }
    };
    log(&format!(
        "acquired {:?} with fencing token {token} (join {join_ms} ms, acquire {} ms)",
        a.resource,
        started.elapsed().as_millis()
    ));

    // Start COMMAND in its own process group, registered with the guard before it execs.
    let mut cmd = Command::new(&a.command[0]);
    cmd.args(&a.command[1..]).env("TANDEM_FENCING_TOKEN", token.0.to_string());
    {
        let g = guard.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().expect("guard present").register_in_child(&mut cmd);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = lease.release(&a.resource);
            stop.store(true, Ordering::SeqCst);
            let _ = renewer.join();
            bye(&guard);
            return fail(EXIT_USAGE, "spawn-error", format!("cannot start {:?}: {e}", a.command[0]));
        }
    };
    let pgid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // WNOWAIT: observe the exit without reaping, so the group id stays ours until unregistered.
        let _ = waitid(Id::Pid(Pid::from_raw(pgid)), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
        let _ = tx.send(());
    });
    let mut lost = false;
    let mut term_sent = false;
    let mut fwd = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if STOP_REQUESTED.load(Ordering::SeqCst) && !fwd {
            fwd = true;
            let _ = signal_group(pgid, Signal::SIGTERM);
        }
        let now = monotonic_now();
        let step = match lease.valid_until() {
            Some(v) if !guard_broken.load(Ordering::SeqCst) => plan.step_at(v, now),
            // Lost, or the guard is gone: nothing protects the lease any more.
            _ => FenceStep::Kill,
        };
        match step {
            FenceStep::Valid => {}
            FenceStep::GracefulStop => {
                lost = true;
                if !term_sent {
                    term_sent = true;
                    log("lease lost (fence deadline passed without a renewal): stopping COMMAND (SIGTERM)");
                    let _ = signal_group(pgid, Signal::SIGTERM);
                }
            }
            FenceStep::Kill | FenceStep::Watchdog => {
                if !lost {
                    log("lease lost: killing COMMAND's process group");
                }
                lost = true;
                let _ = signal_group(pgid, Signal::SIGKILL);
            }
        }
    }
    // COMMAND exited (or was killed). Judge by the clock whether it ran under a valid lease to the end.
    lost = lost || !lease.is_valid(monotonic_now()) || guard_broken.load(Ordering::SeqCst);
    // Nothing COMMAND left behind may outlive the lease.
    let _ = signal_group(pgid, Signal::SIGKILL);
    if let Some(g) = guard.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        let _ = g.unregister(pgid);
    }
    let status = child.wait();
    stop.store(true, Ordering::SeqCst);
    // A renewal stuck in lease I/O (hung disk) must not keep us here: wait a bounded time.
    let join_by = Instant::now() + Duration::from_millis(2 * t.io_timeout_ms + t.renewal_ms);
    while !renewer.is_finished() && Instant::now() < join_by {
        std::thread::sleep(Duration::from_millis(10));
    }
    let disk_stuck = !renewer.is_finished();
    if !disk_stuck {
        let _ = renewer.join();
    }
    let code = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0))
        }
        Err(_) => EXIT_INTERNAL,
    };
    if lost {
        // Do not write to the area: the lease may already be someone else's.
        bye(&guard);
        log(&format!("lease {:?} (token {token}) was lost; COMMAND was fenced", a.resource));
        return RunOutcome { code: EXIT_LOST, status: "lost", token: Some(token.0) };
    }
    if disk_stuck {
        bye(&guard);
        log("the lease disk does not answer: not releasing (other hosts take over once this host's lease is dead)");
        return RunOutcome { code, status: "exited", token: Some(token.0) };
    }
    if let Err(e) = lease.release(&a.resource) {
        log(&format!("release failed (others take over once this host's lease expires): {e}"));
    }
    if let Ok(l) = Arc::try_unwrap(lease)
        && let Err(e) = l.leave()
    {
        log(&format!("leaving the lockspace failed: {e}"));
    }
    bye(&guard);
    RunOutcome { code, status: "exited", token: Some(token.0) }
}

fn bye(guard: &Mutex<Option<GuardHandle>>) {
    if let Some(g) = guard.lock().unwrap_or_else(|p| p.into_inner()).take() {
        let _ = g.bye(Duration::from_secs(2));
    }
}
