//! Appliers: each owns one piece of state outside the process (kernel maps, DNS sockets)
//! and brings it in line with `Desired`, writing only the difference. The eBPF VIP datapath
//! is one implementation; IPVS (a later issue) is another.
use anyhow::Result;
use serde::Serialize;

use crate::compile::{Changed, Desired};

pub mod choice;
pub mod ebpf;
pub mod ipvs;

/// What one apply wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplyStats {
    pub writes: usize,
    pub deletes: usize,
}

impl ApplyStats {
    pub fn is_empty(&self) -> bool {
        self.writes + self.deletes == 0
    }

    pub fn add(&mut self, other: ApplyStats) {
        self.writes += other.writes;
        self.deletes += other.deletes;
    }
}

pub trait Applier: Send {
    /// For logs and `meshctl status`.
    fn name(&self) -> &'static str;

    /// Brings what this applier owns in line with `desired` for what `changed` names;
    /// `everything` also sweeps what `desired` no longer knows (start, periodic resync).
    /// On error the applier re-reads what it has applied, so the same call again (with
    /// the same `changed`) converges and leaves nothing behind.
    fn apply(
        &mut self,
        desired: &Desired,
        changed: &Changed,
        everything: bool,
    ) -> Result<ApplyStats>;

    /// Whether the applier has something of its own to retry even when nothing changed (a
    /// DNS socket that could not be opened yet).
    fn wants_retry(&self) -> bool {
        false
    }

    /// Whether the load balancers of services already read whole may be applied while the
    /// rest of a cold read still comes in (never a sweep: what is not read yet is not gone).
    /// The kernel maps may; the DNS waits for the zones compiled once all is read.
    fn applies_early(&self) -> bool {
        false
    }
}

/// What sends a sandbox's `127.0.0.11:53` to meshd's DNS sockets there, owned by the DNS
/// applier: the eBPF datapath's redirect map, or an nftables table per sandbox (IPVS).
pub trait DnsRedirect: Send {
    /// The ports an earlier meshd sent this sandbox's DNS to (it rebinds them where it
    /// can, so that conntrack and clients see nothing change).
    fn previous(&mut self, cookie: u64, netns_path: &str) -> Option<(u16, u16)>;

    /// Points the sandbox's DNS at these ports (host byte order), or back at dockerd's
    /// resolver (`None`). Returns whether anything changed.
    fn set(&mut self, cookie: u64, netns_path: &str, ports: Option<(u16, u16)>) -> Result<bool>;

    /// Every sandbox back to dockerd's resolver (a clean stop: meshd's sockets close).
    fn clear(&mut self) -> Result<usize>;

    /// The sandboxes redirected.
    fn cookies(&self) -> Vec<u64>;
}
