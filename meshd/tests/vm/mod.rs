//! A QEMU VM for the tests that need a kernel this machine lacks (IPVS: LAB.md). The test
//! binary boots Debian's kernel (fetched by `cargo xtask setup` into `target/vm/kernel`)
//! with an initramfs holding busybox, the modules, the programs asked for, and the test
//! binary itself, which runs again inside as init's child (`MESHD_IN_VM` set) and reports
//! through the console and QEMU's `isa-debug-exit` device.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

const MARK: &str = "MESHD-VM-RESULT";

/// Modules every VM loads, in load order (`ip_vs` needs conntrack, which needs the defrag
/// modules and crc32c).
pub const BASE_MODULES: &[&str] = &[
    "crypto/crc32c_generic.ko",
    "lib/libcrc32c.ko",
    "net/ipv4/netfilter/nf_defrag_ipv4.ko",
    "net/ipv6/netfilter/nf_defrag_ipv6.ko",
    "net/netfilter/nf_conntrack.ko",
    "net/netfilter/ipvs/ip_vs.ko",
    "net/netfilter/ipvs/ip_vs_rr.ko",
    "net/netfilter/nfnetlink.ko",
    "net/netfilter/nf_tables.ko",
    "drivers/net/veth.ko",
];

/// One VM run.
pub struct Vm<'a> {
    /// The test function the binary runs inside (`--exact`).
    pub test: &'a str,
    /// Modules loaded after `BASE_MODULES`, in order.
    pub modules: &'a [&'a str],
    /// Programs copied at their own paths, with the libraries they link.
    pub programs: &'a [&'a str],
    /// Binaries copied without their debug info to `/bin/NAME`, with their libraries.
    pub binaries: &'a [(&'a Path, &'a str)],
    /// Shell lines init runs before the test.
    pub setup: &'a str,
    pub memory_mb: u32,
    pub cpus: u32,
    /// QEMU is ended after this long.
    pub timeout_s: u32,
}

/// Whether this process is the copy running inside the VM.
pub fn inside() -> bool {
    std::env::var_os("MESHD_IN_VM").is_some()
}

/// Inside: runs the checks and reports how they went.
pub fn report(checks: impl FnOnce() + std::panic::UnwindSafe) {
    match std::panic::catch_unwind(checks) {
        Ok(()) => println!("{MARK} ok"),
        Err(_) => {
            println!("{MARK} failed");
            std::process::exit(1);
        }
    }
}

/// Outside: boots the VM and asserts the test inside passed; prints its `vm:` lines.
pub fn boot(vm: &Vm) {
    let Some(kernel) = kernel_dir(vm.test) else {
        return;
    };
    let work = tempdir(vm.test);
    let initrd = build_initramfs(vm, &kernel, &work.0);
    let vmlinuz = std::fs::read_dir(kernel.join("boot"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .expect("a vmlinuz in the kernel package");
    let log = work.0.join("console.log");
    let started = std::time::Instant::now();
    let status = Command::new("timeout")
        .args(["-k", "5", &vm.timeout_s.to_string(), "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-nographic", "-no-reboot"])
        .args(["-m", &vm.memory_mb.to_string()])
        .args(["-smp", &vm.cpus.to_string()])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::inherit())
        .status()
        .expect("run qemu-system-x86_64 (cargo xtask setup installs it)");
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let tail: String = console
        .lines()
        .filter(|l| !l.contains('\u{1b}'))
        .collect::<Vec<_>>()
        .join("\n");
    // isa-debug-exit: QEMU exits with (value << 1) | 1; init writes the test's status.
    assert_eq!(
        status.code(),
        Some(1),
        "the VM did not pass (124: timed out). Its console:\n{tail}"
    );
    assert!(
        console.contains(&format!("{MARK} ok")),
        "no result line. Its console:\n{tail}"
    );
    eprintln!(
        "{}\nvm: ran {:.0} s",
        tail.lines()
            .filter(|l| l.starts_with("vm:"))
            .collect::<Vec<_>>()
            .join("\n"),
        started.elapsed().as_secs_f64()
    );
}

/// The extracted kernel package; None (skipped) outside CI when it is not there.
fn kernel_dir(test: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/vm/kernel");
    let have = dir.join("boot").is_dir()
        && Path::new("/usr/bin/qemu-system-x86_64").exists()
        && Path::new("/bin/busybox").exists();
    if have {
        return Some(dir);
    }
    let why = "needs Debian's kernel in target/vm/kernel, qemu-system-x86_64 and busybox-static \
               (`cargo xtask setup` fetches them)";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test} {why} (CI=true: this must run, not skip)");
    }
    eprintln!("skipping {test}: it {why}");
    None
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(test: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("meshd-vm-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// busybox, the modules, the programs and binaries with the libraries they link, this
/// test binary (without its debug info), and an init that runs it.
fn build_initramfs(vm: &Vm, kernel: &Path, work: &Path) -> PathBuf {
    let root = work.join("root");
    for d in [
        "bin", "proc", "sys", "dev", "tmp", "run", "var", "etc", "mods",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let mods = std::fs::read_dir(kernel.join("lib/modules"))
        .unwrap()
        .flatten()
        .next()
        .expect("a modules directory")
        .path()
        .join("kernel");
    let mut load = String::new();
    for m in BASE_MODULES.iter().chain(vm.modules) {
        let name = Path::new(m).file_name().unwrap();
        std::fs::copy(mods.join(m), root.join("mods").join(name))
            .unwrap_or_else(|e| panic!("module {m}: {e}"));
        load.push_str(&format!(
            "insmod /mods/{} || echo \"vm: insmod {m} failed\"\n",
            name.to_string_lossy()
        ));
    }
    let exe = std::env::current_exe().unwrap();
    let strip = |from: &Path, to: &Path| {
        run(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(from)
            .arg(to));
    };
    strip(&exe, &root.join("test"));
    for (from, name) in vm.binaries {
        strip(from, &root.join("bin").join(name));
    }
    // The dynamic loader and libraries, at the paths the binaries name.
    let copy = |p: &Path| {
        let to = root.join(p.strip_prefix("/").unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(p, &to).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    };
    for bin in vm.programs {
        copy(Path::new(bin));
    }
    let linked = vm
        .programs
        .iter()
        .map(Path::new)
        .chain(vm.binaries.iter().map(|(p, _)| *p))
        .chain([exe.as_path()]);
    for bin in linked {
        let out = Command::new("ldd").arg(bin).output().unwrap();
        // A static binary has nothing to copy ("not a dynamic executable").
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                copy(Path::new(p));
            }
        }
    }
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmp /tmp\nmount -t tmpfs run /run\nmount -t tmpfs var /var\n\
         ln -s /run /var/run\n\
         export PATH=/usr/sbin:/usr/bin:/bin\n{load}{setup}\n\
         MESHD_IN_VM=1 RUST_BACKTRACE=1 /test --exact {test} --nocapture --test-threads 1\n\
         rc=$?\necho \"vm: test exited $rc\"\n\
         printf \"\\\\$(printf %03o $rc)\" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null\n\
         poweroff -f\n",
        setup = vm.setup,
        test = vm.test,
    );
    std::fs::write(root.join("init"), init).unwrap();
    std::fs::set_permissions(
        root.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let initrd = work.join("initrd.gz");
    run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
        initrd.display()
    )));
    initrd
}
