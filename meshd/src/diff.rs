//! The difference between two keyed tables: what an applier writes and deletes to turn the
//! applied table into the desired one, touching nothing that did not change.
use std::collections::BTreeMap;

#[derive(Debug, PartialEq)]
pub struct Diff<K, V> {
    /// Entries to insert or overwrite.
    pub upserts: Vec<(K, V)>,
    /// Keys to delete.
    pub removes: Vec<K>,
}

impl<K, V> Diff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.upserts.len() + self.removes.len()
    }
}

pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    applied: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> Diff<K, V> {
    let upserts = desired
        .iter()
        .filter(|(k, v)| applied.get(k) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let removes = applied
        .keys()
        .filter(|k| !desired.contains_key(k))
        .cloned()
        .collect();
    Diff { upserts, removes }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn apply(mut table: BTreeMap<u16, u8>, d: &Diff<u16, u8>) -> BTreeMap<u16, u8> {
        for k in &d.removes {
            table.remove(k);
        }
        for (k, v) in &d.upserts {
            table.insert(*k, *v);
        }
        table
    }

    proptest! {
        #[test]
        fn applying_the_diff_gives_the_desired_table(
            old in proptest::collection::btree_map(0u16..200, 0u8..4, 0..100),
            new in proptest::collection::btree_map(0u16..200, 0u8..4, 0..100),
        ) {
            let d = diff(&old, &new);
            prop_assert_eq!(apply(old.clone(), &d), new.clone());
            // Minimal: nothing unchanged is written, nothing kept is deleted.
            for (k, v) in &d.upserts { prop_assert_ne!(old.get(k), Some(v)); }
            for k in &d.removes { prop_assert!(!new.contains_key(k)); }
        }

        #[test]
        fn no_change_means_an_empty_diff(
            t in proptest::collection::btree_map(0u16..200, 0u8..4, 0..100),
        ) {
            prop_assert!(diff(&t, &t).is_empty());
        }
    }
}
