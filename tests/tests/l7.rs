//! The L7 front end on a real 3-node swarm, from a machine on the nodes' LAN with curl:
//! `com.docker.lb.*` labels route by host name on every node (each lab meshd runs with
//! `--l7`), requests spread over the tasks and carry `X-Forwarded-*`, responses carry
//! Interlock's headers; a context root is taken off when asked; a label added is served
//! at once; redirects and ip_hash; a typo and a copied host are rejected alone while the
//! good route keeps serving, and the copy takes the host over once its holder is gone; a
//! default backend.
use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshd_tests::{bin, require_root, run, run_tag, wait_for, Lab, LabSpec};

const NODES: [&str; 3] = ["192.168.100.1", "192.168.100.2", "192.168.100.3"];

/// One response as curl saw it.
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The task that answered (labtool http-echo's first line).
    fn task(&self) -> &str {
        self.body.lines().next().unwrap_or_default()
    }
}

/// `curl -i` from the LAN machine to `node` with `Host: host`.
fn get(lan: &str, node: &str, host: &str, path: &str) -> Result<Got> {
    get_with(lan, node, host, path, &[])
}

/// `get`, with more curl arguments.
fn get_with(lan: &str, node: &str, host: &str, path: &str, extra: &[&str]) -> Result<Got> {
    let out = run(Command::new("ip")
        .args(["netns", "exec", lan, "curl", "-si", "-m", "10", "-H"])
        .arg(format!("Host: {host}"))
        .args(extra)
        .arg(format!("http://{node}{path}")))?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .with_context(|| format!("curl answered {out:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Got {
        status,
        headers,
        body: body.to_string(),
    })
}

/// The task that answers `host` through `node` three times in a row (within 20 s): what a
/// sticky route gives this client once all its tasks listen.
fn settled(lan: &str, node: &str, host: &str, extra: &[&str]) -> Result<String> {
    let mut last = Vec::new();
    wait_for(
        &format!("{host} to answer from one task"),
        Duration::from_secs(20),
        || {
            let g = get_with(lan, node, host, "/", extra)
                .ok()
                .filter(|g| g.status == 200)?;
            last.push(g.task().to_string());
            let n = last.len();
            (n >= 3 && last[n - 3..].iter().all(|t| *t == last[n - 1])).then(|| last[n - 1].clone())
        },
    )
}

/// One lab at a time: two labs (five dockerds and meshds) on a 2-core machine slow each
/// other past the timeouts these tests use.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn labels_route_by_host_on_every_node() {
    if !require_root("labels_route_by_host_on_every_node") {
        return;
    }
    on_lab("l7", 3, scenario);
}

/// Runs `scenario` on a lab of its own (one at a time); on failure prints the reason first,
/// then each meshd's log.
fn on_lab(tag: &str, nodes: usize, scenario: fn(&mut Lab) -> Result<()>) {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::up(LabSpec::new(&format!("{}{tag}", run_tag()), nodes, 1)).expect("lab up");
    if let Err(e) = scenario(&mut lab) {
        eprintln!("FAILED: {e:#}");
        for (i, m) in lab.meshds.iter().enumerate() {
            eprintln!("--- meshd on node{} ---\n{}", i + 1, m.log_tail());
            // What its kernel maps and routes held at the failure (a VIP route that went
            // dark once, step 7, with nothing in the log to say why).
            for what in ["maps", "routes"] {
                match m.ctl_text(&[what]) {
                    Ok(t) => eprintln!("--- meshctl {what} on node{} ---\n{t}", i + 1),
                    Err(e) => eprintln!("--- meshctl {what} on node{}: {e:#}", i + 1),
                }
            }
        }
        panic!("{e:#}");
    }
}

fn lb(labels: &[(&str, &str)]) -> Vec<String> {
    labels
        .iter()
        .flat_map(|(k, v)| ["--label".to_string(), format!("com.docker.lb.{k}={v}")])
        .collect()
}

fn scenario(lab: &mut Lab) -> Result<()> {
    let m = lab.manager();
    let lan = lab.lan_client()?;
    m.create_overlay("shopnet")?;
    // A plain container on shopnet on every node: each node has a namespace there to open
    // upstream connections from, whichever tasks come and go. (A node with none cannot
    // reach the network yet: that is the next step of the L7 work.)
    for node in &lab.nodes {
        node.run_idle_container("anchor", "shopnet")?;
    }
    let create_running =
        |name: &str, replicas: usize, labels: &[(&str, &str)], cmd: &[&str]| -> Result<()> {
            let mut flags: Vec<String> = lb(labels);
            flags.extend(["--replicas-max-per-node".into(), "1".into()]);
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            m.create_service_with(name, "shopnet", replicas, "1s", &flags, cmd)
        };
    let create = |name: &str, replicas: usize, labels: &[(&str, &str)]| -> Result<()> {
        create_running(name, replicas, labels, &["labtool", "http-echo", "7000"])
    };
    create(
        "shop",
        3,
        &[("hosts", "shop.example.com"), ("port", "7000")],
    )?;
    m.wait_running("shop", 3)?;

    // 1. Every node routes the host, with Interlock's headers both ways.
    for node in NODES {
        let g = wait_for(
            &format!("shop.example.com to answer on {node}"),
            Duration::from_secs(20),
            || {
                get(&lan, node, "shop.example.com", "/")
                    .ok()
                    .filter(|g| g.status == 200)
            },
        )?;
        for h in [
            "x-request-id",
            "x-upstream-addr",
            "x-upstream-response-time",
            "x-server-info",
        ] {
            ensure!(g.header(h).is_some(), "{node}: no {h} in {:?}", g.headers);
        }
        let id = g.header("x-proxy-id").unwrap_or_default();
        ensure!(id.starts_with("node"), "{node}: x-proxy-id {id:?}");
        for want in [
            "X-Forwarded-For: 192.168.100.200",
            "X-Forwarded-Proto: http",
            "X-Forwarded-Host: shop.example.com",
        ] {
            ensure!(
                g.body.lines().any(|l| l.eq_ignore_ascii_case(want)),
                "{node}: the task did not get {want:?}: {}",
                g.body
            );
        }
    }
    // 2. Requests spread over the three tasks (once node1 reaches all three: a remote task
    //    joins a route when this node's overlay knows it); an unknown host is a 404.
    wait_for(
        "node1 to route to shop's 3 tasks",
        Duration::from_secs(20),
        || {
            let v = lab.meshd("node1").ok()?.ctl(&["routes"]).ok()?;
            let n = v["routes"]
                .as_array()?
                .iter()
                .find(|r| r["host"] == "shop.example.com")?["backends"]
                .as_array()?
                .len();
            (n == 3).then_some(())
        },
    )?;
    let mut tasks = BTreeSet::new();
    for _ in 0..12 {
        tasks.insert(
            get(&lan, NODES[0], "shop.example.com", "/")?
                .task()
                .to_string(),
        );
    }
    ensure!(tasks.len() == 3, "12 requests reached {tasks:?}");
    let g = get(&lan, NODES[0], "nobody.example.com", "/")?;
    ensure!(g.status == 404, "unknown host answered {}", g.status);

    // 3. A context root, taken off before the request goes upstream.
    create(
        "api",
        1,
        &[
            ("hosts", "shop.example.com"),
            ("port", "7000"),
            ("context_root", "/api"),
            ("context_root_rewrite", "true"),
        ],
    )?;
    m.wait_running("api", 1)?;
    let g = wait_for("/api to reach api", Duration::from_secs(20), || {
        get(&lan, NODES[2], "shop.example.com", "/api/items?x=1")
            .ok()
            .filter(|g| !tasks.contains(g.task()) && g.status == 200)
    })?;
    ensure!(
        g.body.lines().nth(1) == Some("GET /items?x=1 HTTP/1.1"),
        "api got {:?}",
        g.body.lines().nth(1)
    );
    let g = get(&lan, NODES[2], "shop.example.com", "/apiary")?;
    ensure!(tasks.contains(g.task()), "/apiary is shop's, not api's");

    // 4. A host added to the labels is served at once.
    m.docker(&[
        "service",
        "update",
        "-d",
        "--label-add",
        "com.docker.lb.hosts=shop.example.com,new.example.com",
        "shop",
    ])?;
    let since = Instant::now();
    wait_for(
        "new.example.com to be served",
        Duration::from_secs(10),
        || {
            get(&lan, NODES[1], "new.example.com", "/")
                .ok()
                .filter(|g| g.status == 200)
        },
    )?;
    println!(
        "label added → first request served by the new host: {:.0} ms (after docker service update returned)",
        since.elapsed().as_secs_f64() * 1000.0
    );

    // 5. A redirect, and a client address that keeps its task.
    m.docker(&[
        "service",
        "update",
        "-d",
        "--label-add",
        "com.docker.lb.redirects=http://old.example.com,http://shop.example.com",
        "shop",
    ])?;
    let g = wait_for(
        "old.example.com to redirect",
        Duration::from_secs(10),
        || {
            get(&lan, NODES[1], "old.example.com", "/cart?id=7")
                .ok()
                .filter(|g| g.status == 302)
        },
    )?;
    ensure!(
        g.header("location") == Some("http://shop.example.com/cart?id=7"),
        "redirected to {:?}",
        g.header("location")
    );
    create(
        "pinned",
        3,
        &[
            ("hosts", "pinned.example.com"),
            ("port", "7000"),
            ("ip_hash", "true"),
        ],
    )?;
    m.wait_running("pinned", 3)?;
    // Once every task listens (a task that refuses the connect passes the request on),
    // the client keeps one.
    let first = settled(&lan, NODES[0], "pinned.example.com", &[])?;
    for _ in 0..6 {
        let g = get(&lan, NODES[0], "pinned.example.com", "/")?;
        ensure!(
            g.task() == first,
            "ip_hash moved the client from {first} to {}",
            g.task()
        );
    }

    // 5b. A session cookie keeps its task, through any node; without it requests spread.
    create(
        "cart",
        3,
        &[
            ("hosts", "cart.example.com"),
            ("port", "7000"),
            ("sticky_session_cookie", "app_session"),
        ],
    )?;
    m.wait_running("cart", 3)?;
    settled(
        &lan,
        NODES[0],
        "cart.example.com",
        &["-b", "app_session=s-42"],
    )?;
    let mut with = BTreeSet::new();
    let mut without = BTreeSet::new();
    for i in 0..20 {
        let node = NODES[i % 3];
        let g = get_with(
            &lan,
            node,
            "cart.example.com",
            "/",
            &["-b", "app_session=s-42"],
        )?;
        with.insert(g.task().to_string());
        without.insert(get(&lan, node, "cart.example.com", "/")?.task().to_string());
    }
    ensure!(
        with.len() == 1,
        "20 requests with the cookie reached {with:?}"
    );
    ensure!(
        without.len() > 1,
        "20 requests without it all reached {without:?}"
    );
    // A body over the limit (32 MiB) is refused before it goes upstream.
    let big = std::env::temp_dir().join(format!("meshd-l7-body-{}", std::process::id()));
    std::fs::write(&big, vec![b'x'; (32 << 20) + 1])?;
    let at = format!("@{}", big.display());
    let g = get_with(
        &lan,
        NODES[0],
        "cart.example.com",
        "/",
        &["--data-binary", &at],
    );
    let _ = std::fs::remove_file(&big);
    let g = g?;
    ensure!(g.status == 413, "a 32 MiB + 1 body answered {}", g.status);

    // 6. A typo and a copied host: rejected alone, with the reason; shop keeps serving.
    create(
        "typo",
        1,
        &[("hosts", "typo.example.com"), ("ports", "7000")],
    )?;
    create(
        "copy",
        1,
        &[("hosts", "shop.example.com"), ("port", "7000")],
    )?;
    let reasons = || -> Option<String> {
        let st = lab.meshd("node1").ok()?.status().ok()?;
        let all: Vec<String> = st["rejected"]
            .as_array()?
            .iter()
            .filter_map(|r| r["reason"].as_str().map(str::to_string))
            .collect();
        let typo = all
            .iter()
            .any(|r| r.contains("did you mean com.docker.lb.port?"));
        let copy = all
            .iter()
            .any(|r| r.starts_with("copy:") && r.contains("served by shop"));
        (typo && copy).then(|| all.join("\n"))
    };
    let shown = wait_for(
        "both rejections in meshctl status",
        Duration::from_secs(20),
        reasons,
    )?;
    eprintln!("rejected:\n{shown}");
    for node in NODES {
        for _ in 0..5 {
            let g = get(&lan, node, "shop.example.com", "/")?;
            ensure!(
                g.status == 200 && tasks.contains(g.task()),
                "{node}: shop.example.com answered {} from {:?} while other services were rejected",
                g.status,
                g.task()
            );
        }
    }
    let g = get(&lan, NODES[0], "typo.example.com", "/")?;
    ensure!(g.status == 404, "the typo's host answered {}", g.status);
    // meshctl routes: the route with its backends and counters, and the rejections.
    let v = lab.meshd("node1")?.ctl(&["routes"])?;
    let shop = v["routes"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|r| r["host"] == "shop.example.com" && r["path"] == "/")
        })
        .with_context(|| format!("no shop.example.com/ in meshctl routes: {v}"))?;
    ensure!(
        shop["service"] == "shop"
            && shop["backends"].as_array().map(Vec::len) == Some(3)
            && shop["requests"].as_u64() > Some(0)
            && shop["mode"] == "task"
            && shop["network"] == "shopnet",
        "meshctl routes shows {shop}"
    );
    let rejected = v["rejected"].to_string();
    ensure!(
        rejected.contains("typo:") && rejected.contains("copy:"),
        "meshctl routes rejected: {rejected}"
    );
    // The same counters in Prometheus metrics (`--metrics` on the node's loopback).
    let series = "meshd_l7_requests_total{host=\"shop.example.com\",path=\"/\",service=\"shop\"} ";
    let scrape = || -> Result<String> {
        let ns = &lab.node("node1")?.netns;
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "curl",
                "-sf",
                "http://127.0.0.1:9478/metrics",
            ])
            .output()?;
        ensure!(out.status.success(), "curl /metrics on node1");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let requests = |text: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    let before = scrape()?;
    let n0 = requests(&before).with_context(|| format!("no {series}in:\n{before}"))?;
    for _ in 0..3 {
        ensure!(get(&lan, NODES[0], "shop.example.com", "/")?.status == 200);
    }
    let after = scrape()?;
    let n1 = requests(&after).unwrap_or(0);
    ensure!(n1 >= n0 + 3, "l7 requests {n0} → {n1} after 3 requests");
    // And the route's latency histogram counts them.
    let timed = |text: &str| -> Option<u64> {
        let series = "meshd_l7_response_duration_seconds_count{host=\"shop.example.com\",path=\"/\",service=\"shop\"} ";
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    let (t0, t1) = (timed(&before).unwrap_or(0), timed(&after).unwrap_or(0));
    ensure!(
        t1 >= t0 + 3,
        "l7 response duration count {t0} → {t1} after 3 requests"
    );
    let rejected_routes: Option<u64> = after.lines().find_map(|l| {
        l.strip_prefix("meshd_l7_routes_rejected ")?
            .trim()
            .parse()
            .ok()
    });
    ensure!(
        rejected_routes >= Some(2),
        "typo and copy rejected, in the metrics: {rejected_routes:?}"
    );

    // 7. The holder gone, the copy takes the host over.
    m.docker(&["service", "rm", "shop"])?;
    wait_for(
        "copy to serve shop.example.com",
        Duration::from_secs(20),
        || {
            let g = get(&lan, NODES[0], "shop.example.com", "/").ok()?;
            (g.status == 200 && !tasks.contains(g.task())).then_some(())
        },
    )?;

    // 8. A node with no namespace on a service's network relays to a node that runs one
    //    of its tasks; the task still sees the client's address, not the relay's.
    m.create_overlay("farnet")?;
    let far = lb(&[("hosts", "far.example.com"), ("port", "7000")]);
    let mut flags: Vec<&str> = far.iter().map(String::as_str).collect();
    flags.extend(["--constraint", "node.hostname==node3"]);
    m.create_service_with(
        "far",
        "farnet",
        1,
        "1s",
        &flags,
        &["labtool", "http-echo", "7000"],
    )?;
    m.wait_running("far", 1)?;
    let g = wait_for(
        "far.example.com through node1",
        Duration::from_secs(20),
        || {
            get(&lan, NODES[0], "far.example.com", "/x")
                .ok()
                .filter(|g| g.status == 200)
        },
    )?;
    ensure!(
        g.body
            .lines()
            .any(|l| l.eq_ignore_ascii_case("X-Forwarded-For: 192.168.100.200")),
        "the task behind a relay saw: {}",
        g.body
    );
    ensure!(
        g.header("x-proxy-id") == Some("node1") && g.header("x-upstream-addr").is_some(),
        "relayed answer headers: {:?}",
        g.headers
    );

    // 9. A websocket upgrade on a listed endpoint goes through, frames both ways; on
    //    another path the upgrade is not passed on (the task answers 426).
    create_running(
        "live",
        1,
        &[
            ("hosts", "live.example.com"),
            ("port", "7000"),
            ("websocket_endpoints", "/ws"),
        ],
        &["labtool", "ws-serve", "7000"],
    )?;
    m.wait_running("live", 1)?;
    let ws = |path: &str| -> Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &lan])
            .arg(bin("labtool"))
            .args([
                "ws-ask",
                "192.168.100.2:80",
                "live.example.com",
                path,
                "hello",
            ]))
    };
    let _ = m.docker(&[
        "service",
        "update",
        "-d",
        "--args",
        "labtool ws-serve 7000",
        "live",
    ])?;
    let answer = wait_for("a websocket through node2", Duration::from_secs(30), || {
        ws("/ws/chat").ok()
    })?;
    ensure!(
        answer.trim().ends_with(" hello"),
        "the websocket answered {answer:?}"
    );
    let refused = ws("/other").unwrap_err().to_string();
    ensure!(
        refused.contains("426"),
        "an upgrade off the endpoints: {refused}"
    );

    // 10. A default backend answers hosts no route names.
    create(
        "fallback",
        1,
        &[("default_backend", "true"), ("port", "7000")],
    )?;
    m.wait_running("fallback", 1)?;
    wait_for(
        "the default backend to answer",
        Duration::from_secs(20),
        || {
            get(&lan, NODES[0], "nobody.example.com", "/")
                .ok()
                .filter(|g| g.status == 200)
        },
    )?;

    // 11. A stopping meshd refuses new connections and finishes the request in flight.
    let slow = {
        let lan = lan.clone();
        std::thread::spawn(move || get(&lan, NODES[1], "cart.example.com", "/sleep/2000"))
    };
    wait_for(
        "the slow request to be in flight on node2",
        Duration::from_secs(5),
        || {
            let v = lab.meshd("node2").ok()?.ctl(&["routes"]).ok()?;
            (v["in_flight"].as_u64()? > 0).then_some(())
        },
    )?;
    let pid = lab.meshds[1].pid().context("meshd on node2 runs")?;
    // SAFETY: a signal to the meshd this lab started, as `systemctl stop` sends it.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    wait_for(
        "node2 to refuse new connections",
        Duration::from_secs(5),
        || {
            get(&lan, NODES[1], "cart.example.com", "/")
                .is_err()
                .then_some(())
        },
    )?;
    let early = slow.is_finished();
    let g = slow
        .join()
        .map_err(|_| anyhow::anyhow!("the slow request's thread panicked"))?
        .context("the request in flight when meshd stopped")?;
    ensure!(
        !early,
        "the slow request ended ({} {:?}) before node2 refused new connections",
        g.status,
        g.body
    );
    ensure!(
        g.status == 200 && g.body.contains("GET /sleep/2000"),
        "the request in flight when meshd stopped got {} {:?}",
        g.status,
        g.body
    );
    Ok(())
}

/// What `openssl s_client` from the LAN machine sees of `node`:8443 for SNI `host`: the
/// certificate's subject and serial, and the protocol, or the handshake's failure.
fn handshake(lan: &str, node: &str, host: &str, extra: &str) -> Result<String> {
    run(Command::new("ip").args([
        "netns",
        "exec",
        lan,
        "sh",
        "-c",
        &format!(
            "out=$(openssl s_client -connect {node}:8443 -servername {host} {extra} </dev/null 2>/dev/null); \
             echo \"$out\" | grep -E '^(New|    Protocol)'; \
             echo \"$out\" | openssl x509 -noout -subject -serial 2>/dev/null; true"
        ),
    ]))
}

#[test]
fn https_is_terminated_with_the_certificate_sni_names() {
    if !require_root("https_is_terminated_with_the_certificate_sni_names") {
        return;
    }
    on_lab("tls", 2, tls_scenario);
}

fn tls_scenario(lab: &mut Lab) -> Result<()> {
    let m = lab.manager();
    let lan = lab.lan_client()?;
    let dir = lab.l7_certs();
    let shop_serial = meshd_tests::self_signed(&dir, "shop", "shop.example.com")?;
    meshd_tests::self_signed(&dir, "api", "api.example.com")?;
    m.create_overlay("tlsnet")?;
    for node in &lab.nodes {
        node.run_idle_container("anchor", "tlsnet")?;
    }
    for (name, host, only) in [
        ("shop", "shop.example.com", "false"),
        ("api", "api.example.com", "true"),
    ] {
        let flags = lb(&[
            ("hosts", host),
            ("port", "7000"),
            ("ssl_cert", &format!("{name}.crt")),
            ("ssl_key", &format!("{name}.key")),
            ("ssl_only", only),
        ]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        m.create_service_with(
            name,
            "tlsnet",
            1,
            "1s",
            &flags,
            &["labtool", "http-echo", "7000"],
        )?;
        m.wait_running(name, 1)?;
    }
    let curl = |args: &[&str]| -> Result<String> {
        run(Command::new("ip")
            .args(["netns", "exec", &lan, "curl", "-si", "-m", "5"])
            .args(args))
    };
    // 1. curl over TLS (h2 by ALPN), the certificate verified against its own CA.
    let ca = dir.join("shop.crt").display().to_string();
    let out = wait_for(
        "https://shop.example.com:8443 to answer",
        Duration::from_secs(20),
        || {
            curl(&[
                "--cacert",
                &ca,
                "--resolve",
                "shop.example.com:8443:192.168.100.2",
                "https://shop.example.com:8443/",
            ])
            .ok()
            .filter(|o| o.starts_with("HTTP/2 200"))
        },
    )?;
    ensure!(
        out.lines()
            .any(|l| l.trim().eq_ignore_ascii_case("X-Forwarded-Proto: https")),
        "the task did not see https: {out}"
    );
    // 2. SNI picks the certificate; TLS 1.2 and 1.3 are served, 1.1 is refused.
    let api = handshake(&lan, "192.168.100.1", "api.example.com", "")?;
    ensure!(
        api.contains("CN = api.example.com") && api.contains("TLSv1.3"),
        "SNI api.example.com: {api}"
    );
    let shop = handshake(&lan, "192.168.100.1", "shop.example.com", "-tls1_2")?;
    ensure!(
        shop.contains("CN = shop.example.com")
            && shop.contains(&shop_serial)
            && shop.contains("TLSv1.2"),
        "SNI shop.example.com over TLS 1.2: {shop}"
    );
    let old = handshake(
        &lan,
        "192.168.100.1",
        "shop.example.com",
        "-tls1_1 -cipher DEFAULT@SECLEVEL=0",
    )?;
    ensure!(!old.contains("serial="), "TLS 1.1 was served: {old}");
    // 3. ssl_only: plain HTTP is sent to HTTPS.
    let out = curl(&["-H", "Host: api.example.com", "http://192.168.100.1/x?y=1"])?;
    ensure!(
        out.starts_with("HTTP/1.1 301")
            && out
                .lines()
                .any(|l| l.trim() == "location: https://api.example.com:8443/x?y=1"),
        "ssl_only answered {out}"
    );
    // 4. A renewed certificate is served without a restart.
    let renewed = meshd_tests::self_signed(&dir, "shop", "shop.example.com")?;
    ensure!(renewed != shop_serial, "openssl made the same serial twice");
    for node in ["192.168.100.1", "192.168.100.2"] {
        wait_for(
            &format!("the renewed certificate to be served by {node}"),
            Duration::from_secs(10),
            || {
                handshake(&lan, node, "shop.example.com", "")
                    .ok()
                    .filter(|o| o.contains(&renewed))
            },
        )?;
    }
    // 5. A broken file keeps the last good certificate in service, and says why.
    std::fs::write(dir.join("shop.crt"), "not a certificate")?;
    wait_for(
        "meshctl routes to show the broken file",
        Duration::from_secs(10),
        || {
            let v = lab.meshd("node1").ok()?.ctl(&["routes"]).ok()?;
            let tls = v["routes"]
                .as_array()?
                .iter()
                .find(|r| r["host"] == "shop.example.com")?["tls"]
                .as_str()?
                .to_string();
            tls.contains("the last good one").then_some(())
        },
    )?;
    // Every node read the renewed pair before the file broke: each keeps it.
    let mut last = String::new();
    let served = wait_for(
        "the last good certificate to be served",
        Duration::from_secs(10),
        || {
            last = handshake(&lan, "192.168.100.1", "shop.example.com", "").unwrap_or_default();
            last.contains(&renewed).then_some(())
        },
    );
    served.with_context(|| format!("a broken file took the certificate away: {last:?}"))?;

    // 6. ssl_passthrough: the connection goes to the task as it came, routed by SNI alone
    //    (the task here answers any connection with its name and its peer: it shows the
    //    bytes were spliced, never terminated by meshd).
    let flags = lb(&[
        ("hosts", "pass.example.com"),
        ("port", "7443"),
        ("ssl_passthrough", "true"),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    m.create_service_with(
        "pass",
        "tlsnet",
        1,
        "1s",
        &flags,
        &["labtool", "serve-peer", "7443"],
    )?;
    let containers = m.wait_running("pass", 1)?;
    let answer = wait_for(
        "pass.example.com to be spliced",
        Duration::from_secs(20),
        || client_hello_from(&lan, "192.168.100.1:8443", "pass.example.com").ok(),
    )?;
    let name = answer.split_whitespace().next().unwrap_or_default();
    ensure!(
        !name.is_empty() && containers.iter().any(|c| c.starts_with(name)),
        "pass.example.com answered {answer:?}, not from task container {containers:?}"
    );
    Ok(())
}

/// A TLS ClientHello naming `host`, sent from the LAN machine to `to`; what comes back.
fn client_hello_from(lan: &str, to: &str, host: &str) -> Result<String> {
    use std::io::{Read, Write};
    let path = format!("/var/run/netns/{lan}");
    let to: std::net::SocketAddr = to.parse()?;
    let hello = client_hello(host);
    std::thread::spawn(move || -> Result<String> {
        let f = std::fs::File::open(&path)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(&hello)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        ensure!(!out.is_empty(), "nothing came back");
        Ok(out)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// A minimal TLS 1.2 ClientHello record with the server name `host`.
fn client_hello(host: &str) -> Vec<u8> {
    let mut list = vec![0u8];
    list.extend((host.len() as u16).to_be_bytes());
    list.extend(host.as_bytes());
    let mut sni = (list.len() as u16).to_be_bytes().to_vec();
    sni.extend(list);
    let mut exts = vec![0x00, 0x00];
    exts.extend((sni.len() as u16).to_be_bytes());
    exts.extend(sni);
    let mut body = vec![0x03, 0x03];
    body.extend([7u8; 32]);
    body.push(0);
    body.extend([0x00, 0x02, 0xc0, 0x2f, 0x01, 0x00]);
    body.extend((exts.len() as u16).to_be_bytes());
    body.extend(exts);
    let mut hs = vec![1u8];
    hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend((hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

#[test]
fn upstreams_by_tls_vip_network_host_port_and_cluster() {
    if !require_root("upstreams_by_tls_vip_network_host_port_and_cluster") {
        return;
    }
    on_lab("up", 2, backends_scenario);
}

/// The route of `host` in `node`'s `meshctl routes`.
fn route_of(lab: &Lab, node: &str, host: &str) -> Result<serde_json::Value> {
    let v = lab.meshd(node)?.ctl(&["routes"])?;
    v["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["host"] == host).cloned())
        .with_context(|| format!("no {host} in {node}'s meshctl routes: {v}"))
}

/// `host` answering 200 through `node` (within 20 s).
fn answers(lan: &str, node: &str, host: &str) -> Result<Got> {
    status_becomes(lan, node, host, 200)
}

/// The status `host` gets through `node` once it is `want` (within 20 s).
fn status_becomes(lan: &str, node: &str, host: &str, want: u16) -> Result<Got> {
    let mut last = String::new();
    wait_for(
        &format!("{host} through {node} to answer {want}"),
        Duration::from_secs(20),
        || match get(lan, node, host, "/") {
            Ok(g) if g.status == want => Some(g),
            Ok(g) => {
                last = format!("{} {}", g.status, g.body.trim());
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        },
    )
    .with_context(|| format!("last answer: {last}"))
}

fn backends_scenario(lab: &mut Lab) -> Result<()> {
    let lan = lab.lan_client()?;
    let m = lab.manager();
    for net in ["appnet", "backnet"] {
        m.create_overlay(net)?;
        for node in &lab.nodes {
            node.run_idle_container(&format!("anchor-{net}"), net)?;
        }
    }
    let service =
        |name: &str, nets: &[&str], labels: &[(&str, &str)], more: &[&str], cmd: &[&str]| {
            let mut flags = lb(labels);
            for n in nets.iter().skip(1) {
                flags.extend(["--network".to_string(), n.to_string()]);
            }
            flags.extend(more.iter().map(|s| s.to_string()));
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            m.create_service_with(
                name,
                nets.first().copied().unwrap_or(""),
                1,
                "1s",
                &flags,
                cmd,
            )
        };

    // 1. ssl_backend: TLS to the task, its certificate and key delivered by swarm as
    //    configs; verified against --l7-backend-ca when the route requires it.
    let certs = lab.dir.join("backend-certs");
    std::fs::create_dir_all(&certs)?;
    meshd_tests::ca_signed(&certs, "lab-ca", "tlsapp", "tls.example.com")?;
    for (config, file) in [("tlsapp-crt", "tlsapp.crt"), ("tlsapp-key", "tlsapp.key")] {
        let path = certs.join(file).display().to_string();
        m.docker(&["config", "create", config, &path])?;
    }
    service(
        "tlsapp",
        &["appnet"],
        &[
            ("hosts", "tls.example.com,alias.example.com"),
            ("port", "7443"),
            ("ssl_backend", "true"),
            ("ssl_backend_tls_verify", "required"),
        ],
        &[
            "--config",
            "source=tlsapp-crt,target=/tls.crt",
            "--config",
            "source=tlsapp-key,target=/tls.key",
        ],
        &["labtool", "https-echo", "7443", "/tls.crt", "/tls.key"],
    )?;
    m.wait_running("tlsapp", 1)?;
    // No CA bundle yet: nothing is trusted, and a verified upstream is a 502.
    status_becomes(&lan, NODES[0], "tls.example.com", 502)?;
    std::fs::copy(certs.join("lab-ca.crt"), lab.l7_backend_ca())?;
    for node in NODES.iter().take(2) {
        let g = answers(&lan, node, "tls.example.com")?;
        ensure!(
            g.body.lines().any(|l| l.starts_with("GET / HTTP/1.1"))
                && g.body
                    .lines()
                    .any(|l| l.eq_ignore_ascii_case("X-Forwarded-Proto: http")),
            "{node}: the TLS task got {}",
            g.body
        );
    }
    // A name the certificate does not hold fails verification...
    let g = get(&lan, NODES[0], "alias.example.com", "/")?;
    ensure!(
        g.status == 502,
        "alias.example.com unverified got {}",
        g.status
    );
    // ...and is served once the route stops verifying (still over TLS).
    m.docker(&[
        "service",
        "update",
        "-d",
        "--label-add",
        "com.docker.lb.ssl_backend_tls_verify=none",
        "tlsapp",
    ])?;
    status_becomes(&lan, NODES[0], "alias.example.com", 200)?;
    let r = route_of(lab, "node1", "tls.example.com")?;
    ensure!(
        r["tls"].as_str().is_some_and(|t| t.contains("backend")),
        "meshctl routes shows tls {}",
        r["tls"]
    );

    // 2. backend_mode=vip: one upstream, the service's VIP.
    service(
        "vipapp",
        &["appnet"],
        &[
            ("hosts", "vip.example.com"),
            ("port", "7000"),
            ("backend_mode", "vip"),
        ],
        &[],
        &["labtool", "http-echo", "7000"],
    )?;
    m.wait_running("vipapp", 1)?;
    let vip = m.service_vip("vipapp")?;
    for node in NODES.iter().take(2) {
        let g = answers(&lan, node, "vip.example.com")?;
        ensure!(
            g.header("x-upstream-addr") == Some(&format!("{vip}:7000")),
            "{node}: vip mode went to {:?}, not the VIP {vip}",
            g.header("x-upstream-addr")
        );
    }
    let r = route_of(lab, "node2", "vip.example.com")?;
    ensure!(
        r["mode"] == "vip" && r["backends"] == serde_json::json!([format!("{vip}:7000")]),
        "meshctl routes shows {r}"
    );

    // 3. A service on two networks: rejected until its labels name one; then reached on
    //    that one.
    service(
        "multi",
        &["appnet", "backnet"],
        &[("hosts", "multi.example.com"), ("port", "7000")],
        &[],
        &["labtool", "http-echo", "7000"],
    )?;
    m.wait_running("multi", 1)?;
    wait_for("multi to be rejected", Duration::from_secs(20), || {
        let v = lab.meshd("node1").ok()?.ctl(&["routes"]).ok()?;
        v["rejected"].to_string().contains("multi:").then_some(())
    })?;
    m.docker(&[
        "service",
        "update",
        "-d",
        "--label-add",
        "com.docker.lb.network=backnet",
        "multi",
    ])?;
    let g = answers(&lan, NODES[0], "multi.example.com")?;
    let subnet = m.docker(&[
        "network",
        "inspect",
        "backnet",
        "--format",
        "{{(index .IPAM.Config 0).Subnet}}",
    ])?;
    let prefix = subnet
        .trim()
        .rsplit_once('.')
        .map(|(p, _)| p)
        .unwrap_or_default();
    let up = g.header("x-upstream-addr").unwrap_or_default();
    ensure!(
        !prefix.is_empty() && up.starts_with(&format!("{prefix}.")),
        "multi was reached at {up}, not on backnet ({})",
        subnet.trim()
    );

    // 4. A host-mode published port and no network label: the task's node, on that port
    //    (not the overlay the service is also on).
    service(
        "hostapp",
        &["appnet"],
        &[("hosts", "host.example.com"), ("port", "7100")],
        &["--publish", "mode=host,target=7100,published=7100"],
        &["labtool", "http-echo", "7100"],
    )?;
    m.wait_running("hostapp", 1)?;
    let placed = m.docker(&[
        "service",
        "ps",
        "hostapp",
        "--filter",
        "desired-state=running",
        "--format",
        "{{.Node}}",
    ])?;
    let at = match placed.trim() {
        "node1" => NODES[0],
        _ => NODES[1],
    };
    for node in NODES.iter().take(2) {
        let g = answers(&lan, node, "host.example.com")?;
        ensure!(
            g.header("x-upstream-addr") == Some(&format!("{at}:7100")),
            "{node}: host mode went to {:?}, not {at}:7100",
            g.header("x-upstream-addr")
        );
    }

    // 5. Churn: 100 label changes to other services, good and bad (a typo, a bad port, a
    //    copy of the busy route's host, a bad redirect, then good again), while wrk keeps
    //    the busy route loaded: not one request fails.
    service(
        "busy",
        &["appnet"],
        &[("hosts", "busy.example.com"), ("port", "7000")],
        &[],
        &["labtool", "http-echo", "7000"],
    )?;
    for i in 0..3 {
        service(
            &format!("churn{i}"),
            &["appnet"],
            &[
                ("hosts", &format!("churn{i}.example.com")),
                ("port", "7000"),
            ],
            &[],
            &["labtool", "http-echo", "7000"],
        )?;
    }
    m.wait_running("busy", 1)?;
    answers(&lan, NODES[0], "busy.example.com")?;
    let wrk = Wrk::start(&lan, NODES[0], "busy.example.com")?;
    let changes: [&[&str]; 5] = [
        &["--label-add", "com.docker.lb.ports=7000"],
        &[
            "--label-rm",
            "com.docker.lb.ports",
            "--label-add",
            "com.docker.lb.port=abc",
        ],
        &[
            "--label-add",
            "com.docker.lb.port=7000",
            "--label-add",
            "com.docker.lb.hosts=busy.example.com",
        ],
        &["--label-add", "com.docker.lb.redirects=nowhere"],
        &[
            "--label-rm",
            "com.docker.lb.redirects",
            "--label-add",
            "com.docker.lb.hosts=CHURN",
        ],
    ];
    let churned = (|| -> Result<Duration> {
        let t0 = Instant::now();
        for n in 0..100 {
            let svc = format!("churn{}", n % 3);
            let mut args = vec!["service", "update", "-d"];
            let own = format!("com.docker.lb.hosts={svc}.example.com");
            for a in changes[(n / 3) % changes.len()] {
                args.push(if *a == "com.docker.lb.hosts=CHURN" {
                    &own
                } else {
                    a
                });
            }
            args.push(&svc);
            m.docker(&args)?;
        }
        // Each service back to a good route, and wrk runs on until node1 serves all three:
        // every change before was seen by then (events arrive in order).
        for i in 0..3 {
            let svc = format!("churn{i}");
            let own = format!("com.docker.lb.hosts={svc}.example.com");
            m.docker(&[
                "service",
                "update",
                "-d",
                "--label-rm",
                "com.docker.lb.redirects",
                "--label-rm",
                "com.docker.lb.ports",
                "--label-add",
                "com.docker.lb.port=7000",
                "--label-add",
                &own,
                &svc,
            ])?;
        }
        for i in 0..3 {
            let host = format!("churn{i}.example.com");
            wait_for(
                &format!("{host} to be served again"),
                Duration::from_secs(30),
                || {
                    let r = route_of(lab, "node1", &host).ok()?;
                    (r["service"] == format!("churn{i}")).then_some(())
                },
            )?;
        }
        Ok(t0.elapsed())
    })();
    let report = wrk.stop()?;
    let churned = churned?;
    let requests: u64 = report
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no request count in wrk's report: {report}"))?;
    ensure!(
        requests > 100 && !report.contains("Non-2xx") && !report.contains("Socket errors"),
        "wrk against busy.example.com during 100 label changes ({churned:?}): {report}"
    );
    eprintln!("100 label changes in {churned:?}; wrk: {requests} requests, none failed");
    // And the copy of busy's host never took it.
    let r = route_of(lab, "node1", "busy.example.com")?;
    ensure!(r["service"] == "busy", "busy.example.com is held by {r}");

    // 6. A task killed without warning under load (SIGKILL, on the other node): requests
    //    in flight on it may fail, no more than one per wrk connection; the next ones go to
    //    live tasks.
    service(
        "mid",
        &["appnet"],
        &[("hosts", "mid.example.com"), ("port", "7000")],
        &["--replicas-max-per-node", "1"],
        &["labtool", "http-echo", "7000"],
    )?;
    m.docker(&["service", "scale", "-d", "mid=2"])?;
    m.wait_running("mid", 2)?;
    let node2 = lab.node("node2")?;
    let victim = node2
        .docker(&[
            "ps",
            "-q",
            "--filter",
            "label=com.docker.swarm.service.name=mid",
        ])?
        .trim()
        .to_string();
    ensure!(!victim.is_empty(), "no mid task on node2");
    let victim_name = victim.chars().take(12).collect::<String>();
    // Both tasks answer through node1 before the load starts.
    let mut seen = BTreeSet::new();
    wait_for("both mid tasks to answer", Duration::from_secs(20), || {
        let g = get(&lan, NODES[0], "mid.example.com", "/").ok()?;
        seen.insert(g.task().to_string());
        (seen.len() == 2).then_some(())
    })?;
    let wrk = Wrk::start(&lan, NODES[0], "mid.example.com")?;
    let killed = (|| -> Result<()> {
        wait_for("wrk to load mid", Duration::from_secs(10), || {
            let r = route_of(lab, "node1", "mid.example.com").ok()?;
            (r["requests"].as_u64()? > 200).then_some(())
        })?;
        node2.docker(&["kill", &victim])?;
        // Load goes on until node1 no longer lists the dead task.
        wait_for(
            "node1 to drop the killed task",
            Duration::from_secs(30),
            || {
                let r = route_of(lab, "node1", "mid.example.com").ok()?;
                (r["backends"].as_array()?.len() == 1).then_some(())
            },
        )?;
        Ok(())
    })();
    let report = wrk.stop()?;
    killed?;
    let failed = wrk_failures(&report);
    ensure!(
        failed <= 8,
        "{failed} requests failed when one of two tasks was killed: {report}"
    );
    eprintln!("a task killed under load: {failed} failed requests");
    for _ in 0..10 {
        let g = get(&lan, NODES[0], "mid.example.com", "/")?;
        ensure!(
            g.status == 200 && g.task() != victim_name,
            "after the kill: {} from {:?}",
            g.status,
            g.task()
        );
    }

    // 7. --service-cluster: node2 serves only the routes labelled with its cluster.
    service(
        "blue",
        &["appnet"],
        &[
            ("hosts", "blue.example.com"),
            ("port", "7000"),
            ("service_cluster", "blue"),
        ],
        &[],
        &["labtool", "http-echo", "7000"],
    )?;
    m.wait_running("blue", 1)?;
    lab.meshds[1].restart_with_args(&["--service-cluster", "blue"])?;
    answers(&lan, NODES[1], "blue.example.com")?;
    let g = get(&lan, NODES[1], "vip.example.com", "/")?;
    ensure!(
        g.status == 404,
        "node2 (cluster blue) served vip.example.com: {}",
        g.status
    );
    let g = get(&lan, NODES[0], "blue.example.com", "/")?;
    ensure!(
        g.status == 404,
        "node1 (no cluster) served blue.example.com: {}",
        g.status
    );
    // Still balanced through the VIP, well after start: the socket helper lives on (it
    // once died with the short-lived thread that started it, and the VIP went dark).
    answers(&lan, NODES[0], "vip.example.com")?;
    let v = lab.meshd("node2")?.ctl(&["routes"])?;
    ensure!(
        v["cluster"] == "blue",
        "node2's meshctl routes: cluster {}",
        v["cluster"]
    );
    Ok(())
}

/// Requests wrk counts as failed: non-2xx/3xx answers and socket errors.
fn wrk_failures(report: &str) -> u64 {
    let mut n = 0;
    for l in report.lines().map(str::trim) {
        if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            n += v.trim().parse::<u64>().unwrap_or(u64::MAX / 2);
        }
        if let Some(v) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 1, write 0, timeout 0"
            n += v
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    n
}

/// wrk loading `host` through `node` from the LAN machine until stopped (or dropped).
struct Wrk(Option<std::process::Child>);

impl Wrk {
    fn start(lan: &str, node: &str, host: &str) -> Result<Wrk> {
        let child = Command::new("ip")
            .args(["netns", "exec", lan, "wrk", "-t1", "-c8", "-d300s", "-H"])
            .arg(format!("Host: {host}"))
            .arg(format!("http://{node}/"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("start wrk")?;
        Ok(Wrk(Some(child)))
    }

    /// Stops wrk (SIGINT: it prints its report) and returns the report.
    fn stop(mut self) -> Result<String> {
        let child = self.0.take().context("wrk was stopped already")?;
        // SAFETY: SIGINT to the `ip netns exec` this test started, which wrk was exec'd in
        // place of.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().context("wait for wrk")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
