//! `mailproxy login` done by the command itself: obtain the grant here,
//! check it is the account's, and store it with the local password.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::audit::{Audit, Entry};
use crate::cli::lookup::oauth_account;
use crate::cli::runner::LoginOptions;
use crate::cli::terminal::{open_browser, read_password};
use crate::cli::wait::{self, CancelOnCtrlC, Waiting};
use crate::config::{Account, Config};
use crate::control::grant::{self as obtain, Notice};
use crate::tokens::{grant, offline};
use crate::{oauth, store, sync, tls, vault::Vault};

/// `login` done by the command itself.
pub(super) async fn run(config: &Config, name: &str, how: LoginOptions) -> Result<()> {
    let (account, settings) = oauth_account(config, name)?;
    let (account, settings) = (&*account, &settings);
    if how.device {
        if let Some(why) = settings.device_flow_refusal(&account.name) {
            bail!(why);
        }
    }
    Vault::open(&config.state_dir)?;
    let records = store::open(config).await?;
    let store_key = store::store_key(config)?;
    let audit = Audit::direct(&config.audit_log);
    if let Some(owner) = &account.token_from {
        return shared(config, account, owner, &*records, store_key.as_ref(), &audit).await;
    }
    let password = read_password(&account.name, true)?;
    let http = oauth::http_client_for(config)?;
    let timeout = Duration::from_secs(how.timeout);
    // Until the grant is checked, Ctrl-C cancels and nothing is stored.
    let (a, n) = (audit.clone(), account.name.clone());
    let cancel = CancelOnCtrlC::arm(&account.name, move || {
        a.record(Entry::new(&n, "consent", "cancelled with Ctrl-C"));
    })?;
    let feedback = Feedback::new(&account.name, how.no_browser, timeout);
    let tell = |n: Notice| feedback.tell(n);
    let result = obtain::obtain(&http, account, settings, how.device, timeout, &tell).await;
    feedback.done();
    let tokens = match result {
        Ok(t) => t,
        Err(e) => {
            audit.record(Entry::new(&account.name, "consent", format!("failed: {e}")));
            return Err(e.into());
        }
    };
    // Is the grant really this account's? Nothing is stored otherwise.
    let tls = tls::ClientConfigs::default();
    let scopes = grant::accept(account, settings, &tokens, &tls, config.limits.provider_timeout, &audit).await?;
    drop(cancel);
    let (n, s, store) = (account.name.clone(), scopes.clone(), config.token_store);
    let (rec, where_) = tokio::task::spawn_blocking(move || {
        offline::authorization_record(store, store_key.as_ref(), &n, &password, tokens.refresh.as_ref(), s)
    })
    .await?;
    records.store(&rec).await?;
    audit.record(Entry::new(&account.name, "consent", "authorised").scopes(&scopes));
    eprintln!(
        "Authorised {} (scopes: {}); {where_}.\n\
         Configure your mail client with user name {} and the local password you chose.",
        account.name,
        scopes.join(" "),
        account.name
    );
    Ok(())
}

/// What the person sees while the command waits for the grant: the
/// notices on stderr, a spinner while it waits for them.
struct Feedback {
    who: String,
    no_browser: bool,
    timeout: Duration,
    spinner: Mutex<Option<Waiting>>,
}

impl Feedback {
    fn new(who: &str, no_browser: bool, timeout: Duration) -> Feedback {
        Feedback {
            who: who.to_string(),
            no_browser,
            timeout,
            spinner: Mutex::new(None),
        }
    }

    fn tell(&self, n: Notice) {
        let mut spin = sync::lock(&self.spinner);
        match n {
            Notice::Open(url) => {
                if !self.no_browser {
                    open_browser(&url);
                }
            }
            Notice::Waiting(what) => *spin = Some(Waiting::start(what, self.timeout)),
            Notice::Device { uri, code, complete } => {
                eprintln!(
                    "{}",
                    wait::device_instructions(&self.who, &uri, &code, complete.as_deref())
                );
            }
            other => {
                let text = other.text(&self.who).unwrap_or_default();
                match spin.as_ref() {
                    Some(w) => w.say(&text),
                    None => eprintln!("{text}"),
                }
            }
        }
    }

    /// The wait is over: the spinner goes.
    fn done(&self) {
        drop(sync::lock(&self.spinner).take());
    }
}

/// `mailproxy login` of a shared mailbox (`token_from`): only its own local
/// password is set; the grant, checked when its owner was authorised, is
/// the other account's.
async fn shared(
    config: &Config,
    account: &Account,
    owner: &str,
    records: &dyn store::RecordStore,
    store_key: Option<&crate::crypto::VaultKey>,
    audit: &Audit,
) -> Result<()> {
    let owner_name = config
        .lookup(owner)
        .map(|a| a.name.clone())
        .unwrap_or_else(|| owner.into());
    if records.load(&owner_name).await?.is_none() {
        bail!(
            "{} uses the grant of {owner_name}, which is not authorised yet; run `mailproxy login {owner_name}` first",
            account.name
        );
    }
    let password = read_password(&account.name, true)?;
    let (n, store, key) = (account.name.clone(), config.token_store, store_key.cloned());
    let (rec, _) = tokio::task::spawn_blocking(move || {
        offline::authorization_record(store, key.as_ref(), &n, &password, None, Vec::new())
    })
    .await?;
    records.store(&rec).await?;
    audit.record(Entry::new(
        &account.name,
        "password_set",
        format!("set with mailproxy login; uses the grant of {owner_name}"),
    ));
    eprintln!(
        "{} uses the grant of {owner_name} and logs in upstream as {}.\n\
         Configure your mail client with user name {} and the local password you chose.",
        account.name, account.username, account.name
    );
    Ok(())
}
