//! The eBPF datapath: loads the socket-LB programs, pins maps and links in bpffs, adopts what
//! an earlier meshd left there, and applies `Desired` as planned single-entry writes.
use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr,
    },
    Ebpf, EbpfLoader,
};
use meshd_common::{map_names, prog_names, DnsPorts};
use serde::Serialize;
use tracing::{debug, info, warn};

use self::{
    maps::VipMaps,
    plan::plan,
    tables::{addr_from_be, lb_ref, net_id, KernelTables},
};
use super::{Applier, ApplyStats};
use crate::compile::{Changed, Desired, LbRef};

pub mod dns_redirect;
mod ids;
pub mod ingress;
pub mod maglev;
mod maps;
pub mod plan;
pub mod tables;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshd-ebpf.o"));

/// The eBPF object meshd loads (the packet tests load it on their own).
pub fn object() -> &'static [u8] {
    OBJECT
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const PROGRAMS: [&str; 4] = [
    prog_names::CONNECT4,
    prog_names::SENDMSG4,
    prog_names::RECVMSG4,
    prog_names::GETPEERNAME4,
];

pub struct EbpfDatapath {
    ebpf: Ebpf,
    maps: VipMaps,
    /// The ingress mesh's programs and maps; None with `--no-ingress`.
    ingress: Option<ingress::Ingress>,
    /// What the maps hold, as meshd last read or wrote them.
    applied: KernelTables,
    /// Handed to the DNS redirect applier once.
    dns: Option<HashMap<MapData, u64, DnsPorts>>,
    pub adopted: AdoptReport,
}

/// What `open` found pinned from an earlier meshd.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AdoptReport {
    pub load_balancers: usize,
    pub sandboxes: usize,
    pub backend_slots: usize,
    pub replaced_links: usize,
    pub read_ms: f64,
    /// Loading, verifying and attaching the programs and opening the maps (before any
    /// Docker read).
    pub open_ms: f64,
}

/// Connection counters, summed over CPUs.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub per_lb: BTreeMap<LbRef, u64>,
    pub per_backend: BTreeMap<(LbRef, Ipv4Addr), u64>,
}

/// Everything the kernel maps hold, for `meshctl maps` and tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MapDump {
    pub sandboxes: Vec<DumpSandbox>,
    pub vips: Vec<DumpVip>,
    pub lbs: Vec<DumpLb>,
    pub networks: Vec<(u32, String)>,
    pub backend_slots: usize,
    pub revnat_entries: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct DumpSandbox {
    pub netns_cookie: u64,
    /// Network ids, in lookup order.
    pub networks: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DumpVip {
    pub network_id: String,
    pub vip: Ipv4Addr,
    pub lb_id: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct DumpLb {
    pub lb_id: u32,
    pub service_id: String,
    pub network_id: String,
    pub vip: Ipv4Addr,
    pub backends: Vec<Ipv4Addr>,
}

/// bpffs must be mounted where the pins live; mount it at /sys/fs/bpf if nothing is there.
fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(root) && !is_bpffs(root)? {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mount bpffs at /sys/fs/bpf")?;
        info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(pin_dir)
        .with_context(|| format!("create pin directory {}", pin_dir.display()))?;
    if !is_bpffs(pin_dir)? {
        bail!("{} is not on a bpf filesystem", pin_dir.display());
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    let st =
        nix::sys::statfs::statfs(path).with_context(|| format!("statfs {}", path.display()))?;
    Ok(st.filesystem_type().0 as i64 == BPF_FS_MAGIC)
}

fn link_pin(pin_dir: &Path, prog: &str) -> PathBuf {
    pin_dir.join(format!("link_{prog}"))
}

impl EbpfDatapath {
    /// Loads the programs against the pinned maps (creating them the first time), attaches
    /// them at `cgroup`, and swaps the pinned links so there is never a moment without a
    /// program attached: the old link is detached only after the new one is pinned. Then
    /// reads back what the maps hold: that is what the first apply diffs against.
    pub fn open(
        pin_dir: &Path,
        cgroup: &Path,
        ingress: Option<ingress::IngressSettings>,
    ) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this meshd was built before the eBPF toolchain was installed, so it holds no \
                 eBPF programs: run `cargo xtask setup` as root, then build meshd again"
            );
        }
        let opening = Instant::now();
        ensure_bpffs(pin_dir)?;
        let cgroup_file =
            File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .context(
                "load the eBPF object (if an older meshd pinned maps of another layout, \
                 run `meshd reset --pin-dir ...`)",
            )?;
        // The verifier is the largest part of opening (about 15% of meshd's CPU to ready at 10k
        // services): the programs are verified side by side, one thread each.
        std::thread::scope(|scope| -> Result<()> {
            let loads: Vec<_> = ebpf
                .programs_mut()
                .filter(|(name, _)| PROGRAMS.contains(name))
                .map(|(name, prog)| {
                    scope.spawn(move || -> Result<()> {
                        let prog: &mut CgroupSockAddr = prog.try_into()?;
                        prog.load().with_context(|| format!("verify/load {name}"))
                    })
                })
                .collect();
            for l in loads {
                l.join().expect("a program load panicked")?;
            }
            Ok(())
        })?;
        let mut replaced_links = 0;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            // bpf_link attachments to a cgroup always stack (the kernel rejects the MULTI
            // flag on links), so two meshd generations can overlap during a restart.
            let link_id = prog
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .with_context(|| format!("attach {name} at {}", cgroup.display()))?;
            let link: FdLink = prog.take_link(link_id)?.try_into()?;
            let pin = link_pin(pin_dir, name);
            let old = if pin.exists() {
                let old = PinnedLink::from_pin(&pin)
                    .with_context(|| format!("open pinned link {}", pin.display()))?;
                Some(old.unpin().context("unpin old link")?)
            } else {
                None
            };
            link.pin(&pin)
                .with_context(|| format!("pin link {}", pin.display()))?;
            if old.is_some() {
                replaced_links += 1;
            }
            drop(old); // detaches the previous meshd's program
        }

        let maps = VipMaps::take(&mut ebpf)?;
        let ingress = match ingress {
            Some(s) => Some(ingress::Ingress::open(&mut ebpf, pin_dir, s)?),
            None => None,
        };
        let dns = maps::typed(&mut ebpf, map_names::DNS)?;
        let started = Instant::now();
        let applied = maps.read().context("read the pinned maps")?;
        let adopted = AdoptReport {
            load_balancers: applied.lbs.len(),
            sandboxes: applied.sandboxes.len(),
            backend_slots: applied.backends.len(),
            replaced_links,
            read_ms: started.elapsed().as_secs_f64() * 1000.0,
            open_ms: opening.elapsed().as_secs_f64() * 1000.0,
        };
        info!(?adopted, pin_dir = %pin_dir.display(), cgroup = %cgroup.display(), "eBPF datapath ready");
        Ok(Self {
            ingress,
            ebpf,
            maps,
            applied,
            dns: Some(dns),
            adopted,
        })
    }

    /// The DNS redirect map, for its own applier (once).
    pub fn take_dns_map(&mut self) -> Option<HashMap<MapData, u64, DnsPorts>> {
        self.dns.take()
    }

    /// The ingress mesh's ports, backends and flow tables (None with `--no-ingress`).
    pub fn ingress_view(&self, desired: &Desired) -> Option<ingress::IngressView> {
        self.ingress.as_ref().map(|i| i.view(desired))
    }

    /// The ingress mesh's attachments and counters (None with `--no-ingress`).
    pub fn ingress_status(&self) -> Option<ingress::IngressStatus> {
        self.ingress.as_ref().map(ingress::Ingress::status)
    }

    /// Per VIP map: name, entries, capacity.
    pub fn map_fill(&self) -> [(&'static str, usize, u32); 6] {
        self.applied.fill()
    }

    /// Entries meshd holds in the VIP maps.
    pub fn entries(&self) -> usize {
        self.applied.entries()
    }

    pub fn counters(&self) -> Result<Counters> {
        let by_id: BTreeMap<u32, LbRef> = self
            .applied
            .lb_meta
            .iter()
            .map(|(&id, m)| (id, lb_ref(m)))
            .collect();
        let mut out = Counters::default();
        for (id, r) in &by_id {
            out.per_lb.insert(r.clone(), self.maps.lb_conns.get(id, 0)?);
        }
        for (slot, v) in &self.applied.backends {
            let Some(r) = by_id.get(&slot.lb_id) else {
                continue;
            };
            out.per_backend.insert(
                (r.clone(), addr_from_be(v.ip)),
                self.maps.backend_conns.get(&v.counter, 0)?,
            );
        }
        Ok(out)
    }

    /// Reads the maps back from the kernel (not from meshd's memory).
    pub fn dump(&self) -> Result<MapDump> {
        let t = self.maps.read()?;
        let net_name = |i: &u32| {
            t.net_meta
                .get(i)
                .map(net_id)
                .unwrap_or_else(|| format!("#{i}"))
        };
        Ok(MapDump {
            sandboxes: t
                .sandboxes
                .iter()
                .map(|(c, v)| DumpSandbox {
                    netns_cookie: *c,
                    networks: v.nets[..v.count as usize].iter().map(net_name).collect(),
                })
                .collect(),
            vips: t
                .vips
                .iter()
                .map(|(k, v)| DumpVip {
                    network_id: net_name(&k.net),
                    vip: addr_from_be(k.ip),
                    lb_id: v.lb_id,
                })
                .collect(),
            lbs: t
                .lbs
                .iter()
                .map(|(id, v)| {
                    let r = t.lb_meta.get(id).map(lb_ref);
                    DumpLb {
                        lb_id: *id,
                        service_id: r
                            .as_ref()
                            .map(|r| r.service_id.to_string())
                            .unwrap_or_default(),
                        network_id: r.map(|r| r.network_id.to_string()).unwrap_or_default(),
                        vip: addr_from_be(v.vip),
                        backends: t
                            .slots_of(*id)
                            .take(v.count as usize)
                            .map(|(_, ip)| ip)
                            .collect(),
                    }
                })
                .collect(),
            networks: t.net_meta.iter().map(|(i, m)| (*i, net_id(m))).collect(),
            backend_slots: t.backends.len(),
            revnat_entries: self.maps.revnat.keys().count(),
        })
    }
}

impl Applier for EbpfDatapath {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    /// A service's load balancer depends on that service's tasks only: once they are read,
    /// writing it is right, and it overlaps the map writes with the rest of the read.
    fn applies_early(&self) -> bool {
        true
    }

    fn apply(
        &mut self,
        desired: &Desired,
        changed: &Changed,
        everything: bool,
    ) -> Result<ApplyStats> {
        let ops = plan(&self.applied, desired, changed, everything);
        if let Err((done, e)) = self.maps.execute_all(&ops) {
            // Whatever part of the plan the kernel took, the tables read back are the
            // truth the retry plans from.
            match self.maps.read() {
                Ok(t) => self.applied = t,
                Err(re) => {
                    warn!(error = %format!("{re:#}"), "cannot read the maps back after a failed write")
                }
            }
            return Err(e.context(format!("after {done} of {} writes", ops.len())));
        }
        let mut stats = ApplyStats::default();
        for op in &ops {
            self.applied.apply(op);
            if op.is_delete() {
                stats.deletes += 1;
            } else {
                stats.writes += 1;
            }
        }
        if everything {
            self.applied.compact();
        }
        if let Some(ig) = self.ingress.as_mut() {
            // The ingress mesh failing (an interface it cannot attach to, an old kernel) must
            // not hold the VIPs back: it says why in meshctl and tries again with the next
            // change of its own, or the next sweep.
            match ig.apply(&mut self.ebpf, desired, changed, everything) {
                Ok(s) => {
                    ig.last_error = None;
                    stats.add(s);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if ig.last_error.as_deref() != Some(msg.as_str()) {
                        warn!(error = %msg, "ingress mesh: cannot apply; published ports may not answer here");
                    }
                    ig.last_error = Some(msg);
                }
            }
        }
        if !stats.is_empty() {
            debug!(
                writes = stats.writes,
                deletes = stats.deletes,
                "VIP maps updated"
            );
        }
        Ok(stats)
    }
}

/// Detaches meshd's programs and deletes its pinned maps: for uninstalling, and for tests
/// that must leave the machine as they found it.
pub fn reset(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    for name in PROGRAMS {
        let pin = link_pin(pin_dir, name);
        if pin.exists() {
            match PinnedLink::from_pin(&pin) {
                Ok(link) => drop(link.unpin()?),
                Err(e) => {
                    warn!(pin = %pin.display(), error = %e, "cannot open pinned link; removing the pin")
                }
            }
            let _ = std::fs::remove_file(&pin);
        }
    }
    // Maps of this layout and of any earlier one (an upgrade resets through here), and the
    // ingress mesh's links (one per interface).
    for entry in
        std::fs::read_dir(pin_dir).with_context(|| format!("read {}", pin_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("link_") {
            if let Ok(link) = PinnedLink::from_pin(entry.path()) {
                drop(link.unpin()?);
            }
            let _ = std::fs::remove_file(entry.path());
            continue;
        }
        if name.starts_with("MESHD_") {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("remove {}", entry.path().display()))?;
        }
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("remove {}", pin_dir.display()))?;
    Ok(())
}
