//! Running a host program (dig, getent) as if inside a container: in the container's network
//! namespace and cgroup (meshd's hooks act on the container's cgroup), and optionally with a
//! resolv.conf of the test's choosing in a private mount namespace, so glibc's resolver asks
//! 127.0.0.11 the way it would in the container.
use std::{
    ffi::CString,
    fs,
    os::unix::{io::AsRawFd, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::node::{Node, CGROUP2};

/// A running container's namespace and cgroup.
#[derive(Clone, Debug)]
pub struct InContainer {
    pub pid: i32,
    pub netns: PathBuf,
    pub cgroup: PathBuf,
}

impl InContainer {
    pub fn of(node: &Node, container: &str) -> Result<InContainer> {
        let pid: i32 = node
            .docker(&["inspect", "-f", "{{.State.Pid}}", container])?
            .trim()
            .parse()
            .with_context(|| format!("pid of container {container}"))?;
        if pid <= 0 {
            bail!("container {container} is not running");
        }
        let cg = fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let rel = cg
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("container has no cgroup2 path")?;
        Ok(InContainer {
            pid,
            netns: PathBuf::from(format!("/proc/{pid}/ns/net")),
            cgroup: Path::new(CGROUP2).join(rel.trim_start_matches('/')),
        })
    }

    /// `program args` in the container's network namespace and cgroup.
    pub fn command(&self, program: &str, args: &[&str]) -> Result<Command> {
        self.build(program, args, true, None)
    }

    /// `program args` in the container's network namespace only: meshd's hooks leave it
    /// alone (a server the benchmark compares meshd with).
    pub fn command_netns_only(&self, program: &str, args: &[&str]) -> Result<Command> {
        self.build(program, args, false, None)
    }

    /// As `command`, with `resolv_conf` bind-mounted over /etc/resolv.conf in a mount
    /// namespace of the child's own.
    pub fn command_with_resolv(
        &self,
        program: &str,
        args: &[&str],
        resolv_conf: Option<&Path>,
    ) -> Result<Command> {
        self.build(program, args, true, resolv_conf)
    }

    fn build(
        &self,
        program: &str,
        args: &[&str],
        join_cgroup: bool,
        resolv_conf: Option<&Path>,
    ) -> Result<Command> {
        let netns = fs::File::open(&self.netns)
            .with_context(|| format!("open {}", self.netns.display()))?;
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.cgroup.join("cgroup.procs"))
            .with_context(|| format!("open {}/cgroup.procs", self.cgroup.display()))?;
        let resolv = resolv_conf
            .map(|p| CString::new(p.as_os_str().as_encoded_bytes()))
            .transpose()?;
        let target = CString::new("/etc/resolv.conf")?;
        let root = CString::new("/")?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        let (netns_fd, procs_fd) = (netns.as_raw_fd(), procs.as_raw_fd());
        // SAFETY: raw syscalls in the forked child on descriptors and strings made before
        // the fork; the files stay open in the parent until the Command is dropped.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = (&netns, &procs);
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if join_cgroup && libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(src) = &resolv {
                    if libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(
                            std::ptr::null(),
                            root.as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) != 0
                        || libc::mount(
                            src.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}
