//! meshd's embedded DNS: the names of swarm services, tasks and containers, scoped to the
//! networks of the asking container (`records`); the request path from raw bytes
//! (`answer`); forwarding to the host's resolvers (`upstream`); and the server that reads
//! each container's sockets (`server`), timing them (`latency`). meshd opens the sockets inside each container's
//! network namespace and hands them over.
pub mod answer;
pub mod batch;
pub mod latency;
pub mod records;
pub mod server;
pub mod task_names;
pub mod upstream;

pub use records::{Entry, Found, Kind, NetworkRecords, Zones};
pub use task_names::{Slot, TaskNames};
