//! What to change in one namespace's IPVS table: from the table as the kernel has it (read
//! back at start, which is how a restarted meshd adopts what it left) to the table it should
//! have, the fewest commands. Pure: the applier reads, plans, and sends.
//!
//! Each VIP is one firewall-mark service (the mark is the VIP's own 32 bits: stable across
//! restarts and nodes, with nothing to allocate or remember, and distinct within a namespace
//! because its networks' subnets cannot overlap). Its real servers are the tasks' addresses
//! with port 0 (the port the client asked for, as Docker programs them), reached by NAT.
//! A task shutting down keeps its real server at weight 0 (no new connections, its open
//! ones untouched) until it is gone; one task changing is one command.
use std::{collections::BTreeMap, net::Ipv4Addr};

/// Docker's scheduler, and meshd's: round robin spreads one container's connections over
/// all the tasks. IPVS's Maglev (`mh`) hashes the client's address, so every connection from
/// one container would go to one task unless ports are hashed too, and IPVS keeps each
/// open connection on its real server anyway, which is what consistent hashing would buy.
pub const SCHEDULER: &str = "rr";

/// The firewall mark of a VIP's service.
pub fn fwmark(vip: Ipv4Addr) -> u32 {
    u32::from(vip)
}

/// One namespace's IPVS table: fwmark services and their real servers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub services: BTreeMap<u32, Svc>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Svc {
    pub scheduler: String,
    /// Real server address → weight. Wanted at weight 0: drain it if it is there, do not
    /// add it if it is not.
    pub dests: BTreeMap<Ipv4Addr, u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    NewService {
        fwmark: u32,
        scheduler: String,
    },
    /// The scheduler changed (a restart with another meshd version).
    SetService {
        fwmark: u32,
        scheduler: String,
    },
    /// Takes its real servers with it.
    DelService {
        fwmark: u32,
    },
    NewDest {
        fwmark: u32,
        addr: Ipv4Addr,
        weight: u32,
    },
    SetDest {
        fwmark: u32,
        addr: Ipv4Addr,
        weight: u32,
    },
    DelDest {
        fwmark: u32,
        addr: Ipv4Addr,
    },
}

/// The commands that turn `have` into `want`, in an order the kernel takes (a service
/// before its real servers).
pub fn plan(have: &Table, want: &Table) -> Vec<Op> {
    let mut ops = Vec::new();
    for (&fwmark, w) in &want.services {
        let empty = Svc::default();
        let h = match have.services.get(&fwmark) {
            Some(h) => {
                if h.scheduler != w.scheduler {
                    ops.push(Op::SetService {
                        fwmark,
                        scheduler: w.scheduler.clone(),
                    });
                }
                h
            }
            None => {
                ops.push(Op::NewService {
                    fwmark,
                    scheduler: w.scheduler.clone(),
                });
                &empty
            }
        };
        for (&addr, &weight) in &w.dests {
            match h.dests.get(&addr) {
                None if weight == 0 => {}
                None => ops.push(Op::NewDest {
                    fwmark,
                    addr,
                    weight,
                }),
                Some(&was) if was != weight => ops.push(Op::SetDest {
                    fwmark,
                    addr,
                    weight,
                }),
                Some(_) => {}
            }
        }
        for addr in h.dests.keys() {
            if !w.dests.contains_key(addr) {
                ops.push(Op::DelDest {
                    fwmark,
                    addr: *addr,
                });
            }
        }
    }
    for &fwmark in have.services.keys() {
        if !want.services.contains_key(&fwmark) {
            ops.push(Op::DelService { fwmark });
        }
    }
    ops
}

impl Table {
    /// `ops` done to this table, as the kernel does them (a mirror for tests, and for the
    /// applier to keep what it believes the kernel has).
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match op {
                Op::NewService { fwmark, scheduler } | Op::SetService { fwmark, scheduler } => {
                    self.services.entry(*fwmark).or_default().scheduler = scheduler.clone();
                }
                Op::DelService { fwmark } => {
                    self.services.remove(fwmark);
                }
                Op::NewDest {
                    fwmark,
                    addr,
                    weight,
                }
                | Op::SetDest {
                    fwmark,
                    addr,
                    weight,
                } => {
                    if let Some(s) = self.services.get_mut(fwmark) {
                        s.dests.insert(*addr, *weight);
                    }
                }
                Op::DelDest { fwmark, addr } => {
                    if let Some(s) = self.services.get_mut(fwmark) {
                        s.dests.remove(addr);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn svc(dests: &[(u8, u32)]) -> Svc {
        Svc {
            scheduler: SCHEDULER.into(),
            dests: dests
                .iter()
                .map(|&(i, w)| (Ipv4Addr::new(10, 0, 0, i), w))
                .collect(),
        }
    }

    fn table(services: &[(u32, Svc)]) -> Table {
        Table {
            services: services.iter().cloned().collect(),
        }
    }

    #[test]
    fn one_task_changing_is_one_command() {
        let have = table(&[(1, svc(&[(2, 1), (3, 1), (4, 1)]))]);
        // Scale up by one, a task draining, a task gone: one command each.
        let up = table(&[(1, svc(&[(2, 1), (3, 1), (4, 1), (5, 1)]))]);
        assert_eq!(plan(&have, &up).len(), 1);
        let drain = table(&[(1, svc(&[(2, 1), (3, 0), (4, 1)]))]);
        assert_eq!(
            plan(&have, &drain),
            vec![Op::SetDest {
                fwmark: 1,
                addr: Ipv4Addr::new(10, 0, 0, 3),
                weight: 0
            }]
        );
        let gone = table(&[(1, svc(&[(2, 1), (4, 1)]))]);
        assert_eq!(
            plan(&drain, &gone),
            vec![Op::DelDest {
                fwmark: 1,
                addr: Ipv4Addr::new(10, 0, 0, 3)
            }]
        );
    }

    #[test]
    fn a_draining_task_is_not_added_and_a_gone_service_takes_its_servers() {
        let want = table(&[(1, svc(&[(2, 1), (3, 0)]))]);
        let ops = plan(&Table::default(), &want);
        assert_eq!(ops.len(), 2, "the service and one real server: {ops:?}");
        assert!(matches!(ops[0], Op::NewService { fwmark: 1, .. }));
        assert_eq!(
            plan(&want, &Table::default()),
            vec![Op::DelService { fwmark: 1 }]
        );
    }

    #[test]
    fn marks_are_the_vips_and_a_restart_with_the_same_table_sends_nothing() {
        assert_eq!(fwmark(Ipv4Addr::new(10, 0, 1, 2)), 0x0a00_0102);
        let t = table(&[(7, svc(&[(2, 1)])), (9, svc(&[(3, 1), (4, 0)]))]);
        assert!(plan(&t, &t).is_empty());
    }

    fn arb_table() -> impl Strategy<Value = Table> {
        proptest::collection::btree_map(
            1u32..6,
            (
                prop_oneof![Just("rr".to_string()), Just("mh".to_string())],
                proptest::collection::btree_map(0u8..8, 0u32..3, 0..6),
            ),
            0..5,
        )
        .prop_map(|m| Table {
            services: m
                .into_iter()
                .map(|(k, (scheduler, d))| {
                    let dests = d
                        .into_iter()
                        .map(|(i, w)| (Ipv4Addr::new(10, 0, 0, i), w))
                        .collect();
                    (k, Svc { scheduler, dests })
                })
                .collect(),
        })
    }

    /// What `want` means once applied: weight-0 servers only where they already were.
    fn effective(have: &Table, want: &Table) -> Table {
        let mut t = want.clone();
        for (m, s) in &mut t.services {
            s.dests.retain(|a, w| {
                *w > 0
                    || have
                        .services
                        .get(m)
                        .is_some_and(|h| h.dests.contains_key(a))
            });
        }
        t
    }

    proptest! {
        #[test]
        fn the_plan_turns_any_table_into_any_other(have in arb_table(), want in arb_table()) {
            let ops = plan(&have, &want);
            let mut t = have.clone();
            t.apply(&ops);
            prop_assert_eq!(&t, &effective(&have, &want));
            // Converged: planning again changes nothing.
            prop_assert!(plan(&t, &want).is_empty());
            // No command for a real server whose service is being deleted.
            for op in &ops {
                if let Op::DelDest { fwmark, .. } = op {
                    prop_assert!(want.services.contains_key(fwmark));
                }
            }
        }
    }
}
