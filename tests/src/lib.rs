//! Harness for end-to-end tests and benchmarks: real dockerd swarm nodes, each in its own
//! network namespace with its own data-root, exec-root, socket and cgroup parent, and real
//! meshd processes. Everything a harness object made is removed when it is dropped, even when
//! the test fails half-way.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod container;
pub mod dns_fixture;
pub mod fake_docker;
pub mod fault_proxy;
pub mod image;
pub mod lab;
pub mod meshd_proc;
pub mod node;
pub mod proc;

pub use lab::{Lab, LabSpec};
pub use meshd_proc::{Meshd, PinGuard};
pub use node::Node;

pub const IMAGE: &str = "meshlab:1";
/// A lab-image web server that answers every request with its container's hostname.
pub const WEB_CMD: &str = "hostname > /www/index.html; exec httpd -f -p 80 -h /www";

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
    // Benchmarks run release builds (`MESHD_BIN_PROFILE=release`); tests the debug ones.
    let profile = std::env::var("MESHD_BIN_PROFILE").unwrap_or_else(|_| "debug".into());
    let p = dir.join(profile).join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (with --release for benchmarks) first",
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

pub(crate) fn sh(args: &[&str]) -> Result<String> {
    run(Command::new(args[0]).args(&args[1..]))
}

/// A unique short tag for this process's objects: names stay under the kernel's 15-char
/// interface limit and never collide with another run.
pub fn run_tag() -> String {
    format!("mt{}", std::process::id() % 100_000)
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

/// A self-signed certificate for `host` as `<name>.crt` and `<name>.key` in `dir`; its
/// serial number.
pub fn self_signed(dir: &Path, name: &str, host: &str) -> Result<String> {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    // Written beside and renamed: meshd never reads half a file.
    let (tmp_crt, tmp_key) = (
        dir.join(format!(".{name}.crt")),
        dir.join(format!(".{name}.key")),
    );
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={host}"),
            "-addext",
            &format!("subjectAltName=DNS:{host}"),
            "-keyout",
        ])
        .arg(&tmp_key)
        .arg("-out")
        .arg(&tmp_crt))?;
    std::fs::rename(&tmp_key, &key)?;
    std::fs::rename(&tmp_crt, &crt)?;
    let serial = run(Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(&crt))?;
    Ok(serial.trim().to_string())
}

/// A CA (`<ca>.crt`, `<ca>.key` in `dir`, made if missing) and a certificate for `host` it
/// signed (`<name>.crt`, `<name>.key`): what a task serving TLS to meshd shows.
pub fn ca_signed(dir: &Path, ca: &str, name: &str, host: &str) -> Result<()> {
    let p = |n: &str, ext: &str| dir.join(format!("{n}.{ext}"));
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    if !p(ca, "crt").exists() {
        run(Command::new("openssl")
            .args(["req", "-x509", "-days", "2", "-subj", &format!("/CN={ca}")])
            .args(ec)
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .arg("-keyout")
            .arg(p(ca, "key"))
            .arg("-out")
            .arg(p(ca, "crt")))?;
    }
    run(Command::new("openssl")
        .args(["req", "-new", "-subj", &format!("/CN={host}")])
        .args(ec)
        .arg("-keyout")
        .arg(p(name, "key"))
        .arg("-out")
        .arg(p(name, "csr")))?;
    std::fs::write(p(name, "ext"), format!("subjectAltName=DNS:{host}\n"))?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in"])
        .arg(p(name, "csr"))
        .arg("-CA")
        .arg(p(ca, "crt"))
        .arg("-CAkey")
        .arg(p(ca, "key"))
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(p(name, "ext"))
        .arg("-out")
        .arg(p(name, "crt")))?;
    Ok(())
}
