//! Builds the eBPF programs (meshd-ebpf) and leaves the object in OUT_DIR for `include_bytes!`.
//!
//! The bpf target's `core` comes from Debian's `libstd-rust-web-dev-bpf`, which matches
//! Debian's rustc, not rustup's: so the nested build runs `/usr/bin/cargo` with
//! `/usr/bin/rustc`, with the outer cargo's environment cleared. `cargo xtask setup` installs
//! both and bpf-linker.
use std::{env, path::PathBuf, process::Command};

const DEBIAN_CARGO: &str = "/usr/bin/cargo";
const DEBIAN_RUSTC: &str = "/usr/bin/rustc";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
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
    if !missing.is_empty() || which("bpf-linker").is_none() {
        panic!(
            "building the eBPF programs needs Debian's rustc-web ({DEBIAN_RUSTC}, {DEBIAN_CARGO}), \
             libstd-rust-web-dev-bpf and bpf-linker on PATH; run `cargo xtask setup` as root"
        );
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

fn which(bin: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(bin))
        .find(|p| p.is_file())
}
