//! Builds the eBPF programs (meshd-ebpf) and leaves the object in OUT_DIR for `include_bytes!`.
//!
//! The bpf target's `core` comes from Debian's `libstd-rust-web-dev-bpf`, which matches
//! Debian's rustc, not rustup's: so the nested build runs `/usr/bin/cargo` with
//! `/usr/bin/rustc`, with the outer cargo's environment cleared. `cargo xtask setup` installs
//! both and bpf-linker.
use std::{env, path::PathBuf, process::Command};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

/// The git revision built (`meshd --version`), or "unknown" outside a checkout.
fn git_revision(manifest_dir: &std::path::Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(manifest_dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(rev) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{rev}-modified")
    } else {
        rev
    }
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    println!(
        "cargo:rustc-env=MESHD_GIT_REV={}",
        git_revision(&manifest_dir)
    );
    for f in ["HEAD", "index"] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join("../.git").join(f).display()
        );
    }
    let ebpf_dir = manifest_dir.join("../meshd-ebpf");
    let common_dir = manifest_dir.join("../meshd-common");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    for dir in [&ebpf_dir, &common_dir] {
        println!("cargo:rerun-if-changed={}", dir.join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("Cargo.toml").display()
        );
    }
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.lock").display()
    );

    let missing: Vec<&str> = [DEBIAN_CARGO, DEBIAN_RUSTC]
        .into_iter()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    // Built again once the toolchain appears or changes (a path that does not exist yet
    // counts as changed on every build).
    for p in [DEBIAN_CARGO, DEBIAN_RUSTC] {
        println!("cargo:rerun-if-changed={p}");
    }
    let linker = which("bpf-linker");
    println!(
        "cargo:rerun-if-changed={}",
        linker.clone().unwrap_or_else(home_linker).display()
    );
    if !missing.is_empty() || linker.is_none() {
        // `cargo xtask setup` installs the toolchain, and xtask links meshd's library (for
        // its benchmarks): so meshd must build without it. It then holds no programs, and a
        // meshd built so refuses to start its eBPF datapath, saying why.
        println!(
            "cargo:warning=building the eBPF programs needs Debian's rustc-web ({DEBIAN_RUSTC}, \
             {DEBIAN_CARGO}), libstd-rust-web-dev-bpf and bpf-linker on PATH; run `cargo xtask \
             setup` as root. This build holds no eBPF programs."
        );
        std::fs::write(out_dir.join("meshd-ebpf.o"), []).expect("write the empty object");
        return;
    }

    let target_dir = out_dir.join("ebpf-target");
    let mut cmd = Command::new(DEBIAN_CARGO);
    for (key, _) in env::vars() {
        if key.starts_with("CARGO")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || key == "RUSTFLAGS"
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .current_dir(&ebpf_dir)
        .env("RUSTC", DEBIAN_RUSTC)
        // meshd_ebpf: for `core::intrinsics::atomic_xadd` (see its `count_one`).
        .env("RUSTC_BOOTSTRAP", "aya_ebpf,meshd_ebpf")
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .expect("run /usr/bin/cargo for meshd-ebpf");
    if !status.success() {
        panic!("building meshd-ebpf failed ({status})");
    }
    let object = target_dir.join("bpfel-unknown-none/release/meshd-ebpf");
    std::fs::copy(&object, out_dir.join("meshd-ebpf.o")).expect("copy the eBPF object");
}

/// Where `cargo install` (as `cargo xtask setup` runs it) puts bpf-linker.
fn home_linker() -> PathBuf {
    let home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin/bpf-linker")
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}
