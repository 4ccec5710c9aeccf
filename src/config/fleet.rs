//! The settings for running several instances: the shared token store
//! (`database_url`), the store key, the metrics listener, and PROXY
//! protocol on listeners. Kept apart from the single-machine settings.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use super::database::DatabaseTls;
use super::raw::{RawListener, RawServer};
use super::source::Source;
use super::{Config, ConfigError, TokenStore};
use crate::endpoint::Protocol;
use crate::secret::Secret;

/// `[server]` keys for fleets.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    /// `token_store = "postgres"`: the database (`MAILPROXY_DATABASE_URL`
    /// when not set here). May hold a password, so it is a secret.
    pub database_url: Option<Secret>,
    /// Its TLS settings (`sslmode`, `sslrootcert`), checked at load.
    pub database_tls: Option<DatabaseTls>,
    /// The line of `database_url`, for the CA file's errors.
    pub(super) database_line: Option<usize>,
    /// Seals refresh tokens under this key instead of one derived from each
    /// local password (`MAILPROXY_STORE_KEY` when not set here).
    pub store_key_file: Option<PathBuf>,
    /// Prometheus `/metrics`, `/healthz` and `/readyz`.
    pub metrics_listen: Option<SocketAddr>,
}

impl Fleet {
    pub(super) fn secret_keys(&self) -> Vec<String> {
        let Fleet {
            database_url,
            database_tls: _,
            database_line: _,
            store_key_file: _,
            metrics_listen: _,
        } = self;
        match database_url {
            Some(u) if url_has_password(u.expose()) => vec!["server.database_url".into()],
            _ => vec![],
        }
    }
}

/// `postgres://user:PASSWORD@host/db` or `password=…` in the key=value form.
fn url_has_password(u: &str) -> bool {
    if let Some(rest) = u
        .strip_prefix("postgres://")
        .or_else(|| u.strip_prefix("postgresql://"))
    {
        let auth = rest.split(['/', '?']).next().unwrap_or("");
        return auth
            .rsplit_once('@')
            .is_some_and(|(userinfo, _)| userinfo.contains(':'))
            || u.contains("password=");
    }
    u.contains("password")
}

/// A listener's `proxy_protocol = true`: connections must come from one of
/// `trusted` and start with a PROXY v2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocol {
    pub trusted: Vec<TrustedNet>,
}

impl ProxyProtocol {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }
}

/// An address or a network (`10.0.0.0/8`) a balancer connects from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl TrustedNet {
    pub fn parse(s: &str) -> Option<TrustedNet> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(TrustedNet { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

pub(super) fn server(src: &Source, raw: &RawServer) -> Result<Fleet, ConfigError> {
    let database_url = raw.database_url.as_ref().map(|u| u.get_ref().clone());
    let mut database_tls = None;
    if let Some(u) = &raw.database_url {
        let at = |m: String| src.err(Some(u.span()), Some("server.database_url".into()), m);
        if raw.token_store != TokenStore::Postgres {
            return Err(at("database_url is only used with token_store = \"postgres\"".into()));
        }
        let parsed = super::database::parse(u.get_ref().expose(), Some(src.path())).map_err(|e| at(e.to_string()))?;
        database_tls = Some(parsed.tls);
    }
    let metrics_listen = match &raw.metrics_listen {
        None => None,
        Some(s) => Some(s.get_ref().parse::<SocketAddr>().map_err(|_| {
            src.err(
                Some(s.span()),
                Some("server.metrics_listen".into()),
                format!("`{}` is not an address like 127.0.0.1:9187", s.get_ref()),
            )
        })?),
    };
    Ok(Fleet {
        database_url,
        database_tls,
        database_line: raw.database_url.as_ref().map(|u| src.line(&u.span())),
        store_key_file: raw.store_key_file.as_ref().map(|p| src.resolve(p)),
        metrics_listen,
    })
}

pub(super) fn proxy_protocol(
    src: &Source,
    protocol: Protocol,
    l: &RawListener,
) -> Result<Option<ProxyProtocol>, ConfigError> {
    let key = Some(format!("{}.proxy_trusted", protocol.name()));
    match (&l.proxy_trusted, l.proxy_protocol) {
        (None, false) => Ok(None),
        (Some(t), false) => Err(src.err(Some(t.span()), key, "proxy_trusted needs proxy_protocol = true")),
        (None, true) => Err(src.err(
            Some(l.listen.span()),
            key,
            "proxy_protocol = true needs proxy_trusted = [\"ADDRESS\", …], the balancers' addresses",
        )),
        (Some(t), true) => {
            let mut trusted = Vec::new();
            for s in t.get_ref() {
                let n = TrustedNet::parse(s).ok_or_else(|| {
                    src.err(
                        Some(t.span()),
                        key.clone(),
                        format!("`{s}` is not an address or a network like 10.0.0.0/8"),
                    )
                })?;
                trusted.push(n);
            }
            if trusted.is_empty() {
                return Err(src.err(Some(t.span()), key, "name at least one balancer address"));
            }
            Ok(Some(ProxyProtocol { trusted }))
        }
    }
}

pub(super) fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    if old.fleet.database_url.as_ref().map(|s| s.expose().to_string())
        != new.fleet.database_url.as_ref().map(|s| s.expose().to_string())
    {
        changed.push("server.database_url".into());
    }
    if old.fleet.store_key_file != new.fleet.store_key_file {
        changed.push("server.store_key_file".into());
    }
    if old.fleet.metrics_listen != new.fleet.metrics_listen {
        changed.push("server.metrics_listen".into());
    }
    for (o, n, name) in [
        (&old.imap, &new.imap, "imap"),
        (&old.smtp, &new.smtp, "smtp"),
        (&old.pop3, &new.pop3, "pop3"),
    ] {
        if let (Some(o), Some(n)) = (o, n) {
            if o.proxy.is_some() != n.proxy.is_some() {
                changed.push(format!("{name}.proxy_protocol"));
            }
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/mailproxy/config.toml"))
    }

    #[test]
    fn postgres_store_and_its_url() {
        let c = parse(
            "[server]\ntoken_store = \"postgres\"\ndatabase_url = \"postgres://mp:pw@127.0.0.1:5432/mp\"\nmetrics_listen = \"127.0.0.1:9187\"\n",
        )
        .unwrap();
        assert_eq!(c.token_store, TokenStore::Postgres);
        assert_eq!(c.fleet.metrics_listen, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(c.secret_keys(), ["server.database_url"]);
        let c = parse("[server]\ntoken_store = \"postgres\"\ndatabase_url = \"postgres://mp@127.0.0.1/mp\"\n").unwrap();
        assert!(c.secret_keys().is_empty());
        let e = parse("[server]\ndatabase_url = \"postgres://mp@h/mp\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":2: server.database_url: database_url is only used with"),
            "{e}"
        );
        let e = parse("[server]\nmetrics_listen = \"nine\"\n").unwrap_err().to_string();
        assert!(e.contains("server.metrics_listen"), "{e}");
    }

    #[test]
    fn database_url_tls_is_checked_where_it_is_written() {
        let pg = |url: &str| format!("[server]\ntoken_store = \"postgres\"\n\ndatabase_url = \"{url}\"\n");
        let e = parse(&pg("postgres://mp:s3cret@db.example.org/mp?sslmode=verify"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/mailproxy/config.toml:4: server.database_url: sslmode `verify` is not one of"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        let c = parse(&pg(
            "postgres://mp@db.example.org/mp?sslmode=verify-full&sslrootcert=db-ca.pem",
        ))
        .unwrap();
        let t = c.fleet.database_tls.unwrap();
        assert_eq!(t.mode, super::super::database::SslMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some(Path::new("/etc/mailproxy/db-ca.pem")));
        // No sslmode and a host on the network: TLS.
        let c = parse(&pg("postgres://mp@db.example.org/mp")).unwrap();
        let t = c.fleet.database_tls.unwrap();
        assert_eq!((t.mode, t.defaulted), (super::super::database::SslMode::Require, true));
    }

    /// The CA file is read at load: a missing or empty one is refused with
    /// the line of `database_url`.
    #[test]
    fn an_unreadable_database_ca_file_is_refused_at_load() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let cfg = t.path().join("c.toml");
        std::fs::write(
            &cfg,
            "[server]\ntoken_store = \"postgres\"\ndatabase_url = \"postgres://mp@db.example.org/mp?sslmode=verify-full&sslrootcert=ca.pem\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o600)).unwrap();
        let at = format!("{}:3: server.database_url: sslrootcert: ", cfg.display());
        let e = Config::load(&cfg).unwrap_err().to_string();
        assert!(e.starts_with(&at) && e.contains("cannot read"), "{e}");
        let ca = t.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let e = Config::load(&cfg).unwrap_err().to_string();
        assert!(e.starts_with(&at) && e.contains("no PEM certificate"), "{e}");
        let cert = rcgen::generate_simple_self_signed(vec!["db.example.org".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        Config::load(&cfg).unwrap();
    }

    #[test]
    fn proxy_protocol_needs_trusted_balancers() {
        let c = parse(
            "[imap]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1\", \"10.0.0.0/8\", \"::1\"]\n",
        )
        .unwrap();
        let p = c.imap.unwrap().proxy.unwrap();
        assert!(p.trusts("127.0.0.1".parse().unwrap()));
        assert!(p.trusts("10.20.30.40".parse().unwrap()));
        assert!(p.trusts("::ffff:10.1.1.1".parse().unwrap()));
        assert!(p.trusts("::1".parse().unwrap()));
        assert!(!p.trusts("11.0.0.1".parse().unwrap()));
        assert!(!p.trusts("127.0.0.2".parse().unwrap()));
        let e = parse("[imap]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("imap.proxy_trusted: proxy_protocol = true needs"), "{e}");
        let e = parse("[imap]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_trusted = [\"10.0.0.0/33\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`10.0.0.0/33` is not an address"), "{e}");
        assert_eq!(
            TrustedNet::parse("0.0.0.0/0").map(|n| n.contains("1.2.3.4".parse().unwrap())),
            Some(true)
        );
    }
}
