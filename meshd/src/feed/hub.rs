//! The feed on a manager: accepts other nodes' meshd over mutual TLS, streams the swarm to
//! those that subscribe, and takes what they report.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::broadcast,
};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    certs::{identity, SwarmCerts, SwarmIdentity},
    protocol::{self, Down, Up, VERSION},
};
use crate::{
    model::Change,
    source::{HintTx, Origin, Update, UpdateTx},
};

/// How a subscriber starts: the whole view, or the batches it missed.
pub enum Start {
    Snapshot {
        frame: Vec<u8>,
        seq: u64,
        live: broadcast::Receiver<(u64, Arc<Vec<u8>>)>,
    },
    Resume {
        missed: Vec<(u64, Arc<Vec<u8>>)>,
        seq: u64,
        live: broadcast::Receiver<(u64, Arc<Vec<u8>>)>,
    },
}

/// Given what a subscriber last applied (epoch, seq), how it starts; taken under the same
/// lock as the state changes, so nothing falls between the snapshot and the stream.
pub type StartFn = Arc<dyn Fn(Option<(u64, u64)>) -> Start + Send + Sync>;

#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerStatus {
    pub node_id: String,
    pub role: String,
    pub addr: String,
    pub subscribed: bool,
    pub connected_unix_ms: u64,
    pub bytes_sent: u64,
    pub reports: u64,
    pub hints: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct HubStatus {
    pub listen: String,
    pub peers: BTreeMap<String, PeerStatus>,
    pub refused: u64,
    pub last_refusal: Option<String>,
    pub snapshots: u64,
    pub resumes: u64,
}

/// Why this manager should not serve now (it cannot read its own engine: stopped, or cut
/// off from quorum), or None. Subscribers then move to another manager.
pub type HealthFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

pub struct Hub {
    pub certs: Arc<SwarmCerts>,
    pub start: StartFn,
    pub health: HealthFn,
    pub updates: UpdateTx,
    pub hints: Option<HintTx>,
    pub status: Arc<Mutex<HubStatus>>,
}

const HANDSHAKE: Duration = Duration::from_secs(10);
const PING: Duration = Duration::from_secs(10);

impl Hub {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        self.status.lock().unwrap().listen = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "feed: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let hub = self.clone();
            tokio::spawn(async move {
                if let Err(reason) = hub.session(tcp, peer).await {
                    debug!(%peer, reason, "feed session ended");
                }
            });
        }
    }

    fn refuse(&self, peer: SocketAddr, reason: String) -> String {
        warn!(%peer, reason, "feed: refused a connection");
        let mut st = self.status.lock().unwrap();
        st.refused += 1;
        st.last_refusal = Some(format!("{peer}: {reason}"));
        reason
    }

    async fn session(&self, tcp: TcpStream, peer: SocketAddr) -> Result<(), String> {
        let _ = tcp.set_nodelay(true);
        if let Err(e) = self.certs.reload_if_changed() {
            warn!(error = %format!("{e:#}"), "feed: cannot read renewed certificates; keeping the old ones");
        }
        let Some(server) = self.certs.current().server.clone() else {
            return Err(self.refuse(peer, "this node's certificate is not a manager's".into()));
        };
        let tls = match tokio::time::timeout(HANDSHAKE, TlsAcceptor::from(server).accept(tcp)).await
        {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(self.refuse(peer, format!("TLS: {e}"))),
            Err(_) => return Err(self.refuse(peer, "TLS handshake timed out".into())),
        };
        let who: SwarmIdentity = match tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(identity)
        {
            Some(Ok(id)) => id,
            _ => return Err(self.refuse(peer, "no client certificate".into())),
        };
        let (mut rd, mut wr) = tokio::io::split(tls);
        let hello = match tokio::time::timeout(HANDSHAKE, protocol::read::<_, Up>(&mut rd)).await {
            Ok(Ok(Some(Up::Hello {
                version,
                subscribe,
                resume,
            }))) if version == VERSION => (subscribe, resume),
            Ok(Ok(Some(Up::Hello { version, .. }))) => {
                let reason = format!("feed protocol {version}, this meshd speaks {VERSION}");
                let _ = protocol::write_frame(
                    &mut wr,
                    &protocol::encode(&Down::Refused {
                        reason: reason.clone(),
                    }),
                )
                .await;
                return Err(self.refuse(peer, reason));
            }
            Ok(Ok(_)) => return Err(self.refuse(peer, "no hello".into())),
            Ok(Err(e)) => return Err(self.refuse(peer, e.to_string())),
            Err(_) => return Err(self.refuse(peer, "no hello in time".into())),
        };
        let (subscribe, resume) = hello;
        let key = format!("{}@{peer}", who.node_id);
        info!(node = %who.node_id, role = %who.role, %peer, subscribe, "feed: node connected");
        self.status.lock().unwrap().peers.insert(
            key.clone(),
            PeerStatus {
                node_id: who.node_id.clone(),
                role: who.role.clone(),
                addr: peer.to_string(),
                subscribed: subscribe,
                connected_unix_ms: crate::status::unix_ms(),
                ..Default::default()
            },
        );
        let r = self
            .run_session(&who, &key, subscribe, resume, &mut rd, &mut wr)
            .await;
        self.status.lock().unwrap().peers.remove(&key);
        info!(node = %who.node_id, %peer, "feed: node disconnected");
        r
    }

    async fn run_session<R, W>(
        &self,
        who: &SwarmIdentity,
        key: &str,
        subscribe: bool,
        resume: Option<(u64, u64)>,
        rd: &mut R,
        wr: &mut W,
    ) -> Result<(), String>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let sent = |n: usize| {
            if let Some(p) = self.status.lock().unwrap().peers.get_mut(key) {
                p.bytes_sent += n as u64;
            }
        };
        let mut live = None;
        let mut last_seq = 0;
        if subscribe {
            if let Some(reason) = (self.health)() {
                let f = protocol::encode(&Down::Refused {
                    reason: reason.clone(),
                });
                let _ = protocol::write_frame(wr, &f).await;
                return Err(format!("not serving: {reason}"));
            }
            match (self.start)(resume) {
                Start::Snapshot {
                    frame,
                    seq,
                    live: rx,
                } => {
                    self.status.lock().unwrap().snapshots += 1;
                    protocol::write_frame(wr, &frame)
                        .await
                        .map_err(|e| e.to_string())?;
                    sent(frame.len());
                    last_seq = seq;
                    live = Some(rx);
                }
                Start::Resume {
                    missed,
                    seq,
                    live: rx,
                } => {
                    self.status.lock().unwrap().resumes += 1;
                    for (_, f) in &missed {
                        protocol::write_frame(wr, f)
                            .await
                            .map_err(|e| e.to_string())?;
                        sent(f.len());
                    }
                    last_seq = missed.last().map_or(seq, |m| m.0);
                    live = Some(rx);
                }
            }
        }
        // Each second: is this manager still fit to serve; and a ping when idle.
        let mut ping = tokio::time::interval(Duration::from_secs(1));
        ping.reset();
        let mut last_write = Instant::now();
        loop {
            tokio::select! {
                msg = protocol::read::<_, Up>(rd) => match msg {
                    Ok(Some(Up::Report(r))) => {
                        if r.node_id != who.node_id {
                            return Err(format!("{} sent a report for {}", who.node_id, r.node_id));
                        }
                        if let Some(p) = self.status.lock().unwrap().peers.get_mut(key) {
                            p.reports += 1;
                        }
                        let _ = self.updates.send(Update {
                            changes: vec![Change::PutReport(r)],
                            origin: Some(Instant::now()),
                            read_at: None,
                            from: Origin::Peer,
                            complete: false,
                        });
                    }
                    Ok(Some(Up::Hint(h))) => {
                        if let Some(p) = self.status.lock().unwrap().peers.get_mut(key) {
                            p.hints += 1;
                        }
                        if let Some(tx) = &self.hints {
                            let _ = tx.send(h);
                        }
                    }
                    Ok(Some(Up::Hello { .. })) => return Err("a second hello".into()),
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                },
                batch = async {
                    match live.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => match batch {
                    Ok((seq, frame)) => {
                        if seq <= last_seq {
                            continue;
                        }
                        last_seq = seq;
                        protocol::write_frame(wr, &frame).await.map_err(|e| e.to_string())?;
                        sent(frame.len());
                        last_write = Instant::now();
                    }
                    // Too slow to keep up: it reconnects and resumes, or gets a snapshot.
                    Err(broadcast::error::RecvError::Lagged(n)) => return Err(format!("fell {n} batches behind")),
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = ping.tick() => {
                    if subscribe {
                        if let Some(reason) = (self.health)() {
                            let f = protocol::encode(&Down::Refused { reason: reason.clone() });
                            let _ = protocol::write_frame(wr, &f).await;
                            return Err(format!("stopped serving: {reason}"));
                        }
                    }
                    if last_write.elapsed() >= PING {
                        let f = protocol::encode(&Down::Ping);
                        protocol::write_frame(wr, &f).await.map_err(|e| e.to_string())?;
                        last_write = Instant::now();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{
        feed::{
            certs::{fake::FakeSwarm, MANAGER_OU, WORKER_OU},
            client::snapshot_once,
            FeedLog,
        },
        model::{ClusterState, Resync},
    };

    /// A hub on loopback serving `state`, with the certificate in `dir`.
    async fn hub(
        dir: &Path,
        state: ClusterState,
    ) -> (
        SocketAddr,
        Arc<Mutex<HubStatus>>,
        tokio::task::JoinHandle<()>,
    ) {
        let log = Arc::new(Mutex::new(FeedLog::new()));
        let start: StartFn = Arc::new(move |_| {
            let log = log.lock().unwrap();
            let frame = protocol::encode(&Down::Snapshot {
                epoch: log.epoch,
                seq: log.seq,
                changes: state.snapshot(),
            });
            Start::Snapshot {
                frame,
                seq: log.seq,
                live: log.subscribe(),
            }
        });
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(HubStatus::default()));
        let h = Arc::new(Hub {
            certs: Arc::new(SwarmCerts::load(dir).unwrap()),
            start,
            health: Arc::new(|| None),
            updates: tx,
            hints: None,
            status: status.clone(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, status, tokio::spawn(h.serve(listener)))
    }

    fn some_state() -> ClusterState {
        use crate::model::state_tests::*;
        ClusterState::from_changes([
            Change::PutNetwork(net("n1")),
            Change::Resync(Resync::Services(
                vec![svc("s1", &[("n1", [10, 0, 0, 2])])],
                vec![],
            )),
        ])
    }

    #[tokio::test]
    async fn nodes_of_the_cluster_get_the_swarm_and_others_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let ours = FakeSwarm::new("cluster-a");
        ours.node(&t.path().join("mgr"), "m1", MANAGER_OU);
        ours.node(&t.path().join("wrk"), "w1", WORKER_OU);
        let (addr, status, task) = hub(&t.path().join("mgr"), some_state()).await;

        // A worker of the same swarm gets the snapshot.
        let worker = SwarmCerts::load(&t.path().join("wrk")).unwrap();
        let changes = snapshot_once(&worker, addr).await.unwrap();
        let got = ClusterState::from_changes(changes);
        assert!(got.services.contains_key("s1"));

        // A node of another swarm is refused by the manager during the handshake (even one
        // that trusts this swarm's CA: its own certificate is not this swarm's).
        let other = FakeSwarm::new("cluster-b");
        let alien_dir = t.path().join("alien");
        other.node(&alien_dir, "x1", WORKER_OU);
        std::fs::copy(
            t.path().join("wrk/swarm-root-ca.crt"),
            alien_dir.join("swarm-root-ca.crt"),
        )
        .unwrap();
        let alien = SwarmCerts::load(&alien_dir).unwrap();
        assert!(snapshot_once(&alien, addr).await.is_err());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let st = status.lock().unwrap().clone();
            if st.refused >= 1 {
                assert!(st.last_refusal.unwrap_or_default().contains("TLS"));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never refused: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And one that does not trust this swarm's CA refuses the manager itself.
        other.node(&t.path().join("alien2"), "x2", WORKER_OU);
        let alien2 = SwarmCerts::load(&t.path().join("alien2")).unwrap();
        assert!(snapshot_once(&alien2, addr)
            .await
            .unwrap_err()
            .contains("TLS"));
        task.abort();
    }

    #[tokio::test]
    async fn a_worker_certificate_cannot_pose_as_a_manager() {
        let t = tempfile::tempdir().unwrap();
        let ours = FakeSwarm::new("cluster-a");
        // A "hub" that holds only a worker's certificate: it has no server config at all,
        // and a node refuses it anyway (it checks for the swarm-manager name).
        ours.node(&t.path().join("w2"), "w2", WORKER_OU);
        ours.node(&t.path().join("w3"), "w3", WORKER_OU);
        let impostor = SwarmCerts::load(&t.path().join("w2")).unwrap();
        assert!(impostor.current().server.is_none());
        // Serve TLS with the worker certificate by hand, to see the node refuse it.
        let key_pem = std::fs::read_to_string(t.path().join("w2/swarm-node.key")).unwrap();
        let key_pem: String = key_pem
            .lines()
            .filter(|l| l.starts_with("-----") || !l.contains(':'))
            .collect::<Vec<_>>()
            .join("\n");
        let chain: Vec<_> = rustls_pemfile::certs(
            &mut std::fs::read(t.path().join("w2/swarm-node.crt"))
                .unwrap()
                .as_slice(),
        )
        .collect::<Result<_, _>>()
        .unwrap();
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .unwrap()
            .unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(Arc::new(cfg));
        tokio::spawn(async move {
            if let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let node = SwarmCerts::load(&t.path().join("w3")).unwrap();
        let e = snapshot_once(&node, addr).await.unwrap_err();
        assert!(e.contains("TLS"), "{e}");
    }
}
