//! A light fake IMAP upstream for load: thousands of sessions cost it a
//! task and a small buffer each, so that what is measured is the proxy.
//! It accepts every login (`LOGIN`, `AUTHENTICATE` with an initial
//! response: passthrough and OAuth alike), skips literals of any size
//! (`APPEND … {N+}`), answers `LOGOUT` with `BYE` and closes, and every
//! other command with a tagged `OK`. It counts what it saw.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The listener's task, stopped when this drops (sessions already open
/// end with their sockets).
pub struct Light(tokio::task::JoinHandle<()>);

impl Drop for Light {
    fn drop(&mut self) {
        self.0.abort();
    }
}

const GREETING: &[u8] =
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER] light ready\r\n";
const CAPS: &str = "* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN AUTH=XOAUTH2 AUTH=OAUTHBEARER IDLE\r\n";

/// What the fake saw, shared with the test.
#[derive(Clone, Default)]
pub struct LightTally {
    connections: Arc<AtomicU64>,
    logins: Arc<AtomicU64>,
    /// Bytes of literals skipped (what clients pushed through).
    literal_bytes: Arc<AtomicU64>,
}

impl LightTally {
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn logins(&self) -> u64 {
        self.logins.load(Ordering::Relaxed)
    }

    pub fn literal_bytes(&self) -> u64 {
        self.literal_bytes.load(Ordering::Relaxed)
    }
}

/// Listens on a free loopback port until the task drops.
pub async fn start() -> (u16, LightTally, Light) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let tally = LightTally::default();
    let t = tally.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else {
                // Out of descriptors under load: wait rather than spin.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            };
            t.connections.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(serve(sock, t.clone()));
        }
    });
    (port, tally, Light(task))
}

/// `N` when the line ends with a literal announcement `{N}` or `{N+}`.
fn literal(line: &str) -> Option<(u64, bool)> {
    let l = line.trim_end().strip_suffix('}')?;
    let (_, n) = l.rsplit_once('{')?;
    let plus = n.ends_with('+');
    Some((n.trim_end_matches('+').parse().ok()?, plus))
}

async fn serve(sock: TcpStream, tally: LightTally) {
    let _ = sock.set_nodelay(true);
    let (rd, mut wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(1024, rd);
    if wr.write_all(GREETING).await.is_err() {
        return;
    }
    let mut line = String::new();
    loop {
        line.clear();
        match rd.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let tag = line.split_whitespace().next().unwrap_or("*").to_string();
        let cmd = line.split_whitespace().nth(1).unwrap_or("").to_ascii_uppercase();
        // A command with literals: skip them, then the rest of the command.
        while let Some((n, plus)) = literal(&line) {
            if !plus && wr.write_all(b"+ go ahead\r\n").await.is_err() {
                return;
            }
            let skipped = tokio::io::copy(&mut (&mut rd).take(n), &mut tokio::io::sink()).await;
            if skipped.ok() != Some(n) {
                return;
            }
            tally.literal_bytes.fetch_add(n, Ordering::Relaxed);
            line.clear();
            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
        }
        let answer = match cmd.as_str() {
            "LOGIN" | "AUTHENTICATE" => {
                tally.logins.fetch_add(1, Ordering::Relaxed);
                format!("{tag} OK [CAPABILITY IMAP4rev1 LITERAL+ IDLE] logged in\r\n")
            }
            "CAPABILITY" => format!("{CAPS}{tag} OK done\r\n"),
            "IDLE" => {
                if wr.write_all(b"+ idling\r\n").await.is_err() {
                    return;
                }
                loop {
                    line.clear();
                    if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line.trim_end().eq_ignore_ascii_case("DONE") {
                        break;
                    }
                }
                format!("{tag} OK idle done\r\n")
            }
            "LOGOUT" => {
                let _ = wr
                    .write_all(format!("* BYE light\r\n{tag} OK bye\r\n").as_bytes())
                    .await;
                return;
            }
            "SELECT" | "EXAMINE" => {
                format!("* 0 EXISTS\r\n* OK [UIDVALIDITY 1] ok\r\n{tag} OK [READ-WRITE] selected\r\n")
            }
            _ => format!("{tag} OK done\r\n"),
        };
        if wr.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}
