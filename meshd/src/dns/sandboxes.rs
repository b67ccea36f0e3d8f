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
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::Arc,
};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use meshd_dns::server::{Listener, Resolver, Scope};
use serde::Serialize;
use tracing::{info, warn};

use crate::{compile::SandboxScope, netns};

pub const DNS_ADDR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 11);

struct Open {
    container_id: String,
    name: String,
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
    /// By netns cookie.
    open: BTreeMap<u64, Open>,
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

    pub fn ports(&self, cookie: u64) -> Option<(u16, u16)> {
        self.open
            .get(&cookie)
            .map(|o| (o.listener.udp_port, o.listener.tcp_port))
    }

    pub fn cookies(&self) -> impl Iterator<Item = u64> + '_ {
        self.open.keys().copied()
    }

    /// Makes namespace `cookie` served as `scope` says: opens the sockets (trying the
    /// `previous` ports first), updates the networks of open ones, or closes them (`None`).
    pub fn sync_one(
        &mut self,
        cookie: u64,
        scope: Option<&SandboxScope>,
        previous: Option<(u16, u16)>,
    ) -> Result<()> {
        let Some(sc) = scope else {
            if let Some(o) = self.open.remove(&cookie) {
                info!(container = %o.name, "closing DNS sockets");
            }
            return Ok(());
        };
        let want = Scope {
            container: sc.name.clone(),
            networks: sc.networks.clone(),
        };
        if let Some(o) = self.open.get(&cookie) {
            if **o.scope.load() != want {
                o.scope.store(Arc::new(want));
            }
            return Ok(());
        }
        if sc.netns_path.is_empty() {
            anyhow::bail!("no network namespace path");
        }
        let (udp, tcp) = bind_in_netns(Path::new(&sc.netns_path), previous)?;
        let scope = Arc::new(ArcSwap::from_pointee(want));
        let listener = Listener::start(
            &self.runtime,
            self.resolver.clone(),
            scope.clone(),
            udp,
            tcp,
        )
        .context("start serving")?;
        info!(
            container = %sc.name,
            udp = listener.udp_port,
            tcp = listener.tcp_port,
            "serving DNS on 127.0.0.11 in the container"
        );
        self.open.insert(
            cookie,
            Open {
                container_id: sc.container_id.clone(),
                name: sc.name.clone(),
                scope,
                listener,
            },
        );
        Ok(())
    }

    pub fn view(&self) -> Vec<SandboxDns> {
        self.open
            .iter()
            .map(|(cookie, o)| SandboxDns {
                container_id: o.container_id.clone(),
                name: o.name.clone(),
                netns_cookie: *cookie,
                udp_port: o.listener.udp_port,
                tcp_port: o.listener.tcp_port,
            })
            .collect()
    }
}

/// Binds UDP and TCP on 127.0.0.11 inside the namespace at `path`.
fn bind_in_netns(
    path: &Path,
    previous: Option<(u16, u16)>,
) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
    netns::run_in(path, move || {
        let (udp_want, tcp_want) = previous.unwrap_or((0, 0));
        let udp = bind_udp(udp_want).or_else(|e| {
            if udp_want != 0 {
                warn!(port = udp_want, error = %format!("{e:#}"), "previous DNS port taken; using another");
            }
            bind_udp(0)
        })?;
        let tcp = bind_tcp(tcp_want).or_else(|_| bind_tcp(0))?;
        Ok((udp, tcp))
    })
}

fn bind_udp(port: u16) -> Result<std::net::UdpSocket> {
    std::net::UdpSocket::bind(SocketAddrV4::new(DNS_ADDR, port))
        .with_context(|| format!("bind UDP {DNS_ADDR}:{port} (is lo up?)"))
}

fn bind_tcp(port: u16) -> Result<std::net::TcpListener> {
    std::net::TcpListener::bind(SocketAddrV4::new(DNS_ADDR, port))
        .with_context(|| format!("bind TCP {DNS_ADDR}:{port}"))
}
