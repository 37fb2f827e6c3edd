//! The `policy` section: lifetimes and the key types accepted in workload CSRs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pki::KeyType;
use crate::validate::{FieldError, Problems};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OverMax {
    /// Issue for the maximum instead (istio-csr's behaviour; clients renew at half-life).
    Clamp,
    /// Refuse with INVALID_ARGUMENT (istiod's behaviour).
    Reject,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Used when the request's validity_duration is zero or negative.
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    pub over_max: OverMax,
    /// Key types accepted in workload CSRs.
    pub key_types: Vec<KeyType>,
    pub min_rsa_bits: usize,
    /// Hand out leaves that live longer than asked (beyond 5 minutes of skew) instead of
    /// refusing them. Only for a backend known to ignore the requested validity (moto's
    /// acm-pca, a CA template that fixes the validity); AWS Private CA, Vault and DigiCert
    /// honour it. Over-long leaves are counted in
    /// `istio_ca_bridge_backend_ttl_exceeded_total` either way.
    pub accept_longer_lifetimes: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(24 * 3600),
            over_max: OverMax::Clamp,
            key_types: vec![KeyType::Rsa, KeyType::EcdsaP256, KeyType::EcdsaP384],
            min_rsa_bits: 2048,
            accept_longer_lifetimes: false,
        }
    }
}

impl PolicyConfig {
    /// Problems, with fields relative to `policy`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::new();
        p.positive("defaultTtl", self.default_ttl);
        if self.max_ttl < self.default_ttl {
            p.push("maxTtl", "must be >= policy.defaultTtl");
        }
        if self.key_types.is_empty() {
            p.push("keyTypes", "must allow at least one key type");
        }
        if self.min_rsa_bits < 2048 {
            p.push("minRsaBits", "must be at least 2048");
        }
        p.into_vec()
    }
}
