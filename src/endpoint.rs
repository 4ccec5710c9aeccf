//! Upstream server addresses, written as URLs: `imaps://host:993`,
//! `imap+starttls://host:143`, `imap://host:143` and the same for smtp and pop3.

use std::fmt;
use std::net::IpAddr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Imap,
    Smtp,
    Pop3,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
            Protocol::Pop3 => "pop3",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the connection to a server is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Security {
    /// TLS from the first byte (imaps, smtps, pop3s).
    Tls,
    /// Plaintext greeting, then STARTTLS/STLS before anything else is said.
    StartTls,
    /// No TLS at all: only for loopback or with `allow_plaintext`.
    Plain,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub protocol: Protocol,
    pub security: Security,
    pub host: String,
    pub port: u16,
}

/// Why a server URL was refused; each says what a valid one looks like.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    #[error("`{url}` is not a server URL like `{protocol}s://host:port`")]
    NotUrl { url: String, protocol: Protocol },
    #[error("unknown scheme `{scheme}://` for {protocol}: use {protocol}s:// (implicit TLS), {protocol}+starttls:// or {protocol}:// (plaintext)")]
    Scheme { scheme: String, protocol: Protocol },
    #[error("`{0}` must be just scheme://host:port, without user, path or query")]
    Extra(String),
    #[error("`{0}`: cannot read host and port")]
    HostPort(String),
    #[error("`{url}`: bad port `{port}`")]
    Port { url: String, port: String },
    #[error("`{0}`: missing host")]
    NoHost(String),
    #[error("`{url}`: `{host}` is not a host name or address")]
    Host { url: String, host: String },
}

impl Endpoint {
    /// Parses `scheme://host[:port]`, checking that the scheme belongs to `protocol`.
    pub fn parse(s: &str, protocol: Protocol) -> Result<Endpoint, EndpointError> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| EndpointError::NotUrl {
            url: s.to_string(),
            protocol,
        })?;
        let (security, default_port) = match (protocol, scheme.to_ascii_lowercase().as_str()) {
            (Protocol::Imap, "imaps") => (Security::Tls, 993),
            (Protocol::Imap, "imap+starttls") => (Security::StartTls, 143),
            (Protocol::Imap, "imap") => (Security::Plain, 143),
            (Protocol::Smtp, "smtps") => (Security::Tls, 465),
            (Protocol::Smtp, "smtp+starttls") => (Security::StartTls, 587),
            (Protocol::Smtp, "smtp") => (Security::Plain, 587),
            (Protocol::Pop3, "pop3s") => (Security::Tls, 995),
            (Protocol::Pop3, "pop3+starttls") => (Security::StartTls, 110),
            (Protocol::Pop3, "pop3") => (Security::Plain, 110),
            _ => {
                return Err(EndpointError::Scheme {
                    scheme: scheme.to_string(),
                    protocol,
                })
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains('/') || rest.contains('@') || rest.contains('?') {
            return Err(EndpointError::Extra(s.to_string()));
        }
        let (host, port) = split_host_port(rest).ok_or_else(|| EndpointError::HostPort(s.to_string()))?;
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| EndpointError::Port {
                    url: s.to_string(),
                    port: p.to_string(),
                })?,
        };
        if host.is_empty() {
            return Err(EndpointError::NoHost(s.to_string()));
        }
        if host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "[]\"'<>\\{}|^`%".contains(c))
        {
            return Err(EndpointError::Host {
                url: s.to_string(),
                host: host.to_string(),
            });
        }
        Ok(Endpoint {
            protocol,
            security,
            host: host.to_string(),
            port,
        })
    }

    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.host)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.protocol.name();
        let scheme = match self.security {
            Security::Tls => format!("{p}s"),
            Security::StartTls => format!("{p}+starttls"),
            Security::Plain => p.to_string(),
        };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => Some((h, Some(p))),
            Some(_) => None,
            None => Some((s, None)),
        }
    }
}

pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().map(|ip| ip.is_loopback()).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schemes_and_defaults() {
        let e = Endpoint::parse("imaps://imap.gmail.com", Protocol::Imap).unwrap();
        assert_eq!(
            (e.security, e.host.as_str(), e.port),
            (Security::Tls, "imap.gmail.com", 993)
        );
        let e = Endpoint::parse("imap+starttls://mail.example.org:1143", Protocol::Imap).unwrap();
        assert_eq!((e.security, e.port), (Security::StartTls, 1143));
        let e = Endpoint::parse("imap://[::1]:143", Protocol::Imap).unwrap();
        assert_eq!((e.security, e.host.as_str()), (Security::Plain, "::1"));
        assert!(e.is_loopback());
        assert_eq!(e.to_string(), "imap://[::1]:143");
        let e = Endpoint::parse("smtp+starttls://smtp.office365.com", Protocol::Smtp).unwrap();
        assert_eq!(e.port, 587);
    }

    #[test]
    fn display_parses_back_and_odd_hosts_are_refused() {
        // Found by the endpoint fuzz target: `[[a]` parsed, printed as `[a:143`.
        assert!(Endpoint::parse("imap://[[a]", Protocol::Imap).is_err());
        assert!(Endpoint::parse("imap://[\t\0]", Protocol::Imap).is_err());
        assert!(Endpoint::parse("imaps://a b:993", Protocol::Imap).is_err());
        for u in [
            "imaps://mail.example.org:993",
            "imap://[::1]:143",
            "pop3+starttls://10.0.0.1:110",
        ] {
            let p = if u.starts_with("pop3") {
                Protocol::Pop3
            } else {
                Protocol::Imap
            };
            let e = Endpoint::parse(u, p).unwrap();
            assert_eq!(Endpoint::parse(&e.to_string(), p).unwrap(), e);
        }
    }

    #[test]
    fn rejects_wrong_protocol_and_junk() {
        let e = Endpoint::parse("smtps://x:465", Protocol::Imap).unwrap_err();
        assert!(matches!(e, EndpointError::Scheme { .. }));
        assert!(e.to_string().contains("unknown scheme `smtps://` for imap"), "{e}");
        let e = Endpoint::parse("imaps://x:99999", Protocol::Imap).unwrap_err();
        assert_eq!(e.to_string(), "`imaps://x:99999`: bad port `99999`");
        assert!(Endpoint::parse("imaps://u@x:993", Protocol::Imap).is_err());
        assert!(Endpoint::parse("x:993", Protocol::Imap).is_err());
        assert!(Endpoint::parse("imaps://:993", Protocol::Imap).is_err());
    }
}
