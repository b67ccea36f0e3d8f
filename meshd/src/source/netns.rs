//! Network-namespace cookies: the key the eBPF programs see (`bpf_get_netns_cookie`).
//!
//! The only way to read a namespace's cookie from userspace is `SO_NETNS_COOKIE` on a socket
//! created inside it, so a short-lived thread joins the namespace, makes a socket, and reads
//! it. The thread ends right after, so no other work ever runs in a foreign namespace.
use std::{fs::File, os::fd::AsRawFd, path::Path};

use anyhow::{Context, Result};
use nix::sched::{setns, CloneFlags};

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the namespace this thread is in.
pub fn current_cookie() -> Result<u64> {
    // SAFETY: plain socket syscalls on a descriptor we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket");
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err).context("getsockopt(SO_NETNS_COOKIE) (kernel ≥ 5.14 needed)");
        }
        Ok(cookie)
    }
}

/// The cookie of the namespace at `path` (a sandbox key or /proc/PID/ns/net).
pub fn cookie_of(path: &Path) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("open netns {}", path.display()))?;
    let path = path.to_owned();
    std::thread::spawn(move || -> Result<u64> {
        setns(&file, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into {} (fd {})", path.display(), file.as_raw_fd()))?;
        current_cookie()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns cookie thread panicked"))?
}
