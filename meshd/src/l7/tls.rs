//! TLS termination: the certificates routes name (`com.docker.lb.ssl_cert` / `ssl_key`),
//! picked by SNI.
//!
//! Docker secrets cannot be read back through the Engine API, so a label names a PEM file in
//! meshd's certificate directory (`--l7-certs`, default `/etc/meshd/certs`): `ssl_cert=shop.crt`
//! is `<dir>/shop.crt`. The files are checked for changes every second: a renewed
//! certificate is served from the next handshake, with no restart and no dropped
//! connection. A file that turns unreadable or wrong keeps its last good certificate in
//! service, and the reason is shown; a route whose certificate never loaded serves no HTTPS.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};

use super::table::normalize_host;

/// A certificate and key pair, by the file names the labels give.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

#[derive(Clone)]
struct Loaded {
    /// Modification times of the two files when read.
    stamp: (Option<SystemTime>, Option<SystemTime>),
    /// The last good certificate, if there ever was one.
    good: Option<Arc<CertifiedKey>>,
    /// Why the files as they are now do not load (None: they do).
    error: Option<String>,
}

/// SNI → certificate, swapped whole when a route or a file changes.
#[derive(Debug, Default)]
pub struct Certificates {
    by_host: ArcSwap<HashMap<String, Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = normalize_host(hello.server_name()?);
        self.by_host.load().get(&name).cloned()
    }
}

/// What the certificate directory holds for the routes, and the hosts each pair serves.
pub struct CertStore {
    dir: PathBuf,
    pub resolver: Arc<Certificates>,
    state: Mutex<StoreState>,
}

#[derive(Default)]
struct StoreState {
    wanted: BTreeMap<Pair, BTreeSet<String>>,
    loaded: HashMap<Pair, Loaded>,
}

impl CertStore {
    pub fn new(dir: PathBuf) -> CertStore {
        CertStore {
            dir,
            resolver: Arc::default(),
            state: Mutex::default(),
        }
    }

    /// The rustls server configuration: TLS 1.2 and 1.3, h2 and HTTP/1.1 by ALPN.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.resolver.clone());
        c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(c)
    }

    /// The pairs the routes use now, with their hosts; loads what is new or changed.
    pub fn set_wanted(&self, wanted: BTreeMap<Pair, BTreeSet<String>>) {
        let mut st = self.state.lock().unwrap();
        st.wanted = wanted;
        let keep: BTreeSet<Pair> = st.wanted.keys().cloned().collect();
        st.loaded.retain(|p, _| keep.contains(p));
        self.refresh_locked(&mut st, true);
    }

    /// Reads again the files that changed since they were read; true if any did.
    pub fn refresh(&self) -> bool {
        let mut st = self.state.lock().unwrap();
        self.refresh_locked(&mut st, false)
    }

    /// `force`: the hosts changed, swap the table even if no file did.
    fn refresh_locked(&self, st: &mut StoreState, force: bool) -> bool {
        let mut moved = false;
        let pairs: Vec<Pair> = st.wanted.keys().cloned().collect();
        for p in pairs {
            let stamp = (
                mtime(&self.dir.join(&p.cert)),
                mtime(&self.dir.join(&p.key)),
            );
            let old = st.loaded.get(&p);
            if old.is_some_and(|o| o.stamp == stamp) {
                continue;
            }
            let good_before = old.and_then(|o| o.good.clone());
            let entry = match load_pair(&self.dir, &p) {
                Ok(ck) => Loaded {
                    stamp,
                    good: Some(Arc::new(ck)),
                    error: None,
                },
                Err(e) => {
                    tracing::warn!(cert = %p.cert, key = %p.key, error = %e, kept = good_before.is_some(), "L7: certificate does not load");
                    Loaded {
                        stamp,
                        good: good_before,
                        error: Some(e),
                    }
                }
            };
            st.loaded.insert(p, entry);
            moved = true;
        }
        let mut by_host = HashMap::new();
        for (p, hosts) in &st.wanted {
            if let Some(ck) = st.loaded.get(p).and_then(|l| l.good.clone()) {
                for h in hosts {
                    by_host.insert(h.clone(), ck.clone());
                }
            }
        }
        if moved || force {
            self.resolver.by_host.store(Arc::new(by_host));
        }
        moved
    }

    /// Why a pair does not load now, if it does not; and whether an older good one serves.
    pub fn problem(&self, p: &Pair) -> Option<(String, bool)> {
        let st = self.state.lock().unwrap();
        let l = st.loaded.get(p)?;
        l.error.clone().map(|e| (e, l.good.is_some()))
    }

    /// Whether HTTPS is served for this pair (it loaded, now or before).
    pub fn serves(&self, p: &Pair) -> bool {
        let st = self.state.lock().unwrap();
        st.loaded.get(p).is_some_and(|l| l.good.is_some())
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// A certificate chain and its key, from PEM files; the key must match the certificate.
pub fn load_pair(dir: &Path, p: &Pair) -> Result<CertifiedKey, String> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut read(&p.cert)?.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", p.cert))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", p.cert));
    }
    let key = rustls_pemfile::private_key(&mut read(&p.key)?.as_slice())
        .map_err(|e| format!("{}: not a PEM key: {e}", p.key))?
        .ok_or_else(|| format!("{}: no private key in it", p.key))?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(certs, key, &provider)
        .map_err(|e| format!("{} with {}: {e}", p.cert, p.key))
}
