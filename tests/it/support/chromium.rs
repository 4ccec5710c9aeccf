//! A private headless Chromium (Debian's `chromium`) driven over the
//! DevTools protocol: a fresh profile per instance, one page, navigation,
//! script evaluation, clicks and screenshots.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

pub const CHROMIUM_BIN: &str = "/usr/bin/chromium";

pub fn require_chromium() {
    if !Path::new(CHROMIUM_BIN).exists() {
        panic!("chromium is not installed: run scripts/test (it installs Debian's chromium) or scripts/install-deps");
    }
}

pub struct Chromium {
    child: Child,
    _profile: tempfile::TempDir,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
}

impl Chromium {
    /// Starts Chromium with a window of `width`×`height` CSS pixels and
    /// attaches to one blank page.
    pub fn start(width: u32, height: u32) -> Chromium {
        require_chromium();
        let profile = tempfile::tempdir().expect("profile dir");
        let mut cmd = Command::new(CHROMIUM_BIN);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-quic",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", profile.path().display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = super::process::spawn_tied_to_process(cmd, libc::SIGKILL).expect("spawn chromium");
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(p), Some(path)) = (lines.next(), lines.next()) {
                    break (p.trim().to_string(), path.trim().to_string());
                }
            }
            assert!(Instant::now() < deadline, "chromium did not open its DevTools port");
            std::thread::sleep(Duration::from_millis(50));
        };
        let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}{path}")).expect("DevTools websocket");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        }
        let mut c = Chromium {
            child,
            _profile: profile,
            ws,
            session: String::new(),
            next_id: 1,
        };
        let target = c.browser_call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = c.browser_call("Target.attachToTarget", json!({"targetId": target_id, "flatten": true}));
        c.session = attached["sessionId"].as_str().expect("sessionId").to_string();
        c.call("Page.enable", json!({}));
        c.call("Runtime.enable", json!({}));
        c
    }

    fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).expect("send to chromium");
        loop {
            let m = self.ws.read().expect("read from chromium");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).expect("DevTools JSON");
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
            // Events and other answers are not needed.
        }
    }

    fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send(None, method, params)
    }

    /// One DevTools command on the page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let s = self.session.clone();
        self.send(Some(&s), method, params)
    }

    /// Evaluates `js` in the page and returns its value (JSON-able).
    pub fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("script failed: {js}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `js` evaluates to true (up to `secs`), or panics with
    /// what the page shows.
    pub fn wait_for(&mut self, js: &str, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let ok = self.call(
                "Runtime.evaluate",
                json!({"expression": format!("!!({js})"), "returnByValue": true}),
            );
            if ok["result"]["value"] == json!(true) {
                return;
            }
            if Instant::now() > deadline {
                let text = self.eval("location.href + '\\n' + (document.body ? document.body.innerText : '')");
                panic!("the page never satisfied `{js}`; it shows: {text}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Opens `url` and waits until it has loaded.
    pub fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        if let Some(e) = r.get("errorText") {
            panic!("navigating to {url} failed: {e}");
        }
        self.wait_for(
            &format!("document.readyState === 'complete' && location.href === {}", json!(url)),
            20,
        );
    }

    /// Saves a PNG of the whole page.
    pub fn screenshot(&mut self, path: &Path) {
        let r = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.ws.close(None);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
