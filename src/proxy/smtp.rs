//! SMTP submission in the session driver: the pre-login machine on the
//! client side and the upstream SMTP client ([`SmtpUpstream`]) it logs in
//! with. Unlike IMAP and POP3, the hand-off comes at the client's first
//! transaction command, not at the login.

use super::session::SessionProtocol;
use crate::config::{Config, Limits};
use crate::smtp::preauth::{PreAuthConfig, SmtpPreAuth};
use crate::smtp::submission::Submission;
use crate::upstream::smtp::SmtpUpstream;

pub(crate) struct Smtp;

impl SessionProtocol for Smtp {
    type Machine = SmtpPreAuth;
    type Upstream = SmtpUpstream;

    const IDLE_BYE: &'static [u8] = b"421 4.4.2 mailproxy: idle for too long\r\n";
    const SHUTDOWN_BYE: &'static [u8] = b"421 4.3.0 mailproxy is shutting down\r\n";
    const UPSTREAM_QUIT: &'static [u8] = b"QUIT\r\n";

    /// With accounts that send through Graph, the EHLO before login also
    /// offers what their submission server honours (clients rarely ask
    /// again after AUTH), and the size it delivers.
    fn machine(config: &Config, starttls: bool) -> SmtpPreAuth {
        let graph = config.accounts.values().any(|a| a.graph.is_some());
        SmtpPreAuth::new(PreAuthConfig {
            starttls,
            hostname: "mailproxy".into(),
            max_line: config.limits.max_line,
            max_size: graph.then_some(config.limits.max_send_size),
            submission: graph,
        })
    }

    fn refusal(why: &str) -> String {
        format!("421 4.7.0 {why}\r\n")
    }

    /// After `AUTH`, a later `EHLO` lists what the submission server honours.
    fn graph_success(limits: &Limits) -> Option<Vec<String>> {
        Some(Submission::ehlo_keywords(limits.max_send_size))
    }
}
