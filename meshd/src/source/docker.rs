//! Reads ClusterState from the Docker Engine API: swarm objects from a manager, local
//! containers (and their network namespaces) from this node's engine. Each object is decoded
//! on its own; one that does not parse is rejected with its reason and the rest is used.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
};

use serde_json::Value;
use tracing::warn;

use super::{
    docker_api::{ApiError, DockerApi},
    managers::Managers,
    netns,
};
use crate::model::{
    ClusterState, EndpointMode, Network, Node, Rejected, Sandbox, SandboxEndpoint, Service, Task,
};

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn need<'a>(v: &'a Value, path: &[&str]) -> Result<&'a str, String> {
    str_at(v, path)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| format!("missing {}", path.join(".")))
}

/// "10.0.1.2/24" → 10.0.1.2.
fn cidr_addr(s: &str) -> Result<Ipv4Addr, String> {
    let ip = s.split('/').next().unwrap_or(s);
    ip.parse().map_err(|_| format!("bad IPv4 address {s:?}"))
}

pub fn parse_service(v: &Value) -> Result<Service, String> {
    let id = need(v, &["ID"])?.to_string();
    let name = need(v, &["Spec", "Name"])?.to_string();
    let mode = match str_at(v, &["Spec", "EndpointSpec", "Mode"]).unwrap_or("vip") {
        "vip" | "" => EndpointMode::Vip,
        "dnsrr" => EndpointMode::Dnsrr,
        other => return Err(format!("unknown endpoint mode {other:?}")),
    };
    let mut vips = BTreeMap::new();
    if let Some(list) = v.pointer("/Endpoint/VirtualIPs").and_then(Value::as_array) {
        for entry in list {
            let net = need(entry, &["NetworkID"])?;
            // IPv6-only VIPs are left to a later version; an empty Addr is "none yet".
            match str_at(entry, &["Addr"]) {
                None | Some("") => continue,
                Some(a) if a.contains(':') => continue,
                Some(a) => {
                    vips.insert(net.to_string(), cidr_addr(a)?);
                }
            }
        }
    }
    let mut aliases = BTreeMap::new();
    for att in v
        .pointer("/Spec/TaskTemplate/Networks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let target = need(att, &["Target"])?;
        let names: Vec<String> = att
            .get("Aliases")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|a| a.as_str().map(str::to_string).ok_or("non-string alias"))
            .collect::<Result<_, _>>()?;
        if !names.is_empty() {
            aliases.insert(target.to_string(), names);
        }
    }
    Ok(Service {
        id,
        name,
        mode,
        vips,
        aliases,
    })
}

pub fn parse_task(v: &Value) -> Result<Task, String> {
    let id = need(v, &["ID"])?.to_string();
    let mut addresses = BTreeMap::new();
    if let Some(list) = v.get("NetworksAttachments").and_then(Value::as_array) {
        for att in list {
            let net = need(att, &["Network", "ID"])?;
            for a in att
                .get("Addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let a = a.as_str().ok_or("non-string address")?;
                if !a.contains(':') {
                    addresses.insert(net.to_string(), cidr_addr(a)?);
                }
            }
        }
    }
    Ok(Task {
        id,
        service_id: need(v, &["ServiceID"])?.to_string(),
        // A task not yet scheduled has no node; it is not a backend either way.
        node_id: str_at(v, &["NodeID"]).unwrap_or_default().to_string(),
        slot: v.get("Slot").and_then(Value::as_u64),
        state: need(v, &["Status", "State"])?.to_string(),
        desired_state: need(v, &["DesiredState"])?.to_string(),
        addresses,
        container_id: str_at(v, &["Status", "ContainerStatus", "ContainerID"])
            .filter(|c| !c.is_empty())
            .map(str::to_string),
        hostname: str_at(v, &["Spec", "ContainerSpec", "Hostname"])
            .filter(|h| !h.is_empty())
            .map(str::to_string),
    })
}

pub fn parse_network(v: &Value) -> Result<Network, String> {
    Ok(Network {
        id: need(v, &["Id"])?.to_string(),
        name: need(v, &["Name"])?.to_string(),
        internal: v.get("Internal").and_then(Value::as_bool).unwrap_or(false),
    })
}

pub fn parse_node(v: &Value) -> Result<Node, String> {
    Ok(Node {
        id: need(v, &["ID"])?.to_string(),
        hostname: str_at(v, &["Description", "Hostname"])
            .unwrap_or_default()
            .to_string(),
        state: need(v, &["Status", "State"])?.to_string(),
    })
}

/// A local container from `/containers/json`.
#[derive(Debug)]
pub struct LocalContainer {
    pub id: String,
    pub name: String,
    /// Network ids, sorted.
    pub networks: Vec<String>,
    pub endpoints: BTreeMap<String, SandboxEndpoint>,
}

/// An endpoint's network aliases (absent or null: none), with the `DNSNames` Docker 25+
/// reports (name, aliases, short id, hostname), once each.
fn aliases_of(endpoint: &Value) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for key in ["Aliases", "DNSNames"] {
        for a in endpoint
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !out.iter().any(|o| o == a) {
                out.push(a.to_string());
            }
        }
    }
    out
}

pub fn parse_container(v: &Value) -> Result<LocalContainer, String> {
    let id = need(v, &["Id"])?.to_string();
    let name = v
        .get("Names")
        .and_then(Value::as_array)
        .and_then(|n| n.first())
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim_start_matches('/')
        .to_string();
    let mut networks = Vec::new();
    let mut endpoints = BTreeMap::new();
    if let Some(map) = v
        .pointer("/NetworkSettings/Networks")
        .and_then(Value::as_object)
    {
        for (net_name, ep) in map {
            let nid = str_at(ep, &["NetworkID"])
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("network {net_name} has no NetworkID"))?;
            networks.push(nid.to_string());
            let addr = match str_at(ep, &["IPAddress"]).filter(|a| !a.is_empty()) {
                Some(a) => Some(cidr_addr(a)?),
                None => None,
            };
            let aliases = aliases_of(ep);
            endpoints.insert(nid.to_string(), SandboxEndpoint { addr, aliases });
        }
    }
    networks.sort();
    Ok(LocalContainer {
        id,
        name,
        networks,
        endpoints,
    })
}

fn decode_list<T>(
    answer: Value,
    kind: &str,
    id_key: &str,
    parse: fn(&Value) -> Result<T, String>,
    rejected: &mut Vec<Rejected>,
) -> Result<Vec<T>, ApiError> {
    let Value::Array(items) = answer else {
        return Err(ApiError::Status {
            path: format!("list of {kind}s"),
            status: hyper::StatusCode::OK,
            body: "answer is not a JSON array".into(),
        });
    };
    let mut out = Vec::with_capacity(items.len());
    for item in &items {
        match parse(item) {
            Ok(t) => out.push(t),
            Err(reason) => {
                let id = str_at(item, &[id_key]).unwrap_or("?").to_string();
                warn!(kind, id, reason, "rejected a Docker object");
                rejected.push(Rejected {
                    kind: kind.into(),
                    id,
                    reason,
                });
            }
        }
    }
    Ok(out)
}

/// Reads the swarm (from a manager) and the local containers (from this node's engine).
pub struct DockerSource {
    pub managers: Managers,
    pub local: DockerApi,
    /// Per container id: its namespace (whose cookie never changes) and aliases.
    inspected: HashMap<String, Inspected>,
}

impl DockerSource {
    pub fn new(managers: Managers, local: DockerApi) -> Self {
        Self {
            managers,
            local,
            inspected: HashMap::new(),
        }
    }

    /// This node's swarm id, from the local engine.
    pub async fn node_id(&self) -> Result<String, ApiError> {
        let info = self.local.get_json("/info").await?;
        Ok(str_at(&info, &["Swarm", "NodeID"])
            .unwrap_or_default()
            .to_string())
    }

    /// One full read. A failure moves reads to the next manager (see `Managers`).
    pub async fn fetch(&mut self) -> Result<ClusterState, ApiError> {
        let (which, manager) = self.managers.pick();
        let manager = manager.clone();
        let read = self.fetch_from(&manager).await;
        if read.is_err() {
            self.managers.failed(which);
        }
        read
    }

    async fn fetch_from(&mut self, manager: &DockerApi) -> Result<ClusterState, ApiError> {
        let mut state = ClusterState::default();
        let rejected = &mut state.rejected;
        let tasks_query = "/tasks?filters=%7B%22desired-state%22%3A%5B%22running%22%5D%7D";
        let (services, tasks, networks, nodes) = tokio::try_join!(
            manager.get_json("/services"),
            manager.get_json(tasks_query),
            manager.get_json("/networks"),
            manager.get_json("/nodes"),
        )?;
        for s in decode_list(services, "service", "ID", parse_service, rejected)? {
            state.services.insert(s.id.clone(), s);
        }
        state.tasks = decode_list(tasks, "task", "ID", parse_task, rejected)?;
        for n in decode_list(networks, "network", "Id", parse_network, rejected)? {
            state.networks.insert(n.id.clone(), n);
        }
        for n in decode_list(nodes, "node", "ID", parse_node, rejected)? {
            state.nodes.insert(n.id.clone(), n);
        }
        if self.local.endpoint() != manager.endpoint() {
            // Local networks (bridge, host) are only known to the local engine.
            let local_nets = self.local.get_json("/networks").await?;
            for n in decode_list(local_nets, "network", "Id", parse_network, rejected)? {
                state.networks.entry(n.id.clone()).or_insert(n);
            }
        }
        state.sandboxes = self.sandboxes(&mut state.rejected).await?;
        Ok(state)
    }

    async fn sandboxes(&mut self, rejected: &mut Vec<Rejected>) -> Result<Vec<Sandbox>, ApiError> {
        let list = self.local.get_json("/containers/json").await?;
        let containers = decode_list(list, "container", "Id", parse_container, rejected)?;
        self.inspected
            .retain(|id, _| containers.iter().any(|c| &c.id == id));
        let mut out = Vec::new();
        for LocalContainer {
            id,
            name,
            networks,
            mut endpoints,
        } in containers
        {
            // Inspect once per container, and again when its networks change (a network
            // connect may bring aliases, which only the inspect answer carries). A failure
            // other than host mode is tried again: the container may have been starting.
            let fresh = self.inspected.get(&id).is_some_and(|i| {
                i.networks == networks
                    && i.namespace
                        .as_ref()
                        .map_or_else(|e| e == HOST_MODE, |_| true)
            });
            if !fresh {
                let i = self.inspect(&id, networks.clone()).await;
                if let Err(reason) = &i.namespace {
                    warn!(container = %id, reason, "no network namespace for container");
                }
                self.inspected.insert(id.clone(), i);
            }
            let i = &self.inspected[&id];
            match &i.namespace {
                Ok((netns_cookie, netns_path)) => {
                    for (net, aliases) in &i.aliases {
                        if let Some(ep) = endpoints.get_mut(net) {
                            for a in aliases {
                                if !ep.aliases.contains(a) {
                                    ep.aliases.push(a.clone());
                                }
                            }
                        }
                    }
                    out.push(Sandbox {
                        container_id: id,
                        name,
                        netns_cookie: *netns_cookie,
                        netns_path: netns_path.clone(),
                        networks,
                        endpoints,
                        hostname: i.hostname.clone(),
                    });
                }
                Err(reason) => rejected.push(Rejected {
                    kind: "container".into(),
                    id: id.clone(),
                    reason: reason.clone(),
                }),
            }
        }
        Ok(out)
    }

    async fn inspect(&self, id: &str, networks: Vec<String>) -> Inspected {
        let info = match self.local.get_json(&format!("/containers/{id}/json")).await {
            Ok(i) => i,
            Err(e) => {
                return Inspected {
                    namespace: Err(e.to_string()),
                    networks,
                    aliases: BTreeMap::new(),
                    hostname: String::new(),
                }
            }
        };
        let mut aliases = BTreeMap::new();
        if let Some(map) = info
            .pointer("/NetworkSettings/Networks")
            .and_then(Value::as_object)
        {
            for ep in map.values() {
                let Some(nid) = str_at(ep, &["NetworkID"]) else {
                    continue;
                };
                aliases.insert(nid.to_string(), aliases_of(ep));
            }
        }
        Inspected {
            namespace: namespace_of(&info).await,
            networks,
            aliases,
            hostname: str_at(&info, &["Config", "Hostname"])
                .unwrap_or_default()
                .to_string(),
        }
    }
}

const HOST_MODE: &str = "host network mode";

/// A container's namespace (cookie, path) from its inspect answer.
async fn namespace_of(info: &Value) -> Result<(u64, String), String> {
    // Host-network containers share the host namespace: nothing to scope there.
    if str_at(info, &["HostConfig", "NetworkMode"]) == Some("host") {
        return Err(HOST_MODE.into());
    }
    let key = need(info, &["NetworkSettings", "SandboxKey"])?;
    let path = PathBuf::from(key);
    let cookie = tokio::task::spawn_blocking(move || netns::cookie_of(&path))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("{e:#}"))?;
    Ok((cookie, key.to_string()))
}

/// What meshd keeps from a container's inspect answer.
struct Inspected {
    /// (netns cookie, SandboxKey), or why there is none (host mode, gone).
    namespace: Result<(u64, String), String>,
    /// The networks it was inspected with: a change means inspect again.
    networks: Vec<String>,
    /// Network aliases per network id (`/containers/json` leaves them out).
    aliases: BTreeMap<String, Vec<String>>,
    hostname: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_task_reads_its_addresses_from_networks_attachments() {
        let t = parse_task(&json!({
            "ID": "t1", "ServiceID": "s1", "NodeID": "n1", "Slot": 2,
            "Status": {"State": "running"}, "DesiredState": "running",
            "NetworksAttachments": [
                {"Network": {"ID": "net1"}, "Addresses": ["10.0.1.5/24"]},
                {"Network": {"ID": "net2"}, "Addresses": ["fd00::5/64", "10.0.2.9/24"]}
            ]
        }))
        .unwrap();
        assert_eq!(t.addresses["net1"], "10.0.1.5".parse::<Ipv4Addr>().unwrap());
        assert_eq!(t.addresses["net2"], "10.0.2.9".parse::<Ipv4Addr>().unwrap());
        assert_eq!(t.slot, Some(2));
        assert!(t.is_live());
    }

    #[test]
    fn a_bad_object_is_rejected_alone() {
        let list = json!([
            {"ID": "s1", "Spec": {"Name": "web"},
             "Endpoint": {"VirtualIPs": [{"NetworkID": "n1", "Addr": "10.0.1.2/24"}]}},
            {"ID": "s2", "Spec": {"Name": "bad"},
             "Endpoint": {"VirtualIPs": [{"NetworkID": "n1", "Addr": "10.0.1.300/24"}]}},
            {"ID": "s3", "Spec": {"Name": "odd", "EndpointSpec": {"Mode": "magic"}}},
            {"Spec": {"Name": "no-id"}}
        ]);
        let mut rejected = Vec::new();
        let ok = decode_list(list, "service", "ID", parse_service, &mut rejected).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].name, "web");
        let ids: Vec<_> = rejected.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["s2", "s3", "?"]);
        assert!(rejected[0].reason.contains("10.0.1.300"));
    }

    #[test]
    fn dnsrr_services_and_missing_vips_parse() {
        let s = parse_service(&json!({
            "ID": "s1", "Spec": {"Name": "app", "EndpointSpec": {"Mode": "dnsrr"}}
        }))
        .unwrap();
        assert_eq!(s.mode, EndpointMode::Dnsrr);
        assert!(s.vips.is_empty());
    }

    #[test]
    fn a_container_lists_its_network_ids() {
        let c = parse_container(&json!({
            "Id": "c1", "Names": ["/client"],
            "NetworkSettings": {"Networks": {
                "front": {"NetworkID": "net1", "IPAddress": "10.0.1.7", "Aliases": ["cli", "c1short"]},
                "back": {"NetworkID": "net0"}}}
        }))
        .unwrap();
        assert_eq!((c.id.as_str(), c.name.as_str()), ("c1", "client"));
        assert_eq!(c.networks, ["net0", "net1"]);
        assert_eq!(c.endpoints["net1"].addr, Some(Ipv4Addr::new(10, 0, 1, 7)));
        assert_eq!(c.endpoints["net1"].aliases, ["cli", "c1short"]);
        assert_eq!(c.endpoints["net0"].addr, None);
    }
}
