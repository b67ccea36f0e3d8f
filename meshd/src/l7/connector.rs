//! Upstream connections opened from inside a namespace attached to the target network, so
//! the proxy itself is attached to nothing.
//!
//! A socket belongs for life to the namespace it was created in, and only `socket()` has to
//! run there: one thread (`SocketMaker`) joins the namespace, makes the socket, and goes
//! home, for each new connection; connecting and all I/O then run on the async workers like
//! any other socket. Namespaces are opened by path each time and never held: holding one
//! would keep a gone container's namespace alive. Pooling (`pool`) makes new connections
//! rare. TLS to the upstream, where a route asks for it, is `backend_tls`.
use std::{
    fs::File,
    net::{SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, Context as _, Result};
use nix::sched::{setns, CloneFlags};
use tokio::net::{TcpSocket, TcpStream};

use super::backend_tls::{BackendTls, BackendTrust, UpstreamIo};

type Job = (
    Option<String>,
    tokio::sync::oneshot::Sender<Result<OwnedFd>>,
);

/// Makes TCP sockets in other namespaces, on a thread of its own.
#[derive(Clone)]
pub struct SocketMaker {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// The child cgroup (under the one meshd's socket programs are attached to) that the
/// socket-making helper process lives in.
pub const HELPER_CGROUP: &str = "meshd-l7-sockets";

impl SocketMaker {
    /// Sockets made by this process: meshd's own cgroup, which the socket load balancer
    /// is not attached to, so a VIP is not translated for them.
    pub fn start() -> Result<SocketMaker> {
        let home = File::open("/proc/thread-self/ns/net").context("open this namespace")?;
        Self::serve(move |path| make(path, &home))
    }

    /// Sockets made by a helper process (this binary, `meshd l7-socket-maker`) placed in
    /// a cgroup below `cgroup`, where meshd's socket programs are attached: a socket keeps
    /// the cgroup it was made in, so an upstream connection to a service VIP
    /// (`backend_mode=vip`) is balanced by the datapath exactly as a container's is. The
    /// helper dies with meshd (parent-death signal); its descriptors come back over a
    /// socket pair (SCM_RIGHTS).
    pub fn start_in_cgroup(cgroup: &Path) -> Result<SocketMaker> {
        let home = File::open("/proc/thread-self/ns/net").context("open this namespace")?;
        let cgroup = cgroup.to_path_buf();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        // The helper is started from the thread that serves it for meshd's whole life: a
        // parent-death signal fires when the *thread* that forked the child ends, so a
        // short-lived thread (a runtime's blocking pool) would take the helper with it.
        let jobs = Self::serve_with(move || {
            let helper = Helper::spawn(&cgroup);
            let ok = helper.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
            let _ = started_tx.send(ok);
            let helper = helper.ok()?;
            let lost = std::sync::atomic::AtomicBool::new(false);
            Some(move |path: Option<&str>| {
                if !lost.load(std::sync::atomic::Ordering::Relaxed) {
                    match helper.socket(path) {
                        Ok(made) => return made,
                        Err(e) => {
                            // Upstreams keep working; only VIPs go untranslated from here.
                            tracing::warn!(error = %format!("{e:#}"), "L7: the socket helper is gone; making upstream sockets in meshd itself");
                            lost.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                }
                make(path, &home)
            })
        })?;
        match started_rx.recv() {
            Ok(Ok(())) => Ok(jobs),
            Ok(Err(e)) => Err(anyhow!(e)),
            Err(_) => Err(anyhow!("the L7 socket thread ended")),
        }
    }

    fn serve(
        make: impl Fn(Option<&str>) -> Result<OwnedFd> + Send + 'static,
    ) -> Result<SocketMaker> {
        Self::serve_with(move || Some(make))
    }

    /// The socket thread: `setup` runs on it first and gives the maker (None: the thread
    /// ends, and every request fails).
    fn serve_with<F, M>(setup: F) -> Result<SocketMaker>
    where
        F: FnOnce() -> Option<M> + Send + 'static,
        M: Fn(Option<&str>) -> Result<OwnedFd>,
    {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("meshd-l7-sockets".into())
            .spawn(move || {
                let Some(make) = setup() else {
                    return;
                };
                for (path, reply) in rx {
                    let _ = reply.send(make(path.as_deref()));
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

/// The socket-making helper process, seen from meshd.
struct Helper {
    child: std::process::Child,
    link: OwnedFd,
    cgroup: PathBuf,
}

impl Helper {
    fn spawn(cgroup: &Path) -> Result<Helper> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let dir = cgroup.join(HELPER_CGROUP);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let (link, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .context("socketpair")?;
        let exe = std::env::current_exe().context("find meshd's own binary")?;
        let mut child = std::process::Command::new(&exe)
            .arg("l7-socket-maker")
            .stdin(std::process::Stdio::from(theirs))
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("start {} l7-socket-maker", exe.display()))?;
        // Before its first socket: every one it makes is made in that cgroup.
        if let Err(e) = std::fs::write(dir.join("cgroup.procs"), child.id().to_string()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e)
                .with_context(|| format!("move the socket helper into {}", dir.display()));
        }
        Ok(Helper {
            child,
            link,
            cgroup: dir,
        })
    }

    /// A socket, or why the helper could not make one; Err: the helper is unreachable.
    fn socket(&self, netns: Option<&str>) -> Result<Result<OwnedFd>> {
        use nix::sys::socket::{recvmsg, send, ControlMessageOwned, MsgFlags};
        send(
            self.link.as_raw_fd(),
            netns.unwrap_or_default().as_bytes(),
            MsgFlags::empty(),
        )
        .context("ask the socket helper")?;
        let mut buf = [0u8; 512];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(std::os::fd::RawFd);
        let msg = recvmsg::<()>(
            self.link.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .context("hear from the socket helper")?;
        let mut fd = None;
        for c in msg.cmsgs().context("the socket helper's answer")? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: a descriptor just received, owned by nobody else.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        let n = msg.bytes;
        match fd {
            Some(fd) => Ok(Ok(fd)),
            None if n == 0 => Err(anyhow!("the socket helper closed its end")),
            None => Ok(Err(anyhow!("{}", String::from_utf8_lossy(&buf[..n])))),
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// `meshd l7-socket-maker`: the helper's side. Makes a socket in the namespace each
/// request names (empty: its own) and sends it back, or the reason it could not; ends
/// when meshd closes the link or dies.
pub fn helper_main() -> Result<()> {
    use nix::sys::socket::{recv, sendmsg, ControlMessage, MsgFlags};
    // SAFETY: asks the kernel to kill this process when its parent (meshd) dies.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let link = 0;
    let home = File::open("/proc/thread-self/ns/net").context("open this namespace")?;
    let mut buf = [0u8; 4096];
    loop {
        let n = recv(link, &mut buf, MsgFlags::empty()).context("read a request")?;
        if n == 0 {
            return Ok(());
        }
        let path = String::from_utf8_lossy(&buf[..n]).into_owned();
        let made = make((!path.is_empty()).then_some(path.as_str()), &home);
        match made {
            Ok(fd) => {
                let fds = [fd.as_raw_fd()];
                sendmsg::<()>(
                    link,
                    &[std::io::IoSlice::new(b"ok")],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                )
                .context("send a socket")?;
            }
            Err(e) => {
                let why = format!("{e:#}");
                let why = &why.as_bytes()[..why.len().min(500)];
                sendmsg::<()>(
                    link,
                    &[std::io::IoSlice::new(why)],
                    &[],
                    MsgFlags::empty(),
                    None,
                )
                .context("send a failure")?;
            }
        }
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

/// Where an upstream is: an address, the namespace to open connections from, and whether
/// to speak TLS to it. The pool keeps connections apart by all three: two networks may use
/// the same addresses, and a TLS connection made for one server name is not reused for
/// another.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub addr: SocketAddrV4,
    pub netns: Option<Arc<str>>,
    pub tls: Option<BackendTls>,
}

/// Opens upstream connections: TCP from the target's namespace, then TLS if it asks.
#[derive(Clone)]
pub struct Connector {
    pub maker: SocketMaker,
    pub timeout: Duration,
    pub trust: Arc<BackendTrust>,
}

impl Connector {
    /// A TCP connection to `t`, opened from its namespace, within the connect timeout.
    pub async fn connect(&self, t: &Target) -> std::io::Result<TcpStream> {
        let fd = self
            .maker
            .socket(t.netns.as_deref().map(str::to_string))
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
        let _ = dead_peer_probes(&stream);
        Ok(stream)
    }
}

/// TCP keep-alive probes after 10 s of silence, every 3 s, 3 unanswered: an upstream whose
/// container vanished without a word (its veth gone with it) fails the request waiting on
/// it within about 20 s, not at the 600 s read timeout. A live task's kernel answers the
/// probes however long its application takes.
fn dead_peer_probes(s: &TcpStream) -> nix::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(s, sockopt::KeepAlive, &true)?;
    setsockopt(s, sockopt::TcpKeepIdle, &10)?;
    setsockopt(s, sockopt::TcpKeepInterval, &3)?;
    setsockopt(s, sockopt::TcpKeepCount, &3)
}

impl Connector {
    /// A connection to `t` ready for HTTP: TCP, and TLS over it when `t` asks for it (the
    /// handshake has the connect timeout too).
    pub async fn open(&self, t: &Target) -> std::io::Result<UpstreamIo> {
        let tcp = self.connect(t).await?;
        let Some(tls) = &t.tls else {
            return Ok(UpstreamIo::Plain(tcp));
        };
        let hs = self.trust.connect(tls, tcp);
        let s = tokio::time::timeout(self.timeout, hs).await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("TLS handshake with {} timed out", t.addr),
            )
        })??;
        Ok(UpstreamIo::Tls(Box::new(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upstream_connections_probe_for_a_dead_peer() {
        use nix::sys::socket::{getsockopt, sockopt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = match l.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            a => panic!("{a}"),
        };
        let c = Connector {
            maker: SocketMaker::start().unwrap(),
            timeout: Duration::from_secs(2),
            trust: Arc::new(BackendTrust::new("/nonexistent".into())),
        };
        let s = c
            .connect(&Target {
                addr,
                netns: None,
                tls: None,
            })
            .await
            .unwrap();
        assert!(getsockopt(&s, sockopt::KeepAlive).unwrap());
        assert_eq!(getsockopt(&s, sockopt::TcpKeepIdle).unwrap(), 10);
        assert_eq!(getsockopt(&s, sockopt::TcpKeepCount).unwrap(), 3);
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
