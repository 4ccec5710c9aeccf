//! IMAP protocol code for the local (client-facing) side and the upstream
//! client side. Pure parsers and sans-I/O state machines; no I/O here.
//!
//! * [`framing`]: split the client byte stream into complete commands
//!   (lines and `{n}`/`{n+}` literals) with hard size limits.
//! * [`command`]: nom grammar for the pre-authentication commands.
//! * [`preauth`]: the state machine that runs a local session until login.
//! * [`response`]: parsers for upstream server responses and the hand-off helper.

// A protocol toolkit: not every helper is used by every build of the binary.

pub mod command;
pub mod framing;
pub mod preauth;
pub mod response;
