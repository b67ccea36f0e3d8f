//! The IPVS datapath's DNS redirect (`datapath::ipvs::dns_redirect`), on this machine's kernel
//! (nftables needs no IPVS): in a namespace of its own, UDP and TCP to `127.0.0.11:53` reach
//! sockets listening on other ports of `127.0.0.11`, as meshd's per-sandbox DNS sockets do.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use meshd::datapath::{
    ipvs::{dns_redirect::NftDnsRedirects, marks},
    DnsRedirect,
};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the DNS redirect test needs root (CI=true: this must run, not skip)");
    }
    if !root {
        eprintln!("skipping: the DNS redirect test needs root");
    }
    root
}

#[test]
fn dns_to_127_0_0_11_port_53_reaches_meshds_sockets() {
    if !is_root() {
        return;
    }
    std::thread::spawn(|| {
        // A namespace of its own, gone with this thread.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip");
        assert!(up.success());
        let dns = Ipv4Addr::new(127, 0, 0, 11);
        let udp = UdpSocket::bind((dns, 0)).unwrap();
        let tcp = TcpListener::bind((dns, 0)).unwrap();
        let ports = (
            udp.local_addr().unwrap().port(),
            tcp.local_addr().unwrap().port(),
        );
        // This thread's namespace, by path, as the applier names a sandbox's.
        // SAFETY: gettid has no preconditions.
        let path = format!("/proc/self/task/{}/ns/net", unsafe { libc::gettid() });
        // The VIP marks live in a table of their own, untouched by the DNS redirect.
        marks::apply(&[Ipv4Addr::new(10, 0, 1, 2)]).expect("apply the marks");
        let mut redirects = NftDnsRedirects::new();
        assert_eq!(
            redirects.previous(7, &path),
            None,
            "no earlier meshd's table here"
        );
        assert!(redirects.set(7, &path, Some(ports)).expect("redirect"));
        assert!(
            !redirects.set(7, &path, Some(ports)).unwrap(),
            "the same ports again: nothing to do"
        );

        let client = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.send_to(b"query", (dns, 53)).unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = udp
            .recv_from(&mut buf)
            .expect("the query reaches meshd's UDP socket");
        assert_eq!(&buf[..n], b"query");
        udp.send_to(b"answer", from).unwrap();
        let (n, back) = client.recv_from(&mut buf).expect("the answer");
        assert_eq!(&buf[..n], b"answer");
        assert_eq!(
            back.port(),
            53,
            "the answer comes from port 53, as the client asked"
        );

        let mut c = TcpStream::connect((dns, 53)).expect("TCP to 127.0.0.11:53");
        let (mut s, _) = tcp.accept().expect("reaches meshd's TCP socket");
        c.write_all(b"q").unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"q");

        // A restarted meshd (a store made after the namespace) reads the ports back, to
        // rebind the same ones.
        let mut restarted = NftDnsRedirects::new();
        assert_eq!(restarted.previous(7, &path), Some(ports));

        // Removed: 53 goes nowhere again (no resolver of Docker's here), the marks stay.
        assert!(redirects.set(7, &path, None).expect("remove"));
        assert_eq!(redirects.cookies(), Vec::<u64>::new());
        let tables = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .expect("nft");
        let tables = String::from_utf8_lossy(&tables.stdout);
        assert!(tables.contains("meshd_ipvs"), "{tables}");
        assert!(!tables.contains("meshd_dns"), "{tables}");
        assert!(TcpStream::connect_timeout(
            &std::net::SocketAddr::from((dns, 53)),
            Duration::from_secs(2)
        )
        .is_err());
    })
    .join()
    .expect("the checks");
}

fn tables_here() -> String {
    let out = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A meshd that dies without a clean stop (here: its end of the helper's pipe closes, as
/// it does whichever way the process ends) leaves no redirect behind: the hand-back helper
/// (the real `meshd dns-hand-back`) removes it, and only the one it was told about.
#[test]
fn a_dead_meshds_redirects_are_handed_back() {
    if !is_root() {
        return;
    }
    use meshd::datapath::ipvs::dns_handback::HandBack;
    let lock = tempfile::NamedTempFile::new().unwrap();
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        // The helper is another process: it names this thread's namespace by our pid.
        // SAFETY: getpid and gettid have no preconditions.
        let path = format!("/proc/{}/task/{}/ns/net", std::process::id(), unsafe {
            libc::gettid()
        });
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_meshd"));
        let mut redirects =
            NftDnsRedirects::with_hand_back(HandBack::start(exe, lock.path()).expect("helper"));
        assert!(redirects.set(7, &path, Some((40001, 40002))).unwrap());
        assert!(tables_here().contains("meshd_dns"));
        // A second helper (a restarted meshd's) waits for the first to finish.
        let exe2 = exe.to_path_buf();
        let lock2 = lock.path().to_path_buf();
        let second = std::thread::spawn(move || HandBack::start(&exe2, &lock2));
        drop(redirects); // "meshd died": the pipe closes; the helper cleans up and exits
        let second = second.join().unwrap().expect("second helper");
        assert!(
            !tables_here().contains("meshd_dns"),
            "the dead meshd's helper removed its redirect"
        );
        // A table written since with other ports is not the dead meshd's: it stays.
        let mut again = NftDnsRedirects::with_hand_back(second);
        assert!(again.set(8, &path, Some((40003, 40004))).unwrap());
        meshd::datapath::ipvs::dns_redirect::apply_here(Some((40005, 40006))).unwrap();
        drop(again);
        assert!(
            tables_here().contains("meshd_dns"),
            "a redirect meshd did not leave is kept"
        );
    })
    .join()
    .expect("the checks");
}
