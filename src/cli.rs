//! Subcommands besides `serve`: `request` (an istio-agent-like probe), `rotate` (the root
//! rotation, through the admin port), `check-config` and `dev-token`.

pub mod request;
pub mod rotate;

use std::path::Path;

use crate::config::{Config, ConfigError};

/// Validates a config file; prints the effective config (redacted) on success.
pub fn check_config(path: &Path) -> Result<String, ConfigError> {
    let cfg = Config::load(path)?;
    let mut out = serde_json::to_string_pretty(&cfg.redacted_json()).unwrap_or_default();
    out.push('\n');
    Ok(out)
}
