//! What `mailproxy check` finds for one account ([`CheckOutcome`]): the
//! answer of [`super::TokenManager::check_now`], sent over the control
//! socket as it is.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CheckOutcome {
    /// Refreshed; the new access token is valid this many seconds.
    Ok { valid_for: u64 },
    /// No usable authorisation: `mailproxy login` is needed.
    NeedsLogin { why: String },
    /// A person must act (the provider refused, the account is locked).
    NeedsAction { why: String },
    /// Worth trying again later (network trouble, 5xx, a vault error).
    Temporary { why: String },
}

impl CheckOutcome {
    /// The exit status it stands for: 0 ok, 1 a person must act, 2 temporary.
    pub fn code(&self) -> u8 {
        match self {
            CheckOutcome::Ok { .. } => 0,
            CheckOutcome::NeedsLogin { .. } | CheckOutcome::NeedsAction { .. } => 1,
            CheckOutcome::Temporary { .. } => 2,
        }
    }
}
