//! mailproxy: a local authenticating proxy that lets legacy IMAP, SMTP and
//! POP3 clients log in with a local password while it authenticates upstream
//! with OAuth 2.0 (XOAUTH2 / OAUTHBEARER).
//!
//! Layout: protocol code is pure and I/O-free (`imap`, `smtp`, `pop3`,
//! `sasl`, with their shared contract in `preauth`); the token lifecycle
//! lives in `tokens`; I/O sits at the edges (`net`, `proxy`, `upstream`,
//! `server`, `oauth`). Modules are public only where the binary, the fuzz
//! targets or the benchmark use them.
//!
//! The `mailproxy` binary's commands live in `cli`.
//!
//! Layers, top to bottom: a module uses only modules on the lines below
//! its own, so no `use` points up and no modules import each other in a
//! ring.
//!
//! ```text
//! cli                                    the `mailproxy` commands
//! server                                 `serve`: listeners, limits, reload, shutdown
//! control  web                            control socket; status page and metrics listener
//! proxy                                  client sessions: driver, route, guard, relay
//! tokens                                 token lifecycle; `tokens::identity` checks grants
//! upstream  misconnect                   the server's side: connection, login clients, retry, Graph
//! imap smtp pop3  metrics  oauth store tls
//! preauth sasl  vault  setup service
//! linebuf  config  crypto keystore net http
//! endpoint text secret sys sync audit notify proxy_header
//! ```

pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod crypto;
pub mod endpoint;
pub(crate) mod http;
pub mod imap;
pub mod keystore;
mod linebuf;
pub(crate) mod metrics;
pub(crate) mod misconnect;
pub(crate) mod net;
pub mod notify;
pub mod oauth;
pub mod pop3;
pub mod preauth;
pub(crate) mod proxy;
pub mod proxy_header;
pub mod sasl;
pub mod secret;
pub mod server;
pub mod service;
pub mod setup;
pub mod smtp;
pub mod store;
pub(crate) mod sync;
pub(crate) mod sys;
pub mod text;
pub mod tls;
pub mod tokens;
pub(crate) mod upstream;
pub mod vault;
pub(crate) mod web;
