//! The request path against hostile packets: the corpus in `tests/corpus`, random bytes, and
//! random mutations of the corpus. Every packet gets a well-formed reply to its own id or is
//! dropped; nothing panics, and a response is never answered (no reflection loops).
use std::{fs, net::Ipv4Addr, path::Path};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use meshd_dns::{
    answer::{answer, Decision, Transport},
    Entry, Kind, NetworkRecords, Zones,
};
use proptest::prelude::*;

fn zones() -> Zones {
    let mut n = NetworkRecords {
        id: "n1".into(),
        name: "front".into(),
        ..Default::default()
    };
    n.names.insert(
        "web".into(),
        Entry {
            kind: Kind::ServiceVip,
            addrs: vec![Ipv4Addr::new(10, 0, 1, 2)].into(),
            shuffle: false,
            about: "service web".into(),
        },
    );
    n.ptr.insert(Ipv4Addr::new(10, 0, 1, 2), "web".into());
    Zones {
        networks: [("n1".to_string(), std::sync::Arc::new(n))].into(),
    }
}

/// The invariants every decision keeps; returns the reply's code when there is one.
fn check(packet: &[u8], transport: Transport) -> Option<ResponseCode> {
    let (d, _) = answer(packet, &["n1".to_string()], &zones(), transport, 7);
    match d {
        Decision::Drop | Decision::Forward => None,
        Decision::Reply(bytes) => {
            assert!(
                packet.len() >= 12,
                "replied to a {}-byte packet",
                packet.len()
            );
            assert!(packet[2] & 0x80 == 0, "replied to a response");
            let m = Message::from_vec(&bytes).expect("our reply parses");
            assert_eq!(m.message_type(), MessageType::Response);
            assert_eq!(m.id(), u16::from_be_bytes([packet[0], packet[1]]));
            if transport == Transport::Udp && m.extensions().is_none() {
                assert!(bytes.len() <= 512 || m.truncated());
            }
            Some(m.response_code())
        }
    }
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut v: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
        .map(|e| {
            let name = e.path().file_stem().unwrap().to_string_lossy().into_owned();
            (name, fs::read(e.path()).unwrap())
        })
        .collect();
    v.sort();
    assert!(v.len() >= 20, "corpus has {} packets", v.len());
    v
}

#[test]
fn every_corpus_packet_is_answered_to_its_id_or_dropped() {
    use ResponseCode::*;
    for (name, packet) in corpus() {
        for t in [Transport::Udp, Transport::Tcp] {
            let code = check(&packet, t);
            let want: &[Option<ResponseCode>] = match name.as_str() {
                "empty" | "short-header" | "response-bit-set" => &[None],
                "two-questions"
                | "zero-questions"
                | "huge-counts"
                | "compression-loop-self"
                | "compression-loop-pair"
                | "compression-forward-pointer"
                | "label-too-long"
                | "name-too-long"
                | "reserved-label-type"
                | "label-runs-past-end"
                | "missing-type-class"
                | "header-only-claims-a-question"
                | "bad-edns-rdlen" => &[Some(FormErr)],
                "opcode-update" | "class-chaos" => &[Some(NotImp)],
                "valid-a-web" | "valid-any" | "valid-ptr" => &[Some(NoError)],
                // Not specified: any well-formed outcome (checked above) will do.
                _ => continue,
            };
            assert!(
                want.contains(&code),
                "{name} over {t:?}: got {code:?}, want {want:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn random_bytes_never_break_the_request_path(packet in prop::collection::vec(any::<u8>(), 0..700)) {
        check(&packet, Transport::Udp);
        check(&packet, Transport::Tcp);
    }

    #[test]
    fn mutated_corpus_packets_never_break_the_request_path(
        pick in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let all = corpus();
        let mut packet = all[pick.index(all.len())].1.clone();
        if !packet.is_empty() {
            for (at, byte) in flips {
                let i = at.index(packet.len());
                packet[i] = byte;
            }
            let keep = cut.index(packet.len() + 1);
            packet.truncate(keep.max(packet.len() / 2));
        }
        check(&packet, Transport::Udp);
    }
}
