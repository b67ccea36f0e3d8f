//! The L7 front end: HTTP(S) routed by host name from Interlock's `com.docker.lb.*`
//! service labels, served by hyper in the meshd process.
//!
//! - `labels`: one service's labels read into a `RouteSpec` (pure, strict).
//! - `compile::l7` turns the specs and the tasks into `Desired` routes, like everything else.
//! - `table`: the routes as requests are matched against them, swapped whole on a change.
//! - `connector`: upstream sockets made inside a namespace on the upstream's network.
//! - `proxy`: the listeners and the request path.
pub mod connector;
pub mod labels;
pub mod proxy;
pub mod table;

use std::{collections::BTreeSet, sync::Arc};

use anyhow::Result;
use tracing::info;

use crate::{
    compile::{Changed, Desired},
    datapath::{Applier, ApplyStats},
};

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
        if !everything && changed.l7.is_empty() && !changed.l7_netns {
            return Ok(ApplyStats::default());
        }
        let old = self.proxy.table.load();
        let table = table::RouteTable::build(
            &desired.l7,
            &desired.l7_netns,
            self.cluster.as_deref(),
            &old,
        );
        let routes = table.len();
        self.proxy.table.store(Arc::new(table));
        let used: BTreeSet<String> = desired.l7_netns.values().cloned().collect();
        self.proxy.namespaces.retain(&used);
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
