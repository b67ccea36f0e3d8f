//! This node's own containers, from its own engine. Every container or network event names
//! one container, and meshd looks at that one container.
//!
//! A container must be reachable-from and able-to-reach VIPs from its first instruction.
//! Docker's inspect answer waits for the container's start to finish (the container is
//! locked meanwhile), which is after the entrypoint began, so meshd does not wait for it:
//! at `network connect` it asks the network (which answers at once) for the container's
//! address, watches Docker's netns directory for the namespace being made, and joins the
//! new namespace to see its addresses appear. The namespace that gets the container's
//! address is the container's: meshd programs its VIPs and DNS then, some tens of
//! milliseconds before `start`. The full inspect at `start` completes the picture (names,
//! aliases, health). `die` and `destroy` remove it. When the event stream (re)opens,
//! everything is listed once: events may have been missed while it was down.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::{stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    bridge_leg,
    decode::{self, Event, Inspected},
    docker_api::{ApiError, DockerApi},
    overlay_peers::OverlayPeers,
    HintTx, Origin, TaskHint, Update, UpdateTx,
};
use crate::{
    model::{BridgeLeg, Change, Health, Id, Kind, Rejected, Resync, Sandbox, SandboxEndpoint},
    netns::{self, Seen},
};

/// `{"type":["container","network"],"event":[...]}`: the container events that can change a
/// namespace, its networks or its health (not exec_*, attach, top...).
const EVENTS: &str = "filters=%7B%22type%22%3A%5B%22container%22%2C%22network%22%5D%2C%22event%22%3A%5B%22create%22%2C%22start%22%2C%22restart%22%2C%22die%22%2C%22destroy%22%2C%22kill%22%2C%22health_status%22%2C%22rename%22%2C%22update%22%2C%22pause%22%2C%22unpause%22%2C%22connect%22%2C%22disconnect%22%5D%7D";
/// Containers that may have a namespace: not the stopped ones.
const LIVE: &str = "/containers/json?all=1&filters=%7B%22status%22%3A%5B%22created%22%2C%22running%22%2C%22paused%22%2C%22restarting%22%5D%7D";
/// Docker's bridge network that gives swarm tasks their way out (and the ingress sandbox
/// its way in).
pub const GATEWAY_BRIDGE: &str = "docker_gwbridge";
/// How long a new namespace is watched for a starting container's address.
const WATCH_FOR: Duration = Duration::from_secs(5);
/// Early starts kept for `meshctl status`.
const EARLY_KEPT: usize = 200;

/// One container programmed before it started: how early.
#[derive(Clone, Debug, Serialize)]
pub struct EarlyStart {
    pub container: String,
    /// `network connect` event → its namespace programmed.
    pub connect_to_programmed_ms: f64,
    /// Programmed → the `start` event (the entrypoint runs just before it): the margin.
    pub programmed_before_start_ms: f64,
}

/// What `meshctl status` shows of one engine connection.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceStatus {
    pub endpoint: String,
    pub connected: bool,
    pub events: u64,
    pub reads: u64,
    /// Reads (and event streams) that failed.
    #[serde(default)]
    pub failures: u64,
    pub last_error: Option<String>,
    pub resyncs: u64,
    /// The directory where Docker makes container namespaces, watched for new ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_dir: Option<String>,
    /// Containers whose namespace was programmed before their `start` event, and by how
    /// much; and those that were not (programmed from the inspect after start).
    #[serde(skip_serializing_if = "VecDeque::is_empty")]
    pub early: VecDeque<EarlyStart>,
    pub late_starts: u64,
    /// How long the last full read took.
    pub last_full_read_ms: f64,
    /// Overlay networks whose peers (as this node's engine has them) are followed.
    pub overlays_followed: usize,
    /// Since when the engine fails (none while it answers), and how often since.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_since_unix_ms: Option<u64>,
    pub outage_failures: u64,
    #[serde(skip)]
    warned_unix_ms: u64,
}

/// How often a continuing outage is logged again (each failure is at debug level).
const OUTAGE_REMINDER_MS: u64 = 5 * 60 * 1000;

impl SourceStatus {
    /// A read or event stream of `source` failed. Logged as a warning when it starts an
    /// outage or gives a new reason, at debug level when it repeats, with a reminder every
    /// few minutes: an engine that stays down is one line, not one per retry.
    pub fn failed(&mut self, source: &'static str, e: &dyn std::fmt::Display) {
        let now = crate::status::unix_ms();
        let reason = e.to_string();
        let repeat = self.down_since_unix_ms.is_some()
            && self.last_error.as_deref() == Some(reason.as_str());
        self.connected = false;
        self.failures += 1;
        self.outage_failures += 1;
        let since = *self.down_since_unix_ms.get_or_insert(now);
        if !repeat || now.saturating_sub(self.warned_unix_ms) >= OUTAGE_REMINDER_MS {
            warn!(
                source,
                endpoint = %self.endpoint,
                error = %reason,
                failures = self.outage_failures,
                down_s = now.saturating_sub(since) / 1000,
                "Docker engine failing; the datapath keeps what it has and meshd retries"
            );
            self.warned_unix_ms = now;
        } else {
            tracing::debug!(source, error = %reason, "Docker engine still failing");
        }
        self.last_error = Some(reason);
    }

    /// `source` read its engine in full again: the end of an outage, if there was one.
    pub fn recovered(&mut self, source: &'static str) {
        if let Some(since) = self.down_since_unix_ms.take() {
            info!(
                source,
                endpoint = %self.endpoint,
                failures = self.outage_failures,
                down_s = crate::status::unix_ms().saturating_sub(since) as f64 / 1000.0,
                "Docker engine answers again; caught up"
            );
        }
        self.outage_failures = 0;
        self.connected = true;
        self.last_error = None;
    }
}

/// A container between `create` and `start`.
struct Pending {
    name: String,
    task_id: Option<String>,
    /// Its networks and (once the network answered) its address on each.
    nets: BTreeMap<String, Option<Ipv4Addr>>,
    /// The namespace found to be its, once seen.
    netns: Option<PathBuf>,
    /// The networks programmed from the namespace so far.
    programmed: BTreeSet<String>,
    connect_at: Option<SystemTime>,
    programmed_at: Option<SystemTime>,
}

/// Results that come back to the event loop from work it started.
enum Back {
    Inspected {
        container: String,
        generation: u64,
        /// Boxed: an inspected container is far larger than the other results.
        result: Box<Result<Option<Inspected>, Rejected>>,
        at: Instant,
    },
    Address {
        container: String,
        network: String,
        ip: Option<Ipv4Addr>,
    },
    NewNetns(PathBuf),
    Seen(Seen),
}

pub struct LocalSource {
    api: DockerApi,
    updates: UpdateTx,
    hints: Option<HintTx>,
    status: Arc<Mutex<SourceStatus>>,
    /// Sandbox key → namespace cookie (a namespace's cookie never changes).
    cookies: Arc<Mutex<HashMap<String, u64>>>,
    netns_dir: Option<PathBuf>,
    watching_dir: Option<PathBuf>,
    back_tx: mpsc::UnboundedSender<Back>,
    back_rx: mpsc::UnboundedReceiver<Back>,
    /// Per container, the latest event: an answer to an older one is stale.
    generation: HashMap<String, u64>,
    pending: HashMap<String, Pending>,
    /// New namespaces being watched, and what they showed last.
    watches: HashMap<PathBuf, (Arc<AtomicBool>, Option<Seen>)>,
    /// Containers this source has put as sandboxes, as last put.
    live: HashMap<String, Sandbox>,
    /// The overlay peers of the networks those containers are on.
    peers: Mutex<OverlayPeers>,
}

fn unix_ns(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e9)
        .unwrap_or(0.0)
}

impl LocalSource {
    /// `netns_dir`: where Docker makes container namespaces (learned from the first
    /// container seen when not given).
    pub fn new(
        api: DockerApi,
        updates: UpdateTx,
        hints: Option<HintTx>,
        status: Arc<Mutex<SourceStatus>>,
        netns_dir: Option<PathBuf>,
    ) -> Self {
        status.lock().unwrap().endpoint = api.endpoint().to_string();
        let (back_tx, back_rx) = mpsc::unbounded_channel();
        LocalSource {
            api,
            peers: Mutex::new(OverlayPeers::new(updates.clone())),
            updates,
            hints,
            status,
            cookies: Arc::default(),
            netns_dir,
            watching_dir: None,
            back_tx,
            back_rx,
            generation: HashMap::new(),
            pending: HashMap::new(),
            watches: HashMap::new(),
            live: HashMap::new(),
        }
    }

    fn send(&self, changes: Vec<Change>, origin: Option<Instant>) {
        if !changes.is_empty() {
            self.follow_peers(&changes);
            let _ = self
                .updates
                .send(Update::read(changes, origin, Origin::Local));
        }
    }

    /// Follows the overlay peers of exactly the networks local containers are on.
    fn follow_peers(&self, changes: &[Change]) {
        let mut peers = self.peers.lock().unwrap();
        peers.observe(changes, self.netns_dir.as_deref());
        self.status.lock().unwrap().overlays_followed = peers.followed();
    }

    fn failed(&self, e: &dyn std::fmt::Display) {
        self.status.lock().unwrap().failed("local", e);
    }

    /// Follows the engine until the process ends. A failure leaves everything programmed
    /// as it is and retries, backing off to 5 s, until a full read succeeds again.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.api.events(EVENTS).await {
                Ok(mut events) => {
                    if let Err(e) = self.resync().await {
                        self.failed(&e);
                    } else {
                        backoff = Duration::from_millis(100);
                        self.status.lock().unwrap().recovered("local");
                        self.watch_netns_dir();
                        loop {
                            tokio::select! {
                                ev = events.next() => match ev {
                                    Ok(Some(Ok(ev))) => {
                                        self.status.lock().unwrap().events += 1;
                                        self.on_event(ev, Instant::now());
                                    }
                                    Ok(Some(Err(reason))) => warn!(reason, "skipped a malformed event"),
                                    Ok(None) => {
                                        self.failed(&ApiError::StreamClosed { endpoint: self.api.endpoint().to_string() });
                                        break;
                                    }
                                    Err(e) => {
                                        self.failed(&e);
                                        break;
                                    }
                                },
                                Some(b) = self.back_rx.recv() => self.on_back(b).await,
                            }
                        }
                    }
                }
                Err(e) => self.failed(&e),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Every container that may have a namespace, inspected (a few at a time).
    pub async fn resync(&mut self) -> Result<(), ApiError> {
        let body = self.api.get_bytes(LIVE).await?;
        let (ids, mut rejected) = decode::list(&body, Kind::Container, decode::container_id)
            .map_err(|e| ApiError::Status {
                path: LIVE.into(),
                status: hyper::StatusCode::OK,
                body: e,
            })?;
        let api = self.api.clone();
        let answers: Vec<Result<Option<Inspected>, Rejected>> = stream::iter(ids)
            .map(|id| {
                let api = api.clone();
                async move { inspect(&api, &id).await }
            })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut sandboxes = Vec::new();
        for r in answers {
            match r {
                Ok(Some(i)) => match sandbox(&self.cookies, &i).await {
                    Ok(Some(s)) => sandboxes.push(s),
                    Ok(None) => {}
                    Err(r) => rejected.push(r),
                },
                Ok(None) => {}
                Err(r) => rejected.push(r),
            }
        }
        if self.netns_dir.is_none() {
            self.netns_dir = sandboxes
                .iter()
                .find_map(|s| Path::new(&s.netns_path).parent().map(Path::to_path_buf));
        }
        let keys: HashSet<&str> = sandboxes.iter().map(|s| s.netns_path.as_str()).collect();
        self.cookies
            .lock()
            .unwrap()
            .retain(|k, _| keys.contains(k.as_str()));
        self.live = sandboxes
            .iter()
            .map(|s| (s.container_id.clone(), s.clone()))
            .collect();
        {
            let mut st = self.status.lock().unwrap();
            st.reads += 1;
            st.resyncs += 1;
        }
        info!(
            containers = sandboxes.len(),
            rejected = rejected.len(),
            "listed local containers"
        );
        let changes = vec![Change::Resync(Resync::Sandboxes(sandboxes, rejected))];
        self.follow_peers(&changes);
        let _ = self.updates.send(Update {
            changes,
            origin: None,
            read_at: Some(Instant::now()),
            from: Origin::Local,
            complete: true,
        });
        Ok(())
    }

    /// Starts watching Docker's netns directory for new namespaces (once it is known).
    fn watch_netns_dir(&mut self) {
        let dir = self
            .netns_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/run/docker/netns"));
        if self.watching_dir.as_ref() == Some(&dir) {
            return;
        }
        let tx = self.back_tx.clone();
        match watch_dir(&dir, move |p| tx.send(Back::NewNetns(p)).is_ok()) {
            Ok(()) => {
                info!(dir = %dir.display(), "watching for new container namespaces");
                self.status.lock().unwrap().netns_dir = Some(dir.display().to_string());
                self.watching_dir = Some(dir);
            }
            Err(e) => {
                debug!(dir = %dir.display(), error = %format!("{e:#}"), "cannot watch for new namespaces yet")
            }
        }
    }

    fn bump(&mut self, container: &str) -> u64 {
        let g = self.generation.entry(container.to_string()).or_default();
        *g += 1;
        *g
    }

    fn spawn_inspect(&mut self, container: &str, at: Instant) {
        let generation = self.bump(container);
        let api = self.api.clone();
        let tx = self.back_tx.clone();
        let container = container.to_string();
        self.status.lock().unwrap().reads += 1;
        tokio::spawn(async move {
            let result = inspect(&api, &container).await;
            let _ = tx.send(Back::Inspected {
                container,
                generation,
                result: Box::new(result),
                at,
            });
        });
    }

    /// A container that is gone, or no longer starting: stop watching for it.
    fn forget(&mut self, container: &str) {
        if let Some(p) = self.pending.remove(container) {
            if let Some(path) = p.netns {
                if let Some((stop, _)) = self.watches.remove(&path) {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    /// One event: what it says about one container.
    fn on_event(&mut self, ev: Event, at: Instant) {
        let attr = |k: &str| ev.actor.attributes.get(k).cloned();
        let (container, action) = match ev.kind.as_str() {
            "container" => (ev.actor.id.clone(), ev.action.clone()),
            "network" => match attr("container") {
                Some(c) => (c, ev.action.clone()),
                None => return,
            },
            _ => return,
        };
        debug!(kind = ev.kind, action, container, "local event");
        let event_time = UNIX_EPOCH + Duration::from_nanos(ev.time_nano.max(0) as u64);
        if ev.kind == "container" {
            if let (Some(hints), Some(service_id)) =
                (&self.hints, attr("com.docker.swarm.service.id"))
            {
                // Start, stop, kill and health changes of a task are what moves its
                // task state: the managers' view is worth re-reading now.
                let _ = hints.send(TaskHint {
                    service_id,
                    task_id: attr("com.docker.swarm.task.id").unwrap_or_default(),
                    action: action.clone(),
                });
            }
        }
        match (ev.kind.as_str(), action.as_str()) {
            // Stopped: its namespace goes with it. No need to ask.
            ("container", "die" | "destroy") => {
                self.bump(&container);
                self.forget(&container);
                self.live.remove(&container);
                self.send(vec![Change::DropSandbox(container)], Some(at));
            }
            // A stop in progress: the container serves its grace period, but a task gets
            // no new connection from now on (its node knows first; swarm reports the new
            // desired state a moment later).
            ("container", "kill") => {
                let stop = matches!(
                    attr("signal").as_deref(),
                    Some("15" | "9" | "SIGTERM" | "SIGKILL")
                );
                if let Some(sb) = self
                    .live
                    .get_mut(&container)
                    .filter(|s| stop && !s.stopping)
                {
                    sb.stopping = true;
                    let sb = sb.clone();
                    self.send(vec![Change::PutSandbox(sb)], Some(at));
                }
            }
            ("container", "create") => {
                self.pending.insert(
                    container,
                    Pending {
                        name: attr("name").unwrap_or_default(),
                        task_id: attr("com.docker.swarm.task.id").filter(|t| !t.is_empty()),
                        nets: BTreeMap::new(),
                        netns: None,
                        programmed: BTreeSet::new(),
                        connect_at: None,
                        programmed_at: None,
                    },
                );
            }
            ("container", "start") => {
                if let Some(p) = self.pending.get(&container) {
                    let mut st = self.status.lock().unwrap();
                    match (p.connect_at, p.programmed_at) {
                        (Some(c), Some(done)) => {
                            let ms = |a: SystemTime, b: SystemTime| (unix_ns(b) - unix_ns(a)) / 1e6;
                            if st.early.len() == EARLY_KEPT {
                                st.early.pop_front();
                            }
                            st.early.push_back(EarlyStart {
                                container: p.name.clone(),
                                connect_to_programmed_ms: ms(c, done),
                                programmed_before_start_ms: ms(done, event_time),
                            });
                        }
                        (Some(_), None) => st.late_starts += 1,
                        _ => {}
                    }
                }
                self.spawn_inspect(&container, at);
            }
            ("network", "connect") if !self.live.contains_key(&container) => {
                // Starting (or created and being connected): find its namespace early.
                let p = self
                    .pending
                    .entry(container.clone())
                    .or_insert_with(|| Pending {
                        name: String::new(),
                        task_id: None,
                        nets: BTreeMap::new(),
                        netns: None,
                        programmed: BTreeSet::new(),
                        connect_at: None,
                        programmed_at: None,
                    });
                p.connect_at.get_or_insert(event_time);
                let network = ev.actor.id.clone();
                p.nets.entry(network.clone()).or_insert(None);
                self.watch_netns_dir();
                let api = self.api.clone();
                let tx = self.back_tx.clone();
                tokio::spawn(async move {
                    let ip = address_on(&api, &network, &container).await;
                    let _ = tx.send(Back::Address {
                        container,
                        network,
                        ip,
                    });
                });
            }
            _ => self.spawn_inspect(&container, at),
        }
    }

    async fn on_back(&mut self, b: Back) {
        match b {
            Back::Inspected {
                container,
                generation,
                result,
                at,
            } => {
                if self.generation.get(&container) != Some(&generation) {
                    return; // a later event superseded it
                }
                let change = match *result {
                    Ok(Some(i)) => match sandbox(&self.cookies, &i).await {
                        Ok(Some(s)) => {
                            if self.netns_dir.is_none() {
                                self.netns_dir =
                                    Path::new(&s.netns_path).parent().map(Path::to_path_buf);
                                self.watch_netns_dir();
                            }
                            if i.status != "created" {
                                self.forget(&container);
                            }
                            let mut s = s;
                            // A stop already seen stays seen (an inspect racing the kill).
                            s.stopping = self
                                .live
                                .get(&container)
                                .is_some_and(|o| o.stopping && o.netns_cookie == s.netns_cookie);
                            self.live.insert(container.clone(), s.clone());
                            Change::PutSandbox(s)
                        }
                        Ok(None) => {
                            self.forget(&container);
                            self.live.remove(&container);
                            Change::DropSandbox(container)
                        }
                        Err(r) => Change::Reject(r),
                    },
                    Ok(None) => {
                        self.forget(&container);
                        self.live.remove(&container);
                        Change::DropSandbox(container)
                    }
                    Err(r) => Change::Reject(r),
                };
                self.send(vec![change], Some(at));
            }
            Back::Address {
                container,
                network,
                ip,
            } => {
                if let Some(p) = self.pending.get_mut(&container) {
                    p.nets.insert(network, ip);
                    self.try_match();
                }
            }
            Back::NewNetns(path) => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // Docker's own namespaces (overlay, load balancer, ingress) are not containers'.
                if self.pending.is_empty()
                    || name.starts_with("1-")
                    || name.starts_with("lb_")
                    || name.starts_with("ingress")
                {
                    return;
                }
                let stop = Arc::new(AtomicBool::new(false));
                let tx = self.back_tx.clone();
                if netns::watch_addresses(path.clone(), stop.clone(), WATCH_FOR, move |s| {
                    let _ = tx.send(Back::Seen(s));
                })
                .is_ok()
                {
                    self.watches.insert(path.clone(), (stop.clone(), None));
                    // It stops on its own after WATCH_FOR; forget it then too.
                    let tx = self.back_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(WATCH_FOR + Duration::from_secs(1)).await;
                        stop.store(true, Ordering::Relaxed);
                        let _ = tx;
                    });
                }
            }
            Back::Seen(seen) => {
                if let Some(w) = self.watches.get_mut(&seen.path) {
                    w.1 = Some(seen);
                    self.try_match();
                }
            }
        }
    }

    /// Pairs starting containers with the new namespace that has their address, and
    /// programs what is known of them.
    fn try_match(&mut self) {
        let mut changes = Vec::new();
        let cookies = self.cookies.clone();
        for (id, p) in self.pending.iter_mut() {
            let ips: Vec<Ipv4Addr> = p.nets.values().flatten().copied().collect();
            if ips.is_empty() {
                continue;
            }
            let found = match &p.netns {
                Some(path) => self.watches.get(path).and_then(|w| w.1.clone()),
                None => self
                    .watches
                    .values()
                    .filter_map(|w| w.1.clone())
                    .find(|s| ips.iter().any(|ip| s.addrs.contains(ip))),
            };
            let Some(seen) = found else { continue };
            p.netns = Some(seen.path.clone());
            let on: BTreeSet<String> = p
                .nets
                .iter()
                .filter(|(_, ip)| ip.is_some_and(|ip| seen.addrs.contains(&ip)))
                .map(|(n, _)| n.clone())
                .collect();
            if on.is_empty() || on == p.programmed {
                continue;
            }
            p.programmed = on.clone();
            p.programmed_at.get_or_insert_with(SystemTime::now);
            let key = seen.path.display().to_string();
            cookies.lock().unwrap().insert(key.clone(), seen.cookie);
            let endpoints = on
                .iter()
                .map(|n| {
                    (
                        Id::from(n.as_str()),
                        SandboxEndpoint {
                            addr: p.nets[n],
                            aliases: Vec::new(),
                        },
                    )
                })
                .collect();
            debug!(container = %id, networks = ?on, "programming a starting container's namespace");
            changes.push(Change::PutSandbox(Sandbox {
                container_id: id.clone(),
                name: p.name.clone(),
                netns_cookie: seen.cookie,
                netns_path: key,
                networks: on.into_iter().collect(),
                endpoints,
                hostname: String::new(),
                task_id: p.task_id.clone(),
                health: Health::None,
                stopping: false,
                // Known from the inspect after start (the ingress mesh delivers from then).
                gateway: None,
            }));
        }
        if !changes.is_empty() {
            self.send(changes, Some(Instant::now()));
        }
    }
}

/// Watches `dir` for new entries, on a thread of its own (inotify); `report` returns false
/// to stop.
fn watch_dir(dir: &Path, report: impl Fn(PathBuf) -> bool + Send + 'static) -> anyhow::Result<()> {
    use anyhow::Context;
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let ino = Inotify::init(InitFlags::IN_CLOEXEC).context("inotify")?;
    ino.add_watch(dir, AddWatchFlags::IN_CREATE)
        .with_context(|| format!("watch {}", dir.display()))?;
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("meshd-netnsdir".into())
        .spawn(move || loop {
            let Ok(events) = ino.read_events() else {
                return;
            };
            for e in events {
                if let Some(name) = e.name {
                    if !report(dir.join(name)) {
                        return;
                    }
                }
            }
        })
        .context("spawn the netns directory watcher")?;
    Ok(())
}

/// A container's address on a network, from the network (which, unlike the container,
/// answers while the container is starting).
async fn address_on(api: &DockerApi, network: &str, container: &str) -> Option<Ipv4Addr> {
    #[derive(serde::Deserialize)]
    struct Net {
        #[serde(rename = "Containers", default)]
        containers: Option<BTreeMap<String, Ep>>,
    }
    #[derive(serde::Deserialize)]
    struct Ep {
        #[serde(rename = "IPv4Address", default)]
        ipv4: String,
    }
    let body = api.get_bytes(&format!("/networks/{network}")).await.ok()?;
    let net: Net = serde_json::from_slice(&body).ok()?;
    let ep = net.containers?.remove(container)?;
    ep.ipv4.split('/').next()?.parse().ok()
}

/// The sandbox an inspected container is, when it has a live namespace.
async fn sandbox(
    cookies: &Mutex<HashMap<String, u64>>,
    i: &Inspected,
) -> Result<Option<Sandbox>, Rejected> {
    if !i.is_live() {
        return Ok(None);
    }
    let key = i.sandbox_key.clone().expect("live means a sandbox key");
    let known = cookies.lock().unwrap().get(&key).copied();
    let cookie = match known {
        Some(c) => c,
        None => match netns::cookie_of_async(Path::new(&key)).await {
            Ok(c) => {
                cookies.lock().unwrap().insert(key.clone(), c);
                c
            }
            Err(e) => {
                return Err(Rejected {
                    kind: Kind::Container,
                    id: i.id.clone(),
                    reason: format!("no network namespace: {e:#}"),
                })
            }
        },
    };
    Ok(Some(Sandbox {
        container_id: i.id.clone(),
        name: i.name.clone(),
        netns_cookie: cookie,
        netns_path: key.clone(),
        networks: i.networks.clone(),
        endpoints: i.endpoints.clone(),
        hostname: i.hostname.clone(),
        task_id: i.task_id().map(str::to_string),
        health: i.health,
        stopping: false,
        gateway: match i.gateway {
            Some(addr) => Some(BridgeLeg {
                addr,
                veth: bridge_leg::veth_of(Path::new(&key), addr)
                    .await
                    .map_err(|e| {
                        debug!(container = %i.id, error = %format!("{e:#}"), "its bridge leg's veth is not known: the ingress mesh reaches it through the bridge");
                    })
                    .ok(),
            }),
            None => None,
        },
    }))
}

/// `GET /containers/{id}/json`: None when the container is gone.
async fn inspect(api: &DockerApi, id: &str) -> Result<Option<Inspected>, Rejected> {
    match api.get_bytes(&format!("/containers/{id}/json")).await {
        Ok(body) => {
            let mut i = decode::one(&body, Kind::Container, decode::inspect)?;
            // A task's leg on docker_gwbridge is where the ingress mesh delivers to it.
            if i.task_id().is_some() && i.is_live() {
                i.gateway = address_on(api, GATEWAY_BRIDGE, &i.id).await;
            }
            Ok(Some(i))
        }
        Err(e) if DockerApi::is_not_found(&e) => Ok(None),
        Err(e) => Err(Rejected {
            kind: Kind::Container,
            id: id.to_string(),
            reason: e.to_string(),
        }),
    }
}
