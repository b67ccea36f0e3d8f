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
//! The chain runs just after the mangle priority (-150) at which Docker's own iptables
//! rules mark the same VIPs for Docker's IPVS services: where both mark a packet, meshd's
//! mark is the last written, so the connection meets meshd's service.
use std::{io::Write, net::Ipv4Addr, process::Command};

use super::plan::fwmark;

pub const TABLE: &str = "meshd_ipvs";

/// The nft script that makes the table exactly this (created if missing, replaced whole).
pub fn script(vips: &[Ipv4Addr]) -> String {
    let mut s = format!("table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n");
    s.push_str("  chain output {\n    type route hook output priority -140; policy accept;\n");
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
    s.push_str("  }\n}\n");
    s
}

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("run nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft refused {what}: {why}")]
    Refused { what: &'static str, why: String },
}

/// Runs `nft -f -` with `script` in the calling thread's namespace (nft runs as a child,
/// which is born in that namespace); returns what nft printed.
pub fn nft(script: &str, what: &'static str) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Refused {
            what,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes the calling thread's namespace mark exactly these VIPs.
pub fn apply(vips: &[Ipv4Addr]) -> Result<(), NftError> {
    nft(&script(vips), "the VIP marks").map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vip_is_marked_with_its_own_address() {
        let s = script(&[Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 2, 2)]);
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
        assert!(!script(&[]).contains("map"), "no VIP: an empty chain");
    }
}
