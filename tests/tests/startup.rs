//! A container's first instruction: on a manager and on a worker, 20 containers in a row
//! each connect to a VIP and to a service by name as the very first thing they do. meshd
//! must have programmed their namespace before the entrypoint ran. Also: a plain container
//! on an attachable overlay resolves by name from another node (its node reports it).
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meshd_tests::{require_root, run_tag, wait_for, Lab, LabSpec, Node, WEB_CMD};

const RUNS: usize = 20;

#[test]
fn containers_reach_vips_and_names_from_their_first_instruction() {
    if !require_root("containers_reach_vips_and_names_from_their_first_instruction") {
        return;
    }
    let mut lab = Lab::up(LabSpec::new(&format!("{}s", run_tag()), 2, 1)).expect("lab up");
    if let Err(e) = scenario(&mut lab) {
        for (i, m) in lab.meshds.iter().enumerate() {
            eprintln!("--- meshd on node{} ---\n{}", i + 1, m.log_tail());
        }
        panic!("{e:#}");
    }
}

fn hostnames(node: &Node, service: &str) -> Result<Vec<String>> {
    Ok(node
        .running_tasks(service)?
        .into_iter()
        .map(|(_, c)| c.chars().take(12).collect())
        .collect())
}

fn scenario(lab: &mut Lab) -> Result<()> {
    let m = lab.manager();
    m.create_overlay("app")?;
    m.create_service("web", "app", 2, "1s", &["sh", "-c", WEB_CMD])?;
    m.wait_running("web", 2)?;
    let tasks = hostnames(m, "web")?;
    let vip = m.service_vip("web")?;
    for host in ["node1", "node2"] {
        lab.meshd(host)?.wait_backends("web", 2)?;
    }

    // The first instruction connects to the VIP; the second resolves the service's name
    // (through 127.0.0.11) and connects again.
    let first = format!("wget -q -O- http://{vip}/ && wget -q -O- http://web/");
    let mut failures = Vec::new();
    for host in ["node1", "node2"] {
        let node = lab.node(host)?;
        for i in 0..RUNS {
            let out = node.docker(&[
                "run",
                "--rm",
                "--network",
                "app",
                meshd_tests::IMAGE,
                "sh",
                "-c",
                &first,
            ]);
            let ok = out.as_ref().is_ok_and(|o| {
                let lines: Vec<&str> = o.lines().map(str::trim).collect();
                lines.len() == 2 && lines.iter().all(|l| tasks.iter().any(|t| t == l))
            });
            if !ok {
                failures.push(format!("{host} run {i}: {out:?}"));
            }
        }
    }
    let mut margins = Vec::new();
    let mut late = 0;
    for host in ["node1", "node2"] {
        let st = lab.meshd(host)?.status()?;
        late += st["local"]["late_starts"].as_u64().unwrap_or(0);
        for e in st["local"]["early"].as_array().into_iter().flatten() {
            margins.push(e["programmed_before_start_ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    margins.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        margins
            .get(((margins.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "namespace programmed before `start`, over {} containers: min {:.1} ms, p50 {:.1} ms, max {:.1} ms; {late} programmed only after start",
        margins.len(),
        pick(0.0),
        pick(0.5),
        pick(1.0)
    );
    ensure!(
        failures.is_empty(),
        "{} of {} first connections failed: {failures:#?}",
        failures.len(),
        2 * RUNS
    );
    ensure!(
        late == 0,
        "{late} containers were programmed only after their start"
    );
    ensure!(
        margins.len() >= 2 * RUNS,
        "only {} early programmings recorded",
        margins.len()
    );

    // A plain container on node2 resolves by name from node1 (its meshd reports it to the
    // manager's, which passes it on), and stops resolving once it is gone.
    let node2 = lab.node("node2")?;
    node2.run_idle_container("probe", "app")?;
    let probe_ip = node2
        .docker(&[
            "inspect",
            "probe",
            "--format",
            "{{(index .NetworkSettings.Networks \"app\").IPAddress}}",
        ])?
        .trim()
        .to_string();
    let m = lab.manager();
    m.run_idle_container("asker", "app")?;
    let took = std::time::Instant::now();
    wait_for(
        "probe (on node2) to resolve on node1",
        Duration::from_secs(10),
        || {
            m.exec("asker", "nslookup probe 127.0.0.11")
                .ok()
                .filter(|o| o.contains(&probe_ip))
        },
    )
    .context("a standalone container on another node")?;
    println!(
        "standalone container on node2 resolvable on node1 after {:?}",
        took.elapsed()
    );
    node2.docker(&["rm", "-f", "probe"])?;
    wait_for(
        "probe to stop resolving on node1",
        Duration::from_secs(10),
        || {
            m.exec("asker", "nslookup probe 127.0.0.11 || true")
                .ok()
                .filter(|o| !o.contains(&probe_ip))
        },
    )?;
    Ok(())
}
