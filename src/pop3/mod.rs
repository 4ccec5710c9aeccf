//! POP3 protocol code for the local (client-facing) side and the upstream
//! client side (RFC 1939, 2449 CAPA, 5034 AUTH, 2595 STLS, 3206 codes).
//! Pure parsers and sans-I/O state machines; no I/O here.
//!
//! * [`command`]: grammar for the AUTHORIZATION-state commands.
//! * [`preauth`]: the state machine that runs a local session until login.
//! * [`response`]: parsers for upstream status lines and CAPA lists.

pub mod command;
pub mod preauth;
pub mod response;
