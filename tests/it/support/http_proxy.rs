//! A small HTTP proxy for provider calls: `CONNECT host:port` tunnels and
//! absolute-form requests (`POST http://host/token HTTP/1.1`, what clients
//! send for `http://` URLs). It records every request line it relays, so a
//! test can see that a token request went through it. Loopback, threads.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub struct HttpProxy {
    pub port: u16,
    seen: Arc<Mutex<Vec<String>>>,
}

impl HttpProxy {
    pub fn start() -> HttpProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        std::thread::spawn(move || {
            for sock in l.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || relay(sock, s));
            }
        });
        HttpProxy { port, seen }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Request lines relayed so far (`POST http://…/token`, `CONNECT host:443`).
    pub fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

fn relay(client: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let end = line == "\r\n" || line == "\n";
        head.push(line);
        if end {
            break;
        }
    }
    let mut first = head[0].split_whitespace();
    let (method, target) = (
        first.next().unwrap_or("").to_string(),
        first.next().unwrap_or("").to_string(),
    );
    seen.lock().unwrap().push(format!("{method} {target}"));
    let mut client_w = client;
    let (authority, request) = if method == "CONNECT" {
        (target.clone(), None)
    } else {
        let Ok(url) = url::Url::parse(&target) else {
            let _ = client_w.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n");
            return;
        };
        let authority = format!(
            "{}:{}",
            url.host_str().unwrap_or(""),
            url.port_or_known_default().unwrap_or(80)
        );
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let mut req = format!("{method} {path} HTTP/1.1\r\n");
        for h in &head[1..] {
            if !h.to_ascii_lowercase().starts_with("proxy-") {
                req.push_str(h);
            }
        }
        (authority, Some(req))
    };
    let Ok(mut upstream) = TcpStream::connect(&authority) else {
        let _ = client_w.write_all(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n");
        return;
    };
    match request {
        Some(req) => {
            if upstream.write_all(req.as_bytes()).is_err() {
                return;
            }
        }
        None => {
            if client_w
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .is_err()
            {
                return;
            }
        }
    }
    // Whatever the client sent past the head (a body) is in the reader's buffer.
    let buffered = reader.buffer().to_vec();
    if !buffered.is_empty() && upstream.write_all(&buffered).is_err() {
        return;
    }
    let mut up_r = upstream.try_clone().unwrap();
    let mut cl_r = reader.into_inner();
    let mut up_w = upstream;
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut cl_r, &mut up_w);
        let _ = up_w.shutdown(Shutdown::Write);
    });
    let _ = std::io::copy(&mut up_r, &mut client_w);
    let _ = client_w.shutdown(Shutdown::Both);
    let _ = t.join();
}

/// TLS in front of a plain HTTP server (the fake provider), so that an
/// `https://localhost:PORT/…` URL reaches it: what a client behind a proxy
/// tunnels to with `CONNECT`. Its certificate comes from the test CA.
pub struct TlsFront {
    pub port: u16,
    _dir: tempfile::TempDir,
    pub ca_path: std::path::PathBuf,
}

impl TlsFront {
    pub fn start(backend: std::net::SocketAddr) -> TlsFront {
        let dir = tempfile::tempdir().unwrap();
        let ca = super::pki::TestCa::new(dir.path());
        let leaf = ca.server_leaf("front");
        let acceptor = tokio_rustls::TlsAcceptor::from(super::pki::server_config(&leaf));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::TcpListener::from_std(l).unwrap();
                loop {
                    let Ok((sock, _)) = l.accept().await else { continue };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(sock).await else {
                            return;
                        };
                        let Ok(mut back) = tokio::net::TcpStream::connect(backend).await else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut back).await;
                    });
                }
            });
        });
        TlsFront {
            port,
            ca_path: ca.cert_path().to_owned(),
            _dir: dir,
        }
    }
}
