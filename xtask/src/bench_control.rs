//! `bench control`: the control plane at sizes this machine cannot run as containers. A real
//! meshd (release build) reads a synthetic Docker API (`meshd_tests::fake_docker`: real
//! HTTP, recorded JSON shapes, a real event stream) and programs the real kernel maps;
//! simulated worker nodes are meshd's own feed client, in this process. Every figure is
//! measured in this run; the old design's cost is measured by pollers that issue exactly
//! the requests it issued (a full read every second, every 25 ms for 3 s after an event).
use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshd::{
    feed::{
        certs::{fake::FakeSwarm, SwarmCerts, MANAGER_OU, WORKER_OU},
        client::{upload_to_all, ClientStatus, Subscriber},
    },
    model::NodeReport,
    source::docker_api::{DockerApi, TlsFiles},
};
use meshd_tests::{
    bin,
    fake_docker::{FakeDocker, Spec},
    proc::{Daemon, Placement},
    require_root, run, wait_for,
};
use serde_json::Value;

use crate::bench::percentile;

const ROOT: &str = "/tmp/meshd-bench-control";
const NETWORKS: usize = 100;
/// Networks per local container: together they are on every network, so every service's
/// load balancer is programmed (a node only programs networks it has a container on).
const NETS_PER_LOCAL: usize = 15;
const LOCAL: usize = NETWORKS.div_ceil(NETS_PER_LOCAL);

/// What the benchmark made on the machine, removed when dropped.
struct Scratch {
    dir: PathBuf,
    netns: Vec<String>,
    cgroup: PathBuf,
    pins: PathBuf,
}

impl Scratch {
    fn new(tag: &str) -> Result<Scratch> {
        let dir = Path::new(ROOT).join(tag);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let cgroup = Path::new("/sys/fs/cgroup/unified").join(format!("meshbench-{tag}"));
        fs::create_dir_all(&cgroup).with_context(|| format!("create {}", cgroup.display()))?;
        let mut s = Scratch {
            pins: PathBuf::from(format!("/sys/fs/bpf/meshbench-{tag}")),
            dir,
            netns: Vec::new(),
            cgroup,
        };
        for i in 0..LOCAL {
            let name = format!("meshbench-{tag}-c{i}");
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
            run(Command::new("ip").args(["netns", "add", &name]))?;
            run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
            s.netns.push(name);
        }
        Ok(s)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new(bin("meshd"))
            .arg("reset")
            .arg("--pin-dir")
            .arg(&self.pins)
            .output();
        for n in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
        let _ = fs::remove_dir(&self.cgroup);
        // The log stays, for a look after the run.
        if let Some(tag) = self.dir.file_name() {
            let _ = fs::copy(
                self.dir.join("meshd.log"),
                Path::new(ROOT).join(tag).with_extension("log"),
            );
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A meshd (release) reading the fake as its own engine: a manager, serving the feed.
struct Meshd {
    daemon: Daemon,
    socket: PathBuf,
    /// When it was spawned, on the clock meshd stamps `ready_unix_ms` with.
    started_unix_ms: f64,
}

impl Meshd {
    fn start(s: &Scratch, fake: &FakeDocker, certs: &Path, feed: SocketAddr) -> Result<Meshd> {
        let socket = s.dir.join("meshd.sock");
        let log = fs::File::create(s.dir.join("meshd.log"))?;
        // MESHD_BENCH_WRAPPER="valgrind --tool=massif ...": run meshd under a profiler.
        let wrapper: Vec<String> = std::env::var("MESHD_BENCH_WRAPPER")
            .map(|w| w.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(bin("meshd"));
                c
            }
            None => Command::new(bin("meshd")),
        };
        cmd.arg("--docker-host")
            .arg(fake.host())
            .arg("--swarm-certs")
            .arg(certs)
            .arg("--feed-listen")
            .arg(feed.to_string())
            .arg("--docker-netns-dir")
            .arg("/var/run/netns")
            .arg("--cgroup")
            .arg(&s.cgroup)
            .arg("--pin-dir")
            .arg(&s.pins)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--dns-upstream")
            .arg("127.0.0.1:1")
            .env(
                "MESHD_LOG",
                std::env::var("MESHD_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log);
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs_f64()
            * 1000.0;
        let daemon = Daemon::spawn(
            &mut cmd,
            &Placement::default(),
            &format!("{}/", s.dir.display()),
            None,
        )?;
        Ok(Meshd {
            daemon,
            socket,
            started_unix_ms,
        })
    }

    fn status(&self) -> Result<Value> {
        let out = run(Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(["--json", "status"]))?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Resident (all, of it file-backed: the binary's and libraries' pages) and peak.
    fn rss_mb(&self) -> (f64, f64, f64) {
        let st =
            fs::read_to_string(format!("/proc/{}/status", self.daemon.pid())).unwrap_or_default();
        let kb = |k: &str| {
            st.lines()
                .find(|l| l.starts_with(k))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        (
            kb("VmRSS:") / 1024.0,
            kb("RssFile:") / 1024.0,
            kb("VmHWM:") / 1024.0,
        )
    }

    /// CPU time meshd has used (user + system): unlike wall time, not stretched when the
    /// machine's cores are busy with something else.
    fn cpu_ms(&self) -> f64 {
        let st =
            fs::read_to_string(format!("/proc/{}/stat", self.daemon.pid())).unwrap_or_default();
        // The fields after the command name (which may hold spaces), from field 3 on.
        let rest = st.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        // utime and stime are fields 14 and 15: 11 and 12 of `rest` after the state letter.
        let ticks = f.get(10).copied().unwrap_or(f64::NAN) + f.get(11).copied().unwrap_or(f64::NAN);
        // SAFETY: sysconf has no preconditions.
        ticks * 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        self.daemon.stop(Duration::from_secs(10));
    }
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn spec(services: usize, tasks: usize, s: &Scratch) -> Spec {
    Spec {
        services,
        tasks_per_service: tasks,
        networks: NETWORKS,
        nodes: 10,
        local: s
            .netns
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let nets = (i * NETS_PER_LOCAL..((i + 1) * NETS_PER_LOCAL).min(NETWORKS)).collect();
                (
                    format!("local{i}"),
                    Path::new("/var/run/netns").join(n),
                    nets,
                )
            })
            .collect(),
    }
}

pub fn control(sizes: &[usize], changes: usize, rounds: usize, fanout: &[usize]) -> Result<()> {
    ensure!(require_root("bench control"), "bench control needs root");
    ensure!(rounds > 0, "--rounds must be at least 1");
    fs::create_dir_all(ROOT)?;
    let swarm = FakeSwarm::new("benchcluster");
    let mut cold_rows = Vec::new();
    for &n in sizes {
        let runs = (0..rounds)
            .map(|round| cold_and_latency(&swarm, n, if round == 0 { changes } else { 0 }, round))
            .collect::<Result<Vec<_>>>()?;
        cold_rows.push(runs);
    }
    println!("\nCold start: a manager's meshd reads the swarm and programs the kernel maps ({NETWORKS} networks, 10 tasks per service, {LOCAL} local containers on all of them)");
    println!("{rounds} cold starts per size: median [lowest–highest]");
    println!(
        "{:>9} {:>8} {:>17} {:>8} {:>8} {:>9} {:>9} {:>11} {:>9} {:>12} {:>17} {:>8} {:>8} {:>14} {:>14}",
        "services",
        "backends",
        "ready (ms)",
        "CPU ms",
        "open ms",
        "read ms",
        "early ms",
        "compile ms",
        "apply ms",
        "map entries",
        "RSS MB",
        "of file",
        "peak MB",
        "event→map p50",
        "event→map p99"
    );
    for runs in &cold_rows {
        let med = |f: fn(&ColdRow) -> f64| percentile(runs.iter().map(f).collect(), 0.5);
        let range = |f: fn(&ColdRow) -> f64, digits: usize| {
            let v: Vec<f64> = runs.iter().map(f).collect();
            let (lo, hi) = (percentile(v.clone(), 0.0), percentile(v, 1.0));
            format!("{:.digits$} [{lo:.digits$}–{hi:.digits$}]", med(f))
        };
        // The latency changes run in the first round.
        let first = &runs[0];
        println!(
            "{:>9} {:>8} {:>17} {:>8.0} {:>8.0} {:>9.0} {:>9.0} {:>11.0} {:>9.0} {:>12} {:>17} {:>8.1} {:>8.1} {:>11.2} ms {:>11.2} ms",
            first.services,
            first.backends,
            range(|r| r.ready_ms, 0),
            med(|r| r.cpu_ms),
            med(|r| r.open_ms),
            med(|r| r.read_ms),
            med(|r| r.early_ms),
            med(|r| r.compile_ms),
            med(|r| r.apply_ms),
            first.entries,
            range(|r| r.rss_mb, 1),
            med(|r| r.file_mb),
            med(|r| r.peak_mb),
            first.p50,
            first.p99
        );
    }
    println!("  ready: meshd start → every source read and the first full apply done, by meshd's own stamp (includes reading the API);");
    println!("  CPU: meshd's user + system time when ready (steady when the machine is busy; 2 cores here);");
    println!("  open: loading, verifying and attaching the eBPF programs and creating the maps (before any Docker read);");
    println!("  read: the swarm source's first full read (the synthetic API makes its JSON on the same cores);");
    println!("  early: load balancers compiled and written to the maps as each service's tasks come in (overlapping the read);");
    println!("  compile: the rest (DNS, sandboxes) once all is read;");
    println!("  apply: the first full apply (the sweep, and what was not written early); event→map: one task change");
    println!("  (a service event, then meshd re-reads that service's tasks) → maps written, with every service present.");
    println!("  RSS at ready; of file: the binary's and libraries' pages in it; peak: the highest RSS before ready.");
    println!("  targets: 10k × 10 programmed ≤ 1 s, RSS ≤ 64 MB, event→map p99 ≤ 50 ms");

    let fanout: Vec<usize> = fanout.iter().copied().filter(|&n| n > 0).collect();
    if !fanout.is_empty() {
        fan_out(&swarm, &fanout)?;
    }
    Ok(())
}

struct ColdRow {
    services: usize,
    backends: usize,
    ready_ms: f64,
    open_ms: f64,
    read_ms: f64,
    compile_ms: f64,
    early_ms: f64,
    apply_ms: f64,
    entries: u64,
    rss_mb: f64,
    file_mb: f64,
    peak_mb: f64,
    cpu_ms: f64,
    p50: f64,
    p99: f64,
}

fn cold_and_latency(
    swarm: &FakeSwarm,
    services: usize,
    changes: usize,
    round: usize,
) -> Result<ColdRow> {
    let s = Scratch::new(&format!("cold{services}"))?;
    let certs = s.dir.join("certs");
    let fake = FakeDocker::start(&s.dir.join("docker.sock"), &spec(services, 10, &s))?;
    let node0 = fake.world.lock().unwrap().node_id(0);
    swarm.node(&certs, &node0, MANAGER_OU);
    eprintln!(
        "bench control: {services} services × 10 tasks: cold start {}",
        round + 1
    );
    let m = Meshd::start(&s, &fake, &certs, free_port()?)?;
    let st = wait_for(
        "meshd to program everything",
        Duration::from_secs(180),
        || {
            let st = m.status().ok()?;
            (st["reconcile"]["ready_unix_ms"].as_u64().unwrap_or(0) > 0).then_some(st)
        },
    )
    .with_context(|| fs::read_to_string(s.dir.join("meshd.log")).unwrap_or_default())?;
    let ready_ms = st["reconcile"]["ready_unix_ms"]
        .as_f64()
        .unwrap_or(f64::NAN)
        - m.started_unix_ms;
    let (rss_mb, file_mb, peak_mb) = m.rss_mb();
    let cpu_ms = m.cpu_ms();
    let backends = st["counts"]["backends"].as_u64().unwrap_or(0) as usize;
    ensure!(
        backends == services * 10,
        "programmed {backends} backends, want {}",
        services * 10
    );
    let entries = st["datapath"]["map_entries"].as_u64().unwrap_or(0);
    let open_ms = st["datapath"]["adopted_at_start"]["open_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let read_ms = st["swarm"]["last_full_read_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let compile_ms = st["reconcile"]["first_compile_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);
    let early_ms = ["early_compile_ms", "early_apply_ms"]
        .iter()
        .map(|k| st["reconcile"][k].as_f64().unwrap_or(f64::NAN))
        .sum();
    let apply_ms = st["reconcile"]["first_apply_ms"]
        .as_f64()
        .unwrap_or(f64::NAN);

    // Event → map, one task change at a time, everything else present.
    eprintln!("bench control: {services} services: {changes} task changes");
    let ids = fake.world.lock().unwrap().service_ids();
    let before = st["event_to_map"]["samples"].as_u64().unwrap_or(0);
    for i in 0..changes {
        let sid = &ids[(i * 7919) % ids.len()];
        fake.world
            .lock()
            .unwrap()
            .replace_task(sid, i, fake.nodes());
        fake.event("service", "update", sid);
        wait_for("meshd to apply the change", Duration::from_secs(10), || {
            let st = m.status().ok()?;
            (st["event_to_map"]["samples"].as_u64().unwrap_or(0) > before + i as u64).then_some(())
        })
        .with_context(|| format!("change {i} (service {sid})"))?;
    }
    let st = m.status()?;
    let recent: Vec<f64> = serde_json::from_value(st["event_to_map"]["recent_ms"].clone())?;
    let samples: Vec<f64> = recent[recent.len().saturating_sub(changes)..].to_vec();
    Ok(ColdRow {
        services,
        backends,
        ready_ms,
        open_ms,
        read_ms,
        compile_ms,
        early_ms,
        apply_ms,
        entries,
        rss_mb,
        file_mb,
        peak_mb,
        cpu_ms,
        p50: percentile(samples.clone(), 0.5),
        p99: percentile(samples, 0.99),
    })
}

/// Requests and bytes served by the fake, and bytes the manager's meshd fed, over a window.
#[derive(Clone, Copy, Default)]
struct Load {
    requests: u64,
    bytes: u64,
    feed_bytes: u64,
    secs: f64,
}

impl Load {
    fn per_s(&self) -> (f64, f64, f64) {
        (
            self.requests as f64 / self.secs,
            self.bytes as f64 / self.secs / 1024.0,
            self.feed_bytes as f64 / self.secs / 1024.0,
        )
    }
}

fn measure(
    fake: &FakeDocker,
    feed: &dyn Fn() -> u64,
    f: impl FnOnce() -> Result<()>,
) -> Result<Load> {
    let (r0, b0) = fake.counters.snapshot();
    let f0 = feed();
    let t = Instant::now();
    f()?;
    let (r1, b1) = fake.counters.snapshot();
    Ok(Load {
        requests: r1 - r0,
        bytes: b1 - b0,
        feed_bytes: feed() - f0,
        secs: t.elapsed().as_secs_f64(),
    })
}

/// A rolling update of the 100-task service, one task every 30 ms, as swarm does it: an
/// event at the start and at the end, none per task.
fn roll(fake: &FakeDocker, sid: &str) -> Result<()> {
    fake.world.lock().unwrap().set_updating(sid, true);
    fake.event("service", "update", sid);
    for i in 0..100 {
        fake.world
            .lock()
            .unwrap()
            .replace_task(sid, i, fake.nodes());
        std::thread::sleep(Duration::from_millis(30));
    }
    fake.world.lock().unwrap().set_updating(sid, false);
    fake.event("service", "update", sid);
    std::thread::sleep(Duration::from_secs(2));
    Ok(())
}

/// The old design's read: four full lists.
async fn old_full_read(api: &DockerApi) {
    for p in [
        "/services",
        "/tasks?filters=%7B%22desired-state%22%3A%5B%22running%22%5D%7D",
        "/networks",
        "/nodes",
    ] {
        let _ = api.get_bytes(p).await;
    }
}

/// One node of the old design: a full read every second, and every 25 ms for 3 s after an
/// event (it opened a fresh connection per read: here they are kept alive, a kindness).
async fn old_node(api: DockerApi) {
    let mut events = loop {
        match api
            .events("filters=%7B%22type%22%3A%5B%22service%22%2C%22network%22%2C%22node%22%5D%7D")
            .await
        {
            Ok(e) => break e,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut fast_until = Instant::now();
    let mut next = Instant::now();
    loop {
        let wait = if Instant::now() < fast_until {
            Duration::from_millis(25)
        } else {
            Duration::from_secs(1)
        };
        tokio::select! {
            e = events.next() => {
                if let Ok(Some(_)) = e {
                    fast_until = Instant::now() + Duration::from_secs(3);
                }
                continue;
            }
            _ = tokio::time::sleep_until((next).into()) => {}
        }
        old_full_read(&api).await;
        next = Instant::now() + wait;
    }
}

fn fan_out(swarm: &FakeSwarm, nodes: &[usize]) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rows: Vec<(String, usize, Load, Load)> = Vec::new();
    for &n in nodes {
        for design in ["meshd feed (new)", "every node polls (old)"] {
            let s = Scratch::new(&format!("fan{n}{}", design.len()))?;
            let fake = FakeDocker::start(&s.dir.join("docker.sock"), &spec(200, 5, &s))?;
            let roll_sid = {
                let mut w = fake.world.lock().unwrap();
                w.add_service_with_tasks("roll", 0, 100, fake.nodes())
            };
            eprintln!("bench control: {design}, {n} worker nodes");
            let (steady, rolling) = if design.ends_with("(new)") {
                let certs = s.dir.join("certs");
                let node0 = fake.world.lock().unwrap().node_id(0);
                swarm.node(&certs, &node0, MANAGER_OU);
                let feed_addr = free_port()?;
                let m = Meshd::start(&s, &fake, &certs, feed_addr)?;
                wait_for("the manager's meshd", Duration::from_secs(60), || {
                    let st = m.status().ok()?;
                    (st["reconcile"]["ready_unix_ms"].as_u64().unwrap_or(0) > 0).then_some(())
                })?;
                let statuses: Vec<Arc<Mutex<ClientStatus>>> =
                    (0..n).map(|_| Arc::default()).collect();
                let changes = Arc::new(AtomicU64::new(0));
                let _guard = rt.enter();
                let mut tasks = Vec::new();
                for (i, st) in statuses.iter().enumerate() {
                    let dir = s.dir.join(format!("w{i}"));
                    swarm.node(&dir, &format!("worker{i:03}"), WORKER_OU);
                    let certs = Arc::new(SwarmCerts::load(&dir)?);
                    let (hubs_tx, hubs_rx) = tokio::sync::watch::channel(vec![feed_addr]);
                    let (tx, mut rx) =
                        tokio::sync::mpsc::unbounded_channel::<meshd::source::Update>();
                    let counted = changes.clone();
                    tasks.push(rt.spawn(async move {
                        let _keep = hubs_tx;
                        while let Some(u) = rx.recv().await {
                            counted.fetch_add(u.changes.len() as u64, Ordering::Relaxed);
                        }
                    }));
                    let sub = Subscriber {
                        certs: certs.clone(),
                        hubs: hubs_rx.clone(),
                        me: format!("worker{i:03}"),
                        updates: tx,
                        status: st.clone(),
                    };
                    tasks.push(rt.spawn(sub.run()));
                    let (_report_tx, report_rx) = tokio::sync::watch::channel(Some(NodeReport {
                        node_id: format!("worker{i:03}"),
                        ..Default::default()
                    }));
                    let (hints, _) = tokio::sync::broadcast::channel(16);
                    tasks.push(rt.spawn(async move {
                        let _keep = _report_tx;
                        upload_to_all(certs, hubs_rx, report_rx, hints, Arc::default()).await
                    }));
                }
                wait_for(
                    "every simulated node to get its snapshot",
                    Duration::from_secs(60),
                    || {
                        statuses
                            .iter()
                            .all(|s| s.lock().unwrap().snapshots > 0)
                            .then_some(())
                    },
                )?;
                let feed_bytes = || -> u64 {
                    m.status()
                        .ok()
                        .and_then(|st| {
                            st["feed"]["hub"]["peers"].as_object().map(|p| {
                                p.values()
                                    .map(|v| v["bytes_sent"].as_u64().unwrap_or(0))
                                    .sum()
                            })
                        })
                        .unwrap_or(0)
                };
                std::thread::sleep(Duration::from_secs(1));
                let steady = measure(&fake, &feed_bytes, || {
                    std::thread::sleep(Duration::from_secs(5));
                    Ok(())
                })?;
                let rolling = measure(&fake, &feed_bytes, || roll(&fake, &roll_sid))?;
                // Every node got the update.
                let want = changes.load(Ordering::Relaxed);
                ensure!(want > 0, "the simulated nodes received no change");
                for t in tasks {
                    t.abort();
                }
                drop(m);
                (steady, rolling)
            } else {
                let _guard = rt.enter();
                let mut tasks = Vec::new();
                for _ in 0..n {
                    let api = DockerApi::new(&fake.host(), &TlsFiles::default())?;
                    tasks.push(rt.spawn(old_node(api)));
                }
                std::thread::sleep(Duration::from_secs(2));
                let none = || 0u64;
                let steady = measure(&fake, &none, || {
                    std::thread::sleep(Duration::from_secs(5));
                    Ok(())
                })?;
                let rolling = measure(&fake, &none, || roll(&fake, &roll_sid))?;
                for t in tasks {
                    t.abort();
                }
                (steady, rolling)
            };
            rows.push((design.to_string(), n, steady, rolling));
        }
    }
    println!("\nManager-side load caused by meshd: 200 services × 5 tasks + one of 100 tasks; steady 5 s, then that service rolled (100 tasks, 30 ms apart)");
    println!(
        "{:<24} {:>6} {:>12} {:>14} {:>13} {:>12} {:>14} {:>13}",
        "design",
        "nodes",
        "steady req/s",
        "steady API KB/s",
        "steady feed KB/s",
        "roll req/s",
        "roll API KB/s",
        "roll feed KB/s"
    );
    for (d, n, s, r) in &rows {
        let (sr, sb, sf) = s.per_s();
        let (rr, rb, rf) = r.per_s();
        println!(
            "{d:<24} {n:>6} {sr:>12.1} {sb:>14.1} {sf:>13.1} {rr:>12.1} {rb:>14.1} {rf:>13.1}"
        );
    }
    println!("  API: the managers' Docker API (what dockerd must answer); feed: what the manager's meshd sends the nodes");
    println!("  (each change once to each node: the least that tells every node). target: API load flat in the number of nodes");
    Ok(())
}
