//! The client pages' snippets (`docs/clients/*.md`, and the README's), run
//! with the real clients from Debian's packages against the real proxy, a
//! private Dovecot and the fake OAuth provider. Each snippet is read out of
//! its page (the fenced block after `<!-- snippet: NAME -->`), with the
//! pages' example account, password and ports replaced by this test's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::support::mailproxy::{Proxy, ProxyDir};
use crate::support::world::assert_no_secrets;
use crate::support::world_mail::oauth_mail_account;
use crate::support::{require_dovecot, sample_message, Env};

const ALICE: &str = "alice@example.org";
/// With spaces, so every snippet's quoting is exercised.
const ALICE_PW: &str = "alice local pw";
const FRIEND: &str = "friend@example.com";
const SINK_WAIT: Duration = Duration::from_secs(20);
/// Subjects of the messages in alice's mailbox.
const SUBJECTS: [&str; 2] = ["first for the clients", "second for the clients"];

/// The fenced block after `<!-- snippet: NAME -->` in `file` (relative to
/// the repository).
pub(crate) fn snippet(file: &str, name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let marker = format!("<!-- snippet: {name} -->");
    let at = text.find(&marker).unwrap_or_else(|| panic!("{file} has no `{marker}`"));
    let mut lines = text[at + marker.len()..].lines().skip_while(|l| l.trim().is_empty());
    let fence = lines.next().unwrap_or("");
    assert!(
        fence.starts_with("```"),
        "{file}: `{marker}` is not followed by a fenced block"
    );
    let mut out = String::new();
    for l in lines {
        if l.starts_with("```") {
            return out;
        }
        out.push_str(l);
        out.push('\n');
    }
    panic!("{file}: the block after `{marker}` is not closed");
}

/// Dovecot, provider, sink and a proxy with IMAP, SMTP and POP3 listeners
/// for alice (authorised with `mailproxy login`, two messages in her
/// mailbox), plus a home directory for the clients' files.
struct Clients {
    env: Env,
    dir: ProxyDir,
    proxy: Proxy,
    home: PathBuf,
}

impl Clients {
    fn start() -> Clients {
        require_dovecot();
        let env = Env::start(&[]);
        let dir = ProxyDir::new();
        let d = &env.dovecot;
        let ca = d.ca_pem_path();
        let mut cfg = format!(
            "[server]\nstate_dir = \"{}\"\nca_file = \"{}\"\n\n[imap]\nlisten = \"127.0.0.1:0\"\n\n[smtp]\nlisten = \"127.0.0.1:0\"\n\n[pop3]\nlisten = \"127.0.0.1:0\"\n\n",
            dir.state_dir().display(),
            ca.display()
        );
        cfg += &oauth_mail_account(
            ALICE,
            &env.provider,
            &ca,
            Some(&format!("smtps://localhost:{}", d.submissions_port)),
            Some(&format!("pop3s://localhost:{}", d.pop3s_port)),
            &format!("imap = \"imaps://localhost:{}\"\n", d.imaps_port),
        );
        dir.write_config(&cfg);
        let (st, err) = dir.login(ALICE, ALICE_PW);
        assert!(st.success(), "mailproxy login failed: {err}");
        for (i, s) in SUBJECTS.iter().enumerate() {
            d.deliver(
                ALICE,
                &sample_message("someone@example.net", ALICE, s, &format!("c{i}")),
            );
        }
        let proxy = Proxy::start(&dir);
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        Clients { env, dir, proxy, home }
    }

    /// A page's snippet with this test's account, password and ports.
    fn fill(&self, text: &str) -> String {
        let port = |a: Option<std::net::SocketAddr>| a.expect("listener").port().to_string();
        text.replace("alice@gmail.com", ALICE)
            .replace("alice\\@gmail.com", &ALICE.replace('@', "\\@"))
            .replace("alice%40gmail.com", &ALICE.replace('@', "%40"))
            .replace("the local password", ALICE_PW)
            .replace("1143", &port(self.proxy.imap))
            .replace("1587", &port(self.proxy.smtp))
            .replace("1110", &port(self.proxy.pop3))
    }

    /// Writes a filled snippet to `~/NAME` (0600, as clients want for
    /// files with passwords).
    fn write(&self, name: &str, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = self.home.join(name);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&p, self.fill(text)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    /// Runs `prog args` in the home directory (as `$HOME`), with stdin,
    /// killed after 60 s; asserts it succeeded and returns its stdout.
    fn run(&self, prog: &str, args: &[&str], stdin: &[u8]) -> String {
        let out = self.output(prog, args, stdin);
        assert!(
            out.status.success(),
            "{prog} failed ({}):\n{}\n{}\nproxy log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.proxy.logs())
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn output(&self, prog: &str, args: &[&str], stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new("timeout")
            .arg("60")
            .arg(prog)
            .args(args)
            .current_dir(&self.home)
            .env("HOME", &self.home)
            .env_remove("MAIL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{prog}: {e} (scripts/install-deps installs it; run scripts/test)"));
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    /// The one message the sink got: from alice to the friend, with `subject`.
    fn sent(&self, subject: &str) {
        let msgs = self.env.sink.wait_for(1, SINK_WAIT);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        let m = &msgs[0];
        assert_eq!(m.rcpt_to, [FRIEND], "{m:?}");
        let data = String::from_utf8_lossy(&m.data);
        assert!(data.contains(&format!("Subject: {subject}")), "{data}");
    }

    /// Messages in a Maildir (`new` and `cur`) under the home directory.
    fn maildir_messages(&self, dir: &str) -> Vec<String> {
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            let Ok(entries) = std::fs::read_dir(self.home.join(dir).join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                out.push(String::from_utf8_lossy(&std::fs::read(e.path()).unwrap()).into_owned());
            }
        }
        out
    }

    fn assert_has_both(&self, what: &str, text: &str) {
        for s in SUBJECTS {
            assert!(text.contains(s), "{what} is missing `{s}`:\n{text}");
        }
    }
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(4000)..]
}

impl Drop for Clients {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_no_secrets(&self.proxy.logs(), &self.env, &[ALICE_PW]);
        }
    }
}

#[test]
fn mutt_sends_with_the_muttrc_of_its_page() {
    let c = Clients::start();
    c.write(".muttrc", &snippet("docs/clients/mutt.md", "muttrc"));
    let send = c.fill(&snippet("docs/clients/mutt.md", "mutt-send"));
    c.run("sh", &["-c", &send], b"");
    c.sent("Nightly report");
}

#[test]
fn mbsync_mirrors_the_inbox() {
    let c = Clients::start();
    c.write(".mbsyncrc", &snippet("docs/clients/mbsync.md", "mbsyncrc"));
    std::fs::create_dir_all(c.home.join("Mail/gmail")).unwrap();
    c.run("mbsync", &["gmail"], b"");
    let got = c.maildir_messages("Mail/gmail/INBOX").join("\n");
    c.assert_has_both("the mbsync Maildir", &got);
}

#[test]
fn offlineimap_mirrors_the_inbox() {
    let c = Clients::start();
    c.write(
        ".offlineimaprc",
        &snippet("docs/clients/offlineimap.md", "offlineimaprc"),
    );
    c.run("offlineimap", &["-o", "-u", "basic"], b"");
    let got = c.maildir_messages("Mail/gmail/INBOX").join("\n");
    c.assert_has_both("the OfflineIMAP Maildir", &got);
}

#[test]
fn fetchmail_collects_over_pop3() {
    let c = Clients::start();
    let out = c.home.join("delivered");
    // The page leaves the delivery to the local MTA; here it goes to a file.
    let rc = format!(
        "set no syslog\n{}  mda \"/bin/sh -c 'cat >> {}'\"\n",
        snippet("docs/clients/fetchmail.md", "fetchmailrc"),
        out.display()
    );
    let rc = c.write(".fetchmailrc", &rc);
    c.run(
        "fetchmail",
        &[
            "-f",
            rc.to_str().unwrap(),
            "--nodetach",
            "--pidfile",
            c.home.join("fetchmail.pid").to_str().unwrap(),
        ],
        b"",
    );
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    c.assert_has_both("what fetchmail delivered", &got);
    assert_eq!(c.env.dovecot.message_count(ALICE), 2, "`keep` deletes nothing");
}

#[test]
fn getmail_retrieves_over_pop3() {
    let c = Clients::start();
    let mut rc = snippet("docs/clients/getmail.md", "getmailrc");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(c.home.join("Maildir").join(sub)).unwrap();
    }
    // getmail refuses to deliver as root (as its page says): then the
    // Maildir belongs to `nobody`, who gets to it through the test's dirs.
    // SAFETY: geteuid has no preconditions.
    if rustix::process::geteuid().is_root() {
        use std::os::unix::fs::PermissionsExt;
        rc = rc.replace("path = ~/Maildir/\n", "path = ~/Maildir/\nuser = nobody\n");
        std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let chown = Command::new("chown")
            .args(["-R", "nobody"])
            .arg(c.home.join("Maildir"))
            .status();
        assert!(chown.is_ok_and(|s| s.success()), "chown nobody");
    }
    c.write(".getmail/getmailrc", &rc);
    c.run("getmail", &[], b"");
    let got = c.maildir_messages("Maildir").join("\n");
    c.assert_has_both("the getmail Maildir", &got);
}

#[test]
fn msmtp_sends_for_cron_jobs() {
    let c = Clients::start();
    c.write(".msmtprc", &snippet("docs/clients/msmtp.md", "msmtprc"));
    let send = c.fill(&snippet("docs/clients/msmtp.md", "cron-send"));
    c.run("sh", &["-c", &send], b"");
    c.sent("nightly backup");
}

#[test]
fn php_mail_sends_through_msmtp_as_sendmail_path() {
    let c = Clients::start();
    c.write(".msmtprc", &snippet("docs/clients/msmtp.md", "msmtprc"));
    let ini = snippet("docs/clients/msmtp.md", "php-sendmail-path");
    let (key, value) = ini.trim().split_once('=').expect("an ini line");
    let setting = format!("{}={}", key.trim(), value.trim().trim_matches('"'));
    let script =
        format!("if (!mail('{FRIEND}', 'Sent with mail()', 'Hello from PHP.', 'From: {ALICE}')) {{ exit(1); }}");
    c.run("php", &["-d", &setting, "-r", &script], b"");
    c.sent("Sent with mail()");
}

#[test]
fn the_readme_msmtp_snippet_sends() {
    let c = Clients::start();
    c.write(".msmtprc", &snippet("README.md", "readme-msmtprc"));
    let msg = format!("From: {ALICE}\nTo: {FRIEND}\nSubject: from the README\n\nHello.\n");
    c.run("msmtp", &[FRIEND], msg.as_bytes());
    c.sent("from the README");
}

#[test]
fn git_send_email_sends_a_patch() {
    let c = Clients::start();
    let cfg = format!(
        "[user]\n    name = Alice\n    email = {ALICE}\n{}",
        snippet("docs/clients/git-send-email.md", "gitconfig")
    );
    c.write(".gitconfig", &cfg);
    // Debian's git, whose send-email the git-email package provides.
    let git = "/usr/bin/git";
    c.run(git, &["init", "-q", "repo"], b"");
    std::fs::write(c.home.join("repo/fix.txt"), "the fix\n").unwrap();
    c.run(git, &["-C", "repo", "add", "fix.txt"], b"");
    c.run(git, &["-C", "repo", "commit", "-q", "-m", "The fix"], b"");
    c.run(git, &["-C", "repo", "format-patch", "-q", "-1", "-o", ".."], b"");
    c.run(
        git,
        &[
            "-C",
            "repo",
            "send-email",
            "--confirm=never",
            "--no-validate",
            "--suppress-cc=all",
            &format!("--to={FRIEND}"),
            "../0001-The-fix.patch",
        ],
        b"",
    );
    c.sent("[PATCH] The fix");
}

#[test]
fn python_reads_and_sends_with_the_standard_library() {
    let c = Clients::start();
    let imap = c.run(
        "python3",
        &["-c", &c.fill(&snippet("docs/clients/python.md", "imaplib"))],
        b"",
    );
    c.assert_has_both("imaplib's output", &imap);
    let pop = c.run(
        "python3",
        &["-c", &c.fill(&snippet("docs/clients/python.md", "poplib"))],
        b"",
    );
    assert!(pop.starts_with("2 messages\n"), "{pop}");
    c.assert_has_both("poplib's output", &pop);
    let readme = c.run(
        "python3",
        &["-c", &c.fill(&snippet("README.md", "readme-imaplib"))],
        b"",
    );
    assert!(readme.contains("2 messages"), "{readme}");
    let sent = c.run(
        "python3",
        &["-c", &c.fill(&snippet("docs/clients/python.md", "smtplib"))],
        b"",
    );
    assert_eq!(sent, "sent\n");
    c.sent("Sent with smtplib");
}

#[test]
fn perl_reads_with_mail_imapclient_and_sends_with_net_smtp() {
    let c = Clients::start();
    let read = c.run(
        "perl",
        &["-e", &c.fill(&snippet("docs/clients/perl.md", "mail-imapclient"))],
        b"",
    );
    c.assert_has_both("Mail::IMAPClient's output", &read);
    let sent = c.run(
        "perl",
        &["-e", &c.fill(&snippet("docs/clients/perl.md", "net-smtp"))],
        b"",
    );
    assert_eq!(sent, "sent\n");
    c.sent("Sent with Net::SMTP");
}

#[test]
fn php_reads_with_imap_open_and_sends_with_phpmailer() {
    let c = Clients::start();
    let script = c.write("read.php", &snippet("docs/clients/php.md", "imap-open"));
    let read = c.run("php", &[script.to_str().unwrap()], b"");
    assert!(read.starts_with("2 messages\n"), "{read}");
    c.assert_has_both("imap_open's output", &read);
    let script = c.write("send.php", &snippet("docs/clients/php.md", "phpmailer"));
    let sent = c.run("php", &[script.to_str().unwrap()], b"");
    assert_eq!(sent, "sent\n");
    c.sent("Sent with PHPMailer");
}

#[test]
fn curl_reads_over_imap_and_sends_over_smtp() {
    let c = Clients::start();
    let read = c.run(
        "sh",
        &["-c", &c.fill(&snippet("docs/clients/curl.md", "curl-imap"))],
        b"",
    );
    assert!(read.contains("* 2 EXISTS"), "{read}");
    assert!(read.contains(SUBJECTS[0]), "{read}");
    c.run(
        "sh",
        &["-c", &c.fill(&snippet("docs/clients/curl.md", "curl-smtp"))],
        b"",
    );
    c.sent("Sent with curl");
}
