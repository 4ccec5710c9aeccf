//! The pages mailproxy serves over HTTP that read the running proxy, so
//! they stand above the token lifecycle: [`metrics`] (the `metrics_listen`
//! listener for the machines that watch the proxy) and [`status`] (the
//! owner's status page, its HTML in [`status_page`]). The sign-in redirect
//! listener is part of an authorisation (`tokens::authorize`); all of them
//! read requests with `crate::http`. The counters `metrics` serves
//! (`crate::metrics`) stand below everything that counts.

pub(crate) mod metrics;
pub(crate) mod status;
pub(crate) mod status_page;
