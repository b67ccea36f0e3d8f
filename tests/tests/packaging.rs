//! The files that install meshd on real machines: the systemd unit (shipped by the Debian
//! package, whose life under systemd `xtask/tests/package_vm.rs` tests) and the Vagrant lab.
use std::{fs, path::PathBuf, process::Command};

use meshd_tests::{bin, run, run_tag, workspace_root};

/// A tool these tests need: in CI its absence is a failure, elsewhere a loud skip.
fn have(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test} needs {tool} (CI=true: run `cargo xtask setup`)");
        }
        eprintln!("SKIPPED {test}: {tool} is not installed (`cargo xtask setup`)");
    }
    found
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn unit_text() -> String {
    fs::read_to_string(workspace_root().join("meshd/debian/meshd.service")).unwrap()
}

/// The value of `key=` in the unit (the last assignment wins, as in systemd).
fn unit_value(key: &str) -> String {
    unit_text()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    if !have(
        "systemd-analyze",
        "systemd_unit_passes_systemd_analyze_verify",
    ) {
        return;
    }
    // An offline root: the system's own units (docker.service, targets), the unit, and the
    // binary its ExecStart names, so verify checks everything without installing anything.
    let root = TempDir(PathBuf::from(format!("/tmp/meshd-unit-{}", run_tag())));
    let r = &root.0;
    for d in ["usr/bin", "etc/systemd/system", "lib/systemd"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    run(Command::new("cp")
        .args(["-a", "/lib/systemd/system"])
        .arg(r.join("lib/systemd/")))
    .unwrap();
    fs::copy(bin("meshd"), r.join("usr/bin/meshd")).unwrap();
    let unit = r.join("etc/systemd/system/meshd.service");
    fs::write(&unit, unit_text()).unwrap();
    // `Documentation=man:` is looked up on this machine, not in the root: the man pages are
    // checked where the package installs them (xtask/tests/package_vm.rs).
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", r.display()))
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

#[test]
fn systemd_unit_restarts_after_docker_with_only_the_capabilities_meshd_needs() {
    assert_eq!(unit_value("Restart"), "always");
    assert!(unit_value("After")
        .split_whitespace()
        .any(|u| u == "docker.service"));
    assert!(unit_value("Wants")
        .split_whitespace()
        .any(|u| u == "docker.service"));
    let mut caps: Vec<String> = unit_value("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_string)
        .collect();
    caps.sort();
    assert_eq!(
        caps,
        ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON", "CAP_SYS_ADMIN"]
    );
    assert_eq!(unit_value("NoNewPrivileges"), "yes");
    assert_eq!(unit_value("StandardOutput"), "journal");
    assert_eq!(unit_value("StandardError"), "journal");
    assert_eq!(unit_value("ExecStart"), "/usr/bin/meshd $MESHD_ARGS");
}

#[test]
fn vagrantfile_validates() {
    if !have("vagrant", "vagrantfile_validates") {
        return;
    }
    // No VM provider can run here (LAB.md: no KVM for guests, no VirtualBox), so provider
    // blocks are skipped; the machines, networks, folders and provisioners are checked.
    let out = run(Command::new("vagrant")
        .args(["validate", "--ignore-provider"])
        .current_dir(workspace_root().join("vagrant"))
        .env("VAGRANT_CHECKPOINT_DISABLE", "1"))
    .unwrap();
    assert!(out.contains("validated successfully"), "{out}");
}

#[test]
fn provisioning_scripts_parse_and_tls_script_makes_a_working_chain() {
    let dir = workspace_root().join("vagrant/provision");
    for script in ["common.sh", "manager.sh", "worker.sh", "tls.sh"] {
        run(Command::new("sh").arg("-n").arg(dir.join(script)))
            .unwrap_or_else(|e| panic!("{script}: {e:#}"));
    }
    let out = TempDir(PathBuf::from(format!("/tmp/meshd-tls-{}", run_tag())));
    run(Command::new("sh")
        .arg(dir.join("tls.sh"))
        .arg(&out.0)
        .args(["10.20.0.11", "10.20.0.12"]))
    .unwrap();
    let verify = run(Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(out.0.join("ca.pem"))
        .arg(out.0.join("server.pem"))
        .arg(out.0.join("client.pem")))
    .unwrap();
    assert_eq!(verify.matches(": OK").count(), 2, "{verify}");
    let text = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(out.0.join("server.pem")))
    .unwrap();
    assert!(text.contains("IP Address:10.20.0.11") && text.contains("IP Address:10.20.0.12"));
    // Keys are private to their owner.
    for key in ["ca-key.pem", "server-key.pem", "client-key.pem"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(out.0.join(key)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{key} is readable by others: {mode:o}");
    }
}
