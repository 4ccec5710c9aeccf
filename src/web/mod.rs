//! HTTP for the machines that watch the proxy: [`metrics`], the
//! `metrics_listen` listener. It reads the running proxy, so it stands above
//! the token lifecycle; the counters it serves (`crate::metrics`) stand
//! below everything that counts.

pub(crate) mod metrics;
