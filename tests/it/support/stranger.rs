//! Another local user, played by a small Python program run under the
//! `nobody` uid: it binds, connects and relays as a hostile neighbour on the
//! same machine would.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// The uid and gid the stranger runs as.
pub const NOBODY: u32 = 65534;

const SCRIPT: &str = r#"
import socket, sys, json, time
mode = sys.argv[1]

def say(**kw):
    print(json.dumps(kw), flush=True)

def read_head(c):
    data = b""
    while b"\r\n\r\n" not in data:
        d = c.recv(65536)
        if not d:
            break
        data += d
    return data

def answer(host, port, raw):
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(raw)
        out = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            out += d
        s.close()
        return out.decode(errors="replace")
    except OSError as e:
        return "error %s" % e

if mode == "squat":
    # Listen on [::1]:PORT and relay whatever arrives to 127.0.0.1:PORT.
    port = int(sys.argv[2])
    s = socket.socket(socket.AF_INET6)
    try:
        s.bind(("::1", port))
        s.listen(16)
    except OSError as e:
        say(bound=False, errno=e.errno)
        sys.exit(0)
    say(bound=True)
    while True:
        c, _ = s.accept()
        head = read_head(c)
        say(got=head.split(b"\r\n")[0].decode(errors="replace"))
        back = answer("127.0.0.1", port, head)
        c.sendall(back.encode())
        c.close()
elif mode == "request":
    # One raw request; prints the status line.
    host, port, raw = sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()
    out = answer(host, port, raw)
    say(status=out.split("\r\n")[0], body=out[-300:])
elif mode == "greeting":
    # Connects to a mail listener and prints its first line.
    host, port = sys.argv[2], int(sys.argv[3])
    s = socket.create_connection((host, port), timeout=10)
    say(line=s.makefile("rb").readline().decode(errors="replace").rstrip("\r\n"))
elif mode == "flood":
    # N connections from 127.0.0.0-127.0.3.255 guess an IMAP account's
    # password for the given seconds, then print what they were told.
    import threading
    port, n, account, secs = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
    stop = time.time() + secs
    seen = {"ok": 0, "no": 0, "busy": 0, "other": 0}
    lock = threading.Lock()
    def guesser(i):
        src = "127.0.%d.%d" % ((i // 250) % 4, 2 + i % 250)
        k = 0
        while time.time() < stop:
            try:
                s = socket.socket()
                s.settimeout(30)
                s.bind((src, 0))
                s.connect(("127.0.0.1", port))
                f = s.makefile("rb")
                f.readline()
                while time.time() < stop:
                    k += 1
                    s.sendall(('g LOGIN "%s" "guess %d %d"\r\n' % (account, i, k)).encode())
                    line = f.readline().decode(errors="replace")
                    if not line:
                        break
                    kind = "ok" if line.startswith("g OK") else "busy" if "busy" in line else "no" if line.startswith("g NO") else "other"
                    with lock:
                        seen[kind] += 1
                s.close()
            except OSError:
                time.sleep(0.05)
    threads = [threading.Thread(target=guesser, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    say(started=n)
    for t in threads:
        t.join(secs + 40)
    say(**seen)
elif mode == "control":
    # One request line to a unix socket; prints the first reply line.
    path, line = sys.argv[2], sys.argv[3]
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        say(reply=s.makefile("rb").readline().decode(errors="replace").strip())
    except OSError as e:
        say(error=str(e))
elif mode == "hold":
    # Opens N connections and sends half a request on each, then waits.
    host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    held = []
    for _ in range(n):
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"GET /status.json HTTP/1.1\r\nHost: x")
        held.append(s)
    say(held=len(held))
    time.sleep(60)
"#;

/// A stranger's process; killed when dropped.
pub struct Stranger {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Stranger {
    pub fn run(args: &[&str]) -> Stranger {
        let mut child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(SCRIPT)
            .args(args)
            .uid(NOBODY)
            .gid(NOBODY)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run python3 as nobody");
        let out = BufReader::new(child.stdout.take().unwrap());
        Stranger { child, out }
    }

    /// The next line it printed, as JSON (`None` once it ended).
    pub fn next(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        (self.out.read_line(&mut line).ok()? > 0).then(|| serde_json::from_str(&line).expect("stranger's JSON line"))
    }

    /// One raw HTTP request to `host:port` as the stranger: the status line.
    pub fn request(host: &str, port: u16, raw: &str) -> String {
        let mut s = Stranger::run(&["request", host, &port.to_string(), raw]);
        let v = s.next().expect("the stranger's answer");
        format!(
            "{} {}",
            v["status"].as_str().unwrap_or(""),
            v["body"].as_str().unwrap_or("")
        )
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `f` holds (or `secs` pass); whether it did.
pub fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
