//! `cargo xtask setup | test | lab | bench`: everything a developer or CI runs.
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod bench_control;
mod bench_dns;
mod bench_ingress;
mod bench_l7;
mod bench_l7_reconfig;
mod lab;
mod package;

#[derive(Parser)]
#[command(about = "meshd's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (Debian 12, root). Idempotent.
    Setup,
    /// Set up, build, and run every test: unit, property and end-to-end on a real swarm.
    Test,
    /// A multi-node swarm on this machine with meshd on every node.
    Lab {
        #[command(subcommand)]
        cmd: lab::LabCmd,
    },
    /// Build meshd's Debian package (binaries, unit, /etc/default/meshd, man pages,
    /// completions) into target/debian.
    Package(package::PackageArgs),
    /// Benchmarks; each prints ratios against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

/// Debian packages the build, the lab and the tests use.
const PACKAGES: &[&str] = &[
    // Debian's rustc carries the precompiled `core` for bpfel-unknown-none (LAB.md).
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "docker.io",
    "busybox-static",
    "iproute2",
    // sysctl, for the benchmarks' namespaces.
    "procps",
    "nftables",
    "bpftool",
    "dnsutils",
    "wrk",
    "sockperf",
    "dnsperf",
    "unbound",
    "nginx",
    "curl",
    "jq",
    "openssl",
    "vagrant",
    // The IPVS datapath's test runs in a VM (this kernel has no IPVS; LAB.md); it strips
    // its own binary into the VM's initramfs (objcopy).
    "qemu-system-x86",
    "binutils",
    // `cargo xtask package`: dpkg-shlibdeps computes the package's library dependencies.
    "dpkg-dev",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::Test => {
            setup()?;
            test()
        }
        Cmd::Lab { cmd } => lab::run(cmd),
        Cmd::Package(args) => package::run(args),
        Cmd::Bench { which } => {
            setup()?;
            // Measure what operators run: optimised builds: every binary (meshd, meshctl,
            // labtool for the lab image) and the examples (the hickory-server comparison in
            // `bench dns`). `--examples` alone would build no binary at all.
            cargo(&["build", "--release", "--workspace", "--bins", "--examples"])?;
            std::env::set_var("MESHD_BIN_PROFILE", "release");
            bench::run(which)
        }
    }
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// cargo without the per-package variables `cargo run` gave xtask: build scripts that watch
/// them would otherwise rebuild between `cargo build` and `cargo xtask`.
fn cargo_cmd() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (key, _) in std::env::vars() {
        if key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR" {
            cmd.env_remove(key);
        }
    }
    cmd
}

pub(crate) fn cargo(args: &[&str]) -> Result<()> {
    status(cargo_cmd().args(args))
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect()
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

pub(crate) fn setup() -> Result<()> {
    let debian = Path::new("/etc/debian_version").exists();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc_geteuid() } == 0;
    let missing = if debian {
        missing_packages()
    } else {
        PACKAGES.to_vec()
    };
    let linker = bpf_linker_ok();
    if missing.is_empty() && linker {
        ensure_bpffs();
        return vm_kernel();
    }
    if !debian || !root {
        bail!(
            "cannot install the build and test dependencies here ({}).\n\
             Needed: Debian 12 packages {}\n\
             and bpf-linker {BPF_LINKER_VERSION}: LLVM_PREFIX=/usr/lib/llvm-22 \
             LLVM_SYS_221_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker@{BPF_LINKER_VERSION} \
             --locked --no-default-features --features llvm-22\n\
             Run `cargo xtask setup` as root on Debian 12, or install these by hand.",
            if !debian { "not Debian" } else { "not root" },
            missing.join(" ")
        );
    }
    if !missing.is_empty() {
        eprintln!("xtask setup: installing {}", missing.join(" "));
        status(Command::new("apt-get").args(["update", "-qq"]))?;
        // Services the benchmarks run themselves (nginx, unbound) must not start on install
        // (nginx would take the machine's port 80): installed apart, with a policy-rc.d that
        // tells every init system so. Everything else installs as usual.
        const BASELINES: [&str; 2] = ["nginx", "unbound"];
        let (quiet, usual): (Vec<&str>, Vec<&str>) =
            missing.iter().partition(|p| BASELINES.contains(p));
        let install = |pkgs: &[&str]| -> Result<()> {
            if pkgs.is_empty() {
                return Ok(());
            }
            status(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(pkgs)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )
        };
        install(&usual)?;
        let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
        let ours = !quiet.is_empty()
            && !policy.exists()
            && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok()
            && std::fs::set_permissions(
                policy,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .is_ok();
        let installed = install(&quiet);
        if ours {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
        if missing.contains(&"nginx") {
            // nginx is only `bench l7`'s baseline, run by the benchmark itself.
            eprintln!("xtask setup: nginx installed for `bench l7`; disabling its service");
            let _ = Command::new("systemctl")
                .args(["disable", "--now", "nginx.service"])
                .stderr(std::process::Stdio::null())
                .status();
        }
        if missing.contains(&"unbound") {
            // unbound is only the DNS benchmark's baseline, run by the benchmark itself:
            // don't leave a resolver the machine's owner never asked for running on :53.
            eprintln!("xtask setup: unbound installed for `bench dns`; disabling its service");
            let _ = Command::new("systemctl")
                .args(["disable", "--now", "unbound.service"])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    if !bpf_linker_ok() {
        eprintln!("xtask setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (~3 min)");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        status(
            Command::new(cargo)
                .args([
                    "install",
                    &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                    "--locked",
                ])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    ensure_bpffs();
    vm_kernel()
}

/// Debian's kernel (the one `linux-image-amd64` names), extracted into `target/vm/kernel`
/// for the IPVS test's VM, once.
fn vm_kernel() -> Result<()> {
    let vm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm");
    let dir = vm.join("kernel");
    if dir.join("boot").is_dir() {
        return Ok(());
    }
    let depends = String::from_utf8(
        Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .output()
            .context("apt-cache depends linux-image-amd64")?
            .stdout,
    )?;
    let package = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .filter(|p| p.starts_with("linux-image-"))
        .context("linux-image-amd64 names no kernel package")?
        .trim()
        .to_string();
    eprintln!("xtask setup: fetching {package} for the IPVS test's VM");
    std::fs::create_dir_all(&vm)?;
    status(
        Command::new("apt-get")
            .args(["download", "-qq", &package])
            .current_dir(&vm),
    )?;
    let deb = std::fs::read_dir(&vm)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .context("the downloaded kernel package")?;
    let partial = vm.join("kernel.partial");
    let _ = std::fs::remove_dir_all(&partial);
    status(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
    std::fs::rename(&partial, &dir)?;
    let _ = std::fs::remove_file(&deb);
    Ok(())
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// meshd mounts bpffs itself; mounting here too lets bpftool inspect pins before it runs.
fn ensure_bpffs() {
    let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    });
    if !mounted {
        let _ = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status();
    }
}

fn test() -> Result<()> {
    cargo(&["build", "--workspace"])?;
    // One test at a time: the end-to-end tests each run a swarm, and CI has 2 cores.
    let mut child = cargo_cmd()
        .args(["test", "--workspace", "--", "--test-threads=1"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    for line in std::io::BufRead::lines(out) {
        let line = line?;
        println!("{line}");
        // "test result: ok. 20 passed; 0 failed; ..."
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .split_whitespace()
                            .last()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += num(" passed");
            failed += num(" failed");
        }
    }
    let st = child.wait()?;
    println!("tests: {passed} passed, {failed} failed");
    if !st.success() || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}
