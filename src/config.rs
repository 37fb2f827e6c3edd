//! Typed configuration: one YAML file, one section per component.
//!
//! Every section owns its type and its `problems()` (see [`crate::validate`]); each
//! backend's section lives in its own folder under `src/backend/`. This file only declares
//! the top level, the backend registry ([`BackendConfig`]), and dispatches: parsing,
//! validation (every problem, each naming its field), the effective config (served on the
//! admin port, secrets redacted by [`Secret`]) and building the configured backend.
//!
//! Every section denies unknown fields (a typo is an error, not a silently ignored
//! setting), and defaults live in code next to the field they set.

pub mod audit;
pub mod authn;
pub mod kubernetes;
pub mod metrics;
pub mod policy;
pub mod server;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use self::audit::{AuditConfig, AuditSink};
pub use self::authn::{
    AuthnConfig, DEV_ISSUER, DevIssuerConfig, JwtIssuerConfig, KubeClusterConfig,
    KubernetesAuthnConfig, parse_accounts,
};
pub use self::kubernetes::{
    CaSecretConfig, ClusterTrustBundleConfig, IstiodCertConfig, KubernetesConfig,
    LeaderElectionConfig, RootConfigMapConfig,
};
pub use self::metrics::MetricsConfig;
pub use self::policy::{OverMax, PolicyConfig};
pub use self::server::{AdminConfig, ConfigAccess, ServerConfig, ServerTlsConfig, ServingCertMode};
pub use crate::backend::aws_pca::AwsPcaConfig;
pub use crate::backend::digicert::DigicertConfig;
pub use crate::backend::intermediate::{BackendMode, IntermediateConfig};
pub use crate::backend::local::LocalConfig;
pub use crate::backend::vault::VaultConfig;
use crate::backend::{self, BuildContext, BuildError, Plugin, Signer};
pub use crate::pki::KeyType;
pub use crate::validate::{FieldError, Secret};
use crate::validate::{Problems, Shared, check_trust_domain};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: field `{field}`: {message}")]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("{path}: invalid config:\n{}", .errors.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        errors: Vec<FieldError>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// Trust domain of identities this bridge certifies (`spiffe://<trustDomain>/...`), for
    /// callers whose authenticator does not name one of its own.
    pub trust_domain: String,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub authn: AuthnConfig,
    pub policy: PolicyConfig,
    pub backend: BackendConfig,
    pub metrics: MetricsConfig,
    /// What the bridge maintains in the clusters of `authn.kubernetes` (istiod's duties
    /// when its CA is off).
    pub kubernetes: KubernetesConfig,
    /// Where the record of every issued certificate goes (docs/intermediate.md: in
    /// intermediate mode the enterprise CA no longer sees each certificate).
    pub audit: AuditConfig,
    /// Root rotation (docs/root-rotation.md): the waits between phases and how they advance.
    pub rotation: crate::rotation::RotationConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            trust_domain: "cluster.local".into(),
            server: ServerConfig::default(),
            admin: AdminConfig::default(),
            authn: AuthnConfig::default(),
            policy: PolicyConfig::default(),
            backend: BackendConfig::default(),
            metrics: MetricsConfig::default(),
            kubernetes: KubernetesConfig::default(),
            audit: AuditConfig::default(),
            rotation: Default::default(),
        }
    }
}

/// Declares [`BackendConfig`], the registry of backends: one line per backend, naming its
/// variant (the `type:` value, camelCase) and the config type its folder owns. Everything
/// else about a backend (validation, building, its client) is reached through
/// [`Plugin`], which that config type implements.
macro_rules! backends {
    ($($(#[$attr:meta])* $variant:ident($ty:ty),)+) => {
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
        // Parsed once at start; boxing the variants would only make every use site noisier.
        #[allow(clippy::large_enum_variant)]
        pub enum BackendConfig {
            $($(#[$attr])* $variant($ty),)+
        }

        impl BackendConfig {
            /// The backend's own side of the config.
            pub fn plugin(&self) -> &dyn Plugin {
                match self {
                    $(BackendConfig::$variant(c) => c,)+
                }
            }
        }
    };
}

backends! {
    /// The embedded CA: signs in-process with a key from files or the state directory.
    Local(backend::local::LocalConfig),
    /// AWS Private CA: every certificate is one IssueCertificate call (docs/aws-pca.md).
    AwsPca(backend::aws_pca::AwsPcaConfig),
    /// HashiCorp Vault or OpenBao PKI: every certificate is signed by a PKI role.
    Vault(backend::vault::VaultConfig),
    /// DigiCert Trust Lifecycle Manager: every certificate is one REST enrollment
    /// (docs/digicert.md).
    Digicert(backend::digicert::DigicertConfig),
    /// cert-manager: every certificate is one CertificateRequest, signed by whichever
    /// cert-manager issuer `issuerRef` names (docs/cert-manager.md).
    CertManager(backend::cert_manager::CertManagerConfig),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Local(backend::local::LocalConfig::default())
    }
}

impl BackendConfig {
    /// Builds the configured backend. Remote backends log in and fetch their trust bundle
    /// here, so a bridge that cannot reach its CA fails at start with a clear error (or,
    /// in intermediate mode with a stored intermediate, starts and connects later).
    pub async fn build(&self, ctx: &BuildContext) -> Result<Arc<dyn Signer>, BuildError> {
        self.plugin().build(ctx).await
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::parse(&text).map_err(|(field, message)| ConfigError::Parse {
            path: path.to_path_buf(),
            field,
            message,
        })?;
        cfg.validate().map_err(|errors| ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        })?;
        Ok(cfg)
    }

    /// Parses YAML; on error returns (field path, message).
    pub fn parse(text: &str) -> Result<Config, (String, String)> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        crate::validate::parse_yaml(text)
    }

    /// Checks what types cannot. Collects every problem rather than stopping at the first:
    /// each section's own, then the few that span sections.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut p = Problems::new();
        if let Err(e) = check_trust_domain(&self.trust_domain) {
            p.push("trustDomain", e);
        }
        let s = &self.server;
        p.nest("server", s.problems());
        if s.listen == self.admin.listen && s.listen.port() != 0 {
            p.push("admin.listen", "must differ from server.listen");
        }
        p.nest("authn", self.authn.problems(s.request_timeout));
        let k = &self.kubernetes;
        if k.writes() && self.authn.kubernetes.is_none() {
            p.push(
                if k.root_config_map.enabled {
                    "kubernetes.rootConfigMap.enabled"
                } else if k.istiod_cert.enabled {
                    "kubernetes.istiodCert.enabled"
                } else {
                    "kubernetes.clusterTrustBundle.enabled"
                },
                "needs authn.kubernetes (the clusters to write to)",
            );
        }
        p.nest("kubernetes", k.problems());
        p.nest("policy", self.policy.problems());
        let shared = Shared {
            request_timeout: s.request_timeout,
        };
        p.nest("backend", self.backend.plugin().problems(&shared));
        p.nest("audit", self.audit.problems());
        p.nest("rotation", self.rotation.problems());
        if let Some(("", _)) = self.shared_local_ca() {
            p.push(
                "kubernetes.caSecret.namespace",
                "must not be empty (the generated local CA is kept in this Secret)",
            );
        }
        let errs = p.into_vec();
        if errs.is_empty() { Ok(()) } else { Err(errs) }
    }

    /// What [`BackendConfig::build`] needs from the rest of the config.
    pub fn build_context(&self, metrics: Arc<crate::metrics::Metrics>) -> BuildContext {
        BuildContext {
            trust_domain: self.trust_domain.clone(),
            max_leaf_ttl: self.policy.max_ttl,
            metrics,
            rotation: self.rotation.clone(),
            ca_store: None,
        }
    }

    /// The Secret a generated local CA is shared through: when the backend is the local CA
    /// without CA files and `authn.kubernetes` names a cluster (the first one).
    pub fn shared_local_ca(&self) -> Option<(&str, &str)> {
        let BackendConfig::Local(l) = &self.backend else {
            return None;
        };
        let cs = &self.kubernetes.ca_secret;
        (l.ca_cert_file.is_none() && cs.enabled && self.authn.kubernetes.is_some()).then(|| {
            (
                cs.effective_namespace(&self.kubernetes.leader_election),
                cs.name.as_str(),
            )
        })
    }

    /// Whether the backend's roots are followed through rotations (`backend::follow`): a
    /// remote backend with `rotation.followUpstream`.
    pub fn follows_upstream(&self) -> bool {
        !matches!(self.backend, BackendConfig::Local(_)) && self.rotation.follow_upstream
    }

    /// The Secret a remote backend's rotation state is shared through: when it is
    /// followed and `authn.kubernetes` names a cluster (the first one).
    pub fn upstream_rotation_secret(&self) -> Option<(&str, &str)> {
        let cs = &self.kubernetes.ca_secret;
        (self.follows_upstream() && cs.enabled && self.authn.kubernetes.is_some()).then(|| {
            (
                cs.effective_namespace(&self.kubernetes.leader_election),
                cs.name.as_str(),
            )
        })
    }

    /// Trust domains this bridge certifies: the top-level one plus each issuer's.
    pub fn trust_domains(&self) -> Vec<String> {
        let mut tds = vec![self.trust_domain.clone()];
        let kube_tds = self
            .authn
            .kubernetes
            .iter()
            .flat_map(|k| k.clusters.iter().map(|c| &c.trust_domain));
        for td in self
            .authn
            .jwt
            .iter()
            .map(|j| &j.trust_domain)
            .chain(kube_tds)
        {
            if let Some(td) = td
                && !tds.contains(td)
            {
                tds.push(td.clone());
            }
        }
        tds
    }

    /// The effective config as JSON, secrets redacted (served on /config, logged at start).
    pub fn redacted_json(&self) -> serde_json::Value {
        // No field of this config holds a secret value itself (secrets are read from files
        // or the environment); `Secret` fields, when backends add them, serialize redacted.
        serde_json::to_value(self).unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
    }
}
