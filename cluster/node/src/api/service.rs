//! `tandem.v1.GuestAgent`: authorize, validate, hand over to [`Control`].

use std::sync::Arc;

use tandem_config::ApiRole;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::info;

use super::events::{self, ServerStream};
use super::pb::guest_agent_server::GuestAgent;
use super::{Access, Caller, Control, ControlError, OperatorAction, OperatorRequest, pb};

pub(crate) struct GuestAgentService {
    pub(crate) control: Arc<dyn Control>,
    pub(crate) access: Arc<Access>,
    pub(crate) stop: CancellationToken,
}

fn group_name(call: &str, group: String) -> Result<String, Status> {
    if group.trim().is_empty() {
        return Err(Status::invalid_argument(format!("{call}: `group` is empty; give the name of a group")));
    }
    Ok(group)
}

impl OperatorRequest {
    /// The request as peers forward it (`DeliverOperator`).
    pub fn to_proto(&self) -> pb::OperatorCommand {
        use pb::operator_command::Command as C;
        let g = self.group.clone();
        let command = match &self.action {
            OperatorAction::Start => C::StartGroup(g),
            OperatorAction::Stop => C::StopGroup(g),
            OperatorAction::Move { to } => {
                C::MoveGroup(pb::MoveGroupRequest { group: g, to: to.clone().unwrap_or_default() })
            }
            OperatorAction::Reset => C::ResetGroup(g),
            OperatorAction::SuspendMonitoring => C::SuspendMonitoring(g),
            OperatorAction::ResumeMonitoring => C::ResumeMonitoring(g),
        };
        pb::OperatorCommand { command: Some(command) }
    }

    /// The request a peer forwarded; `InvalidArgument` when it is empty or names nothing.
    pub fn from_proto(command: pb::OperatorCommand) -> Result<Self, ControlError> {
        use pb::operator_command::Command as C;
        let (group, action) = match command.command {
            None => return Err(ControlError::InvalidArgument("the operator command is empty".into())),
            Some(C::StartGroup(g)) => (g, OperatorAction::Start),
            Some(C::StopGroup(g)) => (g, OperatorAction::Stop),
            Some(C::MoveGroup(m)) => (m.group, OperatorAction::Move { to: Some(m.to) }),
            Some(C::ResetGroup(g)) => (g, OperatorAction::Reset),
            Some(C::SuspendMonitoring(g)) => (g, OperatorAction::SuspendMonitoring),
            Some(C::ResumeMonitoring(g)) => (g, OperatorAction::ResumeMonitoring),
        };
        if group.trim().is_empty() {
            return Err(ControlError::InvalidArgument("the operator command names no group".into()));
        }
        // The node that accepted a move without a target forwards it with the node it picked.
        if let OperatorAction::Move { to } = &action
            && to.as_deref().is_none_or(|t| t.trim().is_empty())
        {
            return Err(ControlError::InvalidArgument("the move names no target node".into()));
        }
        Ok(OperatorRequest { group, action })
    }
}

impl GuestAgentService {
    async fn operator(&self, caller: Caller, request: OperatorRequest) -> Result<Response<pb::OperatorAck>, Status> {
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        let ack = self.control.operator(request.clone()).await?;
        info!(%caller, group = %request.group, action = ?request.action, seq = ack.seq, "operator command accepted");
        Ok(Response::new(pb::OperatorAck { seq: ack.seq }))
    }

    async fn group_command(
        &self,
        call: &str,
        req: Request<pb::GroupRequest>,
        action: OperatorAction,
    ) -> Result<Response<pb::OperatorAck>, Status> {
        // Authorize before looking at the arguments: strangers learn nothing.
        let caller = self.access.authorize(&req, ApiRole::Operator, call)?;
        let group = group_name(call, req.into_inner().group)?;
        self.operator(caller, OperatorRequest { group, action }).await
    }
}

#[tonic::async_trait]
impl GuestAgent for GuestAgentService {
    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> Result<Response<pb::GuestStatus>, Status> {
        self.access.authorize(&req, ApiRole::Viewer, "GetStatus")?;
        Ok(Response::new(self.control.status().await?))
    }

    async fn start_group(&self, req: Request<pb::GroupRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        self.group_command("StartGroup", req, OperatorAction::Start).await
    }

    async fn stop_group(&self, req: Request<pb::GroupRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        self.group_command("StopGroup", req, OperatorAction::Stop).await
    }

    async fn move_group(&self, req: Request<pb::MoveGroupRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        let caller = self.access.authorize(&req, ApiRole::Operator, "MoveGroup")?;
        let pb::MoveGroupRequest { group, to } = req.into_inner();
        let group = group_name("MoveGroup", group)?;
        // An empty `to`: the best other eligible node, picked by the agent that takes the call.
        let to = Some(to).filter(|t| !t.trim().is_empty());
        self.operator(caller, OperatorRequest { group, action: OperatorAction::Move { to } }).await
    }

    async fn reset_group(&self, req: Request<pb::GroupRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        self.group_command("ResetGroup", req, OperatorAction::Reset).await
    }

    async fn suspend_monitoring(&self, req: Request<pb::GroupRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        self.group_command("SuspendMonitoring", req, OperatorAction::SuspendMonitoring).await
    }

    async fn resume_monitoring(&self, req: Request<pb::GroupRequest>) -> Result<Response<pb::OperatorAck>, Status> {
        self.group_command("ResumeMonitoring", req, OperatorAction::ResumeMonitoring).await
    }

    type PrepareShutdownStream = ServerStream<pb::ShutdownProgress>;

    async fn prepare_shutdown(
        &self,
        req: Request<pb::PrepareShutdownRequest>,
    ) -> Result<Response<Self::PrepareShutdownStream>, Status> {
        let caller = self.access.authorize(&req, ApiRole::Host, "PrepareShutdown")?;
        info!(%caller, "planned shutdown requested");
        let rx = self.control.prepare_shutdown().await?;
        Ok(Response::new(events::progress(rx, self.stop.clone())))
    }

    type WatchEventsStream = ServerStream<pb::Event>;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.access.authorize(&req, ApiRole::Viewer, "WatchEvents")?;
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        Ok(Response::new(events::watch(self.control.subscribe(), self.stop.clone())))
    }

    async fn set_standby(
        &self,
        req: Request<pb::SetStandbyRequest>,
    ) -> Result<Response<pb::SetStandbyResponse>, Status> {
        let caller = self.access.authorize(&req, ApiRole::Operator, "SetStandby")?;
        if self.stop.is_cancelled() {
            return Err(ControlError::ShuttingDown.into());
        }
        let r = req.into_inner();
        let mode = match (r.standby, r.mode()) {
            (false, _) => None,
            (true, pb::StandbyMode::Move) => Some(tandem_engine::StandbyMode::Move),
            (true, pb::StandbyMode::Park) => Some(tandem_engine::StandbyMode::Park),
            (true, pb::StandbyMode::Unspecified) => {
                return Err(Status::invalid_argument("SetStandby: give `mode` (MOVE or PARK) when `standby` is true"));
            }
        };
        let status = self.control.status().await?;
        if !r.node.is_empty() && r.node != status.node {
            if !status.nodes.iter().any(|n| n.name == r.node) {
                return Err(ControlError::UnknownNode(r.node).into());
            }
            // Each node persists its own standby: it must hear the request itself.
            return Err(ControlError::NotPossible(format!(
                "SetStandby: this is node {}, not {}; send the request to {}'s own API",
                status.node, r.node, r.node
            ))
            .into());
        }
        self.control.set_standby(mode).await?;
        info!(%caller, node = %status.node, ?mode, "standby changed");
        Ok(Response::new(pb::SetStandbyResponse { node: status.node }))
    }

    async fn deliver_operator(
        &self,
        req: Request<pb::DeliverOperatorRequest>,
    ) -> Result<Response<pb::DeliverOperatorResponse>, Status> {
        self.access.authorize(&req, ApiRole::Peer, "DeliverOperator")?;
        let pb::DeliverOperatorRequest { seq, command } = req.into_inner();
        if seq == 0 {
            return Err(Status::invalid_argument("DeliverOperator: `seq` must be positive"));
        }
        let command = command.ok_or_else(|| Status::invalid_argument("DeliverOperator: no `command`"))?;
        let request = OperatorRequest::from_proto(command)?;
        self.control.deliver(seq, request).await?;
        Ok(Response::new(pb::DeliverOperatorResponse {}))
    }
}
