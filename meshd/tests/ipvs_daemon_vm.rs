//! meshd itself (`--datapath ipvs`) on a real one-node swarm, in a QEMU VM with IPVS
//! (`vm`): dockerd runs inside (vfs storage, no iptables, so that Docker's own VIP marks
//! and DNS redirect are absent and whatever answers is meshd's), one service on an
//! overlay network, and clients in containers. It checks what a user sees: a container
//! resolving and reaching the VIP as its first instruction, connections spread over the
//! tasks, `meshctl service` showing IPVS's own view, scale up and down, `kill -9` leaving
//! IPVS forwarding and handing names back to dockerd, and a restarted meshd adopting the
//! kernel's state without rewriting it.
mod vm;

use vm::until;

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use serde_json::Value;

/// Overlay networks: a bridge and a VXLAN device in the network's namespace; the DNS
/// redirect's NAT.
const MODULES: &[&str] = &[
    "net/llc/llc.ko",
    "net/802/stp.ko",
    "net/bridge/bridge.ko",
    "net/ipv4/udp_tunnel.ko",
    "net/ipv6/ip6_udp_tunnel.ko",
    "drivers/net/vxlan/vxlan.ko",
    "net/netfilter/nf_nat.ko",
    "net/netfilter/nft_chain_nat.ko",
    "net/netfilter/nft_nat.ko",
];

const PROGRAMS: &[&str] = &[
    "/usr/sbin/dockerd",
    "/usr/bin/containerd",
    "/usr/bin/containerd-shim-runc-v2",
    "/usr/sbin/runc",
    "/usr/bin/docker-init",
    "/usr/bin/docker",
    "/usr/sbin/nft",
    "/usr/bin/ip",
];

/// dockerd as a node would run it, on the initramfs: no pivot_root there
/// (`DOCKER_RAMDISK`), vfs storage, an underlay address for the swarm.
const SETUP: &str = "mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup
ip link set lo up
ip link add ul0 type veth peer name ul1 && ip addr add 192.168.50.1/24 dev ul0 && ip link set ul0 up && ip link set ul1 up
echo '127.0.0.1 localhost' > /etc/hosts; echo 'nameserver 127.0.0.1' > /etc/resolv.conf
DOCKER_RAMDISK=true dockerd --storage-driver vfs --iptables=false --ip6tables=false --bridge=none > /tmp/dockerd.log 2>&1 &";

#[test]
fn meshd_ipvs_datapath_in_a_vm() {
    if vm::inside() {
        vm::report(in_vm::checks);
        return;
    }
    let meshd = Path::new(env!("CARGO_BIN_EXE_meshd"));
    vm::boot(&vm::Vm {
        test: "meshd_ipvs_datapath_in_a_vm",
        modules: MODULES,
        programs: PROGRAMS,
        binaries: &[(meshd, "meshd")],
        setup: SETUP,
        boot: vm::Boot::Busybox,
        memory_mb: 2048,
        cpus: 2,
        timeout_s: 300,
    });
}

/// Runs a command; its stdout, or None when it fails.
fn try_cmd(args: &[&str]) -> Option<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cmd(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// How many answers came from each task (each answers with its hostname).
fn tally(out: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        *m.entry(l.to_string()).or_default() += 1;
    }
    m
}

/// A client script: resolve the service by name and fetch from its VIP `n` times.
fn fetches(n: usize) -> String {
    // (Debian's busybox wget crashes with -T: `timeout` bounds it instead.)
    format!("for i in $(seq {n}); do timeout 5 wget -q -O- http://web/ || echo FAILED; done")
}

mod in_vm {
    use super::*;

    const SOCKET: &str = "/run/meshd.sock";

    struct Meshd(Child);

    impl Meshd {
        /// meshd with these datapath flags.
        fn start(datapath: &[&str]) -> Meshd {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open("/tmp/meshd.log")
                .unwrap();
            let child = Command::new("/bin/meshd")
                .args(datapath)
                .args(["--docker-host", "unix:///run/docker.sock"])
                .args(["--pin-dir", "/sys/fs/bpf/meshd"])
                .args(["--api-socket", SOCKET])
                .env("MESHD_LOG", "info")
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start meshd");
            Meshd(child)
        }

        fn kill9(&mut self) {
            self.0.kill().unwrap();
            self.0.wait().unwrap();
        }
    }

    fn api(req: meshd::api::Request) -> Option<Value> {
        meshd::api::call(Path::new(SOCKET), &req).ok()
    }

    fn status() -> Option<Value> {
        api(meshd::api::Request::Status)
    }

    fn service() -> Option<meshd::api::ServiceView> {
        serde_json::from_value(api(meshd::api::Request::Service { name: "web".into() })?).ok()
    }

    /// The real servers (address → weight) IPVS holds for the VIP in sandbox `name`.
    fn real_servers(name: &str) -> Option<BTreeMap<std::net::Ipv4Addr, u32>> {
        let s = service()?;
        let x = s.vips.first()?.ipvs.iter().find(|x| x.sandbox == name)?;
        x.error
            .is_none()
            .then(|| x.real_servers.iter().map(|r| (r.addr, r.weight)).collect())
    }

    fn meshd_log() -> String {
        std::fs::read_to_string("/tmp/meshd.log").unwrap_or_default()
    }

    /// What each sandbox holds, for a failure's report.
    fn diagnose() {
        for e in std::fs::read_dir("/run/docker/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            let ns = format!("--net={}", p.display());
            let rules = try_cmd(&["nsenter", &ns, "nft", "list", "ruleset"]).unwrap_or_default();
            let addrs = try_cmd(&["nsenter", &ns, "ip", "-4", "-o", "addr"]).unwrap_or_default();
            println!("diag: {}:\n{addrs}{rules}", p.display());
        }
        if let Some(s) = api(meshd::api::Request::Service { name: "web".into() }) {
            println!("diag: meshctl service web: {s}");
        }
        let log = std::fs::read_to_string("/tmp/dockerd.log").unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| !l.contains("level=info"))
            .rev()
            .take(15)
        {
            println!("diag: dockerd: {l}");
        }
    }

    pub fn checks() {
        if let Err(panic) = std::panic::catch_unwind(scenario) {
            diagnose();
            let log = meshd_log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                println!("meshd.log: {l}");
            }
            std::panic::resume_unwind(panic);
        }
    }

    fn scenario() {
        let t0 = Instant::now();
        until("dockerd", Duration::from_secs(60), || {
            try_cmd(&["docker", "info"])
        });
        // The image: busybox, serving its hostname.
        std::fs::create_dir_all("/img/bin").unwrap();
        std::fs::copy("/bin/busybox", "/img/bin/busybox").unwrap();
        for a in [
            "sh", "httpd", "wget", "hostname", "mkdir", "seq", "sleep", "nslookup", "timeout",
        ] {
            std::os::unix::fs::symlink("busybox", format!("/img/bin/{a}")).unwrap();
        }
        cmd(&["tar", "-C", "/img", "-cf", "/img.tar", "."]);
        cmd(&[
            "docker",
            "import",
            "-c",
            "ENV PATH=/bin",
            "/img.tar",
            "img:1",
        ]);
        cmd(&[
            "docker",
            "swarm",
            "init",
            "--advertise-addr",
            "192.168.50.1",
        ]);
        cmd(&[
            "docker",
            "network",
            "create",
            "-d",
            "overlay",
            "--attachable",
            "front",
        ]);
        cmd(&[
            "docker",
            "service",
            "create",
            "-d",
            "--name",
            "web",
            "--network",
            "front",
            "--replicas",
            "2",
            "img:1",
            "sh",
            "-c",
            "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www",
        ]);
        println!(
            "vm: swarm and service web created in {:.0} s",
            t0.elapsed().as_secs_f64()
        );

        let mut meshd = Meshd::start(&["--datapath", "ipvs", "--cgroup", "/sys/fs/cgroup"]);
        let st = until("meshd ready", Duration::from_secs(60), || {
            status().filter(|s| s["ready"] == true)
        });
        assert_eq!(st["datapath"]["kind"], "ipvs", "{}", st["datapath"]);
        assert!(
            st["datapath"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("--datapath ipvs") && r.contains("IPVS 1.2")),
            "{}",
            st["datapath"]
        );
        until("2 backends for web", Duration::from_secs(120), || {
            let s = service()?;
            (s.vips.first()?.backends.len() == 2).then_some(())
        });
        println!(
            "vm: meshd (ipvs) sees both tasks at {:.0} s",
            t0.elapsed().as_secs_f64()
        );

        // Docker's ingress stays Docker's, with meshd's idle timeout instead of 900 s.
        let timeouts = meshd::netns::run_in(Path::new("/run/docker/netns/ingress_sbox"), || {
            Ok(meshd::datapath::ipvs::socket::IpvsSocket::open()?.timeouts()?)
        })
        .expect("IPVS timeouts in ingress_sbox");
        assert_eq!(
            timeouts.0,
            meshd::datapath::ipvs::applier::TCP_IDLE_TIMEOUT,
            "ingress_sbox's TCP idle timeout"
        );
        println!("vm: ingress_sbox's TCP idle timeout: {} s", timeouts.0);

        // A container whose very first instructions resolve the name and reach the VIP.
        // Without iptables Docker's own marks and DNS redirect are not there: the name is
        // answered by meshd's DNS and the connections are balanced by meshd's IPVS.
        let out = cmd(&[
            "docker",
            "run",
            "--rm",
            "--network",
            "front",
            "img:1",
            "sh",
            "-c",
            &fetches(6),
        ]);
        let seen = tally(&out);
        println!("vm: a starting container's first 6 requests: {seen:?}");
        assert!(!seen.contains_key("FAILED"), "{seen:?}");
        assert_eq!(seen.len(), 2, "rr over both tasks: {seen:?}");
        assert!(seen.values().all(|&n| n == 3), "rr: {seen:?}");

        // A client that stays, for IPVS's view of its sandbox.
        cmd(&[
            "docker",
            "run",
            "-d",
            "--name",
            "client",
            "--network",
            "front",
            "img:1",
            "sleep",
            "3600",
        ]);
        until("the client's IPVS service", Duration::from_secs(60), || {
            real_servers("client").filter(|r| r.len() == 2)
        });
        let seen = tally(&cmd(&["docker", "exec", "client", "sh", "-c", &fetches(4)]));
        assert_eq!(seen.len(), 2, "{seen:?}");
        let s = service().expect("meshctl service web");
        let x = s.vips[0]
            .ipvs
            .iter()
            .find(|x| x.sandbox == "client")
            .expect("the client's IPVS view");
        assert_eq!(x.scheduler, "rr");
        assert_eq!(x.fwmark, u32::from(s.vips[0].vip));
        let conns: u32 = x
            .real_servers
            .iter()
            .map(|r| r.active_conns + r.inactive_conns)
            .sum();
        assert!(conns >= 4, "IPVS counts the client's 4 connections: {x:?}");
        assert!(x.real_servers.iter().all(|r| r.weight == 1), "{x:?}");
        println!(
            "vm: meshctl service web, the client's IPVS: {} real servers, {conns} connections",
            x.real_servers.len()
        );

        // Scale up: the new task is one more real server, in every sandbox.
        cmd(&["docker", "service", "scale", "-d", "web=3"]);
        until(
            "3 real servers in the client",
            Duration::from_secs(120),
            || real_servers("client").filter(|r| r.len() == 3 && r.values().all(|&w| w == 1)),
        );
        let seen = tally(&cmd(&["docker", "exec", "client", "sh", "-c", &fetches(6)]));
        assert_eq!(seen.len(), 3, "after scale-up: {seen:?}");
        println!("vm: scaled to 3: {seen:?}");

        // kill -9: IPVS keeps forwarding. meshd's DNS sockets die with it, and its helper
        // hands the client's names back to dockerd's resolver (its iptables rules, which
        // this VM has not: so the check here is that meshd's redirect is gone).
        let vip = service().expect("meshctl service web").vips[0].vip;
        let client_ns = cmd(&[
            "docker",
            "inspect",
            "-f",
            "{{.NetworkSettings.SandboxKey}}",
            "client",
        ]);
        let ns = format!("--net={}", client_ns.trim());
        let has_redirect = || {
            try_cmd(&["nsenter", &ns, "nft", "list", "tables"])
                .is_some_and(|t| t.contains("meshd_dns"))
        };
        assert!(has_redirect(), "meshd's DNS redirect in the client");
        meshd.kill9();
        let by_vip = format!(
            "for i in $(seq 6); do timeout 5 wget -q -O- http://{vip}/ || echo FAILED; done"
        );
        let seen = tally(&cmd(&["docker", "exec", "client", "sh", "-c", &by_vip]));
        assert!(
            !seen.contains_key("FAILED") && seen.len() == 3,
            "with meshd dead the VIP still answers: {seen:?}"
        );
        until("the redirect handed back", Duration::from_secs(30), || {
            (!has_redirect()).then_some(())
        });
        println!("vm: with meshd killed (-9): VIP answers {seen:?}; DNS handed back to dockerd");

        // Restart, with `--datapath auto` on a node where eBPF cannot start (here: a cgroup
        // that is not there; in the field, a kernel without the hooks): IPVS is chosen,
        // adopts what it holds and rewrites none of it; names are meshd's again.
        let mut meshd = Meshd::start(&["--datapath", "auto", "--cgroup", "/sys/fs/cgroup/none"]);
        let st = until("meshd ready again", Duration::from_secs(60), || {
            status().filter(|s| {
                s["ready"] == true && s["datapath"]["appliers"][0]["applies"].as_u64() > Some(0)
            })
        });
        let reason = st["datapath"]["reason"].as_str().unwrap_or_default();
        assert!(
            st["datapath"]["kind"] == "ipvs"
                && reason.starts_with("auto: the eBPF datapath cannot start here")
                && reason.contains("/sys/fs/cgroup/none"),
            "{}",
            st["datapath"]
        );
        println!("vm: auto chose ipvs: {reason}");
        let ap = &st["datapath"]["appliers"][0];
        assert_eq!(ap["name"], "ipvs");
        assert!(
            ap["totals"]["writes"] == 0 && ap["totals"]["deletes"] == 0,
            "a restart rewrote IPVS though nothing changed: {ap}"
        );
        until("meshd's redirect again", Duration::from_secs(30), || {
            has_redirect().then_some(())
        });
        let seen = tally(&cmd(&["docker", "exec", "client", "sh", "-c", &fetches(6)]));
        assert!(!seen.contains_key("FAILED") && seen.len() == 3, "{seen:?}");
        println!(
            "vm: restarted: IPVS adopted with no command, names served again, {seen:?} at {:.0} s",
            t0.elapsed().as_secs_f64()
        );

        // Scale down: the tasks going away leave every sandbox's table.
        cmd(&["docker", "service", "scale", "-d", "web=1"]);
        until(
            "1 real server in the client",
            Duration::from_secs(120),
            || real_servers("client").filter(|r| r.len() == 1),
        );
        let seen = tally(&cmd(&["docker", "exec", "client", "sh", "-c", &fetches(3)]));
        assert_eq!(seen.len(), 1, "after scale-down: {seen:?}");
        println!("vm: scaled to 1: {seen:?}");
        meshd.kill9();
    }
}
