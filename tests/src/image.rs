//! The lab image `meshlab:1`: Debian's static busybox, `labtool` with the C library it links,
//! and the demo stack's CGI scripts (`tests/lab/rootfs`). Docker Hub is out of reach, so it
//! is built from files and `docker import`ed into every node.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{bin, node::Node, sh, workspace_root, IMAGE};

/// Fills `root` with the image's files (replacing what was there).
pub fn build_rootfs(root: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(root);
    for d in ["bin", "www", "tmp", "etc", "lib64", "lib/x86_64-linux-gnu"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox-static missing")?;
    for applet in sh(&["/bin/busybox", "--list"])?.lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    let labtool = bin("labtool");
    fs::copy(&labtool, root.join("bin/labtool"))?;
    for lib in sh(&["ldd", labtool.to_str().unwrap()])?.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux..."
        let path = lib.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(p) = path.map(Path::new) {
            let dest = root.join(p.strip_prefix("/").unwrap());
            fs::create_dir_all(dest.parent().unwrap())?;
            fs::copy(p, &dest).with_context(|| format!("copy {}", p.display()))?;
        }
    }
    // cp -a keeps the scripts' modes.
    let extra = workspace_root().join("tests/lab/rootfs");
    sh(&[
        "cp",
        "-a",
        &format!("{}/.", extra.display()),
        root.to_str().unwrap(),
    ])?;
    Ok(())
}

/// `docker import`s `root` as the lab image on `node`.
pub fn import(node: &Node, root: &Path) -> Result<()> {
    let tar = Command::new("tar")
        .arg("-C")
        .arg(root)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let out = Command::new("docker")
        .arg("-H")
        .arg(node.host())
        .args([
            "import",
            "-c",
            "ENV PATH=/bin",
            "-c",
            "CMD [\"sh\"]",
            "-",
            IMAGE,
        ])
        .stdin(tar.stdout.unwrap())
        .output()?;
    if !out.status.success() {
        bail!("docker import: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
