//! meshd's DNS sockets in each local container: UDP and TCP on `127.0.0.11` inside the
//! container's network namespace, opened when the container appears and closed when it goes
//! (an open socket would keep a dead container's namespace alive).
//!
//! The ports are ephemeral, as dockerd's own resolver's are, so they never collide with a
//! port the application binds; the eBPF hooks send `127.0.0.11:53` there (see
//! `DnsPorts`). A restarted meshd rebinds the ports the pinned map already names, so a
//! query retried across the restart still lands.
use std::{
    collections::BTreeMap,
    fs::File,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use meshd_dns::server::{Listener, Resolver, Scope};
use nix::sched::{setns, CloneFlags};
use serde::Serialize;
use tracing::{info, warn};

use crate::model::Sandbox;

pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

struct Open {
    cookie: u64,
    scope: Arc<ArcSwap<Scope>>,
    listener: Listener,
}

/// One container's DNS sockets, for `meshctl status`.
#[derive(Clone, Debug, Serialize)]
pub struct SandboxDns {
    pub container_id: String,
    pub name: String,
    pub netns_cookie: u64,
    pub udp_port: u16,
    pub tcp_port: u16,
}

#[derive(Clone, Debug, Serialize)]
pub struct OpenFailure {
    pub container_id: String,
    pub name: String,
    pub reason: String,
}

pub struct DnsSandboxes {
    resolver: Arc<Resolver>,
    runtime: tokio::runtime::Handle,
    /// By container id.
    open: BTreeMap<String, Open>,
}

impl DnsSandboxes {
    /// Serves on `runtime` (meshd gives DNS a thread of its own).
    pub fn new(resolver: Arc<Resolver>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            resolver,
            runtime,
            open: BTreeMap::new(),
        }
    }

    /// Opens sockets for new containers, closes those of containers that are gone, and
    /// updates the networks of the rest. Returns the redirect table (netns cookie → udp and
    /// tcp port) and the containers whose sockets could not be opened (tried again on the
    /// next sync). `previous` are ports a former meshd used, tried first.
    pub fn sync(
        &mut self,
        sandboxes: &[Sandbox],
        previous: &BTreeMap<u64, (u16, u16)>,
    ) -> (BTreeMap<u64, (u16, u16)>, Vec<OpenFailure>) {
        self.open.retain(|id, o| {
            let keep = sandboxes
                .iter()
                .any(|s| &s.container_id == id && s.netns_cookie == o.cookie);
            if !keep {
                info!(container = %id, "closing DNS sockets");
            }
            keep
        });
        let mut failures = Vec::new();
        for s in sandboxes {
            let scope = Scope {
                container: s.name.clone(),
                networks: s.networks.clone(),
            };
            if let Some(o) = self.open.get(&s.container_id) {
                if **o.scope.load() != scope {
                    o.scope.store(Arc::new(scope));
                }
                continue;
            }
            match self.start(s, scope, previous.get(&s.netns_cookie).copied()) {
                Ok(o) => {
                    info!(
                        container = %s.name,
                        udp = o.listener.udp_port,
                        tcp = o.listener.tcp_port,
                        "serving DNS on 127.0.0.11 in the container"
                    );
                    self.open.insert(s.container_id.clone(), o);
                }
                Err(e) => {
                    warn!(container = %s.name, error = %format!("{e:#}"), "cannot open DNS sockets");
                    failures.push(OpenFailure {
                        container_id: s.container_id.clone(),
                        name: s.name.clone(),
                        reason: format!("{e:#}"),
                    });
                }
            }
        }
        let redirects = self
            .open
            .values()
            .map(|o| (o.cookie, (o.listener.udp_port, o.listener.tcp_port)))
            .collect();
        (redirects, failures)
    }

    pub fn view(&self, sandboxes: &[Sandbox]) -> Vec<SandboxDns> {
        self.open
            .iter()
            .map(|(id, o)| SandboxDns {
                container_id: id.clone(),
                name: sandboxes
                    .iter()
                    .find(|s| &s.container_id == id)
                    .map(|s| s.name.clone())
                    .unwrap_or_default(),
                netns_cookie: o.cookie,
                udp_port: o.listener.udp_port,
                tcp_port: o.listener.tcp_port,
            })
            .collect()
    }

    fn start(&self, s: &Sandbox, scope: Scope, previous: Option<(u16, u16)>) -> Result<Open> {
        if s.netns_path.is_empty() {
            anyhow::bail!("no network namespace path");
        }
        let (udp, tcp) = bind_in_netns(&s.netns_path, previous)?;
        let scope = Arc::new(ArcSwap::from_pointee(scope));
        let listener = Listener::start(
            &self.runtime,
            self.resolver.clone(),
            scope.clone(),
            udp,
            tcp,
        )
        .context("start serving")?;
        Ok(Open {
            cookie: s.netns_cookie,
            scope,
            listener,
        })
    }
}

/// Binds UDP and TCP on 127.0.0.11 inside the namespace at `path`. A socket belongs to the
/// namespace it was created in for life, so a short-lived thread enters the namespace,
/// creates both, and ends; nothing else ever runs there.
fn bind_in_netns(
    path: &str,
    previous: Option<(u16, u16)>,
) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let file = File::open(path).with_context(|| format!("open netns {path}"))?;
    let path = path.to_string();
    std::thread::spawn(move || -> Result<_> {
        setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {path}"))?;
        let (udp_want, tcp_want) = previous.unwrap_or((0, 0));
        let udp = bind_udp(udp_want).or_else(|_| bind_udp(0))?;
        let tcp = bind_tcp(tcp_want).or_else(|_| bind_tcp(0))?;
        Ok((udp, tcp))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("DNS socket thread panicked"))?
}

fn bind_udp(port: u16) -> Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(SocketAddrV4::new(DNS_ADDR, port))
        .with_context(|| format!("bind UDP {DNS_ADDR}:{port} (is lo up?)"))
}

fn bind_tcp(port: u16) -> Result<std::net::TcpListener> {
    std::net::TcpListener::bind(SocketAddrV4::new(DNS_ADDR, port))
        .with_context(|| format!("bind TCP {DNS_ADDR}:{port}"))
}
