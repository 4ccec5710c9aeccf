//! A fake Microsoft Graph over real HTTP, next to the fake provider: it
//! takes `sendMail` with base64 MIME, drafts created from MIME, upload
//! sessions and `send`, as Graph does. It checks each bearer token at the
//! provider and wants the Graph audience (a mail token gets `401`), refuses
//! request bodies over 4 MB with `413`, keeps every message it accepted,
//! and answers `429` (with `Retry-After`), `401` or `403` on demand.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use base64::Engine;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use super::http::{self, Request, Response};
use super::provider::TokenView;

/// Graph's limit on one request body.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;
/// The scope a Graph token carries here (its audience).
pub const GRAPH_SCOPE: &str = "https://graph.example/Mail.Send";

/// One message Graph accepted.
#[derive(Clone, Debug)]
pub struct Sent {
    /// The `/users/{mailbox}` it was sent from.
    pub mailbox: String,
    /// The MIME as uploaded (for a draft: without the uploaded attachments).
    pub mime: Vec<u8>,
    /// Attachments uploaded through upload sessions: name and bytes.
    pub uploaded: Vec<(String, Vec<u8>)>,
    /// Whom Graph delivers to: the `To`, `Cc` and `Bcc` addresses, lower-cased.
    pub recipients: Vec<String>,
}

#[derive(Default)]
struct Draft {
    mailbox: String,
    mime: Vec<u8>,
    uploaded: Vec<(String, Vec<u8>)>,
}

struct Upload {
    draft: String,
    name: String,
    size: usize,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct State {
    sent: Vec<Sent>,
    drafts: HashMap<String, Draft>,
    uploads: HashMap<String, Upload>,
    /// Answers for the next authorised requests: status, Retry-After, body.
    inject: VecDeque<(u16, Option<u64>, String)>,
    /// Bearer tokens seen, in order.
    tokens: Vec<String>,
    /// Request bodies larger than [`MAX_REQUEST`] that were refused.
    too_large: usize,
    largest_request: usize,
    next_id: u64,
}

pub struct FakeGraph {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeGraph {
    /// Starts on `127.0.0.1:0`, checking tokens with `tokens`.
    pub fn start(tokens: TokenView) -> FakeGraph {
        let state = Arc::new(Mutex::new(State::default()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake graph");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("fake-graph".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("graph runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        _ = rx => {}
                        () = async {
                            loop {
                                let Ok((mut sock, _)) = listener.accept().await else { continue };
                                let (st, tokens) = (st.clone(), tokens.clone());
                                tokio::spawn(async move {
                                    let (rd, mut wr) = sock.split();
                                    let Some(req) = http::read_request(rd).await else { return };
                                    let resp = handle(&req, &mut lock(&st), &tokens, addr);
                                    let _ = wr.write_all(&resp.to_bytes()).await;
                                    let _ = wr.shutdown().await;
                                });
                            }
                        } => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_millis(100));
            })
            .expect("spawn fake graph");
        FakeGraph {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// What an account's `smtp` says to send here.
    pub fn smtp_setting(&self) -> String {
        format!("graph+http://{}/v1.0", self.addr)
    }

    /// Every message accepted so far.
    pub fn sent(&self) -> Vec<Sent> {
        lock(&self.state).sent.clone()
    }

    /// The next `n` authorised requests get `status` (with `Retry-After`
    /// `retry_after` seconds, and a Graph error `code`).
    pub fn fail_next(&self, n: usize, status: u16, retry_after: Option<u64>, code: &str) {
        let body = json!({"error": {"code": code, "message": format!("injected {status}")}}).to_string();
        let mut st = lock(&self.state);
        for _ in 0..n {
            st.inject.push_back((status, retry_after, body.clone()));
        }
    }

    /// Bearer tokens presented so far.
    pub fn tokens_seen(&self) -> Vec<String> {
        lock(&self.state).tokens.clone()
    }

    /// The largest request body received, and how many were refused as over 4 MB.
    pub fn request_sizes(&self) -> (usize, usize) {
        let st = lock(&self.state);
        (st.largest_request, st.too_large)
    }
}

impl Drop for FakeGraph {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock(st: &Arc<Mutex<State>>) -> MutexGuard<'_, State> {
    st.lock().unwrap_or_else(PoisonError::into_inner)
}

fn error(status: u16, code: &str, message: &str) -> Response {
    Response::json(status, &json!({"error": {"code": code, "message": message}}))
}

fn handle(req: &Request, st: &mut State, tokens: &TokenView, addr: SocketAddr) -> Response {
    st.largest_request = st.largest_request.max(req.body.len());
    if req.method == "PUT" {
        if let Some(id) = req.path.strip_prefix("/upload/") {
            return upload(req, st, id);
        }
    }
    let Some(rest) = req.path.strip_prefix("/v1.0/users/") else {
        return error(404, "ResourceNotFound", "no such path");
    };
    let (mailbox, what) = rest.split_once('/').unwrap_or((rest, ""));
    let mailbox = http::percent_decode(mailbox);
    // The token: live at the provider, for Graph's audience.
    let bearer = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    st.tokens.push(bearer.to_string());
    match tokens.live(bearer) {
        Some((_, scope)) if audience(&scope) == Some(GRAPH_SCOPE) => {}
        Some(_) => return error(401, "InvalidAuthenticationToken", "Invalid audience."),
        None => {
            return error(
                401,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            )
        }
    }
    if let Some((status, after, body)) = st.inject.pop_front() {
        let mut r = Response::raw(status, "application/json", body);
        if let Some(a) = after {
            r.headers.push(("Retry-After".into(), a.to_string()));
        }
        return r;
    }
    if req.body.len() > MAX_REQUEST {
        st.too_large += 1;
        return error(
            413,
            "ErrorRequestEntityTooLarge",
            "The request body is larger than 4 MB.",
        );
    }
    let parts: Vec<&str> = what.split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("POST", ["sendMail"]) => match mime_of(req) {
            Ok(mime) => {
                let recipients = recipients(&mime);
                st.sent.push(Sent {
                    mailbox,
                    mime,
                    uploaded: Vec::new(),
                    recipients,
                });
                Response::raw(202, "text/plain", "")
            }
            Err(r) => r,
        },
        ("POST", ["messages"]) => match mime_of(req) {
            Ok(mime) => {
                st.next_id += 1;
                let id = format!("AAMk{}=", st.next_id);
                st.drafts.insert(
                    id.clone(),
                    Draft {
                        mailbox,
                        mime,
                        uploaded: Vec::new(),
                    },
                );
                Response::json(201, &json!({"id": id}))
            }
            Err(r) => r,
        },
        ("POST", ["messages", id, "attachments", "createUploadSession"]) => {
            let id = http::percent_decode(id);
            let item: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let item = &item["AttachmentItem"];
            let (Some(name), Some(size)) = (item["name"].as_str(), item["size"].as_u64()) else {
                return error(400, "ErrorInvalidRequest", "AttachmentItem needs name and size");
            };
            if !st.drafts.contains_key(&id) {
                return error(404, "ErrorItemNotFound", "no such draft");
            }
            st.next_id += 1;
            let sid = format!("s{}", st.next_id);
            let upload = Upload {
                draft: id,
                name: name.into(),
                size: usize::try_from(size).unwrap(),
                bytes: Vec::new(),
            };
            st.uploads.insert(sid.clone(), upload);
            Response::json(201, &json!({"uploadUrl": format!("http://{addr}/upload/{sid}")}))
        }
        ("POST", ["messages", id, "send"]) => {
            let id = http::percent_decode(id);
            if st.uploads.values().any(|u| u.draft == id) {
                return error(400, "ErrorInvalidRequest", "an upload session is not finished");
            }
            let Some(d) = st.drafts.remove(&id) else {
                return error(404, "ErrorItemNotFound", "no such draft");
            };
            let recipients = recipients(&d.mime);
            st.sent.push(Sent {
                mailbox: d.mailbox,
                mime: d.mime,
                uploaded: d.uploaded,
                recipients,
            });
            Response::raw(202, "text/plain", "")
        }
        ("DELETE", ["messages", id]) => {
            st.drafts.remove(&http::percent_decode(id));
            Response::raw(204, "text/plain", "")
        }
        _ => error(405, "ErrorInvalidRequest", "not a route of this fake"),
    }
}

/// A token's audience, as at Microsoft: the resource of its first scope
/// (a token redeemed for mail and Graph scopes together is a mail token).
pub fn audience(scope: &str) -> Option<&str> {
    scope
        .split(' ')
        .find(|s| !matches!(*s, "" | "openid" | "email" | "profile" | "offline_access"))
}

/// A base64 MIME body, decoded.
fn mime_of(req: &Request) -> Result<Vec<u8>, Response> {
    if !req.header("content-type").unwrap_or("").starts_with("text/plain") {
        return Err(error(415, "ErrorInvalidRequest", "MIME goes as text/plain"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(req.body.trim_ascii())
        .map_err(|_| {
            error(
                400,
                "ErrorMimeContentInvalidBase64String",
                "Invalid base64 string for MIME content.",
            )
        })
}

/// A chunk of an upload session: `Content-Range: bytes a-b/size`, in order,
/// a multiple of 320 KiB but the last.
fn upload(req: &Request, st: &mut State, sid: &str) -> Response {
    let Some(up) = st.uploads.get_mut(sid) else {
        return error(404, "ErrorItemNotFound", "no such upload session");
    };
    let range = req.header("content-range").unwrap_or("");
    let parsed = range.strip_prefix("bytes ").and_then(|r| {
        let (span, total) = r.split_once('/')?;
        let (a, b) = span.split_once('-')?;
        Some((
            a.parse::<usize>().ok()?,
            b.parse::<usize>().ok()?,
            total.parse::<usize>().ok()?,
        ))
    });
    let Some((a, b, total)) = parsed else {
        return error(400, "InvalidRange", "bad Content-Range");
    };
    let last = b + 1 == total;
    let ok = a == up.bytes.len() && total == up.size && b + 1 - a == req.body.len();
    if !ok || (!last && !req.body.len().is_multiple_of(320 * 1024)) {
        return error(416, "InvalidRange", "chunk out of order or misaligned");
    }
    up.bytes.extend_from_slice(&req.body);
    if !last {
        return Response::json(200, &json!({"nextExpectedRanges": [format!("{}-", b + 1)]}));
    }
    let up = st.uploads.remove(sid).unwrap();
    if let Some(d) = st.drafts.get_mut(&up.draft) {
        d.uploaded.push((up.name, up.bytes));
    }
    Response::raw(201, "text/plain", "")
}

/// The `To`, `Cc` and `Bcc` addresses of a message, lower-cased.
pub fn recipients(mime: &[u8]) -> Vec<String> {
    let Some(m) = mail_parser::MessageParser::default().parse(mime) else {
        return Vec::new();
    };
    let mut all = Vec::new();
    for field in [m.to(), m.cc(), m.bcc()].into_iter().flatten() {
        for a in field.iter() {
            if let Some(addr) = a.address() {
                all.push(addr.to_lowercase());
            }
        }
    }
    all
}
