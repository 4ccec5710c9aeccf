//! Who does a command's work: the running `serve` when it does that work
//! ([`Live`]), otherwise the command itself ([`Offline`]).

use anyhow::Result;

use crate::config::Config;

use super::live::Live;
use super::offline::Offline;
use super::runner::Runner;

/// The running `serve` when one runs with this config's state directory
/// and does the work for `account` (`None`: for every account); else the
/// command itself.
pub(super) async fn pick<'a>(config: &'a Config, account: Option<&str>) -> Result<Box<dyn Runner + 'a>> {
    if account.is_none_or(|a| serve_handles(config, a)) {
        if let Some(live) = Live::connect(&config.state_dir).await? {
            return Ok(Box::new(live));
        }
    }
    Ok(offline(config))
}

/// The command itself, whether a `serve` runs or not.
pub(super) fn offline(config: &Config) -> Box<dyn Runner + '_> {
    Box::new(Offline::new(config))
}

/// Whether a running `serve` does this command's work itself. A mailbox of
/// a domain entry (taken up by serve only once it has a record) and an
/// account that borrows another's grant (`token_from`: only its local
/// password is set) are done by the command itself; a running serve picks
/// the new record up at the account's next use.
fn serve_handles(config: &Config, account: &str) -> bool {
    config.account(account).is_some_and(|a| a.token_from.is_none())
}
