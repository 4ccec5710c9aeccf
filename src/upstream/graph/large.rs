//! Messages over Graph's 4 MB per request: the message goes up as a draft
//! created from its MIME without its largest top-level attachments, each of
//! those through an upload session in chunks (decoded from the spool a
//! chunk at a time), then the draft is sent. Memory stays at about one
//! draft (under 4 MB) and one chunk.

use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};

use super::spool::Spool;
use super::{base64_len, GraphError, MAX_REQUEST};

/// Upload session chunks: a multiple of 320 KiB, as Graph asks.
const CHUNK: usize = 10 * 320 * 1024;
/// The part header kept for reading its fields.
const MAX_PART_HEADER: usize = 16 * 1024;

/// One top-level part of a multipart message, as offsets in the spool.
#[derive(Debug)]
struct Part {
    /// Where its `--boundary` line starts.
    start: u64,
    /// Where its body starts.
    body: u64,
    /// Where the next boundary line starts.
    end: u64,
    header: Vec<u8>,
    /// Base64 alphabet characters and `=` in its body.
    b64: u64,
    pad: u64,
}

impl Part {
    fn decoded_size(&self) -> u64 {
        (self.b64 / 4 * 3).saturating_sub(self.pad)
    }
}

/// An attachment to upload: its place and what Graph is told about it.
pub(super) struct Upload {
    part: Part,
    name: String,
    content_type: String,
    content_id: Option<String>,
    inline: bool,
}

/// A message over 4 MB split for Graph: the draft's MIME without the
/// attachments to upload, and those attachments.
pub(super) struct Large {
    pub draft: Vec<u8>,
    pub uploads: Vec<Upload>,
}

/// Splits the spooled message (its rewritten `head`, the spool's first
/// `head_len` bytes replaced) into a draft under 4 MB and the largest
/// top-level attachments, uploaded apart.
pub(super) async fn split(spool: &mut Spool, head: Vec<u8>, head_len: u64) -> Result<Large, GraphError> {
    let boundary = boundary_of(&head).ok_or_else(|| too_large("it is one part, not multipart"))?;
    let parts = scan(spool, head_len, &boundary).await?;
    let (uploads, draft) = plan(parts, head.len() as u64 + spool.size() - head_len)?;
    let mut mime = head;
    let mut at = head_len;
    for u in &uploads {
        let keep = usize::try_from(u.part.start - at).unwrap_or(0);
        spool.read_into(at, keep, &mut mime).await?;
        at = u.part.end;
    }
    let rest = usize::try_from(spool.size() - at).unwrap_or(0);
    spool.read_into(at, rest, &mut mime).await?;
    debug_assert_eq!(mime.len() as u64, draft);
    Ok(Large { draft: mime, uploads })
}

impl Upload {
    /// The attachment's size once decoded, as the upload session is told.
    pub(super) fn size(&self) -> u64 {
        self.part.decoded_size()
    }

    /// The body of `createUploadSession`.
    pub(super) fn item(&self) -> serde_json::Value {
        json!({ "AttachmentItem": {
            "attachmentType": "file",
            "name": self.name,
            "size": self.size(),
            "contentType": self.content_type,
            "isInline": self.inline,
            "contentId": self.content_id,
        }})
    }

    /// The attachment's decoded bytes, a chunk at a time.
    pub(super) fn chunks(&self) -> Chunks<'_> {
        Chunks {
            part: &self.part,
            decoder: Decoder::default(),
            block: Vec::with_capacity(64 * 1024),
            at: self.part.body,
            sent: 0,
        }
    }
}

/// Decodes a part from the spool a chunk at a time: memory stays at one
/// chunk, whatever the attachment's size.
pub(super) struct Chunks<'a> {
    part: &'a Part,
    decoder: Decoder,
    block: Vec<u8>,
    at: u64,
    sent: u64,
}

impl Chunks<'_> {
    /// The next chunk and the offset of its first byte; `None` at the end.
    pub(super) async fn next(&mut self, spool: &mut Spool) -> Result<Option<(Vec<u8>, u64)>, GraphError> {
        let end = self.part.end;
        while self.decoder.out.len() < CHUNK && self.at < end {
            let n = usize::try_from((end - self.at).min(64 * 1024)).unwrap_or(64 * 1024);
            self.block.clear();
            spool.read_into(self.at, n, &mut self.block).await?;
            self.decoder.feed(&self.block)?;
            self.at += n as u64;
        }
        let take = self.decoder.out.len().min(CHUNK);
        if take == 0 {
            return Ok(None);
        }
        let rest = self.decoder.out.split_off(take);
        let chunk = std::mem::replace(&mut self.decoder.out, rest);
        let first = self.sent;
        self.sent += take as u64;
        Ok(Some((chunk, first)))
    }
}

#[derive(Deserialize)]
struct Created {
    id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Session {
    upload_url: String,
}

/// `messages/{id}` of the draft Graph created.
pub(super) fn draft_path(answer: &[u8]) -> Result<String, GraphError> {
    let id = serde_json::from_slice::<Created>(answer)
        .map_err(|e| GraphError::Network(format!("the draft's answer is not understood ({e})")))?
        .id;
    Ok(format!("messages/{}", path_segment(&id)))
}

/// The upload session's URL (it carries its own authorisation).
pub(super) fn upload_url(answer: &[u8]) -> Result<String, GraphError> {
    let session: Session = serde_json::from_slice(answer)
        .map_err(|e| GraphError::Network(format!("the upload session's answer is not understood ({e})")))?;
    Ok(session.upload_url)
}

/// Base64 decoding of a body that arrives in pieces, whitespace anywhere.
#[derive(Default)]
struct Decoder {
    quad: Vec<u8>,
    out: Vec<u8>,
}

impl Decoder {
    fn feed(&mut self, b: &[u8]) -> Result<(), GraphError> {
        self.quad.extend(b.iter().copied().filter(|c| !c.is_ascii_whitespace()));
        let whole = self.quad.len() / 4 * 4;
        let engine = &base64::engine::general_purpose::STANDARD;
        engine
            .decode_vec(&self.quad[..whole], &mut self.out)
            .map_err(|e| GraphError::Malformed(format!("an attachment is not valid base64 ({e})")))?;
        self.quad.drain(..whole);
        Ok(())
    }
}

/// Which parts to upload (largest first, until the rest fits one request),
/// and the size of the draft that remains.
fn plan(parts: Vec<Part>, total: u64) -> Result<(Vec<Upload>, u64), GraphError> {
    let mut candidates: Vec<Upload> = parts.into_iter().filter_map(attachment).collect();
    candidates.sort_by_key(|u| std::cmp::Reverse(u.part.end - u.part.start));
    let mut draft = total;
    let mut chosen = Vec::new();
    for u in candidates {
        if base64_len(draft) <= MAX_REQUEST {
            break;
        }
        draft -= u.part.end - u.part.start;
        chosen.push(u);
    }
    if base64_len(draft) > MAX_REQUEST {
        return Err(too_large(
            "its text and inline parts alone pass 4 MB; send large files as attachments",
        ));
    }
    chosen.sort_by_key(|u| u.part.start);
    Ok((chosen, draft))
}

/// A base64 attachment with a file name, as an [`Upload`].
fn attachment(part: Part) -> Option<Upload> {
    let h = mail_parser::MessageParser::new().parse_headers(&part.header)?;
    use mail_parser::MimeHeaders;
    let cte = h.content_transfer_encoding()?;
    if !cte.eq_ignore_ascii_case("base64") {
        return None;
    }
    let name = h.attachment_name()?.to_string();
    let ct = h.content_type();
    let content_type = ct.map_or("application/octet-stream".into(), |t| match t.subtype() {
        Some(s) => format!("{}/{s}", t.ctype()),
        None => t.ctype().to_string(),
    });
    let inline = h
        .content_disposition()
        .is_some_and(|d| d.ctype().eq_ignore_ascii_case("inline"));
    let content_id = h.content_id().map(|s| s.trim_matches(['<', '>']).to_string());
    drop(h);
    Some(Upload {
        part,
        name,
        content_type,
        content_id,
        inline,
    })
}

/// The boundary of a `multipart/*` message header.
fn boundary_of(head: &[u8]) -> Option<String> {
    let h = mail_parser::MessageParser::new().parse_headers(head)?;
    use mail_parser::MimeHeaders;
    let ct = h.content_type()?;
    if !ct.ctype().eq_ignore_ascii_case("multipart") {
        return None;
    }
    ct.attribute("boundary").map(str::to_string)
}

fn too_large(why: &str) -> GraphError {
    GraphError::TooLarge(format!("over 4 MB and {why}"))
}

/// A message id as one path segment.
fn path_segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// The top-level parts of the body that starts at `from`, read line by
/// line with only a line's start and a part's header kept.
async fn scan(spool: &mut Spool, from: u64, boundary: &str) -> Result<Vec<Part>, GraphError> {
    let (open, close) = (format!("--{boundary}"), format!("--{boundary}--"));
    let file = spool.reader().await?;
    let mut r = BufReader::with_capacity(64 * 1024, file);
    r.seek(std::io::SeekFrom::Start(from)).await?;
    let (mut at, mut parts) = (from, Vec::<Part>::new());
    let mut in_header = false;
    loop {
        let line = read_line(&mut r).await?;
        if line.len == 0 {
            break;
        }
        let text = line.start.trim_ascii_end();
        let is_close = text == close.as_bytes();
        if is_close || text == open.as_bytes() {
            if let Some(p) = parts.last_mut().filter(|p| p.end == 0) {
                p.end = at;
            }
            if is_close {
                break;
            }
            parts.push(Part {
                start: at,
                body: 0,
                end: 0,
                header: Vec::new(),
                b64: 0,
                pad: 0,
            });
            in_header = true;
        } else if let Some(p) = parts.last_mut().filter(|p| p.end == 0) {
            if in_header {
                if text.is_empty() {
                    in_header = false;
                    p.body = at + line.len;
                } else if p.header.len() + line.start.len() <= MAX_PART_HEADER {
                    p.header.extend_from_slice(&line.start);
                }
            } else {
                p.b64 += line.b64;
                p.pad += line.pad;
            }
        }
        at += line.len;
    }
    parts.retain(|p| p.end != 0 && p.body != 0);
    Ok(parts)
}

/// One line of the spool: its first bytes, its length, its base64 counts.
struct Line {
    start: Vec<u8>,
    len: u64,
    b64: u64,
    pad: u64,
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Line> {
    const KEEP: usize = 1024;
    let mut line = Line {
        start: Vec::new(),
        len: 0,
        b64: 0,
        pad: 0,
    };
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(line);
        }
        let (piece, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let room = KEEP.saturating_sub(line.start.len()).min(piece.len());
        line.start.extend_from_slice(&piece[..room]);
        for b in piece {
            if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=') {
                line.b64 += 1;
            }
            line.pad += u64::from(*b == b'=');
        }
        let n = piece.len();
        line.len += n as u64;
        r.consume(n);
        if done {
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn top_level_parts_and_their_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::create(dir.path()).await.unwrap();
        let head = b"Content-Type: multipart/mixed; boundary=\"XY\"\r\n\r\n";
        let body = b"pre\r\n--XY\r\nContent-Type: text/plain\r\n\r\nhi\r\n--XY\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\n\r\naGVs\r\nbG8=\r\n--XY--\r\n";
        s.append(head).await.unwrap();
        s.append(body).await.unwrap();
        let b = boundary_of(head).unwrap();
        assert_eq!(b, "XY");
        let parts = scan(&mut s, head.len() as u64, &b).await.unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].decoded_size(), 5);
        let whole = [&head[..], &body[..]].concat();
        let p = &parts[1];
        assert!(whole[p.start as usize..].starts_with(b"--XY\r\nContent-Type: application/pdf"));
        assert_eq!(&whole[p.end as usize..], b"--XY--\r\n");
        let u = attachment(parts.into_iter().nth(1).unwrap()).unwrap();
        assert_eq!(
            (u.name.as_str(), u.content_type.as_str(), u.inline),
            ("a.pdf", "application/pdf", false)
        );
        let mut d = Decoder::default();
        d.feed(b"aG").unwrap();
        d.feed(b"Vs\r\nbG8=\r\n").unwrap();
        assert_eq!(d.out, b"hello");
    }
}
