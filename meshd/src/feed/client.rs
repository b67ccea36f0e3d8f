//! The feed on every other node: one subscription to a manager's meshd (the first that
//! answers, in order; the next one when it goes), and an upload link to every manager's
//! meshd carrying this node's report and task hints.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    io::{ReadHalf, WriteHalf},
    net::TcpStream,
    sync::{broadcast, watch},
    task::JoinHandle,
};
use tokio_rustls::{client::TlsStream, TlsConnector};
use tracing::{debug, info, warn};

use super::{
    certs::{manager_name, SwarmCerts},
    protocol::{self, Down, Up, VERSION},
};
use crate::{
    model::{Change, NodeReport, Resync},
    source::{Origin, TaskHint, Update, UpdateTx},
};

const CONNECT: Duration = Duration::from_secs(5);
/// A manager pings every 10 s when idle; three missed is a dead link.
const SILENCE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, Default, Serialize)]
pub struct UploadStatus {
    pub connected: bool,
    pub reports: u64,
    pub hints: u64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ClientStatus {
    /// Managers' feed addresses, in order of preference.
    pub hubs: Vec<String>,
    /// The one subscribed to now.
    pub hub: Option<String>,
    pub connected: bool,
    pub epoch: u64,
    pub seq: u64,
    pub snapshots: u64,
    pub batches: u64,
    pub bytes: u64,
    pub last_error: Option<String>,
    pub failovers: u64,
    pub uploads: BTreeMap<String, UploadStatus>,
}

type Tls = TlsStream<TcpStream>;

async fn connect(
    certs: &SwarmCerts,
    addr: SocketAddr,
) -> Result<(ReadHalf<Tls>, WriteHalf<Tls>), String> {
    if let Err(e) = certs.reload_if_changed() {
        warn!(error = %format!("{e:#}"), "feed: cannot read renewed certificates; keeping the old ones");
    }
    let tcp = tokio::time::timeout(CONNECT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect to {addr}: timed out"))?
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let tls = tokio::time::timeout(
        CONNECT,
        TlsConnector::from(certs.current().client.clone()).connect(manager_name(), tcp),
    )
    .await
    .map_err(|_| format!("TLS with {addr}: timed out"))?
    .map_err(|e| format!("TLS with {addr}: {e}"))?;
    Ok(tokio::io::split(tls))
}

/// Changes from the feed, without what concerns this node itself (its own report: its
/// containers are local truth here).
fn without_own(changes: Vec<Change>, me: &str) -> Vec<Change> {
    changes
        .into_iter()
        .filter_map(|c| match c {
            Change::PutReport(r) if r.node_id == me => None,
            Change::DropReport(n) if n == me => None,
            Change::Resync(Resync::Reports(list)) => Some(Change::Resync(Resync::Reports(
                list.into_iter().filter(|r| r.node_id != me).collect(),
            ))),
            other => Some(other),
        })
        .collect()
}

pub struct Subscriber {
    pub certs: Arc<SwarmCerts>,
    pub hubs: watch::Receiver<Vec<SocketAddr>>,
    pub me: String,
    pub updates: UpdateTx,
    pub status: Arc<Mutex<ClientStatus>>,
}

impl Subscriber {
    /// Subscribes to the first manager that answers, moving on when it fails.
    pub async fn run(mut self) {
        let mut resume: Option<(u64, u64)> = None;
        let mut at = 0usize;
        let mut backoff = Duration::from_millis(100);
        loop {
            let hubs = self.hubs.borrow().clone();
            self.status.lock().unwrap().hubs = hubs.iter().map(ToString::to_string).collect();
            if hubs.is_empty() {
                let _ = self.hubs.changed().await;
                continue;
            }
            let addr = hubs[at % hubs.len()];
            let result = self.follow(addr, &mut resume).await;
            // The same failure again (every manager down, retried every few seconds) is
            // logged at debug level: an outage is one line, not one per retry.
            let repeated = {
                let mut st = self.status.lock().unwrap();
                st.connected = false;
                match &result {
                    Err(e) => st.last_error.replace(e.clone()).as_ref() == Some(e),
                    Ok(_) => false,
                }
            };
            match result {
                // It was serving: try it again at once (a restart), then the others.
                Ok(true) => backoff = Duration::from_millis(100),
                _ => {
                    at += 1;
                    self.status.lock().unwrap().failovers += 1;
                    match result {
                        Err(e) if repeated => {
                            debug!(hub = %addr, error = %e, "feed: manager still unreachable")
                        }
                        Err(e) => {
                            warn!(hub = %addr, error = %e, "feed: manager unreachable; trying the next")
                        }
                        Ok(_) => {}
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Follows one manager's feed; Ok(true) when it served a while and then closed.
    async fn follow(
        &mut self,
        addr: SocketAddr,
        resume: &mut Option<(u64, u64)>,
    ) -> Result<bool, String> {
        let (mut rd, mut wr) = connect(&self.certs, addr).await?;
        let hello = protocol::encode(&Up::Hello {
            version: VERSION,
            subscribe: true,
            resume: *resume,
        });
        protocol::write_frame(&mut wr, &hello)
            .await
            .map_err(|e| e.to_string())?;
        let mut served = false;
        loop {
            let msg = tokio::time::timeout(SILENCE, protocol::read::<_, Down>(&mut rd))
                .await
                .map_err(|_| format!("{addr}: silent for {SILENCE:?}"))?
                .map_err(|e| format!("{addr}: {e}"))?;
            let now = Instant::now();
            match msg {
                None => return Ok(served),
                Some(Down::Snapshot {
                    epoch,
                    seq,
                    changes,
                }) => {
                    info!(hub = %addr, seq, objects = changes.len(), "feed: snapshot");
                    *resume = Some((epoch, seq));
                    served = true;
                    {
                        let mut st = self.status.lock().unwrap();
                        st.hub = Some(addr.to_string());
                        st.connected = true;
                        st.last_error = None;
                        st.epoch = epoch;
                        st.seq = seq;
                        st.snapshots += 1;
                    }
                    let _ = self.updates.send(Update {
                        changes: without_own(changes, &self.me),
                        origin: Some(now),
                        read_at: None,
                        from: Origin::Feed,
                        complete: true,
                    });
                }
                Some(Down::Batch { seq, changes }) => {
                    let Some((epoch, last)) = *resume else {
                        return Err(format!("{addr}: a batch before any snapshot"));
                    };
                    if seq != last + 1 {
                        // A gap: start over with a snapshot.
                        *resume = None;
                        return Err(format!("{addr}: batch {seq} after {last}"));
                    }
                    *resume = Some((epoch, seq));
                    served = true;
                    {
                        let mut st = self.status.lock().unwrap();
                        st.hub = Some(addr.to_string());
                        st.connected = true;
                        st.seq = seq;
                        st.batches += 1;
                    }
                    let _ = self.updates.send(Update {
                        changes: without_own(changes, &self.me),
                        origin: Some(now),
                        read_at: None,
                        from: Origin::Feed,
                        complete: false,
                    });
                }
                Some(Down::Ping) => {
                    let mut st = self.status.lock().unwrap();
                    st.hub = Some(addr.to_string());
                    st.connected = true;
                }
                Some(Down::Refused { reason }) => return Err(format!("{addr} refused: {reason}")),
            }
        }
    }
}

/// One snapshot from a manager's feed (`meshd check`).
pub async fn snapshot_once(certs: &SwarmCerts, addr: SocketAddr) -> Result<Vec<Change>, String> {
    let (mut rd, mut wr) = connect(certs, addr).await?;
    let hello = protocol::encode(&Up::Hello {
        version: VERSION,
        subscribe: true,
        resume: None,
    });
    protocol::write_frame(&mut wr, &hello)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match tokio::time::timeout(SILENCE, protocol::read::<_, Down>(&mut rd)).await {
            Err(_) => return Err(format!("{addr}: no snapshot in {SILENCE:?}")),
            Ok(Err(e)) => return Err(format!("{addr}: {e}")),
            Ok(Ok(None)) => return Err(format!("{addr} closed the link")),
            Ok(Ok(Some(Down::Snapshot { changes, .. }))) => return Ok(changes),
            Ok(Ok(Some(Down::Refused { reason }))) => {
                return Err(format!("{addr} refused: {reason}"))
            }
            Ok(Ok(Some(_))) => {}
        }
    }
}

/// Keeps one upload link per manager in `hubs`, started and stopped as the list changes.
pub async fn upload_to_all(
    certs: Arc<SwarmCerts>,
    mut hubs: watch::Receiver<Vec<SocketAddr>>,
    report: watch::Receiver<Option<NodeReport>>,
    hints: broadcast::Sender<TaskHint>,
    status: Arc<Mutex<ClientStatus>>,
) {
    let mut links: BTreeMap<SocketAddr, JoinHandle<()>> = BTreeMap::new();
    loop {
        let want: Vec<SocketAddr> = hubs.borrow().clone();
        links.retain(|addr, task| {
            let keep = want.contains(addr);
            if !keep {
                task.abort();
                status.lock().unwrap().uploads.remove(&addr.to_string());
            }
            keep
        });
        for addr in want {
            links.entry(addr).or_insert_with(|| {
                tokio::spawn(upload(
                    certs.clone(),
                    addr,
                    report.clone(),
                    hints.subscribe(),
                    status.clone(),
                ))
            });
        }
        if hubs.changed().await.is_err() {
            return;
        }
    }
}

/// One manager's upload link: the report on connect and whenever it changes, and hints.
async fn upload(
    certs: Arc<SwarmCerts>,
    addr: SocketAddr,
    mut report: watch::Receiver<Option<NodeReport>>,
    mut hints: broadcast::Receiver<TaskHint>,
    status: Arc<Mutex<ClientStatus>>,
) {
    let key = addr.to_string();
    let set = |f: &dyn Fn(&mut UploadStatus)| {
        let mut st = status.lock().unwrap();
        f(st.uploads.entry(key.clone()).or_default());
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let r: Result<(), String> = async {
            let (mut rd, mut wr) = connect(&certs, addr).await?;
            let hello = protocol::encode(&Up::Hello {
                version: VERSION,
                subscribe: false,
                resume: None,
            });
            protocol::write_frame(&mut wr, &hello).await.map_err(|e| e.to_string())?;
            set(&|u| {
                u.connected = true;
                u.last_error = None;
            });
            let send_report = |r: &Option<NodeReport>| r.as_ref().map(|r| protocol::encode(&Up::Report(r.clone())));
            let first = send_report(&report.borrow_and_update());
            if let Some(f) = first {
                protocol::write_frame(&mut wr, &f).await.map_err(|e| e.to_string())?;
                set(&|u| u.reports += 1);
            }
            loop {
                tokio::select! {
                    changed = report.changed() => {
                        if changed.is_err() { return Ok(()); }
                        let f = send_report(&report.borrow_and_update());
                        if let Some(f) = f {
                            protocol::write_frame(&mut wr, &f).await.map_err(|e| e.to_string())?;
                            set(&|u| u.reports += 1);
                        }
                    }
                    h = hints.recv() => match h {
                        Ok(h) => {
                            protocol::write_frame(&mut wr, &protocol::encode(&Up::Hint(h))).await.map_err(|e| e.to_string())?;
                            set(&|u| u.hints += 1);
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => return Ok(()),
                    },
                    msg = tokio::time::timeout(SILENCE, protocol::read::<_, Down>(&mut rd)) => match msg {
                        Err(_) => return Err(format!("{addr}: silent for {SILENCE:?}")),
                        Ok(Ok(Some(Down::Refused { reason }))) => return Err(format!("{addr} refused: {reason}")),
                        Ok(Ok(Some(_))) => {}
                        Ok(Ok(None)) => return Err(format!("{addr} closed the link")),
                        Ok(Err(e)) => return Err(format!("{addr}: {e}")),
                    },
                }
            }
        }
        .await;
        set(&|u| {
            u.connected = false;
            u.last_error = r.as_ref().err().cloned();
        });
        if let Err(e) = r {
            warn!(hub = %addr, error = %e, "feed: upload link down");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
