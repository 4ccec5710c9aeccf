//! Provider errors decoded into one sentence a person can act on.
//!
//! Token endpoints answer with `{"error": "...", "error_description": "..."}`;
//! Microsoft puts its `AADSTSnnnnn` code at the start of the description.
//! Both go through [`explain`], which the client reply, the log and the CLI share.

/// What went wrong at the provider, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The provider's code (`invalid_grant`, `AADSTS70008`, ...), for the log.
    pub code: String,
    /// One sentence: what happened and the next step.
    pub sentence: String,
    /// The refresh token is dead: only a new authorisation helps.
    pub needs_login: bool,
    /// Google's "Token has been expired or revoked.": when the grant is
    /// about seven days old, the app is in *Testing* status (see
    /// [`testing_status_hint`]).
    pub google_expired: bool,
}

/// Google's description of a dead refresh token.
const GOOGLE_EXPIRED: &str = "Token has been expired or revoked";
/// Refresh tokens of a Google app in *Testing* status live seven days.
const TESTING_LIFETIME: u64 = 7 * 86400;

/// When a Google refresh token died about seven days after consent, the
/// sentence that says why (the OAuth app is in *Testing* status) and how
/// to publish it. `authorized_at` and `now` are Unix seconds.
pub fn testing_status_hint(account: &str, authorized_at: Option<u64>, now: u64) -> Option<String> {
    let age = now.checked_sub(authorized_at?)?;
    let window = TESTING_LIFETIME - 12 * 3600..=TESTING_LIFETIME + 86400;
    window.contains(&age).then(|| {
        format!(
            "Google ended the grant of {account} seven days after consent: the OAuth app is in Testing status, where refresh tokens \
             last 7 days. Publish it (Google Cloud console > APIs & Services > OAuth consent screen > Audience > Publish app; \
             for personal use no verification is needed, Google only shows an unverified-app warning at sign-in), \
             then run `mailproxy login {account}` once more"
        )
    })
}

/// Decodes an OAuth error response for `account`.
pub fn explain(account: &str, error: &str, description: Option<&str>) -> Explanation {
    let login = format!("run `mailproxy login {account}`");
    let aadsts = description.and_then(aadsts_code);
    let (code, sentence, needs_login) = match aadsts.as_deref() {
        Some("AADSTS50011") => ("AADSTS50011", format!(
            "Microsoft rejected the redirect URI: it does not match the app registration; add it under Authentication > Mobile and desktop applications (e.g. http://localhost) or set redirect_uri for {account}"), false),
        Some("AADSTS65001") => ("AADSTS65001", format!(
            "the user or an administrator has not consented to the app's mail scopes; {login} and accept the consent screen"), true),
        Some("AADSTS70008" | "AADSTS700082") => (aadsts.as_deref().unwrap_or_default(), format!(
            "the refresh token expired after a period of inactivity; {login} to authorise again"), true),
        Some("AADSTS50076" | "AADSTS50079") => ("AADSTS50076", format!(
            "the tenant now requires multi-factor authentication for this account; {login} and complete the MFA prompt"), true),
        Some("AADSTS50020") => ("AADSTS50020", format!(
            "the account is not in the tenant the app signs in to; set tenant = \"common\" (or the account's own tenant) for {account} and run `mailproxy login {account}`"), true),
        Some("AADSTS700016") => ("AADSTS700016", format!(
            "the client_id is not registered in this tenant; check client_id and tenant for {account} (multi-tenant apps need tenant = \"common\" or \"organizations\")"), false),
        Some("AADSTS90099") => ("AADSTS90099", format!(
            "the application has not been authorised by a tenant administrator; ask an administrator to grant admin consent, then {login}"), true),
        Some("AADSTS7000112") => ("AADSTS7000112", format!(
            "the application is disabled in the tenant; ask the tenant administrator to enable it, then {login}"), true),
        Some("AADSTS54005") => ("AADSTS54005", format!(
            "the authorisation code was already redeemed (two sign-ins raced); {login} once more"), true),
        Some("AADSTS70043") => ("AADSTS70043", format!(
            "the tenant's sign-in frequency policy ended the session; {login} to sign in again"), true),
        Some("AADSTS7000215") => ("AADSTS7000215", format!(
            "the client secret is wrong or expired; create a new secret in the app registration and update client_secret for {account}"), false),
        Some("AADSTS50173" | "AADSTS50133") => (aadsts.as_deref().unwrap_or_default(), format!(
            "the grant was revoked because the password changed; {login}"), true),
        _ => match error {
            "invalid_grant" => ("invalid_grant", format!(
                "the provider no longer accepts the refresh token (revoked, expired, or the password changed); {login}"), true),
            "invalid_client" => ("invalid_client", format!(
                "the provider does not recognise the client: check client_id and client_secret for {account}"), false),
            "unauthorized_client" => ("unauthorized_client", format!(
                "the app registration is not allowed to use this grant type; enable it for the client_id of {account} (public client flows for desktop apps)"), false),
            "consent_required" => ("consent_required", format!(
                "consent to the mail scopes is missing; {login} and accept the consent screen"), true),
            "interaction_required" | "login_required" => (error, format!(
                "the provider needs the user to sign in interactively; {login}"), true),
            "invalid_scope" => ("invalid_scope", format!(
                "the provider refused the requested scopes; check scopes for {account}"), false),
            "access_denied" => ("access_denied", format!(
                "the authorisation was denied at the provider; {login} and approve the request"), true),
            "expired_token" => ("expired_token", format!(
                "the sign-in code expired before it was used; {login} again and finish within the time shown"), true),
            "temporarily_unavailable" | "server_error" => (error,
                "the provider is temporarily unavailable; mailproxy will retry, nothing to do yet".to_string(), false),
            other => (other, format!(
                "the provider refused the request ({other}{}); check the account settings for {account}",
                description.map(|d| format!(": {}", first_line(d))).unwrap_or_default()), false),
        },
    };
    Explanation {
        code: code.to_string(),
        sentence,
        needs_login,
        google_expired: error == "invalid_grant" && description.is_some_and(|d| d.starts_with(GOOGLE_EXPIRED)),
    }
}

/// Exchange Online's answer when the token is good but its user may not
/// open the mailbox named in `user=`.
const EXCHANGE_NOT_CONNECTED: &str = "User is authenticated but not connected";

/// An upstream server's refusal of an OAuth login, with what to do when
/// the server is known to mean something more specific.
pub fn upstream_rejection(user: &str, reason: String) -> String {
    if reason.contains(EXCHANGE_NOT_CONNECTED) {
        return format!(
            "{reason} (Exchange accepted the token, but its user may not open the mailbox {user}: an Exchange \
             administrator grants it with `Add-MailboxPermission -Identity {user} -User DELEGATE -AccessRights FullAccess` \
             (for sending as {user} also `Add-RecipientPermission -Identity {user} -Trustee DELEGATE -AccessRights SendAs`; \
             for an app's service principal, `Add-MailboxPermission` with its object id); changes can take an hour to apply)"
        );
    }
    reason
}

/// `AADSTS70008: The provided ...` → `AADSTS70008`.
fn aadsts_code(description: &str) -> Option<String> {
    let start = description.find("AADSTS")?;
    let digits: String = description[start + 6..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    (!digits.is_empty()).then(|| format!("AADSTS{digits}"))
}

/// Descriptions may be long and multi-line (Microsoft adds trace IDs); keep
/// the first line, bounded, free of control characters.
fn first_line(d: &str) -> String {
    d.lines()
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_listed_code() {
        let cases = [
            ("invalid_grant", None, "invalid_grant", true),
            ("invalid_client", None, "invalid_client", false),
            ("unauthorized_client", None, "unauthorized_client", false),
            ("consent_required", None, "consent_required", true),
            ("interaction_required", None, "interaction_required", true),
            (
                "invalid_request",
                Some("AADSTS50011: The redirect URI 'x' does not match"),
                "AADSTS50011",
                false,
            ),
            (
                "invalid_grant",
                Some("AADSTS65001: The user or administrator has not consented"),
                "AADSTS65001",
                true,
            ),
            (
                "invalid_grant",
                Some("AADSTS70008: The provided authorization code or refresh token has expired"),
                "AADSTS70008",
                true,
            ),
            (
                "invalid_grant",
                Some("AADSTS700082: The refresh token has expired due to inactivity."),
                "AADSTS700082",
                true,
            ),
            (
                "invalid_grant",
                Some("AADSTS50076: Due to a configuration change made by your administrator"),
                "AADSTS50076",
                true,
            ),
            (
                "invalid_request",
                Some("AADSTS50020: User account from identity provider does not exist in tenant"),
                "AADSTS50020",
                true,
            ),
            (
                "unauthorized_client",
                Some("AADSTS700016: Application with identifier 'x' was not found"),
                "AADSTS700016",
                false,
            ),
            (
                "invalid_grant",
                Some("AADSTS90099: The application has not been authorized in the tenant"),
                "AADSTS90099",
                true,
            ),
            (
                "unauthorized_client",
                Some("AADSTS7000112: Application is disabled."),
                "AADSTS7000112",
                true,
            ),
            (
                "invalid_grant",
                Some("AADSTS54005: OAuth2 Authorization code was already redeemed"),
                "AADSTS54005",
                true,
            ),
            (
                "invalid_grant",
                Some("AADSTS70043: The refresh token has expired or is invalid due to sign-in frequency checks"),
                "AADSTS70043",
                true,
            ),
        ];
        for (err, desc, code, login) in cases {
            let e = explain("a@b", err, desc);
            assert_eq!(e.code, code, "{err} {desc:?}");
            assert_eq!(e.needs_login, login, "{code}");
            assert!(e.sentence.contains("a@b") || !login, "{code}: {}", e.sentence);
            assert!(!e.sentence.contains('\n'));
        }
    }

    #[test]
    fn exchange_not_connected_names_the_missing_permission() {
        let s = upstream_rejection(
            "shared@contoso.com",
            "User is authenticated but not connected.".to_string(),
        );
        assert!(
            s.contains("Add-MailboxPermission -Identity shared@contoso.com") && s.contains("FullAccess"),
            "{s}"
        );
        assert_eq!(
            upstream_rejection("a@b", "AUTHENTICATE failed.".into()),
            "AUTHENTICATE failed."
        );
    }

    #[test]
    fn seven_day_google_death_says_testing_status() {
        let e = explain(
            "a@gmail.com",
            "invalid_grant",
            Some("Token has been expired or revoked."),
        );
        assert!(e.google_expired && e.needs_login);
        let now = 1_800_000_000;
        let hint = testing_status_hint("a@gmail.com", Some(now - 7 * 86400 - 300), now).unwrap();
        assert!(
            hint.contains("Testing status")
                && hint.contains("Publish app")
                && hint.contains("mailproxy login a@gmail.com"),
            "{hint}"
        );
        assert!(!hint.contains('\n'));
        // A grant of a day, or of a month: revoked, not the Testing limit.
        assert_eq!(testing_status_hint("a", Some(now - 86400), now), None);
        assert_eq!(testing_status_hint("a", Some(now - 30 * 86400), now), None);
        assert_eq!(testing_status_hint("a", None, now), None);
        assert_eq!(testing_status_hint("a", Some(now + 10), now), None);
        assert!(!explain("a", "invalid_grant", Some("AADSTS70008: x")).google_expired);
    }

    #[test]
    fn unknown_error_keeps_first_line_only() {
        let e = explain("a@b", "weird", Some("line one\r\nTrace ID: 123\u{7}"));
        assert!(e.sentence.contains("weird: line one"), "{}", e.sentence);
        assert!(!e.sentence.contains("Trace"));
    }
}
