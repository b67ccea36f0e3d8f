//! The ingress routing mesh on a real 3-node swarm, from a machine on the nodes' LAN (a
//! namespace on the underlay bridge): every node answers a published port, TCP and UDP,
//! whether it runs a task or not; connections spread over the tasks; the task sees the entry
//! node (default) or the client itself (`meshd.ingress.client-address=preserve`);
//! `--publish-add`/`--publish-rm` and removal take effect at once; established connections
//! keep their task while others come and go (3 → 6 → 2) and across `kill -9` of meshd on
//! their entry node; a host-mode port stays Docker's.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use meshd_tests::{bin, require_root, run, run_tag, wait_for, Lab, LabSpec, IMAGE};

fn lab(suffix: &str) -> Lab {
    Lab::up(LabSpec::new(&format!("{}{suffix}", run_tag()), 3, 1)).expect("lab up")
}

/// `labtool ARGS` on the LAN machine.
fn from_lan(lan: &str, args: &[&str]) -> Result<String> {
    run(Command::new("ip")
        .args(["netns", "exec", lan])
        .arg(bin("labtool"))
        .args(args))
}

/// `n` TCP connections to `addr` from the LAN: what each task said, by task, and the peers
/// the tasks saw.
fn spread(lan: &str, addr: &str, n: usize) -> Result<(BTreeMap<String, usize>, Vec<String>)> {
    let mut by_task = BTreeMap::new();
    let mut peers = Vec::new();
    for _ in 0..n {
        let out = from_lan(lan, &["tcp-read", addr])?;
        let mut words = out.split_whitespace();
        let (task, peer) = (words.next(), words.next());
        let (Some(task), Some(peer)) = (task, peer) else {
            anyhow::bail!("{addr} answered {out:?}");
        };
        *by_task.entry(task.to_string()).or_default() += 1;
        peers.push(peer.to_string());
    }
    Ok((by_task, peers))
}

fn peer_ip(peer: &str) -> &str {
    peer.rsplit_once(':').map_or(peer, |(ip, _)| ip)
}

/// A TCP connection from the LAN machine: the socket is made inside its namespace.
fn connect_from(lan: &str, to: SocketAddr) -> Result<TcpStream> {
    let path = format!("/var/run/netns/{lan}");
    std::thread::spawn(move || -> Result<TcpStream> {
        let f = std::fs::File::open(&path)?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(s)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
}

/// Which task holds the connection (labtool's tcp-echo answers a block of `?` with its
/// container's hostname: the container id's first 12 characters).
fn ask(s: &mut TcpStream) -> Result<String> {
    s.write_all(&[b'?'; 64]).context("ask through the mesh")?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).context("answer through the mesh")?;
    let name = String::from_utf8_lossy(&back).trim().to_string();
    ensure!(!name.is_empty() && !name.contains('?'), "answered {name:?}");
    Ok(name)
}

/// An established connection through the mesh and the task it was given.
struct Held {
    conn: TcpStream,
    via: &'static str,
    task: String,
}

impl Held {
    /// Still open, still echoing, still on its task.
    fn same_task(&mut self) -> Result<()> {
        echo(&mut self.conn, 5).with_context(|| format!("the connection via {}", self.via))?;
        let now = ask(&mut self.conn)?;
        ensure!(
            now == self.task,
            "the connection via {} moved from task {} to {now}",
            self.via,
            self.task
        );
        Ok(())
    }
}

fn echo(s: &mut TcpStream, byte: u8) -> Result<()> {
    let block = [byte; 64];
    s.write_all(&block).context("send through the mesh")?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back).context("echo through the mesh")?;
    ensure!(back == block, "echo came back changed");
    Ok(())
}

/// A service of the lab image with `replicas` tasks on the workers only (node1 has none).
fn on_workers(
    m: &meshd_tests::Node,
    name: &str,
    replicas: usize,
    publish: &[&str],
    cmd: &[&str],
) -> Result<()> {
    let mut flags = vec!["--constraint", "node.role==worker"];
    flags.extend(publish);
    m.create_service_with(name, "", replicas, "1s", &flags, cmd)
}

fn ingress_ports(lab: &Lab, node: &str) -> Option<u64> {
    lab.meshd(node)
        .ok()?
        .status()
        .ok()?
        .pointer("/datapath/ingress/ports")?
        .as_u64()
}

#[test]
fn published_ports_answer_on_every_node() {
    if !require_root("published_ports_answer_on_every_node") {
        return;
    }
    let mut lab = lab("i");
    if let Err(e) = scenario(&mut lab) {
        eprintln!("FAILED: {e:#}");
        for (i, m) in lab.meshds.iter().enumerate() {
            eprintln!("--- meshd on node{} ---\n{}", i + 1, m.log_tail());
        }
        panic!("{e:#}");
    }
}

fn scenario(lab: &mut Lab) -> Result<()> {
    let m = lab.manager();
    let lan = lab.lan_client()?;
    // Three tasks on the two workers: node1 has none and must forward.
    on_workers(
        m,
        "web",
        3,
        &["-p", "8080:7000", "-p", "8080:7000/udp"],
        // 7001 for --publish-add/rm (Docker's --publish-rm matches by target port).
        &[
            "sh",
            "-c",
            "labtool serve-peer 7001 & exec labtool serve-peer 7000",
        ],
    )?;
    m.wait_running("web", 3)?;
    for n in ["node1", "node2", "node3"] {
        wait_for(
            &format!("{n}'s meshd to program 8080/tcp and 8080/udp"),
            Duration::from_secs(10),
            || (ingress_ports(lab, n) == Some(2)).then_some(()),
        )?;
    }
    let nodes = [
        ("node1", "192.168.100.1"),
        ("node2", "192.168.100.2"),
        ("node3", "192.168.100.3"),
    ];
    // 1. Every node answers, every task gets a fair share, and (default) the task sees the
    //    entry node's address.
    for (name, ip) in nodes {
        let (by_task, peers) = spread(&lan, &format!("{ip}:8080"), 300)?;
        ensure!(
            by_task.len() == 3,
            "via {name}: tasks answering {by_task:?}"
        );
        for (task, n) in &by_task {
            ensure!(
                *n >= 60,
                "via {name}: task {task} got {n} of 300 ({by_task:?})"
            );
        }
        ensure!(
            peers.iter().all(|p| peer_ip(p) == ip),
            "via {name}: tasks should see the entry node {ip}, saw {:?}",
            &peers[..3]
        );
        println!("via {name}: {by_task:?}");
        for _ in 0..10 {
            let out = from_lan(&lan, &["udp-ask", &format!("{ip}:8080")])?;
            // "<task> <peer> from <source>": the answer comes from the address asked.
            ensure!(
                out.trim_end().ends_with(&format!("from {ip}:8080")),
                "UDP via {name}: {out:?}"
            );
            ensure!(
                out.split_whitespace().nth(1).map(peer_ip) == Some(ip),
                "UDP via {name}: task saw {out:?}"
            );
        }
    }

    // meshctl ingress: both ports, every task reached through the tunnel from node1 (it has
    // none), and the new flows counted per port.
    let v = lab.meshd("node1")?.ctl(&["ingress"])?;
    let ports = v["ports"].as_array().cloned().unwrap_or_default();
    ensure!(ports.len() == 2, "meshctl ingress on node1: {v}");
    for p in &ports {
        let backends = p["backends"].as_array().cloned().unwrap_or_default();
        ensure!(
            backends.len() == 3
                && backends.iter().all(|b| b["via"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("tunnel to"))),
            "node1's backends for {}: {backends:?}",
            p["port"]
        );
    }
    let tcp_flows = ports
        .iter()
        .find(|p| p["protocol"] == "tcp")
        .and_then(|p| p["new_flows"].as_u64())
        .unwrap_or(0);
    ensure!(
        tcp_flows >= 300,
        "node1 counted {tcp_flows} new TCP flows for 300 connections"
    );

    // 1b. From node1 itself (localhost and its own address) and from a container on node1
    //     (to node1's address and to the other nodes'): the same port answers.
    let labtool = bin("labtool").display().to_string();
    for target in ["127.0.0.1:8080", "192.168.100.1:8080", "192.168.100.2:8080"] {
        for _ in 0..5 {
            let out = run(&mut lab.exec_command(
                "node1",
                &[labtool.clone(), "tcp-read".into(), target.into()],
            )?)
            .with_context(|| format!("from node1 itself to {target}"))?;
            ensure!(
                out.split_whitespace().count() == 2,
                "{target} answered {out:?}"
            );
        }
    }
    m.create_overlay("probe")?;
    let out = m.docker(&[
        "run",
        "--rm",
        "--network",
        "probe",
        IMAGE,
        "sh",
        "-c",
        "for n in 1 2 3; do for i in 1 2 3 4 5; do \
         labtool tcp-read 192.168.100.$n:8080 || exit 1; done; done",
    ])?;
    ensure!(
        out.lines().count() == 15
            && out
                .lines()
                .all(|l| l.split_whitespace().nth(1).map(peer_ip) == Some("192.168.100.1")),
        "from a container on node1 to every node's 8080 (served from node1's address): {out:?}"
    );

    // 2. The opt-in: tasks see the client's own address and port, TCP and UDP, also through
    //    a node without a task (node1). A service label; no task restarts.
    m.docker(&[
        "service",
        "update",
        "-d",
        "--label-add",
        "meshd.ingress.client-address=preserve",
        "web",
    ])?;
    wait_for(
        "node1 to show tasks the client's own address",
        Duration::from_secs(5),
        || {
            let out = from_lan(&lan, &["tcp-read", "192.168.100.1:8080"]).ok()?;
            (out.split_whitespace().nth(1).map(peer_ip) == Some("192.168.100.200")).then_some(())
        },
    )?;
    for (name, ip) in nodes {
        let (_, peers) = spread(&lan, &format!("{ip}:8080"), 20)?;
        ensure!(
            peers.iter().all(|p| peer_ip(p) == "192.168.100.200"),
            "via {name}: {peers:?}"
        );
        let out = from_lan(&lan, &["udp-ask", &format!("{ip}:8080")])?;
        ensure!(
            out.split_whitespace().nth(1).map(peer_ip) == Some("192.168.100.200"),
            "UDP via {name}: {out:?}"
        );
    }

    // 3. A host-mode port is Docker's: meshd programs nothing for it. (On an overlay: a
    //    task on none has no docker_gwbridge leg for Docker to map the port to.)
    m.create_overlay("hp")?;
    m.create_service_with(
        "hostport",
        "hp",
        1,
        "1s",
        &[
            "--constraint",
            "node.hostname==node2",
            "--publish",
            "mode=host,published=8090,target=7000",
        ],
        &["labtool", "serve-peer", "7000"],
    )?;
    m.wait_running("hostport", 1)?;
    wait_for(
        "the host-mode port to answer on node2",
        Duration::from_secs(10),
        || from_lan(&lan, &["tcp-read", "192.168.100.2:8090"]).ok(),
    )?;
    ensure!(
        ingress_ports(lab, "node2") == Some(2),
        "meshd must leave a host-mode port alone"
    );

    // 4. Established connections keep their task while other tasks come and go (3 → 6 → 2),
    //    through a node without a task (the tunnel) and through one with tasks, and while
    //    node1's meshd is killed with -9 and restarted.
    on_workers(
        m,
        "echo",
        3,
        &["-p", "7001:7001"],
        &["labtool", "tcp-echo", "7001"],
    )?;
    m.wait_running("echo", 3)?;
    // Node1 (no task) and node2 (tasks) reach `n` tasks of echo.
    let programmed = |n: usize| -> Result<()> {
        for node in ["node1", "node2"] {
            wait_for(
                &format!("{node} to program echo's {n} tasks"),
                Duration::from_secs(10),
                || {
                    let v = lab.meshd(node).ok()?.ctl(&["ingress"]).ok()?;
                    let port = v["ports"].as_array()?.iter().find(|p| p["port"] == 7001)?;
                    (port["backends"].as_array()?.len() == n).then_some(())
                },
            )?;
        }
        Ok(())
    };
    programmed(3)?;
    let entries = ["192.168.100.1:7001", "192.168.100.2:7001"];
    let open = |n: usize| -> Result<Vec<Held>> {
        (0..n)
            .map(|i| {
                let via = entries[i % entries.len()];
                let mut conn = connect_from(&lan, via.parse().unwrap())?;
                let task = ask(&mut conn).with_context(|| format!("a new connection via {via}"))?;
                Ok(Held { conn, via, task })
            })
            .collect()
    };
    let mut held = open(12)?;
    m.docker(&["service", "scale", "-d", "echo=6"])?;
    m.wait_running("echo", 6)?;
    programmed(6)?;
    for h in &mut held {
        h.same_task().context("after echo scaled 3 → 6")?;
    }
    // Connections made at 6 tasks: some land on the tasks that stay at 2.
    held.extend(open(36)?);
    m.docker(&["service", "scale", "-d", "echo=2"])?;
    let survivors = wait_for("echo at 2 tasks", Duration::from_secs(30), || {
        let tasks = m.running_tasks("echo").ok()?;
        (tasks.len() == 2).then(|| tasks.into_iter().map(|(_, c)| c).collect::<Vec<_>>())
    })?;
    programmed(2)?;
    let on_survivor = |h: &Held| survivors.iter().any(|c| c.starts_with(&h.task));
    let (mut kept, gone): (Vec<Held>, Vec<Held>) = held.into_iter().partition(on_survivor);
    ensure!(
        !kept.is_empty(),
        "no connection landed on a task that stayed"
    );
    // A container that is gone closed its connections: they end, and never reach
    // another task mid-stream. (Its last moments may still be in progress.)
    for mut h in gone {
        wait_for(
            &format!(
                "the connection via {} to removed task {} to end",
                h.via, h.task
            ),
            Duration::from_secs(20),
            || match ask(&mut h.conn) {
                Err(_) => Some(Ok(())),
                Ok(now) if now != h.task => Some(Err(anyhow::anyhow!(
                    "the connection via {} moved from removed task {} to {now}",
                    h.via,
                    h.task
                ))),
                Ok(_) => None,
            },
        )??;
    }
    for h in &mut kept {
        h.same_task().context("after echo scaled 6 → 2")?;
    }
    eprintln!(
        "3 → 6 → 2: {} connections on the 2 tasks that stayed kept them",
        kept.len()
    );
    lab.meshds[0].kill9();
    for h in &mut kept {
        h.same_task().context("while meshd on node1 is down")?;
    }
    let fresh = from_lan(&lan, &["tcp-read", "192.168.100.1:8080"])?;
    ensure!(!fresh.is_empty(), "new connections while meshd is down");
    lab.meshds[0].restart()?;
    wait_for("meshd on node1 back", Duration::from_secs(20), || {
        ingress_ports(lab, "node1")
    })?;
    for h in &mut kept {
        h.same_task().context("after meshd on node1 restarted")?;
    }
    drop(kept);
    let m = lab.manager();

    // 5. --publish-add and --publish-rm take effect as soon as swarm has them (Docker also
    //    rolls the tasks for it; the tasks still running serve the new port meanwhile).
    let has_9090 = || -> bool {
        m.docker(&[
            "service",
            "inspect",
            "web",
            "--format",
            "{{json .Endpoint.Ports}}",
        ])
        .is_ok_and(|p| p.contains("\"PublishedPort\":9090"))
    };
    m.docker(&[
        "service",
        "update",
        "-d",
        "--publish-add",
        "published=9090,target=7001",
        "web",
    ])?;
    wait_for("swarm to publish 9090", Duration::from_secs(20), || {
        has_9090().then_some(())
    })?;
    let since = Instant::now();
    wait_for("9090 to answer on node1", Duration::from_secs(5), || {
        from_lan(&lan, &["tcp-read", "192.168.100.1:9090"]).ok()
    })?;
    let added = since.elapsed();
    // Let the rolling update finish: swarm takes one update at a time.
    let updated = || {
        wait_for("web's update to complete", Duration::from_secs(60), || {
            let st = m
                .docker(&[
                    "service",
                    "inspect",
                    "web",
                    "--format",
                    "{{.UpdateStatus.State}}",
                ])
                .ok()?;
            (st.trim() == "completed").then_some(())
        })
    };
    updated()?;
    m.docker(&[
        "service",
        "update",
        "-d",
        "--publish-rm",
        "published=9090,target=7001",
        "web",
    ])?;
    wait_for("swarm to unpublish 9090", Duration::from_secs(20), || {
        (!has_9090()).then_some(())
    })?;
    let since = Instant::now();
    wait_for(
        "9090 to refuse on every node",
        Duration::from_secs(5),
        || {
            nodes
                .iter()
                .all(|(_, ip)| from_lan(&lan, &["tcp-read", &format!("{ip}:9090")]).is_err())
                .then_some(())
        },
    )?;
    let removed = since.elapsed();
    println!(
        "after swarm's Endpoint changed (upper bounds, one probe at a time): --publish-add \
         answering in {:.0} ms, --publish-rm refused on every node in {:.0} ms",
        added.as_secs_f64() * 1000.0,
        removed.as_secs_f64() * 1000.0
    );
    ensure!(
        added <= Duration::from_secs(1) && removed <= Duration::from_secs(1),
        "publish changes took {added:?} / {removed:?} (target: 1 s)"
    );

    // 6. Down to one task: the nodes that lost theirs forward to it.
    updated()?;
    m.docker(&["service", "scale", "-d", "web=1"])?;
    wait_for("web down to 1 task", Duration::from_secs(30), || {
        (m.running_tasks("web").ok()?.len() == 1).then_some(())
    })?;
    let mut last = Vec::new();
    let one = wait_for(
        "every node to send 8080 to the one task",
        Duration::from_secs(10),
        || {
            last = nodes
                .iter()
                .map(|(_, ip)| {
                    from_lan(&lan, &["tcp-read", &format!("{ip}:8080")])
                        .map(|o| o.split_whitespace().next().unwrap_or_default().to_string())
                        .unwrap_or_else(|e| format!("FAILED: {e:#}"))
                })
                .collect();
            last.iter()
                .all(|a| *a == last[0] && !a.starts_with("FAILED"))
                .then_some(())
        },
    );
    one.with_context(|| format!("answers from node1..3: {last:?}"))?;

    // 7. Removing the service: its ports refuse, and no map entry is left on any node.
    m.docker(&["service", "rm", "web", "echo"])?;
    for (name, ip) in nodes {
        wait_for(
            &format!("{name}'s meshd to drop the ports"),
            Duration::from_secs(10),
            || (ingress_ports(lab, name) == Some(0)).then_some(()),
        )?;
        ensure!(
            from_lan(&lan, &["tcp-read", &format!("{ip}:8080")]).is_err(),
            "{name} still answers 8080 after the service is gone"
        );
    }
    Ok(())
}
