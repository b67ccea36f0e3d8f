//! `bench l7`: wrk from a machine on the LAN against one route, in one run, the paths taking
//! turns round by round: straight to the backend task (routed by its node, no proxy: the
//! baseline); nginx (Debian's) on the node as a reverse proxy for the same route with
//! keep-alive upstreams, sending the request and response headers an Interlock route has
//! (what meshd sends: the same work), and once more with none of them ("bare", for
//! reference); meshd's front end; meshd on a node with no presence on the backend's
//! network, relaying to the node that has one (what such a route costs); and nginx and
//! meshd over TLS.
use std::{path::Path, process::Command};

use anyhow::{ensure, Context, Result};
use meshd_tests::{
    lab::LAN_CLIENT,
    proc::{Daemon, Placement},
    require_root, run, run_tag, wait_for, Lab, LabSpec,
};

use crate::bench::{median, spread};

const HOST: &str = "bench.example.com";

pub fn l7(rounds: usize, seconds: u32, connections: u32) -> Result<()> {
    ensure!(require_root("bench l7"), "bench l7 needs root");
    // node2 runs nothing on the backend's network: its meshd relays to node1's.
    let lab = Lab::up(LabSpec::new(&format!("{}bl", run_tag()), 2, 1))?;
    let m = lab.manager();
    let lan = lab.lan_client()?;
    let certs = lab.l7_certs();
    meshd_tests::self_signed(&certs, "bench", HOST)?;
    m.create_overlay("benchnet")?;
    // Published in host mode only to give the task its docker_gwbridge leg: where direct
    // and nginx reach it from the node.
    m.create_service_with(
        "be",
        "benchnet",
        1,
        "1s",
        &[
            "--constraint",
            "node.hostname==node1",
            "--publish",
            "mode=host,target=7000,published=7001",
            "--label",
            &format!("com.docker.lb.hosts={HOST}"),
            "--label",
            "com.docker.lb.port=7000",
            "--label",
            "com.docker.lb.network=benchnet",
            "--label",
            "com.docker.lb.ssl_cert=bench.crt",
            "--label",
            "com.docker.lb.ssl_key=bench.key",
        ],
        &["labtool", "http-echo", "7000"],
    )?;
    let containers = m.wait_running("be", 1)?;
    let task = m.gwbridge_addr(&containers[0])?;
    let in_lan = |args: &[&str]| -> Result<String> {
        run(Command::new("ip").args(["netns", "exec", &lan]).args(args))
    };
    in_lan(&[
        "ip",
        "route",
        "replace",
        "172.16.0.0/12",
        "via",
        "192.168.100.1",
    ])?;
    // wrk resolves the name for SNI: `ip netns exec` mounts /etc/netns/NAME/hosts.
    let etc = Path::new("/etc/netns").join(&lan);
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("hosts"),
        format!("127.0.0.1 localhost\n192.168.100.1 {HOST}\n"),
    )?;
    let _etc = RemoveOnDrop(etc.clone());
    let nginx = nginx(&lab, &task, &certs)?;

    // Whose CPU each path costs on the nodes: the proxy's (none for the direct path).
    let meshd_pid = |n: &str| -> Result<i32> {
        lab.meshd(n)?
            .pid()
            .map(|p| p as i32)
            .context("meshd is not running")
    };
    let (m1, m2, ngx) = (meshd_pid("node1")?, meshd_pid("node2")?, nginx.0.pid());
    // (name, URL, the row its ratios are to, the proxy's processes)
    let paths: [(&str, String, usize, Vec<i32>); 7] = [
        (
            "direct to the task",
            format!("http://{task}:7000/"),
            1,
            vec![],
        ),
        ("nginx", format!("http://{HOST}:8088/"), 1, vec![ngx]),
        ("nginx, bare", format!("http://{HOST}:8090/"), 1, vec![ngx]),
        ("meshd", format!("http://{HOST}/"), 1, vec![m1]),
        (
            "meshd, relayed",
            "http://192.168.100.2/".to_string(),
            1,
            vec![m1, m2],
        ),
        ("nginx, TLS", format!("https://{HOST}:8444/"), 5, vec![ngx]),
        ("meshd, TLS", format!("https://{HOST}:8443/"), 5, vec![m1]),
    ];
    let host = format!("Host: {HOST}");
    for (name, url, _, _) in &paths {
        wait_for(
            &format!("{name} to answer"),
            std::time::Duration::from_secs(20),
            || in_lan(&["curl", "-skf", "-m", "3", "-H", &host, url]).ok(),
        )?;
    }
    let mut rps = vec![Vec::new(); paths.len()];
    let mut p99 = vec![Vec::new(); paths.len()];
    let mut cpu = vec![Vec::new(); paths.len()];
    eprintln!(
        "bench l7: {rounds} rounds × {} paths × {seconds} s, wrk -t2 -c{connections}",
        paths.len()
    );
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..paths.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let before = cpu_ns(&paths[i].3);
            let out = in_lan(&[
                "wrk",
                "-t2",
                &format!("-c{connections}"),
                &format!("-d{seconds}s"),
                "--latency",
                "-H",
                &host,
                &paths[i].1,
            ])?;
            let (r, p) = parse_wrk(&out).with_context(|| format!("wrk said {out}"))?;
            rps[i].push(r);
            p99[i].push(p);
            if !paths[i].3.is_empty() {
                let used = cpu_ns(&paths[i].3).saturating_sub(before) as f64;
                cpu[i].push(used / 1000.0 / (r * seconds as f64));
            }
        }
        eprintln!("  round {}/{rounds} done", round + 1);
    }
    drop(nginx);
    println!(
        "\nL7 front end, wrk from {LAN_CLIENT} (-t2 -c{connections}), {rounds} rounds of {seconds} s; \
         one backend task (labtool http-echo, keep-alive) on the same node"
    );
    println!("  ×nginx: median of each round's ratio to nginx over the same protocol, with its 95% interval");
    println!("  nginx sends the headers an Interlock route has, as meshd does; \"nginx, bare\" sends none");
    println!("  CPU µs/req: the proxy's CPU time (every thread, from schedstat) per request served (relayed: both meshds)");
    println!(
        "{:<22} {:>9} {:>22} {:>10} {:>22} {:>11} {:>22}",
        "path", "req/s", "×nginx (req/s)", "p99 ms", "×nginx (p99)", "CPU µs/req", "×nginx (CPU)"
    );
    let ratio = |v: &[Vec<f64>], i: usize, base: usize| -> Vec<f64> {
        v[i].iter().zip(&v[base]).map(|(x, b)| x / b).collect()
    };
    for (i, (name, _, base, _)) in paths.iter().enumerate() {
        let base = *base;
        let (c, cr) = match cpu[i].is_empty() {
            true => ("-".to_string(), "-".to_string()),
            false => (
                format!("{:.1}", median(cpu[i].clone())),
                spread(&ratio(&cpu, i, base)),
            ),
        };
        println!(
            "{:<22} {:>9.0} {:>22} {:>10.2} {:>22} {:>11} {:>22}",
            name,
            median(rps[i].clone()),
            spread(&ratio(&rps, i, base)),
            median(p99[i].clone()),
            spread(&ratio(&p99, i, base)),
            c,
            cr,
        );
    }
    println!("direct ÷ nginx (req/s): {}", spread(&ratio(&rps, 0, 1)));
    println!(
        "meshd ÷ nginx, bare (req/s): {}",
        spread(&ratio(&rps, 3, 2))
    );
    println!("targets: meshd ≥ 1.0× nginx requests/s with p99 ≤ nginx's, plain and TLS");
    Ok(())
}

/// Requests/s and the 99th percentile latency (ms) from `wrk --latency`.
fn parse_wrk(out: &str) -> Option<(f64, f64)> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let p = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))?
        .trim();
    let ms = if let Some(v) = p.strip_suffix("us") {
        v.parse::<f64>().ok()? / 1000.0
    } else if let Some(v) = p.strip_suffix("ms") {
        v.parse().ok()?
    } else if let Some(v) = p.strip_suffix('s') {
        v.parse::<f64>().ok()? * 1000.0
    } else {
        return None;
    };
    Some((rps, ms))
}

/// CPU time (ns) used so far by `pids`, their threads and their descendants (nginx's
/// workers are its master's children), from `/proc/*/task/*/schedstat`.
fn cpu_ns(pids: &[i32]) -> u64 {
    let mut total = 0;
    let mut todo: Vec<i32> = pids.to_vec();
    while let Some(pid) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let p = t.path();
            if let Ok(s) = std::fs::read_to_string(p.join("schedstat")) {
                total += s
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            if let Ok(c) = std::fs::read_to_string(p.join("children")) {
                todo.extend(c.split_whitespace().filter_map(|v| v.parse::<i32>().ok()));
            }
        }
    }
    total
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// nginx in node1's namespace: plain on 8088, TLS on 8444, to the task over its bridge leg
/// with a pool of keep-alive upstream connections; as many workers as meshd has threads.
/// Those two send what an Interlock route sends (meshd's headers: `X-Forwarded-*` and
/// `X-Request-Id` upstream; `x-request-id`, `x-proxy-id`, `x-server-info`,
/// `x-upstream-addr`, `x-upstream-response-time` back); 8090 sends only `X-Forwarded-For`.
fn nginx(lab: &Lab, task: &str, certs: &Path) -> Result<Nginx> {
    let node = lab.node("node1")?;
    let dir = node.dir.join("nginx");
    for d in ["", "tmp"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let d = dir.display();
    let c = certs.display();
    let conf = format!(
        "worker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/tmp;\n proxy_temp_path {d}/tmp;\n \
         fastcgi_temp_path {d}/tmp;\n uwsgi_temp_path {d}/tmp;\n scgi_temp_path {d}/tmp;\n \
         upstream be {{ server {task}:7000; keepalive 64; }}\n \
         server {{\n  listen 8088;\n  listen 8444 ssl http2;\n  server_name {HOST};\n  \
         ssl_certificate {c}/bench.crt;\n  ssl_certificate_key {c}/bench.key;\n  \
         location / {{\n   proxy_pass http://be;\n   proxy_http_version 1.1;\n   \
         proxy_set_header Connection \"\";\n   proxy_set_header Host $host;\n   \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n   \
         proxy_set_header X-Forwarded-Proto $scheme;\n   \
         proxy_set_header X-Forwarded-Host $host;\n   \
         proxy_set_header X-Request-Id $request_id;\n   \
         add_header x-request-id $request_id always;\n   \
         add_header x-proxy-id node1 always;\n   \
         add_header x-server-info nginx always;\n   \
         add_header x-upstream-addr $upstream_addr always;\n   \
         add_header x-upstream-response-time $upstream_response_time always;\n  }}\n }}\n \
         server {{\n  listen 8090;\n  server_name {HOST};\n  \
         location / {{\n   proxy_pass http://be;\n   proxy_http_version 1.1;\n   \
         proxy_set_header Connection \"\";\n   proxy_set_header Host $host;\n   \
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n  }}\n }}\n}}\n"
    );
    let file = dir.join("nginx.conf");
    std::fs::write(&file, conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&file);
    let place = Placement {
        netns: Some(node.netns.clone()),
        hostname: None,
    };
    Daemon::spawn(&mut cmd, &place, &dir.display().to_string(), None)
        .map(Nginx)
        .context("start nginx")
}

/// Stops nginx when the benchmark ends, even on failure.
struct Nginx(Daemon);

impl Drop for Nginx {
    fn drop(&mut self) {
        self.0.stop(std::time::Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrk_output_is_read() {
        let out = "  Latency Distribution\n     50%  250.00us\n     99%    1.52ms\n\
                   Requests/sec:  12345.67\nTransfer/sec:      1.2MB\n";
        assert_eq!(super::parse_wrk(out), Some((12345.67, 1.52)));
    }
}
