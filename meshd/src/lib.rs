//! meshd: service networking for Docker Swarm on a kernel datapath.
//!
//! Data flows one way: `source` (Docker API, or a manager's meshd through `feed`) →
//! `model::ClusterState` → `compile` (pure, incremental) → `compile::Desired` → the
//! `datapath` appliers and the `dns` applier, which write only the difference. `daemon`
//! wires it up and runs the reconcile loop; `api` serves `status` to meshctl, `metrics`
//! to Prometheus.
/// The version and the git revision built, as `--version` and `meshctl version` print it.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("MESHD_GIT_REV"), ")");

pub mod api;
pub mod compile;
pub mod daemon;
pub mod datapath;
pub mod dns;
pub mod feed;
pub mod journal;
pub mod l7;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod source;
pub mod status;
