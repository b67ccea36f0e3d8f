//! `ClusterState`: the swarm as meshd knows it, plain data with no I/O, changed one
//! `Change` at a time. Each change says what it touched (`Dirty`), so compile redoes only
//! that: a change costs work in proportion to the change, never to the cluster.
mod netmap;
mod objects;
mod state;
mod task_id;
mod tasks;

pub use netmap::NetMap;
pub use objects::*;
pub use state::{Change, ClusterState, Dirty, Resync};
pub use task_id::TaskId;
pub use tasks::Tasks;

#[cfg(test)]
pub(crate) use state::tests as state_tests;

/// Rebuilds `m` with full nodes. Entries put in key order (a full read's objects, a first
/// apply's slots) leave a `BTreeMap`'s nodes about two-thirds full; built from its sorted
/// entries it fills them. Costs a pass over `m`: for after a full read or a full apply.
pub fn repack<K: Ord, V>(m: &mut std::collections::BTreeMap<K, V>) {
    *m = std::mem::take(m).into_iter().collect();
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    #[test]
    fn a_repacked_map_holds_the_same_entries() {
        let mut m: BTreeMap<u32, String> =
            (0..1000).rev().map(|i| (i * 7, i.to_string())).collect();
        m.retain(|k, _| k % 3 != 0);
        let before = m.clone();
        super::repack(&mut m);
        assert_eq!(m, before);
        assert_eq!(m.len(), before.len());
    }
}
