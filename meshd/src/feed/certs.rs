//! The swarm's own node certificates as the feed's mutual TLS: every node already has one
//! (`<data-root>/swarm/certificates`), signed by the cluster's root CA, with the cluster id
//! as O, the role as OU (`swarm-manager` / `swarm-worker`, also a DNS SAN) and the node id as
//! CN. A manager's meshd accepts nodes of its own cluster only; a node's meshd accepts a
//! manager of its own cluster only (a worker's certificate does not pass as a manager: the
//! server name checked is `swarm-manager`). Swarm renews the certificates (90 days by
//! default): they are read again whenever the files change.
use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use anyhow::{bail, Context, Result};
use arc_swap::ArcSwap;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    client::WebPkiServerVerifier,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        WebPkiClientVerifier,
    },
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use serde::Serialize;
use tracing::info;

pub const MANAGER_OU: &str = "swarm-manager";
pub const WORKER_OU: &str = "swarm-worker";
/// The ALPN protocol of the feed, so nothing else mistakes the port for its own.
pub const ALPN: &[u8] = b"meshd-feed/1";

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SwarmIdentity {
    pub cluster_id: String,
    /// `swarm-manager` or `swarm-worker`.
    pub role: String,
    pub node_id: String,
}

impl SwarmIdentity {
    pub fn is_manager(&self) -> bool {
        self.role == MANAGER_OU
    }
}

impl fmt::Display for SwarmIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}) of cluster {}",
            self.node_id, self.role, self.cluster_id
        )
    }
}

/// O, OU and CN of a certificate's subject.
pub fn identity(cert: &CertificateDer<'_>) -> Result<SwarmIdentity> {
    let (_, x) =
        x509_parser::parse_x509_certificate(cert.as_ref()).context("parse the certificate")?;
    let subject = x.subject();
    let o = subject
        .iter_organization()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    Ok(SwarmIdentity {
        cluster_id: o.context("certificate has no O (cluster id)")?,
        role: ou.context("certificate has no OU (role)")?,
        node_id: cn.context("certificate has no CN (node id)")?,
    })
}

/// Swarm writes PEM headers (`kek-version`, `raft-dek`) inside the key's block, which PEM
/// parsers do not expect: they are dropped. An encrypted key (swarm autolock) is refused by
/// name.
fn key_pem_without_headers(pem: &str) -> Result<String> {
    if pem.contains("ENCRYPTED") {
        bail!("the swarm node key is encrypted (swarm autolock): the feed cannot use it");
    }
    Ok(pem
        .lines()
        .filter(|l| l.starts_with("-----") || !l.contains(':'))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The three files, read once.
struct Material {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    me: SwarmIdentity,
}

fn read_material(dir: &Path) -> Result<Material> {
    let read = |name: &str| -> Result<String> {
        let p = dir.join(name);
        std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))
    };
    let chain: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut read("swarm-node.crt")?.as_bytes())
            .collect::<Result<_, _>>()
            .context("swarm-node.crt")?;
    let leaf = chain
        .first()
        .context("swarm-node.crt holds no certificate")?;
    let me = identity(leaf).context("swarm-node.crt")?;
    let key = rustls_pemfile::private_key(
        &mut key_pem_without_headers(&read("swarm-node.key")?)?.as_bytes(),
    )
    .context("swarm-node.key")?
    .context("swarm-node.key holds no private key")?;
    let mut roots = RootCertStore::empty();
    // During a root rotation the file holds more than one CA.
    for c in rustls_pemfile::certs(&mut read("swarm-root-ca.crt")?.as_bytes()) {
        roots
            .add(c.context("swarm-root-ca.crt")?)
            .context("swarm-root-ca.crt")?;
    }
    if roots.is_empty() {
        bail!("swarm-root-ca.crt holds no certificate");
    }
    Ok(Material {
        chain,
        key,
        roots: Arc::new(roots),
        me,
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks a peer's subject after the chain checked out.
fn check_subject(
    cert: &CertificateDer<'_>,
    cluster: &str,
    roles: &[&str],
) -> Result<(), rustls::Error> {
    let id = identity(cert).map_err(|e| rustls::Error::General(format!("{e:#}")))?;
    if id.cluster_id != cluster {
        return Err(rustls::Error::General(format!(
            "certificate of another swarm ({})",
            id.cluster_id
        )));
    }
    if !roles.contains(&id.role.as_str()) {
        return Err(rustls::Error::General(format!(
            "certificate role {} is not accepted here",
            id.role
        )));
    }
    Ok(())
}

/// Both verifiers check signatures as webpki does; only the certificate checks differ.
macro_rules! signatures_by_webpki {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// A manager's meshd checks a node: the chain (webpki), then the subject.
#[derive(Debug)]
struct NodeVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster: String,
}

impl ClientCertVerifier for NodeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_subject(end_entity, &self.cluster, &[MANAGER_OU, WORKER_OU])?;
        Ok(ok)
    }

    signatures_by_webpki!();
}

/// A node's meshd checks a manager: the chain and the `swarm-manager` name (webpki), then
/// the subject.
#[derive(Debug)]
struct ManagerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cluster: String,
}

impl ServerCertVerifier for ManagerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_subject(end_entity, &self.cluster, &[MANAGER_OU])?;
        Ok(ok)
    }

    signatures_by_webpki!();
}

/// The TLS configurations built from one reading of the files.
pub struct TlsConfigs {
    pub me: SwarmIdentity,
    /// Only a manager's certificate can serve the feed.
    pub server: Option<Arc<ServerConfig>>,
    pub client: Arc<ClientConfig>,
}

fn build(m: Material) -> Result<TlsConfigs> {
    let client_verifier = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
        .build()
        .context("client verifier")?;
    let server = if m.me.is_manager() {
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS versions")?
            .with_client_cert_verifier(Arc::new(NodeVerifier {
                inner: client_verifier,
                cluster: m.me.cluster_id.clone(),
            }))
            .with_single_cert(m.chain.clone(), m.key.clone_key())
            .context("the node certificate and key do not match")?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Some(Arc::new(cfg))
    } else {
        None
    };
    let server_verifier = WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider())
        .build()
        .context("server verifier")?;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ManagerVerifier {
            inner: server_verifier,
            cluster: m.me.cluster_id.clone(),
        }))
        .with_client_auth_cert(m.chain, m.key)
        .context("the node certificate and key do not match")?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok(TlsConfigs {
        me: m.me,
        server,
        client: Arc::new(client),
    })
}

/// The name a node's meshd asks a manager's certificate for.
pub fn manager_name() -> ServerName<'static> {
    ServerName::try_from(MANAGER_OU).expect("a valid DNS name")
}

/// The node certificates, read again when swarm renews them.
pub struct SwarmCerts {
    dir: PathBuf,
    current: ArcSwap<TlsConfigs>,
    stamp: std::sync::Mutex<Vec<Option<SystemTime>>>,
}

const FILES: [&str; 3] = ["swarm-node.crt", "swarm-node.key", "swarm-root-ca.crt"];

fn stamps(dir: &Path) -> Vec<Option<SystemTime>> {
    FILES
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect()
}

impl SwarmCerts {
    pub fn load(dir: &Path) -> Result<SwarmCerts> {
        let stamp = stamps(dir);
        let configs = build(
            read_material(dir)
                .with_context(|| format!("swarm certificates in {}", dir.display()))?,
        )?;
        info!(identity = %configs.me, dir = %dir.display(), "feed TLS: the swarm node certificate");
        Ok(SwarmCerts {
            dir: dir.to_path_buf(),
            current: ArcSwap::from_pointee(configs),
            stamp: std::sync::Mutex::new(stamp),
        })
    }

    pub fn current(&self) -> Arc<TlsConfigs> {
        self.current.load_full()
    }

    /// Reads the files again if any changed; connections made after use the new ones. A
    /// half-written set (swarm renewing right now) keeps the old ones until it reads well.
    pub fn reload_if_changed(&self) -> Result<bool> {
        let now = stamps(&self.dir);
        let mut stamp = self.stamp.lock().unwrap();
        if *stamp == now {
            return Ok(false);
        }
        let configs = build(read_material(&self.dir)?)?;
        info!(identity = %configs.me, "feed TLS: swarm renewed the node certificate; using the new one");
        self.current.store(Arc::new(configs));
        *stamp = now;
        Ok(true)
    }
}

/// Swarm-shaped certificates (a cluster CA, node certificates with O/OU/CN and the role as
/// a DNS name, the key written with swarm's PEM headers): for tests and the benchmark.
#[cfg(any(test, feature = "fake-swarm"))]
pub mod fake {
    use std::path::Path;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName as Dn, DnType, IsCa, KeyPair,
        SanType,
    };

    /// A swarm's CA and its node certificates, shaped like swarmkit's.
    pub struct FakeSwarm {
        pub cluster: String,
        ca: rcgen::Certificate,
        ca_key: KeyPair,
    }

    impl FakeSwarm {
        pub fn new(cluster: &str) -> FakeSwarm {
            let mut p = CertificateParams::default();
            p.distinguished_name = Dn::new();
            p.distinguished_name.push(DnType::CommonName, "swarm-ca");
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let ca = p.self_signed(&ca_key).unwrap();
            FakeSwarm {
                cluster: cluster.into(),
                ca,
                ca_key,
            }
        }

        /// Writes `dir/{swarm-node.crt, swarm-node.key, swarm-root-ca.crt}` for a node.
        pub fn node(&self, dir: &Path, node_id: &str, role: &str) {
            let mut p = CertificateParams::default();
            p.distinguished_name = Dn::new();
            p.distinguished_name
                .push(DnType::OrganizationName, self.cluster.clone());
            p.distinguished_name
                .push(DnType::OrganizationalUnitName, role);
            p.distinguished_name.push(DnType::CommonName, node_id);
            p.subject_alt_names = vec![
                SanType::DnsName(role.try_into().unwrap()),
                SanType::DnsName(node_id.try_into().unwrap()),
            ];
            p.extended_key_usages = vec![
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("swarm-node.crt"), cert.pem()).unwrap();
            // As swarm writes it: headers inside the block.
            let pem = key.serialize_pem();
            let with_headers = pem.replacen(
                "-----BEGIN PRIVATE KEY-----\n",
                "-----BEGIN PRIVATE KEY-----\nkek-version: 0\nraft-dek: c2VjcmV0\n\n",
                1,
            );
            std::fs::write(dir.join("swarm-node.key"), with_headers).unwrap();
            std::fs::write(dir.join("swarm-root-ca.crt"), self.ca.pem()).unwrap();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{fake::FakeSwarm, *};

    #[test]
    fn a_node_certificate_names_its_cluster_role_and_node() {
        let t = tempfile::tempdir().unwrap();
        let swarm = FakeSwarm::new("clusterA");
        swarm.node(t.path(), "node1", MANAGER_OU);
        let certs = SwarmCerts::load(t.path()).unwrap();
        let me = certs.current().me.clone();
        assert_eq!(
            me,
            SwarmIdentity {
                cluster_id: "clusterA".into(),
                role: MANAGER_OU.into(),
                node_id: "node1".into()
            }
        );
        assert!(
            certs.current().server.is_some(),
            "a manager can serve the feed"
        );
        swarm.node(t.path(), "node2", WORKER_OU);
        assert!(certs.reload_if_changed().unwrap());
        assert!(certs.current().server.is_none(), "a worker cannot");
        assert!(!certs.reload_if_changed().unwrap(), "nothing changed since");
    }

    #[test]
    fn an_encrypted_key_is_refused_by_name() {
        let e = key_pem_without_headers("-----BEGIN EC PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n")
            .unwrap_err();
        assert!(e.to_string().contains("autolock"));
    }
}
