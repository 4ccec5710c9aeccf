//! The local status page (`[server] status_listen`): every account's state
//! and, for a pending authorisation, the local start address (or the device
//! code). Loopback only (the config refuses anything else), and it answers
//! only requests whose `Host` is its own address (DNS rebinding) and no
//! cross-origin POST. `/status.json` gives the same as JSON for scripts and
//! monitoring: `{ "accounts": [...], "kdf": { "runs", "in_flight", "waiting" } }`.
//!
//! Never on this page: the provider's authorisation URL or its `state`.
//! `/authorize/ACCOUNT` answers each visit with a 302 to the provider with a
//! fresh `state`, for the browser that visits only.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::oauth::login::{read_request, respond, respond_raw};
use crate::tokens::authorize::{account_of_start_path, MAX_HTTP_CONNECTIONS, REQUEST_TIMEOUT};
use crate::tokens::{AccountStatus, TokenManager};

pub async fn serve(sock: TcpListener, tokens: Arc<TokenManager>, shutdown: CancellationToken) {
    let Ok(local) = sock.local_addr() else { return };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let mut s = tokio::select! {
            r = sock.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
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
            let (ctype, body) = match req.path() {
                "/status.json" => (
                    "application/json",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "accounts": rows,
                        "kdf": tokens.kdf_status(),
                    }))
                    .unwrap_or_default(),
                ),
                "/" => ("text/html; charset=utf-8", page(&rows)),
                _ => {
                    let _ = respond(&mut s, "404 Not Found", "Not found.").await;
                    return;
                }
            };
            let _ = respond_raw(&mut s, "200 OK", ctype, &[], body.as_bytes()).await;
        });
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(rows: &[AccountStatus]) -> String {
    let mut h = String::from(
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=10><title>mailproxy</title>\
         <h1>mailproxy accounts</h1><table border=1 cellpadding=4><tr><th>account<th>provider<th>flow<th>state<th>what to do</tr>",
    );
    for r in rows {
        let todo = match (&r.device, &r.pending) {
            (Some(d), _) => format!(
                "open <a href=\"{0}\" rel=noreferrer>{0}</a> and enter <b>{1}</b>",
                esc(&d.verification_uri),
                esc(&d.user_code)
            ),
            (None, Some(p)) => format!("<a href=\"{}\">sign in</a>", esc(&p.url)),
            (None, None) => esc(r.detail.as_deref().unwrap_or("")),
        };
        h.push_str(&format!(
            "<tr><td>{}<td>{}<td>{}<td>{}<td>{}</tr>",
            esc(&r.account),
            esc(&r.provider),
            esc(&r.flow),
            esc(&r.state),
            todo
        ));
    }
    h.push_str("</table>\n");
    h
}
