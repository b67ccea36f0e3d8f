//! The store behind `ClusterState`: objects by id, the indexes that let a change find what
//! it touches, and `apply`, which turns a `Change` into the `Dirty` set compile works from.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

use super::{objects::*, TaskId};

/// One thing a source learned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    PutService(Service),
    DropService(String),
    PutTask(Task),
    DropTask(String),
    /// A filtered re-read: the live tasks of this service are exactly these; its other
    /// tasks are gone (or no longer meant to run).
    ServiceTasks {
        service_id: String,
        tasks: Vec<Task>,
    },
    PutNetwork(Network),
    DropNetwork(String),
    PutNode(Node),
    DropNode(String),
    /// A container of this node, by container id.
    PutSandbox(Sandbox),
    DropSandbox(String),
    /// What another node reports (its standalone containers, tasks it holds back).
    PutReport(NodeReport),
    DropReport(String),
    /// A full read of one kind: whatever of that kind is not in it is gone.
    Resync(Resync),
    Reject(Rejected),
    /// The remote peers this node's engine has programmed on an overlay network
    /// (`source::overlay_peers`): `whole` replaces what was known, otherwise `added` and
    /// `removed` are a difference.
    OverlayPeers {
        network_id: String,
        whole: bool,
        added: Vec<Ipv4Addr>,
        removed: Vec<Ipv4Addr>,
    },
    /// No view of that network's peers any more (no local container on it): every task on
    /// it is taken as reachable, as without a view.
    DropOverlayPeers(String),
}

/// A full read of one kind of object, with the objects of that kind that did not decode
/// (they replace every earlier rejection of that kind).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Resync {
    Services(Vec<Service>, Vec<Rejected>),
    /// Every live task (desired state running).
    Tasks(Vec<Task>, Vec<Rejected>),
    Networks(Vec<Network>, Vec<Rejected>),
    Nodes(Vec<Node>, Vec<Rejected>),
    Sandboxes(Vec<Sandbox>, Vec<Rejected>),
    /// Every other node's report.
    Reports(Vec<NodeReport>),
}

/// What a change touched: the services whose load balancers, the networks whose names and
/// the local sandboxes whose scope must be compiled again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dirty {
    pub services: BTreeSet<Id>,
    pub networks: BTreeSet<Id>,
    /// By container id.
    pub sandboxes: BTreeSet<String>,
    /// The rejected list changed.
    pub rejected: bool,
    /// A node came, went or changed its address (the ingress mesh's tunnel peers).
    pub nodes: bool,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.networks.is_empty()
            && self.sandboxes.is_empty()
            && !self.rejected
            && !self.nodes
    }

    pub fn merge(&mut self, other: Dirty) {
        self.services.extend(other.services);
        self.networks.extend(other.networks);
        self.sandboxes.extend(other.sandboxes);
        self.rejected |= other.rejected;
        self.nodes |= other.nodes;
    }
}

/// Derived lookups, kept in step with the objects by `apply`.
#[derive(Clone, Debug, Default, PartialEq)]
struct Index {
    /// Network → service → how many references (a VIP, a task address) tie them.
    services_by_network: BTreeMap<Id, BTreeMap<Id, u32>>,
    sandboxes_by_network: BTreeMap<Id, BTreeSet<Id>>,
    /// Network → nodes whose report has a container on it.
    reports_by_network: BTreeMap<Id, BTreeSet<Id>>,
    /// Task → who holds it back (its node's report, or a local container): unhealthy, or
    /// stopping.
    held: BTreeMap<Id, BTreeSet<Id>>,
}

fn add_ref(map: &mut BTreeMap<Id, BTreeMap<Id, u32>>, outer: &Id, inner: &Id) {
    *map.entry(outer.clone())
        .or_default()
        .entry(inner.clone())
        .or_default() += 1;
}

fn drop_ref(map: &mut BTreeMap<Id, BTreeMap<Id, u32>>, outer: &str, inner: &str) {
    if let Some(m) = map.get_mut(outer) {
        if let Some(n) = m.get_mut(inner) {
            *n -= 1;
            if *n == 0 {
                m.remove(inner);
            }
        }
        if m.is_empty() {
            map.remove(outer);
        }
    }
}

fn add_to(map: &mut BTreeMap<Id, BTreeSet<Id>>, outer: &Id, inner: &Id) {
    map.entry(outer.clone()).or_default().insert(inner.clone());
}

fn remove_from(map: &mut BTreeMap<Id, BTreeSet<Id>>, outer: &str, inner: &str) {
    if let Some(s) = map.get_mut(outer) {
        s.remove(inner);
        if s.is_empty() {
            map.remove(outer);
        }
    }
}

fn set(map: &mut BTreeMap<Id, BTreeSet<Id>>, outer: &Id, inner: &Id, on: bool) {
    if on {
        add_to(map, outer, inner)
    } else {
        remove_from(map, outer, inner)
    }
}

#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// By service id.
    pub services: BTreeMap<Id, Service>,
    /// Live tasks (desired state running, and those just turned to shutdown), by service.
    pub tasks: super::Tasks,
    /// By network id.
    pub networks: BTreeMap<Id, Network>,
    /// By node id.
    pub nodes: BTreeMap<Id, Node>,
    /// Containers running on this node, by container id.
    pub sandboxes: BTreeMap<String, Sandbox>,
    /// Other nodes' reports, by node id.
    pub reports: BTreeMap<String, NodeReport>,
    /// Objects that could not be used, by kind and id; each is left out, the rest is used.
    pub rejected: BTreeMap<(Kind, String), Rejected>,
    /// Per overlay network this node follows, the remote addresses its engine can reach
    /// (Docker's overlay learns them by gossip, apart from the tasks' state): `reachable`.
    pub overlay_peers: BTreeMap<Id, HashSet<Ipv4Addr>>,
    index: Index,
    /// One allocation per service, node and network id, shared by everything that names it.
    pool: std::collections::HashSet<Id, foldhash::fast::RandomState>,
}

impl PartialEq for ClusterState {
    /// The objects (the pool of shared ids is how they are stored, not what they are).
    fn eq(&self, o: &Self) -> bool {
        self.services == o.services
            && self.tasks == o.tasks
            && self.networks == o.networks
            && self.nodes == o.nodes
            && self.sandboxes == o.sandboxes
            && self.reports == o.reports
            && self.rejected == o.rejected
            && self.overlay_peers == o.overlay_peers
            && self.index == o.index
    }
}

/// The networks a service shows up on: its VIPs' and its tasks'.
fn service_refs(s: &Service) -> impl Iterator<Item = &Id> {
    s.vips.keys()
}

fn id(s: &str) -> Id {
    Id::from(s)
}

impl ClusterState {
    /// Builds a state from whole lists (tests, the feed's snapshot).
    pub fn from_changes(changes: impl IntoIterator<Item = Change>) -> ClusterState {
        let mut s = ClusterState::default();
        for c in changes {
            s.apply(c);
        }
        s
    }

    /// The shared copy of an id (service, node or network).
    fn intern(&mut self, s: &Id) -> Id {
        if let Some(p) = self.pool.get(s) {
            return p.clone();
        }
        self.pool.insert(s.clone());
        s.clone()
    }

    /// Forgets ids nothing names any more (a full read does this now and then).
    fn trim_pool(&mut self) {
        self.pool.retain(|p| Id::strong_count(p) > 1);
    }

    fn intern_task(&mut self, t: &mut Task) {
        t.service_id = self.intern(&t.service_id);
        t.node_id = self.intern(&t.node_id);
        let mut addrs = std::mem::take(&mut t.addresses);
        addrs.intern_keys(|k| self.intern(k));
        t.addresses = addrs;
    }

    /// Whether `task` gets connections and DNS answers: `Task::serves` with its node and
    /// what its node's engine says.
    pub fn serves(&self, task: &Task) -> bool {
        task.serves(
            self.nodes.get(&*task.node_id),
            self.index.held.contains_key(&*task.id),
        )
    }

    /// The tasks of a service, live or draining.
    pub fn tasks_of<'a>(&'a self, service_id: &str) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks.of_service(service_id).iter()
    }

    /// A node's tasks, found by a pass over all tasks: only a node's liveness or hostname
    /// changing asks (rare; the pass costs well under a millisecond at 100 000 tasks), and
    /// an index by node would hold 2 MB at that size.
    pub fn tasks_on_node<'a>(&'a self, node_id: &'a str) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks
            .values()
            .filter(move |t| !node_id.is_empty() && &*t.node_id == node_id)
    }

    /// Services with a VIP or a task on this network.
    pub fn services_on<'a>(&'a self, network_id: &str) -> impl Iterator<Item = &'a Service> + 'a {
        self.index
            .services_by_network
            .get(network_id)
            .into_iter()
            .flat_map(|m| m.keys())
            .filter_map(|id| self.services.get(id))
    }

    pub fn sandboxes_on<'a>(&'a self, network_id: &str) -> impl Iterator<Item = &'a Sandbox> + 'a {
        self.index
            .sandboxes_by_network
            .get(network_id)
            .into_iter()
            .flatten()
            .filter_map(|id| self.sandboxes.get(&**id))
    }

    /// Other nodes' containers on this network (not those of a node swarm reports down,
    /// nor this node's own, which are sandboxes).
    pub fn remote_containers_on<'a>(
        &'a self,
        network_id: &'a str,
    ) -> impl Iterator<Item = &'a RemoteContainer> + 'a {
        self.index
            .reports_by_network
            .get(network_id)
            .into_iter()
            .flatten()
            .filter(|node| !self.nodes.get(&***node).is_some_and(Node::is_down))
            .filter_map(|node| self.reports.get(&**node))
            .flat_map(|r| r.containers.iter())
            .filter(move |c| {
                c.endpoints.contains_key(network_id)
                    && !self.sandboxes.contains_key(&c.container_id)
            })
    }

    /// The networks a service shows up on (VIPs and task addresses).
    pub fn networks_of_service(&self, service_id: &str) -> BTreeSet<Id> {
        let mut out: BTreeSet<Id> = self
            .services
            .get(service_id)
            .into_iter()
            .flat_map(|s| s.vips.keys().cloned())
            .collect();
        for t in self.tasks_of(service_id) {
            out.extend(t.addresses.keys().cloned());
        }
        out
    }

    pub fn rejected_list(&self) -> Vec<Rejected> {
        self.rejected.values().cloned().collect()
    }

    /// Applies one change and says what it touched. A change that changes nothing (the same
    /// object read again) touches nothing.
    pub fn apply(&mut self, change: Change) -> Dirty {
        let mut d = Dirty::default();
        match change {
            Change::PutService(s) => self.put_service(s, &mut d),
            Change::DropService(id) => self.drop_service(&id, &mut d),
            Change::PutTask(t) => self.put_task(t, &mut d),
            Change::DropTask(id) => self.drop_task(&id, &mut d),
            Change::ServiceTasks { service_id, tasks } => {
                let keep: BTreeSet<&str> = tasks.iter().map(|t| &*t.id).collect();
                let gone: Vec<TaskId> = self
                    .tasks_of(&service_id)
                    .filter(|t| !keep.contains(&*t.id))
                    .map(|t| t.id.clone())
                    .collect();
                for id in gone {
                    self.drop_task(&id, &mut d);
                }
                if let Some(first) = tasks.first() {
                    let sid = self.intern(&first.service_id);
                    self.tasks.reserve(&sid, tasks.len());
                }
                for t in tasks {
                    self.put_task(t, &mut d);
                }
            }
            Change::PutNetwork(n) => self.put_network(n, &mut d),
            Change::DropNetwork(id) => self.drop_network(&id, &mut d),
            Change::PutNode(n) => self.put_node(n, &mut d),
            Change::DropNode(id) => self.drop_node(&id, &mut d),
            Change::PutSandbox(s) => self.put_sandbox(s, &mut d),
            Change::DropSandbox(id) => self.drop_sandbox(&id, &mut d),
            Change::PutReport(r) => self.put_report(r, &mut d),
            Change::DropReport(id) => self.drop_report(&id, &mut d),
            Change::Resync(r) => {
                self.resync(r, &mut d);
                self.trim_pool();
            }
            Change::Reject(r) => {
                let key = (r.kind, r.id.clone());
                if self.rejected.get(&key) != Some(&r) {
                    self.rejected.insert(key, r);
                    d.rejected = true;
                }
            }
            Change::OverlayPeers {
                network_id,
                whole,
                added,
                removed,
            } => self.put_peers(&network_id, whole, added, removed, &mut d),
            Change::DropOverlayPeers(network_id) => {
                if self.overlay_peers.remove(network_id.as_str()).is_some() {
                    d.services
                        .extend(self.services_on(&network_id).map(|s| s.id.clone()));
                    d.networks.insert(id(&network_id));
                }
            }
        }
        d
    }

    /// Whether this node can reach `addr` on `network_id`: a local container's address, or
    /// one the engine's overlay has as a peer; anything, on a network without a view.
    pub fn reachable(&self, network_id: &str, addr: Ipv4Addr) -> bool {
        let Some(peers) = self.overlay_peers.get(network_id) else {
            return true;
        };
        peers.contains(&addr)
            || self
                .sandboxes_on(network_id)
                .any(|s| s.endpoints.get(network_id).and_then(|e| e.addr) == Some(addr))
    }

    /// `addrs` (a service's live task addresses on `network_id`) without those this node
    /// cannot reach yet: a remote task Docker's gossip has not brought to this node's overlay
    /// would time connections out. Unless that leaves none: a view still filling in (the
    /// network is new here) must not turn a VIP away. The datapath and DNS both use this.
    pub fn reachable_of(&self, network_id: &str, addrs: &mut Vec<Ipv4Addr>) {
        if !self.overlay_peers.contains_key(network_id) {
            return;
        }
        if addrs.iter().any(|a| self.reachable(network_id, *a)) {
            addrs.retain(|a| self.reachable(network_id, *a));
        }
    }

    fn put_peers(
        &mut self,
        network_id: &str,
        whole: bool,
        added: Vec<Ipv4Addr>,
        removed: Vec<Ipv4Addr>,
        d: &mut Dirty,
    ) {
        let net = self.intern(&id(network_id));
        let had_view = self.overlay_peers.contains_key(network_id);
        let peers = self.overlay_peers.entry(net.clone()).or_default();
        let mut moved: HashSet<Ipv4Addr> = HashSet::new();
        if whole {
            let new: HashSet<Ipv4Addr> = added.into_iter().collect();
            moved.extend(peers.symmetric_difference(&new).copied());
            *peers = new;
        } else {
            for a in added {
                if peers.insert(a) {
                    moved.insert(a);
                }
            }
            for a in removed {
                if peers.remove(&a) {
                    moved.insert(a);
                }
            }
        }
        if !had_view {
            // Every remote task here was reachable without a view.
            d.services
                .extend(self.services_on(&net).map(|s| s.id.clone()));
            d.networks.insert(net);
            return;
        }
        if moved.is_empty() {
            return;
        }
        d.networks.insert(net.clone());
        // Only the services with a task at an address that moved.
        let hit: Vec<Id> = self
            .services_on(&net)
            .filter(|s| {
                self.tasks_of(&s.id)
                    .any(|t| t.addresses.get(&net).is_some_and(|a| moved.contains(a)))
            })
            .map(|s| s.id.clone())
            .collect();
        d.services.extend(hit);
    }

    fn accept(&mut self, kind: Kind, id: &str, d: &mut Dirty) {
        // Most puts find nothing rejected: no key is built for them.
        if !self.rejected.is_empty() && self.rejected.remove(&(kind, id.to_string())).is_some() {
            d.rejected = true;
        }
    }

    fn replace_rejections(&mut self, kind: Kind, list: Vec<Rejected>, d: &mut Dirty) {
        let before: Vec<Rejected> = self
            .rejected
            .values()
            .filter(|r| r.kind == kind)
            .cloned()
            .collect();
        let mut after = list;
        after.sort_by(|a, b| a.id.cmp(&b.id));
        after.dedup_by(|a, b| a.id == b.id);
        if before != after {
            self.rejected.retain(|(k, _), _| *k != kind);
            for r in after {
                self.rejected.insert((r.kind, r.id.clone()), r);
            }
            d.rejected = true;
        }
    }

    /// Marks a service and the networks it is on (its VIPs' and its tasks').
    fn touch_service(&self, id: &str, d: &mut Dirty) {
        d.services.insert(
            self.services
                .get_key_value(id)
                .map_or_else(|| Id::from(id), |(k, _)| k.clone()),
        );
        d.networks.extend(self.networks_of_service(id));
    }

    fn put_service(&mut self, mut s: Service, d: &mut Dirty) {
        self.accept(Kind::Service, &s.id, d);
        if self.services.get(&*s.id) == Some(&s) {
            return;
        }
        s.id = self.intern(&s.id);
        let mut vips = std::mem::take(&mut s.vips);
        vips.intern_keys(|k| self.intern(k));
        s.vips = vips;
        if let Some(old) = self.services.get(&*s.id) {
            for net in old.vips.keys().cloned().collect::<Vec<_>>() {
                drop_ref(&mut self.index.services_by_network, &net, &s.id);
            }
            self.touch_service(&s.id, d);
        }
        for net in service_refs(&s) {
            add_ref(&mut self.index.services_by_network, net, &s.id);
        }
        // Aliases may name a network by name: its names change too.
        for target in s.aliases.keys() {
            if let Some(n) = self.network_by_id_or_name(target) {
                d.networks.insert(n);
            }
        }
        let sid = s.id.clone();
        self.services.insert(sid.clone(), s);
        self.touch_service(&sid, d);
    }

    fn network_by_id_or_name(&self, target: &str) -> Option<Id> {
        if let Some((k, _)) = self.networks.get_key_value(target) {
            return Some(k.clone());
        }
        self.networks
            .values()
            .find(|n| n.name == target)
            .map(|n| n.id.clone())
    }

    fn drop_service(&mut self, id: &str, d: &mut Dirty) {
        self.accept(Kind::Service, id, d);
        let Some(old) = self.services.get(id) else {
            return;
        };
        for target in old.aliases.keys() {
            if let Some(n) = self.network_by_id_or_name(target) {
                d.networks.insert(n);
            }
        }
        self.touch_service(id, d);
        let old = self.services.remove(id).expect("just looked up");
        for net in old.vips.keys() {
            drop_ref(&mut self.index.services_by_network, net, id);
        }
        // Its tasks go with it.
        let tasks: Vec<TaskId> = self.tasks_of(id).map(|t| t.id.clone()).collect();
        for t in tasks {
            self.drop_task(&t, d);
        }
    }

    fn index_task(&mut self, t: &Task, add: bool) {
        for net in t.addresses.keys() {
            if add {
                add_ref(&mut self.index.services_by_network, net, &t.service_id);
            } else {
                drop_ref(&mut self.index.services_by_network, net, &t.service_id);
            }
        }
    }

    fn touch_task(t: &Task, d: &mut Dirty) {
        d.services.insert(t.service_id.clone());
        d.networks.extend(t.addresses.keys().cloned());
    }

    fn put_task(&mut self, mut t: Task, d: &mut Dirty) {
        self.accept(Kind::Task, &t.id, d);
        if let Some(old) = self.tasks.get(&t.id) {
            if *old == t {
                return;
            }
            let old = old.clone();
            Self::touch_task(&old, d);
            self.index_task(&old, false);
        }
        self.intern_task(&mut t);
        Self::touch_task(&t, d);
        // A service's name entries live on every network it is on: a task on a new network
        // changes them there.
        d.networks.extend(
            self.services
                .get(&*t.service_id)
                .into_iter()
                .flat_map(|s| s.vips.keys().cloned()),
        );
        self.index_task(&t, true);
        self.tasks.insert(t);
    }

    fn drop_task(&mut self, id: &str, d: &mut Dirty) {
        self.accept(Kind::Task, id, d);
        if let Some(old) = self.tasks.remove(id) {
            Self::touch_task(&old, d);
            self.index_task(&old, false);
        }
    }

    fn put_network(&mut self, mut n: Network, d: &mut Dirty) {
        self.accept(Kind::Network, &n.id, d);
        if self.networks.get(&*n.id) == Some(&n) {
            return;
        }
        n.id = self.intern(&n.id);
        // Before and after: the ingress flag may be what changed.
        self.touch_network(&n.id, d);
        let nid = n.id.clone();
        self.networks.insert(nid.clone(), n);
        self.touch_network(&nid, d);
    }

    /// A network's names, the services on it (their load balancers need it known) and the
    /// sandboxes scoped to it.
    fn touch_network(&self, id: &str, d: &mut Dirty) {
        d.networks.insert(Id::from(id));
        d.services
            .extend(self.services_on(id).map(|s| s.id.clone()));
        if self.networks.get(id).is_some_and(|n| n.ingress) {
            // Every ingress-published port goes through it (rare: swarm makes it once).
            d.services.extend(
                self.services
                    .values()
                    .filter(|s| s.ports.iter().any(|p| p.mode == PublishMode::Ingress))
                    .map(|s| s.id.clone()),
            );
        }
        d.sandboxes
            .extend(self.sandboxes_on(id).map(|s| s.container_id.clone()));
    }

    fn drop_network(&mut self, id: &str, d: &mut Dirty) {
        self.accept(Kind::Network, id, d);
        if self.networks.contains_key(id) {
            self.touch_network(id, d);
            self.networks.remove(id);
        }
    }

    fn put_node(&mut self, mut n: Node, d: &mut Dirty) {
        self.accept(Kind::Node, &n.id, d);
        let old = self.nodes.get(&*n.id);
        if old == Some(&n) {
            return;
        }
        // Only what compile reads: liveness, the hostname (for --hostname templates) and
        // the address (where the ingress mesh tunnels to its tasks).
        let matters = old.is_none_or(|o| {
            o.is_down() != n.is_down() || o.hostname != n.hostname || o.addr != n.addr
        });
        if old.is_none_or(|o| o.addr != n.addr) {
            d.nodes = true;
        }
        n.id = self.intern(&n.id);
        let nid = n.id.clone();
        self.nodes.insert(nid.clone(), n);
        if matters {
            self.touch_node(&nid, d);
        }
    }

    fn touch_node(&self, id: &str, d: &mut Dirty) {
        for t in self.tasks_on_node(id) {
            Self::touch_task(t, d);
        }
        if let Some(r) = self.reports.get(id) {
            self.touch_report(r, d);
        }
    }

    fn drop_node(&mut self, id: &str, d: &mut Dirty) {
        self.accept(Kind::Node, id, d);
        if self.nodes.remove(id).is_some() {
            d.nodes = true;
            self.touch_node(id, d);
            // A node that left the swarm reports nothing any more.
            self.drop_report(id, d);
        }
    }

    fn index_sandbox(&mut self, s: &Sandbox, add: bool) {
        let cid = id(&s.container_id);
        for net in &s.networks {
            set(&mut self.index.sandboxes_by_network, &id(net), &cid, add);
        }
        if let (Some(task), true) = (&s.task_id, s.holds_task()) {
            let reporter = id(&format!("container {}", s.container_id));
            set(&mut self.index.held, &id(task), &reporter, add);
        }
    }

    fn touch_sandbox(&self, s: &Sandbox, d: &mut Dirty) {
        d.sandboxes.insert(s.container_id.clone());
        d.networks.extend(s.networks.iter().map(|n| id(n)));
        // A task's own container makes it reachable here, whatever the overlay says, and
        // its gateway address is where the ingress mesh delivers to it.
        let gated = s
            .networks
            .iter()
            .any(|n| self.overlay_peers.contains_key(n.as_str()));
        if s.holds_task() || gated || s.gateway.is_some() {
            if let Some(t) = s.task_id.as_ref().and_then(|t| self.tasks.get(t.as_str())) {
                Self::touch_task(t, d);
            }
        }
    }

    fn put_sandbox(&mut self, s: Sandbox, d: &mut Dirty) {
        self.accept(Kind::Container, &s.container_id, d);
        let mut nets: BTreeSet<String> = s.networks.iter().cloned().collect();
        if let Some(old) = self.sandboxes.get(&s.container_id) {
            if *old == s {
                return;
            }
            nets.extend(old.networks.iter().cloned());
        }
        let before = self.local_now(&nets);
        if let Some(old) = self.sandboxes.get(&s.container_id).cloned() {
            self.touch_sandbox(&old, d);
            self.index_sandbox(&old, false);
        }
        self.index_sandbox(&s, true);
        self.touch_sandbox(&s, d);
        self.sandboxes.insert(s.container_id.clone(), s);
        self.touch_locality(&nets, before, d);
    }

    fn drop_sandbox(&mut self, id: &str, d: &mut Dirty) {
        self.accept(Kind::Container, id, d);
        if let Some(old) = self.sandboxes.get(id).cloned() {
            let nets: BTreeSet<String> = old.networks.iter().cloned().collect();
            let before = self.local_now(&nets);
            self.touch_sandbox(&old, d);
            self.index_sandbox(&old, false);
            self.sandboxes.remove(id);
            self.touch_locality(&nets, before, d);
        }
    }

    /// Which of `nets` have a local sandbox now.
    fn local_now(&self, nets: &BTreeSet<String>) -> BTreeSet<String> {
        nets.iter().filter(|n| self.is_local(n)).cloned().collect()
    }

    /// A network that gained its first local sandbox or lost its last one: its services'
    /// load balancers appear or go (compile serves only networks this node has a container
    /// on).
    fn touch_locality(&self, nets: &BTreeSet<String>, before: BTreeSet<String>, d: &mut Dirty) {
        for n in nets {
            if self.is_local(n) != before.contains(n) {
                d.networks.insert(id(n));
                d.services.extend(self.services_on(n).map(|s| s.id.clone()));
            }
        }
    }

    /// Whether a local container is on this network: only then do its VIPs and names
    /// matter here (nothing on this node can ask for them otherwise).
    pub fn is_local(&self, network_id: &str) -> bool {
        self.index.sandboxes_by_network.contains_key(network_id)
    }

    fn index_report(&mut self, r: &NodeReport, add: bool) {
        // A report comes and goes whole, so a node is on a network while any of its
        // reported containers is.
        let node = id(&r.node_id);
        for c in &r.containers {
            for net in c.endpoints.keys() {
                set(&mut self.index.reports_by_network, net, &node, add);
            }
        }
        for t in &r.held_tasks {
            set(&mut self.index.held, &id(t), &node, add);
        }
    }

    fn touch_report(&self, r: &NodeReport, d: &mut Dirty) {
        for c in &r.containers {
            d.networks.extend(c.endpoints.keys().cloned());
        }
        for t in r
            .held_tasks
            .iter()
            .filter_map(|t| self.tasks.get(t.as_str()))
        {
            Self::touch_task(t, d);
        }
    }

    fn put_report(&mut self, mut r: NodeReport, d: &mut Dirty) {
        r.containers
            .sort_by(|a, b| a.container_id.cmp(&b.container_id));
        r.held_tasks.sort();
        r.held_tasks.dedup();
        self.accept(Kind::Report, &r.node_id, d);
        if let Some(old) = self.reports.get(&r.node_id) {
            if *old == r {
                return;
            }
            let old = old.clone();
            self.touch_report(&old, d);
            self.index_report(&old, false);
        }
        self.index_report(&r, true);
        self.touch_report(&r, d);
        self.reports.insert(r.node_id.clone(), r);
    }

    fn drop_report(&mut self, node: &str, d: &mut Dirty) {
        if let Some(old) = self.reports.get(node).cloned() {
            self.touch_report(&old, d);
            self.index_report(&old, false);
            self.reports.remove(node);
        }
    }

    fn resync(&mut self, r: Resync, d: &mut Dirty) {
        // Apply what is new or changed, drop what is gone; the kind's rejections are
        // replaced after, since a put clears its own.
        macro_rules! replace {
            ($list:expr, $map:ident, $id:ident, $put:ident, $drop:ident) => {{
                let keep: BTreeSet<&str> = $list.iter().map(|o| &*o.$id).collect();
                let gone: Vec<String> = self
                    .$map
                    .keys()
                    .filter(|k| {
                        let k: &str = k;
                        !keep.contains(k)
                    })
                    .map(|k| k.to_string())
                    .collect();
                for id in gone {
                    self.$drop(&id, d);
                }
                for o in $list {
                    self.$put(o, d);
                }
            }};
        }
        match r {
            Resync::Services(list, rej) => {
                replace!(list, services, id, put_service, drop_service);
                // Every service was just put in id order: about 1 MB of node slack at 10k services.
                super::repack(&mut self.services);
                self.replace_rejections(Kind::Service, rej, d);
            }
            Resync::Tasks(list, rej) => {
                replace!(list, tasks, id, put_task, drop_task);
                self.replace_rejections(Kind::Task, rej, d);
            }
            Resync::Networks(list, rej) => {
                replace!(list, networks, id, put_network, drop_network);
                self.replace_rejections(Kind::Network, rej, d);
            }
            Resync::Nodes(list, rej) => {
                replace!(list, nodes, id, put_node, drop_node);
                self.replace_rejections(Kind::Node, rej, d);
            }
            Resync::Sandboxes(list, rej) => {
                replace!(list, sandboxes, container_id, put_sandbox, drop_sandbox);
                self.replace_rejections(Kind::Container, rej, d);
            }
            Resync::Reports(list) => {
                replace!(list, reports, node_id, put_report, drop_report);
            }
        }
    }

    /// Every object as a list of changes that rebuilds this state (the feed's snapshot).
    pub fn snapshot(&self) -> Vec<Change> {
        let mut out = vec![
            Change::Resync(Resync::Networks(
                self.networks.values().cloned().collect(),
                self.rejected_of(Kind::Network),
            )),
            Change::Resync(Resync::Nodes(
                self.nodes.values().cloned().collect(),
                self.rejected_of(Kind::Node),
            )),
            Change::Resync(Resync::Services(
                self.services.values().cloned().collect(),
                self.rejected_of(Kind::Service),
            )),
            Change::Resync(Resync::Tasks(
                self.tasks.values().cloned().collect(),
                self.rejected_of(Kind::Task),
            )),
        ];
        out.push(Change::Resync(Resync::Reports(
            self.reports.values().cloned().collect(),
        )));
        out
    }

    fn rejected_of(&self, kind: Kind) -> Vec<Rejected> {
        self.rejected
            .values()
            .filter(|r| r.kind == kind)
            .cloned()
            .collect()
    }

    /// The indexes rebuilt from the objects alone: equal to the maintained ones whenever
    /// `apply` is right (checked by the property tests).
    #[cfg(test)]
    fn reindexed(&self) -> Index {
        let mut s = ClusterState {
            networks: self.networks.clone(),
            ..Default::default()
        };
        for svc in self.services.values() {
            for net in service_refs(svc) {
                add_ref(&mut s.index.services_by_network, net, &svc.id);
            }
        }
        for t in self.tasks.values() {
            s.index_task(t, true);
        }
        for sb in self.sandboxes.values() {
            s.index_sandbox(sb, true);
        }
        for r in self.reports.values() {
            s.index_report(r, true);
        }
        s.index
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    pub fn svc(id: &str, nets: &[(&str, [u8; 4])]) -> Service {
        Service {
            id: id.into(),
            name: format!("svc-{id}").into(),
            mode: EndpointMode::Vip,
            vips: nets
                .iter()
                .map(|(n, ip)| (Id::from(*n), Ipv4Addr::from(*ip)))
                .collect(),
            aliases: BTreeMap::new(),
            ports: Vec::new(),
            labels: BTreeMap::new(),
            updating: false,
            version: 1,
            created: format!("2026-01-01T00:00:00.{:0>9}Z", id.len()),
        }
    }

    pub fn task(id: &str, service: &str, node: &str, net: &str, ip: [u8; 4]) -> Task {
        Task {
            id: id.into(),
            service_id: service.into(),
            node_id: node.into(),
            slot: Some(1),
            state: TaskState::Running,
            desired: TaskState::Running,
            addresses: [(net.to_string(), Ipv4Addr::from(ip))].into(),
            container_id: ShortId::new(&format!("{id}-container-0000")),
            hostname: None,
        }
    }

    pub fn net(id: &str) -> Network {
        Network {
            id: id.into(),
            name: format!("net-{id}"),
            internal: false,
            ingress: false,
            scope: "swarm".into(),
            attachable: true,
        }
    }

    pub fn node(id: &str, state: NodeState) -> Node {
        Node {
            id: id.into(),
            hostname: format!("host-{id}"),
            state,
            role: Role::Worker,
            addr: None,
            manager_addr: None,
            version: 1,
        }
    }

    pub fn sandbox(id: &str, cookie: u64, nets: &[&str]) -> Sandbox {
        Sandbox {
            container_id: id.into(),
            name: format!("c-{id}"),
            netns_cookie: cookie,
            netns_path: format!("/run/netns/{id}"),
            networks: nets.iter().map(|n| n.to_string()).collect(),
            endpoints: crate::model::NetMap::new(),
            hostname: String::new(),
            task_id: None,
            health: Health::None,
            stopping: false,
            gateway: None,
        }
    }

    #[test]
    fn the_same_object_read_again_touches_nothing() {
        let mut s = ClusterState::default();
        s.apply(Change::PutNetwork(net("n1")));
        s.apply(Change::PutService(svc("s1", &[("n1", [10, 0, 0, 2])])));
        let d = s.apply(Change::PutTask(task("t1", "s1", "a", "n1", [10, 0, 0, 5])));
        assert!(d.services.contains("s1") && d.networks.contains("n1"));
        let again = s.apply(Change::PutTask(task("t1", "s1", "a", "n1", [10, 0, 0, 5])));
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn a_node_going_down_touches_the_services_of_its_tasks_only() {
        let mut s = ClusterState::default();
        for n in ["n1", "n2"] {
            s.apply(Change::PutNetwork(net(n)));
        }
        s.apply(Change::PutNode(node("a", NodeState::Ready)));
        s.apply(Change::PutNode(node("b", NodeState::Ready)));
        s.apply(Change::PutService(svc("s1", &[("n1", [10, 0, 0, 2])])));
        s.apply(Change::PutService(svc("s2", &[("n2", [10, 0, 1, 2])])));
        s.apply(Change::PutTask(task("t1", "s1", "a", "n1", [10, 0, 0, 5])));
        s.apply(Change::PutTask(task("t2", "s2", "b", "n2", [10, 0, 1, 5])));
        let d = s.apply(Change::PutNode(node("a", NodeState::Down)));
        assert_eq!(d.services, [Id::from("s1")].into());
        assert_eq!(d.networks, [Id::from("n1")].into());
        assert!(!s.serves(&s.tasks["t1"]));
        assert!(s.serves(&s.tasks["t2"]));
        // A heartbeat that changes nothing compile reads touches nothing.
        let mut n = node("b", NodeState::Ready);
        n.version = 9;
        assert!(s.apply(Change::PutNode(n)).is_empty());
    }

    #[test]
    fn service_tasks_replaces_that_services_tasks_only() {
        let mut s = ClusterState::default();
        s.apply(Change::PutTask(task("t1", "s1", "a", "n1", [10, 0, 0, 5])));
        s.apply(Change::PutTask(task("t2", "s1", "a", "n1", [10, 0, 0, 6])));
        s.apply(Change::PutTask(task("t3", "s2", "a", "n1", [10, 0, 0, 7])));
        s.apply(Change::ServiceTasks {
            service_id: "s1".into(),
            tasks: vec![task("t2", "s1", "a", "n1", [10, 0, 0, 6])],
        });
        let ids: Vec<&str> = s.tasks.keys().map(|k| &**k).collect();
        assert_eq!(ids, ["t2", "t3"]);
    }

    #[test]
    fn an_unhealthy_report_takes_a_task_out_and_a_healthy_one_puts_it_back() {
        let mut s = ClusterState::default();
        s.apply(Change::PutService(svc("s1", &[("n1", [10, 0, 0, 2])])));
        s.apply(Change::PutTask(task("t1", "s1", "b", "n1", [10, 0, 0, 5])));
        let d = s.apply(Change::PutReport(NodeReport {
            node_id: "b".into(),
            containers: vec![],
            held_tasks: vec!["t1".into()],
        }));
        assert!(d.services.contains("s1"));
        assert!(!s.serves(&s.tasks["t1"]));
        s.apply(Change::PutReport(NodeReport {
            node_id: "b".into(),
            ..Default::default()
        }));
        assert!(s.serves(&s.tasks["t1"]));
        // This node's own engine says the same through the sandbox's health.
        let mut sb = sandbox("c1", 7, &["n1"]);
        sb.task_id = Some("t1".into());
        sb.health = Health::Unhealthy;
        s.apply(Change::PutSandbox(sb.clone()));
        assert!(!s.serves(&s.tasks["t1"]));
        sb.health = Health::Healthy;
        s.apply(Change::PutSandbox(sb));
        assert!(s.serves(&s.tasks["t1"]));
    }

    #[test]
    fn rejections_clear_when_the_object_reads_well_and_resync_replaces_them() {
        let mut s = ClusterState::default();
        let bad = Rejected {
            kind: Kind::Service,
            id: "s1".into(),
            reason: "bad".into(),
        };
        assert!(s.apply(Change::Reject(bad.clone())).rejected);
        assert!(!s.apply(Change::Reject(bad.clone())).rejected, "same again");
        assert!(s.apply(Change::PutService(svc("s1", &[]))).rejected);
        assert!(s.rejected.is_empty());
        s.apply(Change::Resync(Resync::Services(vec![], vec![bad])));
        assert_eq!(s.rejected.len(), 1);
        s.apply(Change::Resync(Resync::Services(vec![], vec![])));
        assert!(s.rejected.is_empty());
    }

    // A random sequence of changes over a small universe of ids: the maintained indexes
    // always equal indexes rebuilt from scratch, and a resync to the final objects from any
    // other state reaches the same state.
    pub fn arb_change() -> impl Strategy<Value = Change> {
        let id = |p: &'static str| (0..4u8).prop_map(move |i| format!("{p}{i}"));
        let ip = (1..6u8).prop_map(|i| [10, 0, 0, i]);
        let state = prop_oneof![
            Just(TaskState::Running),
            Just(TaskState::Starting),
            Just(TaskState::Shutdown)
        ];
        let task = (
            id("t"),
            id("s"),
            id("node"),
            id("n"),
            ip.clone(),
            state.clone(),
            state,
        )
            .prop_map(|(t, s, node, n, ip, st, de)| {
                let mut t = task(&t, &s, &node, &n, ip);
                t.state = st;
                t.desired = de;
                t
            });
        // n0 is the ingress network; services publish one of two ports, or none.
        // Some services ask for L7 routes (hosts that overlap, another path, a typo), and
        // were created at one of three moments.
        let l7 = (0..6u8, 0..3u8);
        let service = (id("s"), id("n"), ip.clone(), any::<bool>(), 0..3u16, l7).prop_map(
            |(s, n, ip, dnsrr, port, (l7, created))| {
                let mut s = svc(&s, &[(&n, ip)]);
                s.created = format!("2026-01-01T00:00:0{created}.000000000Z");
                let lb: &[(&str, &str)] = match l7 {
                    1 => &[("hosts", "a.example.com"), ("port", "80")],
                    2 => &[("hosts", "a.example.com,b.example.com"), ("port", "80")],
                    3 => &[
                        ("hosts", "b.example.com"),
                        ("port", "80"),
                        ("context_root", "/x"),
                    ],
                    4 => &[("hosts", "b.example.com"), ("ports", "80")],
                    5 => &[
                        ("default_backend", "true"),
                        ("port", "80"),
                        ("backend_mode", "vip"),
                    ],
                    _ => &[],
                };
                for (k, v) in lb {
                    s.labels.insert(format!("com.docker.lb.{k}"), v.to_string());
                }
                if dnsrr {
                    s.mode = EndpointMode::Dnsrr;
                    s.vips.clear();
                }
                if port > 0 {
                    s.ports.push(PublishedPort {
                        protocol: Protocol::Tcp,
                        target: 80,
                        published: Some(8079 + port),
                        mode: PublishMode::Ingress,
                    });
                }
                s
            },
        );
        let node_state = prop_oneof![Just(NodeState::Ready), Just(NodeState::Down)];
        let sandbox = (
            id("c"),
            1..4u64,
            proptest::collection::vec(id("n"), 0..3),
            any::<bool>(),
        )
            .prop_map(|(c, cookie, nets, sick)| {
                let mut nets = nets;
                nets.sort();
                nets.dedup();
                let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
                let mut sb = sandbox(&c, cookie, &refs);
                sb.task_id = Some("t1".into());
                sb.health = if sick {
                    Health::Unhealthy
                } else {
                    Health::Healthy
                };
                sb.gateway = (cookie > 1).then(|| BridgeLeg {
                    addr: Ipv4Addr::new(172, 18, 0, cookie as u8),
                    veth: (cookie % 2 == 0).then_some(VethEnds {
                        host_ifindex: cookie as u32,
                        mac: [2, 0, 0, 0, 0, cookie as u8],
                    }),
                });
                for n in &nets {
                    sb.endpoints.insert(
                        Id::from(n.as_str()),
                        SandboxEndpoint {
                            // Task addresses too: a local task is reachable whatever
                            // the overlay's view.
                            addr: Some(Ipv4Addr::new(10, 0, 0, cookie as u8)),
                            aliases: vec![],
                        },
                    );
                }
                sb
            });
        let report = (
            id("node"),
            proptest::collection::vec((id("r"), id("n")), 0..3),
            proptest::collection::vec(id("t"), 0..2),
        )
            .prop_map(|(node, cs, sick)| NodeReport {
                node_id: node,
                containers: cs
                    .into_iter()
                    .map(|(c, n)| RemoteContainer {
                        container_id: c.clone(),
                        name: c,
                        hostname: String::new(),
                        endpoints: [(n, SandboxEndpoint::default())].into(),
                    })
                    .collect(),
                held_tasks: sick,
            });
        prop_oneof![
            task.clone().prop_map(Change::PutTask),
            id("t").prop_map(Change::DropTask),
            service.clone().prop_map(Change::PutService),
            id("s").prop_map(Change::DropService),
            id("n").prop_map(|n| {
                let mut net = net(&n);
                net.ingress = n == "n0";
                Change::PutNetwork(net)
            }),
            id("n").prop_map(Change::DropNetwork),
            (id("node"), node_state, 0..3u8).prop_map(|(n, st, a)| {
                let mut node = node(&n, st);
                node.addr = (a > 0).then(|| Ipv4Addr::new(192, 168, 0, a));
                Change::PutNode(node)
            }),
            id("node").prop_map(Change::DropNode),
            sandbox.prop_map(Change::PutSandbox),
            id("c").prop_map(Change::DropSandbox),
            report.prop_map(Change::PutReport),
            id("node").prop_map(Change::DropReport),
            (
                id("n"),
                any::<bool>(),
                proptest::collection::vec(ip.clone(), 0..3),
                proptest::collection::vec(ip.clone(), 0..2),
            )
                .prop_map(|(n, whole, added, removed)| Change::OverlayPeers {
                    network_id: n,
                    whole,
                    added: added.into_iter().map(Ipv4Addr::from).collect(),
                    removed: removed.into_iter().map(Ipv4Addr::from).collect(),
                }),
            id("n").prop_map(Change::DropOverlayPeers),
            (id("s"), proptest::collection::vec(task, 0..3)).prop_map(|(s, ts)| {
                Change::ServiceTasks {
                    tasks: ts
                        .into_iter()
                        .map(|mut t| {
                            t.service_id = Id::from(s.as_str());
                            t
                        })
                        .collect(),
                    service_id: s,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn indexes_stay_equal_to_a_rebuild(changes in proptest::collection::vec(arb_change(), 0..60)) {
            let mut s = ClusterState::default();
            for c in changes {
                s.apply(c);
                prop_assert_eq!(&s.index, &s.reindexed());
            }
        }

        #[test]
        fn a_snapshot_rebuilds_the_state_from_any_other(
            a in proptest::collection::vec(arb_change(), 0..40),
            b in proptest::collection::vec(arb_change(), 0..40),
        ) {
            let target = ClusterState::from_changes(a);
            let mut other = ClusterState::from_changes(b);
            // Sandboxes are local truth and never travel in a snapshot.
            other.sandboxes = target.sandboxes.clone();
            other.index = other.reindexed();
            for c in target.snapshot() {
                other.apply(c);
            }
            prop_assert_eq!(&other.services, &target.services);
            prop_assert_eq!(&other.tasks, &target.tasks);
            prop_assert_eq!(&other.nodes, &target.nodes);
            prop_assert_eq!(&other.networks, &target.networks);
            prop_assert_eq!(&other.reports, &target.reports);
            prop_assert_eq!(&other.index, &target.index);
        }
    }
}
