//! SMTP protocol code for the local (client-facing) side and the upstream
//! client side (RFC 5321, 4954 AUTH, 3207 STARTTLS, 2920 PIPELINING).
//! Pure parsers and sans-I/O state machines; no I/O here.
//!
//! * [`command`]: nom grammar for the commands answered before the hand-off.
//! * [`preauth`]: the state machine that runs a local session until the
//!   first mail transaction command.
//! * [`reply`]: parsers for upstream replies (multi-line, EHLO keywords,
//!   OAuth error challenges).
//! * [`submission`]: the submission server of accounts that send through
//!   Microsoft Graph (mailproxy receives the message itself), with
//!   [`transaction`] the grammar of its `MAIL`/`RCPT`/`DATA`/`BDAT`.

pub mod command;
pub mod preauth;
pub mod recipients;
pub mod reply;
pub mod submission;
pub mod transaction;
