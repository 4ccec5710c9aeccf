//! The systemd readiness protocol (`sd_notify`): under `Type=notify`,
//! `serve` says READY once its listeners are bound, RELOADING/READY around
//! a config reload and STOPPING at shutdown. One datagram to the socket in
//! `NOTIFY_SOCKET`; without it, nothing happens.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1\nSTATUS=…`) to the service manager, if
/// there is one. Failures are logged, never fatal.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)?;
        }
        #[cfg(not(target_os = "linux"))]
        Some(_) => return Err(std::io::Error::other("abstract sockets exist only on Linux")),
        None => {
            sock.send_to(state.as_bytes(), path)?;
        }
    }
    Ok(())
}

/// Under systemd, stderr goes to the journal, which stamps every line itself.
pub fn journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}
