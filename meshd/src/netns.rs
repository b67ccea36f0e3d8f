//! Work inside another network namespace: reading a namespace's cookie (the key the eBPF
//! programs see, `bpf_get_netns_cookie`), and making sockets that belong to it.
//!
//! A thread that `setns`es stays in that namespace, and a socket belongs for life to the
//! namespace it was created in; so each job runs on a short-lived thread of its own that
//! joins the namespace, does the job and ends. Nothing else ever runs in a foreign
//! namespace, and the async workers never block on it (`in_netns`).
use std::{
    collections::BTreeSet,
    fs::File,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

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

/// Starts `f` on a thread of its own inside the namespace at `path` and hands its result
/// to `done` (on that thread).
fn spawn_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
    done: impl FnOnce(Result<T>) + Send + 'static,
) -> Result<()> {
    let file = File::open(path).with_context(|| format!("open netns {}", path.display()))?;
    let shown = path.display().to_string();
    std::thread::Builder::new()
        .name("meshd-netns".into())
        .spawn(move || {
            let r = setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into {shown} (fd {})", file.as_raw_fd()))
                .and_then(|()| f());
            done(r);
        })
        .context("spawn a netns thread")?;
    Ok(())
}

/// Runs `f` inside the namespace at `path` (a sandbox key, a `/run/netns` name,
/// `/proc/PID/ns/net`). Blocks until it is done.
pub fn run_in<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    spawn_in(path, f, move |r| {
        let _ = tx.send(r);
    })?;
    rx.recv().context("netns thread went away")?
}

/// `run_in`, awaited: the async worker is free while the namespace thread works.
pub async fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    spawn_in(path, f, move |r| {
        let _ = tx.send(r);
    })?;
    rx.await.context("netns thread went away")?
}

/// The IPv4 addresses of this thread's namespace, loopback left out.
pub fn current_addrs() -> Result<BTreeSet<Ipv4Addr>> {
    Ok(nix::ifaddrs::getifaddrs()
        .context("getifaddrs")?
        .filter_map(|i| i.address.and_then(|a| a.as_sockaddr_in().map(|s| s.ip())))
        .filter(|ip| !ip.is_loopback())
        .collect())
}

/// A netlink socket that wakes on address and link changes in this thread's namespace.
fn address_events() -> Result<OwnedFd> {
    netlink_socket(
        (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_LINK) as u32,
        false,
        Some(std::time::Duration::from_millis(50)),
    )
}

/// A route netlink socket in this thread's namespace, subscribed to `groups` (0: none,
/// for requests only); a blocking one waits at most `timeout` in each `recv`.
pub fn netlink_socket(
    groups: u32,
    nonblocking: bool,
    timeout: Option<std::time::Duration>,
) -> Result<OwnedFd> {
    let kind =
        libc::SOCK_RAW | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket syscalls; the descriptor is owned by the returned OwnedFd.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, kind, libc::NETLINK_ROUTE);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("netlink socket");
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = groups;
        if libc::bind(
            fd,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("bind netlink");
        }
        if let Some(t) = timeout {
            let tv = libc::timeval {
                tv_sec: t.as_secs() as libc::time_t,
                tv_usec: t.subsec_micros() as libc::suseconds_t,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(owned)
    }
}

/// What a namespace being set up looks like now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub path: PathBuf,
    pub cookie: u64,
    pub addrs: BTreeSet<Ipv4Addr>,
}

/// Watches a namespace Docker is setting up: joins it as soon as it can be joined (the file
/// exists a moment before its bind mount does), then reports its addresses each time they
/// change, woken by netlink, until `stop` or `for_at_most`. This is how a container's
/// namespace is known before its entrypoint runs: Docker's own inspect answer waits for the
/// start to finish.
pub fn watch_addresses(
    path: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    for_at_most: std::time::Duration,
    report: impl Fn(Seen) + Send + 'static,
) -> Result<()> {
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name("meshd-nswatch".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            // The bind mount follows the file's creation.
            let joined = loop {
                if let Ok(file) = File::open(&path) {
                    if setns(&file, CloneFlags::CLONE_NEWNET).is_ok() {
                        break true;
                    }
                }
                if started.elapsed() > std::time::Duration::from_millis(500)
                    || stop.load(Ordering::Relaxed)
                {
                    break false;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            };
            if !joined {
                return;
            }
            let (Ok(cookie), Ok(events)) = (current_cookie(), address_events()) else {
                return;
            };
            let mut last: Option<BTreeSet<Ipv4Addr>> = None;
            let mut buf = [0u8; 8192];
            while !stop.load(Ordering::Relaxed) && started.elapsed() < for_at_most {
                if let Ok(addrs) = current_addrs() {
                    if last.as_ref() != Some(&addrs) {
                        report(Seen {
                            path: path.clone(),
                            cookie,
                            addrs: addrs.clone(),
                        });
                        last = Some(addrs);
                    }
                }
                // Wakes on a change, or after 50 ms to look at `stop`.
                // SAFETY: reading into a buffer we own from a descriptor we own.
                unsafe { libc::recv(events.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            }
        })
        .context("spawn a namespace watcher")?;
    Ok(())
}

/// The cookie of the namespace at `path`.
pub fn cookie_of(path: &Path) -> Result<u64> {
    run_in(path, current_cookie)
}

/// `cookie_of`, awaited.
pub async fn cookie_of_async(path: &Path) -> Result<u64> {
    in_netns(path, current_cookie).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_namespace_has_a_stable_cookie() {
        let a = current_cookie().unwrap();
        let b = cookie_of(Path::new("/proc/self/ns/net")).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, 0);
    }

    #[test]
    fn addresses_are_read_without_loopback() {
        let a = current_addrs().unwrap();
        assert!(a.iter().all(|ip| !ip.is_loopback()));
    }

    #[test]
    fn a_missing_namespace_is_an_error_naming_the_path() {
        let e = cookie_of(Path::new("/nonexistent/ns")).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/ns"));
    }
}
