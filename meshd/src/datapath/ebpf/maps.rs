//! The pinned VIP maps, typed: carries out a plan's operations one by one and reads the
//! whole tables back from the kernel (at start, and whenever a write failed).
use std::{collections::BTreeMap, io};

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap, IterableMap, MapData},
    Ebpf, Pod,
};
use meshd_common::{
    map_names, BackendSlot, BackendValue, LbMeta, LbValue, NetMeta, RevNatKey, RevNatValue,
    SandboxValue, VipKey, VipValue,
};

use super::tables::{KernelTables, Op};

pub struct VipMaps {
    sandboxes: HashMap<MapData, u64, SandboxValue>,
    vips: HashMap<MapData, VipKey, VipValue>,
    lbs: HashMap<MapData, u32, LbValue>,
    backends: HashMap<MapData, BackendSlot, BackendValue>,
    pub(super) backend_conns: Array<MapData, u64>,
    pub(super) lb_conns: Array<MapData, u64>,
    lb_meta: HashMap<MapData, u32, LbMeta>,
    net_meta: HashMap<MapData, u32, NetMeta>,
    pub(super) revnat: HashMap<MapData, RevNatKey, RevNatValue>,
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
        })
    }

    /// Everything the maps hold, from the kernel.
    pub fn read(&self) -> Result<KernelTables> {
        Ok(KernelTables::from_parts(
            read_all(&self.sandboxes)?,
            read_all(&self.vips)?,
            read_all(&self.lbs)?,
            read_all(&self.backends)?,
            read_all(&self.lb_meta)?,
            read_all(&self.net_meta)?,
        ))
    }

    /// Carries out `ops` in order, consecutive writes of one kind to one map as one batch
    /// (`BPF_MAP_UPDATE_BATCH`/`DELETE_BATCH`: a cold start writes hundreds of thousands of
    /// entries). Returns how many were done; on error, how many were done before it.
    pub fn execute_all(
        &mut self,
        ops: &[Op],
    ) -> std::result::Result<usize, (usize, anyhow::Error)> {
        let mut done = 0;
        while done < ops.len() {
            let kind = std::mem::discriminant(&ops[done]);
            let run = ops[done..]
                .iter()
                .take_while(|o| std::mem::discriminant(*o) == kind)
                .count();
            let batch = &ops[done..done + run];
            if run < 4 {
                for op in batch {
                    self.execute(op).map_err(|e| (done, e))?;
                    done += 1;
                }
                continue;
            }
            self.execute_batch(batch).map_err(|e| (done, e))?;
            done += run;
        }
        Ok(done)
    }

    fn execute_batch(&mut self, ops: &[Op]) -> Result<()> {
        let zeros = [0u8; 8];
        match &ops[0] {
            Op::PutLbMeta(..) => put_batch(self.lb_meta.map(), ops, |o| match o {
                Op::PutLbMeta(k, v) => (bytes(k), bytes(v)),
                _ => unreachable!(),
            }),
            Op::PutNetMeta(..) => put_batch(self.net_meta.map(), ops, |o| match o {
                Op::PutNetMeta(k, v) => (bytes(k), bytes(v)),
                _ => unreachable!(),
            }),
            Op::ZeroLbCounter(_) => put_batch(self.lb_conns.map(), ops, |o| match o {
                Op::ZeroLbCounter(k) => (bytes(k), &zeros[..]),
                _ => unreachable!(),
            }),
            Op::ZeroBackendCounter(_) => put_batch(self.backend_conns.map(), ops, |o| match o {
                Op::ZeroBackendCounter(k) => (bytes(k), &zeros[..]),
                _ => unreachable!(),
            }),
            Op::PutBackend(..) => put_batch(self.backends.map(), ops, |o| match o {
                Op::PutBackend(k, v) => (bytes(k), bytes(v)),
                _ => unreachable!(),
            }),
            Op::PutLb(..) => put_batch(self.lbs.map(), ops, |o| match o {
                Op::PutLb(k, v) => (bytes(k), bytes(v)),
                _ => unreachable!(),
            }),
            Op::PutVip(..) => put_batch(self.vips.map(), ops, |o| match o {
                Op::PutVip(k, v) => (bytes(k), bytes(v)),
                _ => unreachable!(),
            }),
            Op::PutSandbox(..) => put_batch(self.sandboxes.map(), ops, |o| match o {
                Op::PutSandbox(k, v) => (bytes(k), bytes(v)),
                _ => unreachable!(),
            }),
            // Deletes one by one: a batch delete stops at the first missing key, and a delete
            // of what is already gone is what we wanted anyway.
            _ => {
                for op in ops {
                    self.execute(op)?;
                }
                Ok(())
            }
        }
        .with_context(|| format!("batch of {} writes ({:?}...)", ops.len(), ops[0]))
    }

    /// One operation on the kernel maps.
    pub fn execute(&mut self, op: &Op) -> Result<()> {
        match op {
            Op::PutLbMeta(id, m) => self.lb_meta.insert(id, m, 0).context("write LB meta")?,
            Op::PutNetMeta(i, m) => self
                .net_meta
                .insert(i, m, 0)
                .context("write network meta")?,
            Op::ZeroLbCounter(id) => self.lb_conns.set(*id, 0, 0).context("zero an LB counter")?,
            Op::ZeroBackendCounter(slot) => self
                .backend_conns
                .set(*slot, 0, 0)
                .context("zero a backend counter")?,
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

/// The bytes of a map key or value, as the kernel takes them.
fn bytes<T: Pod>(v: &T) -> &[u8] {
    // SAFETY: Pod types are plain integers with explicit padding: any byte pattern is fine.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr`'s batch member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Writes many entries of one map in one system call.
fn put_batch<'a>(
    map: &MapData,
    ops: &'a [Op],
    kv: impl Fn(&'a Op) -> (&'a [u8], &'a [u8]),
) -> Result<()> {
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for op in ops {
        let (k, v) = kv(op);
        keys.extend_from_slice(k);
        values.extend_from_slice(v);
    }
    let fd = map.fd().as_fd().as_raw_fd();
    let mut at = 0usize;
    let (klen, vlen) = (keys.len() / ops.len(), values.len() / ops.len());
    while at < ops.len() {
        let mut attr = BatchAttr {
            keys: keys[at * klen..].as_ptr() as u64,
            values: values[at * vlen..].as_ptr() as u64,
            count: (ops.len() - at) as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: the attribute points at buffers that live until the call returns, sized
        // for `count` keys and values of this map.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(e).context(format!(
                "BPF_MAP_UPDATE_BATCH after {} of {}",
                at + attr.count as usize,
                ops.len()
            ));
        }
        // The kernel says how many it took (all of them, unless interrupted).
        at += (attr.count as usize).max(1);
    }
    Ok(())
}
