//! The integration tests, in one binary: a module per area, run against the
//! real `mailproxy` binary. [`support`] is their shared harness (fake OAuth
//! provider, private Dovecot, PostgreSQL and HAProxy, test PKI, raw clients).

mod balancer;
mod clients;
mod control;
mod deb;
mod fleet;
mod graph;
mod harness;
mod hostile;
mod imap;
mod kdf_bounds;
mod lifecycle;
mod limits;
mod login_wait;
mod owner;
mod peers;
mod pop3;
mod providers;
mod retry;
mod secrets;
mod service;
mod session_limit;
mod setup;
mod smtp;
mod soak;
mod status_page;
mod support;
mod token;
