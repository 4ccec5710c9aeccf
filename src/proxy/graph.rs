//! After `AUTH` on an account with `smtp = "graph"`: mailproxy is the
//! submission server itself. The sans-I/O [`Submission`] machine answers
//! the transaction commands, each message goes to a spool file as it
//! arrives, and the Graph client delivers it; the client hears `250` only
//! once Graph has accepted the message.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Ctx;
use crate::audit::Entry;
use crate::config::Account;
use crate::net::Stream;
use crate::secret::Secret;
use crate::smtp::submission::{Envelope, Event, Submission, SubmissionConfig};
use crate::tokens::{AccountTokens, Resource, TokenManager};
use crate::upstream::graph::spool::Spool;
use crate::upstream::graph::{GraphClient, GraphError, GraphToken, REQUEST_TIMEOUT};

/// How long a client may stay silent between commands (RFC 5321 §4.5.3.2
/// asks servers for at least 5 minutes).
const IDLE: Duration = Duration::from_secs(300);

/// The Graph token of one account, renewed through the token manager.
pub(crate) struct GraphTokens {
    pub tokens: Arc<TokenManager>,
    pub account: Arc<AccountTokens>,
}

impl GraphToken for GraphTokens {
    async fn token(&self) -> Result<Secret, GraphError> {
        self.tokens
            .access_token_for(&self.account, Resource::Graph)
            .await
            .map_err(|e| token_error(&e))
    }

    async fn renew(&self, rejected: &Secret) -> Result<Secret, GraphError> {
        self.tokens.reject(&self.account, rejected).await;
        self.token().await
    }
}

fn token_error(e: &crate::tokens::TokenError) -> GraphError {
    GraphError::Token {
        why: e.to_string(),
        temporary: e.is_transient(),
    }
}

/// Serves the client's transactions until it leaves. `to_client` is what
/// the login machine still had to say, `pending` what the client pipelined.
pub(crate) async fn serve(
    ctx: &Ctx,
    mut client: Stream,
    account: Arc<AccountTokens>,
    to_client: Vec<u8>,
    pending: Vec<u8>,
) -> std::io::Result<()> {
    let config = ctx.config();
    let a = account.account.clone();
    let Some(api) = a.graph.clone() else {
        return Ok(());
    };
    let http = match crate::oauth::http_client_timed(&config, REQUEST_TIMEOUT) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot set up the HTTP client for Microsoft Graph");
            client
                .write_all(b"421 4.3.0 mailproxy cannot reach Microsoft Graph\r\n")
                .await?;
            return Ok(());
        }
    };
    let graph = GraphClient {
        http,
        base: api.base,
        mailbox: a.username.clone(),
        account: a.name.clone(),
    };
    let tokens = GraphTokens {
        tokens: ctx.tokens.clone(),
        account,
    };
    let mut sub = Submission::new(
        SubmissionConfig {
            hostname: "mailproxy".into(),
            max_size: config.limits.max_send_size,
            max_line: config.limits.max_line,
            senders: senders(&a),
        },
        &pending,
    );
    let mut spool = Spooled {
        dir: config.state_dir.join("spool"),
        file: None,
        broken: None,
    };
    let mut out = to_client;
    let mut buf = vec![0u8; 64 * 1024];
    tracing::info!(api = %graph.base, "submitting through Microsoft Graph");
    loop {
        let event = sub.poll();
        out.extend(sub.take_output());
        match event {
            Some(Event::Body(piece)) => spool.append(&piece).await,
            Some(Event::Send(env)) => {
                flush(&mut client, &mut out).await?;
                let reply = match spool.take() {
                    Ok(file) => deliver(ctx, &graph, &tokens, file, &env).await,
                    Err(why) => format!("451 4.3.0 mailproxy could not store the message ({why}); try again later"),
                };
                sub.finished(&reply);
            }
            Some(Event::Discard) => spool.discard(),
            Some(Event::Quit | Event::Close) => {
                flush(&mut client, &mut out).await?;
                let _ = client.shutdown().await;
                return Ok(());
            }
            None => {
                flush(&mut client, &mut out).await?;
                if !sub.wants_input() {
                    return Ok(());
                }
                let n = tokio::select! {
                    r = tokio::time::timeout(IDLE, client.read(&mut buf)) => match r {
                        Ok(r) => r?,
                        Err(_) => {
                            client.write_all(b"421 4.4.2 mailproxy: idle for too long\r\n").await?;
                            0
                        }
                    },
                    () = ctx.shutdown.cancelled() => {
                        client.write_all(b"421 4.3.0 mailproxy is shutting down\r\n").await?;
                        0
                    }
                };
                if n == 0 {
                    return Ok(());
                }
                sub.feed(&buf[..n]);
            }
        }
    }
}

/// The current message's spool file; a failure to write it is kept and
/// answered at the end of the message, not by dropping the connection.
struct Spooled {
    dir: std::path::PathBuf,
    file: Option<Spool>,
    broken: Option<String>,
}

impl Spooled {
    async fn append(&mut self, piece: &[u8]) {
        if self.broken.is_some() {
            return;
        }
        let result = match &mut self.file {
            Some(f) => f.append(piece).await,
            None => match Spool::create(&self.dir).await {
                Ok(f) => self.file.insert(f).append(piece).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot spool a message");
            self.file = None;
            self.broken = Some(e.to_string());
        }
    }

    fn discard(&mut self) {
        self.file = None;
        self.broken = None;
    }

    /// The finished message's file (none for an empty one), or why it has none.
    fn take(&mut self) -> Result<Option<Spool>, String> {
        match self.broken.take() {
            Some(why) => Err(why),
            None => Ok(self.file.take()),
        }
    }
}

async fn flush(client: &mut Stream, out: &mut Vec<u8>) -> std::io::Result<()> {
    if !out.is_empty() {
        client.write_all(out).await?;
        client.flush().await?;
        out.clear();
    }
    Ok(())
}

/// One message to Graph; the reply line for the client. The spool file is
/// removed when this returns, sent or not.
async fn deliver(ctx: &Ctx, graph: &GraphClient, tokens: &GraphTokens, spool: Option<Spool>, env: &Envelope) -> String {
    let started = std::time::Instant::now();
    let result = match spool {
        Some(mut s) => graph.send(&mut s, env, tokens).await,
        None => Err(GraphError::Malformed("it is empty".into())),
    };
    let rcpt = env.rcpt.len();
    let took_ms = started.elapsed().as_millis() as u64;
    let (reply, outcome) = match &result {
        Ok(()) => {
            tracing::info!(
                bytes = env.size,
                recipients = rcpt,
                took_ms,
                "sent through Microsoft Graph"
            );
            (
                "250 2.0.0 Message accepted by Microsoft Graph".to_string(),
                "sent".to_string(),
            )
        }
        Err(e) => {
            tracing::warn!(bytes = env.size, recipients = rcpt, took_ms, kind = e.kind(), error = %e, "Microsoft Graph did not take the message");
            (e.reply(), format!("refused ({}): {e}", e.kind()))
        }
    };
    let line = format!("{outcome}; {} bytes to {rcpt} recipient(s)", env.size);
    ctx.tokens.audit(Entry::new(&graph.account, "graph_send", line));
    reply
}

/// The addresses the account may send as: its mailbox and its name.
fn senders(a: &Account) -> Vec<String> {
    let mut s = vec![a.username.to_lowercase()];
    let name = a.name.to_lowercase();
    if !s.contains(&name) && name.contains('@') {
        s.push(name);
    }
    s
}
