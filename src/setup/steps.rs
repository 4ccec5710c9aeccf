//! The app-registration steps `add` prints, one text per provider. Google's
//! lead to a published (or Workspace-internal) app: an app left in
//! *Testing* loses every grant after seven days.

use super::Provider;

/// Google: an app of one's own, published so its grants do not expire.
const GOOGLE: &str = "Register mailproxy once as an OAuth app of your own at Google:
  1. Open https://console.cloud.google.com/apis/credentials and pick or create a project.
  2. APIs & Services → Library: enable the Gmail API.
  3. OAuth consent screen (Google Auth Platform): give the app a name and your address as
     support and developer contact; Data access → Add or remove scopes → add
     https://mail.google.com/.
  4. Audience: a Gmail address needs user type External, then press \"Publish app\" and
     confirm, so that \"Publishing status\" reads \"In production\". An app left in Testing
     loses every sign-in after 7 days. Your own app for personal use (under 100 users)
     needs no verification from Google, even where the console offers it.
     Google Workspace: choose user type Internal instead (only your organisation's
     accounts; nothing to publish, no 7-day limit).
  5. Credentials → Create credentials → OAuth client ID → application type \"Desktop app\"
     (not \"TVs and Limited Input devices\": that flow cannot grant mail access).
  6. Copy the client ID (it ends in .apps.googleusercontent.com) and the client secret.
  At sign-in Google shows \"Google hasn't verified this app\": it is your own app, so click
  Advanced → \"Go to APP (unsafe)\" (APP is the name you gave it) and allow mail access.
  No redirect URI needs registering: mailproxy listens on a loopback port.";

const MICROSOFT: &str = "Register mailproxy once as an app of your own at Microsoft:
  1. Open https://entra.microsoft.com → Applications → App registrations → New registration.
  2. Supported account types: \"Accounts in any organizational directory and personal Microsoft
     accounts\" (or your organisation only).
  3. Redirect URI: platform \"Public client/native (mobile & desktop)\", http://localhost
  4. Authentication → Advanced settings → Allow public client flows: Yes.
  5. API permissions → Add a permission → APIs my organization uses → Office 365 Exchange Online
     → Delegated: IMAP.AccessAsUser.All, SMTP.Send (and POP.AccessAsUser.All for POP3).
  6. Copy the Application (client) ID from the Overview page. No client secret is needed.";

const CUSTOM: &str = "Register mailproxy as an OAuth client at your provider with the redirect URI
  http://127.0.0.1/ (any port; mailproxy listens on a loopback port), and note its
  authorisation and token endpoints and the client id (and secret, if it has one).";

const PASSWORD: &str = "The server still takes passwords: mailproxy passes the client's own user name and
  password through, so there is nothing to register.";

/// The steps to register mailproxy at the provider, for a person.
pub fn registration_steps(provider: Provider) -> &'static str {
    match provider {
        Provider::Google => GOOGLE,
        Provider::Microsoft => MICROSOFT,
        Provider::Custom => CUSTOM,
        Provider::Password => PASSWORD,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Testing status is where Google's grants die after seven days: the
    /// steps lead to a published app and never to test users.
    #[test]
    fn google_steps_lead_to_a_published_app() {
        let g = registration_steps(Provider::Google);
        for want in [
            "Publish app",
            "In production",
            "Google hasn't verified this app",
            "(unsafe)",
            "Internal",
        ] {
            assert!(g.contains(want), "{want} in\n{g}");
        }
        assert!(!g.to_ascii_lowercase().contains("test user"), "{g}");
    }
}
