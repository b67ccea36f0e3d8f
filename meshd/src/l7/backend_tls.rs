//! TLS to the upstream (`com.docker.lb.ssl_backend`): the request is sent to the task over
//! TLS, with the host name the client asked for as SNI. `ssl_backend_tls_verify=none`
//! (Interlock's default) takes any certificate the task shows (still checking the
//! handshake's signatures: the connection is encrypted, its peer not authenticated);
//! `required` verifies the chain against the CA bundle `--l7-backend-ca` names (the
//! system's trust store by default) and the certificate's names against that host.
//!
//! The bundle is read again when its file changes (looked at before each new upstream
//! connection: they are pooled, so that is rare), so a CA rotated on disk is trusted from
//! the next connection on. A bundle that does not load fails verified connections with
//! the reason, and never turns verification off.
use std::{
    io,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::SystemTime,
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

/// TLS wanted on an upstream connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendTls {
    /// Sent as SNI, and the name the certificate must hold when verified.
    pub server_name: String,
    pub verify: bool,
}

/// The two client configurations: one taking any certificate, one verifying against the
/// CA bundle as it is on disk now.
pub struct BackendTrust {
    ca_file: PathBuf,
    any: Arc<ClientConfig>,
    verified: Mutex<Verified>,
}

struct Verified {
    /// The file's modification time when last read (None: never read; Some(None): it
    /// was missing).
    stamp: Option<Option<SystemTime>>,
    config: Result<Arc<ClientConfig>, String>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier> {
    ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
}

/// HTTP/1.1 is what meshd's upstream client speaks.
fn finish(mut c: ClientConfig) -> Arc<ClientConfig> {
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

impl BackendTrust {
    pub fn new(ca_file: PathBuf) -> BackendTrust {
        let any = builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth();
        BackendTrust {
            ca_file,
            any: finish(any),
            verified: Mutex::new(Verified {
                stamp: None,
                config: Err("not read yet".into()),
            }),
        }
    }

    /// The configuration for `verify`, the CA bundle read again if it changed.
    pub fn config(&self, verify: bool) -> io::Result<Arc<ClientConfig>> {
        if !verify {
            return Ok(self.any.clone());
        }
        let stamp = std::fs::metadata(&self.ca_file)
            .and_then(|m| m.modified())
            .ok();
        let mut v = self.verified.lock().unwrap();
        // Read once per change of the file: a missing bundle is reported once, not on
        // every connection.
        if v.stamp != Some(stamp) {
            v.stamp = Some(stamp);
            v.config = self.load();
            if let Err(e) = &v.config {
                tracing::warn!(file = %self.ca_file.display(), error = %e, "L7: the backend CA bundle does not load: verified upstreams fail");
            }
        }
        v.config.clone().map_err(io::Error::other)
    }

    fn load(&self) -> Result<Arc<ClientConfig>, String> {
        let file = self.ca_file.display();
        let pem = std::fs::read(&self.ca_file).map_err(|e| format!("{file}: {e}"))?;
        let mut roots = RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            let c = c.map_err(|e| format!("{file}: not PEM certificates: {e}"))?;
            // A bundle may hold certificates webpki cannot use as anchors: skip those.
            let _ = roots.add(c);
        }
        if roots.is_empty() {
            return Err(format!("{file}: no usable CA certificate in it"));
        }
        let c = builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(finish(c))
    }

    /// The TLS handshake over `tcp`, as `tls` asks.
    pub async fn connect(
        &self,
        tls: &BackendTls,
        tcp: TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let config = self.config(tls.verify)?;
        let name = ServerName::try_from(tls.server_name.clone()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a TLS server name: {e}", tls.server_name),
            )
        })?;
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("TLS to the upstream as {}: {e}", tls.server_name),
                )
            })
    }
}

/// `ssl_backend_tls_verify=none`: any certificate, but a handshake signed by its key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An upstream connection: plain TCP or TLS over it.
pub enum UpstreamIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Plain(s) => s.is_write_vectored(),
            UpstreamIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A CA, and a server certificate for `name` it signed: (CA PEM, server chain, key).
    fn ca_and_server(name: &str) -> (String, CertificateDer<'static>, Vec<u8>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (ca.pem(), leaf.der().clone(), key.serialize_der())
    }

    /// A TLS server on loopback showing `cert` to one connection at a time, answering
    /// each with "hello".
    async fn server(cert: CertificateDer<'static>, key: Vec<u8>) -> std::net::SocketAddr {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert],
                rustls::pki_types::PrivatePkcs8KeyDer::from(key).into(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                if let Ok(mut t) = acceptor.accept(s).await {
                    let _ = t.write_all(b"hello").await;
                    let _ = t.shutdown().await;
                }
            }
        });
        addr
    }

    async fn talk(
        trust: &BackendTrust,
        to: std::net::SocketAddr,
        name: &str,
        verify: bool,
    ) -> io::Result<String> {
        let tcp = TcpStream::connect(to).await?;
        let tls = BackendTls {
            server_name: name.into(),
            verify,
        };
        let mut s = trust.connect(&tls, tcp).await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn verification_is_by_the_bundle_and_the_host_name() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join("ca.pem");
        let (ca, cert, key) = ca_and_server("shop.example.com");
        let to = server(cert, key).await;
        let trust = BackendTrust::new(bundle.clone());

        // No bundle yet: `none` still connects; `required` fails, saying why.
        assert_eq!(
            talk(&trust, to, "shop.example.com", false).await.unwrap(),
            "hello"
        );
        let e = talk(&trust, to, "shop.example.com", true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");

        // A bundle without the task's CA: refused.
        let (other_ca, ..) = ca_and_server("x");
        std::fs::write(&bundle, &other_ca).unwrap();
        let e = talk(&trust, to, "shop.example.com", true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("shop.example.com"), "{e}");

        // The CA added to the bundle on disk: trusted from the next connection, for the name
        // the certificate holds only.
        std::fs::write(&bundle, format!("{other_ca}{ca}")).unwrap();
        // The modification time must move for the change to be seen.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&bundle)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(
            talk(&trust, to, "shop.example.com", true).await.unwrap(),
            "hello"
        );
        let e = talk(&trust, to, "other.example.com", true)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("other.example.com"), "{e}");
        // Without verification a name the certificate lacks is still spoken to.
        assert_eq!(
            talk(&trust, to, "other.example.com", false).await.unwrap(),
            "hello"
        );
    }
}
