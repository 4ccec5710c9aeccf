//! `Config::parse` on arbitrary UTF-8 text. It must never panic (the
//! preset-URL `expect` and every span/line computation included), and errors
//! must be well-formed: the line (if any) exists in the text, `Display`
//! starts with the path.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mailproxy::config::Config;

fuzz_target!(|data: &[u8]| {
    // Arbitrary bytes as (lossy) UTF-8, so mutations never get stuck on
    // invalid encodings.
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/etc/mailproxy/config.toml");
    match Config::parse(&text, path) {
        Ok(cfg) => {
            let _ = format!("{cfg:?}");
            for (key, acct) in &cfg.accounts {
                assert_eq!(key, &acct.name.to_lowercase());
                assert!(cfg.account(&acct.name).is_some());
                assert!(acct.imap.is_some() || acct.smtp.is_some() || acct.pop3.is_some());
                if let Some(o) = acct.oauth() {
                    // Service accounts are named by their key file instead.
                    assert!(!o.client_id.is_empty() || o.flow == mailproxy::config::Flow::ServiceAccount);
                    if let Some(s) = &o.client_secret {
                        // Secrets are redacted in Debug.
                        assert_eq!(format!("{s:?}"), "<redacted>");
                    }
                }
            }
            for (domain, entry) in &cfg.domains {
                assert_eq!(format!("@{domain}"), entry.name.to_lowercase());
                assert!(cfg.account(&entry.name).is_none());
            }
            for l in cfg.listeners() {
                let _ = l.listen.port();
            }
            assert!(cfg.limits.max_line >= 1024 && cfg.limits.max_line <= 1 << 20);
        }
        Err(e) => {
            let lines = text.matches('\n').count() + 1;
            if let Some(l) = e.line {
                assert!(l >= 1 && l <= lines, "error line {l} of {lines}");
            }
            let s = e.to_string();
            assert!(s.starts_with("/etc/mailproxy/config.toml"), "{s}");
        }
    }
});
