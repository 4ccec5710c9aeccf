//! What a SIGHUP reload can apply to a running server and what needs a
//! restart.

use super::Config;

/// The settings that differ between `old` and `new` but cannot change while
/// mailproxy runs, by config key (`imap.listen`, `server.state_dir`, …), so
/// a reload can say which changes wait for the next restart.
///
/// Restart-only: which listeners exist and their addresses (sockets are
/// bound at start), a listener's `tls` mode (sessions are built around it),
/// `state_dir` and `audit_log` (opened at start), `token_store` (the store
/// is probed and chosen once) and `status_listen`. Everything else —
/// fallbacks, certificates, limits, accounts — a reload applies.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    for (o, n, name) in [
        (&old.imap, &new.imap, "imap"),
        (&old.smtp, &new.smtp, "smtp"),
        (&old.pop3, &new.pop3, "pop3"),
    ] {
        match (o, n) {
            (Some(o), Some(n)) => {
                if o.listen != n.listen {
                    changed.push(format!("{name}.listen"));
                }
                if o.tls != n.tls {
                    changed.push(format!("{name}.tls"));
                }
            }
            // A listener added or removed: its address appears or goes.
            (Some(_), None) | (None, Some(_)) => changed.push(format!("{name}.listen")),
            (None, None) => {}
        }
    }
    if old.state_dir != new.state_dir {
        changed.push("server.state_dir".into());
    }
    if old.audit_log != new.audit_log {
        changed.push("server.audit_log".into());
    }
    if old.token_store != new.token_store {
        changed.push("server.token_store".into());
    }
    if old.status_listen != new.status_listen {
        changed.push("server.status_listen".into());
    }
    changed.extend(super::fleet::restart_needed(old, new));
    // The provider client is built once, at start.
    if old.http_proxy != new.http_proxy {
        changed.push("server.http_proxy".into());
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(s: &str) -> Config {
        Config::parse(s, Path::new("/etc/mailproxy/config.toml")).unwrap()
    }

    const BASE: &str = r#"
[server]
state_dir = "/var/lib/mailproxy"
status_listen = "127.0.0.1:8025"
[imap]
listen = "127.0.0.1:1143"
[smtp]
listen = "127.0.0.1:1587"
[accounts."dave@legacy.example"]
provider = "password"
imap = "imaps://legacy.example:993"
"#;

    fn changed(from: &str, to: &str) -> Vec<String> {
        restart_needed(&parse(BASE), &parse(&BASE.replace(from, to)))
    }

    #[test]
    fn same_config_needs_no_restart() {
        assert!(restart_needed(&parse(BASE), &parse(BASE)).is_empty());
    }

    #[test]
    fn live_settings_need_no_restart() {
        let live = format!(
            "{BASE}[limits]\nmax_connections = 10\npreauth_timeout = 5\n\
             [accounts.\"erin@legacy.example\"]\nprovider = \"password\"\nimap = \"imaps://other.example:993\"\n"
        );
        let mut live = live.replace(
            "listen = \"127.0.0.1:1143\"\n",
            "listen = \"127.0.0.1:1143\"\nfallback = \"imaps://mail.example.org:993\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
        );
        live = live.replace("imaps://legacy.example:993", "imaps://new.legacy.example:993");
        assert_eq!(restart_needed(&parse(BASE), &parse(&live)), Vec::<String>::new());
    }

    #[test]
    fn restart_only_settings_are_named() {
        assert_eq!(changed("127.0.0.1:1143", "127.0.0.1:1144"), ["imap.listen"]);
        assert_eq!(
            changed(
                "listen = \"127.0.0.1:1587\"",
                "listen = \"127.0.0.1:1587\"\ntls = \"implicit\""
            ),
            ["smtp.tls"]
        );
        assert_eq!(
            changed(
                "[smtp]\nlisten = \"127.0.0.1:1587\"\n",
                "[pop3]\nlisten = \"127.0.0.1:1110\"\n"
            ),
            ["smtp.listen", "pop3.listen"]
        );
        assert_eq!(
            changed("/var/lib/mailproxy", "/srv/mailproxy"),
            ["server.state_dir", "server.audit_log"]
        );
        assert_eq!(
            changed("[server]\n", "[server]\naudit_log = \"/var/log/mailproxy.log\"\n"),
            ["server.audit_log"]
        );
        assert_eq!(
            changed("[server]\n", "[server]\ntoken_store = \"keyring\"\n"),
            ["server.token_store"]
        );
        assert_eq!(changed("127.0.0.1:8025", "127.0.0.1:8026"), ["server.status_listen"]);
        assert_eq!(
            changed("status_listen = \"127.0.0.1:8025\"\n", ""),
            ["server.status_listen"]
        );
    }
}
