//! Upstream connections opened from inside a namespace attached to the target network, so
//! the proxy itself is attached to nothing.
//!
//! A socket belongs for life to the namespace it was created in, and only `socket()` has to
//! run there: one thread (`SocketMaker`) joins the namespace, makes the socket, and goes
//! home, for each new connection; connecting and all I/O then run on the async workers like
//! any other socket. Namespaces are opened by path each time and never held: holding one
//! would keep a gone container's namespace alive. Pooling (hyper's client) makes new
//! connections rare.
use std::{
    collections::HashMap,
    fs::File,
    future::Future,
    hash::{Hash, Hasher},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{FromRawFd, OwnedFd},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{anyhow, Context as _, Result};
use hyper::Uri;
use hyper_util::rt::TokioIo;
use nix::sched::{setns, CloneFlags};
use tokio::net::{TcpSocket, TcpStream};

type Job = (
    Option<String>,
    tokio::sync::oneshot::Sender<Result<OwnedFd>>,
);

/// Makes TCP sockets in other namespaces, on a thread of its own.
#[derive(Clone)]
pub struct SocketMaker {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl SocketMaker {
    pub fn start() -> Result<SocketMaker> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let home = File::open("/proc/thread-self/ns/net").context("open this namespace")?;
        std::thread::Builder::new()
            .name("meshd-l7-sockets".into())
            .spawn(move || {
                for (path, reply) in rx {
                    let _ = reply.send(make(path.as_deref(), &home));
                }
            })
            .context("spawn the L7 socket thread")?;
        Ok(SocketMaker { jobs: tx })
    }

    /// A non-blocking TCP socket in the namespace at `netns` (None: this one).
    pub async fn socket(&self, netns: Option<String>) -> Result<OwnedFd> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send((netns, tx))
            .map_err(|_| anyhow!("the L7 socket thread is gone"))?;
        rx.await.context("the L7 socket thread is gone")?
    }
}

fn make(netns: Option<&str>, home: &File) -> Result<OwnedFd> {
    if let Some(path) = netns {
        let ns = File::open(path).with_context(|| format!("open netns {path}"))?;
        setns(&ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("join netns {path}"))?;
    }
    // SAFETY: a plain socket call; the descriptor is owned by the OwnedFd made from it.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    let err = std::io::Error::last_os_error();
    if netns.is_some() {
        // Back home before anything else: this thread makes every namespace's sockets.
        setns(home, CloneFlags::CLONE_NEWNET).context("return to meshd's namespace")?;
    }
    if fd < 0 {
        return Err(err).context("socket");
    }
    // SAFETY: fd is a socket we just made and own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Where an upstream is: an address, and the namespace to open connections from. It travels
/// to the connector as the request URI's authority (`10-0-1-5.<namespace tag>.meshd:8080`),
/// so hyper's pool keeps connections apart per namespace and address (two networks may
/// use the same addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub addr: SocketAddrV4,
    pub netns: Option<String>,
}

/// Namespace tags the connector has seen, to find the path again.
#[derive(Clone, Default)]
pub struct Namespaces(Arc<Mutex<HashMap<u64, String>>>);

impl Namespaces {
    /// The URI authority for `t` (registering its namespace).
    pub fn authority(&self, t: &Target) -> String {
        let tag = match &t.netns {
            Some(p) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                p.hash(&mut h);
                let tag = h.finish() | 1;
                self.0
                    .lock()
                    .unwrap()
                    .entry(tag)
                    .or_insert_with(|| p.clone());
                tag
            }
            None => 0,
        };
        let o = t.addr.ip().octets();
        format!(
            "{}-{}-{}-{}.{tag:x}.meshd:{}",
            o[0],
            o[1],
            o[2],
            o[3],
            t.addr.port()
        )
    }

    /// The target an authority names.
    fn target(&self, uri: &Uri) -> Result<Target> {
        let host = uri.host().context("no host")?;
        let port = uri.port_u16().context("no port")?;
        let mut parts = host.split('.');
        let ip: Vec<u8> = parts
            .next()
            .unwrap_or_default()
            .split('-')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("not an upstream address")?;
        let [a, b, c, d] = ip[..] else {
            return Err(anyhow!("not an upstream address: {host}"));
        };
        let tag = u64::from_str_radix(parts.next().unwrap_or_default(), 16)
            .context("not a namespace tag")?;
        let netns = match tag {
            0 => None,
            t => Some(
                self.0
                    .lock()
                    .unwrap()
                    .get(&t)
                    .cloned()
                    .context("unknown namespace tag")?,
            ),
        };
        Ok(Target {
            addr: SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), port),
            netns,
        })
    }

    /// Forgets the tags of namespaces no route uses any more.
    pub fn retain(&self, used: &std::collections::BTreeSet<String>) {
        self.0.lock().unwrap().retain(|_, p| used.contains(p));
    }
}

/// hyper's connector: opens the connection a URI's authority names.
#[derive(Clone)]
pub struct Connector {
    pub maker: SocketMaker,
    pub namespaces: Namespaces,
    pub timeout: Duration,
}

impl Connector {
    /// A TCP connection to `t`, opened from its namespace, within the connect timeout.
    pub async fn connect(&self, t: &Target) -> std::io::Result<TcpStream> {
        let fd = self
            .maker
            .socket(t.netns.clone())
            .await
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
        let stream = tokio::time::timeout(self.timeout, socket.connect(SocketAddr::V4(t.addr)))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {} timed out after {:?}", t.addr, self.timeout),
                )
            })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let t = this
                .namespaces
                .target(&uri)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
            Ok(TokioIo::new(this.connect(&t).await?))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_authority_names_its_target_again() {
        let ns = Namespaces::default();
        let t = Target {
            addr: "10.0.1.5:8080".parse().unwrap(),
            netns: Some("/run/docker/netns/abc".into()),
        };
        let uri: Uri = format!("http://{}/x", ns.authority(&t)).parse().unwrap();
        assert_eq!(ns.target(&uri).unwrap(), t);
        let host = Target {
            addr: "192.168.0.2:8081".parse().unwrap(),
            netns: None,
        };
        let uri: Uri = format!("http://{}/", ns.authority(&host)).parse().unwrap();
        assert_eq!(ns.target(&uri).unwrap(), host);
        let uri: Uri = format!("http://{}/x", ns.authority(&t)).parse().unwrap();
        ns.retain(&Default::default());
        assert!(
            ns.target(&uri).is_err(),
            "a namespace no route uses is forgotten"
        );
    }

    #[tokio::test]
    async fn sockets_are_made_in_the_namespace_asked_for() {
        let maker = SocketMaker::start().unwrap();
        // This namespace, by path and by None: both give sockets that can listen here.
        for ns in [None, Some("/proc/self/ns/net".to_string())] {
            let fd = maker.socket(ns).await.unwrap();
            let s = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
            s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        }
        let e = maker
            .socket(Some("/nonexistent/netns".into()))
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("open netns"), "{e:#}");
    }
}
