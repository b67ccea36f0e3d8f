//! The objects of `ClusterState`: what the Docker API says, as plain typed data. No I/O here.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{NetMap, TaskId};

/// A swarm object id (service, task, node, network). Shared, not copied: a task's service,
/// node and networks are the same allocation as the service's, node's and network's own id,
/// so 100 000 tasks do not carry 100 000 copies of each.
pub type Id = Arc<str>;

/// Declares a state enum read from Docker's lower-case strings. A value meshd does not know
/// is kept as `Unknown` (never live), not an error: a newer Docker must not take a task down.
macro_rules! docker_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub enum $name {
            $($variant,)+
            #[default]
            Unknown,
        }

        impl $name {
            pub fn parse(s: &str) -> Self {
                match s {
                    $($text => Self::$variant,)+
                    _ => Self::Unknown,
                }
            }

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Unknown => "unknown",
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<str>::deserialize(d)?;
                Ok(Self::parse(&s))
            }
        }
    };
}

docker_enum!(
    /// A task's observed state (`Status.State`), swarmkit's state machine.
    TaskState {
        New = "new",
        Pending = "pending",
        Assigned = "assigned",
        Accepted = "accepted",
        Preparing = "preparing",
        Ready = "ready",
        Starting = "starting",
        Running = "running",
        Complete = "complete",
        Shutdown = "shutdown",
        Failed = "failed",
        Rejected = "rejected",
        Remove = "remove",
        Orphaned = "orphaned",
    }
);

docker_enum!(
    /// `Status.State` of a node.
    NodeState {
        Down = "down",
        Ready = "ready",
        Disconnected = "disconnected",
    }
);

docker_enum!(
    /// `Spec.Role` of a node.
    Role {
        Worker = "worker",
        Manager = "manager",
    }
);

docker_enum!(
    /// A local container's health (`State.Health.Status`); `None` when it has no check.
    Health {
        None = "none",
        Starting = "starting",
        Healthy = "healthy",
        Unhealthy = "unhealthy",
    }
);

docker_enum!(
    /// A published port's protocol.
    Protocol {
        Tcp = "tcp",
        Udp = "udp",
        Sctp = "sctp",
    }
);

docker_enum!(
    /// How a port is published: through the routing mesh on every node, or on the task's
    /// own node only.
    PublishMode {
        Ingress = "ingress",
        Host = "host",
    }
);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    Vip,
    Dnsrr,
}

/// One `Endpoint.Ports` entry of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub protocol: Protocol,
    pub target: u16,
    /// None until swarm assigns one (or for a host-mode port without a fixed number).
    pub published: Option<u16>,
    pub mode: PublishMode,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub id: Id,
    /// Shared: the load balancers and every network's DNS names hold this allocation.
    pub name: Arc<str>,
    pub mode: EndpointMode,
    /// The service's VIP on each network it is attached to, by network id.
    pub vips: NetMap<Ipv4Addr>,
    /// Service aliases on each network (`--network name=n,alias=a`), by network id or name
    /// as the spec gave it.
    #[serde(default)]
    pub aliases: BTreeMap<String, Vec<String>>,
    /// Ports as swarm published them (`Endpoint.Ports`).
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
    /// `Spec.Labels` (the L7 front end reads `com.docker.lb.*`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A rolling update or rollback is in progress: tasks change without further events.
    #[serde(default)]
    pub updating: bool,
    /// `Version.Index`: unchanged means the object is unchanged.
    #[serde(default)]
    pub version: u64,
    /// `CreatedAt`, written so that string order is time order: of two services claiming
    /// one L7 host and path, the older keeps it.
    #[serde(default)]
    pub created: String,
}

/// A container's short id (its first 12 characters, all meshd ever shows), held inline: at
/// 100 000 tasks a `String` each is 100 000 allocations for twelve bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShortId {
    len: u8,
    bytes: [u8; 12],
}

impl ShortId {
    /// The first 12 characters of `id` (fewer when they would not fit in 12 bytes); None
    /// for an empty id.
    pub fn new(id: &str) -> Option<ShortId> {
        let mut end = id.len().min(12);
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        (end > 0).then(|| {
            let mut bytes = [0; 12];
            bytes[..end].copy_from_slice(&id.as_bytes()[..end]);
            ShortId {
                len: end as u8,
                bytes,
            }
        })
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len as usize]).expect("built from a str")
    }
}

impl std::ops::Deref for ShortId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for ShortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ShortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ShortId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ShortId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        ShortId::new(&s).ok_or_else(|| serde::de::Error::custom("empty container id"))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub service_id: Id,
    /// Empty while the task is not scheduled.
    pub node_id: Id,
    pub slot: Option<u32>,
    pub state: TaskState,
    pub desired: TaskState,
    /// The task's address on each of its networks, by network id.
    pub addresses: NetMap<Ipv4Addr>,
    /// Its container's short id, once the node started one.
    #[serde(default)]
    pub container_id: Option<ShortId>,
    /// The service's `--hostname`, a template swarm expands per task (`hostname_template`).
    /// None: Docker's default, the short container id.
    #[serde(default)]
    pub hostname: Option<Box<str>>,
    // No `Version.Index`: a task is compared field by field (one whose version moved but
    // whose fields meshd reads did not is no change), and 100 000 of them save 800 KB.
}

impl Task {
    /// The one liveness rule: a task gets new connections (and DNS answers) only while it
    /// runs and is meant to keep running, on a node swarm does not report down, and while
    /// its node's engine does not hold it back (health check failing, or told to stop). A
    /// task whose desired state turned to shutdown is drained at once.
    pub fn serves(&self, node: Option<&Node>, held: bool) -> bool {
        self.state == TaskState::Running
            && self.desired == TaskState::Running
            && !node.is_some_and(Node::is_down)
            && !held
    }

    /// Still on its way to running (or to stopping): its service's tasks are worth
    /// re-reading soon.
    pub fn in_transition(&self) -> bool {
        match self.desired {
            TaskState::Running | TaskState::Ready => !matches!(
                self.state,
                TaskState::Running
                    | TaskState::Complete
                    | TaskState::Failed
                    | TaskState::Rejected
                    | TaskState::Orphaned
            ),
            _ => self.state <= TaskState::Running,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Network {
    pub id: Id,
    pub name: String,
    /// No way out of the network: names that are not ours are not forwarded.
    #[serde(default)]
    pub internal: bool,
    /// Swarm's ingress network (the routing mesh's).
    #[serde(default)]
    pub ingress: bool,
    /// "swarm" or "local".
    #[serde(default)]
    pub scope: String,
    #[serde(default)]
    pub attachable: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: Id,
    pub hostname: String,
    pub state: NodeState,
    #[serde(default)]
    pub role: Role,
    /// `Status.Addr`: the node's address as swarm sees it.
    #[serde(default)]
    pub addr: Option<Ipv4Addr>,
    /// A manager's `ManagerStatus.Addr` (host:port of its raft listener).
    #[serde(default)]
    pub manager_addr: Option<String>,
    #[serde(default)]
    pub version: u64,
}

impl Node {
    /// Tasks on a node swarm reports down get no new connections, even before swarm
    /// reschedules them.
    pub fn is_down(&self) -> bool {
        matches!(self.state, NodeState::Down | NodeState::Disconnected)
    }
}

/// A container running on this node, with the network namespace the datapath keys on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sandbox {
    pub container_id: String,
    pub name: String,
    pub netns_cookie: u64,
    /// The namespace's bind mount (Docker's `SandboxKey`): where meshd opens its DNS sockets.
    #[serde(default)]
    pub netns_path: String,
    /// Network ids the container is attached to, sorted.
    pub networks: Vec<String>,
    /// Its address and aliases on each network, by network id.
    #[serde(default)]
    pub endpoints: NetMap<SandboxEndpoint>,
    /// Its hostname (`Config.Hostname`), a name on every network it is on, as in Docker 25+.
    #[serde(default)]
    pub hostname: String,
    /// The swarm task it runs (`com.docker.swarm.task.id`), if any.
    #[serde(default)]
    pub task_id: Option<String>,
    #[serde(default)]
    pub health: Health,
    /// Its engine was told to stop it (`kill` with SIGTERM or SIGKILL): it serves its grace
    /// period but gets no new connections.
    #[serde(default)]
    pub stopping: bool,
    /// Its leg on Docker's `docker_gwbridge` (a task with ingress-published ports has
    /// one): where this node's ingress mesh delivers to it.
    #[serde(default)]
    pub gateway: Option<BridgeLeg>,
}

/// A container's leg on `docker_gwbridge`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BridgeLeg {
    pub addr: Ipv4Addr,
    /// Its veth, when meshd could read it from the container's namespace: packets are
    /// then handed straight to the container rather than through the bridge.
    #[serde(default)]
    pub veth: Option<VethEnds>,
}

/// The two ends of a container's veth as the ingress mesh needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VethEnds {
    /// The host end's interface index.
    pub host_ifindex: u32,
    /// The container end's MAC.
    pub mac: [u8; 6],
}

impl Sandbox {
    /// This node's engine says the container's task must get no new connections.
    pub fn holds_task(&self) -> bool {
        self.task_id.is_some() && (self.health == Health::Unhealthy || self.stopping)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxEndpoint {
    pub addr: Option<Ipv4Addr>,
    pub aliases: Vec<String>,
}

/// A container on another node that only that node knows about: a plain `docker run` on an
/// attachable overlay. Its node's meshd reports it so that it resolves by name everywhere,
/// as Docker's gossip does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteContainer {
    pub container_id: String,
    pub name: String,
    #[serde(default)]
    pub hostname: String,
    /// Its address and aliases on each swarm network, by network id.
    pub endpoints: NetMap<SandboxEndpoint>,
}

/// What one node's meshd knows that the managers' API does not: its standalone containers
/// on swarm networks, and which of its tasks' health checks fail.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node_id: String,
    pub containers: Vec<RemoteContainer>,
    /// Tasks on this node that must get no new connections: their container's health check
    /// fails, or the container was told to stop (a stop or rolling update, before swarm
    /// reports the task's new desired state).
    pub held_tasks: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Service,
    Task,
    Network,
    Node,
    Container,
    Report,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Task => "task",
            Kind::Network => "network",
            Kind::Node => "node",
            Kind::Container => "container",
            Kind::Report => "report",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An object the source could not use; it is left out and the rest is used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub kind: Kind,
    pub id: String,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(state: TaskState, desired: TaskState) -> Task {
        Task {
            id: "t".into(),
            service_id: "s".into(),
            node_id: "n".into(),
            slot: Some(1),
            state,
            desired,
            addresses: NetMap::new(),
            container_id: None,
            hostname: None,
        }
    }

    fn node(state: NodeState) -> Node {
        Node {
            id: "n".into(),
            hostname: "n".into(),
            state,
            role: Role::Worker,
            addr: None,
            manager_addr: None,
            version: 0,
        }
    }

    #[test]
    fn only_a_running_task_meant_to_run_on_a_live_node_and_not_unhealthy_serves() {
        use TaskState::*;
        assert!(task(Running, Running).serves(None, false));
        assert!(task(Running, Running).serves(Some(&node(NodeState::Ready)), false));
        assert!(
            !task(Running, Shutdown).serves(None, false),
            "drained at once"
        );
        assert!(!task(Starting, Running).serves(None, false));
        assert!(!task(Running, Running).serves(Some(&node(NodeState::Down)), false));
        assert!(!task(Running, Running).serves(Some(&node(NodeState::Disconnected)), false));
        assert!(!task(Running, Running).serves(None, true));
        assert!(!task(Unknown, Running).serves(None, false));
    }

    #[test]
    fn unknown_states_parse_to_unknown_and_round_trip_as_text() {
        assert_eq!(TaskState::parse("running"), TaskState::Running);
        assert_eq!(TaskState::parse("levitating"), TaskState::Unknown);
        let s: TaskState = serde_json::from_str("\"complete\"").unwrap();
        assert_eq!(s, TaskState::Complete);
        assert_eq!(serde_json::to_string(&NodeState::Down).unwrap(), "\"down\"");
    }

    #[test]
    fn transitions_are_what_is_still_moving() {
        use TaskState::*;
        assert!(task(Starting, Running).in_transition());
        assert!(task(Assigned, Running).in_transition());
        assert!(!task(Running, Running).in_transition());
        assert!(!task(Failed, Running).in_transition());
        assert!(task(Running, Shutdown).in_transition(), "stopping");
        assert!(!task(Shutdown, Shutdown).in_transition());
        assert!(!task(Complete, Shutdown).in_transition());
    }
}
