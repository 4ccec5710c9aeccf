//! Small text helpers every protocol shares: line ends, one-line replies, and
//! making client- or server-supplied text safe to echo or log.

use std::fmt;

/// `line` without its trailing `\r\n` or `\n` (a lone CR stays: it is
/// part of the line, not its end).
pub fn strip_eol(line: &[u8]) -> &[u8] {
    match line.strip_suffix(b"\n") {
        Some(l) => l.strip_suffix(b"\r").unwrap_or(l),
        None => line,
    }
}

/// `(year, month, day, hour, minute, second)` in UTC from unix seconds
/// (the proleptic Gregorian calendar, as RFC 3339 dates are).
pub fn civil_utc(t: u64) -> (i64, i64, i64, u64, u64, u64) {
    let days = i64::try_from(t / 86_400).unwrap_or(i64::MAX / 2);
    let secs = t % 86_400;
    // Civil date from days since 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, secs / 3600, secs % 3600 / 60, secs % 60)
}

/// Text for a protocol reply: control characters (CR, LF, NUL, …) become
/// spaces, so upstream or provider text can never add a line to the
/// client's protocol stream.
pub fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// Whether a credential can be sent upstream as it is: CR, LF or NUL in a
/// user name or password would split or truncate the command it travels in
/// (`USER x\r\nDELE 1`), so such logins are refused before any upstream
/// traffic, whatever form they arrived in.
pub fn is_safe_credential(s: &str) -> bool {
    !s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// Client-supplied text for a log field: control characters are shown
/// escaped (`\n`, `\u{1b}`) and the length is capped, so no login name can
/// forge a log line or flood the log.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX: usize = 256;
        for (i, c) in self.0.chars().enumerate() {
            if i == MAX {
                return f.write_str("…");
            }
            if c.is_control() || c == '\\' {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// [`Escaped`] as an owned string (for span fields).
pub fn escaped(s: &str) -> String {
    Escaped(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eol() {
        assert_eq!(strip_eol(b"a\r\n"), b"a");
        assert_eq!(strip_eol(b"a\n"), b"a");
        assert_eq!(strip_eol(b"a\r"), b"a\r");
        assert_eq!(strip_eol(b"a"), b"a");
        assert_eq!(strip_eol(b"\r\n"), b"");
    }

    #[test]
    fn one_line_and_credentials() {
        assert_eq!(one_line("a\r\nb\0c"), "a  b c");
        assert!(is_safe_credential("alice@example.org"));
        assert!(is_safe_credential("pässwörd with spaces\t"));
        for bad in ["a\rb", "a\nb", "a\0b", "x\r\nDELE 1"] {
            assert!(!is_safe_credential(bad), "{bad:?}");
        }
    }

    #[test]
    fn escaping_forges_no_log_line() {
        assert_eq!(escaped("bob\n2026 INFO forged"), "bob\\n2026 INFO forged");
        assert_eq!(escaped("a\\b\u{1b}[31m"), "a\\\\b\\u{1b}[31m");
        assert_eq!(escaped("plain"), "plain");
        assert!(escaped(&"x".repeat(1000)).chars().count() <= 257);
    }
}
