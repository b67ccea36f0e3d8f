//! The feed: how every node gets the swarm without reading a manager's Docker API.
//!
//! meshd on a manager reads its own engine and serves what it knows (`hub`) as a stream of
//! changes: a snapshot, then batches, to every other node's meshd (`client`), over mutual
//! TLS with the swarm's own node certificates (`certs`). The managers' engines are read by
//! the managers' meshd only, so their load does not grow with the number of nodes, and no
//! worker holds a credential for a manager's API. Upstream, every node's meshd sends each
//! manager's meshd what only it knows: its standalone containers on swarm networks (so they
//! resolve by name everywhere), its tasks' failing health checks, and hints that one of its
//! task containers changed (tasks have no events of their own).
use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::broadcast;

use crate::model::{Change, ClusterState, NodeReport, RemoteContainer, Resync, SandboxEndpoint};

pub mod certs;
pub mod client;
pub mod diff;
pub mod hub;
pub mod protocol;

/// The feed's default port on managers (next to swarm's 2377).
pub const DEFAULT_PORT: u16 = 2378;

/// What this node reports: containers that are not tasks, on swarm-scoped networks, and
/// tasks it holds back (health check failing, or told to stop).
pub fn report_of(state: &ClusterState, node_id: &str) -> NodeReport {
    let mut containers = Vec::new();
    let mut held_tasks = Vec::new();
    for sb in state.sandboxes.values() {
        if let Some(t) = &sb.task_id {
            if sb.holds_task() {
                held_tasks.push(t.clone());
            }
            continue;
        }
        let endpoints: crate::model::NetMap<SandboxEndpoint> = sb
            .endpoints
            .iter()
            .filter(|(net, _)| state.networks.get(*net).is_some_and(|n| n.scope == "swarm"))
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        if !endpoints.is_empty() {
            containers.push(RemoteContainer {
                container_id: sb.container_id.clone(),
                name: sb.name.clone(),
                hostname: sb.hostname.clone(),
                endpoints,
            });
        }
    }
    containers.sort_by(|a, b| a.container_id.cmp(&b.container_id));
    held_tasks.sort();
    NodeReport {
        node_id: node_id.to_string(),
        containers,
        held_tasks,
    }
}

/// Whether a change belongs in the feed: everything but this node's own containers (local
/// truth, which other nodes learn from its report).
pub fn feeds(change: &Change) -> bool {
    !matches!(
        change,
        Change::PutSandbox(_) | Change::DropSandbox(_) | Change::Resync(Resync::Sandboxes(..))
    ) && !matches!(change, Change::Reject(r) if r.kind == crate::model::Kind::Container)
}

/// Recent batches, encoded once, and the channel live subscribers read.
pub struct FeedLog {
    pub epoch: u64,
    pub seq: u64,
    recent: VecDeque<(u64, Arc<Vec<u8>>)>,
    tx: broadcast::Sender<(u64, Arc<Vec<u8>>)>,
    pub bytes_encoded: u64,
    kept_bytes: usize,
}

/// Batches kept for a subscriber that reconnects (beyond that: a snapshot), by count and by
/// bytes (the first full read is one large batch per slice of services).
const KEEP: usize = 4096;
const KEEP_BYTES: usize = 4 << 20;

impl FeedLog {
    pub fn new() -> FeedLog {
        // A new epoch per process: a subscriber from an earlier one gets a snapshot.
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id());
        // Live subscribers lagging by more than this reconnect and resume from `recent`.
        let (tx, _) = broadcast::channel(1024);
        FeedLog {
            epoch,
            seq: 0,
            recent: VecDeque::new(),
            tx,
            bytes_encoded: 0,
            kept_bytes: 0,
        }
    }

    /// Adds a batch; every live subscriber gets the same bytes.
    pub fn publish(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        self.seq += 1;
        let mut frame = protocol::encode(&protocol::Down::Batch {
            seq: self.seq,
            changes,
        });
        // Kept for a while: without the spare capacity the encoder grew it by.
        frame.shrink_to_fit();
        let frame = Arc::new(frame);
        self.bytes_encoded += frame.len() as u64;
        self.kept_bytes += frame.len();
        self.recent.push_back((self.seq, frame.clone()));
        while self.recent.len() > KEEP || (self.kept_bytes > KEEP_BYTES && self.recent.len() > 1) {
            if let Some((_, f)) = self.recent.pop_front() {
                self.kept_bytes -= f.len();
            }
        }
        let _ = self.tx.send((self.seq, frame));
    }

    /// Whether any subscriber follows the log live.
    pub fn listening(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Changes went by unencoded (nobody was listening): the kept history ends here, so a
    /// subscriber that comes back with an older position gets a snapshot, never a gap.
    pub fn skip(&mut self) {
        self.seq += 1;
        self.recent.clear();
        self.kept_bytes = 0;
    }

    pub fn subscribe(&self) -> broadcast::Receiver<(u64, Arc<Vec<u8>>)> {
        self.tx.subscribe()
    }

    /// The batches after `seq`, if all of them are still kept.
    pub fn since(&self, seq: u64) -> Option<Vec<(u64, Arc<Vec<u8>>)>> {
        if seq > self.seq {
            return None;
        }
        if seq == self.seq {
            return Some(Vec::new());
        }
        let first = self.recent.front()?.0;
        if seq + 1 < first {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|(s, _)| *s > seq)
                .cloned()
                .collect(),
        )
    }
}

impl std::fmt::Debug for FeedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedLog")
            .field("epoch", &self.epoch)
            .field("seq", &self.seq)
            .finish()
    }
}

impl Default for FeedLog {
    fn default() -> Self {
        FeedLog::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{state_tests::*, Change};

    #[test]
    fn a_node_reports_its_plain_containers_on_swarm_networks_and_its_sick_tasks() {
        let mut s = ClusterState::default();
        s.apply(Change::PutNetwork(net("ov")));
        let mut local = net("br");
        local.scope = "local".into();
        s.apply(Change::PutNetwork(local));
        let mut plain = sandbox("c1", 1, &["ov", "br"]);
        for n in ["ov", "br"] {
            plain.endpoints.insert(
                n.into(),
                SandboxEndpoint {
                    addr: Some("10.0.0.9".parse().unwrap()),
                    aliases: vec![],
                },
            );
        }
        s.apply(Change::PutSandbox(plain));
        let mut sick = sandbox("c2", 2, &["ov"]);
        sick.task_id = Some("t9".into());
        sick.health = crate::model::Health::Unhealthy;
        s.apply(Change::PutSandbox(sick));
        let mut stopping = sandbox("c3", 3, &["ov"]);
        stopping.task_id = Some("t8".into());
        stopping.stopping = true;
        s.apply(Change::PutSandbox(stopping));
        let r = report_of(&s, "me");
        assert_eq!(r.containers.len(), 1);
        assert_eq!(
            r.containers[0]
                .endpoints
                .keys()
                .map(|k| &**k)
                .collect::<Vec<_>>(),
            ["ov"]
        );
        assert_eq!(r.held_tasks, ["t8", "t9"]);
    }

    #[test]
    fn the_log_resumes_a_subscriber_or_says_it_cannot() {
        let mut log = FeedLog::new();
        assert_eq!(log.since(0).unwrap().len(), 0);
        for i in 0..3 {
            log.publish(vec![Change::DropTask(format!("t{i}"))]);
        }
        assert_eq!(
            log.since(1)
                .unwrap()
                .iter()
                .map(|b| b.0)
                .collect::<Vec<_>>(),
            [2, 3]
        );
        assert!(
            log.since(9).is_none(),
            "a sequence from the future (another epoch)"
        );
        for i in 0..KEEP {
            log.publish(vec![Change::DropTask(format!("x{i}"))]);
        }
        assert!(log.since(1).is_none(), "too far behind: snapshot");
        assert!(feeds(&Change::DropTask("t".into())));
        assert!(!feeds(&Change::DropSandbox("c".into())));
    }

    #[test]
    fn changes_skipped_unencoded_send_every_earlier_subscriber_to_a_snapshot() {
        let mut log = FeedLog::new();
        log.publish(vec![Change::DropTask("t1".into())]);
        log.publish(vec![Change::DropTask("t2".into())]);
        assert!(!log.listening());
        log.skip();
        assert_eq!(log.seq, 3);
        for seen in [0, 1, 2] {
            assert!(
                log.since(seen).is_none(),
                "from {seen}: a gap, so a snapshot"
            );
        }
        assert_eq!(log.since(3).unwrap().len(), 0, "up to date");
        let rx = log.subscribe();
        assert!(log.listening());
        log.publish(vec![Change::DropTask("t3".into())]);
        assert_eq!(log.since(3).unwrap().len(), 1, "resumes after the skip");
        drop(rx);
    }
}
