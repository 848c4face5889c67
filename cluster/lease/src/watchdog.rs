//! The hardware watchdog, driven by the guard process (Linux watchdog API,
//! Documentation/watchdog/watchdog-api.rst).
//!
//! The watchdog is the last step of self-fencing ([`crate::fence`]): it resets the machine by
//! `w + K + M` when something survives the guard's SIGKILL (a process in uninterruptible I/O),
//! or when the guard itself cannot run. The guard keeps it alive from each pet of the agent, with
//! a timeout that ends at `dead_by` ([`timeout_for_pet`]); when the agent stops petting, the guard
//! stops too, and the watchdog fires unless the guard could confirm that everything it guards is
//! dead, in which case it disarms it ("magic close": write `V`, then close) so that a clean
//! self-fence does not reboot the machine. An orderly `bye` disarms it as well.
//!
//! The guard owns the device, not the agent: a watchdog kept alive by a process that can be
//! stalled independently of the guard would fire, or not, for the wrong reasons.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `WDIOC_SETTIMEOUT` = `_IOWR('W', 6, int)`: sets the timeout in seconds (and pings).
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;

/// The timeout to program at `now` for a pet with kill deadline `pet_ms`, so that the reset
/// comes after the guard's SIGKILL (at `pet_ms`) and no later than `dead_by = pet_ms + extra_ms`,
/// where `extra_ms = M − grace ≥ 1000` ([`crate::fence::FencePlan::new`] enforces it). Whole
/// seconds, rounded down; `None` when under one second is left (then the guard does not pet:
/// the watchdog fires on its previous setting, which ends no later).
pub fn timeout_for_pet(pet_ms: u64, extra_ms: u64, now_ms: u64) -> Option<u64> {
    let secs = (pet_ms + extra_ms).saturating_sub(now_ms) / 1000;
    (secs >= 1).then_some(secs)
}

/// An open watchdog device.
#[derive(Debug)]
pub struct Watchdog {
    path: PathBuf,
    file: Option<File>,
    /// The device refused `WDIOC_SETTIMEOUT` (not a watchdog driver that supports it): its own
    /// configured timeout applies. Reported once.
    fixed_timeout: bool,
}

impl Watchdog {
    /// Opens (and so arms) the device at `path`.
    pub fn open(path: &Path) -> io::Result<Watchdog> {
        let mut w = Watchdog { path: path.to_path_buf(), file: None, fixed_timeout: false };
        w.reopen()?;
        Ok(w)
    }

    fn reopen(&mut self) -> io::Result<()> {
        if self.file.is_none() {
            self.file = Some(std::fs::OpenOptions::new().write(true).custom_flags(libc::O_CLOEXEC).open(&self.path)?);
        }
        Ok(())
    }

    /// The device.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the device is open (armed).
    pub fn armed(&self) -> bool {
        self.file.is_some()
    }

    /// Keeps the watchdog alive for `timeout_s` more seconds (re-opening it if it was disarmed).
    /// Returns a note to log once when the device does not let its timeout be set.
    pub fn keepalive(&mut self, timeout_s: u64) -> io::Result<Option<String>> {
        self.reopen()?;
        let file = self.file.as_mut().expect("opened above");
        let mut note = None;
        if !self.fixed_timeout {
            let mut secs = timeout_s.min(i32::MAX as u64) as libc::c_int;
            // SAFETY: the fd is open; WDIOC_SETTIMEOUT reads and writes one c_int.
            if unsafe { libc::ioctl(file.as_raw_fd(), WDIOC_SETTIMEOUT as _, &mut secs) } != 0 {
                self.fixed_timeout = true;
                note = Some(format!(
                    "watchdog {}: cannot set its timeout ({}); its own timeout applies and must be at most M - grace",
                    self.path.display(),
                    io::Error::last_os_error()
                ));
            }
        }
        // Any write but `V` is a keepalive.
        file.write_all(b"k")?;
        Ok(note)
    }

    /// Disarms the watchdog: magic close (`V`, then close). Drivers built with `nowayout` keep
    /// running anyway; then only a new keepalive before the timeout avoids the reset.
    pub fn disarm(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.file.take() {
            f.write_all(b"V")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programmed_timeout_ends_between_the_kill_and_dead_by() {
        // Pet at now with a kill deadline 4.5 s ahead and M - grace = 1.5 s: dead_by is 6 s
        // ahead; 6 whole seconds fire exactly then, after the kill.
        assert_eq!(timeout_for_pet(10_000 + 4_500, 1_500, 10_000), Some(6));
        // Rounded down: 6.9 s left gives 6 s, still after the kill at +5.4 s.
        let (pet, extra, now) = (15_400, 1_500, 10_000);
        let t = timeout_for_pet(pet, extra, now).unwrap();
        assert!(now + t * 1000 >= pet && now + t * 1000 <= pet + extra, "{t}");
        // Under a second left: no pet.
        assert_eq!(timeout_for_pet(10_000, 1_500, 10_600), None);
        assert_eq!(timeout_for_pet(10_000, 1_500, 20_000), None);
    }

    #[test]
    fn keepalives_and_magic_close_reach_the_device() {
        // A FIFO stands in for the device: it takes writes, and refuses the ioctl (ENOTTY).
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("watchdog");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let reader = std::thread::spawn({
            let fifo = fifo.clone();
            move || std::fs::read(&fifo).unwrap()
        });
        let mut w = Watchdog::open(&fifo).unwrap();
        assert!(w.armed());
        let note = w.keepalive(5).unwrap();
        assert!(note.is_some_and(|n| n.contains("cannot set its timeout")));
        assert_eq!(w.keepalive(5).unwrap(), None, "reported once");
        w.disarm().unwrap();
        assert!(!w.armed());
        assert_eq!(reader.join().unwrap(), b"kkV");
    }
}
