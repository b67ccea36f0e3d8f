//! The DNS redirect without eBPF: in each sandbox, an nftables table of meshd's own
//! (`ip meshd_dns`) sends `127.0.0.11:53` to meshd's DNS sockets there, what the eBPF
//! datapath's cgroup hooks do with the redirect map.
//!
//! A `nat` output chain at priority -101, ahead of the iptables `nat` rules (priority
//! -100) through which Docker sends the same address to its own resolver: the first NAT a
//! connection meets is the one it keeps, and conntrack turns the answers' source back into
//! port 53. A table of its own (not the marks' table) because the DNS applier owns it, on
//! its own schedule: sockets first, then the redirect.
use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, SystemTime},
};

use anyhow::{anyhow, Context, Result};
use tracing::warn;

use super::{dns_handback::HandBack, marks::nft};
use crate::{datapath::DnsRedirect, netns};

pub const TABLE: &str = "meshd_dns";

/// The nft script that makes the table send DNS to these ports (replaced whole).
pub fn script(udp: u16, tcp: u16) -> String {
    format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\ntable ip {TABLE} {{\n  \
         chain dns {{\n    type nat hook output priority -101; policy accept;\n    \
         ip daddr 127.0.0.11 udp dport 53 dnat to 127.0.0.11:{udp}\n    \
         ip daddr 127.0.0.11 tcp dport 53 dnat to 127.0.0.11:{tcp}\n  }}\n}}\n"
    )
}

/// The ports a table listed by `nft list table` sends DNS to.
pub fn parse_ports(listing: &str) -> Option<(u16, u16)> {
    let port_after = |proto: &str| {
        listing.lines().find_map(|l| {
            let l = l.trim();
            if !l.contains(&format!("{proto} dport 53")) {
                return None;
            }
            l.rsplit_once("dnat to 127.0.0.11:")?.1.trim().parse().ok()
        })
    };
    Some((port_after("udp")?, port_after("tcp")?))
}

/// Sends DNS in this thread's namespace to `ports`, or back to dockerd's resolver.
pub fn apply_here(ports: Option<(u16, u16)>) -> Result<()> {
    match ports {
        Some((udp, tcp)) => nft(&script(udp, tcp), "the DNS redirect")?,
        // Created first, so that deleting cannot fail on a table that was never made.
        None => nft(
            &format!("table ip {TABLE}\ndelete table ip {TABLE}\n"),
            "removing the DNS redirect",
        )?,
    };
    Ok(())
}

/// The ports this thread's namespace sends DNS to, if meshd's table is there.
pub fn read_here() -> Option<(u16, u16)> {
    let out = std::process::Command::new("nft")
        .args(["list", "table", "ip", TABLE])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| parse_ports(&String::from_utf8_lossy(&out.stdout)))
        .flatten()
}

/// The redirects of the IPVS datapath, one nftables table per sandbox.
pub struct NftDnsRedirects {
    /// By sandbox cookie: its namespace and the ports it sends DNS to.
    applied: BTreeMap<u64, (String, (u16, u16))>,
    /// A namespace made before this meshd may hold an earlier meshd's table.
    started: SystemTime,
    /// Removes the redirects if meshd dies without a clean stop.
    hand_back: Option<HandBack>,
}

impl Default for NftDnsRedirects {
    fn default() -> Self {
        NftDnsRedirects::new()
    }
}

impl NftDnsRedirects {
    pub fn new() -> NftDnsRedirects {
        NftDnsRedirects {
            applied: BTreeMap::new(),
            started: SystemTime::now(),
            hand_back: None,
        }
    }

    /// With a helper that hands the sandboxes back to dockerd's resolver if meshd dies.
    pub fn with_hand_back(hand_back: HandBack) -> NftDnsRedirects {
        NftDnsRedirects {
            hand_back: Some(hand_back),
            ..NftDnsRedirects::new()
        }
    }

    fn tell(&mut self, path: &str, ports: Option<(u16, u16)>) {
        let Some(h) = self.hand_back.as_mut() else {
            return;
        };
        let told = match ports {
            Some((udp, tcp)) => h.redirected(path, udp, tcp),
            None => h.released(path),
        };
        if let Err(e) = told {
            warn!(error = %format!("{e:#}"), "DNS hand-back helper unreachable: a crash would leave redirects until meshd is back");
        }
    }
}

impl DnsRedirect for NftDnsRedirects {
    fn previous(&mut self, cookie: u64, netns_path: &str) -> Option<(u16, u16)> {
        if self.applied.contains_key(&cookie) || netns_path.is_empty() {
            return None;
        }
        // Docker makes the namespace file when it makes the namespace: a newer one cannot
        // hold a table of an earlier meshd, and is not worth an nft run on its way up.
        let made = std::fs::metadata(netns_path)
            .and_then(|m| m.modified())
            .ok()?;
        if made > self.started + Duration::from_secs(1) {
            return None;
        }
        netns::run_in(Path::new(netns_path), || Ok(read_here()))
            .ok()
            .flatten()
    }

    fn set(&mut self, cookie: u64, netns_path: &str, ports: Option<(u16, u16)>) -> Result<bool> {
        let have = self.applied.get(&cookie).map(|(_, p)| *p);
        if have == ports {
            return Ok(false);
        }
        match ports {
            Some(p) => {
                let path = netns_path.to_string();
                netns::run_in(Path::new(netns_path), move || apply_here(Some(p)))
                    .with_context(|| format!("in {path}"))?;
                self.applied.insert(cookie, (netns_path.to_string(), p));
                self.tell(netns_path, Some(p));
            }
            None => {
                let (path, _) = self.applied.remove(&cookie).expect("held: have != ports");
                self.tell(&path, None);
                // A namespace that is gone took its table with it.
                if Path::new(&path).exists() {
                    let shown = path.clone();
                    if let Err(e) = netns::run_in(Path::new(&path), || apply_here(None)) {
                        if Path::new(&path).exists() {
                            return Err(e.context(format!("in {shown}")));
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    fn clear(&mut self) -> Result<usize> {
        let cookies: Vec<u64> = self.applied.keys().copied().collect();
        let mut first = None;
        for c in &cookies {
            if let Err(e) = self.set(*c, "", None) {
                first.get_or_insert(e);
            }
        }
        match first {
            Some(e) => Err(anyhow!("{e:#}")),
            None => Ok(cookies.len()),
        }
    }

    fn cookies(&self) -> Vec<u64> {
        self.applied.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_sends_both_protocols_and_reads_back() {
        let s = script(40001, 40002);
        assert!(s.contains("udp dport 53 dnat to 127.0.0.11:40001"), "{s}");
        assert!(s.contains("tcp dport 53 dnat to 127.0.0.11:40002"), "{s}");
        assert!(
            s.contains("priority -101"),
            "ahead of Docker's nat rules: {s}"
        );
        // What `nft list table` prints for it (nft 1.0.6).
        let listing = "table ip meshd_dns {\n\tchain dns {\n\t\ttype nat hook output priority -101; policy accept;\n\t\tip daddr 127.0.0.11 udp dport 53 dnat to 127.0.0.11:40001\n\t\tip daddr 127.0.0.11 tcp dport 53 dnat to 127.0.0.11:40002\n\t}\n}\n";
        assert_eq!(parse_ports(listing), Some((40001, 40002)));
        assert_eq!(parse_ports("table ip meshd_dns {\n}\n"), None);
    }
}
