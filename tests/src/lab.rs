//! The multi-node lab: N swarm nodes on one machine, each a network namespace with its own
//! dockerd (own data-root, exec-root, socket, cgroup parent, and UTS namespace with hostname
//! `nodeN`), joined by veths to bridge `br0` in an underlay namespace of their own; the swarm
//! formed, the lab image on every node, and meshd on every node. Managers also serve their
//! Docker API on TCP with mutual TLS, and workers' meshd read it from there.
//!
//! Everything is named after the lab (`NAME-nodeN` namespaces and cgroups, `NAME-ul`,
//! `/tmp/meshd-lab/NAME`, `/sys/fs/bpf/NAME-nodeN`), so `Lab::down` finds all of it from the
//! name alone, even after a `lab up` that died half-way. The host namespace is not touched.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    image,
    meshd_proc::{reset_pins, Meshd, RemoteManager},
    node::{self, Link, Node, NodeSpec, TlsServer, TLS_API_PORT},
    proc::{kill_leftovers, Daemon},
    run, sh, wait_for, workspace_root,
};

pub const LAB_ROOT: &str = "/tmp/meshd-lab";
/// The underlay subnet. It exists only inside the lab's namespaces, so labs never clash.
const UNDERLAY: &str = "192.168.100";
const PIN_ROOT: &str = "/sys/fs/bpf";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabSpec {
    pub name: String,
    pub nodes: usize,
    pub managers: usize,
    /// Swarm dispatcher heartbeat (`docker swarm init --dispatcher-heartbeat`); None keeps
    /// Docker's 5 s. Node loss is reported after a few heartbeats.
    pub heartbeat: Option<String>,
    /// Workers' meshd read the managers' Docker API (`--manager-api`, TLS) instead of the
    /// managers' meshd (the feed).
    #[serde(default)]
    pub manager_api: bool,
}

impl LabSpec {
    pub fn new(name: &str, nodes: usize, managers: usize) -> LabSpec {
        LabSpec {
            name: name.into(),
            nodes,
            managers,
            heartbeat: None,
            manager_api: false,
        }
    }

    fn check(&self) -> Result<()> {
        ensure!(
            !self.name.is_empty()
                && self.name.len() <= 12
                && self
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "lab name {:?}: 1 to 12 characters, a-z and 0-9",
            self.name
        );
        ensure!(
            (1..=20).contains(&self.nodes),
            "--nodes {}: 1 to 20",
            self.nodes
        );
        ensure!(
            (1..=self.nodes).contains(&self.managers),
            "--managers {}: at least 1, at most --nodes",
            self.managers
        );
        Ok(())
    }
}

pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LAB_ROOT).join(name)
}

/// The LAN machine of `Lab::lan_client`.
pub const LAN_CLIENT: &str = "192.168.100.200";

fn lan_ns(name: &str) -> String {
    format!("{name}-lan")
}

fn underlay_ns(name: &str) -> String {
    format!("{name}-ul")
}

fn node_spec(lab: &LabSpec, i: usize) -> NodeSpec {
    let hostname = format!("node{i}");
    let dir = lab_dir(&lab.name).join(&hostname);
    let tls = dir.parent().unwrap().join("tls");
    NodeSpec {
        name: format!("{}-{hostname}", lab.name),
        dir,
        hostname: Some(hostname),
        addr: format!("{UNDERLAY}.{i}"),
        link: Link::Underlay {
            netns: underlay_ns(&lab.name),
        },
        tls_api: (i <= lab.managers).then(|| TlsServer {
            ca: tls.join("ca.pem"),
            cert: tls.join("server.pem"),
            key: tls.join("server-key.pem"),
        }),
    }
}

fn pin_dir(node: &NodeSpec) -> PathBuf {
    Path::new(PIN_ROOT).join(&node.name)
}

pub struct Lab {
    pub spec: LabSpec,
    pub dir: PathBuf,
    pub underlay: String,
    /// node1 first; the first `spec.managers` are managers.
    pub nodes: Vec<Node>,
    /// Same order as `nodes` (shorter while `up` is still starting them).
    pub meshds: Vec<Meshd>,
    /// False for a lab opened from another process, or once detached.
    owned: bool,
}

impl Lab {
    /// Brings a lab up. On failure everything made so far is removed.
    pub fn up(spec: LabSpec) -> Result<Lab> {
        spec.check()?;
        let dir = lab_dir(&spec.name);
        let underlay = underlay_ns(&spec.name);
        if dir.exists() || Path::new("/var/run/netns").join(&underlay).exists() {
            bail!(
                "lab {} exists (up, or left by a failed up): `cargo xtask lab down --name {}` first",
                spec.name,
                spec.name
            );
        }
        fs::create_dir_all(&dir)?;
        fs::write(dir.join("lab.json"), serde_json::to_vec_pretty(&spec)?)?;
        let mut lab = Lab {
            spec,
            dir,
            underlay,
            nodes: Vec::new(),
            meshds: Vec::new(),
            owned: true,
        };
        lab.build()
            .with_context(|| format!("bring lab {} up", lab.spec.name))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let ul = self.underlay.clone();
        sh(&["ip", "netns", "add", &ul])?;
        sh(&["ip", "-n", &ul, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &ul, "link", "set", "br0", "up"])?;

        let manager_addrs: Vec<String> = (1..=self.spec.managers)
            .map(|i| format!("{UNDERLAY}.{i}"))
            .collect();
        // The same script provisions the Vagrant manager: one CA, one server certificate.
        let tls_script = workspace_root().join("vagrant/provision/tls.sh");
        let mut args = vec![
            tls_script.display().to_string(),
            self.dir.join("tls").display().to_string(),
        ];
        args.extend(manager_addrs.iter().cloned());
        run(Command::new("sh").args(&args)).context("make the lab's TLS certificates")?;

        for i in 1..=self.spec.nodes {
            self.nodes.push(Node::start_with(node_spec(&self.spec, i))?);
        }
        self.form_swarm()?;

        let rootfs = self.dir.join("rootfs");
        image::build_rootfs(&rootfs)?;
        std::thread::scope(|s| {
            let jobs: Vec<_> = self
                .nodes
                .iter()
                .map(|n| s.spawn(|| image::import(n, &rootfs)))
                .collect();
            jobs.into_iter()
                .try_for_each(|j| j.join().expect("import thread"))
        })?;

        let tls = self.dir.join("tls");
        // Every manager, in order: a worker's meshd moves on when one stops answering.
        let urls: Vec<String> = manager_addrs
            .iter()
            .map(|a| format!("tcp://{a}:{TLS_API_PORT}"))
            .collect();
        let remote = RemoteManager {
            url: urls.join(","),
            ca: tls.join("ca.pem"),
            cert: tls.join("client.pem"),
            key: tls.join("client-key.pem"),
        };
        for (i, node) in self.nodes.iter().enumerate() {
            let manager = (i >= self.spec.managers && self.spec.manager_api).then_some(&remote);
            // Every lab node serves L7 routes (ports 80 and 8443 of its own namespace), with
            // the certificates of one directory for the whole lab.
            let certs = self.l7_certs();
            std::fs::create_dir_all(&certs)?;
            let l7 = [
                // Prometheus metrics on each node's own loopback.
                "--metrics".into(),
                "127.0.0.1:9478".into(),
                "--l7".into(),
                "--l7-certs".into(),
                certs.display().to_string(),
                "--l7-backend-ca".into(),
                self.l7_backend_ca().display().to_string(),
            ];
            let m = Meshd::start_with_args(node, &pin_dir(&node.spec), manager, &l7)
                .with_context(|| format!("meshd on {}", self.hostname(i)))?;
            self.meshds.push(m);
        }
        // Ready is "read every source once", which a meshd that asked its engine a moment
        // before the join showed is, alone: up is done when each follows the swarm.
        for (i, m) in self.meshds.iter().enumerate() {
            let want = if i < self.spec.managers {
                "manager"
            } else if self.spec.manager_api {
                "manager_api"
            } else {
                "feed"
            };
            wait_for(
                &format!("meshd on {} to follow the swarm ({want})", self.hostname(i)),
                Duration::from_secs(30),
                || {
                    let st = m.status().ok()?;
                    let following = st["mode"] == want
                        && (want != "feed" || st["feed"]["client"]["connected"] == true);
                    following.then_some(())
                },
            )?;
        }
        Ok(())
    }

    fn form_swarm(&self) -> Result<()> {
        let first = &self.nodes[0];
        let mut init = vec![
            "swarm",
            "init",
            "--advertise-addr",
            &first.addr,
            "--listen-addr",
            &first.addr,
        ];
        if let Some(hb) = &self.spec.heartbeat {
            init.extend(["--dispatcher-heartbeat", hb]);
        }
        first.docker(&init)?;
        let token = |role: &str| -> Result<String> {
            Ok(first
                .docker(&["swarm", "join-token", "-q", role])?
                .trim()
                .to_string())
        };
        let (manager_token, worker_token) = (token("manager")?, token("worker")?);
        let join_addr = format!("{}:2377", first.addr);
        for (i, n) in self.nodes.iter().enumerate().skip(1) {
            let t = if i < self.spec.managers {
                &manager_token
            } else {
                &worker_token
            };
            n.docker(&[
                "swarm",
                "join",
                "--token",
                t,
                "--advertise-addr",
                &n.addr,
                "--listen-addr",
                &n.addr,
                &join_addr,
            ])
            .with_context(|| format!("{} joins the swarm", self.hostname(i)))?;
        }
        wait_for(
            "every node Ready in the swarm",
            Duration::from_secs(60),
            || {
                let nodes = first.api_get("/nodes").ok()?;
                let ready = nodes
                    .as_array()?
                    .iter()
                    .filter(|n| n["Status"]["State"] == "ready")
                    .count();
                (ready == self.spec.nodes).then_some(())
            },
        )
    }

    /// A lab brought up by another process (`cargo xtask lab up`); dropping it changes nothing.
    pub fn open(name: &str) -> Result<Lab> {
        let dir = lab_dir(name);
        let spec: LabSpec = serde_json::from_slice(
            &fs::read(dir.join("lab.json"))
                .with_context(|| format!("lab {name} is not up (no {})", dir.display()))?,
        )
        .context("lab.json")?;
        let nodes: Vec<Node> = (1..=spec.nodes)
            .map(|i| Node::open(node_spec(&spec, i)))
            .collect();
        let meshds = nodes
            .iter()
            .map(|n| Meshd::open(n, &pin_dir(&n.spec)))
            .collect();
        Ok(Lab {
            underlay: underlay_ns(name),
            spec,
            dir,
            nodes,
            meshds,
            owned: false,
        })
    }

    /// Leaves the lab running when this object is dropped (`lab up` hands it to `lab down`).
    pub fn detach(&mut self) {
        self.owned = false;
        self.nodes.iter_mut().for_each(Node::detach);
        self.meshds.iter_mut().for_each(Meshd::detach);
    }

    pub fn hostname(&self, index: usize) -> String {
        format!("node{}", index + 1)
    }

    /// The node with this hostname (`node1`, ...).
    pub fn node(&self, hostname: &str) -> Result<&Node> {
        self.index(hostname).map(|i| &self.nodes[i])
    }

    pub fn meshd(&self, hostname: &str) -> Result<&Meshd> {
        let i = self.index(hostname)?;
        self.meshds
            .get(i)
            .with_context(|| format!("no meshd on {hostname}"))
    }

    pub fn node_mut(&mut self, hostname: &str) -> Result<&mut Node> {
        let i = self.index(hostname)?;
        Ok(&mut self.nodes[i])
    }

    fn index(&self, hostname: &str) -> Result<usize> {
        hostname
            .strip_prefix("node")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=self.nodes.len()).contains(n))
            .map(|n| n - 1)
            .with_context(|| {
                format!(
                    "no node {hostname:?} in lab {} (node1..node{})",
                    self.spec.name,
                    self.nodes.len()
                )
            })
    }

    /// The first manager: where swarm commands go.
    pub fn manager(&self) -> &Node {
        &self.nodes[0]
    }

    /// The directory of PEM files every node's meshd serves HTTPS certificates from
    /// (`--l7-certs`): what `com.docker.lb.ssl_cert` and `ssl_key` name.
    pub fn l7_certs(&self) -> PathBuf {
        lab_dir(&self.spec.name).join("l7-certs")
    }

    /// The CA bundle every node's meshd verifies `ssl_backend_tls_verify=required`
    /// upstreams against (`--l7-backend-ca`); absent until a test writes it.
    pub fn l7_backend_ca(&self) -> PathBuf {
        lab_dir(&self.spec.name).join("l7-backend-ca.pem")
    }

    /// A machine on the nodes' LAN: a namespace with a veth on the underlay bridge and
    /// `LAN_CLIENT` (outside the nodes' range). Made once; `down` removes it. Returns its
    /// namespace name (`ip netns exec NAME ...`).
    pub fn lan_client(&self) -> Result<String> {
        let ns = lan_ns(&self.spec.name);
        if Path::new("/var/run/netns").join(&ns).exists() {
            return Ok(ns);
        }
        sh(&["ip", "netns", "add", &ns])?;
        sh(&[
            "ip",
            "link",
            "add",
            "lan0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            "lan-ul",
            "netns",
            &self.underlay,
        ])?;
        self.underlay_link(&["lan-ul", "master", "br0", "up"])?;
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{LAN_CLIENT}/24"),
            "dev",
            "lan0",
        ])?;
        sh(&["ip", "-n", &ns, "link", "set", "lan0", "up"])?;
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Cuts (or restores) a node's underlay link: it loses every other node.
    pub fn set_link(&self, hostname: &str, up: bool) -> Result<()> {
        self.index(hostname)?;
        self.underlay_link(&[hostname, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// `ip link set ARGS` in the underlay namespace.
    fn underlay_link(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["ip", "-n", &self.underlay, "link", "set"];
        argv.extend(args);
        sh(&argv)
    }

    /// Swarm's view of the nodes, from the first manager: hostname → (id, role, state).
    pub fn swarm_nodes(&self) -> Result<Vec<(String, String, String, String)>> {
        let nodes = self.manager().api_get("/nodes")?;
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let mut out: Vec<_> = nodes
            .as_array()
            .context("/nodes is not a list")?
            .iter()
            .map(|n| {
                (
                    s(&n["Description"]["Hostname"]),
                    s(&n["ID"]),
                    s(&n["Spec"]["Role"]),
                    s(&n["Status"]["State"]),
                )
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// `docker stack deploy` of a compose file on the first manager.
    pub fn deploy(&self, file: &Path, stack: &str) -> Result<String> {
        let file = file.display().to_string();
        self.manager().docker(&[
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "-c",
            &file,
            stack,
        ])
    }

    /// A command to run `argv` on a node: in its network and UTS namespaces, with
    /// DOCKER_HOST set to its engine.
    pub fn exec_command(&self, hostname: &str, argv: &[String]) -> Result<Command> {
        let node = self.node(hostname)?;
        let pid = node
            .dockerd_pid()
            .with_context(|| format!("{hostname}'s dockerd is not running"))?;
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &pid.to_string(), "--net", "--uts", "--"])
            .env("DOCKER_HOST", node.host())
            .args(argv);
        Ok(cmd)
    }

    /// Removes everything a lab named `name` made, from its name alone: meshd processes and
    /// pins, dockerds and what they started, namespaces, cgroups, directories.
    pub fn down(name: &str) -> Result<()> {
        let dir = lab_dir(name);
        let node_prefix = format!("{name}-node");
        let mut hosts: BTreeSet<String> = BTreeSet::new();
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if f.starts_with("node") && e.path().is_dir() {
                    hosts.insert(f);
                }
            }
        }
        let with_prefix = |listing: Vec<String>| {
            listing
                .into_iter()
                .filter_map(|n| n.strip_prefix(&node_prefix).map(|i| format!("node{i}")))
                .collect::<Vec<_>>()
        };
        let netns = run(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
        hosts.extend(with_prefix(
            netns
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect(),
        ));
        for root in [node::CGROUP2, PIN_ROOT] {
            let names = fs::read_dir(root)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            hosts.extend(with_prefix(names));
        }
        for host in &hosts {
            let node_dir = dir.join(host);
            let marker = format!("{}/", node_dir.display());
            if let Some(mut m) = Daemon::adopt(&node_dir.join("meshd.pid"), &marker) {
                m.stop(Duration::from_secs(5));
            }
            reset_pins(&Path::new(PIN_ROOT).join(format!("{name}-{host}")));
            node::cleanup(&format!("{name}-{host}"), &node_dir);
        }
        let _ = run(Command::new("ip").args(["netns", "del", &lan_ns(name)]));
        let _ = run(Command::new("ip").args(["netns", "del", &underlay_ns(name)]));
        kill_leftovers(&format!("{}/", dir.display()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        Ok(())
    }

    /// What is left of a lab named `name` on this machine (empty when `down` did its job).
    pub fn leftovers(name: &str) -> Vec<String> {
        let mut left = Vec::new();
        let dir = lab_dir(name);
        if dir.exists() {
            left.push(dir.display().to_string());
        }
        let prefix = format!("{name}-");
        let netns = run(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
        for l in netns.lines() {
            if l.starts_with(&prefix) {
                left.push(format!("netns {l}"));
            }
        }
        for root in [node::CGROUP2, PIN_ROOT, "/sys/fs/cgroup/memory"] {
            for e in fs::read_dir(root).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    left.push(e.path().display().to_string());
                }
            }
        }
        for pid in crate::proc::pids_with_marker(&format!("{}/", dir.display())) {
            left.push(format!("process {pid}"));
        }
        left
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.owned {
            // meshd first, then the dockerds (in parallel: each takes a moment to stop its
            // containers), then the name-based sweep for anything else.
            self.meshds.clear();
            std::thread::scope(|s| {
                for n in self.nodes.iter_mut() {
                    s.spawn(|| n.stop_dockerd());
                }
            });
            self.nodes.iter_mut().for_each(Node::detach);
            self.nodes.clear();
            if let Err(e) = Lab::down(&self.spec.name) {
                eprintln!("lab {}: cleanup: {e:#}", self.spec.name);
            }
        }
    }
}
