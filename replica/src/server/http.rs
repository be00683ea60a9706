//! The HTTP plumbing: the listener (connection limits counted before any TLS work),
//! the TLS handshake or lab mode's plain HTTP, HTTP/1.1 serving with its timeouts,
//! who each request comes from, bodies read within their limits and stall timeout,
//! and answers as JSON (a refused request whose body was left unread closes its
//! connection).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Bytes, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};
use wire::api::{ErrorCode, IDENTITY_HEADER, MAX_JSON_BODY, PSK_HEADER};
use wire::error_chain;
use wire::tls::certificate_names;

use super::api::{refuse, Refusal};
use super::authorization::{self, authorise, Peer, PlainRefusal};
use super::handlers::route;
use super::{lock, Context};
use crate::limits::{LimitReached, RefusalLog, Slots};
use crate::store::StoreError;

/// How long a connection may wait for its next request's headers (hyper's timer runs
/// from the moment it waits): the primary's echo every 90 s keeps its data connection
/// open; the first request is held to
/// [`Limits::handshake_timeout`](crate::limits::Limits::handshake_timeout) instead.
const HEADER_TIMEOUT: Duration = Duration::from_secs(120);
/// At most one warning about refused connections per this period.
const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// How the requests of one connection are authenticated.
#[derive(Debug, Clone)]
enum Auth {
    /// By the TLS handshake: the DNS names of the peer's certificate, which each
    /// request matches against the entries in force (they may be reloaded).
    Certificate(Arc<Vec<String>>),
    /// Lab mode: each request by its headers.
    PerRequest(Arc<PlainConnection>),
}

/// How connections start.
#[derive(Clone)]
pub(super) enum Acceptor {
    /// With a TLS handshake.
    Tls(TlsAcceptor),
    /// Lab mode: plain HTTP; each request carries its identity and key.
    Plain,
}

/// A plain-HTTP connection: where from, and what was last logged about it (so a
/// connection logs its primary once, not every request).
#[derive(Debug)]
struct PlainConnection {
    remote: SocketAddr,
    logged: Mutex<Option<String>>,
}

impl PlainConnection {
    /// Whether `outcome` (an identity, or "" for a failed authentication) differs from
    /// what was logged last; remembers it.
    fn first_time(&self, outcome: String) -> bool {
        let mut logged = lock(&self.logged);
        if logged.as_deref() == Some(outcome.as_str()) {
            return false;
        }
        *logged = Some(outcome);
        true
    }
}

pub(super) async fn accept_loop(
    listener: TcpListener,
    acceptor: Acceptor,
    context: Arc<Context>,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let limits = context.settings.limits;
    let connections = Slots::new(limits.max_connections, limits.max_connections_per_address);
    let refusals = RefusalLog::new(REFUSAL_LOG_PERIOD);
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                warn!(%error, "Accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Counted before any TLS work, so a flood costs an accept and a close.
        let slot = match connections.take(remote.ip().to_canonical()) {
            Ok(slot) => slot,
            Err(full) => {
                drop(stream);
                if let Some(refused) = refusals.note() {
                    let (limit, value) = match full {
                        LimitReached::Total => ("max_connections", limits.max_connections),
                        LimitReached::Key => (
                            "max_connections_per_address",
                            limits.max_connections_per_address,
                        ),
                    };
                    warn!(%remote, refused, limit, value, "Closing new connections over a connection limit ([limits] in the configuration); this count since the last such line");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, context) = (acceptor.clone(), Arc::clone(&context));
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(error) = serve_connection(stream, remote, acceptor, context).await {
                info!(%remote, %error, "Connection ended");
            }
        });
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: Acceptor,
    context: Arc<Context>,
) -> Result<(), String> {
    let limits = context.settings.limits;
    let first_request_by = tokio::time::Instant::now() + limits.handshake_timeout;
    let acceptor = match acceptor {
        Acceptor::Tls(acceptor) => acceptor,
        Acceptor::Plain => {
            let connection = Arc::new(PlainConnection {
                remote,
                logged: Mutex::new(None),
            });
            let auth = Auth::PerRequest(connection);
            return serve_http(TokioIo::new(stream), auth, context, first_request_by).await;
        }
    };
    let tls = tokio::time::timeout_at(first_request_by, acceptor.accept(stream))
        .await
        .map_err(|_| format!("TLS handshake not done in {:?}", limits.handshake_timeout))?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let names = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(certificate_names)
        .unwrap_or_default();
    let peer = authorise(&context.authorization(), &names);
    match &peer {
        Some(peer) => {
            info!(%remote, identity = %peer.identity, trust_group = %peer.trust_group, "Primary connected")
        }
        None if names.is_empty() => {
            warn!(target: "blkrep_event", event = "primary_refused", reason = "its certificate names no DNS name", %remote, "Refusing a client certificate without a DNS name among its subject alternative names: a primary's identity is its DNS names only (never its common name or IP addresses)")
        }
        None => {
            warn!(target: "blkrep_event", event = "primary_refused", reason = "no authorisation entry allows it", identity = %names.join(", "), %remote, "Refusing a primary no authorisation entry allows")
        }
    }
    serve_http(
        TokioIo::new(tls),
        Auth::Certificate(Arc::new(names)),
        context,
        first_request_by,
    )
    .await
}

/// Serves HTTP/1.1 on a connection whose first request's headers must arrive by
/// `first_request_by`.
async fn serve_http<I>(
    io: I,
    auth: Auth,
    context: Arc<Context>,
    first_request_by: tokio::time::Instant,
) -> Result<(), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let first_request = Arc::new(tokio::sync::Notify::new());
    let body_timeout = BodyTimeout(context.settings.limits.body_timeout);
    let service = {
        let first_request = Arc::clone(&first_request);
        service_fn(move |mut request: Request<Incoming>| {
            first_request.notify_one();
            request.extensions_mut().insert(body_timeout);
            let (context, auth) = (Arc::clone(&context), auth.clone());
            async move { Ok::<_, std::convert::Infallible>(handle(&context, &auth, request).await) }
        })
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let started = tokio::select! {
        served = &mut connection => return served.map_err(|e| e.to_string()),
        started = tokio::time::timeout_at(first_request_by, first_request.notified()) => started,
    };
    if started.is_err() {
        return Err("No request in time after connecting".into());
    }
    connection.await.map_err(|e| e.to_string())
}

pub(super) type Answer = Response<Full<Bytes>>;

pub(super) fn json<T: Serialize>(status: StatusCode, value: &T) -> Answer {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl Refusal {
    fn answer(&self) -> Answer {
        let status =
            StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json(status, &self.0)
    }
}

pub(super) fn store_refusal(error: &StoreError) -> Refusal {
    let message = error_chain(error);
    let code = match error {
        _ if error.is_no_space() => ErrorCode::InsufficientStorage,
        StoreError::Chunk(_) | StoreError::Apply(_) => ErrorCode::BadRequest,
        StoreError::Conflict(_) => ErrorCode::Conflict,
        StoreError::OtherRelationship(_) => ErrorCode::OtherRelationship,
        StoreError::ChainBroken(_) => ErrorCode::ChainBroken,
        StoreError::Paused(_) => ErrorCode::Paused,
        StoreError::Busy(_) => ErrorCode::Busy,
        StoreError::Superseded(_) => ErrorCode::Superseded,
        StoreError::Removed(_) => ErrorCode::NotFound,
        StoreError::Io { .. }
        | StoreError::CorruptState { .. }
        | StoreError::ShortTransfer { .. }
        | StoreError::NoSpace { .. }
        | StoreError::History(_) => {
            warn!(error = %message, "Replica store failed");
            ErrorCode::Internal
        }
    };
    refuse(code, message)
}

/// Set while a request's body is not read yet (a request extension).
#[derive(Debug, Clone)]
pub(super) struct UnreadBody(pub(super) Arc<AtomicBool>);

/// How long a request's body may go without a byte arriving (a request extension).
#[derive(Debug, Clone, Copy)]
struct BodyTimeout(Duration);

/// What a body reader needs from its request's extensions: the flag to clear once the
/// body is read, and how long the body may stall.
pub(super) fn body_extensions(request: &Request<Incoming>) -> (Option<UnreadBody>, Duration) {
    let unread = request.extensions().get::<UnreadBody>().cloned();
    let BodyTimeout(idle) = request
        .extensions()
        .get::<BodyTimeout>()
        .copied()
        .unwrap_or(BodyTimeout(crate::limits::DEFAULT_BODY_TIMEOUT));
    (unread, idle)
}

/// Reads a whole body of at most `limit` bytes; a body that stalls for the connection's
/// [`BodyTimeout`] is refused (and, unread, closes the connection).
async fn body(request: Request<Incoming>, limit: usize) -> Result<Bytes, Refusal> {
    let (unread, idle) = body_extensions(&request);
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("Body larger than {limit} bytes"),
        ));
    }
    let mut incoming = Limited::new(request.into_body(), limit);
    let mut bytes = Vec::new();
    loop {
        let frame = tokio::time::timeout(idle, incoming.frame())
            .await
            .map_err(|_| {
                refuse(
                    ErrorCode::BadRequest,
                    format!("The body stalled: no byte for {idle:?}"),
                )
            })?;
        let Some(frame) = frame else { break };
        let frame = frame
            .map_err(|e| refuse(ErrorCode::BadRequest, format!("Cannot read the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    if let Some(UnreadBody(unread)) = unread {
        unread.store(false, Ordering::Relaxed);
    }
    Ok(Bytes::from(bytes))
}

pub(super) async fn json_body<T: serde::de::DeserializeOwned>(
    request: Request<Incoming>,
) -> Result<T, Refusal> {
    let bytes = body(request, MAX_JSON_BODY).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| refuse(ErrorCode::BadRequest, format!("Invalid JSON: {e}")))
}

/// Runs a store operation on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Refusal> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(refuse(ErrorCode::Internal, format!("Worker failed: {e}"))))
}

/// The peer a request comes from, or the refusal to answer it with.
fn peer_of(
    context: &Context,
    auth: &Auth,
    request: &Request<Incoming>,
) -> Result<Option<Peer>, Refusal> {
    let connection = match auth {
        Auth::Certificate(names) => return Ok(authorise(&context.authorization(), names)),
        Auth::PerRequest(connection) => connection,
    };
    let remote = connection.remote;
    let header = |name: &str| request.headers().get(name).map(|v| v.as_bytes());
    let identity = header(IDENTITY_HEADER)
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(|v| v.trim().to_ascii_lowercase());
    let authenticated = authorization::authenticate_plain(
        &context.authorization(),
        identity.as_deref(),
        header(PSK_HEADER),
    );
    let peer = match authenticated {
        Ok(peer) => peer,
        Err(refused) => {
            let claimed = identity.unwrap_or_default();
            if connection.first_time(format!("refused {claimed}")) {
                warn!(target: "blkrep_event", event = "primary_refused", %remote, identity = %claimed, reason = ?refused, "Refusing a plain-HTTP request: no valid name, or not the key of the entry allowing it");
            }
            return Err(refuse(
                ErrorCode::Unauthenticated,
                match refused {
                    PlainRefusal::NoIdentity => format!(
                        "Missing or invalid {IDENTITY_HEADER} header (the primary's DNS name)"
                    ),
                    PlainRefusal::WrongKey | PlainRefusal::NotAuthorised => format!(
                        "Missing or wrong pre-shared key ({PSK_HEADER} header) for this primary's name"
                    ),
                },
            ));
        }
    };
    if connection.first_time(peer.identity.clone()) {
        info!(%remote, identity = %peer.identity, trust_group = %peer.trust_group, "Primary connected (plain HTTP, pre-shared key)");
    }
    Ok(Some(peer))
}

async fn handle(context: &Arc<Context>, auth: &Auth, mut request: Request<Incoming>) -> Answer {
    let unread = Arc::new(AtomicBool::new(!request.body().is_end_stream()));
    request
        .extensions_mut()
        .insert(UnreadBody(Arc::clone(&unread)));
    let mut answer = respond(context, auth, request).await;
    // Answered without reading the body (refused first): the body is still on the
    // connection, which hyper then cannot reuse; tell the client so it does not either.
    if unread.load(Ordering::Relaxed) {
        answer
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    answer
}

async fn respond(context: &Arc<Context>, auth: &Auth, request: Request<Incoming>) -> Answer {
    let peer = match peer_of(context, auth, &request) {
        Ok(peer) => peer,
        Err(refusal) => return refusal.answer(),
    };
    let Some(peer) = peer else {
        return refuse(
            ErrorCode::Forbidden,
            "This primary is not authorised on this replica server",
        )
        .answer();
    };
    match route(context, &peer, request).await {
        Ok(answer) => answer,
        Err(refusal) => refusal.answer(),
    }
}
