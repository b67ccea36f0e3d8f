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

/// Ids below this are counted in a dense array (meshd hands ids out from the bottom, so
/// they are dense: 100 000 counter slots take 400 KB there, 1.6 MB in a map); higher ones,
/// which only a hand-edited map has, in a map.
const DENSE: u32 = 1 << 20;

/// How many entries name each id.
#[derive(Clone, Debug, Default)]
struct Refs {
    dense: Vec<u32>,
    sparse: BTreeMap<u32, u32>,
}

impl Refs {
    /// Counts one more; returns the new count.
    fn add(&mut self, id: u32) -> u32 {
        let n = if id < DENSE {
            let i = id as usize;
            if i >= self.dense.len() {
                self.dense.resize(i + 1, 0);
            }
            &mut self.dense[i]
        } else {
            self.sparse.entry(id).or_insert(0)
        };
        *n += 1;
        *n
    }

    /// Counts one less; returns what is left, or None when nothing named it.
    fn remove(&mut self, id: u32) -> Option<u32> {
        if id < DENSE {
            let n = self.dense.get_mut(id as usize).filter(|n| **n > 0)?;
            *n -= 1;
            let left = *n;
            while self.dense.last() == Some(&0) {
                self.dense.pop();
            }
            Some(left)
        } else {
            let n = self.sparse.get_mut(&id)?;
            *n -= 1;
            let left = *n;
            if left == 0 {
                self.sparse.remove(&id);
            }
            Some(left)
        }
    }

    #[cfg(test)]
    fn contains(&self, id: u32) -> bool {
        self.dense.get(id as usize).is_some_and(|n| *n > 0) || self.sparse.contains_key(&id)
    }

    fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (self.dense.iter().enumerate())
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i as u32, *n))
            .chain(self.sparse.iter().map(|(i, n)| (*i, *n)))
    }
}

#[derive(Clone, Debug)]
pub struct IdSpace {
    /// Entries naming each id in use (an id may be named by several maps).
    refs: Refs,
    /// Unused ids below `high`.
    holes: BTreeSet<u32>,
    /// One above the highest id in use.
    high: u32,
}

impl Default for IdSpace {
    fn default() -> Self {
        IdSpace {
            refs: Refs::default(),
            holes: BTreeSet::new(),
            high: FIRST,
        }
    }
}

/// Equal when the same ids are in use: what is free follows from that.
impl PartialEq for IdSpace {
    fn eq(&self, other: &Self) -> bool {
        self.refs.iter().eq(other.refs.iter())
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
        self.refs.contains(id)
    }

    /// One more entry names `id`.
    pub fn add(&mut self, id: u32) {
        if self.refs.add(id) > 1 {
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
        if self.refs.remove(id) != Some(0) {
            return;
        }
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

    #[test]
    fn ids_beyond_the_dense_range_are_counted_too() {
        let mut r = Refs::default();
        for id in [3, DENSE + 7, DENSE + 7, u32::MAX] {
            r.add(id);
        }
        assert_eq!(
            r.iter().collect::<Vec<_>>(),
            [(3, 1), (DENSE + 7, 2), (u32::MAX, 1)]
        );
        assert_eq!(r.remove(DENSE + 7), Some(1));
        assert_eq!(r.remove(3), Some(0));
        assert_eq!(r.remove(3), None, "nothing names it any more");
        assert!(r.dense.is_empty(), "the dense array shrinks with its top");
        assert!(r.contains(DENSE + 7) && r.contains(u32::MAX) && !r.contains(3));
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
