//! The control loop: Docker → ClusterState → compile → Desired → datapath diff.
//!
//! Task changes have no Docker events, and swarm reports a new task `running` a little after
//! the container event that hints at it; so every event opens a short window of fast
//! `/tasks` polling, and a slower poll catches what no event announces (tasks on other
//! nodes). A failed read never touches the datapath: the kernel keeps forwarding what it has.
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use meshd_dns::{
    server::{Resolver, StatsView},
    upstream::Upstreams,
    Zones,
};

use crate::{
    compile::{compile, Desired},
    datapath::ebpf::{AdoptReport, ApplyStats, EbpfDatapath},
    dns_sandboxes::{DnsSandboxes, OpenFailure, SandboxDns},
    dns_zones::dns_zones,
    model::{ClusterState, Rejected},
    resolv_conf::ResolvConfWatch,
    source::{docker::DockerSource, docker_api::DockerApi, managers::Managers},
};

pub struct Config {
    pub managers: Managers,
    pub local: DockerApi,
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub api_socket: PathBuf,
    pub poll_interval: Duration,
    pub fast_poll_interval: Duration,
    pub fast_window: Duration,
    /// The embedded DNS; `None` leaves containers to dockerd's.
    pub dns: Option<DnsConfig>,
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

#[derive(Clone, Debug, Default, Serialize)]
pub struct DnsStatus {
    pub enabled: bool,
    pub upstreams: Vec<String>,
    pub upstreams_from: String,
    pub config_errors: Vec<String>,
    /// Times the upstream list changed after start (resolv.conf rewritten).
    pub upstream_changes: u64,
    /// Containers served, with meshd's ports in each.
    pub sandboxes: Vec<SandboxDns>,
    /// Containers whose sockets could not be opened (they keep dockerd's DNS).
    pub open_failures: Vec<OpenFailure>,
    pub names: usize,
    pub stats: StatsView,
}

/// Event-to-map latencies kept for `meshctl status` and the benchmark.
const LATENCY_SAMPLES: usize = 1000;

#[derive(Clone, Debug, Default, Serialize)]
pub struct DockerStatus {
    /// The manager being read now.
    pub manager: String,
    /// Every manager meshd may read, in order of preference.
    pub managers: Vec<String>,
    pub local: String,
    pub connected: bool,
    pub events_connected: bool,
    pub last_error: Option<String>,
    pub last_sync_unix_ms: u64,
    pub syncs: u64,
    pub failed_syncs: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencySummary {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The most recent samples, oldest first, in milliseconds.
    pub recent_ms: Vec<f64>,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub node_id: String,
    pub docker: DockerStatus,
    pub state: ClusterState,
    pub desired: Desired,
    pub adopted: AdoptReport,
    pub last_apply: ApplyStats,
    pub applies_with_changes: u64,
    pub event_to_map: VecDeque<Duration>,
    /// From the start of the Docker read that showed a change to the map written.
    pub read_to_map: VecDeque<Duration>,
    pub pin_dir: String,
    pub cgroup: String,
    pub started_unix_ms: u64,
    pub dns: DnsStatus,
    /// The names DNS answers from, compiled with `desired`.
    pub zones: Arc<Zones>,
}

impl Snapshot {
    pub fn rejected(&self) -> &[Rejected] {
        &self.state.rejected
    }

    pub fn latency(samples: &VecDeque<Duration>) -> LatencySummary {
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
        let recent = v.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let pick = |q: f64| {
            if v.is_empty() {
                0.0
            } else {
                v[((v.len() as f64 - 1.0) * q).round() as usize]
            }
        };
        LatencySummary {
            samples: v.len(),
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            max_ms: v.last().copied().unwrap_or(0.0),
            recent_ms: recent,
        }
    }
}

/// What the API reads: the latest snapshot, and the datapath for counters and map dumps.
pub struct Shared {
    pub snapshot: Mutex<Snapshot>,
    pub datapath: Mutex<EbpfDatapath>,
    pub resolver: Option<Arc<Resolver>>,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn push_sample(ring: &mut VecDeque<Duration>, d: Duration) {
    if ring.len() == LATENCY_SAMPLES {
        ring.pop_front();
    }
    ring.push_back(d);
}

enum Hint {
    Event(Instant),
    EventsConnected(bool),
}

/// Follows `/events`, reconnecting with backoff (to the next manager when there are
/// several); every event is a hint to re-read. A reconnect is a hint too: events may have
/// been missed while the stream was down.
async fn follow_events(apis: Managers, query: &'static str, tx: mpsc::UnboundedSender<Hint>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (which, api) = apis.pick();
        let api = api.clone();
        match api.events(query).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(100);
                let _ = tx.send(Hint::EventsConnected(true));
                let _ = tx.send(Hint::Event(Instant::now()));
                loop {
                    match stream.next().await {
                        Ok(Some(Ok(ev))) => {
                            debug!(
                                kind = ev.get("Type").and_then(|v| v.as_str()).unwrap_or(""),
                                action = ev.get("Action").and_then(|v| v.as_str()).unwrap_or(""),
                                "docker event"
                            );
                            if tx.send(Hint::Event(Instant::now())).is_err() {
                                return;
                            }
                        }
                        Ok(Some(Err(reason))) => warn!(reason, "skipped a malformed event"),
                        Ok(None) => {
                            warn!(endpoint = api.endpoint(), "event stream closed");
                            break;
                        }
                        Err(e) => {
                            warn!(error = %e, "event stream failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, ?backoff, "cannot open event stream"),
        }
        apis.failed(which);
        let _ = tx.send(Hint::EventsConnected(false));
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

const SWARM_EVENTS: &str =
    "filters=%7B%22type%22%3A%5B%22service%22%2C%22network%22%2C%22node%22%5D%7D";
const CONTAINER_EVENTS: &str = "filters=%7B%22type%22%3A%5B%22container%22%2C%22network%22%5D%7D";
const ALL_EVENTS: &str =
    "filters=%7B%22type%22%3A%5B%22service%22%2C%22network%22%2C%22node%22%2C%22container%22%5D%7D";

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
    let mut snap = shared.snapshot.lock().unwrap();
    match read {
        Ok(loaded) => {
            for e in &loaded.errors {
                warn!(%file, error = %e, "resolv.conf: line skipped");
            }
            if loaded.servers != before {
                let servers: Vec<String> = loaded.servers.iter().map(ToString::to_string).collect();
                info!(%file, ?servers, "upstream resolvers");
                if after_start {
                    snap.dns.upstream_changes += 1;
                }
                resolver.set_upstreams(loaded.servers);
                snap.dns.upstreams = servers;
            }
            snap.dns.config_errors = loaded.errors;
        }
        Err(why) => {
            warn!(%file, error = %why, "resolv.conf unreadable; forwarding keeps its servers");
            snap.dns.config_errors = vec![why];
        }
    }
}

pub async fn run(cfg: Config) -> Result<()> {
    let datapath = EbpfDatapath::open(&cfg.pin_dir, &cfg.cgroup)?;
    // Ports an earlier meshd served DNS on: rebound first, so retries across a restart land.
    let mut previous_dns: BTreeMap<u64, (u16, u16)> = datapath
        .dns_redirects()
        .iter()
        .map(|(&c, p)| (c, (u16::from_be(p.udp), u16::from_be(p.tcp))))
        .collect();
    let (initial, mut resolv_watch) = match cfg.dns.as_ref().map(|d| &d.upstreams) {
        Some(UpstreamSource::Fixed(servers)) => (servers.clone(), None),
        Some(UpstreamSource::ResolvConf(path)) => (Vec::new(), Some(ResolvConfWatch::new(path))),
        None => (Vec::new(), None),
    };
    let resolver = cfg
        .dns
        .as_ref()
        .map(|d| Arc::new(Resolver::new(Upstreams::new(initial.clone(), d.timeout))));
    let mut dns = match &resolver {
        Some(r) => Some(DnsSandboxes::new(r.clone(), dns_runtime()?)),
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
    let mut source = DockerSource::new(cfg.managers.clone(), cfg.local.clone());
    let shared = Arc::new(Shared {
        snapshot: Mutex::new(Snapshot {
            adopted: datapath.adopted.clone(),
            pin_dir: cfg.pin_dir.display().to_string(),
            cgroup: cfg.cgroup.display().to_string(),
            started_unix_ms: unix_ms(),
            docker: DockerStatus {
                manager: cfg.managers.pick().1.endpoint().into(),
                managers: cfg.managers.endpoints(),
                local: cfg.local.endpoint().into(),
                ..Default::default()
            },
            dns: dns_status,
            ..Default::default()
        }),
        datapath: Mutex::new(datapath),
        resolver: resolver.clone(),
    });
    let api = crate::api::serve(&cfg.api_socket, shared.clone())?;

    let (tx, mut rx) = mpsc::unbounded_channel();
    if cfg.managers.len() == 1 && cfg.managers.pick().1.endpoint() == cfg.local.endpoint() {
        tokio::spawn(follow_events(cfg.managers.clone(), ALL_EVENTS, tx.clone()));
    } else {
        tokio::spawn(follow_events(
            cfg.managers.clone(),
            SWARM_EVENTS,
            tx.clone(),
        ));
        tokio::spawn(follow_events(
            Managers::new(vec![cfg.local.clone()]),
            CONTAINER_EVENTS,
            tx.clone(),
        ));
    }
    drop(tx);

    let mut poll = tokio::time::interval(cfg.poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut fast_until = Instant::now();
    // The latest event not yet reflected in a map change: the start of a latency sample.
    let mut unattributed_event: Option<Instant> = None;
    let mut backoff = Duration::from_millis(100);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut first = true;

    loop {
        if !first {
            let fast = Instant::now() < fast_until;
            tokio::select! {
                hint = rx.recv() => match hint {
                    Some(Hint::Event(t)) => {
                        unattributed_event = Some(t);
                        fast_until = t + cfg.fast_window;
                    }
                    Some(Hint::EventsConnected(up)) => {
                        shared.snapshot.lock().unwrap().docker.events_connected = up;
                        continue;
                    }
                    None => {}
                },
                _ = poll.tick() => {}
                _ = tokio::time::sleep(cfg.fast_poll_interval), if fast => {}
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            }
            // Coalesce a burst of events into one read.
            while let Ok(h) = rx.try_recv() {
                match h {
                    Hint::Event(t) => {
                        unattributed_event = Some(t);
                        fast_until = t + cfg.fast_window;
                    }
                    Hint::EventsConnected(up) => {
                        shared.snapshot.lock().unwrap().docker.events_connected = up
                    }
                }
            }
            if Instant::now() >= fast_until {
                unattributed_event = None;
            }
        }
        first = false;
        if let (Some(watch), Some(resolver)) = (resolv_watch.as_mut(), resolver.as_ref()) {
            refresh_upstreams(watch, resolver, &shared);
        }

        let read_started = Instant::now();
        let state = match source.fetch().await {
            Ok(s) => {
                backoff = Duration::from_millis(100);
                s
            }
            Err(e) => {
                warn!(error = %e, "cannot read Docker state; the datapath keeps what it has");
                {
                    let mut snap = shared.snapshot.lock().unwrap();
                    snap.docker.connected = false;
                    snap.docker.last_error = Some(e.to_string());
                    snap.docker.failed_syncs += 1;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let node_id = if shared.snapshot.lock().unwrap().node_id.is_empty() {
            source.node_id().await.unwrap_or_default()
        } else {
            String::new()
        };
        let desired = compile(&state);
        let zones = Arc::new(dns_zones(&state));
        let applied = shared.datapath.lock().unwrap().apply(&desired);
        // Names first, then sockets, then the redirect: a container is never sent to a port
        // with nothing behind it, nor answered from older names than its datapath.
        let dns_view = match (&resolver, dns.as_mut()) {
            (Some(resolver), Some(dns)) => {
                resolver.zones.store(zones.clone());
                let (redirects, failures) = dns.sync(&state.sandboxes, &previous_dns);
                previous_dns.clear();
                if let Err(e) = shared
                    .datapath
                    .lock()
                    .unwrap()
                    .set_dns_redirects(&redirects)
                {
                    warn!(error = %format!("{e:#}"), "writing DNS redirects failed; will retry");
                }
                Some((dns.view(&state.sandboxes), failures))
            }
            _ => None,
        };
        let mut snap = shared.snapshot.lock().unwrap();
        if !node_id.is_empty() {
            snap.node_id = node_id;
        }
        snap.docker.connected = true;
        snap.docker.manager = source.managers.pick().1.endpoint().into();
        snap.docker.last_error = None;
        snap.docker.syncs += 1;
        snap.docker.last_sync_unix_ms = unix_ms();
        match applied {
            Ok(stats) => {
                snap.last_apply = stats;
                if stats.writes + stats.deletes > 0 {
                    snap.applies_with_changes += 1;
                    push_sample(&mut snap.read_to_map, read_started.elapsed());
                    if let Some(t) = unattributed_event.take() {
                        let took = t.elapsed();
                        push_sample(&mut snap.event_to_map, took);
                        info!(
                            writes = stats.writes,
                            deletes = stats.deletes,
                            event_to_map_us = took.as_micros() as u64,
                            "datapath updated"
                        );
                    } else {
                        info!(
                            writes = stats.writes,
                            deletes = stats.deletes,
                            "datapath updated"
                        );
                    }
                }
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "applying to the datapath failed; will retry")
            }
        }
        if let Some((sandboxes, failures)) = dns_view {
            snap.dns.sandboxes = sandboxes;
            snap.dns.open_failures = failures;
            snap.dns.names = zones.networks.values().map(|n| n.names.len()).sum();
        }
        snap.zones = zones;
        snap.state = state;
        snap.desired = desired;
    }
    if dns.is_some() {
        // Our sockets close with us: hand containers back to dockerd's resolver.
        if let Err(e) = shared
            .datapath
            .lock()
            .unwrap()
            .set_dns_redirects(&BTreeMap::new())
        {
            warn!(error = %format!("{e:#}"), "cannot remove DNS redirects");
        }
    }
    drop(dns);
    info!("stopping; pinned programs and maps keep forwarding");
    drop(api);
    let _ = std::fs::remove_file(&cfg.api_socket);
    Ok(())
}
