//! Domain-wide accounts: `[accounts."@example.com"]` applies to every login
//! in that domain that has no entry of its own (explicit entries win). Each
//! mailbox is its own account (own local password, own vault record, own
//! token), made from the entry when it is looked up; only names that are
//! valid addresses in the domain get one.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Account, ConfigProblem};

/// `@example.com` names a domain entry.
pub fn is_domain_entry(name: &str) -> bool {
    name.starts_with('@')
}

/// Why `name` (`@example.com`) is not a usable domain entry name.
pub(super) fn check_entry_name(name: &str) -> Result<(), ConfigProblem> {
    let domain = name.trim_start_matches('@');
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() - domain.len() != 1 || domain.len() > 253 || !domain.split('.').all(label_ok) {
        return Err(ConfigProblem::NotDomainEntry { name: name.to_string() });
    }
    Ok(())
}

/// RFC 5322 dot-atom local parts (what mail clients send as user names);
/// quoted local parts are not accepted.
fn valid_local_part(local: &str) -> bool {
    const SPECIALS: &str = "!#$%&'*+-/=?^_`{|}~";
    !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || SPECIALS.contains(c))
}

/// The account of mailbox `login` from the domain entries (keyed by the
/// lower-cased domain), if `login` is a valid address in one of them. Its
/// name and upstream user name are the lower-cased address.
pub fn mailbox(domains: &BTreeMap<String, Arc<Account>>, login: &str) -> Option<Arc<Account>> {
    let login = login.to_lowercase();
    let (local, domain) = login.rsplit_once('@')?;
    let entry = domains.get(domain)?;
    if !valid_local_part(local) {
        return None;
    }
    Some(Arc::new(Account {
        name: login.clone(),
        username: login.clone(),
        domain_entry: Some(entry.name.clone()),
        ..(**entry).clone()
    }))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn config(extra: &str) -> super::super::Config {
        super::super::Config::parse(
            &format!(
                "[accounts.\"@Example.com\"]\nprovider = \"password\"\nimap = \"imaps://mail.example.com\"\n{extra}"
            ),
            Path::new("/c.toml"),
        )
        .unwrap()
    }

    #[test]
    fn explicit_entries_win_and_only_addresses_in_the_domain_match() {
        let c =
            config("[accounts.\"boss@example.com\"]\nprovider = \"password\"\nimap = \"imaps://other.example.com\"\n");
        let boss = c.lookup("Boss@example.com").unwrap();
        assert_eq!(boss.imap.as_ref().unwrap().host, "other.example.com");
        assert_eq!(boss.domain_entry, None);
        let dave = c.lookup("Dave.Smith+x@EXAMPLE.com").unwrap();
        assert_eq!(dave.name, "dave.smith+x@example.com");
        assert_eq!(dave.username, "dave.smith+x@example.com");
        assert_eq!(dave.domain_entry.as_deref(), Some("@Example.com"));
        assert_eq!(dave.imap.as_ref().unwrap().host, "mail.example.com");
        for no in [
            "@example.com",
            "dave@example.org",
            "dave@sub.example.com",
            "da ve@example.com",
            ".dave@example.com",
            "a..b@example.com",
            "\"q\"@example.com",
            "example.com",
            &format!("{}@example.com", "x".repeat(65)),
        ] {
            assert!(c.lookup(no).is_none(), "{no}");
        }
        // The entry itself is not an account anyone logs in to.
        assert!(c.account("@example.com").is_none());
    }

    #[test]
    fn bad_entry_names_and_keys_are_refused() {
        for bad in ["@", "@@example.com", "@exa mple.com", "@-x.com", "@a..b"] {
            let e = super::super::Config::parse(
                &format!("[accounts.\"{bad}\"]\nprovider = \"password\"\nimap = \"imaps://x\"\n"),
                Path::new("/c.toml"),
            )
            .unwrap_err();
            assert!(e.message.contains("domain entry"), "{bad}: {e}");
        }
        let e = super::super::Config::parse(
            "[accounts.\"@example.com\"]\nprovider = \"password\"\nimap = \"imaps://x\"\nusername = \"u\"\n",
            Path::new("/c.toml"),
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("accounts.\"@example.com\".username"), "{e}");
    }
}
