//! The status page in a real browser (Debian's headless Chromium): what it
//! shows for a working account, one that needs `mailproxy login` and one
//! waiting for an on-demand sign-in; each account's upstream sessions open
//! with their limit; its button takes the owner through the whole sign-in;
//! it fits a phone's screen and reloads itself. Screenshots
//! go to `target/status-page.png` and `target/status-page-after.png`.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::support::chromium::Chromium;
use crate::support::http;
use crate::support::world::*;
use crate::support::LineConn;
use serde_json::Value;

const DAVE: &str = "dave@example.org";
const ERIN: &str = "erin@example.org";

fn screenshot_path(name: &str) -> PathBuf {
    // CARGO_TARGET_TMPDIR is target/tmp: the pictures go next to it.
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join(name)
}

/// What one account's card shows, as the browser renders it.
#[derive(Debug)]
struct Card {
    state: String,
    text: String,
    buttons: Vec<String>,
    facts: HashMap<String, String>,
}

fn cards(b: &mut Chromium) -> HashMap<String, Card> {
    let v = b.eval(
        "[...document.querySelectorAll('section.acct')].map(s => ({
            account: s.dataset.account,
            state: s.dataset.status,
            text: s.innerText,
            buttons: [...s.querySelectorAll('button')].map(x => x.innerText),
            facts: Object.fromEntries([...s.querySelectorAll('dt')].map(dt => [dt.innerText, dt.nextElementSibling.innerText])),
        }))",
    );
    let str_of = |v: &Value| v.as_str().unwrap_or("").to_string();
    v.as_array()
        .expect("cards")
        .iter()
        .map(|c| {
            (
                str_of(&c["account"]),
                Card {
                    state: str_of(&c["state"]),
                    text: str_of(&c["text"]),
                    buttons: c["buttons"].as_array().unwrap().iter().map(str_of).collect(),
                    facts: c["facts"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), str_of(v)))
                        .collect(),
                },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_each_state_and_its_button_finishes_a_sign_in() {
    crate::support::chromium::require_chromium();
    let mut w = World::with(|env, _| {
        imaps_account(DAVE, env).replace("client_id =", "on_demand = false\nclient_id =") + &imaps_account(ERIN, env)
    });
    w.with_status_page();
    w.account_setting(ALICE, "max_upstream_sessions = 4");
    w.authorise(ALICE, ALICE_PW);
    let port = w.start();
    let status = w.status_addr();
    let home = format!("http://{status}/");
    let home2 = home.clone();
    let auth_url = w.env.provider.auth_url();

    // alice works and has two sessions open (of her 4); carol's first client login
    // starts an on-demand authorisation; dave was never authorised and
    // on-demand is off for him.
    let mut alice = LineConn::plain(port).await.unwrap();
    alice.read_line().await.unwrap();
    let r = alice
        .imap("a1", &format!("LOGIN \"{ALICE}\" \"{ALICE_PW}\""))
        .await
        .unwrap();
    assert!(r.tagged.starts_with("a1 OK"), "{}", r.tagged);
    let alice2 = login_ok(port, ALICE, ALICE_PW).await;
    let r = login_response(port, CAROL, "a client's guess").await;
    assert!(r.starts_with("a1 NO [ALERT]"), "{r}");
    let r = login_response(port, DAVE, "a client's guess").await;
    assert!(r.starts_with("a1 NO"), "{r}");

    let json = http::get(&format!("http://{status}/status.json")).unwrap().json();
    let row = |name: &str| {
        json["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["account"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(row(ALICE)["sessions"], 2, "{json}");
    let imap = serde_json::json!([{"protocol": "imap", "open": 2, "limit": 4}]);
    assert_eq!(row(ALICE)["upstream_sessions"], imap, "{json}");
    assert!(row(ALICE)["next_refresh"].is_u64(), "{json}");
    assert_eq!(row(CAROL)["state"], "authorizing", "{json}");
    assert_eq!(row(DAVE)["can_start"], false, "{json}");

    let mut b = tokio::task::spawn_blocking(|| Chromium::start(412, 900)).await.unwrap();
    let (mut b, seen) = tokio::task::spawn_blocking(move || {
        b.navigate(&home);
        let seen = cards(&mut b);
        // Fits a phone: nothing wider than the 412 px screen, and it reloads itself.
        let fits = b.eval("document.documentElement.scrollWidth <= window.innerWidth");
        assert_eq!(fits, Value::Bool(true), "the page is wider than a phone's screen");
        let refresh = b.eval("document.querySelector('meta[http-equiv=refresh]').content");
        assert_eq!(refresh, "10");
        let html = b.eval("document.documentElement.outerHTML");
        let html = html.as_str().unwrap().to_string();
        b.screenshot(&screenshot_path("status-page.png"));
        (b, (seen, html))
    })
    .await
    .unwrap();
    let (seen, html) = seen;
    assert!(!html.contains(&auth_url) && !html.contains("state="), "{html}");

    let a = &seen[ALICE];
    assert_eq!(a.state, "ok", "{a:?}");
    assert!(a.text.contains("Working"), "{a:?}");
    assert_eq!(a.facts["Sessions open"], "IMAP 2 of 4", "{a:?}");
    assert!(a.facts["Next refresh"].starts_with("in "), "{a:?}");
    assert!(a.facts["Access token"].starts_with("expires in "), "{a:?}");
    assert!(
        a.facts["Last use"].ends_with("ago") || a.facts["Last use"] == "now",
        "{a:?}"
    );
    assert!(a.buttons.is_empty(), "{a:?}");

    let c = &seen[CAROL];
    assert_eq!(c.state, "authorizing", "{c:?}");
    assert!(c.text.contains("Waiting for sign-in"), "{c:?}");
    assert_eq!(c.buttons, ["Sign in"], "{c:?}");
    assert_eq!(c.facts["Sessions open"], "IMAP 0, no limit", "{c:?}");

    let d = &seen[DAVE];
    assert_eq!(d.state, "needs login", "{d:?}");
    assert!(d.text.contains("Needs sign-in"), "{d:?}");
    assert!(d.text.contains(&format!("mailproxy login {DAVE}")), "{d:?}");
    assert!(d.buttons.is_empty(), "{d:?}");

    let e = &seen[ERIN];
    assert_eq!(e.state, "needs login", "{e:?}");
    assert_eq!(e.buttons, ["Start sign-in"], "{e:?}");

    // The button: the provider (which approves at once), then the
    // completion page, where the owner takes the generated password.
    let (b, generated, after) = tokio::task::spawn_blocking(move || {
        b.eval(&format!(
            "document.querySelector('section[data-account=\"{CAROL}\"] button').click()"
        ));
        b.wait_for("document.getElementById('generated') !== null", 20);
        let generated = b.eval("document.getElementById('generated').innerText");
        b.eval("document.querySelector('button[value=generated]').click()");
        b.wait_for("document.body.innerText.includes('local password of')", 20);
        b.navigate(&home2);
        let after = cards(&mut b);
        b.screenshot(&screenshot_path("status-page-after.png"));
        (b, generated.as_str().unwrap().to_string(), after)
    })
    .await
    .unwrap();
    drop(b);
    assert_eq!(after[CAROL].state, "ok", "{:?}", after[CAROL]);
    assert!(after[CAROL].buttons.is_empty());
    assert_eq!(w.env.provider.code_exchanges(), 2, "alice's login and carol's button");

    // The password taken on the completion page is the one clients use.
    let r = login_response(port, CAROL, &generated).await;
    assert!(r.starts_with("a1 OK"), "{r}");
    assert!(!w.logs().contains(&generated), "the generated password is not logged");

    // "Start sign-in" starts an on-demand authorisation and sends the
    // browser that pressed it to the provider.
    let origin = format!("http://{status}");
    let start = format!("http://{status}/authorize/{ERIN}");
    let r = http::request("POST", &start, &[("Origin", &origin)], b"").unwrap();
    assert_eq!(r.status, 303, "{}", r.text());
    // On to the redirect listener's own start address, which binds this
    // browser and sends it to the provider.
    let local_start = r.headers["location"].clone();
    assert!(
        local_start.contains("/authorize/") && !local_start.contains(status.as_str()),
        "{local_start}"
    );
    let r = http::Browser::new().send("GET", &local_start, &[], b"").unwrap();
    assert_eq!(r.status, 302, "{}", r.text());
    assert!(r.headers["location"].starts_with(&auth_url), "{:?}", r.headers);
    assert!(
        r.headers["set-cookie"].starts_with("mailproxy_signin_"),
        "{:?}",
        r.headers
    );
    let json = http::get(&format!("http://{status}/status.json")).unwrap().json();
    let erin = json["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["account"] == ERIN)
        .unwrap()
        .clone();
    assert_eq!(erin["state"], "authorizing", "{json}");

    // A POST for an account the page cannot start says why; a foreign origin is refused.
    let start = format!("http://{status}/authorize/{DAVE}");
    let r = http::request("POST", &start, &[("Origin", &origin)], b"").unwrap();
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("on-demand authorisation is off"), "{}", r.text());
    let r = http::request("POST", &start, &[("Origin", "http://evil.example")], b"").unwrap();
    assert_eq!(r.status, 403);
    drop((alice, alice2));
}
