//! The envelope is the truth: Graph's `sendMail` with a MIME body takes its
//! recipients from the `To`, `Cc` and `Bcc` header fields, while SMTP
//! delivers to the `RCPT TO` addresses. So before a message leaves through
//! Graph, its recipient fields are made to say exactly the envelope:
//! `To`/`Cc` keep the addresses that are in the envelope (a field whose
//! every address is kept stays byte for byte), every `Bcc` field goes, and
//! one `Bcc` field lists the envelope addresses no `To`/`Cc` names (Exchange
//! delivers it and shows it to nobody). Every other byte stays as it was.

/// `message` with its recipient header fields rewritten to `envelope`.
pub fn rewrite(message: &[u8], envelope: &[String]) -> Vec<u8> {
    let header_end = header_len(message);
    let (head, body) = message.split_at(header_end);
    let eol: &[u8] = if head.windows(2).any(|w| w == b"\r\n") {
        b"\r\n"
    } else {
        b"\n"
    };
    let wanted: Vec<String> = envelope.iter().map(|a| a.to_lowercase()).collect();
    let mut covered: Vec<String> = Vec::new();
    let mut out = Vec::with_capacity(message.len() + 64);
    for field in fields(head) {
        match field_name(field).to_ascii_lowercase().as_str() {
            "bcc" | "resent-bcc" => {}
            name @ ("to" | "cc") => keep_listed(field, name, &wanted, &mut covered, eol, &mut out),
            _ => out.extend_from_slice(field),
        }
    }
    let hidden: Vec<&String> = envelope
        .iter()
        .filter(|a| !covered.contains(&a.to_lowercase()))
        .collect();
    if !hidden.is_empty() {
        write_field(&mut out, b"Bcc", hidden.iter().map(|a| a.as_str()), eol);
    }
    out.extend_from_slice(body);
    out
}

/// The addresses of the `To`, `Cc` and `Bcc` fields (lower-cased): whom
/// Graph would deliver `message` to.
pub fn header_recipients(message: &[u8]) -> Vec<String> {
    let head = &message[..header_len(message)];
    let mut all = Vec::new();
    for field in fields(head) {
        if matches!(field_name(field).to_ascii_lowercase().as_str(), "to" | "cc" | "bcc") {
            for (_, addr) in items(field_value(field)) {
                if let Some(a) = addr.map(|a| a.to_lowercase()).filter(|a| !all.contains(a)) {
                    all.push(a);
                }
            }
        }
    }
    all
}

/// A `To`/`Cc` field with only the addresses in `wanted`: unchanged when
/// all are, rewritten when some are, dropped when none are.
fn keep_listed(field: &[u8], name: &str, wanted: &[String], covered: &mut Vec<String>, eol: &[u8], out: &mut Vec<u8>) {
    let list = items(field_value(field));
    let keep = |addr: &Option<String>| addr.as_ref().is_none_or(|a| wanted.contains(&a.to_lowercase()));
    for (_, a) in list.iter().filter(|(_, a)| keep(a)) {
        if let Some(a) = a {
            covered.push(a.to_lowercase());
        }
    }
    if list.iter().all(|(_, a)| keep(a)) {
        return out.extend_from_slice(field);
    }
    let kept: Vec<&str> = list
        .iter()
        .filter(|(_, a)| a.is_some() && keep(a))
        .map(|(raw, _)| raw.trim())
        .collect();
    if kept.is_empty() {
        return;
    }
    write_field(out, &field[..name.len()], kept.iter().copied(), eol);
}

/// `Name: a,` / ` b` folded one address a line, ending with `eol`.
fn write_field<'a>(out: &mut Vec<u8>, name: &[u8], items: impl Iterator<Item = &'a str>, eol: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.extend_from_slice(b",");
            out.extend_from_slice(eol);
            out.extend_from_slice(b" ");
        }
        out.extend_from_slice(item.as_bytes());
    }
    out.extend_from_slice(eol);
}

/// Length of the header section including the empty line that ends it
/// (the whole message when there is none).
fn header_len(m: &[u8]) -> usize {
    let mut i = 0;
    while i < m.len() {
        let line_end = m[i..].iter().position(|b| *b == b'\n').map_or(m.len(), |p| i + p + 1);
        let line = &m[i..line_end];
        if line == b"\r\n" || line == b"\n" {
            return i;
        }
        i = line_end;
    }
    m.len()
}

/// The header fields, each with its continuation lines and line ends.
fn fields(head: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < head.len() {
        let end = head[i..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(head.len(), |p| i + p + 1);
        let next_is_continuation = head.get(end).is_some_and(|b| *b == b' ' || *b == b'\t');
        if !next_is_continuation {
            out.push(&head[start..end]);
            start = end;
        }
        i = end;
    }
    out
}

fn field_name(field: &[u8]) -> &str {
    let colon = field.iter().position(|b| *b == b':').unwrap_or(0);
    std::str::from_utf8(&field[..colon]).unwrap_or("").trim_end()
}

fn field_value(field: &[u8]) -> String {
    let colon = field.iter().position(|b| *b == b':').map_or(field.len(), |c| c + 1);
    String::from_utf8_lossy(&field[colon..]).replace(['\r', '\n'], "")
}

/// The items of an address list, each as written and its address (`None`
/// for an empty group such as `undisclosed-recipients:;`).
fn items(value: String) -> Vec<(String, Option<String>)> {
    let (mut out, mut cur) = (Vec::new(), String::new());
    let (mut quoted, mut angle, mut comment) = (false, false, 0u32);
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            escaped = false;
            cur.push(c);
            continue;
        }
        match c {
            '\\' if quoted || comment > 0 => escaped = true,
            '"' if comment == 0 => quoted = !quoted,
            '(' if !quoted => comment += 1,
            ')' if !quoted && comment > 0 => comment -= 1,
            '<' if !quoted && comment == 0 => angle = true,
            '>' if !quoted && comment == 0 => angle = false,
            ',' | ';' if !quoted && !angle && comment == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter()
        .filter(|raw| !raw.trim().is_empty())
        .map(|raw| {
            let addr = address(&raw);
            (raw, addr)
        })
        .collect()
}

/// The addr-spec of one item: inside `<…>`, else the item without comments
/// and without a group's `name:` prefix.
fn address(raw: &str) -> Option<String> {
    let a = match (raw.rfind('<'), raw.rfind('>')) {
        (Some(l), Some(r)) if l < r => raw[l + 1..r].to_string(),
        _ => {
            let mut s = String::new();
            let mut depth = 0u32;
            for c in raw.chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth = depth.saturating_sub(1),
                    c if depth == 0 => s.push(c),
                    _ => {}
                }
            }
            match s.split_once(':') {
                Some((_, rest)) if !s.trim_start().starts_with('"') => rest.to_string(),
                _ => s,
            }
        }
    };
    let a = a.trim();
    let a = a.rsplit_once(':').map_or(a, |(_, r)| r).trim();
    a.contains('@').then(|| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(a: &[&str]) -> Vec<String> {
        a.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn fields_that_match_the_envelope_stay_byte_for_byte() {
        let m = b"From: me@x\r\nTo: \"Doe, Jane\" <Jane@y.example>,\r\n bob@y.example (Bob)\r\nSubject: hi\r\n\r\nTo: not a header\r\n";
        assert_eq!(rewrite(m, &env(&["jane@y.example", "bob@y.example"])), m.to_vec());
        assert_eq!(header_recipients(m), ["jane@y.example", "bob@y.example"]);
    }

    #[test]
    fn bcc_from_the_envelope_and_strangers_dropped() {
        let m = b"From: me@x\r\nTo: a@y, stranger@z\r\nBcc: other@z\r\nCc: undisclosed-recipients:;\r\nSubject: s\r\n\r\nbody\r\n";
        let out = rewrite(m, &env(&["a@y", "hidden@w", "jö@bücher.example"]));
        let text = String::from_utf8(out.clone()).unwrap();
        assert_eq!(
            text,
            "From: me@x\r\nTo: a@y\r\nCc: undisclosed-recipients:;\r\nSubject: s\r\nBcc: hidden@w,\r\n jö@bücher.example\r\n\r\nbody\r\n"
        );
        assert_eq!(header_recipients(&out), ["a@y", "hidden@w", "jö@bücher.example"]);
    }

    #[test]
    fn a_field_with_no_envelope_address_goes() {
        let m = b"To: x@z\nSubject: s\n\nb\n";
        assert_eq!(rewrite(m, &env(&["a@y"])), b"Subject: s\nBcc: a@y\n\nb\n".to_vec());
    }
}
