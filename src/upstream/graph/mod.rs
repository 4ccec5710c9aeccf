//! The Microsoft Graph client of accounts with `smtp = "graph"`: a spooled
//! message leaves as `POST /users/{mailbox}/sendMail` (base64 MIME) when it
//! fits Graph's 4 MB per request, else as a draft created from its MIME
//! without its largest attachments, those uploaded through upload sessions
//! in chunks, then `send`. Before it leaves, its recipient fields are made
//! to say exactly the envelope ([`crate::smtp::recipients`]).
//!
//! An access token comes through a [`GraphToken`] the caller passes in
//! (the session's token manager); a `401` gets one fresh token and a retry.

mod error;
mod large;
pub mod spool;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::Method;

pub use error::{GraphError, Who};
use spool::Spool;

use crate::secret::Secret;
use crate::smtp::recipients;
use crate::smtp::submission::Envelope;

/// Largest request body `sendMail` and message creation take.
pub const MAX_REQUEST: u64 = 4 * 1024 * 1024;

/// Where a fresh Graph access token comes from.
pub trait GraphToken {
    async fn token(&self) -> Result<Secret, GraphError>;
    /// A new token after Graph answered `401` to `rejected`.
    async fn renew(&self, rejected: &Secret) -> Result<Secret, GraphError>;
}

pub struct GraphClient {
    pub http: reqwest::Client,
    /// The API root, e.g. `https://graph.microsoft.com/v1.0`.
    pub base: String,
    /// The mailbox messages are sent from (`/users/{mailbox}`).
    pub mailbox: String,
    /// The account, for sentences and logs.
    pub account: String,
}

/// One answer of Graph that is not an error.
pub(crate) struct Answer {
    pub body: Vec<u8>,
}

/// `mime` in base64, as a body that a retry sends again without a copy;
/// `mime` itself is freed first.
fn encoded(mime: Vec<u8>) -> Bytes {
    let text = base64::engine::general_purpose::STANDARD.encode(&mime);
    drop(mime);
    Bytes::from(text.into_bytes())
}

/// The base64 length of `n` bytes.
pub fn base64_len(n: u64) -> u64 {
    n.div_ceil(3) * 4
}

impl GraphClient {
    /// Sends the spooled message to the envelope's recipients; `Ok` only
    /// when Graph accepted it (`202`).
    pub async fn send(&self, spool: &mut Spool, env: &Envelope, tokens: &impl GraphToken) -> Result<(), GraphError> {
        let head_len = spool.header_len().await?;
        let head = spool.read_at(0, head_len).await?;
        let head = recipients::rewrite(&head, &env.rcpt);
        let total = head.len() as u64 + spool.size() - head_len as u64;
        let mut auth = Auth {
            tokens,
            current: tokens.token().await?,
            renewed: false,
        };
        if base64_len(total) <= MAX_REQUEST {
            let mut mime = head;
            let rest = usize::try_from(spool.size() - head_len as u64).unwrap_or(0);
            spool.read_into(head_len as u64, rest, &mut mime).await?;
            let body = encoded(mime);
            let url = self.url("sendMail");
            self.call(&mut auth, env, Method::POST, &url, Some(("text/plain", body)))
                .await?;
            return Ok(());
        }
        self.send_large(&mut auth, spool, env, head, head_len as u64).await
    }

    /// Over 4 MB: a draft from the message without its largest
    /// attachments, each of those through an upload session, then `send`.
    /// A draft left by a failure is deleted.
    async fn send_large<T: GraphToken>(
        &self,
        auth: &mut Auth<'_, T>,
        spool: &mut Spool,
        env: &Envelope,
        head: Vec<u8>,
        head_len: u64,
    ) -> Result<(), GraphError> {
        let large::Large { draft, uploads } = large::split(spool, head, head_len).await?;
        let body = Some(("text/plain", encoded(draft)));
        let created = self.call(auth, env, Method::POST, &self.url("messages"), body).await?;
        let msg = large::draft_path(&created.body)?;
        let result = self.upload_and_send(auth, spool, env, &msg, &uploads).await;
        if result.is_err() {
            let _ = self.call(auth, env, Method::DELETE, &self.url(&msg), None).await;
        }
        result
    }

    async fn upload_and_send<T: GraphToken>(
        &self,
        auth: &mut Auth<'_, T>,
        spool: &mut Spool,
        env: &Envelope,
        msg: &str,
        uploads: &[large::Upload],
    ) -> Result<(), GraphError> {
        for u in uploads {
            let url = self.url(&format!("{msg}/attachments/createUploadSession"));
            let body = Some(("application/json", Bytes::from(u.item().to_string())));
            let answer = self.call(auth, env, Method::POST, &url, body).await?;
            let upload_url = large::upload_url(&answer.body)?;
            let mut chunks = u.chunks();
            while let Some((chunk, first)) = chunks.next(spool).await? {
                let n = chunk.len() as u64;
                let range = format!("bytes {first}-{}/{}", first + n - 1, u.size());
                let req = self.http.put(&upload_url).header("Content-Range", range).body(chunk);
                let (status, headers, answer) = self.exchange(req, n).await?;
                self.judge(status, &headers, answer, env)?;
            }
        }
        let url = self.url(&format!("{msg}/send"));
        self.call(auth, env, Method::POST, &url, None).await?;
        Ok(())
    }

    /// `{base}/users/{mailbox}/{path}`.
    fn url(&self, path: &str) -> String {
        let mailbox: String = url::form_urlencoded::byte_serialize(self.mailbox.as_bytes()).collect();
        format!("{}/users/{mailbox}/{path}", self.base)
    }

    /// One authorised request: a `401` gets one fresh token and a retry;
    /// any other failure is decoded into a sentence.
    async fn call<T: GraphToken>(
        &self,
        auth: &mut Auth<'_, T>,
        env: &Envelope,
        method: Method,
        url: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<Answer, GraphError> {
        loop {
            let mut req = self
                .http
                .request(method.clone(), url)
                .bearer_auth(auth.current.expose());
            if let Some((ctype, bytes)) = &body {
                req = req.header(CONTENT_TYPE, *ctype).body(bytes.clone());
            }
            let sent = body.as_ref().map_or(0, |(_, b)| b.len() as u64);
            let (status, headers, answer) = self.exchange(req, sent).await?;
            if status == 401 && !auth.renewed {
                tracing::info!(account = %self.account, "Graph refused the access token; refreshing once");
                auth.current = auth.tokens.renew(&auth.current).await?;
                auth.renewed = true;
                continue;
            }
            return self.judge(status, &headers, answer, env);
        }
    }

    /// A success, or Graph's error decoded into a sentence.
    fn judge(&self, status: u16, headers: &HeaderMap, body: Vec<u8>, env: &Envelope) -> Result<Answer, GraphError> {
        if (200..300).contains(&status) {
            return Ok(Answer { body });
        }
        let who = Who {
            account: &self.account,
            mailbox: &self.mailbox,
            recipients: &env.rcpt,
        };
        Err(error::decode(status, retry_after(headers), &body, &who))
    }

    /// Sends `req`, counting it in the metrics by status, bytes and time.
    async fn exchange(&self, req: reqwest::RequestBuilder, sent: u64) -> Result<(u16, HeaderMap, Vec<u8>), GraphError> {
        let started = Instant::now();
        let result = async {
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body.to_vec()))
        }
        .await;
        let status = result.as_ref().map_or(0, |(s, _, _)| *s);
        crate::metrics::graph_request(status, sent, started.elapsed());
        result.map_err(|e| GraphError::Network(crate::oauth::describe_reqwest(&e)))
    }
}

/// The token a series of requests uses, renewed at most once.
struct Auth<'a, T: GraphToken> {
    tokens: &'a T,
    current: Secret,
    renewed: bool,
}

/// `Retry-After` in seconds (Graph sends seconds, not dates).
fn retry_after(h: &HeaderMap) -> Option<u64> {
    h.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()
}

/// How long a request to Graph may take in all: an upload chunk of a few
/// megabytes on a slow line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
