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
