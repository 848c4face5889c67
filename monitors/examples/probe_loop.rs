//! Runs one probe spec N times on a single-threaded runtime, for syscall
//! counts (`strace -c`) and profiles (`perf`) of one probe in isolation.
//!
//! `cargo run --release -p tandem-monitors --example probe_loop -- serve-smtp`
//! starts OpenSMTPD and dovecot submission (tandem-testkit), prints the
//! targets and stops both at end of input (Ctrl-D, or close its stdin);
//! `probe_loop TARGET [N]` runs the probe N times (default 1000) after 20
//! warm-up runs and prints the CPU per probe (getrusage).

use std::time::Duration;

use tandem_monitors::{ProbeSpec, RunLimits, Status, build_probe, run_probe};

fn cpu() -> Duration {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct it is given.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    // SAFETY: initialised above (zeroed, then filled).
    let u = unsafe { u.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("serve-smtp") {
        let smtpd = tandem_testkit::smtpd::Smtpd::start();
        println!("OpenSMTPD smtp://127.0.0.1:{}", smtpd.port);
        println!("dovecot submission (PIPELINING) smtp://127.0.0.1:{}", smtpd.submission_port);
        // Until stdin closes; dropping the fixture stops the servers.
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
        return;
    }
    let target = args.first().expect("usage: probe_loop TARGET [N] | serve-smtp").clone();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let probe = build_probe(&ProbeSpec { target, ..ProbeSpec::default() }).expect("probe spec");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        for _ in 0..20 {
            let r = run_probe(probe.as_ref(), RunLimits::default()).await;
            assert_eq!(r.status, Status::Ok, "{}", r.reason);
        }
        let c0 = cpu();
        for _ in 0..n {
            let r = run_probe(probe.as_ref(), RunLimits::default()).await;
            assert_eq!(r.status, Status::Ok, "{}", r.reason);
        }
        let per = (cpu() - c0).as_secs_f64() * 1e6 / n as f64;
        println!("{n} probes, {per:.1} µs CPU per probe");
    });
}
