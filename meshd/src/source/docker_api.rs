//! A minimal Docker Engine API client on hyper: GET and the `/events` stream, over a unix
//! socket, plain TCP, or TCP with TLS (client certificate, as `dockerd --tlsverify`).
//! Connections are kept alive and reused: a re-read costs a request, not a TLS handshake.
//!
//! Why not bollard: its typed `Task` has no `NetworksAttachments` (where task addresses
//! are), and its typed lists fail whole on one malformed object. meshd reads raw answers
//! and decodes each object on its own (`decode`), so a bad object is rejected alone.
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Body as _;
use hyper::{body::Incoming, Request, StatusCode};
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpStream, UnixStream},
};

/// API version meshd speaks: Docker 20.10's, accepted by every newer engine.
pub const API_VERSION: &str = "v1.41";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The most an answer's `Content-Length` reserves up front (a larger answer still grows
/// as it arrives): a header alone does not get to allocate.
const MAX_RESERVE: u64 = 64 << 20;

/// Causes are part of each message (`reason`), not `source`s: a `{:#}` chain would print
/// them twice.
#[derive(Debug, Error)]
pub enum ApiError {
    #[error("connect to {endpoint}: {reason}")]
    Connect {
        endpoint: String,
        reason: std::io::Error,
    },
    #[error("TLS with {endpoint}: {reason}")]
    Tls {
        endpoint: String,
        reason: std::io::Error,
    },
    #[error("HTTP to {endpoint}: {reason}")]
    Http {
        endpoint: String,
        reason: hyper::Error,
    },
    #[error("GET {path}: status {status}: {body}")]
    Status {
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("GET {path}: answer is not JSON: {reason}")]
    Json {
        path: String,
        reason: serde_json::Error,
    },
    #[error("GET {path}: no answer in {timeout:?}")]
    Timeout { path: String, timeout: Duration },
    #[error("TLS configuration: {0}")]
    TlsConfig(String),
    #[error("bad docker host {0:?}: expected unix:///path or tcp://host:port")]
    BadHost(String),
    #[error("GET {path}: called off (meshd is stopping)")]
    Cancelled { path: String },
    #[error("event stream from {endpoint}: closed by the engine")]
    StreamClosed { endpoint: String },
}

/// A request path as an operator reads it in a log or `meshctl status`: the query's
/// filters percent-decoded, an event stream's (long, always the same) left out.
fn shown(path: &str) -> String {
    if path.starts_with("/events") {
        return "/events".into();
    }
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What an error answer says: the engine's `{"message": ...}`, else the first 500 bytes.
fn error_text(body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message")?.as_str().map(str::to_string));
    message
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
        .trim()
        .chars()
        .take(500)
        .collect()
}

/// TLS material for a TCP endpoint.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp {
        host: String,
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

/// Requests and answer bytes, for `meshctl status` and the control-plane benchmark.
#[derive(Debug, Default)]
pub struct ApiCounters {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    pub connections: AtomicU64,
}

/// Idle keep-alive connections, reused for the next request.
const MAX_IDLE: usize = 4;

#[derive(Clone)]
pub struct DockerApi {
    endpoint: Endpoint,
    display: String,
    idle: Arc<Mutex<Vec<hyper::client::conn::http1::SendRequest<Empty<Bytes>>>>>,
    pub counters: Arc<ApiCounters>,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

impl DockerApi {
    /// `host` is `unix:///var/run/docker.sock`, a bare socket path, or `tcp://host:port`.
    /// TLS is used for TCP when any TLS file is given.
    pub fn new(host: &str, tls: &TlsFiles) -> Result<Self, ApiError> {
        let endpoint = if let Some(path) = host.strip_prefix("unix://") {
            Endpoint::Unix(PathBuf::from(path))
        } else if host.starts_with('/') {
            Endpoint::Unix(PathBuf::from(host))
        } else if let Some(rest) = host.strip_prefix("tcp://") {
            let (h, p) = rest
                .rsplit_once(':')
                .ok_or_else(|| ApiError::BadHost(host.into()))?;
            let port = p.parse().map_err(|_| ApiError::BadHost(host.into()))?;
            let tls = if tls.ca.is_some() || tls.cert.is_some() || tls.key.is_some() {
                Some(Arc::new(client_config(tls)?))
            } else {
                None
            };
            Endpoint::Tcp {
                host: h.to_string(),
                port,
                tls,
            }
        } else {
            return Err(ApiError::BadHost(host.into()));
        };
        Ok(Self {
            endpoint,
            display: host.to_string(),
            idle: Arc::default(),
            counters: Arc::default(),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.display
    }

    async fn connect(&self) -> Result<Box<dyn Io>, ApiError> {
        let endpoint = self.display.clone();
        match &self.endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path)
                .await
                .map(|s| Box::new(s) as Box<dyn Io>)
                .map_err(|reason| ApiError::Connect { endpoint, reason }),
            Endpoint::Tcp { host, port, tls } => {
                let tcp = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|reason| ApiError::Connect {
                        endpoint: endpoint.clone(),
                        reason,
                    })?;
                let _ = tcp.set_nodelay(true);
                match tls {
                    None => Ok(Box::new(tcp)),
                    Some(config) => {
                        let name = rustls::pki_types::ServerName::try_from(host.clone())
                            .map_err(|e| ApiError::TlsConfig(format!("server name {host}: {e}")))?;
                        let stream = tokio_rustls::TlsConnector::from(config.clone())
                            .connect(name, tcp)
                            .await
                            .map_err(|reason| ApiError::Tls { endpoint, reason })?;
                        Ok(Box::new(stream))
                    }
                }
            }
        }
    }

    async fn handshake(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, ApiError> {
        let io = self.connect().await?;
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        // hyper's read buffer grows to its limit (400 KB) on a large answer and is kept for
        // as long as the connection is: 64 KB reads a /tasks slice as fast here, and two
        // kept-alive connections hold 128 KB, not 850.
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(64 * 1024)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|reason| ApiError::Http {
                endpoint: self.display.clone(),
                reason,
            })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends a GET on a kept-alive connection (a new one when none is idle); `reuse` says
    /// whether the connection may go back to the pool once the answer is read.
    async fn send(
        &self,
        path: &str,
    ) -> Result<
        (
            hyper::Response<Incoming>,
            hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        ),
        ApiError,
    > {
        let pooled = {
            let mut idle = self.idle.lock().unwrap();
            let mut found = None;
            while let Some(s) = idle.pop() {
                if !s.is_closed() {
                    found = Some(s);
                    break;
                }
            }
            found
        };
        let req = || {
            Request::get(format!("/{API_VERSION}{path}"))
                .header("host", "docker")
                .body(Empty::<Bytes>::new())
                .expect("a GET request with a valid path")
        };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(mut sender) = pooled {
            if sender.ready().await.is_ok() {
                if let Ok(resp) = sender.send_request(req()).await {
                    return Ok((resp, sender));
                }
            }
            // The engine closed it meanwhile: a fresh connection.
        }
        let mut sender = self.handshake().await?;
        let resp = sender
            .send_request(req())
            .await
            .map_err(|reason| ApiError::Http {
                endpoint: self.display.clone(),
                reason,
            })?;
        Ok((resp, sender))
    }

    /// GET `path` (under the API version): the whole answer body.
    pub async fn get_bytes(&self, path: &str) -> Result<Bytes, ApiError> {
        let mut body = Vec::new();
        self.get_into(path, &mut body).await?;
        Ok(Bytes::from(body))
    }

    /// GET `path` into `body` (emptied first): a caller reading many large answers in a
    /// row (the cold read's task slices) keeps one buffer and its pages, rather than
    /// collecting each answer's chunks and copying them into fresh memory (at 10k
    /// services that was 165 MB of new pages, each faulted in and handed back).
    pub async fn get_into(&self, path: &str, body: &mut Vec<u8>) -> Result<(), ApiError> {
        let fut = async {
            let (resp, sender) = self.send(path).await?;
            let status = resp.status();
            let mut incoming = resp.into_body();
            body.clear();
            if let Some(n) = incoming.size_hint().exact() {
                body.reserve(n.min(MAX_RESERVE) as usize);
            }
            while let Some(frame) = incoming.frame().await {
                let frame = frame.map_err(|reason| ApiError::Http {
                    endpoint: self.display.clone(),
                    reason,
                })?;
                if let Ok(data) = frame.into_data() {
                    body.extend_from_slice(&data);
                }
            }
            self.counters
                .bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            {
                let mut idle = self.idle.lock().unwrap();
                if idle.len() < MAX_IDLE {
                    idle.push(sender);
                }
            }
            if !status.is_success() {
                return Err(ApiError::Status {
                    path: shown(path),
                    status,
                    body: error_text(body),
                });
            }
            Ok(())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| ApiError::Timeout {
                path: shown(path),
                timeout: REQUEST_TIMEOUT,
            })?
    }

    /// GET `path` and parse the answer as JSON (small answers: `/info`).
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ApiError> {
        let body = self.get_bytes(path).await?;
        serde_json::from_slice(&body).map_err(|reason| ApiError::Json {
            path: path.into(),
            reason,
        })
    }

    /// Whether an error is the engine's "no such object" (404): the object is gone.
    pub fn is_not_found(e: &ApiError) -> bool {
        matches!(e, ApiError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// Opens `/events` (with `query`, already URL-encoded) and returns the stream.
    pub async fn events(&self, query: &str) -> Result<EventStream, ApiError> {
        let path = format!("/events?{query}");
        // A stream holds its connection for as long as it runs: never a pooled one.
        let fut = async {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let mut sender = self.handshake().await?;
            let req = Request::get(format!("/{API_VERSION}{path}"))
                .header("host", "docker")
                .body(Empty::<Bytes>::new())
                .expect("a GET request with a valid path");
            sender
                .send_request(req)
                .await
                .map_err(|reason| ApiError::Http {
                    endpoint: self.display.clone(),
                    reason,
                })
        };
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| ApiError::Timeout {
                path: shown(&path),
                timeout: REQUEST_TIMEOUT,
            })??;
        let status = resp.status();
        if !status.is_success() {
            // An error answer is short and complete: what the engine says, if it says it in
            // time.
            let body = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| error_text(&b.to_bytes()))
                .unwrap_or_default();
            return Err(ApiError::Status {
                path: shown(&path),
                status,
                body,
            });
        }
        Ok(EventStream {
            body: resp.into_body(),
            buf: BytesMut::new(),
            counters: self.counters.clone(),
            endpoint: self.display.clone(),
        })
    }
}

/// The `/events` body: one JSON object per line.
pub struct EventStream {
    body: Incoming,
    buf: BytesMut,
    counters: Arc<ApiCounters>,
    endpoint: String,
}

impl EventStream {
    /// The next event; `Ok(None)` when the engine closed the stream. A line that is not an
    /// event comes back as an error value for that line only.
    pub async fn next(&mut self) -> Result<Option<Result<super::decode::Event, String>>, ApiError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..line.len() - 1];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(super::decode::event(line)));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(reason)) => {
                    return Err(ApiError::Http {
                        endpoint: self.endpoint.clone(),
                        reason,
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        self.counters
                            .bytes
                            .fetch_add(data.remaining() as u64, Ordering::Relaxed);
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, ApiError> {
    std::fs::read(path).map_err(|e| ApiError::TlsConfig(format!("read {}: {e}", path.display())))
}

fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, ApiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = files
        .ca
        .as_ref()
        .ok_or_else(|| ApiError::TlsConfig("--tls-ca is required for TLS".into()))?;
    for cert in rustls_pemfile::certs(&mut read_pem(ca)?.as_slice()) {
        let cert = cert.map_err(|e| ApiError::TlsConfig(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| ApiError::TlsConfig(format!("{}: {e}", ca.display())))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::TlsConfig(e.to_string()))?
        .with_root_certificates(roots);
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut read_pem(cert)?.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApiError::TlsConfig(format!("{}: {e}", cert.display())))?;
            let key_der = rustls_pemfile::private_key(&mut read_pem(key)?.as_slice())
                .map_err(|e| ApiError::TlsConfig(format!("{}: {e}", key.display())))?
                .ok_or_else(|| ApiError::TlsConfig(format!("{}: no private key", key.display())))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ApiError::TlsConfig(e.to_string()))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(ApiError::TlsConfig(
            "--tls-cert and --tls-key go together".into(),
        )),
    }
}
