//! `mailproxy token` done by the command itself: the refresh `check` does
//! (a rotated refresh token saved first), its access token handed out.
//! Without `serve` no access token is kept, so every call refreshes and
//! the token has its full life.

use super::Local;
use anyhow::Result;

use crate::audit::Entry;
use crate::cli::lookup::oauth_account;
use crate::cli::runner::Handout;
use crate::config::Config;
use crate::tokens::offline::Checked;
use crate::tokens::{Handed, Resource};

use super::check::failure_code;

/// `token` done by the command itself; the sentence of a failure goes to
/// stderr, stdout stays the token's.
pub(super) async fn run(config: &Config, name: &str, resource: Resource) -> Result<Handout> {
    let (account, settings) = oauth_account(config, name)?;
    let name = account.name.clone();
    let local = Local::open(config).await?;
    let audit = &local.audit;
    let checked = local.check(&name, &account.username, &settings, resource).await?;
    Ok(match checked {
        Checked::NeedsLogin(why) => {
            eprintln!("{name}: needs login: {why}");
            Handout::Failed(1)
        }
        Checked::Failed(e) => {
            audit.record(Entry::new(&name, "refresh_failed", e.to_string()));
            let code = failure_code(&e);
            let what = if code == 1 {
                "needs action"
            } else {
                "temporarily failing"
            };
            eprintln!("{name}: {what}: {e}");
            Handout::Failed(code)
        }
        Checked::Refreshed(t) => {
            let asked = match (resource, &settings.graph_scopes) {
                (Resource::Graph, Some(g)) => g,
                _ => &settings.scopes,
            };
            let handed = Handed::from_tokens(&name, &t, asked);
            let to = format!("token handed out to uid {}", crate::sys::euid());
            audit.record(Entry::new(&name, "token_handed_out", to).scopes(&handed.scopes));
            Handout::Token(handed)
        }
    })
}
