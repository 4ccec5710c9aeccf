//! On-demand authorisation: started when a client needs a token that no grant gives, finished by the provider's answer (checked, then stored).

use super::*;

impl TokenManager {
    /// The local start address of an account's browser authorisation.
    pub(super) fn start_address(&self, account: &str, flow: &BrowserFlow) -> String {
        match self.status_url() {
            Some(base) => format!("{}{}", base.trim_end_matches('/'), authorize::start_path(account)),
            None => flow.start_url(),
        }
    }

    /// A visit to the status page's start address: where to send the
    /// browser (the redirect listener's own start address, which binds the
    /// browser to the sign-in), if the account has a browser authorisation
    /// in progress.
    pub async fn start_redirect(&self, account: &str) -> Option<String> {
        let acct = self.get(account)?;
        let flow = {
            let slot = acct.slot.lock().await;
            match &slot.state {
                TokenState::Authorizing(f) => f.browser.clone()?,
                _ => return None,
            }
        };
        Some(flow.start_url())
    }

    /// Starts an authorisation for an account without a usable token (never
    /// two at once). Returns what the person must do, or `None` when there
    /// is nothing to start (the account is usable or locked).
    pub async fn start_authorization(
        self: &Arc<Self>,
        acct: &Arc<AccountTokens>,
    ) -> Result<Option<Pending>, TokenError> {
        let name = acct.account.name.clone();
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        match &slot.state {
            TokenState::Authorizing(f) => return Ok(Some(f.pending.clone())),
            TokenState::NeedsLogin { .. } => {}
            _ => return Ok(None),
        }
        let by_owner = |why: &str| TokenError::NeedsLogin {
            account: name.clone(),
            why: format!("{why}; its owner runs `mailproxy login {name}`"),
        };
        if let Some(owner) = &acct.account.token_from {
            return Err(by_owner(&format!("it uses the grant of {owner}")));
        }
        if !acct.settings.on_demand {
            return Err(by_owner("on-demand authorisation is off for it"));
        }
        let has_password = slot.record.as_ref().is_some_and(|r| r.password.is_some());
        let s = &acct.settings;
        let flight = match s.flow {
            Flow::ClientCredentials | Flow::ServiceAccount => {
                return Err(by_owner("an app-only account is set up by its owner"))
            }
            Flow::Device if !has_password => return Err(by_owner("it has no local password yet")),
            Flow::Device => {
                let d = flows::device_start(&self.http, &name, s).await?;
                let shown = DeviceShown {
                    verification_uri: d.verification_uri.clone(),
                    user_code: d.user_code.clone(),
                };
                let url = self.status_url().unwrap_or_else(|| d.verification_uri.clone());
                let flight = Flight::new(Pending { url, user_code: None }, Some(shown.clone()), None);
                tracing::warn!(account = %name, verification_uri = %shown.verification_uri, user_code = %shown.user_code, "authorisation needed: open the verification address and enter the code");
                let (me, a, id) = (self.clone(), acct.clone(), flight.id);
                tokio::spawn(async move {
                    let r = flows::device_poll(&me.http, a.name(), &a.settings, &d, |i| {
                        tracing::info!(interval_s = i.as_secs(), "the provider asked to poll more slowly");
                    })
                    .await;
                    me.finish_authorization(&a, id, r).await;
                });
                flight
            }
            Flow::AuthorizationCode => {
                let redirect = Redirect::bind(s)
                    .await
                    .map_err(|e| OAuthError::Config(format!("cannot listen for the redirect: {e}")))?;
                let Redirect::Loopback { listener, uri, path } = redirect else {
                    return Err(by_owner("its redirect_uri is not a loopback address"));
                };
                let flow = Arc::new(BrowserFlow::new(&name, s, &uri, &path, listener.port()));
                let url = self.start_address(&name, &flow);
                let flight = Flight::new(Pending { url, user_code: None }, None, Some(flow.clone()));
                tracing::warn!(account = %name, start = %flight.pending.url, "authorisation needed: {}", describe_pending(&flight.pending));
                tokio::spawn(authorize::serve(listener, flow, self.clone(), acct.clone(), flight.id));
                flight
            }
        };
        self.audit
            .record(Entry::new(&name, "authorization_started", format!("{} flow", s.flow.name())).scopes(&s.scopes));
        let pending = flight.pending.clone();
        slot.state = TokenState::Authorizing(flight);
        self.changed.notify_one();
        Ok(Some(pending))
    }

    /// An on-demand authorisation's result: checked, then stored (or kept
    /// in memory until the owner's password can seal it).
    pub(crate) async fn finish_authorization(
        &self,
        acct: &AccountTokens,
        flight_id: u64,
        r: Result<Tokens, OAuthError>,
    ) -> Finished {
        let name = acct.account.name.clone();
        let checked = match r {
            Ok(t) => {
                let timeout = *sync::read(&self.identity_timeout);
                match self.accept_grant(&acct.account, &acct.settings, &t, timeout).await {
                    Ok(scopes) => Ok((t, scopes)),
                    Err(e) => Err((e.to_string(), true)),
                }
            }
            Err(e) => Err((e.to_string(), false)),
        };
        let mut slot = acct.slot.lock().await;
        if !matches!(&slot.state, TokenState::Authorizing(f) if f.id == flight_id) {
            return Finished::Failed("this authorisation was superseded".into());
            // revoked or re-authorised meanwhile
        }
        let (t, scopes) = match checked {
            Ok(x) => x,
            Err((why, audited)) => {
                tracing::warn!(account = %name, error = %why, "authorisation refused");
                if !audited {
                    self.audit
                        .record(Entry::new(&name, "consent", format!("refused: {why}")));
                }
                self.needs_login(acct, &mut slot, why.clone());
                self.changed.notify_one();
                return Finished::Failed(why);
            }
        };
        self.audit
            .record(Entry::new(&name, "consent", "authorised").scopes(&scopes));
        let has_password = slot.record.as_ref().is_some_and(|r| r.password.is_some());
        let can_seal = has_password && (self.keyring() || slot.key.is_some());
        let active = Active::new(t.refresh.clone(), Some(Access::new(&t)), false);
        let (next, outcome) = if can_seal {
            let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
            rec.scopes = scopes;
            rec.authorized_at = Some(now_unix());
            rec.last_refresh = Some(now_unix());
            match self.save(acct, &mut slot, rec, t.refresh.as_ref()).await {
                Ok(()) => (
                    Active { sealed: true, ..active },
                    Finished::Done(format!("{name} is authorised.")),
                ),
                Err(SaveError::Stale) => return Finished::Failed("the account was changed meanwhile".into()),
                Err(e) => {
                    tracing::error!(account = %name, error = %e, "cannot save the new refresh token; it is kept in memory");
                    (active, Finished::Done(format!("{name} is authorised.")))
                }
            }
        } else if has_password {
            tracing::info!(account = %name, "authorised; the owner's next login seals the refresh token");
            (
                active,
                Finished::Done(format!(
                    "{name} is authorised; log in with its local password to finish."
                )),
            )
        } else {
            tracing::info!(account = %name, "authorised; waiting for the owner to set the local password");
            (active, Finished::NeedsPassword)
        };
        slot.state = TokenState::Active(next);
        self.changed.notify_one();
        outcome
    }

    /// The browser authorisation ran out of time.
    pub(crate) async fn authorization_timed_out(&self, acct: &AccountTokens, flight_id: u64) {
        let mut slot = acct.slot.lock().await;
        if matches!(&slot.state, TokenState::Authorizing(f) if f.id == flight_id) {
            self.needs_login(acct, &mut slot, "the authorisation was not completed in time".into());
        }
    }

    /// The completion page: the owner sets the first local password of an
    /// account just authorised on demand; the token is sealed under it.
    pub(crate) async fn set_password_after_grant(
        &self,
        acct: &AccountTokens,
        password: &Secret,
    ) -> Result<(), TokenError> {
        let name = acct.account.name.clone();
        let (verifier, key) = self.new_password(password).await?;
        let mut slot = acct.slot.lock().await;
        let _ = self.sync(acct, &mut slot).await;
        let active = match &slot.state {
            TokenState::Active(a) if slot.record.as_ref().is_none_or(|r| r.password.is_none()) => a.clone(),
            _ => {
                return Err(TokenError::Vault(
                    "the account changed meanwhile; nothing was set".into(),
                ))
            }
        };
        let mut rec = slot.record.clone().unwrap_or_else(|| new_record(&name));
        rec.password = Some(verifier);
        rec.scopes = acct.settings.scopes.clone();
        rec.authorized_at = Some(now_unix());
        rec.last_refresh = Some(now_unix());
        let previous_key = slot.key.replace(key);
        match self.save(acct, &mut slot, rec, active.refresh.as_ref()).await {
            Ok(()) => {}
            Err(e) => {
                slot.key = previous_key;
                return Err(TokenError::Vault(e.to_string()));
            }
        }
        slot.state = TokenState::Active(Active { sealed: true, ..active });
        drop(slot);
        *sync::lock(&acct.verified) = Some(self.digest(acct, password));
        self.audit.record(Entry::new(
            &name,
            "password_set",
            "set by the owner on the completion page",
        ));
        self.changed.notify_one();
        Ok(())
    }
}
