//! The swarm, from a manager's engine. Events name the object that changed and meshd
//! re-reads that object only (`/services/{id}`, `/nodes/{id}`, `/networks/{id}`).
//!
//! Tasks have no events. What moves them is a service change (an update, a scale), a node
//! change, or a container event on the node that runs them, which that node's meshd passes
//! on as a hint. Each of these starts following the service: its tasks are re-read (one
//! filtered request for all services due at once) at once, then at growing intervals
//! (20 ms, 40 ms, ... 500 ms) while anything changes or is on its way, and no more once the
//! service has settled. A slow round-robin re-read of every service's tasks, and full lists
//! of services, networks and nodes, are the safety net for anything missed.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    decode::{self, Event},
    docker_api::{ApiError, DockerApi},
    local::SourceStatus,
    managers::Managers,
    Origin, TaskHint, Update, UpdateTx,
};
use crate::model::{Change, Kind, Rejected, Resync, Task};

const EVENTS: &str = "filters=%7B%22type%22%3A%5B%22service%22%2C%22network%22%2C%22node%22%5D%7D";
/// Services per filtered `/tasks` request.
const SLICE: usize = 100;
/// Filtered `/tasks` requests in flight at once during a full read.
const READ_AHEAD: usize = 2;

#[derive(Clone, Debug)]
pub struct SwarmConfig {
    /// How long one full pass of the safety-net re-read takes.
    pub resync: Duration,
    /// The first re-read after a change; doubling up to `fast_max`.
    pub fast_first: Duration,
    pub fast_max: Duration,
    /// Following stops after this long without the service settling (a hint starts it
    /// again); a rolling update keeps it going.
    pub window: Duration,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            resync: Duration::from_secs(600),
            fast_first: Duration::from_millis(20),
            fast_max: Duration::from_millis(500),
            window: Duration::from_secs(120),
        }
    }
}

/// One service being followed.
#[derive(Debug)]
struct Follow {
    due: Instant,
    step: u32,
    /// Re-reads in a row that found the service settled.
    quiet: u32,
    until: Instant,
    /// The event that started this round (for latency).
    origin: Option<Instant>,
}

/// What the last read of a service's tasks showed, to tell change from repetition: a
/// fingerprint, not a copy (at 10 000 services a copy of every task is tens of megabytes).
#[derive(Debug, Default)]
struct Seen {
    /// Hash of the tasks as read (None: send them on the next read whatever they are).
    tasks: Option<u64>,
    /// Some task is on its way to running or to stopping.
    moving: bool,
    updating: bool,
    /// The nodes its tasks are on (hashed ids, sorted): a node change follows it. 32 bits
    /// and a boxed slice: 10k services' lists were 0.8 MB as `Vec<u64>`; two nodes sharing
    /// a hash only cost a re-read that finds nothing new.
    nodes: Box<[u32]>,
}

fn node_hash(id: &str) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    (h.finish() >> 32) as u32
}

fn fingerprint(tasks: &[Task]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    tasks.hash(&mut h);
    h.finish()
}

pub struct SwarmSource {
    managers: Managers,
    cfg: SwarmConfig,
    updates: UpdateTx,
    hints: mpsc::UnboundedReceiver<TaskHint>,
    status: Arc<Mutex<SourceStatus>>,
    follow: BTreeMap<String, Follow>,
    seen: BTreeMap<String, Seen>,
    /// Where the round-robin re-read is.
    cursor: Option<String>,
    next_full: Instant,
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `/tasks` for these services, tasks meant to run only (a task whose desired state turned
/// to shutdown drops out of the answer: drained at once).
fn tasks_query(services: &[String]) -> String {
    let list: Vec<String> = services.iter().map(|s| format!("\"{s}\"")).collect();
    let filter = format!(
        "{{\"service\":[{}],\"desired-state\":[\"running\"]}}",
        list.join(",")
    );
    format!("/tasks?filters={}", encode(&filter))
}

/// A list the manager answered that does not decode as a whole.
fn undecodable(path: &str, reason: String) -> ApiError {
    ApiError::Status {
        path: path.into(),
        status: hyper::StatusCode::OK,
        body: reason,
    }
}

/// Records a failed read against manager `which` and moves on to the next manager. Every
/// error the source's reads return was recorded where it happened, so callers only decide
/// what to retry.
fn failed(managers: &Managers, status: &Mutex<SourceStatus>, which: usize, e: &ApiError) {
    let mut st = status.lock().unwrap();
    st.failed("swarm", e);
    managers.failed(which);
    st.endpoint = managers.pick().1.endpoint().to_string();
}

/// GET from the manager in use; a failure (other than "no such object") moves to the next.
async fn get(
    managers: &Managers,
    status: &Mutex<SourceStatus>,
    path: &str,
) -> Result<bytes::Bytes, ApiError> {
    let mut body = Vec::new();
    get_into(managers, status, path, &mut body).await?;
    Ok(body.into())
}

/// `get` into a buffer the caller reuses.
async fn get_into(
    managers: &Managers,
    status: &Mutex<SourceStatus>,
    path: &str,
    body: &mut Vec<u8>,
) -> Result<(), ApiError> {
    let (which, api) = managers.pick();
    let r = api.get_into(path, body).await;
    match &r {
        Ok(_) => status.lock().unwrap().reads += 1,
        Err(e) if DockerApi::is_not_found(e) => {}
        Err(e) => failed(managers, status, which, e),
    }
    r
}

/// A read started ahead, called off when its answer is no longer wanted (an earlier slice
/// failed, or the source stops).
struct Ahead<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Ahead<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn settled(seen: &Seen) -> bool {
    !seen.updating && !seen.moving
}

impl SwarmSource {
    pub fn new(
        managers: Managers,
        cfg: SwarmConfig,
        updates: UpdateTx,
        hints: mpsc::UnboundedReceiver<TaskHint>,
        status: Arc<Mutex<SourceStatus>>,
    ) -> Self {
        status.lock().unwrap().endpoint = managers.pick().1.endpoint().to_string();
        let next_full = Instant::now() + cfg.resync;
        SwarmSource {
            managers,
            cfg,
            updates,
            hints,
            status,
            follow: BTreeMap::new(),
            seen: BTreeMap::new(),
            cursor: None,
            next_full,
        }
    }

    fn api(&self) -> (usize, DockerApi) {
        let (i, api) = self.managers.pick();
        (i, api.clone())
    }

    fn send(&self, changes: Vec<Change>, origin: Option<Instant>) {
        if !changes.is_empty() {
            let _ = self
                .updates
                .send(Update::read(changes, origin, Origin::Swarm));
        }
    }

    fn failed(&self, which: usize, e: &ApiError) {
        failed(&self.managers, &self.status, which, e)
    }

    async fn get(&self, path: &str) -> Result<bytes::Bytes, ApiError> {
        get(&self.managers, &self.status, path).await
    }

    /// Follows the swarm until the process ends.
    pub async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let (which, api) = self.api();
            match api.events(EVENTS).await {
                Ok(mut events) => {
                    if let Err(e) = self.full_sync().await {
                        debug!(error = %e, "full read of the swarm failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    backoff = Duration::from_millis(100);
                    self.status.lock().unwrap().recovered("swarm");
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        let due = self
                            .follow
                            .values()
                            .map(|f| f.due)
                            .min()
                            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
                        tokio::select! {
                            ev = events.next() => match ev {
                                Ok(Some(Ok(ev))) => {
                                    self.status.lock().unwrap().events += 1;
                                    self.handle(ev, Instant::now()).await;
                                }
                                Ok(Some(Err(reason))) => warn!(reason, "skipped a malformed event"),
                                Ok(None) => {
                                    self.failed(which, &ApiError::StreamClosed { endpoint: api.endpoint().to_string() });
                                    break;
                                }
                                Err(e) => {
                                    self.failed(which, &e);
                                    break;
                                }
                            },
                            Some(h) = self.hints.recv() => {
                                debug!(service = %h.service_id, task = %h.task_id, action = %h.action, "task hint");
                                self.start_following(&h.service_id, Some(Instant::now()));
                            }
                            _ = tokio::time::sleep_until(due.into()) => self.poll_due().await,
                            _ = tick.tick() => self.safety_net().await,
                        }
                    }
                }
                Err(e) => self.failed(which, &e),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    fn start_following(&mut self, service_id: &str, origin: Option<Instant>) {
        let now = Instant::now();
        let until = now + self.cfg.window;
        let f = self.follow.entry(service_id.to_string()).or_insert(Follow {
            due: now,
            step: 0,
            quiet: 0,
            until,
            origin,
        });
        f.due = now;
        f.step = 0;
        f.quiet = 0;
        f.until = until;
        if f.origin.is_none() {
            f.origin = origin;
        }
    }

    async fn handle(&mut self, ev: Event, at: Instant) {
        let id = ev.actor.id.clone();
        debug!(kind = ev.kind, action = ev.action, id, "swarm event");
        match (ev.kind.as_str(), ev.action.as_str()) {
            ("service", "remove") => {
                self.seen.remove(&id);
                self.follow.remove(&id);
                self.send(vec![Change::DropService(id)], Some(at));
            }
            ("service", _) => {
                match self.get(&format!("/services/{id}")).await {
                    Ok(body) => {
                        let change = match decode::one(&body, Kind::Service, decode::service) {
                            Ok(s) => {
                                self.seen.entry(id.clone()).or_default().updating = s.updating;
                                Change::PutService(s)
                            }
                            Err(r) => Change::Reject(Rejected {
                                id: id.clone(),
                                ..r
                            }),
                        };
                        self.send(vec![change], Some(at));
                    }
                    Err(e) if DockerApi::is_not_found(&e) => {
                        self.send(vec![Change::DropService(id.clone())], Some(at))
                    }
                    Err(e) => debug!(error = %e, service = %id, "cannot read a changed service"),
                }
                // Its tasks move next (a scale, a rolling update, a new service).
                self.start_following(&id, Some(at));
            }
            ("node", _) => {
                let change = match self.get(&format!("/nodes/{id}")).await {
                    Ok(body) => match decode::one(&body, Kind::Node, decode::node) {
                        Ok(n) => Change::PutNode(n),
                        Err(r) => Change::Reject(Rejected {
                            id: id.clone(),
                            ..r
                        }),
                    },
                    Err(e) if DockerApi::is_not_found(&e) => Change::DropNode(id.clone()),
                    Err(e) => {
                        debug!(error = %e, node = %id, "cannot read a changed node");
                        return;
                    }
                };
                self.send(vec![change], Some(at));
                // Its tasks are rescheduled elsewhere when it goes down.
                let node = node_hash(&id);
                let on: Vec<String> = self
                    .seen
                    .iter()
                    .filter(|(_, s)| s.nodes.binary_search(&node).is_ok())
                    .map(|(k, _)| k.clone())
                    .collect();
                for s in on {
                    self.start_following(&s, Some(at));
                }
            }
            ("network", "create" | "update" | "remove" | "destroy") => {
                let change = match self.get(&format!("/networks/{id}")).await {
                    Ok(body) => match decode::one(&body, Kind::Network, decode::network) {
                        Ok(n) => Change::PutNetwork(n),
                        Err(r) => Change::Reject(Rejected {
                            id: id.clone(),
                            ..r
                        }),
                    },
                    Err(e) if DockerApi::is_not_found(&e) => Change::DropNetwork(id.clone()),
                    Err(e) => {
                        debug!(error = %e, network = %id, "cannot read a changed network");
                        return;
                    }
                };
                self.send(vec![change], Some(at));
            }
            _ => {}
        }
    }

    /// Re-reads the tasks of `services` in one request each `SLICE`; returns, per service,
    /// whether what it showed changed since the last read.
    async fn read_tasks(
        &mut self,
        services: &[String],
        origin: Option<Instant>,
    ) -> Result<BTreeMap<String, bool>, ApiError> {
        let mut out = BTreeMap::new();
        // The next slices are read and decoded by tasks of their own while this one is
        // sorted and sent: awaited in place, a body is only read when it is polled, and the
        // source would use one core of the two the reconciler shares with it.
        let (managers, status) = (self.managers.clone(), self.status.clone());
        let queries: Vec<String> = services.chunks(SLICE).map(tasks_query).collect();
        // The slices in flight pass their answer buffers on; they go when this read ends.
        let buffers: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let mut slices = futures_util::stream::iter(queries)
            .map(move |q| {
                let (managers, status) = (managers.clone(), status.clone());
                let buffers = buffers.clone();
                let mut read = Ahead(tokio::spawn(async move {
                    let mut body = buffers.lock().unwrap().pop().unwrap_or_default();
                    get_into(&managers, &status, &q, &mut body).await?;
                    let r = decode::tasks(&body).map_err(|e| {
                        let e = undecodable("/tasks", e);
                        failed(&managers, &status, managers.pick().0, &e);
                        e
                    });
                    buffers.lock().unwrap().push(body);
                    r
                }));
                async move {
                    match (&mut read.0).await {
                        Ok(r) => r,
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        Err(_) => Err(ApiError::Cancelled {
                            path: "/tasks".into(),
                        }),
                    }
                }
            })
            .buffered(READ_AHEAD);
        for chunk in services.chunks(SLICE) {
            let Some(slice) = slices.next().await else {
                break;
            };
            let (tasks, rejected) = slice?;
            let mut by_service: BTreeMap<String, Vec<Task>> =
                chunk.iter().map(|s| (s.clone(), Vec::new())).collect();
            for t in tasks {
                if let Some(list) = by_service.get_mut(&*t.service_id) {
                    list.push(t);
                }
            }
            let mut changes: Vec<Change> = rejected.into_iter().map(Change::Reject).collect();
            for (service_id, mut tasks) in by_service {
                tasks.sort_by(|a, b| a.id.cmp(&b.id));
                let seen = self.seen.entry(service_id.clone()).or_default();
                let mut nodes: Vec<u32> = tasks.iter().map(|t| node_hash(&t.node_id)).collect();
                nodes.sort_unstable();
                nodes.dedup();
                seen.nodes = nodes.into_boxed_slice();
                let print = fingerprint(&tasks);
                let changed = seen.tasks != Some(print);
                seen.moving = tasks.iter().any(Task::in_transition);
                out.insert(service_id.clone(), changed);
                if changed {
                    seen.tasks = Some(print);
                    changes.push(Change::ServiceTasks { service_id, tasks });
                }
            }
            self.send(changes, origin);
        }
        Ok(out)
    }

    /// Re-reads every followed service that is due, and schedules the next read.
    async fn poll_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .follow
            .iter()
            .filter(|(_, f)| f.due <= now)
            .map(|(s, _)| s.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let origin = due.iter().filter_map(|s| self.follow[s].origin).min();
        let changed = match self.read_tasks(&due, origin).await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "cannot re-read tasks; trying again");
                for s in &due {
                    if let Some(f) = self.follow.get_mut(s) {
                        f.due = Instant::now() + self.cfg.fast_max;
                    }
                }
                return;
            }
        };
        let now = Instant::now();
        for s in due {
            let calm = self.seen.get(&s).is_some_and(settled);
            let moved = changed.get(&s).copied().unwrap_or(false);
            let Some(f) = self.follow.get_mut(&s) else {
                continue;
            };
            if moved {
                f.step = 0;
                f.quiet = 0;
                // The change this round was about is applied: later ones are not its.
                f.origin = None;
            } else {
                f.step += 1;
            }
            if calm && !moved {
                f.quiet += 1;
            }
            let updating = self.seen.get(&s).is_some_and(|x| x.updating);
            if f.quiet >= 2 || (now >= f.until && !updating) {
                self.follow.remove(&s);
                continue;
            }
            let delay = self
                .cfg
                .fast_first
                .saturating_mul(1 << f.step.min(10))
                .min(self.cfg.fast_max);
            f.due = now + delay;
        }
    }

    /// Full lists of networks, nodes and services, then every service's tasks.
    async fn full_sync(&mut self) -> Result<(), ApiError> {
        let started = Instant::now();
        let mut changes = Vec::new();
        let bad = |e: String, path: &str| {
            let e = undecodable(path, e);
            failed(&self.managers, &self.status, self.managers.pick().0, &e);
            e
        };
        let (networks, rn) = decode::list(
            &self.get("/networks").await?,
            Kind::Network,
            decode::network,
        )
        .map_err(|e| bad(e, "/networks"))?;
        changes.push(Change::Resync(Resync::Networks(networks, rn)));
        let (nodes, rno) = decode::list(&self.get("/nodes").await?, Kind::Node, decode::node)
            .map_err(|e| bad(e, "/nodes"))?;
        changes.push(Change::Resync(Resync::Nodes(nodes, rno)));
        let body = self.get("/services").await?;
        let (services, rs) =
            decode::list(&body, Kind::Service, decode::service).map_err(|e| bad(e, "/services"))?;
        drop(body);
        let ids: std::collections::BTreeSet<String> =
            services.iter().map(|s| s.id.to_string()).collect();
        for s in &services {
            self.seen.entry(s.id.to_string()).or_default().updating = s.updating;
        }
        self.seen.retain(|k, _| ids.contains(k));
        crate::model::repack(&mut self.seen);
        self.follow.retain(|k, _| ids.contains(k));
        changes.push(Change::Resync(Resync::Services(services, rs)));
        self.send(changes, None);
        // Every service's tasks, a slice at a time (so no answer is the whole cluster's).
        for s in &ids {
            // Forget what was seen: a full sync sends every service's tasks again.
            if let Some(seen) = self.seen.get_mut(s) {
                seen.tasks = None;
            }
        }
        let ids: Vec<String> = ids.into_iter().collect();
        let changed = self.read_tasks(&ids, None).await?;
        let _ = self.updates.send(Update {
            changes: Vec::new(),
            origin: None,
            read_at: Some(Instant::now()),
            from: Origin::Swarm,
            complete: true,
        });
        // Services whose tasks are on their way get followed.
        for s in &ids {
            if self.seen.get(s).is_some_and(|x| !settled(x)) {
                self.start_following(s, None);
            }
        }
        self.next_full = Instant::now() + self.cfg.resync;
        {
            let mut st = self.status.lock().unwrap();
            st.resyncs += 1;
            st.last_full_read_ms = started.elapsed().as_secs_f64() * 1000.0;
        }
        info!(
            services = ids.len(),
            changed = changed.values().filter(|c| **c).count(),
            took_ms = started.elapsed().as_millis() as u64,
            "read the swarm"
        );
        Ok(())
    }

    /// Once a second: the next few services' tasks (so every service is re-read once per
    /// `resync`), and the full lists when their time comes.
    async fn safety_net(&mut self) {
        if Instant::now() >= self.next_full {
            match self.full_sync().await {
                Ok(()) => self.status.lock().unwrap().recovered("swarm"),
                Err(e) => {
                    debug!(error = %e, "safety-net re-read failed");
                    self.next_full = Instant::now() + Duration::from_secs(5);
                }
            }
            return;
        }
        if self.seen.is_empty() {
            return;
        }
        let per_tick = self
            .seen
            .len()
            .div_ceil(self.cfg.resync.as_secs().max(1) as usize)
            .max(1);
        // The services after the cursor, wrapping around: a tick costs its slice, not a
        // pass over every service.
        use std::ops::Bound::{Excluded, Unbounded};
        let after = match &self.cursor {
            Some(c) => self.seen.range::<String, _>((Excluded(c), Unbounded)),
            None => self.seen.range::<String, _>(..),
        };
        let batch: Vec<String> = after
            .chain(self.seen.iter())
            .map(|(s, _)| s)
            .take(per_tick.min(self.seen.len()))
            .cloned()
            .collect();
        self.cursor = batch.last().cloned();
        match self.read_tasks(&batch, None).await {
            Ok(changed) => {
                for (s, c) in changed {
                    if c {
                        info!(service = %s, "the safety-net re-read found a change no event announced");
                        self.start_following(&s, None);
                    }
                }
            }
            Err(e) => debug!(error = %e, "safety-net re-read failed"),
        }
    }
}

/// One full read (`meshd check`): networks, nodes, services and every live task.
pub async fn read_once(api: &DockerApi) -> Result<Vec<Change>, ApiError> {
    let bad = |e: String, path: &str| undecodable(path, e);
    let (n, rn) = decode::list(
        &api.get_bytes("/networks").await?,
        Kind::Network,
        decode::network,
    )
    .map_err(|e| bad(e, "/networks"))?;
    let (no, rno) = decode::list(&api.get_bytes("/nodes").await?, Kind::Node, decode::node)
        .map_err(|e| bad(e, "/nodes"))?;
    let (s, rs) = decode::list(
        &api.get_bytes("/services").await?,
        Kind::Service,
        decode::service,
    )
    .map_err(|e| bad(e, "/services"))?;
    let q = format!(
        "/tasks?filters={}",
        encode("{\"desired-state\":[\"running\"]}")
    );
    let (t, rt) = decode::tasks(&api.get_bytes(&q).await?).map_err(|e| bad(e, "/tasks"))?;
    Ok(vec![
        Change::Resync(Resync::Networks(n, rn)),
        Change::Resync(Resync::Nodes(no, rno)),
        Change::Resync(Resync::Services(s, rs)),
        Change::Resync(Resync::Tasks(t, rt)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tasks_query_filters_services_and_desired_state() {
        let q = tasks_query(&["a1".into(), "b2".into()]);
        assert_eq!(
            q,
            "/tasks?filters=%7B%22service%22%3A%5B%22a1%22%2C%22b2%22%5D%2C%22desired-state%22%3A%5B%22running%22%5D%7D"
        );
    }
}
