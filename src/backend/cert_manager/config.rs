//! The cert-manager backend's configuration (`backend.type: certManager`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::intermediate::{BackendMode, IntermediateConfig};
use crate::validate::{FieldError, Problems, Shared, empty_as_none};

/// The issuer that signs: `spec.issuerRef` of every CertificateRequest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IssuerRefConfig {
    pub name: String,
    /// `Issuer` (in `namespace`), `ClusterIssuer`, or an external issuer's kind.
    pub kind: String,
    /// `cert-manager.io`, or an external issuer's API group.
    pub group: String,
}

impl Default for IssuerRefConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            kind: "Issuer".into(),
            group: "cert-manager.io".into(),
        }
    }
}

/// A key of a ConfigMap or Secret holding PEM roots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ObjectKeyConfig {
    /// Default: the backend's `namespace`.
    pub namespace: Option<String>,
    pub name: String,
    pub key: String,
}

impl Default for ObjectKeyConfig {
    fn default() -> Self {
        Self {
            namespace: None,
            name: String::new(),
            key: "ca.crt".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CertManagerConfig {
    /// Kubeconfig of the cluster cert-manager runs in; unset: in-cluster credentials.
    #[serde(deserialize_with = "empty_as_none")]
    pub kubeconfig: Option<PathBuf>,
    /// Where the CertificateRequests are created (RBAC: only there).
    pub namespace: String,
    pub issuer_ref: IssuerRefConfig,
    /// Added to every CertificateRequest (for an approver-policy's selector, say).
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Keep each CertificateRequest after its certificate was read (default: deleted, as
    /// leftover requests have exhausted cert-manager's memory).
    pub preserve_requests: bool,
    /// Budget for one certificate: create, wait for `Ready` (a watch), read. Past it the
    /// caller gets UNAVAILABLE. Below `server.requestTimeout`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Client-side rate of the CertificateRequest API calls (create, watch, delete).
    pub qps: f64,
    pub burst: u32,
    /// Roots (PEM) the issued chains must end in: the workloads' trust bundle.
    #[serde(deserialize_with = "empty_as_none")]
    pub root_bundle_file: Option<PathBuf>,
    /// The same from a ConfigMap key.
    pub root_bundle_config_map: Option<ObjectKeyConfig>,
    /// The same from a Secret key.
    pub root_bundle_secret: Option<ObjectKeyConfig>,
    /// No configured roots: take the self-signed roots of the first answer's `status.ca`.
    /// Trust on first use, logged as such at every start; not for production.
    pub trust_first_answer: bool,
    /// How often the configured roots are re-read.
    #[serde(with = "humantime_serde")]
    pub root_refresh_interval: Duration,
    /// `direct`: one CertificateRequest per workload certificate. `intermediate`: one
    /// (`isCA: true`) per replica's intermediate CA, which signs workloads locally.
    pub mode: BackendMode,
    pub intermediate: IntermediateConfig,
}

impl Default for CertManagerConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            namespace: "istio-system".into(),
            issuer_ref: IssuerRefConfig::default(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            preserve_requests: false,
            // Below server.requestTimeout (10s), so callers get this backend's answer.
            request_timeout: Duration::from_secs(8),
            qps: 20.0,
            burst: 40,
            root_bundle_file: None,
            root_bundle_config_map: None,
            root_bundle_secret: None,
            trust_first_answer: false,
            root_refresh_interval: Duration::from_secs(60),
            mode: BackendMode::Direct,
            // cert-manager's issuers set no path length on a CA certificate.
            intermediate: IntermediateConfig {
                path_len_zero: false,
                ..Default::default()
            },
        }
    }
}

/// A DNS-1123 label (a namespace's name) or subdomain (an object's name).
fn dns_name(s: &str, max: usize, dots: bool) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && (dots || !s.contains('.'))
}

impl CertManagerConfig {
    /// The trust bundle's sources that are set.
    pub fn root_sources(&self) -> usize {
        [
            self.root_bundle_file.is_some(),
            self.root_bundle_config_map.is_some(),
            self.root_bundle_secret.is_some(),
            self.trust_first_answer,
        ]
        .iter()
        .filter(|s| **s)
        .count()
    }

    pub fn problems(&self, shared: &Shared) -> Vec<FieldError> {
        let mut p = Problems::new();
        if !dns_name(&self.namespace, 63, false) {
            p.push(
                "namespace",
                format!("{:?} is not a namespace name", self.namespace),
            );
        }
        let r = &self.issuer_ref;
        if !dns_name(&r.name, 253, true) {
            p.push(
                "issuerRef.name",
                "required: the Issuer, ClusterIssuer or external issuer that signs",
            );
        }
        if r.kind.trim().is_empty() {
            p.push(
                "issuerRef.kind",
                "Issuer, ClusterIssuer or an external issuer's kind",
            );
        }
        if !dns_name(&r.group, 253, true) {
            p.push(
                "issuerRef.group",
                "cert-manager.io or an external issuer's API group",
            );
        }
        if self.root_sources() != 1 {
            p.push(
                "rootBundleFile",
                "set exactly one of rootBundleFile, rootBundleConfigMap, rootBundleSecret or trustFirstAnswer: the roots issued chains must end in",
            );
        }
        for (field, o) in [
            ("rootBundleConfigMap", &self.root_bundle_config_map),
            ("rootBundleSecret", &self.root_bundle_secret),
        ] {
            if let Some(o) = o {
                if !dns_name(&o.name, 253, true) {
                    p.push(format!("{field}.name"), "required: the object's name");
                }
                if o.key.is_empty() {
                    p.push(
                        format!("{field}.key"),
                        "required: the key holding PEM roots",
                    );
                }
                if let Some(ns) = &o.namespace
                    && !dns_name(ns, 63, false)
                {
                    p.push(
                        format!("{field}.namespace"),
                        format!("{ns:?} is not a namespace name"),
                    );
                }
            }
        }
        p.at_least(
            "requestTimeout",
            self.request_timeout,
            Duration::from_secs(1),
            "1s",
        );
        p.below_request_timeout("requestTimeout", self.request_timeout, shared);
        p.rate_limit("qps", self.qps, "burst", self.burst);
        p.at_least(
            "rootRefreshInterval",
            self.root_refresh_interval,
            Duration::from_secs(1),
            "1s",
        );
        if self.mode == BackendMode::Intermediate {
            p.nest("intermediate", self.intermediate.problems());
        }
        p.into_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{backend_problems, section};

    fn parse(yaml: &str) -> CertManagerConfig {
        section::<CertManagerConfig>(yaml, "backend", "type").unwrap()
    }

    fn fields(cfg: &CertManagerConfig) -> Vec<String> {
        match backend_problems(cfg.problems(&Shared::default())) {
            Ok(()) => Vec::new(),
            Err(e) => e.into_iter().map(|e| e.field).collect(),
        }
    }

    #[test]
    fn defaults_fit_under_the_server_timeout_and_validation_names_fields() {
        let ok = "backend:\n  type: certManager\n  issuerRef: {name: istio-ca}\n  rootBundleFile: /r.pem\n";
        let c = parse(ok);
        assert_eq!(c.namespace, "istio-system");
        assert_eq!(
            (c.issuer_ref.kind.as_str(), c.issuer_ref.group.as_str()),
            ("Issuer", "cert-manager.io")
        );
        assert_eq!(c.request_timeout, Duration::from_secs(8));
        assert!(
            !c.intermediate.path_len_zero,
            "cert-manager issuers set no path length"
        );
        assert_eq!(fields(&c), Vec::<String>::new());

        // No issuer, no roots; two root sources; a bad namespace.
        let f = fields(&parse("backend:\n  type: certManager\n"));
        assert!(f.contains(&"backend.issuerRef.name".to_string()), "{f:?}");
        assert!(f.contains(&"backend.rootBundleFile".to_string()), "{f:?}");
        let f = fields(&parse(&format!(
            "{ok}  trustFirstAnswer: true\n  namespace: Istio_System\n  rootBundleSecret: {{name: \"\"}}\n"
        )));
        for want in [
            "backend.rootBundleFile",
            "backend.namespace",
            "backend.rootBundleSecret.name",
        ] {
            assert!(f.contains(&want.to_string()), "{want} missing from {f:?}");
        }
        // requestTimeout must stay below server.requestTimeout (10s).
        let f = fields(&parse(&format!("{ok}  requestTimeout: 10s\n")));
        assert!(f.contains(&"backend.requestTimeout".to_string()), "{f:?}");
    }
}
