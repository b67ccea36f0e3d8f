//! A meshd process for one node, started in the node's network namespace (a worker's meshd
//! reaches the manager across the underlay), and the guard that removes its pins.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    bin,
    node::Node,
    proc::{Daemon, Placement},
    run, wait_for,
};

/// Removes a meshd's pinned programs and maps when dropped.
pub struct PinGuard(pub PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        reset_pins(&self.0);
    }
}

/// `meshd reset`: detaches the programs and removes the pins under `pin_dir`.
pub fn reset_pins(pin_dir: &Path) {
    if pin_dir.exists() {
        let _ = Command::new(bin("meshd"))
            .arg("reset")
            .arg("--pin-dir")
            .arg(pin_dir)
            .stdout(Stdio::null())
            .status();
    }
}

/// Managers' Docker APIs a meshd reads directly (`--manager-api`), with mutual TLS.
#[derive(Clone, Debug)]
pub struct RemoteManager {
    /// `tcp://addr:port`, comma-separated when there are several managers.
    pub url: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A meshd process. Stopped when dropped unless detached; pins are `PinGuard`'s business.
pub struct Meshd {
    daemon: Option<Daemon>,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub log: PathBuf,
    pidfile: PathBuf,
    marker: String,
    place: Placement,
    args: Vec<String>,
    owned: bool,
}

impl Meshd {
    /// meshd for `node`, reading the node's own engine (a manager).
    pub fn start(node: &Node, pin_dir: &Path) -> Result<Meshd> {
        Meshd::start_with(node, pin_dir, None)
    }

    /// meshd for `node`; with `manager`, swarm state comes from that remote manager.
    pub fn start_with(
        node: &Node,
        pin_dir: &Path,
        manager: Option<&RemoteManager>,
    ) -> Result<Meshd> {
        Meshd::start_with_args(node, pin_dir, manager, &[])
    }

    /// As `start_with`, with extra meshd flags (`--dns-upstream ...`; a `--docker-host`
    /// among them replaces the node's own).
    pub fn start_with_args(
        node: &Node,
        pin_dir: &Path,
        manager: Option<&RemoteManager>,
        extra: &[String],
    ) -> Result<Meshd> {
        let mut m = Meshd::handle(node, pin_dir, true);
        m.args.extend_from_slice(extra);
        if !extra.iter().any(|a| a == "--docker-host") {
            m.args.extend(["--docker-host".into(), node.host()]);
        }
        m.args.extend([
            "--swarm-certs".into(),
            node.swarm_certs().display().to_string(),
            "--docker-netns-dir".into(),
            node.dir.join("exec/netns").display().to_string(),
        ]);
        if let Some(r) = manager {
            // The managers' Docker API directly, instead of their meshd's feed.
            m.args.extend(["--manager-api".into(), r.url.clone()]);
            for (flag, path) in [
                ("--tls-ca", &r.ca),
                ("--tls-cert", &r.cert),
                ("--tls-key", &r.key),
            ] {
                m.args.extend([flag.into(), path.display().to_string()]);
            }
        }
        m.spawn()?;
        Ok(m)
    }

    /// The meshd of a node started by another process (`lab up`), if it runs.
    pub fn open(node: &Node, pin_dir: &Path) -> Meshd {
        let mut m = Meshd::handle(node, pin_dir, false);
        m.daemon = Daemon::adopt(&m.pidfile, &m.marker);
        m
    }

    fn handle(node: &Node, pin_dir: &Path, owned: bool) -> Meshd {
        let socket = node.dir.join("meshd.sock");
        Meshd {
            daemon: None,
            args: vec![
                "--cgroup".into(),
                node.cgroup.display().to_string(),
                "--pin-dir".into(),
                pin_dir.display().to_string(),
                "--api-socket".into(),
                socket.display().to_string(),
            ],
            socket,
            pin_dir: pin_dir.into(),
            log: node.dir.join("meshd.log"),
            pidfile: node.dir.join("meshd.pid"),
            marker: node.spec.marker(),
            place: node.spec.placement(),
            owned,
        }
    }

    /// Leaves meshd running when this object is dropped.
    pub fn detach(&mut self) {
        self.owned = false;
    }

    fn spawn(&mut self) -> Result<()> {
        let _ = fs::remove_file(&self.socket);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(bin("meshd"));
        cmd.args(&self.args)
            .env("MESHD_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.daemon = Some(
            Daemon::spawn(&mut cmd, &self.place, &self.marker, Some(&self.pidfile))
                .context("spawn meshd")?,
        );
        wait_for("meshd to be ready", Duration::from_secs(30), || {
            self.status().ok().filter(|s| s["ready"] == true)
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

    /// meshctl's human output.
    pub fn ctl_text(&self, args: &[&str]) -> Result<String> {
        run(Command::new(bin("meshctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args))
    }

    pub fn status(&self) -> Result<Value> {
        self.ctl(&["status"])
    }

    /// Backends meshd programmed for a service's first VIP, as (task IP, node hostname);
    /// None if the service has no VIP here.
    pub fn backend_list(&self, service: &str) -> Option<Vec<(String, String)>> {
        let v = self.ctl(&["service", service]).ok()?;
        let list = v["vips"][0]["backends"].as_array()?;
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        Some(list.iter().map(|b| (s(&b["ip"]), s(&b["node"]))).collect())
    }

    /// Number of backends meshd programmed for a service's first VIP.
    pub fn backends(&self, service: &str) -> Option<usize> {
        self.backend_list(service).map(|l| l.len())
    }

    pub fn wait_backends(&self, service: &str, n: usize) -> Result<()> {
        wait_for(
            &format!("meshd to program {n} backends for {service}"),
            Duration::from_secs(10),
            || (self.backends(service) == Some(n)).then_some(()),
        )
    }

    /// SIGTERM, as `systemctl stop` does; waits for meshd to exit.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(10));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
    }

    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn()
    }

    /// Stops meshd (SIGTERM) and starts it again with `extra` flags added.
    pub fn restart_with_args(&mut self, extra: &[&str]) -> Result<()> {
        self.stop();
        self.args.extend(extra.iter().map(|a| a.to_string()));
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.pid() as u32)
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(Daemon::is_running)
    }
}

impl Drop for Meshd {
    fn drop(&mut self) {
        if self.owned {
            self.kill9();
            let _ = fs::remove_file(&self.socket);
        }
    }
}
