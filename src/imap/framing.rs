//! Splitting an IMAP client byte stream into complete commands.
//!
//! A command is a line ending in CRLF (bare LF accepted), possibly with
//! literals: a line ending in `{n}` (synchronising: the server must send a `+`
//! continuation before the client sends the n bytes) or `{n+}` (LITERAL+,
//! non-synchronising), followed by n raw bytes and the rest of the command.
//!
//! [`Framer`] is an incremental scanner over a buffer that always *starts* at
//! the beginning of the current command. It remembers how far it has scanned,
//! so feeding one byte at a time costs O(total) and not O(total²). Limits are
//! checked by counting, before anything is buffered beyond them.

use super::command::is_tag_char;
use crate::text::strip_eol;

/// RFC 2971 §3.3: at most 30 field-value pairs, fields of at most 30 octets
/// and values of at most 1,024 octets.
const ID_PAIRS: usize = 30;
const ID_FIELD: usize = 30;
const ID_VALUE: usize = 1024;

/// A quoted string of `n` octets, every one escaped: `"` + 2n + `"`.
const fn quoted_max(n: usize) -> usize {
    2 * n + 2
}

/// The longest `ID` parameter list RFC 2971 allows, on one line: 30 pairs
/// of quoted strings with every octet escaped, spaces between, parentheses
/// around (63,421 octets).
pub const MAX_ID_PARAMS: usize = 2 + ID_PAIRS * (quoted_max(ID_FIELD) + 1 + quoted_max(ID_VALUE)) + (ID_PAIRS - 1);

/// Limits enforced by the [`Framer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum length of one line segment (text between literals), excluding
    /// the line terminator.
    pub max_line: usize,
    /// Maximum size of one literal.
    pub max_literal: usize,
    /// Maximum size of a whole command (all line segments and literals).
    pub max_command: usize,
    /// Maximum length of a line segment of an `ID` command: `max_line` plus
    /// the largest parameter list RFC 2971 allows.
    pub max_id_line: usize,
    /// Maximum length of an `AUTHENTICATE` line: `max_line` plus a SASL
    /// initial response (RFC 4959).
    pub max_authenticate_line: usize,
    /// Maximum length of a line answering an `AUTHENTICATE` challenge.
    pub max_sasl_response: usize,
}

impl Limits {
    /// The longer lines of `ID` and `AUTHENTICATE` are derived from
    /// `max_line`; `max_command` is the largest of `2 * (max_line +
    /// max_literal)` (enough for `LOGIN {user} {password}` with two
    /// maximum-size literals) and those lines.
    pub fn new(max_line: usize, max_literal: usize) -> Self {
        let max_id_line = max_line.saturating_add(MAX_ID_PARAMS);
        let max_authenticate_line = crate::preauth::sasl_command_line(max_line);
        Limits {
            max_line,
            max_literal,
            max_command: max_line
                .saturating_add(max_literal)
                .saturating_mul(2)
                .max(max_id_line)
                .max(max_authenticate_line),
            max_id_line,
            max_authenticate_line,
            max_sasl_response: crate::preauth::sasl_response_line(max_line),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new(8 * 1024, 8 * 1024)
    }
}

/// Unrecoverable framing errors: the stream cannot be resynchronised, the
/// connection must be closed (`* BYE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("Line too long")]
    LineTooLong,
    #[error("Literal too large")]
    LiteralTooLarge,
    #[error("Command too long")]
    CommandTooLong,
}

/// Result of [`Framer::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// More input is needed. Everything buffered belongs to the current
    /// (incomplete) command.
    Incomplete,
    /// `buf[..len]` is one complete command (including its final line
    /// terminator). The caller removes those bytes from the front of its
    /// buffer; the framer has already reset itself for the next command.
    Complete { len: usize },
    /// The command announced a synchronising literal `{size}` within limits:
    /// the server must now send one `+ ...` continuation. Reported exactly once
    /// per literal (whether or not the literal's bytes are already buffered);
    /// call `scan` again afterwards.
    NeedContinuation { size: usize },
    /// The command in `buf[..len]` (ending with the `{size}` line) announced a
    /// synchronising literal that exceeds the limits (`size == None`: the
    /// number overflowed `u64`). The client has not sent the data: answer with
    /// a tagged `BAD`, drop `buf[..len]` and carry on. The framer has already
    /// reset itself.
    RejectLiteral { len: usize, size: Option<u64> },
    /// Unrecoverable; close the connection. The framer stays in this state.
    Fatal(FramingError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Scanning a line segment that starts at `start`; `pos` is how far we
    /// have searched for LF.
    Line {
        start: usize,
        pos: usize,
    },
    /// Inside a literal whose data ends at `end`.
    Literal {
        end: usize,
    },
    Failed(FramingError),
}

/// Incremental command framer. See the module documentation.
#[derive(Debug, Clone)]
pub struct Framer {
    limits: Limits,
    state: State,
    /// The next line answers a SASL challenge (not a command).
    sasl_response: bool,
    /// The current command's line limit, once it was needed.
    line_limit: Option<usize>,
}

/// `name` of a command that starts `tag SP name SP`, if `buf` shows that much.
fn command_name(buf: &[u8]) -> Option<&[u8]> {
    let tag = buf.iter().position(|&b| !is_tag_char(b))?;
    let rest = buf[tag..].strip_prefix(b" ").filter(|_| tag > 0)?;
    let name = rest.iter().position(|b| !b.is_ascii_alphabetic())?;
    (rest[name] == b' ').then_some(&rest[..name])
}

/// A literal header found at the end of a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiteralHeader {
    /// `None` if the number does not fit in a `u64`.
    pub size: Option<u64>,
    /// `{n+}` (LITERAL+)
    pub non_sync: bool,
}

/// If `line` (without its terminator) ends with `{digits}` or `{digits+}`
/// (also `~{digits}` for literal8, which is treated the same), return it.
pub fn literal_header(line: &[u8]) -> Option<LiteralHeader> {
    let body = line.strip_suffix(b"}")?;
    let (body, non_sync) = match body.strip_suffix(b"+") {
        Some(b) => (b, true),
        None => (body, false),
    };
    let open = body.iter().rposition(|&b| b == b'{')?;
    let digits = &body[open + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut size: Option<u64> = Some(0);
    for &d in digits {
        size = size
            .and_then(|s| s.checked_mul(10))
            .and_then(|s| s.checked_add(u64::from(d - b'0')));
    }
    Some(LiteralHeader { size, non_sync })
}

impl Framer {
    pub fn new(limits: Limits) -> Self {
        Framer {
            limits,
            state: State::Line { start: 0, pos: 0 },
            sasl_response: false,
            line_limit: None,
        }
    }

    /// Whether the next line answers a SASL challenge (`+ ` was sent): it
    /// may be [`Limits::max_sasl_response`] long. Set before scanning it.
    pub fn expect_sasl_response(&mut self, yes: bool) {
        if self.sasl_response != yes {
            self.sasl_response = yes;
            self.line_limit = None;
        }
    }

    /// How long a line segment of the command at the start of `buf` may
    /// be: longer than `max_line` for `ID` and `AUTHENTICATE`, and for a
    /// SASL response. The command name must show within the first
    /// `max_line` bytes, so the answer does not depend on how much of the
    /// command has arrived (it is asked once `buf` is longer than that, and
    /// kept for the rest of the command).
    fn line_limit(&mut self, buf: &[u8]) -> usize {
        if let Some(n) = self.line_limit {
            return n;
        }
        let n = if self.sasl_response {
            self.limits.max_sasl_response
        } else {
            match command_name(&buf[..buf.len().min(self.limits.max_line)]) {
                Some(n) if n.eq_ignore_ascii_case(b"ID") => self.limits.max_id_line,
                Some(n) if n.eq_ignore_ascii_case(b"AUTHENTICATE") => self.limits.max_authenticate_line,
                _ => self.limits.max_line,
            }
        };
        self.line_limit = Some(n);
        n
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Forget the current command (the caller discarded its buffer). Also
    /// clears a fatal state.
    pub fn reset(&mut self) {
        self.state = State::Line { start: 0, pos: 0 };
        self.line_limit = None;
    }

    /// Scan `buf`, which must start at the beginning of the current command
    /// and only grow between calls (until `Complete`/`RejectLiteral`, after
    /// which the caller removes the reported bytes, or `reset`).
    pub fn scan(&mut self, buf: &[u8]) -> Frame {
        loop {
            match self.state {
                State::Failed(e) => return Frame::Fatal(e),
                State::Literal { end } => {
                    if buf.len() < end {
                        return Frame::Incomplete;
                    }
                    self.state = State::Line { start: end, pos: end };
                }
                State::Line { start, pos } => {
                    if start > buf.len() {
                        // Contract violation (buffer shrank); never panic.
                        return Frame::Incomplete;
                    }
                    let pos = pos.clamp(start, buf.len());
                    let Some(off) = buf[pos..].iter().position(|&b| b == b'\n') else {
                        self.state = State::Line { start, pos: buf.len() };
                        // Allow one extra byte for a CR that may precede LF.
                        let long = buf.len() - start;
                        if long > self.limits.max_line.saturating_add(1)
                            && long > self.line_limit(buf).saturating_add(1)
                        {
                            return self.fail(FramingError::LineTooLong);
                        }
                        if buf.len() > self.limits.max_command.saturating_add(1) {
                            return self.fail(FramingError::CommandTooLong);
                        }
                        return Frame::Incomplete;
                    };
                    let lf = pos + off;
                    let end = lf + 1;
                    let line = strip_eol(&buf[start..end]);
                    if line.len() > self.limits.max_line && line.len() > self.line_limit(buf) {
                        return self.fail(FramingError::LineTooLong);
                    }
                    if end > self.limits.max_command.saturating_add(2) {
                        return self.fail(FramingError::CommandTooLong);
                    }
                    let Some(hdr) = literal_header(line) else {
                        self.reset();
                        return Frame::Complete { len: end };
                    };
                    let fits = hdr
                        .size
                        .and_then(|n| usize::try_from(n).ok())
                        .filter(|&n| n <= self.limits.max_literal && end.saturating_add(n) <= self.limits.max_command);
                    match (fits, hdr.non_sync) {
                        (Some(n), non_sync) => {
                            self.state = State::Literal { end: end + n };
                            if !non_sync {
                                return Frame::NeedContinuation { size: n };
                            }
                        }
                        (None, false) => {
                            self.reset();
                            return Frame::RejectLiteral {
                                len: end,
                                size: hdr.size,
                            };
                        }
                        (None, true) => return self.fail(FramingError::LiteralTooLarge),
                    }
                }
            }
        }
    }

    fn fail(&mut self, e: FramingError) -> Frame {
        self.state = State::Failed(e);
        Frame::Fatal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Limits {
        Limits::new(64, 32)
    }

    #[test]
    fn simple_lines() {
        let mut f = Framer::new(small());
        assert_eq!(f.scan(b"a NOOP"), Frame::Incomplete);
        assert_eq!(f.scan(b"a NOOP\r"), Frame::Incomplete);
        assert_eq!(f.scan(b"a NOOP\r\nb NO"), Frame::Complete { len: 8 });
        assert_eq!(f.scan(b"b NOOP\n"), Frame::Complete { len: 7 });
    }

    #[test]
    fn sync_literal_continuation_once() {
        let mut f = Framer::new(small());
        let full = b"a LOGIN {5}\r\nalice {3}\r\npwd\r\n";
        assert_eq!(f.scan(&full[..13]), Frame::NeedContinuation { size: 5 });
        assert_eq!(f.scan(&full[..13]), Frame::Incomplete);
        assert_eq!(f.scan(&full[..16]), Frame::Incomplete);
        assert_eq!(f.scan(&full[..24]), Frame::NeedContinuation { size: 3 });
        assert_eq!(f.scan(&full[..26]), Frame::Incomplete);
        assert_eq!(f.scan(full), Frame::Complete { len: full.len() });
    }

    #[test]
    fn all_at_once_still_reports_continuations() {
        let mut f = Framer::new(small());
        let full = b"a LOGIN {5}\r\nalice {3}\r\npwd\r\n";
        assert_eq!(f.scan(full), Frame::NeedContinuation { size: 5 });
        assert_eq!(f.scan(full), Frame::NeedContinuation { size: 3 });
        assert_eq!(f.scan(full), Frame::Complete { len: full.len() });
    }

    #[test]
    fn literal_plus_no_continuation() {
        let mut f = Framer::new(small());
        let full = b"a LOGIN {5+}\r\nalice {3+}\r\npwd\r\n";
        assert_eq!(f.scan(&full[..20]), Frame::Incomplete);
        assert_eq!(f.scan(full), Frame::Complete { len: full.len() });
    }

    #[test]
    fn literal_containing_newlines_and_braces() {
        let mut f = Framer::new(small());
        let full = b"a LOGIN {4+}\r\n{1}\n x\r\n";
        assert_eq!(f.scan(full), Frame::Complete { len: full.len() });
    }

    #[test]
    fn too_large_sync_literal_is_rejected_recoverably() {
        let mut f = Framer::new(small());
        let buf = b"a LOGIN {33}\r\nb NOOP\r\n";
        assert_eq!(
            f.scan(buf),
            Frame::RejectLiteral {
                len: 14,
                size: Some(33)
            }
        );
        assert_eq!(f.scan(&buf[14..]), Frame::Complete { len: 8 });
        let buf = b"a LOGIN {18446744073709551616}\r\n";
        assert_eq!(
            f.scan(buf),
            Frame::RejectLiteral {
                len: buf.len(),
                size: None
            }
        );
        let buf = b"a LOGIN {18446744073709551615}\r\n";
        assert_eq!(
            f.scan(buf),
            Frame::RejectLiteral {
                len: buf.len(),
                size: Some(u64::MAX)
            }
        );
    }

    #[test]
    fn too_large_non_sync_literal_is_fatal() {
        let mut f = Framer::new(small());
        assert_eq!(
            f.scan(b"a LOGIN {4294967295+}\r\n"),
            Frame::Fatal(FramingError::LiteralTooLarge)
        );
        // Stays failed.
        assert_eq!(f.scan(b"x"), Frame::Fatal(FramingError::LiteralTooLarge));
    }

    #[test]
    fn long_line_detected_by_count() {
        let mut f = Framer::new(small());
        let line = vec![b'a'; 66];
        assert_eq!(f.scan(&line[..65]), Frame::Incomplete); // 64 + possible CR
        assert_eq!(f.scan(&line), Frame::Fatal(FramingError::LineTooLong));
        let mut f = Framer::new(small());
        let mut line = vec![b'a'; 65];
        line.extend_from_slice(b"\r\n");
        assert_eq!(f.scan(&line), Frame::Fatal(FramingError::LineTooLong));
        let mut f = Framer::new(small());
        let mut line = vec![b'a'; 64];
        line.extend_from_slice(b"\r\n");
        assert_eq!(f.scan(&line), Frame::Complete { len: 66 });
    }

    #[test]
    fn command_limit_across_literals() {
        let limits = small();
        assert_eq!(limits.max_command, 64 + MAX_ID_PARAMS);
        let mut f = Framer::new(limits);
        let mut buf = Vec::new();
        let mut fatal = false;
        for _ in 0..limits.max_command {
            buf.extend_from_slice(b"a {30+}\r\n");
            buf.extend_from_slice(&[b'x'; 30]);
            match f.scan(&buf) {
                Frame::Incomplete => {}
                Frame::Fatal(_) => {
                    fatal = true;
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(fatal);
        assert!(buf.len() <= limits.max_command + 64);
    }

    #[test]
    fn rfc_2971_maximal_id_fits_on_one_line_and_in_literals() {
        assert_eq!(MAX_ID_PARAMS, 63_421);
        let limits = Limits::default();
        // 30 pairs, 30-octet fields and 1,024-octet values, every octet escaped.
        let pair = format!("\"{}\" \"{}\"", "\\\"".repeat(30), "\\\\".repeat(1024));
        let params = format!("({})", vec![pair; 30].join(" "));
        assert_eq!(params.len(), MAX_ID_PARAMS);
        let line = format!("{} ID {params}", "t".repeat(limits.max_line - 4));
        assert_eq!(line.len(), limits.max_id_line);
        for cut in [1, 4096, line.len() + 2] {
            let mut f = Framer::new(limits);
            let whole = format!("{line}\r\n");
            let mut got = Frame::Incomplete;
            for end in (cut..whole.len()).step_by(cut).chain([whole.len()]) {
                got = f.scan(&whole.as_bytes()[..end]);
                if got != Frame::Incomplete {
                    break;
                }
            }
            assert_eq!(got, Frame::Complete { len: whole.len() }, "in pieces of {cut}");
        }
        // One octet more is too long, also when seen without its end.
        let over = format!("{line}x\r\n");
        assert_eq!(
            Framer::new(limits).scan(over.as_bytes()),
            Frame::Fatal(FramingError::LineTooLong)
        );
        assert_eq!(
            Framer::new(limits).scan(&over.as_bytes()[..over.len() - 1]),
            Frame::Fatal(FramingError::LineTooLong)
        );
        // Values as literals: short line segments, a long command.
        let mut lit = b"a ID (".to_vec();
        for i in 0..30 {
            lit.extend_from_slice(format!("\"field{i:02}\" {{1024+}}\r\n").as_bytes());
            lit.extend_from_slice(&[b'v'; 1024]);
            lit.push(if i == 29 { b')' } else { b' ' });
        }
        lit.extend_from_slice(b"\r\n");
        assert_eq!(Framer::new(limits).scan(&lit), Frame::Complete { len: lit.len() });
    }

    #[test]
    fn only_id_and_authenticate_lines_are_longer() {
        let limits = Limits::default();
        let body = "A".repeat(limits.max_line);
        for (cmd, max) in [
            ("LOGIN", limits.max_line),
            ("NOOP", limits.max_line),
            ("id", limits.max_id_line),
            ("Authenticate", limits.max_authenticate_line),
        ] {
            let prefix = format!("tag {cmd} ");
            let fits = format!("{prefix}{}\r\n", "A".repeat(max - prefix.len()));
            assert_eq!(
                Framer::new(limits).scan(fits.as_bytes()),
                Frame::Complete { len: fits.len() },
                "{cmd}"
            );
            let over = format!("{prefix}{}\r\n", "A".repeat(max + 1 - prefix.len()));
            assert_eq!(
                Framer::new(limits).scan(over.as_bytes()),
                Frame::Fatal(FramingError::LineTooLong),
                "{cmd}"
            );
        }
        // The name must show within max_line: a huge tag is just a long line.
        let line = format!("{body} ID ()\r\n");
        assert_eq!(
            Framer::new(limits).scan(line.as_bytes()),
            Frame::Fatal(FramingError::LineTooLong)
        );
        // A SASL response may be 12,288 octets whatever the command looks like.
        assert_eq!(limits.max_authenticate_line, 8192 + 12_288);
        assert_eq!(limits.max_sasl_response, 12_288);
        let resp = format!("{}\r\n", "Q".repeat(12_288));
        let mut f = Framer::new(limits);
        assert_eq!(f.scan(resp.as_bytes()), Frame::Fatal(FramingError::LineTooLong));
        let mut f = Framer::new(limits);
        f.expect_sasl_response(true);
        assert_eq!(f.scan(resp.as_bytes()), Frame::Complete { len: resp.len() });
        let resp = format!("{}\r\n", "Q".repeat(12_289));
        assert_eq!(f.scan(resp.as_bytes()), Frame::Fatal(FramingError::LineTooLong));
    }

    #[test]
    fn header_parsing() {
        assert_eq!(
            literal_header(b"a {0}"),
            Some(LiteralHeader {
                size: Some(0),
                non_sync: false
            })
        );
        assert_eq!(literal_header(b"a {}"), None);
        assert_eq!(literal_header(b"a {+}"), None);
        assert_eq!(literal_header(b"a {1a}"), None);
        assert_eq!(literal_header(b"a 5}"), None);
        assert_eq!(
            literal_header(b"~{12+}"),
            Some(LiteralHeader {
                size: Some(12),
                non_sync: true
            })
        );
    }
}
