//! Handing an access token to the owner's own OAuth clients (`mailproxy
//! token`): the cached token and the single-flight refresh the proxy's own
//! logins use, so any number of callers cost at most one refresh.

use serde::{Deserialize, Serialize};

use super::*;

/// An access token handed out, with what a client plans its use by. Its
/// `Debug` shows no token; only serializing it (the control socket's reply
/// to the owner) does.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Handed {
    pub account: String,
    #[serde(serialize_with = "expose")]
    pub token: Secret,
    /// Unix seconds.
    pub expires_at: u64,
    pub scopes: Vec<String>,
}

fn expose<S: serde::Serializer>(s: &Secret, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.expose())
}

impl Handed {
    /// A provider's fresh answer (the command's own refresh, without
    /// `serve`); `scopes` stand in when the provider named none.
    pub fn from_tokens(account: &str, t: &Tokens, scopes: &[String]) -> Handed {
        Handed {
            account: account.to_string(),
            token: t.access.clone(),
            expires_at: unix(t.expires_at),
            scopes: t.scopes.clone().unwrap_or_else(|| scopes.to_vec()),
        }
    }
}

/// Whether `a` has `min_life` left, or half its lifetime when the
/// provider's tokens live shorter than twice that: no refresh would give
/// more, and refreshing on every call would only storm the provider.
fn lasts(a: &Access, min_life: Duration) -> bool {
    let life = a.expires_at.duration_since(a.issued_at).unwrap_or_default();
    let need = min_life.min(life / 2);
    let left = a.expires_at.duration_since(SystemTime::now()).unwrap_or_default();
    a.fresh() && left >= need
}

impl TokenManager {
    /// An access token of `acct` (its grant's, for a `token_from` account)
    /// with at least `min_life` left, refreshed first when needed, under the
    /// account's lock like every refresh: callers racing an expiry cause
    /// one request. A locked account stays locked: the caller opens it first.
    /// `r` names the token's resource (Graph for accounts that send
    /// through it).
    pub async fn hand_out(
        &self,
        acct: &Arc<AccountTokens>,
        r: Resource,
        min_life: Duration,
    ) -> Result<Handed, TokenError> {
        let grant = self.grant_of(acct)?;
        let r = r.effective(&grant.settings);
        let name = &grant.account.name;
        let mut slot = grant.slot.lock().await;
        let _ = self.sync(&grant, &mut slot).await;
        refresh::fresh_token_for(&slot.state, name, r)?;
        let cached = match &slot.state {
            TokenState::Active(a) => a.access_of(r).cloned().filter(|x| lasts(x, min_life)),
            _ => None,
        };
        let access = match cached {
            Some(a) => a,
            None => {
                self.refresh_resource_locked(&grant, &mut slot, r).await?;
                let got = match &slot.state {
                    TokenState::Active(a) => a.access_of(r).cloned(),
                    _ => None,
                };
                got.ok_or_else(|| refresh::changed_meanwhile(&slot, name.clone()))?
            }
        };
        let scopes = match (r, &grant.settings.graph_scopes) {
            (Resource::Graph, Some(g)) => g.clone(),
            _ => slot
                .record
                .as_ref()
                .map(|r| r.scopes.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| grant.settings.scopes.clone()),
        };
        Ok(Handed {
            account: acct.account.name.clone(),
            token: access.token,
            expires_at: unix(access.expires_at),
            scopes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(issued_ago: u64, life: u64) -> Access {
        let issued_at = SystemTime::now() - Duration::from_secs(issued_ago);
        Access {
            token: Secret::new("t"),
            issued_at,
            expires_at: issued_at + Duration::from_secs(life),
        }
    }

    #[test]
    fn five_minutes_left_or_half_a_short_life() {
        let five = Duration::from_secs(300);
        assert!(lasts(&access(0, 3600), five));
        assert!(lasts(&access(3200, 3600), five));
        assert!(!lasts(&access(3400, 3600), five));
        assert!(!lasts(&access(4000, 3600), five), "expired");
        // A 2-minute token: half its life is the most a refresh gives.
        assert!(lasts(&access(10, 120), five));
        assert!(!lasts(&access(70, 120), five));
    }

    #[test]
    fn the_token_shows_only_when_serialized() {
        let h = Handed {
            account: "a@b".into(),
            token: Secret::new("tok-123"),
            expires_at: 7,
            scopes: vec!["s".into()],
        };
        assert!(!format!("{h:?}").contains("tok-123"));
        let json = serde_json::to_string(&h).unwrap();
        assert!(json.contains("\"token\":\"tok-123\""), "{json}");
        assert_eq!(serde_json::from_str::<Handed>(&json).unwrap(), h);
    }
}
