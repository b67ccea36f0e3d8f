//! Upstream connections kept open between requests, one pool per L7 worker.
//!
//! A request takes the newest idle connection to its target, or opens one; the connection
//! comes back when its response has been read to the end (`Returning`), and an idle one
//! is closed after the keep-alive time or as soon as its upstream closes it.
//!
//! Written here instead of using hyper-util's pooling client because the request path is
//! where meshd's CPU goes, and that client cost about a third of it: it keys connections
//! by URI authority (meshd had to encode the namespace and TLS wish into a made-up host
//! name and parse it back on every connect), and it spawns a task per request to give the
//! connection back. Here the key is the target itself, and a connection that cannot be
//! opened leaves the request in the caller's hands for the next upstream, never copied.
use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use hyper::{
    body::{Body as _, Frame, Incoming, SizeHint},
    client::conn::http1::SendRequest,
};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::connector::{Connector, Target};

/// A request body on its way upstream (limited: its error may be the limit's).
pub type UpBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Idle connections kept per target; more are closed when given back.
const MAX_IDLE_PER_TARGET: usize = 256;

/// How long a connection given back may take to be ready for the next request (its task
/// taking in the end of the last response) before it is dropped instead.
const READY_WAIT: Duration = Duration::from_secs(1);

pub struct Pool {
    connector: Connector,
    keepalive: Duration,
    /// foldhash: SipHash of the target twice per request showed in the profile.
    idle: Mutex<HashMap<Target, Vec<Idle>, foldhash::fast::RandomState>>,
}

struct Idle {
    send: SendRequest<UpBody>,
    since: Instant,
}

/// A connection taken from the pool (or just opened) for one request.
pub struct Conn {
    pub send: SendRequest<UpBody>,
    target: Target,
    pool: Arc<Pool>,
    /// It served a request before.
    pub reused: bool,
}

impl Pool {
    pub fn new(connector: Connector, keepalive: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            connector,
            keepalive,
            idle: Mutex::default(),
        })
    }

    /// An open connection to `t`: the newest idle one still good, else a new one.
    pub async fn get(self: &Arc<Self>, t: Target) -> io::Result<Conn> {
        while let Some(mut idle) = self.take_idle(&t) {
            if idle.since.elapsed() >= self.keepalive {
                continue;
            }
            let ready = idle.send.is_ready()
                || matches!(
                    tokio::time::timeout(READY_WAIT, idle.send.ready()).await,
                    Ok(Ok(()))
                );
            if ready {
                return Ok(self.conn(idle.send, t, true));
            }
        }
        let io = self.connector.open(&t).await?;
        let (send, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(io::Error::other)?;
        let addr = t.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(upstream = %addr, error = %e, "L7: upstream connection ended");
            }
        });
        Ok(self.conn(send, t, false))
    }

    fn conn(self: &Arc<Self>, send: SendRequest<UpBody>, target: Target, reused: bool) -> Conn {
        Conn {
            send,
            target,
            pool: self.clone(),
            reused,
        }
    }

    fn take_idle(&self, t: &Target) -> Option<Idle> {
        self.idle.lock().unwrap().get_mut(t)?.pop()
    }

    /// Takes a connection back into the pool it came from (its own reference to it, no
    /// second one).
    fn put(c: Conn) {
        let Conn {
            send, target, pool, ..
        } = c;
        if send.is_closed() {
            return;
        }
        let mut idle = pool.idle.lock().unwrap();
        let list = idle.entry(target).or_default();
        if list.len() < MAX_IDLE_PER_TARGET {
            list.push(Idle {
                send,
                since: Instant::now(),
            });
        }
    }

    /// Closes the idle connections past the keep-alive time or closed by their upstream,
    /// and forgets targets with none left (a task or namespace gone for good).
    pub fn sweep(&self) {
        let keepalive = self.keepalive;
        self.idle.lock().unwrap().retain(|_, list| {
            list.retain(|i| i.since.elapsed() < keepalive && !i.send.is_closed());
            !list.is_empty()
        });
    }

    /// Sweeps every few seconds, for as long as the worker runs.
    pub async fn sweep_forever(self: Arc<Self>) {
        let every = (self.keepalive / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep();
        }
    }

    /// Idle connections now (all targets).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().values().map(Vec::len).sum()
    }
}

/// A response body that gives its connection back to the pool once read to the end. A
/// body dropped before its end takes the connection with it: it may still carry the rest.
pub struct Returning {
    body: Incoming,
    conn: Option<Conn>,
}

impl Returning {
    pub fn new(body: Incoming, conn: Conn) -> Returning {
        let mut r = Returning {
            body,
            conn: Some(conn),
        };
        if r.body.is_end_stream() {
            r.give_back();
        }
        r
    }

    fn give_back(&mut self) {
        if let Some(c) = self.conn.take() {
            Pool::put(c);
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &r {
            None => self.give_back(),
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            Some(Err(_)) => self.conn = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l7::{backend_tls::BackendTrust, connector::SocketMaker};
    use http_body_util::{BodyExt, Empty};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 server that answers every request on a connection with `body` and
    /// counts the connections it was given.
    async fn server(body: &'static str) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let Ok(k) = s.read(&mut buf).await else {
                            return;
                        };
                        if k == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..k]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    fn pool(keepalive: Duration) -> Arc<Pool> {
        Pool::new(
            Connector {
                maker: SocketMaker::start().unwrap(),
                timeout: Duration::from_secs(2),
                trust: Arc::new(BackendTrust::new("/nonexistent".into())),
            },
            keepalive,
        )
    }

    fn target(addr: SocketAddr) -> Target {
        let SocketAddr::V4(addr) = addr else {
            panic!("{addr}")
        };
        Target {
            addr,
            netns: None,
            tls: None,
        }
    }

    fn get_root() -> hyper::Request<UpBody> {
        hyper::Request::builder()
            .uri("/")
            .header("host", "x")
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap()
    }

    async fn get_once(pool: &Arc<Pool>, t: &Target) -> (bool, Bytes) {
        let mut c = pool.get(t.clone()).await.unwrap();
        let reused = c.reused;
        let resp = c.send.send_request(get_root()).await.unwrap();
        let body = Returning::new(resp.into_body(), c);
        (reused, body.collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn a_connection_read_to_its_end_serves_the_next_request() {
        let (addr, conns) = server("hello").await;
        let pool = pool(Duration::from_secs(60));
        let t = target(addr);
        let (reused, body) = get_once(&pool, &t).await;
        assert!(!reused);
        assert_eq!(&body[..], b"hello");
        for _ in 0..10 {
            let (reused, body) = get_once(&pool, &t).await;
            assert!(reused, "the first connection came back");
            assert_eq!(&body[..], b"hello");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_early_takes_its_connection_along() {
        let (addr, conns) = server("a longer body than anyone reads").await;
        let pool = pool(Duration::from_secs(60));
        let t = target(addr);
        let mut c = pool.get(t.clone()).await.unwrap();
        let resp = c.send.send_request(get_root()).await.unwrap();
        drop(Returning::new(resp.into_body(), c));
        assert_eq!(pool.idle_count(), 0);
        let (reused, _) = get_once(&pool, &t).await;
        assert!(!reused);
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_expire_and_are_swept() {
        let (addr, conns) = server("x").await;
        let pool = pool(Duration::from_millis(200));
        let t = target(addr);
        get_once(&pool, &t).await;
        assert_eq!(pool.idle_count(), 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while pool.idle_count() > 0 {
            assert!(
                Instant::now() < deadline,
                "the idle connection was never swept"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            pool.sweep();
        }
        let (reused, _) = get_once(&pool, &t).await;
        assert!(!reused, "an expired connection is not reused");
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_target_that_refuses_is_an_error_not_a_hang() {
        // A port nothing listens on: bound, then closed.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let pool = pool(Duration::from_secs(60));
        assert!(pool.get(target(addr)).await.is_err());
    }
}
