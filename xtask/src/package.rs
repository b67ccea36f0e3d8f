//! `cargo xtask package`: meshd's Debian package, assembled with `dpkg-deb` from the built
//! binaries and `meshd/debian/` (the unit, `/etc/default/meshd`, maintainer scripts). Man
//! pages and completions come from the packaged binaries themselves (clap), so they
//! describe exactly what is installed.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct PackageArgs {
    /// Directory the .deb is written to (older meshd_*.deb there are removed) [default:
    /// target/debian].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Package the meshd and meshctl found here instead of building release ones (the
    /// package test uses the debug build).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the repository")
        .to_path_buf()
}

pub fn run(args: PackageArgs) -> Result<()> {
    let repo = repo();
    let bins = match args.bin_dir {
        Some(d) => d,
        None => {
            crate::cargo(&["build", "--release", "-p", "meshd", "--bins"])?;
            repo.join("target/release")
        }
    };
    let out = args.out.unwrap_or_else(|| repo.join("target/debian"));
    let deb = build(&repo, &bins, &out)?;
    println!("{}", deb.display());
    Ok(())
}

fn output(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn text(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8(output(cmd)?)?.trim().to_string())
}

/// The workspace version; from a git checkout, `+git<commits>.<rev>` after it, so that
/// later builds of one version sort later and name what they hold.
fn version(repo: &Path) -> String {
    let base = env!("CARGO_PKG_VERSION");
    let git = |args: &[&str]| text(Command::new("git").arg("-C").arg(repo).args(args)).ok();
    match (
        git(&["rev-list", "--count", "HEAD"]),
        git(&["rev-parse", "--short=10", "HEAD"]),
    ) {
        (Some(n), Some(rev)) => format!("{base}+git{n}.{rev}"),
        _ => base.to_string(),
    }
}

fn write(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    fs::create_dir_all(path.parent().unwrap())?;
    fs::write(path, contents).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// gzip -9n: no name or time stamp inside, so that the same input packs the same.
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-9nc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("run gzip")?;
    let mut stdin = child.stdin.take().unwrap();
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output()?;
    feeder.join().unwrap()?;
    if !out.status.success() {
        bail!("gzip failed");
    }
    Ok(out.stdout)
}

/// What dpkg-shlibdeps says the binaries need (libc6, libgcc-s1 at the versions they use).
fn shared_library_depends(stage: &Path, binaries: &[PathBuf]) -> Result<String> {
    let dir = stage.with_extension("shlibdeps");
    let _ = fs::remove_dir_all(&dir);
    write(
        &dir.join("debian/control"),
        b"Source: meshd\n\nPackage: meshd\nArchitecture: any\n",
        0o644,
    )?;
    let said = text(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .args(binaries.iter().map(|b| {
                let mut a = std::ffi::OsString::from("-e");
                a.push(b);
                a
            }))
            .current_dir(&dir),
    )
    .context("dpkg-shlibdeps (package dpkg-dev)")?;
    let _ = fs::remove_dir_all(&dir);
    said.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .context("dpkg-shlibdeps printed no shlibs:Depends")
}

/// Files under `dir`, relative to it, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                found.push(p.strip_prefix(dir)?.to_path_buf());
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Stages the package's tree under `target/debian/stage` and packs it into `out`.
fn build(repo: &Path, bins: &Path, out: &Path) -> Result<PathBuf> {
    let arch = text(Command::new("dpkg").arg("--print-architecture"))?;
    let version = version(repo);
    let name = format!("meshd_{version}_{arch}");
    let stage = repo.join("target/debian/stage").join(&name);
    let _ = fs::remove_dir_all(&stage);
    let debian = repo.join("meshd/debian");

    // The binaries, without their debug info (the release profile keeps it for profiling).
    let mut installed = Vec::new();
    for b in ["meshd", "meshctl"] {
        let from = bins.join(b);
        if !from.is_file() {
            bail!(
                "{} is missing: build meshd first (or drop --bin-dir)",
                from.display()
            );
        }
        let to = stage.join("usr/bin").join(b);
        fs::create_dir_all(to.parent().unwrap())?;
        output(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(&from)
                .arg(&to),
        )?;
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755))?;
        installed.push(to);
    }
    let (meshd, meshctl) = (&installed[0], &installed[1]);

    let copy = |from: &str, to: &str, mode: u32| -> Result<()> {
        let data = fs::read(debian.join(from)).with_context(|| format!("meshd/debian/{from}"))?;
        write(&stage.join(to), &data, mode)
    };
    copy("meshd.service", "lib/systemd/system/meshd.service", 0o644)?;
    copy("default", "etc/default/meshd", 0o644)?;
    for script in ["postinst", "prerm", "postrm"] {
        copy(script, &format!("DEBIAN/{script}"), 0o755)?;
    }
    write(
        &stage.join("DEBIAN/conffiles"),
        b"/etc/default/meshd\n",
        0o644,
    )?;

    // Man pages and completions, from the binaries' own clap definitions.
    let man8 = output(Command::new(meshd).arg("man"))?;
    write(
        &stage.join("usr/share/man/man8/meshd.8.gz"),
        &gzip(&man8)?,
        0o644,
    )?;
    let man1 = output(Command::new(meshctl).arg("man"))?;
    write(
        &stage.join("usr/share/man/man1/meshctl.1.gz"),
        &gzip(&man1)?,
        0o644,
    )?;
    for (shell, path) in [
        ("bash", "usr/share/bash-completion/completions/meshctl"),
        ("zsh", "usr/share/zsh/vendor-completions/_meshctl"),
        ("fish", "usr/share/fish/vendor_completions.d/meshctl.fish"),
    ] {
        let script = output(Command::new(meshctl).args(["completions", shell]))?;
        write(&stage.join(path), &script, 0o644)?;
    }

    let doc = stage.join("usr/share/doc/meshd");
    write(
        &doc.join("copyright"),
        format!(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
             Upstream-Name: meshd\n\n\
             Files: *\nCopyright: the meshd authors\nLicense: {0}\n \
             On Debian systems the full text of the {0} license is in\n \
             /usr/share/common-licenses/{0}.\n",
            env!("CARGO_PKG_LICENSE")
        )
        .as_bytes(),
        0o644,
    )?;
    write(
        &doc.join("README.md.gz"),
        &gzip(&fs::read(repo.join("README.md"))?)?,
        0o644,
    )?;

    // DEBIAN/md5sums for `dpkg --verify`; conffiles are checked by dpkg on their own.
    let mut sums = String::new();
    for f in files_under(&stage)? {
        if f.starts_with("DEBIAN") || f.starts_with("etc") {
            continue;
        }
        let line = text(Command::new("md5sum").arg(&f).current_dir(&stage))?;
        sums.push_str(&line);
        sums.push('\n');
    }
    write(&stage.join("DEBIAN/md5sums"), sums.as_bytes(), 0o644)?;

    let size_kib: u64 = files_under(&stage)?
        .iter()
        .filter(|f| !f.starts_with("DEBIAN"))
        .map(|f| fs::metadata(stage.join(f)).map_or(0, |m| m.len().div_ceil(1024)))
        .sum();
    let depends = shared_library_depends(&stage, &installed)?;
    let control = format!(
        "Package: meshd\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: meshd developers <meshd@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: {depends}\n\
         Recommends: docker.io | docker-ce, nftables, kmod\n\
         Section: net\n\
         Priority: optional\n\
         Description: service networking for Docker Swarm on a kernel datapath\n \
         meshd gives every swarm service its virtual IP with eBPF socket-level load\n \
         balancing (IPVS where the kernel lacks the hooks), answers published ports on\n \
         every node, serves the embedded 127.0.0.11 DNS and routes HTTP by host name\n \
         from com.docker.lb.* service labels. One daemon per node (meshd.service);\n \
         meshctl inspects it.\n"
    );
    write(&stage.join("DEBIAN/control"), control.as_bytes(), 0o644)?;

    fs::create_dir_all(out)?;
    let deb = out.join(format!("{name}.deb"));
    // One meshd package per directory, so that the Vagrant lab (and anyone's script)
    // installs the one just built.
    for e in fs::read_dir(out)? {
        let p = e?.path();
        let n = p.file_name().unwrap_or_default().to_string_lossy();
        if n.starts_with("meshd_") && n.ends_with(".deb") && p != deb {
            fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    // zstd, which dpkg reads since Debian 12: packs in seconds where xz takes half a minute.
    output(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zzstd", "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    let _ = fs::remove_dir_all(&stage);
    Ok(deb)
}
