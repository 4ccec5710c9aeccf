//! The PROXY protocol v2 header a TCP balancer (HAProxy `send-proxy-v2`)
//! puts in front of a connection, so that limits and logs see the real
//! client. A nom grammar over bytes, no I/O: the server reads the fixed
//! 16-byte prefix, asks [`header_len`] how much follows, then [`parse`]s.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use nom::bytes::complete::{tag, take};
use nom::number::complete::{be_u16, be_u8};
use nom::{IResult, Parser};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Signature, version/command, family, length.
pub const PREFIX_LEN: usize = 16;
/// Longest header accepted: addresses plus a few TLVs (HAProxy sends well
/// under this); anything longer is refused rather than buffered.
pub const MAX_HEADER: usize = PREFIX_LEN + 512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection does not start with a PROXY protocol v2 header")]
    NoSignature,
    #[error("PROXY protocol version {0} (only version 2 is read)")]
    Version(u8),
    #[error("PROXY header command {0:#x} is unknown")]
    Command(u8),
    #[error("PROXY header of {0} bytes is longer than {MAX_HEADER}")]
    TooLong(usize),
    #[error("PROXY header addresses are truncated")]
    Truncated,
}

/// What the balancer said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A proxied connection from `source` (to `destination`).
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection (a health check: `LOCAL`), or one
    /// whose addresses it does not name (`UNSPEC`, UNIX sockets): the
    /// balancer's address stands.
    Local,
}

/// From the 16-byte prefix: the whole header's length.
pub fn header_len(prefix: &[u8; PREFIX_LEN]) -> Result<usize, ProxyHeaderError> {
    if &prefix[..12] != SIGNATURE {
        return Err(ProxyHeaderError::NoSignature);
    }
    let version = prefix[12] >> 4;
    if version != 2 {
        return Err(ProxyHeaderError::Version(version));
    }
    let len = PREFIX_LEN + usize::from(u16::from_be_bytes([prefix[14], prefix[15]]));
    if len > MAX_HEADER {
        return Err(ProxyHeaderError::TooLong(len));
    }
    Ok(len)
}

type Res<'a, O> = IResult<&'a [u8], O>;

fn v4(i: &[u8]) -> Res<'_, (SocketAddr, SocketAddr)> {
    let (i, (s, d, sp, dp)) = (take(4usize), take(4usize), be_u16, be_u16).parse(i)?;
    let ip = |b: &[u8]| IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
    Ok((i, (SocketAddr::new(ip(s), sp), SocketAddr::new(ip(d), dp))))
}

fn v6(i: &[u8]) -> Res<'_, (SocketAddr, SocketAddr)> {
    let (i, (s, d, sp, dp)) = (take(16usize), take(16usize), be_u16, be_u16).parse(i)?;
    let ip = |b: &[u8]| {
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        IpAddr::V6(Ipv6Addr::from(a))
    };
    Ok((i, (SocketAddr::new(ip(s), sp), SocketAddr::new(ip(d), dp))))
}

/// Parses a whole header (`header_len` bytes). TLVs after the addresses
/// are skipped: nothing in them changes who the client is.
pub fn parse(header: &[u8]) -> Result<Header, ProxyHeaderError> {
    let prefix: &[u8; PREFIX_LEN] = header
        .get(..PREFIX_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(ProxyHeaderError::Truncated)?;
    let len = header_len(prefix)?;
    let body = header.get(PREFIX_LEN..len).ok_or(ProxyHeaderError::Truncated)?;
    let fields: Res<'_, (u8, u8)> = (tag(&SIGNATURE[..]), be_u8, be_u8)
        .parse(header)
        .map(|(i, (_, vc, fam))| (i, (vc, fam)));
    let (_, (ver_cmd, family)) = fields.map_err(|_| ProxyHeaderError::Truncated)?;
    match ver_cmd & 0x0f {
        0x0 => return Ok(Header::Local),
        0x1 => {}
        c => return Err(ProxyHeaderError::Command(c)),
    }
    let addrs = match family >> 4 {
        0x1 => v4(body),
        0x2 => v6(body),
        _ => return Ok(Header::Local),
    };
    let (_, (source, destination)) = addrs.map_err(|_| ProxyHeaderError::Truncated)?;
    Ok(Header::Proxied { source, destination })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn tcp4_and_tcp6() {
        let mut body = vec![127, 0, 0, 2, 127, 0, 0, 1];
        body.extend_from_slice(&40000u16.to_be_bytes());
        body.extend_from_slice(&1143u16.to_be_bytes());
        body.extend_from_slice(&[0x04, 0, 1, 0]); // a NOOP TLV, skipped
        let h = header(0x21, 0x11, &body);
        assert_eq!(header_len(h[..16].try_into().unwrap()), Ok(h.len()));
        assert_eq!(
            parse(&h),
            Ok(Header::Proxied {
                source: "127.0.0.2:40000".parse().unwrap(),
                destination: "127.0.0.1:1143".parse().unwrap(),
            })
        );
        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        body.extend_from_slice(&[0x9c, 0x40, 0x04, 0x77]);
        match parse(&header(0x21, 0x21, &body)) {
            Ok(Header::Proxied { source, .. }) => assert_eq!(source, "[2001:db8::7]:40000".parse().unwrap()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn local_and_unspec_keep_the_balancer() {
        assert_eq!(parse(&header(0x20, 0x00, &[])), Ok(Header::Local));
        assert_eq!(parse(&header(0x21, 0x00, &[])), Ok(Header::Local));
        assert_eq!(parse(&header(0x21, 0x31, &[0u8; 216])), Ok(Header::Local));
    }

    #[test]
    fn refusals() {
        let mut h = header(0x21, 0x11, &[0u8; 12]);
        h[3] = b'x';
        assert_eq!(parse(&h), Err(ProxyHeaderError::NoSignature));
        assert_eq!(parse(b"a1 LOGIN alice pw\r\n"), Err(ProxyHeaderError::NoSignature));
        assert_eq!(
            parse(&header(0x11, 0x11, &[0u8; 12])),
            Err(ProxyHeaderError::Version(1))
        );
        assert_eq!(
            parse(&header(0x22, 0x11, &[0u8; 12])),
            Err(ProxyHeaderError::Command(2))
        );
        assert_eq!(parse(&header(0x21, 0x11, &[0u8; 5])), Err(ProxyHeaderError::Truncated));
        assert_eq!(
            parse(&header(0x21, 0x11, &[0u8; 600])),
            Err(ProxyHeaderError::TooLong(616))
        );
        // The v1 text form is not read.
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
            Err(ProxyHeaderError::NoSignature)
        );
    }

    #[test]
    fn never_panics_on_noise() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for n in 0..2000 {
            let mut h = SIGNATURE.to_vec();
            for _ in 0..(n % 80) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                h.push(x as u8);
            }
            let _ = parse(&h);
            let _ = parse(&h[..h.len().min(16)]);
        }
    }
}
