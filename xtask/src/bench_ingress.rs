//! `bench ingress`: an external client (a namespace on the lab's LAN) against a published
//! port, in one run, the paths taking turns every 20 ms: straight to the task (routed by its
//! node, no NAT: the baseline); meshd entering at the task's own node; meshd entering at a
//! node without a task (the tunnel); the same with the client's address preserved; and an
//! nftables mesh built the way Docker's is (DNAT at the entry node to its ingress sandbox,
//! DNAT + SNAT there, the ingress overlay's VXLAN to the task).
use std::process::Command;

use anyhow::{ensure, Context, Result};
use meshd_tests::{bin, lab::LAN_CLIENT, require_root, run, run_tag, wait_for, Lab, LabSpec};
use serde_json::Value;

use crate::bench::{median, spread};

pub fn ingress(rounds: usize, seconds: f64) -> Result<()> {
    ensure!(require_root("bench ingress"), "bench ingress needs root");
    let lab = Lab::up(LabSpec::new(&format!("{}bi", run_tag()), 3, 1))?;
    let m = lab.manager();
    let lan = lab.lan_client()?;
    // One task each, on node2: node1 and node3 have none.
    for (name, port, label) in [
        ("echo", "7000:7000", None),
        (
            "echop",
            "7002:7000",
            Some("meshd.ingress.client-address=preserve"),
        ),
    ] {
        let mut flags = vec!["--constraint", "node.hostname==node2", "-p", port];
        if let Some(l) = label {
            flags.extend(["--label", l]);
        }
        m.create_service_with(name, "", 1, "1s", &flags, &["labtool", "tcp-echo", "7000"])?;
    }
    m.wait_running("echo", 1)?;
    m.wait_running("echop", 1)?;
    let node2 = lab.node("node2")?;
    let task = |svc: &str| -> Result<String> {
        let id = node2.docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=com.docker.swarm.service.name={svc}"),
        ])?;
        Ok(id.trim().to_string())
    };
    let echo = task("echo")?;
    // The task's docker_gwbridge address: where "direct" goes, routed by node2.
    let direct = node2.gwbridge_addr(&echo)?;
    let in_lan = |args: &[&str]| -> Result<String> {
        run(Command::new("ip").args(["netns", "exec", &lan]).args(args))
    };
    in_lan(&[
        "ip",
        "route",
        "add",
        "172.16.0.0/12",
        "via",
        "192.168.100.2",
    ])?;
    in_lan(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])?;
    let node3_sbox = docker_mesh(&lab, "node3", 7003, &echo_ingress_addr(&lab)?)?;

    let paths = [
        ("direct to the task", format!("{direct}:7000")),
        (
            "meshd, task on entry node",
            "192.168.100.2:7000".to_string(),
        ),
        ("meshd, task on another", "192.168.100.1:7000".to_string()),
        (
            "meshd, client address kept",
            "192.168.100.1:7002".to_string(),
        ),
        ("nftables, Docker's shape", "192.168.100.3:7003".to_string()),
    ];
    for (name, target) in &paths {
        wait_for(
            &format!("{name} to answer"),
            std::time::Duration::from_secs(20),
            || {
                in_lan(&[
                    &bin("labtool").display().to_string(),
                    "crr-alt",
                    "0.2",
                    target,
                ])
                .ok()
            },
        )?;
    }
    // The client on CPU 0, the task on CPU 1 (the entry nodes' kernel work lands where the
    // packets do: the spread says how much the rest of the machine moved it).
    let pinned = node2
        .docker(&["update", "--cpuset-cpus", "1", &echo])
        .and_then(|_| node2.docker(&["update", "--cpuset-cpus", "1", &task("echop")?]))
        .map_or("not pinned", |_| "client on CPU 0, tasks on CPU 1");
    let n = paths.len();
    let mut rr = vec![Vec::new(); n];
    let mut crr = vec![Vec::new(); n];
    eprintln!("bench ingress: {rounds} rounds × (rr, crr) × {seconds} s, {n} paths taking turns every 20 ms");
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..n).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let targets: Vec<&str> = order.iter().map(|&i| paths[i].1.as_str()).collect();
        for kind in ["rr", "crr"] {
            let secs = seconds.to_string();
            let tool = bin("labtool").display().to_string();
            let mut args = vec!["taskset", "-c", "0", tool.as_str()];
            let alt = format!("{kind}-alt");
            args.extend([alt.as_str(), secs.as_str()]);
            args.extend(targets.iter().copied());
            let out = in_lan(&args)?;
            let v: Vec<Value> = serde_json::from_str(out.trim())
                .with_context(|| format!("labtool answered {out:?}"))?;
            ensure!(v.len() == n, "labtool answered {} paths", v.len());
            for (&i, v) in order.iter().zip(&v) {
                let rate = v["per_s"].as_f64().unwrap_or(0.0);
                if kind == "rr" {
                    rr[i].push(rate);
                } else {
                    crr[i].push(rate);
                }
            }
        }
        eprintln!("  round {}/{rounds} done", round + 1);
    }
    println!(
        "\nIngress mesh, external client ({LAN_CLIENT}) → published port, {rounds} rounds of {seconds} s, \
         paths taking turns every 20 ms ({pinned})"
    );
    println!("  rr: request/response on one connection; crr: connect, request, close");
    println!("  ×direct: median of each round's ratio to direct, with its 95% confidence interval");
    println!(
        "{:<30} {:>9} {:>22} {:>9} {:>22}",
        "path", "rr/s", "×direct", "crr/s", "×direct"
    );
    let ratio = |v: &[Vec<f64>], i: usize| -> Vec<f64> {
        v[i].iter().zip(&v[0]).map(|(x, d)| x / d).collect()
    };
    for (i, (name, _)) in paths.iter().enumerate() {
        println!(
            "{:<30} {:>9.0} {:>22} {:>9.0} {:>22}",
            name,
            median(rr[i].clone()),
            spread(&ratio(&rr, i)),
            median(crr[i].clone()),
            spread(&ratio(&crr, i)),
        );
    }
    println!(
        "targets: ≥ 0.97× direct with the task on the entry node, ≥ 0.9× with it on another, \
         above the nftables mesh in every row"
    );
    drop(node3_sbox);
    Ok(())
}

/// echo's task address on the ingress network (what Docker's mesh sends to).
fn echo_ingress_addr(lab: &Lab) -> Result<String> {
    let m = lab.manager();
    let ingress = m.docker(&["network", "inspect", "ingress", "--format", "{{.Id}}"])?;
    for t in m.running_task_objects("echo")? {
        for a in t["NetworksAttachments"].as_array().into_iter().flatten() {
            if a["Network"]["ID"] == ingress.trim() {
                if let Some(addr) = a["Addresses"][0].as_str() {
                    return Ok(addr.split('/').next().unwrap_or(addr).to_string());
                }
            }
        }
    }
    anyhow::bail!("echo has no ingress address")
}

/// Docker's ingress path on `host`, with nftables in IPVS's place: DNAT at the node to its
/// `ingress_sbox`, DNAT + SNAT there to the task's ingress address, over the ingress
/// overlay. Returns a guard that removes the tables.
fn docker_mesh(lab: &Lab, host: &str, port: u16, task: &str) -> Result<NftGuard> {
    let node = lab.node(host)?;
    let sbox = node.dir.join("exec/netns/ingress_sbox");
    let in_sbox = |args: &[&str]| -> Result<String> {
        run(Command::new("nsenter")
            .arg(format!("--net={}", sbox.display()))
            .args(args))
    };
    let sbox_addrs = in_sbox(&["ip", "-4", "-o", "addr", "show"])?;
    let addr_on = |dev: &str| -> Result<String> {
        sbox_addrs
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(dev))
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|a| a.split('/').next())
            .map(str::to_string)
            .with_context(|| format!("ingress_sbox has no address on {dev}: {sbox_addrs}"))
    };
    // eth0: the ingress overlay; eth1: docker_gwbridge (as Docker makes it).
    let (sbox_ingress, sbox_gw) = (addr_on("eth0")?, addr_on("eth1")?);
    in_sbox(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    let nft = |ns_sbox: bool, script: String| -> Result<String> {
        let file = std::env::temp_dir().join(format!("meshbench-{}.nft", std::process::id()));
        std::fs::write(&file, script)?;
        let f = file.display().to_string();
        let r = if ns_sbox {
            in_sbox(&["nft", "-f", &f])
        } else {
            run(Command::new("ip").args(["netns", "exec", &node.netns, "nft", "-f", &f]))
        };
        let _ = std::fs::remove_file(&file);
        r
    };
    nft(
        false,
        format!(
            "table ip meshbench {{\n chain pre {{\n type nat hook prerouting priority -100;\n \
             tcp dport {port} dnat to {sbox_gw}\n }}\n}}\n"
        ),
    )
    .context("the node's DNAT to its ingress_sbox")?;
    nft(
        true,
        format!(
            "table ip meshbench {{\n chain pre {{\n type nat hook prerouting priority -100;\n \
             tcp dport {port} dnat to {task}:7000\n }}\n chain post {{\n \
             type nat hook postrouting priority 100;\n ip daddr {task} snat to {sbox_ingress}\n }}\n}}\n"
        ),
    )
    .context("ingress_sbox's DNAT + SNAT")?;
    Ok(NftGuard {
        netns: node.netns.clone(),
        sbox: sbox.display().to_string(),
    })
}

struct NftGuard {
    netns: String,
    sbox: String,
}

impl Drop for NftGuard {
    fn drop(&mut self) {
        let _ = run(Command::new("ip").args([
            "netns",
            "exec",
            &self.netns,
            "nft",
            "delete",
            "table",
            "ip",
            "meshbench",
        ]));
        let _ = run(Command::new("nsenter")
            .arg(format!("--net={}", self.sbox))
            .args(["nft", "delete", "table", "ip", "meshbench"]));
    }
}
