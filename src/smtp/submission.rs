//! Sans-I/O SMTP submission server for accounts that send through
//! Microsoft Graph: after `AUTH` (answered by [`super::preauth`]) mailproxy
//! is the receiving server itself. It takes `MAIL`, any number of `RCPT`,
//! `DATA` (dot-unstuffed) or `BDAT` chunks, `RSET`, `NOOP`, pipelined, with
//! several transactions per connection.
//!
//! The message body leaves the machine in [`Event::Body`] pieces as it
//! arrives (the driver spools them to disk), so memory stays bounded by the
//! longest command line plus one read. The final reply of a transaction is
//! the driver's ([`Submission::finished`]): `250` only once the message is
//! accepted further on, so a client never loses a message it was told was
//! sent. While a message is being sent the machine reads nothing more.

use super::transaction::{self, Txn};

/// Bytes of pipelined input the machine holds at most before it is polled.
pub const MAX_BUFFER: usize = 64 * 1024;
/// Recipients of one message (Exchange Online allows 500 by default).
pub const MAX_RECIPIENTS: usize = 500;

pub struct SubmissionConfig {
    pub hostname: String,
    /// Advertised as `SIZE`, and enforced.
    pub max_size: u64,
    /// Longest command line, without CRLF.
    pub max_line: usize,
    /// Addresses the account may send as, lower-cased.
    pub senders: Vec<String>,
}

/// One message ready to leave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub from: String,
    pub rcpt: Vec<String>,
    pub size: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// Message bytes of the current transaction, unstuffed, in order.
    Body(Vec<u8>),
    /// The message is complete: send it, then call [`Submission::finished`].
    Send(Envelope),
    /// The current message is dropped (too large, reset): discard its spool.
    Discard,
    Quit,
    /// A protocol error that ends the connection (the reply is queued).
    Close,
}

enum Mode {
    Commands,
    /// Inside `DATA`; `at_line_start` for dot handling.
    Data {
        at_line_start: bool,
    },
    /// Inside a `BDAT` chunk: bytes still to come, and whether it is the last.
    Chunk {
        left: u64,
        last: bool,
    },
    /// The end of `DATA` or of a chunk was read; its last piece went out.
    DataEnd,
    ChunkEnd {
        last: bool,
    },
    /// A `Send` is outstanding.
    Sending,
    Done,
}

pub struct Submission {
    cfg: SubmissionConfig,
    input: Vec<u8>,
    output: Vec<u8>,
    mode: Mode,
    from: Option<String>,
    rcpt: Vec<String>,
    /// Bytes of the current message so far.
    size: u64,
    /// The current message passed `max_size`: read to its end, then refuse.
    too_big: bool,
    /// The current message came in `BDAT` chunks: `DATA` may not follow.
    chunked: bool,
}

impl Submission {
    /// A session that starts authenticated, with `pending` (what the client
    /// pipelined after `AUTH`) as its first input.
    pub fn new(cfg: SubmissionConfig, pending: &[u8]) -> Submission {
        Submission {
            cfg,
            input: pending.to_vec(),
            output: Vec::new(),
            mode: Mode::Commands,
            from: None,
            rcpt: Vec::new(),
            size: 0,
            too_big: false,
            chunked: false,
        }
    }

    /// The EHLO keywords of a Graph session: only what it honours.
    pub fn ehlo_keywords(max_size: u64) -> Vec<String> {
        ["PIPELINING", "8BITMIME", "SMTPUTF8", "CHUNKING", "ENHANCEDSTATUSCODES"]
            .into_iter()
            .map(String::from)
            .chain([format!("SIZE {max_size}")])
            .collect()
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if !matches!(self.mode, Mode::Done) {
            self.input.extend_from_slice(bytes);
        }
    }

    /// Whether the driver should read more from the client now.
    pub fn wants_input(&self) -> bool {
        !matches!(self.mode, Mode::Sending | Mode::Done) && self.input.len() < MAX_BUFFER
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// The reply to the outstanding [`Event::Send`] (one line without CRLF).
    pub fn finished(&mut self, reply: &str) {
        self.reply(reply);
        self.reset();
        self.mode = Mode::Commands;
    }

    /// The next thing the driver must do, or `None` when more input is needed.
    pub fn poll(&mut self) -> Option<Event> {
        match self.mode {
            Mode::Commands => self.next_command(),
            Mode::Data { .. } => self.data(),
            Mode::DataEnd => Some(self.complete()),
            Mode::Chunk { .. } => self.chunk(),
            Mode::ChunkEnd { last } => self.chunk_end(last),
            Mode::Sending | Mode::Done => None,
        }
    }

    fn reply(&mut self, line: &str) {
        self.output.extend_from_slice(line.as_bytes());
        self.output.extend_from_slice(b"\r\n");
    }

    fn reset(&mut self) {
        self.from = None;
        self.rcpt.clear();
        self.size = 0;
        self.too_big = false;
        self.chunked = false;
    }

    /// `RSET`, `EHLO` and `HELO` end a transaction: what its `BDAT` chunks
    /// already gave out must be discarded, not sent with the next message.
    fn abandon(&mut self) -> Option<Event> {
        let had = self.from.is_some();
        self.reset();
        had.then_some(Event::Discard)
    }

    fn next_command(&mut self) -> Option<Event> {
        let Some(end) = self.input.iter().position(|b| *b == b'\n') else {
            if self.input.len() > self.cfg.max_line + 2 {
                self.reply("500 5.5.6 Line too long");
                return Some(self.close());
            }
            return None;
        };
        let line: Vec<u8> = self.input.drain(..=end).collect();
        if line.len() > self.cfg.max_line + 2 {
            self.reply("500 5.5.6 Line too long");
            return Some(self.close());
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            self.reply("500 5.5.2 Command is not UTF-8");
            return self.poll();
        };
        match transaction::parse(text.trim_end_matches(['\r', '\n'])) {
            Ok(cmd) => self.command(cmd),
            Err(r) => {
                self.reply(r.0);
                self.poll()
            }
        }
    }

    fn close(&mut self) -> Event {
        self.mode = Mode::Done;
        self.input.clear();
        Event::Close
    }

    fn command(&mut self, cmd: Txn) -> Option<Event> {
        match cmd {
            Txn::Mail { from, size, .. } => self.mail(from, size),
            Txn::Rcpt { to } => self.rcpt(to),
            Txn::Data => return self.data_start(),
            Txn::Bdat { size, last } => return self.bdat_start(size, last),
            Txn::Rset => {
                let discard = self.abandon();
                self.reply("250 2.0.0 Reset");
                return discard.or_else(|| self.poll());
            }
            Txn::Noop => self.reply("250 2.0.0 OK"),
            Txn::Quit => {
                self.reply("221 2.0.0 Bye");
                self.mode = Mode::Done;
                self.input.clear();
                return Some(Event::Quit);
            }
            Txn::Ehlo { domain } => {
                let discard = self.abandon();
                let mut lines = vec![format!(
                    "{} greets {}",
                    self.cfg.hostname,
                    crate::text::one_line(&domain)
                )];
                lines.extend(Self::ehlo_keywords(self.cfg.max_size));
                for (i, l) in lines.iter().enumerate() {
                    let sep = if i + 1 == lines.len() { ' ' } else { '-' };
                    self.reply(&format!("250{sep}{l}"));
                }
                return discard.or_else(|| self.poll());
            }
            Txn::Helo { .. } => {
                let discard = self.abandon();
                let line = format!("250 {}", self.cfg.hostname);
                self.reply(&line);
                return discard.or_else(|| self.poll());
            }
            Txn::Help => self.reply("214 2.0.0 MAIL, RCPT, DATA or BDAT: this account sends through Microsoft Graph"),
            Txn::Vrfy => self.reply("252 2.5.0 Cannot VRFY; send the message and it will be delivered"),
            Txn::Auth => self.reply("503 5.5.1 Already authenticated"),
            Txn::StartTls => self.reply("503 5.5.1 STARTTLS is only possible before AUTH"),
            Txn::Unknown => self.reply("500 5.5.2 Command unrecognized"),
        }
        self.poll()
    }

    fn mail(&mut self, from: String, size: Option<u64>) {
        if self.from.is_some() {
            return self.reply("503 5.5.1 Nested MAIL command");
        }
        if size.is_some_and(|s| s > self.cfg.max_size) {
            let m = self.cfg.max_size;
            return self.reply(&format!("552 5.3.4 Message too large: at most {m} bytes"));
        }
        if !self.cfg.senders.contains(&from.to_lowercase()) {
            let who = self.cfg.senders.first().cloned().unwrap_or_default();
            let shown = if from.is_empty() {
                "<>".to_string()
            } else {
                crate::text::one_line(&from)
            };
            return self.reply(&format!(
                "550 5.7.1 This account sends as {who} only, not as {shown}: use MAIL FROM:<{who}>"
            ));
        }
        self.from = Some(from);
        self.reply("250 2.1.0 Sender OK");
    }

    fn rcpt(&mut self, to: String) {
        if self.from.is_none() {
            return self.reply("503 5.5.1 Need MAIL before RCPT");
        }
        if self.rcpt.len() >= MAX_RECIPIENTS {
            return self.reply("452 4.5.3 Too many recipients; send the rest in another message");
        }
        if !self.rcpt.iter().any(|r| r.eq_ignore_ascii_case(&to)) {
            self.rcpt.push(to);
        }
        self.reply("250 2.1.5 Recipient OK");
    }

    fn data_start(&mut self) -> Option<Event> {
        if self.from.is_none() {
            self.reply("503 5.5.1 Need MAIL before DATA");
        } else if self.rcpt.is_empty() {
            self.reply("554 5.5.1 No valid recipients");
        } else if self.chunked {
            self.reply("503 5.5.1 DATA cannot follow BDAT in one message; send the rest with BDAT");
        } else {
            self.reply("354 Start mail input; end with <CRLF>.<CRLF>");
            self.mode = Mode::Data { at_line_start: true };
        }
        self.poll()
    }

    fn bdat_start(&mut self, size: u64, last: bool) -> Option<Event> {
        if self.from.is_none() || self.rcpt.is_empty() {
            // The chunk's bytes follow whatever we say: read and drop them.
            self.too_big = true;
            self.mode = Mode::Chunk { left: size, last };
            return self.poll();
        }
        self.chunked = true;
        self.mode = Mode::Chunk { left: size, last };
        self.poll()
    }

    /// Counts `piece` into the message; `None` once it is over the limit.
    fn body(&mut self, piece: Vec<u8>) -> Option<Event> {
        self.size = self.size.saturating_add(piece.len() as u64);
        if self.too_big || piece.is_empty() {
            return None;
        }
        if self.size > self.cfg.max_size {
            self.too_big = true;
            return Some(Event::Discard);
        }
        Some(Event::Body(piece))
    }

    /// Dot-unstuffs what is buffered, up to the end of data.
    fn data(&mut self) -> Option<Event> {
        let Mode::Data { mut at_line_start } = self.mode else {
            return None;
        };
        let mut out = Vec::new();
        let mut ended = false;
        let mut used = 0;
        while used < self.input.len() {
            let rest = &self.input[used..];
            if at_line_start && rest[0] == b'.' {
                if rest.starts_with(b".\r\n") || rest.starts_with(b".\n") {
                    used += if rest[1] == b'\r' { 3 } else { 2 };
                    ended = true;
                    break;
                }
                if rest.len() < 3 && b".\r\n".starts_with(rest) {
                    break; // wait: this may be the end marker
                }
                used += 1; // a stuffed dot
            }
            let rest = &self.input[used..];
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    out.extend_from_slice(&rest[..=i]);
                    used += i + 1;
                    at_line_start = true;
                }
                None => {
                    out.extend_from_slice(rest);
                    used += rest.len();
                    at_line_start = false;
                }
            }
        }
        self.input.drain(..used);
        self.mode = Mode::Data { at_line_start };
        let piece = self.body(out);
        if !ended {
            return piece;
        }
        match piece {
            Some(p) => {
                self.mode = Mode::DataEnd;
                Some(p)
            }
            None => Some(self.complete()),
        }
    }

    fn chunk(&mut self) -> Option<Event> {
        let Mode::Chunk { left, last } = self.mode else {
            return None;
        };
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(self.input.len());
        let piece: Vec<u8> = self.input.drain(..n).collect();
        let left = left - n as u64;
        self.mode = Mode::Chunk { left, last };
        let piece = self.body(piece);
        if left > 0 {
            return piece;
        }
        if let Some(p) = piece {
            self.mode = Mode::ChunkEnd { last };
            return Some(p);
        }
        self.chunk_end(last)
    }

    /// A `BDAT` chunk was read whole.
    fn chunk_end(&mut self, last: bool) -> Option<Event> {
        if self.from.is_none() || self.rcpt.is_empty() {
            self.mode = Mode::Commands;
            self.size = 0;
            self.too_big = false;
            self.reply("503 5.5.1 Need MAIL and RCPT before BDAT");
            return self.poll();
        }
        if !last {
            self.mode = Mode::Commands;
            let (n, m) = (self.size, self.cfg.max_size);
            if self.too_big {
                self.reply(&format!("552 5.3.4 Message too large: at most {m} bytes"));
            } else {
                self.reply(&format!("250 2.0.0 {n} octets received"));
            }
            return self.poll();
        }
        Some(self.complete())
    }

    /// The end of a message: too large, or ready to send.
    fn complete(&mut self) -> Event {
        if self.too_big {
            let m = self.cfg.max_size;
            self.reply(&format!("552 5.3.4 Message too large: at most {m} bytes"));
            self.reset();
            self.mode = Mode::Commands;
            return Event::Discard;
        }
        self.mode = Mode::Sending;
        Event::Send(Envelope {
            from: self.from.clone().unwrap_or_default(),
            rcpt: self.rcpt.clone(),
            size: self.size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(input: &[u8]) -> Submission {
        Submission::new(
            SubmissionConfig {
                hostname: "mailproxy".into(),
                max_size: 100,
                max_line: 1000,
                senders: vec!["me@x.example".into()],
            },
            input,
        )
    }

    /// Runs the machine to quiescence: replies, and what it asked for.
    fn run(m: &mut Submission) -> (String, Vec<Event>) {
        let mut events = Vec::new();
        while let Some(e) = m.poll() {
            let stop = matches!(e, Event::Send(_) | Event::Quit | Event::Close);
            events.push(e);
            if stop {
                break;
            }
        }
        (String::from_utf8(m.take_output()).unwrap(), events)
    }

    fn body(events: &[Event]) -> Vec<u8> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Body(b) => Some(b.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn pipelined_data_is_unstuffed_and_sent_only_after_the_reply() {
        let mut m = machine(
            b"MAIL FROM:<Me@x.example>\r\nRCPT TO:<a@y>\r\nRCPT TO:<b@y>\r\nDATA\r\nS: 1\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
        );
        let (out, ev) = run(&mut m);
        assert_eq!(out, "250 2.1.0 Sender OK\r\n250 2.1.5 Recipient OK\r\n250 2.1.5 Recipient OK\r\n354 Start mail input; end with <CRLF>.<CRLF>\r\n");
        assert_eq!(body(&ev), b"S: 1\r\n\r\n.dot\r\n");
        assert!(matches!(ev.last(), Some(Event::Send(e)) if e.rcpt == ["a@y", "b@y"] && e.size == 14));
        assert!(!m.wants_input());
        assert_eq!(m.poll(), None, "nothing more until the send is done");
        m.finished("250 2.0.0 Sent");
        let (out, ev) = run(&mut m);
        assert_eq!(out, "250 2.0.0 Sent\r\n221 2.0.0 Bye\r\n");
        assert_eq!(ev, [Event::Quit]);
    }

    #[test]
    fn data_split_anywhere_gives_the_same_message() {
        let input = b"MAIL FROM:<me@x.example>\r\nRCPT TO:<a@y>\r\nDATA\r\na\r\n.b\r\n..\r\n.\r\n";
        for cut in 0..input.len() {
            let mut m = machine(&input[..cut]);
            let (_, mut ev) = run(&mut m);
            m.feed(&input[cut..]);
            ev.extend(run(&mut m).1);
            assert_eq!(body(&ev), b"a\r\nb\r\n.\r\n", "cut at {cut}");
            assert!(matches!(ev.last(), Some(Event::Send(_))), "cut at {cut}");
        }
    }

    #[test]
    fn bdat_chunks_rset_and_several_transactions() {
        let mut m = machine(b"MAIL FROM:<me@x.example>\r\nRCPT TO:<a@y>\r\nBDAT 5\r\nab\r\ncBDAT 2 LAST\r\nde");
        let (out, ev) = run(&mut m);
        assert!(out.ends_with("250 2.0.0 5 octets received\r\n"), "{out}");
        assert_eq!(body(&ev), b"ab\r\ncde");
        m.finished("250 2.0.0 Sent");
        m.feed(b"MAIL FROM:<me@x.example>\r\nRCPT TO:<c@y>\r\nRSET\r\nMAIL FROM:<me@x.example>\r\nRCPT TO:<d@y>\r\nDATA\r\nx\r\n.\r\n");
        let (out, ev) = run(&mut m);
        assert!(out.contains("250 2.0.0 Reset"), "{out}");
        assert!(ev.contains(&Event::Discard));
        assert!(matches!(ev.last(), Some(Event::Send(e)) if e.rcpt == ["d@y"]));
    }

    /// RFC 3030: a transaction's chunks are one message. `EHLO` ends it as
    /// `RSET` does (its chunks discarded, never sent with the next message),
    /// and `DATA` cannot follow `BDAT`.
    #[test]
    fn ehlo_discards_a_chunked_message_and_data_cannot_follow_bdat() {
        let mut m = machine(b"MAIL FROM:<me@x.example>\r\nRCPT TO:<a@y>\r\nBDAT 3\r\nold");
        let (_, ev) = run(&mut m);
        assert_eq!(body(&ev), b"old");
        m.feed(b"EHLO again\r\nMAIL FROM:<me@x.example>\r\nRCPT TO:<b@y>\r\nBDAT 3\r\nabcDATA\r\nBDAT 1 LAST\r\nd");
        let (out, ev) = run(&mut m);
        assert_eq!(ev.first(), Some(&Event::Discard), "{ev:?}");
        assert!(out.contains("503 5.5.1 DATA cannot follow BDAT"), "{out}");
        assert_eq!(body(&ev), b"abcd");
        assert!(
            matches!(ev.last(), Some(Event::Send(e)) if e.rcpt == ["b@y"] && e.size == 4),
            "{ev:?}"
        );
    }

    #[test]
    fn refusals_before_any_upload() {
        let mut m =
            machine(b"MAIL FROM:<boss@x.example>\r\nMAIL FROM:<me@x.example> SIZE=101\r\nDATA\r\nRCPT TO:<a@y>\r\n");
        let (out, ev) = run(&mut m);
        let lines: Vec<&str> = out.lines().collect();
        assert!(
            lines[0].starts_with("550 5.7.1 This account sends as me@x.example only"),
            "{out}"
        );
        assert!(lines[1].starts_with("552 5.3.4"), "{out}");
        assert!(lines[2].starts_with("503"), "{out}");
        assert!(lines[3].starts_with("503"), "{out}");
        assert!(ev.is_empty());
        // Too large while arriving: read to the end, then 552, nothing sent.
        let big = format!(
            "MAIL FROM:<me@x.example>\r\nRCPT TO:<a@y>\r\nDATA\r\n{}\r\n.\r\nNOOP\r\n",
            "x".repeat(200)
        );
        let mut m = machine(big.as_bytes());
        let (out, ev) = run(&mut m);
        assert!(
            out.ends_with("552 5.3.4 Message too large: at most 100 bytes\r\n250 2.0.0 OK\r\n"),
            "{out}"
        );
        assert!(!ev.iter().any(|e| matches!(e, Event::Send(_))));
        // BDAT without a transaction: its bytes are not taken for commands.
        let mut m = machine(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n");
        let (out, _) = run(&mut m);
        assert_eq!(out, "503 5.5.1 Need MAIL and RCPT before BDAT\r\n250 2.0.0 OK\r\n");
    }
}
