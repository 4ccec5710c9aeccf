//! `mailproxy open`: the status page in the browser, found in the config,
//! so nobody has to remember its port.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Result};

use crate::config::Config;
use crate::setup::DEFAULT_STATUS;

use super::terminal::try_open_browser;

/// Prints the status page's address and opens it; without one, or without
/// a browser to start, says what to set.
pub fn run(config: &Config) -> Result<u8> {
    let Some(addr) = config.status_listen else {
        bail!(
            "the status page is off: set status_listen = \"{DEFAULT_STATUS}\" under [server] in {}, then restart mailproxy (`systemctl --user restart mailproxy`, or stop and start `mailproxy serve`)",
            config.path.display()
        );
    };
    let url = format!("http://{addr}/");
    println!("{url}");
    if !answers(addr) {
        eprintln!(
            "Nothing answers at {addr} yet: start mailproxy (`mailproxy service install`, or `mailproxy serve`), then reload the page."
        );
    }
    if let Err(e) = try_open_browser(&url) {
        bail!("{e:#}; or open {url} yourself");
    }
    Ok(0)
}

/// Whether something listens at the status page's address.
fn answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}
