//! The server: one `Resolver` (zones, upstreams, counters) shared by every container, and a
//! `Listener` per container namespace reading that container's UDP and TCP sockets. Each
//! packet goes through `answer` (the same pure path the tests fuzz) and is answered inline;
//! only forwarded queries leave the read loop, so a slow upstream never stalls local names,
//! and a slow TCP client never stalls anyone else. The caller picks the runtime: meshd gives
//! DNS a single-threaded one of its own, so a query never waits on the control loop and is
//! never handed between threads (a cross-thread wakeup per packet costs more than the answer).
use std::{
    cell::RefCell,
    net::SocketAddr,
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{TcpListener, TcpStream, UdpSocket},
    runtime::Handle,
    sync::Semaphore,
    task::JoinHandle,
};
use tracing::{debug, warn};

use crate::{
    answer::{answer, error_reply, Decision, Transport, Why},
    batch::{send_all, RecvBatch, BATCH},
    latency::Latency,
    upstream::{truncate_for_udp, ForwardError, Forwarded, Upstreams},
    Zones,
};

/// Queries in flight to upstreams at once, over all containers: beyond this a query gets
/// SERVFAIL at once rather than a socket and a task.
const MAX_FORWARDS: usize = 1024;
/// TCP connections open at once per container.
const MAX_TCP_PER_CONTAINER: usize = 64;
/// A TCP client idle this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Stats {
    pub udp: AtomicU64,
    pub tcp: AtomicU64,
    pub answered: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failed: AtomicU64,
    pub truncated: AtomicU64,
    pub refused: AtomicU64,
    pub formerr: AtomicU64,
    pub notimp: AtomicU64,
    pub servfail: AtomicU64,
    pub dropped: AtomicU64,
    /// Query received → reply handed to the kernel, for the queries answered from the
    /// zones (UDP: per receive batch).
    pub local_latency: Latency,
    /// The same for forwarded queries: the upstream's time, mostly (SERVFAIL after every
    /// upstream failed included).
    pub forward_latency: Latency,
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct StatsView {
    pub udp: u64,
    pub tcp: u64,
    pub answered: u64,
    pub forwarded: u64,
    pub forward_failed: u64,
    pub truncated: u64,
    pub refused: u64,
    pub formerr: u64,
    pub notimp: u64,
    pub servfail: u64,
    pub dropped: u64,
}

impl Stats {
    pub fn view(&self) -> StatsView {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsView {
            udp: g(&self.udp),
            tcp: g(&self.tcp),
            answered: g(&self.answered),
            forwarded: g(&self.forwarded),
            forward_failed: g(&self.forward_failed),
            truncated: g(&self.truncated),
            refused: g(&self.refused),
            formerr: g(&self.formerr),
            notimp: g(&self.notimp),
            servfail: g(&self.servfail),
            dropped: g(&self.dropped),
        }
    }

    /// Counts a reply we made by its header: rcode and TC.
    fn count_reply(&self, reply: &[u8]) {
        let bump = |a: &AtomicU64| a.fetch_add(1, Ordering::Relaxed);
        if reply.get(2).is_some_and(|b| b & 0x02 != 0) {
            bump(&self.truncated);
        }
        match reply.get(3).map(|b| b & 0x0f) {
            Some(0) => bump(&self.answered),
            Some(1) => bump(&self.formerr),
            Some(2) => bump(&self.servfail),
            Some(4) => bump(&self.notimp),
            Some(5) => bump(&self.refused),
            _ => bump(&self.answered),
        };
    }
}

/// The asking container: its name (for logs) and its networks (ids, in its order).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub container: String,
    pub networks: Vec<String>,
}

/// What every container's listener shares.
pub struct Resolver {
    pub zones: ArcSwap<Zones>,
    /// Swapped whole when the host's resolv.conf changes; a forward in flight keeps the
    /// set it started with.
    upstreams: ArcSwap<Upstreams>,
    pub stats: Stats,
    forwards: Semaphore,
    seed: AtomicU64,
}

/// A decision with the forward carried out, for `meshctl dns`.
#[derive(Debug, Serialize)]
pub struct Resolution {
    pub why: Why,
    /// The reply bytes the container would get (none when dropped).
    #[serde(skip)]
    pub reply: Option<Vec<u8>>,
    pub upstream: Option<SocketAddr>,
    pub upstream_error: Option<String>,
}

impl Resolver {
    pub fn new(upstreams: Upstreams) -> Self {
        Self {
            zones: ArcSwap::from_pointee(Zones::default()),
            upstreams: ArcSwap::from_pointee(upstreams),
            stats: Stats::default(),
            forwards: Semaphore::new(MAX_FORWARDS),
            seed: AtomicU64::new(0x9e37_79b9_7f4a_7c15),
        }
    }

    /// The upstream servers, in configured order.
    pub fn upstream_servers(&self) -> Vec<SocketAddr> {
        self.upstreams.load().servers().to_vec()
    }

    /// The upstream servers and whether each answered its last query.
    pub fn upstream_reachable(&self) -> Vec<(SocketAddr, bool)> {
        self.upstreams.load().reachable()
    }

    /// Forwards from now on go to `servers`. A server kept from the old set keeps its
    /// failure history, so a resolv.conf rewrite does not bring a dead server back first.
    pub fn set_upstreams(&self, servers: Vec<SocketAddr>) {
        let next = self.upstreams.load().replaced(servers);
        self.upstreams.store(Arc::new(next));
    }

    /// The pure decision for one packet (no forwarding).
    pub fn decide(&self, packet: &[u8], networks: &[String], t: Transport) -> (Decision, Why) {
        // A fresh shuffle per answer; the multiply spreads consecutive counter values.
        let seed = self
            .seed
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        answer(packet, networks, &self.zones.load(), t, seed)
    }

    /// Everything the server does for one packet, forwarding included.
    pub async fn resolve(&self, packet: &[u8], networks: &[String], t: Transport) -> Resolution {
        let started = Instant::now();
        let (decision, why) = self.decide(packet, networks, t);
        let mut out = Resolution {
            why,
            reply: None,
            upstream: None,
            upstream_error: None,
        };
        match decision {
            Decision::Reply(r) => {
                self.stats.count_reply(&r);
                self.stats.local_latency.observe(started.elapsed());
                out.reply = Some(r);
            }
            Decision::Drop => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Forward => {
                let (reply, upstream) = self.forward(packet, t).await;
                out.reply = reply;
                match upstream {
                    Ok(u) => out.upstream = Some(u),
                    Err(e) => out.upstream_error = Some(e.to_string()),
                }
            }
        }
        out
    }

    /// Forwards `packet` and counts it: the reply for the client (SERVFAIL when no upstream
    /// answered), and the upstream that answered or why none did.
    async fn forward(
        &self,
        packet: &[u8],
        t: Transport,
    ) -> (Option<Vec<u8>>, Result<SocketAddr, ForwardError>) {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let out = match self.ask_upstreams(packet, t).await {
            Ok(f) => (Some(f.reply), Ok(f.upstream)),
            Err(e) => {
                self.stats.forward_failed.fetch_add(1, Ordering::Relaxed);
                let servfail = error_reply(packet, hickory_proto::op::ResponseCode::ServFail);
                (servfail, Err(e))
            }
        };
        self.stats.forward_latency.observe(started.elapsed());
        out
    }

    async fn ask_upstreams(&self, packet: &[u8], t: Transport) -> Result<Forwarded, ForwardError> {
        let Ok(_permit) = self.forwards.try_acquire() else {
            return Err(ForwardError::Busy);
        };
        let upstreams = self.upstreams.load_full();
        let mut f = upstreams.forward(packet, t == Transport::Tcp).await?;
        if t == Transport::Udp && f.reply.len() > udp_limit(packet) {
            if let Some(cut) = truncate_for_udp(&f.reply) {
                self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                f.reply = cut;
            }
        }
        Ok(f)
    }
}

/// What a UDP client said it can take: 512, or its EDNS size; anything odd counts as 512.
/// (Parsed again here: only forwarded answers, which are rare and slow anyway, need it.)
fn udp_limit(packet: &[u8]) -> usize {
    hickory_proto::op::Message::from_vec(packet)
        .ok()
        .and_then(|m| {
            m.extensions()
                .as_ref()
                .map(|e| usize::from(e.max_payload()))
        })
        .unwrap_or(512)
        .max(512)
}

/// Serves one container's sockets until dropped.
pub struct Listener {
    pub udp_port: u16,
    pub tcp_port: u16,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Listener {
    /// Starts serving `udp` and `tcp` (already bound in the container's namespace) on
    /// `runtime`, for the container `scope` describes. The scope may change while serving (a
    /// network connect or disconnect) without reopening the sockets.
    pub fn start(
        runtime: &Handle,
        resolver: Arc<Resolver>,
        scope: Arc<ArcSwap<Scope>>,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> std::io::Result<Listener> {
        let udp_port = udp.local_addr()?.port();
        let tcp_port = tcp.local_addr()?.port();
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        // Registered with the runtime that will poll them.
        let _in = runtime.enter();
        let udp = UdpSocket::from_std(udp)?;
        let tcp = TcpListener::from_std(tcp)?;
        let udp_task = runtime.spawn(serve_udp(resolver.clone(), scope.clone(), Arc::new(udp)));
        let tcp_task = runtime.spawn(serve_tcp(resolver, scope, tcp));
        Ok(Listener {
            udp_port,
            tcp_port,
            tasks: vec![udp_task, tcp_task],
        })
    }
}

thread_local! {
    /// Receive buffers shared by every container served on this thread: they are used
    /// only between two awaits, so one set serves them all.
    static RECV: RefCell<RecvBatch> = RefCell::new(RecvBatch::default());
}

async fn serve_udp(resolver: Arc<Resolver>, scope: Arc<ArcSwap<Scope>>, sock: Arc<UdpSocket>) {
    let fd = sock.as_raw_fd();
    let mut out: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(BATCH);
    loop {
        if let Err(e) = sock.readable().await {
            warn!(error = %e, "DNS UDP socket failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        }
        let started = Instant::now();
        let read = sock.try_io(Interest::READABLE, || {
            RECV.with(|b| {
                let mut b = b.borrow_mut();
                let n = b.recv(fd)?;
                let networks = scope.load();
                for i in 0..n {
                    let (packet, from) = b.get(i);
                    handle_udp(&resolver, &networks, &sock, packet, from, &mut out);
                }
                Ok(n)
            })
        });
        match read {
            Ok(n) => {
                resolver.stats.udp.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => {
                // Nothing a client sends can make a read fail for long; don't spin if it does.
                warn!(error = %e, "DNS UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if !out.is_empty() {
            let sent = send_all(fd, &out);
            for (reply, to) in &out[sent..] {
                if let Err(e) = sock.send_to(reply, *to).await {
                    debug!(error = %e, %to, "DNS UDP send failed");
                }
            }
            resolver
                .stats
                .local_latency
                .observe_n(started.elapsed(), out.len() as u64);
            out.clear();
        }
    }
}

/// One UDP query: an answer joins `out`, a forward goes on in a task of its own.
fn handle_udp(
    resolver: &Arc<Resolver>,
    scope: &Scope,
    sock: &Arc<UdpSocket>,
    packet: &[u8],
    from: SocketAddr,
    out: &mut Vec<(Vec<u8>, SocketAddr)>,
) {
    let (decision, why) = resolver.decide(packet, &scope.networks, Transport::Udp);
    match decision {
        Decision::Reply(r) => {
            resolver.stats.count_reply(&r);
            out.push((r, from));
        }
        Decision::Drop => {
            resolver.stats.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(%from, why = why.outcome, container = scope.container, "dropped");
        }
        Decision::Forward => {
            let (resolver, sock, packet) = (resolver.clone(), sock.clone(), packet.to_vec());
            let container = scope.container.clone();
            tokio::spawn(async move {
                let (reply, upstream) = resolver.forward(&packet, Transport::Udp).await;
                if let Err(e) = upstream {
                    // Per query at debug level: an upstream going down is one warning
                    // (`upstream`), and `forward_failed` counts every query it costs.
                    debug!(error = %e, container, "forwarding failed; answering SERVFAIL");
                }
                if let Some(r) = reply {
                    let _ = sock.send_to(&r, from).await;
                }
            });
        }
    }
}

async fn serve_tcp(resolver: Arc<Resolver>, scope: Arc<ArcSwap<Scope>>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_TCP_PER_CONTAINER));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%from, "too many DNS TCP connections from one container; closing");
            continue;
        };
        let (resolver, scope) = (resolver.clone(), scope.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_tcp_client(&resolver, &scope, stream).await {
                debug!(%from, error = %e, "DNS TCP client closed");
            }
            drop(permit);
        });
    }
}

/// Length-prefixed queries, one after the other, until the client closes or idles.
async fn serve_tcp_client(
    resolver: &Resolver,
    scope: &ArcSwap<Scope>,
    mut stream: TcpStream,
) -> std::io::Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(len))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow query"))??;
        resolver.stats.tcp.fetch_add(1, Ordering::Relaxed);
        let networks = scope.load().networks.clone();
        let r = resolver.resolve(&packet, &networks, Transport::Tcp).await;
        let Some(reply) = r.reply else {
            // Nothing to answer to: a TCP client that sends junk is hung up on.
            return Ok(());
        };
        let Ok(n) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::{
        op::{Edns, Message, Query},
        rr::{Name, RecordType},
    };

    fn query(edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new();
        m.add_query(Query::query(
            Name::from_ascii("x.test.").unwrap(),
            RecordType::A,
        ));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn the_udp_limit_is_the_clients_edns_size_never_below_512() {
        assert_eq!(udp_limit(&query(None)), 512);
        assert_eq!(udp_limit(&query(Some(1232))), 1232);
        assert_eq!(udp_limit(&query(Some(100))), 512);
        assert_eq!(udp_limit(b"junk"), 512);
    }

    #[test]
    fn replies_are_counted_by_rcode_and_truncation() {
        let stats = Stats::default();
        // id, flags (QR + TC), rcode in the low nibble of byte 3.
        stats.count_reply(&[0, 1, 0x82, 0x00]);
        stats.count_reply(&[0, 1, 0x80, 0x05]);
        stats.count_reply(&[0, 1, 0x80, 0x01]);
        let v = stats.view();
        assert_eq!(
            (v.answered, v.truncated, v.refused, v.formerr),
            (1, 1, 1, 1)
        );
    }
}
