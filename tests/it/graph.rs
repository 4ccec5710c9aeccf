//! `smtp = "graph"`: real clients (Python smtplib, msmtp, git send-email,
//! PHPMailer, and a raw pipelining client) submit to mailproxy, which sends
//! through the fake Graph. Each message arrives byte-identical but for its
//! recipient fields, which say exactly the envelope; large attachments go
//! through upload sessions; Graph's refusals reach the client as SMTP
//! replies it acts on; a shared mailbox sends through its delegate's grant.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::graph::{audience, FakeGraph, Sent, GRAPH_SCOPE};
use crate::support::mailproxy::{Proxy, ProxyDir};
use crate::support::provider::{self, FakeProvider};

const ME: &str = "me@example.org";
const ME_PW: &str = "me local pw";
const SHARED: &str = "shared@example.org";
const SHARED_PW: &str = "shared local pw";

/// The fake provider and Graph, and a proxy with `ME` sending through Graph.
pub struct GraphWorld {
    pub _provider: FakeProvider,
    pub graph: FakeGraph,
    pub dir: ProxyDir,
    pub proxy: Option<Proxy>,
}

/// A custom-provider account of the fake provider that sends through `graph`.
pub fn graph_account(name: &str, p: &FakeProvider, graph: &FakeGraph) -> String {
    format!(
        "[accounts.\"{name}\"]\nprovider = \"custom\"\nauth_url = \"{}\"\ntoken_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nscopes = [\"https://mail.example.org/\", \"offline_access\"]\ngraph_scopes = [\"{GRAPH_SCOPE}\", \"offline_access\"]\nsmtp = \"{}\"\n\n",
        p.auth_url(),
        p.token_url(),
        provider::CLIENT_ID,
        provider::CLIENT_SECRET,
        graph.smtp_setting(),
    )
}

impl GraphWorld {
    /// Authorised and started; `extra` is appended to the config.
    pub fn start(extra: &str) -> GraphWorld {
        let provider = FakeProvider::start();
        provider.set_default_user(ME);
        let graph = FakeGraph::start(provider.token_view());
        let dir = ProxyDir::new();
        let cfg = dir.header() + "[smtp]\nlisten = \"127.0.0.1:0\"\n\n" + &graph_account(ME, &provider, &graph) + extra;
        dir.write_config(&cfg);
        let (st, err) = dir.login(ME, ME_PW);
        assert!(st.success(), "mailproxy login: {err}");
        let proxy = Some(Proxy::start(&dir));
        GraphWorld {
            _provider: provider,
            graph,
            dir,
            proxy,
        }
    }

    pub fn port(&self) -> u16 {
        self.proxy.as_ref().unwrap().smtp.expect("smtp listener").port()
    }

    fn logs(&self) -> String {
        self.proxy.as_ref().map(Proxy::logs).unwrap_or_default()
    }

    /// The one message Graph took since `before` messages.
    fn only_new(&self, before: usize) -> Sent {
        let sent = self.graph.sent();
        assert_eq!(
            sent.len(),
            before + 1,
            "one new message at Graph; logs:\n{}",
            self.logs()
        );
        sent.last().unwrap().clone()
    }
}

/// Runs `prog args` with `stdin`, killed after 120 s: (success, stdout + stderr).
fn run(prog: &str, args: &[&str], stdin: &[u8], dir: &std::path::Path) -> (bool, String) {
    let mut child = Command::new("timeout")
        .arg("120")
        .arg(prog)
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    let _ = feeder.join();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// Python `smtplib`: log in, send `message` from `from` to `rcpt` (with
/// SMTPUTF8 when asked); prints `ok` or the refusal's code.
const PYTHON_SEND: &str = r#"
import smtplib, sys
port, user, pw, sender, rcpt, path, utf8 = sys.argv[1:8]
msg = open(path, "rb").read()
s = smtplib.SMTP("127.0.0.1", int(port), timeout=120)
s.ehlo("client.example")
s.login(user, pw)
opts = ["SMTPUTF8"] if utf8 == "1" else []
try:
    s.sendmail(sender, rcpt.split(","), msg, mail_options=opts)
    print("ok")
except smtplib.SMTPResponseException as e:
    print("refused", e.smtp_code, e.smtp_error.decode())
except smtplib.SMTPRecipientsRefused as e:
    print("refused", e.recipients)
s.quit()
"#;

fn python_send(w: &GraphWorld, sender: &str, rcpt: &[&str], message: &[u8], utf8: bool) -> String {
    python_send_as(w, (ME, ME_PW), sender, rcpt, message, utf8)
}

fn python_send_as(
    w: &GraphWorld,
    login: (&str, &str),
    sender: &str,
    rcpt: &[&str],
    message: &[u8],
    utf8: bool,
) -> String {
    let path = w.dir.path().join("message.eml");
    std::fs::write(&path, message).unwrap();
    let port = w.port().to_string();
    let rcpt = rcpt.join(",");
    let args = [
        "-c",
        PYTHON_SEND,
        &port,
        login.0,
        login.1,
        sender,
        &rcpt,
        path.to_str().unwrap(),
        if utf8 { "1" } else { "0" },
    ];
    let (ok, out) = run("python3", &args, b"", w.dir.path());
    assert!(ok, "python: {out}\n{}", w.logs());
    out
}

/// The header fields of `m` and its body.
fn split(m: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let end = m
        .windows(4)
        .position(|x| x == b"\r\n\r\n")
        .map(|i| i + 2)
        .expect("a header");
    let mut fields: Vec<Vec<u8>> = Vec::new();
    for line in m[..end].split_inclusive(|b| *b == b'\n') {
        match fields.last_mut() {
            Some(f) if line.starts_with(b" ") || line.starts_with(b"\t") => f.extend_from_slice(line),
            _ => fields.push(line.to_vec()),
        }
    }
    (fields, m[end..].to_vec())
}

fn is_recipient_field(f: &[u8]) -> bool {
    let name = String::from_utf8_lossy(f.split(|b| *b == b':').next().unwrap_or_default()).to_lowercase();
    matches!(name.as_str(), "to" | "cc" | "bcc")
}

/// `got` is `sent` byte for byte, but for the `To`, `Cc` and `Bcc` fields,
/// and Graph delivers to exactly `envelope`.
fn assert_same_but_recipients(sent: &[u8], got: &Sent, envelope: &[&str]) {
    let (a, body_a) = split(sent);
    let (b, body_b) = split(&got.mime);
    assert!(body_a == body_b, "the body arrived changed");
    let others = |f: &Vec<Vec<u8>>| f.iter().filter(|x| !is_recipient_field(x)).cloned().collect::<Vec<_>>();
    assert_eq!(others(&a), others(&b), "the other header fields arrived changed");
    let mut want: Vec<String> = envelope.iter().map(|e| e.to_lowercase()).collect();
    let mut have = got.recipients.clone();
    want.sort();
    have.sort();
    assert_eq!(have, want, "Graph delivers to exactly the envelope");
}

fn message(from: &str, to: &str, extra_headers: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: {to}\r\n{extra_headers}Subject: via Graph\r\nMessage-ID: <{}@test.example>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}",
        rand_id()
    )
    .into_bytes()
}

fn rand_id() -> String {
    use rand::Rng;
    format!("{:016x}", rand::thread_rng().gen::<u64>())
}

/// A multipart message with a text part and a `size`-byte attachment.
fn with_attachment(to: &str, size: usize) -> (Vec<u8>, Vec<u8>) {
    use base64::Engine;
    use rand::RngCore;
    let mut data = vec![0u8; size];
    rand::thread_rng().fill_bytes(&mut data);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
    let mut lines = String::with_capacity(b64.len() + b64.len() / 38);
    for chunk in b64.as_bytes().chunks(76) {
        lines.push_str(std::str::from_utf8(chunk).unwrap());
        lines.push_str("\r\n");
    }
    let m = format!(
        "From: {ME}\r\nTo: {to}\r\nSubject: a large file\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b-{id}\"\r\n\r\n--b-{id}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe file is attached.\r\n--b-{id}\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\nContent-Disposition: attachment; filename=\"data.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{lines}--b-{id}--\r\n",
        id = rand_id()
    );
    (m.into_bytes(), data)
}

/// A draft that arrived without its uploaded attachment: its header and
/// text part as sent, the attachment's bytes identical.
fn assert_large_arrived(sent: &[u8], data: &[u8], got: &Sent, envelope: &[&str]) {
    assert_eq!(got.uploaded.len(), 1, "the attachment went through an upload session");
    assert_eq!(got.uploaded[0].0, "data.bin");
    assert!(got.uploaded[0].1 == data, "the attachment arrived changed");
    let (a, _) = split(sent);
    let (b, body) = split(&got.mime);
    let others = |f: &Vec<Vec<u8>>| f.iter().filter(|x| !is_recipient_field(x)).cloned().collect::<Vec<_>>();
    assert_eq!(others(&a), others(&b));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("The file is attached.\r\n--b-"), "{text}");
    assert!(
        !text.contains("data.bin"),
        "the draft carries no copy of the attachment"
    );
    let mut have = got.recipients.clone();
    have.sort();
    assert_eq!(have, envelope.iter().map(|s| s.to_lowercase()).collect::<Vec<_>>());
}

#[test]
fn python_smtplib_envelope_only_recipient_and_smtputf8() {
    let w = GraphWorld::start("");
    // A recipient only in the envelope (a Bcc the client stripped), and a
    // To address that is not in the envelope: nobody else receives it.
    let m = message(
        ME,
        "Ann <ann@example.com>, Ben <ben@example.com>",
        "Cc: cat@example.com\r\n",
        "Hello.\r\n.dot line\r\n",
    );
    let out = python_send(
        &w,
        ME,
        &["ann@example.com", "hidden@example.net", "cat@example.com"],
        &m,
        false,
    );
    assert!(out.contains("ok"), "{out}");
    let got = w.only_new(0);
    assert_eq!(got.mailbox, ME);
    assert_same_but_recipients(&m, &got, &["ann@example.com", "hidden@example.net", "cat@example.com"]);
    let head = String::from_utf8_lossy(&got.mime);
    assert!(
        head.contains("Cc: cat@example.com\r\n"),
        "a field whose every address stays is unchanged"
    );
    assert!(!head.contains("ben@example.com"), "{head}");

    // SMTPUTF8: an internationalised address in the envelope and the header.
    let to = "jö@bücher.example";
    let m = message(ME, to, "", "Grüße.\r\n");
    let out = python_send(&w, ME, &[to], &m, true);
    assert!(out.contains("ok"), "{out}");
    let got = w.only_new(1);
    assert_same_but_recipients(&m, &got, &[to]);

    // Another sender than the account is refused before any upload.
    let out = python_send(&w, "someone@else.example", &["ann@example.com"], &m, false);
    assert!(
        out.contains("refused 550") && out.contains("sends as me@example.org"),
        "{out}"
    );
    assert_eq!(w.graph.sent().len(), 2);
    let spool = w.dir.state_dir().join("spool");
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "spool files are removed after sending: {left:?}");
}

/// Reads one SMTP reply (all its lines).
fn reply(r: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "connection closed after {all:?}");
        all.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return all;
        }
    }
}

#[test]
fn pipelined_transactions_with_rset_and_bdat() {
    let w = GraphWorld::start("");
    let (mut r, mut s2) = raw_login(w.port(), ME, ME_PW);
    s2.write_all(b"EHLO raw.example\r\n").unwrap();
    let ehlo = reply(&mut r);
    for k in ["PIPELINING", "CHUNKING", "SMTPUTF8", "8BITMIME", "SIZE 36700160"] {
        assert!(ehlo.contains(k), "{k} in {ehlo}");
    }
    // One write: a transaction abandoned by RSET, then one by DATA.
    let first = message(ME, "x@example.com", "", "first\r\n..stuffed\r\n");
    let mut batch = format!("MAIL FROM:<{ME}>\r\nRCPT TO:<dropped@example.com>\r\nRSET\r\nMAIL FROM:<{ME}> BODY=8BITMIME\r\nRCPT TO:<x@example.com>\r\nDATA\r\n").into_bytes();
    batch.extend_from_slice(&first);
    batch.extend_from_slice(b".\r\n");
    s2.write_all(&batch).unwrap();
    let replies: Vec<String> = (0..7).map(|_| reply(&mut r)).collect();
    let codes: Vec<&str> = replies.iter().map(|x| &x[..3]).collect();
    assert_eq!(codes, ["250", "250", "250", "250", "250", "354", "250"], "{replies:?}");
    let got = w.only_new(0);
    let unstuffed = String::from_utf8_lossy(&first).replace("\r\n..stuffed", "\r\n.stuffed");
    assert_same_but_recipients(unstuffed.as_bytes(), &got, &["x@example.com"]);

    // BDAT in two chunks, pipelined with its MAIL and RCPT.
    let m = message(ME, "y@example.com", "", "chunked\r\n");
    let (a, b) = m.split_at(40);
    let mut batch = format!("MAIL FROM:<{ME}>\r\nRCPT TO:<y@example.com>\r\nBDAT {}\r\n", a.len()).into_bytes();
    batch.extend_from_slice(a);
    batch.extend_from_slice(format!("BDAT {} LAST\r\n", b.len()).as_bytes());
    batch.extend_from_slice(b);
    s2.write_all(&batch).unwrap();
    let replies: Vec<String> = (0..4).map(|_| reply(&mut r)).collect();
    assert!(replies.iter().all(|x| x.starts_with("250")), "{replies:?}");
    assert_same_but_recipients(&m, &w.only_new(1), &["y@example.com"]);
    // The spool cannot be written: the message is answered 451 at its end,
    // and the session goes on.
    let spool = w.dir.state_dir().join("spool");
    std::fs::remove_dir(&spool).unwrap();
    std::fs::write(&spool, "in the way").unwrap();
    let mut batch = format!("MAIL FROM:<{ME}>\r\nRCPT TO:<y@example.com>\r\nDATA\r\n").into_bytes();
    batch.extend_from_slice(&m);
    batch.extend_from_slice(b".\r\nNOOP\r\n");
    s2.write_all(&batch).unwrap();
    let replies: Vec<String> = (0..5).map(|_| reply(&mut r)).collect();
    assert!(
        replies[3].starts_with("451 4.3.0 mailproxy could not store the message"),
        "{replies:?}"
    );
    assert!(replies[4].starts_with("250"), "{replies:?}");
    assert_eq!(w.graph.sent().len(), 2);
    std::fs::remove_file(&spool).unwrap();
    s2.write_all(b"QUIT\r\n").unwrap();
    assert!(reply(&mut r).starts_with("221"));
}

/// The proxy's peak resident memory (`VmHWM`), in KiB.
fn peak_rss_kib(w: &GraphWorld) -> u64 {
    let pid = w.proxy.as_ref().unwrap().pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn large_attachments_go_through_upload_sessions() {
    // Exchange counts the encoded message: a 30 MB file is 41 MB in base64.
    let w = GraphWorld::start("[limits]\nmax_send_size = 47185920\n");
    // A first small message: the login's password KDF sets the baseline.
    let m = message(ME, "big@example.com", "", "small first\r\n");
    assert!(python_send(&w, ME, &["big@example.com"], &m, false).contains("ok"));
    let peak_before = peak_rss_kib(&w);
    for (i, mb) in [10usize, 30].into_iter().enumerate() {
        let i = i + 1;
        let (m, data) = with_attachment("big@example.com", mb * 1024 * 1024);
        let out = python_send(&w, ME, &["big@example.com"], &m, false);
        assert!(out.contains("ok"), "{mb} MB: {out}");
        assert_large_arrived(&m, &data, &w.only_new(i), &["big@example.com"]);
    }
    // The 41 MB message went through a spool file: the proxy's peak memory
    // grew by far less than the message.
    let grown = peak_rss_kib(&w) - peak_before;
    assert!(grown < 20 * 1024, "the proxy's peak RSS grew by {grown} KiB");
    let (largest, refused) = w.graph.request_sizes();
    assert!(largest <= crate::support::graph::MAX_REQUEST, "{largest}");
    assert_eq!(refused, 0);
    // Over max_send_size: refused at MAIL FROM with SIZE, before any upload.
    let (m, _) = with_attachment("big@example.com", 35 * 1024 * 1024);
    let out = python_send(&w, ME, &["big@example.com"], &m, false);
    assert!(out.contains("refused 552"), "{out}");
    assert_eq!(w.graph.sent().len(), 3);
}

#[test]
fn msmtp_sees_451_on_throttling_and_succeeds_on_retry() {
    let w = GraphWorld::start("");
    let rc = format!(
        "defaults\nlogfile -\naccount graph\nhost 127.0.0.1\nport {}\nauth plain\nuser {ME}\npassword {ME_PW}\nfrom {ME}\ntls off\naccount default : graph\n",
        w.port()
    );
    let rc_path = w.dir.path().join("msmtprc");
    std::fs::write(&rc_path, rc).unwrap();
    std::fs::set_permissions(&rc_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let m = message(ME, "friend@example.com", "", "sent by msmtp\r\n");
    w.graph.fail_next(1, 429, Some(7), "ApplicationThrottled");
    let args = ["-C", rc_path.to_str().unwrap(), "friend@example.com"];
    let (ok, out) = run("msmtp", &args, &m, w.dir.path());
    assert!(!ok, "{out}");
    assert!(out.contains("451 4.7.0") && out.contains("try again in 7 s"), "{out}");
    assert!(w.graph.sent().is_empty());
    let (ok, out) = run("msmtp", &args, &m, w.dir.path());
    assert!(ok, "{out}\n{}", w.logs());
    assert_same_but_recipients(&m, &w.only_new(0), &["friend@example.com"]);
    // A missing consent names Mail.Send and how to grant it.
    w.graph.fail_next(1, 403, None, "ErrorAccessDenied");
    let (ok, out) = run("msmtp", &args, &m, w.dir.path());
    assert!(!ok);
    assert!(
        out.contains("550 5.7.1") && out.contains("Mail.Send") && out.contains("mailproxy login"),
        "{out}"
    );
    // A recipient Graph rejects, and a request too large for it.
    for (status, code, want) in [
        (400, "ErrorInvalidRecipients", "550 5.1.1"),
        (413, "ErrorMessageSizeExceeded", "552 5.3.4"),
    ] {
        w.graph.fail_next(1, status, None, code);
        let (ok, out) = run("msmtp", &args, &m, w.dir.path());
        assert!(!ok && out.contains(want), "{status}: {out}");
    }
    let rejected = run("msmtp", &args, &m, w.dir.path());
    assert!(rejected.0, "the next try goes through: {}", rejected.1);
    assert_eq!(w.graph.sent().len(), 2);
    // A token Graph refuses: one refresh and the retry succeeds.
    w.graph.fail_next(1, 401, None, "InvalidAuthenticationToken");
    let (ok, out) = run("msmtp", &args, &m, w.dir.path());
    assert!(ok, "{out}");
    assert_eq!(w.graph.sent().len(), 3);
    let audit = std::fs::read_to_string(w.dir.state_dir().join("audit.log")).unwrap_or_default();
    assert!(
        audit.contains("graph_send") && audit.contains("refused (throttled)"),
        "{audit}"
    );
    assert!(
        !audit.contains("sent by msmtp"),
        "no message content in the audit trail"
    );
}

#[test]
fn git_send_email_and_phpmailer() {
    let w = GraphWorld::start("");
    let repo = w.dir.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let (ok, out) = run("git", args, b"", &repo);
        assert!(ok, "git {args:?}: {out}");
        out
    };
    git(&["init", "-q"]);
    git(&["config", "user.email", ME]);
    git(&["config", "user.name", "Me"]);
    std::fs::write(repo.join("a.txt"), "one\n").unwrap();
    git(&["add", "a.txt"]);
    git(&["commit", "-qm", "a change"]);
    let port = w.port().to_string();
    let user = format!("--smtp-user={ME}");
    let pass = format!("--smtp-pass={ME_PW}");
    let server_port = format!("--smtp-server-port={port}");
    git(&[
        "send-email",
        "--confirm=never",
        "--quiet",
        "--smtp-server=127.0.0.1",
        &server_port,
        &user,
        &pass,
        "--smtp-encryption=none",
        "--to=list@example.com",
        "--bcc=quiet@example.com",
        "-1",
    ]);
    let got = w.only_new(0);
    let mut have = got.recipients.clone();
    have.sort();
    // git adds the author as Cc; the envelope has everyone it sent to.
    assert!(
        have.contains(&"list@example.com".to_string()) && have.contains(&"quiet@example.com".to_string()),
        "{have:?}"
    );
    assert!(String::from_utf8_lossy(&got.mime).contains("Subject: [PATCH] a change"));

    let php = format!(
        "<?php\nrequire '/usr/share/php/libphp-phpmailer/autoload.php';\nuse PHPMailer\\PHPMailer\\PHPMailer;\n$mail = new PHPMailer(true);\n$mail->isSMTP();\n$mail->Host = '127.0.0.1';\n$mail->Port = {port};\n$mail->SMTPAuth = true;\n$mail->SMTPSecure = '';\n$mail->SMTPAutoTLS = false;\n$mail->Username = '{ME}';\n$mail->Password = '{ME_PW}';\n$mail->setFrom('{ME}');\n$mail->addAddress('friend@example.com');\n$mail->addBCC('hidden@example.com');\n$mail->Subject = 'Sent with PHPMailer';\n$mail->Body = 'Hello from PHP.';\n$mail->send();\necho \"sent\\n\";\n"
    );
    let script = w.dir.path().join("send.php");
    std::fs::write(&script, php).unwrap();
    let (ok, out) = run("php", &[script.to_str().unwrap()], b"", w.dir.path());
    assert!(ok && out.contains("sent"), "{out}");
    let got = w.only_new(1);
    let mut have = got.recipients.clone();
    have.sort();
    assert_eq!(have, ["friend@example.com", "hidden@example.com"]);
}

/// Graph sessions count among the account's SMTP sessions in `accounts`,
/// without the account's limit (Graph throttles requests, not sessions):
/// two at once under a limit of one, and none once they have ended.
#[test]
fn graph_sessions_are_counted_without_a_limit() {
    use crate::support::mailproxy::run;
    let w = GraphWorld::start("max_upstream_sessions = 1\n");
    let smtp_row = || {
        let (code, out, err) = run(&w.dir, &["accounts"], "");
        assert_eq!(code, 0, "{err}");
        out.lines()
            .find(|l| l.starts_with(ME))
            .unwrap_or_else(|| panic!("{ME} in {out}"))
            .to_string()
    };
    let first = raw_login(w.port(), ME, ME_PW);
    let mut second = raw_login(w.port(), ME, ME_PW);
    assert!(smtp_row().contains("  SMTP 2, no limit"), "{}", smtp_row());
    second.1.write_all(b"QUIT\r\n").unwrap();
    assert!(reply(&mut second.0).starts_with("221"));
    drop((first, second));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !smtp_row().contains("  SMTP 0, no limit") {
        assert!(std::time::Instant::now() < deadline, "{}", smtp_row());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_shared_mailbox_sends_with_its_delegates_grant() {
    let w = GraphWorld::start(&format!("[accounts.\"{SHARED}\"]\ntoken_from = \"{ME}\"\n"));
    let (code, _, err) = crate::support::mailproxy::run(&w.dir, &["login", SHARED], &format!("{SHARED_PW}\n"));
    assert_eq!(code, 0, "{err}");
    // The grant is sealed under ME's password: ME logs in once to open it.
    let m = message(ME, "a@example.com", "", "unlock\r\n");
    assert!(python_send(&w, ME, &["a@example.com"], &m, false).contains("ok"));
    let m = message(SHARED, "team@example.com", "", "from the shared mailbox\r\n");
    let out = python_send_as(&w, (SHARED, SHARED_PW), SHARED, &["team@example.com"], &m, false);
    assert!(out.contains("ok"), "{out}\n{}", w.logs());
    let got = w.only_new(1);
    assert_eq!(got.mailbox, SHARED, "sent as /users/{SHARED}");
    assert_same_but_recipients(&m, &got, &["team@example.com"]);
}

/// A session logged in over `port` as `user`: the reader after `235`.
fn raw_login(port: u16, user: &str, pw: &str) -> (BufReader<TcpStream>, TcpStream) {
    use base64::Engine;
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut s2 = s;
    assert!(reply(&mut r).starts_with("220"));
    s2.write_all(b"EHLO raw.example\r\n").unwrap();
    reply(&mut r);
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pw}"));
    s2.write_all(format!("AUTH PLAIN {plain}\r\n").as_bytes()).unwrap();
    let auth = reply(&mut r);
    assert!(auth.starts_with("235"), "{auth}");
    (r, s2)
}

/// One message from `user` over a raw session; the final reply.
fn raw_send(port: u16, user: &str, pw: &str, to: &str) -> String {
    let (mut r, mut s) = raw_login(port, user, pw);
    let mut batch = format!("MAIL FROM:<{user}>\r\nRCPT TO:<{to}>\r\nDATA\r\n").into_bytes();
    batch.extend_from_slice(&message(user, to, "", "one of many\r\n"));
    batch.extend_from_slice(b".\r\nQUIT\r\n");
    s.write_all(&batch).unwrap();
    let replies: Vec<String> = (0..4).map(|_| reply(&mut r)).collect();
    replies[3].clone()
}

const DANA: &str = "dana@example.org";
const DANA_PW: &str = "dana local pw";

/// One account, two resources: an IMAP login holds a mail token, a Graph
/// submission a Graph token (two audiences from one refresh token); after
/// both expire, 20 IMAP logins and 20 submissions at once cause one
/// refresh per resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_refresh_token_two_audiences_each_refreshed_once() {
    use crate::support::world::{login_ok, World};
    let mut graph = None;
    let mut w = World::with(|env, _| {
        let g = FakeGraph::start(env.provider.token_view());
        let d = &env.dovecot;
        let imap = format!("imaps://localhost:{}", d.imaps_port);
        let cfg = crate::support::mailproxy::oauth_account(DANA, &env.provider, d, &imap)
            .trim_end()
            .to_string()
            + &format!(
                "\ngraph_scopes = [\"{GRAPH_SCOPE}\", \"offline_access\"]\nsmtp = \"{}\"\n\n[smtp]\nlisten = \"127.0.0.1:0\"\n",
                g.smtp_setting()
            );
        graph = Some(g);
        cfg
    });
    let graph = graph.unwrap();
    w.authorise(DANA, DANA_PW);
    let imap_port = w.start();
    let smtp_port = w.proxy.as_ref().unwrap().smtp.unwrap().port();
    let view = w.env.provider.token_view();
    let scope_of = |t: &str| view.live(t).map(|(_, s)| s).unwrap_or_default();

    drop(login_ok(imap_port, DANA, DANA_PW).await);
    let r = tokio::task::spawn_blocking(move || raw_send(smtp_port, DANA, DANA_PW, "x@example.com"))
        .await
        .unwrap();
    assert!(r.starts_with("250"), "{r}");
    let seen = graph.tokens_seen();
    let graph_token = seen.last().unwrap().clone();
    assert_eq!(audience(&scope_of(&graph_token)), Some(GRAPH_SCOPE));
    let user = view.live(&graph_token).unwrap().0;
    let mail_tokens: Vec<String> = w
        .env
        .provider
        .access_tokens_of(&user)
        .into_iter()
        .filter(|t| audience(&scope_of(t)) == Some("https://mail.example.org/"))
        .collect();
    assert!(!mail_tokens.is_empty(), "an IMAP token of the mail audience");
    assert!(!mail_tokens.contains(&graph_token));

    w.env.provider.expire_all_access_tokens();
    let before = w.env.provider.refreshes();
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(tokio::spawn(async move {
            drop(login_ok(imap_port, DANA, DANA_PW).await);
        }));
        tasks.push(tokio::spawn(async move {
            let to = format!("r{i}@example.com");
            let r = tokio::task::spawn_blocking(move || raw_send(smtp_port, DANA, DANA_PW, &to))
                .await
                .unwrap();
            assert!(r.starts_with("250"), "{r}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(w.env.provider.refreshes() - before, 2, "one refresh per resource");
    assert_eq!(graph.sent().len(), 21);
}

const APP: &str = "app@example.org";

/// A `client_credentials` account sends through Graph with an app token
/// of Graph's audience; `mailproxy token --resource graph` hands out the
/// Graph token, `--resource mail` the mail one.
#[test]
fn an_app_account_sends_and_tokens_are_handed_out_per_resource() {
    let mut w = GraphWorld::start("");
    let cfg = std::fs::read_to_string(w.dir.config_path()).unwrap();
    let app = graph_account(APP, &w._provider, &w.graph).replace(
        "provider = \"custom\"\n",
        "provider = \"custom\"\nflow = \"client_credentials\"\n",
    );
    let app = app.replace(
        "\"https://mail.example.org/\", \"offline_access\"",
        "\"https://mail.example.org/.default\"",
    );
    let app = app.replace(
        &format!("[\"{GRAPH_SCOPE}\", \"offline_access\"]"),
        &format!("[\"{GRAPH_SCOPE}\"]"),
    );
    w.dir.write_config(&(cfg + &app));
    w.proxy.take().unwrap().stop();
    // App-only tokens carry the mailbox the app was granted.
    w._provider.set_default_user(APP);
    let (code, _, err) = crate::support::mailproxy::run(&w.dir, &["login", APP], "app local pw\n");
    assert_eq!(code, 0, "{err}");
    w.proxy = Some(Proxy::start(&w.dir));
    let m = message(APP, "b@example.com", "", "from the app\r\n");
    let out = python_send_as(&w, (APP, "app local pw"), APP, &["b@example.com"], &m, false);
    assert!(out.contains("ok"), "{out}\n{}", w.logs());
    let got = w.only_new(0);
    assert_eq!(got.mailbox, APP);
    assert_same_but_recipients(&m, &got, &["b@example.com"]);

    // The owner's own clients: each resource's token, through serve.
    let view = w._provider.token_view();
    for (resource, want) in [("graph", GRAPH_SCOPE), ("mail", "https://mail.example.org/")] {
        let args = ["token", ME, "--resource", resource, "--json"];
        let (code, out, err) = crate::support::mailproxy::run(&w.dir, &args, &format!("{ME_PW}\n"));
        assert_eq!(code, 0, "{resource}: {err}");
        let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let token = j["access_token"].as_str().unwrap();
        let (_, scope) = view.live(token).expect("a live token");
        assert_eq!(audience(&scope), Some(want), "{resource}: {scope}");
    }
    let (code, _, err) = crate::support::mailproxy::run(&w.dir, &["token", ME, "--resource", "graph"], "");
    assert_eq!(code, 0, "the Graph token is cached now: {err}");
    // `accounts` shows both tokens' expiry.
    let (code, out, _) = crate::support::mailproxy::run(&w.dir, &["accounts"], "");
    assert_eq!(code, 0);
    let row = out.lines().find(|l| l.starts_with(ME)).unwrap();
    assert!(row.contains("(Graph in "), "{out}");
}
