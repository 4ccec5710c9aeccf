//! `database_url`, read the way libpq reads it: `sslmode` and `sslrootcert`
//! (in the URL's query or the `key=value` form) choose what the connection
//! checks. Without `sslmode`, a database on another host gets TLS (an
//! eavesdropper on the network would see every sealed record and the
//! password exchange); loopback and unix sockets may stay plaintext.
//!
//! libpq's rules, kept: `prefer` and `require` encrypt without checking the
//! certificate, unless `sslrootcert` names a CA file (then the chain is
//! checked, as `verify-ca`); `verify-ca` checks the chain; `verify-full`
//! checks the chain and the host name. Without `sslrootcert` (or with
//! `sslrootcert=system`) the chain is checked against the platform's roots.

use std::path::{Path, PathBuf};

use tokio_postgres::config::Host;

/// What TLS the connection demands and checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// The TLS settings of one `database_url`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatabaseTls {
    pub mode: SslMode,
    /// `sslrootcert=FILE`: the only roots trusted; `None` means the
    /// platform's roots (no `sslrootcert`, or `sslrootcert=system`).
    pub root_cert: Option<PathBuf>,
    /// `sslmode` was not written: chosen from the host.
    pub defaulted: bool,
}

impl DatabaseTls {
    /// The certificate chain is checked (libpq: any mode once a CA file is
    /// named, and the `verify-*` modes always).
    pub fn checks_chain(&self) -> bool {
        match self.mode {
            SslMode::Disable => false,
            SslMode::Prefer | SslMode::Require => self.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        }
    }
}

/// A parsed `database_url`.
pub struct DatabaseUrl {
    /// What the driver connects with (its own sslmode set from ours).
    pub driver: tokio_postgres::Config,
    pub tls: DatabaseTls,
    /// The URL with any password replaced by `***`, for messages.
    pub shown: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DatabaseUrlError {
    #[error("sslmode `{0}` is not one of disable, prefer, require, verify-ca, verify-full")]
    SslMode(String),
    #[error(
        "sslrootcert is empty: name the CA file of the database's certificate, or `system` for the platform's roots"
    )]
    EmptyRootCert,
    #[error("sslrootcert needs TLS, and sslmode is disable")]
    RootCertWithoutTls,
    #[error("not a PostgreSQL URL like postgres://mailproxy@db.example.org/mailproxy?sslmode=verify-full ({0})")]
    Driver(String),
}

/// One `key=value` of the URL's query or of the `key=value` form: where it
/// is in the text and its decoded value.
struct Param {
    key: String,
    value: String,
    range: std::ops::Range<usize>,
}

/// Parses `url`; a relative `sslrootcert` is taken from the folder of
/// `base` (the config file) when given.
pub fn parse(url: &str, base: Option<&Path>) -> Result<DatabaseUrl, DatabaseUrlError> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let params = if is_url { query_params(url) } else { keyword_params(url) };
    let find = |k: &str| params.iter().rev().find(|p| p.key == k).map(|p| p.value.as_str());
    let mode = find("sslmode")
        .map(|m| SslMode::parse(m).ok_or_else(|| DatabaseUrlError::SslMode(m.to_string())))
        .transpose()?;
    let root_cert = match find("sslrootcert") {
        None | Some("system") => None,
        Some("") => return Err(DatabaseUrlError::EmptyRootCert),
        Some(p) => Some(match base {
            Some(b) => super::resolve(b, Path::new(p)),
            None => PathBuf::from(p),
        }),
    };
    let ours = |p: &Param| p.key == "sslmode" || p.key == "sslrootcert";
    let driver_text = without(url, params.iter().filter(|p| ours(p)), is_url);
    let mut driver: tokio_postgres::Config = driver_text.parse().map_err(|e: tokio_postgres::Error| {
        // The driver's message says little without its cause (never a value).
        let cause = std::error::Error::source(&e)
            .map(|c| format!(": {c}"))
            .unwrap_or_default();
        DatabaseUrlError::Driver(format!("{e}{cause}"))
    })?;
    let defaulted = mode.is_none();
    let mode = mode.unwrap_or(if local(&driver) {
        SslMode::Prefer
    } else {
        SslMode::Require
    });
    if mode == SslMode::Disable && root_cert.is_some() {
        return Err(DatabaseUrlError::RootCertWithoutTls);
    }
    driver.ssl_mode(match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    Ok(DatabaseUrl {
        driver,
        tls: DatabaseTls {
            mode,
            root_cert,
            defaulted,
        },
        shown: redact(url, &params, is_url),
    })
}

/// Every host the driver may connect to is this machine (loopback or a unix
/// socket; no host at all is the default socket).
fn local(c: &tokio_postgres::Config) -> bool {
    if !c.get_hostaddrs().is_empty() {
        return c.get_hostaddrs().iter().all(std::net::IpAddr::is_loopback);
    }
    c.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => crate::endpoint::is_loopback_host(name),
        #[cfg(unix)]
        Host::Unix(_) => true,
    })
}

/// Where the query starts: after the credentials, which the driver takes up
/// to the first `@`.
fn query_start(url: &str) -> Option<usize> {
    let from = url.find('@').map_or(0, |at| at + 1);
    url[from..].find('?').map(|q| from + q + 1)
}

fn query_params(url: &str) -> Vec<Param> {
    let Some(start) = query_start(url) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut at = start;
    for pair in url[start..].split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={s}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        out.push(Param {
            key: decode(k),
            value: decode(v),
            range: at..at + pair.len(),
        });
        at += pair.len() + 1;
    }
    out
}

/// The `key=value` form: values bare or in single quotes, `\` escaping.
fn keyword_params(text: &str) -> Vec<Param> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() {
            return out;
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = text[start..i].to_string();
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            // Not this form after all: the driver will say what is wrong.
            return out;
        }
        i += 1;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let quoted = i < b.len() && b[i] == b'\'';
        if quoted {
            i += 1;
        }
        let mut value = String::new();
        let mut chars = text[i..].char_indices().peekable();
        let mut end = text.len();
        while let Some((off, c)) = chars.next() {
            if (quoted && c == '\'') || (!quoted && c.is_whitespace()) {
                end = i + off + usize::from(quoted);
                break;
            }
            if c == '\\' {
                if let Some((_, next)) = chars.next() {
                    value.push(next);
                }
            } else {
                value.push(c);
            }
        }
        i = end;
        out.push(Param {
            key,
            value,
            range: start..end,
        });
    }
}

/// `text` without the given parameters.
fn without<'a>(text: &str, drop: impl Iterator<Item = &'a Param>, is_url: bool) -> String {
    let ranges: Vec<_> = drop.map(|p| p.range.clone()).collect();
    if ranges.is_empty() {
        return text.to_string();
    }
    if !is_url {
        let mut out = text.to_string();
        for r in ranges.iter().rev() {
            out.replace_range(r.clone(), "");
        }
        return out;
    }
    let start = query_start(text).expect("the parameters are in the query");
    let kept: Vec<&str> = query_params(text)
        .into_iter()
        .filter(|p| !ranges.contains(&p.range))
        .map(|p| &text[p.range])
        .collect();
    let head = &text[..start - 1];
    if kept.is_empty() {
        head.to_string()
    } else {
        format!("{head}?{}", kept.join("&"))
    }
}

/// `url` with the password of its user part and any `password=` replaced.
fn redact(url: &str, params: &[Param], is_url: bool) -> String {
    let mut out = url.to_string();
    let mut cuts: Vec<std::ops::Range<usize>> = params
        .iter()
        .filter(|p| p.key == "password")
        .map(|p| {
            let eq = url[p.range.clone()]
                .find('=')
                .map_or(p.range.end, |e| p.range.start + e + 1);
            eq..p.range.end
        })
        .collect();
    if is_url {
        let scheme_end = url.find("://").map_or(0, |s| s + 3);
        if let Some(at) = url.find('@') {
            if let Some(colon) = url[scheme_end..at].find(':') {
                cuts.push(scheme_end + colon + 1..at);
            }
        }
    }
    cuts.sort_by_key(|r| r.start);
    for r in cuts.iter().rev() {
        out.replace_range(r.clone(), "***");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(url: &str) -> DatabaseTls {
        parse(url, None).unwrap_or_else(|e| panic!("{url}: {e}")).tls
    }

    #[test]
    fn a_host_off_this_machine_gets_tls_by_default_and_loopback_may_stay_plain() {
        for remote in [
            "postgres://mp@db.example.org/mp",
            "postgres://mp:pw@10.0.0.20:5432/mp",
            "host=db.example.org user=mp dbname=mp",
            "postgres://mp@localhost,db.example.org/mp",
        ] {
            let t = tls(remote);
            assert_eq!((t.mode, t.defaulted), (SslMode::Require, true), "{remote}");
            assert!(!t.checks_chain(), "{remote}: require checks nothing without a CA file");
        }
        for local in [
            "postgres://mp@127.0.0.1:5432/mp",
            "postgres://mp@localhost/mp",
            "postgres://mp@[::1]:5432/mp",
            "host=/run/postgresql user=mp",
            "postgres://mp@%2Frun%2Fpostgresql/mp",
        ] {
            let t = tls(local);
            assert_eq!((t.mode, t.defaulted), (SslMode::Prefer, true), "{local}");
        }
        let d = parse("postgres://mp@db.example.org/mp", None).unwrap().driver;
        assert_eq!(d.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
    }

    #[test]
    fn sslmode_and_sslrootcert_follow_libpq() {
        let t = tls("postgres://mp@db.example.org/mp?sslmode=verify-full&sslrootcert=/etc/ca.pem");
        assert_eq!(t.mode, SslMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert!(t.checks_chain());
        // require with a CA file checks the chain, as libpq does.
        let t = tls("host=db.example.org sslmode=require sslrootcert='/etc/my ca.pem' user=mp");
        assert_eq!(t.mode, SslMode::Require);
        assert_eq!(t.root_cert.as_deref(), Some(Path::new("/etc/my ca.pem")));
        assert!(t.checks_chain());
        let t = tls("postgres://mp@db.example.org/mp?sslmode=verify-ca&sslrootcert=system");
        assert_eq!((t.mode, t.root_cert), (SslMode::VerifyCa, None));
        let t = tls("postgres://mp@db.example.org/mp?sslmode=disable");
        assert_eq!((t.mode, t.defaulted), (SslMode::Disable, false));
        // Relative to the config file's folder.
        let u = parse(
            "postgres://h/d?sslrootcert=ca.pem",
            Some(Path::new("/etc/mailproxy/config.toml")),
        )
        .unwrap();
        assert_eq!(u.tls.root_cert.as_deref(), Some(Path::new("/etc/mailproxy/ca.pem")));
        // The driver sees the rest, not our keys.
        let u = parse(
            "postgres://mp@db.example.org:6432/mp?application_name=x&sslmode=verify-full&connect_timeout=3",
            None,
        )
        .unwrap();
        assert_eq!(u.driver.get_application_name(), Some("x"));
        assert_eq!(u.driver.get_ports(), [6432]);
        assert_eq!(u.driver.get_connect_timeout(), Some(&std::time::Duration::from_secs(3)));
        let u = parse("host=h sslmode=verify-ca port=7 sslrootcert=/ca.pem", None).unwrap();
        assert_eq!(u.driver.get_ports(), [7]);
    }

    #[test]
    fn bad_values_are_refused_with_what_would_do() {
        let e = parse("postgres://h/d?sslmode=verify", None).err().unwrap().to_string();
        assert!(e.contains("sslmode `verify` is not one of disable, prefer"), "{e}");
        let e = parse("postgres://h/d?sslrootcert=", None).err().unwrap().to_string();
        assert!(e.contains("sslrootcert is empty"), "{e}");
        let e = parse("postgres://h/d?sslmode=disable&sslrootcert=/ca.pem", None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("sslmode is disable"), "{e}");
        let e = parse("postgres://h/d?port=x", None).err().unwrap().to_string();
        assert!(e.contains("not a PostgreSQL URL") && e.contains("port"), "{e}");
        let e = parse("postgres://h/d?sslcert=c.pem", None).err().unwrap().to_string();
        assert!(e.contains("unknown option") && e.contains("sslcert"), "{e}");
    }

    #[test]
    fn the_password_is_never_shown() {
        for (url, want) in [
            (
                "postgres://mp:s3cret@db/mp?sslmode=require",
                "postgres://mp:***@db/mp?sslmode=require",
            ),
            (
                "postgres://mp@db/mp?password=s3cret&application_name=x",
                "postgres://mp@db/mp?password=***&application_name=x",
            ),
            ("host=db password='s3 cret' user=mp", "host=db password=*** user=mp"),
            ("postgresql://mp@db/mp", "postgresql://mp@db/mp"),
        ] {
            let u = parse(url, None).unwrap();
            assert_eq!(u.shown, want);
        }
    }
}
