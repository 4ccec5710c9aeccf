//! `mailproxy manpage` (hidden): the man page in roff on stdout, or with
//! `--dir` one page per command (`mailproxy-login.1`, …) in that
//! directory, so `man mailproxy-login` works; `scripts/man` writes them.
//! Each page is clap_mangen's, plus the command's EXAMPLES ([`EXAMPLES`])
//! and a SEE ALSO naming its neighbours.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

use super::args::Cli;

/// Every page's examples: (page, [(command line, what it does)]). A test
/// holds every visible command to having some.
const EXAMPLES: &[(&str, &[(&str, &str)])] = &[
    ("mailproxy", &[
        ("mailproxy add alice@gmail.com", "Writes the config, with the status page on, prints the steps to register an app at the provider, and signs in."),
        ("mailproxy service install", "Runs the proxy in the background, now and at every login."),
        ("mailproxy open", "Opens the status page: every account's state, and a Sign in button when one needs it."),
        ("mailproxy check", "Exit status 0 when every account works, 1 when a person must act, 2 on a temporary failure."),
    ]),
    ("mailproxy-serve", &[
        ("mailproxy serve", "Runs the proxy in the foreground with the default config; Ctrl-C stops it."),
        ("mailproxy --config ~/.config/mailproxy/work.toml serve", "Runs with another config file (see Several instances in the README)."),
        ("kill -HUP PID", "Makes the running serve re-read its config."),
    ]),
    ("mailproxy-login", &[
        ("mailproxy login alice@gmail.com", "Asks for the local password, opens the provider's sign-in page in the browser and waits for the grant."),
        ("mailproxy login alice@gmail.com --no-browser", "Prints the sign-in address only, to open it yourself."),
        ("mailproxy login bob@example.org --device", "The device flow (Microsoft, custom providers): a code to enter on any device with a browser."),
    ]),
    ("mailproxy-accounts", &[
        ("mailproxy accounts", "One line per account: provider, flow, state, token expiry, last refresh and use, scopes."),
    ]),
    ("mailproxy-check", &[
        ("mailproxy check", "Refreshes every account now; exit status 0 ok, 1 a person must act, 2 temporary."),
        ("mailproxy check alice@gmail.com || notify-send 'mailproxy: alice needs a sign-in'", "One account, from cron or a monitoring agent (no password needed while serve runs)."),
    ]),
    ("mailproxy-revoke", &[
        ("mailproxy revoke alice@gmail.com", "Revokes the refresh token at Google and erases every local trace of the account's grant."),
    ]),
    ("mailproxy-passwd", &[
        ("mailproxy passwd alice@gmail.com", "Asks for the old and the new local password, and re-seals the refresh token under the new one."),
    ]),
    ("mailproxy-token", &[
        ("mailproxy token alice@gmail.com", "Prints an access token with at least 5 minutes left, refreshed first when needed."),
        ("passwordeval \"mailproxy token alice@gmail.com\"", "In ~/.msmtprc, with auth oauthbearer (or xoauth2): msmtp signs in at Gmail itself."),
        ("curl --user 'alice@gmail.com:' --oauth2-bearer \"$(mailproxy token alice@gmail.com)\" imaps://imap.gmail.com/INBOX", "curl with a fresh token."),
        ("mailproxy token alice@gmail.com --json", "The token with its expiry, scopes and account, as JSON."),
    ]),
    ("mailproxy-add", &[
        ("mailproxy add alice@gmail.com", "Detects Google, prints the steps to register and publish an app of your own, asks for its client id and secret, writes the config and signs in."),
        ("mailproxy add bob@outlook.com --client-id 00000000-0000-0000-0000-000000000000 --no-login", "Writes the config only; `mailproxy login bob@outlook.com` signs in later."),
        ("mailproxy add carol@example.org --provider password --imap imaps://mail.example.org:993 --smtp smtps://mail.example.org:465", "A server that still takes passwords: the client's own password is passed through."),
    ]),
    ("mailproxy-open", &[
        ("mailproxy open", "Opens the status page (status_listen under [server]) with $BROWSER, else xdg-open."),
        ("BROWSER=firefox mailproxy open", "In a browser of your choice."),
    ]),
    ("mailproxy-service", &[
        ("mailproxy service install", "Writes the systemd user unit (a launchd agent on macOS) and starts it."),
        ("mailproxy service status", "Exit status 0 when the service runs, 3 when it does not."),
    ]),
    ("mailproxy-service-install", &[
        ("mailproxy service install", "Writes the unit for this binary and config, starts it, and prints the status page's address."),
        ("mailproxy service install --print", "Shows the unit and writes nothing."),
    ]),
    ("mailproxy-service-uninstall", &[
        ("mailproxy service uninstall", "Stops and disables the service and removes its unit."),
    ]),
    ("mailproxy-service-status", &[
        ("mailproxy service status", "Whether the unit is installed, what systemd says and whether serve answers; exit status 0 running, 3 not."),
    ]),
    ("mailproxy-completions", &[
        ("mailproxy completions bash > ~/.local/share/bash-completion/completions/mailproxy", "Bash completion for your user."),
        ("mailproxy completions fish > ~/.config/fish/completions/mailproxy.fish", "Fish completion for your user."),
    ]),
];

pub fn run(dir: Option<&Path>) -> Result<u8> {
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let Some(dir) = dir else {
        std::io::stdout().write_all(&page(&cli, None)?)?;
        return Ok(0);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_pages(&cli, None, dir).with_context(|| format!("writing man pages in {}", dir.display()))?;
    Ok(0)
}

/// Writes `cmd`'s page and those of its visible commands, down the tree.
fn write_pages(cmd: &clap::Command, parent: Option<&str>, dir: &Path) -> std::io::Result<()> {
    let name = name(cmd);
    std::fs::write(dir.join(format!("{name}.1")), page(cmd, parent)?)?;
    for sub in visible(cmd) {
        write_pages(sub, Some(name), dir)?;
    }
    Ok(())
}

/// `cmd`'s name as its page is called (`mailproxy-service-install`).
fn name(cmd: &clap::Command) -> &str {
    cmd.get_display_name().unwrap_or_else(|| cmd.get_name())
}

fn visible(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands().filter(|c| !c.is_hide_set())
}

/// One page: clap_mangen's sections, then EXAMPLES and SEE ALSO.
fn page(cmd: &clap::Command, parent: Option<&str>) -> std::io::Result<Vec<u8>> {
    // Every page's footer names the program, not the command.
    let man = Man::new(cmd.clone()).source(format!("mailproxy {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if visible(cmd).next().is_some() {
        man.render_subcommands_section(&mut out)?;
    }
    let mut roff = Roff::new();
    let examples = EXAMPLES.iter().find(|(page, _)| *page == name(cmd));
    if let Some((_, examples)) = examples {
        roff.control("SH", ["EXAMPLES"]);
        for (line, what) in *examples {
            roff.control("TP", []).text([bold(*line)]).text([roman(*what)]);
        }
    }
    roff.control("SH", ["SEE ALSO"]);
    let mut see: Vec<&str> = parent.into_iter().collect();
    if parent.is_some_and(|p| p != "mailproxy") {
        see.insert(0, "mailproxy");
    }
    see.extend(descendants(cmd));
    let mut refs = Vec::new();
    for (i, page) in see.iter().enumerate() {
        let sep = if i + 1 < see.len() { "(1), " } else { "(1)" };
        refs.extend([bold(*page), roman(sep)]);
    }
    roff.text(refs);
    roff.to_writer(&mut out)?;
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    Ok(out)
}

/// The pages of every visible command under `cmd`, in the order of `--help`.
fn descendants(cmd: &clap::Command) -> Vec<&str> {
    visible(cmd)
        .flat_map(|sub| std::iter::once(name(sub)).chain(descendants(sub)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command added later gets examples too, and no example is left for
    /// a command that is gone.
    #[test]
    fn every_page_has_examples_and_every_example_a_page() {
        let mut cli = Cli::command().disable_help_subcommand(true);
        cli.build();
        let mut pages = descendants(&cli);
        pages.insert(0, "mailproxy");
        let examples: Vec<&str> = EXAMPLES.iter().map(|(p, _)| *p).collect();
        for p in &pages {
            assert!(examples.contains(p), "{p} has no EXAMPLES");
        }
        for e in &examples {
            assert!(pages.contains(e), "{e} is no page");
        }
    }

    #[test]
    fn a_command_page_names_its_neighbours() {
        let mut cli = Cli::command().disable_help_subcommand(true);
        cli.build();
        let service = visible(&cli).find(|c| c.get_name() == "service").unwrap();
        let text = String::from_utf8(page(service, Some("mailproxy")).unwrap()).unwrap();
        assert!(text.contains(".SH EXAMPLES"), "{text}");
        assert!(
            text.contains("\\fBmailproxy\\fR(1), \\fBmailproxy\\-service\\-install\\fR(1)"),
            "{text}"
        );
    }
}
