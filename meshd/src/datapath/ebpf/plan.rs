//! The write plan: from what the maps hold and what `Desired` wants for the load balancers
//! and sandboxes that changed, the ordered single-entry writes that get there. Pure.
//!
//! The programs read the maps while they are written, so the order is what keeps every
//! intermediate state safe:
//! - meta entries (which name an id or a network index) go in first and come out last, so an
//!   id or index is never handed out again while any entry still uses it (ids freed in this
//!   plan are reusable only by a later one: "held back a generation");
//! - counters, then backend slots, then the load balancer, then its VIP entry, then sandbox
//!   entries: nothing becomes reachable before what it points to exists;
//! - a load balancer growing writes its new slots beyond `count` before raising `count`; one
//!   shrinking rewrites the slots it keeps, then lowers `count`, then deletes the rest, so a
//!   reader only ever picks a backend of the old or the new set, never a hole;
//! - removals run in the reverse order.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use meshd_common::{
    BackendSlot, BackendValue, LbValue, SandboxValue, VipKey, VipValue, MAX_SANDBOX_NETS,
};

use super::tables::{addr_be, lb_meta, net_meta, KernelTables, Op};
use crate::compile::{Changed, Desired, LbRef};

/// Which index each live backend takes: backends that stay keep their index when it is
/// still inside the new count; the others fill the holes, lowest index first.
pub fn assign_slots(current: &[(u32, Ipv4Addr)], wanted: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
    let n = wanted.len() as u32;
    let want: BTreeSet<Ipv4Addr> = wanted.iter().copied().collect();
    let mut out: Vec<Option<Ipv4Addr>> = vec![None; wanted.len()];
    let mut placed = BTreeSet::new();
    for &(idx, ip) in current {
        if idx < n && want.contains(&ip) && out[idx as usize].is_none() && placed.insert(ip) {
            out[idx as usize] = Some(ip);
        }
    }
    let mut movers = wanted.iter().filter(|ip| !placed.contains(*ip));
    out.into_iter()
        .map(|slot| slot.unwrap_or_else(|| *movers.next().expect("one mover per hole")))
        .collect()
}

/// Hands out the lowest ids the kernel tables do not use, each once per plan (an id freed
/// by this plan is not among them: its old entry may still be read until the plan deletes
/// it).
struct Free<'a>(Box<dyn Iterator<Item = u32> + 'a>);

impl<'a> Free<'a> {
    fn new(free: impl Iterator<Item = u32> + 'a) -> Free<'a> {
        Free(Box::new(free))
    }

    fn take(&mut self) -> u32 {
        self.0
            .next()
            .expect("ids above the highest in use never run out")
    }
}

/// Which VIP entries name a load balancer: its own key (network, VIP) in an ordinary plan;
/// every entry naming it when sweeping (a VIP that moved may have left one behind).
enum VipIndex {
    Own,
    All(BTreeMap<u32, Vec<VipKey>>),
}

impl VipIndex {
    fn keys_of(&self, applied: &KernelTables, id: u32) -> Vec<VipKey> {
        match self {
            VipIndex::All(m) => m.get(&id).cloned().unwrap_or_default(),
            VipIndex::Own => {
                let (Some(lb), Some(meta)) = (applied.lbs.get(&id), applied.lb_meta.get(&id))
                else {
                    return Vec::new();
                };
                let Some(net) = applied.net_index(&super::tables::lb_ref(meta).network_id) else {
                    return Vec::new();
                };
                let key = VipKey { net, ip: lb.vip };
                if applied.vips.get(&key).is_some_and(|v| v.lb_id == id) {
                    vec![key]
                } else {
                    Vec::new()
                }
            }
        }
    }
}

/// The writes, by phase: puts in the order of this struct, then deletes.
#[derive(Default)]
struct Phases {
    meta: Vec<Op>,
    counters: Vec<Op>,
    /// Slots beyond the old count and rewrites of kept slots.
    slots: Vec<Op>,
    lbs: Vec<Op>,
    vips: Vec<Op>,
    sandboxes: Vec<Op>,
    del_sandboxes: Vec<Op>,
    del_vips: Vec<Op>,
    del_lbs: Vec<Op>,
    del_slots: Vec<Op>,
    del_meta: Vec<Op>,
}

impl Phases {
    fn into_ops(self) -> Vec<Op> {
        [
            self.meta,
            self.counters,
            self.slots,
            self.lbs,
            self.vips,
            self.sandboxes,
            self.del_sandboxes,
            self.del_vips,
            self.del_lbs,
            self.del_slots,
            self.del_meta,
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Network indices: the ones the tables have, and new ones handed out in this plan.
struct NetIndex<'a> {
    applied: &'a KernelTables,
    free: Free<'a>,
    new: BTreeMap<String, u32>,
}

impl NetIndex<'_> {
    fn get(&mut self, p: &mut Phases, network_id: &str) -> u32 {
        if let Some(i) = self
            .applied
            .net_index(network_id)
            .or_else(|| self.new.get(network_id).copied())
        {
            return i;
        }
        let i = self.free.take();
        p.meta.push(Op::PutNetMeta(i, net_meta(network_id)));
        self.new.insert(network_id.to_string(), i);
        i
    }
}

/// VIP entries are keyed by (network, VIP), not by id: a service recreated with the same VIP
/// takes the entry over. They are decided once every load balancer is planned.
#[derive(Default)]
struct VipEntries {
    want: BTreeMap<VipKey, VipValue>,
    /// Entries that named a load balancer this plan changed or removed.
    maybe_gone: BTreeSet<VipKey>,
}

/// The ordered writes that bring the load balancers and sandboxes `changed` names from what
/// `applied` holds to what `desired` wants. Entries of other load balancers and sandboxes
/// are not looked at; `everything` also sweeps whatever `applied` holds that `desired` does
/// not know (adoption, the periodic full resync).
pub fn plan(
    applied: &KernelTables,
    desired: &Desired,
    changed: &Changed,
    everything: bool,
) -> Vec<Op> {
    let mut lbs: BTreeSet<LbRef> = changed.lbs.clone();
    let mut cookies: BTreeSet<u64> = changed.sandboxes.clone();
    let mut orphan_ids: BTreeSet<u32> = BTreeSet::new();
    if everything {
        lbs.extend(desired.lbs.keys().cloned());
        lbs.extend(applied.lb_refs());
        cookies.extend(desired.sandboxes.keys().copied());
        cookies.extend(applied.sandboxes.keys().copied());
        // Entries whose id has no meta entry (nothing meshd wrote leaves these, but a
        // hand-edited map might): swept too.
        let named = (applied.lbs.keys().copied())
            .chain(applied.backends.keys().map(|k| k.lb_id))
            .chain(applied.vips.values().map(|v| v.lb_id));
        orphan_ids.extend(named.filter(|id| !applied.lb_meta.contains_key(id)));
    }

    let mut p = Phases::default();
    // An id is free only when no entry at all names it (a meta entry, or leftovers of one).
    let mut lb_ids = Free::new(applied.free_lb_ids());
    let mut counters = Free::new(applied.free_counters());
    let index = if everything {
        let mut m: BTreeMap<u32, Vec<VipKey>> = BTreeMap::new();
        for (k, v) in &applied.vips {
            m.entry(v.lb_id).or_default().push(*k);
        }
        VipIndex::All(m)
    } else {
        VipIndex::Own
    };
    let mut nets = NetIndex {
        applied,
        free: Free::new(applied.free_nets()),
        new: BTreeMap::new(),
    };
    let mut vips = VipEntries::default();
    let mut touched_nets: BTreeSet<u32> = BTreeSet::new();

    for r in &lbs {
        match (desired.lbs.get(r), applied.lb_id(r)) {
            (None, None) => {}
            (None, Some(id)) => {
                remove_lb(applied, &index, &mut p, id, &mut vips, &mut touched_nets)
            }
            (Some(lb), id) => {
                let net = nets.get(&mut p, &r.network_id);
                let id = id.unwrap_or_else(|| {
                    let id = lb_ids.take();
                    p.meta.push(Op::PutLbMeta(id, lb_meta(r)));
                    id
                });
                let ips: &[Ipv4Addr] = &lb.backends;
                let lb_is_new = !applied.lbs.contains_key(&id);
                write_lb(
                    applied,
                    &index,
                    &mut p,
                    (id, lb_is_new),
                    net,
                    lb.vip,
                    ips,
                    &mut vips,
                    &mut counters,
                );
            }
        }
    }
    for id in orphan_ids {
        remove_lb(applied, &index, &mut p, id, &mut vips, &mut touched_nets);
    }

    for k in &vips.maybe_gone {
        if !vips.want.contains_key(k) && applied.vips.contains_key(k) {
            touched_nets.insert(k.net);
            p.del_vips.push(Op::DelVip(*k));
        }
    }
    for (k, v) in &vips.want {
        if applied.vips.get(k) != Some(v) {
            p.vips.push(Op::PutVip(*k, *v));
        }
    }

    for cookie in &cookies {
        let old = applied.sandboxes.get(cookie);
        if let Some(old) = old {
            touched_nets.extend(&old.nets[..old.count as usize]);
        }
        match desired.sandboxes.get(cookie) {
            None => {
                if old.is_some() {
                    p.del_sandboxes.push(Op::DelSandbox(*cookie));
                }
            }
            Some(scope) => {
                let mut v = SandboxValue {
                    nets: [0; MAX_SANDBOX_NETS],
                    count: 0,
                    _pad: 0,
                };
                for (i, n) in scope.networks.iter().take(MAX_SANDBOX_NETS).enumerate() {
                    v.nets[i] = nets.get(&mut p, n);
                    v.count = i as u32 + 1;
                }
                if old != Some(&v) {
                    p.sandboxes.push(Op::PutSandbox(*cookie, v));
                }
            }
        }
    }

    // Network indices nothing names once the rest is written go last (every unused one,
    // when sweeping).
    if everything {
        touched_nets.extend(applied.net_meta.keys().copied());
    }
    let mut ops = p.into_ops();
    touched_nets.retain(|n| applied.net_meta.contains_key(n));
    let in_use = applied.nets_in_use_after(&ops, &touched_nets);
    for net in touched_nets.difference(&in_use) {
        ops.push(Op::DelNetMeta(*net));
    }
    ops
}

/// Writes load balancer `id` on network index `net` with these backends, from whatever
/// `applied` holds for it.
#[allow(clippy::too_many_arguments)]
fn write_lb(
    applied: &KernelTables,
    index: &VipIndex,
    p: &mut Phases,
    (id, lb_is_new): (u32, bool),
    net: u32,
    vip: Ipv4Addr,
    ips: &[Ipv4Addr],
    vips: &mut VipEntries,
    counters: &mut Free<'_>,
) {
    let current_values: Vec<(u32, BackendValue)> = applied.values_of(id).collect();
    let current: Vec<(u32, Ipv4Addr)> = current_values
        .iter()
        .map(|(i, v)| (*i, super::tables::addr_from_be(v.ip)))
        .collect();
    let old_value = applied.lbs.get(&id).copied();
    let old_count = old_value.map_or(0, |v| v.count);
    let slots = assign_slots(&current, ips);
    let new_count = slots.len() as u32;

    // A new load balancer's counter starts from zero; each backend keeps its counter slot
    // wherever it moves, and a new one gets a zeroed slot.
    if lb_is_new {
        p.counters.push(Op::ZeroLbCounter(id));
    }
    let mut counter_of: BTreeMap<u32, u32> = current_values
        .iter()
        .map(|(_, v)| (v.ip, v.counter))
        .collect();
    for ip in ips {
        counter_of.entry(addr_be(*ip)).or_insert_with(|| {
            let c = counters.take();
            p.counters.push(Op::ZeroBackendCounter(c));
            c
        });
    }

    // Slots: those beyond the old count first (readers cannot pick them yet), then the
    // rewrites of kept indices.
    let current_map: BTreeMap<u32, BackendValue> = current_values.iter().copied().collect();
    let mut rewrites = Vec::new();
    for (i, ip) in slots.iter().enumerate() {
        let i = i as u32;
        let value = BackendValue {
            ip: addr_be(*ip),
            counter: counter_of[&addr_be(*ip)],
        };
        if current_map.get(&i) == Some(&value) {
            continue;
        }
        let op = Op::PutBackend(
            BackendSlot {
                lb_id: id,
                index: i,
            },
            value,
        );
        if i >= old_count {
            p.slots.push(op);
        } else {
            rewrites.push(op);
        }
    }
    p.slots.extend(rewrites);

    let value = LbValue {
        vip: addr_be(vip),
        count: new_count,
    };
    if old_value != Some(value) {
        p.lbs.push(Op::PutLb(id, value));
    }
    // Any entry naming this id may go (a VIP that moved); the one wanted stays.
    vips.maybe_gone.extend(index.keys_of(applied, id));
    vips.want.insert(
        VipKey {
            net,
            ip: addr_be(vip),
        },
        VipValue { lb_id: id, _pad: 0 },
    );

    // Shrinking: the slots past the new count, after the count came down.
    for (i, _) in current.iter().filter(|(i, _)| *i >= new_count) {
        p.del_slots.push(Op::DelBackend(BackendSlot {
            lb_id: id,
            index: *i,
        }));
    }
}

/// Takes load balancer `id` apart: its VIP entries first, its meta entry last.
fn remove_lb(
    applied: &KernelTables,
    index: &VipIndex,
    p: &mut Phases,
    id: u32,
    vips: &mut VipEntries,
    touched_nets: &mut BTreeSet<u32>,
) {
    vips.maybe_gone.extend(index.keys_of(applied, id));
    if applied.lbs.contains_key(&id) {
        p.del_lbs.push(Op::DelLb(id));
    }
    for (i, _) in applied.slots_of(id) {
        p.del_slots.push(Op::DelBackend(BackendSlot {
            lb_id: id,
            index: i,
        }));
    }
    if let Some(m) = applied.lb_meta.get(&id) {
        if let Some(net) = applied.net_index(&super::tables::lb_ref(m).network_id) {
            touched_nets.insert(net);
        }
        p.del_meta.push(Op::DelLbMeta(id));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::{
        compile::{Lb, SandboxScope},
        datapath::ebpf::tables::{addr_from_be, lb_ref, net_id},
    };

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn r(s: &str, n: &str) -> LbRef {
        LbRef {
            service_id: s.into(),
            network_id: n.into(),
        }
    }

    fn lb(vip: u8, backends: &[u8]) -> Arc<Lb> {
        let mut b: Vec<Ipv4Addr> = backends.iter().map(|&i| ip(i)).collect();
        b.sort();
        b.dedup();
        Arc::new(Lb {
            service_name: "s".into(),
            vip: ip(vip),
            backends: b,
            draining: Vec::new(),
        })
    }

    fn scope(nets: &[&str]) -> Arc<SandboxScope> {
        Arc::new(SandboxScope {
            container_id: "c".into(),
            name: "c".into(),
            netns_path: String::new(),
            networks: nets.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn run(applied: &mut KernelTables, desired: &Desired, changed: &Changed) -> Vec<Op> {
        let ops = plan(applied, desired, changed, false);
        for op in &ops {
            applied.apply(op);
        }
        ops
    }

    /// What a connect from sandbox `cookie` to `vip` would reach: Some(backends) when a
    /// VIP entry answers, in the kernel's own lookup order.
    fn reach(t: &KernelTables, cookie: u64, vip: Ipv4Addr) -> Option<(LbRef, Vec<Ipv4Addr>)> {
        let sb = t.sandboxes.get(&cookie)?;
        let id = sb.nets[..sb.count as usize]
            .iter()
            .find_map(|&net| {
                t.vips.get(&VipKey {
                    net,
                    ip: addr_be(vip),
                })
            })?
            .lb_id;
        let v = t.lbs.get(&id)?;
        if v.vip != addr_be(vip) {
            return None;
        }
        let meta = t.lb_meta.get(&id).expect("a reachable id has meta");
        let ips = (0..v.count)
            .map(|i| {
                addr_from_be(
                    t.backends
                        .get(&BackendSlot {
                            lb_id: id,
                            index: i,
                        })
                        .expect("no hole below count")
                        .ip,
                )
            })
            .collect();
        Some((lb_ref(meta), ips))
    }

    #[test]
    fn slots_stay_put_and_holes_fill_lowest_first() {
        let cur = [(0, ip(5)), (1, ip(6)), (2, ip(7))];
        assert_eq!(
            assign_slots(&cur, &[ip(5), ip(6), ip(7), ip(8)]),
            [ip(5), ip(6), ip(7), ip(8)]
        );
        // 6 goes: 7 (beyond the new count) moves into its hole.
        assert_eq!(assign_slots(&cur, &[ip(5), ip(7)]), [ip(5), ip(7)]);
        assert_eq!(assign_slots(&cur, &[ip(6), ip(7)]), [ip(7), ip(6)]);
        assert!(assign_slots(&cur, &[]).is_empty());
    }

    #[test]
    fn one_task_change_is_a_few_writes() {
        let mut d = Desired::default();
        d.lbs.insert(r("a", "n1"), lb(2, &[5, 6, 7, 8, 9]));
        d.sandboxes.insert(11, scope(&["n1"]));
        let mut t = KernelTables::default();
        run(&mut t, &d, &Changed::everything(&d));
        d.lbs.insert(r("a", "n1"), lb(2, &[5, 6, 8, 9]));
        let ops = run(
            &mut t,
            &d,
            &Changed {
                lbs: [r("a", "n1")].into(),
                ..Default::default()
            },
        );
        // The last slot moves into the hole (with its counter slot), count drops, the old
        // last slot goes.
        assert_eq!(ops.len(), 3, "{ops:?}");
        assert_eq!(reach(&t, 11, ip(2)).unwrap().1.len(), 4);
    }

    #[test]
    fn an_id_freed_in_one_plan_is_not_reused_in_it() {
        let mut d = Desired::default();
        d.lbs.insert(r("a", "n1"), lb(2, &[5]));
        d.sandboxes.insert(11, scope(&["n1"]));
        let mut t = KernelTables::default();
        run(&mut t, &d, &Changed::everything(&d));
        let old_id = t.lb_id(&r("a", "n1")).unwrap();
        // Service a is removed and b created in the same sync.
        d.lbs.clear();
        d.lbs.insert(r("b", "n1"), lb(3, &[6]));
        run(
            &mut t,
            &d,
            &Changed {
                lbs: [r("a", "n1"), r("b", "n1")].into(),
                ..Default::default()
            },
        );
        let new_id = t.lb_id(&r("b", "n1")).unwrap();
        assert_ne!(old_id, new_id);
        assert_eq!(reach(&t, 11, ip(2)), None, "a's VIP reaches nothing");
        // The next plan may reuse it, and its counters start from zero.
        d.lbs.insert(r("c", "n1"), lb(4, &[7]));
        let ops = run(
            &mut t,
            &d,
            &Changed {
                lbs: [r("c", "n1")].into(),
                ..Default::default()
            },
        );
        assert_eq!(t.lb_id(&r("c", "n1")), Some(old_id));
        assert!(ops.contains(&Op::ZeroLbCounter(old_id)));
        let slot = t
            .backends
            .values()
            .find(|v| v.ip == addr_be(ip(7)))
            .unwrap()
            .counter;
        assert!(ops.contains(&Op::ZeroBackendCounter(slot)));
    }

    #[test]
    fn a_network_index_lives_while_anything_names_it() {
        let mut d = Desired::default();
        d.sandboxes.insert(11, scope(&["n1", "n2"]));
        let mut t = KernelTables::default();
        run(&mut t, &d, &Changed::everything(&d));
        assert_eq!(t.net_meta.len(), 2);
        d.sandboxes.insert(11, scope(&["n2"]));
        run(
            &mut t,
            &d,
            &Changed {
                sandboxes: [11].into(),
                ..Default::default()
            },
        );
        let left: Vec<String> = t.net_meta.values().map(net_id).collect();
        assert_eq!(left, ["n2"]);
        d.sandboxes.clear();
        run(
            &mut t,
            &d,
            &Changed {
                sandboxes: [11].into(),
                ..Default::default()
            },
        );
        assert!(t.net_meta.is_empty() && t.sandboxes.is_empty());
    }

    // The model: a few services on a few networks, a few sandboxes; random successive
    // desired states.
    fn arb_desired() -> impl Strategy<Value = Desired> {
        let lbs = proptest::collection::btree_map(
            (0..5u8, 0..3u8),
            (2..6u8, proptest::collection::vec(10..30u8, 0..6)),
            0..6,
        );
        let sbs =
            proptest::collection::btree_map(1..4u64, proptest::collection::vec(0..3u8, 0..3), 0..3);
        (lbs, sbs).prop_map(|(lbs, sbs)| {
            let mut d = Desired::default();
            for ((s, n), (vip, bs)) in lbs {
                // A VIP is unique on its network: derive it from the service too.
                d.lbs
                    .insert(r(&format!("s{s}"), &format!("n{n}")), lb(vip * 10 + s, &bs));
            }
            for (c, nets) in sbs {
                let mut names: Vec<String> = nets.iter().map(|n| format!("n{n}")).collect();
                names.dedup();
                d.sandboxes.insert(
                    c,
                    Arc::new(SandboxScope {
                        container_id: format!("c{c}"),
                        name: format!("c{c}"),
                        netns_path: String::new(),
                        networks: names,
                    }),
                );
            }
            d
        })
    }

    fn changed_between(a: &Desired, b: &Desired) -> Changed {
        let mut c = Changed::default();
        for k in a.lbs.keys().chain(b.lbs.keys()) {
            if a.lbs.get(k) != b.lbs.get(k) {
                c.lbs.insert(k.clone());
            }
        }
        for k in a.sandboxes.keys().chain(b.sandboxes.keys()) {
            if a.sandboxes.get(k) != b.sandboxes.get(k) {
                c.sandboxes.insert(*k);
            }
        }
        c
    }

    /// Invariants that must hold after every single write.
    fn check_safe(t: &KernelTables, old: &Desired, new: &Desired) -> Result<(), TestCaseError> {
        for v in t.vips.values() {
            prop_assert!(
                t.lb_meta.contains_key(&v.lb_id),
                "a VIP names an id without meta"
            );
        }
        for s in t.sandboxes.values() {
            for n in &s.nets[..s.count as usize] {
                prop_assert!(
                    t.net_meta.contains_key(n),
                    "a sandbox names an unknown network"
                );
            }
        }
        for (cookie, _) in t.sandboxes.iter() {
            for vip in t.lbs.values().map(|v| addr_from_be(v.vip)) {
                if let Some((lb, ips)) = reach(t, *cookie, vip) {
                    // Only that service's backends, old or new, are ever reachable.
                    let allowed: BTreeSet<Ipv4Addr> = [old, new]
                        .iter()
                        .filter_map(|d| d.lbs.get(&lb))
                        .flat_map(|l| l.backends.iter().copied())
                        .collect();
                    for ip in ips {
                        prop_assert!(
                            allowed.contains(&ip),
                            "{:?} reached {} outside {:?}",
                            lb,
                            ip,
                            allowed
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// After a whole plan: every sandbox reaches exactly the desired backends of the VIPs
    /// on its networks, and nothing is left that no later plan would look at.
    fn check_final(t: &KernelTables, d: &Desired) -> Result<(), TestCaseError> {
        for (cookie, sc) in &d.sandboxes {
            for (lr, lb) in d
                .lbs
                .iter()
                .filter(|(lr, _)| sc.networks.iter().any(|n| **n == *lr.network_id))
            {
                let first_net = sc
                    .networks
                    .iter()
                    .position(|n| **n == *lr.network_id)
                    .unwrap();
                // Another network earlier in the list with the same VIP answers first.
                let shadowed = d.lbs.iter().any(|(o, ol)| {
                    o != lr
                        && ol.vip == lb.vip
                        && sc
                            .networks
                            .iter()
                            .position(|n| **n == *o.network_id)
                            .is_some_and(|p| p < first_net)
                });
                if shadowed {
                    continue;
                }
                let got = reach(t, *cookie, lb.vip);
                let mut ips = got.as_ref().map(|g| g.1.clone()).unwrap_or_default();
                ips.sort();
                let want: Vec<Ipv4Addr> = lb.backends.clone();
                prop_assert_eq!(got.map(|g| g.0), Some(lr.clone()));
                prop_assert_eq!(ips, want);
            }
        }
        let ids: BTreeSet<u32> = d.lbs.keys().filter_map(|r| t.lb_id(r)).collect();
        prop_assert_eq!(ids.len(), d.lbs.len());
        prop_assert_eq!(
            t.lb_meta.keys().copied().collect::<BTreeSet<_>>(),
            ids.clone()
        );
        prop_assert_eq!(t.lbs.keys().copied().collect::<BTreeSet<_>>(), ids.clone());
        for k in t.backends.keys() {
            prop_assert!(k.index < t.lbs[&k.lb_id].count, "a slot past count");
        }
        // Every live backend has a counter slot of its own.
        let slots: BTreeSet<u32> = t.backends.values().map(|v| v.counter).collect();
        prop_assert_eq!(slots.len(), t.backends.len());
        for n in t.net_meta.keys() {
            prop_assert!(t.net_in_use(*n), "an unused network index is left");
        }
        prop_assert_eq!(t.sandboxes.len(), d.sandboxes.len());
        Ok(())
    }

    proptest! {
        #[test]
        fn every_intermediate_state_is_safe_and_the_end_is_exact(
            steps in proptest::collection::vec(arb_desired(), 1..6)
        ) {
            let mut t = KernelTables::default();
            let mut old = Desired::default();
            for new in steps {
                let ops = plan(&t, &new, &changed_between(&old, &new), false);
                for op in &ops {
                    t.apply(op);
                    check_safe(&t, &old, &new)?;
                }
                check_final(&t, &new)?;
                // Applying the same again writes nothing.
                prop_assert!(plan(&t, &new, &Changed::everything(&new), true).is_empty());
                old = new;
            }
        }

        #[test]
        fn a_write_failing_part_way_leaks_nothing_once_retried(
            a in arb_desired(),
            b in arb_desired(),
            fail_at in 0usize..40,
        ) {
            let mut t = KernelTables::default();
            for op in plan(&t, &a, &Changed::everything(&a), false) {
                t.apply(&op);
            }
            let changed = changed_between(&a, &b);
            let ops = plan(&t, &b, &changed, false);
            // The kernel took the first `fail_at` writes; meshd re-reads the maps (here:
            // the tables as they are) and plans the same change again, sweeping (what the
            // failed plan half-did may be outside `changed`).
            for op in ops.iter().take(fail_at) {
                t.apply(op);
                check_safe(&t, &a, &b)?;
            }
            for op in plan(&t, &b, &changed, true) {
                t.apply(&op);
                check_safe(&t, &a, &b)?;
            }
            check_final(&t, &b)?;
        }

        #[test]
        fn adopting_what_is_pinned_rewrites_nothing(d in arb_desired()) {
            let mut t = KernelTables::default();
            for op in plan(&t, &d, &Changed::everything(&d), false) {
                t.apply(&op);
            }
            // A restarted meshd reads the maps back and plans everything.
            let adopted = KernelTables::from_parts(
                t.sandboxes.clone(), t.vips.clone(), t.lbs.clone(), t.backends.clone(),
                t.lb_meta.clone(), t.net_meta.clone(),
            );
            prop_assert_eq!(&adopted, &t);
            prop_assert!(plan(&adopted, &d, &Changed::everything(&d), true).is_empty());
        }
    }
}
