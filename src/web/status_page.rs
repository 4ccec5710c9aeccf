//! The HTML of the status page: one card per account with its state in
//! words, what to do, the decoded last error, token times, last use and
//! sessions open; a button for each authorisation the page can start or
//! finish. Plain HTML and inline CSS (no script), readable on a phone, and
//! reloaded by the browser every [`REFRESH_SECS`].
//!
//! Buttons are same-origin POSTs to the local start address; the provider's
//! URL and its `state` never appear here (the POST answers with a redirect
//! for the browser that pressed the button only).

use crate::tokens::authorize::start_path;
use crate::tokens::{AccountStatus, KdfStatus, ProtocolSessions};

/// How often the page reloads itself.
pub const REFRESH_SECS: u64 = 10;

/// Sent with the page: nothing but its own inline style may load or run.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'";

const STYLE: &str = "\
:root{color-scheme:light dark;--ok:#1a7f37;--warn:#9a6700;--bad:#cf222e;--wait:#0969da;--muted:#6e7781}\
*{box-sizing:border-box}\
body{font:16px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0 auto;max-width:60rem;padding:1rem}\
header h1{font-size:1.5rem;margin:.2rem 0}\
.sub{color:var(--muted);margin:0 0 1rem}\
main{display:grid;gap:1rem;grid-template-columns:repeat(auto-fill,minmax(18rem,1fr))}\
.acct{border:1px solid #d0d7de;border-left:.4rem solid var(--muted);border-radius:.5rem;padding:.8rem 1rem}\
.acct h2{font-size:1.1rem;margin:0 0 .3rem;overflow-wrap:anywhere}\
.s-ok{border-left-color:var(--ok)}.s-needs-login{border-left-color:var(--bad)}\
.s-authorizing{border-left-color:var(--wait)}.s-locked,.s-error{border-left-color:var(--warn)}\
.badge{display:inline-block;border-radius:1rem;padding:.05rem .6rem;color:#fff;font-weight:600;background:var(--muted)}\
.s-ok .badge{background:var(--ok)}.s-needs-login .badge{background:var(--bad)}\
.s-authorizing .badge{background:var(--wait)}.s-locked .badge,.s-error .badge{background:var(--warn)}\
.kind{color:var(--muted);font-size:.9rem}\
.what{margin:.5rem 0}\
.error{border-left:.2rem solid var(--bad);padding-left:.5rem}\
dl{display:grid;grid-template-columns:auto 1fr;gap:.1rem .8rem;margin:.5rem 0 0;font-size:.95rem}\
dt{color:var(--muted)}dd{margin:0}\
button{font:inherit;font-weight:600;padding:.6rem 1.2rem;border-radius:.4rem;border:0;background:var(--wait);color:#fff;width:100%;max-width:20rem;cursor:pointer}\
.code{font:700 2rem/1.2 ui-monospace,'DejaVu Sans Mono',monospace;letter-spacing:.15rem;margin:.3rem 0}\
footer{color:var(--muted);font-size:.85rem;margin-top:1.5rem}";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The state in words, for people.
pub fn state_words(state: &str) -> &'static str {
    match state {
        "ok" => "Working",
        "needs login" => "Needs sign-in",
        "authorizing" => "Waiting for sign-in",
        "locked" => "Locked until a client logs in",
        "error" => "Refresh failing, retrying",
        _ => "Unknown",
    }
}

fn flow_words(flow: &str) -> &str {
    match flow {
        "browser" => "browser sign-in",
        "device" => "device code",
        "client_credentials" => "app-only (client credentials)",
        other => other,
    }
}

/// `2024-01-01 12:34 UTC` from unix seconds.
pub fn utc(t: u64) -> String {
    let (y, m, d, h, min, _) = crate::text::civil_utc(t);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{min:02} UTC")
}

fn span(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs} s"),
        60..=5_999 => format!("{} min", secs / 60),
        6_000..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

/// `in 5 min` / `3 min ago` / `now`, relative to `now`.
pub fn relative(now: u64, t: u64) -> String {
    if t > now + 1 {
        format!("in {}", span(t - now))
    } else if now > t + 1 {
        format!("{} ago", span(now - t))
    } else {
        "now".into()
    }
}

fn when(now: u64, t: Option<u64>, none: &str) -> String {
    match t {
        Some(t) => format!("<time title=\"{0}\">{1}</time>", utc(t), relative(now, t)),
        None => esc(none),
    }
}

/// `it failed` → `It failed.`
fn sentence(s: &str) -> String {
    let s = s.trim();
    let mut c = s.chars();
    let mut out: String = c.next().map(|f| f.to_uppercase().collect()).unwrap_or_default();
    out.push_str(c.as_str());
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

/// What to do, or what is going on, for one account.
fn todo(r: &AccountStatus) -> String {
    let button = |label: &str| {
        format!(
            "<form method=post action=\"{}\"><button>{}</button></form>",
            esc(&start_path(&r.account)),
            esc(label)
        )
    };
    if let Some(d) = &r.device {
        return format!(
            "<p class=what>On any device, open <a href=\"{0}\" rel=noreferrer>{0}</a> and enter</p><p class=code>{1}</p>",
            esc(&d.verification_uri),
            esc(&d.user_code)
        );
    }
    let mut h = String::new();
    if r.pending.is_some() {
        h.push_str("<p class=what>A client asked for this account: sign in at the provider to finish.</p>");
        h.push_str(&button("Sign in"));
        return h;
    }
    if let Some(d) = r.detail.as_deref().filter(|d| !d.is_empty()) {
        let class = if r.state == "error" { "what error" } else { "what" };
        h.push_str(&format!("<p class=\"{class}\">{}</p>", esc(&sentence(d))));
    }
    if r.can_start {
        h.push_str(&button("Start sign-in"));
    } else if r.state == "needs login" && !r.detail.as_deref().unwrap_or("").contains("mailproxy login") {
        h.push_str(&format!(
            "<p class=what>Its owner runs <code>mailproxy login {}</code> on this machine.</p>",
            esc(&r.account)
        ));
    }
    h
}

fn card(r: &AccountStatus, now: u64) -> String {
    let slug = r.state.replace(' ', "-");
    let mut h = format!(
        "<section class=\"acct s-{slug}\" data-status=\"{state}\" data-account=\"{acct}\">\
         <h2>{acct}</h2><p><span class=badge>{words}</span> <span class=kind>{provider} · {flow}</span></p>",
        state = esc(&r.state),
        acct = esc(&r.account),
        words = state_words(&r.state),
        provider = esc(&r.provider),
        flow = esc(flow_words(&r.flow)),
    );
    h.push_str(&todo(r));
    if let Some(e) = r.last_error.as_deref().filter(|e| Some(*e) != r.detail.as_deref()) {
        h.push_str(&format!(
            "<p class=\"what error\">Last error: {}</p>",
            esc(&sentence(e))
        ));
    }
    h.push_str("<dl>");
    let mut row = |k: &str, v: String| h.push_str(&format!("<dt>{k}<dd>{v}"));
    if r.state != "needs login" && r.state != "authorizing" {
        row(
            "Access token",
            match r.access_expires {
                Some(t) if t > now => format!("expires {}", when(now, Some(t), "")),
                Some(_) => "expired; renewed at the next use".into(),
                None => "none in memory".into(),
            },
        );
        if let Some(t) = r.graph_expires {
            let v = if t > now {
                format!("expires {}", when(now, Some(t), ""))
            } else {
                "expired; renewed at the next message".into()
            };
            row("Graph token", v);
        }
        row("Next refresh", when(now, r.next_refresh, "when a client logs in"));
    }
    row("Last refresh", when(now, r.last_refresh, "never"));
    row("Last use", when(now, r.last_use, "not since start"));
    row(
        "Sessions open",
        match r.upstream_sessions.as_slice() {
            [] => r.sessions.to_string(),
            all => format!(
                "<span class=sessions>{}</span>",
                esc(&ProtocolSessions::describe_all(all))
            ),
        },
    );
    h.push_str("</dl></section>");
    h
}

/// The whole page.
pub fn page(rows: &[AccountStatus], kdf: &KdfStatus, now: u64) -> String {
    let attention = rows.iter().filter(|r| r.state != "ok").count();
    let summary = match (rows.len(), attention) {
        (0, _) => "No OAuth accounts are configured.".to_string(),
        (n, 0) => format!("All {n} accounts work."),
        (n, a) => format!("{a} of {n} accounts need attention."),
    };
    let mut h = format!(
        "<!doctype html><html lang=en><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=refresh content={REFRESH_SECS}>\
         <title>mailproxy status</title><style>{STYLE}</style>\
         <header><h1>mailproxy</h1><p class=sub>{summary} Updated {} · reloads every {REFRESH_SECS} s</p></header><main>",
        utc(now)
    );
    for r in rows {
        h.push_str(&card(r, now));
    }
    h.push_str(&format!(
        "</main><footer>Password checks since start: {}, running: {}, waiting: {}. \
         Machine-readable: <a href=\"/status.json\">/status.json</a></footer>\n",
        kdf.runs, kdf.in_flight, kdf.waiting
    ));
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str) -> AccountStatus {
        AccountStatus {
            account: "a<b>@example.org".into(),
            provider: "custom".into(),
            flow: "browser".into(),
            state: state.into(),
            detail: None,
            pending: None,
            device: None,
            access_expires: None,
            last_refresh: None,
            last_use: None,
            scopes: vec![],
            graph_expires: None,
            next_refresh: None,
            last_error: None,
            sessions: 0,
            upstream_sessions: vec![],
            can_start: false,
        }
    }

    #[test]
    fn a_graph_token_is_shown_beside_the_mail_token() {
        let mut r = row("ok");
        assert!(!page(&[r.clone()], &KdfStatus::default(), 1000).contains("Graph token"));
        r.graph_expires = Some(1300);
        let h = page(&[r], &KdfStatus::default(), 1000);
        assert!(
            h.contains("<dt>Graph token<dd>expires <time") && h.contains("in 5 min</time>"),
            "{h}"
        );
    }

    #[test]
    fn dates_and_spans() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc(1_704_112_496), "2024-01-01 12:34 UTC");
        assert_eq!(relative(1000, 1000), "now");
        assert_eq!(relative(1000, 1300), "in 5 min");
        assert_eq!(relative(1000, 10), "16 min ago");
        assert_eq!(relative(0, 3 * 86_400), "in 3 days");
    }

    #[test]
    fn names_are_escaped_and_buttons_post_to_the_start_address() {
        let mut r = row("needs login");
        r.can_start = true;
        r.detail = Some("it has not been authorised yet".into());
        let h = page(&[r], &KdfStatus::default(), 0);
        assert!(h.contains("a&lt;b&gt;@example.org") && !h.contains("a<b>"), "{h}");
        assert!(
            h.contains("<form method=post action=\"/authorize/a%3Cb%3E@example.org\"><button>Start sign-in</button>"),
            "{h}"
        );
        assert!(
            h.contains("Needs sign-in") && h.contains("It has not been authorised yet."),
            "{h}"
        );
        assert!(h.contains("1 of 1 accounts need attention"), "{h}");
    }

    #[test]
    fn a_device_code_is_shown_large_with_its_address() {
        let mut r = row("authorizing");
        r.flow = "device".into();
        r.device = Some(crate::tokens::authorize::DeviceShown {
            verification_uri: "https://example.org/device".into(),
            user_code: "WDJB-MJHT".into(),
        });
        let h = page(&[r], &KdfStatus::default(), 0);
        assert!(h.contains("<p class=code>WDJB-MJHT</p>"), "{h}");
        assert!(
            h.contains("<a href=\"https://example.org/device\" rel=noreferrer>"),
            "{h}"
        );
        assert!(!h.contains("<button"), "{h}");
    }

    #[test]
    fn sessions_open_are_shown_with_their_limit() {
        let mut r = row("ok");
        let s = |protocol: &str, open, limit| ProtocolSessions {
            protocol: protocol.into(),
            open,
            limit,
        };
        r.upstream_sessions = vec![s("imap", 3, Some(15)), s("smtp", 1, None)];
        let h = page(&[r], &KdfStatus::default(), 0);
        assert!(
            h.contains("<dt>Sessions open<dd><span class=sessions>IMAP 3 of 15 · SMTP 1, no limit</span>"),
            "{h}"
        );
    }

    #[test]
    fn no_button_when_the_owner_must_act() {
        let mut r = row("needs login");
        r.detail = Some("it has not been authorised yet".into());
        let h = page(&[r], &KdfStatus::default(), 0);
        assert!(!h.contains("<button"), "{h}");
        assert!(
            h.contains("Its owner runs <code>mailproxy login a&lt;b&gt;@example.org</code>"),
            "{h}"
        );
    }
}
