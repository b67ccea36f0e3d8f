//! The ingress routing mesh: every published port answers on every node.
//!
//! `meshd_ingress_in` runs at tc ingress of the node's own interfaces, before netfilter and
//! conntrack. A packet to a published port on one of this node's addresses keeps the task
//! its flow was given (`IG_FLOWS`), or a new flow takes the task its Maglev slot names.
//! - A task on this node is reached on its `docker_gwbridge` leg: destination rewritten to
//!   it, and handed to the container's end of its veth (or, until meshd knows that veth,
//!   sent out of the bridge).
//! - A task elsewhere is reached through meshd's tunnel (IPv4 in UDP, `INGRESS_TUNNEL_PORT`,
//!   between node addresses): destination rewritten to the task's ingress address, then
//!   wrapped and routed to the task's node, whose `meshd_ingress_in` unwraps it and delivers
//!   it as above.
//! By default the source becomes this node's address and a port of its own (SNAT, as
//! Docker's mesh); with `IG_PRESERVE_CLIENT` the task sees the client's address and port.
//! Either way the reply goes back the way the flow came (`IG_REV`): `meshd_ingress_back`
//! at tc ingress of `docker_gwbridge` catches a task's reply, and either sends it straight
//! to the client with the published address as its source, or back through the tunnel to
//! the entry node, which does that. Replies never need the client's network to accept a
//! spoofed source, and the path is symmetric for stateful firewalls in front.
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup as FibParams, bpf_redir_neigh,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_INGRESS, BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR,
        BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use meshd_common::{
    capacity, ingress_stat, mix64, FlowKey, FlowValue, IngressBackend, IngressConfig,
    IngressPortKey, IngressPortValue, LocalLeg, MaglevKey, RevValue, IG_PRESERVE_CLIENT,
    TUNNEL_OVERHEAD,
};

#[map(name = "MESHD_IG_PORTS")]
static IG_PORTS: HashMap<IngressPortKey, IngressPortValue> =
    HashMap::pinned(capacity::IG_PORTS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_IG_MAGLEV")]
static IG_MAGLEV: HashMap<MaglevKey, IngressBackend> =
    HashMap::pinned(capacity::IG_MAGLEV, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_IG_ADDRS")]
static IG_ADDRS: HashMap<u32, u32> = HashMap::pinned(capacity::IG_ADDRS, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_IG_NODES")]
static IG_NODES: HashMap<u32, u32> = HashMap::pinned(capacity::IG_NODES, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_IG_LOCAL")]
static IG_LOCAL: HashMap<u32, LocalLeg> = HashMap::pinned(capacity::IG_LOCAL, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_IG_CONF")]
static IG_CONFIG: Array<IngressConfig> = Array::pinned(1, 0);

#[map(name = "MESHD_IG_FLOWS")]
static IG_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::pinned(capacity::IG_FLOWS, 0);

#[map(name = "MESHD_IG_REV")]
static IG_REV: LruHashMap<FlowKey, RevValue> = LruHashMap::pinned(capacity::IG_FLOWS, 0);

#[map(name = "MESHD_IG_STATS")]
static IG_STATS: PerCpuArray<u64> = PerCpuArray::pinned(ingress_stat::COUNT, 0);

/// Keyed (lb id, task address): `MaglevKey` with the address in `slot`.
#[map(name = "MESHD_IG_LIVE")]
static IG_LIVE: HashMap<MaglevKey, u32> = HashMap::pinned(capacity::IG_MAGLEV, BPF_F_NO_PREALLOC);

#[map(name = "MESHD_IG_PFLOWS")]
static IG_PORT_FLOWS: HashMap<u32, u64> = HashMap::pinned(capacity::IG_PORTS, BPF_F_NO_PREALLOC);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP: usize = ETH_HLEN;
const IP_CSUM: usize = IP + 10;
const IP_SADDR: usize = IP + 12;
const IP_DADDR: usize = IP + 16;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const AF_INET: u8 = 2;
/// IPv4 `frag_off`: more fragments, and the offset.
const IP_MF_OFFSET: u16 = 0x3fff;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// `lo` is interface 1 in every namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// SNAT source ports are tried from here up (below Linux's ephemeral range).
const SNAT_PORT_BASE: u32 = 10000;
const SNAT_PORT_SPAN: u32 = 22000;
const SNAT_TRIES: u32 = 8;

#[inline(always)]
fn count(stat: u32) {
    if let Some(c) = IG_STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU slot of this CPU.
        unsafe { *c += 1 };
    }
}

/// The parts of an IPv4 TCP or UDP packet the mesh looks at, with the L4 header's offset.
#[derive(Clone, Copy)]
struct Packet {
    l4: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    /// IPv4 total length.
    len: u16,
    fragment: bool,
}

impl Packet {
    fn key(&self) -> FlowKey {
        FlowKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }
}

/// What a packet is to the mesh: a TCP or UDP packet, or an ICMP error quoting one.
enum Parsed {
    Flow(Packet),
    Icmp(IcmpError),
}

/// Reads the IPv4 header once and sorts the packet; None for anything else.
#[inline(always)]
fn classify(ctx: &TcContext) -> Option<Parsed> {
    let ethertype: u16 = ctx.load(12).ok()?;
    if u16::from_be(ethertype) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(IP).ok()?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let proto: u8 = ctx.load(IP + 9).ok()?;
    let len: u16 = ctx.load(IP + 2).ok()?;
    let frag: u16 = ctx.load(IP + 6).ok()?;
    let l4 = IP + ihl;
    let mut p = Packet {
        l4,
        proto,
        saddr: ctx.load(IP_SADDR).ok()?,
        daddr: ctx.load(IP_DADDR).ok()?,
        sport: 0,
        dport: 0,
        len: u16::from_be(len),
        fragment: u16::from_be(frag) & IP_MF_OFFSET != 0,
    };
    match proto {
        PROTO_TCP | PROTO_UDP => {
            p.sport = ctx.load(l4).ok()?;
            p.dport = ctx.load(l4 + 2).ok()?;
            Some(Parsed::Flow(p))
        }
        PROTO_ICMP if !p.fragment => icmp_error(ctx, p).map(Parsed::Icmp),
        _ => None,
    }
}

/// Rewrites the source (or destination) address and port, checksums included.
#[inline(always)]
fn rewrite(ctx: &mut TcContext, p: &mut Packet, source: bool, addr: u32, port: u16) -> Option<()> {
    let (off, old_addr, port_off, old_port) = if source {
        (IP_SADDR, p.saddr, p.l4, p.sport)
    } else {
        (IP_DADDR, p.daddr, p.l4 + 2, p.dport)
    };
    let l4_flags = if p.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    };
    if addr != old_addr {
        ctx.l4_csum_replace(
            p.csum_off(),
            old_addr as u64,
            addr as u64,
            l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
        )
        .ok()?;
        ctx.l3_csum_replace(IP_CSUM, old_addr as u64, addr as u64, 4)
            .ok()?;
        ctx.store(off, &addr, 0).ok()?;
    }
    if port != old_port {
        ctx.l4_csum_replace(p.csum_off(), old_port as u64, port as u64, l4_flags | 2)
            .ok()?;
        ctx.store(port_off, &port, 0).ok()?;
    }
    if source {
        p.saddr = addr;
        p.sport = port;
    } else {
        p.daddr = addr;
        p.dport = port;
    }
    Some(())
}

#[classifier]
pub fn meshd_ingress_in(mut ctx: TcContext) -> i32 {
    match ingress_in(&mut ctx) {
        Some(action) => action,
        None => TC_ACT_OK as i32,
    }
}

#[classifier]
pub fn meshd_ingress_back(mut ctx: TcContext) -> i32 {
    match ingress_back(&mut ctx) {
        Some(action) => action,
        None => TC_ACT_OK as i32,
    }
}

#[inline(always)]
fn config() -> Option<IngressConfig> {
    IG_CONFIG.get(0).copied()
}

#[inline(always)]
fn ingress_in(ctx: &mut TcContext) -> Option<i32> {
    let conf = config()?;
    let mut p = match classify(ctx)? {
        Parsed::Flow(p) => p,
        Parsed::Icmp(e) => return icmp_to_task(ctx, &conf, &e),
    };
    if p.proto == PROTO_UDP
        && p.dport == conf.tunnel_port
        && !p.fragment
        && unsafe { IG_NODES.get(&p.saddr) }.is_some()
    {
        return from_tunnel(ctx, &conf);
    }
    let origin = if unsafe { (*ctx.skb.skb).ifindex } == LOOPBACK_IFINDEX {
        Origin::ThisNode
    } else {
        Origin::Outside
    };
    to_published(ctx, &mut p, &conf, origin)
}

/// Where a packet to a published port came from: the node's network, the node itself
/// (`lo`), or a container on this node (`docker_gwbridge`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Origin {
    Outside,
    ThisNode,
    LocalContainer,
}

/// Sends a packet addressed to a published port of this node to its flow's task.
#[inline(always)]
fn to_published(ctx: &mut TcContext, p: &mut Packet, conf: &IngressConfig, origin: Origin) -> Option<i32> {
    let loopback = p.daddr.to_ne_bytes()[0] == 127;
    // A container asking another node's published port is served here, as if it had asked
    // this node's: every node answers a port with the same tasks, and the container's
    // private source would not come back from that node (nothing masquerades it when
    // dockerd runs without iptables, and a hop is saved when something does).
    let mut other_node = false;
    if loopback {
        // localhost:PORT, as Docker's mesh answers it: only from the node itself.
        if origin != Origin::ThisNode {
            return None;
        }
    } else if unsafe { IG_ADDRS.get(&p.daddr) }.is_none() {
        if origin != Origin::LocalContainer || unsafe { IG_NODES.get(&p.daddr) }.is_none() {
            return None;
        }
        other_node = true;
    }
    let port = *unsafe {
        IG_PORTS.get(&IngressPortKey {
            port: p.dport,
            proto: p.proto,
            _pad: 0,
        })
    }?;
    count(ingress_stat::IN);
    if p.fragment {
        // Only a first fragment has ports: the rest could not follow it to the same task.
        count(ingress_stat::FRAGMENTS);
        return Some(TC_ACT_SHOT as i32);
    }
    let key = p.key();
    // A local container's reply would go straight back over the bridge, and localhost
    // cannot leave the node: those are always SNAT, to an address the reply comes back to.
    // Another node's address is this node's own to the task, as the reply must come here.
    let snat = match origin {
        Origin::Outside => None,
        Origin::ThisNode if loopback => Some(conf.node_addr),
        _ if other_node => Some(conf.node_addr),
        _ => Some(p.daddr),
    };
    // A TCP SYN is a new connection even on an old flow's addresses and ports (a client
    // port used again): it picks again, with the port's mode now.
    let syn = p.proto == PROTO_TCP
        && ctx
            .load::<u8>(p.l4 + 13)
            .is_ok_and(|f| f & (TCP_SYN | TCP_ACK) == TCP_SYN);
    let old = unsafe { IG_FLOWS.get(&key) }.copied();
    if let (Some(f), true) = (old, syn) {
        // Its reply entry goes with it (the new flow may pick another task or port).
        let _ = IG_REV.remove(&rev_key(&f, p));
    }
    let flow = match old {
        Some(f) if !syn && still_here(&f.backend, port.lb_id) => f,
        _ => match new_flow(p, &key, &port, snat)? {
            Ok(f) => f,
            Err(action) => return Some(action),
        },
    };
    let b = flow.backend;
    if b.node == 0 {
        rewrite(ctx, p, false, b.gateway, flow.dport)?;
        rewrite(ctx, p, true, flow.saddr, flow.sport)?;
        count(ingress_stat::LOCAL);
        return Some(to_task(ctx, conf, b.addr));
    }
    rewrite(ctx, p, false, b.addr, flow.dport)?;
    rewrite(ctx, p, true, flow.saddr, flow.sport)?;
    Some(into_tunnel(ctx, p, conf, b.node, key_hash(&key)))
}

/// A flow keeps its task while the task runs (serving, or draining); a flow whose task is
/// gone picks again rather than send to nothing.
#[inline(always)]
fn still_here(b: &IngressBackend, lb_id: u32) -> bool {
    let live = unsafe { IG_LIVE.get(&MaglevKey { lb_id, slot: b.addr }) }.is_some();
    live && (b.node != 0 || unsafe { IG_LOCAL.get(&b.addr) }.is_some())
}

/// The reply-table key of a flow entered here.
#[inline(always)]
fn rev_key(f: &FlowValue, p: &Packet) -> FlowKey {
    FlowKey {
        saddr: if f.backend.node == 0 {
            f.backend.gateway
        } else {
            f.backend.addr
        },
        daddr: f.saddr,
        sport: f.dport,
        dport: f.sport,
        proto: p.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn key_hash(k: &FlowKey) -> u64 {
    mix64(
        ((k.saddr as u64) << 32 | k.daddr as u64)
            ^ mix64((k.sport as u64) << 24 | (k.dport as u64) << 8 | k.proto as u64),
    )
}

/// Picks the task for a new flow and sets up both directions (`snat`: the source address it
/// must get whatever the port's mode). `Err`: the packet's fate.
#[inline(always)]
fn new_flow(
    p: &Packet,
    key: &FlowKey,
    port: &IngressPortValue,
    snat: Option<u32>,
) -> Option<Result<FlowValue, i32>> {
    if port.slots == 0 {
        count(ingress_stat::NO_BACKEND);
        return Some(Err(TC_ACT_SHOT as i32));
    }
    let h = key_hash(key);
    let slot = (h % port.slots as u64) as u32;
    let Some(b) = (unsafe {
        IG_MAGLEV.get(&MaglevKey {
            lb_id: port.lb_id,
            slot,
        })
    }) else {
        count(ingress_stat::NO_BACKEND);
        return Some(Err(TC_ACT_SHOT as i32));
    };
    let b = *b;
    // The reply comes from the task's bridge leg here, or its ingress address through the
    // tunnel: that is what the reply table is keyed on.
    let from = if b.node == 0 { b.gateway } else { b.addr };
    let rev = RevValue {
        saddr: p.daddr,
        daddr: p.saddr,
        sport: p.dport,
        dport: p.sport,
        tunnel_to: 0,
    };
    let preserve = snat.is_none() && port.flags & IG_PRESERVE_CLIENT != 0;
    let nat_addr = snat.unwrap_or(p.daddr);
    let mut sport = p.sport;
    let mut found = false;
    for i in 0..SNAT_TRIES {
        if i > 0 {
            if preserve {
                break;
            }
            let n = SNAT_PORT_BASE + ((h >> 16) as u32).wrapping_add(i * 7919) % SNAT_PORT_SPAN;
            sport = (n as u16).to_be();
        }
        let rkey = FlowKey {
            saddr: from,
            daddr: if preserve { p.saddr } else { nat_addr },
            sport: port.target,
            dport: sport,
            proto: p.proto,
            _pad: [0; 3],
        };
        // A client port already taken towards that task (by another client) is not reused.
        let flags = if preserve { 0 } else { BPF_NOEXIST as u64 };
        if IG_REV.insert(&rkey, &rev, flags).is_ok() {
            found = true;
            break;
        }
    }
    if !found {
        count(ingress_stat::NO_PORT);
        return Some(Err(TC_ACT_SHOT as i32));
    }
    let flow = FlowValue {
        backend: b,
        saddr: if preserve { p.saddr } else { nat_addr },
        sport,
        dport: port.target,
    };
    let _ = IG_FLOWS.insert(key, &flow, 0);
    count(ingress_stat::NEW_FLOWS);
    match IG_PORT_FLOWS.get_ptr_mut(&port.lb_id) {
        Some(n) => crate::count_one(n),
        None => {
            // The first of this port (a race of two CPUs loses one count, once).
            let _ = IG_PORT_FLOWS.insert(&port.lb_id, &1, BPF_NOEXIST as u64);
        }
    }
    Some(Ok(flow))
}

/// To the local task with ingress address `task`, the packet already addressed to its
/// bridge leg: straight into its namespace when its veth is known (what the bridge would
/// do, without the bridge and the backlog queue in between), else out of `docker_gwbridge`.
#[inline(always)]
fn to_task(ctx: &mut TcContext, conf: &IngressConfig, task: u32) -> i32 {
    if let Some(leg) = unsafe { IG_LOCAL.get(&task) } {
        if leg.host_ifindex != 0
            && ctx.store(0, &leg.mac, 0).is_ok()
            && ctx.store(6, &conf.bridge_mac, 0).is_ok()
        {
            // SAFETY: a helper call; all of meshd's programs run at tc ingress, where
            // the kernel takes a redirect to a veth's peer.
            return unsafe { bpf_redirect_peer(leg.host_ifindex, 0) as i32 };
        }
    }
    // SAFETY: a helper call; the kernel resolves the next hop from the destination address.
    unsafe { bpf_redirect_neigh(conf.bridge_ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// From a local container: a task's reply (to the client, or back through the tunnel to the
/// entry node), or a container asking a published port of this node.
#[inline(always)]
fn ingress_back(ctx: &mut TcContext) -> Option<i32> {
    let conf = config()?;
    let mut p = match classify(ctx)? {
        Parsed::Flow(p) => p,
        Parsed::Icmp(e) => return icmp_to_client(ctx, &conf, &e),
    };
    let Some(rev) = (unsafe { IG_REV.get(&p.key()) }) else {
        return to_published(ctx, &mut p, &conf, Origin::LocalContainer);
    };
    let rev = *rev;
    let hash = key_hash(&p.key());
    rewrite(ctx, &mut p, true, rev.saddr, rev.sport)?;
    rewrite(ctx, &mut p, false, rev.daddr, rev.dport)?;
    if rev.tunnel_to != 0 {
        return Some(into_tunnel(ctx, &p, &conf, rev.tunnel_to, hash));
    }
    count(ingress_stat::REPLIES);
    Some(route(ctx, p.daddr, p.saddr))
}

/// Unwraps a tunnelled packet: a flow for a task of this node, or a reply for a flow that
/// entered here.
#[inline(always)]
fn from_tunnel(ctx: &mut TcContext, conf: &IngressConfig) -> Option<i32> {
    let outer_saddr: u32 = ctx.load(IP_SADDR).ok()?;
    ctx.adjust_room(-(TUNNEL_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, 0)
        .ok()?;
    let mut p = match classify(ctx)? {
        Parsed::Flow(p) => p,
        Parsed::Icmp(e) => {
            return match unsafe { IG_LOCAL.get(&e.outer.daddr) } {
                Some(leg) => icmp_to_local(ctx, conf, &e, leg.gateway),
                None => icmp_to_client(ctx, conf, &e),
            }
        }
    };
    if let Some(leg) = unsafe { IG_LOCAL.get(&p.daddr) } {
        let (task, gateway) = (p.daddr, leg.gateway);
        // Replies go back through the tunnel, shown as coming from the task's ingress
        // address.
        let rkey = FlowKey {
            saddr: gateway,
            daddr: p.saddr,
            sport: p.dport,
            dport: p.sport,
            proto: p.proto,
            _pad: [0; 3],
        };
        let rev = RevValue {
            saddr: p.daddr,
            daddr: p.saddr,
            sport: p.dport,
            dport: p.sport,
            tunnel_to: outer_saddr,
        };
        let _ = IG_REV.insert(&rkey, &rev, 0);
        let dport = p.dport;
        rewrite(ctx, &mut p, false, gateway, dport)?;
        count(ingress_stat::LOCAL);
        return Some(to_task(ctx, conf, task));
    }
    let rev = *unsafe { IG_REV.get(&p.key()) }?;
    rewrite(ctx, &mut p, true, rev.saddr, rev.sport)?;
    rewrite(ctx, &mut p, false, rev.daddr, rev.dport)?;
    count(ingress_stat::REPLIES);
    Some(route(ctx, p.daddr, p.saddr))
}

/// An ICMP error (destination unreachable, time exceeded) quoting a TCP or UDP packet:
/// where its parts are, and the quoted packet's addresses and ports as it was sent.
#[derive(Clone, Copy)]
struct IcmpError {
    /// The ICMP packet itself (`l4`: the ICMP header; no ports).
    outer: Packet,
    inner_ip: usize,
    inner_l4: usize,
    inner: FlowKey,
}

impl IcmpError {
    /// The quoted packet's key the other way round: the flow it answers.
    #[inline(always)]
    fn quote_reversed(&self) -> FlowKey {
        FlowKey {
            saddr: self.inner.daddr,
            daddr: self.inner.saddr,
            sport: self.inner.dport,
            dport: self.inner.sport,
            proto: self.inner.proto,
            _pad: [0; 3],
        }
    }
}

/// The quoted packet of an ICMP error (`outer`: the ICMP packet), if it quotes TCP or UDP.
#[inline(always)]
fn icmp_error(ctx: &TcContext, outer: Packet) -> Option<IcmpError> {
    let icmp = outer.l4;
    let kind: u8 = ctx.load(icmp).ok()?;
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return None;
    }
    let inner_ip = icmp + 8;
    let ivihl: u8 = ctx.load(inner_ip).ok()?;
    let iihl = ((ivihl & 0x0f) as usize) * 4;
    let iproto: u8 = ctx.load(inner_ip + 9).ok()?;
    if iihl < 20 || (iproto != PROTO_TCP && iproto != PROTO_UDP) {
        return None;
    }
    let inner_l4 = inner_ip + iihl;
    Some(IcmpError {
        outer,
        inner_ip,
        inner_l4,
        inner: FlowKey {
            saddr: ctx.load(inner_ip + 12).ok()?,
            daddr: ctx.load(inner_ip + 16).ok()?,
            sport: ctx.load(inner_l4).ok()?,
            dport: ctx.load(inner_l4 + 2).ok()?,
            proto: iproto,
            _pad: [0; 3],
        },
    })
}

/// Rewrites the ICMP packet's own source or destination address.
#[inline(always)]
fn icmp_outer(ctx: &mut TcContext, e: &mut IcmpError, source: bool, addr: u32) -> Option<()> {
    let (off, old) = if source {
        (IP_SADDR, e.outer.saddr)
    } else {
        (IP_DADDR, e.outer.daddr)
    };
    if addr != old {
        // ICMP's checksum has no pseudo-header: only the IP header's changes.
        ctx.l3_csum_replace(IP_CSUM, old as u64, addr as u64, 4).ok()?;
        ctx.store(off, &addr, 0).ok()?;
    }
    if source {
        e.outer.saddr = addr;
    } else {
        e.outer.daddr = addr;
    }
    Some(())
}

/// Rewrites the quoted packet's source or destination. The quoted header's checksum is
/// kept right, so its address change and its checksum's cancel in ICMP's own checksum;
/// a port change is made up for there.
#[inline(always)]
fn icmp_inner(ctx: &mut TcContext, e: &mut IcmpError, source: bool, addr: u32, port: u16) -> Option<()> {
    let (off, old, port_off, old_port) = if source {
        (e.inner_ip + 12, e.inner.saddr, e.inner_l4, e.inner.sport)
    } else {
        (e.inner_ip + 16, e.inner.daddr, e.inner_l4 + 2, e.inner.dport)
    };
    if addr != old {
        ctx.l3_csum_replace(e.inner_ip + 10, old as u64, addr as u64, 4)
            .ok()?;
        ctx.store(off, &addr, 0).ok()?;
    }
    if port != old_port {
        ctx.l4_csum_replace(e.outer.l4 + 2, old_port as u64, port as u64, 2)
            .ok()?;
        ctx.store(port_off, &port, 0).ok()?;
    }
    if source {
        e.inner.saddr = addr;
        e.inner.sport = port;
    } else {
        e.inner.daddr = addr;
        e.inner.dport = port;
    }
    Some(())
}

/// An ICMP error from outside about a reply this node sent (a router on the way to the
/// client: "fragmentation needed"; the client: "port unreachable"): it goes to the flow's
/// task, quoting the packet as the task sent it.
#[inline(always)]
fn icmp_to_task(ctx: &mut TcContext, conf: &IngressConfig, e: &IcmpError) -> Option<i32> {
    let mut e = *e;
    unsafe { IG_ADDRS.get(&e.outer.daddr) }?;
    let forward = e.quote_reversed();
    let f = *unsafe { IG_FLOWS.get(&forward) }?;
    let b = f.backend;
    let task = if b.node == 0 { b.gateway } else { b.addr };
    icmp_inner(ctx, &mut e, true, task, f.dport)?;
    icmp_inner(ctx, &mut e, false, f.saddr, f.sport)?;
    icmp_outer(ctx, &mut e, false, task)?;
    count(ingress_stat::ICMP);
    if b.node == 0 {
        return Some(to_task(ctx, conf, b.addr));
    }
    Some(into_tunnel(ctx, &e.outer, conf, b.node, key_hash(&forward)))
}

/// Out of the tunnel, an ICMP error for a task of this node: to its bridge leg.
#[inline(always)]
fn icmp_to_local(ctx: &mut TcContext, conf: &IngressConfig, e: &IcmpError, gateway: u32) -> Option<i32> {
    let mut e = *e;
    let task = e.outer.daddr;
    let sport = e.inner.sport;
    icmp_inner(ctx, &mut e, true, gateway, sport)?;
    icmp_outer(ctx, &mut e, false, gateway)?;
    count(ingress_stat::ICMP);
    Some(to_task(ctx, conf, task))
}

/// An ICMP error from a task about a packet of a flow (its port closed: "port
/// unreachable"; too big): to the client as if from the published port, or back through
/// the tunnel to the entry node first.
#[inline(always)]
fn icmp_to_client(ctx: &mut TcContext, conf: &IngressConfig, e: &IcmpError) -> Option<i32> {
    let mut e = *e;
    // The quoted packet is one the task received: its reply key is the quote reversed.
    let key = e.quote_reversed();
    let rev = *unsafe { IG_REV.get(&key) }?;
    icmp_inner(ctx, &mut e, false, rev.saddr, rev.sport)?;
    icmp_inner(ctx, &mut e, true, rev.daddr, rev.dport)?;
    icmp_outer(ctx, &mut e, true, rev.saddr)?;
    icmp_outer(ctx, &mut e, false, rev.daddr)?;
    count(ingress_stat::ICMP);
    if rev.tunnel_to != 0 {
        return Some(into_tunnel(ctx, &e.outer, conf, rev.tunnel_to, key_hash(&key)));
    }
    Some(route(ctx, e.outer.daddr, e.outer.saddr))
}

/// Wraps the packet in IPv4 + UDP to another node's meshd and routes it there.
#[inline(always)]
fn into_tunnel(ctx: &mut TcContext, p: &Packet, conf: &IngressConfig, to: u32, hash: u64) -> i32 {
    if p.len > conf.tunnel_mtu {
        count(ingress_stat::TOO_BIG);
        return TC_ACT_SHOT as i32;
    }
    if p.proto == PROTO_TCP {
        clamp_mss(ctx, p, conf.tunnel_mtu.saturating_sub(40));
    }
    if ctx
        .adjust_room(
            TUNNEL_OVERHEAD as i32,
            BPF_ADJ_ROOM_MAC,
            (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP) as u64,
        )
        .is_err()
    {
        return TC_ACT_SHOT as i32;
    }
    let total = p.len + TUNNEL_OVERHEAD;
    let from = conf.node_addr;
    let mut ip = [0u16; 10];
    ip[0] = 0x4500u16.to_be();
    ip[1] = total.to_be();
    // Don't fragment: the inner packet was checked against the tunnel's MTU.
    ip[3] = 0x4000u16.to_be();
    ip[4] = ((64u16 << 8) | PROTO_UDP as u16).to_be();
    ip[6] = (from & 0xffff) as u16;
    ip[7] = (from >> 16) as u16;
    ip[8] = (to & 0xffff) as u16;
    ip[9] = (to >> 16) as u16;
    let mut sum: u32 = 0;
    for w in ip {
        sum += w as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip[5] = !(sum as u16);
    let udp: [u16; 4] = [
        // Source port from the flow: receivers spread flows over queues by it.
        (0xc000 | (hash as u16 & 0x3fff)).to_be(),
        conf.tunnel_port,
        (p.len + 8).to_be(),
        0,
    ];
    if ctx.store(IP, &ip, 0).is_err() || ctx.store(IP + 20, &udp, 0).is_err() {
        return TC_ACT_SHOT as i32;
    }
    count(ingress_stat::TUNNELLED);
    route(ctx, to, from)
}

/// Lowers a TCP SYN's MSS option to what fits the tunnel, so neither side sends segments
/// the tunnel would have to drop.
#[inline(always)]
fn clamp_mss(ctx: &mut TcContext, p: &Packet, max: u16) {
    let Ok(flags) = ctx.load::<u8>(p.l4 + 13) else {
        return;
    };
    if flags & TCP_SYN == 0 {
        return;
    }
    let Ok(doff) = ctx.load::<u8>(p.l4 + 12) else {
        return;
    };
    let end = p.l4 + ((doff >> 4) as usize) * 4;
    let mut off = p.l4 + 20;
    // Options come before anything else in the option list, MSS almost always first.
    for _ in 0..8 {
        if off + 4 > end {
            return;
        }
        let Ok(kind) = ctx.load::<u8>(off) else {
            return;
        };
        match kind {
            0 => return,
            1 => off += 1,
            2 => {
                let Ok(mss) = ctx.load::<u16>(off + 2) else {
                    return;
                };
                if u16::from_be(mss) > max {
                    let new = max.to_be();
                    if ctx
                        .l4_csum_replace(p.l4 + 16, mss as u64, new as u64, 2)
                        .is_ok()
                    {
                        let _ = ctx.store(off + 2, &new, 0);
                    }
                }
                return;
            }
            _ => {
                let Ok(len) = ctx.load::<u8>(off + 1) else {
                    return;
                };
                if len < 2 {
                    return;
                }
                off += len as usize;
            }
        }
    }
}

/// Sends the packet towards `daddr` by the node's routes, straight out of the interface
/// the route names; the stack's own path when there is none. To this node itself it goes
/// in through `lo` (arriving elsewhere, a local source address would be a martian).
#[inline(always)]
fn route(ctx: &mut TcContext, daddr: u32, saddr: u32) -> i32 {
    if daddr.to_ne_bytes()[0] == 127 || unsafe { IG_ADDRS.get(&daddr) }.is_some() {
        let zero = [0u8; 12];
        if ctx.store(0, &zero, 0).is_err() {
            return TC_ACT_SHOT as i32;
        }
        return unsafe { bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS as u64) as i32 };
    }
    // SAFETY: zeroed plain data is a valid lookup request.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.__bindgen_anon_1.tot_len = 0;
    // The device it is on now (where it came in, at tc ingress).
    fib.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    fib.__bindgen_anon_3.ipv4_src = saddr;
    fib.__bindgen_anon_4.ipv4_dst = daddr;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            // As forwarding from the interface it came in on (an output lookup would be
            // bound to that interface).
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        if ctx.store(0, &fib.dmac, 0).is_err() || ctx.store(6, &fib.smac, 0).is_err() {
            return TC_ACT_SHOT as i32;
        }
        return unsafe { bpf_redirect(fib.ifindex, 0) as i32 };
    }
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // SAFETY: zeroed plain data, then the next hop the lookup found.
        let mut nh: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        nh.nh_family = AF_INET as u32;
        nh.__bindgen_anon_1.ipv4_nh = unsafe { fib.__bindgen_anon_4.ipv4_dst };
        return unsafe {
            bpf_redirect_neigh(
                fib.ifindex,
                &mut nh,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            ) as i32
        };
    }
    // Also when forwarding is off on the interface (Docker turns it on).
    count(ingress_stat::NO_ROUTE);
    TC_ACT_OK as i32
}
