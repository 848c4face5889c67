//! The monitor scheduler: runs many probes on their intervals.
//!
//! * First runs are spread over each monitor's interval (jittered start);
//!   later runs keep to a fixed grid plus a small per-run jitter, so they
//!   neither drift nor line up.
//! * A global bound on concurrent runs (a semaphore); a run waiting for a
//!   permit does not start its deadline until it has one.
//! * One monitor never runs twice at once: a run that overruns its
//!   interval makes the scheduler skip the grid slots it missed.
//! * `retries`: a failure is *confirmed* (the state changes) only after
//!   that many consecutive non-OK results; a single OK confirms recovery.
//!   Every raw result is still reported.
//! * Monitors can be added, removed, suspended and resumed at run time;
//!   removing, suspending or shutting down cancels an in-flight run (which
//!   kills a running plugin's process group).
//!
//! All timing uses tokio's clock, so tests can run it under
//! `tokio::time::pause()`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{Probe, ProbeResult, RunLimits, Status, run_probe};

/// One monitor to schedule.
#[derive(Debug)]
pub struct MonitorDef {
    /// Unique id, echoed in every event.
    pub id: String,
    /// The probe.
    pub probe: Box<dyn Probe>,
    /// Deadline and warning threshold of each run.
    pub limits: RunLimits,
    /// Time between run starts.
    pub interval: Duration,
    /// Consecutive non-OK results needed to confirm a failure (0 and 1
    /// both mean: the first one).
    pub retries: u32,
}

/// Scheduler-wide settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// At most this many probe runs at once (at least 1).
    pub max_concurrent: usize,
    /// Capacity of the event channel; a full channel makes monitors wait.
    pub event_capacity: usize,
    /// Spread each monitor's first run uniformly over its interval.
    pub start_jitter: bool,
    /// Upper bound of the random delay added to each run (also capped at a
    /// tenth of the interval).
    pub max_run_jitter: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 16,
            event_capacity: 1024,
            start_jitter: true,
            max_run_jitter: Duration::from_millis(500),
        }
    }
}

/// A monitor's confirmed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MonitorState {
    /// No verdict confirmed yet (no OK, and fewer than `retries` failures).
    Pending,
    /// The last result was OK.
    Ok,
    /// Failure confirmed; the status of the latest result.
    Failed(Status),
}

/// One finished run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MonitorEvent {
    /// The monitor's id.
    pub id: String,
    /// The raw result of this run.
    pub result: ProbeResult,
    /// The confirmed state after this run.
    pub state: MonitorState,
    /// `state` differs from the state before this run.
    pub changed: bool,
    /// Non-OK results in a row, including this one.
    pub consecutive_failures: u32,
}

/// Scheduler errors.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// `add` with an id already scheduled.
    #[error("monitor {0:?} is already scheduled; remove it first or pick another id")]
    Duplicate(String),
    /// No monitor with this id.
    #[error("no monitor {0:?} is scheduled")]
    NotFound(String),
    /// A zero interval would spin.
    #[error("monitor {0:?}: the interval must be greater than zero")]
    ZeroInterval(String),
    /// The scheduler was shut down.
    #[error("the scheduler is shut down")]
    ShutDown,
}

/// The retry logic on its own: raw statuses in, confirmed state out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryState {
    threshold: u32,
    consecutive: u32,
    state: MonitorState,
}

impl RetryState {
    /// Starts `Pending`, confirming failures after `retries` non-OK results.
    pub fn new(retries: u32) -> Self {
        Self { threshold: retries.max(1), consecutive: 0, state: MonitorState::Pending }
    }

    /// The confirmed state.
    pub fn state(&self) -> MonitorState {
        self.state
    }

    /// Non-OK results in a row.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Feeds one result; returns whether the confirmed state changed.
    pub fn observe(&mut self, status: Status) -> bool {
        let old = self.state;
        if status == Status::Ok {
            self.consecutive = 0;
            self.state = MonitorState::Ok;
        } else {
            self.consecutive = self.consecutive.saturating_add(1);
            if self.consecutive >= self.threshold {
                self.state = MonitorState::Failed(status);
            }
        }
        self.state != old
    }

    /// Forgets the failure streak (after a suspension: old results are stale).
    pub fn reset_streak(&mut self) {
        self.consecutive = 0;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Suspended,
    Stopped,
}

#[derive(Debug)]
struct Entry {
    ctl: watch::Sender<Control>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct Inner {
    cfg: SchedulerConfig,
    sem: Arc<Semaphore>,
    events: mpsc::Sender<MonitorEvent>,
    monitors: Mutex<Option<HashMap<String, Entry>>>,
}

/// Runs monitors; a cheap clonable handle. Dropping every handle stops all
/// monitors (without waiting); [`Scheduler::shutdown`] stops and waits.
#[derive(Debug, Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

impl Scheduler {
    /// A scheduler and the receiver of its events. Must be called within a
    /// tokio runtime (monitors are tasks).
    pub fn new(cfg: SchedulerConfig) -> (Self, mpsc::Receiver<MonitorEvent>) {
        let (tx, rx) = mpsc::channel(cfg.event_capacity.max(1));
        let sem = Arc::new(Semaphore::new(cfg.max_concurrent.max(1)));
        let inner = Inner { cfg, sem, events: tx, monitors: Mutex::new(Some(HashMap::new())) };
        (Self { inner: Arc::new(inner) }, rx)
    }

    fn with_map<T>(
        &self,
        f: impl FnOnce(&mut HashMap<String, Entry>) -> Result<T, SchedulerError>,
    ) -> Result<T, SchedulerError> {
        let mut g = self.inner.monitors.lock().unwrap_or_else(|p| p.into_inner());
        match g.as_mut() {
            Some(m) => f(m),
            None => Err(SchedulerError::ShutDown),
        }
    }

    /// Starts scheduling `def`.
    pub fn add(&self, def: MonitorDef) -> Result<(), SchedulerError> {
        if def.interval.is_zero() {
            return Err(SchedulerError::ZeroInterval(def.id));
        }
        self.with_map(|m| {
            if m.contains_key(&def.id) {
                return Err(SchedulerError::Duplicate(def.id));
            }
            let (ctl, ctl_rx) = watch::channel(Control::Run);
            let id = def.id.clone();
            let task = tokio::spawn(monitor_loop(
                def,
                self.inner.cfg.clone(),
                self.inner.sem.clone(),
                self.inner.events.clone(),
                ctl_rx,
            ));
            m.insert(id, Entry { ctl, task });
            Ok(())
        })
    }

    /// Stops a monitor, cancelling an in-flight run; returns once its task
    /// has ended (no event for it follows).
    pub async fn remove(&self, id: &str) -> Result<(), SchedulerError> {
        let entry = self.with_map(|m| m.remove(id).ok_or_else(|| SchedulerError::NotFound(id.into())))?;
        stop(entry).await;
        Ok(())
    }

    /// Pauses a monitor: an in-flight run is cancelled and not reported;
    /// no run starts until [`Scheduler::resume`].
    pub fn suspend(&self, id: &str) -> Result<(), SchedulerError> {
        self.set(id, Control::Suspended)
    }

    /// Resumes a suspended monitor: it runs again soon (within the per-run
    /// jitter), with its failure streak reset.
    pub fn resume(&self, id: &str) -> Result<(), SchedulerError> {
        self.set(id, Control::Run)
    }

    fn set(&self, id: &str, c: Control) -> Result<(), SchedulerError> {
        self.with_map(|m| {
            let e = m.get(id).ok_or_else(|| SchedulerError::NotFound(id.into()))?;
            e.ctl.send_replace(c);
            Ok(())
        })
    }

    /// The scheduled monitor ids, sorted.
    pub fn ids(&self) -> Vec<String> {
        let mut v = self.with_map(|m| Ok(m.keys().cloned().collect::<Vec<_>>())).unwrap_or_default();
        v.sort();
        v
    }

    /// Stops every monitor, cancelling in-flight runs, and waits for all of
    /// them. Later calls to `add` fail with [`SchedulerError::ShutDown`].
    pub async fn shutdown(&self) {
        let map = self.inner.monitors.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(map) = map else { return };
        for e in map.values() {
            e.ctl.send_replace(Control::Stopped);
        }
        for (_, e) in map {
            stop(e).await;
        }
    }
}

async fn stop(e: Entry) {
    e.ctl.send_replace(Control::Stopped);
    if let Err(err) = e.task.await
        && err.is_panic()
    {
        tracing::error!("a monitor task panicked: {err}");
    }
}

/// A random delay in `[0, max)`.
fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    max.mul_f64(rand::rng().random_range(0.0..1.0))
}

/// Resolves when the control leaves `Run` (or its sender is gone).
async fn until_not_running(ctl: &mut watch::Receiver<Control>) {
    loop {
        if *ctl.borrow_and_update() != Control::Run {
            return;
        }
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

async fn monitor_loop(
    def: MonitorDef,
    cfg: SchedulerConfig,
    sem: Arc<Semaphore>,
    events: mpsc::Sender<MonitorEvent>,
    mut ctl: watch::Receiver<Control>,
) {
    let MonitorDef { id, probe, limits, interval, retries } = def;
    let run_jitter_max = cfg.max_run_jitter.min(interval / 10);
    let mut retry = RetryState::new(retries);
    // `slot` is the grid point of the next run; `next` adds its jitter.
    let mut slot = Instant::now() + if cfg.start_jitter { jitter(interval) } else { Duration::ZERO };
    let mut next = slot;
    'outer: loop {
        // Wait for the next slot, honouring suspend/stop meanwhile.
        loop {
            let c = *ctl.borrow_and_update();
            match c {
                Control::Stopped => return,
                Control::Suspended => {
                    if ctl.changed().await.is_err() {
                        return;
                    }
                    if *ctl.borrow() == Control::Run {
                        retry.reset_streak();
                        slot = Instant::now();
                        next = slot + jitter(run_jitter_max);
                    }
                    continue;
                }
                Control::Run => {}
            }
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                r = ctl.changed() => if r.is_err() { return },
            }
        }
        let permit = tokio::select! {
            p = sem.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = until_not_running(&mut ctl) => continue 'outer,
        };
        let result = tokio::select! {
            r = run_probe(probe.as_ref(), limits) => r,
            // Dropping the run future cancels the probe (plugins get their group killed).
            _ = until_not_running(&mut ctl) => continue 'outer,
        };
        drop(permit);
        let changed = retry.observe(result.status);
        let ev = MonitorEvent {
            id: id.clone(),
            result,
            state: retry.state(),
            changed,
            consecutive_failures: retry.consecutive_failures(),
        };
        tokio::select! {
            r = events.send(ev) => if r.is_err() { return },
            _ = until_not_running(&mut ctl) => continue 'outer,
        }
        // Next grid slot in the future: slots missed by an overrun are skipped.
        slot += interval;
        let now = Instant::now();
        if slot <= now {
            let behind = now - slot;
            let skip = (behind.as_nanos() / interval.as_nanos()) as u32 + 1;
            slot += interval * skip;
        }
        next = slot + jitter(run_jitter_max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_confirm_failure_and_recovery_is_immediate() {
        let mut r = RetryState::new(3);
        assert!(r.observe(Status::Ok));
        assert_eq!(r.state(), MonitorState::Ok);
        assert!(!r.observe(Status::Critical));
        assert!(!r.observe(Status::Critical));
        assert_eq!(r.state(), MonitorState::Ok);
        assert!(r.observe(Status::Critical));
        assert_eq!(r.state(), MonitorState::Failed(Status::Critical));
        assert!(r.observe(Status::Warning), "severity follows the latest result once confirmed");
        assert!(r.observe(Status::Ok));
        assert_eq!(r.consecutive_failures(), 0);
    }

    #[test]
    fn zero_retries_means_first_failure() {
        let mut r = RetryState::new(0);
        assert!(r.observe(Status::Unknown));
        assert_eq!(r.state(), MonitorState::Failed(Status::Unknown));
    }
}
