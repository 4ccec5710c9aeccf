//! IMAP in the session driver: the pre-login machine on the client side,
//! handed over at the login itself to the upstream IMAP client
//! ([`ImapUpstream`]).

use super::session::SessionProtocol;
use crate::config::Config;
use crate::imap::preauth::{ImapPreAuth, PreAuthConfig};
use crate::upstream::imap::ImapUpstream;

pub(crate) struct Imap;

impl SessionProtocol for Imap {
    type Machine = ImapPreAuth;
    type Upstream = ImapUpstream;

    const IDLE_BYE: &'static [u8] = b"* BYE Autologout; idle for too long before login\r\n";
    const SHUTDOWN_BYE: &'static [u8] = b"* BYE mailproxy is shutting down\r\n";
    /// IMAP hands off at the login itself: never an upstream to leave.
    const UPSTREAM_QUIT: &'static [u8] = b"";

    fn machine(config: &Config, starttls: bool) -> ImapPreAuth {
        let limits = &config.limits;
        ImapPreAuth::new(PreAuthConfig {
            starttls,
            max_line: limits.max_line,
            max_literal: limits.max_line,
        })
    }

    fn refusal(why: &str) -> String {
        format!("* BYE [UNAVAILABLE] {why}\r\n")
    }
}
