//! The `authn` section: who may call, and how each kind of caller proves it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::ServiceAccount;
use crate::validate::{FieldError, Problems, check_trust_domain};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuthnConfig {
    /// Accept a client certificate chaining to the trust bundle as proof of identity
    /// (how VMs renew once their token has expired).
    pub client_cert: bool,
    /// Issuing CA certificates (PEM) whose leaves may renew with a client certificate,
    /// besides the bridge's own local CA and intermediates (which are always accepted).
    /// With a remote backend in direct mode, list the backend's issuing CA here; a leaf
    /// from any other CA under the same root is refused.
    pub client_cert_issuers_file: Option<PathBuf>,
    /// OIDC/JWT issuers, typically one per cluster.
    pub jwt: Vec<JwtIssuerConfig>,
    /// Development only: a local token issuer whose key lives in `dir`; mint tokens with
    /// `istio-ca-bridge dev-token`. Never enable in production.
    pub dev_issuer: Option<DevIssuerConfig>,
    /// Kubernetes TokenReview against each cluster's API server (tried after `jwt`), and
    /// the pod caches that authorize ztunnel impersonation.
    pub kubernetes: Option<KubernetesAuthnConfig>,
    /// `<namespace>/<service-account>` of node agents that may ask for the identity of
    /// another pod on their node (istiod's CA_TRUSTED_NODE_ACCOUNTS). Empty disables
    /// impersonation; it also needs `kubernetes` (the check is against the pods on the node).
    pub trusted_node_accounts: Vec<String>,
}

impl Default for AuthnConfig {
    fn default() -> Self {
        Self {
            client_cert: true,
            client_cert_issuers_file: None,
            jwt: Vec::new(),
            dev_issuer: None,
            kubernetes: None,
            trusted_node_accounts: vec!["istio-system/ztunnel".into()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesAuthnConfig {
    /// The clusters whose tokens are reviewed. The FIRST is the local cluster: requests
    /// without a `clusterid` header (or with an empty one) go there.
    pub clusters: Vec<KubeClusterConfig>,
    /// Sent as the TokenReview's `spec.audiences`; the review must confirm one of them.
    pub audiences: Vec<String>,
    /// Successful reviews remembered (keyed by a SHA-256 of the token, never the token).
    pub cache_size: usize,
    /// A successful review is reused until the token's `exp`, but at most this long
    /// (bounds how long a revoked token keeps working).
    #[serde(with = "humantime_serde")]
    pub cache_max_ttl: Duration,
    /// Bound on every Kubernetes API call made while handling a request (TokenReview,
    /// including waiting for the client rate limiter). Keep it below server.requestTimeout.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Impersonation checks wait at most this long for a cluster's first pod list after
    /// start (then they are denied until it arrives).
    #[serde(with = "humantime_serde")]
    pub pod_sync_wait: Duration,
    /// Impersonation is refused (UNAVAILABLE) once a cluster's pod watch has been failing
    /// this long: the cache may still show pods deleted meanwhile. It resumes when the
    /// watch is back (the bridge lists again every 30s while it fails).
    #[serde(with = "humantime_serde")]
    pub pod_cache_max_staleness: Duration,
}

impl Default for KubernetesAuthnConfig {
    fn default() -> Self {
        Self {
            clusters: Vec::new(),
            audiences: default_audiences(),
            cache_size: 10_000,
            cache_max_ttl: Duration::from_secs(600),
            request_timeout: Duration::from_secs(5),
            pod_sync_wait: Duration::from_secs(2),
            pod_cache_max_staleness: Duration::from_secs(180),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeClusterConfig {
    /// The cluster's name as Istio's clients send it in the `clusterid` header
    /// (istio-agent's CLUSTER_ID, `Kubernetes` unless the mesh sets one).
    pub id: String,
    /// kubeconfig file for this cluster's API server (its current context is used).
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// Use the pod's own service account and the API server of the cluster the bridge
    /// runs in.
    #[serde(default)]
    pub in_cluster: bool,
    /// Trust domain of this cluster's identities (default: the top-level trustDomain).
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Client-side rate limit for TokenReviews to this cluster (requests per second and
    /// burst). A request that cannot get a slot within `requestTimeout` is answered
    /// UNAVAILABLE rather than queued for long; cached tokens need no slot. The root
    /// ConfigMap writes of `kubernetes.rootConfigMap` get a bucket of their own of the same
    /// size (at the default 50/s, 5,000 namespaces take about 100 s after a bundle change).
    #[serde(default = "default_kube_qps")]
    pub qps: f64,
    #[serde(default = "default_kube_burst")]
    pub burst: u32,
}

fn default_kube_qps() -> f64 {
    50.0
}
fn default_kube_burst() -> u32 {
    100
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtIssuerConfig {
    /// Exact `iss` claim value.
    pub issuer: String,
    /// JWKS document on disk (e.g. a mounted ConfigMap); re-read periodically.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (https); fetched at start and refreshed periodically.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// CA bundle for the JWKS URL's TLS (defaults to the public web roots).
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Bearer token sent with the JWKS request, re-read on every fetch (the API server's
    /// `/openid/v1/jwks` wants the pod's projected service-account token).
    #[serde(default)]
    pub jwks_token_file: Option<PathBuf>,
    /// The token's `aud` must contain one of these.
    #[serde(default = "default_audiences")]
    pub audiences: Vec<String>,
    /// Trust domain for identities from this issuer (default: top-level trustDomain).
    #[serde(default)]
    pub trust_domain: Option<String>,
    /// Cluster this issuer belongs to; a request whose `clusterid` header names another
    /// cluster is refused.
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Allow a plain `http://` jwksUri for this issuer (a test server, or a proxy on
    /// loopback). Keys fetched in clear can be replaced in transit (and a `jwksTokenFile`
    /// token read), so this is off by default and logged as a warning at start.
    #[serde(default)]
    pub insecure_http: bool,
}

fn default_audiences() -> Vec<String> {
    vec!["istio-ca".into()]
}
fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DevIssuerConfig {
    pub dir: PathBuf,
}

/// The `iss` of tokens minted by the development issuer.
pub const DEV_ISSUER: &str = "istio-ca-bridge-dev";

/// Parses `<ns>/<sa>` entries (`authn.trustedNodeAccounts`).
pub fn parse_accounts(list: &[String]) -> Result<Vec<ServiceAccount>, String> {
    list.iter()
        .map(|s| ServiceAccount::from_slash(s).map_err(|e| e.to_string()))
        .collect()
}

impl AuthnConfig {
    /// Problems, with fields relative to `authn`. `request_timeout` is
    /// `server.requestTimeout`, which the Kubernetes calls must stay below.
    pub fn problems(&self, request_timeout: Duration) -> Vec<FieldError> {
        let mut p = Problems::new();
        if !self.client_cert
            && self.jwt.is_empty()
            && self.dev_issuer.is_none()
            && self.kubernetes.is_none()
        {
            p.push(
                "",
                "no authenticator enabled: configure authn.jwt, authn.kubernetes, authn.clientCert or authn.devIssuer",
            );
        }
        for (i, s) in self.trusted_node_accounts.iter().enumerate() {
            if let Err(e) = parse_accounts(std::slice::from_ref(s)) {
                p.push(format!("trustedNodeAccounts[{i}]"), e);
            }
        }
        if let Some(k) = &self.kubernetes {
            p.nest("kubernetes", k.problems(request_timeout));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, j) in self.jwt.iter().enumerate() {
            if !seen.insert(j.issuer.clone()) || j.issuer == DEV_ISSUER {
                p.push(
                    format!("jwt[{i}].issuer"),
                    format!("issuer {:?} configured twice", j.issuer),
                );
            }
            p.nest(&format!("jwt[{i}]"), j.problems());
        }
        p.into_vec()
    }
}

impl KubernetesAuthnConfig {
    /// Problems, with fields relative to `authn.kubernetes`.
    pub fn problems(&self, server_request_timeout: Duration) -> Vec<FieldError> {
        let mut p = Problems::new();
        if self.clusters.is_empty() {
            p.push("clusters", "list at least one cluster");
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.is_empty()) {
            p.push("audiences", "must list at least one non-empty audience");
        }
        if self.cache_size == 0 {
            p.push("cacheSize", "must be > 0");
        }
        p.positive("cacheMaxTtl", self.cache_max_ttl);
        p.positive("podCacheMaxStaleness", self.pod_cache_max_staleness);
        if self.request_timeout.is_zero() {
            p.push("requestTimeout", "must be > 0");
        } else if self.request_timeout >= server_request_timeout {
            p.push(
                "requestTimeout",
                "must be less than server.requestTimeout (a slow API server must not use up the whole call)",
            );
        }
        let mut ids = std::collections::HashSet::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let f = |name: &str| format!("clusters[{i}].{name}");
            if c.id.is_empty() {
                p.push(f("id"), "must not be empty");
            } else if !ids.insert(c.id.clone()) {
                p.push(f("id"), format!("cluster {:?} configured twice", c.id));
            }
            match (&c.kubeconfig, c.in_cluster) {
                (Some(_), true) | (None, false) => p.push(
                    f("kubeconfig"),
                    "set exactly one of kubeconfig or inCluster: true",
                ),
                _ => {}
            }
            if let Some(td) = &c.trust_domain
                && let Err(e) = check_trust_domain(td)
            {
                p.push(f("trustDomain"), e);
            }
            if !(c.qps.is_finite() && c.qps > 0.0) {
                p.push(f("qps"), "must be a number > 0");
            }
            if c.burst == 0 {
                p.push(f("burst"), "must be > 0");
            }
        }
        p.into_vec()
    }
}

impl JwtIssuerConfig {
    /// An issuer whose keys are in a JWKS file, with the defaults for everything else
    /// (audience `istio-ca`, the top-level trust domain, no cluster, 5-minute refresh).
    pub fn with_jwks_file(issuer: &str, jwks_file: PathBuf) -> Self {
        Self {
            issuer: issuer.to_string(),
            jwks_file: Some(jwks_file),
            jwks_uri: None,
            jwks_ca_file: None,
            jwks_token_file: None,
            audiences: default_audiences(),
            trust_domain: None,
            cluster_id: None,
            refresh_interval: default_jwks_refresh(),
            insecure_http: false,
        }
    }

    /// Problems, with fields relative to `authn.jwt[i]`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut p = Problems::new();
        if self.issuer.is_empty() {
            p.push("issuer", "must not be empty");
        }
        match (&self.jwks_file, &self.jwks_uri) {
            (Some(_), Some(_)) | (None, None) => {
                p.push("jwksFile", "exactly one of jwksFile or jwksUri must be set")
            }
            (None, Some(u)) if !(u.starts_with("https://") || u.starts_with("http://")) => {
                p.push("jwksUri", format!("{u:?} is not an http(s) URL"))
            }
            (None, Some(u)) if u.starts_with("http://") && !self.insecure_http => p.push(
                "jwksUri",
                if self.jwks_token_file.is_some() {
                    "plain http: keys fetched in clear can be replaced in transit, and jwksTokenFile's \
                     token would travel in clear; use https, or set insecureHttp: true for this issuer"
                } else {
                    "plain http: keys fetched in clear can be replaced in transit; use https, \
                     or set insecureHttp: true for this issuer"
                },
            ),
            (Some(_), None) if self.jwks_token_file.is_some() || self.jwks_ca_file.is_some() => p
                .push(
                    "jwksTokenFile",
                    "jwksTokenFile and jwksCaFile only apply to jwksUri",
                ),
            _ => {}
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.is_empty()) {
            p.push("audiences", "must list at least one non-empty audience");
        }
        if let Some(td) = &self.trust_domain
            && let Err(e) = check_trust_domain(td)
        {
            p.push("trustDomain", e);
        }
        if self.insecure_http
            && !self
                .jwks_uri
                .as_ref()
                .is_some_and(|u| u.starts_with("http://"))
        {
            p.push("insecureHttp", "only applies to an http:// jwksUri");
        }
        p.at_least(
            "refreshInterval",
            self.refresh_interval,
            Duration::from_secs(1),
            "1s",
        );
        p.into_vec()
    }
}
