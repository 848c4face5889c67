//! The node API (`tandem.v1.GuestAgent`, served by both agents; see docs/api.md).
//!
//! The API layer owns transport, security and request validation; what the
//! calls *do* belongs to the runtime, behind the [`Control`] trait. The
//! server also serves `grpc.health.v1.Health` (SERVING while it runs) and
//! gRPC reflection on the same port.
//!
//! ```no_run
//! # async fn demo(config: tandem_config::ClusterConfig, control: std::sync::Arc<dyn tandem_node::api::Control>) {
//! use tandem_node::api::ApiServer;
//! let server = ApiServer::new(&config.api, control).unwrap();
//! let bound = server.bind().await.unwrap();
//! println!("API on {}", bound.local_addr());
//! bound.serve(async { let _ = tokio::signal::ctrl_c().await; }).await.unwrap();
//! # }
//! ```

mod access;
pub mod convert;
mod events;
pub mod peer;
mod server;
mod service;

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{broadcast, mpsc};

pub use access::{Access, Caller};
pub use events::lagged_event;
pub use server::{ApiError, ApiServer, BoundApi, DEFAULT_SHUTDOWN_GRACE, ExtraService};
pub use tandem_config::ApiRole;
/// The generated messages and services of package `tandem.v1`.
pub use tandem_proto::v1 as pb;

/// A boxed future, as [`Control`]'s methods return (the trait stays object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the API asks of the agent's runtime. The runtime implements it; the
/// API server validates and authorizes each request before calling it, so an
/// implementation sees only well-formed requests from permitted callers.
pub trait Control: Send + Sync + 'static {
    /// The cluster as this node sees it (`GetStatus`).
    fn status(&self) -> BoxFuture<'_, Result<pb::GuestStatus, ControlError>>;

    /// An operator command given to this node: assign it the next cluster-wide
    /// sequence number, deliver it to every agent (this one included), and
    /// return once it is accepted. Group and node names are not yet checked
    /// against the configuration: answer [`ControlError::UnknownGroup`] /
    /// [`ControlError::UnknownNode`] for names that do not exist.
    fn operator(&self, request: OperatorRequest) -> BoxFuture<'_, Result<OperatorAck, ControlError>>;

    /// A command a peer agent forwards (`DeliverOperator`), with the
    /// sequence number the peer assigned. Duplicates must be harmless.
    fn deliver(&self, seq: u64, request: OperatorRequest) -> BoxFuture<'_, Result<(), ControlError>>;

    /// Begin a planned shutdown of this node: stop or move every group as its
    /// policy allows. The receiver yields progress and ends with exactly one
    /// `ShutdownDone`; dropping it must not cancel the shutdown.
    fn prepare_shutdown(&self) -> BoxFuture<'_, Result<mpsc::Receiver<pb::ShutdownProgress>, ControlError>>;

    /// Puts this node in standby (`Some`) or brings it back online (`None`) (`SetStandby`;
    /// the API has checked that the request names this node). Returns once the change is
    /// persisted and applied. The default refuses: an implementation without standby.
    fn set_standby(&self, mode: Option<tandem_engine::StandbyMode>) -> BoxFuture<'_, Result<(), ControlError>> {
        let _ = mode;
        Box::pin(async { Err(ControlError::NotPossible("this agent does not support standby".into())) })
    }

    /// A new subscription to the agent's events (`WatchEvents`). The runtime
    /// sends with `broadcast::Sender::send`, which never waits for subscribers;
    /// the API turns a lagging subscriber's missed events into a `Lagged` event.
    fn subscribe(&self) -> broadcast::Receiver<pb::Event>;

    /// Publishes an event that comes from outside the engine (the host agent's guest links)
    /// on the same feed as the node's own, with the next sequence number. The default
    /// publishes nothing.
    fn publish(&self, _kind: pb::event::Kind) {}
}

/// An operator command, by names (as operators and peers give them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRequest {
    /// The group the command is about.
    pub group: String,
    /// What to do with it.
    pub action: OperatorAction,
}

/// What an operator asks for; mirrors [`tandem_engine::OperatorCommand`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorAction {
    /// Run the group on its best node (clears a move pin).
    Start,
    /// Stop the group everywhere.
    Stop,
    /// Run the group on the named node and pin it there; without a name, on the best other
    /// eligible node by the group's placement (the runtime picks it and forwards the move
    /// with that node named, so peers always receive a target).
    Move {
        /// The target node's name, or `None` for the best other node.
        to: Option<String>,
    },
    /// Clear restart and failover counters and failure marks.
    Reset,
    /// Ignore the group's monitor failures on this node.
    SuspendMonitoring,
    /// Act on the group's monitor failures again.
    ResumeMonitoring,
}

/// An accepted operator command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperatorAck {
    /// The command's cluster-wide sequence number.
    pub seq: u64,
}

/// Why the runtime refused a request. Each variant maps to one gRPC code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No group of that name (`NOT_FOUND`).
    #[error("no group named {0:?} in this cluster; `tandemctl status` lists the groups")]
    UnknownGroup(String),
    /// No node of that name (`NOT_FOUND`).
    #[error("no node named {0:?} in this cluster; `tandemctl status` lists the nodes")]
    UnknownNode(String),
    /// The request is malformed or names something it may not (`INVALID_ARGUMENT`),
    /// e.g. a move to a node the group may not run on.
    #[error("{0}")]
    InvalidArgument(String),
    /// This node's partition has no quorum (`FAILED_PRECONDITION`).
    #[error("this node has no quorum: operator commands are refused until its partition regains quorum")]
    NoQuorum,
    /// The request is valid but cannot be carried out now (`FAILED_PRECONDITION`); says why.
    #[error("{0}")]
    NotPossible(String),
    /// The agent is shutting down (`UNAVAILABLE`): retry on another node.
    #[error("the agent is shutting down; ask another node of the cluster")]
    ShuttingDown,
    /// Something failed inside the agent (`INTERNAL`); the message says what.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ControlError {
    /// The gRPC code this error is reported with.
    pub fn code(&self) -> tonic::Code {
        match self {
            ControlError::UnknownGroup(_) | ControlError::UnknownNode(_) => tonic::Code::NotFound,
            ControlError::InvalidArgument(_) => tonic::Code::InvalidArgument,
            ControlError::NoQuorum | ControlError::NotPossible(_) => tonic::Code::FailedPrecondition,
            ControlError::ShuttingDown => tonic::Code::Unavailable,
            ControlError::Internal(_) => tonic::Code::Internal,
        }
    }
}

impl From<ControlError> for tonic::Status {
    fn from(e: ControlError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
