//! The upstream side of each protocol, in one place: everything mailproxy
//! does as a client of the real mail server, up to the hand-off.
//!
//! [`conn`] is the connection before the hand-off (TCP, implicit TLS or
//! STARTTLS, framed reads, and every byte and time bound an upstream can
//! hit); [`imap`], [`smtp`] and [`pop3`] are the minimal clients that log in
//! over it, each an [`login::UpstreamLogin`]; [`login`] is the one policy
//! for what to do with their outcomes, including the retry with a fresh
//! token when the server rejects one.
//!
//! Two callers use it: the client sessions (`proxy`), which log in for a
//! client and then relay, and the grant identity check
//! (`tokens::identity`), which logs in once to see whom a new grant
//! belongs to. It knows nothing of either: a fresh token comes through a
//! [`login::RenewToken`] the caller passes in, so nothing here imports the
//! token lifecycle or the sessions.

pub(crate) mod conn;
pub(crate) mod graph;
pub(crate) mod imap;
pub(crate) mod login;
pub(crate) mod pop3;
pub(crate) mod smtp;
