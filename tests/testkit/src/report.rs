//! Failover times measured by the end-to-end tests, collected in one report file.
//!
//! `cargo test` shows a passing test's stderr only with `--nocapture`, so each measurement
//! is also appended, one line per measurement, to `<target dir>/failover-report.txt`, which
//! `scripts/test.sh` prints at the end of the run (and clears before it). The target dir is
//! found from the test binary's own path (`<target>/<profile>/deps/<binary>`), so it follows
//! `CARGO_TARGET_DIR`; `TANDEM_FAILOVER_REPORT` names another file.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// The report file: `TANDEM_FAILOVER_REPORT`, or `failover-report.txt` in the target dir.
pub fn report_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TANDEM_FAILOVER_REPORT") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    // <target>/<profile>/deps/<binary>
    let target = exe.parent()?.parent()?.parent()?;
    Some(target.join("failover-report.txt"))
}

/// The test binary's name without cargo's hash suffix (`e2e_netns-0123abcd` → `e2e_netns`).
fn binary() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe.as_ref().and_then(|p| p.file_stem()).map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    without_hash(&stem).to_string()
}

fn without_hash(stem: &str) -> &str {
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => name,
        _ => stem,
    }
}

/// Records one measured failover: `<binary>::<test>: failover <ms> ms (<what>)`, on stderr
/// and appended to the report file. `what` says what was measured, from which event to which
/// (e.g. "SIGKILL of the agent and postgres until the first insert on the peer").
pub fn failover(test: &str, took: Duration, what: &str) {
    let line = format!("{}::{test}: failover {} ms ({what})\n", binary(), took.as_millis());
    eprint!("{line}");
    let Some(path) = report_path() else { return };
    // One write per line with O_APPEND: lines of parallel tests do not interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot append to the failover report {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_binary_without_cargos_hash_and_reports_into_the_target_dir() {
        assert_eq!(without_hash("e2e_netns-0123456789abcdef"), "e2e_netns");
        assert_eq!(without_hash("e2e-netns"), "e2e-netns");
        assert_eq!(without_hash("plain"), "plain");
        if std::env::var_os("TANDEM_FAILOVER_REPORT").is_none() {
            let p = report_path().unwrap();
            // This test binary lives in <target>/<profile>/deps.
            let exe = std::env::current_exe().unwrap();
            assert!(exe.starts_with(p.parent().unwrap()), "{} not under {}", exe.display(), p.display());
            assert_eq!(p.file_name().unwrap(), "failover-report.txt");
        }
    }
}
