//! The IPVS datapath against a real kernel's IPVS, in a QEMU VM (`vm`): this machine's
//! kernel has none (LAB.md). Netlink commands, the plan, the marks and the applier with
//! real `Desired` values, against namespaces joined by veths inside the VM.
mod vm;

#[test]
fn ipvs_in_a_vm() {
    if vm::inside() {
        vm::report(in_vm::checks);
        return;
    }
    vm::boot(&vm::Vm {
        test: "ipvs_in_a_vm",
        modules: &[],
        // busybox's ip cannot name a veth's peer.
        programs: &["/usr/sbin/nft", "/usr/bin/ip"],
        binaries: &[],
        setup: "",
        boot: vm::Boot::Busybox,
        memory_mb: 768,
        cpus: 1,
        timeout_s: 170,
    });
}

/// What runs inside the VM (as root, in a kernel with IPVS).
mod in_vm {
    use std::{
        net::Ipv4Addr,
        sync::mpsc::{Receiver, Sender},
    };

    use meshd::datapath::ipvs::{
        plan::{self, fwmark, Op, Svc, Table, SCHEDULER},
        socket::IpvsSocket,
    };

    fn svc(dests: &[(Ipv4Addr, u32)]) -> Svc {
        Svc {
            scheduler: SCHEDULER.into(),
            dests: dests.iter().copied().collect(),
        }
    }

    /// Sends a plan, reads the table back, and checks it is what was planned.
    fn converge(s: &mut IpvsSocket, want: &Table) -> Vec<Op> {
        let have = s.table().expect("read the table");
        let ops = plan::plan(&have, want);
        for op in &ops {
            s.exec(op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        }
        let mut expected = have.clone();
        expected.apply(&ops);
        assert_eq!(s.table().expect("read the table again"), expected);
        ops
    }

    pub fn checks() {
        // A namespace of its own (IPVS tables are per namespace), as a container's is.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            // A namespace with no interface up has no local routing table, and IPVS takes
            // a real server only at an address that routes as unicast (EINVAL otherwise).
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .expect("ip link");
            assert!(up.success());
            let mut s = IpvsSocket::open().expect("open IPVS");
            let (version, size) = s.info().expect("IPVS info");
            println!(
                "vm: IPVS {}.{}.{}, table size {size}",
                version >> 16,
                (version >> 8) & 0xff,
                version & 0xff
            );
            assert!(version >= 0x01_02_00, "version {version:x}");
            assert_eq!(
                s.table().unwrap(),
                Table::default(),
                "a new namespace has no services"
            );

            let vip_a = Ipv4Addr::new(10, 0, 1, 2);
            let vip_b = Ipv4Addr::new(10, 0, 2, 2);
            let t = |n: u8| Ipv4Addr::new(10, 0, 1, n);
            let mut want = Table::default();
            want.services
                .insert(fwmark(vip_a), svc(&[(t(5), 1), (t(6), 1), (t(7), 1)]));
            want.services
                .insert(fwmark(vip_b), svc(&[(Ipv4Addr::new(10, 0, 2, 5), 1)]));
            let ops = converge(&mut s, &want);
            assert_eq!(ops.len(), 6, "two services, four real servers: {ops:?}");
            println!("vm: 2 services and 4 real servers created");

            // One task draining, then gone, then one more: one command each.
            want.services
                .get_mut(&fwmark(vip_a))
                .unwrap()
                .dests
                .insert(t(6), 0);
            assert_eq!(converge(&mut s, &want).len(), 1);
            let d = s.dests(fwmark(vip_a)).unwrap();
            assert!(d.iter().any(|d| d.addr == t(6) && d.weight == 0), "{d:?}");
            want.services
                .get_mut(&fwmark(vip_a))
                .unwrap()
                .dests
                .remove(&t(6));
            assert_eq!(converge(&mut s, &want).len(), 1);
            want.services
                .get_mut(&fwmark(vip_a))
                .unwrap()
                .dests
                .insert(t(8), 1);
            assert_eq!(converge(&mut s, &want).len(), 1);
            println!("vm: drain, removal and scale-up each one command");

            // A restarted meshd: a new socket reads what is there, and sends nothing.
            drop(s);
            let mut again = IpvsSocket::open().expect("open IPVS again");
            let have = again.table().unwrap();
            assert!(plan::plan(&have, &want).is_empty(), "adopted: {have:?}");
            println!("vm: a new socket adopts the table with no command");

            // The idle timeout: IPVS's 900 s TCP default, set and read back.
            let (tcp, _, _) = again.timeouts().unwrap();
            println!("vm: TCP idle timeout was {tcp} s");
            again.set_timeouts(7200, 0, 0).unwrap();
            assert_eq!(again.timeouts().unwrap().0, 7200);

            // A service gone takes its real servers with it.
            want.services.remove(&fwmark(vip_b));
            assert_eq!(converge(&mut again, &want).len(), 1);
            // The kernel refuses a real server for a service it does not have: an error, not a panic.
            let e = again
                .exec(&Op::NewDest {
                    fwmark: 99,
                    addr: t(9),
                    weight: 1,
                })
                .unwrap_err();
            println!("vm: refused as expected: {e}");
            assert!(e.to_string().contains("no such virtual service"), "{e}");
        })
        .join()
        .expect("the checks");
        std::thread::spawn(traffic)
            .join()
            .expect("the traffic checks");
    }

    /// A shell command (iproute2's `ip` by its path: busybox's shell prefers its own
    /// applet, which cannot name a veth's peer).
    fn sh(cmd: &str) {
        let st = std::process::Command::new("sh")
            .args(["-c", cmd])
            .status()
            .expect("sh");
        assert!(st.success(), "{cmd}");
    }

    /// A server in a namespace of its own at `addr` on interface `dev`, answering each
    /// connection on port 80 with `name`. Returns its thread id (for moving a veth end into
    /// its namespace), a sender that tells it the interface is there, and a receiver that
    /// hears once it listens.
    fn server(addr: Ipv4Addr, name: &'static str, dev: String) -> (i32, Sender<()>, Receiver<()>) {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            go_rx.recv().unwrap();
            sh(&format!(
                "/usr/bin/ip link set lo up && /usr/bin/ip addr add {addr}/24 dev {dev} \
                 && /usr/bin/ip link set {dev} up && /usr/bin/ip route add default dev {dev}"
            ));
            let l = std::net::TcpListener::bind((addr, 80)).expect("listen");
            ready_tx.send(()).unwrap();
            // Each line asked gets the name: a connection can be kept and asked again.
            for c in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = c.try_clone().expect("clone a stream");
                    for line in std::io::BufRead::lines(std::io::BufReader::new(c)) {
                        if line.is_err()
                            || std::io::Write::write_all(&mut w, format!("{name}\n").as_bytes())
                                .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        (tid_rx.recv().unwrap(), go_tx, ready_rx)
    }

    /// Who answers `n` connections to `vip:80`, by name.
    /// A connection to `vip:80`, and the name of the server that answers on it.
    fn ask(vip: Ipv4Addr) -> (std::io::BufReader<std::net::TcpStream>, String) {
        let addr = std::net::SocketAddr::from((vip, 80));
        let c = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))
            .expect("connect through the VIP");
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut c = std::io::BufReader::new(c);
        let name = ask_again(&mut c);
        (c, name)
    }

    /// The server's name, asked again on an open connection.
    fn ask_again(c: &mut std::io::BufReader<std::net::TcpStream>) -> String {
        std::io::Write::write_all(c.get_mut(), b"?\n").expect("ask");
        let mut name = String::new();
        std::io::BufRead::read_line(c, &mut name).expect("read an answer");
        name.trim().to_string()
    }

    /// Who answers `n` new connections to `vip:80`, by name.
    fn answers(vip: Ipv4Addr, n: usize) -> std::collections::BTreeMap<String, usize> {
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..n {
            *seen.entry(ask(vip).1).or_insert(0) += 1;
        }
        seen
    }

    /// Connections from a namespace to a VIP, through the marks and IPVS, to three
    /// servers in namespaces of their own (veth pairs, as a container's are).
    fn traffic() {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        sh("/usr/bin/ip link set lo up && /usr/bin/ip addr add 10.0.1.1/32 dev lo");
        let vip = Ipv4Addr::new(10, 0, 1, 2);
        let names = ["s1", "s2", "s3"];
        let addrs: Vec<Ipv4Addr> = (5..8).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect();
        let mut ready = Vec::new();
        for (i, (a, name)) in addrs.iter().zip(names).enumerate() {
            let (tid, go, listening) = server(*a, name, format!("p{i}"));
            sh(&format!(
                "/usr/bin/ip link add v{i} type veth peer name p{i} && /usr/bin/ip link set p{i} netns {tid} \
                 && /usr/bin/ip link set v{i} up && /usr/bin/ip route add {a}/32 dev v{i}"
            ));
            go.send(()).unwrap();
            ready.push(listening);
        }
        for rx in ready {
            rx.recv_timeout(std::time::Duration::from_secs(10))
                .expect("a server listening");
        }
        // The VIP needs a route to leave by; IPVS re-routes to the real server it picks.
        sh(&format!("/usr/bin/ip route add {vip}/32 dev v0"));
        meshd::datapath::ipvs::marks::apply(&[vip]).expect("the marks");
        let mut s = IpvsSocket::open().expect("open IPVS");
        let mut want = Table::default();
        want.services.insert(
            fwmark(vip),
            svc(&addrs.iter().map(|a| (*a, 1)).collect::<Vec<_>>()),
        );
        converge(&mut s, &want);
        let seen = answers(vip, 30);
        println!("vm: 30 connections to the VIP: {seen:?}");
        assert_eq!(seen.len(), 3, "every server answers: {seen:?}");
        assert!(seen.values().all(|&n| n == 10), "round robin: {seen:?}");
        // s2 draining: no new connection reaches it.
        want.services
            .get_mut(&fwmark(vip))
            .unwrap()
            .dests
            .insert(addrs[1], 0);
        converge(&mut s, &want);
        let seen = answers(vip, 20);
        println!("vm: with s2 draining: {seen:?}");
        assert!(!seen.contains_key("s2"), "{seen:?}");
        assert_eq!(seen.values().sum::<usize>(), 20);
        let conns: u32 = s
            .dests(fwmark(vip))
            .unwrap()
            .iter()
            .map(|d| d.active_conns + d.inactive_conns)
            .sum();
        println!("vm: IPVS counts {conns} connections on the real servers");
        assert!(conns > 0, "IPVS itself counts the connections");
        applier(vip, &addrs);
    }

    /// The applier, driven with `Desired` values against this thread's namespace (a
    /// sandbox, as a container's is): it adopts what is there, adds a second VIP, follows
    /// a backend leaving with one command, and a new applier (a restarted meshd) sends none.
    fn applier(vip: Ipv4Addr, addrs: &[Ipv4Addr]) {
        use meshd::{
            compile::{Changed, Desired, Lb, LbRef, SandboxScope},
            datapath::{ipvs::applier::IpvsApplier, Applier},
        };
        use std::sync::Arc;
        let vip2 = Ipv4Addr::new(10, 0, 1, 3);
        sh(&format!("/usr/bin/ip route add {vip2}/32 dev v0"));
        let path = format!("/proc/{}/ns/net", nix::unistd::gettid());
        let lb = |vip, backends: Vec<Ipv4Addr>| {
            Arc::new(Lb {
                service_name: "web".into(),
                vip,
                backends,
                draining: Vec::new(),
            })
        };
        let r = |s: &str| LbRef {
            service_id: s.into(),
            network_id: "front".into(),
        };
        let mut desired = Desired::default();
        desired.lbs.insert(r("web"), lb(vip, addrs.to_vec()));
        desired
            .lbs
            .insert(r("api"), lb(vip2, vec![addrs[0], addrs[2]]));
        desired.sandboxes.insert(
            7,
            Arc::new(SandboxScope {
                container_id: "client".into(),
                name: "client".into(),
                netns_path: path,
                networks: vec!["front".into()],
            }),
        );
        let mut a = IpvsApplier::new();
        let st = a
            .apply(&desired, &Changed::default(), false)
            .expect("apply");
        // Adopted: s2 back to weight 1 (one command), the second VIP's service and its
        // two real servers (three).
        assert_eq!((st.writes, st.deletes), (4, 0), "{st:?}");
        let seen = answers(vip2, 20);
        println!("vm: applier: 20 connections to the second VIP: {seen:?}");
        assert_eq!(seen.get("s1"), Some(&10));
        assert_eq!(seen.get("s3"), Some(&10));
        let seen = answers(vip, 3);
        assert!(
            seen.contains_key("s2"),
            "s2 serves again at weight 1: {seen:?}"
        );

        let (tcp, _, _) = IpvsSocket::open().unwrap().timeouts().unwrap();
        assert_eq!(tcp, meshd::datapath::ipvs::applier::TCP_IDLE_TIMEOUT);
        println!("vm: applier: the sandbox's TCP idle timeout is now {tcp} s");

        // s1 told to stop: drained at weight 0 (one command), then gone (one delete). A
        // connection open to it before keeps working while it drains.
        let mut held = (0..4)
            .map(|_| ask(vip2))
            .find(|(_, n)| n == "s1")
            .expect("a connection to s1")
            .0;
        let changed = Changed {
            lbs: [r("api")].into(),
            ..Changed::default()
        };
        let mut draining = (*lb(vip2, vec![addrs[2]])).clone();
        draining.draining = vec![addrs[0]];
        desired.lbs.insert(r("api"), Arc::new(draining));
        let st = a.apply(&desired, &changed, false).expect("apply");
        assert_eq!((st.writes, st.deletes), (1, 0), "one task draining: {st:?}");
        let d = IpvsSocket::open().unwrap().dests(fwmark(vip2)).unwrap();
        assert!(
            d.iter().any(|d| d.addr == addrs[0] && d.weight == 0),
            "{d:?}"
        );
        let seen = answers(vip2, 6);
        assert_eq!(seen.get("s3"), Some(&6), "{seen:?}");
        assert_eq!(
            ask_again(&mut held),
            "s1",
            "an open connection survives the drain"
        );
        println!(
            "vm: applier: s1 draining takes no new connection, and its open one still answers"
        );
        desired.lbs.insert(r("api"), lb(vip2, vec![addrs[2]]));
        let st = a.apply(&desired, &changed, false).expect("apply");
        assert_eq!((st.writes, st.deletes), (0, 1), "the task gone: {st:?}");
        let seen = answers(vip2, 6);
        assert_eq!(seen.get("s3"), Some(&6), "{seen:?}");

        let st = IpvsApplier::new()
            .apply(&desired, &Changed::default(), false)
            .expect("apply");
        assert!(
            st.is_empty(),
            "a restarted applier adopts with no command: {st:?}"
        );
        let st = a
            .apply(&desired, &Changed::default(), true)
            .expect("resync");
        assert!(
            st.is_empty(),
            "a full resync reads back and sends nothing: {st:?}"
        );
        println!("vm: applier: adoption, a backend leaving, restart and resync as planned");
    }
}
