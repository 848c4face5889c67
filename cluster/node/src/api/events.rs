//! Server streams: events with lag reporting, shutdown progress; both end
//! when the API server stops, so a graceful stop never waits on a follower.

use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use futures::Stream;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::pb;

/// A boxed server stream.
pub(crate) type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn stopping() -> Status {
    Status::unavailable("the agent's API is shutting down; the stream ends here")
}

/// Milliseconds since the Unix epoch (display only).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The event a subscriber gets instead of the `dropped` events it was too slow for.
pub fn lagged_event(dropped: u64) -> pb::Event {
    pb::Event {
        seq: 0,
        unix_ms: unix_ms(),
        kind: Some(pb::event::Kind::Lagged(pb::Lagged {
            dropped,
            message: format!("lagged, {dropped} events dropped"),
        })),
    }
}

/// Events from `rx`: a lag becomes one `Lagged` event and the stream goes on;
/// the agent closing its sender or `stop` ends the stream with `UNAVAILABLE`.
pub(crate) fn watch(rx: broadcast::Receiver<pb::Event>, stop: CancellationToken) -> ServerStream<pb::Event> {
    Box::pin(futures::stream::unfold(Some((rx, stop)), |state| async move {
        let (mut rx, stop) = state?;
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return Some((Err(stopping()), None)),
            r = rx.recv() => r,
        };
        match next {
            Ok(event) => Some((Ok(event), Some((rx, stop)))),
            Err(RecvError::Lagged(n)) => Some((Ok(lagged_event(n)), Some((rx, stop)))),
            Err(RecvError::Closed) => {
                Some((Err(Status::unavailable("the agent stopped publishing events (it is shutting down)")), None))
            }
        }
    }))
}

/// Shutdown progress from `rx` until the runtime closes it, or until `stop`.
pub(crate) fn progress(
    rx: mpsc::Receiver<pb::ShutdownProgress>,
    stop: CancellationToken,
) -> ServerStream<pb::ShutdownProgress> {
    Box::pin(futures::stream::unfold(Some((rx, stop)), |state| async move {
        let (mut rx, stop) = state?;
        tokio::select! {
            biased;
            _ = stop.cancelled() => Some((Err(stopping()), None)),
            p = rx.recv() => p.map(|p| (Ok(p), Some((rx, stop)))),
        }
    }))
}
