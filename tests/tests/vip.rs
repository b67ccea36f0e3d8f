//! Service VIPs on a real single-node dockerd swarm with meshd's eBPF datapath.
//! One scenario, step by step, so one swarm serves every check (2-core CI).
use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshd_tests::{pinned_map_len, require_root, wait_for, Node, OneNodeSwarm, WEB_CMD};
use serde_json::Value;

fn counts(out: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in out.lines().filter(|l| !l.is_empty()) {
        *m.entry(l.trim().to_string()).or_default() += 1;
    }
    m
}

fn short(ids: &[String]) -> Vec<String> {
    ids.iter().map(|c| c[..12].to_string()).collect()
}

fn get_many(node: &Node, n: usize, url: &str) -> Result<BTreeMap<String, usize>> {
    let out = node.exec(
        "client",
        &format!("for i in $(seq {n}); do timeout 3 wget -qO- {url} || echo FAILED; done"),
    )?;
    Ok(counts(&out))
}

#[test]
fn service_vips_on_a_real_swarm() {
    if !require_root("service_vips_on_a_real_swarm") {
        return;
    }
    let mut lab = OneNodeSwarm::start("v1", "192.168.77.1").expect("one-node swarm");
    if let Err(e) = scenario(&mut lab) {
        let log = std::fs::read_to_string(&lab.meshd.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("meshd log (last lines, newest first):\n{}", tail.join("\n"));
        panic!("{e:#}");
    }
}

fn scenario(lab: &mut OneNodeSwarm) -> Result<()> {
    let (node, meshd, pins) = (&lab.node, &mut lab.meshd, &lab.pins);
    node.create_overlay("other")?;
    node.create_service("web", "front", 3, "5s", &["sh", "-c", WEB_CMD])?;
    node.run_idle_container("client", "front")?;
    node.run_idle_container("outsider", "other")?;
    let tasks = short(&node.wait_running("web", 3)?);
    let vip = node.service_vip("web")?;
    meshd.wait_backends("web", 3)?;

    // 1. 300 sequential connections by name: every task answers, none below 20%.
    let seen = get_many(node, 300, "http://web/")?;
    ensure!(
        !seen.contains_key("FAILED"),
        "some requests failed: {seen:?}"
    );
    for t in &tasks {
        let n = seen.get(t).copied().unwrap_or(0);
        ensure!(n >= 60, "task {t} answered {n} of 300 (< 20%): {seen:?}");
    }
    ensure!(seen.len() == 3, "answers from unknown hosts: {seen:?}");
    // The application sees the VIP as its peer, not the task.
    let peer = node.exec("client", &format!("labtool peer {vip}:80"))?;
    ensure!(
        peer.trim() == format!("{vip}:80"),
        "getpeername gave {peer:?}, want {vip}:80"
    );
    let svc = meshd.ctl(&["service", "web"])?;
    let conns = svc["vips"][0]["connections"].as_u64().unwrap_or(0);
    ensure!(conns >= 301, "VIP counter {conns} < 301 connections made");
    let per_backend: u64 = svc["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["connections"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        per_backend == conns,
        "backend counters {per_backend} != VIP counter {conns}"
    );

    // 2. Scale to 5: the new tasks answer within 2 s of running.
    node.docker(&["service", "scale", "-d", "web=5"])?;
    let five = short(&node.wait_running("web", 5)?);
    let running_at = Instant::now();
    let mut all = BTreeMap::new();
    while all.len() < 5 {
        ensure!(
            running_at.elapsed() < Duration::from_secs(2),
            "within 2 s of running only {} of 5 tasks answered: {all:?}",
            all.len()
        );
        for (k, v) in get_many(node, 20, "http://web/")? {
            ensure!(k != "FAILED", "a request failed while scaling up");
            *all.entry(k).or_insert(0) += v;
        }
    }
    for t in &five {
        ensure!(all.contains_key(t), "new task {t} never answered");
    }
    eprintln!(
        "scale 3→5: all tasks answering {:?} after running",
        running_at.elapsed()
    );

    // 3. Scale to 1: tasks told to shut down get no new connection, even during their 5 s
    //    grace period while they still listen.
    node.docker(&["service", "scale", "-d", "web=1"])?;
    let drained_at = Instant::now();
    wait_for(
        "meshd to drain to 1 backend",
        Duration::from_secs(2),
        || (meshd.backends("web") == Some(1)).then_some(()),
    )?;
    eprintln!("scale 5→1: drained in {:?}", drained_at.elapsed());
    let survivor = meshd.ctl(&["service", "web"])?["vips"][0]["backends"][0]["task_id"]
        .as_str()
        .unwrap()
        .to_string();
    let seen = get_many(node, 40, "http://web/")?;
    ensure!(
        seen.len() == 1 && !seen.contains_key("FAILED"),
        "after scale to 1: {seen:?}"
    );
    let survivor_container = node.docker(&[
        "inspect",
        &survivor,
        "--format",
        "{{.Status.ContainerStatus.ContainerID}}",
    ])?;
    ensure!(
        seen.contains_key(&survivor_container.trim()[..12]),
        "answers {seen:?} are not from the surviving task {survivor}"
    );

    // 4. A UDP service answers through its VIP, and replies come from the VIP.
    node.create_service("echo", "front", 2, "1s", &["labtool", "udp-serve", "5353"])?;
    let echo_tasks = short(&node.wait_running("echo", 2)?);
    let echo_vip = node.service_vip("echo")?;
    meshd.wait_backends("echo", 2)?;
    for mode in ["", " --connected"] {
        let out = node.exec("client", &format!("labtool udp-ask {echo_vip}:5353{mode}"))?;
        let (who, from) = out.trim().split_once(" from ").context("udp-ask output")?;
        ensure!(
            echo_tasks.iter().any(|t| t == who),
            "UDP answer from {who}, not a task"
        );
        ensure!(
            from == format!("{echo_vip}:5353"),
            "UDP reply source {from}, want the VIP"
        );
    }

    // 5. A container on another network neither sees nor reaches the VIP.
    let out = node.exec(
        "outsider",
        &format!("timeout 3 wget -qO- http://{vip}/ || echo UNREACHABLE"),
    )?;
    ensure!(
        out.contains("UNREACHABLE"),
        "outsider reached the VIP: {out}"
    );
    let svc = meshd.ctl(&["service", "web"])?;
    let seen_by: Vec<String> = serde_json::from_value(svc["vips"][0]["sandboxes"].clone())?;
    ensure!(
        seen_by.iter().any(|s| s == "client"),
        "client not in VIP scope: {seen_by:?}"
    );
    ensure!(
        !seen_by.iter().any(|s| s == "outsider"),
        "outsider in VIP scope: {seen_by:?}"
    );

    // 6. kill -9 meshd: the pinned datapath keeps the VIP answering.
    node.docker(&["service", "scale", "-d", "web=3"])?;
    node.wait_running("web", 3)?;
    meshd.wait_backends("web", 3)?;
    // Every container's namespace programmed too (a new task's entries can follow its
    // backend by a moment): the restart below must find nothing left to write.
    let containers = node.docker(&["ps", "-q"])?.lines().count();
    wait_for(
        "meshd to have programmed every container",
        Duration::from_secs(20),
        || {
            let st = meshd.status().ok()?;
            let known = st["counts"]["local_sandboxes"].as_u64()? as usize;
            (known == containers && st["datapath"]["appliers"][0]["pending"] == false).then_some(())
        },
    )?;
    meshd.kill9();
    let seen = get_many(node, 30, "http://web/")?;
    ensure!(
        !seen.contains_key("FAILED"),
        "VIP failed with meshd dead: {seen:?}"
    );
    ensure!(
        seen.len() == 3,
        "with meshd dead, answers came from {seen:?}"
    );

    // 7. Restart: the pinned state is adopted and nothing is rewritten.
    let lbs_before = pinned_map_len(&pins.0, "MESHD_LBS")?;
    let slots_before = pinned_map_len(&pins.0, "MESHD_BACKENDS")?;
    meshd.restart()?;
    let st = meshd.status()?;
    let adopted = &st["datapath"]["adopted_at_start"];
    ensure!(
        adopted["load_balancers"] == lbs_before,
        "adopted {adopted} vs {lbs_before} pinned LBs"
    );
    ensure!(
        adopted["replaced_links"] == 4,
        "old links not replaced: {adopted}"
    );
    // `--datapath auto` (the default) on a kernel with the hooks: eBPF, and why.
    ensure!(
        st["datapath"]["kind"] == "ebpf"
            && st["datapath"]["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("auto: ")),
        "datapath choice: {}",
        st["datapath"]
    );
    let vip_applier = &st["datapath"]["appliers"][0];
    ensure!(
        vip_applier["name"] == "ebpf"
            && vip_applier["totals"]["writes"] == 0
            && vip_applier["totals"]["deletes"] == 0,
        "restart rewrote maps though nothing changed: {vip_applier}"
    );
    ensure!(
        pinned_map_len(&pins.0, "MESHD_BACKENDS")? == slots_before,
        "backend slots changed"
    );
    let seen = get_many(node, 30, "http://web/")?;
    ensure!(
        seen.len() == 3 && !seen.contains_key("FAILED"),
        "after restart: {seen:?}"
    );

    // 8. Prometheus metrics (`--metrics`, loopback only): scraped with curl from the
    // node, the connection and DNS counters move with traffic.
    meshd.restart_with_args(&["--metrics", "127.0.0.1:9478"])?;
    let scrape = || -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &node.netns, "curl", "-sf"])
            .arg("http://127.0.0.1:9478/metrics")
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let value = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    let web_conns = "meshd_service_connections_total{service=\"web\"} ";
    let dns_udp = "meshd_dns_queries_total{transport=\"udp\"} ";
    let dns_local = "meshd_dns_reply_duration_seconds_count{path=\"local\"} ";
    let before = wait_for("metrics served", Duration::from_secs(10), || {
        scrape().filter(|t| value(t, web_conns).is_some())
    })?;
    ensure!(
        before.contains("meshd_info{version=") && before.contains("datapath=\"ebpf\""),
        "meshd_info: {before}"
    );
    let version = meshd.status()?["version"]
        .as_str()
        .unwrap_or("")
        .to_string();
    ensure!(
        version.starts_with(env!("CARGO_PKG_VERSION")) && version.contains(" ("),
        "meshctl status: version {version:?}"
    );
    for h in [
        "meshd_event_to_datapath_seconds_bucket",
        "meshd_sync_duration_seconds_count",
    ] {
        ensure!(before.contains(h), "{h} missing:\n{before}");
    }
    let lbs = value(&before, "meshd_ebpf_map_entries{map=\"MESHD_LBS\"} ").unwrap_or(0.0);
    ensure!(
        lbs as usize == pinned_map_len(&pins.0, "MESHD_LBS")?,
        "the LB map's fill in the metrics ({lbs}) is not what the kernel holds"
    );
    let seen = get_many(node, 10, "http://web/")?;
    ensure!(!seen.contains_key("FAILED"), "{seen:?}");
    let after = scrape().context("scrape again")?;
    let moved =
        |series: &str| value(&after, series).unwrap_or(0.0) - value(&before, series).unwrap_or(0.0);
    ensure!(
        moved(web_conns) >= 10.0,
        "web's connections moved by {} for 10 requests",
        moved(web_conns)
    );
    ensure!(
        moved(dns_udp) >= 10.0,
        "DNS queries moved by {} for 10 lookups",
        moved(dns_udp)
    );
    // Each lookup answered from the zones is timed; every one of them took under 5 s.
    ensure!(
        moved(dns_local) >= 10.0,
        "DNS local latency count moved by {} for 10 lookups",
        moved(dns_local)
    );
    let under = |t: &str| {
        value(
            t,
            "meshd_dns_reply_duration_seconds_bucket{le=\"5.24288\",path=\"local\"} ",
        )
        .unwrap_or(0.0)
    };
    ensure!(
        under(&after) - under(&before) == moved(dns_local),
        "DNS latency buckets: {}",
        after
            .lines()
            .filter(|l| l.starts_with("meshd_dns_reply_duration"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // meshctl for a person: tables and sentences, no JSON objects or arrays inside.
    for cmd in [
        &["status"][..],
        &["services"],
        &["service", "web"],
        &["maps"],
    ] {
        let text = meshd.ctl_text(cmd)?;
        ensure!(
            !text.contains("{\"") && !text.contains("[{") && !text.contains("\":"),
            "meshctl {cmd:?} prints JSON:\n{text}"
        );
        ensure!(
            text.contains("web") || cmd == ["status"] || cmd == ["maps"],
            "meshctl {cmd:?} does not name web:\n{text}"
        );
    }
    let maps = meshd.ctl_text(&["maps"])?;
    ensure!(
        maps.lines().any(|l| l.contains(&vip)),
        "meshctl maps has no row for {vip}:\n{maps}"
    );

    // 9. Removing the service clears its entries from the kernel maps.
    let vips_before = pinned_map_len(&pins.0, "MESHD_VIPS")?;
    let web_backends = meshd.ctl(&["service", "web"])?["vips"][0]["backends"]
        .as_array()
        .map_or(0, Vec::len);
    node.docker(&["service", "rm", "web"])?;
    wait_for("web to leave meshctl", Duration::from_secs(5), || {
        let list = meshd.ctl(&["services"]).ok()?;
        (!list.as_array()?.iter().any(|s| s["name"] == "web")).then_some(())
    })?;
    wait_for(
        "web's map entries to be deleted",
        Duration::from_secs(5),
        || {
            let lbs = pinned_map_len(&pins.0, "MESHD_LBS").ok()?;
            (lbs == lbs_before - 1).then_some(())
        },
    )?;
    // One VIP entry per load balancer (the sandboxes are scoped by network).
    let vips_after = pinned_map_len(&pins.0, "MESHD_VIPS")?;
    ensure!(
        vips_after + 1 == vips_before,
        "VIP entries {vips_before} → {vips_after}"
    );
    ensure!(
        pinned_map_len(&pins.0, "MESHD_BACKENDS")? + web_backends <= slots_before,
        "web's backend slots still pinned"
    );
    let dump: Value = meshd.ctl(&["maps"])?;
    ensure!(
        !dump["vips"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["vip"] == vip.as_str()),
        "kernel VIP map still holds {vip}"
    );
    Ok(())
}
