//! A generic netlink socket to IPVS in the namespace it was opened in (a netlink socket
//! belongs to the namespace of the thread that made it): the family's id resolved once,
//! requests acknowledged one by one, dumps read to their end.
use std::net::Ipv4Addr;

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlFamily, GenlMessage,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use super::{
    netlink::{self, Attr, Cmd, Dest, Forward, IpvsMessage, Service},
    plan::{Op, Svc, Table},
};

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("IPVS netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("this kernel has no IPVS (no generic netlink family \"IPVS\": is ip_vs loaded?)")]
    NoFamily,
    #[error("the kernel refused {what}: {}", why(err))]
    Refused { what: String, err: std::io::Error },
    #[error("an IPVS answer did not decode: {0}")]
    Decode(String),
}

pub type Result<T> = std::result::Result<T, IpvsError>;

/// IPVS's errors in its own words: it reuses errno values whose usual text misleads.
fn why(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ESRCH) => "no such virtual service".into(),
        Some(libc::ENOENT) => "no such real server".into(),
        Some(libc::EEXIST) => "it exists already".into(),
        _ => err.to_string(),
    }
}

pub struct IpvsSocket {
    sock: Socket,
    family: u16,
    seq: u32,
}

impl IpvsSocket {
    /// A socket to IPVS in the calling thread's network namespace.
    pub fn open() -> Result<IpvsSocket> {
        let mut sock = Socket::new(NETLINK_GENERIC)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        let mut s = IpvsSocket {
            sock,
            family: 0,
            seq: 0,
        };
        let ask = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(netlink::FAMILY.into())],
        });
        let answer = match s.request(ask, false, "the IPVS family's id") {
            Err(IpvsError::Refused { err, .. }) if err.raw_os_error() == Some(libc::ENOENT) => {
                return Err(IpvsError::NoFamily)
            }
            a => a?,
        };
        s.family = answer
            .iter()
            .flat_map(|m| &m.payload.nlas)
            .find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or(IpvsError::NoFamily)?;
        Ok(s)
    }

    /// Sends one request and reads its answers: the messages of a dump, or none (an
    /// acknowledgement) for a change.
    fn request<F>(
        &mut self,
        mut msg: GenlMessage<F>,
        dump: bool,
        what: &str,
    ) -> Result<Vec<GenlMessage<F>>>
    where
        F: GenlFamily + netlink_packet_core::Emitable + std::fmt::Debug,
        GenlMessage<F>: NetlinkDeserializable + NetlinkSerializable,
        <GenlMessage<F> as NetlinkDeserializable>::Error: std::fmt::Display,
    {
        if self.family != 0 {
            msg.set_resolved_family_id(self.family);
        }
        msg.finalize();
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { NLM_F_ACK };
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        let mut rx: Vec<u8> = Vec::with_capacity(1 << 16);
        loop {
            rx.clear();
            let n = self.sock.recv(&mut rx, 0)?;
            let mut at = 0;
            while at + 16 <= n {
                let len = u32::from_ne_bytes([rx[at], rx[at + 1], rx[at + 2], rx[at + 3]]) as usize;
                if len < 16 || at + len > n {
                    return Err(IpvsError::Decode(format!("a message of {len} bytes")));
                }
                let m = NetlinkMessage::<GenlMessage<F>>::deserialize(&rx[at..at + len])
                    .map_err(|e| IpvsError::Decode(format!("{what}: {e}")))?;
                at += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    // A dump's messages; a request's answer, before its acknowledgement.
                    NetlinkPayload::InnerMessage(g) => out.push(g),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(_) => {
                            return Err(IpvsError::Refused {
                                what: what.to_string(),
                                err: e.to_io(),
                            })
                        }
                    },
                    NetlinkPayload::Done(_) => return Ok(out),
                    _ => {}
                }
            }
        }
    }

    fn ipvs(
        &mut self,
        cmd: Cmd,
        attrs: Vec<Attr>,
        dump: bool,
        what: &str,
    ) -> Result<Vec<IpvsMessage>> {
        let msg = GenlMessage::from_payload(IpvsMessage { cmd, attrs });
        Ok(self
            .request(msg, dump, what)?
            .into_iter()
            .map(|m| m.payload)
            .collect())
    }

    /// The IPVS version (`major << 16 | minor << 8 | patch`) and connection table size.
    pub fn info(&mut self) -> Result<(u32, u32)> {
        let answer = self.ipvs(Cmd::GetInfo, vec![], false, "the IPVS version")?;
        let mut v = (0, 0);
        for a in answer.iter().flat_map(|m| &m.attrs) {
            match a {
                Attr::Version(x) => v.0 = *x,
                Attr::ConnTabSize(x) => v.1 = *x,
                _ => {}
            }
        }
        Ok(v)
    }

    /// The fwmark services in this namespace and their real servers, as `plan` reads them
    /// (other services, by address and port, are not meshd's and are left out).
    pub fn table(&mut self) -> Result<Table> {
        let mut t = Table::default();
        let services = self.ipvs(Cmd::GetService, vec![], true, "the services")?;
        for a in services.iter().flat_map(|m| &m.attrs) {
            let Attr::Service(attrs) = a else { continue };
            let Some(s) = Service::from_attrs(attrs) else {
                continue;
            };
            let dests = self
                .dests(s.fwmark)?
                .into_iter()
                .map(|d| (d.addr, d.weight))
                .collect();
            t.services.insert(
                s.fwmark,
                Svc {
                    scheduler: s.scheduler,
                    dests,
                },
            );
        }
        Ok(t)
    }

    /// A fwmark service's real servers, with the kernel's connection counts.
    pub fn dests(&mut self, fwmark: u32) -> Result<Vec<Dest>> {
        let attrs = vec![Attr::Service(Service::key(fwmark))];
        let what = format!("the real servers of fwmark {fwmark}");
        let answer = self.ipvs(Cmd::GetDest, attrs, true, &what)?;
        let mut out = Vec::new();
        for a in answer.iter().flat_map(|m| &m.attrs) {
            if let Attr::Dest(d) = a {
                out.push(Dest::from_attrs(d).map_err(|e| IpvsError::Decode(format!("{e:?}")))?);
            }
        }
        Ok(out)
    }

    /// One planned change.
    pub fn exec(&mut self, op: &Op) -> Result<()> {
        let dest = |addr: Ipv4Addr, weight: u32| Dest {
            addr,
            port: 0,
            forward: Forward::Masq,
            weight,
            active_conns: 0,
            inactive_conns: 0,
        };
        let (msg, what) = match op {
            Op::NewService { fwmark, scheduler } | Op::SetService { fwmark, scheduler } => {
                let s = Service {
                    fwmark: *fwmark,
                    scheduler: scheduler.clone(),
                };
                let mut m = netlink::new_service(&s);
                if matches!(op, Op::SetService { .. }) {
                    m.cmd = Cmd::SetService;
                }
                (m, format!("{op:?}"))
            }
            Op::DelService { fwmark } => (netlink::del_service(*fwmark), format!("{op:?}")),
            Op::NewDest {
                fwmark,
                addr,
                weight,
            } => (
                netlink::put_dest(*fwmark, &dest(*addr, *weight), true),
                format!("{op:?}"),
            ),
            Op::SetDest {
                fwmark,
                addr,
                weight,
            } => (
                netlink::put_dest(*fwmark, &dest(*addr, *weight), false),
                format!("{op:?}"),
            ),
            Op::DelDest { fwmark, addr } => {
                (netlink::del_dest(*fwmark, *addr, 0), format!("{op:?}"))
            }
        };
        self.ipvs(msg.cmd, msg.attrs, false, &what).map(|_| ())
    }

    /// Sets the connection timeouts (seconds; 0 leaves one as it is).
    pub fn set_timeouts(&mut self, tcp: u32, tcp_fin: u32, udp: u32) -> Result<()> {
        let m = netlink::set_timeouts(tcp, tcp_fin, udp);
        self.ipvs(m.cmd, m.attrs, false, "the timeouts").map(|_| ())
    }

    /// The connection timeouts: TCP established, TCP after FIN, UDP (seconds).
    pub fn timeouts(&mut self) -> Result<(u32, u32, u32)> {
        let answer = self.ipvs(Cmd::GetConfig, vec![], false, "the timeouts")?;
        let mut t = (0, 0, 0);
        for a in answer.iter().flat_map(|m| &m.attrs) {
            match a {
                Attr::TimeoutTcp(x) => t.0 = *x,
                Attr::TimeoutTcpFin(x) => t.1 = *x,
                Attr::TimeoutUdp(x) => t.2 = *x,
                _ => {}
            }
        }
        Ok(t)
    }
}
