//! The local status page (`[server] status_listen`): every account's state
//! and, for a pending authorisation, the link to open or the code to enter.
//! Loopback only (the config refuses anything else). `/status.json` gives
//! the same as JSON for scripts.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::oauth::login::read_target;
use crate::tokens::TokenManager;

pub async fn serve(sock: TcpListener, tokens: Arc<TokenManager>, shutdown: CancellationToken) {
    loop {
        let mut s = tokio::select! {
            r = sock.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let tokens = tokens.clone();
        tokio::spawn(async move {
            let Ok(Some(target)) = tokio::time::timeout(Duration::from_secs(10), read_target(&mut s)).await else {
                return;
            };
            let mut rows = Vec::new();
            for a in tokens.all() {
                rows.push(tokens.status(&a).await);
            }
            let (ctype, body) = match target.split('?').next().unwrap_or("") {
                "/status.json" => (
                    "application/json",
                    serde_json::to_string_pretty(&rows).unwrap_or_default(),
                ),
                "/" => ("text/html; charset=utf-8", page(&rows)),
                _ => ("text/plain", "not found\n".to_string()),
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(body.as_bytes()).await;
            let _ = s.shutdown().await;
        });
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(rows: &[crate::tokens::AccountStatus]) -> String {
    let mut h = String::from(
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=10><title>mailproxy</title>\
         <h1>mailproxy accounts</h1><table border=1 cellpadding=4><tr><th>account<th>provider<th>flow<th>state<th>what to do</tr>",
    );
    for r in rows {
        let todo = match &r.pending {
            Some(p) => match &p.user_code {
                Some(code) => format!(
                    "open <a href=\"{0}\">{0}</a> and enter <b>{1}</b>",
                    esc(&p.url),
                    esc(code)
                ),
                None => format!("<a href=\"{}\">sign in</a>", esc(&p.url)),
            },
            None => esc(r.detail.as_deref().unwrap_or("")),
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
