//! A private HAProxy from Debian's package in TCP mode: one loopback
//! frontend per [`Frontend`], each balancing round-robin over its backend
//! ports, optionally with a PROXY protocol v2 header (`send-proxy-v2`).
//! Killed on drop, and with the test process.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One listening port of the balancer and where it sends connections.
pub struct Frontend {
    pub backends: Vec<u16>,
    /// Prepend a PROXY protocol v2 header to every backend connection.
    pub send_proxy_v2: bool,
}

pub struct HaProxy {
    child: Child,
    /// The frontends' ports, in the order they were given.
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

pub fn bin() -> &'static str {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("HAProxy is missing: run scripts/install-deps, which installs Debian's haproxy package")
}

impl HaProxy {
    /// One frontend in front of `backend`, with a PROXY v2 header.
    pub fn start(backend: u16) -> HaProxy {
        HaProxy::start_with(
            &[Frontend {
                backends: vec![backend],
                send_proxy_v2: true,
            }],
            64,
        )
    }

    /// `maxconn` must stay under the open-files limit: HAProxy refuses to
    /// start otherwise.
    pub fn start_with(frontends: &[Frontend], maxconn: usize) -> HaProxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = super::dovecot::free_ports(frontends.len());
        let mut cfg = format!(
            "global\n  maxconn {maxconn}\n\ndefaults\n  mode tcp\n  maxconn {maxconn}\n  \
             timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\n"
        );
        for (i, (f, port)) in frontends.iter().zip(&ports).enumerate() {
            cfg += &format!(
                "frontend f{i}\n  bind 127.0.0.1:{port}\n  default_backend b{i}\n\nbackend b{i}\n  balance roundrobin\n"
            );
            let send = if f.send_proxy_v2 { " send-proxy-v2" } else { "" };
            for (j, b) in f.backends.iter().enumerate() {
                cfg += &format!("  server s{j} 127.0.0.1:{b}{send}\n");
            }
            cfg += "\n";
        }
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let mut cmd = Command::new(bin());
        cmd.args(["-db", "-f"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = super::process::spawn_tied_to_process(cmd, libc::SIGKILL).expect("start haproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in &ports {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "haproxy did not start listening on {port}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        HaProxy {
            child,
            ports,
            _dir: dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.ports[0]
    }

    /// The benchmark measures HAProxy's CPU time; no test needs its pid.
    #[allow(dead_code, reason = "only the benchmark uses it")]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
