//! A listener's live state: its TLS acceptor, its session count and the
//! per-address counts that cap one client.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::net::TcpListener;

use super::ServeError;
use crate::config::{Config, Listener, LocalTls};
use crate::endpoint::Protocol;
use crate::proxy::Ctx;
use crate::sync;
use crate::tls;

/// Per-address connection counts, for the per-client cap.
#[derive(Default)]
pub(super) struct PerIp(Mutex<HashMap<IpAddr, usize>>);

pub(super) struct IpSlot<'a>(&'a PerIp, IpAddr);

impl PerIp {
    pub(super) fn enter(&self, ip: IpAddr, max: usize) -> Option<IpSlot<'_>> {
        let mut m = sync::lock(&self.0);
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot(self, ip))
    }
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut m = sync::lock(&self.0 .0);
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// One listener's live state. Its address and TLS mode are fixed at start;
/// its settings (fallback, certificate, limits) follow the running config.
pub(super) struct ListenerCtx {
    pub(super) protocol: Protocol,
    pub(super) tls_mode: LocalTls,
    pub(super) acceptor: RwLock<Option<tokio_rustls::TlsAcceptor>>,
    pub(super) sessions: AtomicUsize,
    pub(super) per_ip: PerIp,
}

/// A session counted against the listener's `max_connections`.
pub(super) struct SessionSlot<'a>(&'a AtomicUsize);

impl ListenerCtx {
    pub(super) fn enter(&self, max: usize) -> Option<SessionSlot<'_>> {
        let n = self.sessions.fetch_add(1, Ordering::AcqRel);
        if n >= max {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(SessionSlot(&self.sessions))
    }

    /// This listener's settings in the running config.
    pub(super) fn settings(&self, ctx: &Ctx) -> Option<Listener> {
        ctx.config().listeners().find(|l| l.protocol == self.protocol).cloned()
    }
}

impl Drop for SessionSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The local TLS acceptor a listener's settings ask for.
pub(super) fn acceptor(config: &Config, l: &Listener) -> Result<Option<tokio_rustls::TlsAcceptor>, ServeError> {
    if l.tls == LocalTls::None {
        return Ok(None);
    }
    let (cert, key) = match (&l.cert, &l.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = config.state_dir.join("certs");
            std::fs::create_dir_all(&dir).map_err(|source| ServeError::CertDir {
                dir: dir.clone(),
                source,
            })?;
            let (c, k, fp) = tls::self_signed(&dir).map_err(|source| ServeError::Tls {
                which: "the self-signed local certificate".into(),
                source,
            })?;
            tracing::info!(cert = %c.display(), sha256 = %fp, "using the self-signed local certificate");
            (c, k)
        }
    };
    let sc = tls::server_config(&cert, &key).map_err(|source| ServeError::Tls {
        which: format!("[{}] cert/key", l.protocol),
        source,
    })?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(sc)))
}

/// Binds one listener (and writes the self-signed local certificate it
/// needs); prints `listening PROTOCOL ADDR`.
pub(super) async fn bind(config: &Config, l: &Listener) -> Result<(TcpListener, Arc<ListenerCtx>), ServeError> {
    if l.tls != LocalTls::None && (l.cert.is_none() || l.key.is_none()) {
        let dir = config.state_dir.join("certs");
        std::fs::create_dir_all(&dir).map_err(|source| ServeError::CertDir {
            dir: dir.clone(),
            source,
        })?;
        let (c, _, fp) = tls::self_signed(&dir).map_err(|source| ServeError::Tls {
            which: "the self-signed local certificate".into(),
            source,
        })?;
        println!("certificate {} sha256 {fp}", c.display());
    }
    let acceptor = acceptor(config, l)?;
    let sock = TcpListener::bind(l.listen).await.map_err(|source| ServeError::Bind {
        protocol: l.protocol,
        addr: l.listen,
        source,
    })?;
    let addr = sock.local_addr().map_err(|source| ServeError::Bind {
        protocol: l.protocol,
        addr: l.listen,
        source,
    })?;
    println!("listening {} {addr}", l.protocol);
    if !addr.ip().is_loopback() && l.tls == LocalTls::None {
        tracing::warn!(%addr, "listening without TLS on a non-loopback address (allow_insecure_remote): passwords cross the network in the clear");
    }
    tracing::info!(protocol = %l.protocol, %addr, tls = ?l.tls, "listening");
    let lctx = Arc::new(ListenerCtx {
        protocol: l.protocol,
        tls_mode: l.tls,
        acceptor: RwLock::new(acceptor),
        sessions: AtomicUsize::new(0),
        per_ip: PerIp::default(),
    });
    Ok((sock, lctx))
}
