//! Grammar of the transaction commands mailproxy answers itself when it
//! submits through Microsoft Graph (RFC 5321 §4.1.1, RFC 1870 `SIZE`,
//! RFC 6152 `8BITMIME`, RFC 6531 `SMTPUTF8`, RFC 3030 `BDAT`). Only the
//! parameters mailproxy advertises are accepted; others get `555`.

/// One command of a submission session after `AUTH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Txn {
    Mail {
        from: String,
        size: Option<u64>,
        smtputf8: bool,
    },
    Rcpt {
        to: String,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Ehlo {
        domain: String,
    },
    Helo {
        domain: String,
    },
    Help,
    Vrfy,
    Auth,
    StartTls,
    Unknown,
}

/// A command line that does not parse: the reply says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub &'static str);

/// Parses one command line (without CRLF).
pub fn parse(line: &str) -> Result<Txn, Refusal> {
    let (verb, rest) = match line.split_once(' ') {
        Some((v, r)) => (v, r),
        None => (line, ""),
    };
    let rest = rest.trim_start();
    Ok(match verb.to_ascii_uppercase().as_str() {
        "MAIL" => mail(rest)?,
        "RCPT" => rcpt(rest)?,
        "DATA" if rest.trim().is_empty() => Txn::Data,
        "DATA" => return Err(Refusal("501 5.5.4 DATA takes no arguments")),
        "BDAT" => bdat(rest)?,
        "RSET" => Txn::Rset,
        "NOOP" => Txn::Noop,
        "QUIT" => Txn::Quit,
        "EHLO" => Txn::Ehlo {
            domain: rest.trim().into(),
        },
        "HELO" => Txn::Helo {
            domain: rest.trim().into(),
        },
        "HELP" => Txn::Help,
        "VRFY" => Txn::Vrfy,
        "AUTH" => Txn::Auth,
        "STARTTLS" => Txn::StartTls,
        _ => Txn::Unknown,
    })
}

/// `FROM:<path> [params]` (an optional space after the colon is tolerated).
fn mail(rest: &str) -> Result<Txn, Refusal> {
    const SYNTAX: Refusal = Refusal("501 5.5.4 Syntax: MAIL FROM:<address>");
    let (path, params) = path_after(rest, "FROM:").ok_or(SYNTAX)?;
    let (mut size, mut smtputf8) = (None, false);
    for p in params.split_ascii_whitespace() {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        match k.to_ascii_uppercase().as_str() {
            "SIZE" => size = Some(v.parse().map_err(|_| Refusal("501 5.5.4 SIZE= needs a number"))?),
            "BODY" if v.eq_ignore_ascii_case("8BITMIME") || v.eq_ignore_ascii_case("7BIT") => {}
            "BODY" => return Err(Refusal("555 5.5.4 Only BODY=7BIT and BODY=8BITMIME are supported")),
            "SMTPUTF8" if v.is_empty() => smtputf8 = true,
            // RFC 4954 §5: the AUTH parameter may be given and ignored.
            "AUTH" => {}
            _ => return Err(Refusal("555 5.5.4 Unsupported MAIL parameter")),
        }
    }
    Ok(Txn::Mail {
        from: path,
        size,
        smtputf8,
    })
}

fn rcpt(rest: &str) -> Result<Txn, Refusal> {
    let (path, params) = path_after(rest, "TO:").ok_or(Refusal("501 5.5.4 Syntax: RCPT TO:<address>"))?;
    if !params.trim().is_empty() {
        return Err(Refusal("555 5.5.4 RCPT parameters are not supported"));
    }
    if path.is_empty() || !path.contains('@') {
        return Err(Refusal(
            "501 5.1.3 A recipient needs an address like <user@example.com>",
        ));
    }
    Ok(Txn::Rcpt { to: path })
}

fn bdat(rest: &str) -> Result<Txn, Refusal> {
    const SYNTAX: Refusal = Refusal("501 5.5.4 Syntax: BDAT size [LAST]");
    let mut words = rest.split_ascii_whitespace();
    let size = words.next().and_then(|s| s.parse().ok()).ok_or(SYNTAX)?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(SYNTAX),
    };
    if words.next().is_some() {
        return Err(SYNTAX);
    }
    Ok(Txn::Bdat { size, last })
}

/// `KEYWORD<path> params` → (the address inside the angle brackets, params).
/// Source routes (`<@a,@b:user@c>`) are accepted and dropped (RFC 5321 §4.1.2).
fn path_after<'a>(rest: &'a str, keyword: &str) -> Option<(String, &'a str)> {
    // `get`: the client's bytes may put a multi-byte character where the
    // keyword's end would be.
    if !rest.get(..keyword.len())?.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = rest[keyword.len()..].trim_start();
    let inner = rest.strip_prefix('<')?;
    let end = inner.find('>')?;
    let addr = &inner[..end];
    let addr = match addr.split_once(':') {
        Some((route, a)) if route.starts_with('@') => a,
        _ => addr,
    };
    if addr.chars().any(|c| c.is_control() || c == ' ') {
        return None;
    }
    Some((addr.to_string(), &inner[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A multi-byte character where `TO:` or `FROM:` would end is a
    /// syntax error, not a panic.
    #[test]
    fn a_multibyte_character_across_the_keyword_is_refused() {
        assert!(parse("RCPT TO\u{1b9}jørn@example.com>").is_err());
        assert!(parse("MAIL FR\u{e9}<me@example.org>").is_err());
        assert!(parse("RCPT T\u{1b9}").is_err());
    }

    #[test]
    fn mail_and_rcpt_with_the_advertised_parameters() {
        assert_eq!(
            parse("MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME SMTPUTF8"),
            Ok(Txn::Mail {
                from: "a@b.example".into(),
                size: Some(1234),
                smtputf8: true
            })
        );
        assert_eq!(
            parse("mail from: <>"),
            Ok(Txn::Mail {
                from: String::new(),
                size: None,
                smtputf8: false
            })
        );
        assert_eq!(
            parse("RCPT TO:<jö@bücher.example>"),
            Ok(Txn::Rcpt {
                to: "jö@bücher.example".into()
            })
        );
        assert_eq!(
            parse("RCPT TO:<@relay:u@x.example>"),
            Ok(Txn::Rcpt {
                to: "u@x.example".into()
            })
        );
        assert!(parse("MAIL FROM:<a@b> RET=FULL").unwrap_err().0.starts_with("555"));
        assert!(parse("MAIL FROM:<a@b> BODY=BINARYMIME")
            .unwrap_err()
            .0
            .starts_with("555"));
        assert!(parse("RCPT TO:<a@b> NOTIFY=NEVER").unwrap_err().0.starts_with("555"));
        assert!(parse("RCPT TO:a@b").unwrap_err().0.starts_with("501"));
        assert!(parse("MAIL TO:<a@b>").unwrap_err().0.starts_with("501"));
    }

    #[test]
    fn bdat_and_the_rest() {
        assert_eq!(parse("BDAT 10 LAST"), Ok(Txn::Bdat { size: 10, last: true }));
        assert_eq!(parse("bdat 0"), Ok(Txn::Bdat { size: 0, last: false }));
        assert!(parse("BDAT x").is_err());
        assert!(parse("BDAT 1 LAST x").is_err());
        assert_eq!(parse("DATA"), Ok(Txn::Data));
        assert_eq!(parse("XYZZY"), Ok(Txn::Unknown));
    }
}
