//! meshd: service networking for Docker Swarm on a kernel datapath.
//!
//! Data flows one way: `source` (Docker API) → `model::ClusterState` → `compile` (pure) →
//! `compile::Desired` → `datapath` appliers, which write only the difference. The same state
//! compiles to DNS names (`dns_zones`), served in every local container (`dns_sandboxes`).
pub mod api;
pub mod compile;
pub mod daemon;
pub mod datapath;
pub mod diff;
pub mod dns_sandboxes;
pub mod dns_zones;
pub mod hostname_template;
pub mod maglev;
pub mod model;
pub mod resolv_conf;
pub mod source;
