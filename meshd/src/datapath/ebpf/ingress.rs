//! The ingress mesh's side of the eBPF datapath: attaches the tc programs (the node's own
//! interfaces, and `docker_gwbridge` once Docker has made it) and writes the published
//! ports' Maglev tables, this node's addresses, the swarm's node addresses and the local
//! tasks' bridge legs, each as a difference against what the maps hold (read back at start,
//! so a restarted meshd writes only what changed and established flows never notice).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        links::{FdLink, LinkOrder, PinnedLink},
        tc::TcAttachOptions,
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use meshd_common::{
    capacity, ingress_stat, map_names, prog_names, FlowKey, FlowValue, IngressBackend,
    IngressConfig, IngressPortKey, IngressPortValue, LocalLeg, MaglevKey, RevValue,
    IG_PRESERVE_CLIENT, TUNNEL_OVERHEAD,
};
use serde::Serialize;
use tracing::{info, warn};

use super::{maglev, maps};
use crate::{
    compile::{
        ingress::{ClientAddress, IngressLb, IngressPort},
        Changed, Desired,
    },
    datapath::ApplyStats,
    model::Protocol,
    source::local::GATEWAY_BRIDGE,
};

/// How this node takes part in the ingress mesh (`--no-ingress` leaves it out).
#[derive(Clone, Debug)]
pub struct IngressSettings {
    /// The interfaces published ports answer on; empty: every interface with an IPv4
    /// address but loopback and Docker's own bridges.
    pub interfaces: Vec<String>,
    /// The node-to-node tunnel's UDP port.
    pub tunnel_port: u16,
}

struct Maps {
    ports: HashMap<MapData, IngressPortKey, IngressPortValue>,
    maglev: HashMap<MapData, MaglevKey, IngressBackend>,
    addrs: HashMap<MapData, u32, u32>,
    nodes: HashMap<MapData, u32, u32>,
    local: HashMap<MapData, u32, LocalLeg>,
    config: Array<MapData, IngressConfig>,
    stats: PerCpuArray<MapData, u64>,
    port_flows: HashMap<MapData, u32, u64>,
    live: HashMap<MapData, MaglevKey, u32>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    rev: HashMap<MapData, FlowKey, RevValue>,
}

/// One published port as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PortTable {
    value: IngressPortValue,
    /// Slot → backend, `value.slots` long.
    slots: Vec<IngressBackend>,
    /// Addresses of its tasks that may have flows (serving or draining).
    live: BTreeSet<u32>,
}

pub struct Ingress {
    settings: IngressSettings,
    pin_dir: PathBuf,
    maps: Maps,
    /// Interfaces with `meshd_ingress_in` attached, and the bridge with `meshd_ingress_back`,
    /// by name → ifindex.
    uplinks: BTreeMap<String, u32>,
    bridge: Option<(String, u32)>,
    // What the maps hold.
    ports: BTreeMap<IngressPortKey, PortTable>,
    addrs: BTreeSet<u32>,
    nodes: BTreeSet<u32>,
    local: BTreeMap<u32, LocalLeg>,
    config: IngressConfig,
    /// Why the last apply failed, if it did.
    pub last_error: Option<String>,
}

/// `meshctl ingress`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct IngressView {
    pub ports: Vec<PortView>,
    /// Entries in the flow table (arriving flows) and the reply table.
    pub flows: usize,
    pub replies: usize,
    pub flow_capacity: u32,
    pub status: IngressStatus,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct PortView {
    pub port: u16,
    pub protocol: String,
    pub service: String,
    pub target: u16,
    pub client_address: ClientAddress,
    /// In the maps (false: compiled, not written yet, or its write failed).
    pub programmed: bool,
    pub slots: u32,
    /// Live tasks; `backends` are those this node reaches.
    pub tasks: usize,
    pub backends: Vec<BackendView>,
    pub new_flows: u64,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct BackendView {
    pub addr: Ipv4Addr,
    pub via: String,
    /// Maglev slots it holds.
    pub slots: usize,
}

/// What `meshctl` shows of the ingress datapath.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct IngressStatus {
    pub interfaces: Vec<String>,
    pub bridge: Option<String>,
    pub node_addr: Option<Ipv4Addr>,
    pub tunnel_port: u16,
    pub ports: usize,
    #[serde(default)]
    pub last_error: Option<String>,
    /// `ingress_stat` counters, by name.
    pub counters: BTreeMap<String, u64>,
}

const STAT_NAMES: [&str; ingress_stat::COUNT as usize] = [
    "packets_in",
    "new_flows",
    "to_local_tasks",
    "tunnelled",
    "replies",
    "dropped_no_task",
    "dropped_fragments",
    "dropped_no_snat_port",
    "dropped_too_big",
    "passed_no_route",
    "icmp_errors",
];

fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn from_be(ip: u32) -> Ipv4Addr {
    Ipv4Addr::from(ip.to_ne_bytes())
}

/// The load-balancer id of a published port: fixed by the port, so it needs no allocator
/// and means the same after a restart.
fn lb_id(p: &IngressPort) -> u32 {
    (u32::from(proto_number(p.protocol)) << 16) | u32::from(p.port)
}

fn proto_number(p: Protocol) -> u8 {
    match p {
        Protocol::Udp => 17,
        _ => 6,
    }
}

fn port_key(p: &IngressPort) -> IngressPortKey {
    IngressPortKey {
        port: p.port.to_be(),
        proto: proto_number(p.protocol),
        _pad: 0,
    }
}

impl Ingress {
    /// Loads the programs and reads back what the maps hold; attaching waits for the first
    /// apply (the bridge may not exist yet).
    pub fn open(ebpf: &mut Ebpf, pin_dir: &Path, settings: IngressSettings) -> Result<Self> {
        for name in [prog_names::INGRESS_IN, prog_names::INGRESS_BACK] {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            p.load().with_context(|| format!("verify/load {name}"))?;
        }
        let maps = Maps {
            ports: maps::typed(ebpf, map_names::IG_PORTS)?,
            maglev: maps::typed(ebpf, map_names::IG_MAGLEV)?,
            addrs: maps::typed(ebpf, map_names::IG_ADDRS)?,
            nodes: maps::typed(ebpf, map_names::IG_NODES)?,
            local: maps::typed(ebpf, map_names::IG_LOCAL)?,
            config: maps::typed(ebpf, map_names::IG_CONFIG)?,
            stats: maps::typed(ebpf, map_names::IG_STATS)?,
            port_flows: maps::typed(ebpf, map_names::IG_PORT_FLOWS)?,
            live: maps::typed(ebpf, map_names::IG_LIVE)?,
            flows: maps::typed(ebpf, map_names::IG_FLOWS)?,
            rev: maps::typed(ebpf, map_names::IG_REV)?,
        };
        let held = maps::read_all(&maps.ports)?;
        let slots = maps::read_all(&maps.maglev)?;
        let mut live: BTreeMap<u32, BTreeSet<u32>> = BTreeMap::new();
        for k in maps::read_all(&maps.live)?.into_keys() {
            live.entry(k.lb_id).or_default().insert(k.slot);
        }
        let ports = held
            .into_iter()
            .map(|(k, value)| {
                let table = (0..value.slots)
                    .map(|slot| {
                        slots
                            .get(&MaglevKey {
                                lb_id: value.lb_id,
                                slot,
                            })
                            .copied()
                            .unwrap_or(IngressBackend {
                                addr: 0,
                                node: 0,
                                gateway: 0,
                                _pad: 0,
                            })
                    })
                    .collect();
                (
                    k,
                    PortTable {
                        value,
                        slots: table,
                        live: live.remove(&value.lb_id).unwrap_or_default(),
                    },
                )
            })
            .collect();
        let config = maps.config.get(&0, 0).unwrap_or_default();
        Ok(Ingress {
            addrs: maps::read_all(&maps.addrs)?.into_keys().collect(),
            nodes: maps::read_all(&maps.nodes)?.into_keys().collect(),
            local: maps::read_all(&maps.local)?,
            maps,
            settings,
            pin_dir: pin_dir.to_path_buf(),
            uplinks: BTreeMap::new(),
            bridge: None,
            ports,
            config,
            last_error: None,
        })
    }

    pub fn status(&self) -> IngressStatus {
        let mut counters = BTreeMap::new();
        for (i, name) in STAT_NAMES.iter().enumerate() {
            let v = self
                .maps
                .stats
                .get(&(i as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            counters.insert(name.to_string(), v);
        }
        IngressStatus {
            interfaces: self.uplinks.keys().cloned().collect(),
            bridge: self.bridge.as_ref().map(|b| b.0.clone()),
            node_addr: (self.config.node_addr != 0).then(|| from_be(self.config.node_addr)),
            tunnel_port: self.settings.tunnel_port,
            ports: self.ports.len(),
            last_error: self.last_error.clone(),
            counters,
        }
    }

    /// What `meshctl ingress` shows: each published port as the maps hold it, with its
    /// service and counters, and how full the flow tables are (counted: on demand only).
    pub fn view(&self, desired: &Desired) -> IngressView {
        let mut ports = Vec::new();
        for (p, lb) in &desired.ingress {
            let held = self.ports.get(&port_key(p));
            let mut backends: Vec<BackendView> = Vec::new();
            if let Some(t) = held {
                let mut seen = BTreeSet::new();
                for b in &t.slots {
                    if seen.insert(b.addr) {
                        backends.push(BackendView {
                            addr: from_be(b.addr),
                            via: if b.node == 0 {
                                match self.local.get(&b.addr).map(|l| l.host_ifindex) {
                                    Some(i) if i != 0 => format!(
                                        "local, bridge leg {} (straight into its veth, host end {i})",
                                        from_be(b.gateway)
                                    ),
                                    _ => format!(
                                        "local, bridge leg {} (through the bridge)",
                                        from_be(b.gateway)
                                    ),
                                }
                            } else {
                                format!("tunnel to {}", from_be(b.node))
                            },
                            slots: t.slots.iter().filter(|s| s.addr == b.addr).count(),
                        });
                    }
                }
            }
            backends.sort_by_key(|b| b.addr);
            ports.push(PortView {
                port: p.port,
                protocol: p.protocol.to_string(),
                service: lb.service_name.to_string(),
                target: lb.target,
                client_address: lb.client,
                programmed: held.is_some(),
                slots: held.map_or(0, |t| t.value.slots),
                tasks: lb.backends.len(),
                backends,
                new_flows: held
                    .and_then(|t| self.maps.port_flows.get(&t.value.lb_id, 0).ok())
                    .unwrap_or(0),
            });
        }
        IngressView {
            ports,
            flows: self.maps.flows.keys().count(),
            replies: self.maps.rev.keys().count(),
            flow_capacity: capacity::IG_FLOWS,
            status: self.status(),
        }
    }

    /// Brings the ingress maps and attachments in line with `desired`.
    pub fn apply(
        &mut self,
        ebpf: &mut Ebpf,
        desired: &Desired,
        changed: &Changed,
        everything: bool,
    ) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        if !everything
            && changed.ingress.is_empty()
            && !changed.ingress_nodes
            && !changed.ingress_local
        {
            return Ok(stats);
        }
        let node = self.attach(ebpf)?;
        // This node's addresses, and the one the swarm knows it by (the tunnel's source).
        let addrs: BTreeSet<u32> = node.addrs.iter().map(|a| be(*a)).collect();
        let node_addr = node
            .addrs
            .iter()
            .find(|a| desired.ingress_nodes.contains(a))
            .or(node.addrs.first())
            .map_or(0, |a| be(*a));
        let config = IngressConfig {
            bridge_ifindex: self.bridge.as_ref().map_or(0, |b| b.1),
            node_addr,
            tunnel_port: self.settings.tunnel_port.to_be(),
            tunnel_mtu: node.mtu.saturating_sub(TUNNEL_OVERHEAD),
            bridge_mac: node.bridge_mac,
            _pad: [0; 6],
        };
        if config != self.config {
            self.maps
                .config
                .set(0, config, 0)
                .context("write ingress config")?;
            self.config = config;
            stats.writes += 1;
        }
        stats.add(sync_set(&mut self.maps.addrs, &mut self.addrs, addrs)?);
        let nodes: BTreeSet<u32> = desired
            .ingress_nodes
            .iter()
            .map(|a| be(*a))
            .filter(|a| !self.addrs.contains(a))
            .collect();
        stats.add(sync_set(&mut self.maps.nodes, &mut self.nodes, nodes)?);
        // Local tasks' bridge legs, serving or not: the tunnel's deliveries, and a task
        // shutting down keeps its flows while it lives.
        let local: BTreeMap<u32, LocalLeg> = if self.bridge.is_some() {
            desired
                .ingress_local
                .iter()
                .map(|(a, leg)| {
                    let veth = leg.veth.filter(|_| node.bridge_mac != [0; 6]);
                    (
                        be(*a),
                        LocalLeg {
                            gateway: be(leg.addr),
                            host_ifindex: veth.map_or(0, |v| v.host_ifindex),
                            mac: veth.map_or([0; 6], |v| v.mac),
                            _pad: [0; 2],
                        },
                    )
                })
                .collect()
        } else {
            BTreeMap::new()
        };
        stats.add(sync_map(&mut self.maps.local, &mut self.local, local)?);
        // Ports: the changed ones, or all (and whatever the maps hold that is gone).
        let keys: BTreeSet<IngressPort> = if everything || changed.ingress_nodes {
            desired.ingress.keys().copied().collect()
        } else {
            changed.ingress.clone()
        };
        let mut wanted: BTreeMap<IngressPortKey, Option<PortTable>> = keys
            .iter()
            .map(|p| {
                (
                    port_key(p),
                    desired.ingress.get(p).map(|lb| self.table(p, lb)),
                )
            })
            .collect();
        if everything {
            let present: BTreeSet<IngressPortKey> = desired.ingress.keys().map(port_key).collect();
            for k in self.ports.keys() {
                if !present.contains(k) {
                    wanted.insert(*k, None);
                }
            }
        }
        for (k, table) in wanted {
            stats.add(self.write_port(k, table)?);
        }
        Ok(stats)
    }

    /// The Maglev table of one published port, as this node reaches its tasks: a local one
    /// on its bridge leg, another node's through the tunnel; one this node cannot reach
    /// (on this node, but its leg is not known yet) is left out.
    fn table(&self, p: &IngressPort, lb: &IngressLb) -> PortTable {
        let reachable: Vec<IngressBackend> = lb
            .backends
            .iter()
            .filter_map(|b| match (b.local, b.node) {
                (Some(gw), _) if self.bridge.is_some() => Some(IngressBackend {
                    addr: be(b.addr),
                    node: 0,
                    gateway: be(gw),
                    _pad: 0,
                }),
                (_, Some(n)) if !self.addrs.contains(&be(n)) => Some(IngressBackend {
                    addr: be(b.addr),
                    node: be(n),
                    gateway: 0,
                    _pad: 0,
                }),
                _ => None,
            })
            .collect();
        let live = lb
            .backends
            .iter()
            .map(|b| be(b.addr))
            .chain(lb.draining.iter().map(|a| be(*a)))
            .collect();
        let size = maglev::table_size(reachable.len());
        let names: Vec<[u8; 4]> = reachable.iter().map(|b| b.addr.to_ne_bytes()).collect();
        let slots = maglev::build(&names, size)
            .into_iter()
            .map(|i| reachable[i as usize])
            .collect();
        PortTable {
            value: IngressPortValue {
                lb_id: lb_id(p),
                slots: size,
                target: lb.target.to_be(),
                flags: if lb.client == ClientAddress::Preserve {
                    IG_PRESERVE_CLIENT
                } else {
                    0
                },
                _pad: 0,
            },
            slots,
            live,
        }
    }

    /// Writes one port's table so that the program never reads a slot that is not there:
    /// slots before a larger size, a smaller size before its slots go.
    fn write_port(&mut self, k: IngressPortKey, want: Option<PortTable>) -> Result<ApplyStats> {
        let mut stats = ApplyStats::default();
        let old = self.ports.get(&k).cloned();
        if old == want {
            return Ok(stats);
        }
        let old_slots = old.as_ref().map_or(&[][..], |t| &t.slots[..]);
        let lb = want
            .as_ref()
            .map(|t| t.value.lb_id)
            .or(old.as_ref().map(|t| t.value.lb_id))
            .unwrap_or(0);
        let old_live = old.as_ref().map(|t| t.live.clone()).unwrap_or_default();
        let new_live = want.as_ref().map(|t| t.live.clone()).unwrap_or_default();
        // Live tasks first in, last out: a flow never loses its task to the order of writes.
        for a in new_live.difference(&old_live) {
            self.maps
                .live
                .insert(
                    MaglevKey {
                        lb_id: lb,
                        slot: *a,
                    },
                    1,
                    0,
                )
                .context("write a live task")?;
            stats.writes += 1;
        }
        if let Some(t) = &want {
            for (slot, b) in t.slots.iter().enumerate() {
                if old_slots.get(slot) != Some(b) {
                    self.maps
                        .maglev
                        .insert(
                            MaglevKey {
                                lb_id: lb,
                                slot: slot as u32,
                            },
                            *b,
                            0,
                        )
                        .context("write a Maglev slot")?;
                    stats.writes += 1;
                }
            }
            if old.as_ref().map(|o| o.value) != Some(t.value) {
                self.maps
                    .ports
                    .insert(k, t.value, 0)
                    .context("write a published port")?;
                stats.writes += 1;
            }
        } else {
            maps::ignore_missing(self.maps.ports.remove(&k)).context("remove a published port")?;
            maps::ignore_missing(self.maps.port_flows.remove(&lb))
                .context("remove a port's flow counter")?;
            stats.deletes += 1;
        }
        let keep = want.as_ref().map_or(0, |t| t.slots.len());
        for slot in keep..old_slots.len() {
            maps::ignore_missing(self.maps.maglev.remove(&MaglevKey {
                lb_id: lb,
                slot: slot as u32,
            }))
            .context("remove a Maglev slot")?;
            stats.deletes += 1;
        }
        for a in old_live.difference(&new_live) {
            maps::ignore_missing(self.maps.live.remove(&MaglevKey {
                lb_id: lb,
                slot: *a,
            }))
            .context("remove a live task")?;
            stats.deletes += 1;
        }
        match want {
            Some(t) => self.ports.insert(k, t),
            None => self.ports.remove(&k),
        };
        Ok(stats)
    }

    /// Attaches the programs where they are missing (an interface that appeared, the bridge
    /// Docker made) and says what this node looks like now.
    fn attach(&mut self, ebpf: &mut Ebpf) -> Result<NodeView> {
        let view = NodeView::read(&self.settings.interfaces)?;
        // And `lo`: the node's own processes asking its addresses (or localhost).
        let mut wanted = view.uplinks.clone();
        wanted.insert("lo".into(), 1);
        for (name, index) in &wanted {
            if self.uplinks.get(name) != Some(index) {
                if name == "lo" {
                    loopback_replies()?;
                }
                attach_one(ebpf, prog_names::INGRESS_IN, name, &self.pin_dir)?;
                info!(interface = %name, "ingress mesh: published ports answer here");
                self.uplinks.insert(name.clone(), *index);
            }
        }
        self.uplinks.retain(|n, _| wanted.contains_key(n));
        match (&view.bridge, &self.bridge) {
            (Some(b), Some(old)) if b == old => {}
            (Some(b), _) => {
                attach_one(ebpf, prog_names::INGRESS_BACK, &b.0, &self.pin_dir)?;
                info!(bridge = %b.0, "ingress mesh: delivering to local tasks");
                self.bridge = Some(b.clone());
            }
            (None, _) => self.bridge = None,
        }
        Ok(view)
    }
}

/// Replies to the node's own connections come in through `lo` with the node's address (or
/// 127.0.0.1) as their source, which the kernel takes as martians unless `lo` accepts
/// local sources (`accept_local`) and routes 127/8 (`route_localnet`, as kube-proxy sets
/// for node ports on localhost). Only `lo` is changed: nothing from outside arrives there.
fn loopback_replies() -> Result<()> {
    for knob in ["accept_local", "route_localnet"] {
        let path = format!("/proc/sys/net/ipv4/conf/lo/{knob}");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
            continue;
        }
        std::fs::write(&path, "1").with_context(|| format!("set {path} to 1"))?;
        info!(sysctl = %path, "ingress mesh: set to 1, for the node's own connections to published ports");
    }
    Ok(())
}

/// Attaches `prog` at tcx ingress of `ifname` and pins the link; a link pinned there
/// before (an earlier meshd) is detached only once the new one is in place.
fn attach_one(ebpf: &mut Ebpf, prog: &str, ifname: &str, pin_dir: &Path) -> Result<()> {
    let p: &mut SchedClassifier = ebpf
        .program_mut(prog)
        .with_context(|| format!("program {prog} missing"))?
        .try_into()?;
    let id = p
        .attach_with_options(
            ifname,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attach {prog} at tc ingress of {ifname} (tcx, Linux 6.6+)"))?;
    let link: FdLink = p.take_link(id)?.try_into()?;
    let pin = pin_dir.join(format!("link_{prog}@{ifname}"));
    let old = if pin.exists() {
        match PinnedLink::from_pin(&pin) {
            Ok(old) => Some(old.unpin().context("unpin the old link")?),
            Err(e) => {
                warn!(pin = %pin.display(), error = %e, "cannot open the pinned link; replacing it");
                let _ = std::fs::remove_file(&pin);
                None
            }
        }
    } else {
        None
    };
    link.pin(&pin)
        .with_context(|| format!("pin link {}", pin.display()))?;
    drop(old);
    Ok(())
}

/// This node's interfaces as the ingress mesh sees them.
struct NodeView {
    uplinks: BTreeMap<String, u32>,
    /// The uplinks' IPv4 addresses.
    addrs: Vec<Ipv4Addr>,
    /// The smallest uplink MTU.
    mtu: u16,
    bridge: Option<(String, u32)>,
    /// `docker_gwbridge`'s MAC (zero while it has none).
    bridge_mac: [u8; 6],
}

impl NodeView {
    fn read(named: &[String]) -> Result<NodeView> {
        let mut uplinks = BTreeMap::new();
        let mut addrs = Vec::new();
        let mut bridge_mac = [0; 6];
        for ifa in nix::ifaddrs::getifaddrs().context("list interfaces")? {
            if ifa.interface_name == GATEWAY_BRIDGE {
                if let Some(mac) = ifa
                    .address
                    .and_then(|a| a.as_link_addr().and_then(|l| l.addr()))
                {
                    bridge_mac = mac;
                }
            }
            let Some(ip) = ifa.address.and_then(|a| a.as_sockaddr_in().map(|s| s.ip())) else {
                continue;
            };
            let name = ifa.interface_name;
            let chosen = if named.is_empty() {
                !ip.is_loopback()
                    && name != GATEWAY_BRIDGE
                    && !name.starts_with("docker")
                    && !name.starts_with("br-")
                    && !name.starts_with("veth")
            } else {
                named.contains(&name)
            };
            if !chosen {
                continue;
            }
            if let Ok(index) = nix::net::if_::if_nametoindex(name.as_str()) {
                uplinks.insert(name, index);
                addrs.push(ip);
            }
        }
        addrs.sort();
        addrs.dedup();
        let mtu = uplinks
            .keys()
            .filter_map(|n| interface_mtu(n))
            .min()
            .unwrap_or(1500);
        let bridge = nix::net::if_::if_nametoindex(GATEWAY_BRIDGE)
            .ok()
            .map(|i| (GATEWAY_BRIDGE.to_string(), i));
        Ok(NodeView {
            uplinks,
            addrs,
            mtu,
            bridge,
            bridge_mac,
        })
    }
}

/// An interface's MTU in this thread's namespace (`SIOCGIFMTU`; sysfs may be another
/// namespace's).
fn interface_mtu(name: &str) -> Option<u16> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        mtu: libc::c_int,
        _pad: [u8; 20],
    }
    let mut req = IfReq {
        name: [0; 16],
        mtu: 0,
        _pad: [0; 20],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= 16 {
        return None;
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: an ioctl on a socket we own and close, with a buffer of ifreq's size.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let rc = libc::ioctl(fd, libc::SIOCGIFMTU, &mut req);
        libc::close(fd);
        (rc == 0).then(|| u16::try_from(req.mtu).unwrap_or(u16::MAX))
    }
}

/// Makes a set map hold exactly `want` (value 1).
fn sync_set(
    map: &mut HashMap<MapData, u32, u32>,
    held: &mut BTreeSet<u32>,
    want: BTreeSet<u32>,
) -> Result<ApplyStats> {
    let want: BTreeMap<u32, u32> = want.into_iter().map(|k| (k, 1)).collect();
    let mut as_map: BTreeMap<u32, u32> = held.iter().map(|k| (*k, 1)).collect();
    let stats = sync_map(map, &mut as_map, want)?;
    *held = as_map.into_keys().collect();
    Ok(stats)
}

fn sync_map<V: aya::Pod + PartialEq>(
    map: &mut HashMap<MapData, u32, V>,
    held: &mut BTreeMap<u32, V>,
    want: BTreeMap<u32, V>,
) -> Result<ApplyStats> {
    let mut stats = ApplyStats::default();
    for (k, v) in &want {
        if held.get(k) != Some(v) {
            map.insert(*k, *v, 0).context("write an ingress map")?;
            stats.writes += 1;
        }
    }
    for k in held.keys() {
        if !want.contains_key(k) {
            maps::ignore_missing(map.remove(k)).context("delete from an ingress map")?;
            stats.deletes += 1;
        }
    }
    *held = want;
    Ok(stats)
}
