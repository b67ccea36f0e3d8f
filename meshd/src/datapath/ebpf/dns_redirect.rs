//! The DNS redirect map (netns cookie → meshd's DNS ports in that namespace), owned by the
//! DNS applier: the cgroup hooks send `127.0.0.11:53` there while meshd's socket exists.
use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use meshd_common::DnsPorts;

use super::maps::{ignore_missing, read_all};
use crate::datapath::DnsRedirect;

pub struct DnsRedirects {
    map: HashMap<MapData, u64, DnsPorts>,
    applied: BTreeMap<u64, DnsPorts>,
}

impl DnsRedirects {
    pub fn new(map: HashMap<MapData, u64, DnsPorts>) -> Result<DnsRedirects> {
        let applied = read_all(&map).context("read the DNS redirect map")?;
        Ok(DnsRedirects { map, applied })
    }

    pub fn len(&self) -> usize {
        self.applied.len()
    }

    pub fn is_empty(&self) -> bool {
        self.applied.is_empty()
    }
}

impl DnsRedirect for DnsRedirects {
    /// From the pinned map: an earlier meshd's sockets are gone with it, its ports are not.
    fn previous(&mut self, cookie: u64, _netns_path: &str) -> Option<(u16, u16)> {
        self.applied
            .get(&cookie)
            .map(|p| (u16::from_be(p.udp), u16::from_be(p.tcp)))
    }

    fn set(&mut self, cookie: u64, _netns_path: &str, ports: Option<(u16, u16)>) -> Result<bool> {
        let want = ports.map(|(udp, tcp)| DnsPorts {
            udp: udp.to_be(),
            tcp: tcp.to_be(),
            _pad: 0,
        });
        if self.applied.get(&cookie).copied() == want {
            return Ok(false);
        }
        match want {
            Some(p) => {
                self.map
                    .insert(cookie, p, 0)
                    .context("write DNS redirect")?;
                self.applied.insert(cookie, p);
            }
            None => {
                ignore_missing(self.map.remove(&cookie)).context("delete DNS redirect")?;
                self.applied.remove(&cookie);
            }
        }
        Ok(true)
    }

    fn clear(&mut self) -> Result<usize> {
        let cookies: Vec<u64> = self.applied.keys().copied().collect();
        for c in &cookies {
            self.set(*c, "", None)?;
        }
        Ok(cookies.len())
    }

    fn cookies(&self) -> Vec<u64> {
        self.applied.keys().copied().collect()
    }
}
