//! The request path, from raw bytes to a decision: answer from our zones, forward upstream,
//! or drop. Pure (the caller brings the asking container's networks and a shuffle seed), so
//! it is tested and fuzzed without sockets. A malformed packet gets FORMERR when its header
//! can be read and is dropped otherwise; nothing here panics or blocks.
use std::net::Ipv4Addr;

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::{A, PTR},
        DNSClass, Name, RData, Record, RecordType,
    },
};
use serde::Serialize;

use crate::records::{parse_reverse_v4, Zones};

/// Classic DNS over UDP without EDNS.
const PLAIN_UDP_LIMIT: usize = 512;

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours: ask the upstream resolvers (the caller relays the original packet).
    Forward,
    /// Unreadable: not even an id to answer to.
    Drop,
}

/// Why a decision was taken: for logs and `meshctl dns`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Why {
    pub outcome: String,
    pub network: Option<String>,
    pub about: Option<String>,
    pub ttl: Option<u32>,
    pub addrs: Vec<Ipv4Addr>,
}

impl Why {
    fn outcome(s: &str) -> Why {
        Why {
            outcome: s.into(),
            ..Default::default()
        }
    }
}

/// Transport of the request: UDP answers that do not fit are truncated (the client retries
/// over TCP).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Answers `packet` for a container attached to `networks` (ids, in its order).
pub fn answer(
    packet: &[u8],
    networks: &[String],
    zones: &Zones,
    transport: Transport,
    seed: u64,
) -> (Decision, Why) {
    let request = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => return malformed(packet),
    };
    if request.message_type() != MessageType::Query {
        return (Decision::Drop, Why::outcome("dropped: not a query"));
    }
    if request.op_code() != OpCode::Query {
        return error(&request, ResponseCode::NotImp, "not implemented: opcode");
    }
    let [query] = request.queries() else {
        return error(&request, ResponseCode::FormErr, "formerr: not one question");
    };
    if query.query_class() != DNSClass::IN {
        return error(&request, ResponseCode::NotImp, "not implemented: class");
    }
    let qname = query.name().to_ascii();
    let qtype = query.query_type();

    if qtype == RecordType::PTR {
        if let Some(ip) = parse_reverse_v4(&qname) {
            if let Some((network, target)) = zones.reverse(ip, networks) {
                let Ok(target) = Name::from_ascii(format!("{target}.")) else {
                    return error(&request, ResponseCode::ServFail, "servfail: bad PTR target");
                };
                let ttl = 5;
                let rec = Record::from_rdata(query.name().clone(), ttl, RData::PTR(PTR(target)));
                let why = Why {
                    outcome: "answered PTR".into(),
                    network: Some(network.into()),
                    ttl: Some(ttl),
                    ..Default::default()
                };
                return (reply(&request, query, vec![rec], transport), why);
            }
        }
        return forward_or_refuse(&request, zones, networks);
    }

    let Some(found) = zones.lookup(&qname, networks) else {
        return forward_or_refuse(&request, zones, networks);
    };
    let entry = found.entry;
    let ttl = entry.kind.ttl(entry.shuffle);
    let mut addrs = entry.addrs.to_vec();
    if entry.shuffle {
        shuffle(&mut addrs, seed);
    }
    let mut why = Why {
        network: Some(found.network.into()),
        about: Some(entry.about(&found.name)),
        ttl: Some(ttl),
        ..Default::default()
    };
    let records = if qtype == RecordType::A {
        why.outcome = format!("answered {} A", addrs.len());
        why.addrs = addrs.clone();
        addrs
            .iter()
            .map(|a| Record::from_rdata(query.name().clone(), ttl, RData::A(A(*a))))
            .collect()
    } else {
        // Our name, another type (AAAA, MX, ...): it exists, with no data of that type.
        // Forwarding it would leak the name and could return someone else's address.
        why.outcome = format!("NODATA: {qtype} for a name with only A records");
        Vec::new()
    };
    (reply(&request, query, records, transport), why)
}

fn forward_or_refuse(request: &Message, zones: &Zones, networks: &[String]) -> (Decision, Why) {
    if zones.may_forward(networks) {
        (Decision::Forward, Why::outcome("not ours: forwarded"))
    } else {
        error(
            request,
            ResponseCode::Refused,
            "refused: not ours, and the container is only on internal networks",
        )
    }
}

fn response_for(request: &Message) -> Message {
    let mut m = Message::new();
    m.set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true);
    m
}

fn reply(request: &Message, query: &Query, records: Vec<Record>, transport: Transport) -> Decision {
    let mut m = response_for(request);
    m.set_authoritative(true).add_query(query.clone());
    let limit = match (transport, request.extensions()) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, Some(edns)) => usize::from(edns.max_payload()).max(PLAIN_UDP_LIMIT),
        (Transport::Udp, None) => PLAIN_UDP_LIMIT,
    };
    m.add_answers(records);
    match m.to_vec() {
        Ok(bytes) if bytes.len() <= limit => Decision::Reply(bytes),
        Ok(_) => {
            // Too big for this UDP exchange: header and question only, TC set.
            let mut t = response_for(request);
            t.set_authoritative(true)
                .set_truncated(true)
                .add_query(query.clone());
            t.to_vec().map_or(Decision::Drop, Decision::Reply)
        }
        Err(_) => Decision::Drop,
    }
}

fn error(request: &Message, code: ResponseCode, why: &str) -> (Decision, Why) {
    let mut m = response_for(request);
    m.set_response_code(code);
    if let [q] = request.queries() {
        m.add_query(q.clone());
    }
    (
        m.to_vec().map_or(Decision::Drop, Decision::Reply),
        Why::outcome(why),
    )
}

/// An error reply with `code` to a query that parsed before (SERVFAIL when every upstream
/// failed); `None` for a packet we would not answer at all.
pub fn error_reply(packet: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let request = Message::from_vec(packet).ok()?;
    match error(&request, code, "").0 {
        Decision::Reply(r) => Some(r),
        _ => None,
    }
}

/// A packet that does not parse: FORMERR with its id when there is a whole header (RFC 1035
/// asks for a reply where possible), dropped otherwise.
fn malformed(packet: &[u8]) -> (Decision, Why) {
    if packet.len() < 12 {
        return (
            Decision::Drop,
            Why::outcome("dropped: shorter than a header"),
        );
    }
    // A response (QR set) is never answered: that is how reflection loops start.
    if packet[2] & 0x80 != 0 {
        return (Decision::Drop, Why::outcome("dropped: malformed response"));
    }
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let mut m = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
    m.set_recursion_available(true);
    (
        m.to_vec().map_or(Decision::Drop, Decision::Reply),
        Why::outcome("formerr: malformed request"),
    )
}

/// Fisher–Yates with a xorshift generator: a fresh order per answer from the caller's seed.
fn shuffle(v: &mut [Ipv4Addr], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Entry, Kind, NetworkRecords};
    use hickory_proto::op::Edns;
    use std::str::FromStr;

    fn zones(tasks: usize) -> Zones {
        let mut front = NetworkRecords {
            id: "n1".into(),
            name: "front".into(),
            ..Default::default()
        };
        front.names.insert(
            "web".into(),
            Entry {
                kind: Kind::ServiceVip,
                addrs: vec![Ipv4Addr::new(10, 0, 1, 2)].into(),
                shuffle: false,
                about: "service web".into(),
            },
        );
        front.names.insert(
            "app".into(),
            Entry {
                kind: Kind::ServiceDnsrr,
                addrs: (0..tasks)
                    .map(|i| Ipv4Addr::new(10, 0, 1, 10 + i as u8))
                    .collect(),
                shuffle: true,
                about: "service app (dnsrr)".into(),
            },
        );
        front.ptr.insert(Ipv4Addr::new(10, 0, 1, 2), "web".into());
        let internal = NetworkRecords {
            id: "n9".into(),
            name: "secret".into(),
            internal: true,
            ..Default::default()
        };
        Zones {
            networks: [
                ("n1".into(), std::sync::Arc::new(front)),
                ("n9".into(), std::sync::Arc::new(internal)),
            ]
            .into(),
        }
    }

    fn query(name: &str, t: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(4242).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn reply_of(d: Decision) -> Message {
        match d {
            Decision::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// Asks `name` from a container on `front` and returns the reply.
    fn ask(z: &Zones, name: &str, t: RecordType, edns: bool, tr: Transport, seed: u64) -> Message {
        reply_of(answer(&query(name, t, edns), &nets(FRONT), z, tr, seed).0)
    }

    fn a_records(m: &Message) -> Vec<Ipv4Addr> {
        m.answers()
            .iter()
            .filter_map(|r| match r.data() {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    const FRONT: &[&str] = &["n1"];

    fn nets(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_vip_answer_keeps_the_id_and_the_question() {
        let (d, why) = answer(
            &query("Web.", RecordType::A, false),
            &nets(FRONT),
            &zones(3),
            Transport::Udp,
            1,
        );
        let m = reply_of(d);
        assert_eq!(m.id(), 4242);
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert_eq!(a_records(&m), [Ipv4Addr::new(10, 0, 1, 2)]);
        assert_eq!(m.queries().len(), 1);
        assert_eq!(why.network.as_deref(), Some("front"));
        assert_eq!(m.answers()[0].ttl(), Kind::ServiceVip.ttl(false));
    }

    #[test]
    fn dnsrr_answers_carry_every_task_in_varying_order_with_a_short_ttl() {
        let z = zones(5);
        let mut orders = std::collections::BTreeSet::new();
        for seed in 0..20 {
            let m = ask(&z, "app.", RecordType::A, false, Transport::Udp, seed);
            let mut got = a_records(&m);
            orders.insert(got.clone());
            got.sort();
            assert_eq!(got, z.networks["n1"].names["app"].addrs.to_vec());
            assert_eq!(m.answers()[0].ttl(), 1);
        }
        assert!(
            orders.len() > 5,
            "only {} orders in 20 answers",
            orders.len()
        );
    }

    #[test]
    fn aaaa_for_our_name_is_nodata_not_a_forward() {
        let m = ask(
            &zones(1),
            "web.",
            RecordType::AAAA,
            false,
            Transport::Udp,
            1,
        );
        assert_eq!(m.response_code(), ResponseCode::NoError);
        assert!(m.answers().is_empty());
    }

    #[test]
    fn other_names_are_forwarded_except_from_internal_only_containers() {
        let z = zones(1);
        let q = query("example.org.", RecordType::A, false);
        assert_eq!(
            answer(&q, &nets(FRONT), &z, Transport::Udp, 1).0,
            Decision::Forward
        );
        let m = reply_of(answer(&q, &nets(&["n9"]), &z, Transport::Udp, 1).0);
        assert_eq!(m.response_code(), ResponseCode::Refused);
        // A name of a network the container is not on is not ours for it.
        assert_eq!(
            answer(
                &query("web.", RecordType::A, false),
                &nets(&["n9"]),
                &z,
                Transport::Udp,
                1
            )
            .0,
            reply_refused()
        );
    }

    fn reply_refused() -> Decision {
        let mut m = Message::new();
        m.set_id(4242)
            .set_message_type(MessageType::Response)
            .set_recursion_desired(true)
            .set_recursion_available(true)
            .set_response_code(ResponseCode::Refused)
            .add_query(Query::query(Name::from_str("web.").unwrap(), RecordType::A));
        Decision::Reply(m.to_vec().unwrap())
    }

    #[test]
    fn ptr_for_a_vip_names_the_service() {
        let m = ask(
            &zones(1),
            "2.1.0.10.in-addr.arpa.",
            RecordType::PTR,
            false,
            Transport::Udp,
            1,
        );
        match m.answers()[0].data() {
            RData::PTR(p) => assert_eq!(p.0.to_ascii(), "web."),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_big_dnsrr_answer_is_truncated_over_udp_and_whole_over_tcp_or_edns() {
        let z = zones(200);
        let m = ask(&z, "app.", RecordType::A, false, Transport::Udp, 1);
        assert!(m.truncated() && m.answers().is_empty());
        let m = ask(&z, "app.", RecordType::A, false, Transport::Tcp, 1);
        assert!(!m.truncated() && m.answers().len() == 200);
        let m = ask(&z, "app.", RecordType::A, true, Transport::Udp, 1);
        assert!(!m.truncated() && m.answers().len() == 200);
    }
}
