//! meshd's embedded DNS on a real one-node swarm, asked by real clients from inside
//! containers: `dig`, and glibc's resolver (`getent`) with the container's resolv.conf. The
//! upstream for names that are not ours is a test server on the node's loopback. One
//! scenario, step by step, so one swarm serves every check (2-core CI).
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshd_tests::{
    container::InContainer,
    dns_fixture::{dig, DigAnswer, Upstream, BIG_COUNT, BIG_NAME, EXT_ADDR, EXT_NAME},
    require_root, run_tag, wait_for, Meshd, Node, PinGuard, IMAGE,
};

/// Dropped in field order: meshd, then the upstream, the pins, and the node last.
struct Swarm {
    meshd: Meshd,
    upstream: Upstream,
    _pins: PinGuard,
    node: Node,
}

#[test]
fn embedded_dns_on_a_real_swarm() {
    if !require_root("embedded_dns_on_a_real_swarm") {
        return;
    }
    let mut s = start().expect("one-node swarm with meshd and an upstream");
    if let Err(e) = scenario(&mut s) {
        eprintln!("meshd log (last lines):\n{}", s.meshd.log_tail());
        panic!("{e:#}");
    }
}

fn start() -> Result<Swarm> {
    let name = format!("{}d1", run_tag());
    let node = Node::start(&name, "192.168.77.5")?;
    let pins = PinGuard(PathBuf::from(format!("/sys/fs/bpf/{name}")));
    node.swarm_init()?;
    node.import_image()?;
    let upstream = Upstream::start(&node.netns)?;
    // The host's resolv.conf, as meshd reads it by default. The silent upstream first: every
    // forward must fail over to the one that answers.
    write_resolv_conf(
        &node,
        &format!(
            "# the node's\nsearch example.test\nnameserver {}\nnameserver {}\noptions ndots:1\n",
            upstream.silent.ip(),
            upstream.addr.ip()
        ),
    )?;
    let meshd = Meshd::start_with_args(
        &node,
        &pins.0,
        None,
        &[
            "--resolv-conf".into(),
            host_resolv_conf(&node).display().to_string(),
            "--dns-upstream-timeout-ms".into(),
            "300".into(),
        ],
    )?;
    Ok(Swarm {
        meshd,
        upstream,
        _pins: pins,
        node,
    })
}

fn host_resolv_conf(node: &Node) -> PathBuf {
    node.dir.join("host-resolv.conf")
}

/// Replaces the node's resolv.conf as resolvconf and NetworkManager do: a new file renamed
/// over the old one.
fn write_resolv_conf(node: &Node, text: &str) -> Result<()> {
    let path = host_resolv_conf(node);
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// dig in `c`, asking 127.0.0.11 (port 53, as a container does).
fn ask(c: &InContainer, args: &[&str]) -> Result<DigAnswer> {
    let mut full = vec!["@127.0.0.11", "+tries=1", "+time=3"];
    full.extend_from_slice(args);
    dig(c.command("dig", &full)?).with_context(|| format!("dig {args:?}"))
}

fn addrs(c: &InContainer, name: &str) -> Result<Vec<Ipv4Addr>> {
    let a = ask(c, &[name])?;
    ensure!(a.status == "NOERROR", "{name}: {}", a.raw);
    Ok(a.addrs())
}

/// The addresses of a service's running tasks on `network`, from swarm.
fn task_addrs(node: &Node, service: &str, network: &str) -> Result<Vec<Ipv4Addr>> {
    let net_id = node
        .docker(&["network", "inspect", "-f", "{{.Id}}", network])?
        .trim()
        .to_string();
    let mut out = Vec::new();
    for t in node.running_task_objects(service)? {
        for att in t["NetworksAttachments"].as_array().into_iter().flatten() {
            if att["Network"]["ID"] == net_id.as_str() {
                for a in att["Addresses"].as_array().into_iter().flatten() {
                    let ip = a.as_str().unwrap_or("").split('/').next().unwrap_or("");
                    out.push(ip.parse().with_context(|| format!("task address {a}"))?);
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn vip_on(node: &Node, service: &str, network: &str) -> Result<Ipv4Addr> {
    let net_id = node
        .docker(&["network", "inspect", "-f", "{{.Id}}", network])?
        .trim()
        .to_string();
    let s = node.docker_json(&["service", "inspect", service])?;
    let vips = s[0]["Endpoint"]["VirtualIPs"].as_array().cloned();
    vips.into_iter()
        .flatten()
        .find(|v| v["NetworkID"] == net_id.as_str())
        .and_then(|v| {
            v["Addr"]
                .as_str()
                .map(|a| a.split('/').next().unwrap_or("").to_string())
        })
        .context("no VIP on that network")?
        .parse()
        .context("VIP")
}

fn scenario(s: &mut Swarm) -> Result<()> {
    let node = &s.node;
    node.create_overlay("front")?;
    node.create_overlay("back")?;
    node.docker(&[
        "network",
        "create",
        "-d",
        "overlay",
        "--attachable",
        "--internal",
        "vaultnet",
    ])?;
    let idle = ["sleep", "1d"];
    node.create_service("web", "name=front,alias=www", 2, "1s", &idle)?;
    node.create_service_with(
        "app",
        "front",
        3,
        "1s",
        &[
            "--network",
            "back",
            "--endpoint-mode",
            "dnsrr",
            "--hostname",
            "{{.Service.Name}}-{{.Task.Slot}}",
        ],
        &idle,
    )?;
    node.create_service("db", "back", 1, "1s", &idle)?;
    node.create_service("vault", "vaultnet", 1, "1s", &idle)?;
    for (name, net, alias) in [("client", "front", "cli"), ("insider", "vaultnet", "ins")] {
        node.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            net,
            "--network-alias",
            alias,
            "--hostname",
            &format!("{name}-host"),
            IMAGE,
            "sleep",
            "1d",
        ])?;
    }
    for (svc, n) in [("web", 2), ("app", 3), ("db", 1), ("vault", 1)] {
        node.wait_running(svc, n)?;
    }
    let client = InContainer::of(node, "client")?;
    let insider = InContainer::of(node, "insider")?;
    let web_vip = vip_on(node, "web", "front")?;
    let db_vip = vip_on(node, "db", "back")?;
    let app_front = task_addrs(node, "app", "front")?;
    wait_for("meshd to answer for app", Duration::from_secs(10), || {
        addrs(&client, "app").ok().filter(|a| *a == app_front)
    })?;

    // 1. Service names, aliases, qualified and mixed-case names; our TTLs, so meshd (not
    // dockerd, which says 600) answered.
    for name in ["web", "www", "WEB.front", "web.front."] {
        let a = ask(&client, &[name])?;
        ensure!(a.addrs() == [web_vip], "{name}: {}", a.raw);
        ensure!(a.ttls() == [30], "{name}: VIP TTL should be 30: {}", a.raw);
        ensure!(
            a.flags.iter().any(|f| f == "aa"),
            "{name}: not authoritative"
        );
    }
    let a = ask(&client, &["app"])?;
    ensure!(a.addrs() == app_front, "app (dnsrr): {}", a.raw);
    ensure!(
        a.ttls().iter().all(|&t| t == 1),
        "dnsrr TTL should be 1: {}",
        a.raw
    );
    let mut orders = BTreeSet::new();
    for _ in 0..20 {
        let a = ask(&client, &["app"])?;
        orders.insert(a.answers.iter().map(|r| r.3.clone()).collect::<Vec<_>>());
    }
    ensure!(orders.len() > 1, "dnsrr order never changed in 20 answers");
    ensure!(addrs(&client, "tasks.app")? == app_front, "tasks.app");
    ensure!(
        addrs(&client, "tasks.web")? == task_addrs(node, "web", "front")?,
        "tasks.web"
    );

    // 2. Task names, short container ids, container names and aliases.
    let web_task = &node.running_task_objects("web")?[0];
    let task_name = format!(
        "web.{}.{}",
        web_task["Slot"],
        web_task["ID"].as_str().unwrap_or("")
    );
    let cid = web_task["Status"]["ContainerStatus"]["ContainerID"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let by_task = addrs(&client, &task_name)?;
    ensure!(by_task.len() == 1, "task name {task_name}: {by_task:?}");
    ensure!(addrs(&client, &cid[..12])? == by_task, "short container id");
    let client_ip: Ipv4Addr = node
        .docker(&[
            "inspect",
            "-f",
            "{{.NetworkSettings.Networks.front.IPAddress}}",
            "client",
        ])?
        .trim()
        .parse()?;
    ensure!(addrs(&client, "client")? == [client_ip], "container name");
    ensure!(addrs(&client, "cli")? == [client_ip], "container alias");
    // Hostnames: a container's own, and a service's --hostname template expanded per task.
    ensure!(
        addrs(&client, "client-host")? == [client_ip],
        "container hostname"
    );
    let mut by_hostname = Vec::new();
    for slot in 1..=3 {
        let a = addrs(&client, &format!("app-{slot}"))?;
        ensure!(a.len() == 1, "app-{slot}: {a:?}");
        by_hostname.extend(a);
    }
    by_hostname.sort();
    ensure!(
        by_hostname == app_front,
        "app-1..3 {by_hostname:?} are not app's tasks {app_front:?}"
    );

    // 3. PTR for a VIP and a task; AAAA for our name is NODATA, never forwarded.
    let ptr = ask(&client, &["-x", &web_vip.to_string()])?;
    ensure!(
        ptr.answers.len() == 1 && ptr.answers[0].3.starts_with("web"),
        "PTR of the VIP: {}",
        ptr.raw
    );
    let ptr = ask(&client, &["-x", &by_task[0].to_string()])?;
    ensure!(
        ptr.answers.len() == 1 && ptr.answers[0].3.starts_with(&task_name),
        "PTR of a task: {}",
        ptr.raw
    );
    let aaaa = ask(&client, &["web", "AAAA"])?;
    ensure!(
        aaaa.status == "NOERROR" && aaaa.answers.is_empty(),
        "AAAA web should be NODATA: {}",
        aaaa.raw
    );
    ensure!(s.upstream.count("web.") == (0, 0), "our name went upstream");

    // 4. Forwarding: the silent upstream times out, the next one answers.
    let t = Instant::now();
    let a = ask(&client, &[EXT_NAME])?;
    ensure!(a.addrs() == [EXT_ADDR], "forwarded name: {}", a.raw);
    let first = t.elapsed();
    eprintln!("first forward (one dead upstream first): {first:?}");
    ensure!(
        first >= Duration::from_millis(300),
        "the silent upstream was not tried first"
    );
    let t = Instant::now();
    ensure!(addrs(&client, EXT_NAME)? == [EXT_ADDR], "second forward");
    let second = t.elapsed();
    eprintln!("second forward (dead upstream moved back): {second:?}");
    ensure!(
        second < Duration::from_millis(300),
        "the dead upstream was tried again first"
    );
    // Truncated over UDP upstream → asked again over TCP; fits the client's EDNS size.
    let big = ask(&client, &[BIG_NAME])?;
    ensure!(
        big.addrs().len() == usize::from(BIG_COUNT),
        "big: {}",
        big.raw
    );
    ensure!(s.upstream.count(BIG_NAME).1 >= 1, "no TCP retry upstream");
    // A plain 512-byte client gets TC and comes back over TCP.
    let small = ask(&client, &["+noedns", "+ignore", BIG_NAME])?;
    ensure!(
        small.flags.iter().any(|f| f == "tc") && small.answers.is_empty(),
        "512-byte client: {}",
        small.raw
    );
    let tcp = ask(&client, &["+tcp", BIG_NAME])?;
    ensure!(tcp.addrs().len() == usize::from(BIG_COUNT), "big over TCP");
    let a = ask(&client, &["nothing.test"])?;
    ensure!(a.status == "NXDOMAIN", "unknown upstream name: {}", a.raw);

    // 5. Isolation: client is not on back; db, its tasks and its VIP are not ours to give.
    for name in ["db", "tasks.db"] {
        let a = ask(&client, &[name])?;
        ensure!(a.status == "NXDOMAIN", "{name} from client: {}", a.raw);
    }
    let a = ask(&client, &["-x", &db_vip.to_string()])?;
    ensure!(
        a.answers.is_empty(),
        "db's VIP reversed for a client not on back: {}",
        a.raw
    );
    let a = ask(&insider, &["web"])?;
    ensure!(
        a.status != "NOERROR" || a.answers.is_empty(),
        "insider got web: {}",
        a.raw
    );

    // 6. An internal network: our names resolve, nothing is forwarded.
    ensure!(addrs(&insider, "vault")?.len() == 1, "vault from insider");
    let before = s.upstream.count(EXT_NAME);
    let a = ask(&insider, &[EXT_NAME])?;
    ensure!(a.status == "REFUSED", "forward from internal: {}", a.raw);
    ensure!(
        s.upstream.count(EXT_NAME) == before,
        "forwarded from internal"
    );

    // 7. glibc's resolver, with the resolv.conf Docker gives containers.
    let resolv = node.dir.join("container-resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.11\noptions ndots:0\n")?;
    let getent = |name: &str| -> Result<String> {
        let out = client
            .command_with_resolv("getent", &["ahostsv4", name], Some(&resolv))?
            .output()?;
        ensure!(out.status.success(), "getent {name}: {out:?}");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    ensure!(getent("web")?.contains(&web_vip.to_string()), "getent web");
    ensure!(
        getent("ext.test")?.contains(&EXT_ADDR.to_string()),
        "getent ext.test"
    );
    let out = getent("app")?;
    ensure!(
        app_front.iter().any(|a| out.contains(&a.to_string())),
        "getent app: {out}"
    );

    // 8. meshctl dns says what a container gets and why.
    let why = s.meshd.ctl(&["dns", "app", "--from", "client"])?;
    ensure!(why["why"]["network"] == "front", "meshctl dns app: {why}");
    ensure!(why["why"]["ttl"] == 1, "meshctl dns app: {why}");
    ensure!(why["answers"].as_array().map_or(0, Vec::len) == 3, "{why}");
    let why = s.meshd.ctl(&["dns", EXT_NAME, "--from", "insider"])?;
    ensure!(
        why["rcode"].as_str().unwrap_or("").contains("Refused"),
        "meshctl dns from insider: {why}"
    );
    let why = s.meshd.ctl(&["dns", "db", "--from", "client"])?;
    ensure!(
        why["why"]["outcome"]
            .as_str()
            .unwrap_or("")
            .contains("forward"),
        "meshctl dns db: {why}"
    );

    // 8b. The host's resolv.conf changes under a running meshd: forwarding follows it, and
    // a bad line is reported while the good ones are used.
    let follows = |text: String, want: &str| -> Result<(serde_json::Value, Duration)> {
        let t = Instant::now();
        write_resolv_conf(node, &text)?;
        let dns = wait_for(
            "meshd to read resolv.conf again",
            Duration::from_secs(5),
            || {
                let dns = s.meshd.status().ok()?["dns"].clone();
                (dns["upstreams"] == serde_json::json!([want])).then_some(dns)
            },
        )?;
        Ok((dns, t.elapsed()))
    };
    let silent = s.upstream.silent.to_string();
    let (dns, took) = follows(
        format!(
            "nameserver {}\nnameserver dns.bogus\n",
            s.upstream.silent.ip()
        ),
        &silent,
    )?;
    eprintln!("resolv.conf rewritten: upstreams followed in {took:?}");
    ensure!(
        dns["config_errors"].to_string().contains("dns.bogus"),
        "bad resolv.conf line not reported: {dns}"
    );
    let why = s.meshd.ctl(&["dns", EXT_NAME, "--from", "client"])?;
    ensure!(
        why["rcode"].as_str().unwrap_or("").contains("Serv")
            && why["upstream_error"]
                .as_str()
                .unwrap_or("")
                .contains(&silent),
        "with only the silent upstream: {why}"
    );
    let answering = s.upstream.addr.to_string();
    let (dns, took) = follows(format!("nameserver {}\n", s.upstream.addr.ip()), &answering)?;
    eprintln!("resolv.conf restored: upstreams followed in {took:?}");
    ensure!(
        dns["config_errors"].as_array().is_some_and(Vec::is_empty),
        "{dns}"
    );
    ensure!(dns["upstream_changes"].as_u64() >= Some(2), "{dns}");
    ensure!(
        addrs(&client, EXT_NAME)? == [EXT_ADDR],
        "forward after reload"
    );

    // 9. Hostile packets from inside the container: answered FORMERR or dropped, and the
    // server goes on answering.
    let corpus = meshd_tests::workspace_root().join("dns/tests/corpus");
    let mut files: Vec<String> = std::fs::read_dir(&corpus)?
        .filter_map(|e| e.ok())
        .map(|e| e.path().display().to_string())
        .filter(|p| p.ends_with(".bin"))
        .collect();
    files.sort();
    let mut args = vec!["127.0.0.11:53"];
    args.extend(files.iter().map(String::as_str));
    let out = client
        .command(env!("CARGO_BIN_EXE_dns-send-raw"), &args)?
        .output()?;
    ensure!(out.status.success(), "dns-send-raw: {out:?}");
    let stats = s.meshd.status()?["dns"]["stats"].clone();
    ensure!(
        stats["formerr"].as_u64().unwrap_or(0) > 0 && stats["dropped"].as_u64().unwrap_or(0) > 0,
        "hostile packets not counted: {stats}"
    );
    ensure!(addrs(&client, "web")? == [web_vip], "after hostile packets");

    // 10. Scale changes within 1 s of swarm reporting them.
    for n in [5usize, 2] {
        node.docker(&["service", "scale", "-d", &format!("app={n}")])?;
        let running = wait_for("swarm to report the scale", Duration::from_secs(60), || {
            task_addrs(node, "app", "front")
                .ok()
                .filter(|a| a.len() == n)
        })?;
        let t = Instant::now();
        wait_for("DNS to follow the scale", Duration::from_secs(5), || {
            addrs(&client, "app").ok().filter(|a| *a == running)
        })?;
        let took = t.elapsed();
        eprintln!("app scaled to {n}: DNS followed {took:?} after swarm reported it");
        ensure!(took <= Duration::from_secs(1), "scale to {n}: {took:?}");
    }

    // 11. A removed service: NXDOMAIN within 1 s.
    node.docker(&["service", "rm", "web"])?;
    let t = Instant::now();
    wait_for("web to be gone from DNS", Duration::from_secs(5), || {
        ask(&client, &["web"])
            .ok()
            .filter(|a| a.status == "NXDOMAIN")
    })?;
    let took = t.elapsed();
    eprintln!("web removed: NXDOMAIN after {took:?}");
    ensure!(took <= Duration::from_secs(1), "removed service: {took:?}");
    ensure!(
        ask(&client, &["www"])?.status == "NXDOMAIN",
        "alias of removed service"
    );

    // 12. meshd crashes: its sockets die with it and the hooks stop redirecting at once, so
    // dockerd answers (TTL 600). Restarted, meshd takes back the same ports.
    let port_of = |m: &Meshd| -> Result<u64> {
        let st = m.status()?;
        st["dns"]["sandboxes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["name"] == "client")
            .and_then(|x| x["udp_port"].as_u64())
            .context("client has no DNS sockets")
    };
    let before = port_of(&s.meshd)?;
    s.meshd.kill9();
    dockerd_answers(&client, "with meshd dead")?;
    s.meshd.restart()?;
    wait_for("meshd to answer again", Duration::from_secs(10), || {
        ask(&client, &["app"])
            .ok()
            .filter(|a| !a.answers.is_empty() && a.ttls().iter().all(|&t| t == 1))
    })?;
    ensure!(
        port_of(&s.meshd)? == before,
        "restarted meshd took another port"
    );

    // 13. meshd stops cleanly: containers are handed back to dockerd's resolver.
    s.meshd.stop();
    dockerd_answers(&client, "after meshd stopped")
}

/// dockerd's resolver answers `app` (its TTL is 600 s; meshd's is 1 s).
fn dockerd_answers(c: &InContainer, when: &str) -> Result<()> {
    let a = ask(c, &["app"])?;
    ensure!(
        a.status == "NOERROR" && !a.answers.is_empty() && a.ttls().iter().all(|&t| t == 600),
        "{when}, dockerd should answer: {}",
        a.raw
    );
    Ok(())
}
