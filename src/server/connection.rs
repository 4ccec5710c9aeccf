//! One accepted connection before its session: the balancer's PROXY
//! header, `local_users`, the connection caps, implicit TLS, then the
//! session driver.

use std::net::IpAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::listener::ListenerCtx;
use crate::config::{LocalTls, LocalUsers};
use crate::net::{self, Stream};
use crate::proxy::caller::{Caller, LocalUser};
use crate::proxy::session::{self, SessionProtocol};
use crate::proxy::Ctx;
use crate::proxy_header::{self, Header, ProxyHeaderError};
use crate::sync;

/// Why a balancer's connection has no usable PROXY header.
#[derive(Debug, thiserror::Error)]
enum ProxyHeaderReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed before its PROXY header")]
    Closed,
    #[error("{0}")]
    Header(#[from] ProxyHeaderError),
    #[error("no PROXY header within {} s", .0.as_secs())]
    Timeout(Duration),
}

pub(super) async fn connection<P: SessionProtocol>(ctx: &Ctx, l: &ListenerCtx, mut tcp: TcpStream, ip: IpAddr) {
    net::tune(&tcp);
    let limits = ctx.config().limits.clone();
    let Some(caller) = Box::pin(who::<P>(ctx, l, &mut tcp, ip, limits.preauth_timeout)).await else {
        return;
    };
    let ip = caller.ip;
    let Some(_slot) = l.enter(limits.max_connections) else {
        crate::metrics::connection(l.protocol, "refused");
        tracing::warn!(max = limits.max_connections, "connection limit reached; refusing");
        refuse::<P>(&mut tcp, "too many connections").await;
        return;
    };
    let Some(_ip_slot) = l.per_ip.enter(ip, limits.max_connections_per_ip) else {
        crate::metrics::connection(l.protocol, "refused");
        tracing::warn!(
            max = limits.max_connections_per_ip,
            "per-address connection limit reached; refusing"
        );
        refuse::<P>(&mut tcp, "too many connections from your address").await;
        return;
    };
    let Some(settings) = l.settings(ctx) else {
        refuse::<P>(&mut tcp, "this listener is being reconfigured").await;
        return;
    };
    tracing::debug!("accepted");
    crate::metrics::connection(l.protocol, "accepted");
    let _open = crate::metrics::session_open(l.protocol);
    let acceptor = sync::read(&l.acceptor).clone();
    let client = match (&acceptor, l.tls_mode) {
        (Some(acc), LocalTls::Implicit) => {
            if crate::misconnect::plaintext_first(&tcp).await {
                crate::misconnect::report(
                    &settings,
                    tcp.local_addr().ok(),
                    crate::misconnect::Misconnect::PlaintextOnTls,
                );
                crate::misconnect::farewell(tcp, P::refusal(crate::misconnect::PLAINTEXT_ON_TLS).as_bytes()).await;
                return;
            }
            // Boxed, like every large step before the relay: the session's
            // future lives as long as the session, at its largest step's size.
            let accept = Box::pin(acc.accept(tcp));
            match tokio::time::timeout(ctx.config().limits.preauth_timeout, accept).await {
                Ok(Ok(s)) => Stream::ServerTls(Box::new(s)),
                Ok(Err(e)) => {
                    tracing::info!(error = %e, "client TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
        _ => Stream::Plain(tcp),
    };
    let starttls = if l.tls_mode == LocalTls::Starttls {
        acceptor.as_ref()
    } else {
        None
    };
    if let Err(e) = session::run::<P>(ctx, &settings, client, starttls, caller).await {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Who the connection is from: the PROXY header's client behind a trusted
/// balancer, else the peer; `None` when it is refused (an untrusted
/// balancer, a bad header, a local user `local_users` does not name).
async fn who<P: SessionProtocol>(
    ctx: &Ctx,
    l: &ListenerCtx,
    tcp: &mut TcpStream,
    ip: IpAddr,
    timeout: Duration,
) -> Option<Caller> {
    // Behind a balancer: the client is who its PROXY header names, and only
    // the trusted balancers may say so.
    let proxy = l.settings(ctx).and_then(|s| s.proxy);
    let direct = tcp.local_addr().ok().zip(tcp.peer_addr().ok());
    let (ip, direct) = match proxy {
        None => (ip, direct),
        Some(pp) if !pp.trusts(ip) => {
            crate::metrics::connection(l.protocol, "refused");
            tracing::warn!("refusing a connection from an address that is not a trusted balancer (proxy_trusted)");
            return None;
        }
        Some(_) => match read_proxy_header(tcp, timeout).await {
            Ok(Header::Proxied { source, .. }) => {
                tracing::Span::current().record("client", tracing::field::display(source));
                (source.ip(), None)
            }
            Ok(Header::Local) => (ip, direct),
            Err(why) => {
                crate::metrics::connection(l.protocol, "refused");
                tracing::warn!(reason = %why, "refusing a connection without a valid PROXY header");
                return None;
            }
        },
    };
    let caller = Caller::new(ip, direct);
    // `[server] local_users`: other local users' programs are turned away
    // before any work (the kernel is asked only when the setting limits).
    let allowed = &ctx.config().local_users;
    if *allowed != LocalUsers::Anyone {
        if let LocalUser::Other(uid) = caller.local_user() {
            if !allowed.admits(uid, crate::sys::euid()) {
                crate::metrics::connection(l.protocol, "refused");
                tracing::warn!(
                    peer_uid = uid,
                    "refusing a connection from a local user that local_users does not name"
                );
                refuse::<P>(
                    tcp,
                    "this mailproxy serves other local users' programs only when its owner allows them (local_users)",
                )
                .await;
                return None;
            }
        }
    }
    Some(caller)
}

/// The PROXY v2 header at the start of a balancer's connection, read
/// exactly (never a byte of the client's own stream) within `timeout`.
async fn read_proxy_header(tcp: &mut TcpStream, timeout: Duration) -> Result<Header, ProxyHeaderReadError> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut prefix = [0u8; proxy_header::PREFIX_LEN];
        let mut got = 0;
        while got < prefix.len() {
            let n = tcp.read(&mut prefix[got..]).await?;
            if n == 0 {
                return Err(ProxyHeaderReadError::Closed);
            }
            got += n;
            // Refuse at the first byte that cannot start a header, rather
            // than wait for bytes a client without one will never send.
            let sig = got.min(proxy_header::SIGNATURE.len());
            if prefix[..sig] != proxy_header::SIGNATURE[..sig] {
                return Err(ProxyHeaderError::NoSignature.into());
            }
        }
        let len = proxy_header::header_len(&prefix)?;
        let mut header = prefix.to_vec();
        header.resize(len, 0);
        tcp.read_exact(&mut header[proxy_header::PREFIX_LEN..]).await?;
        Ok(proxy_header::parse(&header)?)
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or(Err(ProxyHeaderReadError::Timeout(timeout)))
}

async fn refuse<P: SessionProtocol>(tcp: &mut TcpStream, why: &str) {
    use tokio::io::AsyncWriteExt;
    let msg = P::refusal(why);
    let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(msg.as_bytes())).await;
}
