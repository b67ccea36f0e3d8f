//! The L7 front end's routes, compiled: each service with `com.docker.lb.*` labels, its
//! spec as the labels say (`l7::labels`), the network it is reached on, and its upstreams
//! (its serving tasks there, its VIP, or its nodes' host-mode ports).
//!
//! Which service holds a host and path is decided here, the same on every node: of two
//! services claiming one, the one created first keeps it, and the other gets no route at
//! all (rejected, with the reason), so a typo in one service's labels or a copy-pasted host
//! never takes a route away from a service that had it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use serde::{Deserialize, Serialize};

use crate::{
    l7::labels::{self, BackendMode, RouteSpec},
    model::{ClusterState, EndpointMode, Id, Kind, PublishMode, Rejected, TaskId},
};

/// The host a `default_backend` service claims: no host name can be empty.
pub const DEFAULT_HOST: &str = "";

/// One (host, path prefix) a route answers.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteKey {
    pub host: String,
    pub path: String,
}

impl std::fmt::Display for RouteKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host == DEFAULT_HOST {
            write!(f, "(default backend)")
        } else {
            write!(f, "{}{}", self.host, self.path)
        }
    }
}

/// Where an upstream connection is opened from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Via {
    /// From inside a namespace attached to this network.
    Network(Id),
    /// From the node itself (a host-mode published port).
    Host,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Upstream {
    pub addr: SocketAddrV4,
    /// The task behind it (none for a VIP): what a sticky cookie names.
    pub task: Option<TaskId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct L7Route {
    pub service_id: Id,
    pub service_name: std::sync::Arc<str>,
    pub spec: RouteSpec,
    pub via: Via,
    /// Sorted; empty while no task serves (requests get 503).
    pub upstreams: Vec<Upstream>,
    /// The addresses of the nodes that run its serving tasks, sorted: a node with no
    /// namespace on the route's network relays requests to one of these (each has one).
    #[serde(default)]
    pub relays: Vec<Ipv4Addr>,
    /// The service's creation time (comparable): the older claim wins.
    pub created: String,
}

impl L7Route {
    /// Every host and path this route answers: its hosts under its context root, the hosts
    /// its redirects come from, and the default backend's catch-all.
    pub fn keys(&self) -> BTreeSet<RouteKey> {
        let path = self.spec.context_root.clone().unwrap_or_else(|| "/".into());
        let mut out: BTreeSet<RouteKey> = self
            .spec
            .hosts
            .iter()
            .map(|h| RouteKey {
                host: h.clone(),
                path: path.clone(),
            })
            .collect();
        for r in &self.spec.redirects {
            if !self.spec.hosts.contains(&r.from_host) {
                out.insert(RouteKey {
                    host: r.from_host.clone(),
                    path: "/".into(),
                });
            }
        }
        if self.spec.default_backend {
            out.insert(RouteKey {
                host: DEFAULT_HOST.into(),
                path: "/".into(),
            });
        }
        out
    }
}

/// A service's route as its labels and tasks make it; None without `com.docker.lb.*`
/// labels; Err: why it gets none.
pub fn service_route(state: &ClusterState, service_id: &str) -> Option<Result<L7Route, Rejected>> {
    let service = state.services.get(service_id)?;
    let reject = |reasons: Vec<String>| Rejected {
        kind: Kind::Service,
        id: service_id.to_string(),
        reason: format!("{}: no L7 route: {}", service.name, reasons.join("; ")),
    };
    let spec = match labels::parse(&service.labels)? {
        Ok(s) => s,
        Err(p) => return Some(Err(reject(p))),
    };
    let via = match network_of(state, service_id, &spec) {
        Ok(v) => v,
        Err(why) => return Some(Err(reject(vec![why]))),
    };
    let upstreams = match upstreams(state, service_id, &spec, &via) {
        Ok(u) => u,
        Err(why) => return Some(Err(reject(vec![why]))),
    };
    let mut relays: Vec<Ipv4Addr> = match via {
        Via::Network(_) => state
            .tasks_of(service_id)
            .filter(|t| state.serves(t))
            .filter_map(|t| state.nodes.get(&*t.node_id).and_then(|n| n.addr))
            .collect(),
        Via::Host => Vec::new(),
    };
    relays.sort_unstable();
    relays.dedup();
    Some(Ok(L7Route {
        service_id: service.id.clone(),
        service_name: service.name.clone(),
        spec,
        via,
        upstreams,
        relays,
        created: service.created.clone(),
    }))
}

/// The networks a service is on (its VIPs', and its tasks'), the ingress network left out.
fn service_networks(state: &ClusterState, service_id: &str) -> BTreeSet<Id> {
    let ingress = super::ingress::ingress_network(state);
    let mut out: BTreeSet<Id> = state
        .services
        .get(service_id)
        .map(|s| s.vips.keys().cloned().collect())
        .unwrap_or_default();
    for t in state.tasks_of(service_id) {
        out.extend(t.addresses.keys().cloned());
    }
    out.retain(|n| Some(n) != ingress && state.networks.contains_key(n));
    out
}

/// The network to reach the service on, by `com.docker.lb.network` or the only one it has;
/// with none, its host-mode published port.
fn network_of(state: &ClusterState, service_id: &str, spec: &RouteSpec) -> Result<Via, String> {
    let nets = service_networks(state, service_id);
    let name_of = |id: &Id| {
        state
            .networks
            .get(id)
            .map_or(id.to_string(), |n| n.name.clone())
    };
    if let Some(want) = &spec.network {
        return nets
            .iter()
            .find(|id| ***id == **want || name_of(id) == *want)
            .map(|id| Via::Network(id.clone()))
            .ok_or_else(|| {
                let on: Vec<String> = nets.iter().map(name_of).collect();
                format!(
                    "{}network={want}: the service is not on it (it is on: {})",
                    labels::PREFIX,
                    if on.is_empty() {
                        "none".into()
                    } else {
                        on.join(", ")
                    }
                )
            });
    }
    let host_port = state.services.get(service_id).is_some_and(|s| {
        s.ports
            .iter()
            .any(|p| p.mode == PublishMode::Host && p.target == spec.port)
    });
    // Seed 004's host mode: a host-mode port and no network named is reached at the
    // task's node, whatever networks the service is also on.
    if host_port {
        return Ok(Via::Host);
    }
    match nets.len() {
        1 => Ok(Via::Network(nets.into_iter().next().expect("one"))),
        0 => Err(format!(
            "it is on no network and publishes no host-mode port {}: nothing to reach it by",
            spec.port
        )),
        _ => Err(format!(
            "it is on several networks ({}): name one with {}network",
            nets.iter().map(name_of).collect::<Vec<_>>().join(", "),
            labels::PREFIX
        )),
    }
}

fn upstreams(
    state: &ClusterState,
    service_id: &str,
    spec: &RouteSpec,
    via: &Via,
) -> Result<Vec<Upstream>, String> {
    let service = &state.services[service_id];
    let mut out = Vec::new();
    match via {
        Via::Host => {
            let published = service
                .ports
                .iter()
                .find(|p| p.mode == PublishMode::Host && p.target == spec.port)
                .and_then(|p| p.published)
                .ok_or_else(|| {
                    format!(
                        "port {} is published in host mode without a fixed published port",
                        spec.port
                    )
                })?;
            for t in state.tasks_of(service_id).filter(|t| state.serves(t)) {
                if let Some(addr) = state.nodes.get(&*t.node_id).and_then(|n| n.addr) {
                    out.push(Upstream {
                        addr: SocketAddrV4::new(addr, published),
                        task: Some(t.id.clone()),
                    });
                }
            }
        }
        Via::Network(net) if spec.backend_mode == BackendMode::Vip => {
            if service.mode != EndpointMode::Vip {
                return Err(format!(
                    "{}backend_mode=vip, but the service is dnsrr (it has no VIP)",
                    labels::PREFIX
                ));
            }
            if let Some(vip) = service.vips.get(net) {
                out.push(Upstream {
                    addr: SocketAddrV4::new(*vip, spec.port),
                    task: None,
                });
            }
        }
        Via::Network(net) => {
            let mut addrs: Vec<Ipv4Addr> = Vec::new();
            let mut task_of = BTreeMap::new();
            for t in state.tasks_of(service_id).filter(|t| state.serves(t)) {
                if let Some(a) = t.addresses.get(net) {
                    addrs.push(*a);
                    task_of.entry(*a).or_insert_with(|| t.id.clone());
                }
            }
            state.reachable_of(net, &mut addrs);
            for a in addrs {
                out.push(Upstream {
                    addr: SocketAddrV4::new(a, spec.port),
                    task: task_of.get(&a).cloned(),
                });
            }
        }
    }
    out.sort();
    out.dedup_by_key(|u| u.addr);
    Ok(out)
}

/// For each network the routes reach tasks on: the namespace this node opens upstream
/// connections from, a local container's on that network. A container that is going away
/// is never chosen (told to stop, or its task no longer serving): its namespace loses its
/// interfaces when it dies, and connections pooled there would go silent. Plain containers
/// come first (they outlive tasks), then the lowest container id, so the choice stays put
/// while it lives. A network with no local container has none.
pub fn dial_namespaces(
    state: &ClusterState,
    routes: &BTreeMap<Id, std::sync::Arc<L7Route>>,
) -> BTreeMap<Id, String> {
    let mut out = BTreeMap::new();
    for r in routes.values() {
        let Via::Network(net) = &r.via else { continue };
        if out.contains_key(net) {
            continue;
        }
        let staying = |s: &&crate::model::Sandbox| {
            !s.netns_path.is_empty()
                && !s.stopping
                && s.task_id
                    .as_deref()
                    .is_none_or(|t| state.tasks.get(t).is_some_and(|t| state.serves(t)))
        };
        let best = state.sandboxes_on(net).filter(staying).min_by(|a, b| {
            (a.task_id.is_some(), &a.container_id).cmp(&(b.task_id.is_some(), &b.container_id))
        });
        if let Some(s) = best {
            out.insert(net.clone(), s.netns_path.clone());
        }
    }
    out
}

/// A claim on a route key: the older (`created`) wins, then the lower id.
type Claim = (String, Id);

/// The L7 part of the `Compiler`'s memory.
#[derive(Debug, Default)]
pub(super) struct L7Claims {
    /// Every service's route as its labels make it, whether it holds its keys or not.
    routes: BTreeMap<Id, std::sync::Arc<L7Route>>,
    /// Route key → the services claiming it.
    claims: BTreeMap<RouteKey, BTreeSet<Claim>>,
    /// Why a service has no route, by service id.
    notes: BTreeMap<Id, Rejected>,
}

impl L7Claims {
    pub(super) fn notes(&self) -> impl Iterator<Item = &Rejected> {
        self.notes.values()
    }

    pub(super) fn services(&self) -> impl Iterator<Item = &Id> {
        self.routes.keys().chain(self.notes.keys())
    }

    /// Recompiles the routes of these services; writes the winners into `desired` and says
    /// which services' routes changed (a service whose claim a change freed or took is
    /// among them). Returns whether the rejected list changed.
    pub(super) fn update(
        &mut self,
        state: &ClusterState,
        services: &BTreeSet<Id>,
        desired: &mut BTreeMap<Id, std::sync::Arc<L7Route>>,
        changed: &mut BTreeSet<Id>,
    ) -> bool {
        let mut notes_changed = false;
        let mut keys = BTreeSet::new();
        let mut label_notes: BTreeMap<Id, Option<Rejected>> = BTreeMap::new();
        for sid in services {
            let (fresh, note) = match service_route(state, sid) {
                None => (None, None),
                Some(Ok(r)) => (Some(std::sync::Arc::new(r)), None),
                Some(Err(n)) => (None, Some(n)),
            };
            let old = self.routes.get(sid).cloned();
            if old != fresh {
                if let Some(o) = &old {
                    for k in o.keys() {
                        if let Some(c) = self.claims.get_mut(&k) {
                            c.remove(&(o.created.clone(), sid.clone()));
                            if c.is_empty() {
                                self.claims.remove(&k);
                            }
                        }
                        keys.insert(k);
                    }
                }
                match &fresh {
                    Some(f) => {
                        for k in f.keys() {
                            self.claims
                                .entry(k.clone())
                                .or_default()
                                .insert((f.created.clone(), sid.clone()));
                            keys.insert(k);
                        }
                        self.routes.insert(sid.clone(), f.clone());
                    }
                    None => {
                        self.routes.remove(sid);
                    }
                }
            }
            label_notes.insert(sid.clone(), note);
        }
        // Everyone claiming a key that moved may have won or lost it.
        let mut judge: BTreeSet<Id> = services.clone();
        for k in &keys {
            if let Some(c) = self.claims.get(k) {
                judge.extend(c.iter().map(|(_, sid)| sid.clone()));
            }
        }
        for sid in judge {
            let route = self.routes.get(&sid).cloned();
            let lost: Option<(RouteKey, Id)> = route.as_ref().and_then(|r| {
                r.keys().into_iter().find_map(|k| {
                    let first = self.claims.get(&k)?.first()?;
                    (first.1 != sid).then(|| (k, first.1.clone()))
                })
            });
            let note = match (&route, &lost) {
                (Some(_), Some((k, holder))) => Some(Rejected {
                    kind: Kind::Service,
                    id: sid.to_string(),
                    reason: format!(
                        "{}: no L7 route: {k} is served by {} (created earlier)",
                        route.as_ref().map_or("", |r| &*r.service_name),
                        self.routes
                            .get(holder)
                            .map_or(holder.to_string(), |r| r.service_name.to_string())
                    ),
                }),
                (Some(_), None) => None,
                // No usable labels: the reason they gave (kept when not recompiled).
                (None, _) => label_notes
                    .remove(&sid)
                    .unwrap_or_else(|| self.notes.get(&sid).cloned()),
            };
            let winner = route.filter(|_| lost.is_none());
            if desired.get(&sid) != winner.as_ref() {
                match winner {
                    Some(w) => desired.insert(sid.clone(), w),
                    None => desired.remove(&sid),
                };
                changed.insert(sid.clone());
            }
            if self.notes.get(&sid) != note.as_ref() {
                notes_changed = true;
                match note {
                    Some(n) => self.notes.insert(sid, n),
                    None => self.notes.remove(&sid),
                };
            }
        }
        notes_changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        compile::compile,
        model::{state_tests::*, Change, Network, NodeState, Protocol, PublishedPort},
    };

    fn net(id: &str, name: &str) -> Change {
        Change::PutNetwork(Network {
            id: id.into(),
            name: name.into(),
            internal: false,
            ingress: false,
            scope: "swarm".into(),
            attachable: false,
        })
    }

    fn lb(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("{}{k}", labels::PREFIX), v.to_string()))
            .collect()
    }

    /// Services `shop` (created first) and `copy`, both on network n1 with one task each.
    fn state(copy_labels: &[(&str, &str)]) -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(net("n1", "front"));
        s.apply(net("n2", "back"));
        let mut shop = svc("shop", &[("n1", [10, 0, 1, 2])]);
        shop.labels = lb(&[("hosts", "shop.example.com"), ("port", "8080")]);
        shop.created = "2026-01-01T00:00:00.000000001Z".into();
        s.apply(Change::PutService(shop));
        let mut copy = svc("copy", &[("n1", [10, 0, 1, 3])]);
        copy.labels = lb(copy_labels);
        copy.created = "2026-01-01T00:00:00.000000002Z".into();
        s.apply(Change::PutService(copy));
        s.apply(Change::PutTask(task(
            "t1",
            "shop",
            "node1",
            "n1",
            [10, 0, 1, 10],
        )));
        s.apply(Change::PutTask(task(
            "t2",
            "copy",
            "node1",
            "n1",
            [10, 0, 1, 11],
        )));
        s
    }

    #[test]
    fn a_route_reaches_the_serving_tasks_on_its_network() {
        let d = compile(&state(&[("hosts", "copy.example.com"), ("port", "80")]));
        let shop = &d.l7["shop"];
        assert_eq!(shop.via, Via::Network("n1".into()));
        assert_eq!(
            shop.upstreams,
            [Upstream {
                addr: "10.0.1.10:8080".parse().unwrap(),
                task: Some("t1".into())
            }]
        );
        assert!(d.l7.contains_key("copy"));
        assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    }

    #[test]
    fn the_older_service_keeps_a_host_and_the_copy_is_rejected_alone() {
        let d = compile(&state(&[
            ("hosts", "shop.example.com, other.example.com"),
            ("port", "80"),
        ]));
        assert!(d.l7.contains_key("shop"), "the older service keeps it");
        assert!(!d.l7.contains_key("copy"), "the copy gets no route at all");
        let r = d
            .rejected
            .iter()
            .find(|r| r.id == "copy")
            .expect("rejected");
        assert!(
            r.reason.contains("shop.example.com/") && r.reason.contains("svc-shop"),
            "{}",
            r.reason
        );
        // Another path on the same host is another route.
        let d = compile(&state(&[
            ("hosts", "shop.example.com"),
            ("port", "80"),
            ("context_root", "/api"),
        ]));
        assert!(d.l7.contains_key("shop") && d.l7.contains_key("copy"));
    }

    #[test]
    fn bad_labels_and_ambiguous_networks_are_rejected_with_the_reason() {
        let d = compile(&state(&[("hosts", "copy.example.com"), ("ports", "80")]));
        let r = d
            .rejected
            .iter()
            .find(|r| r.id == "copy")
            .expect("rejected");
        assert!(
            r.reason.contains("did you mean com.docker.lb.port"),
            "{}",
            r.reason
        );
        assert!(d.l7.contains_key("shop"), "the other route keeps serving");

        let mut s = state(&[("hosts", "copy.example.com"), ("port", "80")]);
        s.apply(Change::PutTask(task(
            "t3",
            "copy",
            "node1",
            "n2",
            [10, 0, 2, 11],
        )));
        let d = compile(&s);
        let r = d
            .rejected
            .iter()
            .find(|r| r.id == "copy")
            .expect("rejected");
        assert!(
            r.reason.contains("several networks (front, back)"),
            "{}",
            r.reason
        );
        let mut s = state(&[
            ("hosts", "copy.example.com"),
            ("port", "80"),
            ("network", "back"),
        ]);
        s.apply(Change::PutTask(task(
            "t3",
            "copy",
            "node1",
            "n2",
            [10, 0, 2, 11],
        )));
        let d = compile(&s);
        assert_eq!(d.l7["copy"].via, Via::Network("n2".into()));
        assert_eq!(
            d.l7["copy"].upstreams[0].addr,
            "10.0.2.11:80".parse().unwrap()
        );
    }

    #[test]
    fn vip_mode_and_host_mode() {
        let d = compile(&state(&[
            ("hosts", "copy.example.com"),
            ("port", "80"),
            ("backend_mode", "vip"),
        ]));
        assert_eq!(
            d.l7["copy"].upstreams[0].addr,
            "10.0.1.3:80".parse().unwrap()
        );
        // On no network, publishing its port in host mode: its tasks' nodes on that port.
        let mut s = state(&[]);
        let mut h = svc("hostly", &[]);
        h.labels = lb(&[("hosts", "h.example.com"), ("port", "80")]);
        h.ports = vec![PublishedPort {
            protocol: Protocol::Tcp,
            target: 80,
            published: Some(8081),
            mode: PublishMode::Host,
        }];
        s.apply(Change::PutService(h));
        let mut n2 = node("node2", NodeState::Ready);
        n2.addr = Some(Ipv4Addr::new(192, 168, 0, 2));
        s.apply(Change::PutNode(n2));
        let mut t = task("t9", "hostly", "node2", "n1", [0, 0, 0, 0]);
        t.addresses.clear();
        s.apply(Change::PutTask(t));
        let d = compile(&s);
        assert_eq!(d.l7["hostly"].via, Via::Host);
        assert_eq!(
            d.l7["hostly"].upstreams[0].addr,
            "192.168.0.2:8081".parse().unwrap()
        );
    }
}
