//! The hard deadline every probe step runs under.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::{FailureClass, ProbeFailure};

/// The instant by which a probe must have its verdict. Copy it into every
/// step; each step fails with [`FailureClass::Timeout`] naming the stage
/// it was waiting in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    /// A deadline `d` from now.
    pub fn after(d: Duration) -> Self {
        Self { at: Instant::now() + d }
    }

    /// The instant itself.
    pub fn instant(&self) -> Instant {
        self.at
    }

    /// Time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Runs `fut` until the deadline; on expiry the failure says which
    /// `stage` was waiting (e.g. "waiting for the 220 greeting").
    pub async fn run<T>(&self, stage: &str, fut: impl Future<Output = T>) -> Result<T, ProbeFailure> {
        match tokio::time::timeout_at(self.at, fut).await {
            Ok(v) => Ok(v),
            Err(_) => Err(ProbeFailure::critical(FailureClass::Timeout, format!("timeout {stage}"))),
        }
    }
}
