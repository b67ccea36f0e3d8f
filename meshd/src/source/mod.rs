//! Where ClusterState comes from. The only code that talks to Docker.
//!
//! - `local`: this node's engine, for its own containers: events followed one container at
//!   a time, so a container's namespace is known at `network connect`, before its
//!   entrypoint runs.
//! - `swarm`: a manager's engine, for services, tasks, networks and nodes: events re-read
//!   the object they name; task changes (which have no events) are followed per service in
//!   a fast window that backs off and stops once the service settles.
//! - the feed (`crate::feed`): on workers, the same view streamed from a manager's meshd.
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::model::Change;

pub mod bridge_leg;
pub mod decode;
pub mod docker_api;
pub mod local;
pub mod managers;
pub mod overlay_peers;
pub mod swarm;

/// A batch of changes one source learned together.
#[derive(Debug)]
pub struct Update {
    pub changes: Vec<Change>,
    /// When the event that led to it arrived (for event → map latency).
    pub origin: Option<Instant>,
    /// When the read that showed it completed (read → map is meshd's own part of the
    /// latency; event → read is how long the engine took to show the change).
    pub read_at: Option<Instant>,
    pub from: Origin,
    /// This update completes a full read by its source: until the local containers and
    /// the swarm have each been read whole once, nothing is applied (a restarted meshd
    /// keeps the pinned maps as they are rather than apply half a picture).
    pub complete: bool,
}

impl Update {
    /// Changes a read just showed (`origin`: the event that led to the read, if any).
    pub fn read(changes: Vec<Change>, origin: Option<Instant>, from: Origin) -> Update {
        Update {
            changes,
            origin,
            read_at: Some(Instant::now()),
            from,
            complete: false,
        }
    }
}

/// Which source an update came from: what the feed passes on to other nodes depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// This node's engine (its containers).
    Local,
    /// A manager's engine (the swarm).
    Swarm,
    /// A manager's meshd (the swarm, and other nodes' reports).
    Feed,
    /// Another node's meshd, uploading its report.
    Peer,
}

/// A nudge that a service's tasks changed somewhere, from a container event on the node
/// that runs the task (a task has no event of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskHint {
    pub service_id: String,
    pub task_id: String,
    /// The container event ("start", "die", "kill", "health_status: healthy", ...).
    pub action: String,
}

pub type UpdateTx = mpsc::UnboundedSender<Update>;
pub type HintTx = mpsc::UnboundedSender<TaskHint>;
