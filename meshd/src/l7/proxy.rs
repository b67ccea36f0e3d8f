//! The HTTP front end: hyper's server (HTTP/1.1 and h2 on one listener), each request
//! matched against the current `RouteTable` and sent to one of its route's upstreams
//! over a pooled connection (`pool`) opened from the upstream's network (`connector`).
use std::{
    collections::hash_map::RandomState,
    convert::Infallible,
    hash::BuildHasher,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::Incoming,
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Request, Response, StatusCode, Uri, Version,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::{
    backend_tls::{BackendTls, BackendTrust},
    connector::{Connector, SocketMaker, Target},
    pool::{Pool, Returning},
    sni,
    stop::StopSignal,
    table::{normalize_host, RouteTable, Served},
};
use crate::compile::l7::Upstream;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Limits and identity, with Interlock's defaults where it has one.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Sent as `x-proxy-id` (this node's name).
    pub proxy_id: String,
    /// Leave out `x-proxy-id` and `x-server-info`.
    pub hide_info: bool,
    pub connect_timeout: Duration,
    /// An idle pooled upstream connection is closed after this (Interlock's keep-alive).
    pub keepalive: Duration,
    /// The HTTPS listener's port (`ssl_only` redirects there); None: no HTTPS.
    pub https_port: Option<u16>,
    /// The HTTP listener's port: where other nodes' meshd listen too (relays go there).
    pub http_port: u16,
    /// Largest request body (Interlock's `client_max_body_size`, 32 MiB).
    pub max_body: u64,
    /// Longest wait for an upstream's response head (Interlock's read timeout, 600 s).
    pub read_timeout: Duration,
    /// Largest request head a client may send.
    pub max_header_bytes: usize,
    /// A log line per request (`meshd::l7::access`, info).
    pub access_log: bool,
    /// The CA bundle `ssl_backend_tls_verify=required` verifies upstreams against.
    pub backend_ca: std::path::PathBuf,
}

/// Upstreams a request without a body is offered to (the next one when one cannot be
/// connected to); only that many targets are made per request.
const MAX_TRIES: usize = 3;

/// Debian's system trust store.
pub const DEFAULT_BACKEND_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            proxy_id: String::new(),
            hide_info: false,
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(75),
            https_port: None,
            http_port: 80,
            max_body: 32 << 20,
            read_timeout: Duration::from_secs(600),
            max_header_bytes: 32 << 10,
            access_log: false,
            backend_ca: DEFAULT_BACKEND_CA.into(),
        }
    }
}

/// One worker's own state, read by `meshctl` too: its copy of the route table (with its
/// own counters) and its requests in flight. Each worker has its copy so that the request
/// path writes no cache line another core writes (counters, reference counts): on two
/// cores that sharing cost more than the route lookup.
#[repr(align(128))]
pub struct Worker {
    pub table: ArcSwap<RouteTable>,
    /// Requests being answered now.
    pub in_flight: Arc<AtomicUsize>,
}

/// The client end of one connection, with what every request on it sends upstream made
/// once (its address as `X-Forwarded-For` shows it).
struct Client {
    peer: SocketAddr,
    https: bool,
    ip: HeaderValue,
}

impl Client {
    fn new(peer: SocketAddr, https: bool) -> Client {
        let ip =
            HeaderValue::from_str(&peer.ip().to_string()).unwrap_or(HeaderValue::from_static("-"));
        Client { peer, https, ip }
    }
}

/// What a worker's requests reach everything through: made on the worker's own thread,
/// cloned per request by that thread alone.
struct Ctx {
    proxy: Arc<Proxy>,
    worker: Arc<Worker>,
    pool: Arc<Pool>,
    /// Request ids (each worker keys its own).
    ids: RequestIds,
}

pub struct Proxy {
    /// The workers' states, one per thread `start` runs.
    pub workers: Vec<Arc<Worker>>,
    /// The swarm's node addresses: relayed requests are taken from these only.
    pub nodes: ArcSwap<std::collections::BTreeSet<std::net::Ipv4Addr>>,
    /// Certificates for HTTPS (None: no HTTPS listener).
    pub tls: Option<Arc<super::tls::CertStore>>,
    /// Makes the upstream sockets of every worker's client, and passthrough connections.
    connector: Connector,
    /// Set once meshd is stopping.
    stop: StopSignal,
    /// Client connections being served.
    active: Arc<AtomicUsize>,
    settings: ProxySettings,
    /// `x-proxy-id`, made once (None: hidden).
    proxy_id_header: Option<HeaderValue>,
    /// This node's name as relays send it.
    relay_header: Option<HeaderValue>,
}

impl Proxy {
    /// `sockets_cgroup`: the cgroup meshd's socket programs are attached to, for upstream
    /// sockets to be made under (see `SocketMaker::start_in_cgroup`); `workers`: threads
    /// `start` will run.
    pub fn new(
        settings: ProxySettings,
        tls: Option<Arc<super::tls::CertStore>>,
        sockets_cgroup: Option<&std::path::Path>,
        workers: usize,
    ) -> Result<Arc<Proxy>> {
        let maker = match sockets_cgroup.map(SocketMaker::start_in_cgroup) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                warn!(error = %format!("{e:#}"), "L7: no socket helper in the containers' cgroup; backend_mode=vip upstreams are not balanced");
                SocketMaker::start()?
            }
            None => SocketMaker::start()?,
        };
        let connector = Connector {
            maker,
            timeout: settings.connect_timeout,
            trust: Arc::new(BackendTrust::new(settings.backend_ca.clone())),
        };
        Ok(Arc::new(Proxy {
            workers: (0..workers.max(1))
                .map(|_| {
                    Arc::new(Worker {
                        table: ArcSwap::from_pointee(RouteTable::default()),
                        in_flight: Arc::default(),
                    })
                })
                .collect(),
            nodes: ArcSwap::default(),
            tls,
            connector,
            stop: StopSignal::default(),
            active: Arc::default(),
            proxy_id_header: HeaderValue::from_str(&settings.proxy_id)
                .ok()
                .filter(|_| !settings.hide_info),
            relay_header: HeaderValue::from_str(&settings.proxy_id).ok(),
            settings,
        }))
    }

    /// One client connection's server: HTTP/1.1 or h2, with the head limits and a timeout
    /// on a slow request head.
    fn conn_builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(Duration::from_secs(60))
            .max_buf_size(self.settings.max_header_bytes.max(8192));
        b.http2()
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_list_size(self.settings.max_header_bytes as u32);
        b
    }

    /// One worker's upstream pool: its connections live on that worker's runtime, next
    /// to the requests that use them.
    fn pool(&self) -> Arc<Pool> {
        Pool::new(self.connector.clone(), self.settings.keepalive)
    }

    /// Starts the workers, each a single-threaded runtime with its own listeners
    /// (`SO_REUSEPORT`: the kernel spreads connections over them), its own upstream pool
    /// and its own copy of the routes: a request, its upstream connection and their
    /// wakeups stay on one thread, as in nginx's worker processes. Listening errors are
    /// returned here, before any starts.
    pub fn start(self: &Arc<Self>, http: SocketAddr, https: Option<SocketAddr>) -> Result<()> {
        let mut bound = Vec::new();
        for _ in &self.workers {
            let h = reuseport_listener(http)
                .with_context(|| format!("L7: listen for HTTP on {http}"))?;
            let s = match https {
                Some(a) => Some(
                    reuseport_listener(a)
                        .with_context(|| format!("L7: listen for HTTPS on {a}"))?,
                ),
                None => None,
            };
            bound.push((h, s));
        }
        for (i, (h, s)) in bound.into_iter().enumerate() {
            let this = self.clone();
            let worker = self.workers[i].clone();
            std::thread::Builder::new()
                .name(format!("meshd-l7-{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            warn!(error = %e, "L7: cannot start a worker runtime");
                            return;
                        }
                    };
                    rt.block_on(async move {
                        let pool = this.pool();
                        tokio::spawn(pool.clone().sweep_forever());
                        let ctx = Arc::new(Ctx {
                            proxy: this.clone(),
                            worker,
                            pool,
                            ids: RequestIds::default(),
                        });
                        let (Ok(h), s) = (
                            TcpListener::from_std(h),
                            s.map(TcpListener::from_std).transpose(),
                        ) else {
                            warn!("L7: cannot register a listener");
                            return;
                        };
                        if let Ok(Some(s)) = s {
                            tokio::spawn(this.clone().serve_https(s, ctx.clone()));
                        }
                        this.serve_http(h, ctx).await;
                        // Stopping: the listeners are closed, and the connections still
                        // being served live on this runtime until meshd exits.
                        std::future::pending::<()>().await;
                    });
                })
                .context("spawn an L7 worker")?;
        }
        Ok(())
    }

    /// Serves HTTPS on `listener`: TLS by SNI (`tls`), then HTTP/1.1 or h2 by ALPN.
    async fn serve_https(self: Arc<Self>, listener: TcpListener, ctx: Arc<Ctx>) {
        let Some(store) = self.tls.clone() else {
            return;
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(store.server_config());
        while let Some((stream, peer)) = self.accept(&listener).await {
            let this = self.clone();
            let acceptor = acceptor.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                // A host routed with ssl_passthrough gets the TLS bytes as they are.
                let Some(stream) = this.passthrough(&ctx.worker, stream, peer).await else {
                    return;
                };
                let tls =
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(t)) => t,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "L7: TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "L7: TLS handshake timed out");
                            return;
                        }
                    };
                this.serve_conn(TokioIo::new(tls), peer, true, ctx).await;
            });
        }
    }

    /// Reads the ClientHello's server name without consuming it; a host whose route says
    /// `ssl_passthrough` is spliced to one of its tasks as raw TCP (None: handled here).
    /// Any other connection is handed back for meshd's own TLS.
    async fn passthrough(
        &self,
        worker: &Worker,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<TcpStream> {
        let mut buf = vec![0u8; 16 * 1024 + 5];
        let deadline = Instant::now() + Duration::from_secs(5);
        let name = loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            match sni::server_name(&buf[..n]) {
                sni::Hello::Name(name) => break name,
                sni::Hello::NotTls => return Some(stream),
                // The rest of the hello is on its way: peek returns what is there at once.
                sni::Hello::Partial if n < buf.len() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                sni::Hello::Partial => return Some(stream),
            }
        };
        let Some(name) = name else {
            return Some(stream);
        };
        let served = match worker.table.load().lookup(&name, "/") {
            Some((s, _)) if s.route.spec.ssl_passthrough => s.clone(),
            _ => return Some(stream),
        };
        let ups = &served.route.upstreams;
        if ups.is_empty() {
            debug!(%peer, host = %name, "L7: passthrough route has no task serving");
            return None;
        }
        let started = Instant::now();
        let first = served.stats.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..ups.len().min(MAX_TRIES) {
            let up = &ups[(first + i) % ups.len()];
            let target = Target {
                addr: up.addr,
                netns: served.netns.clone(),
                tls: None,
            };
            match self.connector.connect(&target).await {
                Ok(mut upstream) => {
                    served.stats.record(200, started.elapsed());
                    let mut client = stream;
                    let r = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    debug!(%peer, host = %name, upstream = %up.addr, result = ?r, "L7: passthrough connection ended");
                    return None;
                }
                Err(e) => {
                    debug!(%peer, upstream = %up.addr, error = %e, "L7: passthrough connect failed")
                }
            }
        }
        served.stats.record(502, started.elapsed());
        None
    }

    /// Serves plain HTTP on `listener` until the task is dropped.
    async fn serve_http(self: Arc<Self>, listener: TcpListener, ctx: Arc<Ctx>) {
        while let Some((stream, peer)) = self.accept(&listener).await {
            let this = self.clone();
            let ctx = ctx.clone();
            tokio::spawn(async move {
                this.serve_conn(TokioIo::new(stream), peer, false, ctx)
                    .await;
            });
        }
    }

    /// The next connection on `listener`; None once meshd is stopping (the listener is
    /// then dropped: new connections are refused).
    async fn accept(&self, listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let _ = stream.set_nodelay(true);
                        return Some((stream, peer));
                    }
                    Err(e) => {
                        warn!(error = %e, "L7: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = self.stop.stopping() => return None,
            }
        }
    }

    /// One client connection, until it ends; when meshd stops, its request in flight is
    /// finished and the connection closed after it.
    async fn serve_conn<I>(self: Arc<Self>, io: I, peer: SocketAddr, https: bool, ctx: Arc<Ctx>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let _active = Active::new(&self.active);
        let client = Arc::new(Client::new(peer, https));
        // Per request only the worker's own context is cloned (see `Worker`).
        let svc = hyper::service::service_fn(move |req| {
            let (ctx, client) = (ctx.clone(), client.clone());
            async move {
                let r = ctx.proxy.handle(&ctx, req, &client);
                Ok::<_, Infallible>(r.await)
            }
        });
        let builder = self.conn_builder();
        let conn = builder.serve_connection_with_upgrades(io, svc);
        tokio::pin!(conn);
        let r = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.stop.stopping() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = r {
            debug!(%peer, error = %e, "L7: client connection ended");
        }
    }

    /// Stops taking connections and waits, at most `grace`, for the requests in flight.
    pub async fn stop(&self, grace: Duration) {
        self.stop.stop();
        let until = Instant::now() + grace;
        while self.active.load(Ordering::Relaxed) > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.active.load(Ordering::Relaxed);
        if left > 0 {
            warn!(
                connections = left,
                ?grace,
                "L7: stopping with connections still open"
            );
        } else {
            info!("L7: every request in flight finished");
        }
    }

    /// One request: its route, one of the route's upstreams, the response with Interlock's
    /// headers.
    async fn handle(&self, ctx: &Ctx, req: Request<Incoming>, client: &Client) -> Response<Body> {
        let started = Instant::now();
        let _in_flight = Active::new(&ctx.worker.in_flight);
        let id = req
            .headers()
            .get(&X_REQUEST_ID)
            .filter(|v| !v.is_empty() && v.len() <= 200 && v.to_str().is_ok())
            .cloned()
            .unwrap_or_else(|| ctx.ids.next());
        // HTTP/1.1 names the host in its header, h2 in the URI.
        let host = req
            .headers()
            .get(header::HOST)
            .filter(|h| h.to_str().is_ok())
            .cloned()
            .or_else(|| {
                req.uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            })
            .unwrap_or(HeaderValue::from_static(""));
        let host_str = host.to_str().unwrap_or_default();
        let logged_path = self
            .settings
            .access_log
            .then(|| req.uri().path().to_string());
        let found = ctx
            .worker
            .table
            .load()
            .lookup(host_str, req.uri().path())
            .map(|(served, prefix)| {
                // Only a rewrite needs the prefix again.
                let prefix = match served.route.spec.context_root_rewrite {
                    true => prefix.to_string(),
                    false => String::new(),
                };
                (served.clone(), prefix)
            });
        let mut resp = match found {
            None => text(
                StatusCode::NOT_FOUND,
                format!(
                    "meshd: no route for {}{}\n",
                    normalize_host(host_str),
                    req.uri().path()
                ),
            ),
            Some((served, prefix)) => {
                let r = self
                    .to_route(&ctx.pool, req, &served, &host, &prefix, client, &id)
                    .await;
                served.stats.record(r.status().as_u16(), started.elapsed());
                r
            }
        };
        let h = resp.headers_mut();
        h.insert(X_REQUEST_ID, id.clone());
        if let Some(v) = &self.proxy_id_header {
            h.insert(X_PROXY_ID, v.clone());
            h.insert(
                X_SERVER_INFO,
                HeaderValue::from_static(concat!("meshd/", env!("CARGO_PKG_VERSION"))),
            );
        }
        if let Some(path) = logged_path {
            let upstream = resp
                .headers()
                .get(&X_UPSTREAM_ADDR)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            let id = id.to_str().unwrap_or_default();
            tracing::info!(target: "meshd::l7::access", client = %client.peer, host = %host_str, path = %path, status = resp.status().as_u16(), upstream, ms = started.elapsed().as_secs_f64() * 1000.0, request_id = %id, "request");
        }
        resp
    }

    #[allow(clippy::too_many_arguments)]
    async fn to_route(
        &self,
        pool: &Arc<Pool>,
        req: Request<Incoming>,
        served: &Arc<Served>,
        host_value: &HeaderValue,
        prefix: &str,
        client: &Client,
        id: &HeaderValue,
    ) -> Response<Body> {
        let (peer, https) = (client.peer, client.https);
        let host = host_value.to_str().unwrap_or_default();
        let spec = &served.route.spec;
        let bare_host = normalize_host(host);
        // From another node's meshd relaying for a network it has no namespace on: that
        // node already answered redirects and set X-Forwarded-*; its client is the first
        // X-Forwarded-For. Only swarm nodes are believed.
        let relayed = req.headers().contains_key(&RELAY_HEADER)
            && match peer.ip() {
                std::net::IpAddr::V4(ip) => self.nodes.load().contains(&ip),
                _ => false,
            };
        if !relayed {
            if let Some(r) = spec
                .redirects
                .iter()
                .find(|r| r.from_host == bare_host && r.from_https == https)
            {
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                return redirect(
                    StatusCode::FOUND,
                    &format!("{}{pq}", r.to.trim_end_matches('/')),
                );
            }
            if spec.ssl_only && !https {
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                let port = match self.settings.https_port {
                    Some(443) | None => String::new(),
                    Some(p) => format!(":{p}"),
                };
                return redirect(
                    StatusCode::MOVED_PERMANENTLY,
                    &format!("https://{bare_host}{port}{pq}"),
                );
            }
        }
        let ups = &served.route.upstreams;
        if ups.is_empty() {
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("meshd: {} has no task serving\n", served.route.service_name),
            );
        }
        // The cookie's value, or the client's address, keeps its task: by rendezvous
        // hashing, so every node picks the same one and a task coming or going moves only
        // the keys that were on it.
        let sticky = spec
            .sticky_session_cookie
            .as_deref()
            .and_then(|name| cookie(req.headers(), name));
        let first = match (sticky, spec.ip_hash) {
            (Some(v), _) => rendezvous(v.as_bytes(), ups),
            (None, true) => match relayed.then(|| first_forwarded(req.headers())).flatten() {
                Some(ip) => rendezvous(ip.as_bytes(), ups),
                None => rendezvous(client.ip.as_bytes(), ups),
            },
            (None, false) => served.stats.next.fetch_add(1, Ordering::Relaxed),
        };
        let (mut parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.settings.max_body) {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("meshd: the body is over {} bytes\n", self.settings.max_body),
            );
        }
        // A websocket upgrade on a path the route lists goes through; elsewhere its
        // headers are dropped like any connection header (Interlock's websocket_endpoints).
        let upgrade = parts
            .headers
            .get(header::UPGRADE)
            .cloned()
            .filter(|_| wants_upgrade(&parts.headers, parts.version))
            .filter(|_| {
                spec.websocket_endpoints
                    .iter()
                    .any(|p| super::table::under(parts.uri.path(), p))
            });
        let client_upgrade = upgrade
            .as_ref()
            .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
        if relayed {
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(&RELAY_HEADER);
        } else {
            forwarded_headers(&mut parts.headers, host_value, &client.ip, https);
        }
        if let Some(u) = &upgrade {
            parts.headers.insert(header::UPGRADE, u.clone());
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        parts.headers.insert(X_REQUEST_ID, id.clone());
        // Where to send it: the tasks, from the namespace this node has on their network;
        // else a node that runs one of them, which has.
        let no_namespace = served.netns.is_none()
            && matches!(served.route.via, crate::compile::l7::Via::Network(_));
        let relays = &served.route.relays;
        if no_namespace {
            if relayed {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "meshd: {} has no namespace on the network of {} either\n",
                        self.settings.proxy_id, served.route.service_name
                    ),
                );
            }
            if relays.is_empty() {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("meshd: no node to relay {} to\n", served.route.service_name),
                );
            }
            if let Some(v) = &self.relay_header {
                parts.headers.insert(RELAY_HEADER, v.clone());
            }
            parts.uri = origin_form(&parts.uri);
        } else {
            let rewritten = rewritten_path(&parts.uri, prefix, spec.context_root_rewrite);
            parts.uri = match rewritten.map(|p| p.parse::<Uri>()) {
                Some(Ok(u)) => u,
                Some(Err(_)) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "meshd: the path rewritten is not a path\n".into(),
                    )
                }
                None => origin_form(&parts.uri),
            };
        }
        parts.version = Version::HTTP_11;
        // ssl_backend: TLS to the task, named as the client named the host.
        let tls = (spec.ssl_backend && !no_namespace).then(|| BackendTls {
            server_name: bare_host.clone(),
            verify: spec.ssl_backend_tls_verify == super::labels::TlsVerify::Required,
        });
        let count = if no_namespace {
            relays.len()
        } else {
            ups.len()
        };
        let target = |i: usize| -> (Target, Option<&HeaderValue>) {
            let k = (first + i) % count;
            if no_namespace {
                let addr = std::net::SocketAddrV4::new(relays[k], self.settings.http_port);
                let t = Target {
                    addr,
                    netns: None,
                    tls: None,
                };
                (t, None)
            } else {
                let t = Target {
                    addr: ups[k].addr,
                    netns: served.netns.clone(),
                    tls: tls.clone(),
                };
                (t, served.upstream_addr.get(k))
            }
        };
        // An upstream that cannot be connected to never saw the request: the next one
        // gets it (a task that just went away loses nothing), whatever its method.
        let max_body = self.settings.max_body as usize;
        let mut req = Some(Request::from_parts(
            parts,
            http_body_util::Limited::new(body, max_body).boxed(),
        ));
        let mut last = String::new();
        let mut i = 0;
        while i < count.min(MAX_TRIES) {
            let (target, addr_header) = target(i);
            let addr = target.addr;
            let mut conn = match pool.get(target).await {
                Ok(c) => c,
                Err(e) => {
                    debug!(request = ?id, upstream = %addr, error = %e, "L7: upstream connect failed");
                    last = format!("{addr}: {e}");
                    i += 1;
                    continue;
                }
            };
            let Some(r) = req.take() else { break };
            let sent = Instant::now();
            let answer = conn.send.try_send_request(r);
            let answer = match tokio::time::timeout(self.settings.read_timeout, answer).await {
                Ok(a) => a,
                Err(_) => {
                    return text(
                        StatusCode::GATEWAY_TIMEOUT,
                        format!(
                            "meshd: upstream {} sent no answer in {:?}\n",
                            addr, self.settings.read_timeout
                        ),
                    )
                }
            };
            let mut resp = match answer {
                Ok(resp) => resp,
                Err(mut e) => {
                    if let Some(r) = e.take_message() {
                        // The connection closed before the request was written: a pooled
                        // one the upstream had just shut; another gets it.
                        debug!(request = ?id, upstream = %addr, error = %e.error(), "L7: upstream connection was closed");
                        last = format!("{}: {}", addr, e.error());
                        req = Some(r);
                        if !conn.reused {
                            i += 1;
                        }
                        continue;
                    }
                    let e = e.into_error();
                    let too_big = std::error::Error::source(&e)
                        .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                    if too_big {
                        return text(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            format!("meshd: the body is over {} bytes\n", self.settings.max_body),
                        );
                    }
                    return text(
                        StatusCode::BAD_GATEWAY,
                        format!("meshd: upstream {} failed: {e}\n", addr),
                    );
                }
            };
            let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            let tunnel = match (&client_upgrade, switching) {
                (Some(_), true) => Some(hyper::upgrade::on(&mut resp)),
                _ => None,
            };
            let (mut rp, rb) = resp.into_parts();
            let theirs = rp.headers.get(header::UPGRADE).cloned();
            strip_hop_by_hop(&mut rp.headers);
            // A relaying node passes on what the node that had the task said.
            if let Some(v) = addr_header {
                rp.headers.insert(X_UPSTREAM_ADDR, v.clone());
                rp.headers
                    .insert(X_UPSTREAM_RESPONSE_TIME, seconds_header(sent.elapsed()));
            }
            if let (Some(up_side), Some(client_side)) = (tunnel, client_upgrade) {
                if let Some(u) = theirs {
                    rp.headers.insert(header::UPGRADE, u);
                }
                rp.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                let id = id.clone();
                tokio::spawn(async move {
                    match tokio::try_join!(client_side, up_side) {
                        Ok((c, u)) => {
                            let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                            let r = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                            debug!(request = ?id, result = ?r, "L7: upgraded connection ended");
                        }
                        Err(e) => debug!(request = ?id, error = %e, "L7: upgrade failed"),
                    }
                });
                // The connection is the tunnel now, not the pool's.
                return Response::from_parts(rp, rb.boxed());
            }
            return Response::from_parts(rp, Returning::new(rb, conn).boxed());
        }
        text(
            StatusCode::BAD_GATEWAY,
            format!("meshd: could not connect to an upstream ({last})\n"),
        )
    }
}

/// Counts a client connection (or a request) while it lives.
struct Active(Arc<AtomicUsize>);

impl Active {
    fn new(n: &Arc<AtomicUsize>) -> Active {
        n.fetch_add(1, Ordering::Relaxed);
        Active(n.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A non-blocking listening socket on `addr` that other workers may bind too.
fn reuseport_listener(addr: SocketAddr) -> Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else {
        anyhow::bail!("{addr}: the L7 listeners are IPv4");
    };
    // SAFETY: plain socket calls on a descriptor owned by the OwnedFd made at once.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let owned = std::os::fd::OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
            || libc::listen(fd, 1024) != 0
        {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(std::net::TcpListener::from(owned))
    }
}

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade` and `Upgrade`).
fn wants_upgrade(h: &HeaderMap, v: Version) -> bool {
    v == Version::HTTP_11
        && h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Marks a request relayed by another node's meshd (its value: that node's name).
const RELAY_HEADER: HeaderName = HeaderName::from_static("x-meshd-relayed-by");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_PROXY_ID: HeaderName = HeaderName::from_static("x-proxy-id");
const X_SERVER_INFO: HeaderName = HeaderName::from_static("x-server-info");
const X_UPSTREAM_ADDR: HeaderName = HeaderName::from_static("x-upstream-addr");
const X_UPSTREAM_RESPONSE_TIME: HeaderName = HeaderName::from_static("x-upstream-response-time");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The first address of `X-Forwarded-For`: the client, as the first proxy saw it.
fn first_forwarded(h: &HeaderMap) -> Option<String> {
    let v = h.get(&X_FORWARDED_FOR)?.to_str().ok()?;
    let first = v.split(',').next()?.trim();
    first
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string())
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// The upstream with the highest score for `key` (highest random weight): stable across
/// nodes and restarts (FNV-1a, not a keyed hash), and only the keys of a task that leaves
/// move.
fn rendezvous(key: &[u8], ups: &[Upstream]) -> usize {
    let score = |u: &Upstream| {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key
            .iter()
            .chain(&u.addr.ip().octets())
            .chain(&u.addr.port().to_be_bytes())
        {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        meshd_common::mix64(h)
    };
    (0..ups.len()).max_by_key(|&i| score(&ups[i])).unwrap_or(0)
}

/// The path and query sent upstream with the context root taken off, when the route says
/// so (None: the request's own).
fn rewritten_path(uri: &Uri, prefix: &str, rewrite: bool) -> Option<String> {
    let pq = uri.path_and_query().map_or("/", |p| p.as_str());
    if !rewrite || prefix == "/" || prefix.is_empty() {
        return None;
    }
    match pq.strip_prefix(prefix) {
        Some(rest) if rest.starts_with('/') => Some(rest.to_string()),
        Some(rest) => Some(format!("/{rest}")),
        None => None,
    }
}

/// The request's URI as an HTTP/1.1 upstream wants it: path and query only (h2 and
/// absolute-form requests carry a scheme and authority too).
fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() && uri.path_and_query().is_some() {
        return uri.clone();
    }
    match uri.path_and_query() {
        Some(pq) => Uri::from(pq.clone()),
        None => Uri::from_static("/"),
    }
}

/// `x-upstream-response-time`: seconds with three decimals, as Interlock's nginx gives it.
/// Digits by `itoa` into a stack buffer: `format!` showed in the request path's profile.
fn seconds_header(took: Duration) -> HeaderValue {
    let ms = took.as_millis().min(u64::MAX as u128) as u64;
    let (mut secs, mut frac) = (itoa::Buffer::new(), itoa::Buffer::new());
    let mut out = [0u8; 24];
    let s = secs.format(ms / 1000).as_bytes();
    // 1000 + the milliseconds: four digits, the last three zero-padded.
    let f = &frac.format(1000 + ms % 1000).as_bytes()[1..];
    out[..s.len()].copy_from_slice(s);
    out[s.len()] = b'.';
    out[s.len() + 1..s.len() + 4].copy_from_slice(f);
    HeaderValue::from_bytes(&out[..s.len() + 4]).unwrap_or(HeaderValue::from_static("0.000"))
}

/// `X-Forwarded-For` (appended to), `-Proto`, `-Host`, as Interlock's proxy sends them; and
/// the headers that belong to the client's connection alone taken off.
/// `client_ip`: the client's address as a header value, made once per connection.
fn forwarded_headers(h: &mut HeaderMap, host: &HeaderValue, client_ip: &HeaderValue, https: bool) {
    strip_hop_by_hop(h);
    let xff = match h.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prev) if !prev.is_empty() => {
            let mut v = Vec::with_capacity(prev.len() + 2 + client_ip.len());
            v.extend_from_slice(prev);
            v.extend_from_slice(b", ");
            v.extend_from_slice(client_ip.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        _ => Some(client_ip.clone()),
    };
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    h.insert(X_FORWARDED_HOST, host.clone());
    // h2 has no Host header; the upstream speaks HTTP/1.1 and needs one (empty when the
    // client named none: a default_backend's HTTP/1.0 request).
    h.entry(header::HOST).or_insert_with(|| host.clone());
}

const HOP_BY_HOP: [HeaderName; 8] = [
    HeaderName::from_static("keep-alive"),
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Most messages have none of them: one pass over the names, no lookups.
    let any = h
        .keys()
        .any(|k| *k == header::CONNECTION || HOP_BY_HOP.contains(k));
    if !any {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    h.remove(header::CONNECTION);
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn redirect(status: StatusCode, to: &str) -> Response<Body> {
    let mut r = text(status, format!("{to}\n"));
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// 128-bit request ids: a counter from a random start through two randomly keyed
/// bijective mixes (unique while the counter does not wrap, not guessable from the
/// previous one at a glance; not a secret). Two SipHash rounds per request showed in the
/// request path's profile; this is a few multiplications.
struct RequestIds {
    keys: [u64; 2],
    n: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let k = |salt: u8| RandomState::new().hash_one(salt);
        RequestIds {
            keys: [k(0), k(1)],
            n: AtomicU64::new(k(2)),
        }
    }
}

impl RequestIds {
    fn next(&self) -> HeaderValue {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        let half = |key: u64| meshd_common::mix64(meshd_common::mix64(n ^ key).wrapping_add(key));
        let id = (u128::from(half(self.keys[0])) << 64) | u128::from(half(self.keys[1]));
        let mut hex = [0u8; 32];
        for (i, b) in hex.iter_mut().enumerate() {
            *b = b"0123456789abcdef"[((id >> (124 - 4 * i)) & 0xf) as usize];
        }
        HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("-"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_roots_are_taken_off_only_when_asked() {
        let u: Uri = "/app/x?q=1".parse().unwrap();
        assert_eq!(rewritten_path(&u, "/app", true).as_deref(), Some("/x?q=1"));
        assert_eq!(rewritten_path(&u, "/app", false), None);
        let u: Uri = "/app?q=1".parse().unwrap();
        assert_eq!(rewritten_path(&u, "/app", true).as_deref(), Some("/?q=1"));
        assert_eq!(rewritten_path(&"/".parse().unwrap(), "/", true), None);
        // h2 and absolute-form requests go upstream in origin form.
        let abs: Uri = "https://shop.example.com/a?b=1".parse().unwrap();
        assert_eq!(origin_form(&abs), "/a?b=1");
        assert_eq!(origin_form(&"/x".parse().unwrap()), "/x");
        assert_eq!(origin_form(&"shop.example.com:443".parse().unwrap()), "/");
    }

    #[test]
    fn forwarded_headers_append_and_connection_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        let client = Client::new("192.168.100.200:5000".parse().unwrap(), false);
        forwarded_headers(
            &mut h,
            &HeaderValue::from_static("shop.example.com"),
            &client.ip,
            false,
        );
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 192.168.100.200");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example.com");
        assert_eq!(h[header::HOST], "shop.example.com");
        assert!(!h.contains_key("x-secret") && !h.contains_key("keep-alive"));
        assert!(!h.contains_key(header::CONNECTION));
        // A request that named no host still goes upstream with one (empty), as HTTP/1.1
        // wants.
        let mut h = HeaderMap::new();
        forwarded_headers(&mut h, &HeaderValue::from_static(""), &client.ip, true);
        assert_eq!(h[header::HOST], "");
        assert_eq!(h["x-forwarded-for"], "192.168.100.200");
        assert_eq!(h["x-forwarded-proto"], "https");
    }

    #[test]
    fn a_cookie_keeps_its_task_and_a_task_leaving_moves_only_its_own() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; app_session=\"s42\""),
        );
        assert_eq!(cookie(&h, "app_session").as_deref(), Some("s42"));
        assert_eq!(cookie(&h, "other"), None);
        let ups: Vec<Upstream> = (1..=5)
            .map(|i| Upstream {
                addr: format!("10.0.0.{i}:80").parse().unwrap(),
                task: None,
            })
            .collect();
        let keys: Vec<String> = (0..200).map(|i| format!("session-{i}")).collect();
        let before: Vec<std::net::SocketAddrV4> = keys
            .iter()
            .map(|k| ups[rendezvous(k.as_bytes(), &ups)].addr)
            .collect();
        let spread: std::collections::BTreeSet<_> = before.iter().collect();
        assert_eq!(spread.len(), 5, "200 sessions use every task");
        let fewer: Vec<Upstream> = ups
            .iter()
            .filter(|u| u.addr != ups[2].addr)
            .cloned()
            .collect();
        for (k, was) in keys.iter().zip(&before) {
            let now = fewer[rendezvous(k.as_bytes(), &fewer)].addr;
            if *was != ups[2].addr {
                assert_eq!(now, *was, "{k} moved though its task stayed");
            }
        }
    }

    #[test]
    fn response_times_are_seconds_with_three_decimals() {
        for (ms, want) in [
            (0, "0.000"),
            (7, "0.007"),
            (42, "0.042"),
            (999, "0.999"),
            (1000, "1.000"),
            (12345, "12.345"),
            (600_001, "600.001"),
        ] {
            assert_eq!(seconds_header(Duration::from_millis(ms)), want, "{ms} ms");
        }
        assert_eq!(seconds_header(Duration::from_micros(1999)), "0.001");
    }

    #[test]
    fn request_ids_are_unique() {
        let ids = RequestIds::default();
        let a = ids.next();
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(u8::is_ascii_hexdigit), "{a:?}");
        assert_ne!(a, ids.next());
        let many: std::collections::HashSet<HeaderValue> =
            (0..10_000).map(|_| ids.next()).collect();
        assert_eq!(many.len(), 10_000);
        assert_ne!(
            RequestIds::default().next(),
            RequestIds::default().next(),
            "keyed per worker"
        );
    }
}
