//! Harness for end-to-end tests and benchmarks: real dockerd swarm nodes, each in its own
//! network namespace with its own data-root, exec-root, socket and cgroup parent, and real
//! meshd processes. Everything a harness object made is removed when it is dropped, even when
//! the test fails half-way.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const IMAGE: &str = "meshlab:1";
/// A lab-image web server that answers every request with its container's hostname.
pub const WEB_CMD: &str = "hostname > /www/index.html; exec httpd -f -p 80 -h /www";
const CGROUP2: &str = "/sys/fs/cgroup/unified";

/// Tests that need root and a real kernel: in CI a missing requirement is a failure, on a
/// developer's machine a loud skip.
pub fn require_root(test: &str) -> bool {
    if nix_geteuid() == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} needs root (CI=true: this must run, not skip)");
    }
    eprintln!("SKIPPED {test}: needs root (run `cargo xtask test` as root)");
    false
}

fn nix_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// A binary built by this workspace (`cargo build` runs before the tests).
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let p = dir.join("debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// Polls `f` until it returns Some, or fails after `timeout` naming what was awaited.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sh(args: &[&str]) -> Result<String> {
    run(Command::new(args[0]).args(&args[1..]))
}

/// A unique short tag for this process's objects: names stay under the kernel's 15-char
/// interface limit and never collide with another run.
pub fn run_tag() -> String {
    format!("mt{}", std::process::id() % 100_000)
}

/// One swarm node: a dockerd in its own network namespace.
pub struct Node {
    pub name: String,
    pub netns: String,
    pub dir: PathBuf,
    pub sock: PathBuf,
    /// The cgroup2 directory that holds this node's containers (meshd attaches here).
    pub cgroup: PathBuf,
    pub cgroup_parent: String,
    pub addr: String,
    dockerd: Option<Child>,
}

impl Node {
    /// Starts dockerd for a node named `name` (unique on the machine), with `addr` on a
    /// private link inside its namespace. Nothing in the host namespace changes.
    pub fn start(name: &str, addr: &str) -> Result<Node> {
        let dir = PathBuf::from(format!("/tmp/meshd-lab/{name}"));
        let mut node = Node {
            name: name.into(),
            netns: name.into(),
            sock: dir.join("docker.sock"),
            cgroup: PathBuf::from(CGROUP2).join(name),
            cgroup_parent: name.into(),
            addr: addr.into(),
            dir,
            dockerd: None,
        };
        // From here on Drop cleans up whatever was made.
        node.boot().with_context(|| format!("start node {name}"))?;
        Ok(node)
    }

    fn boot(&mut self) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        sh(&["ip", "netns", "add", &self.netns])?;
        let ns = |args: &[&str]| -> Result<String> {
            run(Command::new("ip")
                .args(["netns", "exec", &self.netns])
                .args(args))
        };
        ns(&["ip", "link", "set", "lo", "up"])?;
        ns(&[
            "ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1",
        ])?;
        ns(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.addr),
            "dev",
            "u0",
        ])?;
        ns(&["ip", "link", "set", "u0", "up"])?;
        ns(&["ip", "link", "set", "u1", "up"])?;
        // New namespaces inherit bridge-nf-call and host defaults; keep them predictable.
        let _ = ns(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        fs::create_dir_all(&self.cgroup)?;
        let log = fs::File::create(self.dir.join("dockerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg("dockerd")
            .arg("--data-root")
            .arg(self.dir.join("data"))
            .arg("--exec-root")
            .arg(self.dir.join("exec"))
            .arg("--pidfile")
            .arg(self.dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args([
                "--iptables=false",
                "--bridge=none",
                "--shutdown-timeout",
                "1",
            ])
            .args(["--cgroup-parent", &self.cgroup_parent])
            .env("DOCKER_SERVICE_PREFER_OFFLINE_IMAGE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn dockerd")?;
        self.dockerd = Some(child);
        wait_for("dockerd to answer", Duration::from_secs(30), || {
            self.docker(&["version", "--format", "{{.Server.APIVersion}}"])
                .ok()
        })?;
        Ok(())
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

    /// Imports the lab image: busybox, plus labtool and the C library it needs.
    pub fn import_image(&self) -> Result<()> {
        let root = self.dir.join("rootfs");
        let _ = fs::remove_dir_all(&root);
        for d in ["bin", "www", "tmp", "etc", "lib64", "lib/x86_64-linux-gnu"] {
            fs::create_dir_all(root.join(d))?;
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox-static missing")?;
        for applet in sh(&["/bin/busybox", "--list"])?.lines() {
            if applet != "busybox" {
                let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
            }
        }
        let labtool = bin("labtool");
        fs::copy(&labtool, root.join("bin/labtool"))?;
        for lib in sh(&["ldd", labtool.to_str().unwrap()])?.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux..."
            let path = lib
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from);
            if let Some(p) = path {
                let dest = root.join(p.strip_prefix("/").unwrap());
                fs::create_dir_all(dest.parent().unwrap())?;
                fs::copy(&p, &dest).with_context(|| format!("copy {}", p.display()))?;
            }
        }
        let tar = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = Command::new("docker")
            .arg("-H")
            .arg(self.host())
            .args([
                "import",
                "-c",
                "ENV PATH=/bin",
                "-c",
                "CMD [\"sh\"]",
                "-",
                IMAGE,
            ])
            .stdin(tar.stdout.unwrap())
            .output()?;
        if !out.status.success() {
            bail!("docker import: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
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
        let replicas = replicas.to_string();
        let mut args = vec![
            "service",
            "create",
            "-d",
            "--no-resolve-image",
            "--name",
            name,
            "--network",
            network,
            "--replicas",
            &replicas,
            "--stop-grace-period",
            grace,
            IMAGE,
        ];
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

    /// Running tasks of a service, as (task id, container id).
    pub fn running_tasks(&self, service: &str) -> Result<Vec<(String, String)>> {
        let ids = self.docker(&[
            "service",
            "ps",
            service,
            "-q",
            "--no-trunc",
            "--filter",
            "desired-state=running",
        ])?;
        let mut out = Vec::new();
        for id in ids.split_whitespace() {
            let t = self.docker_json(&["inspect", id])?;
            let t = &t[0];
            if t["Status"]["State"] == "running" {
                let cid = t["Status"]["ContainerStatus"]["ContainerID"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                out.push((id.to_string(), cid));
            }
        }
        Ok(out)
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

    /// Runs `cmd` inside a container (sh -c).
    pub fn exec(&self, container: &str, cmd: &str) -> Result<String> {
        self.docker(&["exec", container, "sh", "-c", cmd])
    }

    fn stop_dockerd(&mut self) {
        if let Some(mut child) = self.dockerd.take() {
            let pid = child.id() as i32;
            // SAFETY: signalling the dockerd we spawned, by its pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims outlive dockerd when it was killed hard; they carry our paths in argv.
        let me = self.dir.to_string_lossy().into_owned();
        if let Ok(procs) = fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if let Ok(cmdline) = fs::read(p.path().join("cmdline")) {
                    if String::from_utf8_lossy(&cmdline).contains(&me) {
                        // SAFETY: only processes started for this node (its paths in argv).
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
    }
}

fn unmount_below(dir: &Path) {
    let prefix = dir.to_string_lossy().into_owned();
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&prefix))
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

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_dockerd();
        unmount_below(&self.dir);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
        // The cgroup parent exists in the v2 tree and in every v1 controller.
        remove_cgroup_tree(&self.cgroup);
        if let Ok(ctrls) = fs::read_dir("/sys/fs/cgroup") {
            for c in ctrls.flatten() {
                remove_cgroup_tree(&c.path().join(&self.cgroup_parent));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A meshd process for one node. Killed when dropped; its pins are removed by `PinGuard`.
pub struct Meshd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
}

/// Removes a meshd's pinned programs and maps when dropped.
pub struct PinGuard(pub PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = Command::new(bin("meshd"))
            .arg("reset")
            .arg("--pin-dir")
            .arg(&self.0)
            .stdout(Stdio::null())
            .status();
    }
}

impl Meshd {
    pub fn start(node: &Node, pin_dir: &Path) -> Result<Meshd> {
        let args = vec![
            "--docker-host".to_string(),
            node.host(),
            "--cgroup".into(),
            node.cgroup.display().to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--api-socket".into(),
            node.dir.join("meshd.sock").display().to_string(),
        ];
        let mut m = Meshd {
            child: None,
            socket: node.dir.join("meshd.sock"),
            pin_dir: pin_dir.into(),
            log: node.dir.join("meshd.log"),
            args,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> Result<()> {
        let _ = fs::remove_file(&self.socket);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("meshd"))
            .args(&self.args)
            .env("MESHD_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn meshd")?;
        self.child = Some(child);
        wait_for("meshd to report a sync", Duration::from_secs(30), || {
            self.status()
                .ok()
                .filter(|s| s["docker"]["syncs"].as_u64().unwrap_or(0) > 0)
        })
        .with_context(|| format!("meshd log:\n{}", self.log_tail()))?;
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let s = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn ctl(&self, args: &[&str]) -> Result<Value> {
        let out = run(Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(args))?;
        Ok(serde_json::from_str(&out)?)
    }

    pub fn status(&self) -> Result<Value> {
        self.ctl(&["status"])
    }

    /// Backends meshd programmed for a service's first VIP (None if it has none).
    pub fn backends(&self, service: &str) -> Option<usize> {
        let v = self.ctl(&["service", service]).ok()?;
        v["vips"][0]["backends"].as_array().map(Vec::len)
    }

    pub fn wait_backends(&self, service: &str, n: usize) -> Result<()> {
        wait_for(
            &format!("meshd to program {n} backends for {service}"),
            Duration::from_secs(10),
            || (self.backends(service) == Some(n)).then_some(()),
        )
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        self.kill9();
        let _ = fs::remove_file(&self.socket);
    }
}

/// A one-node swarm with the lab image, an attachable overlay `front`, and meshd on it.
/// Fields drop in order: meshd stops, its pins go, then the node.
pub struct OneNodeSwarm {
    pub meshd: Meshd,
    pub pins: PinGuard,
    pub node: Node,
}

impl OneNodeSwarm {
    /// `suffix` makes the node's name unique among this run's labs; `addr` is its address.
    pub fn start(suffix: &str, addr: &str) -> Result<Self> {
        let name = format!("{}{suffix}", run_tag());
        let node = Node::start(&name, addr)?;
        let pins = PinGuard(PathBuf::from(format!("/sys/fs/bpf/{name}")));
        node.swarm_init()?;
        node.import_image()?;
        let meshd = Meshd::start(&node, &pins.0)?;
        node.create_overlay("front")?;
        Ok(Self { meshd, pins, node })
    }
}

/// Number of entries in a pinned map, read by bpftool straight from the kernel (not through
/// meshd, which may be dead or wrong).
pub fn pinned_map_len(pin_dir: &Path, map: &str) -> Result<usize> {
    let out = run(Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(pin_dir.join(map)))?;
    let v: Value = serde_json::from_str(&out).context("bpftool output")?;
    Ok(v.as_array().map_or(0, Vec::len))
}
