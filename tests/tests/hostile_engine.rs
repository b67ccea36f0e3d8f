//! A Docker engine that answers badly: meshd reads a real dockerd through a proxy that
//! answers 500, cuts bodies (and event streams) off half-way, or stops sending half-way
//! and never ends. Under each, the kernel maps stay exactly as they were and the VIP and the
//! name keep answering; meshd says what is wrong (`meshctl status`, the metrics); once the
//! engine answers again it catches up on what changed meanwhile. And an answer that reads
//! well but holds one unreadable service costs that service alone: meshd rejects it with
//! its reason (meshctl, the metrics), keeps its last good version, and follows the rest.
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{ensure, Context, Result};
use meshd_tests::{
    fault_proxy::{Fault, FaultProxy, Rewrite},
    require_root, run, run_tag, wait_for, Meshd, Node, PinGuard, WEB_CMD,
};
use serde_json::Value;

const METRICS: &str = "127.0.0.1:9479";

#[test]
fn a_failing_engine_leaves_the_datapath_as_it_was() {
    if !require_root("a_failing_engine_leaves_the_datapath_as_it_was") {
        return;
    }
    let name = format!("{}he", run_tag());
    let node = Node::start(&name, "192.168.77.9").expect("node");
    let pins = PinGuard(PathBuf::from(format!("/sys/fs/bpf/{name}")));
    let proxy = FaultProxy::start(
        &node.dir.join("faulty-docker.sock"),
        &node.dir.join("docker.sock"),
    )
    .expect("proxy");
    let mut meshd = None;
    if let Err(e) = scenario(&node, &pins, &proxy, &mut meshd) {
        if let Some(m) = &meshd {
            eprintln!("meshd log (last lines):\n{}", m.log_tail());
        }
        panic!("{e:#}");
    }
}

/// The maps that hold what meshd programmed (not the counters and caches traffic moves).
const PROGRAMMED: [&str; 4] = ["MESHD_VIPS", "MESHD_LBS", "MESHD_BACKENDS", "MESHD_SANDBOX"];

/// What those maps hold, as the kernel has it (bpftool).
fn programmed(pins: &PinGuard) -> Result<Vec<String>> {
    PROGRAMMED
        .iter()
        .map(|m| {
            run(Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(pins.0.join(m)))
            .with_context(|| format!("dump {m}"))
        })
        .collect()
}

fn scrape(node: &Node) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &node.netns, "curl", "-sf"])
        .arg(format!("http://{METRICS}/metrics"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Sum of a counter over its series (`meshd_docker_read_failures_total{source=...}`).
fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn failures(meshd: &Meshd) -> Result<u64> {
    let s = meshd.status()?;
    Ok(["local", "swarm"]
        .iter()
        .map(|k| s[k]["failures"].as_u64().unwrap_or(0))
        .sum())
}

/// Ten requests by name and ten to the VIP from the client: every one answered.
fn still_served(node: &Node, vip: &str) -> Result<()> {
    for url in ["http://web/", &format!("http://{vip}/")] {
        let out = node.exec(
            "client",
            &format!("for i in $(seq 10); do timeout 3 wget -qO- {url} || echo FAILED; done"),
        )?;
        ensure!(
            out.lines().count() == 10 && !out.contains("FAILED"),
            "{url}: {out}"
        );
    }
    Ok(())
}

fn scenario(
    node: &Node,
    pins: &PinGuard,
    proxy: &FaultProxy,
    slot: &mut Option<Meshd>,
) -> Result<()> {
    node.swarm_init()?;
    node.import_image()?;
    node.create_overlay("front")?;
    let meshd = slot.insert(Meshd::start_with_args(
        node,
        &pins.0,
        None,
        &[
            "--docker-host".into(),
            proxy.url(),
            "--metrics".into(),
            METRICS.into(),
        ],
    )?);
    node.create_service("web", "front", 2, "5s", &["sh", "-c", WEB_CMD])?;
    node.run_idle_container("client", "front")?;
    node.wait_running("web", 2)?;
    let vip = node.service_vip("web")?;
    meshd.wait_backends("web", 2)?;
    still_served(node, &vip)?;
    let mut replicas = 2;

    for fault in [Fault::Status500, Fault::CutBody, Fault::HangBody] {
        let before = programmed(pins)?;
        let backends = meshd.backend_list("web").context("web's backends")?;
        let failed = failures(meshd)?;
        let faulted = proxy.faulted();
        let metric_before = counter(
            &scrape(node).context("metrics")?,
            "meshd_docker_read_failures_total",
        );
        let log_from = log_len(meshd);
        proxy.set(fault);
        // A change meshd cannot read while the engine answers this way.
        replicas += 1;
        node.docker(&["service", "scale", "-d", &format!("web={replicas}")])?;
        // What meshd must say for this fault (the connections `set` drops give errors of
        // their own, which do not count). Long enough for a hung read to meet meshd's
        // request timeout (15 s).
        let says = match fault {
            Fault::Status500 => "status 500",
            Fault::CutBody => "error reading a body",
            Fault::HangBody => "no answer in",
            Fault::None => unreachable!(),
        };
        let said = wait_for(
            &format!("meshd to say {says:?} for the engine's {fault:?}"),
            Duration::from_secs(40),
            || {
                if failures(meshd).ok()? <= failed || proxy.faulted() <= faulted {
                    return None;
                }
                let status = meshd.status().ok()?;
                let said: Vec<String> = ["local", "swarm"]
                    .iter()
                    .filter_map(|k| status[k]["last_error"].as_str().map(String::from))
                    .collect();
                said.iter().any(|e| e.contains(says)).then_some(said)
            },
        )?;
        let text = scrape(node).context("metrics during the fault")?;
        ensure!(
            counter(&text, "meshd_docker_read_failures_total") > metric_before,
            "{fault:?}: the failure counter did not move"
        );
        // The datapath is as it was: the same entries in the kernel, the same backends in
        // meshctl, and the service answers by VIP and by name.
        still_served(node, &vip)?;
        ensure!(
            programmed(pins)? == before,
            "{fault:?} changed the kernel maps"
        );
        ensure!(
            meshd.backend_list("web").as_ref() == Some(&backends),
            "{fault:?} changed web's backends"
        );
        eprintln!("{fault:?}: meshd said {said:?}; datapath unchanged");

        // The engine answers again: meshd catches up with the scale it missed.
        let log_mid = log_len(meshd);
        proxy.set(Fault::None);
        node.wait_running("web", replicas)?;
        wait_for(
            &format!("meshd to catch up after {fault:?}"),
            Duration::from_secs(30),
            || (meshd.backends("web") == Some(replicas)).then_some(()),
        )?;
        wait_for(
            "meshd's sources connected again",
            Duration::from_secs(30),
            || {
                let s: Value = meshd.status().ok()?;
                ["local", "swarm"]
                    .iter()
                    .all(|k| s[k]["connected"] == true)
                    .then_some(())
            },
        )?;
        still_served(node, &vip)?;
        outage_logged_once(meshd, log_from, log_mid).with_context(|| format!("{fault:?}"))?;
    }
    one_bad_service(node, meshd, proxy, &vip, replicas)
}

/// The engine's answer for service `other` has a number for its name: `other` alone is
/// rejected, and says why; `web` keeps being followed.
fn one_bad_service(
    node: &Node,
    meshd: &Meshd,
    proxy: &FaultProxy,
    vip: &str,
    mut replicas: usize,
) -> Result<()> {
    node.create_service("other", "front", 1, "5s", &["sh", "-c", WEB_CMD])?;
    node.wait_running("other", 1)?;
    meshd.wait_backends("other", 1)?;
    let other = node.docker(&["service", "inspect", "-f", "{{.ID}}", "other"])?;
    let other = other.trim();
    let rejected = |status: &Value| -> Vec<Value> {
        status["rejected"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|r| r["kind"] == "service")
            .cloned()
            .collect()
    };
    ensure!(
        rejected(&meshd.status()?).is_empty(),
        "a service rejected before the test broke one"
    );
    let rewritten = proxy.faulted();
    proxy.rewrite(Some(Rewrite {
        path: "/services".into(),
        from: r#""Name":"other""#.into(),
        to: r#""Name":42"#.into(),
    }));
    // An event for `other` makes meshd read it again, and web scales meanwhile.
    node.docker(&[
        "service",
        "update",
        "-d",
        "--label-add",
        "hostile=1",
        "other",
    ])?;
    replicas += 1;
    node.docker(&["service", "scale", "-d", &format!("web={replicas}")])?;
    let reason = wait_for(
        "meshd to reject the unreadable service",
        Duration::from_secs(30),
        || {
            let r = rejected(&meshd.status().ok()?);
            let r = r.iter().find(|r| r["id"] == other)?;
            r["reason"].as_str().map(String::from)
        },
    )?;
    ensure!(proxy.faulted() > rewritten, "the proxy rewrote nothing");
    ensure!(
        reason.starts_with("Spec.Name: invalid type"),
        "the reason does not say what is wrong: {reason}"
    );
    let text = meshd.ctl_text(&["status"])?;
    ensure!(
        text.contains(other) && text.contains(&reason),
        "meshctl status does not show the rejection:\n{text}"
    );
    let gauge = |want: f64| {
        wait_for(
            &format!("meshd_rejected_objects{{kind=\"service\"}} to be {want}"),
            Duration::from_secs(10),
            || {
                let t = scrape(node)?;
                (counter(&t, r#"meshd_rejected_objects{kind="service"}"#) == want).then_some(())
            },
        )
    };
    gauge(1.0)?;
    // The rest still applies: web's scale is followed; `other` keeps its last good version.
    node.wait_running("web", replicas)?;
    wait_for(
        "meshd to follow web's scale beside the rejected service",
        Duration::from_secs(30),
        || (meshd.backends("web") == Some(replicas)).then_some(()),
    )?;
    ensure!(
        meshd.backends("other") == Some(1),
        "the rejected service lost its last good backends"
    );
    still_served(node, vip)?;
    let log = std::fs::read_to_string(&meshd.log)?;
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("object rejected") && l.contains(other))
        .collect();
    ensure!(
        said.len() == 1 && said[0].contains("Spec.Name"),
        "the rejection is not logged once with its reason: {said:?}"
    );
    eprintln!("rejected {other} alone: {reason}");

    // The engine answers well again: the next event for it clears the rejection.
    proxy.rewrite(None);
    node.docker(&[
        "service",
        "update",
        "-d",
        "--label-add",
        "hostile=2",
        "other",
    ])?;
    wait_for("the rejection to clear", Duration::from_secs(30), || {
        rejected(&meshd.status().ok()?).is_empty().then_some(())
    })?;
    gauge(0.0)?;
    let log = std::fs::read_to_string(&meshd.log)?;
    ensure!(
        log.lines()
            .any(|l| l.contains("object no longer rejected") && l.contains(other)),
        "the end of the rejection is not logged"
    );
    Ok(())
}

fn log_len(meshd: &Meshd) -> usize {
    std::fs::metadata(&meshd.log).map_or(0, |m| m.len() as usize)
}

/// While the fault lasts, an outage is a warning when it starts or its reason changes, not
/// one per retry; once it is lifted, its end is said.
fn outage_logged_once(meshd: &Meshd, from: usize, lifted: usize) -> Result<()> {
    let log = std::fs::read_to_string(&meshd.log)?;
    let window = log.get(from..lifted).unwrap_or_default();
    let after = log.get(lifted..).unwrap_or_default();
    let warned: Vec<&str> = window
        .lines()
        .filter(|l| l.contains("Docker engine failing"))
        // What identifies the warning: source, endpoint and error (not the counts).
        .filter_map(|l| {
            let at = l.find("source=")?;
            Some(l[at..].split(" failures=").next().unwrap_or_default())
        })
        .collect();
    ensure!(!warned.is_empty(), "no warning about the outage:\n{window}");
    for (i, w) in warned.iter().enumerate() {
        ensure!(
            !warned[..i].contains(w),
            "the same failure warned twice in one outage: {w}\n{window}"
        );
    }
    ensure!(
        after.contains("Docker engine answers again"),
        "the end of the outage is not logged:\n{after}"
    );
    Ok(())
}
