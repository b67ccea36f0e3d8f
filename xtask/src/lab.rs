//! `cargo xtask lab up | status | exec | meshctl | deploy | down`: a real multi-node swarm on this
//! machine with meshd on every node (see `meshd_tests::lab` for how it is built).
use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use meshd_tests::{
    bin,
    lab::{lab_dir, LAN_CLIENT},
    require_root, wait_for, workspace_root, Lab, LabSpec,
};
use serde_json::Value;

const DEFAULT_NAME: &str = "meshlab";
const DEMO_STACK: &str = "demo";

#[derive(Subcommand)]
pub enum LabCmd {
    /// Bring a lab up: nodes, swarm, lab image, meshd on every node, and the demo stack.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 1)]
        managers: usize,
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// Swarm heartbeat (e.g. 1s); node loss is noticed after a few. Docker's default: 5s.
        #[arg(long)]
        heartbeat: Option<String>,
        /// Do not deploy the demo stack.
        #[arg(long)]
        no_demo: bool,
        /// Workers' meshd read the managers' Docker API over TLS (`--manager-api`) instead
        /// of the managers' meshd (the feed, the default).
        #[arg(long)]
        manager_api: bool,
        /// Use the binaries already built (skip setup and `cargo build`).
        #[arg(long)]
        no_build: bool,
    },
    /// Nodes, services and the health of each node's meshd.
    Status {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
    /// Run a command on a node (its network and UTS namespaces, DOCKER_HOST set to it).
    Exec {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// node1, node2, ...
        node: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// meshctl against a node's meshd: `lab meshctl node1 -- service web`.
    Meshctl {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        /// node1, node2, ...
        node: String,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// `docker stack deploy` a compose file on the lab's manager.
    Deploy {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
        file: PathBuf,
        /// Stack name; the file's stem by default.
        #[arg(long)]
        stack: Option<String>,
    },
    /// Remove everything the lab made, even after a failed or interrupted `up`.
    Down {
        #[arg(long, default_value = DEFAULT_NAME)]
        name: String,
    },
}

pub fn run(cmd: LabCmd) -> Result<()> {
    if !require_root("lab") {
        bail!("the lab needs root");
    }
    match cmd {
        LabCmd::Up {
            nodes,
            managers,
            name,
            heartbeat,
            no_demo,
            no_build,
            manager_api,
        } => {
            if !no_build {
                crate::setup()?;
                crate::cargo(&["build", "--workspace"])?;
            }
            up(
                LabSpec {
                    name,
                    nodes,
                    managers,
                    heartbeat,
                    manager_api,
                },
                !no_demo,
            )
        }
        LabCmd::Status { name } => status(&name),
        LabCmd::Exec { name, node, cmd } => {
            let lab = Lab::open(&name)?;
            let st = lab.exec_command(&node, &cmd)?.status()?;
            std::process::exit(st.code().unwrap_or(1));
        }
        LabCmd::Meshctl { name, node, args } => {
            let lab = Lab::open(&name)?;
            let socket = lab.meshd(&node)?.socket.clone();
            let st = std::process::Command::new(bin("meshctl"))
                .arg("--socket")
                .arg(&socket)
                .args(&args)
                .status()
                .context("run meshctl")?;
            std::process::exit(st.code().unwrap_or(1));
        }
        LabCmd::Deploy { name, file, stack } => {
            let stack = match stack {
                Some(s) => s,
                None => file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .context("stack name")?
                    .to_string(),
            };
            let file = file
                .canonicalize()
                .with_context(|| format!("{}", file.display()))?;
            print!("{}", Lab::open(&name)?.deploy(&file, &stack)?);
            Ok(())
        }
        LabCmd::Down { name } => {
            Lab::down(&name)?;
            let left = Lab::leftovers(&name);
            if !left.is_empty() {
                bail!("lab {name}: could not remove {left:?}");
            }
            println!("lab {name}: removed");
            Ok(())
        }
    }
}

fn up(spec: LabSpec, demo: bool) -> Result<()> {
    let name = spec.name.clone();
    let started = std::time::Instant::now();
    let mut lab = Lab::up(spec)?;
    println!(
        "lab {name}: {} nodes up with meshd on each ({:.1} s)",
        lab.nodes.len(),
        started.elapsed().as_secs_f64()
    );
    if demo {
        let file = workspace_root().join("tests/lab/voting.yml");
        print!("{}", lab.deploy(&file, DEMO_STACK)?);
        wait_for(
            "the demo stack to run (web 2, app 3, db 1)",
            Duration::from_secs(90),
            || {
                let m = lab.manager();
                let n = |s: &str| {
                    m.running_tasks(&format!("{DEMO_STACK}_{s}"))
                        .ok()
                        .map(|t| t.len())
                };
                (n("web")? == 2 && n("app")? == 3 && n("db")? == 1).then_some(())
            },
        )?;
    }
    // From here the lab belongs to `lab down`.
    lab.detach();
    status(&name)?;
    let x = "cargo xtask lab";
    println!("\nTry:");
    if demo {
        let web = lab
            .manager()
            .running_task_objects(&format!("{DEMO_STACK}_web"))?;
        let host = web
            .first()
            .and_then(|t| t["NodeID"].as_str())
            .and_then(|id| {
                lab.swarm_nodes()
                    .ok()?
                    .into_iter()
                    .find(|n| n.1 == id)
                    .map(|n| n.0)
            })
            .unwrap_or_else(|| "node2".into());
        let addr = lab.node(&host).map(|n| n.addr.clone()).unwrap_or_default();
        // A machine on the nodes' LAN: every node answers web's ingress port.
        let lan = lab.lan_client()?;
        println!("  From a machine on the LAN (netns {lan}, {LAN_CLIENT}), every node answers 8080 (ingress):");
        for n in &lab.nodes {
            let answer = std::process::Command::new("ip")
                .args(["netns", "exec", &lan, "curl", "-s", "--max-time", "3"])
                .arg(format!("http://{}:8080/", n.addr))
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            println!(
                "    ip netns exec {lan} curl http://{}:8080/    # → {}",
                n.addr,
                if answer.is_empty() {
                    "no answer"
                } else {
                    &answer
                }
            );
        }
        println!("  {x} exec node1 -- curl -s http://{addr}:8081/cgi-bin/vote   # host mode; web → app (dnsrr) → db (VIP)");
        println!("  {x} exec node1 -- docker service ps {DEMO_STACK}_app");
        println!("  {x} exec node1 -- docker service scale {DEMO_STACK}_db=3");
        println!("  {x} meshctl node1 -- service {DEMO_STACK}_db");
    }
    println!("  {x} exec node2 -- docker ps");
    println!("  {x} deploy FILE            # your own stack (image meshlab:1)");
    println!("  {x} status");
    println!("  {x} down                   # removes everything");
    Ok(())
}

fn status(name: &str) -> Result<()> {
    let lab = Lab::open(name)?;
    println!(
        "lab {name}: {} nodes ({} manager{}), underlay {}.0/24 in netns {}, files in {}",
        lab.spec.nodes,
        lab.spec.managers,
        if lab.spec.managers == 1 { "" } else { "s" },
        lab.nodes[0].addr.rsplit_once('.').map_or("?", |(p, _)| p),
        lab.underlay,
        lab_dir(name).display()
    );
    let swarm = lab.swarm_nodes().unwrap_or_default();
    println!(
        "\n{:<7} {:<15} {:<8} {:<8} {:<8} MESHD",
        "NODE", "ADDRESS", "ROLE", "SWARM", "DOCKERD"
    );
    for (i, node) in lab.nodes.iter().enumerate() {
        let host = lab.hostname(i);
        let (role, state) = swarm
            .iter()
            .find(|n| n.0 == host)
            .map_or(("?".into(), "?".into()), |n| (n.2.clone(), n.3.clone()));
        let dockerd = if node.dockerd_pid().is_some() {
            "up"
        } else {
            "DOWN"
        };
        println!(
            "{:<7} {:<15} {:<8} {:<8} {:<8} {}",
            host,
            node.addr,
            role,
            state,
            dockerd,
            meshd_health(lab.meshds[i].status().ok())
        );
    }
    println!("\nservices (from node1):");
    match lab.manager().docker(&["service", "ls"]) {
        Ok(out) => print!("{out}"),
        Err(e) => println!("  cannot list: {e:#}"),
    }
    Ok(())
}

/// One line on a meshd: is it following the swarm, how much it programmed, what it rejected.
fn meshd_health(status: Option<Value>) -> String {
    let Some(s) = status else {
        return "NOT RUNNING (no answer on its socket)".into();
    };
    let c = &s["counts"];
    let rejected = s["rejected"].as_array().map_or(0, Vec::len);
    let (from, error) = match s["mode"].as_str() {
        Some("feed") => {
            let f = &s["feed"]["client"];
            (
                format!("feed from {}", f["hub"].as_str().unwrap_or("no manager")),
                (f["connected"] != true).then(|| {
                    f["last_error"]
                        .as_str()
                        .unwrap_or("not subscribed")
                        .to_string()
                }),
            )
        }
        Some("manager") | Some("manager_api") => {
            let w = &s["swarm"];
            let peers = s["feed"]["hub"]["peers"].as_object().map_or(0, |p| p.len());
            (
                format!(
                    "reads {}, serves {peers} feed links",
                    w["endpoint"].as_str().unwrap_or("?")
                ),
                (w["connected"] != true)
                    .then(|| w["last_error"].as_str().unwrap_or("?").to_string()),
            )
        }
        _ => ("local containers only".into(), None),
    };
    let health = match (s["ready"] == true, error) {
        (true, None) => "ok".to_string(),
        (_, Some(e)) => format!("NOT FOLLOWING THE SWARM: {e}"),
        (false, None) => "starting".to_string(),
    };
    format!(
        "{health}; {} load balancers; {} local containers; {} rejected; {from}",
        c["load_balancers"], c["local_sandboxes"], rejected,
    )
}
