//! Which VIP datapath this node runs (`--datapath auto|ebpf|ipvs`) and why: eBPF where the
//! kernel has the cgroup socket hooks and lets meshd load programs, else IPVS. Everything
//! above the applier (sources, compile, DNS names, L7) is the same either way.
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::warn;

use super::{
    ebpf::{ingress::IngressSettings, EbpfDatapath},
    ipvs::socket::IpvsSocket,
};

/// What the operator asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Asked {
    /// eBPF when the kernel has the hooks, else IPVS.
    #[default]
    Auto,
    Ebpf,
    Ipvs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Ebpf,
    Ipvs,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Ebpf => "ebpf",
            Kind::Ipvs => "ipvs",
        })
    }
}

/// The choice, as logged and shown by `meshctl status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub kind: Kind,
    /// One sentence: why this one.
    pub reason: String,
}

/// The kernel release as (major, minor), from `uname`.
pub fn kernel_version() -> Option<(u32, u32)> {
    let u = nix::sys::utsname::uname().ok()?;
    parse_release(&u.release().to_string_lossy())
}

fn parse_release(r: &str) -> Option<(u32, u32)> {
    let mut it = r.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Why this kernel cannot run the eBPF datapath, if its version already says so: all four
/// cgroup socket hooks (`connect4`, `sendmsg4`, `recvmsg4`, `getpeername4`) are there from
/// Linux 5.8.
pub fn kernel_lacks_hooks(version: Option<(u32, u32)>) -> Option<String> {
    let (major, minor) = version?;
    ((major, minor) < (5, 8)).then(|| {
        format!(
            "kernel {major}.{minor} has no cgroup getpeername4 hook (needs 5.8+), so socket-level \
             load balancing cannot run"
        )
    })
}

/// Whether IPVS answers in this namespace, loading its module if it is not there yet (as
/// dockerd does): the version, or why not.
pub fn ipvs_available() -> Result<String> {
    let probe = || -> Result<String> {
        let (v, size) = IpvsSocket::open()?.info()?;
        Ok(format!(
            "IPVS {}.{}.{} (connection table {size})",
            v >> 16,
            (v >> 8) & 0xff,
            v & 0xff
        ))
    };
    probe().or_else(|first| {
        let loaded = std::process::Command::new("modprobe")
            .arg("ip_vs")
            .status()
            .is_ok_and(|s| s.success());
        if !loaded {
            return Err(first.context("IPVS is not available and `modprobe ip_vs` failed"));
        }
        probe().context("IPVS is not available even after `modprobe ip_vs`")
    })
}

/// The eBPF datapath opened, or the reason to use IPVS.
pub enum Opened {
    Ebpf(Box<EbpfDatapath>, Choice),
    Ipvs(Choice),
}

/// Opens the datapath the operator asked for; `auto` falls back to IPVS when eBPF cannot
/// run here, saying why.
pub fn open(
    asked: Asked,
    pin_dir: &Path,
    cgroup: &Path,
    ingress: Option<IngressSettings>,
) -> Result<Opened> {
    let ebpf = |reason: String| -> Result<Opened> {
        let dp = EbpfDatapath::open(pin_dir, cgroup, ingress.clone())?;
        Ok(Opened::Ebpf(
            Box::new(dp),
            Choice {
                kind: Kind::Ebpf,
                reason,
            },
        ))
    };
    let ipvs = |reason: String| -> Result<Opened> {
        let version = ipvs_available()?;
        // Links an earlier eBPF meshd pinned would go on rewriting connects to VIPs from
        // maps nobody updates, ahead of IPVS: they go.
        if pin_dir.exists() {
            super::ebpf::reset(pin_dir).context("remove the eBPF datapath's pins")?;
            tracing::info!(pin_dir = %pin_dir.display(), "IPVS datapath: removed the eBPF datapath's pins");
        }
        Ok(Opened::Ipvs(Choice {
            kind: Kind::Ipvs,
            reason: format!("{reason}; {version}"),
        }))
    };
    match asked {
        Asked::Ebpf => ebpf("asked for (--datapath ebpf)".into()),
        Asked::Ipvs => ipvs("asked for (--datapath ipvs)".into()),
        Asked::Auto => {
            let why_not = match kernel_lacks_hooks(kernel_version()) {
                Some(why) => why,
                None => match ebpf("auto: this kernel has the cgroup socket hooks".into()) {
                    Ok(o) => return Ok(o),
                    Err(e) => format!("the eBPF datapath cannot start here ({e:#})"),
                },
            };
            warn!(reason = %why_not, "auto: using the IPVS datapath");
            match ipvs(format!("auto: {why_not}")) {
                Ok(o) => Ok(o),
                Err(e) => bail!(
                    "no datapath can run on this node: {why_not}; and {:#}",
                    e.context("IPVS")
                ),
            }
        }
    }
    .context("open the VIP datapath")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_kernels_are_sent_to_ipvs() {
        assert_eq!(parse_release("6.1.0-57-amd64"), Some((6, 1)));
        assert_eq!(parse_release("4.19.0-27-cloud-amd64"), Some((4, 19)));
        assert_eq!(parse_release("5.8.18"), Some((5, 8)));
        assert_eq!(parse_release("garbage"), None);
        assert!(kernel_lacks_hooks(Some((4, 19))).is_some());
        assert!(kernel_lacks_hooks(Some((5, 7)))
            .unwrap()
            .contains("getpeername4"));
        assert!(kernel_lacks_hooks(Some((5, 8))).is_none());
        assert!(kernel_lacks_hooks(Some((6, 1))).is_none());
        // An unreadable release does not decide: loading the programs does.
        assert!(kernel_lacks_hooks(None).is_none());
    }
}
