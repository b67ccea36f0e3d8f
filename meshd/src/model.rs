//! `ClusterState`: what the Docker API says, as plain data. No I/O here.
use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// By service id.
    pub services: BTreeMap<String, Service>,
    pub tasks: Vec<Task>,
    /// By network id.
    pub networks: BTreeMap<String, Network>,
    /// By node id.
    pub nodes: BTreeMap<String, Node>,
    /// Containers running on this node, with the network namespace the datapath keys on.
    pub sandboxes: Vec<Sandbox>,
    /// Objects the source could not read; each is left out, the rest is used.
    pub rejected: Vec<Rejected>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    Vip,
    Dnsrr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub mode: EndpointMode,
    /// The service's VIP on each network it is attached to, by network id.
    pub vips: BTreeMap<String, Ipv4Addr>,
    /// Service aliases on each network (`--network name=n,alias=a`), by network id or name
    /// as the spec gave it.
    #[serde(default)]
    pub aliases: BTreeMap<String, Vec<String>>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    pub node_id: String,
    pub slot: Option<u64>,
    /// Observed state (`Status.State`): new, pending, ..., running, shutdown, ...
    pub state: String,
    pub desired_state: String,
    /// The task's address on each of its networks, by network id.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// Its container, once the node started one.
    #[serde(default)]
    pub container_id: Option<String>,
    /// The service's `--hostname`, a template swarm expands per task (`hostname_template`).
    /// None: Docker's default, the short container id.
    #[serde(default)]
    pub hostname: Option<String>,
}

impl Task {
    /// A task gets new connections only while it runs and is meant to keep running: a task
    /// whose desired state turned to shutdown is drained at once.
    pub fn is_live(&self) -> bool {
        self.state == "running" && self.desired_state == "running"
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub id: String,
    pub name: String,
    /// No way out of the network: names that are not ours are not forwarded.
    #[serde(default)]
    pub internal: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub hostname: String,
    /// `Status.State`: ready, down, unknown, disconnected.
    pub state: String,
}

impl Node {
    /// Tasks on a node swarm reports down get no new connections, even before swarm
    /// reschedules them.
    pub fn is_down(&self) -> bool {
        matches!(self.state.as_str(), "down" | "disconnected")
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub container_id: String,
    pub name: String,
    pub netns_cookie: u64,
    /// The namespace's bind mount (Docker's `SandboxKey`): where meshd opens its DNS sockets.
    #[serde(default)]
    pub netns_path: String,
    /// Network ids the container is attached to.
    pub networks: Vec<String>,
    /// Its address and aliases on each network, by network id.
    #[serde(default)]
    pub endpoints: BTreeMap<String, SandboxEndpoint>,
    /// Its hostname (`Config.Hostname`), a name on every network it is on, as in Docker 25+.
    #[serde(default)]
    pub hostname: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SandboxEndpoint {
    pub addr: Option<Ipv4Addr>,
    pub aliases: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    /// "service", "task", "network", "node", "container".
    pub kind: String,
    pub id: String,
    pub reason: String,
}
