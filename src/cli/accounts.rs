//! `mailproxy accounts`: every account with its provider, flow, state,
//! token expiry, last refresh and use, scopes, and (while serve runs) the
//! upstream sessions open by protocol with their limit.

use anyhow::Result;

use crate::config::{Account, Config, OAuthSettings};
use crate::control;
use crate::store;
use crate::tokens::{now_unix, AccountStatus, ProtocolSessions};
use crate::vault::{AccountRecord, StoreKind};

use super::lookup::known_accounts;
use super::pick::pick;

/// One line of the table: its nine columns.
type Row = [String; 9];

pub async fn run(config: &Config) -> Result<u8> {
    let live = pick(config, None).await?.status().await?;
    table(config, live).await.map(|()| 0)
}

fn when(t: Option<u64>) -> String {
    let Some(t) = t else { return "-".into() };
    let now = now_unix();
    if t > now {
        format!("in {}", control::human_secs(t - now))
    } else {
        format!("{} ago", control::human_secs(now - t))
    }
}

/// Prints the table: the domain entries, then each account with what
/// `live` (the running serve) or its record says of it.
async fn table(config: &Config, live: Vec<AccountStatus>) -> Result<()> {
    let records = store::open(config).await?;
    let serving = !live.is_empty();
    let mut rows = vec![[
        "ACCOUNT",
        "PROVIDER",
        "FLOW",
        "STATE",
        "TOKEN EXPIRES",
        "LAST REFRESH",
        "LAST USE",
        "SCOPES",
        "SESSIONS",
    ]
    .map(String::from)];
    rows.extend(domain_rows(config));
    for a in known_accounts(config, &*records).iter() {
        let Some(s) = a.oauth() else {
            rows.push([&a.name, "password", "-", "passthrough", "-", "-", "-", "-", "-"].map(String::from));
            continue;
        };
        let rec: Option<AccountRecord> = records.load(&a.name).await?;
        let st = live.iter().find(|r| r.account.eq_ignore_ascii_case(&a.name));
        rows.push(account_row(a, s, rec.as_ref(), st, serving));
    }
    print_rows(rows);
    Ok(())
}

fn domain_rows(config: &Config) -> impl Iterator<Item = Row> + '_ {
    config.domains.values().map(|d| {
        let (provider, flow) = match d.oauth() {
            Some(s) => (s.provider.name(), s.flow.name()),
            None => ("password", "-"),
        };
        [
            d.name.clone(),
            provider.into(),
            flow.into(),
            format!(
                "domain entry: every address @{} without an entry of its own",
                d.name.trim_start_matches('@')
            ),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]
    })
}

/// An OAuth account's line: its live state `st` while serve runs, else
/// what its record `rec` says.
fn account_row(
    a: &Account,
    s: &OAuthSettings,
    rec: Option<&AccountRecord>,
    st: Option<&AccountStatus>,
    serving: bool,
) -> Row {
    let state = match (st, rec) {
        (Some(st), _) => match &st.detail {
            Some(d) if st.state != "ok" => format!("{}: {d}", st.state),
            _ => st.state.clone(),
        },
        (None, None) => format!("needs login: run `mailproxy login {}`", a.name),
        (None, Some(r)) if r.token_store == Some(StoreKind::Keyring) => "ok (token in the OS keyring)".into(),
        (None, Some(r)) if r.token_store == Some(StoreKind::StoreKey) => "ok (sealed with the store key)".into(),
        (None, Some(r)) if r.refresh_token.is_some() => if serving {
            "locked"
        } else {
            "locked (serve not running)"
        }
        .into(),
        (None, Some(_)) if a.token_from.is_some() => {
            format!("ok (uses the grant of {})", a.token_from.as_deref().unwrap_or_default())
        }
        (None, Some(_)) if s.flow.app_only() => "ok".into(),
        (None, Some(_)) => format!("needs login: run `mailproxy login {}`", a.name),
    };
    let scopes = rec
        .map(|r| r.scopes.join(" "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".into());
    [
        a.name.clone(),
        s.provider.name().into(),
        s.flow.name().into(),
        state,
        match st.and_then(|s| s.graph_expires) {
            Some(g) => format!("{} (Graph {})", when(st.and_then(|s| s.access_expires)), when(Some(g))),
            None => when(st.and_then(|s| s.access_expires)),
        },
        when(st.and_then(|s| s.last_refresh).or(rec.and_then(|r| r.last_refresh))),
        when(st.and_then(|s| s.last_use)),
        scopes,
        st.map(|s| ProtocolSessions::describe_all(&s.upstream_sessions))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into()),
    ]
}

/// The rows in aligned columns, two spaces apart.
fn print_rows(rows: Vec<Row>) {
    let widths: Vec<usize> = (0..9)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
