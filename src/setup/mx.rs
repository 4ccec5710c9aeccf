//! One DNS MX query over UDP to the first name servers of
//! `/etc/resolv.conf`, with a short timeout: enough to tell a Google
//! Workspace or Microsoft 365 domain by where its mail goes. Any failure is
//! simply "unknown" and `mailproxy add` asks instead.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

/// The MX host names of `domain`, best preference first; `None` when no
/// name server answered in time.
pub fn lookup(domain: &str, timeout: Duration) -> Option<Vec<String>> {
    let servers = nameservers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default());
    for ns in servers.into_iter().take(2) {
        let bind: SocketAddr = if ns.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let Ok(sock) = UdpSocket::bind(bind) else { continue };
        let _ = sock.set_read_timeout(Some(timeout));
        let id = rand::random::<u16>();
        let q = query(id, domain)?;
        if sock.send_to(&q, (ns, 53)).is_err() {
            continue;
        }
        let mut buf = [0u8; 4096];
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            if from.ip() == ns {
                if let Some(mx) = parse_mx(&buf[..n], id) {
                    return Some(mx);
                }
            }
        }
    }
    None
}

/// `nameserver` lines of a resolv.conf.
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.split('%').next()?.parse().ok())
        })
        .collect()
}

/// A recursive MX query for `domain`.
pub fn query(id: u16, domain: &str) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, one question
    for label in domain.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 15, 0, 1]); // MX, IN
    Some(q)
}

/// The MX exchanges of an answer to query `id`, by preference.
pub fn parse_mx(msg: &[u8], id: u16) -> Option<Vec<String>> {
    if msg.len() < 12 || msg[..2] != id.to_be_bytes() || msg[2] & 0x80 == 0 {
        return None;
    }
    if msg[3] & 0x0f != 0 {
        return Some(vec![]); // NXDOMAIN and friends: no MX
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]);
    let an = u16::from_be_bytes([msg[6], msg[7]]);
    let mut pos = 12;
    for _ in 0..qd {
        pos = read_name(msg, pos)?.1.checked_add(4)?;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        let (_, p) = read_name(msg, pos)?;
        let head = msg.get(p..p.checked_add(10)?)?;
        let rtype = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[8], head[9]]));
        let data = p + 10;
        if rtype == 15 && len >= 3 {
            let pref = u16::from_be_bytes([*msg.get(data)?, *msg.get(data + 1)?]);
            let (name, _) = read_name(msg, data + 2)?;
            out.push((pref, name));
        }
        pos = data.checked_add(len)?;
    }
    out.sort();
    Some(out.into_iter().map(|(_, n)| n).collect())
}

/// A possibly compressed name at `pos`; returns it and the position after it.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *msg.get(pos)?;
        match len {
            0 => {
                return Some((labels.join(".").to_ascii_lowercase(), end.unwrap_or(pos + 1)));
            }
            l if l & 0xc0 == 0xc0 => {
                let target = usize::from(u16::from_be_bytes([l & 0x3f, *msg.get(pos + 1)?]));
                end.get_or_insert(pos + 2);
                if target >= pos {
                    return None; // pointers only go backwards: no loops
                }
                pos = target;
            }
            l if l < 64 => {
                let label = msg.get(pos + 1..pos + 1 + usize::from(l))?;
                labels.push(String::from_utf8_lossy(label).into_owned());
                pos += 1 + usize::from(l);
            }
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_name_servers() {
        let t = "# generated\nsearch lan\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver nonsense\noptions edns0\n";
        assert_eq!(
            nameservers(t),
            vec!["192.0.2.53".parse::<IpAddr>().unwrap(), "fe80::1".parse().unwrap()]
        );
    }

    #[test]
    fn an_mx_answer_with_compressed_names() {
        let q = query(0x1234, "example.org").unwrap();
        assert_eq!(&q[12..25], b"\x07example\x03org\x00");
        let mut m = q.clone();
        m[2] = 0x81;
        m[3] = 0x80;
        m[7] = 2; // two answers
                  // answer 1: name = pointer to the question (offset 12), MX pref 10, "alt1" + pointer to ...
                  // exchange: aspmx.l.google.com spelt out
        let rr = |m: &mut Vec<u8>, pref: u16, exchange: &[u8]| {
            m.extend_from_slice(&[0xc0, 12, 0, 15, 0, 1, 0, 0, 0, 60]);
            let len = (2 + exchange.len()) as u16;
            m.extend_from_slice(&len.to_be_bytes());
            m.extend_from_slice(&pref.to_be_bytes());
            m.extend_from_slice(exchange);
        };
        rr(&mut m, 5, b"\x05ASPMX\x01l\x06google\x03com\x00");
        let google_at = m.len() - 14; // the "l.google.com" labels of the first exchange
        let second = [b"\x04alt1".as_slice(), &[0xc0, google_at as u8]].concat();
        rr(&mut m, 1, &second);
        assert_eq!(
            parse_mx(&m, 0x1234).unwrap(),
            vec!["alt1.l.google.com".to_string(), "aspmx.l.google.com".to_string()]
        );
        assert!(parse_mx(&m, 0x9999).is_none(), "another query's answer");
        let mut looped = m.clone();
        let n = looped.len();
        looped[n - 1] = (n - 2) as u8; // a pointer to itself
        assert!(parse_mx(&looped, 0x1234).is_none());
        assert!(parse_mx(&m[..m.len() - 3], 0x1234).is_none(), "truncated");
    }
}
