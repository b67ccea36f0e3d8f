//! What meshctl (through `api`) reads: the state and Desired behind one lock, the appliers,
//! and each part's own status. Nothing here changes anything.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use meshd_dns::server::Resolver;
use serde::Serialize;

use crate::{
    compile::Compiler,
    datapath::{choice::Choice, ebpf::EbpfDatapath, ipvs::applier::IpvsApplier, ApplyStats},
    dns::DnsApplier,
    feed::{client::ClientStatus, hub::HubStatus, FeedLog},
    model::ClusterState,
    source::local::SourceStatus,
};

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Latencies kept for `meshctl status` and the benchmarks.
pub const LATENCY_SAMPLES: usize = 1000;

/// The last `LATENCY_SAMPLES` latencies, and how many there were in all.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    recent: VecDeque<Duration>,
    total: u64,
}

impl Samples {
    pub fn push(&mut self, d: Duration) {
        if self.recent.len() == LATENCY_SAMPLES {
            self.recent.pop_front();
        }
        self.recent.push_back(d);
        self.total += 1;
    }

    pub fn len(&self) -> usize {
        self.recent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recent.is_empty()
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LatencySummary {
    /// Samples ever taken (`recent_ms` holds the last of them).
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// The most recent samples, oldest first, in milliseconds.
    pub recent_ms: Vec<f64>,
}

pub fn latency(samples: &Samples) -> LatencySummary {
    let mut v: Vec<f64> = samples
        .recent
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    let recent = v.clone();
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((v.len() as f64 - 1.0) * q).round() as usize]
        }
    };
    LatencySummary {
        samples: samples.total,
        p50_ms: pick(0.5),
        p99_ms: pick(0.99),
        max_ms: v.last().copied().unwrap_or(0.0),
        recent_ms: recent,
    }
}

/// The control plane's product: the state, what it compiles to, and (on managers) the feed.
#[derive(Debug, Default)]
pub struct Core {
    pub state: ClusterState,
    pub compiler: Compiler,
    pub feed: Option<FeedLog>,
}

/// One applier's record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ApplierStatus {
    pub name: String,
    pub applies: u64,
    pub totals: ApplyStats,
    pub last: ApplyStats,
    pub failures: u64,
    pub last_error: Option<String>,
    /// Changes waiting for a retry after a failure.
    pub pending: bool,
}

/// The reconcile loop's record.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReconcileStatus {
    pub batches: u64,
    pub changes: u64,
    pub steps: u64,
    pub sweeps: u64,
    pub appliers: Vec<ApplierStatus>,
    /// Event received → maps written (only steps that wrote something).
    #[serde(skip)]
    pub event_to_map: Samples,
    /// The read that showed a change → maps written: meshd's own part.
    #[serde(skip)]
    pub read_to_map: Samples,
    /// One step: apply the changes, compile, write (only steps that wrote something).
    #[serde(skip)]
    pub step_time: Samples,
    /// The same latencies as Prometheus histograms (`--metrics`).
    #[serde(skip)]
    pub histograms: crate::metrics::Histograms,
    pub last_step_unix_ms: u64,
    /// When every source had been read once and the first full apply was done.
    pub ready_unix_ms: u64,
    /// The compile of everything read, once every source was (before the first apply).
    pub first_compile_ms: f64,
    /// Load balancers compiled while the first read was still coming in (before that).
    pub early_compile_ms: f64,
    /// And written to the appliers that take them early (the kernel maps), meanwhile.
    pub early_apply_ms: f64,
    /// That first apply: how long, how many writes.
    pub first_apply_ms: f64,
    pub first_apply_writes: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DnsStatus {
    pub enabled: bool,
    pub upstreams: Vec<String>,
    pub upstreams_from: String,
    pub config_errors: Vec<String>,
    /// Times the upstream list changed after start (resolv.conf rewritten).
    pub upstream_changes: u64,
}

/// How this meshd learns the swarm.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Not (yet) in a swarm: local containers only.
    #[default]
    Standalone,
    /// A manager: reads its own engine and serves the feed to the other nodes.
    Manager,
    /// Follows a manager's meshd (the feed).
    Feed,
    /// Reads managers' Docker APIs directly (`--manager-api`).
    ManagerApi,
}

#[derive(Debug, Default, Serialize)]
pub struct Identity {
    pub node_id: String,
    pub mode: Mode,
    pub started_unix_ms: u64,
    pub pin_dir: String,
    pub cgroup: String,
}

/// The VIP datapath this node runs.
pub enum VipDatapath {
    Ebpf(Arc<Mutex<EbpfDatapath>>),
    Ipvs(Arc<Mutex<IpvsApplier>>),
}

impl VipDatapath {
    pub fn ebpf(&self) -> Option<&Arc<Mutex<EbpfDatapath>>> {
        match self {
            VipDatapath::Ebpf(e) => Some(e),
            VipDatapath::Ipvs(_) => None,
        }
    }
}

/// Everything the API reads.
pub struct Shared {
    pub core: Arc<RwLock<Core>>,
    pub datapath: VipDatapath,
    /// Which datapath, and why.
    pub choice: Choice,
    pub dns: Option<Arc<Mutex<DnsApplier>>>,
    pub resolver: Option<Arc<Resolver>>,
    pub identity: Mutex<Identity>,
    pub local: Arc<Mutex<SourceStatus>>,
    pub swarm: Arc<Mutex<SourceStatus>>,
    pub feed_client: Arc<Mutex<ClientStatus>>,
    pub hub: Arc<Mutex<HubStatus>>,
    pub reconcile: Arc<Mutex<ReconcileStatus>>,
    pub dns_status: Mutex<DnsStatus>,
    /// The L7 front end, when this node serves it.
    pub l7: Option<crate::l7::L7Handle>,
}
