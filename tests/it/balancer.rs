//! Behind a real HAProxy (Debian's package) in TCP mode with
//! `send-proxy-v2`: the per-address limit and the log see the client's
//! address, not the balancer's; connections that do not come from a
//! trusted balancer, or come without a PROXY header, are refused.

use std::time::Duration;

use crate::support::haproxy::HaProxy;
use crate::support::hostile_util::{connect_from, first_line};
use crate::support::mailproxy::{Proxy, ProxyDir};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_limits_and_logs_see_the_client() {
    let dir = ProxyDir::new();
    let cfg = dir.header().replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nproxy_protocol = true\nproxy_trusted = [\"127.0.0.1\"]\n",
    );
    dir.write_config(&format!("{cfg}[limits]\nmax_connections_per_ip = 1\n"));
    let proxy = Proxy::start(&dir);
    let ha = HaProxy::start(proxy.imap_port());
    let limit = Duration::from_secs(10);

    // Through the balancer from 127.0.0.2: the greeting, and the log names
    // the client, not the balancer.
    let mut first = connect_from([127, 0, 0, 2], ha.port()).await.unwrap();
    assert!(
        first_line(&mut first, limit).await.starts_with("* OK"),
        "{}",
        proxy.logs()
    );
    assert!(proxy.wait_log("client=127.0.0.2:"), "{}", proxy.logs());

    // The per-address limit (1) counts that client, not HAProxy: a second
    // connection from it is refused, one from another client is not.
    let mut second = connect_from([127, 0, 0, 2], ha.port()).await.unwrap();
    assert_eq!(
        first_line(&mut second, limit).await,
        "* BYE [UNAVAILABLE] too many connections from your address"
    );
    let mut other = connect_from([127, 0, 0, 3], ha.port()).await.unwrap();
    assert!(
        first_line(&mut other, limit).await.starts_with("* OK"),
        "{}",
        proxy.logs()
    );
    assert!(proxy.wait_log("client=127.0.0.3:"), "{}", proxy.logs());

    // Straight to the proxy from the trusted balancer's address but without
    // a header: refused, not greeted.
    let mut bare = connect_from([127, 0, 0, 1], proxy.imap_port()).await.unwrap();
    bare.write_all(b"a1 CAPABILITY\r\n").await.unwrap();
    assert_eq!(first_line(&mut bare, limit).await, "");
    // From an address that is no trusted balancer, even with a header
    // claiming to be someone else: refused.
    let mut forged = connect_from([127, 0, 0, 9], proxy.imap_port()).await.unwrap();
    let mut h = mailproxy::proxy_header::SIGNATURE.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 1, 127, 0, 0, 1, 0x9c, 0x40, 0x04, 0x77]);
    forged.write_all(&h).await.unwrap();
    assert_eq!(first_line(&mut forged, limit).await, "");
    // The refusals are logged as the connections close: wait for the lines.
    assert!(proxy.wait_log("without a valid PROXY header"), "{}", proxy.logs());
    assert!(proxy.wait_log("not a trusted balancer"), "{}", proxy.logs());
    let logs = proxy.logs();
    assert!(
        !logs.contains("client=10.0.0.1"),
        "a forged header was believed:\n{logs}"
    );
    drop((first, other));
}
