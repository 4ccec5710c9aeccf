//! Who is on the other end of a client connection: its address (the
//! balancer's PROXY header speaks for it when there is one) and, for a
//! direct loopback connection, the local user that opened it, asked of the
//! kernel only when a decision needs it.

use std::net::{IpAddr, SocketAddr};

use super::guard::network;
use crate::tokens::Lane;

#[derive(Clone, Copy, Debug)]
pub(crate) struct Caller {
    /// The client's address, for limits and logs.
    pub ip: IpAddr,
    /// Both ends of a direct connection (none behind a balancer).
    direct: Option<(SocketAddr, SocketAddr)>,
}

/// What the kernel says of a loopback peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LocalUser {
    /// The uid that runs mailproxy.
    Owner,
    /// Another uid.
    Other(u32),
    /// Not a direct loopback connection, or the kernel cannot tell.
    Unknown,
}

impl Caller {
    /// `direct`: the connection's (local, peer) addresses when the client
    /// connected to us itself.
    pub fn new(ip: IpAddr, direct: Option<(SocketAddr, SocketAddr)>) -> Caller {
        Caller { ip, direct }
    }

    /// The local user behind a direct loopback connection.
    pub fn local_user(&self) -> LocalUser {
        let Some((local, peer)) = self.direct.filter(|(_, p)| crate::sys::is_loopback(p.ip())) else {
            return LocalUser::Unknown;
        };
        match crate::sys::tcp_peer_uid(local, peer) {
            Ok(Some(uid)) if uid == crate::sys::euid() => LocalUser::Owner,
            Ok(Some(uid)) => LocalUser::Other(uid),
            Ok(None) | Err(_) => LocalUser::Unknown,
        }
    }

    /// The lane its login attempts take at an account's gate.
    pub fn lane(&self) -> Lane {
        match self.local_user() {
            LocalUser::Owner => Lane::Owner,
            LocalUser::Other(uid) => Lane::LocalUser(uid),
            LocalUser::Unknown => Lane::Network(network(self.ip)),
        }
    }
}
