//! `mailproxy add`: write (or extend) the config, then log in (through a
//! running `serve` after it re-read the config, else directly).

use std::io::{BufRead, IsTerminal};
use std::path::Path;

use anyhow::Result;

use crate::config::Config;
use crate::setup;

use super::args::AddArgs;
use super::login;
use super::pick::pick;
use super::runner::LoginOptions;

pub async fn run(path: &Path, a: AddArgs) -> Result<u8> {
    let (no_login, no_browser) = (a.no_login, a.no_browser);
    let added = setup::add(path, options(a), &mut ask, &mut std::io::stderr())?;
    let name = added.account;
    let mut next_steps = format!(
        "Next: `mailproxy service install` runs the proxy in the background (or run `mailproxy serve`).\n\
         Mail clients connect to IMAP 127.0.0.1:1143 and SMTP 127.0.0.1:1587 with the user name {name} and the local password."
    );
    if let Some(addr) = added.status {
        next_steps += &format!("\nWhile it runs, its status page is http://{addr}/ (`mailproxy open` opens it).");
    }
    if added.provider == setup::Provider::Password {
        eprintln!("{name} passes the client's own password through: nothing to authorise.\n{next_steps}");
        return Ok(0);
    }
    if no_login {
        eprintln!("Authorise it with `mailproxy login {name}`.\n{next_steps}");
        return Ok(0);
    }
    let config = Config::load(path)?;
    // A running serve must know the account before it can log it in.
    if pick(&config, None).await?.reload().await? {
        eprintln!("The running mailproxy serve reloaded its config.");
    }
    let how = LoginOptions {
        device: false,
        no_browser,
        timeout: 300,
    };
    match login::authorize(&config, &name, how).await? {
        0 => {}
        code => return Ok(code),
    }
    eprintln!("{next_steps}");
    Ok(0)
}

fn options(a: AddArgs) -> setup::AddOptions {
    setup::AddOptions {
        address: a.address,
        provider: a.provider,
        client_id: a.client_id,
        client_secret: a.client_secret,
        tenant: a.tenant,
        imap: a.imap,
        smtp: a.smtp,
        pop3: a.pop3,
        auth_url: a.auth_url,
        token_url: a.token_url,
        device_url: a.device_url,
        revoke_url: a.revoke_url,
        scopes: a.scopes,
        ca_file: a.ca_file,
    }
}

/// Asks what `setup` could not detect: the question on stderr, the answer
/// a line of stdin (`None` at its end).
fn ask(question: &str) -> Result<Option<String>, setup::SetupError> {
    eprint!("{question}: ");
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| setup::SetupError::Input(format!("reading the answer: {e}")))?;
    if !std::io::stdin().is_terminal() {
        eprintln!();
    }
    Ok((n > 0).then(|| line.trim().to_string()))
}
