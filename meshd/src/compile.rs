//! `compile`: ClusterState + this node → Desired. Pure and deterministic: the same state
//! always gives the same Desired, byte for byte, so a restarted meshd recomputes exactly the
//! tables it left pinned.
use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::{
    maglev,
    model::{ClusterState, EndpointMode},
};

/// One load balancer: a service's VIP on one network.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LbRef {
    pub service_id: String,
    pub network_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub task_id: String,
    pub node_id: String,
    pub slot: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lb {
    pub service_name: String,
    pub network_name: String,
    pub vip: Ipv4Addr,
    /// Live backends, sorted by address.
    pub backends: Vec<Backend>,
    pub table_size: u32,
    /// The Maglev table: for each slot, an index into `backends`.
    #[serde(skip)]
    pub table: Vec<u32>,
}

impl Lb {
    /// The backend address of each slot, as the datapath stores it.
    pub fn slot_addresses(&self) -> impl Iterator<Item = (u32, Ipv4Addr)> + '_ {
        self.table
            .iter()
            .enumerate()
            .map(|(slot, &b)| (slot as u32, self.backends[b as usize].ip))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub lbs: BTreeMap<LbRef, Lb>,
    /// (netns cookie of a local sandbox, VIP) → the load balancer that answers there.
    pub vips: BTreeMap<(u64, Ipv4Addr), LbRef>,
}

/// Builds the desired VIP tables. Load balancers are cluster wide; the VIP scope is this
/// node's, since the state's sandboxes are the containers running here.
pub fn compile(state: &ClusterState) -> Desired {
    let mut desired = Desired::default();
    for service in state.services.values() {
        if service.mode != EndpointMode::Vip {
            continue;
        }
        for (network_id, &vip) in &service.vips {
            let Some(network) = state.networks.get(network_id) else {
                continue;
            };
            let mut backends: Vec<Backend> = state
                .tasks
                .iter()
                .filter(|t| t.service_id == service.id && t.is_live())
                .filter(|t| !state.nodes.get(&t.node_id).is_some_and(|n| n.is_down()))
                .filter_map(|t| {
                    t.addresses.get(network_id).map(|&ip| Backend {
                        ip,
                        task_id: t.id.clone(),
                        node_id: t.node_id.clone(),
                        slot: t.slot,
                    })
                })
                .collect();
            backends.sort_by(|a, b| a.ip.cmp(&b.ip).then(a.task_id.cmp(&b.task_id)));
            backends.dedup_by_key(|b| b.ip);
            let table_size = maglev::table_size(backends.len());
            let names: Vec<[u8; 4]> = backends.iter().map(|b| b.ip.octets()).collect();
            let table = maglev::build(&names, table_size);
            desired.lbs.insert(
                LbRef {
                    service_id: service.id.clone(),
                    network_id: network_id.clone(),
                },
                Lb {
                    service_name: service.name.clone(),
                    network_name: network.name.clone(),
                    vip,
                    backends,
                    table_size,
                    table,
                },
            );
        }
    }
    // Scope: a VIP is visible in a sandbox only when the sandbox shares its network.
    for sandbox in &state.sandboxes {
        for (lb_ref, lb) in &desired.lbs {
            if sandbox.networks.contains(&lb_ref.network_id) {
                desired
                    .vips
                    .insert((sandbox.netns_cookie, lb.vip), lb_ref.clone());
            }
        }
    }
    desired
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn task(id: &str, svc: &str, node: &str, state: &str, desired: &str, addr: &str) -> Task {
        Task {
            id: id.into(),
            service_id: svc.into(),
            node_id: node.into(),
            slot: None,
            state: state.into(),
            desired_state: desired.into(),
            addresses: [("net1".to_string(), ip(addr))].into(),
            container_id: None,
            hostname: None,
        }
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (id, name) in [("net1", "front"), ("net2", "back")] {
            s.networks.insert(
                id.into(),
                Network {
                    id: id.into(),
                    name: name.into(),
                    internal: false,
                },
            );
        }
        s.services.insert(
            "svc1".into(),
            Service {
                id: "svc1".into(),
                name: "web".into(),
                mode: EndpointMode::Vip,
                vips: [("net1".to_string(), ip("10.0.1.2"))].into(),
                aliases: BTreeMap::new(),
            },
        );
        s.services.insert(
            "svc2".into(),
            Service {
                id: "svc2".into(),
                name: "app".into(),
                mode: EndpointMode::Dnsrr,
                vips: BTreeMap::new(),
                aliases: BTreeMap::new(),
            },
        );
        s.nodes.insert(
            "n1".into(),
            Node {
                id: "n1".into(),
                hostname: "node1".into(),
                state: "ready".into(),
            },
        );
        s.nodes.insert(
            "n2".into(),
            Node {
                id: "n2".into(),
                hostname: "node2".into(),
                state: "ready".into(),
            },
        );
        s.tasks = vec![
            task("t1", "svc1", "n1", "running", "running", "10.0.1.5"),
            task("t2", "svc1", "n2", "running", "running", "10.0.1.4"),
            task("t3", "svc1", "n1", "starting", "running", "10.0.1.6"),
            task("t4", "svc1", "n1", "running", "shutdown", "10.0.1.7"),
            task("t5", "svc2", "n1", "running", "running", "10.0.1.8"),
        ];
        s.sandboxes = vec![
            Sandbox {
                container_id: "c1".into(),
                name: "client".into(),
                netns_cookie: 11,
                netns_path: String::new(),
                networks: vec!["net1".into()],
                endpoints: BTreeMap::new(),
                hostname: String::new(),
            },
            Sandbox {
                container_id: "c2".into(),
                name: "other".into(),
                netns_cookie: 22,
                netns_path: String::new(),
                networks: vec!["net2".into()],
                endpoints: BTreeMap::new(),
                hostname: String::new(),
            },
        ];
        s
    }

    #[test]
    fn only_running_tasks_meant_to_run_are_backends() {
        let d = compile(&state());
        let lb = &d.lbs[&LbRef {
            service_id: "svc1".into(),
            network_id: "net1".into(),
        }];
        let ips: Vec<_> = lb.backends.iter().map(|b| b.ip).collect();
        assert_eq!(ips, vec![ip("10.0.1.4"), ip("10.0.1.5")]);
        assert_eq!(lb.table.len() as u32, lb.table_size);
        assert_eq!(lb.vip, ip("10.0.1.2"));
    }

    #[test]
    fn dnsrr_services_get_no_load_balancer() {
        let d = compile(&state());
        assert!(d.lbs.keys().all(|r| r.service_id != "svc2"));
    }

    #[test]
    fn vips_are_scoped_to_sandboxes_on_the_network() {
        let d = compile(&state());
        assert!(d.vips.contains_key(&(11, ip("10.0.1.2"))));
        assert!(!d.vips.keys().any(|(cookie, _)| *cookie == 22));
    }

    #[test]
    fn tasks_on_a_down_node_are_dropped() {
        let mut s = state();
        s.nodes.get_mut("n2").unwrap().state = "down".into();
        let d = compile(&s);
        let lb = d.lbs.values().next().unwrap();
        assert_eq!(lb.backends.len(), 1);
        assert_eq!(lb.backends[0].node_id, "n1");
    }

    #[test]
    fn no_backend_gives_an_empty_table() {
        let mut s = state();
        s.tasks.clear();
        let d = compile(&s);
        let lb = d.lbs.values().next().unwrap();
        assert_eq!(lb.table_size, 0);
        assert!(lb.table.is_empty());
    }

    #[test]
    fn compile_is_deterministic_whatever_the_task_order() {
        let s = state();
        let mut r = s.clone();
        r.tasks.reverse();
        assert_eq!(compile(&s), compile(&r));
    }
}
