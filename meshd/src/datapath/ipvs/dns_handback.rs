//! What gives containers back to dockerd's resolver when meshd dies without a clean stop,
//! under the IPVS datapath.
//!
//! The eBPF redirect checks on every query that meshd's socket still exists; an nftables
//! DNAT cannot, so after a `kill -9` it would send names to ports nobody listens on until
//! meshd is back. A small helper process (`meshd dns-hand-back`) is told each sandbox meshd
//! redirects, over a pipe; when that pipe closes, whichever way meshd ended, it removes the
//! redirects meshd left (those still sending DNS to the ports it was told) and exits.
//! dockerd's own rules then answer until meshd is back.
//!
//! The helper holds a lock for its life, and a new meshd's helper takes it before meshd
//! writes any redirect: the old helper's clean-up never races the new meshd's writes.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
};

use anyhow::{bail, Context, Result};
use tracing::warn;

use super::dns_redirect::{apply_here, read_here};
use crate::netns;

/// How long meshd waits for its helper to take the lock.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// meshd's end of the helper.
pub struct HandBack {
    child: Child,
    pipe: Option<ChildStdin>,
}

impl HandBack {
    /// Starts `exe dns-hand-back --lock LOCK` and waits until it holds the lock (an earlier
    /// helper still cleaning up finishes first).
    pub fn start(exe: &Path, lock: &Path) -> Result<HandBack> {
        let mut child = Command::new(exe)
            .arg("dns-hand-back")
            .arg("--lock")
            .arg(lock)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {} dns-hand-back", exe.display()))?;
        let out = child.stdout.take().expect("piped");
        // An earlier helper still cleaning up holds the lock; one stuck for good must not
        // hold meshd's start: give up after a while.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(READY_WITHIN)
            .unwrap_or_else(|_| "(no answer: an earlier helper holds the lock)".into());
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the DNS hand-back helper did not start ({:?})", line.trim());
        }
        let pipe = child.stdin.take();
        Ok(HandBack { child, pipe })
    }

    fn tell(&mut self, line: &str) -> Result<()> {
        let pipe = self.pipe.as_mut().context("the hand-back helper is gone")?;
        pipe.write_all(line.as_bytes())
            .and_then(|()| pipe.flush())
            .context("tell the DNS hand-back helper")
    }

    /// The sandbox at `path` now sends DNS to these ports.
    pub fn redirected(&mut self, path: &str, udp: u16, tcp: u16) -> Result<()> {
        self.tell(&format!("+ {udp} {tcp} {path}\n"))
    }

    /// The sandbox at `path` no longer has meshd's redirect.
    pub fn released(&mut self, path: &str) -> Result<()> {
        self.tell(&format!("- {path}\n"))
    }
}

impl Drop for HandBack {
    /// Closing the pipe is the helper's signal: it cleans up what it still holds and exits.
    fn drop(&mut self) {
        drop(self.pipe.take());
        let _ = self.child.wait();
    }
}

/// One line from meshd: `+ UDP TCP PATH` or `- PATH`.
fn parse(line: &str) -> Option<(String, Option<(u16, u16)>)> {
    let line = line.trim_end_matches('\n');
    if let Some(rest) = line.strip_prefix("+ ") {
        let mut it = rest.splitn(3, ' ');
        let udp = it.next()?.parse().ok()?;
        let tcp = it.next()?.parse().ok()?;
        let path = it.next()?;
        return (!path.is_empty()).then(|| (path.to_string(), Some((udp, tcp))));
    }
    let path = line.strip_prefix("- ")?;
    (!path.is_empty()).then(|| (path.to_string(), None))
}

/// The helper: `meshd dns-hand-back --lock LOCK`.
pub fn helper_main(lock: PathBuf) -> Result<()> {
    // Stopping meshd's unit signals every process in it: the clean-up must still run.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: ignoring a signal has no preconditions.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .with_context(|| format!("open {}", lock.display()))?;
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("lock {}", lock.display()))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut redirected: BTreeMap<String, (u16, u16)> = BTreeMap::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        match parse(&line) {
            Some((path, Some(ports))) => {
                redirected.insert(path, ports);
            }
            Some((path, None)) => {
                redirected.remove(&path);
            }
            None => warn!(line, "DNS hand-back: unreadable line ignored"),
        }
    }
    // meshd is gone.
    for (path, ports) in redirected {
        let done = netns::run_in(Path::new(&path), move || {
            // Only what the old meshd left: not a table someone rewrote since.
            if read_here() == Some(ports) {
                apply_here(None)?;
            }
            Ok(())
        });
        if let Err(e) = done {
            if Path::new(&path).exists() {
                warn!(path, error = %format!("{e:#}"), "DNS hand-back: cannot remove a redirect");
            }
        }
    }
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_the_sandbox_and_its_ports() {
        assert_eq!(
            parse("+ 40001 40002 /run/docker/netns/ab c\n"),
            Some(("/run/docker/netns/ab c".into(), Some((40001, 40002))))
        );
        assert_eq!(
            parse("- /run/docker/netns/ab"),
            Some(("/run/docker/netns/ab".into(), None))
        );
        assert_eq!(parse("+ 1 2 "), None);
        assert_eq!(parse("+ x 2 /p"), None);
        assert_eq!(parse("junk"), None);
    }
}
