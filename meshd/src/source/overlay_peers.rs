//! The remote peers this node's engine has programmed on each overlay network a local
//! container is on.
//!
//! Docker's overlay learns where a remote container is by gossip (NetworkDB), apart from
//! the task state swarm reports, and writes it into the network's namespace here
//! (`<netns dir>/1-<first 10 characters of the network id>`) as a permanent neighbour on the
//! VXLAN device. Until it has, nothing on this node can reach that container: connections
//! to it wait for ARP and fail after seconds. Under load the gossip trails the task's
//! `running` by seconds, so a VIP must not send new connections there yet
//! (`ClusterState::reachable_of`). This follows those neighbours with netlink (a dump, then
//! the kernel's change messages), for exactly the networks local containers are on: a
//! socket keeps its namespace alive, so a network this node leaves is let go of at once.
use std::{
    collections::{HashMap, HashSet},
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    AddressFamily, RouteNetlinkMessage,
};
use tokio::{io::unix::AsyncFd, task::JoinHandle};
use tracing::{debug, info, warn};

use super::{Origin, Update, UpdateTx};
use crate::{
    model::{Change, Resync},
    netns,
};

/// Where Docker keeps an overlay network's own namespace (bridge and VXLAN device).
pub fn overlay_netns(dir: &Path, network_id: &str) -> PathBuf {
    let short: String = network_id.chars().take(10).collect();
    dir.join(format!("1-{short}"))
}

/// Follows the peers of the networks the local containers are on.
pub struct OverlayPeers {
    updates: UpdateTx,
    /// Network id → the task following it.
    followed: HashMap<String, JoinHandle<()>>,
    /// Local container id → its networks, as last put.
    users: HashMap<String, Vec<String>>,
}

impl OverlayPeers {
    pub fn new(updates: UpdateTx) -> Self {
        OverlayPeers {
            updates,
            followed: HashMap::new(),
            users: HashMap::new(),
        }
    }

    /// Takes note of the local containers `changes` put or drop, then follows exactly the
    /// overlay networks they are on (`dir`: Docker's netns directory, once known).
    pub fn observe(&mut self, changes: &[Change], dir: Option<&Path>) {
        let mut moved = false;
        for c in changes {
            match c {
                Change::PutSandbox(s) => {
                    moved |= self
                        .users
                        .insert(s.container_id.clone(), s.networks.clone())
                        != Some(s.networks.clone());
                }
                Change::DropSandbox(id) => moved |= self.users.remove(id).is_some(),
                Change::Resync(Resync::Sandboxes(list, _)) => {
                    self.users = list
                        .iter()
                        .map(|s| (s.container_id.clone(), s.networks.clone()))
                        .collect();
                    moved = true;
                }
                _ => {}
            }
        }
        if moved {
            self.sync(dir);
        }
    }

    fn sync(&mut self, dir: Option<&Path>) {
        let wanted: HashSet<&String> = self.users.values().flatten().collect();
        let gone: Vec<String> = self
            .followed
            .keys()
            .filter(|n| !wanted.contains(n))
            .cloned()
            .collect();
        for n in gone {
            if let Some(task) = self.followed.remove(&n) {
                // Closes the socket: Docker's namespace is not held past its network.
                task.abort();
            }
            let _ = self.updates.send(Update::read(
                vec![Change::DropOverlayPeers(n)],
                None,
                Origin::Local,
            ));
        }
        let Some(dir) = dir else {
            return;
        };
        for n in wanted {
            if self.followed.contains_key(n) {
                continue;
            }
            let path = overlay_netns(dir, n);
            let task = tokio::spawn(follow(n.clone(), path, self.updates.clone()));
            self.followed.insert(n.clone(), task);
        }
    }

    pub fn followed(&self) -> usize {
        self.followed.len()
    }
}

impl Drop for OverlayPeers {
    fn drop(&mut self) {
        for task in self.followed.values() {
            task.abort();
        }
    }
}

/// Reads one network's neighbours until the socket fails or the task is aborted. A network
/// without an overlay namespace here (not an overlay, or not made yet) is not followed:
/// without a view, its tasks count as reachable, as they did before.
async fn follow(network_id: String, path: PathBuf, updates: UpdateTx) {
    if !path.exists() {
        debug!(network = %network_id, path = %path.display(), "no overlay namespace here: peers not followed");
        return;
    }
    match follow_socket(&network_id, &path, &updates).await {
        Ok(()) => {}
        Err(e) => {
            warn!(network = %network_id, error = %format!("{e:#}"), "cannot follow the overlay's peers; its tasks count as reachable");
            let _ = updates.send(Update::read(
                vec![Change::DropOverlayPeers(network_id)],
                None,
                Origin::Local,
            ));
        }
    }
}

async fn follow_socket(network_id: &str, path: &Path, updates: &UpdateTx) -> Result<()> {
    let fd = netns::in_netns(path, neighbour_socket)
        .await
        .with_context(|| format!("a netlink socket in {}", path.display()))?;
    // SAFETY: an OwnedFd's descriptor stays open, and the same, for as long as it is owned.
    let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("register the netlink socket: {e}"))?;
    request_dump(fd.get_ref())?;
    let mut peers = Peers::default();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let mut guard = fd.readable().await.context("wait on netlink")?;
        let n = match guard.try_io(|fd| recv(fd.get_ref(), &mut buf)) {
            Ok(Ok(n)) => n,
            Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // The kernel dropped messages: read the whole table again.
                debug!(network = %network_id, "netlink overrun: dumping the neighbours again");
                peers.restart();
                request_dump(fd.get_ref())?;
                continue;
            }
            Ok(Err(e)) => return Err(e).context("read netlink"),
            Err(_would_block) => continue,
        };
        if let Some(change) = peers.take(&buf[..n], network_id) {
            if let Change::OverlayPeers {
                whole: true, added, ..
            } = &change
            {
                info!(network = %network_id, peers = added.len(), "following the overlay's peers");
            }
            let _ = updates.send(Update::read(vec![change], None, Origin::Local));
        }
    }
}

/// The neighbours read so far and what the last read changed.
#[derive(Default)]
struct Peers {
    known: HashSet<Ipv4Addr>,
    /// While a dump is read: what it listed so far (events meanwhile apply to it too).
    dumping: Option<HashSet<Ipv4Addr>>,
    /// The first dump has completed (before it, nothing is said).
    seen_whole: bool,
}

impl Peers {
    fn restart(&mut self) {
        self.dumping = Some(HashSet::new());
    }

    /// Applies a buffer of netlink messages and says what changed, if anything.
    fn take(&mut self, mut buf: &[u8], network_id: &str) -> Option<Change> {
        if self.dumping.is_none() && !self.seen_whole {
            self.dumping = Some(HashSet::new());
        }
        let mut added = Vec::new();
        let mut removed = Vec::new();
        let mut whole = false;
        while buf.len() >= 16 {
            let len = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
            if len < 16 || len > buf.len() {
                break;
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]);
            buf = &buf[((len + 3) & !3).min(buf.len())..];
            let Ok(msg) = msg else {
                continue;
            };
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(m)) => {
                    if let Some((ip, peer)) = peer_of(&m) {
                        self.mark(ip, peer, &mut added, &mut removed);
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(m)) => {
                    if let Some((ip, _)) = peer_of(&m) {
                        self.mark(ip, false, &mut added, &mut removed);
                    }
                }
                NetlinkPayload::Done(_) => {
                    if let Some(listed) = self.dumping.take() {
                        self.known = listed;
                        self.seen_whole = true;
                        whole = true;
                    }
                }
                _ => {}
            }
        }
        if whole {
            let mut all: Vec<Ipv4Addr> = self.known.iter().copied().collect();
            all.sort();
            return Some(Change::OverlayPeers {
                network_id: network_id.to_string(),
                whole: true,
                added: all,
                removed: Vec::new(),
            });
        }
        if self.dumping.is_some() || (added.is_empty() && removed.is_empty()) {
            return None;
        }
        Some(Change::OverlayPeers {
            network_id: network_id.to_string(),
            whole: false,
            added,
            removed,
        })
    }

    fn mark(
        &mut self,
        ip: Ipv4Addr,
        peer: bool,
        added: &mut Vec<Ipv4Addr>,
        removed: &mut Vec<Ipv4Addr>,
    ) {
        if let Some(listed) = self.dumping.as_mut() {
            if peer {
                listed.insert(ip);
            } else {
                listed.remove(&ip);
            }
            return;
        }
        if peer {
            if self.known.insert(ip) {
                added.push(ip);
            }
        } else if self.known.remove(&ip) {
            removed.push(ip);
        }
    }
}

/// The IPv4 address a neighbour message is about, and whether it is a peer Docker wrote (a
/// permanent entry; ARP's own entries on the bridge are not).
fn peer_of(m: &NeighbourMessage) -> Option<(Ipv4Addr, bool)> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let ip = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })?;
    Some((ip, m.header.state == NeighbourState::Permanent))
}

/// A non-blocking netlink socket in this thread's namespace, subscribed to neighbour
/// changes.
fn neighbour_socket() -> Result<OwnedFd> {
    netns::netlink_socket(libc::RTMGRP_NEIGH as u32, true, None)
}

fn request_dump(fd: &OwnedFd) -> Result<()> {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let buf = encode(NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetNeighbour(m)),
    ));
    // SAFETY: sending a buffer we own on a descriptor we own.
    let rc = unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error()).context("ask for the neighbour table");
    }
    Ok(())
}

/// One message as the kernel reads it.
fn encode(mut msg: NetlinkMessage<RouteNetlinkMessage>) -> Vec<u8> {
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reading into a buffer we own from a descriptor we own.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neigh(ip: [u8; 4], state: NeighbourState, new: bool) -> Vec<u8> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.state = state;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                Ipv4Addr::from(ip),
            )));
        let inner = if new {
            RouteNetlinkMessage::NewNeighbour(m)
        } else {
            RouteNetlinkMessage::DelNeighbour(m)
        };
        encode(NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(inner),
        ))
    }

    fn done() -> Vec<u8> {
        encode(NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::Done(Default::default()),
        ))
    }

    fn change(whole: bool, added: &[u8], removed: &[u8]) -> Option<Change> {
        let ip = |d: &u8| Ipv4Addr::new(10, 0, 0, *d);
        Some(Change::OverlayPeers {
            network_id: "n".into(),
            whole,
            added: added.iter().map(ip).collect(),
            removed: removed.iter().map(ip).collect(),
        })
    }

    #[test]
    fn a_dump_then_changes_become_whole_then_differences() {
        let mut p = Peers::default();
        // Dump: two permanent peers and one of ARP's own entries, then an event in flight.
        let mut buf = neigh([10, 0, 0, 3], NeighbourState::Permanent, true);
        buf.extend(neigh([10, 0, 0, 4], NeighbourState::Permanent, true));
        buf.extend(neigh([10, 0, 0, 9], NeighbourState::Reachable, true));
        assert_eq!(p.take(&buf, "n"), None, "nothing is said mid-dump");
        let mut buf = neigh([10, 0, 0, 4], NeighbourState::Permanent, false);
        buf.extend(done());
        assert_eq!(p.take(&buf, "n"), change(true, &[3], &[]));
        // After it: differences, and nothing for what changes nothing.
        let buf = neigh([10, 0, 0, 5], NeighbourState::Permanent, true);
        assert_eq!(p.take(&buf, "n"), change(false, &[5], &[]));
        assert_eq!(p.take(&buf, "n"), None);
        let buf = neigh([10, 0, 0, 3], NeighbourState::Permanent, false);
        assert_eq!(p.take(&buf, "n"), change(false, &[], &[3]));
        // A truncated message is left alone.
        let buf = neigh([10, 0, 0, 6], NeighbourState::Permanent, true);
        assert_eq!(p.take(&buf[..buf.len() - 4], "n"), None);
    }
}
