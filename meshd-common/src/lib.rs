//! Map keys and values shared by the eBPF programs and the daemon.
//!
//! Every type is `#[repr(C)]` with explicit padding so both sides agree on the layout byte
//! for byte. Addresses and ports are kept in network byte order, as the kernel hands them to
//! `sock_addr` programs, so the datapath never swaps bytes.
//!
//! The VIP path is two lookups deep so that a container start writes one entry, whatever
//! the number of services: `SANDBOXES` maps a network namespace to the networks it is on,
//! and `VIPS` maps (network, VIP) to a load balancer. A load balancer's live backends are a
//! dense array (`BACKENDS`, indices `0..count`): a socket-level VIP picks once per socket,
//! so consistent hashing would buy nothing here, and a task change rewrites at most two
//! entries.
#![no_std]

/// Names of the maps, as the eBPF object declares them and as they are pinned in bpffs.
/// The kernel keeps at most 15 characters of a map name.
pub mod map_names {
    /// netns cookie → the networks (meshd's network indices) that sandbox is attached to.
    pub const SANDBOXES: &str = "MESHD_SANDBOX";
    /// (network index, VIP) → load-balancer id.
    pub const VIPS: &str = "MESHD_VIPS";
    /// load-balancer id → its VIP and number of live backends.
    pub const LBS: &str = "MESHD_LBS";
    /// (load-balancer id, index) → backend address, for index in `0..count`.
    pub const BACKENDS: &str = "MESHD_BACKENDS";
    /// (socket cookie, backend, port) → VIP: what `recvmsg4`/`getpeername4` show the app.
    pub const REVNAT: &str = "MESHD_REVNAT";
    /// (socket cookie, VIP, port) → backend: an unconnected UDP socket keeps its backend
    /// from one datagram to the next, while that backend is live.
    pub const AFFINITY: &str = "MESHD_AFFINITY";
    /// Backend counter slot → connections (an array added to atomically; the slot is in
    /// `BackendValue`). An array, not a hash: preallocated, so zeroing a slot allocates
    /// nothing; not per-CPU: that would multiply its kernel memory by the CPUs.
    pub const BACKEND_CONNS: &str = "MESHD_BE_CONNS";
    /// load-balancer id → connections (an array, as the backend counters).
    pub const LB_CONNS: &str = "MESHD_LB_CONNS";
    /// load-balancer id → (service id, network id): lets a restarted meshd adopt the ids.
    /// Written before anything else that names the id and deleted after everything else.
    pub const LB_META: &str = "MESHD_LB_META";
    /// network index → network id, with the same first-in, last-out rule.
    pub const NET_META: &str = "MESHD_NET_META";
    /// netns cookie → meshd's DNS ports in that namespace: where `127.0.0.11:53` goes.
    pub const DNS: &str = "MESHD_DNS";
    /// (published port, protocol) → the ingress load balancer behind it.
    pub const IG_PORTS: &str = "MESHD_IG_PORTS";
    /// (ingress load balancer, Maglev slot) → the backend that slot names.
    pub const IG_MAGLEV: &str = "MESHD_IG_MAGLEV";
    /// This node's addresses: a published port answers on these.
    pub const IG_ADDRS: &str = "MESHD_IG_ADDRS";
    /// The swarm's node addresses: tunnelled packets are taken from these only.
    pub const IG_NODES: &str = "MESHD_IG_NODES";
    /// A local task's ingress address → its `docker_gwbridge` leg (`LocalLeg`).
    pub const IG_LOCAL: &str = "MESHD_IG_LOCAL";
    /// One entry: this node's ingress settings (`IngressConfig`).
    pub const IG_CONFIG: &str = "MESHD_IG_CONF";
    /// A flow as it arrived (client → published port) → where it goes.
    pub const IG_FLOWS: &str = "MESHD_IG_FLOWS";
    /// A reply as it leaves a task (or arrives from a tunnel) → how to show it to the client.
    pub const IG_REV: &str = "MESHD_IG_REV";
    /// Per-CPU counters of the ingress path (`ingress_stat`), summed by meshd.
    pub const IG_STATS: &str = "MESHD_IG_STATS";
    /// Ingress load-balancer id → new flows (added to atomically; meshd removes the entry
    /// with its port).
    pub const IG_PORT_FLOWS: &str = "MESHD_IG_PFLOWS";
    /// (ingress load balancer, task address) of every task that may still have flows:
    /// serving or draining. A flow whose task is not here any more picks again.
    pub const IG_LIVE: &str = "MESHD_IG_LIVE";

    pub const ALL: [&str; 22] = [
        SANDBOXES,
        VIPS,
        LBS,
        BACKENDS,
        REVNAT,
        AFFINITY,
        BACKEND_CONNS,
        LB_CONNS,
        LB_META,
        NET_META,
        DNS,
        IG_PORTS,
        IG_MAGLEV,
        IG_ADDRS,
        IG_NODES,
        IG_LOCAL,
        IG_CONFIG,
        IG_FLOWS,
        IG_REV,
        IG_STATS,
        IG_PORT_FLOWS,
        IG_LIVE,
    ];
}

/// Names of the programs in the eBPF object.
pub mod prog_names {
    pub const CONNECT4: &str = "meshd_connect4";
    pub const SENDMSG4: &str = "meshd_sendmsg4";
    pub const RECVMSG4: &str = "meshd_recvmsg4";
    pub const GETPEERNAME4: &str = "meshd_getpeername4";
    /// tc ingress on the node's own interfaces: published ports, and the tunnel.
    pub const INGRESS_IN: &str = "meshd_ingress_in";
    /// tc ingress on `docker_gwbridge`: replies of local tasks.
    pub const INGRESS_BACK: &str = "meshd_ingress_back";
}

/// Capacities of the maps. Large maps are created without preallocation so an idle node
/// pays only for what it holds.
pub mod capacity {
    pub const SANDBOXES: u32 = 1 << 16;
    pub const NETWORKS: u32 = 1 << 16;
    pub const VIPS: u32 = 1 << 16;
    /// Load balancers (a service's VIP on one network); ids are below this.
    pub const LBS: u32 = 1 << 16;
    /// Live backends over all load balancers; counter slots are below this (the counter
    /// array is 8 bytes × this: 2 MiB).
    pub const BACKENDS: u32 = 1 << 18;
    pub const REVNAT: u32 = 1 << 18;
    pub const AFFINITY: u32 = 1 << 16;
    pub const DNS: u32 = 1 << 16;
    pub const IG_PORTS: u32 = 1 << 12;
    /// Maglev slots over all published ports (a port with n tasks takes a prime ≥ 100 × n).
    pub const IG_MAGLEV: u32 = 1 << 20;
    pub const IG_ADDRS: u32 = 256;
    pub const IG_NODES: u32 = 1 << 12;
    pub const IG_LOCAL: u32 = 1 << 14;
    /// Flows kept per node, in each direction (LRU maps are preallocated: about 6 MB of
    /// kernel memory each at this size). When full, the least recently used flow is
    /// forgotten: its next packet picks again by Maglev (the same task while the tasks stay
    /// the same), so only flows idle for the longest while tasks changed can move.
    pub const IG_FLOWS: u32 = 1 << 16;
}

/// What the ingress path counts (`IG_STATS` indices).
pub mod ingress_stat {
    /// Packets to a published port, by the entry node.
    pub const IN: u32 = 0;
    /// New flows.
    pub const NEW_FLOWS: u32 = 1;
    /// Delivered to a task on this node.
    pub const LOCAL: u32 = 2;
    /// Sent through the tunnel to a task's node.
    pub const TUNNELLED: u32 = 3;
    /// Replies translated back to the client.
    pub const REPLIES: u32 = 4;
    /// Dropped: a published port with no live task.
    pub const NO_BACKEND: u32 = 5;
    /// Dropped: IP fragments of a published port (not balanced: only the first has ports).
    pub const FRAGMENTS: u32 = 6;
    /// Dropped: no free source port for SNAT towards that task.
    pub const NO_PORT: u32 = 7;
    /// Dropped: a packet too big for the tunnel.
    pub const TOO_BIG: u32 = 8;
    /// Passed to the stack: no route found for a rewritten packet.
    pub const NO_ROUTE: u32 = 9;
    /// ICMP errors about a flow, translated and passed on (to its task, or its client).
    pub const ICMP: u32 = 10;
    pub const COUNT: u32 = 11;
}

/// The UDP port of meshd's node-to-node tunnel (`--ingress-tunnel-port`).
pub const INGRESS_TUNNEL_PORT: u16 = 4790;
/// Bytes the tunnel adds: an outer IPv4 header and a UDP header.
pub const TUNNEL_OVERHEAD: u16 = 28;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IngressPortKey {
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `IngressPortValue::flags`: show tasks the client's own address.
pub const IG_PRESERVE_CLIENT: u16 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressPortValue {
    pub lb_id: u32,
    /// Maglev table size (a prime); 0: no live task.
    pub slots: u32,
    /// The port inside the task, network byte order.
    pub target: u16,
    pub flags: u16,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaglevKey {
    pub lb_id: u32,
    pub slot: u32,
}

/// A task behind a published port, as one node reaches it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressBackend {
    /// Its ingress-network address (network byte order, as all addresses here).
    pub addr: u32,
    /// Its node's address, where the tunnel goes; 0 when it runs on this node.
    pub node: u32,
    /// Its `docker_gwbridge` address when it runs on this node.
    pub gateway: u32,
    pub _pad: u32,
}

/// This node's ingress settings, one entry of `IG_CONFIG`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressConfig {
    /// `docker_gwbridge`'s interface index (0: no bridge, no local delivery).
    pub bridge_ifindex: u32,
    /// This node's swarm address: the tunnel's source (other nodes take tunnels from it).
    pub node_addr: u32,
    /// The tunnel's UDP port, network byte order.
    pub tunnel_port: u16,
    /// The largest IPv4 packet that can go into the tunnel (underlay MTU minus the tunnel).
    pub tunnel_mtu: u16,
    /// `docker_gwbridge`'s MAC: the source of frames handed straight to a task.
    pub bridge_mac: [u8; 6],
    pub _pad: [u8; 6],
}

/// A task container of this node on the ingress network, one entry of `IG_LOCAL` (keyed
/// by its ingress address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalLeg {
    /// Its `docker_gwbridge` address.
    pub gateway: u32,
    /// The host end of its `docker_gwbridge` veth (0: not known; packets then go through
    /// the bridge).
    pub host_ifindex: u32,
    /// Its MAC on that leg.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// A flow, as the addresses and ports on the wire at that point.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Where a flow that arrived at a published port goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowValue {
    pub backend: IngressBackend,
    /// The source it is given (SNAT: this node's address and a port; else the client's).
    pub saddr: u32,
    pub sport: u16,
    /// The task's port.
    pub dport: u16,
}

/// How a reply is shown to whoever the flow came from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevValue {
    /// The source the reply gets (the published address and port, or the task's ingress
    /// address on the task's node) and its destination (the client).
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    /// Back through the tunnel to this node (the entry node); 0: straight to the client.
    pub tunnel_to: u32,
}

/// Networks one sandbox can be scoped to; a container on more networks gets VIPs on its
/// first `MAX_SANDBOX_NETS` (meshd reports the rest as rejected).
pub const MAX_SANDBOX_NETS: usize = 16;

/// The embedded DNS address containers are told to use (`nameserver 127.0.0.11`).
pub const DNS_ADDR: [u8; 4] = [127, 0, 0, 11];
pub const DNS_PORT: u16 = 53;

/// Where meshd serves DNS inside one container's network namespace: `127.0.0.11` on these
/// ports (network byte order). Queries to `127.0.0.11:53` are sent here before netfilter
/// sees them, so dockerd's own nat redirect of port 53 never matches.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsPorts {
    pub udp: u16,
    pub tcp: u16,
    pub _pad: u32,
}

/// The networks of one sandbox (network namespace), as meshd's network indices.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxValue {
    pub nets: [u32; MAX_SANDBOX_NETS],
    pub count: u32,
    pub _pad: u32,
}

/// Key of the VIP table: a VIP is visible only from sandboxes on its network.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub net: u32,
    /// IPv4 address, network byte order.
    pub ip: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipValue {
    pub lb_id: u32,
    pub _pad: u32,
}

/// One load balancer: a service's VIP on one network.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbValue {
    /// The VIP, network byte order. The programs check it against the address asked for,
    /// so a VIP entry left from a load balancer whose id was since reused can never reach
    /// another service's backends.
    pub vip: u32,
    /// Live backends: `BACKENDS` holds indices `0..count`. 0: refuse at once.
    pub count: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlot {
    pub lb_id: u32,
    pub index: u32,
}

/// A backend as the datapath needs it: the task's address on the VIP's network, and its
/// connection counter's slot (it keeps the slot when it moves to another index).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendValue {
    /// IPv4 address, network byte order.
    pub ip: u32,
    pub counter: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatKey {
    pub socket_cookie: u64,
    /// Backend address and port, network byte order.
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RevNatValue {
    /// VIP address and port, network byte order.
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    pub socket_cookie: u64,
    /// VIP address and port, network byte order.
    pub vip: u32,
    pub port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    pub lb_id: u32,
    /// Where the backend was, and who it was: still a backend if that slot still holds it.
    pub index: u32,
    /// Backend address, network byte order.
    pub ip: u32,
    pub _pad: u32,
}

/// Docker object ids are 25 characters; 32 bytes leave room, zero padded.
pub const ID_LEN: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LbMeta {
    pub service_id: [u8; ID_LEN],
    pub network_id: [u8; ID_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetMeta {
    pub network_id: [u8; ID_LEN],
}

/// A well-mixed 64-bit hash (the splitmix64 finaliser). Socket cookies are sequential, so
/// they must be mixed before they pick a backend.
#[inline(always)]
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), made only of integers, with explicit padding.
    unsafe impl aya::Pod for SandboxValue {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipValue {}
    unsafe impl aya::Pod for LbValue {}
    unsafe impl aya::Pod for BackendSlot {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for LbMeta {}
    unsafe impl aya::Pod for NetMeta {}
    unsafe impl aya::Pod for DnsPorts {}
    unsafe impl aya::Pod for IngressPortKey {}
    unsafe impl aya::Pod for IngressPortValue {}
    unsafe impl aya::Pod for MaglevKey {}
    unsafe impl aya::Pod for IngressBackend {}
    unsafe impl aya::Pod for IngressConfig {}
    unsafe impl aya::Pod for LocalLeg {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for RevValue {}
}
