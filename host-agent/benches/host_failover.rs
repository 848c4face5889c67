//! Host-cluster failover benchmark: real `tandem-host` agents on loopback, each on its own
//! libvirt test-driver hypervisor, N HA VMs spread evenly; one host is killed.
//!
//! Measures, from outside the agents:
//! * the time from the kill until every VM of the dead host (the one holding closest to its
//!   share of the VMs) runs elsewhere (each
//!   hypervisor's own view, sampled), against the lease takeover time alone (the same
//!   kill with one VM: what the leases cost, not the VMs);
//! * `GetClusterStatus` latency, p50 and p99 over many calls;
//! * each agent's CPU share and RSS while idle.
//!
//! `cargo bench -p tandem-host --bench host_failover` (defaults: 4 hosts, 100 VMs);
//! `-- --hosts H --vms N` to change; `-- --quick` for 3 hosts and 30 VMs; `-- --no-baseline`
//! skips the 1-VM run; `-- --idle S` makes the idle window S seconds.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Cluster, vm};
use tandem_proto::v1 as pb;

fn arg(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

/// CPU ticks (utime + stime) and RSS in KiB of `pid`.
fn cpu_and_rss(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

/// Starts `hosts` hosts with `n` VMs (VM i prefers host i mod hosts, then the next ones),
/// waits until all run, kills the host holding the number of VMs closest to `n / hosts` and
/// returns (seconds until its VMs ran elsewhere, how many it had, the cluster, the surviving
/// hosts and the name of the killed one).
///
/// The placement is taken as it comes: with many hosts starting at once, a host that joins
/// the lockspace late is seen with a free host lease and its first VMs start on their second
/// choice (failback is manual), so "every VM on its first choice" may never happen.
fn failover(hosts: usize, n: usize) -> (f64, usize, Cluster, Vec<(String, common::Host)>, String) {
    let names: Vec<String> = (1..=hosts).map(|i| format!("h{i}")).collect();
    let vms: Vec<common::VmSpec> = (0..n)
        .map(|i| {
            let order: Vec<&str> = (0..hosts).map(|k| names[(i + k) % hosts].as_str()).collect();
            vm(&format!("vm{i:04}"), 64, 1, &order)
        })
        .collect();
    let c = Cluster::new(hosts, &vms, None);
    let w = c.watch();
    let mut agents: Vec<(String, common::Host)> = names.iter().map(|h| (h.clone(), c.start(h))).collect();
    let mut placed = c.wait_all_running(&w, Duration::from_secs(300), |_| true);
    // Settled: nothing moved for 3 s.
    let settling = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(3));
        let now = w.placed();
        if now == placed {
            break;
        }
        assert!(settling.elapsed() < Duration::from_secs(120), "VMs still moving 2 min after all ran");
        placed = now;
    }
    let share = n.div_ceil(hosts);
    let count = |h: &str| placed.values().filter(|p| *p == h).count();
    let victim = names.iter().min_by_key(|h| (count(h).abs_diff(share), h.to_string())).unwrap().clone();
    let on_victim = count(&victim);
    let k = agents.iter().position(|(h, _)| *h == victim).unwrap();
    let killed = Instant::now();
    agents[k].1.agent.kill();
    c.wait_all_running(&w, Duration::from_secs(300), |p| p.values().all(|h| *h != victim));
    let took = killed.elapsed().as_secs_f64();
    w.assert_never_two(&c);
    drop(w);
    agents.remove(k);
    (took, on_victim, c, agents, victim)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let hosts = arg("--hosts").unwrap_or(if quick { 3 } else { 4 });
    let n = arg("--vms").unwrap_or(if quick { 30 } else { 100 });

    // `--no-baseline`: skip the 1-VM run (when profiling the large one).
    let base = if std::env::args().any(|a| a == "--no-baseline") {
        0.0
    } else {
        let (base, _, c1, a1, _) = failover(hosts, 1);
        drop(a1);
        drop(c1);
        println!("baseline: a host with 1 VM killed -> running elsewhere in {base:.2} s (lease takeover alone)");
        base
    };

    let (took, moved, c, survivors, victim) = failover(hosts, n);
    println!(
        "{n} VMs on {hosts} hosts: the killed host's ({victim}) {moved} VMs ran elsewhere {took:.2} s after the kill \
         ({:.2} s beyond the 1-VM baseline)",
        took - base
    );

    // Status latency, asked of a survivor.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut lat: Vec<f64> = rt.block_on(async {
        let mut client = pb::host_agent_client::HostAgentClient::connect(c.url(&survivors[0].0)).await.unwrap();
        let mut out = Vec::new();
        for _ in 0..500 {
            let t = Instant::now();
            client.get_cluster_status(pb::GetClusterStatusRequest {}).await.unwrap();
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        out
    });
    lat.sort_by(f64::total_cmp);
    println!(
        "GetClusterStatus ({n} VMs): p50 {:.2} ms, p99 {:.2} ms over {} calls",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat.len()
    );

    // Idle cost of each surviving agent over 10 s.
    let tick = 100.0; // USER_HZ on Linux
    let before: Vec<(u64, u64)> = survivors.iter().map(|(_, h)| cpu_and_rss(h.agent.pid())).collect();
    // `--idle S`: a longer idle window (e.g. to attach a profiler to the pids printed).
    let window = arg("--idle").unwrap_or(10) as f64;
    println!(
        "idle window of {window} s starts (agent pids {:?})",
        survivors.iter().map(|(_, h)| h.agent.pid()).collect::<Vec<_>>()
    );
    std::thread::sleep(Duration::from_secs_f64(window));
    for ((_, h), (t0, _)) in survivors.iter().zip(before) {
        let (t1, rss) = cpu_and_rss(h.agent.pid());
        println!(
            "idle agent (pid {}): {:.2} % of a core, RSS {:.1} MiB",
            h.agent.pid(),
            (t1 - t0) as f64 / tick / window * 100.0,
            rss as f64 / 1024.0
        );
    }
}
