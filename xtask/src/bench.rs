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
        #[arg(long, default_value_t = 15)]
        rounds: usize,
        /// Seconds per measurement (the paths share them).
        #[arg(long, default_value_t = 6.0)]
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
        /// Task changes for the event → map latency (in the first round).
        #[arg(long, default_value_t = 200)]
        changes: usize,
        /// Cold starts per size (each a fresh meshd against the same synthetic swarm).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Simulated worker nodes for the manager-load runs (empty: skip them).
        #[arg(long, value_delimiter = ',', default_value = "3,30,100")]
        nodes: Vec<usize>,
    },
    /// The ingress mesh from a client on the LAN, against a direct route to the task and an
    /// nftables mesh built the way Docker's is.
    Ingress {
        /// Interleaved rounds.
        #[arg(long, default_value_t = 9)]
        rounds: usize,
        /// Seconds per measurement (the paths share them).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// The L7 front end against nginx as a reverse proxy for the same route, and a direct
    /// connection to the backend (wrk, plain and TLS).
    L7 {
        /// Interleaved rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
    },
    /// Label change to first request served by the new route, with 1 and with 50 networks.
    L7Reconfig {
        /// Label changes per network count.
        #[arg(long, default_value_t = 15)]
        rounds: usize,
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
        Which::Ingress { rounds, seconds } => crate::bench_ingress::ingress(rounds, seconds),
        Which::L7 {
            rounds,
            seconds,
            connections,
        } => crate::bench_l7::l7(rounds, seconds, connections),
        Which::L7Reconfig { rounds } => crate::bench_l7_reconfig::reconfig(rounds),
        Which::Control {
            services,
            changes,
            rounds,
            nodes,
        } => crate::bench_control::control(&services, changes, rounds, &nodes),
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

/// `median [lo–hi]` of per-round ratios, where [lo, hi] is the 95% confidence interval of
/// the median (distribution-free: from the order statistics, no assumption of normal noise).
pub(crate) fn spread(v: &[f64]) -> String {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let (lo, hi) = median_ci(s.len());
    format!("{:.3} [{:.3}–{:.3}]", median(s.clone()), s[lo], s[hi])
}

/// Indices (0-based, into n sorted samples) of the 95% confidence interval of the median:
/// with k the largest such that P(Binomial(n, ½) < k) ≤ 2.5%, the k-th smallest and the
/// k-th largest (coverage 1 − 2·P(B < k) ≥ 95%).
fn median_ci(n: usize) -> (usize, usize) {
    if n < 6 {
        return (0, n.saturating_sub(1));
    }
    let mut below = 0.0; // P(B < k)
    let mut p = 0.5f64.powi(n as i32); // P(B = k)
    let mut k = 0;
    while below + p <= 0.025 {
        below += p;
        p *= (n - k) as f64 / (k + 1) as f64;
        k += 1;
    }
    (k - 1, n - k)
}

/// Pins each container to one CPU (`docker update --cpuset-cpus`); says what it did.
fn pin(node: &Node, what: &[(&str, usize)]) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus < 2 {
        return "not pinned: one CPU".into();
    }
    for (container, cpu) in what {
        if let Err(e) = node.docker(&["update", "--cpuset-cpus", &cpu.to_string(), container]) {
            eprintln!("bench vip: could not pin {container} to CPU {cpu}: {e:#}");
            return "not pinned: docker update failed".into();
        }
    }
    "client on CPU 0, server on CPU 1".into()
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

    // Client and server each on a CPU of its own, so the scheduler moving them about is not
    // part of the figures (the shared machine's other load still is: hence the spread).
    let pinned = pin(node, &[("client", 0), (task.as_str(), 1)]);

    let paths = [
        ("direct to task", task_ip.clone()),
        ("VIP via meshd (eBPF)", vip.clone()),
        ("VIP via nftables DNAT", nft_vip.clone()),
    ];
    let mut rr_p50 = vec![Vec::new(); 3];
    let mut rr_rate = vec![Vec::new(); 3];
    let mut crr_rate = vec![Vec::new(); 3];
    let mut crr_p50 = vec![Vec::new(); 3];
    eprintln!("bench vip: {rounds} rounds × (rr, crr) × {seconds} s, the 3 paths taking turns every 20 ms");
    for round in 0..rounds {
        // In one run the paths take turns every 20 ms, so each sees the same load from the
        // rest of the machine; every other round the turn order is reversed.
        let mut order: Vec<usize> = (0..paths.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let targets: Vec<String> = order
            .iter()
            .map(|&i| format!("{}:7000", paths[i].1))
            .collect();
        for kind in ["rr", "crr"] {
            let out = node.exec(
                "client",
                &format!("labtool {kind}-alt {seconds} {}", targets.join(" ")),
            )?;
            let v: Vec<Value> = serde_json::from_str(out.trim())
                .with_context(|| format!("labtool output {out:?}"))?;
            ensure!(v.len() == paths.len(), "labtool answered {} paths", v.len());
            for (&i, v) in order.iter().zip(&v) {
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
    println!(
        "\nVIP datapath, {rounds} rounds of {seconds} s, paths taking turns every 20 ms (one client container, one task; {pinned})"
    );
    println!("  figures: median over rounds; ×direct: the median of each round's ratio to direct in that");
    println!("  round, with its 95% confidence interval: a ratio whose interval holds 1.000 is not a difference");
    println!(
        "{:<24} {:>9} {:>20} {:>8} {:>20} {:>9} {:>20} {:>9}",
        "path", "rr/s", "×direct", "p50 µs", "×direct", "crr/s", "×direct", "crr p50"
    );
    let ratios = |v: &[Vec<f64>], i: usize| -> Vec<f64> {
        v[i].iter().zip(&v[0]).map(|(x, d)| x / d).collect()
    };
    let mut summary = Vec::new();
    for (i, (name, _)) in paths.iter().enumerate() {
        let cols = [&rr_rate, &rr_p50, &crr_rate].map(|v| ratios(v, i));
        println!(
            "{:<24} {:>9.0} {:>20} {:>8.1} {:>20} {:>9.0} {:>20} {:>8.1}µ",
            name,
            median(rr_rate[i].clone()),
            spread(&cols[0]),
            median(rr_p50[i].clone()),
            spread(&cols[1]),
            median(crr_rate[i].clone()),
            spread(&cols[2]),
            median(crr_p50[i].clone()),
        );
        summary.push(cols);
    }
    println!(
        "targets: meshd connection rate ≥ 0.97× direct (got {}), rr p50 ≤ 1.03× direct (got {})",
        spread(&summary[1][2]),
        spread(&summary[1][1]),
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
            "the read showing the change → map updated (meshd's own part)",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let recent: Vec<f64> = serde_json::from_value(st[key]["recent_ms"].clone())?;
        // `samples` counts every sample ever; `recent_ms` holds the last ones.
        let new = st[key]["samples"].as_u64().unwrap_or(0) as usize - before[i];
        let samples: Vec<f64> = recent[recent.len().saturating_sub(new)..].to_vec();
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

#[cfg(test)]
mod tests {
    #[test]
    fn the_median_interval_matches_the_binomial_tables() {
        // n = 20: the 6th to the 15th of 20 (95.9%); n = 9: the 2nd to the 8th (96.1%).
        assert_eq!(super::median_ci(20), (5, 14));
        assert_eq!(super::median_ci(9), (1, 7));
        assert_eq!(super::median_ci(3), (0, 2));
    }
}
