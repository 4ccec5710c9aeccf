//! `mailproxy serve`: run the proxy until SIGINT or SIGTERM.

use anyhow::Result;

use crate::config::Config;
use crate::server;

use super::lookup::refuse_placeholders;

pub async fn run(config: Config) -> Result<u8> {
    refuse_placeholders(&config, None)?;
    server::serve(config).await.map(|_| 0).map_err(Into::into)
}
