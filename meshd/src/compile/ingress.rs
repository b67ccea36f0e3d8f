//! The ingress routing mesh, compiled: each port a service publishes in ingress mode (swarm's
//! default), the tasks that serve it, and where each one is reached from this node: its leg
//! on this node's `docker_gwbridge`, or its node's address to tunnel to.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

use crate::model::{BridgeLeg, ClusterState, Id, Kind, Protocol, PublishMode, Rejected};

/// The per-service opt-in that lets tasks see the external client's own address and port.
/// A `meshd.` label, not `com.docker.lb.`: that prefix is Interlock's L7 vocabulary (the L7
/// front end reads it), while this one changes the packet path of a published port, which
/// is meshd's own.
pub const CLIENT_ADDRESS_LABEL: &str = "meshd.ingress.client-address";

/// A published port: what a client outside connects to, on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IngressPort {
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for IngressPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// What the task sees as its peer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAddress {
    /// The entry node's address, as Docker's mesh does (works on any network).
    #[default]
    Snat,
    /// The client's own address and port.
    Preserve,
}

/// One task serving a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IngressBackend {
    /// Its address on the ingress network: the same on every node, so every node's Maglev
    /// table agrees.
    pub addr: Ipv4Addr,
    /// Its node's address (where the tunnel goes), if swarm reports one.
    pub node: Option<Ipv4Addr>,
    /// Its `docker_gwbridge` address when it runs on this node.
    pub local: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressLb {
    pub service_id: Id,
    pub service_name: std::sync::Arc<str>,
    /// The port inside the task.
    pub target: u16,
    pub client: ClientAddress,
    /// Live tasks, by ingress address.
    pub backends: Vec<IngressBackend>,
    /// Tasks still running but no longer serving (shutting down, or held back by a failing
    /// health check): no new flows, but the flows they have keep them.
    pub draining: Vec<Ipv4Addr>,
}

/// The ingress network (swarm has one; `docker network create --ingress` replaces it).
pub fn ingress_network(state: &ClusterState) -> Option<&Id> {
    state.networks.values().find(|n| n.ingress).map(|n| &n.id)
}

/// The ports a service publishes in ingress mode, each with its live tasks, and what of its
/// spec cannot be used (said once, for the service). `legs`: `local_legs(state)`.
pub fn service_ingress(
    state: &ClusterState,
    service_id: &str,
    legs: &BTreeMap<Ipv4Addr, BridgeLeg>,
) -> (Vec<(IngressPort, IngressLb)>, Option<Rejected>) {
    let Some(service) = state.services.get(service_id) else {
        return (Vec::new(), None);
    };
    let mut problems = Vec::new();
    let client = match service.labels.get(CLIENT_ADDRESS_LABEL).map(String::as_str) {
        None | Some("snat") => ClientAddress::Snat,
        Some("preserve") => ClientAddress::Preserve,
        Some(other) => {
            problems.push(format!(
                "label {CLIENT_ADDRESS_LABEL}={other:?}: expected \"snat\" or \"preserve\"; \
                 its ports use snat"
            ));
            ClientAddress::Snat
        }
    };
    let mut out = Vec::new();
    let ingress = ingress_network(state);
    for p in &service.ports {
        if p.mode != PublishMode::Ingress {
            continue;
        }
        let Some(port) = p.published else { continue };
        if !matches!(p.protocol, Protocol::Tcp | Protocol::Udp) {
            problems.push(format!(
                "publishes {port}/{}: the ingress mesh carries tcp and udp only",
                p.protocol
            ));
            continue;
        }
        let Some(ingress) = ingress else {
            problems.push(format!(
                "publishes {port}/{} in ingress mode, but the swarm has no ingress network",
                p.protocol
            ));
            continue;
        };
        out.push((
            IngressPort {
                protocol: p.protocol,
                port,
            },
            IngressLb {
                service_id: service.id.clone(),
                service_name: service.name.clone(),
                target: p.target,
                client,
                backends: backends(state, service_id, ingress, legs),
                draining: draining(state, service_id, ingress),
            },
        ));
    }
    let note = (!problems.is_empty()).then(|| Rejected {
        kind: Kind::Service,
        id: service_id.to_string(),
        reason: problems.join("; "),
    });
    (out, note)
}

/// `legs`: this node's task containers on the ingress network (`local_legs`).
fn backends(
    state: &ClusterState,
    service_id: &str,
    ingress: &str,
    legs: &BTreeMap<Ipv4Addr, BridgeLeg>,
) -> Vec<IngressBackend> {
    let mut out: Vec<IngressBackend> = state
        .tasks_of(service_id)
        .filter(|t| state.serves(t))
        .filter_map(|t| {
            let addr = *t.addresses.get(ingress)?;
            let local = legs.get(&addr).map(|l| l.addr);
            let node = state.nodes.get(&*t.node_id).and_then(|n| n.addr);
            // Neither here nor anywhere known: nowhere to send it.
            (local.is_some() || node.is_some()).then_some(IngressBackend { addr, node, local })
        })
        .collect();
    out.sort();
    out.dedup_by_key(|b| b.addr);
    out
}

fn draining(state: &ClusterState, service_id: &str, ingress: &str) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = state
        .tasks_of(service_id)
        .filter(|t| t.state == crate::model::TaskState::Running && !state.serves(t))
        .filter_map(|t| t.addresses.get(ingress).copied())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether one of `service_id`'s tasks is at one of `addrs` on the ingress network.
pub fn has_task_at(state: &ClusterState, service_id: &str, addrs: &BTreeSet<Ipv4Addr>) -> bool {
    let Some(ingress) = ingress_network(state) else {
        return false;
    };
    state
        .tasks_of(service_id)
        .any(|t| t.addresses.get(ingress).is_some_and(|a| addrs.contains(a)))
}

/// This node's task containers on the ingress network, serving or not (a task shutting
/// down keeps its flows while it lives): ingress address → `docker_gwbridge` leg.
pub fn local_legs(state: &ClusterState) -> BTreeMap<Ipv4Addr, BridgeLeg> {
    let Some(ingress) = ingress_network(state) else {
        return BTreeMap::new();
    };
    state
        .sandboxes_on(ingress)
        .filter(|s| s.task_id.is_some())
        .filter_map(|s| Some((s.endpoints.get(ingress)?.addr?, s.gateway?)))
        .collect()
}

/// The addresses of the swarm's nodes: a tunnel from any of them is accepted.
pub fn node_addrs(state: &ClusterState) -> BTreeSet<Ipv4Addr> {
    state.nodes.values().filter_map(|n| n.addr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        compile::compile,
        model::{state_tests::*, Change, NodeState, PublishedPort, SandboxEndpoint},
    };

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn published(s: &mut crate::model::Service, port: u16, protocol: Protocol, mode: PublishMode) {
        s.ports.push(PublishedPort {
            protocol,
            target: 80,
            published: Some(port),
            mode,
        });
    }

    fn state(labels: &[(&str, &str)]) -> ClusterState {
        let mut s = ClusterState::default();
        let mut ingress = net("ing");
        ingress.ingress = true;
        s.apply(Change::PutNetwork(ingress));
        for (id, addr) in [("n1", "192.168.0.1"), ("n2", "192.168.0.2")] {
            let mut n = node(id, NodeState::Ready);
            n.addr = Some(ip(addr));
            s.apply(Change::PutNode(n));
        }
        let mut web = svc("web", &[("ing", [10, 0, 0, 2])]);
        published(&mut web, 8080, Protocol::Tcp, PublishMode::Ingress);
        published(&mut web, 8080, Protocol::Udp, PublishMode::Ingress);
        published(&mut web, 8081, Protocol::Tcp, PublishMode::Host);
        published(&mut web, 9000, Protocol::Sctp, PublishMode::Ingress);
        web.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        s.apply(Change::PutService(web));
        s.apply(Change::PutTask(task(
            "t1",
            "web",
            "n1",
            "ing",
            [10, 0, 0, 5],
        )));
        s.apply(Change::PutTask(task(
            "t2",
            "web",
            "n2",
            "ing",
            [10, 0, 0, 6],
        )));
        // t1's container runs here, with its docker_gwbridge leg.
        let mut c = sandbox("c1", 7, &["ing"]);
        c.task_id = Some("t1".into());
        c.gateway = Some(leg());
        c.endpoints.insert(
            Id::from("ing"),
            SandboxEndpoint {
                addr: Some(ip("10.0.0.5")),
                aliases: vec![],
            },
        );
        s.apply(Change::PutSandbox(c));
        s
    }

    /// t1's leg on docker_gwbridge.
    fn leg() -> BridgeLeg {
        BridgeLeg {
            addr: ip("172.18.0.3"),
            veth: Some(crate::model::VethEnds {
                host_ifindex: 12,
                mac: [2, 0x42, 0xac, 0x12, 0, 3],
            }),
        }
    }

    #[test]
    fn ingress_ports_with_their_tasks_local_or_by_node() {
        let d = compile(&state(&[]));
        let tcp = IngressPort {
            protocol: Protocol::Tcp,
            port: 8080,
        };
        let udp = IngressPort {
            protocol: Protocol::Udp,
            port: 8080,
        };
        assert_eq!(
            d.ingress.keys().copied().collect::<Vec<_>>(),
            [tcp, udp],
            "ingress tcp and udp; not host mode, not sctp"
        );
        let lb = &d.ingress[&tcp];
        assert_eq!(lb.client, ClientAddress::Snat);
        assert_eq!(
            lb.backends,
            [
                IngressBackend {
                    addr: ip("10.0.0.5"),
                    node: Some(ip("192.168.0.1")),
                    local: Some(ip("172.18.0.3")),
                },
                IngressBackend {
                    addr: ip("10.0.0.6"),
                    node: Some(ip("192.168.0.2")),
                    local: None,
                },
            ]
        );
        assert_eq!(d.ingress_local, [(ip("10.0.0.5"), leg())].into());
        assert_eq!(
            d.ingress_nodes,
            [ip("192.168.0.1"), ip("192.168.0.2")].into()
        );
        let note = d.rejected.iter().find(|r| &*r.id == "web").unwrap();
        assert!(note.reason.contains("9000/sctp"), "{note:?}");
    }

    #[test]
    fn the_client_address_label_and_a_bad_value() {
        let d = compile(&state(&[(CLIENT_ADDRESS_LABEL, "preserve")]));
        assert!(d
            .ingress
            .values()
            .all(|lb| lb.client == ClientAddress::Preserve));
        let d = compile(&state(&[(CLIENT_ADDRESS_LABEL, "presrve")]));
        assert!(d
            .ingress
            .values()
            .all(|lb| lb.client == ClientAddress::Snat));
        let note = d.rejected.iter().find(|r| &*r.id == "web").unwrap();
        assert!(
            note.reason.contains("presrve") && note.reason.contains("snat"),
            "{note:?}"
        );
        assert_eq!(d.ingress.len(), 2, "the ports still answer");
    }

    #[test]
    fn a_draining_task_leaves_the_table_but_keeps_its_leg() {
        let mut s = state(&[]);
        let mut t1 = task("t1", "web", "n1", "ing", [10, 0, 0, 5]);
        t1.desired = crate::model::TaskState::Shutdown;
        s.apply(Change::PutTask(t1));
        let d = compile(&s);
        let lb = d.ingress.values().next().unwrap();
        assert_eq!(
            lb.backends.iter().map(|b| b.addr).collect::<Vec<_>>(),
            [ip("10.0.0.6")]
        );
        assert!(d.ingress_local.contains_key(&ip("10.0.0.5")));
        assert_eq!(lb.draining, [ip("10.0.0.5")], "its flows keep it");
    }
}
