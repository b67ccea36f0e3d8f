//! `dns_zones`: ClusterState → the names meshd's DNS answers, per network. Pure, and built
//! from the same liveness rule as the datapath (`Task::is_live`, tasks on down nodes left
//! out), so DNS never names a task the datapath already dropped.
use std::{collections::BTreeMap, net::Ipv4Addr};

use meshd_dns::{records::normalize, Entry, Kind, NetworkRecords, Zones};

use tracing::debug;

use crate::{
    hostname_template::{expand, TaskContext},
    model::{ClusterState, EndpointMode, Task},
};

fn live(state: &ClusterState, t: &Task) -> bool {
    t.is_live() && !state.nodes.get(&t.node_id).is_some_and(|n| n.is_down())
}

/// A task's container name, as Docker names it: `<service>.<slot>.<task id>` (global
/// services have no slot: the node id stands in).
pub fn task_name(service: &str, t: &Task) -> String {
    format!("{service}.{}.{}", slot_or_node(t), t.id)
}

/// A task's slot, or for a global service's task (no slot) its node id, as swarm puts it
/// in task names and in the `.Task.Slot` template field.
fn slot_or_node(t: &Task) -> String {
    match t.slot {
        Some(slot) if slot > 0 => slot.to_string(),
        _ => t.node_id.clone(),
    }
}

/// Docker's short container id: also the default hostname, and a name on every network.
fn short_id(container_id: &str) -> &str {
    container_id.get(..12).unwrap_or(container_id)
}

/// The hostname a task's container got from its service's `--hostname` template; none when
/// meshd cannot expand it (that task keeps its other names).
fn task_hostname(
    state: &ClusterState,
    service_id: &str,
    service_name: &str,
    t: &Task,
    task_name: &str,
    template: &str,
) -> Option<String> {
    let slot = slot_or_node(t);
    let ctx = TaskContext {
        service_id,
        service_name,
        node_id: &t.node_id,
        node_hostname: state.nodes.get(&t.node_id).map(|n| n.hostname.as_str()),
        task_id: &t.id,
        task_name,
        task_slot: &slot,
    };
    expand(template, &ctx)
        .inspect_err(|e| debug!(task = %t.id, template, error = %e, "no DNS name from --hostname"))
        .ok()
        .filter(|h| !h.is_empty())
}

fn put(net: &mut NetworkRecords, name: &str, entry: Entry) {
    // The first claim on a name wins (services before tasks before containers), so one
    // object cannot shadow another by picking its name.
    net.names.entry(normalize(name)).or_insert(entry);
}

fn endpoint(addr: Ipv4Addr, about: String) -> Entry {
    Entry {
        kind: Kind::Endpoint,
        addrs: vec![addr],
        shuffle: false,
        about,
    }
}

pub fn dns_zones(state: &ClusterState) -> Zones {
    let mut nets: BTreeMap<String, NetworkRecords> = state
        .networks
        .values()
        .map(|n| {
            (
                n.id.clone(),
                NetworkRecords {
                    id: n.id.clone(),
                    name: normalize(&n.name),
                    internal: n.internal,
                    ..Default::default()
                },
            )
        })
        .collect();
    let by_name: BTreeMap<String, String> = state
        .networks
        .values()
        .map(|n| (n.name.clone(), n.id.clone()))
        .collect();

    for svc in state.services.values() {
        // Live task addresses of this service, per network, sorted (stable answers).
        let mut tasks: BTreeMap<&str, Vec<Ipv4Addr>> = BTreeMap::new();
        for t in state
            .tasks
            .iter()
            .filter(|t| t.service_id == svc.id && live(state, t))
        {
            for (net, ip) in &t.addresses {
                tasks.entry(net.as_str()).or_default().push(*ip);
            }
        }
        tasks.values_mut().for_each(|v| v.sort());
        let aliases_on = |net_id: &str| -> Vec<String> {
            svc.aliases
                .iter()
                .filter(|(target, _)| {
                    target.as_str() == net_id || by_name.get(*target).is_some_and(|id| id == net_id)
                })
                .flat_map(|(_, a)| a.clone())
                .collect()
        };
        let mut attached: Vec<&str> = tasks.keys().copied().collect();
        attached.extend(svc.vips.keys().map(String::as_str));
        attached.sort();
        attached.dedup();
        for net_id in attached {
            let Some(net) = nets.get_mut(net_id) else {
                continue;
            };
            let live_addrs = tasks.get(net_id).cloned().unwrap_or_default();
            let main = match (svc.mode, svc.vips.get(net_id)) {
                (EndpointMode::Vip, Some(vip)) => {
                    net.ptr.insert(*vip, normalize(&svc.name));
                    Entry {
                        kind: Kind::ServiceVip,
                        addrs: vec![*vip],
                        shuffle: false,
                        about: format!("service {} (VIP)", svc.name),
                    }
                }
                _ => Entry {
                    kind: Kind::ServiceDnsrr,
                    addrs: live_addrs.clone(),
                    shuffle: true,
                    about: format!(
                        "service {} (dnsrr, {} live tasks)",
                        svc.name,
                        live_addrs.len()
                    ),
                },
            };
            for alias in aliases_on(net_id) {
                let mut e = main.clone();
                e.kind = if e.shuffle {
                    Kind::ServiceDnsrr
                } else {
                    Kind::Alias
                };
                e.about = format!("alias {alias} of {}", main.about);
                put(net, &alias, e);
            }
            put(net, &svc.name, main);
            put(
                net,
                &format!("tasks.{}", svc.name),
                Entry {
                    kind: Kind::Tasks,
                    addrs: live_addrs.clone(),
                    shuffle: true,
                    about: format!("live tasks of service {}", svc.name),
                },
            );
        }
        for t in state
            .tasks
            .iter()
            .filter(|t| t.service_id == svc.id && live(state, t))
        {
            let name = task_name(&svc.name, t);
            let hostname = t
                .hostname
                .as_deref()
                .and_then(|tpl| task_hostname(state, &svc.id, &svc.name, t, &name, tpl));
            for (net_id, ip) in &t.addresses {
                let Some(net) = nets.get_mut(net_id) else {
                    continue;
                };
                net.ptr
                    .insert(*ip, normalize(&format!("{name}.{}", net.name)));
                put(net, &name, endpoint(*ip, format!("task {name}")));
                if let Some(h) = &hostname {
                    put(net, h, endpoint(*ip, format!("task {name} (hostname)")));
                }
                if let Some(cid) = &t.container_id {
                    // The short container id is also the task's hostname.
                    put(
                        net,
                        short_id(cid),
                        endpoint(*ip, format!("task {name} (container id)")),
                    );
                }
            }
        }
    }

    // Local containers (plain `docker run` on attachable networks, and task containers
    // with their aliases).
    for sb in &state.sandboxes {
        for (net_id, ep) in &sb.endpoints {
            let (Some(net), Some(ip)) = (nets.get_mut(net_id), ep.addr) else {
                continue;
            };
            if !sb.name.is_empty() {
                net.ptr
                    .entry(ip)
                    .or_insert_with(|| normalize(&format!("{}.{}", sb.name, net.name)));
                put(
                    net,
                    &sb.name,
                    endpoint(ip, format!("container {}", sb.name)),
                );
            }
            for alias in &ep.aliases {
                put(
                    net,
                    alias,
                    endpoint(ip, format!("alias {alias} of container {}", sb.name)),
                );
            }
            // As Docker 25+ does for every container: its short id and its hostname.
            let short = short_id(&sb.container_id);
            for (n, what) in [(short, "id"), (sb.hostname.as_str(), "hostname")] {
                if !n.is_empty() {
                    put(
                        net,
                        n,
                        endpoint(ip, format!("container {} ({what})", sb.name)),
                    );
                }
            }
        }
    }
    Zones { networks: nets }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Network, Node, Sandbox, SandboxEndpoint, Service};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn task(id: &str, svc: &str, node: &str, slot: u64, net: &str, addr: &str) -> Task {
        Task {
            id: id.into(),
            service_id: svc.into(),
            node_id: node.into(),
            slot: Some(slot),
            state: "running".into(),
            desired_state: "running".into(),
            addresses: [(net.to_string(), ip(addr))].into(),
            container_id: Some(format!("{id}cccccccccccccccc")),
            hostname: None,
        }
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        for (id, name, internal) in [("n1", "Front", false), ("n2", "back", true)] {
            s.networks.insert(
                id.into(),
                Network {
                    id: id.into(),
                    name: name.into(),
                    internal,
                },
            );
        }
        s.nodes.insert(
            "node2".into(),
            Node {
                id: "node2".into(),
                hostname: "node2".into(),
                state: "down".into(),
            },
        );
        s.services.insert(
            "s1".into(),
            Service {
                id: "s1".into(),
                name: "Web".into(),
                mode: EndpointMode::Vip,
                vips: [("n1".to_string(), ip("10.0.1.2"))].into(),
                aliases: [("Front".to_string(), vec!["www".to_string()])].into(),
            },
        );
        s.services.insert(
            "s2".into(),
            Service {
                id: "s2".into(),
                name: "app".into(),
                mode: EndpointMode::Dnsrr,
                vips: BTreeMap::new(),
                aliases: BTreeMap::new(),
            },
        );
        s.tasks = vec![
            task("t1", "s1", "node1", 1, "n1", "10.0.1.3"),
            task("t2", "s1", "node2", 2, "n1", "10.0.1.4"),
            task("t3", "s2", "node1", 1, "n2", "10.0.2.5"),
            task("t4", "s2", "node1", 2, "n2", "10.0.2.6"),
        ];
        let mut stopped = task("t5", "s2", "node1", 3, "n2", "10.0.2.7");
        stopped.desired_state = "shutdown".into();
        s.tasks.push(stopped);
        s.sandboxes.push(Sandbox {
            container_id: "c1".into(),
            name: "client".into(),
            netns_cookie: 1,
            netns_path: String::new(),
            networks: vec!["n1".into()],
            endpoints: [(
                "n1".to_string(),
                SandboxEndpoint {
                    addr: Some(ip("10.0.1.9")),
                    aliases: vec!["cli".into()],
                },
            )]
            .into(),
            hostname: "laptop".into(),
        });
        s
    }

    #[test]
    fn services_tasks_aliases_and_containers_get_names_on_their_networks() {
        let z = dns_zones(&state());
        let front = &z.networks["n1"];
        assert_eq!(front.name, "front");
        assert_eq!(front.names["web"].addrs, [ip("10.0.1.2")]);
        assert_eq!(front.names["www"].addrs, [ip("10.0.1.2")]);
        // t2 is on a down node: not a task anyone should reach.
        assert_eq!(front.names["tasks.web"].addrs, [ip("10.0.1.3")]);
        assert_eq!(front.names["web.1.t1"].addrs, [ip("10.0.1.3")]);
        assert!(!front.names.contains_key("web.2.t2"));
        assert_eq!(front.names["t1cccccccccc"].addrs, [ip("10.0.1.3")]);
        assert_eq!(front.names["client"].addrs, [ip("10.0.1.9")]);
        assert_eq!(front.names["cli"].addrs, [ip("10.0.1.9")]);
        assert_eq!(front.names["laptop"].addrs, [ip("10.0.1.9")]);
        assert_eq!(front.names["c1"].addrs, [ip("10.0.1.9")], "short id");
        assert_eq!(front.ptr[&ip("10.0.1.2")], "web");
        assert_eq!(front.ptr[&ip("10.0.1.3")], "web.1.t1.front");
        let back = &z.networks["n2"];
        assert!(back.internal);
        let app = &back.names["app"];
        assert!(app.shuffle && app.kind == Kind::ServiceDnsrr);
        // t5 is draining (desired shutdown): not in dnsrr answers.
        assert_eq!(app.addrs, [ip("10.0.2.5"), ip("10.0.2.6")]);
        assert!(!back.names.contains_key("web"));
    }

    #[test]
    fn a_container_cannot_take_a_service_name() {
        let mut s = state();
        s.sandboxes[0].endpoints.get_mut("n1").unwrap().aliases = vec!["web".into()];
        let z = dns_zones(&s);
        assert_eq!(z.networks["n1"].names["web"].addrs, [ip("10.0.1.2")]);
    }

    #[test]
    fn a_service_hostname_template_names_each_task() {
        let mut s = state();
        s.nodes.insert(
            "node1".into(),
            Node {
                id: "node1".into(),
                hostname: "worker1".into(),
                state: "ready".into(),
            },
        );
        for t in s.tasks.iter_mut().filter(|t| t.service_id == "s2") {
            t.hostname = Some("{{.Service.Name}}-{{.Task.Slot}}.{{ .Node.Hostname }}".into());
        }
        s.tasks[0].hostname = Some("{{.Service.Labels}}".into());
        let z = dns_zones(&s);
        let back = &z.networks["n2"];
        assert_eq!(back.names["app-1.worker1"].addrs, [ip("10.0.2.5")]);
        assert_eq!(back.names["app-2.worker1"].addrs, [ip("10.0.2.6")]);
        assert!(!back.names.contains_key("app-3.worker1"), "draining task");
        // A template meshd cannot expand costs that task its hostname, nothing else.
        let front = &z.networks["n1"];
        assert_eq!(front.names["web.1.t1"].addrs, [ip("10.0.1.3")]);
        assert!(!front.names.keys().any(|n| n.contains("labels")));
    }
}
