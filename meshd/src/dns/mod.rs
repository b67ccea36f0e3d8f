//! meshd's side of the embedded DNS (the `meshd-dns` crate serves): the names per network
//! compiled from ClusterState (`zones`), the sockets in each container (`sandboxes`), the
//! host's upstream resolvers (`resolv_conf`), service `--hostname` templates, and the
//! applier that keeps names, sockets and the redirect (eBPF or nftables) in step.
use std::{collections::BTreeMap, sync::Arc};

use anyhow::{Context, Result};
use meshd_dns::server::Resolver;
use tracing::warn;

use crate::{
    compile::{Changed, Desired},
    datapath::{Applier, ApplyStats, DnsRedirect},
};

pub mod hostname_template;
pub mod resolv_conf;
pub mod sandboxes;
pub mod zones;

use sandboxes::{DnsSandboxes, OpenFailure, SandboxDns};

/// Names, then sockets, then the redirect: a container is never sent to a port with nothing
/// behind it, nor answered from older names than its datapath.
pub struct DnsApplier {
    resolver: Arc<Resolver>,
    sockets: DnsSandboxes,
    redirects: Box<dyn DnsRedirect>,
    /// Containers whose sockets could not be opened (they keep dockerd's resolver); tried
    /// again on every apply.
    failures: BTreeMap<u64, OpenFailure>,
}

impl DnsApplier {
    pub fn new(
        resolver: Arc<Resolver>,
        runtime: tokio::runtime::Handle,
        redirects: Box<dyn DnsRedirect>,
    ) -> DnsApplier {
        DnsApplier {
            sockets: DnsSandboxes::new(resolver.clone(), runtime),
            resolver,
            redirects,
            failures: BTreeMap::new(),
        }
    }

    pub fn served(&self) -> Vec<SandboxDns> {
        self.sockets.view()
    }

    pub fn failures(&self) -> Vec<OpenFailure> {
        self.failures.values().cloned().collect()
    }

    /// Whether some container waits for its sockets (worth another apply soon).
    pub fn has_failures(&self) -> bool {
        !self.failures.is_empty()
    }

    /// A clean stop: every container back to dockerd's resolver, as meshd's sockets close.
    pub fn hand_back(&mut self) -> Result<usize> {
        self.redirects.clear()
    }
}

impl Applier for DnsApplier {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn wants_retry(&self) -> bool {
        self.has_failures()
    }

    fn apply(
        &mut self,
        desired: &Desired,
        changed: &Changed,
        everything: bool,
    ) -> Result<ApplyStats> {
        if everything || !changed.networks.is_empty() {
            self.resolver.zones.store(Arc::new(desired.zones.clone()));
        }
        let mut cookies: Vec<u64> = changed.sandboxes.iter().copied().collect();
        cookies.extend(self.failures.keys().copied());
        if everything {
            cookies.extend(desired.sandboxes.keys().copied());
            cookies.extend(self.sockets.cookies());
            cookies.extend(self.redirects.cookies());
        }
        cookies.sort_unstable();
        cookies.dedup();
        let mut stats = ApplyStats::default();
        let mut first_error = None;
        for cookie in cookies {
            let scope = desired.sandboxes.get(&cookie).map(|s| &**s);
            let path = scope.map_or("", |s| s.netns_path.as_str());
            // Ports an earlier meshd served on, tried first when the sockets are opened.
            let previous = match (scope, self.sockets.ports(cookie)) {
                (Some(_), None) => self.redirects.previous(cookie, path),
                _ => None,
            };
            match self.sockets.sync_one(cookie, scope, previous) {
                Ok(()) => {
                    self.failures.remove(&cookie);
                }
                Err(e) => {
                    let s = scope.expect("only opening can fail");
                    if !self.failures.contains_key(&cookie) {
                        warn!(container = %s.name, error = %format!("{e:#}"), "cannot open DNS sockets; dockerd's resolver answers meanwhile");
                    }
                    self.failures.insert(
                        cookie,
                        OpenFailure {
                            container_id: s.container_id.clone(),
                            name: s.name.clone(),
                            reason: format!("{e:#}"),
                        },
                    );
                }
            }
            let ports = self.sockets.ports(cookie);
            match self
                .redirects
                .set(cookie, path, ports)
                .context("DNS redirect")
            {
                Ok(true) if ports.is_some() => stats.writes += 1,
                Ok(true) => stats.deletes += 1,
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(stats),
        }
    }
}
