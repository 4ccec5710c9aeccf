//! POP3 in the session driver: the pre-login machine on the client side,
//! handed over at the login itself to the upstream POP3 client
//! ([`Pop3Upstream`]).

use super::session::SessionProtocol;
use crate::config::Config;
use crate::pop3::preauth::{Pop3PreAuth, PreAuthConfig};
use crate::upstream::pop3::Pop3Upstream;

pub(crate) struct Pop3;

impl SessionProtocol for Pop3 {
    type Machine = Pop3PreAuth;
    type Upstream = Pop3Upstream;

    const IDLE_BYE: &'static [u8] = b"-ERR [SYS/TEMP] idle for too long before login\r\n";
    const SHUTDOWN_BYE: &'static [u8] = b"-ERR [SYS/TEMP] mailproxy is shutting down\r\n";
    /// POP3 hands off at the login itself: never an upstream to leave.
    const UPSTREAM_QUIT: &'static [u8] = b"";

    fn machine(config: &Config, starttls: bool) -> Pop3PreAuth {
        let limits = &config.limits;
        Pop3PreAuth::new(PreAuthConfig {
            starttls,
            max_line: limits.max_line,
        })
    }

    fn refusal(why: &str) -> String {
        format!("-ERR [SYS/TEMP] {why}\r\n")
    }
}
