//! Where a new config's status page listens. `add` turns it on: it is where
//! a person sees what an account needs and starts a sign-in, and it must
//! stay on loopback because it shows authorisation links.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// The status page's usual address (README, `[server] status_listen`).
pub const DEFAULT_STATUS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8025);

/// The status page's address: `preferred` when nothing listens there, else
/// a free loopback port and a sentence saying why it is not `preferred`.
pub fn status_address(preferred: SocketAddr) -> (SocketAddr, Option<String>) {
    if TcpListener::bind(preferred).is_ok() {
        return (preferred, None);
    }
    let free = TcpListener::bind(SocketAddr::new(preferred.ip(), 0))
        .and_then(|l| l.local_addr())
        .unwrap_or(preferred);
    if free == preferred {
        return (preferred, None);
    }
    let why = format!(
        "{preferred} is taken (another program listens there), so the status page gets the free port {free} instead"
    );
    (free, Some(why))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_address_gives_another_loopback_port_and_says_so() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap();
        let (addr, why) = status_address(taken);
        assert!(addr.ip().is_loopback() && addr != taken, "{addr}");
        let why = why.unwrap();
        assert!(
            why.contains(&taken.to_string()) && why.contains(&addr.to_string()),
            "{why}"
        );
        drop(held);
        assert_eq!(status_address(taken), (taken, None));
    }
}
