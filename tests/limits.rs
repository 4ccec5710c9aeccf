//! The process's own limits and the config's secrets, end to end with the
//! real binary: the open-file limit is raised at start (so a busy proxy is
//! not capped by a low soft limit), and a config or key file other users can
//! read is refused whatever TOML spelling holds the secret.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::mailproxy::{run, Proxy, ProxyDir};
use tokio::io::AsyncReadExt;

fn write_mode(path: &std::path::Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_file_limit_is_raised_at_start() {
    let dir = ProxyDir::new();
    dir.write_config(&format!(
        "{}[limits]\nmax_connections_per_ip = 2000\nmax_connections = 2000\n",
        dir.header()
    ));
    // The soft limit starts at 256, far below what 600 sessions need.
    let proxy = Proxy::start_wrapped(
        &dir,
        &[("RUST_LOG", "info")],
        &["sh", "-c", "ulimit -S -n 256 && exec \"$0\" \"$@\""],
    );
    assert!(proxy.wait_log("open-file limit"), "{}", proxy.logs());
    let port = proxy.imap_port();
    let mut held = Vec::new();
    for i in 0..600 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        let mut greeting = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut greeting))
            .await
            .unwrap_or_else(|_| panic!("connection {i} got no greeting:\n{}", proxy.logs()))
            .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", proxy.logs()));
        assert_eq!(&greeting, b"* OK", "connection {i}");
        held.push(s);
    }
    assert!(!proxy.logs().contains("accept failed"), "{}", proxy.logs());
}

/// A config holding a client secret that others can read is refused, in
/// every spelling TOML allows; 0600 is accepted. The secret never appears
/// in the error.
#[test]
fn world_readable_secrets_are_refused_in_any_spelling() {
    let dir = ProxyDir::new();
    let account = |key: &str| {
        format!(
            "provider = \"custom\"\nclient_id = \"id\"\n{key} = \"s3cr3t-value\"\nauth_url = \"https://login.example.org/auth\"\ntoken_url = \"https://login.example.org/token\"\nimap = \"imaps://imap.example.org\"\nscopes = [\"mail\"]\n"
        )
    };
    let spellings = [
        format!("{}[accounts.\"a@example.org\"]\n{}", dir.header(), account("client_secret")),
        format!("{}[accounts.\"a@example.org\"]\n{}", dir.header(), account("\"client_secret\"")),
        format!("{}[accounts.\"a@example.org\"]\n{}", dir.header(), account("'client_secret'")),
        format!(
            "{}[accounts]\n\"a@example.org\" = {{ provider = \"custom\", client_id = \"id\", client_secret = \"s3cr3t-value\", auth_url = \"https://login.example.org/auth\", token_url = \"https://login.example.org/token\", imap = \"imaps://imap.example.org\", scopes = [\"mail\"] }}\n",
            dir.header()
        ),
    ];
    for text in &spellings {
        write_mode(&dir.config_path(), text, 0o644);
        let (code, _, err) = run(&dir, &["accounts"], "");
        assert_ne!(code, 0, "accepted a world-readable secret:\n{text}");
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains(dir.config_path().to_str().unwrap()), "{err}");
        assert!(!err.contains("s3cr3t-value"), "{err}");
        write_mode(&dir.config_path(), text, 0o600);
        let (code, _, err) = run(&dir, &["accounts"], "");
        assert_eq!(code, 0, "{text}\n{err}");
    }
}

/// A `client_key` file (the private key of a certificate client assertion)
/// must be private too.
#[test]
fn a_readable_client_key_file_is_refused() {
    let dir = ProxyDir::new();
    let key = dir.path().join("app.key");
    let cert = dir.path().join("app.pem");
    write_mode(
        &key,
        "-----BEGIN PRIVATE KEY-----\nnot really\n-----END PRIVATE KEY-----\n",
        0o644,
    );
    write_mode(
        &cert,
        "-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n",
        0o644,
    );
    dir.write_config(&format!(
        "{}[accounts.\"svc@example.org\"]\nprovider = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"00000000-0000-0000-0000-000000000001\"\nflow = \"client_credentials\"\nclient_certificate = \"{}\"\nclient_key = \"{}\"\n",
        dir.header(),
        cert.display(),
        key.display()
    ));
    let (code, _, err) = run(&dir, &["accounts"], "");
    assert_ne!(code, 0, "accepted a readable key file");
    assert!(
        err.contains(key.to_str().unwrap()) && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = run(&dir, &["accounts"], "");
    assert!(
        !(err.contains(key.to_str().unwrap()) && err.contains("chmod 600")),
        "still refused after chmod 600: {err} ({code})"
    );
}
