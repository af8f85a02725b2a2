//! The tonic service over a [`Coordinator`], with the group-token check in
//! front, tonic-health beside it, and TLS when the shard has its material.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::service::Interceptor;
use tonic::{Request, Response, Status};

use super::*;
use crate::secret::same_secret;
use crate::tls::TlsMaterial;

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

/// Binds the control port on every interface.
pub async fn bind(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await
}
