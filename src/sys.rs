//! The few operating-system calls mailproxy makes directly, behind safe
//! functions (the crate forbids `unsafe`).

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// The effective user id: files holding secrets must belong to it.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Raises the soft limit on open files to the hard limit: every session
/// holds two descriptors, and the usual soft limit of 1024 would cap a busy
/// proxy at a few hundred sessions. Returns the limit now in force (`None`
/// for unlimited).
pub fn raise_open_files() -> std::io::Result<Option<u64>> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current == limit.maximum {
        return Ok(limit.current);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )?;
    Ok(getrlimit(Resource::Nofile).current)
}

/// A loopback address, IPv4-mapped ones included: the peers whose local
/// user the kernel can name.
pub fn is_loopback(ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(v6.is_loopback(), |v4| v4.is_loopback()),
        v4 => v4.is_loopback(),
    }
}

/// The uid of the process that owns the other end of a loopback TCP
/// connection, asked of the kernel (sock_diag, as identd does). `Ok(None)`:
/// the kernel knows no such socket (the peer is gone, or the address is not
/// local); `Err`: this system cannot tell.
#[cfg(target_os = "linux")]
pub fn tcp_peer_uid(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> std::io::Result<Option<u32>> {
    use rustix::net::{netlink, recv, sendto, socket, AddressFamily, RecvFlags, SendFlags, SocketType};
    use std::net::{IpAddr, SocketAddr};

    /// One address as the kernel's `inet_diag_sockid` holds it.
    fn raw(a: SocketAddr) -> (u8, [u8; 16]) {
        let mut out = [0u8; 16];
        match a.ip() {
            IpAddr::V4(v4) => {
                out[..4].copy_from_slice(&v4.octets());
                (2, out) // AF_INET
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => {
                    out[..4].copy_from_slice(&v4.octets());
                    (2, out)
                }
                None => (10, v6.octets()), // AF_INET6
            },
        }
    }
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const IPPROTO_TCP: u8 = 6;

    let ((family, src), (_, dst)) = (raw(peer), raw(local));
    // nlmsghdr (16 bytes), then inet_diag_req_v2 (56 bytes) naming the
    // peer's own socket: its source is the peer, its destination us.
    let mut req = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    req.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&peer.port().to_be_bytes());
    req.extend_from_slice(&local.port().to_be_bytes());
    req.extend_from_slice(&src);
    req.extend_from_slice(&dst);
    req.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    req.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE

    let fd = socket(AddressFamily::NETLINK, SocketType::DGRAM, Some(netlink::SOCK_DIAG))?;
    rustix::net::sockopt::set_socket_timeout(
        &fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(std::time::Duration::from_secs(1)),
    )?;
    sendto(&fd, &req, SendFlags::empty(), &netlink::SocketAddrNetlink::new(0, 0))?;
    let mut buf = [0u8; 1024];
    let (n, _) = recv(&fd, &mut buf[..], RecvFlags::empty())?;
    let msg = &buf[..n];
    let u16_at = |i: usize| msg.get(i..i + 2).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let u32_at = |i: usize| msg.get(i..i + 4).map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match u16_at(4) {
        Some(SOCK_DIAG_BY_FAMILY) => Ok(u32_at(16 + 64)),
        Some(NLMSG_ERROR) => {
            let errno = u32_at(16).map_or(0, |e| (e as i32).unsigned_abs());
            if errno == 2 {
                Ok(None) // ENOENT: no such socket
            } else {
                Err(std::io::Error::from_raw_os_error(errno as i32))
            }
        }
        _ => Err(std::io::Error::other("sock_diag answered with an unexpected message")),
    }
}

/// Elsewhere the uid of a TCP peer cannot be asked for.
#[cfg(not(target_os = "linux"))]
pub fn tcp_peer_uid(_local: std::net::SocketAddr, _peer: std::net::SocketAddr) -> std::io::Result<Option<u32>> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

#[cfg(test)]
mod tests {
    #[test]
    fn open_files_raised_to_the_hard_limit() {
        let after = super::raise_open_files().expect("raising the soft limit to the hard one is always allowed");
        let now = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        assert_eq!(after, now.current);
        assert_eq!(now.current, now.maximum);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn loopback_peer_uid_is_the_connecting_process() {
        for host in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(host) else {
                continue;
            };
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, peer) = listener.accept().unwrap();
            let local = server.local_addr().unwrap();
            assert_eq!(super::tcp_peer_uid(local, peer).unwrap(), Some(super::euid()), "{host}");
            // Our own end, seen from the client, is ours too; a closed port is nobody's.
            assert_eq!(super::tcp_peer_uid(peer, local).unwrap(), Some(super::euid()));
            drop((client, server));
            let gone = std::net::SocketAddr::new(peer.ip(), 1);
            assert_eq!(super::tcp_peer_uid(local, gone).unwrap(), None);
        }
    }
}
