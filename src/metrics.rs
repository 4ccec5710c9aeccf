//! Prometheus metrics: the counters and gauges, in one process-wide
//! registry, so each hook where something happens is one line
//! (`metrics::login(…)`). Gauges that describe state (token expiry, KDF
//! queue, the token store) are set at scrape time by the endpoint that
//! serves them (`web::metrics`), which reads the running proxy; this module
//! knows nothing of it. No label carries a secret: account names,
//! protocols, providers and outcome words only.

use std::sync::LazyLock;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::config::OAuthSettings;
use crate::endpoint::Protocol;
use crate::preauth::Failure;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Proto {
    imap,
    smtp,
    pop3,
}

impl From<Protocol> for Proto {
    fn from(p: Protocol) -> Proto {
        match p {
            Protocol::Imap => Proto::imap,
            Protocol::Smtp => Proto::smtp,
            Protocol::Pop3 => Proto::pop3,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    protocol: Proto,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginLabels {
    protocol: Proto,
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    provider: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtoLabels {
    protocol: Proto,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    protocol: Proto,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MisconnectLabels {
    listener: Proto,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    /// The HTTP status, or 0 when no answer came.
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountProtoLabels {
    account: String,
    protocol: Proto,
}

/// Declares the metrics once: each field with its type, first value, name
/// and help, so a field cannot be added without being registered.
macro_rules! metrics {
    ($($field:ident: $ty:ty = $init:expr, $name:literal, $help:literal;)*) => {
        struct Metrics {
            registry: Registry,
            $($field: $ty,)*
        }

        static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
            let mut registry = Registry::with_prefix("mailproxy");
            $(
                let $field: $ty = $init;
                registry.register($name, $help, $field.clone());
            )*
            Metrics { registry, $($field,)* }
        });
    };
}

metrics! {
    connections: Family<ConnLabels, Counter> = Family::default(), "connections",
        "Client connections by protocol and outcome (accepted, refused, proxy_refused, relayed)";
    logins: Family<LoginLabels, Counter> = Family::default(), "logins",
        "Client logins by protocol, outcome (ok, failed) and failure class";
    refreshes: Family<RefreshLabels, Counter> = Family::default(), "refreshes",
        "Token refreshes by provider and outcome (ok, shared = another instance's token used, failed, needs_login, store_unavailable)";
    sessions: Family<ProtoLabels, Gauge> = Family::default(), "sessions_open", "Client sessions open now";
    bytes: Family<BytesLabels, Counter> = Family::default(), "relayed_bytes",
        "Bytes relayed after login, by protocol and direction (up = to the server)";
    misconnects: Family<MisconnectLabels, Counter> = Family::default(), "misconnects",
        "Clients that connected the wrong way, closed with a warning in the log, by listener and kind (tls_on_plaintext: a TLS handshake on a plaintext or STARTTLS listener; plaintext_on_tls: plaintext, or silence, on an implicit-TLS listener)";
    expiry: Family<AccountLabels, Gauge> = Family::default(), "token_expiry_seconds",
        "Seconds until each account's access token expires (negative: expired)";
    upstream_sessions: Family<AccountProtoLabels, Gauge> = Family::default(), "upstream_sessions",
        "Upstream sessions open now, by account of the config and protocol";
    upstream_limit: Family<AccountProtoLabels, Gauge> = Family::default(), "upstream_session_limit",
        "The account's limit of upstream sessions per protocol (max_upstream_sessions; no series: no limit)";
    kdf_waiting: Gauge = Gauge::default(), "kdf_waiting", "Password checks waiting for their turn";
    kdf_in_flight: Gauge = Gauge::default(), "kdf_in_flight", "Password KDF runs in progress";
    kdf_runs: Gauge = Gauge::default(), "kdf_runs", "Password KDF runs since start";
    store_up: Gauge = Gauge::default(), "token_store_up", "1 when the token store answered the last check";
    graph_requests: Family<StatusLabels, Counter> = Family::default(), "graph_requests",
        "Requests to Microsoft Graph (accounts with smtp = \"graph\") by HTTP status (0: no answer)";
    graph_bytes: Counter = Counter::default(), "graph_sent_bytes", "Request bytes sent to Microsoft Graph";
    graph_seconds: Histogram = Histogram::new(exponential_buckets(0.01, 2.0, 14)), "graph_request_seconds",
        "How long requests to Microsoft Graph took";
}

/// One request to Microsoft Graph: its status (0: none), bytes and time.
pub fn graph_request(status: u16, sent: u64, took: std::time::Duration) {
    METRICS.graph_requests.get_or_create(&StatusLabels { status }).inc();
    METRICS.graph_bytes.inc_by(sent);
    METRICS.graph_seconds.observe(took.as_secs_f64());
}

pub fn connection(p: Protocol, outcome: &'static str) {
    METRICS
        .connections
        .get_or_create(&ConnLabels {
            protocol: p.into(),
            outcome,
        })
        .inc();
}

/// A login's outcome: `None` = success, else its failure class.
pub fn login(p: Protocol, failure: Option<Failure>) {
    let (outcome, reason) = match failure {
        None => ("ok", "none"),
        Some(Failure::Credentials) => ("failed", "credentials"),
        Some(Failure::Action) => ("failed", "action_needed"),
        Some(Failure::Unavailable) => ("failed", "unavailable"),
        Some(Failure::SessionLimit) => ("failed", "session_limit"),
    };
    METRICS
        .logins
        .get_or_create(&LoginLabels {
            protocol: p.into(),
            outcome,
            reason,
        })
        .inc();
}

pub fn refresh(s: &OAuthSettings, outcome: &'static str) {
    METRICS
        .refreshes
        .get_or_create(&RefreshLabels {
            provider: s.provider.name(),
            outcome,
        })
        .inc();
}

/// One session's share of `relayed_bytes`: the two counters are looked up
/// once, at the hand-off, so that the relay's periodic flush is two atomic
/// adds (the relay counts locally between flushes, never per chunk).
pub struct RelayedBytes {
    up: Counter,
    down: Counter,
}

pub fn relayed_bytes(p: Protocol) -> RelayedBytes {
    let by = |direction| {
        METRICS
            .bytes
            .get_or_create(&BytesLabels {
                protocol: p.into(),
                direction,
            })
            .clone()
    };
    RelayedBytes {
        up: by("up"),
        down: by("down"),
    }
}

impl RelayedBytes {
    pub fn add(&self, up: u64, down: u64) {
        if up > 0 {
            self.up.inc_by(up);
        }
        if down > 0 {
            self.down.inc_by(down);
        }
    }
}

/// A client that connected the wrong way (`kind`: a
/// [`crate::misconnect::Misconnect::kind`]).
pub fn misconnect(p: Protocol, kind: &'static str) {
    METRICS
        .misconnects
        .get_or_create(&MisconnectLabels {
            listener: p.into(),
            kind,
        })
        .inc();
}

/// Counts an open session in `sessions_open` while alive.
pub struct SessionsOpenGuard(Protocol);

pub fn session_open(p: Protocol) -> SessionsOpenGuard {
    METRICS
        .sessions
        .get_or_create(&ProtoLabels { protocol: p.into() })
        .inc();
    SessionsOpenGuard(p)
}

impl Drop for SessionsOpenGuard {
    fn drop(&mut self) {
        METRICS
            .sessions
            .get_or_create(&ProtoLabels {
                protocol: self.0.into(),
            })
            .dec();
    }
}

/// Makes sure every family has its protocols present from the start, so
/// dashboards see zeros rather than nothing.
pub fn touch(protocols: &[Protocol]) {
    for p in protocols {
        let _ = METRICS.sessions.get_or_create(&ProtoLabels { protocol: (*p).into() });
        for kind in ["tls_on_plaintext", "plaintext_on_tls"] {
            let _ = METRICS.misconnects.get_or_create(&MisconnectLabels {
                listener: (*p).into(),
                kind,
            });
        }
    }
}

/// The password checks: waiting for their turn, running, run since start.
pub fn kdf(waiting: usize, in_flight: usize, runs: u64) {
    METRICS.kdf_waiting.set(waiting as i64);
    METRICS.kdf_in_flight.set(in_flight as i64);
    METRICS.kdf_runs.set(runs as i64);
}

/// Seconds until each account's access token expires (negative: expired);
/// an account left out has no series.
pub fn token_expiry(accounts: Vec<(String, i64)>) {
    METRICS.expiry.clear();
    for (account, left) in accounts {
        METRICS.expiry.get_or_create(&AccountLabels { account }).set(left);
    }
}

/// Each account's upstream sessions and limit by protocol (`None`: no
/// limit, no series). Only accounts of the config come here, so the
/// series stay as few as the config's accounts; one left out has none.
pub fn upstream_sessions(rows: Vec<(String, Protocol, u64, Option<u32>)>) {
    METRICS.upstream_sessions.clear();
    METRICS.upstream_limit.clear();
    for (account, p, open, limit) in rows {
        let labels = AccountProtoLabels {
            account,
            protocol: p.into(),
        };
        METRICS.upstream_sessions.get_or_create(&labels).set(open as i64);
        if let Some(l) = limit {
            METRICS.upstream_limit.get_or_create(&labels).set(i64::from(l));
        }
    }
}

/// Whether the token store answered the last check.
pub fn store_up(up: bool) {
    METRICS.store_up.set(i64::from(up));
}

/// The process's own gauges, outside the `mailproxy_` prefix so that
/// `process_open_fds` has the name Prometheus's exporters give it.
struct Process {
    registry: Registry,
    tasks: Gauge,
    open_fds: Gauge,
}

static PROCESS: LazyLock<Process> = LazyLock::new(|| {
    let mut registry = Registry::default();
    let (tasks, open_fds) = (Gauge::default(), Gauge::default());
    registry.register(
        "mailproxy_tasks",
        "Live tokio tasks (about one per open connection, plus a few per listener and page)",
        tasks.clone(),
    );
    registry.register("process_open_fds", "Open file descriptors", open_fds.clone());
    Process {
        registry,
        tasks,
        open_fds,
    }
});

/// The live task count and, where known, the open file descriptors.
pub fn process(tasks: usize, open_fds: Option<usize>) {
    PROCESS.tasks.set(tasks as i64);
    if let Some(n) = open_fds {
        PROCESS.open_fds.set(n as i64);
    }
}

/// Everything registered, in the Prometheus text format.
pub fn exposition() -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry);
    let _ = prometheus_client::encoding::text::encode(&mut out, &PROCESS.registry);
    to_text_format(&out)
}

/// OpenMetrics (what the encoder writes) to the Prometheus text format
/// 0.0.4 that `/metrics` serves: counters' HELP and TYPE name the `_total`
/// series, and there is no `# EOF`.
fn to_text_format(open_metrics: &str) -> String {
    let counters: Vec<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len());
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = counters.iter().find_map(|c| {
            for prefix in ["# HELP ", "# TYPE "] {
                if let Some(rest) = line.strip_prefix(prefix).and_then(|r| r.strip_prefix(c)) {
                    if rest.starts_with(' ') {
                        return Some(format!("{prefix}{c}_total{rest}"));
                    }
                }
            }
            None
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_are_described_under_their_total_name() {
        let om = "# HELP x_logins Logins.\n# TYPE x_logins counter\nx_logins_total{a=\"b\"} 1\n# HELP x_open Open.\n# TYPE x_open gauge\nx_open 0\n# EOF\n";
        assert_eq!(
            super::to_text_format(om),
            "# HELP x_logins_total Logins.\n# TYPE x_logins_total counter\nx_logins_total{a=\"b\"} 1\n# HELP x_open Open.\n# TYPE x_open gauge\nx_open 0\n"
        );
    }
}
