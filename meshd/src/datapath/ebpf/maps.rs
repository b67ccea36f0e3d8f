//! The pinned VIP maps, typed: carries out a plan's operations one by one and reads the
//! whole tables back from the kernel (at start, and whenever a write failed).
use std::{collections::BTreeMap, io};

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues},
    Ebpf, Pod,
};
use meshd_common::{
    map_names, BackendKey, BackendSlot, BackendValue, LbMeta, LbValue, NetMeta, RevNatKey,
    RevNatValue, SandboxValue, VipKey, VipValue,
};

use super::tables::{KernelTables, Op};

pub struct VipMaps {
    sandboxes: HashMap<MapData, u64, SandboxValue>,
    vips: HashMap<MapData, VipKey, VipValue>,
    lbs: HashMap<MapData, u32, LbValue>,
    backends: HashMap<MapData, BackendSlot, BackendValue>,
    pub(super) backend_conns: PerCpuHashMap<MapData, BackendKey, u64>,
    pub(super) lb_conns: PerCpuHashMap<MapData, u32, u64>,
    lb_meta: HashMap<MapData, u32, LbMeta>,
    net_meta: HashMap<MapData, u32, NetMeta>,
    pub(super) revnat: HashMap<MapData, RevNatKey, RevNatValue>,
    nr_cpus: usize,
}

pub(super) fn typed<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

pub(super) fn read_all<K: Pod + Ord, V: Pod>(
    map: &HashMap<MapData, K, V>,
) -> Result<BTreeMap<K, V>> {
    map.iter()
        .map(|r| r.map_err(Into::into))
        .collect::<Result<_>>()
}

fn keys_of<K: Pod + Ord>(
    map: &PerCpuHashMap<MapData, K, u64>,
) -> Result<std::collections::BTreeSet<K>> {
    map.keys()
        .map(|r| r.map_err(Into::into))
        .collect::<Result<_>>()
}

/// A delete of an entry that is already gone is what we wanted anyway.
pub(super) fn ignore_missing(r: std::result::Result<(), aya::maps::MapError>) -> Result<()> {
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

impl VipMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<VipMaps> {
        Ok(VipMaps {
            sandboxes: typed(ebpf, map_names::SANDBOXES)?,
            vips: typed(ebpf, map_names::VIPS)?,
            lbs: typed(ebpf, map_names::LBS)?,
            backends: typed(ebpf, map_names::BACKENDS)?,
            backend_conns: typed(ebpf, map_names::BACKEND_CONNS)?,
            lb_conns: typed(ebpf, map_names::LB_CONNS)?,
            lb_meta: typed(ebpf, map_names::LB_META)?,
            net_meta: typed(ebpf, map_names::NET_META)?,
            revnat: typed(ebpf, map_names::REVNAT)?,
            nr_cpus: aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?,
        })
    }

    /// Everything the maps hold, from the kernel.
    pub fn read(&self) -> Result<KernelTables> {
        Ok(KernelTables::from_parts(
            read_all(&self.sandboxes)?,
            read_all(&self.vips)?,
            read_all(&self.lbs)?,
            read_all(&self.backends)?,
            keys_of(&self.backend_conns)?,
            keys_of(&self.lb_conns)?,
            read_all(&self.lb_meta)?,
            read_all(&self.net_meta)?,
        ))
    }

    fn zeros(&self) -> Result<PerCpuValues<u64>> {
        PerCpuValues::try_from(vec![0u64; self.nr_cpus]).context("per-CPU zeros")
    }

    /// One operation on the kernel maps.
    pub fn execute(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::PutLbMeta(id, m) => self.lb_meta.insert(id, m, 0).context("write LB meta")?,
            Op::PutNetMeta(i, m) => self
                .net_meta
                .insert(i, m, 0)
                .context("write network meta")?,
            Op::PutLbCounter(id) => {
                let z = self.zeros()?;
                self.lb_conns
                    .insert(id, z, 0)
                    .context("create LB counter")?
            }
            Op::PutBackendCounter(k) => {
                let z = self.zeros()?;
                self.backend_conns
                    .insert(k, z, 0)
                    .context("create backend counter")?
            }
            Op::PutBackend(k, v) => self
                .backends
                .insert(k, v, 0)
                .context("write backend slot")?,
            Op::PutLb(id, v) => self.lbs.insert(id, v, 0).context("write load balancer")?,
            Op::PutVip(k, v) => self.vips.insert(k, v, 0).context("write VIP")?,
            Op::PutSandbox(c, v) => self.sandboxes.insert(c, v, 0).context("write sandbox")?,
            Op::DelSandbox(c) => {
                ignore_missing(self.sandboxes.remove(c)).context("delete sandbox")?
            }
            Op::DelVip(k) => ignore_missing(self.vips.remove(k)).context("delete VIP")?,
            Op::DelLb(id) => ignore_missing(self.lbs.remove(id)).context("delete load balancer")?,
            Op::DelBackend(k) => {
                ignore_missing(self.backends.remove(k)).context("delete backend slot")?
            }
            Op::DelBackendCounter(k) => {
                ignore_missing(self.backend_conns.remove(k)).context("delete backend counter")?
            }
            Op::DelLbCounter(id) => {
                ignore_missing(self.lb_conns.remove(id)).context("delete LB counter")?
            }
            Op::DelLbMeta(id) => {
                ignore_missing(self.lb_meta.remove(id)).context("delete LB meta")?
            }
            Op::DelNetMeta(i) => {
                ignore_missing(self.net_meta.remove(i)).context("delete network meta")?
            }
        }
        Ok(())
    }
}
