//! The daemon: opens the datapath (adopting what is pinned), starts the sources this node's
//! role calls for, runs the reconcile loop, serves meshctl, and stops cleanly.
//!
//! Which sources run follows the node's role, read from its own engine (`/info`), and
//! changes with it:
//! - a manager reads its own engine and serves the feed;
//! - any other node follows the managers' meshd (the feed);
//! - with `--manager-api`, the swarm is read from those managers' Docker APIs instead (for
//!   nodes without a manager running meshd);
//! - a node not in a swarm has local containers only.
//!
//! Every node reads its own containers from its own engine.
use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use meshd_dns::{server::Resolver, upstream::Upstreams};
use tokio::{
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, error, info, warn};

use crate::{
    datapath::{
        choice::{self, Asked, Kind, Opened},
        ebpf::dns_redirect::DnsRedirects,
        ipvs::{applier::IpvsApplier, dns_handback::HandBack, dns_redirect::NftDnsRedirects},
        Applier, DnsRedirect,
    },
    dns::{resolv_conf::ResolvConfWatch, DnsApplier},
    feed::{
        self,
        certs::SwarmCerts,
        client::{upload_to_all, Subscriber},
        hub::{HealthFn, Hub, Start, StartFn},
        FeedLog,
    },
    source::{
        docker_api::DockerApi,
        local::LocalSource,
        managers::Managers,
        swarm::{SwarmConfig, SwarmSource},
        TaskHint, Update,
    },
    status::{unix_ms, Core, DnsStatus, Identity, Mode, Shared, VipDatapath},
};

pub mod reconcile;
mod rejections;

use reconcile::{Reconciler, Slot};

pub struct Config {
    /// This node's engine.
    pub docker: DockerApi,
    /// Where that engine makes container namespaces (learned from its containers if None).
    pub docker_netns_dir: Option<PathBuf>,
    /// `--manager-api`: read the swarm from these managers' APIs instead of the feed.
    pub manager_api: Option<Managers>,
    /// The swarm's node certificates (the feed's TLS).
    pub swarm_certs: PathBuf,
    /// Where a manager serves the feed; the port is also where other nodes look for it.
    pub feed_listen: SocketAddr,
    /// Managers' feed addresses, instead of the managers the engine names.
    pub feed_hubs: Vec<SocketAddr>,
    /// `--datapath`: eBPF, IPVS, or whichever this kernel can run.
    pub datapath: Asked,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub api_socket: PathBuf,
    pub swarm: SwarmConfig,
    /// A full pass of every applier over everything (drift safety net).
    pub sweep_every: Duration,
    /// The embedded DNS; `None` leaves containers to dockerd's.
    pub dns: Option<DnsConfig>,
    /// The ingress mesh; `None` leaves published ports to Docker.
    pub ingress: Option<crate::datapath::ebpf::ingress::IngressSettings>,
    /// The L7 front end; `None`: this node serves no L7 routes.
    pub l7: Option<L7Config>,
    /// Where Prometheus metrics are served (loopback only); `None`: not at all.
    pub metrics: Option<SocketAddr>,
}

pub struct L7Config {
    /// Where plain HTTP is served.
    pub http: SocketAddr,
    /// Where HTTPS is served, with certificates from `certs`.
    pub https: Option<SocketAddr>,
    pub certs: PathBuf,
    /// `--service-cluster`: serve only routes labelled with it.
    pub cluster: Option<String>,
    pub proxy: crate::l7::proxy::ProxySettings,
    /// How long a stopping meshd waits for requests in flight.
    pub grace: Duration,
}

pub struct DnsConfig {
    pub upstreams: UpstreamSource,
    pub timeout: Duration,
}

/// Where forwarded names go.
pub enum UpstreamSource {
    /// Given on the command line (`--dns-upstream`).
    Fixed(Vec<SocketAddr>),
    /// The host's resolv.conf, read again whenever it changes.
    ResolvConf(PathBuf),
}

/// A single-threaded runtime on a thread of its own for the DNS sockets; it lives as long
/// as the process.
fn dns_runtime() -> Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    std::thread::Builder::new()
        .name("meshd-dns".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok(handle)
}

/// Reads resolv.conf again if it changed, and points forwarding at its servers. A file that
/// cannot be read leaves forwarding on the servers read before; the reason shows in status.
fn refresh_upstreams(watch: &mut ResolvConfWatch, resolver: &Resolver, shared: &Shared) {
    let after_start = watch.has_read();
    let Some(read) = watch.check() else {
        return;
    };
    let file = watch.path().display().to_string();
    let before = resolver.upstream_servers();
    let mut st = shared.dns_status.lock().unwrap();
    match read {
        Ok(loaded) => {
            for e in &loaded.errors {
                warn!(%file, error = %e, "resolv.conf: line skipped");
            }
            if loaded.servers != before {
                let servers: Vec<String> = loaded.servers.iter().map(ToString::to_string).collect();
                info!(%file, ?servers, "upstream resolvers");
                if after_start {
                    st.upstream_changes += 1;
                }
                resolver.set_upstreams(loaded.servers);
                st.upstreams = servers;
            }
            st.config_errors = loaded.errors;
        }
        Err(why) => {
            warn!(%file, error = %why, "resolv.conf unreadable; forwarding keeps its servers");
            st.config_errors = vec![why];
        }
    }
}

/// What `/info` says about this node's place in the swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Place {
    node_id: String,
    manager: bool,
    /// Other managers' addresses (host part of `RemoteManagers[].Addr`).
    managers: Vec<(String, IpAddr)>,
    /// This node's swarm address (`NodeAddr`).
    addr: Option<IpAddr>,
}

async fn place(docker: &DockerApi) -> Result<Place, crate::source::docker_api::ApiError> {
    let info = docker.get_json("/info").await?;
    let s = |p: &str| {
        info.pointer(p)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let active = s("/Swarm/LocalNodeState") == "active";
    let node_id = if active {
        s("/Swarm/NodeID")
    } else {
        String::new()
    };
    let managers = info
        .pointer("/Swarm/RemoteManagers")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let id = m.get("NodeID")?.as_str()?.to_string();
            let addr = m.get("Addr")?.as_str()?;
            let host = addr
                .rsplit_once(':')
                .map_or(addr, |(h, _)| h)
                .trim_matches(['[', ']']);
            Some((id, host.parse().ok()?))
        })
        .collect();
    Ok(Place {
        manager: active
            && info
                .pointer("/Swarm/ControlAvailable")
                .and_then(|v| v.as_bool())
                == Some(true),
        addr: s("/Swarm/NodeAddr").parse().ok(),
        node_id,
        managers,
    })
}

/// The feed addresses of the managers other than this node, in the engine's order.
fn hub_addrs(p: &Place, port: u16) -> Vec<SocketAddr> {
    p.managers
        .iter()
        .filter(|(id, _)| *id != p.node_id)
        .map(|(_, ip)| SocketAddr::new(*ip, port))
        .collect()
}

/// The swarm side of this node, running for its current role.
struct SwarmSide {
    mode: Mode,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for SwarmSide {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Wiring {
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    updates: mpsc::UnboundedSender<Update>,
    /// Hints from this node's containers, for whoever reads the swarm.
    hints: broadcast::Sender<TaskHint>,
    report: watch::Receiver<Option<crate::model::NodeReport>>,
}

impl Wiring {
    /// Starts the sources for `place`.
    fn start(&self, p: &Place) -> Result<SwarmSide> {
        let cfg = &self.cfg;
        let mut tasks = Vec::new();
        // Hints reach the swarm reader of this process, if there is one.
        let own_hints = |tasks: &mut Vec<JoinHandle<()>>| {
            let (tx, rx) = mpsc::unbounded_channel::<TaskHint>();
            let mut sub = self.hints.subscribe();
            let fwd = tx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match sub.recv().await {
                        Ok(h) => {
                            let _ = fwd.send(h);
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            }));
            (tx, rx)
        };
        if let Some(managers) = &cfg.manager_api {
            let (_, rx) = own_hints(&mut tasks);
            let src = SwarmSource::new(
                managers.clone(),
                cfg.swarm.clone(),
                self.updates.clone(),
                rx,
                self.shared.swarm.clone(),
            );
            tasks.push(tokio::spawn(src.run()));
            return Ok(SwarmSide {
                mode: Mode::ManagerApi,
                tasks,
            });
        }
        if p.node_id.is_empty() {
            // Nothing to read: the swarm part is complete as it is (empty).
            let _ = self.updates.send(Update {
                changes: vec![crate::model::Change::Resync(
                    crate::model::Resync::Services(vec![], vec![]),
                )],
                origin: None,
                read_at: None,
                from: crate::source::Origin::Swarm,
                complete: true,
            });
            return Ok(SwarmSide {
                mode: Mode::Standalone,
                tasks,
            });
        }
        let certs = Arc::new(
            SwarmCerts::load(&cfg.swarm_certs)
                .context("the feed needs the swarm node certificates (--swarm-certs)")?,
        );
        let hubs = if cfg.feed_hubs.is_empty() {
            hub_addrs(p, cfg.feed_listen.port())
        } else {
            cfg.feed_hubs
                .iter()
                .copied()
                .filter(|a| Some(a.ip()) != p.addr)
                .collect()
        };
        let (hubs_tx, hubs_rx) = watch::channel(hubs);
        // Every node uploads to every other manager: its report and its tasks' hints.
        tasks.push(tokio::spawn(upload_to_all(
            certs.clone(),
            hubs_rx.clone(),
            self.report.clone(),
            self.hints.clone(),
            self.shared.feed_client.clone(),
        )));
        // The manager list changes (a promotion, a manager lost): read it again now and then.
        {
            let docker = cfg.docker.clone();
            let port = cfg.feed_listen.port();
            let fixed = !cfg.feed_hubs.is_empty();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    if fixed {
                        continue;
                    }
                    if let Ok(p) = place(&docker).await {
                        let next = hub_addrs(&p, port);
                        hubs_tx.send_if_modified(|cur| {
                            let changed = *cur != next;
                            *cur = next.clone();
                            changed
                        });
                    }
                }
            }));
        }
        if p.manager {
            let (hint_tx, rx) = own_hints(&mut tasks);
            let src = SwarmSource::new(
                Managers::new(vec![cfg.docker.clone()]),
                cfg.swarm.clone(),
                self.updates.clone(),
                rx,
                self.shared.swarm.clone(),
            );
            tasks.push(tokio::spawn(src.run()));
            self.shared.core.write().unwrap().feed = Some(FeedLog::new());
            let core = self.shared.clone();
            let start: StartFn = Arc::new(move |resume| start_for(&core, resume));
            let swarm_status = self.shared.swarm.clone();
            let health: HealthFn = Arc::new(move || {
                let st = swarm_status.lock().unwrap();
                (!st.connected).then(|| {
                    format!(
                        "this manager cannot read its engine ({})",
                        st.last_error.as_deref().unwrap_or("not connected yet")
                    )
                })
            });
            let hub = Arc::new(Hub {
                certs,
                start,
                health,
                updates: self.updates.clone(),
                hints: Some(hint_tx),
                status: self.shared.hub.clone(),
            });
            let listen = cfg.feed_listen;
            let std_listener = std::net::TcpListener::bind(listen)
                .with_context(|| format!("feed: listen on {listen}"))?;
            std_listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            info!(%listen, "feed: serving the swarm to the other nodes");
            tasks.push(tokio::spawn(hub.serve(listener)));
            Ok(SwarmSide {
                mode: Mode::Manager,
                tasks,
            })
        } else {
            self.shared.core.write().unwrap().feed = None;
            let sub = Subscriber {
                certs,
                hubs: hubs_rx,
                me: p.node_id.clone(),
                updates: self.updates.clone(),
                status: self.shared.feed_client.clone(),
            };
            tasks.push(tokio::spawn(sub.run()));
            Ok(SwarmSide {
                mode: Mode::Feed,
                tasks,
            })
        }
    }
}

/// How a subscriber starts, under the state's lock.
fn start_for(shared: &Shared, resume: Option<(u64, u64)>) -> Start {
    let core = shared.core.read().unwrap();
    let feed = core.feed.as_ref().expect("a manager has a feed");
    let live = feed.subscribe();
    if let Some((epoch, seq)) = resume {
        if epoch == feed.epoch {
            if let Some(missed) = feed.since(seq) {
                return Start::Resume { missed, seq, live };
            }
        }
    }
    let frame = feed::protocol::encode(&feed::protocol::Down::Snapshot {
        epoch: feed.epoch,
        seq: feed.seq,
        changes: core.state.snapshot(),
    });
    Start::Snapshot {
        frame,
        seq: feed.seq,
        live,
    }
}

pub async fn run(cfg: Config) -> Result<()> {
    let cfg = Arc::new(cfg);
    let (datapath, redirects, choice): (VipDatapath, Box<dyn DnsRedirect>, _) = match choice::open(
        cfg.datapath,
        &cfg.pin_dir,
        &cfg.cgroup,
        cfg.ingress.clone(),
    )? {
        Opened::Ebpf(mut ebpf, choice) => {
            let dns_map = ebpf.take_dns_map().context("DNS map")?;
            (
                VipDatapath::Ebpf(Arc::new(Mutex::new(*ebpf))),
                Box::new(DnsRedirects::new(dns_map)?),
                choice,
            )
        }
        Opened::Ipvs(choice) => {
            if cfg.ingress.is_some() {
                // Docker's own ingress (IPVS in its ingress_sbox) answers them: see
                // the README's IPVS section for why meshd does not redo it there.
                info!("IPVS datapath: published ports stay with Docker's ingress");
            }
            let redirects = match &cfg.dns {
                Some(_) => {
                    let exe = std::env::current_exe().context("meshd's own path")?;
                    let lock = cfg.api_socket.with_extension("dns-hand-back.lock");
                    match HandBack::start(&exe, &lock) {
                        Ok(h) => NftDnsRedirects::with_hand_back(h),
                        Err(e) => {
                            warn!(error = %format!("{e:#}"), "no DNS hand-back helper: if meshd dies, containers' names fail until it is back");
                            NftDnsRedirects::new()
                        }
                    }
                }
                None => NftDnsRedirects::new(),
            };
            (
                VipDatapath::Ipvs(Arc::new(Mutex::new(IpvsApplier::new()))),
                Box::new(redirects),
                choice,
            )
        }
    };
    info!(datapath = %choice.kind, reason = %choice.reason, "VIP datapath");
    let (initial, mut resolv_watch) = match cfg.dns.as_ref().map(|d| &d.upstreams) {
        Some(UpstreamSource::Fixed(servers)) => (servers.clone(), None),
        Some(UpstreamSource::ResolvConf(path)) => (Vec::new(), Some(ResolvConfWatch::new(path))),
        None => (Vec::new(), None),
    };
    let resolver = cfg
        .dns
        .as_ref()
        .map(|d| Arc::new(Resolver::new(Upstreams::new(initial.clone(), d.timeout))));
    let dns_applier = match &resolver {
        Some(r) => Some(DnsApplier::new(r.clone(), dns_runtime()?, redirects)),
        None => None,
    };
    let dns_status = match &cfg.dns {
        Some(d) => DnsStatus {
            enabled: true,
            upstreams: initial.iter().map(ToString::to_string).collect(),
            upstreams_from: match &d.upstreams {
                UpstreamSource::Fixed(_) => "--dns-upstream".into(),
                UpstreamSource::ResolvConf(p) => p.display().to_string(),
            },
            ..Default::default()
        },
        None => DnsStatus::default(),
    };
    let l7 = match &cfg.l7 {
        Some(l7) => {
            let store = l7
                .https
                .map(|_| Arc::new(crate::l7::tls::CertStore::new(l7.certs.clone())));
            let mut settings = l7.proxy.clone();
            settings.https_port = l7.https.map(|a| a.port());
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
            // Upstream sockets to a VIP are balanced by the socket programs of the cgroup
            // they are made in (eBPF), or by the marks of the sandbox they are made in (IPVS).
            let sockets_cgroup = (choice.kind == Kind::Ebpf).then_some(cfg.cgroup.as_path());
            let proxy =
                crate::l7::proxy::Proxy::new(settings, store.clone(), sockets_cgroup, workers)?;
            proxy.start(l7.http, l7.https)?;
            if let Some(store) = store {
                // Renewed certificate files are served from the next handshake.
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        if store.refresh() {
                            info!("L7: certificate files changed; serving them");
                        }
                    }
                });
            }
            info!(http = %l7.http, https = ?l7.https, certs = %l7.certs.display(), cluster = ?l7.cluster, "L7 front end listening");
            Some(crate::l7::L7Handle {
                proxy,
                http: l7.http,
                https: l7.https,
                cluster: l7.cluster.clone(),
            })
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        core: Arc::new(RwLock::new(Core::default())),
        datapath,
        choice,
        dns: dns_applier.map(|d| Arc::new(Mutex::new(d))),
        resolver: resolver.clone(),
        identity: Mutex::new(Identity {
            started_unix_ms: unix_ms(),
            pin_dir: cfg.pin_dir.display().to_string(),
            cgroup: cfg.cgroup.display().to_string(),
            ..Default::default()
        }),
        local: Arc::default(),
        swarm: Arc::default(),
        feed_client: Arc::default(),
        hub: Arc::default(),
        reconcile: Arc::default(),
        dns_status: Mutex::new(dns_status),
        l7,
    });
    let api = crate::api::serve(&cfg.api_socket, shared.clone())?;
    let _metrics = match cfg.metrics {
        Some(addr) => Some(crate::metrics::serve(addr, shared.clone())?),
        None => None,
    };

    // Appliers: the VIP datapath, then DNS (names, sockets, redirect), then L7 routes.
    let vip_applier: Arc<Mutex<dyn Applier>> = match &shared.datapath {
        VipDatapath::Ebpf(e) => e.clone(),
        VipDatapath::Ipvs(i) => i.clone(),
    };
    let mut slots = vec![Slot::new(vip_applier)];
    if let Some(dns) = &shared.dns {
        slots.push(Slot::new(dns.clone() as Arc<Mutex<dyn Applier>>));
    }
    if let Some(h) = &shared.l7 {
        let applier = crate::l7::L7Applier::new(h.proxy.clone(), h.cluster.clone());
        slots.push(Slot::new(
            Arc::new(Mutex::new(applier)) as Arc<Mutex<dyn Applier>>
        ));
    }

    let (updates_tx, updates_rx) = mpsc::unbounded_channel();
    let (hints_tx, _) = broadcast::channel(1024);
    let (report_tx, report_rx) = watch::channel(None);

    // This node's containers.
    let local = LocalSource::new(
        cfg.docker.clone(),
        updates_tx.clone(),
        Some(forwarder(hints_tx.clone())),
        shared.local.clone(),
        cfg.docker_netns_dir.clone(),
    );
    tokio::spawn(local.run());

    // The swarm side, following the node's role.
    let wiring = Arc::new(Wiring {
        cfg: cfg.clone(),
        shared: shared.clone(),
        updates: updates_tx.clone(),
        hints: hints_tx,
        report: report_rx,
    });
    let (place_tx, mut place_rx) = watch::channel::<Option<Place>>(None);
    {
        let docker = cfg.docker.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            // The failure last warned about: a repeat is at debug level (the local source
            // reports the engine's outage too).
            let mut warned: Option<String> = None;
            loop {
                match place(&docker).await {
                    Ok(p) => {
                        warned = None;
                        place_tx.send_if_modified(|cur| {
                            let changed = cur.as_ref() != Some(&p);
                            *cur = Some(p.clone());
                            changed
                        });
                        delay = Duration::from_secs(5);
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        if warned.as_deref() == Some(reason.as_str()) {
                            debug!(error = %reason, "still cannot read this node's engine (/info)");
                        } else {
                            warn!(error = %reason, "cannot read this node's engine (/info); the datapath keeps what it has");
                            warned = Some(reason);
                        }
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
                tokio::time::sleep(delay).await;
            }
        });
    }
    let side_shared = shared.clone();
    let supervisor = tokio::spawn(async move {
        let mut side: Option<SwarmSide> = None;
        let mut current: Option<(String, bool)> = None;
        while place_rx.changed().await.is_ok() {
            let Some(p) = place_rx.borrow_and_update().clone() else {
                continue;
            };
            let role = (p.node_id.clone(), p.manager);
            if current.as_ref() == Some(&role) {
                continue;
            }
            drop(side.take());
            match wiring.start(&p) {
                Ok(s) => {
                    info!(node = %p.node_id, mode = ?s.mode, "swarm side started");
                    let mut id = side_shared.identity.lock().unwrap();
                    id.node_id = p.node_id.clone();
                    id.mode = s.mode.clone();
                    side = Some(s);
                    current = Some(role);
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot start following the swarm; local containers only");
                    current = None;
                }
            }
        }
    });

    let mut reconciler = Reconciler::new(shared.core.clone(), slots, shared.reconcile.clone());
    reconciler.report = Some(report_tx);
    let id_shared = shared.clone();
    reconciler.whoami = Some(Box::new(move || {
        id_shared.identity.lock().unwrap().node_id.clone()
    }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let tick_shared = shared.clone();
    let tick = move |_: &mut Reconciler| {
        if let (Some(watch), Some(resolver)) =
            (resolv_watch.as_mut(), tick_shared.resolver.as_ref())
        {
            refresh_upstreams(watch, resolver, &tick_shared);
        }
    };
    let loop_task = tokio::spawn(reconcile::run(
        reconciler,
        updates_rx,
        tick,
        cfg.sweep_every,
        stop_rx,
    ));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    if let (Some(h), Some(l7)) = (&shared.l7, &cfg.l7) {
        // New connections are refused from here; those in flight finish.
        h.proxy.stop(l7.grace).await;
    }
    let _ = stop_tx.send(true);
    let _ = loop_task.await;
    supervisor.abort();
    if let Some(dns) = &shared.dns {
        // Our sockets close with us: hand containers back to dockerd's resolver.
        if let Err(e) = dns.lock().unwrap().hand_back() {
            warn!(error = %format!("{e:#}"), "cannot remove DNS redirects");
        }
    }
    match shared.choice.kind {
        Kind::Ebpf => info!("stopping; pinned programs and maps keep forwarding"),
        Kind::Ipvs => info!("stopping; IPVS keeps forwarding in every sandbox"),
    }
    drop(api);
    let _ = std::fs::remove_file(&cfg.api_socket);
    Ok(())
}

/// Local container events as hints for the swarm side (a channel the local source owns).
fn forwarder(hints: broadcast::Sender<TaskHint>) -> mpsc::UnboundedSender<TaskHint> {
    let (tx, mut rx) = mpsc::unbounded_channel::<TaskHint>();
    tokio::spawn(async move {
        while let Some(h) = rx.recv().await {
            let _ = hints.send(h);
        }
    });
    tx
}
