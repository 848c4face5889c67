//! Real libvirt daemons with the QEMU driver (TCG, no KVM), private to one test, in network
//! namespaces of their own: what live migration is tested against.
//!
//! Each [`QemuDaemon`] is a root `libvirtd` in its own mount and PID namespace (inside a
//! network namespace the caller chooses). The mount namespace bind-mounts the daemon's
//! temporary directory over the paths a privileged libvirt daemon insists on (`/etc/libvirt`,
//! `/var/lib/libvirt`, `/run/libvirt`, …), so two daemons on one machine share no state and
//! the machine's own files are untouched. The PID namespace's init (`tini`) is in the
//! daemon's process group: killing the group ends the daemon *and* every QEMU it started
//! (QEMU processes daemonize away from libvirtd, but not out of the PID namespace).
//!
//! The daemon listens on a Unix socket in its directory (reachable from any network
//! namespace: a filesystem socket) and, for migrations, on TCP port 16509 without
//! authentication: only inside its network namespace, which reaches nothing but the
//! test's own bridge. `qemu.conf` runs QEMU as root without a security driver, cgroups or
//! per-domain device namespaces (none of which the test machine offers), logs QEMU's
//! output to files (no virtlogd) and names the host's bridge address as the address
//! incoming migrations are sent to.
//!
//! Guests need no operating system: a domain with no disk and no kernel runs SeaBIOS,
//! which finds nothing to boot and idles with interrupts on ([`idle_domain_xml`]). It is
//! a real QEMU guest all the same: its memory migrates, and keys sent to it land in the
//! BIOS keyboard buffer in guest memory ([`QemuDaemon::send_keys`], [`QemuDaemon::read_keyboard_buffer`]),
//! which is how a test tells a guest that kept its memory from one that booted afresh.
//!
//! Packages: `qemu-system-x86` (from bookworm-backports on Debian 12: bookworm's own
//! conflicts with the preinstalled backports `qemu-utils`), `libvirt-daemon-driver-qemu`,
//! `libvirt-clients`, `tini`, `util-linux`; `.ci/install-deps` installs them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{ChildGuard, find_program, require_program, run_ok};

/// Where Debian's libvirt keeps its hypervisor driver modules.
const DRIVER_DIR: &str = "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver";
/// The QEMU emulator the domains use.
pub const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";
/// Bound for a daemon to come up (the first QEMU capability probe is part of it).
const START_BOUND: Duration = Duration::from_secs(60);
/// The uid/gid Debian's libvirt-daemon-system would create for `libvirt-qemu`; only needed
/// so that the daemon can resolve its compiled-in default user before reading qemu.conf.
const QEMU_ID: u32 = 64055;

/// Why real QEMU guests cannot run here, or `None` when they can.
pub fn qemu_missing() -> Option<String> {
    let mut missing = Vec::new();
    if !Path::new(EMULATOR).is_file() {
        missing.push(format!("{EMULATOR} (qemu-system-x86 from bookworm-backports)"));
    }
    if !Path::new(DRIVER_DIR).join("libvirt_driver_qemu.so").is_file() {
        missing.push("libvirt's QEMU driver (libvirt-daemon-driver-qemu)".to_string());
    }
    for (program, package) in [("libvirtd", "libvirt-daemon"), ("virsh", "libvirt-clients"), ("tini", "tini")] {
        if find_program(program, &[]).is_none() {
            missing.push(format!("{program} ({package})"));
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Whether a test that needs real QEMU guests should run. When QEMU or libvirt's QEMU
/// driver is missing it prints a loud skip notice and returns false, except under CI
/// (`CI` set), where `.ci/install-deps` installs them: there a missing package fails the test.
pub fn qemu_or_skip(test: &str) -> bool {
    let Some(missing) = qemu_missing() else { return true };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: real QEMU guests are needed but missing here: {missing}; run .ci/install-deps");
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED {test}: real QEMU guests cannot run here (missing: {missing}); \
         run .ci/install-deps as root !!!!!!!!\n"
    );
    false
}

/// A domain with no disk and no kernel: SeaBIOS finds nothing to boot and idles. `memory_mib`
/// small (32–64) keeps a migration under TCG well below a second.
pub fn idle_domain_xml(name: &str, uuid: &str, memory_mib: u64) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{uuid}</uuid>\n  <memory unit='MiB'>{memory_mib}</memory>\n  \
         <vcpu>1</vcpu>\n  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n  \
         <features><acpi/></features>\n  <on_poweroff>destroy</on_poweroff>\n  \
         <devices><emulator>{EMULATOR}</emulator></devices>\n</domain>\n"
    )
}

/// One private libvirt daemon with the QEMU driver. Stopped (with its guests) on drop.
#[derive(Debug)]
pub struct QemuDaemon {
    dir: PathBuf,
    addr: String,
    daemon: ChildGuard,
}

impl QemuDaemon {
    /// Starts a daemon in network namespace `ns` whose address for incoming migrations is
    /// `addr` (an address of `ns`), with host UUID `host_uuid` (libvirt refuses a migration
    /// between two hosts with the same UUID). `dir` must exist and be private to it.
    pub fn start(dir: &Path, ns: &str, addr: &str, host_uuid: &str) -> QemuDaemon {
        let d = |p: &str| dir.join(p);
        for sub in ["etc", "lib", "cache", "run", "log", "sock", "drivers"] {
            std::fs::create_dir_all(d(sub)).unwrap_or_else(|e| panic!("create {}: {e}", d(sub).display()));
        }
        // Only the QEMU driver: no network, storage or nodedev driver touching the host.
        let link = d("drivers").join("libvirt_driver_qemu.so");
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new(DRIVER_DIR).join("libvirt_driver_qemu.so"), &link)
                .unwrap_or_else(|e| panic!("symlink the QEMU driver: {e}"));
        }
        let write = |p: PathBuf, text: String| {
            std::fs::write(&p, text).unwrap_or_else(|e| panic!("write {}: {e}", p.display()))
        };
        write(
            d("etc").join("libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{sock}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nunix_sock_rw_perms = \"0700\"\n\
                 listen_tls = 0\nlisten_tcp = 1\nauth_tcp = \"none\"\nhost_uuid = \"{host_uuid}\"\n\
                 log_outputs = \"3:file:{log}\"\n",
                sock = d("sock").display(),
                log = d("libvirtd.log").display(),
            ),
        );
        write(
            d("etc").join("qemu.conf"),
            format!(
                "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\nsecurity_driver = \"none\"\n\
                 namespaces = [ ]\ncgroup_controllers = [ ]\nstdio_handler = \"file\"\nmigration_host = \"{addr}\"\n"
            ),
        );
        // libvirtd resolves its compiled-in QEMU user before it reads qemu.conf: give it one
        // in its own view of /etc/passwd rather than adding a user to the machine.
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
        write(d("passwd"), format!("{passwd}libvirt-qemu:x:{QEMU_ID}:{QEMU_ID}::/var/lib/libvirt:/usr/sbin/nologin\n"));
        write(d("group"), format!("{group}libvirt-qemu:x:{QEMU_ID}:\n"));
        let binds = [
            ("etc", "/etc/libvirt"),
            ("lib", "/var/lib/libvirt"),
            ("cache", "/var/cache/libvirt"),
            ("run", "/run/libvirt"),
            ("log", "/var/log/libvirt"),
        ];
        let mut script = String::from("set -e\n");
        for (_, target) in binds {
            script += &format!("mkdir -p {target}\n");
        }
        for (sub, target) in binds {
            script += &format!("mount --bind '{}' {target}\n", d(sub).display());
        }
        script += &format!(
            "mount --bind '{}' /etc/passwd\nmount --bind '{}' /etc/group\n\
             exec libvirtd --listen -f '{}' -p '{}'\n",
            d("passwd").display(),
            d("group").display(),
            d("etc").join("libvirtd.conf").display(),
            d("libvirtd.pid").display(),
        );
        write(d("start.sh"), script);
        let _ = std::fs::remove_file(d("sock").join("libvirt-sock"));

        let mut cmd = Command::new(require_program("nsenter", "util-linux", &[]));
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(require_program("unshare", "util-linux", &[]))
            .args(["--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc", "--"])
            .arg(require_program("tini", "tini", &[]))
            .args(["-s", "--", "sh"])
            .arg(d("start.sh"))
            .env("LIBVIRT_DRIVER_DIR", d("drivers"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(d("libvirtd.out")).expect("libvirtd.out"))
            .stderr(std::fs::File::create(d("libvirtd.err")).expect("libvirtd.err"));
        let daemon = ChildGuard::spawn(&format!("libvirtd in {ns}"), cmd);
        let me = QemuDaemon { dir: dir.to_path_buf(), addr: addr.to_string(), daemon };
        me.wait_ready();
        me
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if self.dir.join("sock").join("libvirt-sock").exists() && self.try_virsh(&["version"]).is_ok() {
                return;
            }
            assert!(
                start.elapsed() < START_BOUND,
                "libvirtd did not answer within {START_BOUND:?}:\n{}\n{}",
                std::fs::read_to_string(self.dir.join("libvirtd.err")).unwrap_or_default(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URI the host agent and the tests use (the daemon's Unix socket).
    pub fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.dir.join("sock").join("libvirt-sock").display())
    }

    /// The URI another daemon migrates to (TCP, no authentication, inside the test network).
    pub fn migration_uri(&self) -> String {
        format!("qemu+tcp://{}/system", self.addr)
    }

    /// The daemon's address on the test network.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The daemon's process group id (its namespace's init is in it).
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// `virsh -c <uri> ARGS`, or its error output.
    pub fn try_virsh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("virsh")
            .arg("-c")
            .arg(self.uri())
            .args(args)
            .output()
            .map_err(|e| format!("cannot run virsh: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("virsh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// `virsh -c <uri> ARGS`, panicking with its output if it fails.
    pub fn virsh(&self, args: &[&str]) -> String {
        run_ok(&format!("virsh {}", args.join(" ")), Command::new("virsh").arg("-c").arg(self.uri()).args(args))
    }

    /// Types `keys` (names as `virsh send-key` takes them: `KEY_T`, …) on the guest's
    /// PS/2 keyboard; the idling BIOS stores them in its keyboard buffer in guest memory.
    pub fn send_keys(&self, domain: &str, keys: &[&str]) {
        let mut args = vec!["send-key", domain];
        args.extend_from_slice(keys);
        self.virsh(&args);
    }

    /// The ASCII characters in the BIOS keyboard buffer of the guest (guest physical memory
    /// 0x41e–0x43d, head and tail at 0x41a/0x41c), read through QEMU's monitor.
    pub fn read_keyboard_buffer(&self, domain: &str) -> String {
        let out = self.virsh(&["qemu-monitor-command", "--hmp", domain, "xp /18xh 0x41a"]);
        let words: Vec<u16> = out
            .split_whitespace()
            .filter(|w| w.starts_with("0x") && !w.ends_with(':'))
            .filter_map(|w| u16::from_str_radix(w.trim_start_matches("0x"), 16).ok())
            .collect();
        if words.len() < 18 {
            panic!("unexpected monitor output: {out}");
        }
        // Offsets are relative to the BIOS data area (0x400); the buffer's words follow.
        let (head, tail) = (usize::from(words[0]), usize::from(words[1]));
        let slot = |off: usize| off.checked_sub(0x1e).map(|b| b / 2 + 2);
        let mut text = String::new();
        let (mut at, end) = (head, tail);
        let mut guard = 0;
        while at != end && guard < 16 {
            let Some(i) = slot(at).filter(|i| *i < words.len()) else { break };
            text.push(char::from((words[i] & 0xff) as u8));
            at = if at + 2 >= 0x3e { 0x1e } else { at + 2 };
            guard += 1;
        }
        text
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default()
    }

    /// QEMU's log of `domain` (its command lines and exits).
    pub fn qemu_log(&self, domain: &str) -> String {
        std::fs::read_to_string(self.dir.join("log").join("qemu").join(format!("{domain}.log"))).unwrap_or_default()
    }

    /// Stops the daemon and every guest it runs.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }
}

/// Two hosts for migration tests: network namespaces `a` and `b` joined by a veth pair
/// (10.79.<n>.1 and .2), each with its own [`QemuDaemon`]. Everything is removed on drop.
#[derive(Debug)]
pub struct QemuPair {
    /// The first host's daemon.
    pub a: QemuDaemon,
    /// The second host's daemon.
    pub b: QemuDaemon,
    namespaces: [String; 2],
    _dir: tempfile::TempDir,
}

impl QemuPair {
    /// Creates the namespaces and starts both daemons (in parallel: each probes QEMU once).
    pub fn start() -> QemuPair {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{n}", std::process::id());
        let namespaces = [format!("tqa{id}"), format!("tqb{id}")];
        let net = format!("10.79.{}", n % 250 + 1);
        let dir = tempfile::tempdir().expect("temporary directory");
        for ns in &namespaces {
            crate::netns::ip(&["netns", "add", ns]);
            crate::netns::ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let guard = Namespaces(namespaces.clone());
        crate::netns::ip(&[
            "-n",
            &namespaces[0],
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &namespaces[1],
        ]);
        for (i, ns) in namespaces.iter().enumerate() {
            crate::netns::ip(&["-n", ns, "addr", "add", &format!("{net}.{}/24", i + 1), "dev", "eth0"]);
            crate::netns::ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        let (da, db) = (dir.path().join("a"), dir.path().join("b"));
        let (nsa, nsb) = (namespaces[0].clone(), namespaces[1].clone());
        let (aa, ab) = (format!("{net}.1"), format!("{net}.2"));
        let b = std::thread::spawn(move || QemuDaemon::start(&db, &nsb, &ab, "5a1c0000-0000-4000-8000-0000000000b2"));
        let a = QemuDaemon::start(&da, &nsa, &aa, "5a1c0000-0000-4000-8000-0000000000a1");
        let b = b.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        std::mem::forget(guard);
        QemuPair { a, b, namespaces, _dir: dir }
    }
}

impl Drop for QemuPair {
    fn drop(&mut self) {
        self.a.kill();
        self.b.kill();
        for ns in &self.namespaces {
            crate::netns::delete(ns);
        }
    }
}

/// Deletes namespaces if starting the daemons panics.
struct Namespaces([String; 2]);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            crate::netns::delete(ns);
        }
    }
}
