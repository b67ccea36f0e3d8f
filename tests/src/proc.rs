//! Daemons the harness starts (dockerd, meshd): each in a node's network namespace (and, for
//! lab nodes, its own UTS namespace with the node's hostname), in its own session so it can
//! outlive the command that started it (`cargo xtask lab up`). They are stopped by pid, and
//! only after /proc shows the pid is still the process we started: its command line names a
//! directory that belongs to us (`marker`).
use std::{
    ffi::CString,
    fs,
    os::unix::{fs::OpenOptionsExt, io::AsRawFd, process::CommandExt},
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

/// Where a daemon runs: a named network namespace, and optionally a hostname of its own.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub netns: Option<String>,
    pub hostname: Option<String>,
}

/// Spawns `cmd` in `place`, in a new session.
pub fn spawn_in(cmd: &mut Command, place: &Placement) -> Result<Child> {
    let netns = match &place.netns {
        Some(ns) => Some(
            fs::File::open(format!("/var/run/netns/{ns}"))
                .with_context(|| format!("open network namespace {ns}"))?,
        ),
        None => None,
    };
    let netns_fd = netns.as_ref().map(AsRawFd::as_raw_fd);
    let hostname = place
        .hostname
        .as_deref()
        .map(CString::new)
        .transpose()
        .context("hostname")?;
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (setsid, setns, unshare, sethostname) on values prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(h) = &hostname {
                if libc::unshare(libc::CLONE_NEWUTS) != 0
                    || libc::sethostname(h.as_ptr(), h.as_bytes().len()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    drop(netns);
    Ok(child)
}

/// True while `pid` is a live (not zombie) process whose command line contains `marker`.
pub fn is_ours(pid: i32, marker: &str) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // "pid (comm) S ...": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid that `is_ours` just confirmed.
    unsafe { libc::kill(pid, sig) };
}

/// Every process whose command line names `marker` (containerd, shims left by a dockerd).
pub fn pids_with_marker(marker: &str) -> Vec<i32> {
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|&pid| pid != std::process::id() as i32 && is_ours(pid, marker))
        .collect()
}

/// A daemon we started, known by pid (and by `Child` when this process spawned it).
pub struct Daemon {
    pid: i32,
    child: Option<Child>,
    marker: String,
}

impl Daemon {
    /// Spawns `cmd` in `place`; `pidfile`, when given, records the pid for later commands.
    pub fn spawn(
        cmd: &mut Command,
        place: &Placement,
        marker: &str,
        pidfile: Option<&Path>,
    ) -> Result<Daemon> {
        let child = spawn_in(cmd, place)?;
        let pid = child.id() as i32;
        if let Some(p) = pidfile {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(p)
                .with_context(|| format!("write {}", p.display()))?;
            std::io::Write::write_all(&mut f, format!("{pid}\n").as_bytes())?;
        }
        Ok(Daemon {
            pid,
            child: Some(child),
            marker: marker.into(),
        })
    }

    /// The daemon a pid file names, if it is still running and still ours.
    pub fn adopt(pidfile: &Path, marker: &str) -> Option<Daemon> {
        let pid: i32 = fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
        is_ours(pid, marker).then(|| Daemon {
            pid,
            child: None,
            marker: marker.into(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn is_running(&mut self) -> bool {
        if let Some(c) = &mut self.child {
            if !matches!(c.try_wait(), Ok(None)) {
                return false;
            }
        }
        is_ours(self.pid, &self.marker)
    }

    /// SIGTERM, then SIGKILL after `grace`; reaps the child when we have it.
    pub fn stop(&mut self, grace: Duration) {
        if self.is_running() {
            signal(self.pid, libc::SIGTERM);
            let start = Instant::now();
            while self.is_running() && start.elapsed() < grace {
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.is_running() {
                signal(self.pid, libc::SIGKILL);
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// SIGKILL at once, as a crash would: no SIGTERM first, which would let the daemon run
    /// its clean stop (and race the kill).
    pub fn kill9(&mut self) {
        if self.is_running() {
            signal(self.pid, libc::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        } else {
            // Not our child: wait for the kernel to tear it down (its sockets with it).
            let start = Instant::now();
            while self.is_running() && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Stops every process naming `marker` that we did not track by pid (SIGKILL: these are the
/// leftovers of a daemon that already got its SIGTERM).
pub fn kill_leftovers(marker: &str) {
    for pid in pids_with_marker(marker) {
        signal(pid, libc::SIGKILL);
    }
}
