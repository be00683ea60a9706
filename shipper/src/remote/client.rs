//! The primary's HTTP client of the replica API ([`wire::api`]).
//!
//! Two kinds of connections, as Hyper-V Replica's network layer has:
//! - control requests (enable, offer, commit, get) each open a short connection, wait
//!   synchronously with a 120 s timeout, and never retry on their own: the shipper's
//!   retry schedule decides;
//! - a transfer's chunks go as one streamed upload (see [`crate::pipeline`]) on a
//!   persistent data connection, reopened when it breaks and kept alive with
//!   `GET /v1/echo` when idle for 90 s.
//!
//! Connections bind to a configured source address, so replication can use a dedicated
//! network. Every request carries the relationship id; in the plain-HTTP lab mode also
//! the claimed identity and the pre-shared key. Errors say what failed and carry a
//! [`FailureClass`] for the retry schedule.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pipeline::upload::{FrameSlot, LostFrame, UploadBody, QUEUE_FRAMES};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use wire::api::{
    ErrorBody, API_PREFIX, EPOCH_HEADER, FIRST_EPOCH, IDENTITY_HEADER, MAX_JSON_BODY, PSK_HEADER,
    RELATIONSHIP_HEADER,
};

/// Default timeout of a control request; also the longest an upload may go without
/// taking a frame, and wait for its answer once its body ended.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Timeout of a TCP connect plus TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// An idle data connection is kept alive with an echo this often.
pub const ECHO_INTERVAL: Duration = Duration::from_secs(90);

mod error;

pub use error::{ClientError, FailureClass};

/// How the primary proves who it is.
#[derive(Clone)]
pub enum Credentials {
    /// HTTPS with a client certificate (the TLS configuration holds both the replica CA
    /// and the client certificate).
    Tls(Arc<rustls::ClientConfig>),
    /// Plain HTTP for isolated labs: a claimed identity and a pre-shared key.
    PlainWithPsk {
        /// The identity the replica authorises.
        identity: String,
        /// The key.
        psk: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Tls(_) => f.write_str("Tls"),
            Credentials::PlainWithPsk { identity, .. } => f
                .debug_struct("PlainWithPsk")
                .field("identity", identity)
                .finish_non_exhaustive(),
        }
    }
}

/// Where the replica server is and how to reach it.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// `https://host:port` (or `http://` with [`Credentials::PlainWithPsk`]).
    pub url: String,
    /// Credentials.
    pub credentials: Credentials,
    /// Local address to bind connections to.
    pub source_address: Option<IpAddr>,
    /// Time one request (a control exchange or one chunk) may take before the
    /// connection is dropped ([`REQUEST_TIMEOUT`] unless configured otherwise).
    pub request_timeout: Duration,
}

/// A parsed replica URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Whether TLS is used.
    pub tls: bool,
    /// Host name or address literal.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `https://host[:port]` or `http://host[:port]` (no path). The default
    /// port is 8443 for both.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|error| format!("{url:?} is not a URL ({error})"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "{url:?} must start with https:// (or http:// in lab mode)"
                ))
            }
        };
        if uri
            .path_and_query()
            .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
        {
            return Err(format!("{url:?} must not have a path"));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("{url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Endpoint {
            tls,
            host,
            port: uri.port_u16().unwrap_or(8443),
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The body of every request: JSON or a whole chunk, or a streamed upload.
type RequestBody = BoxBody<Bytes, LostFrame>;

struct DataConnection {
    connection: Connection,
    last_used: Instant,
}

/// An HTTP/1 connection to the replica: the request side, and how its connection task
/// ended. A request sent after the connection died only learns that the channel is
/// closed; the cause (with TLS 1.3, the replica's alert refusing our certificate,
/// which arrives after the handshake) is what the connection task read.
struct Connection {
    sender: SendRequest<RequestBody>,
    /// The connection task: it returns the error it ended with.
    task: Option<tokio::task::JoinHandle<Option<hyper::Error>>>,
}

/// How long a failed request waits for its connection task to say why it ended.
const CONNECTION_END_WAIT: Duration = Duration::from_secs(1);

impl Connection {
    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// The connection task's error in place of a "closed" or "canceled" one.
    async fn cause(&mut self, error: hyper::Error) -> hyper::Error {
        if !(error.is_closed() || error.is_canceled()) {
            return error;
        }
        let Some(task) = self.task.take() else {
            return error;
        };
        match tokio::time::timeout(CONNECTION_END_WAIT, task).await {
            Ok(Ok(Some(cause))) => cause,
            _ => error,
        }
    }
}

/// A streamed upload of frames in progress ([`ReplicaClient::start_upload`]).
pub struct Upload {
    what: String,
    slots: Option<tokio::sync::mpsc::Sender<FrameSlot>>,
    exchange: Option<tokio::task::JoinHandle<ExchangeEnd>>,
    /// The exchange's end, when it ended while frames were being queued.
    ended: Option<Result<ExchangeEnd, tokio::task::JoinError>>,
}

/// How an exchange on the data connection ended: the answer, and the connection to
/// keep for the next one (none after a failure: its state is unknown).
type ExchangeEnd = (Result<Answer, ClientError>, Option<Connection>);

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Abandoned (the transfer failed on this side): stop sending at once, so no
        // frame of it reaches the replica after a new offer.
        if let Some(exchange) = self.exchange.take() {
            exchange.abort();
        }
    }
}

/// A client of one replica server, for one relationship. Blocking: every call runs
/// to completion on the client's own single-threaded runtime.
pub struct ReplicaClient {
    runtime: tokio::runtime::Runtime,
    endpoint: Endpoint,
    settings: ClientSettings,
    relationship: u64,
    epoch: u64,
    data: Option<DataConnection>,
}

impl std::fmt::Debug for ReplicaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaClient")
            .field("endpoint", &self.endpoint)
            .field("relationship", &self.relationship)
            .finish_non_exhaustive()
    }
}

/// The result of a request before its body is interpreted.
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl ReplicaClient {
    /// A client for `settings`, sending `relationship` with every request.
    pub fn new(settings: ClientSettings, relationship: u64) -> Result<Self, String> {
        let endpoint = Endpoint::parse(&settings.url)?;
        match (&settings.credentials, endpoint.tls) {
            (Credentials::Tls(_), false) => {
                return Err(format!(
                    "{} is plain HTTP; use https:// (plain HTTP needs the lab mode's psk_file)",
                    settings.url
                ))
            }
            (Credentials::PlainWithPsk { .. }, true) => {
                return Err(format!(
                    "{} is HTTPS but the lab mode's pre-shared key is configured; give cert, key and ca for HTTPS",
                    settings.url
                ))
            }
            _ => {}
        }
        // One worker thread drives uploads while the shipper thread encodes.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("replica-client")
            .on_thread_start(base::priority::enter_background)
            .enable_all()
            .build()
            .map_err(|error| format!("Cannot start the client's runtime: {error}"))?;
        Ok(ReplicaClient {
            runtime,
            endpoint,
            settings,
            relationship,
            epoch: FIRST_EPOCH,
            data: None,
        })
    }

    /// Sends `relationship` at failover epoch `epoch` with every later request.
    pub fn set_relationship(&mut self, relationship: u64, epoch: u64) {
        self.relationship = relationship;
        self.epoch = epoch;
    }

    /// The replica server's address, for status and logs.
    pub fn url(&self) -> &str {
        &self.settings.url
    }

    /// Sends a control request with a JSON body on a connection of its own and reads
    /// the JSON answer.
    pub fn control<Q: Serialize, A: DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Q>,
    ) -> Result<A, ClientError> {
        let what = format!("{method} {path}");
        let bytes = match body {
            Some(body) => serde_json::to_vec(body).map_err(|error| ClientError::BadAnswer {
                what: what.clone(),
                detail: format!("cannot encode the request: {error}"),
            })?,
            None => Vec::new(),
        };
        let length = bytes.len();
        let request = self.request(
            method,
            path,
            "application/json",
            full(Bytes::from(bytes)),
            Some(length),
        )?;
        let endpoint = self.endpoint.clone();
        let credentials = self.settings.credentials.clone();
        let source = self.settings.source_address;
        let limit = self.settings.request_timeout;
        let answer = self.runtime.block_on(async move {
            let exchange = async {
                let mut sender = connect(&endpoint, &credentials, source).await?;
                exchange(&mut sender, request).await
            };
            tokio::time::timeout(limit, exchange)
                .await
                .map_err(|_| ClientError::Timeout(limit))?
        })?;
        decode(&what, answer)
    }

    /// Starts uploading the frames of transfer `transfer` of replica `name` from chunk
    /// `first` on, on the data connection: one streamed request whose body is what is
    /// queued with [`ReplicaClient::push_frame`], until
    /// [`ReplicaClient::finish_upload`]. `body` paces and measures it.
    pub fn start_upload(
        &mut self,
        name: &str,
        transfer: u64,
        first: u32,
        body: impl FnOnce(tokio::sync::mpsc::Receiver<FrameSlot>) -> UploadBody,
    ) -> Result<Upload, ClientError> {
        let path = format!("/replicas/{name}/transfers/{transfer:x}/chunks/{first}");
        let what = format!("chunks from {first} of transfer {transfer:#x}");
        let (slots, queue) = tokio::sync::mpsc::channel(QUEUE_FRAMES);
        let request = self.request(
            Method::PUT,
            &path,
            "application/octet-stream",
            body(queue).boxed(),
            None,
        )?;
        let work = self.data_exchange(request);
        let exchange = self.runtime.spawn(work);
        Ok(Upload {
            what,
            slots: Some(slots),
            exchange: Some(exchange),
            ended: None,
        })
    }

    /// Queues the next chunk's frame on `upload`, waiting while the queue is full (at
    /// most the request timeout). An error means the upload stopped:
    /// [`ReplicaClient::finish_upload`] says why.
    pub fn push_frame(&self, upload: &mut Upload, slot: FrameSlot) -> Result<(), ClientError> {
        let limit = self.settings.request_timeout;
        let stopped = || ClientError::BadAnswer {
            what: upload.what.clone(),
            detail: "the upload stopped".into(),
        };
        let (Some(slots), Some(exchange)) = (upload.slots.as_ref(), upload.exchange.as_mut())
        else {
            return Err(stopped());
        };
        let (sent, ended) = self.runtime.block_on(async {
            tokio::select! {
                sent = slots.send(slot) => (sent.is_ok(), None),
                // The replica answered (a refusal) or the connection broke.
                ended = exchange => (false, Some(ended)),
                () = tokio::time::sleep(limit) => (false, None),
            }
        });
        if sent {
            return Ok(());
        }
        upload.slots = None;
        match ended {
            Some(ended) => {
                upload.exchange = None;
                upload.ended = Some(ended);
                Err(stopped())
            }
            None => Err(ClientError::Timeout(limit)),
        }
    }

    /// Ends `upload`'s body and waits for the replica's answer: how many chunks of the
    /// transfer it holds. They are stored, not yet durable: the commit makes them so.
    pub fn finish_upload(&mut self, mut upload: Upload) -> Result<u32, ClientError> {
        upload.slots = None;
        let limit = self.settings.request_timeout;
        let ended = match (upload.ended.take(), upload.exchange.take()) {
            (Some(ended), _) => Ok(ended),
            (None, Some(exchange)) => self
                .runtime
                .block_on(async { tokio::time::timeout(limit, exchange).await }),
            (None, None) => return Err(ClientError::Timeout(limit)),
        };
        let (answer, connection) = match ended {
            Ok(Ok(end)) => end,
            Ok(Err(join)) => (
                Err(ClientError::BadAnswer {
                    what: upload.what.clone(),
                    detail: format!("the upload task failed: {join}"),
                }),
                None,
            ),
            Err(_) => (Err(ClientError::Timeout(limit)), None),
        };
        self.keep_connection(connection);
        let answer: UploadAnswer = decode(&upload.what, answer?)?;
        Ok(answer.have_chunks)
    }

    /// Keeps the data connection alive: an echo when it has been idle for
    /// [`ECHO_INTERVAL`]. A failed echo just drops the connection.
    pub fn keep_alive(&mut self) {
        let idle = self
            .data
            .as_ref()
            .is_some_and(|data| data.last_used.elapsed() >= ECHO_INTERVAL);
        if !idle {
            return;
        }
        let Ok(request) = self.request(
            Method::GET,
            "/echo",
            "application/json",
            full(Bytes::new()),
            Some(0),
        ) else {
            return;
        };
        if !self
            .on_data_connection(request)
            .is_ok_and(|answer| answer.status.is_success())
        {
            self.data = None;
        }
    }

    /// Closes the data connection (after a failure elsewhere, or when stopping).
    pub fn disconnect(&mut self) {
        self.data = None;
    }

    fn on_data_connection(&mut self, request: Request<RequestBody>) -> Result<Answer, ClientError> {
        let limit = self.settings.request_timeout;
        let work = self.data_exchange(request);
        let (answer, connection) = self.runtime.block_on(async move {
            tokio::time::timeout(limit, work)
                .await
                .unwrap_or_else(|_| (Err(ClientError::Timeout(limit)), None))
        });
        self.keep_connection(connection);
        answer
    }

    /// Sends `request` on the data connection, reopened if it was closed: run it to
    /// completion ([`ReplicaClient::on_data_connection`]) or beside the caller (an
    /// upload), then hand the connection it ends with to
    /// [`ReplicaClient::keep_connection`].
    fn data_exchange(
        &mut self,
        request: Request<RequestBody>,
    ) -> impl std::future::Future<Output = ExchangeEnd> + Send + 'static {
        let endpoint = self.endpoint.clone();
        let credentials = self.settings.credentials.clone();
        let source = self.settings.source_address;
        let connection = self.data.take().map(|data| data.connection);
        async move {
            let mut live = match connection {
                Some(existing) if !existing.is_closed() => existing,
                _ => match connect(&endpoint, &credentials, source).await {
                    Ok(fresh) => fresh,
                    Err(error) => return (Err(error), None),
                },
            };
            match exchange(&mut live, request).await {
                Ok(answer) => (Ok(answer), Some(live)),
                Err(error) => (Err(error), None),
            }
        }
    }

    /// Keeps the connection an exchange ended with as the data connection.
    fn keep_connection(&mut self, connection: Option<Connection>) {
        if let Some(connection) = connection {
            self.data = Some(DataConnection {
                connection,
                last_used: Instant::now(),
            });
        }
    }

    /// A request with this client's headers; `length` is the body's, when known
    /// (otherwise the body is sent chunked).
    fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: RequestBody,
        length: Option<usize>,
    ) -> Result<Request<RequestBody>, ClientError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{API_PREFIX}{path}"))
            .header(HOST, self.endpoint.authority())
            .header(CONTENT_TYPE, content_type)
            .header(RELATIONSHIP_HEADER, format!("{:x}", self.relationship))
            .header(EPOCH_HEADER, self.epoch);
        if let Some(length) = length {
            builder = builder.header(CONTENT_LENGTH, length);
        }
        if let Credentials::PlainWithPsk { identity, psk } = &self.settings.credentials {
            builder = builder
                .header(IDENTITY_HEADER, identity.as_str())
                .header(PSK_HEADER, psk.as_str());
        }
        builder.body(body).map_err(|error| ClientError::BadAnswer {
            what: path.to_string(),
            detail: format!("cannot build the request: {error}"),
        })
    }
}

async fn connect(
    endpoint: &Endpoint,
    credentials: &Credentials,
    source: Option<IpAddr>,
) -> Result<Connection, ClientError> {
    let connecting = async {
        let addresses: Vec<SocketAddr> =
            tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
                .await
                .map_err(|source| ClientError::Resolve {
                    host: endpoint.host.clone(),
                    source,
                })?
                .filter(|addr| source.is_none_or(|ip| ip.is_ipv4() == addr.is_ipv4()))
                .collect();
        let mut last = std::io::Error::new(
            std::io::ErrorKind::AddrNotAvailable,
            "no address of the replica matches the source address's family",
        );
        let mut tcp = None;
        for addr in addresses {
            match connect_tcp(addr, source).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(error) => last = error,
            }
        }
        let tcp = tcp.ok_or_else(|| ClientError::Connect {
            addr: endpoint.authority(),
            source: last,
        })?;
        let stream: Box<dyn Stream> = match credentials {
            Credentials::Tls(config) => {
                let name = ServerName::try_from(endpoint.host.clone()).map_err(|error| {
                    ClientError::Tls {
                        addr: endpoint.authority(),
                        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, error),
                    }
                })?;
                let tls = TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(|source| ClientError::Tls {
                        addr: endpoint.authority(),
                        source,
                    })?;
                Box::new(tls)
            }
            Credentials::PlainWithPsk { .. } => Box::new(tcp),
        };
        // Frames are written from their own buffers, never copied into hyper's.
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .writev(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ClientError::Http)?;
        let task = tokio::spawn(async move { connection.await.err() });
        Ok(Connection {
            sender,
            task: Some(task),
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| ClientError::Timeout(CONNECT_TIMEOUT))?
}

async fn connect_tcp(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A whole body.
fn full(bytes: Bytes) -> RequestBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// The answer to an upload.
#[derive(Debug, serde::Deserialize)]
struct UploadAnswer {
    have_chunks: u32,
}

async fn exchange(
    connection: &mut Connection,
    request: Request<RequestBody>,
) -> Result<Answer, ClientError> {
    let sent = match connection.sender.ready().await {
        Ok(()) => connection.sender.send_request(request).await,
        Err(error) => Err(error),
    };
    let response = match sent {
        Ok(response) => response,
        Err(error) => return Err(ClientError::Http(connection.cause(error).await)),
    };
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|error| match error.downcast::<hyper::Error>() {
            Ok(error) => ClientError::Http(*error),
            Err(other) => ClientError::BadAnswer {
                what: "an answer".into(),
                detail: other.to_string(),
            },
        })?
        .to_bytes();
    Ok(Answer { status, body })
}

fn refusal(what: &str, answer: &Answer) -> ClientError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(&answer.body).ok();
    ClientError::Refused {
        what: what.to_string(),
        status: answer.status.as_u16(),
        code: parsed.as_ref().map(|body| body.code),
        message: parsed.map_or_else(
            || {
                String::from_utf8_lossy(&answer.body)
                    .chars()
                    .take(200)
                    .collect()
            },
            |body| body.message,
        ),
    }
}

fn decode<A: DeserializeOwned>(what: &str, answer: Answer) -> Result<A, ClientError> {
    if !answer.status.is_success() {
        return Err(refusal(what, &answer));
    }
    serde_json::from_slice(&answer.body).map_err(|error| ClientError::BadAnswer {
        what: what.to_string(),
        detail: error.to_string(),
    })
}

#[cfg(test)]
mod tests;
