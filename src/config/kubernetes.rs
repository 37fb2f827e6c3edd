//! The `kubernetes` section: what the bridge maintains in the clusters of
//! `authn.kubernetes` (istiod's duties when its CA is off), and the Lease that picks the
//! one replica that writes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::validate::{FieldError, Problems, valid_dns_or_ip};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub root_config_map: RootConfigMapConfig,
    pub istiod_cert: IstiodCertConfig,
    /// Only the holder of this Lease (per cluster) writes ConfigMaps and Secrets, so
    /// several replicas can run.
    pub leader_election: LeaderElectionConfig,
    /// Where a generated local CA lives when `authn.kubernetes` is configured: one Secret
    /// in the first cluster, shared by every replica.
    pub ca_secret: CaSecretConfig,
    /// Also publish the trust bundle as a cluster-scoped `certificates.k8s.io/v1beta1`
    /// ClusterTrustBundle (Kubernetes 1.33+, beta), as istiod does with
    /// ENABLE_CLUSTER_TRUST_BUNDLE_API.
    pub cluster_trust_bundle: ClusterTrustBundleConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ClusterTrustBundleConfig {
    pub enabled: bool,
    /// `spec.signerName` (the writer needs `attest` on it). istiod uses `istio.io/istiod-ca`.
    pub signer_name: String,
    /// Default: the signer name with `/` as `:`, then `:root-cert`
    /// (`istio.io:istiod-ca:root-cert`), which the API requires as the name's prefix.
    pub name: String,
}

impl Default for ClusterTrustBundleConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            signer_name: "istio.io/istiod-ca".into(),
            name: String::new(),
        }
    }
}

impl ClusterTrustBundleConfig {
    /// The object's name.
    pub fn effective_name(&self) -> String {
        if self.name.is_empty() {
            format!("{}:root-cert", self.signer_name.replace('/', ":"))
        } else {
            self.name.clone()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct CaSecretConfig {
    /// Keep the generated local CA (and a rotation's next root) in this Secret. Off: each
    /// replica keeps its own in `backend.stateDir` (one replica only).
    pub enabled: bool,
    /// Default: `kubernetes.leaderElection.namespace`.
    pub namespace: String,
    pub name: String,
}

impl Default for CaSecretConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            namespace: String::new(),
            name: "istio-ca-bridge-ca".into(),
        }
    }
}

impl CaSecretConfig {
    /// The Secret's namespace.
    pub fn effective_namespace<'a>(&'a self, le: &'a LeaderElectionConfig) -> &'a str {
        if self.namespace.is_empty() {
            &le.namespace
        } else {
            &self.namespace
        }
    }
}

impl KubernetesConfig {
    /// True if the bridge writes anything into the clusters.
    pub fn writes(&self) -> bool {
        self.root_config_map.enabled
            || self.istiod_cert.enabled
            || self.cluster_trust_bundle.enabled
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct IstiodCertConfig {
    /// Keep istiod's serving certificate in a `kubernetes.io/tls` Secret (istiod with
    /// ENABLE_CA_SERVER=false has none): `tls.crt` (leaf + intermediates), `tls.key`,
    /// `ca.crt` (the trust bundle). Written into every cluster of `authn.kubernetes`.
    pub enabled: bool,
    /// istiod's namespace.
    pub namespace: String,
    pub secret_name: String,
    /// DNS names of the certificate. Default: `istiod.<namespace>.svc` plus
    /// `istiod-<revision>.<namespace>.svc` for each of `revisions`.
    pub dns_names: Vec<String>,
    pub revisions: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Re-issued when less than this is left (and whenever the trust bundle changes).
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
}

impl Default for IstiodCertConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            namespace: "istio-system".into(),
            secret_name: "istiod-tls".into(),
            dns_names: Vec::new(),
            revisions: Vec::new(),
            ttl: Duration::from_secs(24 * 3600),
            renew_before: Duration::from_secs(8 * 3600),
        }
    }
}

impl IstiodCertConfig {
    /// The names the certificate carries.
    pub fn effective_dns_names(&self) -> Vec<String> {
        if !self.dns_names.is_empty() {
            return self.dns_names.clone();
        }
        let ns = &self.namespace;
        let mut names = vec![format!("istiod.{ns}.svc")];
        names.extend(
            self.revisions
                .iter()
                .map(|r| format!("istiod-{r}.{ns}.svc")),
        );
        names
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct RootConfigMapConfig {
    /// Publish the trust bundle as a ConfigMap in every namespace of every cluster in
    /// `authn.kubernetes` (with ENABLE_CA_SERVER=false istiod does not).
    pub enabled: bool,
    /// istiod's PILOT_CA_CERT_CONFIGMAP / Helm `global.trustBundleName`.
    pub name: String,
    /// Namespaces that never get the ConfigMap.
    pub exclude_namespaces: Vec<String>,
    /// Every ConfigMap is re-applied this often (repairs edits and deletions).
    #[serde(with = "humantime_serde")]
    pub resync_interval: Duration,
}

impl Default for RootConfigMapConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            name: "istio-ca-root-cert".into(),
            exclude_namespaces: vec!["kube-public".into(), "kube-node-lease".into()],
            resync_interval: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LeaderElectionConfig {
    /// Where the `coordination.k8s.io/v1` Lease lives (the bridge's own namespace).
    pub namespace: String,
    pub lease_name: String,
    /// A leader that has not renewed for this long is replaced.
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// How often the lease is renewed, or tried for by non-leaders.
    #[serde(with = "humantime_serde")]
    pub retry_period: Duration,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        Self {
            namespace: "istio-system".into(),
            lease_name: "istio-ca-bridge".into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl KubernetesConfig {
    /// Problems, with fields relative to `kubernetes`. Whether `authn.kubernetes` names
    /// the clusters to write to is checked by the top-level validation.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::new();
        let r = &self.root_config_map;
        if r.enabled {
            if !valid_dns_or_ip(&r.name) || r.name.parse::<std::net::IpAddr>().is_ok() {
                p.push(
                    "rootConfigMap.name",
                    format!("{:?} is not a valid ConfigMap name", r.name),
                );
            }
            p.at_least(
                "rootConfigMap.resyncInterval",
                r.resync_interval,
                Duration::from_secs(1),
                "1s",
            );
        }
        let ic = &self.istiod_cert;
        if ic.enabled {
            if ic.namespace.is_empty() {
                p.push("istiodCert.namespace", "must not be empty");
            }
            if ic.secret_name.is_empty() {
                p.push("istiodCert.secretName", "must not be empty");
            }
            for (i, n) in ic.dns_names.iter().enumerate() {
                if !valid_dns_or_ip(n) {
                    p.push(
                        format!("istiodCert.dnsNames[{i}]"),
                        format!("{n:?} is neither a DNS name nor an IP address"),
                    );
                }
            }
            p.at_least("istiodCert.ttl", ic.ttl, Duration::from_secs(2), "2s");
            if ic.renew_before.is_zero() || ic.renew_before >= ic.ttl {
                p.push(
                    "istiodCert.renewBefore",
                    "must be > 0 and less than kubernetes.istiodCert.ttl",
                );
            }
        }
        let ctb = &self.cluster_trust_bundle;
        if ctb.enabled {
            let parts: Vec<&str> = ctb.signer_name.split('/').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) || !valid_dns_or_ip(parts[0])
            {
                p.push(
                    "clusterTrustBundle.signerName",
                    format!(
                        "{:?} is not a signer name (<domain>/<path>)",
                        ctb.signer_name
                    ),
                );
            } else {
                let prefix = format!("{}:", ctb.signer_name.replace('/', ":"));
                let name = ctb.effective_name();
                if !name.starts_with(&prefix) || name.len() == prefix.len() {
                    p.push(
                        "clusterTrustBundle.name",
                        format!("{name:?} must start with {prefix:?} (the API requires the signer name as prefix)"),
                    );
                }
            }
        }
        if self.ca_secret.enabled && !valid_dns_or_ip(&self.ca_secret.name) {
            p.push(
                "caSecret.name",
                format!("{:?} is not a valid Secret name", self.ca_secret.name),
            );
        }
        if self.writes() {
            let le = &self.leader_election;
            if le.namespace.is_empty() {
                p.push("leaderElection.namespace", "must not be empty");
            }
            if le.lease_name.is_empty() {
                p.push("leaderElection.leaseName", "must not be empty");
            }
            if le.retry_period.is_zero() || le.lease_duration < le.retry_period * 2 {
                p.push(
                    "leaderElection.leaseDuration",
                    "must be at least twice retryPeriod (and retryPeriod > 0)",
                );
            }
        }
        p.into_vec()
    }
}
