//! Unit tests of the token lifecycle against a tiny local token endpoint.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const ACCOUNT: &str = "unit@example.org";

/// A token endpoint answering every POST with a fresh access token
/// (rotating the refresh token when `rotate`); counts requests.
async fn token_endpoint(rotate: bool) -> (String, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", l.local_addr().unwrap());
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { continue };
            let n = h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let refresh = if rotate {
                    format!(",\"refresh_token\":\"rt-{n}\"")
                } else {
                    String::new()
                };
                let body = format!("{{\"access_token\":\"at-{n}\",\"expires_in\":3600{refresh}}}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, hits)
}

fn setup(token_url: &str, store: &str) -> (tempfile::TempDir, Config) {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let text = format!(
        "[server]\nstate_dir = \"{}\"\ntoken_store = \"{store}\"\n[imap]\nlisten = \"127.0.0.1:0\"\n\
         [accounts.\"{ACCOUNT}\"]\nprovider = \"custom\"\nauth_url = \"http://127.0.0.1:1/auth\"\ntoken_url = \"{token_url}\"\n\
         client_id = \"cid\"\nscopes = [\"mail\"]\nimap = \"imap://127.0.0.1:1143\"\n",
        state.display()
    );
    let path = t.path().join("config.toml");
    std::fs::write(&path, &text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = Config::parse(&text, &path).unwrap();
    (t, config)
}

fn manager(config: &Config, store: TokenStore) -> Arc<TokenManager> {
    let vault = Vault::open(&config.state_dir).unwrap();
    let audit = Audit::direct(&config.state_dir.join("audit.log"));
    Arc::new(TokenManager::new(config, vault, store, audit))
}

fn authorize(config: &Config, store: TokenStore, pw: &str, refresh: &str) {
    let vault = Vault::open(&config.state_dir).unwrap();
    store_authorization(
        &vault,
        store,
        ACCOUNT,
        &Secret::new(pw),
        Some(&Secret::new(refresh)),
        vec![],
    )
    .unwrap();
}

async fn state_name(tm: &TokenManager, acct: &AccountTokens) -> String {
    tm.status(acct).await.state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_unlock_refresh_and_wrong_password() {
    let (url, hits) = token_endpoint(false).await;
    let (_t, config) = setup(&url, "file");
    authorize(&config, TokenStore::File, "pw", "rt-0");
    let tm = manager(&config, TokenStore::File);
    let acct = tm.get(ACCOUNT).unwrap();
    assert_eq!(state_name(&tm, &acct).await, "locked");
    assert!(matches!(
        tm.authenticate(&acct, &Secret::new("nope"), Lane::Owner).await,
        Err(AuthError::WrongPassword)
    ));
    tm.authenticate(&acct, &Secret::new("pw"), Lane::Owner).await.unwrap();
    let at = tm.access_token(&acct).await.unwrap();
    assert_eq!(at.expose(), "at-0");
    // Cached: no second request.
    assert_eq!(tm.access_token(&acct).await.unwrap().expose(), "at-0");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert_eq!(state_name(&tm, &acct).await, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_sets_a_password() {
    let (url, _) = token_endpoint(false).await;
    let (_t, config) = setup(&url, "file");
    let tm = manager(&config, TokenStore::File);
    let acct = tm.get(ACCOUNT).unwrap();
    assert!(matches!(
        tm.authenticate(&acct, &Secret::new("anything"), Lane::Owner).await,
        Err(AuthError::NotAuthorized(_))
    ));
    // An on-demand grant without a local password: still nobody gets in.
    {
        let mut slot = acct.slot.lock().await;
        slot.state = TokenState::Active(Active::new(Some(Secret::new("rt-x")), None, false));
    }
    assert!(matches!(
        tm.authenticate(&acct, &Secret::new("anything"), Lane::Owner).await,
        Err(AuthError::NoLocalPassword(_))
    ));
    // The owner sets it (the completion page's path); then it works.
    tm.set_password_after_grant(&acct, &Secret::new("owner pw"))
        .await
        .unwrap();
    tm.authenticate(&acct, &Secret::new("owner pw"), Lane::Owner)
        .await
        .unwrap();
    let rec = Vault::open(&config.state_dir).unwrap().load(ACCOUNT).unwrap().unwrap();
    assert!(rec.password.is_some() && rec.refresh_token.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_keeps_the_rotated_token_in_memory() {
    let (url, hits) = token_endpoint(true).await;
    let (_t, config) = setup(&url, "file");
    authorize(&config, TokenStore::File, "pw", "rt-start");
    let tm = manager(&config, TokenStore::File);
    let acct = tm.get(ACCOUNT).unwrap();
    tm.authenticate(&acct, &Secret::new("pw"), Lane::Owner).await.unwrap();
    // The write's temporary file cannot be created (a directory is in the
    // way; a read-only directory would not stop root).
    let blocker = Vault::open(&config.state_dir)
        .unwrap()
        .dir()
        .join(format!(".{ACCOUNT}.json.tmp{}", std::process::id()));
    std::fs::create_dir(&blocker).unwrap();
    let r = tm.access_token(&acct).await;
    assert!(matches!(r, Err(TokenError::Vault(_))), "the failed save is reported");
    {
        let slot = acct.slot.lock().await;
        let TokenState::Active(a) = &slot.state else {
            panic!("not active")
        };
        assert_eq!(
            a.refresh.as_ref().unwrap().expose(),
            "rt-0",
            "the rotated token is kept"
        );
        assert!(!a.sealed);
    }
    std::fs::remove_dir(&blocker).unwrap();
    // The next unlock saves it.
    tm.authenticate(&acct, &Secret::new("pw"), Lane::Owner).await.unwrap();
    let slot = acct.slot.lock().await;
    let TokenState::Active(a) = &slot.state else {
        panic!("not active")
    };
    assert!(a.sealed);
    let rec = slot.record.clone().unwrap();
    let key = slot.key.clone().unwrap();
    assert_eq!(
        crypto::open(&key, ACCOUNT, rec.refresh_token.as_ref().unwrap())
            .unwrap()
            .expose(),
        "rt-0"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

async fn twenty_first_logins(store: &str) {
    let (url, hits) = token_endpoint(false).await;
    let (_t, config) = setup(&url, store);
    let kind = if store == "keyring" {
        TokenStore::Keyring
    } else {
        TokenStore::File
    };
    authorize(&config, kind, "pw", "rt-0");
    for round in 0..2 {
        let tm = manager(&config, kind);
        let acct = tm.get(ACCOUNT).unwrap();
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (tm, acct) = (tm.clone(), acct.clone());
                tokio::spawn(async move {
                    tm.authenticate(&acct, &Secret::new("pw"), Lane::Owner).await?;
                    tm.access_token(&acct)
                        .await
                        .map_err(|e| AuthError::Vault(e.to_string()))?;
                    Ok::<_, AuthError>(())
                })
            })
            .collect();
        for t in tasks {
            t.await
                .unwrap()
                .unwrap_or_else(|e| panic!("{store} round {round}: {e}"));
        }
        assert_eq!(state_name(&tm, &acct).await, "ok");
        assert!(tm.kdf_status().runs <= 1, "{store}: {:?}", tm.kdf_status());
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2, "one refresh per start");
    if store == "keyring" {
        let _ = keystore::delete(ACCOUNT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_first_logins_file() {
    twenty_first_logins("file").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_during_refresh_is_not_undone() {
    let (url, _) = token_endpoint(true).await;
    let (_t, config) = setup(&url, "file");
    authorize(&config, TokenStore::File, "pw", "rt-start");
    let tm = manager(&config, TokenStore::File);
    let acct = tm.get(ACCOUNT).unwrap();
    tm.authenticate(&acct, &Secret::new("pw"), Lane::Owner).await.unwrap();
    // Another process erases the record after our last look at it.
    Vault::open(&config.state_dir).unwrap().erase(ACCOUNT).unwrap();
    {
        // Pretend the erase happened while the request was in flight.
        let mut slot = acct.slot.lock().await;
        let _ = tm.refresh_locked(&acct, &mut slot).await;
    }
    assert!(
        Vault::open(&config.state_dir).unwrap().load(ACCOUNT).unwrap().is_none(),
        "resurrected"
    );
    assert_eq!(state_name(&tm, &acct).await, "needs login");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintain_survives_and_plans_sanely() {
    let (url, _) = token_endpoint(false).await;
    let (_t, config) = setup(&url, "file");
    authorize(&config, TokenStore::File, "pw", "rt-0");
    let tm = manager(&config, TokenStore::File);
    let acct = tm.get(ACCOUNT).unwrap();
    // Locked: nothing to do for a while.
    let next = tm.maintain(&acct).await;
    assert!(next > SystemTime::now());
    tm.authenticate(&acct, &Secret::new("pw"), Lane::Owner).await.unwrap();
    // Active without an access token: refreshed in the background.
    let _ = tm.maintain(&acct).await;
    let t0 = std::time::Instant::now();
    // Done once the token is there and the upkeep task has let go.
    while tm.status(&acct).await.access_expires.is_none() || acct.upkeep.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Planned from the token's lifetime, never sooner than the floor.
    let next = tm.maintain(&acct).await;
    assert!(next >= later(SystemTime::now(), Duration::from_secs(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_first_logins_keyring() {
    twenty_first_logins("keyring").await;
}
