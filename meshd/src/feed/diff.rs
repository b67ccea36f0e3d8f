//! What of a change the nodes need to hear. The manager's sources re-read whole objects (a
//! service's tasks after each event, everything at a resync); a node that already holds the
//! same state needs only what differs. Every subscriber's state equals the manager's before
//! each batch (it got every batch in order, or a snapshot), so a change is cut down against
//! the manager's state as it was just before applying it.
use std::collections::BTreeSet;

use crate::model::{Change, ClusterState, Kind, Rejected, Resync};

/// `change` as the nodes need it, given `state` before it: nothing when it changes nothing,
/// and for a service's re-read tasks only the tasks that moved.
pub fn minimal(state: &ClusterState, change: &Change) -> Vec<Change> {
    match change {
        Change::ServiceTasks { service_id, tasks } => {
            let keep: BTreeSet<&str> = tasks.iter().map(|t| &*t.id).collect();
            let gone = state
                .tasks_of(service_id)
                .filter(|t| !keep.contains(&*t.id))
                .map(|t| Change::DropTask(t.id.to_string()));
            let moved = tasks
                .iter()
                .filter(|t| state.tasks.get(&t.id) != Some(t))
                .map(|t| Change::PutTask(t.clone()));
            gone.chain(moved).collect()
        }
        Change::PutService(s) if state.services.get(&*s.id) == Some(s) => Vec::new(),
        Change::PutTask(t) if state.tasks.get(&t.id) == Some(t) => Vec::new(),
        Change::PutNetwork(n) if state.networks.get(&*n.id) == Some(n) => Vec::new(),
        Change::PutNode(n) if state.nodes.get(&*n.id) == Some(n) => Vec::new(),
        Change::PutReport(r) if state.reports.get(&r.node_id) == Some(r) => Vec::new(),
        Change::DropService(id) if !state.services.contains_key(id.as_str()) => Vec::new(),
        Change::DropTask(id) if !state.tasks.contains_key(id.as_str()) => Vec::new(),
        Change::DropNetwork(id) if !state.networks.contains_key(id.as_str()) => Vec::new(),
        Change::DropNode(id) if !state.nodes.contains_key(id.as_str()) => Vec::new(),
        Change::DropReport(id) if !state.reports.contains_key(id) => Vec::new(),
        Change::Reject(r) if state.rejected.get(&(r.kind, r.id.clone())) == Some(r) => Vec::new(),
        Change::Resync(r) if resync_changes_nothing(state, r) => Vec::new(),
        other => vec![other.clone()],
    }
}

/// Whether a full read holds exactly what the state does (the periodic resync, nearly
/// always): then no node needs to hear it.
fn resync_changes_nothing(state: &ClusterState, r: &Resync) -> bool {
    let same_rejections = |kind: Kind, list: &[Rejected]| {
        let mut list: Vec<&Rejected> = list.iter().collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list.dedup_by(|a, b| a.id == b.id);
        list.into_iter()
            .eq(state.rejected.values().filter(|r| r.kind == kind))
    };
    macro_rules! same {
        ($list:expr, $map:ident) => {
            $list.len() == state.$map.len()
                && $list.iter().all(|o| state.$map.get(&*o.id) == Some(o))
        };
    }
    match r {
        Resync::Services(list, rej) => same!(list, services) && same_rejections(Kind::Service, rej),
        Resync::Tasks(list, rej) => same!(list, tasks) && same_rejections(Kind::Task, rej),
        Resync::Networks(list, rej) => same!(list, networks) && same_rejections(Kind::Network, rej),
        Resync::Nodes(list, rej) => same!(list, nodes) && same_rejections(Kind::Node, rej),
        Resync::Reports(list) => {
            list.len() == state.reports.len()
                && list
                    .iter()
                    .all(|o| state.reports.get(&o.node_id) == Some(o))
        }
        // This node's own containers never go into the feed.
        Resync::Sandboxes(..) => false,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::state_tests::*;

    /// Tasks as (number, last address byte).
    type Tasks = Vec<(u8, u8)>;

    /// Service s1's tasks before, and as a re-read shows them (some kept, some changed,
    /// some gone, some new).
    fn arb_case() -> impl Strategy<Value = (Tasks, Tasks)> {
        (
            prop::collection::vec((0u8..8, 2u8..6), 0..8),
            prop::collection::vec((0u8..8, 2u8..6), 0..8),
        )
    }

    fn tasks(list: &[(u8, u8)]) -> Vec<crate::model::Task> {
        let mut out: Vec<_> = list
            .iter()
            .map(|&(i, a)| task(&format!("t{i}"), "s1", "n1", "net1", [10, 0, 0, a]))
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| a.id == b.id);
        out
    }

    fn base(before: &[(u8, u8)]) -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(Change::PutNetwork(net("net1")));
        s.apply(Change::PutService(svc("s1", &[("net1", [10, 0, 0, 1])])));
        s.apply(Change::PutService(svc("s2", &[("net1", [10, 0, 0, 9])])));
        s.apply(Change::PutTask(task(
            "other",
            "s2",
            "n1",
            "net1",
            [10, 0, 0, 7],
        )));
        for t in tasks(before) {
            s.apply(Change::PutTask(t));
        }
        s
    }

    proptest! {
        /// A node that applies the minimal change ends where the manager does with the
        /// whole one.
        #[test]
        fn the_minimal_change_leads_to_the_same_state((before, after) in arb_case()) {
            let change = Change::ServiceTasks { service_id: "s1".into(), tasks: tasks(&after) };
            let mut manager = base(&before);
            let mut node = base(&before);
            let small = minimal(&manager, &change);
            manager.apply(change);
            for c in small {
                node.apply(c);
            }
            prop_assert_eq!(node, manager);
        }
    }

    #[test]
    fn a_re_read_that_changes_nothing_sends_nothing() {
        let s = base(&[(1, 2), (2, 3)]);
        let same = Change::ServiceTasks {
            service_id: "s1".into(),
            tasks: tasks(&[(1, 2), (2, 3)]),
        };
        assert!(minimal(&s, &same).is_empty());
        let one_moved = Change::ServiceTasks {
            service_id: "s1".into(),
            tasks: tasks(&[(1, 2), (2, 4)]),
        };
        assert!(matches!(&minimal(&s, &one_moved)[..], [Change::PutTask(t)] if &*t.id == "t2"));
        let services: Vec<_> = s.services.values().cloned().collect();
        assert!(minimal(
            &s,
            &Change::Resync(Resync::Services(services.clone(), vec![]))
        )
        .is_empty());
        let fewer = Change::Resync(Resync::Services(services[..1].to_vec(), vec![]));
        assert_eq!(minimal(&s, &fewer).len(), 1);
    }
}
