//! The firewall marks that send a namespace's connections to a VIP into IPVS: one nftables
//! table of meshd's own per namespace (`ip meshd_ipvs`), its output chain setting each VIP's
//! mark (`plan::fwmark`) from one map, as Docker's mangle `OUTPUT` rules do with iptables.
//!
//! nftables rather than iptables: the table is meshd's alone (Docker's and the user's
//! rules are never read or rewritten), and a new map replaces the old one in one atomic
//! transaction (`nft -f`), so a VIP coming or going never leaves a moment without marks.
//! The table is small (a namespace sees a few VIPs) and changes only when a service on one
//! of its networks comes or goes, never when a task does.
//!
//! The same table can send the namespace's DNS (`127.0.0.11:53`) to meshd's sockets there,
//! what the eBPF datapath's cgroup hooks do: a `nat` output chain at priority -101, ahead
//! of the iptables `nat` rules (priority -100) through which Docker sends it to its own
//! resolver; the first NAT a connection meets is the one it keeps.
use std::{io::Write, net::Ipv4Addr, process::Command};

use super::plan::fwmark;

pub const TABLE: &str = "meshd_ipvs";

/// meshd's DNS sockets in a namespace: where `127.0.0.11:53` goes (UDP, TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsPorts {
    pub udp: u16,
    pub tcp: u16,
}

/// The nft script that makes the table exactly this (created if missing, replaced whole).
pub fn script(vips: &[Ipv4Addr], dns: Option<DnsPorts>) -> String {
    let mut s = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    s.push_str("  chain output {\n    type route hook output priority mangle; policy accept;\n");
    if !vips.is_empty() {
        let elems: Vec<String> = vips
            .iter()
            .map(|v| format!("{v} : {:#010x}", fwmark(*v)))
            .collect();
        s.push_str(&format!(
            "    meta mark set ip daddr map {{ {} }}\n",
            elems.join(", ")
        ));
    }
    s.push_str("  }\n");
    if let Some(d) = dns {
        s.push_str(&format!(
            "  chain dns {{\n    type nat hook output priority -101; policy accept;\n    \
             ip daddr 127.0.0.11 udp dport 53 dnat to 127.0.0.11:{}\n    \
             ip daddr 127.0.0.11 tcp dport 53 dnat to 127.0.0.11:{}\n  }}\n",
            d.udp, d.tcp
        ));
    }
    s.push_str("}\n");
    s
}

#[derive(Debug, thiserror::Error)]
pub enum MarksError {
    #[error("run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the marks: {0}")]
    Refused(String),
}

/// Applies `script(vips)` in the calling thread's namespace (nft runs as a child, which is
/// born in that namespace).
pub fn apply(vips: &[Ipv4Addr], dns: Option<DnsPorts>) -> Result<(), MarksError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(MarksError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script(vips, dns).as_bytes())
            .map_err(MarksError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(MarksError::Spawn)?;
    if !out.status.success() {
        return Err(MarksError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vip_is_marked_with_its_own_address() {
        let s = script(
            &[Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 2, 2)],
            None,
        );
        assert!(
            s.contains(
                "meta mark set ip daddr map { 10.0.1.2 : 0x0a000102, 10.0.2.2 : 0x0a000202 }"
            ),
            "{s}"
        );
        // Replaced whole: created first so that deleting it cannot fail.
        assert!(
            s.starts_with("table ip meshd_ipvs\ndelete table ip meshd_ipvs\n"),
            "{s}"
        );
        assert!(!script(&[], None).contains("map"), "no VIP: an empty chain");
        assert!(!s.contains("dnat"), "no DNS sockets: no redirect");
        let d = script(
            &[],
            Some(DnsPorts {
                udp: 40001,
                tcp: 40002,
            }),
        );
        assert!(d.contains("udp dport 53 dnat to 127.0.0.11:40001"), "{d}");
        assert!(d.contains("tcp dport 53 dnat to 127.0.0.11:40002"), "{d}");
    }
}
