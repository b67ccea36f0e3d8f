//! A task container's leg on `docker_gwbridge`, read from inside its namespace: the MAC of
//! the interface holding its bridge address, and the host end of that interface's veth.
//! With those the ingress mesh hands a packet straight into the container
//! (`bpf_redirect_peer`), as the bridge would deliver it, without the bridge and the
//! backlog queue in between.
use std::{io, net::Ipv4Addr, os::fd::AsRawFd, path::Path};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
    RouteNetlinkMessage,
};

use crate::{model::VethEnds, netns};

/// The veth ends of the interface holding `addr` in the namespace at `path`.
pub async fn veth_of(path: &Path, addr: Ipv4Addr) -> Result<VethEnds> {
    netns::in_netns(path, move || veth_here(addr)).await
}

/// `veth_of`, in this thread's namespace.
pub fn veth_here(addr: Ipv4Addr) -> Result<VethEnds> {
    let mut name = None;
    let mut mac = None;
    let ifaces: Vec<_> = nix::ifaddrs::getifaddrs()
        .context("list interfaces")?
        .collect();
    for ifa in &ifaces {
        if ifa.address.and_then(|a| a.as_sockaddr_in().map(|s| s.ip())) == Some(addr) {
            name = Some(ifa.interface_name.clone());
        }
    }
    let name = name.with_context(|| format!("no interface holds {addr}"))?;
    for ifa in &ifaces {
        if ifa.interface_name == name {
            if let Some(l) = ifa
                .address
                .and_then(|a| a.as_link_addr().and_then(|l| l.addr()))
            {
                mac = Some(l);
            }
        }
    }
    let mac = mac.with_context(|| format!("{name} has no MAC"))?;
    let index =
        nix::net::if_::if_nametoindex(name.as_str()).with_context(|| format!("index of {name}"))?;
    let peer = link_peer(index).with_context(|| format!("the veth peer of {name}"))?;
    Ok(VethEnds {
        host_ifindex: peer,
        mac,
    })
}

/// `IFLA_LINK` of interface `index`: for a veth, its peer's index in the peer's namespace.
fn link_peer(index: u32) -> Result<u32> {
    let fd = netns::netlink_socket(0, false, Some(std::time::Duration::from_secs(1)))?;
    let mut m = LinkMessage::default();
    m.header.index = index;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(m)),
    );
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    // SAFETY: sending a buffer we own on a descriptor we own.
    if unsafe { libc::send(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) } < 0 {
        return Err(io::Error::last_os_error()).context("ask for the link");
    }
    let mut answer = vec![0u8; 16384];
    // SAFETY: reading into a buffer we own from a descriptor we own.
    let n = unsafe { libc::recv(fd.as_raw_fd(), answer.as_mut_ptr().cast(), answer.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("read the link");
    }
    peer_in(&answer[..n as usize])
}

/// The `IFLA_LINK` of the link message in a netlink answer.
fn peer_in(answer: &[u8]) -> Result<u32> {
    let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(answer)
        .context("decode the link answer")?;
    match msg.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => l
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Link(peer) => Some(*peer),
                _ => None,
            })
            .context("not a veth (no peer link)"),
        NetlinkPayload::Error(e) => bail!("netlink: {e:?}"),
        other => bail!("unexpected answer {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_no_interface_holds_is_an_error() {
        let e = veth_here(Ipv4Addr::new(192, 0, 2, 77)).unwrap_err();
        assert!(e.to_string().contains("no interface holds"), "{e:#}");
    }

    #[test]
    fn loopback_is_not_a_veth() {
        // 127.0.0.1 is on lo, which has a (zero) MAC but no peer.
        let e = veth_here(Ipv4Addr::LOCALHOST).unwrap_err();
        assert!(format!("{e:#}").contains("peer"), "{e:#}");
    }
}
