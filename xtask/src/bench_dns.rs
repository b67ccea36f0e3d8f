//! `bench dns`: dnsperf against meshd's server (asked at 127.0.0.11:53 from a container, the
//! path every container takes) and against unbound serving the same names as local data in
//! the same namespace, interleaved round by round. Throughput runs keep 100 queries in
//! flight; latency runs send a fixed rate and time every answer. A third row serves the same
//! names through hickory-server's `ServerFuture` with meshd's request path
//! (`dns/examples/hickory_server.rs`): why meshd has a serving loop of its own.
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use meshd_tests::{container::InContainer, dns_fixture::dig, require_root, wait_for, OneNodeSwarm};

use crate::bench::{median, percentile};

/// Where unbound listens, next to meshd's 127.0.0.11 in the client's namespace.
const UNBOUND_ADDR: &str = "127.0.0.12";
/// Where the hickory-server comparison listens.
const HICKORY_ADDR: &str = "127.0.0.13";

/// A server the benchmark started, stopped (by pid) when dropped.
struct Started(Child);

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Run {
    qps: f64,
    lost: u64,
}

pub fn dns(rounds: usize, seconds: f64, rate: u32) -> Result<()> {
    ensure!(require_root("bench dns"), "bench dns needs root");
    let lab = OneNodeSwarm::start("b2", "192.168.78.2")?;
    let node = &lab.node;
    let idle = ["sleep", "1d"];
    node.create_service("web", "front", 2, "1s", &idle)?;
    node.create_service_with(
        "app",
        "front",
        3,
        "1s",
        &["--endpoint-mode", "dnsrr"],
        &idle,
    )?;
    node.run_idle_container("client", "front")?;
    node.wait_running("web", 2)?;
    node.wait_running("app", 3)?;
    let client = InContainer::of(node, "client")?;
    let ask = |server: &str, name: &str| -> Option<Vec<String>> {
        let cmd = client
            .command("dig", &[&format!("@{server}"), "+tries=1", "+time=2", name])
            .ok()?;
        let a = dig(cmd).ok()?;
        (a.status == "NOERROR" && !a.answers.is_empty())
            .then(|| a.addrs().iter().map(ToString::to_string).collect())
    };
    // The names and what meshd answers for them; unbound is given the same.
    let names = ["web", "app", "tasks.app", "client", "web.front"];
    let mut records = Vec::new();
    for name in names {
        let want = if name == "app" || name == "tasks.app" {
            3
        } else {
            1
        };
        let addrs = wait_for(
            &format!("meshd to answer {name}"),
            Duration::from_secs(10),
            || ask("127.0.0.11", name).filter(|a| a.len() == want),
        )?;
        records.push((name, addrs));
    }

    let dir = node.dir.join("bench-dns");
    fs::create_dir_all(&dir)?;
    let queries = dir.join("queries.txt");
    fs::write(
        &queries,
        names.iter().map(|n| format!("{n} A\n")).collect::<String>(),
    )?;
    let conf = dir.join("unbound.conf");
    fs::write(&conf, unbound_conf(&dir, &records))?;
    // A baseline server in the client's namespace (not its cgroup: meshd's hooks are for
    // the clients), up once it answers `app` with the same 3 addresses meshd gives.
    let start = |what: &str, program: &str, args: &[&str], addr: &str| -> Result<Started> {
        let log = fs::File::create(dir.join(format!("{what}.log")))?;
        let child = client
            .command_netns_only(program, args)?
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {what}"))?;
        let started = Started(child);
        wait_for(
            &format!("{what} to answer"),
            Duration::from_secs(10),
            || ask(addr, "app").filter(|a| a.len() == 3),
        )?;
        Ok(started)
    };
    let conf = conf.display().to_string();
    let _unbound = start("unbound", "unbound", &["-d", "-c", &conf], UNBOUND_ADDR)?;
    let hickory = meshd_tests::bin("examples/hickory_server")
        .display()
        .to_string();
    let mut args = vec![format!("{HICKORY_ADDR}:53")];
    args.extend(records.iter().map(|(n, a)| format!("{n}={}", a.join(","))));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _hickory = start("hickory-server", &hickory, &args, HICKORY_ADDR)?;

    let servers = [
        ("meshd (127.0.0.11)", "127.0.0.11"),
        ("unbound", UNBOUND_ADDR),
        ("hickory-server", HICKORY_ADDR),
    ];
    let n = servers.len();
    let mut qps = vec![Vec::new(); n];
    let mut lost = vec![0u64; n];
    let mut lat: Vec<Vec<f64>> = vec![Vec::new(); n];
    eprintln!(
        "bench dns: {rounds} interleaved rounds × {n} servers × (throughput, latency at {rate} q/s) × {seconds} s"
    );
    for round in 0..rounds {
        for (i, (_, addr)) in servers.iter().enumerate() {
            let r = throughput(&client, addr, &queries, seconds)?;
            qps[i].push(r.qps);
            lost[i] += r.lost;
            lat[i].extend(latencies(&client, addr, &queries, seconds, rate)?);
        }
        eprintln!("  round {}/{rounds} done", round + 1);
    }
    let q: Vec<f64> = qps.iter().map(|v| median(v.clone())).collect();
    let p = |i: usize, x: f64| percentile(lat[i].clone(), x) * 1e6;
    println!(
        "\nDNS, {} names (VIP, dnsrr, tasks., container, qualified), medians of {rounds} rounds",
        names.len()
    );
    println!(
        "{:<20} {:>10} {:>9} {:>7} {:>9} {:>9} {:>10}",
        "server", "queries/s", "×unbound", "lost", "p50 µs", "p99 µs", "samples"
    );
    for (i, (name, _)) in servers.iter().enumerate() {
        println!(
            "{:<20} {:>10.0} {:>9.3} {:>7} {:>9.0} {:>9.0} {:>10}",
            name,
            q[i],
            q[i] / q[1],
            lost[i],
            p(i, 0.5),
            p(i, 0.99),
            lat[i].len()
        );
    }
    println!(
        "targets: ≥ 1.0× unbound's queries/s (got {:.3}), p99 ≤ 1 ms (got {:.0} µs)",
        q[0] / q[1],
        p(0, 0.99)
    );
    println!(
        "hickory-server ServerFuture with meshd's answer path: {:.3}× unbound, {:.3}× meshd's loop",
        q[2] / q[1],
        q[2] / q[0]
    );
    let st = lab.meshd.status()?;
    println!("meshd DNS counters: {}", st["dns"]["stats"]);
    Ok(())
}

fn unbound_conf(dir: &Path, records: &[(&str, Vec<String>)]) -> String {
    let mut c = format!(
        "server:\n  interface: {UNBOUND_ADDR}\n  do-daemonize: no\n  username: \"\"\n  \
         chroot: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  \
         verbosity: 0\n  do-ip6: no\n",
        dir.display()
    );
    for (name, addrs) in records {
        for a in addrs {
            let _ = writeln!(c, "  local-data: \"{name}. 1 IN A {a}\"");
        }
    }
    c
}

fn dnsperf(client: &InContainer, addr: &str, queries: &Path, args: &[&str]) -> Result<String> {
    let q = queries.display().to_string();
    let mut all = vec!["-s", addr, "-d", &q];
    all.extend_from_slice(args);
    let out = client
        .command("dnsperf", &all)?
        .stderr(Stdio::null())
        .output()
        .context("run dnsperf")?;
    ensure!(out.status.success(), "dnsperf failed: {out:?}");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(out: &str, key: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("dnsperf printed no {key:?}:\n{out}"))
}

fn throughput(client: &InContainer, addr: &str, queries: &Path, seconds: f64) -> Result<Run> {
    let out = dnsperf(
        client,
        addr,
        queries,
        &["-l", &seconds.to_string(), "-q", "100"],
    )?;
    if !out.contains("NOERROR") {
        bail!("dnsperf against {addr}: answers were not NOERROR:\n{out}");
    }
    Ok(Run {
        qps: field(&out, "Queries per second:")?,
        lost: field(&out, "Queries lost:")? as u64,
    })
}

/// Seconds per answer, from dnsperf's verbose lines (`> NOERROR name A 0.000123`).
fn latencies(
    client: &InContainer,
    addr: &str,
    queries: &Path,
    seconds: f64,
    rate: u32,
) -> Result<Vec<f64>> {
    let out = dnsperf(
        client,
        addr,
        queries,
        &["-l", &seconds.to_string(), "-Q", &rate.to_string(), "-v"],
    )?;
    let v: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    ensure!(!v.is_empty(), "dnsperf printed no per-query lines:\n{out}");
    Ok(v)
}
