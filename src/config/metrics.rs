//! The `metrics` section.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Also export istiod's `citadel_server_*` series (exact names, so existing Istio
    /// dashboards and alerts keep working).
    pub istio_compat: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { istio_compat: true }
    }
}
