//! A recording IMAP upstream: greets, accepts (or refuses, as told) every
//! `AUTHENTICATE XOAUTH2` and keeps the decoded `user=` and bearer token of
//! each, so a test sees exactly what the proxy sent as whom. Plaintext on
//! loopback, from threads of its own.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use base64::Engine;

#[derive(Default)]
struct State {
    logins: Vec<(String, String)>,
    refusal: Option<String>,
}

pub struct RecordingImap {
    pub port: u16,
    state: Arc<Mutex<State>>,
}

impl RecordingImap {
    pub fn start() -> RecordingImap {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind recording upstream");
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            for sock in l.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || serve(sock, st));
            }
        });
        RecordingImap { port, state }
    }

    /// `(user, token)` of every XOAUTH2 login so far, in order.
    pub fn logins(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().logins.clone()
    }

    /// From now on, answer every AUTHENTICATE with `NO <text>`.
    pub fn refuse_with(&self, text: &str) {
        self.state.lock().unwrap().refusal = Some(text.into());
    }
}

fn serve(sock: TcpStream, st: Arc<Mutex<State>>) {
    let mut w = sock.try_clone().unwrap();
    let mut r = BufReader::new(sock);
    let caps = "IMAP4rev1 AUTH=XOAUTH2 SASL-IR";
    if w.write_all(format!("* OK [CAPABILITY {caps}] recording server ready\r\n").as_bytes())
        .is_err()
    {
        return;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.trim_end().splitn(4, ' ');
        let tag = parts.next().unwrap_or("*").to_string();
        let cmd = parts.next().unwrap_or("").to_ascii_uppercase();
        let answer = match cmd.as_str() {
            "CAPABILITY" => format!("* CAPABILITY {caps}\r\n{tag} OK done\r\n"),
            "AUTHENTICATE" => {
                let ir = match parts.nth(1) {
                    Some(ir) => ir.to_string(),
                    None => {
                        let _ = w.write_all(b"+ \r\n");
                        let mut next = String::new();
                        if r.read_line(&mut next).unwrap_or(0) == 0 {
                            return;
                        }
                        next.trim_end().to_string()
                    }
                };
                let raw = base64::engine::general_purpose::STANDARD.decode(ir).unwrap_or_default();
                let text = String::from_utf8_lossy(&raw).into_owned();
                let field = |k: &str| {
                    text.split('\x01')
                        .find_map(|f| f.strip_prefix(k))
                        .unwrap_or_default()
                        .to_string()
                };
                let mut s = st.lock().unwrap();
                s.logins.push((field("user="), field("auth=Bearer ")));
                match &s.refusal {
                    Some(why) => format!("{tag} NO {why}\r\n"),
                    None => format!("{tag} OK [CAPABILITY IMAP4rev1] logged in\r\n"),
                }
            }
            "LOGOUT" => format!("* BYE bye\r\n{tag} OK done\r\n"),
            _ => format!("{tag} OK done\r\n"),
        };
        if w.write_all(answer.as_bytes()).is_err() || cmd == "LOGOUT" {
            return;
        }
    }
}
