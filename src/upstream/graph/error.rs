//! What Graph answered, as SMTP replies with a sentence: a client shows
//! the reply to a person, and keeps and retries a message that got a `4xx`.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("Microsoft Graph is throttling this mailbox; try again in {secs} s")]
    Throttled { secs: u64 },
    #[error("Microsoft Graph refused the access token of {account} even after a refresh: {why}")]
    Unauthorized { account: String, why: String },
    #[error(
        "Microsoft Graph refused to send as {mailbox}: the grant lacks the Mail.Send permission ({why}). \
         Run `mailproxy login {account}` and accept Mail.Send, or have an administrator grant Mail.Send \
         (an application permission for client_credentials) under App registrations > API permissions, \
         then send again"
    )]
    Consent {
        account: String,
        mailbox: String,
        why: String,
    },
    #[error(
        "Microsoft Graph refused to send as {mailbox}: the signed-in user may not send as it ({why}). \
         An Exchange administrator grants it with Add-RecipientPermission -Identity {mailbox} -Trustee USER -AccessRights SendAs"
    )]
    SendAs { mailbox: String, why: String },
    #[error("Microsoft Graph will not take a message this large: {0}")]
    TooLarge(String),
    #[error("Microsoft Graph rejected the recipient {address}: {why}")]
    Recipient { address: String, why: String },
    #[error("Microsoft Graph refused the message ({status} {code}): {why}")]
    Refused { status: u16, code: String, why: String },
    #[error("the message cannot be sent: {0}")]
    Malformed(String),
    #[error("Microsoft Graph failed ({status}): {why}; try again later")]
    Unavailable { status: u16, why: String },
    #[error("cannot reach Microsoft Graph: {0}; try again later")]
    Network(String),
    #[error("no access token for Microsoft Graph: {why}")]
    Token { why: String, temporary: bool },
    #[error("the message could not be spooled: {0}")]
    Spool(#[from] std::io::Error),
}

impl GraphError {
    /// The SMTP reply line (without CRLF) a client gets for this failure.
    pub fn reply(&self) -> String {
        let code = match self {
            GraphError::Throttled { .. } => "451 4.7.0",
            GraphError::Unauthorized { .. } => "535 5.7.8",
            GraphError::Consent { .. } | GraphError::SendAs { .. } => "550 5.7.1",
            GraphError::TooLarge(_) => "552 5.3.4",
            GraphError::Recipient { .. } => "550 5.1.1",
            GraphError::Refused { .. } | GraphError::Malformed(_) => "554 5.6.0",
            GraphError::Unavailable { .. } | GraphError::Network(_) => "451 4.4.1",
            GraphError::Token { temporary: true, .. } => "451 4.7.0",
            GraphError::Token { .. } => "535 5.7.8",
            GraphError::Spool(_) => "451 4.3.0",
        };
        format!("{code} {}", crate::text::one_line(&self.to_string()))
    }

    /// A short word for logs, metrics and the audit trail.
    pub fn kind(&self) -> &'static str {
        match self {
            GraphError::Throttled { .. } => "throttled",
            GraphError::Unauthorized { .. } => "unauthorized",
            GraphError::Consent { .. } => "consent",
            GraphError::SendAs { .. } => "send_as",
            GraphError::TooLarge(_) => "too_large",
            GraphError::Recipient { .. } => "recipient",
            GraphError::Refused { .. } => "refused",
            GraphError::Malformed(_) => "malformed",
            GraphError::Unavailable { .. } => "unavailable",
            GraphError::Network(_) => "network",
            GraphError::Token { .. } => "token",
            GraphError::Spool(_) => "spool",
        }
    }
}

#[derive(Deserialize, Default)]
struct Body {
    #[serde(default)]
    error: Detail,
}

#[derive(Deserialize, Default)]
struct Detail {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Who is sending, for the sentences.
pub struct Who<'a> {
    pub account: &'a str,
    pub mailbox: &'a str,
    pub recipients: &'a [String],
}

/// A non-success answer of Graph (`retry_after`: its header, in seconds).
pub fn decode(status: u16, retry_after: Option<u64>, body: &[u8], who: &Who<'_>) -> GraphError {
    let Body { error } = serde_json::from_slice(body).unwrap_or_default();
    let why = if error.message.is_empty() {
        format!("HTTP {status}")
    } else {
        crate::text::one_line(&error.message).chars().take(300).collect()
    };
    match status {
        429 | 503 => GraphError::Throttled {
            secs: retry_after.unwrap_or(30).clamp(1, 3600),
        },
        401 => GraphError::Unauthorized {
            account: who.account.into(),
            why,
        },
        403 if error.code == "ErrorSendAsDenied" => GraphError::SendAs {
            mailbox: who.mailbox.into(),
            why,
        },
        403 => GraphError::Consent {
            account: who.account.into(),
            mailbox: who.mailbox.into(),
            why: if error.code.is_empty() {
                why
            } else {
                format!("{}: {why}", error.code)
            },
        },
        413 => GraphError::TooLarge(why),
        400..=499 => match named_recipient(&error, who.recipients) {
            Some(address) => GraphError::Recipient { address, why },
            None => GraphError::Refused {
                status,
                code: error.code,
                why,
            },
        },
        _ => GraphError::Unavailable { status, why },
    }
}

/// The envelope recipient Graph's error is about, if it names one.
fn named_recipient(e: &Detail, rcpt: &[String]) -> Option<String> {
    let text = e.message.to_lowercase();
    let about_recipients = e.code.to_lowercase().contains("recipient") || text.contains("recipient");
    let named = rcpt.iter().find(|r| text.contains(&r.to_lowercase())).cloned();
    match (about_recipients, named) {
        (_, Some(r)) => Some(r),
        (true, None) if rcpt.len() == 1 => rcpt.first().cloned(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who() -> Who<'static> {
        Who {
            account: "me@x",
            mailbox: "me@x",
            recipients: &[],
        }
    }

    #[test]
    fn graph_answers_become_smtp_replies() {
        let w = who();
        assert_eq!(
            decode(429, Some(7), b"", &w).reply(),
            "451 4.7.0 Microsoft Graph is throttling this mailbox; try again in 7 s"
        );
        assert!(decode(503, None, b"", &w).reply().ends_with("try again in 30 s"));
        let denied = br#"{"error":{"code":"ErrorAccessDenied","message":"Access is denied."}}"#;
        let r = decode(403, None, denied, &w).reply();
        assert!(
            r.starts_with("550 5.7.1 ") && r.contains("Mail.Send") && r.contains("mailproxy login me@x"),
            "{r}"
        );
        assert!(decode(413, None, b"", &w).reply().starts_with("552 5.3.4 "));
        let send_as = br#"{"error":{"code":"ErrorSendAsDenied","message":"no"}}"#;
        let r = decode(403, None, send_as, &w).reply();
        assert!(
            r.starts_with("550 5.7.1 ") && r.contains("SendAs") && !r.contains("Mail.Send"),
            "{r}"
        );
        assert!(decode(401, None, b"", &w).reply().starts_with("535 "));
        assert!(decode(500, None, b"", &w).reply().starts_with("451 4.4.1 "));
    }

    #[test]
    fn a_rejected_recipient_is_named() {
        let rcpt = ["a@y".to_string(), "Bad@Y".to_string()];
        let w = Who {
            recipients: &rcpt,
            ..who()
        };
        let body = br#"{"error":{"code":"ErrorInvalidRecipients","message":"The recipient bad@y is not valid."}}"#;
        let r = decode(400, None, body, &w).reply();
        assert!(
            r.starts_with("550 5.1.1 Microsoft Graph rejected the recipient Bad@Y"),
            "{r}"
        );
        let other = br#"{"error":{"code":"ErrorMimeContentInvalid","message":"bad MIME"}}"#;
        assert!(decode(400, None, other, &w).reply().starts_with("554 "));
    }
}
