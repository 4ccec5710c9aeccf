//! Google's JSON key of a service account (`service_account_key`): read and
//! checked when the config is loaded, so a wrong file is refused at start,
//! and again at every JWT bearer grant (`oauth::service_account`), which
//! signs its assertions with it.

use std::path::Path;

use serde::Deserialize;

use super::ConfigProblem;
use crate::secret::Secret;

/// The parts of Google's service-account JSON key that mailproxy uses.
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: Option<String>,
    /// RSA private key as PKCS#8 DER.
    key_der: zeroize::Zeroizing<Vec<u8>>,
}

#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: Option<String>,
    private_key_id: Option<String>,
    private_key: Option<Secret>,
}

impl ServiceAccountKey {
    /// Reads and checks the key file; every error names the file and what is wrong.
    pub fn load(path: &Path) -> Result<ServiceAccountKey, ConfigProblem> {
        let unreadable = |source| ConfigProblem::ServiceKeyUnreadable {
            path: path.to_owned(),
            source,
        };
        let text = zeroize::Zeroizing::new(std::fs::read(path).map_err(unreadable)?);
        Self::parse(&text, path)
    }

    /// Checks the text of the key file at `path` (named in errors).
    pub(crate) fn parse(text: &[u8], path: &Path) -> Result<ServiceAccountKey, ConfigProblem> {
        use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
        let path = || path.to_owned();
        // serde_json's message gives line and column, never the value.
        let f: KeyFile =
            serde_json::from_slice(text).map_err(|source| ConfigProblem::ServiceKeyNotJson { path: path(), source })?;
        if let Some(kind) = f.kind.filter(|k| *k != "service_account") {
            return Err(ConfigProblem::ServiceKeyKind { path: path(), kind });
        }
        let client_email = f
            .client_email
            .filter(|e| e.contains('@'))
            .ok_or_else(|| ConfigProblem::ServiceKeyNoEmail { path: path() })?;
        let pem = f
            .private_key
            .ok_or_else(|| ConfigProblem::ServiceKeyNoPrivateKey { path: path() })?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.expose().as_bytes())
            .map_err(|_| ConfigProblem::ServiceKeyNotPkcs8 { path: path() })?;
        ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|reason| ConfigProblem::ServiceKeyNotRsa { path: path(), reason })?;
        Ok(ServiceAccountKey {
            client_email,
            private_key_id: f.private_key_id,
            key_der: zeroize::Zeroizing::new(der.secret_pkcs8_der().to_vec()),
        })
    }

    /// The RSA private key as PKCS#8 DER, for signing.
    pub(crate) fn pkcs8_der(&self) -> &[u8] {
        &self.key_der
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_errors_name_what_is_wrong() {
        let err = |text: &[u8]| {
            ServiceAccountKey::parse(text, Path::new("/k/sa.json"))
                .err()
                .unwrap()
                .to_string()
        };
        let e = err(b"{");
        assert!(
            e.starts_with("the service account key /k/sa.json is not the JSON key"),
            "{e}"
        );
        let e = err(br#"{"type":"authorized_user","client_email":"a@b"}"#);
        assert!(e.contains("`authorized_user`"), "{e}");
        let e = err(br#"{"type":"service_account","private_key":"x"}"#);
        assert!(e.contains("client_email"), "{e}");
        let e = err(
            br#"{"type":"service_account","client_email":"sa@p.iam.gserviceaccount.com","private_key":"secret-looking"}"#,
        );
        assert!(e.contains("PKCS#8") && !e.contains("secret-looking"), "{e}");
    }
}
