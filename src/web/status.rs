//! The local status page (`[server] status_listen`): every account's state
//! and, for a pending authorisation, the local start address (or the device
//! code). Loopback only (the config refuses anything else), and it answers
//! only requests whose `Host` is its own address (DNS rebinding) and no
//! cross-origin POST. `/status.json` gives the same as JSON for scripts and
//! monitoring: `{ "accounts": [...], "kdf": { "runs", "in_flight", "waiting" } }`.
//!
//! Never on this page: the provider's authorisation URL or its `state`.
//! `/authorize/ACCOUNT` answers each visit with a 302 to the provider with a
//! fresh `state`, for the browser that visits only; a same-origin POST there
//! (the page's buttons) first starts the account's on-demand authorisation
//! when none is pending. The HTML is in [`super::status_page`].

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::status_page;
use crate::http::{read_request, refuse, respond, respond_raw, visitor, Visitor};
use crate::tokens::authorize::{account_of_start_path, MAX_HTTP_CONNECTIONS, REQUEST_TIMEOUT};
use crate::tokens::{now_unix, TokenManager};

pub async fn serve(sock: TcpListener, tokens: Arc<TokenManager>, shutdown: CancellationToken) {
    let Ok(local) = sock.local_addr() else { return };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let mut s = tokio::select! {
            r = sock.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        // Another local user's connection is refused before it takes a
        // slot, so strangers cannot crowd the owner out.
        if let Visitor::Stranger(uid) = visitor(&s) {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, refuse(&mut s, uid, "the status page")).await;
            });
            continue;
        }
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            drop(s); // over the connection cap
            continue;
        };
        let tokens = tokens.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(Some(req)) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut s)).await else {
                return;
            };
            if !req.host_is(local) {
                let _ = respond(&mut s, "421 Misdirected Request", "Not this listener's address.").await;
                return;
            }
            if req.method == "POST" && req.cross_origin(local) {
                let _ = respond(&mut s, "403 Forbidden", "Cross-origin request refused.").await;
                return;
            }
            if req.method == "POST" {
                match account_of_start_path(req.path()) {
                    Some(account) => start_from_page(&mut s, &tokens, &account).await,
                    None => {
                        let _ = respond(&mut s, "404 Not Found", "Not found.").await;
                    }
                }
                return;
            }
            if req.method != "GET" {
                let _ = respond(&mut s, "405 Method Not Allowed", "Method not allowed.").await;
                return;
            }
            if let Some(account) = account_of_start_path(req.path()) {
                match tokens.start_redirect(&account).await {
                    Some(url) => {
                        let _ = respond_raw(&mut s, "302 Found", "text/plain", &[("Location", &url)], b"").await;
                    }
                    None => {
                        let _ = respond(
                            &mut s,
                            "404 Not Found",
                            "No browser authorisation is pending for this account.",
                        )
                        .await;
                    }
                }
                return;
            }
            let mut rows = Vec::new();
            for a in tokens.all() {
                rows.push(tokens.status(&a).await);
            }
            let (ctype, body, extra) = match req.path() {
                "/status.json" => (
                    "application/json",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "accounts": rows,
                        "kdf": tokens.kdf_status(),
                    }))
                    .unwrap_or_default(),
                    vec![],
                ),
                "/" => (
                    "text/html; charset=utf-8",
                    status_page::page(&rows, &tokens.kdf_status(), now_unix()),
                    vec![("Content-Security-Policy", status_page::CONTENT_SECURITY_POLICY)],
                ),
                _ => {
                    let _ = respond(&mut s, "404 Not Found", "Not found.").await;
                    return;
                }
            };
            let _ = respond_raw(&mut s, "200 OK", ctype, &extra, body.as_bytes()).await;
        });
    }
}

/// A button on the page (a same-origin POST to the start address): starts
/// the account's on-demand authorisation if none is pending, then sends
/// this browser on to the provider (browser flow) or back to the page,
/// which shows the device code. What went wrong is said in a sentence.
async fn start_from_page(s: &mut tokio::net::TcpStream, tokens: &Arc<TokenManager>, account: &str) {
    let Some(acct) = tokens.get(account) else {
        let _ = respond(s, "404 Not Found", "No OAuth account of that name.").await;
        return;
    };
    match tokens.start_authorization(&acct).await {
        Ok(Some(_)) => {
            tracing::info!(account = %acct.name(), "authorisation started from the status page");
        }
        Ok(None) => {}
        Err(e) => {
            let _ = respond(s, "409 Conflict", &format!("mailproxy: {e}")).await;
            return;
        }
    }
    let to = tokens.start_redirect(account).await.unwrap_or_else(|| "/".to_string());
    let _ = respond_raw(s, "303 See Other", "text/plain", &[("Location", &to)], b"").await;
}
