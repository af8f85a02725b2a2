//! Ranks 1..N's side: joining a barrier with retries until a deadline and
//! opening the step stream, presenting the group token on every call.

use std::time::Duration;

use tokio::time::Instant;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::*;
use crate::tls::TlsMaterial;

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
