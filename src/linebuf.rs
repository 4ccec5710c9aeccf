//! Input buffering shared by the pre-login state machines: a buffer that
//! wipes what it held (it may hold passwords), and an incremental line finder
//! for the line-based protocols (SMTP, POP3).

use zeroize::Zeroize;

use crate::text::strip_eol;

/// Input buffer whose contents are zeroized when consumed, reallocated or
/// dropped (it may hold passwords).
pub(crate) struct SecretBuf(pub(crate) Vec<u8>);

impl SecretBuf {
    /// Append, growing geometrically but never beyond `max(needed, limit)`.
    pub(crate) fn extend(&mut self, bytes: &[u8], limit: usize) {
        let needed = self.0.len() + bytes.len();
        if needed > self.0.capacity() {
            let target = (self.0.capacity() * 2).max(512).min(limit).max(needed);
            let mut grown = Vec::with_capacity(target);
            grown.extend_from_slice(&self.0);
            self.0.zeroize();
            self.0 = grown;
        }
        self.0.extend_from_slice(bytes);
    }

    pub(crate) fn consume(&mut self, n: usize) {
        let len = self.0.len();
        let n = n.min(len);
        self.0.copy_within(n..len, 0);
        self.0[len - n..].zeroize();
        self.0.truncate(len - n);
    }

    pub(crate) fn clear(&mut self) {
        self.0.zeroize();
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Incremental line finder: remembers how far it searched, so feeding one
/// byte at a time costs O(total).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LineFramer {
    pub(crate) scanned: usize,
    pub(crate) max_line: usize,
}

pub(crate) enum Line {
    Incomplete,
    /// `buf[..len]` is one line including its LF.
    Complete(usize),
    TooLong,
}

impl LineFramer {
    pub(crate) fn scan(&mut self, buf: &[u8]) -> Line {
        let from = self.scanned.min(buf.len());
        match buf[from..].iter().position(|&b| b == b'\n') {
            Some(off) => {
                let len = from + off + 1;
                self.scanned = 0;
                if strip_eol(&buf[..len]).len() > self.max_line {
                    Line::TooLong
                } else {
                    Line::Complete(len)
                }
            }
            None => {
                self.scanned = buf.len();
                // Allow one extra byte for a CR that may precede LF.
                if buf.len() > self.max_line.saturating_add(1) {
                    Line::TooLong
                } else {
                    Line::Incomplete
                }
            }
        }
    }

    pub(crate) fn reset(&mut self) {
        self.scanned = 0;
    }
}
