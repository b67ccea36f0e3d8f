//! One swarm node: a dockerd in its own network namespace, with its own data-root, exec-root,
//! socket and cgroup parent. Everything a node made is removed by `cleanup`, which needs only
//! the node's names (so `lab down` can clean up after a crashed `lab up`).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    image,
    proc::{kill_leftovers, Daemon, Placement},
    run, sh, wait_for, IMAGE,
};

pub const CGROUP2: &str = "/sys/fs/cgroup/unified";
/// Port of a manager's Docker API on TCP with mutual TLS.
pub const TLS_API_PORT: u16 = 2376;

/// How a node is wired.
#[derive(Clone, Debug)]
pub enum Link {
    /// A veth pair inside the node's namespace: an address and nothing to reach.
    Private,
    /// A veth from the node's `eth0` to bridge `br0` in this underlay namespace; the
    /// underlay end is named after the node's hostname.
    Underlay { netns: String },
}

/// Mutual-TLS files for a manager's API on `tcp://addr:2376`.
#[derive(Clone, Debug)]
pub struct TlsServer {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// Unique on the machine: the network namespace and the cgroup parent.
    pub name: String,
    pub dir: PathBuf,
    /// A UTS namespace of its own with this hostname (swarm shows it in `docker node ls`).
    pub hostname: Option<String>,
    pub addr: String,
    pub link: Link,
    pub tls_api: Option<TlsServer>,
}

impl NodeSpec {
    pub fn marker(&self) -> String {
        format!("{}/", self.dir.display())
    }

    pub fn placement(&self) -> Placement {
        Placement {
            netns: Some(self.name.clone()),
            hostname: self.hostname.clone(),
        }
    }
}

pub struct Node {
    pub spec: NodeSpec,
    pub name: String,
    pub netns: String,
    pub dir: PathBuf,
    pub sock: PathBuf,
    /// The cgroup2 directory that holds this node's containers (meshd attaches here).
    pub cgroup: PathBuf,
    pub addr: String,
    dockerd: Option<Daemon>,
    /// False once detached: the node then outlives this object (`lab up`).
    owned: bool,
}

impl Node {
    /// A standalone node named `name` (unique on the machine) with `addr` on a private link.
    /// Nothing in the host namespace changes.
    pub fn start(name: &str, addr: &str) -> Result<Node> {
        Node::start_with(NodeSpec {
            name: name.into(),
            dir: PathBuf::from(format!("/tmp/meshd-lab/{name}")),
            hostname: None,
            addr: addr.into(),
            link: Link::Private,
            tls_api: None,
        })
    }

    pub fn start_with(spec: NodeSpec) -> Result<Node> {
        let mut node = Node::handle(spec, true);
        // From here on Drop cleans up whatever was made.
        node.boot()
            .with_context(|| format!("start node {}", node.name))?;
        Ok(node)
    }

    /// A node started earlier (by another process): used, never cleaned up on drop.
    pub fn open(spec: NodeSpec) -> Node {
        let mut node = Node::handle(spec, false);
        node.dockerd = Daemon::adopt(&node.dir.join("dockerd.pid"), &node.spec.marker());
        node
    }

    fn handle(spec: NodeSpec, owned: bool) -> Node {
        Node {
            name: spec.name.clone(),
            netns: spec.name.clone(),
            dir: spec.dir.clone(),
            sock: spec.dir.join("docker.sock"),
            cgroup: PathBuf::from(CGROUP2).join(&spec.name),
            addr: spec.addr.clone(),
            spec,
            dockerd: None,
            owned,
        }
    }

    /// Leaves the node running when this object is dropped.
    pub fn detach(&mut self) {
        self.owned = false;
    }

    pub fn dockerd_pid(&self) -> Option<i32> {
        self.dockerd.as_ref().map(Daemon::pid)
    }

    /// Runs `ip ARGS` inside this node's network namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        run(Command::new("ip").args(["-n", &self.netns]).args(args))
    }

    fn boot(&mut self) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        sh(&["ip", "netns", "add", &self.netns])?;
        self.ip(&["link", "set", "lo", "up"])?;
        let dev = match &self.spec.link {
            Link::Private => {
                self.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"])?;
                self.ip(&["link", "set", "u1", "up"])?;
                "u0"
            }
            Link::Underlay { netns } => {
                let host_end = self.spec.hostname.clone().unwrap_or(self.name.clone());
                sh(&[
                    "ip",
                    "-n",
                    netns,
                    "link",
                    "add",
                    &host_end,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &self.netns,
                ])?;
                sh(&["ip", "-n", netns, "link", "set", &host_end, "master", "br0"])?;
                sh(&["ip", "-n", netns, "link", "set", &host_end, "up"])?;
                "eth0"
            }
        };
        self.ip(&["addr", "add", &format!("{}/24", self.addr), "dev", dev])?;
        self.ip(&["link", "set", dev, "up"])?;
        fs::create_dir_all(&self.cgroup)?;
        self.start_dockerd()
    }

    fn start_dockerd(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))?;
        let mut cmd = Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(self.host())
            // The host's firewall and bridges stay untouched (LAB.md).
            .args([
                "--iptables=false",
                "--bridge=none",
                "--shutdown-timeout",
                "1",
            ])
            .args(["--cgroup-parent", &self.name]);
        if let Some(tls) = &self.spec.tls_api {
            cmd.arg("-H")
                .arg(format!("tcp://{}:{TLS_API_PORT}", self.addr))
                .arg("--tlsverify")
                .arg("--tlscacert")
                .arg(&tls.ca)
                .arg("--tlscert")
                .arg(&tls.cert)
                .arg("--tlskey")
                .arg(&tls.key);
        }
        cmd.env("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.dockerd = Some(Daemon::spawn(
            &mut cmd,
            &self.spec.placement(),
            &self.spec.marker(),
            None,
        )?);
        wait_for("dockerd to answer", Duration::from_secs(30), || {
            self.docker(&["version", "--format", "{{.Server.APIVersion}}"])
                .ok()
        })?;
        Ok(())
    }

    /// Stops this node's dockerd (SIGTERM; it stops its containers), as a lost worker.
    pub fn stop_dockerd(&mut self) {
        if let Some(mut d) = self.dockerd.take() {
            d.stop(Duration::from_secs(20));
        }
        kill_leftovers(&self.spec.marker());
    }

    pub fn restart_dockerd(&mut self) -> Result<()> {
        self.stop_dockerd();
        self.start_dockerd()
    }

    /// Swarm's node certificates of this node (the feed's TLS).
    pub fn swarm_certs(&self) -> PathBuf {
        self.dir.join("data/swarm/certificates")
    }

    pub fn host(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    pub fn docker(&self, args: &[&str]) -> Result<String> {
        run(Command::new("docker").arg("-H").arg(self.host()).args(args))
    }

    pub fn docker_json(&self, args: &[&str]) -> Result<Value> {
        Ok(serde_json::from_str(&self.docker(args)?)?)
    }

    pub fn swarm_init(&self) -> Result<()> {
        self.docker(&["swarm", "init", "--advertise-addr", &self.addr])?;
        Ok(())
    }

    /// Imports the lab image (see `image`).
    pub fn import_image(&self) -> Result<()> {
        let root = self.dir.join("rootfs");
        image::build_rootfs(&root)?;
        image::import(self, &root)
    }

    /// A container's address on this node's `docker_gwbridge` (`container`: an id or its
    /// prefix).
    pub fn gwbridge_addr(&self, container: &str) -> Result<String> {
        let gw = self.docker_json(&["network", "inspect", "docker_gwbridge"])?;
        gw[0]["Containers"]
            .as_object()
            .and_then(|c| c.iter().find(|(id, _)| id.starts_with(container)))
            .and_then(|(_, v)| v["IPv4Address"].as_str())
            .and_then(|a| a.split('/').next())
            .map(str::to_string)
            .with_context(|| format!("{container} has no docker_gwbridge address"))
    }

    /// Creates an attachable overlay network, so plain containers can join it too.
    pub fn create_overlay(&self, name: &str) -> Result<()> {
        self.docker(&["network", "create", "-d", "overlay", "--attachable", name])?;
        Ok(())
    }

    /// Creates a service of the lab image on `network` (detached; wait with `wait_running`).
    pub fn create_service(
        &self,
        name: &str,
        network: &str,
        replicas: usize,
        grace: &str,
        cmd: &[&str],
    ) -> Result<()> {
        self.create_service_with(name, network, replicas, grace, &[], cmd)
    }

    /// As `create_service`, with extra `docker service create` flags (constraints, ...);
    /// `network` "" for none (a service that only publishes ports is on `ingress`).
    pub fn create_service_with(
        &self,
        name: &str,
        network: &str,
        replicas: usize,
        grace: &str,
        flags: &[&str],
        cmd: &[&str],
    ) -> Result<()> {
        let replicas = replicas.to_string();
        let mut args = vec![
            "service",
            "create",
            "-d",
            "--no-resolve-image",
            "--name",
            name,
            "--replicas",
            &replicas,
            "--stop-grace-period",
            grace,
        ];
        if !network.is_empty() {
            args.extend(["--network", network]);
        }
        args.extend_from_slice(flags);
        args.push(IMAGE);
        args.extend_from_slice(cmd);
        self.docker(&args)?;
        Ok(())
    }

    /// Starts a long-running plain container of the lab image on `network`.
    pub fn run_idle_container(&self, name: &str, network: &str) -> Result<()> {
        self.docker(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            network,
            IMAGE,
            "sleep",
            "1d",
        ])?;
        Ok(())
    }

    /// A service's VIP on its first network.
    pub fn service_vip(&self, service: &str) -> Result<String> {
        let out = self.docker(&[
            "service",
            "inspect",
            service,
            "--format",
            "{{(index .Endpoint.VirtualIPs 0).Addr}}",
        ])?;
        Ok(out.trim().split('/').next().unwrap_or_default().to_string())
    }

    /// Tasks of a service that swarm reports running with desired state running.
    pub fn running_task_objects(&self, service: &str) -> Result<Vec<Value>> {
        let filter = format!(
            "filters={}",
            urlencode(&format!(
                r#"{{"service":["{service}"],"desired-state":["running"]}}"#
            ))
        );
        let all = self.api_get(&format!("/tasks?{filter}"))?;
        Ok(all
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["Status"]["State"] == "running")
            .cloned()
            .collect())
    }

    /// Running tasks of a service, as (task id, container id).
    pub fn running_tasks(&self, service: &str) -> Result<Vec<(String, String)>> {
        Ok(self
            .running_task_objects(service)?
            .iter()
            .map(|t| {
                let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
                (
                    s(&t["ID"]),
                    s(&t["Status"]["ContainerStatus"]["ContainerID"]),
                )
            })
            .collect())
    }

    /// Waits until `service` has exactly `n` running tasks; returns their container ids.
    pub fn wait_running(&self, service: &str, n: usize) -> Result<Vec<String>> {
        wait_for(
            &format!("{service} to run {n} tasks"),
            Duration::from_secs(60),
            || {
                let t = self.running_tasks(service).ok()?;
                (t.len() == n).then(|| t.into_iter().map(|(_, c)| c).collect())
            },
        )
    }

    /// GET on this node's Engine API (curl over the unix socket: faster than the CLI).
    pub fn api_get(&self, path: &str) -> Result<Value> {
        let out = run(Command::new("curl")
            .args(["-sf", "--max-time", "10", "--unix-socket"])
            .arg(&self.sock)
            .arg(format!("http://docker/v1.41{path}")))?;
        serde_json::from_str(&out).with_context(|| format!("GET {path}: not JSON"))
    }

    /// Runs `cmd` inside a container (sh -c).
    pub fn exec(&self, container: &str, cmd: &str) -> Result<String> {
        self.docker(&["exec", container, "sh", "-c", cmd])
    }
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.owned {
            self.stop_dockerd();
            cleanup(&self.name, &self.dir);
        }
    }
}

/// Removes what a node named `name` with directory `dir` made, whatever state it is in:
/// its processes (dockerd by pid file, then containerd, shims and containers), mounts,
/// network namespace, cgroups and directory. Safe to call twice.
pub fn cleanup(name: &str, dir: &Path) {
    let marker = format!("{}/", dir.display());
    if let Some(mut d) = Daemon::adopt(&dir.join("dockerd.pid"), &marker) {
        d.stop(Duration::from_secs(20));
    }
    kill_leftovers(&marker);
    kill_cgroup(&PathBuf::from(CGROUP2).join(name));
    unmount_below(dir);
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
    // The cgroup parent exists in the v2 tree and in every v1 controller.
    remove_cgroup_tree(&PathBuf::from(CGROUP2).join(name));
    if let Ok(ctrls) = fs::read_dir("/sys/fs/cgroup") {
        for c in ctrls.flatten() {
            remove_cgroup_tree(&c.path().join(name));
        }
    }
    let _ = fs::remove_dir_all(dir);
}

/// Kills every process left in a node's container cgroups (containers whose shim is gone)
/// and waits for them to leave, so the cgroups can be removed.
fn kill_cgroup(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let _ = wait_for("cgroup to empty", Duration::from_secs(5), || {
        cgroup_empty(dir).then_some(())
    });
}

fn cgroup_empty(dir: &Path) -> bool {
    let own = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    own.trim().is_empty()
        && fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .all(|e| !e.file_type().is_ok_and(|t| t.is_dir()) || cgroup_empty(&e.path()))
}

fn unmount_below(dir: &Path) {
    let prefix = dir.to_string_lossy().into_owned();
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m == &prefix || m.starts_with(&format!("{prefix}/")))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let c = std::ffi::CString::new(p).unwrap();
        // SAFETY: unmounting a mount point below our own lab directory.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}
