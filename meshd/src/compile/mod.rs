//! `compile`: ClusterState → Desired, the one pure product everything downstream applies:
//! load balancers (a service's VIP on one network, with its live backends), the ingress
//! mesh's published ports (`ingress`), the scope of each local sandbox (its networks), the
//! DNS names per network, and the rejected objects.
//!
//! `Compiler` keeps a `Desired` and recompiles only what a change touched (`Dirty`), so one
//! task change costs the same with 10 services or 10 000; `compile` is the same work done
//! for everything, and the two always agree (property test). Deterministic: the same state
//! gives the same Desired byte for byte, so a restarted meshd recomputes exactly the tables
//! it left pinned.
use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use meshd_common::MAX_SANDBOX_NETS;
use meshd_dns::{NetworkRecords, Zones};
use serde::{Deserialize, Serialize};

pub mod ingress;
pub mod l7;

use ingress::{IngressLb, IngressPort};
use l7::L7Route;

use crate::{
    dns::zones::network_records,
    model::{ClusterState, Dirty, EndpointMode, Id, Kind, Rejected},
};

/// One load balancer: a service's VIP on one network.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LbRef {
    pub service_id: Id,
    pub network_id: Id,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lb {
    pub service_name: Arc<str>,
    pub vip: Ipv4Addr,
    /// Live backends' addresses, sorted, one per address (which task each is, is the
    /// state's to say: `backend_task`; 100 000 task ids here would be 2 MB).
    pub backends: Vec<Ipv4Addr>,
    /// Tasks told to stop (or failing their health check) whose containers still run,
    /// sorted: no new connection goes to them, but the IPVS datapath keeps them at weight 0
    /// until they are gone, so that their open connections are not dropped.
    #[serde(default)]
    pub draining: Vec<Ipv4Addr>,
}

/// The task behind backend `ip` of a service's load balancer on a network: the serving task
/// with that address (the lowest id, if two claim it, as compile keeps one per address).
pub fn backend_task<'a>(
    state: &'a ClusterState,
    service_id: &str,
    network_id: &str,
    ip: Ipv4Addr,
) -> Option<&'a crate::model::Task> {
    state
        .tasks_of(service_id)
        .find(|t| state.serves(t) && t.addresses.get(network_id) == Some(&ip))
}

/// What a local sandbox (network namespace) sees: the VIPs of these networks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxScope {
    pub container_id: String,
    pub name: String,
    /// Where its namespace is (Docker's `SandboxKey`): the DNS applier opens sockets there.
    pub netns_path: String,
    /// Network ids, at most `MAX_SANDBOX_NETS`.
    pub networks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Desired {
    pub lbs: BTreeMap<LbRef, Arc<Lb>>,
    /// By network-namespace cookie.
    pub sandboxes: BTreeMap<u64, Arc<SandboxScope>>,
    /// The names DNS answers, per network.
    #[serde(skip)]
    pub zones: Zones,
    /// Every port published in ingress mode, with the tasks behind it.
    pub ingress: BTreeMap<IngressPort, Arc<IngressLb>>,
    /// The swarm's node addresses: the ingress mesh takes tunnelled packets from these.
    pub ingress_nodes: BTreeSet<Ipv4Addr>,
    /// This node's task containers on the ingress network: ingress address → bridge leg.
    pub ingress_local: BTreeMap<Ipv4Addr, crate::model::BridgeLeg>,
    /// The L7 front end's routes, by service id: only services that hold every host and
    /// path they claim.
    pub l7: BTreeMap<Id, Arc<L7Route>>,
    /// Network → the namespace upstream connections to its tasks are opened from.
    pub l7_netns: BTreeMap<Id, String>,
    /// What the source could not read, and what compile could not use.
    pub rejected: Vec<Rejected>,
}

impl Desired {
    /// The load balancers of one service.
    pub fn lbs_of<'a>(
        &'a self,
        service_id: &str,
    ) -> impl Iterator<Item = (&'a LbRef, &'a Arc<Lb>)> + 'a {
        let from = LbRef {
            service_id: service_id.into(),
            network_id: "".into(),
        };
        let sid = service_id.to_string();
        self.lbs
            .range(from..)
            .take_while(move |(r, _)| *r.service_id == *sid)
    }
}

/// What changed in `Desired` since the last update: what appliers must look at again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changed {
    pub lbs: BTreeSet<LbRef>,
    pub sandboxes: BTreeSet<u64>,
    pub networks: BTreeSet<String>,
    pub rejected: bool,
    pub ingress: BTreeSet<IngressPort>,
    pub ingress_nodes: bool,
    pub ingress_local: bool,
    /// Services whose L7 route came, went or changed.
    pub l7: BTreeSet<Id>,
    pub l7_netns: bool,
}

impl Changed {
    pub fn is_empty(&self) -> bool {
        self.lbs.is_empty()
            && self.sandboxes.is_empty()
            && self.networks.is_empty()
            && !self.rejected
            && self.ingress.is_empty()
            && !self.ingress_nodes
            && !self.ingress_local
            && self.l7.is_empty()
            && !self.l7_netns
    }

    pub fn merge(&mut self, other: &Changed) {
        self.lbs.extend(other.lbs.iter().cloned());
        self.sandboxes.extend(other.sandboxes.iter().copied());
        self.networks.extend(other.networks.iter().cloned());
        self.rejected |= other.rejected;
        self.ingress.extend(other.ingress.iter().copied());
        self.ingress_nodes |= other.ingress_nodes;
        self.ingress_local |= other.ingress_local;
        self.l7.extend(other.l7.iter().cloned());
        self.l7_netns |= other.l7_netns;
    }

    /// Everything in `desired`, as if it were all new (an applier starting afresh).
    pub fn everything(desired: &Desired) -> Changed {
        Changed {
            lbs: desired.lbs.keys().cloned().collect(),
            sandboxes: desired.sandboxes.keys().copied().collect(),
            networks: desired.zones.networks.keys().cloned().collect(),
            rejected: true,
            ingress: desired.ingress.keys().copied().collect(),
            ingress_nodes: true,
            ingress_local: true,
            l7: desired.l7.keys().cloned().collect(),
            l7_netns: true,
        }
    }
}

/// The load balancers of one service (none for dnsrr, or when it is gone).
pub fn service_lbs(state: &ClusterState, service_id: &str) -> Vec<(LbRef, Lb)> {
    all_service_lbs(state, service_id)
        .into_iter()
        // Only where a local container can ask: a VIP entry is looked up from a sandbox's
        // networks, so one no local sandbox is on would never be read.
        .filter(|(r, _)| state.is_local(&r.network_id))
        .collect()
}

/// The load balancers a service has on every network, programmed here or not (meshctl shows
/// them all).
pub fn all_service_lbs(state: &ClusterState, service_id: &str) -> Vec<(LbRef, Lb)> {
    let Some(service) = state.services.get(service_id) else {
        return Vec::new();
    };
    if service.mode != EndpointMode::Vip {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (network_id, &vip) in &service.vips {
        if !state.networks.contains_key(network_id) {
            continue;
        }
        let mut backends: Vec<Ipv4Addr> = state
            .tasks_of(service_id)
            .filter(|t| state.serves(t))
            .filter_map(|t| t.addresses.get(network_id).copied())
            .collect();
        state.reachable_of(network_id, &mut backends);
        backends.sort_unstable();
        backends.dedup();
        // Kept for as long as the service does not change: no growth slack.
        backends.shrink_to_fit();
        let mut draining: Vec<Ipv4Addr> = state
            .tasks_of(service_id)
            .filter(|t| t.state == crate::model::TaskState::Running && !state.serves(t))
            .filter_map(|t| t.addresses.get(network_id).copied())
            .filter(|a| backends.binary_search(a).is_err())
            .collect();
        state.reachable_of(network_id, &mut draining);
        draining.sort_unstable();
        draining.dedup();
        draining.shrink_to_fit();
        out.push((
            LbRef {
                service_id: service.id.clone(),
                network_id: network_id.clone(),
            },
            Lb {
                service_name: service.name.clone(),
                vip,
                backends,
                draining,
            },
        ));
    }
    out
}

/// The scope of one local container, and why part of it is left out (if it is).
fn sandbox_scope(
    state: &ClusterState,
    container_id: &str,
) -> Option<(u64, SandboxScope, Option<Rejected>)> {
    let sb = state.sandboxes.get(container_id)?;
    let mut networks = sb.networks.clone();
    let mut note = None;
    if networks.len() > MAX_SANDBOX_NETS {
        note = Some(Rejected {
            kind: Kind::Container,
            id: container_id.to_string(),
            reason: format!(
                "attached to {} networks: VIPs answer on the first {MAX_SANDBOX_NETS} only ({} left out)",
                networks.len(),
                networks[MAX_SANDBOX_NETS..].join(", ")
            ),
        });
        networks.truncate(MAX_SANDBOX_NETS);
    }
    Some((
        sb.netns_cookie,
        SandboxScope {
            container_id: container_id.to_string(),
            name: sb.name.clone(),
            netns_path: sb.netns_path.clone(),
            networks,
        },
        note,
    ))
}

/// Keeps `Desired` in step with a `ClusterState` as it changes.
#[derive(Debug, Default)]
pub struct Compiler {
    desired: Desired,
    /// Local container id → its namespace cookie, to find the scope to drop when it goes.
    cookie_of: BTreeMap<String, u64>,
    /// Namespace cookie → the containers that claim it.
    claims: BTreeMap<u64, BTreeSet<String>>,
    /// Compile's own rejections (a container on too many networks), by container id.
    notes: BTreeMap<String, Rejected>,
    /// Each service's published ports as last compiled, whether it holds them or not.
    ingress_of: BTreeMap<Id, Vec<(IngressPort, Arc<IngressLb>)>>,
    /// Port → the services that publish it (swarm allows one; the lowest id keeps it).
    ingress_claims: BTreeMap<IngressPort, BTreeSet<Id>>,
    /// What of a service's ports cannot be used, by service id.
    ingress_notes: BTreeMap<Id, Rejected>,
    l7: l7::L7Claims,
}

impl Compiler {
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Services whose `com.docker.lb.*` labels give them no route, and why.
    pub fn l7_rejected(&self) -> Vec<Rejected> {
        self.l7.notes().cloned().collect()
    }

    /// Recompiles everything (start, or a full resync) and says what differs.
    pub fn rebuild(&mut self, state: &ClusterState) -> Changed {
        let mut dirty = Dirty {
            services: state.services.keys().cloned().collect(),
            networks: state.networks.keys().cloned().collect(),
            sandboxes: state.sandboxes.keys().cloned().collect(),
            rejected: true,
            nodes: true,
        };
        // And whatever Desired holds that the state may no longer have.
        dirty
            .services
            .extend(self.desired.lbs.keys().map(|r| r.service_id.clone()));
        dirty.services.extend(self.ingress_of.keys().cloned());
        dirty.services.extend(self.l7.services().cloned());
        dirty.networks.extend(
            self.desired
                .zones
                .networks
                .keys()
                .map(|k| Id::from(k.as_str())),
        );
        dirty.sandboxes.extend(self.cookie_of.keys().cloned());
        let changed = self.update(state, &dirty);
        // Every load balancer was just put, in service order.
        crate::model::repack(&mut self.desired.lbs);
        changed
    }

    /// Recompiles what `dirty` names and says what changed.
    pub fn update(&mut self, state: &ClusterState, dirty: &Dirty) -> Changed {
        let mut changed = Changed::default();
        for sid in &dirty.services {
            let fresh: BTreeMap<LbRef, Lb> = service_lbs(state, sid).into_iter().collect();
            let old: Vec<LbRef> = self
                .desired
                .lbs_of(sid)
                .map(|(r, _)| r.clone())
                .filter(|r| !fresh.contains_key(r))
                .collect();
            for r in old {
                self.desired.lbs.remove(&r);
                changed.lbs.insert(r);
            }
            for (r, lb) in fresh {
                if self.desired.lbs.get(&r).is_none_or(|o| **o != lb) {
                    self.desired.lbs.insert(r.clone(), Arc::new(lb));
                    changed.lbs.insert(r);
                }
            }
        }
        self.update_ingress(state, dirty, &mut changed);
        // A route names its network by name and reaches host-mode tasks by their nodes'
        // addresses: those moving recompile every labelled service (a handful, not the
        // cluster).
        let mut l7_services = dirty.services.clone();
        if dirty.nodes || !dirty.networks.is_empty() {
            l7_services.extend(self.l7.services().cloned());
        }
        if self
            .l7
            .update(state, &l7_services, &mut self.desired.l7, &mut changed.l7)
        {
            changed.rejected = true;
        }
        // Sandboxes come and go, and tasks stop serving (a task's container is then no
        // namespace to dial from): cheap, it looks at the routes' networks only.
        if !dirty.sandboxes.is_empty() || !dirty.services.is_empty() || !changed.l7.is_empty() {
            let netns = l7::dial_namespaces(state, &self.desired.l7);
            if netns != self.desired.l7_netns {
                self.desired.l7_netns = netns;
                changed.l7_netns = true;
            }
        }
        // Sandboxes are keyed by namespace. Two containers never share one in practice,
        // but if they claim the same cookie the lowest container id answers, whatever the
        // order they came in.
        let mut cookies = BTreeSet::new();
        for cid in &dirty.sandboxes {
            let fresh = sandbox_scope(state, cid);
            let new_cookie = fresh.as_ref().map(|(c, _, _)| *c);
            let old_cookie = self.cookie_of.get(cid).copied();
            if old_cookie != new_cookie {
                if let Some(c) = old_cookie {
                    if let Some(set) = self.claims.get_mut(&c) {
                        set.remove(cid);
                        if set.is_empty() {
                            self.claims.remove(&c);
                        }
                    }
                    self.cookie_of.remove(cid);
                    cookies.insert(c);
                }
                if let Some(c) = new_cookie {
                    self.claims.entry(c).or_default().insert(cid.clone());
                    self.cookie_of.insert(cid.clone(), c);
                }
            }
            cookies.extend(new_cookie);
            let note = fresh.and_then(|(_, _, n)| n);
            if self.notes.get(cid) != note.as_ref() {
                changed.rejected = true;
                match note {
                    Some(n) => self.notes.insert(cid.clone(), n),
                    None => self.notes.remove(cid),
                };
            }
        }
        for cookie in cookies {
            let winner = self.claims.get(&cookie).and_then(|s| s.first()).cloned();
            let scope = winner
                .and_then(|w| sandbox_scope(state, &w))
                .map(|(_, s, _)| s);
            match scope {
                Some(sc) => {
                    if self
                        .desired
                        .sandboxes
                        .get(&cookie)
                        .is_none_or(|o| **o != sc)
                    {
                        self.desired.sandboxes.insert(cookie, Arc::new(sc));
                        changed.sandboxes.insert(cookie);
                    }
                }
                None => {
                    if self.desired.sandboxes.remove(&cookie).is_some() {
                        changed.sandboxes.insert(cookie);
                    }
                }
            }
        }
        for (nid, fresh) in all_network_records(state, &dirty.networks) {
            let old = self.desired.zones.networks.get(&**nid);
            match (old, fresh) {
                (Some(o), Some(f)) if **o == f => {}
                (None, None) => {}
                (_, Some(f)) => {
                    self.desired
                        .zones
                        .networks
                        .insert(nid.to_string(), Arc::new(f));
                    changed.networks.insert(nid.to_string());
                }
                (Some(_), None) => {
                    self.desired.zones.networks.remove(&**nid);
                    changed.networks.insert(nid.to_string());
                }
            }
        }
        if dirty.rejected || changed.rejected {
            let mut list = state.rejected_list();
            list.extend(self.notes.values().cloned());
            list.extend(self.ingress_notes.values().cloned());
            list.extend(self.l7.notes().cloned());
            if list != self.desired.rejected {
                self.desired.rejected = list;
                changed.rejected = true;
            }
        }
        changed
    }
}

impl Compiler {
    /// The published ports of the dirty services, and the node addresses when nodes moved.
    fn update_ingress(&mut self, state: &ClusterState, dirty: &Dirty, changed: &mut Changed) {
        let mut ports = BTreeSet::new();
        let mut services: Cow<BTreeSet<Id>> = Cow::Borrowed(&dirty.services);
        if !dirty.sandboxes.is_empty() {
            let legs = ingress::local_legs(state);
            if legs != self.desired.ingress_local {
                // Backends are matched to local containers by address: a leg that came,
                // went or moved changes the services with a task there.
                let old = &self.desired.ingress_local;
                let moved: BTreeSet<Ipv4Addr> = legs
                    .iter()
                    .filter(|(a, l)| old.get(a) != Some(l))
                    .map(|(a, _)| *a)
                    .chain(old.keys().filter(|a| !legs.contains_key(a)).copied())
                    .collect();
                let at: Vec<Id> = self
                    .ingress_of
                    .keys()
                    .filter(|sid| !dirty.services.contains(*sid))
                    .filter(|sid| ingress::has_task_at(state, sid, &moved))
                    .cloned()
                    .collect();
                services.to_mut().extend(at);
                self.desired.ingress_local = legs;
                changed.ingress_local = true;
            }
        }
        for sid in services.iter() {
            let (fresh, note) = ingress::service_ingress(state, sid, &self.desired.ingress_local);
            let fresh: Vec<(IngressPort, Arc<IngressLb>)> =
                fresh.into_iter().map(|(p, lb)| (p, Arc::new(lb))).collect();
            let old = self.ingress_of.remove(sid).unwrap_or_default();
            if old != fresh {
                for (p, _) in &old {
                    if let Some(c) = self.ingress_claims.get_mut(p) {
                        c.remove(sid);
                        if c.is_empty() {
                            self.ingress_claims.remove(p);
                        }
                    }
                    ports.insert(*p);
                }
                for (p, _) in &fresh {
                    self.ingress_claims
                        .entry(*p)
                        .or_default()
                        .insert(sid.clone());
                    ports.insert(*p);
                }
            }
            if !fresh.is_empty() {
                self.ingress_of.insert(sid.clone(), fresh);
            }
            if self.ingress_notes.get(sid) != note.as_ref() {
                changed.rejected = true;
                match note {
                    Some(n) => self.ingress_notes.insert(sid.clone(), n),
                    None => self.ingress_notes.remove(sid),
                };
            }
        }
        for p in ports {
            let winner = self
                .ingress_claims
                .get(&p)
                .and_then(|c| c.first())
                .and_then(|sid| self.ingress_of.get(sid))
                .and_then(|list| list.iter().find(|(q, _)| *q == p))
                .map(|(_, lb)| lb.clone());
            let old = self.desired.ingress.get(&p);
            if old.map(|o| &**o) == winner.as_deref() {
                continue;
            }
            match winner {
                Some(lb) => self.desired.ingress.insert(p, lb),
                None => self.desired.ingress.remove(&p),
            };
            changed.ingress.insert(p);
        }
        if dirty.nodes {
            let nodes = ingress::node_addrs(state);
            if nodes != self.desired.ingress_nodes {
                self.desired.ingress_nodes = nodes;
                changed.ingress_nodes = true;
            }
        }
    }
}

/// Below this many networks one thread compiles them: starting threads costs more.
const PARALLEL_NETWORKS: usize = 16;

/// The records of each of these networks. Many at once (a cold start, a full re-read) are
/// split across the CPUs: each network's records depend on the state alone.
fn all_network_records<'a>(
    state: &ClusterState,
    networks: &'a BTreeSet<Id>,
) -> Vec<(&'a Id, Option<NetworkRecords>)> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if networks.len() < PARALLEL_NETWORKS || threads < 2 {
        return networks
            .iter()
            .map(|n| (n, network_records(state, n)))
            .collect();
    }
    let ids: Vec<&Id> = networks.iter().collect();
    let per = ids.len().div_ceil(threads);
    std::thread::scope(|s| {
        let parts: Vec<_> = ids
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|&n| (n, network_records(state, n)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().expect("compiling a network's records panicked"))
            .collect()
    })
}

/// Everything, from scratch.
pub fn compile(state: &ClusterState) -> Desired {
    let mut c = Compiler::default();
    c.rebuild(state);
    c.desired
}

/// The records of one network as `compile` would make them (for tests elsewhere).
pub fn zone(state: &ClusterState, network_id: &str) -> Option<Arc<NetworkRecords>> {
    network_records(state, network_id).map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{state_tests::*, Change, NodeState, TaskState};
    use proptest::prelude::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for c in [
            Change::PutNetwork(net("net1")),
            Change::PutNetwork(net("net2")),
            Change::PutService(svc("svc1", &[("net1", [10, 0, 1, 2])])),
            Change::PutNode(node("n1", NodeState::Ready)),
            Change::PutNode(node("n2", NodeState::Ready)),
            Change::PutTask(task("t1", "svc1", "n1", "net1", [10, 0, 1, 5])),
            Change::PutTask(task("t2", "svc1", "n2", "net1", [10, 0, 1, 4])),
            Change::PutSandbox(sandbox("c1", 11, &["net1"])),
            Change::PutSandbox(sandbox("c2", 22, &["net2"])),
        ] {
            s.apply(c);
        }
        let mut dnsrr = svc("svc2", &[]);
        dnsrr.mode = EndpointMode::Dnsrr;
        s.apply(Change::PutService(dnsrr));
        let mut starting = task("t3", "svc1", "n1", "net1", [10, 0, 1, 6]);
        starting.state = TaskState::Starting;
        s.apply(Change::PutTask(starting));
        let mut draining = task("t4", "svc1", "n1", "net1", [10, 0, 1, 7]);
        draining.desired = TaskState::Shutdown;
        s.apply(Change::PutTask(draining));
        s
    }

    fn lb1(d: &Desired) -> &Lb {
        &d.lbs[&LbRef {
            service_id: "svc1".into(),
            network_id: "net1".into(),
        }]
    }

    #[test]
    fn only_serving_tasks_are_backends() {
        let d = compile(&state());
        let ips = lb1(&d).backends.clone();
        assert_eq!(ips, vec![ip("10.0.1.4"), ip("10.0.1.5")]);
        assert_eq!(lb1(&d).vip, ip("10.0.1.2"));
        // Told to stop while still running: draining (kept at weight 0 by IPVS); still
        // starting: neither.
        assert_eq!(lb1(&d).draining, vec![ip("10.0.1.7")]);
        assert!(
            d.lbs.keys().all(|r| &*r.service_id != "svc2"),
            "dnsrr has no LB"
        );
    }

    #[test]
    fn remote_tasks_wait_for_this_nodes_overlay_to_know_them() {
        let mut s = state();
        let mut c = Compiler::default();
        c.rebuild(&s);
        let peers = |whole, added: &[&str], removed: &[&str]| Change::OverlayPeers {
            network_id: "net1".into(),
            whole,
            added: added.iter().map(|a| ip(a)).collect(),
            removed: removed.iter().map(|a| ip(a)).collect(),
        };
        let step = |s: &mut ClusterState, c: &mut Compiler, ch: Change| {
            let dirty = s.apply(ch);
            c.update(s, &dirty);
            let mut want = compile(s);
            want.rejected.sort_by(|a, b| a.id.cmp(&b.id));
            assert_eq!(c.desired().lbs, want.lbs, "incremental = full");
            lb1(c.desired()).backends.clone()
        };
        // The overlay knows t2 only: t1 (no local container, not a peer) waits.
        assert_eq!(
            step(&mut s, &mut c, peers(true, &["10.0.1.4"], &[])),
            [ip("10.0.1.4")]
        );
        // Gossip brings t1.
        assert_eq!(
            step(&mut s, &mut c, peers(false, &["10.0.1.5"], &[])),
            [ip("10.0.1.4"), ip("10.0.1.5")]
        );
        // t2 leaves the overlay's view; t1's container turns out to be local: it stays.
        let mut own = sandbox("c9", 99, &["net1"]);
        own.task_id = Some("t1".into());
        own.endpoints.insert(
            Id::from("net1"),
            crate::model::SandboxEndpoint {
                addr: Some(ip("10.0.1.5")),
                aliases: vec![],
            },
        );
        step(&mut s, &mut c, Change::PutSandbox(own));
        assert_eq!(
            step(&mut s, &mut c, peers(true, &[], &[])),
            [ip("10.0.1.5")]
        );
        // A view that reaches none of them turns nothing away (it is still filling in).
        step(&mut s, &mut c, Change::DropSandbox("c9".into()));
        assert_eq!(lb1(c.desired()).backends, [ip("10.0.1.4"), ip("10.0.1.5")]);
        // No view (no local container on the network any more): as before.
        assert_eq!(
            step(&mut s, &mut c, Change::DropOverlayPeers("net1".into())),
            [ip("10.0.1.4"), ip("10.0.1.5")]
        );
    }

    #[test]
    fn sandboxes_are_scoped_to_their_networks() {
        let d = compile(&state());
        assert_eq!(d.sandboxes[&11].networks, ["net1"]);
        assert_eq!(d.sandboxes[&22].networks, ["net2"]);
    }

    #[test]
    fn a_down_node_takes_its_tasks_out() {
        let mut s = state();
        s.apply(Change::PutNode(node("n2", NodeState::Down)));
        let d = compile(&s);
        assert_eq!(lb1(&d).backends.len(), 1);
        let ip = lb1(&d).backends[0];
        assert_eq!(&*backend_task(&s, "svc1", "net1", ip).unwrap().id, "t1");
    }

    #[test]
    fn one_task_change_recompiles_one_load_balancer() {
        let mut s = state();
        let mut c = Compiler::default();
        c.rebuild(&s);
        let dirty = s.apply(Change::DropTask("t1".into()));
        let changed = c.update(&s, &dirty);
        assert_eq!(changed.lbs.len(), 1);
        assert!(changed.sandboxes.is_empty());
        assert_eq!(changed.networks, ["net1".to_string()].into());
        assert_eq!(c.desired(), &compile(&s));
    }

    #[test]
    fn a_container_on_too_many_networks_is_noted_and_served_on_the_first_ones() {
        let mut s = state();
        let nets: Vec<String> = (0..MAX_SANDBOX_NETS + 2)
            .map(|i| format!("x{i:02}"))
            .collect();
        let refs: Vec<&str> = nets.iter().map(String::as_str).collect();
        s.apply(Change::PutSandbox(sandbox("c3", 33, &refs)));
        let d = compile(&s);
        assert_eq!(d.sandboxes[&33].networks.len(), MAX_SANDBOX_NETS);
        assert!(d
            .rejected
            .iter()
            .any(|r| r.id == "c3" && r.reason.contains("first 16")));
    }

    proptest! {
        // Whatever the order and mix of changes, updating only what each change touched
        // gives exactly what compiling everything gives.
        #[test]
        fn incremental_equals_full(changes in proptest::collection::vec(arb_change(), 0..80)) {
            let mut s = ClusterState::default();
            let mut c = Compiler::default();
            for ch in changes {
                let before = c.desired().clone();
                let dirty = s.apply(ch);
                let changed = c.update(&s, &dirty);
                let full = compile(&s);
                prop_assert_eq!(c.desired(), &full);
                // Whatever moved is named in `changed`: appliers that look only there miss
                // nothing.
                let after = c.desired();
                for k in before.lbs.keys().chain(after.lbs.keys()) {
                    if before.lbs.get(k) != after.lbs.get(k) {
                        prop_assert!(changed.lbs.contains(k), "{:?} moved unannounced", k);
                    }
                }
                for k in before.sandboxes.keys().chain(after.sandboxes.keys()) {
                    if before.sandboxes.get(k) != after.sandboxes.get(k) {
                        prop_assert!(changed.sandboxes.contains(k));
                    }
                }
                for k in before.zones.networks.keys().chain(after.zones.networks.keys()) {
                    if before.zones.networks.get(k) != after.zones.networks.get(k) {
                        prop_assert!(changed.networks.contains(k));
                    }
                }
                for k in before.ingress.keys().chain(after.ingress.keys()) {
                    if before.ingress.get(k) != after.ingress.get(k) {
                        prop_assert!(changed.ingress.contains(k), "{:?} moved unannounced", k);
                    }
                }
                if before.ingress_nodes != after.ingress_nodes {
                    prop_assert!(changed.ingress_nodes);
                }
                if before.ingress_local != after.ingress_local {
                    prop_assert!(changed.ingress_local);
                }
                if before.l7_netns != after.l7_netns {
                    prop_assert!(changed.l7_netns);
                }
                for k in before.l7.keys().chain(after.l7.keys()) {
                    if before.l7.get(k) != after.l7.get(k) {
                        prop_assert!(changed.l7.contains(k), "route of {:?} moved unannounced", k);
                    }
                }
                // No two routes answer one host and path.
                let mut seen = BTreeSet::new();
                for r in after.l7.values() {
                    for k in r.keys() {
                        prop_assert!(seen.insert(k.clone()), "{} routed twice", k);
                    }
                }
            }
        }

        #[test]
        fn dns_task_answers_are_the_datapath_backends(changes in proptest::collection::vec(arb_change(), 0..80)) {
            let s = ClusterState::from_changes(changes);
            let d = compile(&s);
            for (r, lb) in &d.lbs {
                let Some(svc) = s.services.get(&r.service_id) else { continue };
                let Some(zone) = d.zones.networks.get(&*r.network_id) else { continue };
                let name = format!("tasks.{}", svc.name.to_ascii_lowercase());
                let mut from_dns: Vec<Ipv4Addr> = zone
                    .names
                    .get(name.as_str())
                    .map(|e| e.addrs.to_vec())
                    .unwrap_or_default();
                from_dns.sort();
                from_dns.dedup();
                let backends: Vec<Ipv4Addr> = lb.backends.clone();
                prop_assert_eq!(from_dns, backends, "service {} on {}", svc.name, r.network_id);
            }
        }
    }
}
