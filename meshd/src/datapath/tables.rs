//! Desired → the exact entries of the kernel maps. Pure: the eBPF applier diffs these
//! tables against what it read back from the pinned maps and writes only the difference.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use meshd_common::{
    BackendKey, BackendValue, LbMeta, LbValue, MaglevKey, VipKey, VipValue, ID_LEN,
};

use crate::compile::{Desired, LbRef};

/// The address as the kernel holds it in `sock_addr` (network byte order in memory).
pub fn addr_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn addr_from_be(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct KernelTables {
    pub vips: BTreeMap<VipKey, VipValue>,
    pub lbs: BTreeMap<u32, LbValue>,
    pub maglev: BTreeMap<MaglevKey, BackendValue>,
    /// Counter entries that must exist (the programs only increment existing ones).
    pub backend_counters: BTreeMap<BackendKey, ()>,
    pub lb_counters: BTreeMap<u32, ()>,
    pub meta: BTreeMap<u32, LbMeta>,
}

/// Stable numeric ids for load balancers. They live in the kernel (the meta map), so a
/// restarted meshd gets the same ids back and rewrites nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LbIds {
    ids: BTreeMap<LbRef, u32>,
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

pub fn meta_for(r: &LbRef) -> LbMeta {
    LbMeta {
        service_id: id_bytes(&r.service_id),
        network_id: id_bytes(&r.network_id),
    }
}

pub fn ref_from_meta(m: &LbMeta) -> LbRef {
    LbRef {
        service_id: id_string(&m.service_id),
        network_id: id_string(&m.network_id),
    }
}

impl LbIds {
    pub fn from_meta(meta: &BTreeMap<u32, LbMeta>) -> Self {
        Self {
            ids: meta.iter().map(|(&id, m)| (ref_from_meta(m), id)).collect(),
        }
    }

    /// Keeps the ids of load balancers still desired, frees the others, and gives each new
    /// one the lowest free id (0 is never used).
    pub fn assign(&mut self, desired: &Desired) {
        self.ids.retain(|r, _| desired.lbs.contains_key(r));
        let used: BTreeSet<u32> = self.ids.values().copied().collect();
        let mut free = (1u32..).filter(|id| !used.contains(id));
        for r in desired.lbs.keys() {
            if !self.ids.contains_key(r) {
                let id = free.next().expect("u32 ids do not run out");
                self.ids.insert(r.clone(), id);
            }
        }
    }

    pub fn get(&self, r: &LbRef) -> Option<u32> {
        self.ids.get(r).copied()
    }
}

/// The kernel tables for `desired`; every load balancer must have an id in `ids`.
pub fn kernel_tables(desired: &Desired, ids: &LbIds) -> KernelTables {
    let mut t = KernelTables::default();
    for (r, lb) in &desired.lbs {
        let lb_id = ids.get(r).expect("ids assigned before tables are built");
        t.lbs.insert(
            lb_id,
            LbValue {
                vip: addr_be(lb.vip),
                table_size: lb.table_size,
                backend_count: lb.backends.len() as u32,
                flags: 0,
            },
        );
        t.meta.insert(lb_id, meta_for(r));
        t.lb_counters.insert(lb_id, ());
        for b in &lb.backends {
            t.backend_counters.insert(
                BackendKey {
                    lb_id,
                    ip: addr_be(b.ip),
                },
                (),
            );
        }
        for (slot, ip) in lb.slot_addresses() {
            t.maglev.insert(
                MaglevKey { lb_id, slot },
                BackendValue {
                    ip: addr_be(ip),
                    _pad: 0,
                },
            );
        }
    }
    for ((cookie, vip), r) in &desired.vips {
        let lb_id = ids.get(r).expect("ids assigned before tables are built");
        t.vips.insert(
            VipKey {
                netns_cookie: *cookie,
                ip: addr_be(*vip),
                _pad: 0,
            },
            VipValue { lb_id, _pad: 0 },
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Backend, Lb};

    fn lb(vip: &str, backends: &[&str]) -> Lb {
        let backends: Vec<Backend> = backends
            .iter()
            .map(|ip| Backend {
                ip: ip.parse().unwrap(),
                task_id: format!("task-{ip}"),
                node_id: "n1".into(),
                slot: None,
            })
            .collect();
        let size = crate::maglev::table_size(backends.len());
        let names: Vec<[u8; 4]> = backends.iter().map(|b| b.ip.octets()).collect();
        Lb {
            service_name: "web".into(),
            network_name: "front".into(),
            vip: vip.parse().unwrap(),
            table: crate::maglev::build(&names, size),
            table_size: size,
            backends,
        }
    }

    fn r(s: &str) -> LbRef {
        LbRef {
            service_id: s.into(),
            network_id: "net1".into(),
        }
    }

    #[test]
    fn ids_are_stable_and_reused_lowest_first() {
        let mut d = Desired::default();
        d.lbs.insert(r("a"), lb("10.0.0.2", &["10.0.0.5"]));
        d.lbs.insert(r("b"), lb("10.0.0.3", &["10.0.0.6"]));
        let mut ids = LbIds::default();
        ids.assign(&d);
        assert_eq!((ids.get(&r("a")), ids.get(&r("b"))), (Some(1), Some(2)));
        d.lbs.remove(&r("a"));
        d.lbs.insert(r("c"), lb("10.0.0.4", &["10.0.0.7"]));
        ids.assign(&d);
        assert_eq!(
            ids.get(&r("b")),
            Some(2),
            "a kept load balancer keeps its id"
        );
        assert_eq!(ids.get(&r("c")), Some(1), "a freed id is reused");
        assert_eq!(ids.get(&r("a")), None);
    }

    #[test]
    fn ids_survive_a_round_trip_through_the_meta_map() {
        let mut d = Desired::default();
        d.lbs.insert(r("svc-x"), lb("10.0.0.2", &["10.0.0.5"]));
        d.lbs.insert(r("svc-y"), lb("10.0.0.3", &["10.0.0.6"]));
        let mut ids = LbIds::default();
        ids.assign(&d);
        let tables = kernel_tables(&d, &ids);
        let mut adopted = LbIds::from_meta(&tables.meta);
        assert_eq!(adopted, ids);
        adopted.assign(&d);
        assert_eq!(kernel_tables(&d, &adopted), tables);
    }

    #[test]
    fn one_more_backend_touches_a_fraction_of_the_table() {
        let mut d = Desired::default();
        d.lbs.insert(
            r("a"),
            lb(
                "10.0.0.2",
                &["10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8", "10.0.0.9"],
            ),
        );
        let mut ids = LbIds::default();
        ids.assign(&d);
        let before = kernel_tables(&d, &ids);
        d.lbs.insert(
            r("a"),
            lb(
                "10.0.0.2",
                &[
                    "10.0.0.5",
                    "10.0.0.6",
                    "10.0.0.7",
                    "10.0.0.8",
                    "10.0.0.9",
                    "10.0.0.10",
                ],
            ),
        );
        let after = kernel_tables(&d, &ids);
        let changed = crate::diff::diff(&before.maglev, &after.maglev);
        let size = after.maglev.len();
        // 5 → 6 backends keeps the table size; the new one takes about 1/6 of the slots.
        assert_eq!(size, before.maglev.len());
        assert!(changed.removes.is_empty());
        assert!(
            changed.upserts.len() < size / 4,
            "{} of {size}",
            changed.upserts.len()
        );
        assert!(
            changed.upserts.len() > size / 8,
            "{} of {size}",
            changed.upserts.len()
        );
    }

    #[test]
    fn addresses_are_kept_in_network_order() {
        let ip: Ipv4Addr = "10.1.2.3".parse().unwrap();
        assert_eq!(addr_be(ip).to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(addr_from_be(addr_be(ip)), ip);
    }
}
