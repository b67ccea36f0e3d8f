//! The ingress mesh's tc programs on crafted packets (`BPF_PROG_TEST_RUN`): address, port
//! and checksum rewrites, SNAT and the client-preserving mode, the reply path, the tunnel's
//! wrapping (with the TCP MSS clamped) and unwrapping, fragments refused, a port with no
//! task, and a flow table smaller than the flows. Each case runs in a network namespace of
//! its own (a thread that unshares one), so the programs' route lookups see the routes and
//! neighbours the case sets up and nothing of the host's.
use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    process::Command,
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use meshd_common::{
    ingress_stat, map_names, prog_names, IngressBackend, IngressConfig, IngressPortKey,
    IngressPortValue, LocalLeg, MaglevKey, IG_PRESERVE_CLIENT, INGRESS_TUNNEL_PORT,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 3);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 200);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xc8];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
const GATEWAY_NET: &str = "172.17.0.1/16";
const BRIDGE_MAC: [u8; 6] = [2, 0x42, 0xac, 0x11, 0, 1];
const TASK_GW: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 3);
const TASK_GW_MAC: [u8; 6] = [2, 0x42, 0xac, 0x11, 0, 3];
const TASK: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 7);
const REMOTE_TASK: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);
const SLOTS: u32 = 101;

fn root_or_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root (CI=true: this must run, not skip)");
    }
    eprintln!("SKIPPED {test}: needs root");
    false
}

/// Runs `f` on a thread in a fresh network namespace (gone with the thread).
fn in_fresh_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare netns");
        f()
    })
    .join()
    .expect("the case panicked")
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "no interface {name}");
    i
}

/// The node as the programs see it: an uplink with the node's address (the client and a
/// peer node as static neighbours), and a `docker_gwbridge` with a task's leg behind it.
struct Node {
    ebpf: Ebpf,
    pins: PathBuf,
    uplink: u32,
    bridge: u32,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

fn node(flows: u32) -> Node {
    sh(&["ip", "link", "set", "lo", "up"]);
    // As Docker leaves a node: the route lookups of the programs need it. (A /proc/sys/net
    // file is the namespace of the thread that opens it: this one's.)
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding");
    sh(&[
        "ip", "link", "add", "up0", "type", "veth", "peer", "name", "up1",
    ]);
    sh(&["ip", "addr", "add", "192.168.100.1/24", "dev", "up0"]);
    sh(&["ip", "link", "set", "up0", "up"]);
    sh(&["ip", "link", "set", "up1", "up"]);
    for (ip, mac) in [(CLIENT, CLIENT_MAC), (PEER, PEER_MAC)] {
        sh(&[
            "ip",
            "neigh",
            "replace",
            &ip.to_string(),
            "lladdr",
            &mac_str(mac),
            "dev",
            "up0",
            "nud",
            "permanent",
        ]);
    }
    sh(&[
        "ip",
        "link",
        "add",
        "gwbr",
        "address",
        &mac_str(BRIDGE_MAC),
        "type",
        "bridge",
    ]);
    sh(&["ip", "addr", "add", GATEWAY_NET, "dev", "gwbr"]);
    sh(&["ip", "link", "set", "gwbr", "up"]);
    sh(&[
        "ip",
        "neigh",
        "replace",
        &TASK_GW.to_string(),
        "lladdr",
        &mac_str(TASK_GW_MAC),
        "dev",
        "gwbr",
        "nud",
        "permanent",
    ]);
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/meshd-pkt-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ))
    .to_string_lossy()
    .replace(['(', ')'], "")
    .into();
    std::fs::create_dir_all(&pins).expect("pin dir on bpffs (is /sys/fs/bpf mounted?)");
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(&pins)
        .map_max_entries(map_names::IG_FLOWS, flows)
        .map_max_entries(map_names::IG_REV, flows)
        .load(meshd::datapath::ebpf::object())
        .expect("load the eBPF object");
    for name in [prog_names::INGRESS_IN, prog_names::INGRESS_BACK] {
        let p: &mut SchedClassifier = ebpf.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap_or_else(|e| panic!("verify {name}: {e:?}"));
    }
    let uplink = ifindex("up0");
    let bridge = ifindex("gwbr");
    let mut n = Node {
        ebpf,
        pins,
        uplink,
        bridge,
    };
    let mut conf: Array<&mut MapData, IngressConfig> =
        Array::try_from(n.ebpf.map_mut(map_names::IG_CONFIG).unwrap()).unwrap();
    conf.set(
        0,
        IngressConfig {
            bridge_ifindex: bridge,
            node_addr: be(NODE),
            tunnel_port: INGRESS_TUNNEL_PORT.to_be(),
            tunnel_mtu: 1500 - 28,
            bridge_mac: BRIDGE_MAC,
            _pad: [0; 6],
        },
        0,
    )
    .unwrap();
    n.put_u32(map_names::IG_ADDRS, be(NODE), 1);
    n.put_u32(map_names::IG_NODES, be(PEER), 1);
    n
}

fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Node {
    fn put_u32(&mut self, map: &str, k: u32, v: u32) {
        let mut m: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.ebpf.map_mut(map).unwrap()).unwrap();
        m.insert(k, v, 0).unwrap();
    }

    /// Publishes `port`/`proto` with every Maglev slot on `backend`.
    fn publish(&mut self, port: u16, proto: u8, backend: IngressBackend, flags: u16) {
        let lb_id = u32::from(port);
        let mut ports: HashMap<&mut MapData, IngressPortKey, IngressPortValue> =
            HashMap::try_from(self.ebpf.map_mut(map_names::IG_PORTS).unwrap()).unwrap();
        ports
            .insert(
                IngressPortKey {
                    port: port.to_be(),
                    proto,
                    _pad: 0,
                },
                IngressPortValue {
                    lb_id,
                    slots: if backend.addr == 0 { 0 } else { SLOTS },
                    target: 80u16.to_be(),
                    flags,
                    _pad: 0,
                },
                0,
            )
            .unwrap();
        let mut maglev: HashMap<&mut MapData, MaglevKey, IngressBackend> =
            HashMap::try_from(self.ebpf.map_mut(map_names::IG_MAGLEV).unwrap()).unwrap();
        for slot in 0..SLOTS {
            maglev
                .insert(MaglevKey { lb_id, slot }, backend, 0)
                .unwrap();
        }
        self.live(lb_id, backend.addr);
        if backend.node == 0 && backend.addr != 0 {
            self.put_leg(backend.addr, backend.gateway, None);
        }
    }

    /// A local task's bridge leg, with its veth (host end, container MAC) when known.
    fn put_leg(&mut self, addr: u32, gateway: u32, veth: Option<(u32, [u8; 6])>) {
        let mut m: HashMap<&mut MapData, u32, LocalLeg> =
            HashMap::try_from(self.ebpf.map_mut(map_names::IG_LOCAL).unwrap()).unwrap();
        let leg = LocalLeg {
            gateway,
            host_ifindex: veth.map_or(0, |v| v.0),
            mac: veth.map_or([0; 6], |v| v.1),
            _pad: [0; 2],
        };
        m.insert(addr, leg, 0).unwrap();
    }

    /// Marks a task as one that may have flows (serving or draining).
    fn live(&mut self, lb_id: u32, addr: u32) {
        let mut live: HashMap<&mut MapData, MaglevKey, u32> =
            HashMap::try_from(self.ebpf.map_mut(map_names::IG_LIVE).unwrap()).unwrap();
        live.insert(MaglevKey { lb_id, slot: addr }, 1, 0).unwrap();
    }

    /// One run of program `prog` on `packet` arriving on `ifindex`: (verdict, packet after).
    fn run(&self, prog: &str, ifindex: u32, packet: &[u8]) -> (u32, Vec<u8>) {
        let p: &SchedClassifier = self.ebpf.program(prog).unwrap().try_into().unwrap();
        let fd = p.fd().unwrap().as_fd().as_raw_fd();
        test_run(fd, ifindex, packet)
    }

    /// `run`, which must redirect the packet: what it became.
    fn redirected(&self, prog: &str, ifindex: u32, packet: &[u8]) -> Seen {
        let (verdict, out) = self.run(prog, ifindex, packet);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{prog} on interface {ifindex}");
        seen(&out)
    }

    fn stats(&self) -> Vec<u64> {
        (0..ingress_stat::COUNT).map(|i| self.stat(i)).collect()
    }

    fn stat(&self, i: u32) -> u64 {
        let m: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(self.ebpf.map(map_names::IG_STATS).unwrap()).unwrap();
        m.get(&i, 0).unwrap().iter().sum()
    }
}

/// `BPF_PROG_TEST_RUN` with an `__sk_buff` context naming the interface it came in on.
fn test_run(prog_fd: i32, ifindex: u32, packet: &[u8]) -> (u32, Vec<u8>) {
    #[repr(C)]
    #[derive(Default)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    // __sk_buff: 9 u32 fields, then ingress_ifindex, ifindex (the rest zero).
    let mut ctx = [0u32; 48];
    ctx[9] = ifindex;
    ctx[10] = ifindex;
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRun {
        prog_fd: prog_fd as u32,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat: 1,
        ctx_size_in: (ctx.len() * 4) as u32,
        ctx_in: ctx.as_ptr() as u64,
        ..Default::default()
    };
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    // SAFETY: the attribute and its buffers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            &mut attr as *mut TestRun,
            std::mem::size_of::<TestRun>(),
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_PROG_TEST_RUN: {}",
        std::io::Error::last_os_error()
    );
    out.truncate(attr.data_size_out as usize);
    (attr.retval, out)
}

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend([0, proto]);
    p.extend((len as u16).to_be_bytes());
    p.chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum()
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// An Ethernet + IPv4 + TCP (SYN with an MSS option) or UDP packet with right checksums.
fn packet(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, frag: u16) -> Vec<u8> {
    segment(src, dst, proto, frag, 0x02)
}

/// A TCP ACK of an established connection (no SYN: it continues a flow).
fn ack(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    segment(src, dst, TCP, 0, 0x10)
}

fn segment(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, frag: u16, flags: u8) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend(src.1.to_be_bytes());
    l4.extend(dst.1.to_be_bytes());
    if proto == TCP {
        l4.extend(1u32.to_be_bytes()); // seq
        l4.extend(0u32.to_be_bytes()); // ack
        l4.extend([0x60, flags]); // 24-byte header
        l4.extend(64240u16.to_be_bytes());
        l4.extend([0, 0, 0, 0]); // checksum, urgent
        l4.extend([2, 4, 0x05, 0xb4]); // MSS 1460
    } else {
        l4.extend(((8 + 4) as u16).to_be_bytes());
        l4.extend([0, 0]);
        l4.extend(*b"ping");
    }
    let c = csum(&l4, pseudo(src.0, dst.0, proto, l4.len()));
    let at = if proto == TCP { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    ip_packet(src.0, dst.0, proto, frag, &l4)
}

/// `inner` (a frame) as the peer node's meshd sends it through the tunnel to this node.
fn from_peer(inner: &[u8]) -> Vec<u8> {
    from_tunnel(PEER, inner)
}

fn from_tunnel(from: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend(50000u16.to_be_bytes());
    udp.extend(INGRESS_TUNNEL_PORT.to_be_bytes());
    udp.extend(((8 + inner.len() - 14) as u16).to_be_bytes());
    udp.extend([0, 0]);
    udp.extend(&inner[14..]);
    ip_packet(from, NODE, UDP, 0, &udp)
}

fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + payload.len()) as u16).to_be_bytes());
    ip.extend([0, 1]);
    ip.extend(frag.to_be_bytes());
    ip.extend([64, proto, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = csum(&ip, 0);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut eth = vec![0u8; 12];
    eth.extend(0x0800u16.to_be_bytes());
    eth.extend(ip);
    eth.extend(payload);
    eth
}

/// What a packet says, its checksums checked.
#[derive(Debug, PartialEq)]
struct Seen {
    dst_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    proto: u8,
    mss: Option<u16>,
}

fn seen(p: &[u8]) -> Seen {
    assert_eq!(&p[12..14], &[8, 0], "IPv4");
    let ip = &p[14..];
    let ihl = usize::from(ip[0] & 15) * 4;
    assert_eq!(csum(&ip[..ihl], 0), 0, "IP checksum");
    let len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    assert_eq!(len, ip.len(), "IP total length");
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let l4 = &ip[ihl..len];
    let proto = ip[9];
    let csum_at = if proto == TCP { 16 } else { 6 };
    if proto == TCP || u16::from_be_bytes([l4[csum_at], l4[csum_at + 1]]) != 0 {
        assert_eq!(
            csum(l4, pseudo(src, dst, proto, l4.len())),
            0,
            "{proto} checksum"
        );
    }
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let mss = (proto == TCP && l4.len() >= 24 && l4[20] == 2)
        .then(|| u16::from_be_bytes([l4[22], l4[23]]));
    Seen {
        dst_mac: p[..6].try_into().unwrap(),
        src: (src, port(0)),
        dst: (dst, port(2)),
        proto,
        mss,
    }
}

fn local_task() -> IngressBackend {
    IngressBackend {
        addr: be(TASK),
        node: 0,
        gateway: be(TASK_GW),
        _pad: 0,
    }
}

#[test]
fn a_local_task_gets_the_flow_snat_and_its_reply_goes_back_to_the_client() {
    if !root_or_skip("a_local_task_gets_the_flow") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(1024);
        n.publish(8080, TCP, local_task(), 0);
        let syn = packet((CLIENT, 40000), (NODE, 8080), TCP, 0);
        let (verdict, out) = n.run(prog_names::INGRESS_IN, n.uplink, &syn);
        assert_eq!(verdict, TC_ACT_REDIRECT, "sent on to the bridge");
        let s = seen(&out);
        assert_eq!(s.dst, (TASK_GW, 80), "to the task's bridge leg and port");
        assert_eq!(
            s.src,
            (NODE, 40000),
            "SNAT: the node, the client's port while free"
        );
        assert_eq!(s.mss, Some(1460), "not tunnelled: MSS untouched");
        // The same flow goes on: same task, same source, no second flow.
        let (_, again) = n.run(
            prog_names::INGRESS_IN,
            n.uplink,
            &ack((CLIENT, 40000), (NODE, 8080)),
        );
        assert_eq!((seen(&again).src, seen(&again).dst), (s.src, s.dst));
        assert_eq!(n.stat(ingress_stat::NEW_FLOWS), 1);
        // A SYN on those addresses and ports is a new connection (a client port used
        // again): it picks again, and its old reply entry does not hold its port.
        let (_, again) = n.run(prog_names::INGRESS_IN, n.uplink, &syn);
        assert_eq!(
            seen(&again),
            s,
            "the same pick, the same (freed) source port"
        );
        assert_eq!(n.stat(ingress_stat::NEW_FLOWS), 2);
        // A flow whose task is gone (not live any more) picks again instead of sending
        // to nothing.
        let mut live: HashMap<&mut MapData, MaglevKey, u32> =
            HashMap::try_from(n.ebpf.map_mut(map_names::IG_LIVE).unwrap()).unwrap();
        live.remove(&MaglevKey {
            lb_id: 8080,
            slot: be(TASK),
        })
        .unwrap();
        let _ = n.run(
            prog_names::INGRESS_IN,
            n.uplink,
            &ack((CLIENT, 40000), (NODE, 8080)),
        );
        assert_eq!(n.stat(ingress_stat::NEW_FLOWS), 3);
        n.live(8080, be(TASK));
        // Another client with the same port: SNAT gives it another source port.
        let other = Ipv4Addr::new(192, 168, 100, 201);
        let (_, out2) = n.run(
            prog_names::INGRESS_IN,
            n.uplink,
            &packet((other, 40000), (NODE, 8080), TCP, 0),
        );
        let s2 = seen(&out2);
        assert_eq!(s2.src.0, NODE);
        assert_ne!(
            s2.src.1, 40000,
            "the port taken by the first client is not reused"
        );
        // The task's reply, at the bridge: back to the client, from the published port.
        let reply = packet((TASK_GW, 80), (NODE, 40000), TCP, 0);
        let (verdict, back) = n.run(prog_names::INGRESS_BACK, n.bridge, &reply);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", n.stats());
        let b = seen(&back);
        assert_eq!((b.src, b.dst), ((NODE, 8080), (CLIENT, 40000)));
        assert_eq!(
            b.dst_mac, CLIENT_MAC,
            "routed to the client's neighbour entry"
        );
        // Traffic that is not a flow's reply is left to the stack.
        let stray = packet((TASK_GW, 80), (CLIENT, 5555), TCP, 0);
        assert_eq!(
            n.run(prog_names::INGRESS_BACK, n.bridge, &stray).0,
            TC_ACT_OK
        );
        drop(n);
    });
}

#[test]
fn the_client_preserving_mode_shows_the_task_the_clients_own_address() {
    if !root_or_skip("the_client_preserving_mode") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(1024);
        n.publish(5353, UDP, local_task(), IG_PRESERVE_CLIENT);
        let q = packet((CLIENT, 41000), (NODE, 5353), UDP, 0);
        let (verdict, out) = n.run(prog_names::INGRESS_IN, n.uplink, &q);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let s = seen(&out);
        assert_eq!((s.src, s.dst), ((CLIENT, 41000), (TASK_GW, 80)));
        let reply = packet((TASK_GW, 80), (CLIENT, 41000), UDP, 0);
        let (verdict, back) = n.run(prog_names::INGRESS_BACK, n.bridge, &reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let b = seen(&back);
        assert_eq!((b.src, b.dst), ((NODE, 5353), (CLIENT, 41000)));
    });
}

#[test]
fn a_remote_task_is_reached_through_the_tunnel_and_its_node_unwraps_it() {
    if !root_or_skip("a_remote_task_is_reached_through_the_tunnel") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(1024);
        n.publish(
            8080,
            TCP,
            IngressBackend {
                addr: be(REMOTE_TASK),
                node: be(PEER),
                gateway: 0,
                _pad: 0,
            },
            0,
        );
        let syn = packet((CLIENT, 40000), (NODE, 8080), TCP, 0);
        let (verdict, out) = n.run(prog_names::INGRESS_IN, n.uplink, &syn);
        assert_eq!(
            verdict,
            TC_ACT_REDIRECT,
            "routed to the peer: {:?}",
            n.stats()
        );
        let outer = seen(&out);
        assert_eq!(outer.proto, UDP);
        assert_eq!(outer.dst, (PEER, INGRESS_TUNNEL_PORT));
        assert_eq!(outer.src.0, NODE);
        assert_eq!(outer.dst_mac, PEER_MAC);
        let mut inner = out[..14].to_vec();
        inner.extend(&out[14 + 28..]);
        let i = seen(&inner);
        assert_eq!((i.src, i.dst), ((NODE, 40000), (REMOTE_TASK, 80)));
        assert_eq!(
            i.mss,
            Some(1500 - 28 - 40),
            "MSS clamped to what fits the tunnel"
        );
        assert_eq!(n.stat(ingress_stat::TUNNELLED), 1);

        // The peer's reply comes back through the tunnel: unwrapped, sent to the client.
        let reply = packet((REMOTE_TASK, 80), (NODE, 40000), TCP, 0);
        let wrapped = from_peer(&reply);
        let (verdict, back) = n.run(prog_names::INGRESS_IN, n.uplink, &wrapped);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let b = seen(&back);
        assert_eq!((b.src, b.dst), ((NODE, 8080), (CLIENT, 40000)));
        assert_eq!(b.dst_mac, CLIENT_MAC);
    });
}

#[test]
fn a_tunnelled_flow_is_delivered_to_the_local_task_and_its_reply_goes_back_in_the_tunnel() {
    if !root_or_skip("a_tunnelled_flow_is_delivered_to_the_local_task") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(1024);
        // This node runs the task; PEER is the entry node that chose it.
        n.put_leg(be(TASK), be(TASK_GW), None);
        let inner = packet((PEER, 40000), (TASK, 80), TCP, 0);
        let (verdict, out) = n.run(prog_names::INGRESS_IN, n.uplink, &from_peer(&inner));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let s = seen(&out);
        assert_eq!((s.src, s.dst), ((PEER, 40000), (TASK_GW, 80)));
        // A tunnel from an address that is not a swarm node is not unwrapped.
        let stranger = Ipv4Addr::new(192, 168, 100, 66);
        let (verdict, _) = n.run(
            prog_names::INGRESS_IN,
            n.uplink,
            &from_tunnel(stranger, &inner),
        );
        assert_eq!(verdict, TC_ACT_OK, "left to the stack");
        // The task's reply leaves by the tunnel, from its ingress address, to the entry node.
        let reply = packet((TASK_GW, 80), (PEER, 40000), TCP, 0);
        let (verdict, back) = n.run(prog_names::INGRESS_BACK, n.bridge, &reply);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let outer = seen(&back);
        assert_eq!(
            (outer.src.0, outer.dst),
            (NODE, (PEER, INGRESS_TUNNEL_PORT))
        );
        let mut inner = back[..14].to_vec();
        inner.extend(&back[14 + 28..]);
        let i = seen(&inner);
        assert_eq!((i.src, i.dst), ((TASK, 80), (PEER, 40000)));
    });
}

#[test]
fn a_local_task_whose_veth_is_known_gets_frames_straight_into_its_namespace() {
    if !root_or_skip("a_local_task_whose_veth_is_known") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(1024);
        // The task's leg as meshd reads it from the container's namespace (here a veth in
        // this one): the interface holding the leg's address, its MAC, its peer.
        sh(&[
            "ip",
            "link",
            "add",
            "tk0",
            "address",
            &mac_str(TASK_GW_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "tkh",
        ]);
        sh(&["ip", "addr", "add", &format!("{TASK_GW}/32"), "dev", "tk0"]);
        let veth = meshd::source::bridge_leg::veth_here(TASK_GW).expect("read the leg's veth");
        assert_eq!(veth.host_ifindex, ifindex("tkh"), "the veth's other end");
        assert_eq!(veth.mac, TASK_GW_MAC);
        n.publish(8080, TCP, local_task(), 0);
        n.put_leg(be(TASK), be(TASK_GW), Some((veth.host_ifindex, veth.mac)));
        let (verdict, out) = n.run(
            prog_names::INGRESS_IN,
            n.uplink,
            &packet((CLIENT, 40000), (NODE, 8080), TCP, 0),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let s = seen(&out);
        assert_eq!((s.src, s.dst), ((NODE, 40000), (TASK_GW, 80)));
        assert_eq!(s.dst_mac, TASK_GW_MAC, "addressed to the container's leg");
        assert_eq!(
            &out[6..12],
            &BRIDGE_MAC,
            "from the bridge, as the bridge would send it"
        );
        // Out of the tunnel, the same.
        let inner = packet((PEER, 40001), (TASK, 80), TCP, 0);
        let (verdict, out) = n.run(prog_names::INGRESS_IN, n.uplink, &from_peer(&inner));
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let s = seen(&out);
        assert_eq!((s.src, s.dst), ((PEER, 40001), (TASK_GW, 80)));
        assert_eq!((s.dst_mac, &out[6..12]), (TASK_GW_MAC, &BRIDGE_MAC[..]));
        // Not a veth (the bridge's own address): an error, and meshd then delivers
        // through the bridge.
        let e = meshd::source::bridge_leg::veth_here(Ipv4Addr::new(172, 17, 0, 1)).unwrap_err();
        assert!(format!("{e:#}").contains("not a veth"), "{e:#}");
    });
}

#[test]
fn fragments_no_task_and_other_traffic() {
    if !root_or_skip("fragments_no_task_and_other_traffic") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(1024);
        n.publish(8080, UDP, local_task(), 0);
        // A first fragment (more fragments set) is refused, and counted.
        let frag = packet((CLIENT, 40000), (NODE, 8080), UDP, 0x2000);
        assert_eq!(
            n.run(prog_names::INGRESS_IN, n.uplink, &frag).0,
            TC_ACT_SHOT
        );
        assert_eq!(n.stat(ingress_stat::FRAGMENTS), 1);
        // A published port whose service has no live task drops at once.
        n.publish(
            9090,
            TCP,
            IngressBackend {
                addr: 0,
                node: 0,
                gateway: 0,
                _pad: 0,
            },
            0,
        );
        let syn = packet((CLIENT, 40000), (NODE, 9090), TCP, 0);
        assert_eq!(n.run(prog_names::INGRESS_IN, n.uplink, &syn).0, TC_ACT_SHOT);
        assert_eq!(n.stat(ingress_stat::NO_BACKEND), 1);
        // Not published, or not to this node: untouched.
        for p in [
            packet((CLIENT, 40000), (NODE, 22), TCP, 0),
            packet(
                (CLIENT, 40000),
                (Ipv4Addr::new(192, 168, 100, 9), 8080),
                UDP,
                0,
            ),
        ] {
            let (verdict, out) = n.run(prog_names::INGRESS_IN, n.uplink, &p);
            assert_eq!((verdict, &out), (TC_ACT_OK, &p));
        }
    });
}

#[test]
fn a_full_flow_table_forgets_old_flows_and_maglev_gives_them_the_same_task() {
    if !root_or_skip("a_full_flow_table") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(16);
        n.publish(8080, TCP, local_task(), IG_PRESERVE_CLIENT);
        // Two tasks by slot: even slots local, odd ones another local task.
        let mut maglev: HashMap<&mut MapData, MaglevKey, IngressBackend> =
            HashMap::try_from(n.ebpf.map_mut(map_names::IG_MAGLEV).unwrap()).unwrap();
        let other_gw = Ipv4Addr::new(172, 17, 0, 4);
        for slot in (1..SLOTS).step_by(2) {
            maglev
                .insert(
                    MaglevKey { lb_id: 8080, slot },
                    IngressBackend {
                        addr: be(Ipv4Addr::new(10, 0, 0, 8)),
                        node: 0,
                        gateway: be(other_gw),
                        _pad: 0,
                    },
                    0,
                )
                .unwrap();
        }
        n.put_leg(be(Ipv4Addr::new(10, 0, 0, 8)), be(other_gw), None);
        let to = |port: u16| {
            let (_, out) = n.run(
                prog_names::INGRESS_IN,
                n.uplink,
                &packet((CLIENT, port), (NODE, 8080), TCP, 0),
            );
            seen(&out).dst.0
        };
        let first: Vec<Ipv4Addr> = (0..100).map(|i| to(30000 + i)).collect();
        assert!(
            first.contains(&TASK_GW) && first.contains(&other_gw),
            "{first:?}"
        );
        // 100 flows through a table of 16: the early ones were forgotten, and come back to
        // the same task.
        let again: Vec<Ipv4Addr> = (0..100).map(|i| to(30000 + i)).collect();
        assert_eq!(first, again);
        assert!(
            n.stat(ingress_stat::NEW_FLOWS) > 100,
            "flows were forgotten and re-picked"
        );
    });
}

#[test]
fn the_node_itself_and_its_containers_reach_published_ports() {
    if !root_or_skip("the_node_itself_and_its_containers_reach_published_ports") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(1024);
        // Client-preserving, to show that these are SNAT all the same.
        n.publish(8080, TCP, local_task(), IG_PRESERVE_CLIENT);
        let localhost = Ipv4Addr::LOCALHOST;
        // localhost:8080 from the node itself (tc on lo): to the task, from the node's
        // address (the reply must come back to something the bridge can reach).
        let s = n.redirected(
            prog_names::INGRESS_IN,
            1,
            &packet((localhost, 45000), (localhost, 8080), TCP, 0),
        );
        assert_eq!((s.src.0, s.dst), (NODE, (TASK_GW, 80)));
        // The reply goes in through lo, as from localhost:8080.
        let reply = packet((TASK_GW, 80), s.src, TCP, 0);
        let b = n.redirected(prog_names::INGRESS_BACK, n.bridge, &reply);
        assert_eq!((b.src, b.dst), ((localhost, 8080), (localhost, 45000)));
        assert_eq!(b.dst_mac, [0; 6], "loopback frame");
        // localhost from outside is not ours to answer.
        let (verdict, _) = n.run(
            prog_names::INGRESS_IN,
            n.uplink,
            &packet((CLIENT, 45000), (localhost, 8080), TCP, 0),
        );
        assert_eq!(verdict, TC_ACT_OK);
        // A container on this node (through the bridge) asking the node's address: SNAT to
        // that address, so the task's reply does not go straight back over the bridge.
        let container = Ipv4Addr::new(172, 17, 0, 9);
        let from_container =
            |port: u16, to: Ipv4Addr| packet((container, port), (to, 8080), TCP, 0);
        let s = n.redirected(
            prog_names::INGRESS_BACK,
            n.bridge,
            &from_container(46000, NODE),
        );
        assert_eq!((s.src.0, s.dst), (NODE, (TASK_GW, 80)));
        // The same container asking another node's address is served here, from this
        // node's address (its private source would not come back from the other node),
        // and the reply shows the address it asked.
        let s = n.redirected(
            prog_names::INGRESS_BACK,
            n.bridge,
            &from_container(46001, PEER),
        );
        assert_eq!((s.src.0, s.dst), (NODE, (TASK_GW, 80)));
        let reply = packet((TASK_GW, 80), s.src, TCP, 0);
        let b = n.redirected(prog_names::INGRESS_BACK, n.bridge, &reply);
        assert_eq!((b.src, b.dst), ((PEER, 8080), (container, 46001)));
        // An address that is no swarm node's is routed as the kernel would.
        let (verdict, out) = n.run(
            prog_names::INGRESS_BACK,
            n.bridge,
            &from_container(46002, CLIENT),
        );
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(seen(&out).dst, (CLIENT, 8080), "untouched");
    });
}

/// An ICMP error (type 3, code `code`) from `src` to `dst` quoting `quoted` (an Ethernet
/// frame: its IP header and first 8 bytes are quoted), checksums right.
fn icmp_error(src: Ipv4Addr, dst: Ipv4Addr, code: u8, quoted: &[u8]) -> Vec<u8> {
    let ip = &quoted[14..];
    let ihl = usize::from(ip[0] & 15) * 4;
    let mut icmp = vec![3, code, 0, 0, 0, 0, 0x05, 0xa0];
    icmp.extend(&ip[..ihl + 8]);
    let c = csum(&icmp, 0);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ip_packet(src, dst, 1, 0, &icmp)
}

/// What an ICMP error says: (its source, destination), and the quoted packet's (source,
/// destination) with ports; every checksum checked (the quoted header's too).
/// (source, destination) of an ICMP packet, and the quoted packet's, with ports.
type IcmpSeen = ((Ipv4Addr, Ipv4Addr), ((Ipv4Addr, u16), (Ipv4Addr, u16)));

fn seen_icmp(p: &[u8]) -> IcmpSeen {
    let ip = &p[14..];
    assert_eq!(csum(&ip[..20], 0), 0, "IP checksum");
    assert_eq!(ip[9], 1, "ICMP");
    let icmp = &ip[20..];
    assert_eq!(csum(icmp, 0), 0, "ICMP checksum");
    let q = &icmp[8..];
    assert_eq!(csum(&q[..20], 0), 0, "quoted IP header's checksum");
    let a = |o: usize| Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]);
    let qa = |o: usize| Ipv4Addr::new(q[o], q[o + 1], q[o + 2], q[o + 3]);
    let qp = |o: usize| u16::from_be_bytes([q[20 + o], q[21 + o]]);
    ((a(12), a(16)), ((qa(12), qp(0)), (qa(16), qp(2))))
}

#[test]
fn icmp_errors_of_a_flow_are_translated_both_ways() {
    if !root_or_skip("icmp_errors_of_a_flow_are_translated_both_ways") {
        return;
    }
    in_fresh_netns(|| {
        let mut n = node(1024);
        n.publish(5353, UDP, local_task(), 0);
        let q = packet((CLIENT, 41000), (NODE, 5353), UDP, 0);
        let (_, to_task) = n.run(prog_names::INGRESS_IN, n.uplink, &q);
        let s = seen(&to_task);
        assert_eq!((s.src, s.dst), ((NODE, 41000), (TASK_GW, 80)));
        // The task's port is closed: its "port unreachable" reaches the client, quoting
        // the datagram as the client sent it.
        let unreachable = icmp_error(TASK_GW, NODE, 3, &to_task);
        let (verdict, out) = n.run(prog_names::INGRESS_BACK, n.bridge, &unreachable);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", n.stats());
        assert_eq!(
            seen_icmp(&out),
            ((NODE, CLIENT), ((CLIENT, 41000), (NODE, 5353)))
        );
        // The client (or a router before it) answers a reply with an error: it reaches the
        // task, quoting the reply as the task sent it.
        let reply = packet((NODE, 5353), (CLIENT, 41000), UDP, 0);
        let router = Ipv4Addr::new(192, 168, 100, 254);
        let err = icmp_error(router, NODE, 4, &reply);
        let (verdict, out) = n.run(prog_names::INGRESS_IN, n.uplink, &err);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{:?}", n.stats());
        assert_eq!(
            seen_icmp(&out),
            ((router, TASK_GW), ((TASK_GW, 80), (NODE, 41000)))
        );
        assert_eq!(n.stat(ingress_stat::ICMP), 2);
        // A flow to a task on another node: the error goes through the tunnel to it.
        n.publish(
            5354,
            UDP,
            IngressBackend {
                addr: be(REMOTE_TASK),
                node: be(PEER),
                gateway: 0,
                _pad: 0,
            },
            0,
        );
        let q = packet((CLIENT, 42000), (NODE, 5354), UDP, 0);
        assert_eq!(
            n.run(prog_names::INGRESS_IN, n.uplink, &q).0,
            TC_ACT_REDIRECT
        );
        let reply = packet((NODE, 5354), (CLIENT, 42000), UDP, 0);
        let (verdict, out) = n.run(
            prog_names::INGRESS_IN,
            n.uplink,
            &icmp_error(router, NODE, 4, &reply),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        let outer = seen(&out);
        assert_eq!(
            (outer.src.0, outer.dst),
            (NODE, (PEER, INGRESS_TUNNEL_PORT))
        );
        let mut inner = out[..14].to_vec();
        inner.extend(&out[14 + 28..]);
        assert_eq!(
            seen_icmp(&inner),
            ((router, REMOTE_TASK), ((REMOTE_TASK, 80), (NODE, 42000)))
        );
        // An error about nothing of ours is the stack's.
        let stray = icmp_error(
            router,
            NODE,
            3,
            &packet((NODE, 5353), (Ipv4Addr::new(192, 168, 100, 77), 1), UDP, 0),
        );
        assert_eq!(n.run(prog_names::INGRESS_IN, n.uplink, &stray).0, TC_ACT_OK);
    });
}
