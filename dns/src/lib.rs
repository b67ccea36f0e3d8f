//! meshd's embedded DNS: the names of swarm services, tasks and containers, scoped to the
//! networks of the asking container (`records`). The server that answers on 127.0.0.11
//! inside each container's network namespace, and forwarding, build on this.
pub mod answer;
pub mod records;

pub use records::{Entry, Found, Kind, NetworkRecords, Zones};
