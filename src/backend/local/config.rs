//! The local CA's configuration (`backend.type: local`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::pki::KeyType;
use crate::validate::{FieldError, Problems, Shared};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Signing CA certificate (PEM). With `caKeyFile`; when both are absent a root is
    /// generated in `stateDir` on first start and reused afterwards.
    pub ca_cert_file: Option<PathBuf>,
    pub ca_key_file: Option<PathBuf>,
    /// Intermediates between the signing CA and the root, leaf-most first (PEM).
    pub chain_file: Option<PathBuf>,
    /// Trusted roots (PEM, several allowed during root rotation). Default: the self-signed
    /// top of the chain.
    pub root_bundle_file: Option<PathBuf>,
    /// Where a generated root and its key (mode 0600) are kept across restarts.
    pub state_dir: PathBuf,
    /// Key type of a generated root.
    pub generated_key_type: KeyType,
    #[serde(with = "humantime_serde")]
    pub generated_ttl: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            ca_cert_file: None,
            ca_key_file: None,
            chain_file: None,
            root_bundle_file: None,
            state_dir: PathBuf::from("/var/lib/istio-ca-bridge"),
            generated_key_type: KeyType::EcdsaP256,
            generated_ttl: Duration::from_secs(10 * 365 * 24 * 3600),
        }
    }
}

impl LocalConfig {
    /// Problems, with fields relative to `backend`.
    pub fn problems(&self, _shared: &Shared) -> Vec<FieldError> {
        let mut p = Problems::new();
        if self.ca_cert_file.is_some() != self.ca_key_file.is_some() {
            p.push("caKeyFile", "caCertFile and caKeyFile must be set together");
        }
        if self.ca_cert_file.is_none() && self.chain_file.is_some() {
            p.push("chainFile", "requires caCertFile");
        }
        p.at_least(
            "generatedTtl",
            self.generated_ttl,
            Duration::from_secs(3600),
            "1h",
        );
        p.into_vec()
    }
}
