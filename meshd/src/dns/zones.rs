//! The names meshd's DNS answers on one network, from ClusterState. Pure, and built from the
//! same liveness rule as the datapath (`ClusterState::serves`), so DNS never names a task
//! the datapath already dropped. Compile rebuilds only the networks a change touched.
use std::net::Ipv4Addr;

use meshd_dns::{
    records::{normalize, About, Name, Ptr, What},
    task_names::TaskNamesBuilder,
    Entry, Kind, NetworkRecords, Slot, TaskNames,
};

use tracing::debug;

use super::hostname_template::{expand, TaskContext};
use crate::model::{ClusterState, EndpointMode, SandboxEndpoint, Service, Task};

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
        _ => t.node_id.to_string(),
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
    svc: &Service,
    t: &Task,
    task_name: &str,
    template: &str,
) -> Option<String> {
    let slot = slot_or_node(t);
    let ctx = TaskContext {
        service_id: &svc.id,
        service_name: &svc.name,
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

/// `name` as a lookup key, the same allocation when it already is one (most names are).
fn key(name: &Name) -> Name {
    if name.ends_with('.') || name.bytes().any(|b| b.is_ascii_uppercase()) {
        normalize(name).into()
    } else {
        name.clone()
    }
}

fn put(net: &mut NetworkRecords, name: Name, entry: Entry) {
    // The first claim on a name wins (services, then tasks' own names, then hostnames and
    // containers), so one object cannot shadow another by picking its name.
    let k = key(&name);
    if !net.tasks.claims(&k) {
        net.names.entry(k).or_insert(entry);
    }
}

fn endpoint(addr: Ipv4Addr, what: What, of: &Name) -> Entry {
    Entry {
        kind: Kind::Endpoint,
        addrs: vec![addr].into(),
        shuffle: false,
        about: About::new(what, of),
    }
}

/// A task's or container's reverse name: `<name>.<network>`.
fn qualified(name: &Name) -> Ptr {
    Ptr {
        name: key(name),
        qualified: true,
    }
}

/// A service's aliases on this network: the spec names the network by id or by name.
fn aliases_on<'a>(
    svc: &'a Service,
    net_id: &'a str,
    net_name: &'a str,
) -> impl Iterator<Item = &'a String> + 'a {
    svc.aliases
        .iter()
        .filter(move |(target, _)| target.as_str() == net_id || target.as_str() == net_name)
        .flat_map(|(_, a)| a.iter())
}

/// The names of a container (local or reported by its node) on one network.
fn container_names(
    net: &mut NetworkRecords,
    id: &str,
    name: &str,
    hostname: &str,
    ep: &SandboxEndpoint,
) {
    let Some(ip) = ep.addr else {
        return;
    };
    let of: Name = name.into();
    if !name.is_empty() && !net.tasks.has_addr(ip) {
        net.ptr.entry(ip).or_insert_with(|| qualified(&of));
        put(net, of.clone(), endpoint(ip, What::Container, &of));
    }
    for alias in &ep.aliases {
        put(
            net,
            alias.as_str().into(),
            endpoint(ip, What::ContainerAlias, &of),
        );
    }
    // As Docker 25+ does for every container: its short id and its hostname.
    for (n, what) in [
        (short_id(id), What::ContainerId),
        (hostname, What::ContainerHostname),
    ] {
        if !n.is_empty() {
            put(net, n.into(), endpoint(ip, what, &of));
        }
    }
}

/// Adds a task to the compact table; false when its ids do not fit there.
fn push_task(table: &mut TaskNamesBuilder, service: u32, t: &Task, ip: Ipv4Addr) -> bool {
    let slot = match t.slot {
        Some(n) if n > 0 => Slot::Number(n),
        _ => match table.node(&t.node_id) {
            Some(i) => Slot::Node(i),
            None => return false,
        },
    };
    table.push(service, slot, &t.id, t.container_id.as_deref(), ip)
}

/// The names of network `network_id`, or None when the network is not known or no local
/// container is on it (no one here could ask).
pub fn network_records(state: &ClusterState, network_id: &str) -> Option<NetworkRecords> {
    if !state.is_local(network_id) {
        return None;
    }
    let network = state.networks.get(network_id)?;
    let mut net = NetworkRecords {
        id: network.id.to_string(),
        name: normalize(&network.name),
        internal: network.internal,
        ..Default::default()
    };
    let services: Vec<&Service> = state.services_on(network_id).collect();

    // Services first: their name, aliases and tasks.<name>.
    // Each service's live tasks on this network, found once for both passes below.
    let live_tasks: Vec<Vec<(&Task, Ipv4Addr)>> = services
        .iter()
        .map(|svc| {
            state
                .tasks_of(&svc.id)
                .filter(|t| state.serves(t))
                .filter_map(|t| Some((t, *t.addresses.get(network_id)?)))
                .collect()
        })
        .collect();
    for (svc, tasks) in services.iter().zip(&live_tasks) {
        let mut live: Vec<Ipv4Addr> = tasks.iter().map(|&(_, ip)| ip).collect();
        state.reachable_of(network_id, &mut live);
        live.sort();
        let of: Name = svc.name.clone();
        let main = match (svc.mode, svc.vips.get(network_id)) {
            (EndpointMode::Vip, Some(vip)) => {
                net.ptr.insert(
                    *vip,
                    Ptr {
                        name: key(&of),
                        qualified: false,
                    },
                );
                Entry {
                    kind: Kind::ServiceVip,
                    addrs: vec![*vip].into(),
                    shuffle: false,
                    about: About::new(What::Service, &of),
                }
            }
            _ => Entry {
                kind: Kind::ServiceDnsrr,
                addrs: live.clone().into(),
                shuffle: true,
                about: About::new(What::Service, &of),
            },
        };
        for alias in aliases_on(svc, network_id, &network.name) {
            let mut e = main.clone();
            e.kind = if e.shuffle {
                Kind::ServiceDnsrr
            } else {
                Kind::Alias
            };
            e.about.what = What::ServiceAlias;
            put(&mut net, alias.as_str().into(), e);
        }
        put(&mut net, of.clone(), main);
        put(
            &mut net,
            format!("tasks.{}", svc.name).into(),
            Entry {
                kind: Kind::Tasks,
                addrs: live.into(),
                shuffle: true,
                about: About::new(What::Tasks, &of),
            },
        );
    }

    // Then each live task: its name and short container id (compact, in `tasks`), then
    // the hostnames its service's template gives it.
    let mut table = TaskNames::builder();
    for (svc, tasks) in services.iter().zip(&live_tasks) {
        let service = table.service(&svc.name);
        for &(t, ip) in tasks {
            if !push_task(&mut table, service, t, ip) {
                let name: Name = task_name(&svc.name, t).into();
                net.ptr.insert(ip, qualified(&name));
                put(&mut net, name.clone(), endpoint(ip, What::Task, &name));
                if let Some(cid) = &t.container_id {
                    // The short container id is also the task's default hostname.
                    put(
                        &mut net,
                        short_id(cid).into(),
                        endpoint(ip, What::TaskContainerId, &name),
                    );
                }
            }
        }
    }
    net.tasks = table.build();
    for (svc, tasks) in services.iter().zip(&live_tasks) {
        for &(t, ip) in tasks {
            let Some(template) = t.hostname.as_deref() else {
                continue;
            };
            let name = task_name(&svc.name, t);
            if let Some(h) = task_hostname(state, svc, t, &name, template) {
                let name: Name = name.into();
                put(&mut net, h.into(), endpoint(ip, What::TaskHostname, &name));
            }
        }
    }

    // Then containers: this node's (plain `docker run` on attachable networks, and task
    // containers with their aliases), then those other nodes report.
    for sb in state.sandboxes_on(network_id) {
        if let Some(ep) = sb.endpoints.get(network_id) {
            container_names(&mut net, &sb.container_id, &sb.name, &sb.hostname, ep);
        }
    }
    for c in state.remote_containers_on(network_id) {
        if let Some(ep) = c.endpoints.get(network_id) {
            container_names(&mut net, &c.container_id, &c.name, &c.hostname, ep);
        }
    }
    // Put in service order, not name order: a third of their nodes empty otherwise.
    crate::model::repack(&mut net.names);
    crate::model::repack(&mut net.ptr);
    Some(net)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        compile::compile,
        model::{
            state_tests::*, Change, EndpointMode, NodeReport, NodeState, RemoteContainer, TaskState,
        },
    };

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        let mut front = net("n1");
        front.name = "Front".into();
        let mut back = net("n2");
        back.name = "back".into();
        back.internal = true;
        s.apply(Change::PutNetwork(front));
        s.apply(Change::PutNetwork(back));
        s.apply(Change::PutNode(node("node2", NodeState::Down)));
        let mut web = svc("s1", &[("n1", [10, 0, 1, 2])]);
        web.name = "Web".into();
        web.aliases = [("Front".to_string(), vec!["www".to_string()])].into();
        s.apply(Change::PutService(web));
        let mut app = svc("s2", &[]);
        app.name = "app".into();
        app.mode = EndpointMode::Dnsrr;
        s.apply(Change::PutService(app));
        let t = |id: &str, svc: &str, node: &str, slot: u32, net: &str, addr: [u8; 4]| {
            let mut t = task(id, svc, node, net, addr);
            t.slot = Some(slot);
            t.container_id = crate::model::ShortId::new(&format!("{id}cccccccccccccccc"));
            t
        };
        for x in [
            t("t1", "s1", "node1", 1, "n1", [10, 0, 1, 3]),
            t("t2", "s1", "node2", 2, "n1", [10, 0, 1, 4]),
            t("t3", "s2", "node1", 1, "n2", [10, 0, 2, 5]),
            t("t4", "s2", "node1", 2, "n2", [10, 0, 2, 6]),
        ] {
            s.apply(Change::PutTask(x));
        }
        let mut stopped = t("t5", "s2", "node1", 3, "n2", [10, 0, 2, 7]);
        stopped.desired = TaskState::Shutdown;
        s.apply(Change::PutTask(stopped));
        let mut c = sandbox("c1", 1, &["n1"]);
        c.name = "client".into();
        c.hostname = "laptop".into();
        c.endpoints = [(
            "n1".to_string(),
            SandboxEndpoint {
                addr: Some(ip("10.0.1.9")),
                aliases: vec!["cli".into()],
            },
        )]
        .into();
        s.apply(Change::PutSandbox(c));
        // Names are compiled only for networks a local container is on.
        s.apply(Change::PutSandbox(sandbox("c9", 9, &["n2"])));
        s
    }

    #[test]
    fn services_tasks_aliases_and_containers_get_names_on_their_networks() {
        let z = compile(&state()).zones;
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
        assert_eq!(front.ptr[&ip("10.0.1.2")], Ptr::from("web"));
        assert_eq!(
            front.ptr[&ip("10.0.1.3")],
            Ptr {
                name: "web.1.t1".into(),
                qualified: true
            }
        );
        let back = &z.networks["n2"];
        assert!(back.internal);
        let app = &back.names["app"];
        assert!(app.shuffle && app.kind == Kind::ServiceDnsrr);
        // t5 is draining (desired shutdown): not in dnsrr answers.
        assert_eq!(app.addrs, [ip("10.0.2.5"), ip("10.0.2.6")]);
        assert!(!back.names.contains_key("web"));
    }

    /// Swarm-shaped ids go to the compact task table: the same answers as materialized
    /// names, and the same precedence over containers.
    #[test]
    fn swarm_shaped_tasks_answer_from_the_compact_table() {
        let mut s = state();
        let id = |n: u8| format!("{}{n}", "a".repeat(24));
        let mut g = svc("s3", &[("n1", [10, 0, 1, 20])]);
        g.name = "Agent".into();
        s.apply(Change::PutService(g));
        s.apply(Change::PutNode(node(
            "nodeaaaaaaaaaaaaaaaaaaaaa1",
            NodeState::Ready,
        )));
        let mut a = task(
            &id(1),
            "s3",
            "nodeaaaaaaaaaaaaaaaaaaaaa1",
            "n1",
            [10, 0, 1, 21],
        );
        a.slot = None;
        a.container_id = crate::model::ShortId::new("0123456789abcdef");
        let mut b = task(&id(2), "s1", "node1", "n1", [10, 0, 1, 22]);
        b.slot = Some(7);
        b.container_id = crate::model::ShortId::new("fedcba9876543210");
        b.hostname = Some("{{.Task.Name}}-host".into());
        s.apply(Change::PutTask(a));
        s.apply(Change::PutTask(b));
        // b's own container runs here, under the task's name and short id.
        let mut c = sandbox("fedcba9876543210aaaa", 3, &["n1"]);
        c.name = format!("web.7.{}", id(2));
        c.endpoints = [(
            "n1".to_string(),
            SandboxEndpoint {
                addr: Some(ip("10.0.1.22")),
                aliases: vec!["0123456789ab".into()],
            },
        )]
        .into();
        s.apply(Change::PutSandbox(c));
        let z = compile(&s).zones;
        let front = &z.networks["n1"];
        assert_eq!(front.tasks.len(), 2, "both in the table");
        assert!(
            front
                .names
                .keys()
                .all(|k| !k.ends_with(&id(1)) && !k.ends_with(&id(2))),
            "no task name materialized, nor the local container's copy of one"
        );
        let nets = ["n1".to_string()];
        let global = format!("agent.nodeaaaaaaaaaaaaaaaaaaaaa1.{}", id(1));
        for (name, addr, about) in [
            (
                global.clone(),
                "10.0.1.21",
                format!("task Agent.nodeaaaaaaaaaaaaaaaaaaaaa1.{}", id(1)),
            ),
            (
                "0123456789AB.".to_string(),
                "10.0.1.21",
                format!(
                    "task Agent.nodeaaaaaaaaaaaaaaaaaaaaa1.{} (container id)",
                    id(1)
                ),
            ),
            (
                format!("Web.7.{}.front", id(2)),
                "10.0.1.22",
                format!("task Web.7.{}", id(2)),
            ),
            (
                "fedcba987654".to_string(),
                "10.0.1.22",
                format!("task Web.7.{} (container id)", id(2)),
            ),
            (
                format!("web.7.{}-host", id(2)),
                "10.0.1.22",
                format!("task Web.7.{} (hostname)", id(2)),
            ),
        ] {
            let f = z.lookup(&name, &nets).unwrap_or_else(|| panic!("{name}"));
            assert_eq!(f.entry.addrs, [ip(addr)], "{name}");
            assert_eq!(f.entry.about(&f.name), about, "{name}");
        }
        assert_eq!(
            z.reverse(ip("10.0.1.22"), &nets),
            Some(("front", format!("web.7.{}.front", id(2))))
        );
        assert_eq!(
            z.reverse(ip("10.0.1.9"), &nets),
            Some(("front", "client.front".to_string())),
            "containers keep their reverse names"
        );
        assert!(z.lookup(&format!("web.8.{}", id(2)), &nets).is_none());
    }

    #[test]
    fn a_container_cannot_take_a_service_name() {
        let mut s = state();
        let mut c = s.sandboxes["c1"].clone();
        c.endpoints.get_mut("n1").unwrap().aliases = vec!["web".into()];
        s.apply(Change::PutSandbox(c));
        let z = compile(&s).zones;
        assert_eq!(z.networks["n1"].names["web"].addrs, [ip("10.0.1.2")]);
    }

    #[test]
    fn containers_other_nodes_report_resolve_by_name() {
        let mut s = state();
        s.apply(Change::PutReport(NodeReport {
            node_id: "node3".into(),
            containers: vec![RemoteContainer {
                container_id: "abcdef0123456789".into(),
                name: "probe".into(),
                hostname: "probe-host".into(),
                endpoints: [(
                    "n1".to_string(),
                    SandboxEndpoint {
                        addr: Some(ip("10.0.1.77")),
                        aliases: vec!["p".into()],
                    },
                )]
                .into(),
            }],
            held_tasks: vec![],
        }));
        let z = compile(&s).zones;
        let front = &z.networks["n1"];
        for name in ["probe", "p", "probe-host", "abcdef012345"] {
            assert_eq!(front.names[name].addrs, [ip("10.0.1.77")], "{name}");
        }
        assert!(
            !z.networks["n2"].names.contains_key("probe"),
            "not on that network"
        );
    }

    #[test]
    fn a_service_hostname_template_names_each_task() {
        let mut s = state();
        let mut n1 = node("node1", NodeState::Ready);
        n1.hostname = "worker1".into();
        s.apply(Change::PutNode(n1));
        let tasks: Vec<Task> = s.tasks.values().cloned().collect();
        for mut t in tasks {
            let id = t.id.clone();
            if &*t.service_id == "s2" {
                t.hostname = Some("{{.Service.Name}}-{{.Task.Slot}}.{{ .Node.Hostname }}".into());
            }
            if &*id == "t1" {
                t.hostname = Some("{{.Service.Labels}}".into());
            }
            s.apply(Change::PutTask(t));
        }
        let z = compile(&s).zones;
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
