//! What the command itself knows of a running `serve`'s accounts: the
//! status file serve keeps in the state directory.

use crate::config::Config;
use crate::tokens::AccountStatus;

/// What a running `serve` last wrote, if it is still running.
pub(super) fn status_file(config: &Config) -> Vec<AccountStatus> {
    let Ok(text) = std::fs::read_to_string(config.state_dir.join("status.json")) else {
        return vec![];
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return vec![];
    };
    let pid = v["pid"].as_u64().unwrap_or(0);
    if pid == 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return vec![];
    }
    serde_json::from_value(v["accounts"].clone()).unwrap_or_default()
}
