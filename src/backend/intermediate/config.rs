//! Intermediate mode's configuration: `backend.mode` and `backend.intermediate`, shared by
//! every backend that can sign an intermediate for the bridge.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pki::KeyType;
use crate::validate::{FieldError, Problems};

/// How a remote backend takes part in issuance.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum BackendMode {
    /// Every workload certificate is one backend call (the enterprise CA sees each one).
    #[default]
    Direct,
    /// The backend signs an intermediate CA for this replica; workload certificates are
    /// signed locally with it, so issuance survives backend outages and quotas.
    Intermediate,
}

impl BackendMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendMode::Direct => "direct",
            BackendMode::Intermediate => "intermediate",
        }
    }
}

/// The bridge's own intermediate CA (backend `mode: intermediate`).
///
/// There is deliberately no URI name-constraint option: rustls-webpki, which ztunnel and
/// this bridge's own pre-answer check verify with, rejects every URI SAN below a CA with
/// URI name constraints (docs/intermediate.md; `uri_name_constraints_break_rustls` test).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IntermediateConfig {
    /// Lifetime asked for each intermediate. The backend may cap it (Vault: the mount's
    /// max_lease_ttl and the issuer's expiry); rotation follows what was really issued.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Key type of the intermediate's key, generated in the process.
    pub key_type: KeyType,
    /// Ask for pathLenConstraint 0 (the intermediate can sign only leaves) and refuse an
    /// intermediate that does not carry it.
    pub path_len_zero: bool,
    /// Fraction of the intermediate's lifetime at which the next one is prepared.
    pub prepare_at: f64,
    /// Latest fraction of the lifetime at which a prepared successor takes over. It takes
    /// over earlier once the current one has less than `policy.maxTtl` left, so leaves are
    /// not cut short; never before `prepareAt`.
    pub activate_at: f64,
    /// `/readyz` fails once the intermediate that signs has less than this left (and no
    /// successor could be prepared): new pods then go to replicas that can still sign.
    #[serde(with = "humantime_serde")]
    pub ready_margin: Duration,
    /// Backoff between failed preparations, doubling (with jitter) up to `retryMaxBackoff`.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_backoff: Duration,
    /// Keep the intermediate (key mode 0600, directory 0700) here and reuse it after a
    /// restart while it is valid, instead of asking the backend again. Default: the key
    /// never leaves the process memory.
    pub state_dir: Option<PathBuf>,
}

impl Default for IntermediateConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(7 * 24 * 3600),
            key_type: KeyType::EcdsaP256,
            path_len_zero: true,
            prepare_at: 0.5,
            activate_at: 5.0 / 6.0,
            ready_margin: Duration::from_secs(3600),
            retry_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(300),
            state_dir: None,
        }
    }
}

impl IntermediateConfig {
    /// Problems, with fields relative to `backend.intermediate`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::new();
        p.at_least("ttl", self.ttl, Duration::from_secs(60), "1m");
        if !(self.prepare_at > 0.0 && self.prepare_at < 1.0) {
            p.push("prepareAt", "must be a fraction between 0 and 1");
        }
        if !(self.activate_at >= self.prepare_at && self.activate_at < 1.0) {
            p.push(
                "activateAt",
                "must be a fraction at least prepareAt and below 1",
            );
        }
        if self.ready_margin >= self.ttl {
            p.push("readyMargin", "must be less than ttl");
        }
        if self.retry_backoff.is_zero() || self.retry_max_backoff < self.retry_backoff {
            p.push(
                "retryMaxBackoff",
                "retryBackoff must be > 0 and retryMaxBackoff at least retryBackoff",
            );
        }
        p.into_vec()
    }
}
