//! Test PKI: a private CA plus leaf certificates for `localhost` / `127.0.0.1`.
//!
//! Everything is generated in memory with rcgen (ECDSA P-256) and written as PEM
//! files so that external processes (Dovecot, CLI clients) can use them too.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Names every server leaf is valid for (IP addresses become IP SANs).
pub const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// A certificate + private key pair as PEM text, plus the files they were written to.
#[derive(Clone, Debug)]
pub struct PemPair {
    /// Certificate (PEM, single cert).
    pub cert_pem: String,
    /// PKCS#8 private key (PEM).
    pub key_pem: String,
    /// Where `cert_pem` was written.
    pub cert_path: PathBuf,
    /// Where `key_pem` was written.
    pub key_path: PathBuf,
}

/// A test certificate authority. Issues leaves; its own cert is what tests trust.
pub struct TestCa {
    /// CA certificate and key PEM + paths.
    pub pem: PemPair,
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

impl TestCa {
    /// Creates a new CA and writes `ca.pem` / `ca.key` into `dir`.
    pub fn new(dir: &Path) -> TestCa {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "mailproxy test CA");
        dn.push(DnType::OrganizationName, "mailproxy tests");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2100, 1, 1);
        let cert = params.self_signed(&key).expect("self-sign CA");
        let pem = write_pair(dir, "ca", cert.pem(), key.serialize_pem());
        TestCa {
            pem,
            issuer: Issuer::new(params, key),
            dir: dir.to_path_buf(),
        }
    }

    /// Path of the CA certificate: the only root a test client should trust.
    pub fn cert_path(&self) -> &Path {
        &self.pem.cert_path
    }

    /// A valid server leaf for `localhost` + `127.0.0.1`, written as `{name}.pem`/`{name}.key`.
    pub fn server_leaf(&self, name: &str) -> PemPair {
        self.leaf(name, SERVER_NAMES, (2020, 1, 1), (2100, 1, 1))
    }

    /// A server leaf for `localhost` that expired in 2021 (for TLS failure tests).
    pub fn expired_leaf(&self, name: &str) -> PemPair {
        self.leaf(name, SERVER_NAMES, (2020, 1, 1), (2021, 1, 1))
    }

    /// A server leaf signed by this CA but valid only for `names` (hostname mismatch tests).
    pub fn leaf_for_names(&self, name: &str, names: &[&str]) -> PemPair {
        self.leaf(name, names, (2020, 1, 1), (2100, 1, 1))
    }

    fn leaf(&self, name: &str, names: &[&str], not_before: (i32, u8, u8), not_after: (i32, u8, u8)) -> PemPair {
        let key = KeyPair::generate().expect("generate leaf key");
        let mut params = CertificateParams::new(names.iter().map(std::string::ToString::to_string).collect::<Vec<_>>())
            .expect("leaf params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().copied().unwrap_or("localhost"));
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = date_time_ymd(not_after.0, not_after.1, not_after.2);
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        write_pair(&self.dir, name, cert.pem(), key.serialize_pem())
    }

    /// rustls client config trusting only this CA (ring provider, explicit).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config_trusting(&self.pem.cert_pem)
    }
}

/// A self-signed `localhost` leaf that no test client trusts.
pub fn self_signed_leaf(dir: &Path, name: &str) -> PemPair {
    let key = KeyPair::generate().expect("generate key");
    let params = CertificateParams::new(
        SERVER_NAMES
            .iter()
            .map(std::string::ToString::to_string)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let cert = params.self_signed(&key).expect("self-sign");
    write_pair(dir, name, cert.pem(), key.serialize_pem())
}

/// rustls client config whose only root is the given PEM certificate.
pub fn client_config_trusting(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("parse CA PEM")).expect("add root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(cfg)
}

/// rustls server config from a PEM pair (for fake TLS servers in tests).
pub fn server_config(pair: &PemPair) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pair.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("parse cert PEM");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pair.key_pem.as_bytes()).expect("parse key PEM");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
    Arc::new(cfg)
}

fn write_pair(dir: &Path, name: &str, cert_pem: String, key_pem: String) -> PemPair {
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, &cert_pem).expect("write cert");
    std::fs::write(&key_path, &key_pem).expect("write key");
    PemPair {
        cert_pem,
        key_pem,
        cert_path,
        key_path,
    }
}
