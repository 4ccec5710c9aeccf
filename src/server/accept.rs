//! The accept loop: every listener's connections, each handed to
//! [`super::connection`] as a task of its own, in a span of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::connection::connection;
use super::listener::ListenerCtx;
use crate::endpoint::Protocol;
use crate::proxy::imap::Imap;
use crate::proxy::pop3::Pop3;
use crate::proxy::smtp::Smtp;
use crate::proxy::Ctx;

/// Accepts on every listener until shutdown; each connection runs as a
/// task of `tracker`, in a span of its own.
pub(super) fn accept_all(
    ctx: &Arc<Ctx>,
    tracker: &TaskTracker,
    listeners: Vec<(TcpListener, Arc<ListenerCtx>)>,
    shutdown: &CancellationToken,
) {
    let ids = Arc::new(AtomicU64::new(1));
    for (sock, lctx) in listeners {
        let (ctx, tracker2, ids, shutdown) = (ctx.clone(), tracker.clone(), ids.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = sock.accept() => match r {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                    _ = shutdown.cancelled() => break,
                };
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let (ctx, lctx) = (ctx.clone(), lctx.clone());
                let span = tracing::info_span!("conn", id, proto = %lctx.protocol, peer = %peer, client = tracing::field::Empty, login = tracing::field::Empty);
                let session = async move {
                    match lctx.protocol {
                        Protocol::Imap => connection::<Imap>(&ctx, &lctx, tcp, peer.ip()).await,
                        Protocol::Smtp => connection::<Smtp>(&ctx, &lctx, tcp, peer.ip()).await,
                        Protocol::Pop3 => connection::<Pop3>(&ctx, &lctx, tcp, peer.ip()).await,
                    }
                };
                tracker2.spawn(session.instrument(span));
            }
        });
    }
}
