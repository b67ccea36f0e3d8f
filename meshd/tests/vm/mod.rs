//! A QEMU VM for the tests that need a kernel this machine lacks (IPVS: LAB.md) or a
//! systemd as PID 1 (the package test). The test binary boots Debian's kernel (fetched by
//! `cargo xtask setup` into `target/vm/kernel`) with an initramfs holding busybox, the
//! modules, the programs asked for, and the test binary itself, which runs again inside
//! (`MESHD_IN_VM` set) and reports through the console and QEMU's `isa-debug-exit` device.
//! It runs as init's child ([`Boot::Busybox`]), or as a service of this machine's own
//! systemd, booted from this machine's root shared read-only over 9p under a throwaway
//! tmpfs overlay ([`Boot::HostSystemd`]): whatever the test installs is gone with the VM.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
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
    /// Shell lines init runs before the test (under `Boot::HostSystemd`: before systemd
    /// starts, with the new root at /newroot).
    pub setup: &'a str,
    pub boot: Boot,
    pub memory_mb: u32,
    pub cpus: u32,
    /// QEMU is ended after this long.
    pub timeout_s: u32,
}

/// How the test runs inside.
pub enum Boot {
    /// busybox init runs it, everything in the initramfs.
    Busybox,
    /// This machine's root (9p, read-only, under a tmpfs overlay) boots its own systemd
    /// into a target whose one service runs the test with these variables.
    // Each test crate builds this module; only the package test boots systemd.
    #[allow(dead_code)]
    HostSystemd { env: Vec<(String, String)> },
}

/// The host root: 9p over virtio-pci, and the overlay on it (load order).
const HOST_ROOT_MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "net/9p/9pnet.ko",
    "net/9p/9pnet_virtio.ko",
    "fs/netfs/netfs.ko",
    "fs/fscache/fscache.ko",
    "fs/9p/9p.ko",
    "fs/overlayfs/overlay.ko",
];

/// Whether this process is the copy running inside the VM.
/// Polls `f` until it gives a value or `deadline` passes (then panics with `what`); used
/// inside the VM, where the test is a plain process.
#[allow(dead_code)] // not every VM test waits for something
pub fn until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

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
    let mut qemu = Command::new("timeout");
    qemu.args(["-k", "5", &vm.timeout_s.to_string(), "qemu-system-x86_64"])
        .args(["-accel", "tcg", "-nographic", "-no-reboot"])
        .args(["-m", &vm.memory_mb.to_string()])
        .args(["-smp", &vm.cpus.to_string()])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    match vm.boot {
        Boot::Busybox => qemu.args(["-append", "console=ttyS0 quiet panic=-1"]),
        Boot::HostSystemd { .. } => qemu
            .args([
                "-virtfs",
                "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            ])
            .args([
                "-append",
                "console=ttyS0 quiet panic=-1 systemd.show_status=false",
            ]),
    };
    let status = qemu
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
    let root_modules = match vm.boot {
        Boot::Busybox => &[][..],
        Boot::HostSystemd { .. } => HOST_ROOT_MODULES,
    };
    for m in BASE_MODULES.iter().chain(root_modules).chain(vm.modules) {
        let name = Path::new(m).file_name().unwrap();
        std::fs::copy(mods.join(m), root.join("mods").join(name))
            .unwrap_or_else(|e| panic!("module {m}: {e}"));
        load.push_str(&format!(
            "insmod /mods/{} || echo \"vm: insmod {m} failed\"\n",
            name.to_string_lossy()
        ));
    }
    let exe = std::env::current_exe().unwrap();
    // The test's exit status, through isa-debug-exit (QEMU ends at once).
    let report = "rc=$?\necho \"vm: test exited $rc\"\n\
         printf \"\\\\$(printf %03o $rc)\" | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null\n";
    if let Boot::HostSystemd { env } = &vm.boot {
        // Everything else, the test binary too, is on the host root at its own path.
        host_systemd_init(&root, vm, env, &exe, &load, report);
        return pack(&root, work);
    }
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
             {report}poweroff -f\n",
        setup = vm.setup,
        test = vm.test,
    );
    write_exec(&root.join("init"), &init);
    pack(&root, work)
}

fn write_exec(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// The init of `Boot::HostSystemd`: mounts this machine's root (9p) under a tmpfs overlay,
/// gives it a target whose one service runs the test (from its path on this machine, the
/// same inside), keeps out what this machine would start but the test does not need, and
/// hands over to systemd.
fn host_systemd_init(
    root: &Path,
    vm: &Vm,
    env: &[(String, String)],
    exe: &Path,
    load: &str,
    report: &str,
) {
    let vars: String = [("MESHD_IN_VM", "1"), ("RUST_BACKTRACE", "1")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(env.iter().cloned())
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    write_exec(
        &root.join("vm-test"),
        &format!(
            "#!/bin/sh\n{vars}{exe} --exact {test} --nocapture --test-threads 1\n{report}",
            exe = exe.display(),
            test = vm.test,
        ),
    );
    let units = "[Unit]\nDescription=meshd VM test\nRequires=meshd-vm-test.service\n\
                 After=meshd-vm-test.service\nAllowIsolate=yes\n";
    let service = "[Unit]\nDescription=meshd VM test\nAfter=basic.target\n\
                   [Service]\nType=oneshot\nExecStart=/vm-test\n\
                   StandardOutput=tty\nStandardError=tty\nTTYPath=/dev/ttyS0\n";
    // What this machine enables that a package test does not want started (Docker; the
    // network clock). Its /.dockerenv would make systemd take the VM for a container.
    // Timers too: a catch-up apt run would hold dpkg's lock.
    let masked = "docker.socket docker.service containerd.service systemd-timesyncd.service \
                  apt-daily.timer apt-daily-upgrade.timer man-db.timer dpkg-db-backup.timer \
                  e2scrub_all.timer fstrim.timer";
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         {load}\
         mkdir -p /host /rw /newroot\n\
         mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro hostroot /host\n\
         mount -t tmpfs rw /rw\nmkdir -p /rw/upper /rw/work\n\
         mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot\n\
         cp /vm-test /newroot/vm-test\n\
         : > /newroot/etc/fstab\nrm -f /newroot/.dockerenv\n\
         u=/newroot/etc/systemd/system\nmkdir -p $u\n\
         printf '{units}' > $u/meshd-vm-test.target\n\
         printf '{service}' > $u/meshd-vm-test.service\n\
         for m in {masked}; do ln -sf /dev/null $u/$m; done\n\
         {setup}\n\
         umount /proc /sys /dev\n\
         exec switch_root /newroot /lib/systemd/systemd --unit=meshd-vm-test.target\n\
         echo 'vm: switch_root failed'\n{report}",
        setup = vm.setup,
    );
    write_exec(&root.join("init"), &init);
}

/// The initramfs: `root` as a gzipped newc cpio.
fn pack(root: &Path, work: &Path) -> PathBuf {
    let initrd = work.join("initrd.gz");
    run(Command::new("sh").current_dir(root).arg("-c").arg(format!(
        "find . | /bin/busybox cpio -o -H newc 2>/dev/null | gzip -1 > {}",
        initrd.display()
    )));
    initrd
}
