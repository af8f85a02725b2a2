//! Rank 0's gRPC control service (`proto/control.proto`) and the client
//! the other ranks use.
//!
//! - [`Coordinator`]: the group's state on rank 0: the barriers (which ranks
//!   have arrived at which [`Stage`]), the step streams to ranks 1..N, and
//!   whether the group is broken (a rank's stream closed). It is the
//!   [`PlanSink`] rank 0's decode loop hands every step's plan to.
//! - [`ControlService`]: the tonic service over a coordinator, with the
//!   group-token check in front ([`serve`]), and tonic-health beside it.
//! - [`ControlClient`]: joins a barrier with retries until a deadline, and
//!   opens the step stream, presenting the group token on every call.
//! - [`plan_to_proto`] and [`plan_from_proto`]: a step's wire form.
//!
//! With the shard's TLS material, the service is TLS and the clients accept
//! only rank 0's certificate from the shard's CA; the token check is the
//! same either way. Rank 0 refuses callers without the token (UNAUTHENTICATED), callers of
//! another epoch, model or group shape (FAILED_PRECONDITION), and joins
//! after the group has formed (ABORTED: an old incarnation's rank 0 tells a
//! restarted rank to come back to the next one).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use crate::engine::batch::{Admit, Feed, PlanSink, Reuse, Save, StepPlan};
use crate::engine::sampling::SamplingParams;
use crate::tls::TlsMaterial;

/// Generated messages, client and server of `tandem.control.v1`.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod pb {
    tonic::include_proto!("tandem.control.v1");
}

pub use pb::Stage;

/// Steps a rank's stream may hold unread before rank 0 gives up on it.
const STEP_BACKLOG: usize = 256;

/// Metadata key of the group token.
const AUTHORIZATION: &str = "authorization";

/// The group a rank belongs to; every field must match rank 0's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupIdentity {
    /// Deployment name.
    pub deployment: String,
    /// Epoch.
    pub epoch: i64,
    /// Ranks in the group.
    pub world_size: i32,
    /// Model ID.
    pub model: String,
    /// Model revision.
    pub revision: String,
}

impl GroupIdentity {
    /// The message a rank sends.
    pub fn member(&self, rank: i32) -> pb::Member {
        pb::Member {
            deployment: self.deployment.clone(),
            epoch: self.epoch,
            rank,
            world_size: self.world_size,
            model: self.model.clone(),
            revision: self.revision.clone(),
        }
    }

    /// Why `member` does not belong to this group, if it does not.
    pub fn mismatch(&self, m: &pb::Member) -> Option<String> {
        if m.deployment != self.deployment {
            return Some(format!(
                "rank {} belongs to deployment `{}`, rank 0 to `{}`",
                m.rank, m.deployment, self.deployment
            ));
        }
        if m.epoch != self.epoch {
            return Some(format!(
                "rank {} is of epoch {}, rank 0 runs epoch {}",
                m.rank, m.epoch, self.epoch
            ));
        }
        if m.model != self.model || m.revision != self.revision {
            return Some(format!(
                "rank {} runs model {}@{}, rank 0 runs {}@{}",
                m.rank, m.model, m.revision, self.model, self.revision
            ));
        }
        if m.world_size != self.world_size {
            return Some(format!(
                "rank {} expects {} ranks, rank 0 expects {}",
                m.rank, m.world_size, self.world_size
            ));
        }
        if m.rank < 1 || m.rank >= self.world_size {
            return Some(format!(
                "rank {} is not a remote rank of a group of {}",
                m.rank, self.world_size
            ));
        }
        None
    }
}

/// Why a barrier did not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    /// Some ranks did not arrive in time.
    #[error("ranks {missing:?} did not reach the {stage} barrier within {waited:?}")]
    Timeout {
        /// The stage.
        stage: &'static str,
        /// Ranks missing when the wait ended.
        missing: Vec<i32>,
        /// How long the caller waited.
        waited: Duration,
    },
    /// The group has already formed; no rank can join it any more.
    #[error("the group of epoch {epoch} has already formed")]
    AlreadyFormed {
        /// The group's epoch.
        epoch: i64,
    },
    /// A rank arrived at the ready barrier without passing the connect one.
    #[error("rank {rank} skipped the connect barrier")]
    OutOfOrder {
        /// The rank.
        rank: i32,
    },
    /// The group broke while waiting.
    #[error("the group broke: {0}")]
    Broken(String),
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Connect => "connect",
        Stage::Ready => "ready",
        Stage::Unspecified => "unspecified",
    }
}

#[derive(Debug, Default)]
struct State {
    connect: BTreeSet<i32>,
    ready: BTreeSet<i32>,
    /// Step streams to ranks 1..N.
    streams: BTreeMap<i32, mpsc::Sender<Result<pb::Step, Status>>>,
    /// Both barriers opened.
    formed: bool,
    /// Why the group broke, once it has.
    broken: Option<String>,
}

/// The group's state on rank 0.
#[derive(Debug)]
pub struct Coordinator {
    identity: GroupIdentity,
    barrier_timeout: Duration,
    state: Mutex<State>,
    /// Bumped on every change, to wake barrier waiters.
    changes: watch::Sender<u64>,
    /// `Some(reason)` once the group is broken.
    broken: watch::Sender<Option<String>>,
}

impl Coordinator {
    /// A coordinator for `identity`; barriers wait `barrier_timeout`.
    pub fn new(identity: GroupIdentity, barrier_timeout: Duration) -> Arc<Coordinator> {
        Arc::new(Coordinator {
            identity,
            barrier_timeout,
            state: Mutex::new(State::default()),
            changes: watch::channel(0).0,
            broken: watch::channel(None).0,
        })
    }

    /// The group's identity.
    pub fn identity(&self) -> &GroupIdentity {
        &self.identity
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic elsewhere; the data is still a set
        // of ranks, so carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits at the barrier of `stage` until every rank is there.
    pub async fn arrive(&self, rank: i32, stage: Stage) -> Result<Vec<i32>, BarrierError> {
        {
            let mut s = self.lock();
            if let Some(reason) = &s.broken {
                return Err(BarrierError::Broken(reason.clone()));
            }
            if s.formed {
                return Err(BarrierError::AlreadyFormed {
                    epoch: self.identity.epoch,
                });
            }
            match stage {
                Stage::Ready if !s.connect.contains(&rank) => {
                    return Err(BarrierError::OutOfOrder { rank });
                }
                Stage::Ready => {
                    s.ready.insert(rank);
                }
                _ => {
                    s.connect.insert(rank);
                }
            }
        }
        self.changed();
        // Leave the barrier if this wait is abandoned (the caller went away).
        let mut guard = Arrival {
            coordinator: self,
            rank,
            stage,
            done: false,
        };
        let deadline = Instant::now() + self.barrier_timeout;
        let mut changes = self.changes.subscribe();
        loop {
            {
                let mut s = self.lock();
                if let Some(reason) = &s.broken {
                    return Err(BarrierError::Broken(reason.clone()));
                }
                let set = match stage {
                    Stage::Ready => &s.ready,
                    _ => &s.connect,
                };
                if set.len() >= usize::try_from(self.identity.world_size).unwrap_or(0) {
                    let ranks: Vec<i32> = set.iter().copied().collect();
                    if stage == Stage::Ready {
                        s.formed = true;
                    }
                    guard.done = true;
                    return Ok(ranks);
                }
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    let s = self.lock();
                    let set = match stage {
                        Stage::Ready => &s.ready,
                        _ => &s.connect,
                    };
                    let missing = (0..self.identity.world_size)
                        .filter(|r| !set.contains(r))
                        .collect();
                    return Err(BarrierError::Timeout {
                        stage: stage_name(stage),
                        missing,
                        waited: self.barrier_timeout,
                    });
                }
            }
        }
    }

    /// Registers rank `rank`'s step stream.
    fn open_stream(&self, rank: i32) -> Result<mpsc::Receiver<Result<pb::Step, Status>>, Status> {
        let mut s = self.lock();
        if let Some(reason) = &s.broken {
            return Err(Status::aborted(format!("the group broke: {reason}")));
        }
        if s.formed {
            return Err(Status::aborted(format!(
                "the group of epoch {} has already formed",
                self.identity.epoch
            )));
        }
        if !s.connect.contains(&rank) {
            return Err(Status::failed_precondition(format!(
                "rank {rank} opened its step stream before the connect barrier"
            )));
        }
        let (tx, rx) = mpsc::channel(STEP_BACKLOG);
        s.streams.insert(rank, tx);
        Ok(rx)
    }

    /// Hands `step` to every other rank, in the order steps are run. Never
    /// blocks: rank 0 can be at most a step or two ahead of the others (the
    /// collectives hold it back), so a full stream means a rank stopped
    /// following, and the group is broken.
    pub fn send_step(&self, step: pb::Step) -> Result<(), String> {
        let streams: Vec<(i32, mpsc::Sender<Result<pb::Step, Status>>)> = {
            let s = self.lock();
            if let Some(reason) = &s.broken {
                return Err(reason.clone());
            }
            s.streams.iter().map(|(r, tx)| (*r, tx.clone())).collect()
        };
        let expected = usize::try_from(self.identity.world_size - 1).unwrap_or(0);
        if streams.len() < expected {
            let reason = format!(
                "only {} of {} ranks hold a step stream",
                streams.len(),
                expected
            );
            self.mark_broken(reason.clone());
            return Err(reason);
        }
        for (rank, tx) in streams {
            let reason = match tx.try_send(Ok(step.clone())) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    format!("rank {rank} stopped following ({STEP_BACKLOG} steps behind rank 0)")
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    format!("rank {rank} left the group")
                }
            };
            self.mark_broken(reason.clone());
            return Err(reason);
        }
        Ok(())
    }

    /// Records that the group can no longer run steps, and why.
    pub fn mark_broken(&self, reason: String) {
        let first = {
            let mut s = self.lock();
            if s.broken.is_none() {
                s.broken = Some(reason.clone());
                // Ranks still connected learn it when their stream ends.
                s.streams.clear();
                true
            } else {
                false
            }
        };
        if first {
            tracing::warn!(%reason, "the group is broken");
            self.broken.send_replace(Some(reason));
            self.changed();
        }
    }

    /// Resolves with the reason once the group is broken.
    pub async fn wait_broken(&self) -> String {
        let mut rx = self.broken.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                return "the coordinator is gone".into();
            }
        }
    }

    /// Watches the step streams: the first one to close breaks the group.
    /// Runs until then.
    pub async fn watch_streams(self: Arc<Self>) {
        let streams: Vec<(i32, mpsc::Sender<Result<pb::Step, Status>>)> = {
            let s = self.lock();
            s.streams.iter().map(|(r, tx)| (*r, tx.clone())).collect()
        };
        if streams.is_empty() {
            return;
        }
        let closed = streams.into_iter().map(|(rank, tx)| {
            Box::pin(async move {
                tx.closed().await;
                rank
            })
        });
        let (rank, _, _) = futures::future::select_all(closed).await;
        self.mark_broken(format!(
            "rank {rank} left the group (its step stream closed)"
        ));
    }
}

/// A rank's place at a barrier, given up if the wait is abandoned.
struct Arrival<'a> {
    coordinator: &'a Coordinator,
    rank: i32,
    stage: Stage,
    done: bool,
}

impl Drop for Arrival<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        {
            let mut s = self.coordinator.lock();
            if s.formed {
                return;
            }
            match self.stage {
                Stage::Ready => s.ready.remove(&self.rank),
                _ => s.connect.remove(&self.rank),
            };
        }
        self.coordinator.changed();
    }
}

/// The tonic service over a [`Coordinator`].
#[derive(Debug, Clone)]
pub struct ControlService {
    coordinator: Arc<Coordinator>,
}

impl ControlService {
    /// A service for `coordinator`.
    pub fn new(coordinator: Arc<Coordinator>) -> ControlService {
        ControlService { coordinator }
    }

    fn check(&self, member: Option<&pb::Member>) -> Result<i32, Status> {
        let member = member.ok_or_else(|| Status::invalid_argument("no member in the request"))?;
        if let Some(why) = self.coordinator.identity.mismatch(member) {
            return Err(Status::failed_precondition(why));
        }
        Ok(member.rank)
    }
}

#[tonic::async_trait]
impl pb::control_server::Control for ControlService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let request = request.into_inner();
        let rank = self.check(request.member.as_ref())?;
        let stage = Stage::try_from(request.stage).unwrap_or(Stage::Unspecified);
        if stage == Stage::Unspecified {
            return Err(Status::invalid_argument("no barrier stage in the request"));
        }
        match self.coordinator.arrive(rank, stage).await {
            Ok(ranks) => Ok(Response::new(pb::JoinReply { ranks })),
            Err(e @ BarrierError::Timeout { .. }) => Err(Status::deadline_exceeded(e.to_string())),
            Err(e @ (BarrierError::AlreadyFormed { .. } | BarrierError::Broken(_))) => {
                Err(Status::aborted(e.to_string()))
            }
            Err(e @ BarrierError::OutOfOrder { .. }) => {
                Err(Status::failed_precondition(e.to_string()))
            }
        }
    }

    type StepsStream = ReceiverStream<Result<pb::Step, Status>>;

    async fn steps(
        &self,
        request: Request<pb::StepsRequest>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        let request = request.into_inner();
        let rank = self.check(request.member.as_ref())?;
        let rx = self.coordinator.open_stream(rank)?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The server-side token check.
#[derive(Clone)]
pub struct RequireToken {
    expected: Arc<String>,
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequireToken(..)")
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(token) if same_secret(token.as_bytes(), self.expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("wrong group token")),
            None => Err(Status::unauthenticated("no group token presented")),
        }
    }
}

/// The client-side token.
#[derive(Clone)]
pub struct PresentToken {
    value: MetadataValue<Ascii>,
}

impl std::fmt::Debug for PresentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PresentToken(..)")
    }
}

impl Interceptor for PresentToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.value.clone());
        Ok(request)
    }
}

/// How long a caller has to finish the TLS handshake with the control
/// service; a handshake runs beside the others, so a slow one holds up
/// nobody else.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the control service (token required) and tonic-health on
/// `listener` until `shutdown` resolves, over TLS with `tls`'s certificate
/// when given. Health reports SERVING for `tandem.control.v1.Control` once
/// `formed` resolves.
pub async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    token: String,
    tls: Option<&TlsMaterial>,
    formed: impl std::future::Future<Output = ()> + Send + 'static,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_not_serving::<pb::control_server::ControlServer<ControlService>>()
        .await;
    tokio::spawn(async move {
        formed.await;
        reporter
            .set_serving::<pb::control_server::ControlServer<ControlService>>()
            .await;
    });
    let service = pb::control_server::ControlServer::with_interceptor(
        ControlService::new(coordinator),
        RequireToken {
            expected: Arc::new(token),
        },
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls.control_server_config(HANDSHAKE_TIMEOUT))?;
    }
    builder
        // Notice a peer that vanished without closing its connection.
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(health)
        .add_service(service)
        .serve_with_incoming_shutdown(without_delay(listener), shutdown)
        .await
}

/// The connections `listener` accepts, with Nagle's algorithm off. A step's
/// plan is a few small writes (under TLS, a record per HTTP/2 frame); with
/// Nagle on, the later ones wait for the peer's delayed ACK, which added
/// about 40 ms to every step of a TLS group on the GPU. tonic sets this
/// itself only on listeners it binds.
fn without_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            // A socket that refuses the option still works, only slower.
            let _ = stream.set_nodelay(true);
        }
        accepted
    })
}

/// Why a rank could not take part through rank 0.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Rank 0 could not be reached before the deadline.
    #[error("rank 0's control service at {address} was unreachable for {waited:?}: {last}")]
    Unreachable {
        /// The control address.
        address: String,
        /// How long we tried.
        waited: Duration,
        /// The last error seen.
        last: String,
    },
    /// Rank 0 refused us: wrong token, another epoch, model or shape.
    #[error("rank 0 refused rank {rank}: {message}")]
    Refused {
        /// Our rank.
        rank: i32,
        /// Rank 0's message.
        message: String,
        /// The gRPC code.
        code: Code,
    },
    /// A barrier did not open in time.
    #[error("{0}")]
    BarrierTimeout(String),
    /// The token is not valid metadata.
    #[error("the group token is not printable ASCII")]
    BadToken,
}

/// Rank 1..N's side of the control service.
#[derive(Debug, Clone)]
pub struct ControlClient {
    address: String,
    identity: GroupIdentity,
    rank: i32,
    token: PresentToken,
    deadline: Duration,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

type Client = pb::control_client::ControlClient<
    tonic::service::interceptor::InterceptedService<Channel, PresentToken>,
>;

impl ControlClient {
    /// A client of rank 0 at `address` (`ip:port`) for `rank`, giving up
    /// on rank 0 after `deadline`. With `tls`, it speaks TLS and accepts
    /// only a certificate for `address` issued by `tls`'s CA.
    pub fn new(
        address: &str,
        identity: GroupIdentity,
        rank: i32,
        token: &str,
        tls: Option<&TlsMaterial>,
        deadline: Duration,
    ) -> Result<ControlClient, ClientError> {
        let value = format!("Bearer {token}")
            .parse::<MetadataValue<Ascii>>()
            .map_err(|_| ClientError::BadToken)?;
        Ok(ControlClient {
            address: address.to_owned(),
            identity,
            rank,
            token: PresentToken { value },
            deadline,
            tls: tls.map(TlsMaterial::control_client_config),
        })
    }

    async fn connect(&self) -> Result<Client, tonic::transport::Error> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", self.address))?
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint.connect().await?;
        Ok(pb::control_client::ControlClient::with_interceptor(
            channel,
            self.token.clone(),
        ))
    }

    /// Retries `call` while rank 0 is unreachable or still an older
    /// incarnation, until the deadline.
    async fn with_retries<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let deadline = started + self.deadline;
        let mut last;
        // A refused token is retried too: until an older epoch's rank 0 on
        // the same address has stopped, it answers with its own (older)
        // token. If the deadline passes with the token still refused, that
        // refusal is the error.
        let mut refused: Option<ClientError>;
        loop {
            match self.connect().await {
                Ok(client) => match call(client).await {
                    Ok(v) => return Ok(v),
                    Err(s) => match s.code() {
                        Code::Unavailable | Code::Aborted | Code::Unknown | Code::Cancelled => {
                            last = format!("{:?}: {}", s.code(), s.message());
                            refused = None;
                        }
                        Code::Unauthenticated => {
                            last = format!("{:?}: {}", s.code(), s.message());
                            refused = Some(ClientError::Refused {
                                rank: self.rank,
                                message: s.message().to_owned(),
                                code: Code::Unauthenticated,
                            });
                        }
                        Code::DeadlineExceeded => {
                            return Err(ClientError::BarrierTimeout(s.message().to_owned()));
                        }
                        code => {
                            return Err(ClientError::Refused {
                                rank: self.rank,
                                message: s.message().to_owned(),
                                code,
                            });
                        }
                    },
                },
                Err(e) => {
                    last = transport_error_text(&e);
                    refused = None;
                }
            }
            if Instant::now() + Duration::from_millis(300) >= deadline {
                if let Some(refusal) = refused {
                    return Err(refusal);
                }
                return Err(ClientError::Unreachable {
                    address: self.address.clone(),
                    waited: started.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits at rank 0's barrier of `stage`.
    pub async fn join(&self, stage: Stage) -> Result<Vec<i32>, ClientError> {
        let member = self.identity.member(self.rank);
        self.with_retries(|mut client| {
            let request = pb::JoinRequest {
                member: Some(member.clone()),
                stage: stage as i32,
            };
            async move { client.join(request).await.map(|r| r.into_inner().ranks) }
        })
        .await
    }

    /// Opens this rank's step stream.
    pub async fn steps(&self) -> Result<tonic::Streaming<pb::Step>, ClientError> {
        let member = self.identity.member(self.rank);
        self.with_retries(|mut client| {
            let request = pb::StepsRequest {
                member: Some(member.clone()),
            };
            async move { client.steps(request).await.map(|r| r.into_inner()) }
        })
        .await
    }
}

/// A transport error with its causes, which tonic keeps in the source chain.
fn transport_error_text(e: &tonic::transport::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl PlanSink for Arc<Coordinator> {
    fn send(&self, plan: &StepPlan) -> Result<(), String> {
        self.send_step(plan_to_proto(plan))
    }
}

/// The wire form of a step.
pub fn plan_to_proto(plan: &StepPlan) -> pb::Step {
    let narrow = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    pb::Step {
        step: plan.step,
        evict: plan.evict.clone(),
        save: plan
            .save
            .iter()
            .map(|s| pb::Save {
                id: s.id,
                entry: s.entry,
                tokens: narrow(s.tokens),
            })
            .collect(),
        retire: plan.retire.clone(),
        admit: plan
            .admit
            .iter()
            .map(|a| pb::Admit {
                id: a.id,
                prompt_ids: a.prompt.clone(),
                temperature: a.sampling.temperature,
                top_p: a.sampling.top_p,
                seed: a.sampling.seed,
                reuse_entry: a.reuse.map_or(0, |r| r.entry),
                reuse_tokens: a.reuse.map_or(0, |r| narrow(r.tokens)),
            })
            .collect(),
        feed: plan
            .feed
            .iter()
            .map(|f| pb::Feed {
                id: f.id,
                prompt_tokens: narrow(f.prompt_tokens),
            })
            .collect(),
    }
}

/// A step from the wire. Log-probabilities are rank 0's alone, so an
/// admitted sequence asks for none here.
pub fn plan_from_proto(step: pb::Step) -> StepPlan {
    let widen = |n: u32| usize::try_from(n).unwrap_or(usize::MAX);
    StepPlan {
        step: step.step,
        evict: step.evict,
        save: step
            .save
            .into_iter()
            .map(|s| Save {
                id: s.id,
                entry: s.entry,
                tokens: widen(s.tokens),
            })
            .collect(),
        retire: step.retire,
        admit: step
            .admit
            .into_iter()
            .map(|a| Admit {
                id: a.id,
                prompt: a.prompt_ids,
                sampling: SamplingParams {
                    temperature: a.temperature,
                    top_p: a.top_p,
                    seed: a.seed,
                },
                reuse: (a.reuse_tokens > 0).then(|| Reuse {
                    entry: a.reuse_entry,
                    tokens: widen(a.reuse_tokens),
                }),
                logprobs: None,
            })
            .collect(),
        feed: step
            .feed
            .into_iter()
            .map(|f| Feed {
                id: f.id,
                prompt_tokens: widen(f.prompt_tokens),
            })
            .collect(),
    }
}

/// Binds the control port on every interface.
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await
}

#[cfg(test)]
mod tests;
