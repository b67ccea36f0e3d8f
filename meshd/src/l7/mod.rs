//! The L7 front end: HTTP(S) routed by host name from Interlock's `com.docker.lb.*`
//! service labels, served by hyper in the meshd process.
//!
//! - `labels`: one service's labels read into a `RouteSpec` (pure, strict).
//! - `compile::l7` turns the specs and the tasks into `Desired` routes, like everything else.
//! - `table`: the routes as requests are matched against them, swapped whole on a change.
//! - `connector`: upstream sockets made inside a namespace on the upstream's network.
//! - `pool`: each worker's idle upstream connections.
//! - `proxy`: the listeners and the request path.
pub mod backend_tls;
pub mod connector;
pub mod labels;
pub mod pool;
pub mod proxy;
pub mod sni;
pub mod stop;
pub mod table;
pub mod tls;

use std::{collections::BTreeSet, sync::Arc};

use anyhow::Result;
use tracing::info;

use crate::{
    compile::{Changed, Desired},
    datapath::{Applier, ApplyStats},
};

/// The running front end, as `meshctl routes` reads it.
pub struct L7Handle {
    pub proxy: Arc<proxy::Proxy>,
    pub http: std::net::SocketAddr,
    pub https: Option<std::net::SocketAddr>,
    pub cluster: Option<String>,
}

/// `meshctl routes`.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct RoutesView {
    /// This node serves L7 routes (`--l7`).
    pub enabled: bool,
    pub http: Option<String>,
    #[serde(default)]
    pub https: Option<String>,
    pub cluster: Option<String>,
    /// Requests being answered now.
    #[serde(default)]
    pub in_flight: usize,
    pub routes: Vec<RouteView>,
    /// Services whose labels give them no route, with the reason.
    pub rejected: Vec<crate::model::Rejected>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RouteView {
    /// Empty for the default backend.
    pub host: String,
    pub path: String,
    pub service: String,
    /// task, vip, or host (a host-mode published port).
    pub mode: String,
    pub network: Option<String>,
    pub backends: Vec<String>,
    pub tls: String,
    pub cluster: Option<String>,
    /// In this node's table (its service cluster is this node's).
    pub served_here: bool,
    pub requests: u64,
    pub errors: u64,
    pub mean_ms: f64,
    /// Time to the response head, over every worker (for the metrics).
    #[serde(skip)]
    pub latency: meshd_dns::latency::LatencyView,
}

impl RoutesView {
    /// The view of what this meshd serves now.
    pub fn of(shared: &crate::status::Shared) -> RoutesView {
        let core = shared.core.read().unwrap();
        RoutesView::build(
            shared.l7.as_ref(),
            core.compiler.desired(),
            &core.state,
            core.compiler.l7_rejected(),
        )
    }

    pub fn build(
        handle: Option<&L7Handle>,
        desired: &Desired,
        state: &crate::model::ClusterState,
        rejected: Vec<crate::model::Rejected>,
    ) -> RoutesView {
        use std::sync::atomic::Ordering;
        // Every worker counts in its own copy of the table: the sums.
        let tables: Vec<_> = handle
            .map(|h| {
                h.proxy
                    .workers
                    .iter()
                    .map(|w| w.table.load_full())
                    .collect()
            })
            .unwrap_or_default();
        type Counts<'a> = (u64, Vec<&'a meshd_dns::latency::Latency>);
        let mut stats: std::collections::HashMap<&str, Counts> = Default::default();
        for t in &tables {
            for s in t.routes() {
                let e = stats.entry(&*s.route.service_id).or_default();
                e.0 += s.stats.errors.load(Ordering::Relaxed);
                e.1.push(&s.stats.latency);
            }
        }
        let mut routes = Vec::new();
        for r in desired.l7.values() {
            let served = stats.get(&*r.service_id);
            let errors = served.map_or(0, |s| s.0);
            let latency = meshd_dns::latency::Latency::view_of(
                served.into_iter().flat_map(|s| &s.1).copied(),
            );
            let requests = latency.count;
            let spec = &r.spec;
            let (mode, network) = match &r.via {
                crate::compile::l7::Via::Host => ("host".to_string(), None),
                crate::compile::l7::Via::Network(n) => (
                    match spec.backend_mode {
                        labels::BackendMode::Task => "task".to_string(),
                        labels::BackendMode::Vip => "vip".to_string(),
                    },
                    Some(
                        state
                            .networks
                            .get(n)
                            .map_or(n.to_string(), |x| x.name.clone()),
                    ),
                ),
            };
            let store = handle.and_then(|h| h.proxy.tls.as_ref());
            let tls = match (&spec.ssl_cert, &spec.ssl_key, store) {
                _ if spec.ssl_passthrough => "passthrough".to_string(),
                (Some(c), Some(k), Some(store)) => {
                    let pair = tls::Pair {
                        cert: c.clone(),
                        key: k.clone(),
                    };
                    match store.problem(&pair) {
                        None if store.serves(&pair) => format!("terminated ({c})"),
                        None => format!("terminated ({c}; not loaded yet)"),
                        Some((e, true)) => format!("terminated ({c}; the last good one: {e})"),
                        Some((e, false)) => format!("none: {e}"),
                    }
                }
                (Some(c), _, None) => {
                    format!("none: {c} named, but this node has no HTTPS listener")
                }
                _ => "none".to_string(),
            };
            // What the upstream leg speaks, after the client's leg.
            let tls = match (spec.ssl_backend, spec.ssl_backend_tls_verify) {
                (false, _) => tls,
                (true, labels::TlsVerify::Required) => format!("{tls}; to the backend: verified"),
                (true, labels::TlsVerify::None) => format!("{tls}; to the backend: unverified"),
            };
            for k in r.keys() {
                routes.push(RouteView {
                    host: k.host,
                    path: k.path,
                    service: r.service_name.to_string(),
                    mode: mode.clone(),
                    network: network.clone(),
                    backends: r.upstreams.iter().map(|u| u.addr.to_string()).collect(),
                    tls: tls.clone(),
                    cluster: spec.service_cluster.clone(),
                    served_here: served.is_some(),
                    requests,
                    errors,
                    mean_ms: if latency.count == 0 {
                        0.0
                    } else {
                        latency.sum_seconds * 1000.0 / latency.count as f64
                    },
                    latency: latency.clone(),
                });
            }
        }
        routes.sort_by(|a, b| (&a.host, &a.path).cmp(&(&b.host, &b.path)));
        RoutesView {
            enabled: handle.is_some(),
            http: handle.map(|h| h.http.to_string()),
            https: handle.and_then(|h| h.https.map(|a| a.to_string())),
            cluster: handle.and_then(|h| h.cluster.clone()),
            in_flight: handle.map_or(0, |h| {
                h.proxy
                    .workers
                    .iter()
                    .map(|w| w.in_flight.load(Ordering::Relaxed))
                    .sum()
            }),
            routes,
            rejected,
        }
    }
}

/// Keeps the proxy's route table in line with `Desired`.
pub struct L7Applier {
    proxy: Arc<proxy::Proxy>,
    /// `--service-cluster`: serve only that cluster's routes.
    cluster: Option<String>,
}

impl L7Applier {
    pub fn new(proxy: Arc<proxy::Proxy>, cluster: Option<String>) -> Self {
        L7Applier { proxy, cluster }
    }
}

impl Applier for L7Applier {
    fn name(&self) -> &'static str {
        "l7"
    }

    fn apply(
        &mut self,
        desired: &Desired,
        changed: &Changed,
        everything: bool,
    ) -> Result<ApplyStats> {
        if everything || changed.ingress_nodes {
            self.proxy
                .nodes
                .store(Arc::new(desired.ingress_nodes.clone()));
        }
        if !everything && changed.l7.is_empty() && !changed.l7_netns {
            return Ok(ApplyStats::default());
        }
        // Each worker's copy, from its own old one (its counters carry over).
        let tables: Vec<table::RouteTable> = self
            .proxy
            .workers
            .iter()
            .map(|w| {
                table::RouteTable::build(
                    &desired.l7,
                    &desired.l7_netns,
                    self.cluster.as_deref(),
                    &w.table.load(),
                )
            })
            .collect();
        let table = &tables[0];
        let routes = table.len();
        if let Some(store) = &self.proxy.tls {
            let mut wanted: std::collections::BTreeMap<tls::Pair, BTreeSet<String>> =
                Default::default();
            for s in table.routes() {
                let spec = &s.route.spec;
                if let (Some(cert), Some(key)) = (&spec.ssl_cert, &spec.ssl_key) {
                    wanted
                        .entry(tls::Pair {
                            cert: cert.clone(),
                            key: key.clone(),
                        })
                        .or_default()
                        .extend(spec.hosts.iter().cloned());
                }
            }
            store.set_wanted(wanted);
        }
        for (w, t) in self.proxy.workers.iter().zip(tables) {
            w.table.store(Arc::new(t));
        }
        info!(
            routes,
            changed = changed.l7.len(),
            "L7: route table swapped"
        );
        Ok(ApplyStats {
            writes: changed.l7.len().max(1),
            ..ApplyStats::default()
        })
    }
}
