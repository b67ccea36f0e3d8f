//! Benchmarks on a real single-node swarm. Every figure is printed next to a baseline measured
//! in the same run, interleaved round by round, because this machine is shared and noisy.
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Subcommand;
use meshd_tests::{require_root, wait_for, Node, OneNodeSwarm};
use serde_json::Value;

#[derive(Subcommand)]
pub enum Which {
    /// VIP datapath against a direct connection and an nftables DNAT VIP, plus event-to-map.
    Vip {
        /// Interleaved rounds per path.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Scale changes for the event-to-map latency.
        #[arg(long, default_value_t = 100)]
        scale_changes: usize,
    },
    /// The control plane at scale, against a synthetic Docker API: cold start, memory and
    /// event → map latency at 1k and 10k services, and the load meshd puts on the managers
    /// for 3, 30 and 100 worker nodes, next to the old design's.
    Control {
        /// Service counts for the cold-start and latency runs (10 tasks each).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        services: Vec<usize>,
        /// Task changes for the event → map latency.
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Simulated worker nodes for the manager-load runs (empty: skip them).
        #[arg(long, value_delimiter = ',', default_value = "3,30,100")]
        nodes: Vec<usize>,
    },
    /// meshd's DNS server against unbound serving the same names (dnsperf).
    Dns {
        /// Interleaved rounds per server.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Queries per second of the latency runs.
        #[arg(long, default_value_t = 5000)]
        rate: u32,
    },
}

pub fn run(which: Which) -> Result<()> {
    match which {
        Which::Vip {
            rounds,
            seconds,
            scale_changes,
        } => vip(rounds, seconds, scale_changes),
        Which::Dns {
            rounds,
            seconds,
            rate,
        } => crate::bench_dns::dns(rounds, seconds, rate),
        Which::Control {
            services,
            changes,
            nodes,
        } => crate::bench_control::control(&services, changes, &nodes),
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

pub(crate) fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[((v.len() - 1) as f64 * q).round() as usize]
    }
}

fn addr_of(node: &Node, args: &[&str]) -> Result<String> {
    Ok(node
        .docker(args)?
        .trim()
        .split('/')
        .next()
        .unwrap()
        .to_string())
}

fn vip(rounds: usize, seconds: f64, scale_changes: usize) -> Result<()> {
    ensure!(require_root("bench vip"), "bench vip needs root");
    let lab = OneNodeSwarm::start("b1", "192.168.78.1")?;
    let (node, meshd) = (&lab.node, &lab.meshd);
    // One task, so direct, meshd and nftables all reach the same server.
    node.create_service("echo", "front", 1, "1s", &["labtool", "tcp-echo", "7000"])?;
    node.run_idle_container("client", "front")?;
    let task = node.wait_running("echo", 1)?.remove(0);
    let task_ip = addr_of(
        node,
        &[
            "inspect",
            &task,
            "--format",
            "{{(index .NetworkSettings.Networks \"front\").IPAddress}}",
        ],
    )?;
    let vip = node.service_vip("echo")?;
    meshd.wait_backends("echo", 1)?;

    // nftables baseline: a DNAT VIP in the client's own namespace, as a kernel LB would.
    let sandbox = node.docker(&[
        "inspect",
        "client",
        "--format",
        "{{.NetworkSettings.SandboxKey}}",
    ])?;
    let nft_vip = {
        let octets: Vec<&str> = task_ip.split('.').collect();
        format!("{}.{}.{}.250", octets[0], octets[1], octets[2])
    };
    let in_client = |args: &[&str]| -> Result<String> {
        meshd_tests::run(
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", sandbox.trim()))
                .args(args),
        )
    };
    let nft = |rule: String| -> Result<String> {
        let mut args = vec!["nft"];
        args.extend(rule.split(' '));
        in_client(&args)
    };
    // Every path reconnects to one address thousands of times: let TIME_WAIT ports be reused
    // (BASELINES.md pitfall), or connect() slows for direct and meshd but not for nft's VIP.
    in_client(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    nft("add table ip meshbench".into())?;
    nft("add chain ip meshbench out { type nat hook output priority -100 ; }".into())?;
    nft(format!(
        "add rule ip meshbench out ip daddr {nft_vip} tcp dport 7000 \
         dnat to numgen inc mod 1 map {{ 0 : {task_ip} }}"
    ))
    .context("install the nftables DNAT baseline")?;

    let paths = [
        ("direct to task", task_ip.clone()),
        ("VIP via meshd (eBPF)", vip.clone()),
        ("VIP via nftables DNAT", nft_vip.clone()),
    ];
    let mut rr_p50 = vec![Vec::new(); 3];
    let mut rr_rate = vec![Vec::new(); 3];
    let mut crr_rate = vec![Vec::new(); 3];
    let mut crr_p50 = vec![Vec::new(); 3];
    eprintln!("bench vip: {rounds} interleaved rounds × 3 paths × (rr, crr) × {seconds} s");
    for round in 0..rounds {
        for (i, (_, addr)) in paths.iter().enumerate() {
            for kind in ["rr", "crr"] {
                let out = node.exec("client", &format!("labtool {kind} {addr}:7000 {seconds}"))?;
                let v: Value = serde_json::from_str(out.trim())
                    .with_context(|| format!("labtool output {out:?}"))?;
                let (rate, p50) = (v["per_s"].as_f64().unwrap(), v["p50_us"].as_f64().unwrap());
                if kind == "rr" {
                    rr_rate[i].push(rate);
                    rr_p50[i].push(p50);
                } else {
                    crr_rate[i].push(rate);
                    crr_p50[i].push(p50);
                }
            }
        }
        eprintln!("  round {}/{rounds} done", round + 1);
    }
    let m = |v: &Vec<Vec<f64>>| v.iter().map(|x| median(x.clone())).collect::<Vec<f64>>();
    let (rr_rate, rr_p50, crr_rate, crr_p50) = (m(&rr_rate), m(&rr_p50), m(&crr_rate), m(&crr_p50));
    println!(
        "\nVIP datapath, medians of {rounds} interleaved rounds (one client container, one task)"
    );
    println!(
        "{:<24} {:>10} {:>9} {:>8} {:>10} {:>9} {:>8} {:>10}",
        "path", "rr/s", "×direct", "p50 µs", "×direct", "crr/s", "×direct", "crr p50"
    );
    for (i, (name, _)) in paths.iter().enumerate() {
        println!(
            "{:<24} {:>10.0} {:>9.3} {:>8.1} {:>10.3} {:>9.0} {:>8.3} {:>9.1}µ",
            name,
            rr_rate[i],
            rr_rate[i] / rr_rate[0],
            rr_p50[i],
            rr_p50[i] / rr_p50[0],
            crr_rate[i],
            crr_rate[i] / crr_rate[0],
            crr_p50[i],
        );
    }
    println!(
        "targets: meshd connection rate ≥ 0.97× direct (got {:.3}), rr p50 ≤ 1.03× direct (got {:.3})",
        crr_rate[1] / crr_rate[0],
        rr_p50[1] / rr_p50[0]
    );

    // Event → map: scale a service between 1 and 2 tasks and read meshd's own measurement
    // (from receiving the Docker event that revealed the change to the map written).
    let st = meshd.status()?;
    let before = |key: &str| st[key]["samples"].as_u64().unwrap_or(0) as usize;
    let before = [before("event_to_map"), before("read_to_map")];
    let start = Instant::now();
    for i in 0..scale_changes {
        let want = if i % 2 == 0 { 2 } else { 1 };
        node.docker(&["service", "scale", "-d", &format!("echo={want}")])?;
        wait_for(
            "meshd to follow the scale change",
            Duration::from_secs(30),
            || {
                let s = meshd.ctl(&["service", "echo"]).ok()?;
                (s["vips"][0]["backends"].as_array()?.len() == want).then_some(())
            },
        )?;
    }
    let st = meshd.status()?;
    println!(
        "\nover {scale_changes} scale changes ({:.0} s):",
        start.elapsed().as_secs_f64()
    );
    for (i, (key, what)) in [
        (
            "event_to_map",
            "Docker event → map updated (includes swarm's lag reporting a task running)",
        ),
        (
            "read_to_map",
            "Docker read showing the change → map updated (meshd's own part)",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let recent: Vec<f64> = serde_json::from_value(st[key]["recent_ms"].clone())?;
        let samples: Vec<f64> = recent[before[i].min(recent.len())..].to_vec();
        println!(
            "  {what}: {} samples, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            samples.len(),
            percentile(samples.clone(), 0.5),
            percentile(samples.clone(), 0.99),
            percentile(samples, 1.0),
        );
    }
    println!("  target: p99 ≤ 50 ms once meshd has the event");
    Ok(())
}
