//! `bench l7-reconfig`: the time from `docker service update --label-add` (a host added to
//! a route) to the first request the new host gets answered by its task, seen from a
//! machine on the LAN, with 1 and with 50 networks carrying routed services on the node, in
//! one run. Interlock's proxy grows by 1–2 s per overlay network; meshd's change is one
//! service's compile and one table swap, so the target is no growth.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshd_tests::{require_root, run, run_tag, wait_for, Lab, LabSpec, Node};

use crate::bench::{median, spread};

const MORE_NETWORKS: usize = 49;

pub fn reconfig(rounds: usize) -> Result<()> {
    ensure!(
        require_root("bench l7-reconfig"),
        "bench l7-reconfig needs root"
    );
    let lab = Lab::up(LabSpec::new(&format!("{}br", run_tag()), 1, 1))?;
    let m = lab.manager();
    let lan = lab.lan_client()?;
    routed_service(m, "target", "net0", "base.example.com")?;
    m.wait_running("target", 1)?;
    served(&lan, "base.example.com")?;

    let one = measure(m, &lan, "a", rounds)?;
    eprintln!("bench l7-reconfig: adding {MORE_NETWORKS} networks, each with a routed service");
    for i in 1..=MORE_NETWORKS {
        routed_service(
            m,
            &format!("s{i}"),
            &format!("net{i}"),
            &format!("s{i}.example.com"),
        )?;
    }
    for i in 1..=MORE_NETWORKS {
        m.wait_running(&format!("s{i}"), 1)?;
    }
    served(&lan, &format!("s{MORE_NETWORKS}.example.com"))?;
    let fifty = measure(m, &lan, "b", rounds)?;

    println!(
        "\nL7 reconfiguration: `docker service update -d --label-add com.docker.lb.hosts=…` to \
         the first 200 for the new host (curl from the LAN, polling), {rounds} rounds"
    );
    println!(
        "{:<34} {:>16} {:>18}",
        "networks with routed services", "update CLI ms", "to first 200 ms"
    );
    for (name, (cli, first)) in [("1", &one), ("50", &fifty)] {
        println!(
            "{:<34} {:>16.0} {:>18.0}",
            name,
            median(cli.clone()),
            median(first.clone())
        );
    }
    let ratio: Vec<f64> = fifty.1.iter().zip(&one.1).map(|(b, a)| b / a).collect();
    println!("50 networks ÷ 1 network (to first 200): {}", spread(&ratio));
    println!("target: no growth with the number of networks");
    Ok(())
}

/// A one-task service on a network of its own, routed by `host`.
fn routed_service(m: &Node, name: &str, network: &str, host: &str) -> Result<()> {
    m.create_overlay(network)?;
    m.create_service_with(
        name,
        network,
        1,
        "1s",
        &[
            "--label",
            &format!("com.docker.lb.hosts={host}"),
            "--label",
            "com.docker.lb.port=7000",
        ],
        &["labtool", "http-echo", "7000"],
    )
}

fn served(lan: &str, host: &str) -> Result<()> {
    wait_for(
        &format!("{host} to answer"),
        Duration::from_secs(60),
        || {
            run(Command::new("ip")
                .args(["netns", "exec", lan, "curl", "-sf", "-m", "2", "-H"])
                .arg(format!("Host: {host}"))
                .arg("http://192.168.100.1/"))
            .ok()
        },
    )
    .map(drop)
}

/// Per round: how long the update CLI took, and how long until the new host answered 200
/// (both from just before the CLI started).
fn measure(m: &Node, lan: &str, tag: &str, rounds: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut cli, mut first) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let host = format!("{tag}{r}.example.com");
        // Polls in a loop of its own, started before the update: a curl every few ms.
        let script = format!(
            "until [ \"$(curl -s -o /dev/null -m 1 -w '%{{http_code}}' -H 'Host: {host}' \
             http://192.168.100.1/)\" = 200 ]; do :; done"
        );
        let mut poller = Command::new("ip")
            .args(["netns", "exec", lan, "timeout", "30", "sh", "-c", &script])
            .spawn()
            .context("start the poller")?;
        // The poller's first 404s are on the wire before the clock starts.
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        m.docker(&[
            "service",
            "update",
            "-d",
            "--label-add",
            &format!("com.docker.lb.hosts=base.example.com,{host}"),
            "target",
        ])?;
        cli.push(t0.elapsed().as_secs_f64() * 1000.0);
        let status = poller.wait()?;
        ensure!(status.success(), "{host} never answered 200");
        first.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((cli, first))
}
