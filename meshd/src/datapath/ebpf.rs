//! The eBPF datapath: loads the socket-LB programs, pins maps and links in bpffs, adopts what
//! an earlier meshd left there, and applies `Desired` as map diffs.
use std::{
    collections::BTreeMap,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr,
    },
    Ebpf, EbpfLoader, Pod,
};
use meshd_common::{
    map_names, prog_names, BackendKey, BackendValue, DnsPorts, LbMeta, LbValue, MaglevKey,
    RevNatKey, RevNatValue, VipKey, VipValue,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use super::tables::{addr_from_be, kernel_tables, KernelTables, LbIds};
use crate::{
    compile::{Desired, LbRef},
    diff::{diff, Diff},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshd-ebpf.o"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const PROGRAMS: [&str; 4] = [
    prog_names::CONNECT4,
    prog_names::SENDMSG4,
    prog_names::RECVMSG4,
    prog_names::GETPEERNAME4,
];

struct Maps {
    vips: HashMap<MapData, VipKey, VipValue>,
    lbs: HashMap<MapData, u32, LbValue>,
    maglev: HashMap<MapData, MaglevKey, BackendValue>,
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
    backend_conns: PerCpuHashMap<MapData, BackendKey, u64>,
    lb_conns: PerCpuHashMap<MapData, u32, u64>,
    meta: HashMap<MapData, u32, LbMeta>,
    dns: HashMap<MapData, u64, DnsPorts>,
}

pub struct EbpfDatapath {
    _ebpf: Ebpf,
    maps: Maps,
    ids: LbIds,
    applied: KernelTables,
    /// What the DNS redirect map holds (netns cookie → meshd's ports there).
    dns_applied: BTreeMap<u64, DnsPorts>,
    nr_cpus: usize,
    pub adopted: AdoptReport,
}

/// What `open` found pinned from an earlier meshd.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AdoptReport {
    pub load_balancers: usize,
    pub vips: usize,
    pub maglev_slots: usize,
    pub replaced_links: usize,
}

/// What one `apply` wrote.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ApplyStats {
    pub writes: usize,
    pub deletes: usize,
}

/// Connection counters, summed over CPUs.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub per_lb: BTreeMap<LbRef, u64>,
    pub per_backend: BTreeMap<(LbRef, std::net::Ipv4Addr), u64>,
}

/// Everything the kernel maps hold, for `meshctl maps` and tests.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MapDump {
    pub vips: Vec<DumpVip>,
    pub lbs: Vec<DumpLb>,
    pub maglev_slots: usize,
    pub revnat_entries: usize,
    /// netns cookie → meshd's DNS (udp, tcp) ports in that namespace.
    pub dns: Vec<(u64, u16, u16)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DumpVip {
    pub netns_cookie: u64,
    pub vip: std::net::Ipv4Addr,
    pub lb_id: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct DumpLb {
    pub lb_id: u32,
    pub service_id: String,
    pub network_id: String,
    pub vip: std::net::Ipv4Addr,
    pub table_size: u32,
    pub backends: u32,
}

fn typed<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn read_all<K: Pod + Ord, V: Pod>(map: &HashMap<MapData, K, V>) -> Result<BTreeMap<K, V>> {
    map.iter()
        .map(|r| r.map_err(Into::into))
        .collect::<Result<_>>()
}

fn keys_of<K: Pod + Ord>(map: &PerCpuHashMap<MapData, K, u64>) -> Result<BTreeMap<K, ()>> {
    map.keys()
        .map(|r| r.map(|k| (k, ())).map_err(Into::into))
        .collect::<Result<_>>()
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
    /// program attached: the old link is detached only after the new one is pinned.
    pub fn open(pin_dir: &Path, cgroup: &Path) -> Result<Self> {
        ensure_bpffs(pin_dir)?;
        let cgroup_file =
            File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(OBJECT)
            .context(
                "load the eBPF object (if an older meshd pinned incompatible maps, \
                 run `meshd reset --pin-dir ...`)",
            )?;
        let mut replaced_links = 0;
        for name in PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?
                .try_into()?;
            prog.load().with_context(|| format!("verify/load {name}"))?;
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

        let maps = Maps {
            vips: typed(&mut ebpf, map_names::VIPS)?,
            lbs: typed(&mut ebpf, map_names::LBS)?,
            maglev: typed(&mut ebpf, map_names::MAGLEV)?,
            revnat: typed(&mut ebpf, map_names::REVNAT)?,
            backend_conns: typed(&mut ebpf, map_names::BACKEND_CONNS)?,
            lb_conns: typed(&mut ebpf, map_names::LB_CONNS)?,
            meta: typed(&mut ebpf, map_names::LB_META)?,
            dns: typed(&mut ebpf, map_names::DNS)?,
        };
        let dns_applied = read_all(&maps.dns)?;
        let applied = KernelTables {
            vips: read_all(&maps.vips)?,
            lbs: read_all(&maps.lbs)?,
            maglev: read_all(&maps.maglev)?,
            backend_counters: keys_of(&maps.backend_conns)?,
            lb_counters: keys_of(&maps.lb_conns)?,
            meta: read_all(&maps.meta)?,
        };
        let adopted = AdoptReport {
            load_balancers: applied.lbs.len(),
            vips: applied.vips.len(),
            maglev_slots: applied.maglev.len(),
            replaced_links,
        };
        info!(?adopted, pin_dir = %pin_dir.display(), cgroup = %cgroup.display(), "eBPF datapath ready");
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Self {
            _ebpf: ebpf,
            ids: LbIds::from_meta(&applied.meta),
            maps,
            applied,
            dns_applied,
            nr_cpus,
            adopted,
        })
    }

    /// Applies the difference between what the maps hold and `desired`. Order matters to
    /// the programs reading concurrently: new counters and Maglev slots go in before the
    /// load balancer that points at them, and VIPs last; removal runs the other way.
    pub fn apply(&mut self, desired: &Desired) -> Result<ApplyStats> {
        self.ids.assign(desired);
        let want = kernel_tables(desired, &self.ids);
        let d_vips = diff(&self.applied.vips, &want.vips);
        let d_lbs = diff(&self.applied.lbs, &want.lbs);
        let d_maglev = diff(&self.applied.maglev, &want.maglev);
        let d_bc = diff(&self.applied.backend_counters, &want.backend_counters);
        let d_lc = diff(&self.applied.lb_counters, &want.lb_counters);
        let d_meta = diff(&self.applied.meta, &want.meta);
        let stats = ApplyStats {
            writes: d_vips.upserts.len()
                + d_lbs.upserts.len()
                + d_maglev.upserts.len()
                + d_bc.upserts.len()
                + d_lc.upserts.len()
                + d_meta.upserts.len(),
            deletes: d_vips.removes.len()
                + d_lbs.removes.len()
                + d_maglev.removes.len()
                + d_bc.removes.len()
                + d_lc.removes.len()
                + d_meta.removes.len(),
        };
        let nr_cpus = self.nr_cpus;
        let zeros = || PerCpuValues::try_from(vec![0u64; nr_cpus]);
        let m = &mut self.maps;
        upsert(&mut m.meta, &d_meta, map_names::LB_META)?;
        for (k, ()) in &d_lc.upserts {
            m.lb_conns
                .insert(k, zeros()?, 0)
                .context("create LB counter")?;
        }
        for (k, ()) in &d_bc.upserts {
            m.backend_conns
                .insert(k, zeros()?, 0)
                .context("create backend counter")?;
        }
        upsert(&mut m.maglev, &d_maglev, map_names::MAGLEV)?;
        upsert(&mut m.lbs, &d_lbs, map_names::LBS)?;
        upsert(&mut m.vips, &d_vips, map_names::VIPS)?;
        remove(&mut m.vips, &d_vips, map_names::VIPS)?;
        remove(&mut m.lbs, &d_lbs, map_names::LBS)?;
        remove(&mut m.maglev, &d_maglev, map_names::MAGLEV)?;
        for k in &d_bc.removes {
            ignore_missing(m.backend_conns.remove(k))?;
        }
        for k in &d_lc.removes {
            ignore_missing(m.lb_conns.remove(k))?;
        }
        remove(&mut m.meta, &d_meta, map_names::LB_META)?;
        if stats.writes + stats.deletes > 0 {
            debug!(
                writes = stats.writes,
                deletes = stats.deletes,
                "applied map diff"
            );
        }
        self.applied = want;
        Ok(stats)
    }

    /// The DNS redirects a restarted meshd finds pinned (its sockets are gone with the old
    /// process: it rebinds the same ports where it can).
    pub fn dns_redirects(&self) -> &BTreeMap<u64, DnsPorts> {
        &self.dns_applied
    }

    /// Makes the DNS redirect map hold exactly `want` (ports in host byte order here).
    pub fn set_dns_redirects(&mut self, want: &BTreeMap<u64, (u16, u16)>) -> Result<ApplyStats> {
        let want: BTreeMap<u64, DnsPorts> = want
            .iter()
            .map(|(&cookie, &(udp, tcp))| {
                let ports = DnsPorts {
                    udp: udp.to_be(),
                    tcp: tcp.to_be(),
                    _pad: 0,
                };
                (cookie, ports)
            })
            .collect();
        let d = diff(&self.dns_applied, &want);
        upsert(&mut self.maps.dns, &d, map_names::DNS)?;
        remove(&mut self.maps.dns, &d, map_names::DNS)?;
        let stats = ApplyStats {
            writes: d.upserts.len(),
            deletes: d.removes.len(),
        };
        self.dns_applied = want;
        Ok(stats)
    }

    pub fn counters(&self) -> Result<Counters> {
        let by_id: BTreeMap<u32, LbRef> = self
            .applied
            .meta
            .iter()
            .map(|(&id, m)| (id, super::tables::ref_from_meta(m)))
            .collect();
        let mut out = Counters::default();
        for entry in self.maps.lb_conns.iter() {
            let (id, values) = entry?;
            if let Some(r) = by_id.get(&id) {
                out.per_lb.insert(r.clone(), values.iter().sum());
            }
        }
        for entry in self.maps.backend_conns.iter() {
            let (k, values) = entry?;
            if let Some(r) = by_id.get(&k.lb_id) {
                out.per_backend
                    .insert((r.clone(), addr_from_be(k.ip)), values.iter().sum());
            }
        }
        Ok(out)
    }

    /// Reads the maps back from the kernel (not from meshd's memory).
    pub fn dump(&self) -> Result<MapDump> {
        let vips = read_all(&self.maps.vips)?
            .into_iter()
            .map(|(k, v)| DumpVip {
                netns_cookie: k.netns_cookie,
                vip: addr_from_be(k.ip),
                lb_id: v.lb_id,
            })
            .collect();
        let meta = read_all(&self.maps.meta)?;
        let lbs = read_all(&self.maps.lbs)?
            .into_iter()
            .map(|(id, v)| {
                let r = meta.get(&id).map(super::tables::ref_from_meta);
                DumpLb {
                    lb_id: id,
                    service_id: r.as_ref().map(|r| r.service_id.clone()).unwrap_or_default(),
                    network_id: r.map(|r| r.network_id).unwrap_or_default(),
                    vip: addr_from_be(v.vip),
                    table_size: v.table_size,
                    backends: v.backend_count,
                }
            })
            .collect();
        Ok(MapDump {
            vips,
            lbs,
            maglev_slots: self.maps.maglev.keys().count(),
            revnat_entries: self.maps.revnat.keys().count(),
            dns: read_all(&self.maps.dns)?
                .into_iter()
                .map(|(cookie, p)| (cookie, u16::from_be(p.udp), u16::from_be(p.tcp)))
                .collect(),
        })
    }
}

fn upsert<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    d: &Diff<K, V>,
    name: &str,
) -> Result<()> {
    for (k, v) in &d.upserts {
        map.insert(k, v, 0)
            .with_context(|| format!("write {name} entry"))?;
    }
    Ok(())
}

fn remove<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    d: &Diff<K, V>,
    name: &str,
) -> Result<()> {
    for k in &d.removes {
        ignore_missing(map.remove(k)).with_context(|| format!("delete {name} entry"))?;
    }
    Ok(())
}

/// A delete of an entry that is already gone is what we wanted anyway.
fn ignore_missing(r: std::result::Result<(), aya::maps::MapError>) -> Result<()> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other.map_err(Into::into),
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
    for name in map_names::ALL {
        let pin = pin_dir.join(name);
        if pin.exists() {
            std::fs::remove_file(&pin).with_context(|| format!("remove {}", pin.display()))?;
        }
    }
    std::fs::remove_dir(pin_dir).with_context(|| format!("remove {}", pin_dir.display()))?;
    Ok(())
}
