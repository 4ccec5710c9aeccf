//! `mailproxy token`: a valid access token on stdout for the owner's own
//! OAuth clients (msmtp `passwordeval`, mbsync `PassCmd`, curl
//! `--oauth2-bearer`), so mailproxy is their token manager; `--json` adds
//! its expiry, scopes and account. The exit status follows `check`: 0 ok,
//! 1 a person must act, 2 temporary, with the sentence on stderr.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::config::Config;
use crate::tokens::{self, now_unix, Handed, REFRESH_MARGIN};

use super::args::Resource;
use super::lookup::oauth_account;
use super::pick::pick;
use super::runner::Handout;

/// The life a handed-out token has left at least: what the proxy's own
/// logins want, so a client's session does not outlive its token.
pub const MIN_LIFE: Duration = REFRESH_MARGIN;

pub async fn run(config: &Config, account: &str, resource: Resource, json: bool) -> Result<u8> {
    let (acct, _) = oauth_account(config, account)?;
    let resource = match resource {
        Resource::Mail => tokens::Resource::Mail,
        Resource::Graph if acct.graph.is_some() => tokens::Resource::Graph,
        Resource::Graph => {
            eprintln!(
                "{}: this account does not send through Microsoft Graph, so mailproxy has no Graph token for it; use --resource mail",
                acct.name
            );
            return Ok(1);
        }
    };
    // An account that borrows another's grant uses that account's token.
    let grant = acct.token_from.clone().unwrap_or_else(|| acct.name.clone());
    match pick(config, Some(&grant))
        .await?
        .token(&grant, resource, MIN_LIFE)
        .await?
    {
        Handout::Failed(code) => Ok(code),
        Handout::Token(mut t) => {
            t.account.clone_from(&acct.name);
            print(&t, json)?;
            Ok(0)
        }
    }
}

/// What `--json` prints.
#[derive(Serialize)]
struct Printed<'a> {
    account: &'a str,
    access_token: &'a str,
    token_type: &'static str,
    /// RFC 3339, UTC.
    expires_at: String,
    expires_at_unix: u64,
    expires_in: u64,
    scopes: &'a [String],
}

/// The one place the token is exposed: written to stdout, the buffer wiped.
fn print(t: &Handed, json: bool) -> Result<()> {
    let text = if json {
        let p = Printed {
            account: &t.account,
            access_token: t.token.expose(),
            token_type: "Bearer",
            expires_at: rfc3339(t.expires_at),
            expires_at_unix: t.expires_at,
            expires_in: t.expires_at.saturating_sub(now_unix()),
            scopes: &t.scopes,
        };
        Zeroizing::new(serde_json::to_string(&p)? + "\n")
    } else {
        Zeroizing::new(format!("{}\n", t.token.expose()))
    };
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// `2024-01-01T12:34:56Z` from unix seconds.
fn rfc3339(t: u64) -> String {
    let (y, m, d, h, min, s) = crate::text::civil_utc(t);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{min:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_704_112_496), "2024-01-01T12:34:56Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
    }
}
