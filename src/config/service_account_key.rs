//! Google's JSON key of a service account (`service_account_key`): read and
//! checked when the config is loaded, so a wrong file is refused at start,
//! and again at every JWT bearer grant (`oauth::service_account`), which
//! signs its assertions with it.

use std::path::Path;

use serde::Deserialize;

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
    pub fn load(path: &Path) -> Result<ServiceAccountKey, String> {
        let text = zeroize::Zeroizing::new(
            std::fs::read(path).map_err(|e| format!("cannot read the service account key {}: {e}", path.display()))?,
        );
        Self::parse(&text).map_err(|why| format!("the service account key {} {why}", path.display()))
    }

    pub(crate) fn parse(text: &[u8]) -> Result<ServiceAccountKey, String> {
        use rustls::pki_types::{pem::PemObject, PrivatePkcs8KeyDer};
        // serde_json's message gives line and column, never the value.
        let f: KeyFile =
            serde_json::from_slice(text).map_err(|e| format!("is not the JSON key Google issues ({e})"))?;
        if let Some(kind) = f.kind.as_deref().filter(|k| *k != "service_account") {
            return Err(format!(
                "is a `{kind}` key, not a service account key (Google Cloud console > IAM > Service accounts > Keys > Add key > JSON)"
            ));
        }
        let client_email = f
            .client_email
            .filter(|e| e.contains('@'))
            .ok_or("has no client_email")?;
        let pem = f.private_key.ok_or("has no private_key")?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.expose().as_bytes())
            .map_err(|_| "has a private_key that is not a PKCS#8 PEM key")?;
        ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
            .map_err(|e| format!("has a private_key that is not an RSA key ({e})"))?;
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
        let e = ServiceAccountKey::parse(b"{").err().unwrap();
        assert!(e.contains("not the JSON key"), "{e}");
        let e = ServiceAccountKey::parse(br#"{"type":"authorized_user","client_email":"a@b"}"#)
            .err()
            .unwrap();
        assert!(e.contains("`authorized_user`"), "{e}");
        let e = ServiceAccountKey::parse(br#"{"type":"service_account","private_key":"x"}"#)
            .err()
            .unwrap();
        assert!(e.contains("client_email"), "{e}");
        let e = ServiceAccountKey::parse(
            br#"{"type":"service_account","client_email":"sa@p.iam.gserviceaccount.com","private_key":"secret-looking"}"#,
        )
        .err()
        .unwrap();
        assert!(e.contains("PKCS#8") && !e.contains("secret-looking"), "{e}");
    }
}
