//! Rank 0's OpenAI-compatible HTTP API (axum): `/v1/chat/completions` and
//! `/v1/completions` (whole or streamed as server-sent events),
//! `/v1/models`, `/healthz` and `/metrics`.
//!
//! - [`api`]: request parsing and validation, response bodies.
//! - [`error`]: OpenAI-style error bodies and status codes.
//! - [`scheduler`]: the bounded queue in front of the engine thread.
//! - [`metrics`]: Prometheus metrics.
//! - [`watchdog`]: notices a group that stopped making progress.
//!
//! A client that disconnects cancels its generation: the request's
//! [`scheduler::CancelGuard`] lives in the handler (or the event stream),
//! which the server drops when the connection closes.
//!
//! What one client can take is bounded ([`ApiLimits`]): open connections
//! (more are answered 503 and closed), the time to send a request's headers
//! and its body (408, or the connection is closed), the body's size (413),
//! the prompts being encoded at once (429 when no slot frees in time), the
//! queue (429, checked before any encoding), and the tokens one request may
//! generate (`max_tokens`, capped per deployment). Every refusal is an
//! OpenAI-style error.

pub mod api;
pub mod error;
pub mod metrics;
pub mod scheduler;
pub mod watchdog;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tandem_crds::api_key_digest;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use self::api::{Endpoint, GenerationRequest, PromptInput, ResponseMeta, TokenInfo, Usage};
use self::error::ApiError;
use self::metrics::ServeMetrics;
use self::scheduler::{Scheduler, Step, Ticket};
use crate::engine::batch::TokenLogprobs;
use crate::engine::sampling::SamplingParams;
use crate::engine::schedule::Request;
use crate::engine::text::{Detokenizer, TextCodec};
use crate::secret::same_secret;

/// What the API serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The model ID clients name (`/v1/models` lists it).
    pub model: String,
    /// Other names accepted for it (the deployment name).
    pub aliases: Vec<String>,
    /// Longest prompt plus completion, in tokens.
    pub max_context_tokens: usize,
    /// Vocabulary size; token-id prompts must stay below it.
    pub vocab_size: usize,
    /// Hex SHA-256 of the bearer key required on `/v1/*`, if any.
    pub api_key_sha256: Option<String>,
    /// Most tokens one request may generate: the default when it names no
    /// `max_tokens`, and the largest it may name. `None`: the context left
    /// after the prompt.
    pub max_completion_tokens: Option<usize>,
    /// What one client can take.
    pub limits: ApiLimits,
}

/// What one client can take from rank 0's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiLimits {
    /// Most open connections; more are answered 503 and closed at once.
    pub max_connections: usize,
    /// Milliseconds a client has to send a request's headers (on a new
    /// connection, and between requests on a kept-alive one), and again
    /// its body. Slower clients get 408 or are disconnected.
    pub read_timeout_ms: u64,
    /// Prompts encoded (chat template and tokenizer) at once; a request
    /// waits up to the read timeout for a slot, then gets 429.
    pub max_tokenizing: usize,
}

impl ApiLimits {
    /// Default of `max_connections`.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
    /// Default of `read_timeout_ms`: 30 s.
    pub const DEFAULT_READ_TIMEOUT_MS: u64 = 30_000;
    /// Default of `max_tokenizing`.
    pub const DEFAULT_MAX_TOKENIZING: usize = 4;

    /// The read timeout.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms.max(1))
    }
}

impl Default for ApiLimits {
    fn default() -> ApiLimits {
        ApiLimits {
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            read_timeout_ms: Self::DEFAULT_READ_TIMEOUT_MS,
            max_tokenizing: Self::DEFAULT_MAX_TOKENIZING,
        }
    }
}

impl ServeConfig {
    /// The largest request body read: 1 MiB plus 32 bytes per context
    /// token, room for a whole context of text as JSON (escapes included)
    /// and not much more. A larger body gets 413 before it is read whole.
    pub fn max_body_bytes(&self) -> usize {
        (1 << 20) + 32 * self.max_context_tokens
    }
}

struct Inner {
    config: ServeConfig,
    /// Slots for encoding prompts.
    tokenizing: Arc<Semaphore>,
    codec: Arc<dyn TextCodec>,
    scheduler: Scheduler,
    metrics: Arc<ServeMetrics>,
    next_id: AtomicU64,
    started: u64,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("model", &self.0.config.model)
            .finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    /// State over a running scheduler.
    pub fn new(
        config: ServeConfig,
        codec: Arc<dyn TextCodec>,
        scheduler: Scheduler,
        metrics: Arc<ServeMetrics>,
    ) -> AppState {
        AppState(Arc::new(Inner {
            tokenizing: Arc::new(Semaphore::new(config.limits.max_tokenizing.max(1))),
            config,
            codec,
            scheduler,
            metrics,
            next_id: AtomicU64::new(1),
            started: unix_now(),
        }))
    }

    fn knows_model(&self, name: &str) -> bool {
        self.0.config.model == name || self.0.config.aliases.iter().any(|a| a == name)
    }

    fn check_key(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.0.config.api_key_sha256 else {
            return Ok(());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(key) if same_secret(api_key_digest(key).as_bytes(), expected.as_bytes()) => Ok(()),
            Some(_) => Err(ApiError::unauthorized("Incorrect API key provided.")),
            None => Err(ApiError::unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer KEY`.",
            )),
        }
    }
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/models/{*id}", get(get_model))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            ApiError::wrong_method(method.as_str(), uri.path())
        })
        .fallback(|method: Method, uri: Uri| async move {
            ApiError::no_route(method.as_str(), uri.path())
        })
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, one task per
/// connection: at most `limits.max_connections` at once (a connection
/// beyond them gets a 503 and is closed), each closed when a request's
/// headers do not arrive within the read timeout (an idle kept-alive
/// connection too). With `tls`, every connection is TLS: its handshake
/// must finish within the read timeout too, and counts against the cap
/// like a request; a client speaking plain HTTP fails the handshake and
/// is closed without an answer. Connections still open when `shutdown`
/// resolves are left to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ApiLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let service = hyper_util::service::TowerToHyperService::new(router);
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on
                    // accepting rather than stop serving.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => return Ok(()),
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.max_connections, "connection refused: too many open");
            tokio::spawn(refuse(stream, acceptor.clone(), limits.max_connections));
            continue;
        };
        let service = service.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let result = match acceptor {
                None => serve_connection(stream, service, limits).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.read_timeout(), acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => serve_connection(stream, service, limits).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(slot);
        });
    }
}

/// One HTTP/1.1 connection, plain or TLS, with the header read timeout.
async fn serve_connection<S>(
    stream: S,
    service: hyper_util::service::TowerToHyperService<Router>,
    limits: ApiLimits,
) -> Result<(), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.read_timeout())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
        .await
}

/// How long a connection over the limit has to take its 503, the TLS
/// handshake included.
const REFUSAL_GRACE: Duration = Duration::from_secs(1);

/// Answers a connection over the limit with a 503 and closes it, giving
/// the client a second to take it (over TLS, to finish the handshake too).
async fn refuse(
    stream: tokio::net::TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limit: usize,
) {
    let body = ApiError::too_many_connections(limit).body().to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_GRACE, async {
        match tls {
            None => write_and_close(stream, &response).await,
            Some(acceptor) => {
                if let Ok(stream) = acceptor.accept(stream).await {
                    write_and_close(stream, &response).await;
                }
            }
        }
    })
    .await;
}

async fn write_and_close<S: tokio::io::AsyncWrite + Unpin>(mut stream: S, response: &str) {
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn healthz(State(state): State<AppState>) -> Response {
    match state.0.scheduler.broken() {
        None => (
            StatusCode::OK,
            axum::Json(json!({"status": "ok", "model": state.0.config.model})),
        )
            .into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "reason": reason})),
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.0.metrics.render(),
    )
        .into_response()
}

fn model_object(state: &AppState) -> Value {
    json!({
        "id": state.0.config.model,
        "object": "model",
        "created": state.0.started,
        "owned_by": "tandem",
    })
}

async fn list_models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = state.check_key(&headers) {
        return e.into_response();
    }
    axum::Json(json!({"object": "list", "data": [model_object(&state)]})).into_response()
}

async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = state.check_key(&headers) {
        return e.into_response();
    }
    if state.knows_model(&id) {
        axum::Json(model_object(&state)).into_response()
    } else {
        ApiError::unknown_model(&id).into_response()
    }
}

async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(state, Endpoint::Chat, headers, body).await
}

async fn completions(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    generate(state, Endpoint::Completions, headers, body).await
}

/// The request body, at most `limit` bytes, whole within `timeout`: a
/// larger `Content-Length` is refused before anything is read, a body
/// without one is cut off as soon as it passes the limit, and a slow one
/// gets 408.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    use http_body_util::{BodyExt, LengthLimitError, Limited};
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ApiError::read_timeout(timeout)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::too_large(limit))
        }
        Ok(Err(e)) => Err(ApiError::invalid(format!(
            "The request body could not be read: {e}"
        ))),
    }
}

async fn generate(state: AppState, endpoint: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let config = &state.0.config;
    let read = read_body(
        &headers,
        body,
        config.max_body_bytes(),
        config.limits.read_timeout(),
    );
    let started = match read.await {
        Ok(body) => start(&state, endpoint, &headers, &body).await,
        Err(e) => Err(e),
    };
    let response = match started {
        Ok((request, ticket, prompt_tokens)) => {
            let meta = state.meta(endpoint, &request.model);
            let generation = Generation::new(
                ticket,
                &state,
                request.stop.clone(),
                prompt_tokens,
                request.logprobs.is_some(),
            );
            if request.stream {
                stream_response(endpoint, meta, generation, request.include_usage).into_response()
            } else {
                whole_response(endpoint, meta, generation).await
            }
        }
        Err(e) => e.into_response(),
    };
    state
        .0
        .metrics
        .request(endpoint.as_str(), response.status().as_u16());
    response
}

impl AppState {
    fn meta(&self, endpoint: Endpoint, model: &str) -> ResponseMeta {
        let n = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        ResponseMeta {
            id: format!("{prefix}-{:x}{n:06x}", self.0.started),
            created: unix_now(),
            model: model.to_owned(),
        }
    }
}

/// Validates, tokenizes and queues a request.
async fn start(
    state: &AppState,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(GenerationRequest, Ticket, usize), ApiError> {
    state.check_key(headers)?;
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_json(&e.to_string()))?;
    let request = match endpoint {
        Endpoint::Chat => api::parse_chat(&value)?,
        Endpoint::Completions => api::parse_completion(&value)?,
    };
    if !state.knows_model(&request.model) {
        return Err(ApiError::unknown_model(&request.model));
    }
    // A full queue refuses before any encoding work is spent.
    state.0.scheduler.check_room()?;
    let prompt_ids = tokenize(state, &request).await?;
    let ctx = state.0.config.max_context_tokens;
    let param = match endpoint {
        Endpoint::Chat => "messages",
        Endpoint::Completions => "prompt",
    };
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid_param(
            param,
            "invalid_value",
            "The prompt is empty.",
        ));
    }
    let cap = state.0.config.max_completion_tokens;
    if let (Some(n), Some(cap)) = (request.max_tokens, cap)
        && n as usize > cap
    {
        let name = match endpoint {
            Endpoint::Chat => "max_completion_tokens",
            Endpoint::Completions => "max_tokens",
        };
        return Err(ApiError::invalid_param(
            name,
            "invalid_value",
            format!(
                "{name} is {n}, but this deployment generates at most {cap} tokens per request (spec.serving.maxCompletionTokens)."
            ),
        ));
    }
    let left = ctx.saturating_sub(prompt_ids.len());
    let max_tokens = match (request.max_tokens, endpoint) {
        (Some(n), _) => n as usize,
        // The legacy endpoint's documented default.
        (None, Endpoint::Completions) => cap.map_or(16, |cap| cap.min(16)).min(left),
        (None, Endpoint::Chat) => cap.map_or(left, |cap| cap.min(left)),
    };
    if prompt_ids.len() >= ctx || prompt_ids.len() + max_tokens > ctx {
        let what = match endpoint {
            Endpoint::Chat => "messages",
            Endpoint::Completions => "prompt",
        };
        let message = match request.max_tokens {
            Some(n) => format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the {what}, {n} in the completion). Please reduce the length of the {what} or completion.",
                prompt_ids.len() + n as usize,
                prompt_ids.len()
            ),
            None => format!(
                "This model's maximum context length is {ctx} tokens. However, your {what} resulted in {} tokens. Please reduce the length of the {what}.",
                prompt_ids.len()
            ),
        };
        return Err(ApiError::invalid_param(
            param,
            "context_length_exceeded",
            message,
        ));
    }
    let prompt_tokens = prompt_ids.len();
    let seed = request.seed.unwrap_or_else(|| {
        // Any value will do; it only has to be the same on every rank, and
        // the job carries it there.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ state.0.next_id.load(Ordering::Relaxed).rotate_left(32)
    });
    let mut job = Request::new(
        state.0.next_id.fetch_add(1, Ordering::Relaxed),
        prompt_ids,
        max_tokens,
    );
    job.sampling = SamplingParams {
        temperature: request.temperature,
        top_p: request.top_p,
        seed,
    };
    if !request.ignore_eos {
        job.stop_ids = state.0.codec.stop_ids();
    }
    job.logprobs = request.logprobs;
    let ticket = state.0.scheduler.submit(job)?;
    Ok((request, ticket, prompt_tokens))
}

/// Prompt token ids, computed off the async threads (templates and long
/// prompts take real CPU time).
async fn tokenize(state: &AppState, request: &GenerationRequest) -> Result<Vec<u32>, ApiError> {
    let codec = state.0.codec.clone();
    let prompt = request.prompt.clone();
    let vocab = state.0.config.vocab_size;
    let wait = state.0.config.limits.read_timeout();
    let slots = state.0.tokenizing.clone();
    // The slot is held by the encoding itself, which runs on even when the
    // client leaves.
    let slot = match tokio::time::timeout(wait, slots.acquire_owned()).await {
        Ok(Ok(slot)) => slot,
        Ok(Err(_)) => return Err(ApiError::internal("the tokenizer slots are closed")),
        Err(_) => return Err(ApiError::tokenizer_busy(wait)),
    };
    let (param, ids) = tokio::task::spawn_blocking(move || {
        let encoded = match prompt {
            PromptInput::Chat(messages) => ("messages", codec.encode_chat(&messages)),
            PromptInput::Text(text) => ("prompt", codec.encode_plain(&text)),
            PromptInput::Ids(ids) => ("prompt", Ok(ids)),
        };
        drop(slot);
        encoded
    })
    .await
    .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?;
    let ids = ids.map_err(|e| {
        ApiError::invalid_param(
            param,
            "invalid_prompt",
            format!("The prompt could not be encoded: {e}"),
        )
    })?;
    if let Some(bad) = ids.iter().find(|id| **id as usize >= vocab) {
        return Err(ApiError::invalid_param(
            param,
            "invalid_value",
            format!("Token id {bad} is outside the model's vocabulary of {vocab} tokens."),
        ));
    }
    Ok(ids)
}

/// What a generation yields to the response writer.
#[derive(Debug)]
enum Piece {
    /// Text, and the log-probabilities of the tokens it completes (when
    /// asked for).
    Text(String, Vec<TokenInfo>),
    End {
        finish: &'static str,
        completion_tokens: usize,
    },
    Error(ApiError),
}

/// Turns the engine's tokens into text, applying stop sequences.
struct Generation {
    ticket: Ticket,
    codec: Arc<dyn TextCodec>,
    detok: Detokenizer,
    stop: Vec<String>,
    /// Text not yet sent because it might be the start of a stop sequence.
    held: String,
    prompt_tokens: usize,
    cached_tokens: usize,
    /// Log-probabilities of tokens whose text has not been sent yet.
    infos: Vec<TokenInfo>,
    queue: VecDeque<Piece>,
    ended: bool,
    /// Whether the client asked for log-probabilities.
    wants_logprobs: bool,
}

impl Generation {
    fn new(
        ticket: Ticket,
        state: &AppState,
        stop: Vec<String>,
        prompt_tokens: usize,
        wants_logprobs: bool,
    ) -> Generation {
        Generation {
            ticket,
            codec: state.0.codec.clone(),
            detok: Detokenizer::default(),
            stop,
            held: String::new(),
            prompt_tokens,
            cached_tokens: 0,
            infos: Vec::new(),
            queue: VecDeque::new(),
            ended: false,
            wants_logprobs,
        }
    }

    fn usage(&self, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens,
            cached_tokens: self.cached_tokens,
        }
    }

    fn text(&mut self, text: String) {
        let infos = std::mem::take(&mut self.infos);
        self.queue.push_back(Piece::Text(text, infos));
    }

    fn info(&self, id: u32, logprobs: TokenLogprobs) -> TokenInfo {
        let text = |t: u32| self.codec.decode(&[t]).unwrap_or_default();
        TokenInfo {
            text: text(id),
            logprob: logprobs.logprob,
            top: logprobs
                .top
                .into_iter()
                .map(|(t, l)| (text(t), l))
                .collect(),
        }
    }

    /// Length of the longest tail of `held` that begins a stop sequence.
    fn holdback(&self) -> usize {
        let mut keep = 0;
        for s in &self.stop {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        keep
    }

    fn on_token(&mut self, id: u32, logprobs: Option<TokenLogprobs>) {
        if let Some(l) = logprobs {
            let info = self.info(id, l);
            self.infos.push(info);
        }
        let Some(fresh) = self.detok.push(self.codec.as_ref(), id) else {
            return;
        };
        if self.stop.is_empty() {
            self.text(fresh);
            return;
        }
        self.held.push_str(&fresh);
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            // A stop sequence: send what precedes it, and stop the group.
            self.ticket.guard.cancel();
            let before = self.held[..at].to_owned();
            self.held.clear();
            if !before.is_empty() || !self.infos.is_empty() {
                self.text(before);
            }
            self.queue.push_back(Piece::End {
                finish: "stop",
                completion_tokens: self.detok.ids().len(),
            });
            self.ended = true;
            return;
        }
        let cut = self.held.len() - self.holdback();
        if cut > 0 {
            let out: String = self.held.drain(..cut).collect();
            self.text(out);
        }
    }

    async fn next(&mut self) -> Option<Piece> {
        loop {
            if let Some(piece) = self.queue.pop_front() {
                return Some(piece);
            }
            if self.ended {
                return None;
            }
            match self.ticket.steps.recv().await {
                Some(Step::Admitted { cached_tokens }) => self.cached_tokens = cached_tokens,
                Some(Step::Token { id, logprobs }) => self.on_token(id, logprobs),
                Some(Step::Finished(outcome)) => {
                    if let Some(rest) = self.detok.flush(self.codec.as_ref()) {
                        self.held.push_str(&rest);
                    }
                    if !self.held.is_empty() || !self.infos.is_empty() {
                        let rest = std::mem::take(&mut self.held);
                        self.text(rest);
                    }
                    self.queue.push_back(Piece::End {
                        finish: outcome.finish.as_str(),
                        completion_tokens: outcome.generated,
                    });
                    self.ended = true;
                }
                Some(Step::Failed(e)) => {
                    self.queue.push_back(Piece::Error(e));
                    self.ended = true;
                }
                None => {
                    self.queue
                        .push_back(Piece::Error(ApiError::unavailable("the engine stopped")));
                    self.ended = true;
                }
            }
        }
    }
}

/// Collects a whole generation into one response.
async fn whole_response(
    endpoint: Endpoint,
    meta: ResponseMeta,
    mut generation: Generation,
) -> Response {
    let mut text = String::new();
    let mut infos = Vec::new();
    let wants_logprobs = generation.wants_logprobs;
    while let Some(piece) = generation.next().await {
        match piece {
            Piece::Text(t, i) => {
                text.push_str(&t);
                infos.extend(i);
            }
            Piece::Error(e) => return e.into_response(),
            Piece::End {
                finish,
                completion_tokens,
            } => {
                let usage = generation.usage(completion_tokens);
                let logprobs = wants_logprobs.then(|| api::logprobs_json(endpoint, &infos, 0));
                return axum::Json(api::full_response(
                    endpoint, &meta, &text, finish, usage, logprobs,
                ))
                .into_response();
            }
        }
    }
    ApiError::unavailable("the engine stopped").into_response()
}

struct StreamState {
    endpoint: Endpoint,
    meta: ResponseMeta,
    generation: Generation,
    include_usage: bool,
    /// Events to send before asking the generation for more.
    pending: VecDeque<SseEvent>,
    first: bool,
    finished: bool,
    /// Bytes of text sent so far (completions' `text_offset`).
    sent: usize,
}

fn data(value: &Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

/// Streams a generation as server-sent events, OpenAI style: chunks, then
/// `[DONE]`; an error mid-stream is an `{"error": ...}` event, then the end.
fn stream_response(
    endpoint: Endpoint,
    meta: ResponseMeta,
    generation: Generation,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let mut pending = VecDeque::new();
    if endpoint == Endpoint::Chat {
        // The role comes first, before any token, as OpenAI sends it.
        pending.push_back(data(&api::chunk(
            endpoint,
            &meta,
            Some(""),
            true,
            None,
            None,
        )));
    }
    let state = StreamState {
        first: endpoint != Endpoint::Chat,
        endpoint,
        meta,
        generation,
        include_usage,
        pending,
        finished: false,
        sent: 0,
    };
    let events = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.pending.pop_front() {
                return Some((Ok(event), st));
            }
            if st.finished {
                return None;
            }
            match st.generation.next().await {
                Some(Piece::Text(t, infos)) => {
                    let logprobs = st
                        .generation
                        .wants_logprobs
                        .then(|| api::logprobs_json(st.endpoint, &infos, st.sent));
                    st.sent += t.len();
                    let chunk =
                        api::chunk(st.endpoint, &st.meta, Some(&t), st.first, None, logprobs);
                    st.first = false;
                    st.pending.push_back(data(&chunk));
                }
                Some(Piece::End {
                    finish,
                    completion_tokens,
                }) => {
                    st.pending.push_back(data(&api::chunk(
                        st.endpoint,
                        &st.meta,
                        None,
                        false,
                        Some(finish),
                        None,
                    )));
                    if st.include_usage {
                        let usage = st.generation.usage(completion_tokens);
                        st.pending
                            .push_back(data(&api::usage_chunk(st.endpoint, &st.meta, usage)));
                    }
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.finished = true;
                }
                Some(Piece::Error(e)) => {
                    st.pending.push_back(data(&e.body()));
                    st.finished = true;
                }
                None => st.finished = true,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tls_tests;
