//! Response injection at an upstream's STARTTLS: a malicious server answers
//! the command that starts TLS (`STARTTLS`, `STLS`) and, in the same write,
//! sends plaintext replies that would pass for the answers to what the proxy
//! sends after the handshake. The proxy must discard them and log that it
//! did. [`injected_replies_are_discarded`] is the test; a [`Protocol`] gives
//! it one protocol's server and client sides (the SMTP and POP3 tests).

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::pki;
use super::world_mail::{LocalTls, MailWorld};
use super::LineConn;

/// The account the malicious server serves (a password account).
pub const MALLORY: &str = "mallory@example.org";
/// Its password at that server.
pub const MALLORY_PW: &str = "mallory-upstream-pw";
/// What the proxy logs each time it discards the injected bytes.
const DISCARDING: &str = "discarding plaintext the server sent before TLS";

/// What the malicious server saw, in order: `plain: LINE` before the
/// handshake, `tls: ...` after it.
#[derive(Clone, Default)]
pub struct Events(Arc<Mutex<Vec<String>>>);

impl Events {
    pub fn push(&self, event: String) {
        self.0.lock().unwrap().push(event);
    }

    fn seen(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// The malicious server's side of a session after the handshake.
pub type Tls = BufReader<TlsStream<TcpStream>>;

/// One protocol's side of the test.
pub trait Protocol: 'static {
    /// The account key, and the scheme of its `KEY+starttls://` URL.
    const KEY: &'static str;
    /// The server's greeting.
    const GREETING: &'static [u8];
    /// The command that starts TLS.
    const UPGRADE: &'static str;
    /// The server's answer to it with the injected replies behind it.
    const UPGRADE_AND_INJECTED: &'static [u8];

    /// The server's plaintext answer to any other command `line`.
    fn plain_reply(line: &str) -> &'static [u8];

    /// The server after the handshake: behaves, lets in only
    /// [`MALLORY`]/[`MALLORY_PW`] and records what it sees in `events`.
    fn serve_tls(tls: Tls, events: Events) -> impl Future<Output = io::Result<()>> + Send;

    /// The proxy's listener for this protocol.
    fn port(w: &MailWorld) -> u16;

    /// A login through the proxy at `port` with a wrong password, refused
    /// with the server's real answer (not an injected one). The connection
    /// is returned so that it stays open until the test ends.
    fn refused(port: u16) -> impl Future<Output = LineConn>;

    /// A login with the right password through the real post-TLS
    /// exchange, then a little use of the session.
    fn served(port: u16) -> impl Future<Output = LineConn>;

    /// What the server records of one session, up to the login's outcome
    /// (`ok`: the right password).
    fn session(ok: bool) -> Vec<String>;

    /// Checks what the server recorded after the two sessions' logins.
    fn check_rest(rest: &[String]);
}

/// The malicious server: for each connection, the greeting, plaintext
/// answers until the upgrade command, that answer with the injected replies
/// in one write, the handshake, then [`Protocol::serve_tls`].
async fn injecting_server<P: Protocol>(listener: TcpListener, acceptor: TlsAcceptor, events: Events) {
    loop {
        let Ok((sock, _)) = listener.accept().await else { return };
        let acceptor = acceptor.clone();
        let events = events.clone();
        tokio::spawn(async move {
            let mut rd = BufReader::new(sock);
            rd.get_mut().write_all(P::GREETING).await?;
            loop {
                let mut line = String::new();
                if rd.read_line(&mut line).await? == 0 {
                    return Ok::<_, io::Error>(());
                }
                let line = line.trim_end();
                events.push(format!("plain: {line}"));
                if line.eq_ignore_ascii_case(P::UPGRADE) {
                    rd.get_mut().write_all(P::UPGRADE_AND_INJECTED).await?;
                    break;
                }
                rd.get_mut().write_all(P::plain_reply(line)).await?;
            }
            assert!(rd.buffer().is_empty(), "client pipelined after {}", P::UPGRADE);
            let tls = acceptor.accept(rd.into_inner()).await?;
            P::serve_tls(BufReader::new(tls), events).await
        });
    }
}

/// A proxy with an account at the malicious server: a wrong password is not
/// accepted on the strength of the injected replies, the right one logs in
/// through the real post-TLS exchange, and both sessions' injections are
/// discarded and logged.
pub async fn injected_replies_are_discarded<P: Protocol>() {
    let mut std_listener = None;
    let mut leaf = None;
    let mut w = MailWorld::with(LocalTls::None, LocalTls::None, |env, _| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std_listener = Some(l);
        leaf = Some(env.dovecot.ca.server_leaf(&format!("fake-{}", P::KEY)));
        format!(
            "[accounts.\"{MALLORY}\"]\nprovider = \"password\"\n{key} = \"{key}+starttls://localhost:{port}\"\nca_file = \"{}\"\n\n",
            env.dovecot.ca_pem_path().display(),
            key = P::KEY
        )
    });
    let std_listener = std_listener.unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(std_listener).unwrap();
    let acceptor = TlsAcceptor::from(pki::server_config(&leaf.unwrap()));
    let events = Events::default();
    let server = tokio::spawn(injecting_server::<P>(listener, acceptor, events.clone()));
    w.start();
    let port = P::port(&w);

    let _refused = P::refused(port).await;
    assert!(w.proxy().wait_log(DISCARDING), "{}", w.logs());
    let _served = P::served(port).await;

    let ev = events.seen();
    let n = P::session(false).len();
    assert_eq!(ev[..n], P::session(false)[..], "{ev:?}");
    assert_eq!(ev[n..2 * n], P::session(true)[..], "{ev:?}");
    P::check_rest(&ev[2 * n..]);
    assert_eq!(w.logs().matches(DISCARDING).count(), 2, "{}", w.logs());
    server.abort();
}
