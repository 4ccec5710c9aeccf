//! Upkeep: the background pass over an account (refresh before expiry, keep-alive, retry) and the account's status as the pages show it.

use tokio_util::sync::CancellationToken;

use super::*;

impl TokenManager {
    /// Background refresh of every unlocked account, driven by wall-clock
    /// expiry; also keeps `state_dir/status.json` current for `mailproxy accounts`.
    pub async fn upkeep(self: Arc<Self>, state_dir: std::path::PathBuf, shutdown: CancellationToken) {
        let tokens = self;
        let status_path = state_dir.join("status.json");
        let mut last_written = String::new();
        loop {
            let mut next = SystemTime::now() + Duration::from_secs(5);
            let mut rows = Vec::new();
            for acct in tokens.all() {
                next = next.min(tokens.maintain(&acct).await);
                rows.push(tokens.status(&acct).await);
            }
            let doc = serde_json::json!({ "pid": std::process::id(), "accounts": rows }).to_string();
            if doc != last_written {
                let (p, d) = (status_path.clone(), doc.clone());
                match tokio::task::spawn_blocking(move || crate::vault::write_atomic(&p, d.as_bytes())).await {
                    Ok(Ok(())) => last_written = doc,
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot write status.json"),
                    Err(_) => {}
                }
            }
            // Sleep in short steps judged by the wall clock: a machine that slept
            // through an expiry refreshes as soon as it wakes.
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .clamp(Duration::from_millis(50), Duration::from_secs(5));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = tokens.changed.notified() => {}
                _ = shutdown.cancelled() => {
                    let _ = std::fs::remove_file(&status_path);
                    return;
                }
            }
        }
    }

    /// Background upkeep of one account: refresh before expiry (and at least
    /// every 30 days), with backoff after transient failures. Returns when to
    /// look again. Never panics and never waits for a refresh: a due refresh
    /// runs in a task of its own, so a slow or failing (or panicking) account
    /// never holds up the others.
    pub async fn maintain(self: &Arc<Self>, acct: &Arc<AccountTokens>) -> SystemTime {
        let now = SystemTime::now();
        let soon = later(now, Duration::from_secs(1));
        if acct.upkeep.load(Ordering::SeqCst) {
            return soon;
        }
        let (me, a) = (self.clone(), acct.clone());
        let due = tokio::spawn(async move { me.upkeep_due(&a).await });
        let due = match tokio::time::timeout(Duration::from_secs(2), due).await {
            Ok(Ok(due)) => due,
            Ok(Err(e)) => {
                tracing::error!(account = %acct.account.name, error = %e, "background upkeep failed");
                return later(now, Duration::from_secs(60));
            }
            Err(_) => return soon, // the account is busy (a refresh at login)
        };
        let Some(due) = due else {
            return later(now, Duration::from_secs(60));
        };
        let floor = sync::lock(&acct.last_attempt).map_or(now, |t| later(t, MIN_REFRESH_INTERVAL));
        let due = due.max(floor);
        if due > SystemTime::now() {
            return due;
        }
        if acct.upkeep.swap(true, Ordering::SeqCst) {
            return soon;
        }
        *sync::lock(&acct.last_attempt) = Some(now);
        let (me, a) = (self.clone(), acct.clone());
        tokio::spawn(async move {
            let (me2, a2) = (me.clone(), a.clone());
            let work = tokio::spawn(async move {
                let mut slot = a2.slot.lock().await;
                // Still due now that the slot is ours? A login may have
                // refreshed meanwhile: one refresh per need, never two.
                let due = match &slot.state {
                    TokenState::Active(x) => x.access.as_ref().is_none_or(|t| t.renew_at() <= SystemTime::now()),
                    _ => false,
                };
                if due {
                    let r = me2.refresh_locked(&a2, &mut slot).await;
                    if let Err(e) = r {
                        tracing::info!(account = %a2.account.name, error = %e, "background refresh failed");
                    }
                }
            });
            if let Err(e) = work.await {
                tracing::error!(account = %a.account.name, error = %e, "background refresh failed unexpectedly");
            }
            a.upkeep.store(false, Ordering::SeqCst);
            me.changed.notify_one();
        });
        later(now, MIN_REFRESH_INTERVAL)
    }

    /// When the account's next background refresh is due; `None`: nothing to do.
    pub(super) async fn upkeep_due(&self, acct: &AccountTokens) -> Option<SystemTime> {
        if acct.account.token_from.is_some() {
            return None; // its grant's account is kept up
        }
        let mut slot = acct.slot.lock().await;
        self.sync(acct, &mut slot).await.ok()?;
        planned_refresh(&slot)
    }

    pub async fn status(&self, acct: &AccountTokens) -> AccountStatus {
        let mut slot = match tokio::time::timeout(Duration::from_millis(200), acct.slot.lock()).await {
            Ok(s) => s,
            Err(_) => {
                // Busy with a slow refresh: the last known status will do.
                if let Some(s) = sync::lock(&acct.last_status).clone() {
                    return s;
                }
                acct.slot.lock().await
            }
        };
        let _ = self.sync(acct, &mut slot).await;
        let has_password = slot.record.as_ref().is_some_and(|r| r.password.is_some());
        let mut device = None;
        let (state, detail, pending, expires) = match &slot.state {
            TokenState::NeedsLogin { why } => ("needs login", Some(why.clone()), None, None),
            TokenState::Authorizing(f) => {
                device = f.device.clone();
                (
                    "authorizing",
                    Some(describe_pending(&f.pending)),
                    Some(f.pending.clone()),
                    None,
                )
            }
            TokenState::Locked => (
                "locked",
                Some("waiting for the owner's local password".to_string()),
                None,
                None,
            ),
            TokenState::Active(a) => {
                let exp = a.access.as_ref().map(|x| unix(x.expires_at));
                match &a.last_error {
                    _ if !has_password => (
                        "needs login",
                        Some(format!(
                            "authorised; its owner sets the local password on the page shown at the end of the authorisation, or runs `mailproxy login {}`",
                            acct.account.name
                        )),
                        None,
                        exp,
                    ),
                    Some(e) if a.retry_at.is_some() => ("error", Some(e.clone()), None, exp),
                    _ if !a.sealed => ("ok", Some("the refresh token is not saved yet".into()), None, exp),
                    _ => ("ok", None, None, exp),
                }
            }
        };
        let sessions = self.sessions.of(&acct.account);
        let st = AccountStatus {
            account: acct.account.name.clone(),
            provider: acct.settings.provider.name().into(),
            flow: acct.settings.flow.name().into(),
            state: state.into(),
            detail,
            pending,
            device,
            access_expires: expires,
            last_refresh: slot.record.as_ref().and_then(|r| r.last_refresh),
            last_use: *sync::lock(&acct.last_use),
            scopes: slot.record.as_ref().map(|r| r.scopes.clone()).unwrap_or_default(),
            graph_expires: match &slot.state {
                TokenState::Active(a) => a.graph.as_ref().map(|x| unix(x.expires_at)),
                _ => None,
            },
            next_refresh: planned_refresh(&slot).filter(|_| has_password).map(unix),
            last_error: match &slot.state {
                TokenState::Active(a) => a.last_error.clone(),
                _ => None,
            },
            sessions: sessions.iter().map(|s| s.open).sum(),
            upstream_sessions: sessions,
            can_start: matches!(slot.state, TokenState::NeedsLogin { .. })
                && acct.settings.on_demand
                && match acct.settings.flow {
                    Flow::AuthorizationCode => true,
                    Flow::Device => has_password,
                    Flow::ClientCredentials | Flow::ServiceAccount => false,
                },
        };
        *sync::lock(&acct.last_status) = Some(st.clone());
        st
    }
}

/// When an active account's access token is refreshed next in the
/// background: before it expires, at least every 30 days, never before a
/// backoff ends. `None` when the account is not active.
pub(super) fn planned_refresh(slot: &Slot) -> Option<SystemTime> {
    let TokenState::Active(a) = &slot.state else {
        return None;
    };
    let due = match &a.access {
        Some(x) => {
            let keepalive = slot
                .record
                .as_ref()
                .and_then(|r| r.last_refresh)
                .map(state::keepalive_due);
            keepalive.map_or(x.renew_at(), |k| k.min(x.renew_at()))
        }
        None => SystemTime::now(),
    };
    Some(a.retry_at.map_or(due, |r| r.max(due)))
}
