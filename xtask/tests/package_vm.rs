//! `cargo xtask package` and the package's life on a real systemd: the .deb is built from
//! the workspace's debug binaries, then a QEMU VM boots this machine's own root (read-only,
//! under a throwaway overlay) with systemd as PID 1, and the test, as a service there,
//! does what an operator does: installs it as the Vagrant lab provisions a node
//! (`vagrant/provision/common.sh`: apt-get), `systemd-analyze verify`, meshd running under
//! its unit (capabilities bounded, warnings in the journal as warnings), an edited
//! `/etc/default/meshd` kept and used across a reinstall (`dpkg -i`), `systemctl stop`, `dpkg -r`
//! (meshd stopped, its programs and pins gone, the conffile kept) and `dpkg -P` (nothing
//! left). This machine runs no systemd (LAB.md), hence the VM.
#[path = "../../meshd/tests/vm/mod.rs"]
#[allow(dead_code)]
mod vm;

use vm::until;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

const TEST: &str = "package_installs_runs_and_purges_under_systemd";

#[test]
fn package_installs_runs_and_purges_under_systemd() {
    if vm::inside() {
        vm::report(in_vm::checks);
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bins = repo.join("target/debug");
    for b in ["meshd", "meshctl"] {
        assert!(
            bins.join(b).is_file(),
            "{} is missing: `cargo build --workspace` first (`cargo xtask test` does)",
            bins.join(b).display()
        );
    }
    // Under target/: the VM sees this machine's root, where /tmp may be another mount.
    let out = repo.join(format!("target/package-test-{}", std::process::id()));
    let _clean = Cleanup(out.clone());
    let built = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("package")
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run xtask package");
    assert!(
        built.status.success(),
        "xtask package failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = PathBuf::from(String::from_utf8(built.stdout).unwrap().trim());
    assert!(deb.is_file(), "xtask package printed {}", deb.display());
    let deb = deb.canonicalize().unwrap();
    vm::boot(&vm::Vm {
        test: TEST,
        modules: &[],
        programs: &[],
        binaries: &[],
        // The machine's own policy-rc.d (a container-image habit) would keep dpkg from
        // starting services; the VM is a real node. man-db's trigger would re-index every
        // man page under emulation (minutes): off, as `man-db/auto-update false` does.
        setup: "rm -f /newroot/usr/sbin/policy-rc.d /newroot/var/lib/man-db/auto-update",
        boot: vm::Boot::HostSystemd {
            env: vec![("MESHD_TEST_DEB".into(), deb.display().to_string())],
        },
        memory_mb: 2048,
        cpus: 2,
        timeout_s: 300,
    });
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

mod in_vm {
    use super::*;

    /// Runs a command; (success, stdout, stderr).
    fn sh(cmd: &str) -> (bool, String, String) {
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a command that must succeed within two minutes, its output on the console
    /// (dpkg's maintainer scripts say what they do).
    fn shown(cmd: &str) {
        let status = Command::new("timeout")
            .args(["120", "sh", "-c", cmd])
            .status()
            .unwrap();
        assert!(status.success(), "`{cmd}`: {status}");
    }

    /// Runs a command that must succeed; its stdout.
    fn ok(cmd: &str) -> String {
        let (good, out, err) = sh(cmd);
        assert!(good, "`{cmd}` failed:\n{out}{err}");
        out
    }

    fn main_pid() -> u32 {
        ok("systemctl show -p MainPID --value meshd")
            .trim()
            .parse()
            .unwrap()
    }

    /// meshd answering meshctl over its socket: its status as JSON.
    fn answering() -> serde_json::Value {
        until("meshd to answer meshctl", Duration::from_secs(90), || {
            let (good, out, _) = sh("meshctl --json status");
            good.then(|| serde_json::from_str(&out).ok()).flatten()
        })
    }

    fn active() -> String {
        sh("systemctl is-active meshd").1.trim().to_string()
    }

    pub fn checks() {
        let deb = std::env::var("MESHD_TEST_DEB").unwrap();
        let t0 = Instant::now();
        let say = |what: &str| println!("vm: {:>5.1} s  {what}", t0.elapsed().as_secs_f64());
        say("systemd booted; installing");
        assert!(
            !Path::new("/usr/bin/meshd").exists(),
            "meshd before dpkg -i"
        );

        // The first install the way the Vagrant lab provisions a node (apt-get, the
        // package found in its directory).
        let provision =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../vagrant/provision/common.sh");
        let dir = Path::new(&deb).parent().unwrap();
        shown(&format!(
            "MESHD_PACKAGES={} sh {}",
            dir.display(),
            provision.display()
        ));
        for f in [
            "/usr/bin/meshd",
            "/usr/bin/meshctl",
            "/lib/systemd/system/meshd.service",
            "/etc/default/meshd",
            "/usr/share/bash-completion/completions/meshctl",
            "/usr/share/zsh/vendor-completions/_meshctl",
            "/usr/share/fish/vendor_completions.d/meshctl.fish",
            "/usr/share/doc/meshd/copyright",
        ] {
            assert!(Path::new(f).is_file(), "{f} not installed");
        }
        assert!(ok("zcat /usr/share/man/man8/meshd.8.gz").contains(".TH meshd 8"));
        assert!(ok("zcat /usr/share/man/man1/meshctl.1.gz").contains(".TH meshctl 1"));
        assert!(ok("cat /usr/share/bash-completion/completions/meshctl").contains("complete -F"));
        // Every packaged file as dpkg recorded it.
        let verify = ok("dpkg --verify meshd");
        assert!(verify.trim().is_empty(), "dpkg --verify: {verify}");
        let (good, out, err) = sh("systemd-analyze verify meshd.service");
        let about_ours: Vec<&str> = err
            .lines()
            .chain(out.lines())
            .filter(|l| l.contains("meshd.service"))
            .collect();
        assert!(
            good && about_ours.is_empty(),
            "systemd-analyze verify: {out}{err}"
        );
        say("installed: files, man pages, completions, dpkg --verify, systemd-analyze verify");

        assert_eq!(ok("systemctl is-enabled meshd").trim(), "enabled");
        until("meshd active", Duration::from_secs(60), || {
            (active() == "active").then_some(())
        });
        let status = answering();
        let version = ok("dpkg-query -W -f '${Version}' meshd");
        let rev = version.rsplit('.').next().unwrap();
        assert!(
            status["version"].as_str().unwrap().contains(rev),
            "meshd {} is not the packaged {version}",
            status["version"]
        );
        assert_eq!(
            status["datapath"]["kind"], "ebpf",
            "this kernel has the socket hooks: {status}"
        );
        let pid = main_pid();
        // The unit's capability bounding set reaches the process: BPF, PERFMON,
        // NET_ADMIN, SYS_ADMIN and nothing else.
        let caps = ok(&format!("grep CapBnd /proc/{pid}/status"));
        let want = (1u64 << 39) | (1 << 38) | (1 << 21) | (1 << 12);
        assert_eq!(
            u64::from_str_radix(caps.split_whitespace().nth(1).unwrap(), 16).unwrap(),
            want,
            "{caps}"
        );
        assert!(Path::new("/sys/fs/bpf/meshd").is_dir(), "no pins");
        // No Docker here: meshd says so as a warning (priority 4), never as an error.
        until(
            "meshd's warning in the journal",
            Duration::from_secs(60),
            || {
                let w = sh("journalctl -u meshd -p warning -o cat --no-pager").1;
                w.contains("cannot read this node's engine").then_some(())
            },
        );
        let errors = sh("journalctl -u meshd -p err -o cat --no-pager").1;
        assert!(
            !errors.contains("cannot read this node's engine"),
            "a warning logged as an error: {errors}"
        );
        say("running under systemd: enabled, answering meshctl, eBPF, capabilities bounded, journal priorities");

        // The operator's /etc/default/meshd survives a reinstall, which restarts meshd
        // with it.
        ok("sed -i 's|^MESHD_ARGS=\"|MESHD_ARGS=\"--metrics 127.0.0.1:9478 |' /etc/default/meshd");
        shown(&format!("dpkg -i {deb}"));
        assert!(ok("cat /etc/default/meshd").contains("--metrics 127.0.0.1:9478"));
        until("meshd restarted", Duration::from_secs(60), || {
            let p = main_pid();
            (p != 0 && p != pid && active() == "active").then_some(())
        });
        answering();
        let metrics = until(
            "metrics from the edited arguments",
            Duration::from_secs(60),
            || {
                let (good, out, _) = sh("curl -sf http://127.0.0.1:9478/metrics");
                good.then_some(out)
            },
        );
        assert!(metrics.contains("meshd_"), "{metrics}");
        say("reinstalled: edited conffile kept, meshd restarted with it");

        ok("systemctl stop meshd");
        assert_eq!(active(), "inactive");
        assert_eq!(main_pid(), 0);
        assert!(
            Path::new("/sys/fs/bpf/meshd").is_dir(),
            "a stopped meshd keeps its pins (the datapath forwards while it restarts)"
        );
        ok("systemctl start meshd");
        answering();
        let pid = main_pid();
        say("stopped (pins kept) and started again");

        // Removal stops meshd and takes its datapath with it; the conffile stays.
        shown("dpkg -r meshd");
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "meshd still runs"
        );
        for gone in [
            "/usr/bin/meshd",
            "/usr/bin/meshctl",
            "/lib/systemd/system/meshd.service",
            "/sys/fs/bpf/meshd",
        ] {
            assert!(!Path::new(gone).exists(), "{gone} left after dpkg -r");
        }
        assert!(Path::new("/etc/default/meshd").exists());
        assert_ne!(active(), "active");
        assert!(ok("dpkg-query -W -f '${Status}' meshd").contains("config-files"));
        say("removed: meshd stopped, programs and pins gone, conffile kept");

        shown("dpkg -P meshd");
        for gone in [
            "/etc/default/meshd",
            "/etc/systemd/system/multi-user.target.wants/meshd.service",
        ] {
            assert!(
                std::fs::symlink_metadata(gone).is_err(),
                "{gone} left after dpkg -P"
            );
        }
        assert!(!sh("dpkg-query -W meshd").0, "dpkg still knows meshd");
        say("purged: nothing left");
    }
}
