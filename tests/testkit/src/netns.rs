//! Network namespaces for end-to-end tests: `ip` and `iptables` with their output checked,
//! clean-up, and starting a node's agent inside a namespace.

use std::ffi::OsStr;
use std::process::{Command, Stdio};

use crate::{require_program, run_ok};

/// Runs `ip ARGS`, panicking with its output if it fails; returns its stdout.
pub fn ip(args: &[&str]) -> String {
    run_ok(&format!("ip {}", args.join(" ")), Command::new("ip").args(args))
}

/// Runs `iptables -w ARGS` inside namespace `ns`, panicking with its output if it fails.
pub fn iptables(ns: &str, args: &[&str]) {
    run_ok(
        &format!("iptables {} in {ns}", args.join(" ")),
        Command::new("ip").args(["netns", "exec", ns, "iptables", "-w"]).args(args),
    );
}

/// Deletes namespace `ns`, quietly (clean-up on drop: it may be gone already).
pub fn delete(ns: &str) {
    let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
}

/// A command that runs `program` in namespace `ns` under `tini -s`.
///
/// `nsenter --net`, not `ip netns exec`: the latter remounts /sys for the namespace, which
/// hides the cgroup2 mount the agents need. `tini -s` is the node's init: it adopts and
/// reaps at once every orphan below it (a daemon whose parent exited), as systemd does in a
/// VM; without it orphans go to this machine's PID 1, which reaps only every ~2 s, and a
/// killed daemon's zombie keeps its pid "running" meanwhile.
pub fn node_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(require_program("nsenter", "util-linux", &[]));
    c.arg(format!("--net=/run/netns/{ns}"))
        .arg("--")
        .arg(require_program("tini", "tini", &[]))
        .args(["-s", "--"])
        .arg(program);
    c
}
