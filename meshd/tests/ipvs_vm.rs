//! The IPVS datapath against a real kernel's IPVS, in a QEMU VM: this machine's kernel has
//! none (LAB.md). The test binary boots Debian's kernel (fetched by `cargo xtask setup`
//! into `target/vm/kernel`) with an initramfs holding busybox, the IPVS modules, and the
//! test binary itself, which runs again inside as init's child (`MESHD_IN_VM` set) and
//! reports through the console and QEMU's `isa-debug-exit` device.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

const MARK: &str = "MESHD-VM-RESULT";

/// Modules in load order (`ip_vs` needs conntrack, which needs the defrag modules and
/// crc32c).
const MODULES: &[&str] = &[
    "crypto/crc32c_generic.ko",
    "lib/libcrc32c.ko",
    "net/ipv4/netfilter/nf_defrag_ipv4.ko",
    "net/ipv6/netfilter/nf_defrag_ipv6.ko",
    "net/netfilter/nf_conntrack.ko",
    "net/netfilter/ipvs/ip_vs.ko",
    "net/netfilter/ipvs/ip_vs_rr.ko",
    "net/netfilter/nfnetlink.ko",
    "net/netfilter/nf_tables.ko",
    "drivers/net/veth.ko",
];

/// Programs the test runs inside, with the libraries they link.
const PROGRAMS: &[&str] = &["/usr/sbin/nft", "/usr/bin/ip"];

#[test]
fn ipvs_in_a_vm() {
    if std::env::var_os("MESHD_IN_VM").is_some() {
        in_vm::run();
        return;
    }
    let Some(kernel) = kernel_dir() else {
        return;
    };
    let work = tempdir();
    let initrd = build_initramfs(&kernel, &work.0);
    let vmlinuz = std::fs::read_dir(kernel.join("boot"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .expect("a vmlinuz in the kernel package");
    let log = work.0.join("console.log");
    let status = Command::new("timeout")
        .args(["-k", "5", "170", "qemu-system-x86_64"])
        .args([
            "-accel",
            "tcg",
            "-m",
            "768",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::inherit())
        .status()
        .expect("run qemu-system-x86_64 (cargo xtask setup installs it)");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: String = console
        .lines()
        .filter(|l| !l.contains('\u{1b}'))
        .collect::<Vec<_>>()
        .join("\n");
    // isa-debug-exit: QEMU exits with (value << 1) | 1; init writes the test's status.
    assert_eq!(
        status.code(),
        Some(1),
        "the VM did not pass (124: timed out). Its console:\n{tail}"
    );
    assert!(
        console.contains(&format!("{MARK} ok")),
        "no result line. Its console:\n{tail}"
    );
    eprintln!(
        "{}",
        tail.lines()
            .filter(|l| l.starts_with("vm:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The extracted kernel package; None (skipped) outside CI when it is not there.
fn kernel_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm/kernel");
    let have = dir.join("boot").is_dir()
        && Path::new("/usr/bin/qemu-system-x86_64").exists()
        && Path::new("/bin/busybox").exists();
    if have {
        return Some(dir);
    }
    let why = "needs Debian's kernel in target/vm/kernel, qemu-system-x86_64 and busybox-static \
               (`cargo xtask setup` fetches them)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("ipvs_in_a_vm {why} (CI=true: this must run, not skip)");
    }
    eprintln!("skipping ipvs_in_a_vm: it {why}");
    None
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let d = std::env::temp_dir().join(format!("meshd-ipvs-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// busybox, the modules, this test binary (without its debug info) and the libraries it
/// links, and an init that runs it.
fn build_initramfs(kernel: &Path, work: &Path) -> PathBuf {
    let root = work.join("root");
    for d in ["bin", "proc", "sys", "dev", "tmp", "run", "mods"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let mods = std::fs::read_dir(kernel.join("lib/modules"))
        .unwrap()
        .flatten()
        .next()
        .expect("a modules directory")
        .path()
        .join("kernel");
    let mut load = String::new();
    for m in MODULES {
        let name = Path::new(m).file_name().unwrap();
        std::fs::copy(mods.join(m), root.join("mods").join(name)).unwrap();
        load.push_str(&format!(
            "insmod /mods/{} || echo \"vm: insmod {m} failed\"\n",
            name.to_string_lossy()
        ));
    }
    let exe = std::env::current_exe().unwrap();
    run(Command::new("objcopy")
        .arg("--strip-debug")
        .arg(&exe)
        .arg(root.join("test")));
    // The dynamic loader and libraries, at the paths the binaries name.
    let copy = |p: &Path| {
        let to = root.join(p.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(p, &to).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    };
    for bin in PROGRAMS {
        copy(Path::new(bin));
    }
    for bin in PROGRAMS.iter().map(Path::new).chain([exe.as_path()]) {
        for line in run(Command::new("ldd").arg(bin)).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                copy(Path::new(p));
            }
        }
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\nmount -t tmpfs run /run\nexport PATH=/usr/sbin:/usr/bin:/bin\n{load}\
         MESHD_IN_VM=1 RUST_BACKTRACE=1 /test --exact ipvs_in_a_vm --nocapture --test-threads 1\n\
         rc=$?\necho \"vm: test exited $rc\"\n\
         printf \"\\\\$(printf %03o $rc)\" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null\n\
         poweroff -f\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    std::fs::set_permissions(
        root.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let initrd = work.join("initrd.gz");
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
        initrd.display()
    )));
    initrd
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

    use super::MARK;

    pub fn run() {
        let r = std::panic::catch_unwind(checks);
        match r {
            Ok(()) => println!("{MARK} ok"),
            Err(_) => {
                println!("{MARK} failed");
                std::process::exit(1);
            }
        }
    }

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

    fn checks() {
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
