//! The kernel maps as plain data: what meshd believes they hold (read back from bpffs at
//! start and after any failed write), the single-entry operations that change them, and the
//! lookups planning needs. Pure: the same code runs against the real maps (`maps.rs`) and
//! against a copy in tests.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use meshd_common::{
    BackendSlot, BackendValue, LbMeta, LbValue, NetMeta, SandboxValue, VipKey, VipValue, ID_LEN,
};

use super::ids::IdSpace;
use crate::{compile::LbRef, model::repack};

/// The address as the kernel holds it in `sock_addr` (network byte order in memory).
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn addr_from_be(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

fn id_bytes(s: &str) -> [u8; ID_LEN] {
    let mut out = [0u8; ID_LEN];
    let n = s.len().min(ID_LEN);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

fn id_string(b: &[u8; ID_LEN]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(ID_LEN);
    String::from_utf8_lossy(&b[..end]).into_owned()
}

pub fn lb_meta(r: &LbRef) -> LbMeta {
    LbMeta {
        service_id: id_bytes(&r.service_id),
        network_id: id_bytes(&r.network_id),
    }
}

pub fn lb_ref(m: &LbMeta) -> LbRef {
    LbRef {
        service_id: id_string(&m.service_id).into(),
        network_id: id_string(&m.network_id).into(),
    }
}

pub fn net_meta(network_id: &str) -> NetMeta {
    NetMeta {
        network_id: id_bytes(network_id),
    }
}

pub fn net_id(m: &NetMeta) -> String {
    id_string(&m.network_id)
}

/// The network of a load balancer's meta entry.
fn net_id_of(m: &LbMeta) -> String {
    id_string(&m.network_id)
}

/// One write to one map entry. A counter slot is zeroed when it is handed out, so a reused
/// id or slot never starts with another's figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    PutLbMeta(u32, LbMeta),
    PutNetMeta(u32, NetMeta),
    ZeroLbCounter(u32),
    ZeroBackendCounter(u32),
    PutBackend(BackendSlot, BackendValue),
    PutLb(u32, LbValue),
    PutVip(VipKey, VipValue),
    PutSandbox(u64, SandboxValue),
    DelSandbox(u64),
    DelVip(VipKey),
    DelLb(u32),
    DelBackend(BackendSlot),
    DelLbMeta(u32),
    DelNetMeta(u32),
}

impl Op {
    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            Op::DelSandbox(_)
                | Op::DelVip(_)
                | Op::DelLb(_)
                | Op::DelBackend(_)
                | Op::DelLbMeta(_)
                | Op::DelNetMeta(_)
        )
    }
}

/// Everything meshd's VIP maps hold (counters are the kernel's, in arrays, not kept here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelTables {
    pub sandboxes: BTreeMap<u64, SandboxValue>,
    pub vips: BTreeMap<VipKey, VipValue>,
    pub lbs: BTreeMap<u32, LbValue>,
    pub backends: BTreeMap<BackendSlot, BackendValue>,
    pub lb_meta: BTreeMap<u32, LbMeta>,
    pub net_meta: BTreeMap<u32, NetMeta>,
    /// Derived from the tables above. Keyed by the meta entry's bytes, not by `LbRef`:
    /// an `LbRef` made from them is two fresh id allocations (1 MB at 10k services).
    lb_ids: BTreeMap<LbMeta, u32>,
    net_ids: BTreeMap<String, u32>,
    /// Network index → how many VIP entries and sandbox entries name it.
    net_users: BTreeMap<u32, usize>,
    /// Network id → how many load balancers (meta entries) are on it.
    lbs_on_net: BTreeMap<String, usize>,
    /// Ids in use: load-balancer ids (named by a meta, LB or VIP entry), backend counter
    /// slots, network indices.
    used_lb_ids: IdSpace,
    used_counters: IdSpace,
    used_nets: IdSpace,
}

fn count(users: &mut BTreeMap<u32, usize>, net: u32, up: bool) {
    let n = users.entry(net).or_default();
    if up {
        *n += 1;
    } else {
        *n = n.saturating_sub(1);
        if *n == 0 {
            users.remove(&net);
        }
    }
}

impl KernelTables {
    /// Tables as read back from the kernel; the derived lookups are rebuilt.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        sandboxes: BTreeMap<u64, SandboxValue>,
        vips: BTreeMap<VipKey, VipValue>,
        lbs: BTreeMap<u32, LbValue>,
        backends: BTreeMap<BackendSlot, BackendValue>,
        lb_meta: BTreeMap<u32, LbMeta>,
        net_meta: BTreeMap<u32, NetMeta>,
    ) -> KernelTables {
        let mut t = KernelTables {
            backends,
            lbs,
            net_meta,
            ..Default::default()
        };
        t.net_ids = t.net_meta.iter().map(|(&i, m)| (net_id(m), i)).collect();
        t.used_nets = IdSpace::from_ids(t.net_meta.keys().copied());
        t.used_counters = IdSpace::from_ids(t.backends.values().map(|v| v.counter));
        t.used_lb_ids = IdSpace::from_ids(t.lbs.keys().copied());
        for (id, m) in lb_meta {
            t.apply(&Op::PutLbMeta(id, m));
        }
        for (k, v) in vips {
            t.apply(&Op::PutVip(k, v));
        }
        for (c, v) in sandboxes {
            t.apply(&Op::PutSandbox(c, v));
        }
        t
    }

    /// Rebuilds the large maps packed. Entries written in key order (a first apply writes
    /// every load balancer's slots in order) leave a `BTreeMap`'s nodes half full: at
    /// 100 000 backend slots that is 1.5 MB for nothing. A rebuild from sorted entries fills
    /// them; it costs a few milliseconds, once per full apply.
    pub fn compact(&mut self) {
        repack(&mut self.backends);
        repack(&mut self.vips);
        repack(&mut self.lbs);
        repack(&mut self.lb_meta);
        repack(&mut self.lb_ids);
    }

    /// Network indices a sandbox entry names.
    fn sandbox_nets(v: &SandboxValue) -> &[u32] {
        &v.nets[..(v.count as usize).min(v.nets.len())]
    }

    fn count_lb(&mut self, m: &LbMeta, up: bool) {
        let net = net_id_of(m);
        let n = self.lbs_on_net.entry(net.clone()).or_default();
        if up {
            *n += 1;
        } else {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.lbs_on_net.remove(&net);
            }
        }
    }

    /// Load-balancer ids no entry names, lowest first.
    pub fn free_lb_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.used_lb_ids.free()
    }

    /// Counter slots no backend entry uses, lowest first.
    pub fn free_counters(&self) -> impl Iterator<Item = u32> + '_ {
        self.used_counters.free()
    }

    /// Network indices no meta entry holds, lowest first.
    pub fn free_nets(&self) -> impl Iterator<Item = u32> + '_ {
        self.used_nets.free()
    }

    pub fn lb_id(&self, r: &LbRef) -> Option<u32> {
        self.lb_ids.get(&lb_meta(r)).copied()
    }

    /// The load balancers that have a meta entry.
    pub fn lb_refs(&self) -> impl Iterator<Item = LbRef> + '_ {
        self.lb_ids.keys().map(lb_ref)
    }

    pub fn net_index(&self, network_id: &str) -> Option<u32> {
        self.net_ids.get(network_id).copied()
    }

    pub fn net_ids(&self) -> &BTreeMap<String, u32> {
        &self.net_ids
    }

    /// The backend slots of one load balancer, in index order.
    pub fn slots_of(&self, lb_id: u32) -> impl Iterator<Item = (u32, Ipv4Addr)> + '_ {
        self.values_of(lb_id).map(|(i, v)| (i, addr_from_be(v.ip)))
    }

    /// The backend slots of one load balancer with their values, in index order.
    pub fn values_of(&self, lb_id: u32) -> impl Iterator<Item = (u32, BackendValue)> + '_ {
        self.backends
            .range(
                BackendSlot { lb_id, index: 0 }..=BackendSlot {
                    lb_id,
                    index: u32::MAX,
                },
            )
            .map(|(k, v)| (k.index, *v))
    }

    /// Whether any load balancer, VIP entry or sandbox entry still names network index
    /// `net`.
    pub fn net_in_use(&self, net: u32) -> bool {
        self.net_users.contains_key(&net)
            || self
                .net_meta
                .get(&net)
                .is_some_and(|m| self.lbs_on_net.contains_key(&net_id(m)))
    }

    /// Which of `nets` something still names once `ops` (a plan, which writes each key at
    /// most once) are applied: counted from the operations, without copying the tables.
    pub fn nets_in_use_after(&self, ops: &[Op], nets: &BTreeSet<u32>) -> BTreeSet<u32> {
        let mut index: BTreeMap<String, u32> = BTreeMap::new();
        for op in ops {
            if let Op::PutNetMeta(i, m) = op {
                index.insert(net_id(m), *i);
            }
        }
        let net_of = |m: &LbMeta| -> Option<u32> {
            let id = net_id_of(m);
            self.net_ids.get(&id).or_else(|| index.get(&id)).copied()
        };
        let mut users: BTreeMap<u32, i64> = nets
            .iter()
            .map(|&n| {
                let lbs = self
                    .net_meta
                    .get(&n)
                    .and_then(|m| self.lbs_on_net.get(&net_id(m)))
                    .copied()
                    .unwrap_or(0);
                (
                    n,
                    (self.net_users.get(&n).copied().unwrap_or(0) + lbs) as i64,
                )
            })
            .collect();
        let mut bump = |n: u32, d: i64| {
            if let Some(u) = users.get_mut(&n) {
                *u += d;
            }
        };
        for op in ops {
            match op {
                Op::PutVip(k, _) if !self.vips.contains_key(k) => bump(k.net, 1),
                Op::DelVip(k) if self.vips.contains_key(k) => bump(k.net, -1),
                Op::PutSandbox(c, v) => {
                    if let Some(old) = self.sandboxes.get(c) {
                        Self::sandbox_nets(old).iter().for_each(|&n| bump(n, -1));
                    }
                    Self::sandbox_nets(v).iter().for_each(|&n| bump(n, 1));
                }
                Op::DelSandbox(c) => {
                    if let Some(old) = self.sandboxes.get(c) {
                        Self::sandbox_nets(old).iter().for_each(|&n| bump(n, -1));
                    }
                }
                Op::PutLbMeta(id, m) => {
                    if let Some(n) = self.lb_meta.get(id).and_then(net_of) {
                        bump(n, -1);
                    }
                    if let Some(n) = net_of(m) {
                        bump(n, 1);
                    }
                }
                Op::DelLbMeta(id) => {
                    if let Some(n) = self.lb_meta.get(id).and_then(net_of) {
                        bump(n, -1);
                    }
                }
                _ => {}
            }
        }
        users
            .into_iter()
            .filter(|(_, u)| *u > 0)
            .map(|(n, _)| n)
            .collect()
    }

    /// Applies one operation, as the kernel would.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::PutLbMeta(id, m) => {
                if let Some(old) = self.lb_meta.insert(id, m) {
                    self.lb_ids.remove(&old);
                    self.count_lb(&old, false);
                } else {
                    self.used_lb_ids.add(id);
                }
                self.lb_ids.insert(m, id);
                self.count_lb(&m, true);
            }
            Op::PutNetMeta(i, m) => {
                if let Some(old) = self.net_meta.insert(i, m) {
                    self.net_ids.remove(&net_id(&old));
                } else {
                    self.used_nets.add(i);
                }
                self.net_ids.insert(net_id(&m), i);
            }
            Op::ZeroLbCounter(_) | Op::ZeroBackendCounter(_) => {}
            Op::PutBackend(k, v) => {
                if let Some(old) = self.backends.insert(k, v) {
                    self.used_counters.remove(old.counter);
                }
                self.used_counters.add(v.counter);
            }
            Op::PutLb(id, v) => {
                if self.lbs.insert(id, v).is_none() {
                    self.used_lb_ids.add(id);
                }
            }
            Op::PutVip(k, v) => {
                match self.vips.insert(k, v) {
                    Some(old) => self.used_lb_ids.remove(old.lb_id),
                    None => count(&mut self.net_users, k.net, true),
                }
                self.used_lb_ids.add(v.lb_id);
            }
            Op::PutSandbox(c, v) => {
                if let Some(old) = self.sandboxes.insert(c, v) {
                    for &n in Self::sandbox_nets(&old) {
                        count(&mut self.net_users, n, false);
                    }
                }
                for &n in Self::sandbox_nets(&v) {
                    count(&mut self.net_users, n, true);
                }
            }
            Op::DelSandbox(c) => {
                if let Some(old) = self.sandboxes.remove(&c) {
                    for &n in Self::sandbox_nets(&old) {
                        count(&mut self.net_users, n, false);
                    }
                }
            }
            Op::DelVip(k) => {
                if let Some(old) = self.vips.remove(&k) {
                    count(&mut self.net_users, k.net, false);
                    self.used_lb_ids.remove(old.lb_id);
                }
            }
            Op::DelLb(id) => {
                if self.lbs.remove(&id).is_some() {
                    self.used_lb_ids.remove(id);
                }
            }
            Op::DelBackend(k) => {
                if let Some(old) = self.backends.remove(&k) {
                    self.used_counters.remove(old.counter);
                }
            }
            Op::DelLbMeta(id) => {
                if let Some(old) = self.lb_meta.remove(&id) {
                    self.lb_ids.remove(&old);
                    self.count_lb(&old, false);
                    self.used_lb_ids.remove(id);
                }
            }
            Op::DelNetMeta(i) => {
                if let Some(old) = self.net_meta.remove(&i) {
                    self.net_ids.remove(&net_id(&old));
                    self.used_nets.remove(i);
                }
            }
        }
    }

    /// Per VIP map: its name, the entries meshd wrote there, and its capacity.
    pub fn fill(&self) -> [(&'static str, usize, u32); 6] {
        use meshd_common::{capacity as cap, map_names as maps};
        [
            (maps::SANDBOXES, self.sandboxes.len(), cap::SANDBOXES),
            (maps::VIPS, self.vips.len(), cap::VIPS),
            (maps::LBS, self.lbs.len(), cap::LBS),
            (maps::BACKENDS, self.backends.len(), cap::BACKENDS),
            (maps::LB_META, self.lb_meta.len(), cap::LBS),
            (maps::NET_META, self.net_meta.len(), cap::NETWORKS),
        ]
    }

    pub fn entries(&self) -> usize {
        self.sandboxes.len()
            + self.vips.len()
            + self.lbs.len()
            + self.backends.len()
            + self.lb_meta.len()
            + self.net_meta.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_kept_in_network_order() {
        let ip: Ipv4Addr = "10.1.2.3".parse().unwrap();
        assert_eq!(addr_be(ip).to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(addr_from_be(addr_be(ip)), ip);
    }

    #[test]
    fn meta_round_trips_ids_and_keeps_the_lookups() {
        let r = LbRef {
            service_id: "svc-x".into(),
            network_id: "net-y".into(),
        };
        assert_eq!(lb_ref(&lb_meta(&r)), r);
        let mut t = KernelTables::default();
        t.apply(&Op::PutLbMeta(3, lb_meta(&r)));
        t.apply(&Op::PutNetMeta(7, net_meta("net-y")));
        assert_eq!((t.lb_id(&r), t.net_index("net-y")), (Some(3), Some(7)));
        let rebuilt = KernelTables::from_parts(
            t.sandboxes.clone(),
            t.vips.clone(),
            t.lbs.clone(),
            t.backends.clone(),
            t.lb_meta.clone(),
            t.net_meta.clone(),
        );
        assert_eq!(rebuilt, t);
        t.apply(&Op::DelLbMeta(3));
        assert_eq!(t.lb_id(&r), None);
    }
}
