//! TLS for both sides, with one crypto provider (ring) for the whole binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::sync;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Installs ring as the process-wide provider. Mixing providers panics in
/// rustls, so everything (reqwest included) must agree on this one.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The platform's trust anchors, read once (reading them takes milliseconds).
fn platform_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut store = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "skipping unreadable platform certificate");
        }
        let (added, ignored) = store.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "platform trust anchors loaded");
        store
    })
}

/// The PEM certificates in `path`: at least one.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::File {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(format!("cannot read certificates: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// Adds the certificates in `path` to `roots`.
fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    for c in read_certs(path)? {
        roots.add(c).map_err(|e| TlsError::File {
            path: path.to_owned(),
            reason: format!("unusable CA certificate: {e}"),
        })?;
    }
    Ok(())
}

/// Client configs for upstream connections, one per distinct `ca_file`:
/// platform roots plus that file, TLS 1.2 and 1.3 only, hostname checked.
#[derive(Default)]
pub struct ClientConfigs {
    cache: std::sync::Mutex<HashMap<Option<PathBuf>, Arc<ClientConfig>>>,
    insecure: std::sync::OnceLock<Arc<ClientConfig>>,
}

/// Checks only as far as it has roots: with none (`insecure_skip_verify`,
/// or a database's `sslmode=require`) any certificate passes; with roots the
/// chain must lead to one of them, whatever name it is for (`verify-ca`).
/// The handshake's signatures are always checked, and TLS is 1.2+.
#[derive(Debug)]
struct Lenient {
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: Option<RootCertStore>,
}

impl rustls::client::danger::ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A client config whose verifier is [`Lenient`] over `roots`.
fn lenient(roots: Option<RootCertStore>) -> Arc<ClientConfig> {
    let p = provider();
    let c = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("ring supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Lenient { provider: p, roots }))
        .with_no_client_auth();
    Arc::new(c)
}

/// How much of a server's certificate a connection checks (libpq's
/// `require`, `verify-ca`, `verify-full`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerCheck {
    Nothing,
    Chain,
    ChainAndName,
}

/// A client config that trusts only the certificates in `ca_file` (the way
/// libpq's `sslrootcert` does), or the platform's roots without one.
pub fn checking(ca_file: Option<&Path>, check: ServerCheck) -> Result<Arc<ClientConfig>, TlsError> {
    if check == ServerCheck::Nothing {
        return Ok(lenient(None));
    }
    let roots = match ca_file {
        None => platform_roots().clone(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            add_ca_file(&mut roots, path)?;
            roots
        }
    };
    if check == ServerCheck::Chain {
        return Ok(lenient(Some(roots)));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

impl ClientConfigs {
    /// The config for an account that set `insecure_skip_verify = true`.
    pub fn insecure(&self) -> Arc<ClientConfig> {
        self.insecure.get_or_init(|| lenient(None)).clone()
    }

    pub fn get(&self, ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
        let key = ca_file.map(Path::to_path_buf);
        if let Some(c) = sync::lock(&self.cache).get(&key) {
            return Ok(c.clone());
        }
        let mut roots = platform_roots().clone();
        if let Some(path) = ca_file {
            add_ca_file(&mut roots, path)?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let config = Arc::new(config);
        sync::lock(&self.cache).insert(key, config.clone());
        Ok(config)
    }
}

/// Server config for a local listener from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::File {
        path: key.to_owned(),
        reason: format!("cannot read the private key: {e}"),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Setup(format!("certificate and key do not fit together: {e}")))?;
    Ok(Arc::new(config))
}

/// The local certificate when the config names none: a self-signed one for
/// localhost and 127.0.0.1, made once under `dir` and reused. Returns the
/// paths and the SHA-256 fingerprint, printed so clients can pin it.
pub fn self_signed(dir: &Path) -> Result<(PathBuf, PathBuf, String), TlsError> {
    use sha2::{Digest, Sha256};
    let cert_path = dir.join("localhost.crt");
    let key_path = dir.join("localhost.key");
    if !(cert_path.exists() && key_path.exists()) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])
            .map_err(|e| TlsError::Setup(format!("cannot create a self-signed certificate: {e}")))?;
        let io = |p: &Path| {
            let p = p.to_owned();
            move |e: crate::vault::VaultError| TlsError::File {
                path: p,
                reason: e.to_string(),
            }
        };
        crate::vault::write_atomic(&key_path, ck.signing_key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        crate::vault::write_atomic(&cert_path, ck.cert.pem().as_bytes()).map_err(io(&cert_path))?;
    }
    let der = read_certs(&cert_path)?.remove(0);
    let fp = Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok((cert_path, key_path, fp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    /// A CA written to `dir/NAME.pem` and a server config for a leaf it
    /// signed for `host`.
    fn ca_and_server(dir: &Path, name: &str, host: &str) -> (PathBuf, Arc<ServerConfig>) {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, name);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let ca_path = dir.join(format!("{name}.pem"));
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![host.to_string()])
            .unwrap()
            .signed_by(&key, &Issuer::new(ca, ca_key))
            .unwrap();
        let server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        (ca_path, Arc::new(server))
    }

    /// A whole handshake in memory; the client's verdict on the server.
    fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>, name: &str) -> Result<(), rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut c = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::ServerConnection::new(server).unwrap();
        while c.is_handshaking() || s.is_handshaking() {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets()
                .map_err(|e| rustls::Error::General(format!("server: {e}")))?;
            buf.clear();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        Ok(())
    }

    #[test]
    fn each_check_checks_what_it_says_and_no_more() {
        let t = tempfile::tempdir().unwrap();
        let (ca, server) = ca_and_server(t.path(), "ca", "db.example.org");
        let (other_ca, _) = ca_and_server(t.path(), "other", "db.example.org");
        let with = |ca: &Path, check| checking(Some(ca), check).unwrap();
        let wrong_name = "db2.example.org";
        use ServerCheck::*;
        handshake(with(&ca, ChainAndName), server.clone(), "db.example.org").unwrap();
        let e = handshake(with(&ca, ChainAndName), server.clone(), wrong_name).unwrap_err();
        assert!(e.to_string().contains("not valid for name"), "{e}");
        handshake(with(&ca, Chain), server.clone(), wrong_name).unwrap();
        for check in [Chain, ChainAndName] {
            let e = handshake(with(&other_ca, check), server.clone(), "db.example.org").unwrap_err();
            assert!(e.to_string().contains("UnknownIssuer"), "{check:?}: {e}");
        }
        // Encryption alone: any certificate, any name.
        handshake(with(&other_ca, Nothing), server.clone(), wrong_name).unwrap();
        let e = checking(Some(&t.path().join("missing.pem")), Chain).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
