//! The IPVS applier: `Desired` into each local sandbox's IPVS table and VIP marks, for the
//! sandboxes a change reaches. What it made in each sandbox is kept (`Known`); a sandbox it
//! has not seen yet, or after an error, is read back from the kernel first, which is how a
//! restarted meshd adopts what it left there without flushing anything.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::File,
    net::Ipv4Addr,
};

use anyhow::{anyhow, Context, Result};
use nix::sched::{setns, CloneFlags};
use tracing::warn;

use super::{
    marks,
    plan::{self, fwmark, Op, Svc, Table, SCHEDULER},
    socket::IpvsSocket,
};
use crate::{
    compile::{Changed, Desired, Lb, LbRef, SandboxScope},
    datapath::{Applier, ApplyStats},
};

/// IPVS's idle timeout for established TCP connections in each sandbox (seconds). The
/// kernel's default is 900 s: a connection idle longer (a database pool overnight, a
/// client whose keep-alive starts at Linux's default 7200 s) is forgotten and its next
/// packet dropped, the best-known complaint about Docker's mesh. A day outlives both; the
/// price is an entry of a few hundred bytes kept that long for a peer that vanished
/// without a FIN or RST.
pub const TCP_IDLE_TIMEOUT: u32 = 86_400;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Known {
    table: Table,
    vips: BTreeSet<Ipv4Addr>,
}

#[derive(Default)]
pub struct IpvsApplier {
    /// By sandbox (network-namespace cookie).
    known: HashMap<u64, Known>,
    /// Network → its load balancers, kept in step from the changes (rebuilt whole on a
    /// full apply), so that a change costs its sandboxes, not every service.
    by_network: HashMap<String, BTreeSet<LbRef>>,
    indexed: bool,
    /// Docker's ingress sandbox, whose IPVS idle timeout meshd has set (see
    /// `ingress_timeout`).
    ingress_sbox: Option<String>,
}

impl IpvsApplier {
    pub fn new() -> IpvsApplier {
        IpvsApplier::default()
    }

    /// What it holds, summed over sandboxes (for `meshctl status`).
    pub fn summary(&self) -> IpvsSummary {
        IpvsSummary {
            sandboxes: self.known.len(),
            services: self.known.values().map(|k| k.table.services.len()).sum(),
            real_servers: self
                .known
                .values()
                .flat_map(|k| k.table.services.values())
                .map(|s| s.dests.len())
                .sum(),
            tcp_idle_timeout_s: TCP_IDLE_TIMEOUT,
            ingress_sbox: self.ingress_sbox.clone(),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IpvsSummary {
    pub sandboxes: usize,
    pub services: usize,
    pub real_servers: usize,
    pub tcp_idle_timeout_s: u32,
    /// Docker's ingress sandbox, given the same idle timeout.
    pub ingress_sbox: Option<String>,
}

/// One sandbox's IPVS service for a VIP, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SandboxIpvs {
    pub sandbox: String,
    pub fwmark: u32,
    pub scheduler: String,
    pub real_servers: Vec<RealServer>,
    /// Why the kernel could not be read (the service is missing, the namespace is gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RealServer {
    pub addr: Ipv4Addr,
    pub weight: u32,
    pub active_conns: u32,
    pub inactive_conns: u32,
}

/// The connections IPVS tracks now (active + inactive), by load balancer and by real
/// server, summed over these sandboxes (name, namespace path): what `meshctl services`
/// shows where the eBPF datapath shows connections made. A sandbox that cannot be read is
/// left out.
pub fn counters(
    lbs: &BTreeMap<LbRef, std::sync::Arc<Lb>>,
    sandboxes: &[(String, String)],
) -> crate::datapath::ebpf::Counters {
    let mut by_mark: HashMap<(u32, Ipv4Addr), u64> = HashMap::new();
    for (_, path) in sandboxes {
        let read = in_netns(path, || {
            let mut s = IpvsSocket::open()?;
            let marks: Vec<u32> = s.table()?.services.into_keys().collect();
            let mut out = Vec::new();
            for m in marks {
                out.extend(s.dests(m)?.into_iter().map(|d| (m, d)));
            }
            Ok(out)
        });
        for (m, d) in read.into_iter().flatten() {
            *by_mark.entry((m, d.addr)).or_default() +=
                u64::from(d.active_conns) + u64::from(d.inactive_conns);
        }
    }
    let mut out = crate::datapath::ebpf::Counters::default();
    for (r, lb) in lbs {
        let mark = fwmark(lb.vip);
        for ip in lb.backends.iter().chain(&lb.draining) {
            let n = by_mark.get(&(mark, *ip)).copied().unwrap_or(0);
            out.per_backend.insert((r.clone(), *ip), n);
            *out.per_lb.entry(r.clone()).or_default() += n;
        }
    }
    out
}

/// The IPVS service of `vip` in each of these sandboxes, read from the kernel now (with
/// its connection counts). Runs outside the applier's lock: it only reads.
pub fn view(vip: Ipv4Addr, sandboxes: &[(String, String)]) -> Vec<SandboxIpvs> {
    let mark = fwmark(vip);
    sandboxes
        .iter()
        .map(|(name, path)| {
            let read = in_netns(path, || {
                let mut s = IpvsSocket::open()?;
                let table = s.table()?;
                let svc = table
                    .services
                    .get(&mark)
                    .with_context(|| format!("no IPVS service for fwmark {mark:#010x}"))?;
                Ok((svc.scheduler.clone(), s.dests(mark)?))
            });
            match read {
                Ok((scheduler, dests)) => SandboxIpvs {
                    sandbox: name.clone(),
                    fwmark: mark,
                    scheduler,
                    real_servers: dests
                        .into_iter()
                        .map(|d| RealServer {
                            addr: d.addr,
                            weight: d.weight,
                            active_conns: d.active_conns,
                            inactive_conns: d.inactive_conns,
                        })
                        .collect(),
                    error: None,
                },
                Err(e) => SandboxIpvs {
                    sandbox: name.clone(),
                    fwmark: mark,
                    scheduler: String::new(),
                    real_servers: vec![],
                    error: Some(format!("{e:#}")),
                },
            }
        })
        .collect()
}

/// What one sandbox's IPVS should hold: a service per VIP on its networks, the live
/// backends at weight 1, the draining ones at 0 (kept where they are, never added).
fn wanted(
    scope: &SandboxScope,
    by_network: &HashMap<String, BTreeSet<LbRef>>,
    lbs: &BTreeMap<LbRef, std::sync::Arc<Lb>>,
) -> Known {
    let mut k = Known::default();
    for n in &scope.networks {
        let refs = by_network.get(n.as_str()).into_iter().flatten();
        for lb in refs.filter_map(|r| lbs.get(r)) {
            k.vips.insert(lb.vip);
            k.table.services.insert(
                fwmark(lb.vip),
                Svc {
                    scheduler: SCHEDULER.into(),
                    dests: lb
                        .draining
                        .iter()
                        .map(|b| (*b, 0))
                        .chain(lb.backends.iter().map(|b| (*b, 1)))
                        .collect(),
                },
            );
        }
    }
    k
}

/// Runs `f` on a thread that has joined the namespace at `path` (a netlink socket, and a
/// child process, belong to the namespace of the thread that makes them).
fn in_netns<T: Send>(path: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(path).with_context(|| format!("open netns {path}"))?;
            setns(&ns, CloneFlags::CLONE_NEWNET).with_context(|| format!("join netns {path}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("the IPVS thread for {path} panicked"))?
    })
}

/// Brings one namespace from `have` (None: read it from the kernel) to `want`; returns
/// what it holds after, and the commands sent.
fn converge(path: &str, have: Option<&Known>, want: &Known) -> Result<(Known, Vec<Op>)> {
    in_netns(path, || {
        let mut s = IpvsSocket::open()?;
        let (table, vips) = match have {
            Some(k) => (k.table.clone(), Some(&k.vips)),
            None => {
                if s.timeouts()?.0 != TCP_IDLE_TIMEOUT {
                    s.set_timeouts(TCP_IDLE_TIMEOUT, 0, 0)?;
                }
                (s.table()?, None)
            }
        };
        let ops = plan::plan(&table, &want.table);
        for op in &ops {
            s.exec(op).with_context(|| format!("in {path}"))?;
        }
        if vips != Some(&want.vips) {
            let v: Vec<Ipv4Addr> = want.vips.iter().copied().collect();
            marks::apply(&v).with_context(|| format!("the VIP marks in {path}"))?;
        }
        let mut after = table;
        after.apply(&ops);
        Ok((
            Known {
                table: after,
                vips: want.vips.clone(),
            },
            ops,
        ))
    })
}

/// Docker's own ingress (published ports) runs on IPVS in its `ingress_sbox` namespace,
/// next to the containers' ones; meshd leaves it to Docker but gives it the same idle
/// timeout, so that published ports keep idle connections too. Returns the namespace's
/// path once it is set there.
fn ingress_timeout(desired: &Desired) -> Option<String> {
    let dir = desired
        .sandboxes
        .values()
        .find_map(|s| std::path::Path::new(&s.netns_path).parent())?;
    let path = dir.join("ingress_sbox");
    if !path.exists() {
        return None;
    }
    let shown = path.display().to_string();
    let set = in_netns(&shown, || {
        let mut s = IpvsSocket::open()?;
        if s.timeouts()?.0 != TCP_IDLE_TIMEOUT {
            s.set_timeouts(TCP_IDLE_TIMEOUT, 0, 0)?;
        }
        Ok(())
    });
    match set {
        Ok(()) => Some(shown),
        Err(e) => {
            warn!(sandbox = %shown, error = %format!("{e:#}"), "IPVS: cannot set the ingress sandbox's idle timeout");
            None
        }
    }
}

impl Applier for IpvsApplier {
    fn name(&self) -> &'static str {
        "ipvs"
    }

    fn apply(
        &mut self,
        desired: &Desired,
        changed: &Changed,
        everything: bool,
    ) -> Result<ApplyStats> {
        self.known.retain(|c, _| desired.sandboxes.contains_key(c));
        // Until it is set once (Docker makes it when the node joins a swarm), then at each
        // full pass (it is made again when the node leaves and rejoins).
        if everything || self.ingress_sbox.is_none() {
            self.ingress_sbox = ingress_timeout(desired);
        }
        if everything || !self.indexed {
            self.by_network.clear();
            for r in desired.lbs.keys() {
                self.by_network
                    .entry(r.network_id.to_string())
                    .or_default()
                    .insert(r.clone());
            }
            self.indexed = true;
        } else {
            for r in &changed.lbs {
                let set = self.by_network.entry(r.network_id.to_string()).or_default();
                if desired.lbs.contains_key(r) {
                    set.insert(r.clone());
                } else {
                    set.remove(r);
                }
            }
            self.by_network.retain(|_, set| !set.is_empty());
        }
        let networks: BTreeSet<&str> = changed
            .lbs
            .iter()
            .map(|r: &LbRef| &*r.network_id)
            .chain(changed.networks.iter().map(String::as_str))
            .collect();
        let touched: Vec<(&u64, &std::sync::Arc<SandboxScope>)> = desired
            .sandboxes
            .iter()
            .filter(|(c, s)| {
                everything
                    || changed.sandboxes.contains(c)
                    || !self.known.contains_key(c)
                    || s.networks.iter().any(|n| networks.contains(n.as_str()))
            })
            .filter(|(_, s)| !s.netns_path.is_empty())
            .collect();
        let mut stats = ApplyStats::default();
        if touched.is_empty() {
            return Ok(stats);
        }
        let mut failed = BTreeMap::new();
        for (cookie, scope) in touched {
            let want = wanted(scope, &self.by_network, &desired.lbs);
            let have = if everything {
                None
            } else {
                self.known.get(cookie)
            };
            match converge(&scope.netns_path, have, &want) {
                Ok((after, ops)) => {
                    for op in &ops {
                        match op {
                            Op::DelDest { .. } | Op::DelService { .. } => stats.deletes += 1,
                            _ => stats.writes += 1,
                        }
                    }
                    self.known.insert(*cookie, after);
                }
                Err(e) => {
                    // Read back next time: the kernel may hold part of it.
                    self.known.remove(cookie);
                    warn!(sandbox = %scope.name, error = %format!("{e:#}"), "IPVS: could not apply");
                    failed.insert(scope.name.clone(), format!("{e:#}"));
                }
            }
        }
        if let Some((name, e)) = failed.iter().next() {
            return Err(anyhow!(
                "IPVS: {} sandbox(es) not applied; {name}: {e}",
                failed.len()
            ));
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sandbox_wants_the_vips_of_its_networks_only() {
        let lb = |vip: [u8; 4], backends: &[[u8; 4]]| Lb {
            service_name: "s".into(),
            vip: Ipv4Addr::from(vip),
            backends: backends.iter().map(|b| Ipv4Addr::from(*b)).collect(),
            draining: vec![Ipv4Addr::new(10, 0, 1, 9)],
        };
        let r = |n: &str| LbRef {
            service_id: format!("svc-{n}").as_str().into(),
            network_id: n.into(),
        };
        let lbs: BTreeMap<LbRef, std::sync::Arc<Lb>> = [
            (
                r("n1"),
                std::sync::Arc::new(lb([10, 0, 1, 2], &[[10, 0, 1, 5]])),
            ),
            (r("n2"), std::sync::Arc::new(lb([10, 0, 2, 2], &[]))),
        ]
        .into();
        let by_network: HashMap<String, BTreeSet<LbRef>> = [
            ("n1".to_string(), [r("n1")].into()),
            ("n2".to_string(), [r("n2")].into()),
        ]
        .into();
        let scope = SandboxScope {
            container_id: "c".into(),
            name: "c".into(),
            netns_path: "/x".into(),
            networks: vec!["n1".into()],
        };
        let k = wanted(&scope, &by_network, &lbs);
        assert_eq!(k.vips, [Ipv4Addr::new(10, 0, 1, 2)].into());
        // Live at weight 1, draining at 0.
        assert_eq!(
            k.table.services[&fwmark(Ipv4Addr::new(10, 0, 1, 2))].dests,
            [
                (Ipv4Addr::new(10, 0, 1, 5), 1),
                (Ipv4Addr::new(10, 0, 1, 9), 0)
            ]
            .into()
        );
        assert_eq!(k.table.services.len(), 1);
    }

    proptest::proptest! {
        /// The network index followed change by change is the one built whole.
        #[test]
        fn the_network_index_follows_the_changes(
            steps in proptest::collection::vec((0u8..6, 0u8..3, proptest::bool::ANY), 0..40),
        ) {
            let mut a = IpvsApplier::new();
            let mut desired = Desired::default();
            a.apply(&desired, &Changed::default(), true).unwrap();
            for (svc, net, present) in steps {
                let r = LbRef {
                    service_id: format!("s{svc}").as_str().into(),
                    network_id: format!("n{net}").as_str().into(),
                };
                if present {
                    desired.lbs.insert(r.clone(), std::sync::Arc::new(Lb {
                        service_name: "s".into(),
                        vip: Ipv4Addr::new(10, 0, net, svc + 2),
                        backends: vec![],
                        draining: vec![],
                    }));
                } else {
                    desired.lbs.remove(&r);
                }
                let changed = Changed { lbs: [r].into(), ..Changed::default() };
                a.apply(&desired, &changed, false).unwrap();
            }
            let mut whole = IpvsApplier::new();
            whole.apply(&desired, &Changed::default(), true).unwrap();
            proptest::prop_assert_eq!(&a.by_network, &whole.by_network);
        }
    }
}
