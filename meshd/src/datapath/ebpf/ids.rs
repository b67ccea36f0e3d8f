//! Which small integer ids of the kernel tables are in use (load-balancer ids, counter
//! slots, network indices), kept in step with the tables, so the lowest free one is found
//! without a pass over them: a one-task change needs a new counter slot, and gathering the
//! 100 000 slots in use for it made that change cost as much as the whole cluster.
use std::collections::{BTreeMap, BTreeSet};

/// Gaps wider than this (only a hand-edited map has them) are not tracked as free ids: ids
/// above the highest in use are handed out instead, which is as correct and bounded.
const MAX_GAP: u32 = 1 << 16;

/// Ids start at 1 (0 means "none" in the kernel maps).
const FIRST: u32 = 1;

#[derive(Clone, Debug)]
pub struct IdSpace {
    /// Entries naming each id in use (an id may be named by several maps).
    refs: BTreeMap<u32, u32>,
    /// Unused ids below `high`.
    holes: BTreeSet<u32>,
    /// One above the highest id in use.
    high: u32,
}

impl Default for IdSpace {
    fn default() -> Self {
        IdSpace {
            refs: BTreeMap::new(),
            holes: BTreeSet::new(),
            high: FIRST,
        }
    }
}

/// Equal when the same ids are in use: what is free follows from that.
impl PartialEq for IdSpace {
    fn eq(&self, other: &Self) -> bool {
        self.refs == other.refs
    }
}

impl Eq for IdSpace {}

impl IdSpace {
    pub fn from_ids(ids: impl IntoIterator<Item = u32>) -> IdSpace {
        let mut s = IdSpace::default();
        for id in ids {
            s.add(id);
        }
        s
    }

    #[cfg(test)]
    pub fn is_used(&self, id: u32) -> bool {
        self.refs.contains_key(&id)
    }

    /// One more entry names `id`.
    pub fn add(&mut self, id: u32) {
        let n = self.refs.entry(id).or_insert(0);
        *n += 1;
        if *n > 1 {
            return;
        }
        if id >= self.high {
            if id - self.high <= MAX_GAP {
                self.holes.extend(self.high..id);
            }
            self.high = id + 1;
        } else {
            self.holes.remove(&id);
        }
    }

    /// One entry naming `id` is gone.
    pub fn remove(&mut self, id: u32) {
        let Some(n) = self.refs.get_mut(&id) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        self.refs.remove(&id);
        if id + 1 == self.high {
            // The top went: so do the free ids right below it.
            self.high = id;
            while let Some(&h) = self.holes.last() {
                if h + 1 != self.high {
                    break;
                }
                self.holes.pop_last();
                self.high = h;
            }
            self.high = self.high.max(FIRST);
        } else if id >= FIRST {
            self.holes.insert(id);
        }
    }

    /// The free ids, lowest first: a plan takes them in turn.
    pub fn free(&self) -> impl Iterator<Item = u32> + '_ {
        self.holes.iter().copied().chain(self.high..)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hands_out_the_lowest_free_id_and_reuses_freed_ones() {
        let mut s = IdSpace::default();
        let first = |s: &IdSpace, n: usize| s.free().take(n).collect::<Vec<_>>();
        assert_eq!(first(&s, 2), [1, 2]);
        for id in 1..=4 {
            s.add(id);
        }
        assert_eq!(first(&s, 1), [5]);
        s.remove(2);
        assert_eq!(first(&s, 2), [2, 5]);
        // Two entries name 3: it stays in use until both are gone.
        s.add(3);
        s.remove(3);
        assert!(s.is_used(3));
        s.remove(3);
        assert!(!s.is_used(3));
        s.remove(4);
        assert_eq!(first(&s, 3), [2, 3, 4]);
    }

    proptest! {
        /// Whatever was added and removed, in any order: the free ids are exactly the ids
        /// not in use, lowest first, and the state depends only on what is in use.
        #[test]
        fn the_free_ids_are_those_not_in_use(
            ops in proptest::collection::vec((any::<bool>(), 1u32..40), 0..200),
        ) {
            let mut s = IdSpace::default();
            let mut model: BTreeMap<u32, u32> = BTreeMap::new();
            for (add, id) in ops {
                if add {
                    s.add(id);
                    *model.entry(id).or_default() += 1;
                } else if let Some(n) = model.get_mut(&id) {
                    s.remove(id);
                    *n -= 1;
                    if *n == 0 {
                        model.remove(&id);
                    }
                }
            }
            let want: Vec<u32> = (1..).filter(|i| !model.contains_key(i)).take(10).collect();
            prop_assert_eq!(s.free().take(10).collect::<Vec<_>>(), want);
            let rebuilt = IdSpace::from_ids(model.iter().flat_map(|(&id, &n)| std::iter::repeat_n(id, n as usize)));
            prop_assert_eq!(&rebuilt.holes, &s.holes);
            prop_assert_eq!(rebuilt.high, s.high);
        }
    }
}
