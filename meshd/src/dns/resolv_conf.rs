//! Where forwarded names go: the host's resolv.conf, read again whenever it changes (DHCP,
//! NetworkManager and systemd-resolved rewrite it while meshd runs), or a fixed list from the
//! command line.
use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use meshd_dns::upstream::parse_resolv_conf;

/// What a read of the file gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub servers: Vec<SocketAddr>,
    /// Lines that were skipped, each with its reason.
    pub errors: Vec<String>,
}

/// Enough of a file's metadata to tell that it was rewritten: an editor or resolvconf
/// replaces it (new inode), a plain write changes its mtime or length.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stamp {
    File {
        dev: u64,
        ino: u64,
        len: u64,
        mtime_ns: i128,
        ctime_ns: i128,
    },
    Unreadable(String),
}

pub struct ResolvConfWatch {
    path: PathBuf,
    seen: Option<Stamp>,
}

impl ResolvConfWatch {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            seen: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file was looked at before: what `check` reports next is then a change.
    pub fn has_read(&self) -> bool {
        self.seen.is_some()
    }

    /// The file's servers when it changed since the last call (the first call always
    /// reads); `Err` when it cannot be read, once per change of that condition. Cheap when
    /// nothing changed: one `stat`.
    pub fn check(&mut self) -> Option<Result<Loaded, String>> {
        // Follows symlinks: /etc/resolv.conf is often one (systemd-resolved, resolvconf).
        let stamp = match std::fs::metadata(&self.path) {
            Ok(m) => Stamp::File {
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
            },
            Err(e) => Stamp::Unreadable(format!("read {}: {e}", self.path.display())),
        };
        if self.seen.as_ref() == Some(&stamp) {
            return None;
        }
        let result = match &stamp {
            Stamp::Unreadable(why) => Err(why.clone()),
            Stamp::File { .. } => match std::fs::read_to_string(&self.path) {
                Ok(text) => {
                    let (servers, errors) = parse_resolv_conf(&text);
                    Ok(Loaded {
                        servers,
                        errors: errors.iter().map(ToString::to_string).collect(),
                    })
                }
                Err(e) => Err(format!("read {}: {e}", self.path.display())),
            },
        };
        self.seen = Some(stamp);
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_new(path: &Path, text: &str) {
        // As resolvconf does: a new file renamed over the old one.
        let tmp = path.with_extension("new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn reads_once_then_only_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        let mut w = ResolvConfWatch::new(&path);
        assert!(!w.has_read());

        let missing = w.check().expect("first call reports").unwrap_err();
        assert!(missing.contains("resolv.conf"), "{missing}");
        assert!(w.has_read());
        assert_eq!(w.check(), None, "still missing: nothing new to say");

        write_new(&path, "nameserver 10.0.0.2\nnameserver bogus\n");
        let first = w.check().expect("appeared").unwrap();
        assert_eq!(first.servers, vec!["10.0.0.2:53".parse().unwrap()]);
        assert_eq!(first.errors.len(), 1, "{:?}", first.errors);
        assert!(first.errors[0].contains("bogus"));
        assert_eq!(w.check(), None, "unchanged");

        write_new(&path, "nameserver 10.0.0.3\n");
        let second = w.check().expect("replaced").unwrap();
        assert_eq!(second.servers, vec!["10.0.0.3:53".parse().unwrap()]);
        assert!(second.errors.is_empty());

        // Written in place (same inode), longer than before.
        std::fs::write(&path, "nameserver 10.0.0.3\nnameserver 10.0.0.4\n").unwrap();
        let third = w.check().expect("rewritten in place").unwrap();
        assert_eq!(third.servers.len(), 2);

        std::fs::remove_file(&path).unwrap();
        assert!(w.check().expect("removed").is_err());
    }
}
