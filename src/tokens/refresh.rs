//! Refreshing: one refresh per account at a time, the provider's answer kept (rotated tokens saved first) or turned into what a person must do.

use super::*;

/// The account's access token if it is still fresh, `None` when an
/// active account needs a refresh, or why no token can be had at all.
pub(super) fn fresh_token(state: &TokenState, name: &str) -> Result<Option<Secret>, TokenError> {
    fresh_token_for(state, name, Resource::Mail)
}

/// [`fresh_token`] for the token of resource `r`.
pub(super) fn fresh_token_for(state: &TokenState, name: &str, r: Resource) -> Result<Option<Secret>, TokenError> {
    match state {
        TokenState::Active(a) => Ok(a.access_of(r).filter(|x| x.fresh()).map(|x| x.token.clone())),
        TokenState::NeedsLogin { why } => Err(TokenError::NeedsLogin {
            account: name.to_string(),
            why: why.clone(),
        }),
        TokenState::Authorizing(f) => Err(TokenError::Pending {
            account: name.to_string(),
            pending: f.pending.clone(),
        }),
        TokenState::Locked => Err(TokenError::Locked(name.to_string())),
    }
}

/// A refresh's answer on its way into the account's state.
pub(super) struct Refreshed {
    pub(super) tokens: Tokens,
    /// The provider's new refresh token, when it differs from the old one.
    pub(super) rotated: Option<Secret>,
    pub(super) next: Active,
    /// A rotated token that could not be saved.
    pub(super) failure: Option<TokenError>,
}

impl Refreshed {
    pub(super) fn new(before: &Active, tokens: Tokens) -> Refreshed {
        Self::new_for(before, tokens, Resource::Mail)
    }

    /// A refresh of resource `r`'s token; the other resources' tokens stay.
    pub(super) fn new_for(before: &Active, tokens: Tokens, r: Resource) -> Refreshed {
        let rotated = tokens.refresh.clone().filter(|r| Some(r) != before.refresh.as_ref());
        let mut next = Active::new(
            rotated.clone().or(before.refresh.clone()),
            before.access.clone(),
            before.sealed,
        );
        next.graph = before.graph.clone();
        next.set_access(r, Some(Access::new(&tokens)));
        Refreshed {
            tokens,
            rotated,
            next,
            failure: None,
        }
    }

    /// The new record could not be saved. After a rotation the stored token
    /// is dead: the new one is kept in memory, to be saved later, and the
    /// refresh reports the failure.
    pub(super) fn save_failed(&mut self, account: &str, e: impl std::fmt::Display) {
        tracing::error!(account = %account, error = %e, "cannot save the account record after a refresh");
        if self.rotated.is_some() {
            self.next.sealed = false;
            self.failure = Some(TokenError::Vault(e.to_string()));
        }
    }
}

/// How one refresh ended, on either store; [`TokenManager::conclude`]
/// turns it into the account's state and the caller's answer.
pub(super) enum Outcome {
    /// New tokens: saved, or kept in memory when the save failed.
    Renewed(Refreshed),
    /// The provider refused or could not answer.
    Refused { before: Active, error: OAuthError },
    /// `revoke`, a new `login` or another command changed the account
    /// meanwhile; what is stored now counts.
    ChangedMeanwhile,
    /// Another instance refreshed meanwhile (shared store): its token,
    /// already in the account's state.
    Fresh(Secret),
}

/// A refresh whose save lost: `revoke`, a new `login` or another command
/// changed the account meanwhile, and what is stored now (already in `slot`)
/// counts.
pub(super) fn changed_meanwhile(slot: &Slot, account: String) -> TokenError {
    match &slot.state {
        TokenState::Active(_) => TokenError::Vault("the account changed meanwhile; log in again".into()),
        _ => TokenError::NeedsLogin {
            account,
            why: "it was changed by another mailproxy command meanwhile".into(),
        },
    }
}

/// `on_reauth_needed`: run through the shell with the account in the
/// environment; never waited for on the async workers.
pub(super) fn run_hook(cmd: &str, account: &str, why: &str) {
    let spawned = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .env("MAILPROXY_ACCOUNT", account)
        .env("MAILPROXY_REASON", why)
        .stdin(std::process::Stdio::null())
        .spawn();
    match spawned {
        Ok(mut child) => {
            let account = account.to_string();
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(st) if st.success() => {}
                    Ok(st) => tracing::warn!(account = %account, status = %st, "on_reauth_needed hook failed"),
                    Err(e) => tracing::warn!(account = %account, error = %e, "on_reauth_needed hook failed"),
                }
            });
        }
        Err(e) => tracing::warn!(account = %account, error = %e, "cannot run the on_reauth_needed hook"),
    }
}

impl TokenManager {
    /// The account whose grant `acct` uses: itself, or its `token_from`.
    pub fn grant_of(&self, acct: &Arc<AccountTokens>) -> Result<Arc<AccountTokens>, TokenError> {
        match &acct.account.token_from {
            None => Ok(acct.clone()),
            Some(owner) => self.get(owner).ok_or_else(|| TokenError::NeedsLogin {
                account: owner.clone(),
                why: format!("{} uses its grant, but it is not in the config", acct.account.name),
            }),
        }
    }

    /// An access token with enough life left, refreshing first when needed
    /// (one refresh per account at a time). A `token_from` account gets its
    /// grant owner's token.
    pub async fn access_token(&self, acct: &AccountTokens) -> Result<Secret, TokenError> {
        self.access_token_for(acct, Resource::Mail).await
    }

    /// [`TokenManager::access_token`] for resource `r` (Graph for accounts
    /// that send through it): the same grant, a token of another audience.
    pub async fn access_token_for(&self, acct: &AccountTokens, r: Resource) -> Result<Secret, TokenError> {
        if let Some(owner) = &acct.account.token_from {
            let Some(grant) = self.get(owner) else {
                return Err(TokenError::NeedsLogin {
                    account: owner.clone(),
                    why: format!("{} uses its grant, but it is not in the config", acct.account.name),
                });
            };
            return self.own_access_token(&grant, r).await;
        }
        self.own_access_token(acct, r).await
    }

    pub(super) async fn own_access_token(&self, acct: &AccountTokens, r: Resource) -> Result<Secret, TokenError> {
        let r = r.effective(&acct.settings);
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        if let Some(token) = fresh_token_for(&slot.state, &acct.account.name, r)? {
            return Ok(token);
        }
        self.refresh_resource_locked(acct, &mut slot, r).await
    }

    /// Refreshes now. Slot locked; state is Active.
    pub(super) async fn refresh_locked(&self, acct: &AccountTokens, slot: &mut Slot) -> Result<Secret, TokenError> {
        self.refresh_resource_locked(acct, slot, Resource::Mail).await
    }

    /// Refreshes resource `r`'s token now. Slot locked; state is Active.
    /// The shared store shares the mail token between instances; a Graph
    /// token stays with the instance that asked for it.
    pub(super) async fn refresh_resource_locked(
        &self,
        acct: &AccountTokens,
        slot: &mut Slot,
        r: Resource,
    ) -> Result<Secret, TokenError> {
        let outcome = if self.records.shared() && r == Resource::Mail {
            self.refresh_shared(acct, slot).await?
        } else {
            self.refresh_own(acct, slot, r).await?
        };
        self.conclude(acct, slot, outcome)
    }

    /// A refresh on the local stores (file, keyring). Slot locked.
    async fn refresh_own(&self, acct: &AccountTokens, slot: &mut Slot, r: Resource) -> Result<Outcome, TokenError> {
        let name = acct.account.name.clone();
        let TokenState::Active(before) = &slot.state else {
            return Err(TokenError::Locked(name));
        };
        let before = before.clone();
        let t = match self.ask_provider_for(acct, slot, &before, r).await {
            Ok(t) => t,
            Err(error) => return Ok(Outcome::Refused { before, error }),
        };
        tracing::debug!(account = %name, resource = r.name(), "access token received");
        // Save a rotated refresh token before anything uses the new access token.
        let mut done = Refreshed::new_for(&before, t, r);
        if before.sealed && slot.record.is_some() && (r == Resource::Mail || done.rotated.is_some()) {
            let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
            rec.last_refresh = Some(now_unix());
            if let Some(s) = done.tokens.scopes.as_ref().filter(|_| r == Resource::Mail) {
                rec.scopes = s.clone();
            }
            match self.save(acct, slot, rec, done.rotated.as_ref()).await {
                Ok(()) => {}
                Err(SaveError::Stale) => return Ok(Outcome::ChangedMeanwhile),
                Err(e) => done.save_failed(&name, e),
            }
        }
        Ok(Outcome::Renewed(done))
    }

    /// New tokens from the provider, for either store: a refresh with the
    /// refresh token, or an application grant (client credentials, service
    /// account) for accounts without one. Errors carry the grant's age,
    /// which explains refresh tokens that die after a fixed time.
    pub(super) async fn ask_provider(
        &self,
        acct: &AccountTokens,
        slot: &Slot,
        before: &Active,
    ) -> Result<Tokens, OAuthError> {
        self.ask_provider_for(acct, slot, before, Resource::Mail).await
    }

    /// [`TokenManager::ask_provider`] for resource `r`'s token.
    pub(super) async fn ask_provider_for(
        &self,
        acct: &AccountTokens,
        slot: &Slot,
        before: &Active,
        res: Resource,
    ) -> Result<Tokens, OAuthError> {
        let name = &acct.account.name;
        let s = &acct.settings;
        let result = match &before.refresh {
            Some(r) => flows::refresh_for(&self.http, name, s, r, res.refresh_scope(s)).await,
            None => flows::app_token(&self.http, name, &acct.account.username, &res.app_settings(s)).await,
        };
        let authorized_at = slot.record.as_ref().and_then(|r| r.authorized_at);
        result.map_err(|e| e.with_grant_age(name, authorized_at))
    }

    /// The end of every refresh, on either store: the account's next state
    /// and the caller's answer, logged, counted and audited here only.
    /// Slot locked.
    pub(super) fn conclude(
        &self,
        acct: &AccountTokens,
        slot: &mut Slot,
        outcome: Outcome,
    ) -> Result<Secret, TokenError> {
        let name = &acct.account.name;
        match outcome {
            Outcome::Renewed(done) => {
                crate::metrics::refresh(&acct.settings, "ok");
                let expires_in = done
                    .tokens
                    .expires_at
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .as_secs();
                tracing::info!(account = %name, expires_in_s = expires_in, rotated = done.rotated.is_some(), "access token refreshed");
                slot.state = TokenState::Active(done.next);
                // The background pass plans its next wake-up from this token.
                self.changed.notify_one();
                match done.failure {
                    Some(e) => Err(e),
                    None => Ok(done.tokens.access),
                }
            }
            Outcome::Refused { before, error: e } => {
                tracing::warn!(account = %name, error = %e, "token refresh failed");
                let code = match &e {
                    OAuthError::Provider(x) => x.code.clone(),
                    _ => "unavailable".into(),
                };
                crate::metrics::refresh(&acct.settings, if e.needs_login() { "needs_login" } else { "failed" });
                self.audit
                    .record(Entry::new(name, "refresh_failed", format!("{code}: {e}")));
                if e.needs_login() {
                    self.needs_login(acct, slot, e.to_string());
                } else {
                    slot.state = TokenState::Active(before.failed(SystemTime::now(), e.to_string()));
                }
                Err(e.into())
            }
            Outcome::ChangedMeanwhile => Err(changed_meanwhile(slot, name.clone())),
            Outcome::Fresh(token) => Ok(token),
        }
    }

    pub(super) fn needs_login(&self, acct: &AccountTokens, slot: &mut Slot, why: String) {
        self.cancel_flight(&slot.state);
        slot.state = TokenState::NeedsLogin { why: why.clone() };
        acct.forget_password();
        self.audit
            .record(Entry::new(&acct.account.name, "needs_login", why.clone()));
        if let Some(cmd) = sync::read(&self.hook).clone() {
            run_hook(&cmd, &acct.account.name, &why);
        }
    }

    /// The upstream rejected `token`: forget it so the next call refreshes.
    pub async fn reject(&self, acct: &AccountTokens, token: &Secret) {
        let grant = match &acct.account.token_from {
            Some(owner) => match self.get(owner) {
                Some(g) => g,
                None => return,
            },
            None => return self.reject_own(acct, token).await,
        };
        self.reject_own(&grant, token).await;
    }

    pub(super) async fn reject_own(&self, acct: &AccountTokens, token: &Secret) {
        let mut slot = acct.slot.lock().await;
        if let TokenState::Active(a) = &slot.state {
            let mut next = a.clone();
            for r in [Resource::Mail, Resource::Graph] {
                if a.access_of(r).is_some_and(|x| x.token == *token) {
                    next.set_access(r, None);
                }
            }
            slot.state = TokenState::Active(next);
        }
    }
}
