//! The metrics listener (`[server] metrics_listen`): `/metrics` for
//! Prometheus, `/healthz` (the process answers) and `/readyz` (listeners
//! bound and the token store reachable). At each scrape the state gauges
//! are read from the running proxy (token expiry, upstream sessions, the
//! KDF queue, the token store) and set in [`crate::metrics`], whose registry is then served.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::endpoint::Protocol;
use crate::http::{read_request, respond, respond_raw};
use crate::metrics;
use crate::store::RecordStore;
use crate::tokens::{now_unix, TokenManager};

/// The state gauges, then the text exposition.
async fn render(tokens: &TokenManager, store: &dyn RecordStore) -> String {
    let kdf = tokens.kdf_status();
    metrics::kdf(kdf.waiting, kdf.in_flight, kdf.runs);
    let now = now_unix() as i64;
    let mut expiry = Vec::new();
    for acct in tokens.all() {
        let st = tokens.status(&acct).await;
        if let Some(exp) = st.access_expires {
            expiry.push((st.account, exp as i64 - now));
        }
    }
    metrics::token_expiry(expiry);
    metrics::upstream_sessions(tokens.sessions.all());
    let up = tokio::time::timeout(Duration::from_secs(2), store.ping()).await;
    metrics::store_up(matches!(up, Ok(Ok(()))));
    let tasks = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    metrics::process(tasks, open_fds());
    metrics::exposition()
}

/// Open file descriptors: the entries of `/proc/self/fd`, less the one
/// reading it takes. `None` where there is no such directory.
fn open_fds() -> Option<usize> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    Some(n.saturating_sub(1))
}

/// `/metrics`, `/healthz` (the process answers) and `/readyz` (listeners
/// bound and the token store reachable: 503 otherwise).
pub async fn serve(
    sock: TcpListener,
    tokens: Arc<TokenManager>,
    store: Arc<dyn RecordStore>,
    ready: Arc<AtomicBool>,
    protocols: Vec<Protocol>,
    shutdown: CancellationToken,
) {
    metrics::touch(&protocols);
    let Ok(local) = sock.local_addr() else { return };
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        let mut s = tokio::select! {
            r = sock.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (tokens, store, ready) = (tokens.clone(), store.clone(), ready.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Some(req)) = tokio::time::timeout(Duration::from_secs(10), read_request(&mut s)).await else {
                return;
            };
            // On loopback, a web page could reach this through a name it
            // rebinds to 127.0.0.1 and read the account names: only this
            // listener's own address is answered. Elsewhere the listener is
            // open to the network by choice, and scrapers use any name.
            if local.ip().is_loopback() && !req.host_is(local) {
                let _ = respond(&mut s, "421 Misdirected Request", "Not this listener's address.").await;
                return;
            }
            if req.method != "GET" {
                let _ = respond(&mut s, "405 Method Not Allowed", "Method not allowed.").await;
                return;
            }
            match req.path() {
                "/metrics" => {
                    let body = render(&tokens, &*store).await;
                    let _ = respond_raw(
                        &mut s,
                        "200 OK",
                        "text/plain; version=0.0.4; charset=utf-8",
                        &[],
                        body.as_bytes(),
                    )
                    .await;
                }
                "/healthz" => {
                    let _ = respond_raw(&mut s, "200 OK", "text/plain", &[], b"ok\n").await;
                }
                "/readyz" => {
                    let listening = ready.load(Ordering::SeqCst);
                    let store_ok = matches!(
                        tokio::time::timeout(Duration::from_secs(2), store.ping()).await,
                        Ok(Ok(()))
                    );
                    let (status, body) = match (listening, store_ok) {
                        (true, true) => ("200 OK", "ready\n".to_string()),
                        (false, _) => ("503 Service Unavailable", "listeners not bound yet\n".into()),
                        (true, false) => (
                            "503 Service Unavailable",
                            format!("{} is not reachable\n", store.describe()),
                        ),
                    };
                    let _ = respond_raw(&mut s, status, "text/plain", &[], body.as_bytes()).await;
                }
                _ => {
                    let _ = respond(&mut s, "404 Not Found", "Not found.").await;
                }
            }
        });
    }
}
