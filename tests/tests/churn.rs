//! Nothing lost under churn: requests through a VIP and by name run without pause while the
//! service is rolled, scaled 3→6→2, rolled again, and while every meshd is killed with
//! `kill -9` and restarted. Then health checks: a task gets connections only once healthy,
//! and none once its health check fails.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use meshd_tests::{require_root, run_tag, wait_for, Lab, LabSpec, Node};
use serde_json::Value;

#[test]
fn no_request_fails_while_services_roll_scale_and_meshd_restarts() {
    if !require_root("no_request_fails_while_services_roll_scale_and_meshd_restarts") {
        return;
    }
    let mut spec = LabSpec::new(&format!("{}c", run_tag()), 3, 1);
    spec.heartbeat = Some("1s".into());
    let mut lab = Lab::up(spec).expect("lab up");
    let r = churn(&mut lab).and_then(|()| health(&mut lab));
    if let Err(e) = r {
        for (i, m) in lab.meshds.iter().enumerate() {
            eprintln!("--- meshd on node{} ---\n{}", i + 1, m.log_tail());
        }
        panic!("{e:#}");
    }
}

/// Waits until the service's rolling update is over.
fn wait_update_done(m: &Node, service: &str) -> Result<()> {
    wait_for(
        &format!("{service}'s update to complete"),
        Duration::from_secs(120),
        || {
            let s = m.docker_json(&["service", "inspect", service]).ok()?;
            (s[0]["UpdateStatus"]["State"] == "completed").then_some(())
        },
    )
}

/// Waits until exactly `n` tasks run and no other container of the service is left on any
/// node (the old ones have served their grace period and stopped).
fn wait_settled(lab: &Lab, service: &str, n: usize) -> Result<()> {
    lab.manager().wait_running(service, n)?;
    wait_for(
        &format!("{service} to settle on {n} containers"),
        Duration::from_secs(60),
        || {
            let total: usize = lab
                .nodes
                .iter()
                .map(|node| {
                    node.docker(&[
                        "ps",
                        "-q",
                        "--filter",
                        &format!("label=com.docker.swarm.service.name={service}"),
                    ])
                    .map(|o| o.lines().count())
                    .unwrap_or(usize::MAX / 8)
                })
                .sum();
            (total == n).then_some(())
        },
    )
}

struct Loop {
    name: &'static str,
    target: String,
}

fn start_loops(client: &Node, loops: &[Loop]) -> Result<()> {
    for l in loops {
        client.docker(&[
            "exec",
            "-d",
            "client",
            "labtool",
            "http-loop",
            &l.target,
            &format!("/tmp/stop-{}", l.name),
            &format!("/tmp/out-{}.json", l.name),
        ])?;
    }
    Ok(())
}

fn stop_loops(client: &Node, loops: &[Loop]) -> Result<Vec<(String, Value)>> {
    let mut out = Vec::new();
    for l in loops {
        client.exec("client", &format!("touch /tmp/stop-{}", l.name))?;
    }
    for l in loops {
        let v = wait_for(
            &format!("the {} loop's summary", l.name),
            Duration::from_secs(20),
            || {
                let text = client
                    .exec("client", &format!("cat /tmp/out-{}.json", l.name))
                    .ok()?;
                serde_json::from_str::<Value>(text.trim()).ok()
            },
        )?;
        out.push((l.name.to_string(), v));
    }
    Ok(out)
}

fn churn(lab: &mut Lab) -> Result<()> {
    let m = lab.manager();
    m.create_overlay("app")?;
    // Each task answers "<hostname> ok", or "<hostname> stopping" once told to stop; it
    // serves its 3 s grace period, as a well-behaved service does.
    m.create_service_with("web", "app", 3, "3s", &[], &["labtool", "http-serve", "80"])?;
    m.run_idle_container("client", "app")?;
    m.wait_running("web", 3)?;
    for i in 0..lab.meshds.len() {
        lab.meshds[i].wait_backends("web", 3)?;
    }
    let vip = m.service_vip("web")?;
    let loops = [
        Loop {
            name: "vip",
            target: format!("{vip}:80"),
        },
        Loop {
            name: "name",
            target: "web:80".into(),
        },
    ];
    start_loops(m, &loops)?;
    let t0 = Instant::now();
    let mut phases = Vec::new();
    let mut phase = |what: &str, since: Instant| {
        phases.push(format!("{what}: {:.1} s", since.elapsed().as_secs_f64()))
    };

    let t = Instant::now();
    m.docker(&["service", "update", "-d", "--force", "web"])?;
    wait_update_done(m, "web")?;
    wait_settled(lab, "web", 3)?;
    phase("rolled (--force)", t);

    let t = Instant::now();
    m.docker(&["service", "scale", "-d", "web=6"])?;
    wait_settled(lab, "web", 6)?;
    m.docker(&["service", "scale", "-d", "web=2"])?;
    wait_settled(lab, "web", 2)?;
    phase("scaled 3→6→2", t);

    let t = Instant::now();
    m.docker(&["service", "update", "-d", "--force", "web"])?;
    wait_update_done(m, "web")?;
    wait_settled(lab, "web", 2)?;
    phase("rolled again", t);

    // Every meshd dies at once; the pinned maps keep forwarding and dockerd's resolver
    // answers names meanwhile. Then each comes back and adopts what is pinned.
    let t = Instant::now();
    for i in 0..lab.meshds.len() {
        lab.meshds[i].kill9();
    }
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..lab.meshds.len() {
        lab.meshds[i].restart()?;
    }
    for i in 0..lab.meshds.len() {
        lab.meshds[i].wait_backends("web", 2)?;
    }
    // A little traffic after all are back.
    std::thread::sleep(Duration::from_secs(2));
    phase("every meshd killed -9 and restarted", t);

    let m = lab.manager();
    let results = stop_loops(m, &loops)?;
    println!(
        "churn over {:.0} s: {}",
        t0.elapsed().as_secs_f64(),
        phases.join("; ")
    );
    let mut problems = Vec::new();
    for (name, v) in &results {
        let by: BTreeMap<String, u64> = serde_json::from_value(v["by"].clone()).unwrap_or_default();
        let stopping: u64 = by
            .iter()
            .filter(|(k, _)| k.ends_with(" stopping"))
            .map(|(_, n)| n)
            .sum();
        println!(
            "  {name}: {} requests, {} failed, {stopping} answered by a task told to stop, {} tasks answered",
            v["ok"].as_u64().unwrap_or(0) + v["failed"].as_u64().unwrap_or(0),
            v["failed"],
            by.len()
        );
        if v["failed"] != 0 {
            problems.push(format!("{name}: failures {}", v["failures"]));
        }
        if v["ok"].as_u64().unwrap_or(0) < 100 {
            problems.push(format!("{name}: too few requests to mean anything: {v}"));
        }
        // A task's node holds it back the moment its engine is told to stop it; a request
        // racing that moment can still land (it is served: the task keeps serving its grace
        // period). More than a handful means draining does not work.
        if stopping > 5 {
            problems.push(format!(
                "{name}: {stopping} requests reached tasks told to stop: {by:?}"
            ));
        }
    }
    if !problems.is_empty() {
        bail!("{problems:#?}");
    }
    Ok(())
}

/// Tasks with a health check: connections only once healthy, none once unhealthy.
fn health(lab: &mut Lab) -> Result<()> {
    let m = lab.manager();
    // Healthy once /tmp/ok exists; the test creates and removes it.
    m.create_service_with(
        "hc",
        "app",
        2,
        "3s",
        &[
            "--health-cmd",
            "test -f /tmp/ok",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
            // Failing checks in the start period do not count: the tasks stay starting
            // (not unhealthy) until the test makes them healthy; after that, they count.
            "--health-start-period",
            "60s",
            "--constraint",
            "node.role==worker",
        ],
        &["labtool", "http-serve", "80"],
    )?;
    let containers = wait_for("hc's containers to start", Duration::from_secs(60), || {
        let mut all = Vec::new();
        for node in &lab.nodes {
            let out = node
                .docker(&[
                    "ps",
                    "-q",
                    "--filter",
                    "label=com.docker.swarm.service.name=hc",
                ])
                .ok()?;
            all.extend(
                out.lines()
                    .map(|l| (node.name.clone(), l.trim().to_string())),
            );
        }
        (all.len() == 2).then_some(all)
    })?;
    // Not healthy yet: swarm reports them starting and meshd gives them nothing.
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..lab.meshds.len() {
        let n = lab.meshds[i].backends("hc");
        ensure!(
            n == Some(0),
            "node{}'s meshd gives hc {n:?} backends before any is healthy",
            i + 1
        );
    }
    let node_of = |name: &str| lab.nodes.iter().find(|n| n.name == name).context("node");
    for (node, c) in &containers {
        node_of(node)?.docker(&["exec", c, "touch", "/tmp/ok"])?;
    }
    let healthy_at = Instant::now();
    for i in 0..lab.meshds.len() {
        lab.meshds[i].wait_backends("hc", 2).context("hc healthy")?;
    }
    println!(
        "hc: both tasks backends {:?} after they were made healthy",
        healthy_at.elapsed()
    );
    // One turns unhealthy: its node's meshd holds it back at once, before swarm replaces it.
    let (sick_node, sick) = &containers[0];
    let sick_host = node_of(sick_node)?
        .docker(&["inspect", sick, "--format", "{{.Config.Hostname}}"])?
        .trim()
        .to_string();
    node_of(sick_node)?.docker(&["exec", sick, "rm", "/tmp/ok"])?;
    let sick_at = Instant::now();
    let meshd1 = lab.meshd("node1")?;
    wait_for(
        "the unhealthy task to leave node1's backends",
        Duration::from_secs(10),
        || (meshd1.backends("hc") == Some(1)).then_some(()),
    )?;
    println!(
        "hc: unhealthy task out of node1's backends {:?} after its check began failing",
        sick_at.elapsed()
    );
    let out = m.exec(
        "client",
        "for i in $(seq 30); do timeout 3 wget -qO- http://hc/ || echo FAILED; done",
    )?;
    ensure!(!out.contains("FAILED"), "requests to hc failed: {out}");
    ensure!(
        !out.contains(&sick_host),
        "the unhealthy task {sick_host} still got connections: {out}"
    );
    Ok(())
}
