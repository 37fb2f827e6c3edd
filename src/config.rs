//! Typed configuration: one YAML file, one section per component.
//!
//! Every section denies unknown fields (a typo is an error, not a silently ignored
//! setting), defaults live here in code, and [`Config::validate`] checks what serde cannot
//! with errors that name the offending field. The effective config is logged at start and
//! served on the admin port with secrets redacted ([`Secret`] never serializes its value).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::identity::{ServiceAccount, normalize_trust_domain};

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

/// One validation failure, naming the field by its YAML path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
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
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerConfig {
    /// gRPC listen address. 15012 is where Istio's clients find istiod's CA by default.
    pub listen: SocketAddr,
    pub tls: ServerTlsConfig,
    /// Server-initiated HTTP/2 pings (detect dead peers); client pings are always allowed.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// How long SIGTERM waits for in-flight calls before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub max_concurrent_streams: u32,
    /// A TLS handshake slower than this is dropped (slowloris protection).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Upper bound on one CreateCertificate call. istio-agent sends no deadline, so the
    /// server must bound its own work; keep it below the clients' patience.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// CSRs larger than this are refused before parsing (istio CSRs are ~1 KiB).
    pub max_csr_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:15012".parse().expect("static addr"),
            tls: ServerTlsConfig::default(),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(20),
            max_concurrent_streams: 1024,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            max_csr_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ServingCertMode {
    /// The bridge's own backend issues the serving certificate and renews it.
    Issued,
    /// Certificate and key come from PEM files (e.g. a mounted Secret), reloaded on change.
    Files,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    pub mode: ServingCertMode,
    /// Names for the issued serving certificate: DNS names, or IP literals. Must include
    /// the host of the clients' CA_ADDR.
    pub dns_names: Vec<String>,
    /// Lifetime of an issued serving certificate.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Renew an issued serving certificate when less than this is left.
    #[serde(with = "humantime_serde")]
    pub renew_before: Duration,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// How often files are checked for changes (mode files).
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        Self {
            mode: ServingCertMode::Issued,
            dns_names: vec![
                "istio-ca-bridge.istio-system.svc".into(),
                "istio-ca-bridge.istio-system.svc.cluster.local".into(),
            ],
            ttl: Duration::from_secs(24 * 3600),
            renew_before: Duration::from_secs(8 * 3600),
            cert_file: None,
            key_file: None,
            reload_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AdminConfig {
    /// /metrics, /healthz, /readyz and /config. Plain HTTP: keep it off public networks.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:15014".parse().expect("static addr"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuthnConfig {
    /// Accept a client certificate chaining to the trust bundle as proof of identity
    /// (how VMs renew once their token has expired).
    pub client_cert: bool,
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
    /// UNAVAILABLE rather than queued for long; cached tokens need no slot.
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

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum OverMax {
    /// Issue for the maximum instead (istio-csr's behaviour; clients renew at half-life).
    Clamp,
    /// Refuse with INVALID_ARGUMENT (istiod's behaviour).
    Reject,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum KeyType {
    Rsa,
    EcdsaP256,
    EcdsaP384,
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
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(24 * 3600),
            over_max: OverMax::Clamp,
            key_types: vec![KeyType::Rsa, KeyType::EcdsaP256, KeyType::EcdsaP384],
            min_rsa_bits: 2048,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
// Parsed once at start; boxing the variants would only make every use site noisier.
#[allow(clippy::large_enum_variant)]
pub enum BackendConfig {
    /// The embedded CA: signs in-process with a key from files or the state directory.
    Local(LocalBackendConfig),
    /// AWS Private CA: every certificate is one IssueCertificate call (docs/aws-pca.md).
    #[serde(rename = "awsPca")]
    AwsPca(AwsPcaBackendConfig),
    /// HashiCorp Vault or OpenBao PKI: every certificate is signed by a PKI role.
    Vault(VaultBackendConfig),
    /// DigiCert Trust Lifecycle Manager: every certificate is one REST enrollment
    /// (docs/digicert.md).
    Digicert(DigicertBackendConfig),
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig::Local(LocalBackendConfig::default())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct LocalBackendConfig {
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

impl Default for LocalBackendConfig {
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

/// The template AWS Private CA applies: copies Subject and SAN from the CSR, sets
/// KU digitalSignature+keyEncipherment and EKU serverAuth+clientAuth (the SPIFFE profile).
pub const AWS_PCA_DEFAULT_TEMPLATE: &str = "arn:aws:acm-pca:::template/EndEntityCertificate/V1";
/// The template for the bridge's own intermediate CA in intermediate mode.
pub const AWS_PCA_INTERMEDIATE_TEMPLATE: &str =
    "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1";

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
    /// Backoff between failed preparations, doubling up to `retryMaxBackoff`.
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
    /// Problems, with fields named `backend.intermediate.<field>`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                field: format!("backend.intermediate.{field}"),
                message,
            })
        };
        if self.ttl < Duration::from_secs(60) {
            err("ttl", "must be at least 1m".into());
        }
        if !(self.prepare_at > 0.0 && self.prepare_at < 1.0) {
            err("prepareAt", "must be a fraction between 0 and 1".into());
        }
        if !(self.activate_at >= self.prepare_at && self.activate_at < 1.0) {
            err(
                "activateAt",
                "must be a fraction at least prepareAt and below 1".into(),
            );
        }
        if self.ready_margin >= self.ttl {
            err("readyMargin", "must be less than ttl".into());
        }
        if self.retry_backoff.is_zero() || self.retry_max_backoff < self.retry_backoff {
            err(
                "retryMaxBackoff",
                "retryBackoff must be > 0 and retryMaxBackoff at least retryBackoff".into(),
            );
        }
        errs
    }
}

/// Where audit records go.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum AuditSink {
    /// One JSON object a line on standard output.
    #[default]
    Stdout,
    /// Appended to `audit.path` (JSON lines).
    File,
    /// No audit records.
    None,
}

/// The audit log: one JSON line per issued certificate, in every mode.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AuditConfig {
    pub sink: AuditSink,
    /// File for `sink: file` (created mode 0640 if missing, appended to).
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AwsPcaBackendConfig {
    /// ARN of the issuing CA (`arn:aws:acm-pca:<region>:<account>:certificate-authority/<id>`).
    pub ca_arn: String,
    /// AWS region of the CA. Default: the region in `caArn`.
    pub region: Option<String>,
    /// Endpoint override (VPC endpoint, FIPS endpoint, or a test server).
    pub endpoint: Option<String>,
    /// Role to assume (STS AssumeRole) with the credentials of the SDK default chain
    /// (IRSA / EKS Pod Identity, environment, profile); for a CA in another account.
    pub assume_role_arn: Option<String>,
    /// Certificate template. The default fits SPIFFE workload certificates.
    pub template_arn: String,
    /// IssueCertificate SigningAlgorithm (e.g. SHA256WITHECDSA). It must match the CA's key,
    /// not the CSR's; default: read once from DescribeCertificateAuthority.
    pub signing_algorithm: Option<String>,
    /// Budget for one certificate: rate-limit wait, IssueCertificate with retries and the
    /// GetCertificate polling. Keep it below `server.requestTimeout` so callers get
    /// RESOURCE_EXHAUSTED / UNAVAILABLE rather than a generic timeout.
    #[serde(with = "humantime_serde")]
    pub issue_timeout: Duration,
    /// Client-side IssueCertificate rate for this CA (calls per second), below the account's
    /// 25 TPS quota so a restart storm queues here instead of being throttled there.
    pub rate_limit: f64,
    /// Calls allowed at once above the steady rate.
    pub rate_burst: u32,
    /// More roots (PEM) to trust besides the CA's own (e.g. during a root rotation).
    pub extra_roots_file: Option<PathBuf>,
    /// How often the CA certificate and chain (the trust bundle) are re-read.
    #[serde(with = "humantime_serde")]
    pub bundle_refresh_interval: Duration,
    /// `direct`: every workload certificate is one IssueCertificate call. `intermediate`:
    /// the CA signs an intermediate CA for this replica, which signs workloads locally.
    pub mode: BackendMode,
    pub intermediate: IntermediateConfig,
    /// Template for the bridge's intermediate (intermediate mode). The default issues a
    /// CA certificate with pathLenConstraint 0.
    pub intermediate_template_arn: String,
}

impl Default for AwsPcaBackendConfig {
    fn default() -> Self {
        Self {
            ca_arn: String::new(),
            region: None,
            endpoint: None,
            assume_role_arn: None,
            template_arn: AWS_PCA_DEFAULT_TEMPLATE.into(),
            signing_algorithm: None,
            issue_timeout: Duration::from_secs(8),
            rate_limit: 20.0,
            rate_burst: 20,
            extra_roots_file: None,
            bundle_refresh_interval: Duration::from_secs(3600),
            mode: BackendMode::Direct,
            intermediate: IntermediateConfig::default(),
            intermediate_template_arn: AWS_PCA_INTERMEDIATE_TEMPLATE.into(),
        }
    }
}

impl AwsPcaBackendConfig {
    /// The configured region, else the one in the CA ARN.
    pub fn effective_region(&self) -> Option<String> {
        self.region
            .clone()
            .or_else(|| self.ca_arn.split(':').nth(3).map(str::to_string))
            .filter(|r| !r.is_empty())
    }

    fn validate(&self, err: &mut dyn FnMut(&str, String)) {
        let arn: Vec<&str> = self.ca_arn.split(':').collect();
        if arn.len() != 6
            || arn[0] != "arn"
            || arn[2] != "acm-pca"
            || !arn[5].starts_with("certificate-authority/")
        {
            err(
                "backend.caArn",
                format!(
                    "{:?} is not an AWS Private CA ARN (arn:aws:acm-pca:<region>:<account>:certificate-authority/<id>)",
                    self.ca_arn
                ),
            );
        }
        if self.effective_region().is_none() {
            err(
                "backend.region",
                "required when caArn names no region".into(),
            );
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            err("backend.endpoint", format!("{e:?} is not an http(s) URL"));
        }
        if let Some(r) = &self.assume_role_arn
            && !(r.starts_with("arn:") && r.contains(":iam::") && r.contains(":role/"))
        {
            err(
                "backend.assumeRoleArn",
                format!("{r:?} is not an IAM role ARN"),
            );
        }
        if !(self.template_arn.starts_with("arn:") && self.template_arn.contains(":template/")) {
            err(
                "backend.templateArn",
                format!("{:?} is not a certificate template ARN", self.template_arn),
            );
        }
        if let Some(a) = &self.signing_algorithm {
            let known = aws_sdk_acmpca::types::SigningAlgorithm::values();
            if !known.contains(&a.as_str()) {
                err(
                    "backend.signingAlgorithm",
                    format!("{a:?} is not one of {}", known.join(", ")),
                );
            }
        }
        if self.issue_timeout < Duration::from_secs(1) {
            err("backend.issueTimeout", "must be at least 1s".into());
        }
        if !(self.rate_limit > 0.0 && self.rate_limit.is_finite()) {
            err("backend.rateLimit", "must be > 0".into());
        }
        if self.rate_burst == 0 {
            err("backend.rateBurst", "must be at least 1".into());
        }
        if self.bundle_refresh_interval < Duration::from_secs(1) {
            err(
                "backend.bundleRefreshInterval",
                "must be at least 1s".into(),
            );
        }
    }
}

/// The DigiCert Trust Lifecycle Manager (DigiCert ONE) backend: every certificate is one
/// REST enrollment (`POST /mpki/api/v1/certificate`), see docs/digicert.md. Like the other
/// backends it holds no secret itself: the API key is read from a file or the environment.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DigicertBackendConfig {
    /// DigiCert ONE base URL, without the API path (`/mpki/api/v1` is appended). With a
    /// client certificate this is usually `https://clientauth.one.digicert.com`.
    pub base_url: String,
    pub auth: DigicertAuthConfig,
    /// Roots (PEM) for DigiCert's own TLS certificate. Default: the public web roots.
    #[serde(deserialize_with = "empty_as_none")]
    pub ca_file: Option<PathBuf>,
    /// Trust Lifecycle Manager certificate profile that enrolls workload certificates.
    pub profile_id: String,
    pub seat: DigicertSeatConfig,
    /// Unit of the `validity` sent with each enrollment; the requested TTL is rounded DOWN
    /// to whole units, with a minimum of one unit.
    pub validity_unit: DigicertValidityUnit,
    /// Budget for one certificate: rate-limit wait, the enrollment with its retries and the
    /// pickup polling. Must be below `server.requestTimeout`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First wait before polling a PENDING enrollment; doubles up to `pollMaxInterval`.
    #[serde(with = "humantime_serde")]
    pub poll_initial_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub poll_max_interval: Duration,
    /// Client-side DigiCert API calls per second (token bucket; enrollments and pickups).
    pub rate_limit: f64,
    /// Calls allowed at once above the steady rate.
    pub rate_burst: u32,
    /// Roots (PEM) the issued chains must chain to: the trust bundle handed to workloads.
    #[serde(deserialize_with = "empty_as_none")]
    pub trust_bundle_file: Option<PathBuf>,
    /// Intermediates (PEM) appended when DigiCert's answer lacks the ones linking the leaf
    /// to a root of `trustBundleFile`.
    #[serde(deserialize_with = "empty_as_none")]
    pub intermediates_file: Option<PathBuf>,
}

impl Default for DigicertBackendConfig {
    fn default() -> Self {
        Self {
            base_url: DIGICERT_DEFAULT_BASE_URL.into(),
            auth: DigicertAuthConfig::default(),
            ca_file: None,
            profile_id: String::new(),
            seat: DigicertSeatConfig::default(),
            validity_unit: DigicertValidityUnit::Hours,
            request_timeout: Duration::from_secs(5),
            poll_initial_interval: Duration::from_millis(250),
            poll_max_interval: Duration::from_secs(2),
            rate_limit: 10.0,
            rate_burst: 20,
            trust_bundle_file: None,
            intermediates_file: None,
        }
    }
}

pub const DIGICERT_DEFAULT_BASE_URL: &str = "https://one.digicert.com";

/// How the bridge authenticates to DigiCert: exactly one of an API key (file or
/// environment variable, sent as `x-api-key`) or a client certificate (mutual TLS).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DigicertAuthConfig {
    /// File holding the API key (surrounding whitespace and the trailing newline are
    /// trimmed); re-read at every call, so a rotated key is picked up.
    #[serde(deserialize_with = "empty_as_none")]
    pub api_key_file: Option<PathBuf>,
    /// Name of the environment variable holding the API key.
    #[serde(deserialize_with = "empty_as_none")]
    pub api_key_env: Option<String>,
    /// Client certificate chain and key (PEM) for DigiCert's mTLS host.
    #[serde(deserialize_with = "empty_as_none")]
    pub client_cert_file: Option<PathBuf>,
    #[serde(deserialize_with = "empty_as_none")]
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct DigicertSeatConfig {
    pub strategy: DigicertSeatStrategy,
    /// The one shared seat id (`strategy: fixed` only).
    pub id: String,
}

/// Which DigiCert seat an enrollment is counted against (every seat is a license).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DigicertSeatStrategy {
    /// seat_id = the workload's SPIFFE ID (a serving certificate: its first DNS name): one
    /// licensed seat per identity, and DigiCert's inventory shows every identity.
    #[default]
    SpiffeId,
    /// Every enrollment uses `seat.id`: one seat, no per-identity inventory in DigiCert.
    Fixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DigicertValidityUnit {
    Hours,
    Days,
}

impl DigicertValidityUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            DigicertValidityUnit::Hours => "hours",
            DigicertValidityUnit::Days => "days",
        }
    }

    /// The validity duration sent for `ttl`: whole units rounded down, at least one.
    pub fn duration_for(self, ttl: Duration) -> u64 {
        let unit = match self {
            DigicertValidityUnit::Hours => 3600,
            DigicertValidityUnit::Days => 86400,
        };
        (ttl.as_secs() / unit).max(1)
    }
}

/// An empty string (what templating tools render for an unset value) means "not set".
fn empty_as_none<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: From<String>,
{
    let s: Option<String> = Option::deserialize(d)?;
    Ok(s.filter(|s| !s.is_empty()).map(T::from))
}

impl DigicertBackendConfig {
    /// The API root, `<baseUrl>/mpki/api/v1`.
    pub fn api_url(&self) -> String {
        format!("{}/mpki/api/v1", self.base_url.trim_end_matches('/'))
    }

    /// Validation problems, with fields named `backend.<field>`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                field: format!("backend.{field}"),
                message,
            })
        };
        match reqwest::Url::parse(&self.base_url) {
            Ok(u) if u.scheme() == "https" && u.host().is_some() => {
                if u.path() != "/" && !u.path().is_empty() {
                    err(
                        "baseUrl",
                        "give the base URL only; /mpki/api/v1 is appended by the bridge".into(),
                    );
                }
            }
            _ => err(
                "baseUrl",
                format!(
                    "{:?} is not an https URL (the API key must not travel in clear)",
                    self.base_url
                ),
            ),
        }
        let a = &self.auth;
        let modes = [
            a.api_key_file.is_some(),
            a.api_key_env.is_some(),
            a.client_cert_file.is_some() || a.client_key_file.is_some(),
        ];
        if modes.iter().filter(|m| **m).count() != 1 {
            err(
                "auth",
                "set exactly one of apiKeyFile, apiKeyEnv or clientCertFile + clientKeyFile".into(),
            );
        }
        if a.client_cert_file.is_some() != a.client_key_file.is_some() {
            err(
                "auth.clientKeyFile",
                "clientCertFile and clientKeyFile must be set together".into(),
            );
        }
        if let Some(e) = &a.api_key_env
            && e.contains('=')
        {
            err(
                "auth.apiKeyEnv",
                format!("{e:?} is not an environment variable name"),
            );
        }
        if self.profile_id.trim().is_empty() {
            err(
                "profileId",
                "required: the certificate profile to enroll with".into(),
            );
        }
        match self.seat.strategy {
            DigicertSeatStrategy::Fixed if self.seat.id.trim().is_empty() => {
                err("seat.id", "required when seat.strategy is fixed".into())
            }
            DigicertSeatStrategy::SpiffeId if !self.seat.id.is_empty() => err(
                "seat.id",
                "only used with seat.strategy: fixed (spiffeId derives the seat per identity)"
                    .into(),
            ),
            _ => {}
        }
        if self.request_timeout < Duration::from_secs(1) {
            err("requestTimeout", "must be at least 1s".into());
        }
        if self.poll_initial_interval.is_zero() {
            err("pollInitialInterval", "must be > 0".into());
        }
        if self.poll_max_interval < self.poll_initial_interval {
            err(
                "pollMaxInterval",
                "must be at least pollInitialInterval".into(),
            );
        }
        if !(self.rate_limit > 0.0 && self.rate_limit.is_finite()) {
            err("rateLimit", "must be > 0".into());
        }
        if self.rate_burst == 0 {
            err("rateBurst", "must be at least 1".into());
        }
        if self.trust_bundle_file.is_none() {
            err(
                "trustBundleFile",
                "required: the root(s) DigiCert's chains must chain to".into(),
            );
        }
        errs
    }
}

/// The Vault (or OpenBao) PKI backend. No secret is stored here: credentials are read
/// from files or environment variables named by the config, so `/config` shows nothing
/// worth stealing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultBackendConfig {
    /// Base URL of the Vault API, e.g. `https://vault.vault.svc:8200` (no `/v1`).
    pub address: String,
    #[serde(default)]
    pub tls: VaultTlsConfig,
    /// Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Path of the PKI secrets engine.
    #[serde(default = "default_vault_mount")]
    pub mount: String,
    /// PKI role that signs workload certificates (`<mount>/sign/<role>`).
    pub role: String,
    /// PKI role for the bridge's own serving certificate (DNS names). Default: `role`,
    /// which then must also allow those names.
    #[serde(default)]
    pub server_role: Option<String>,
    /// Sign with this issuer (`<mount>/issuer/<ref>/sign/<role>`) instead of the role's or
    /// the mount's default issuer; the trust bundle is then read from this issuer too.
    #[serde(default)]
    pub issuer_ref: Option<String>,
    /// Bound on each HTTP call to Vault (connect + response). Keep it below
    /// `server.requestTimeout` so a hung Vault turns into UNAVAILABLE, not a timeout.
    #[serde(default = "default_vault_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    pub auth: VaultAuthConfig,
    /// Take the trust bundle's roots from the mount's CA chain (the self-signed
    /// certificates in it). Turn off when the mount's chain does not include its root.
    #[serde(default = "default_true")]
    pub roots_from_mount: bool,
    /// Additional (or, with `rootsFromMount: false`, the only) trusted roots, PEM.
    /// Re-read at every refresh, so a root rotation can be staged here.
    #[serde(default)]
    pub root_bundle_file: Option<PathBuf>,
    /// How often the roots are re-read (changes are published to every reader).
    #[serde(default = "default_root_refresh", with = "humantime_serde")]
    pub root_refresh_interval: Duration,
    /// `direct`: every workload certificate is one `sign/<role>` call. `intermediate`: the
    /// mount signs an intermediate CA for this replica (`root/sign-intermediate`, or
    /// `issuer/<issuerRef>/sign-intermediate`), which signs workloads locally.
    #[serde(default)]
    pub mode: BackendMode,
    #[serde(default)]
    pub intermediate: IntermediateConfig,
}

fn default_vault_mount() -> String {
    "pki".into()
}
fn default_vault_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_root_refresh() -> Duration {
    Duration::from_secs(300)
}
fn default_true() -> bool {
    true
}

/// TLS towards Vault.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct VaultTlsConfig {
    /// CA bundle (PEM) that signed Vault's serving certificate. Default: public web roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for Vault listeners that require mTLS.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
}

/// How the bridge obtains its Vault token. Every credential is read from a file (re-read
/// at each login, so rotated files are picked up) or from an environment variable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "camelCase", deny_unknown_fields)]
pub enum VaultAuthConfig {
    /// A token given to the bridge; renewed while renewable, re-read from its source when
    /// it can no longer be renewed or Vault refuses it.
    Token(VaultTokenAuth),
    /// Kubernetes auth method: the pod's service-account token.
    Kubernetes(VaultKubernetesAuth),
    /// AppRole auth method.
    #[serde(rename = "approle")]
    AppRole(VaultAppRoleAuth),
    /// JWT auth method with a token from a file.
    Jwt(VaultJwtAuth),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultTokenAuth {
    /// File holding the token (exactly one of `tokenFile`, `tokenEnv`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Name of the environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultKubernetesAuth {
    /// Vault role of the Kubernetes auth method.
    pub role: String,
    /// Service-account token (a projected token with Vault's audience is best).
    #[serde(default = "default_sa_token_file")]
    pub token_file: PathBuf,
    #[serde(default = "default_kubernetes_mount")]
    pub mount: String,
}

fn default_sa_token_file() -> PathBuf {
    PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
}
fn default_kubernetes_mount() -> String {
    "kubernetes".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultAppRoleAuth {
    pub role_id_file: PathBuf,
    pub secret_id_file: PathBuf,
    #[serde(default = "default_approle_mount")]
    pub mount: String,
}

fn default_approle_mount() -> String {
    "approle".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VaultJwtAuth {
    /// Vault role of the JWT auth method (default: the method's default role).
    #[serde(default)]
    pub role: Option<String>,
    pub token_file: PathBuf,
    #[serde(default = "default_jwt_mount")]
    pub mount: String,
}

fn default_jwt_mount() -> String {
    "jwt".into()
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct KubernetesConfig {
    pub root_config_map: RootConfigMapConfig,
    pub istiod_cert: IstiodCertConfig,
    /// Only the holder of this Lease (per cluster) writes ConfigMaps and Secrets, so
    /// several replicas can run.
    pub leader_election: LeaderElectionConfig,
}

impl KubernetesConfig {
    /// True if the bridge writes anything into the clusters.
    pub fn writes(&self) -> bool {
        self.root_config_map.enabled || self.istiod_cert.enabled
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
        let de = serde_norway::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = match field.as_str() {
                "." => "(top level)".to_string(),
                "?" | "" => "(YAML syntax)".to_string(),
                _ => field,
            };
            (field, e.into_inner().to_string())
        })
    }

    /// Checks what types cannot. Collects every problem rather than stopping at the first.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                field: field.to_string(),
                message,
            })
        };
        if let Err(e) = check_trust_domain(&self.trust_domain) {
            err("trustDomain", e);
        }
        let s = &self.server;
        if s.shutdown_grace.is_zero() {
            err("server.shutdownGrace", "must be > 0".into());
        }
        if s.request_timeout.is_zero() {
            err("server.requestTimeout", "must be > 0".into());
        }
        if s.handshake_timeout.is_zero() {
            err("server.handshakeTimeout", "must be > 0".into());
        }
        if s.max_concurrent_streams == 0 {
            err("server.maxConcurrentStreams", "must be > 0".into());
        }
        if s.max_csr_bytes < 512 {
            err("server.maxCsrBytes", "must be at least 512".into());
        }
        if s.listen == self.admin.listen && s.listen.port() != 0 {
            err("admin.listen", "must differ from server.listen".to_string());
        }
        match s.tls.mode {
            ServingCertMode::Files => {
                if s.tls.cert_file.is_none() {
                    err("server.tls.certFile", "required when mode is files".into());
                }
                if s.tls.key_file.is_none() {
                    err("server.tls.keyFile", "required when mode is files".into());
                }
                if s.tls.reload_interval.is_zero() {
                    err("server.tls.reloadInterval", "must be > 0".into());
                }
            }
            ServingCertMode::Issued => {
                if s.tls.dns_names.is_empty() {
                    err(
                        "server.tls.dnsNames",
                        "at least one name is required when mode is issued".into(),
                    );
                }
                for (i, n) in s.tls.dns_names.iter().enumerate() {
                    if !valid_dns_or_ip(n) {
                        err(
                            &format!("server.tls.dnsNames[{i}]"),
                            format!("{n:?} is neither a DNS name nor an IP address"),
                        );
                    }
                }
                if s.tls.ttl < Duration::from_secs(2) {
                    err("server.tls.ttl", "must be at least 2s".into());
                }
                if s.tls.renew_before.is_zero() || s.tls.renew_before >= s.tls.ttl {
                    err(
                        "server.tls.renewBefore",
                        "must be > 0 and less than server.tls.ttl".into(),
                    );
                }
                if s.tls.cert_file.is_some() || s.tls.key_file.is_some() {
                    err(
                        "server.tls.certFile",
                        "only allowed when mode is files".into(),
                    );
                }
            }
        }
        let a = &self.authn;
        if !a.client_cert && a.jwt.is_empty() && a.dev_issuer.is_none() && a.kubernetes.is_none() {
            err(
                "authn",
                "no authenticator enabled: configure authn.jwt, authn.kubernetes, authn.clientCert or authn.devIssuer"
                    .into(),
            );
        }
        for (i, s) in a.trusted_node_accounts.iter().enumerate() {
            if let Err(e) = parse_accounts(std::slice::from_ref(s)) {
                err(&format!("authn.trustedNodeAccounts[{i}]"), e);
            }
        }
        if let Some(k) = &a.kubernetes {
            if k.clusters.is_empty() {
                err(
                    "authn.kubernetes.clusters",
                    "list at least one cluster".into(),
                );
            }
            if k.audiences.is_empty() || k.audiences.iter().any(|a| a.is_empty()) {
                err(
                    "authn.kubernetes.audiences",
                    "must list at least one non-empty audience".into(),
                );
            }
            if k.cache_size == 0 {
                err("authn.kubernetes.cacheSize", "must be > 0".into());
            }
            if k.cache_max_ttl.is_zero() {
                err("authn.kubernetes.cacheMaxTtl", "must be > 0".into());
            }
            if k.request_timeout.is_zero() {
                err("authn.kubernetes.requestTimeout", "must be > 0".into());
            } else if k.request_timeout >= s.request_timeout {
                err(
                    "authn.kubernetes.requestTimeout",
                    "must be less than server.requestTimeout (a slow API server must not use up the whole call)"
                        .into(),
                );
            }
            let mut ids = std::collections::HashSet::new();
            for (i, c) in k.clusters.iter().enumerate() {
                let f = |name: &str| format!("authn.kubernetes.clusters[{i}].{name}");
                if c.id.is_empty() {
                    err(&f("id"), "must not be empty".into());
                } else if !ids.insert(c.id.clone()) {
                    err(&f("id"), format!("cluster {:?} configured twice", c.id));
                }
                match (&c.kubeconfig, c.in_cluster) {
                    (Some(_), true) | (None, false) => err(
                        &f("kubeconfig"),
                        "set exactly one of kubeconfig or inCluster: true".into(),
                    ),
                    _ => {}
                }
                if let Some(td) = &c.trust_domain
                    && let Err(e) = check_trust_domain(td)
                {
                    err(&f("trustDomain"), e);
                }
                if !(c.qps.is_finite() && c.qps > 0.0) {
                    err(&f("qps"), "must be a number > 0".into());
                }
                if c.burst == 0 {
                    err(&f("burst"), "must be > 0".into());
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, j) in a.jwt.iter().enumerate() {
            let f = |name: &str| format!("authn.jwt[{i}].{name}");
            if j.issuer.is_empty() {
                err(&f("issuer"), "must not be empty".into());
            }
            if !seen.insert(j.issuer.clone()) || j.issuer == DEV_ISSUER {
                err(
                    &f("issuer"),
                    format!("issuer {:?} configured twice", j.issuer),
                );
            }
            match (&j.jwks_file, &j.jwks_uri) {
                (Some(_), Some(_)) | (None, None) => err(
                    &f("jwksFile"),
                    "exactly one of jwksFile or jwksUri must be set".into(),
                ),
                (None, Some(u)) if !(u.starts_with("https://") || u.starts_with("http://")) => {
                    err(&f("jwksUri"), format!("{u:?} is not an http(s) URL"))
                }
                (Some(_), None) if j.jwks_token_file.is_some() || j.jwks_ca_file.is_some() => err(
                    &f("jwksTokenFile"),
                    "jwksTokenFile and jwksCaFile only apply to jwksUri".into(),
                ),
                _ => {}
            }
            if j.audiences.is_empty() || j.audiences.iter().any(|a| a.is_empty()) {
                err(
                    &f("audiences"),
                    "must list at least one non-empty audience".into(),
                );
            }
            if let Some(td) = &j.trust_domain
                && let Err(e) = check_trust_domain(td)
            {
                err(&f("trustDomain"), e);
            }
            if j.refresh_interval < Duration::from_secs(1) {
                err(&f("refreshInterval"), "must be at least 1s".into());
            }
        }
        let k = &self.kubernetes;
        if k.writes() && a.kubernetes.is_none() {
            err(
                if k.root_config_map.enabled {
                    "kubernetes.rootConfigMap.enabled"
                } else {
                    "kubernetes.istiodCert.enabled"
                },
                "needs authn.kubernetes (the clusters to write to)".into(),
            );
        }
        let r = &k.root_config_map;
        if r.enabled {
            if !valid_dns_or_ip(&r.name) || r.name.parse::<std::net::IpAddr>().is_ok() {
                err(
                    "kubernetes.rootConfigMap.name",
                    format!("{:?} is not a valid ConfigMap name", r.name),
                );
            }
            if r.resync_interval < Duration::from_secs(1) {
                err(
                    "kubernetes.rootConfigMap.resyncInterval",
                    "must be at least 1s".into(),
                );
            }
        }
        let ic = &k.istiod_cert;
        if ic.enabled {
            if ic.namespace.is_empty() {
                err(
                    "kubernetes.istiodCert.namespace",
                    "must not be empty".into(),
                );
            }
            if ic.secret_name.is_empty() {
                err(
                    "kubernetes.istiodCert.secretName",
                    "must not be empty".into(),
                );
            }
            for (i, n) in ic.dns_names.iter().enumerate() {
                if !valid_dns_or_ip(n) {
                    err(
                        &format!("kubernetes.istiodCert.dnsNames[{i}]"),
                        format!("{n:?} is neither a DNS name nor an IP address"),
                    );
                }
            }
            if ic.ttl < Duration::from_secs(2) {
                err("kubernetes.istiodCert.ttl", "must be at least 2s".into());
            }
            if ic.renew_before.is_zero() || ic.renew_before >= ic.ttl {
                err(
                    "kubernetes.istiodCert.renewBefore",
                    "must be > 0 and less than kubernetes.istiodCert.ttl".into(),
                );
            }
        }
        if k.writes() {
            let le = &k.leader_election;
            if le.namespace.is_empty() {
                err(
                    "kubernetes.leaderElection.namespace",
                    "must not be empty".into(),
                );
            }
            if le.lease_name.is_empty() {
                err(
                    "kubernetes.leaderElection.leaseName",
                    "must not be empty".into(),
                );
            }
            if le.retry_period.is_zero() || le.lease_duration < le.retry_period * 2 {
                err(
                    "kubernetes.leaderElection.leaseDuration",
                    "must be at least twice retryPeriod (and retryPeriod > 0)".into(),
                );
            }
        }
        let p = &self.policy;
        if p.default_ttl.is_zero() {
            err("policy.defaultTtl", "must be > 0".into());
        }
        if p.max_ttl < p.default_ttl {
            err("policy.maxTtl", "must be >= policy.defaultTtl".into());
        }
        if p.key_types.is_empty() {
            err("policy.keyTypes", "must allow at least one key type".into());
        }
        if p.min_rsa_bits < 2048 {
            err("policy.minRsaBits", "must be at least 2048".into());
        }
        match &self.backend {
            BackendConfig::Local(l) => {
                if l.ca_cert_file.is_some() != l.ca_key_file.is_some() {
                    err(
                        "backend.caKeyFile",
                        "caCertFile and caKeyFile must be set together".into(),
                    );
                }
                if l.ca_cert_file.is_none() && l.chain_file.is_some() {
                    err("backend.chainFile", "requires caCertFile".into());
                }
                if l.generated_ttl < Duration::from_secs(3600) {
                    err("backend.generatedTtl", "must be at least 1h".into());
                }
            }
            BackendConfig::AwsPca(a) => {
                a.validate(&mut err);
                if a.mode == BackendMode::Intermediate
                    && (!a.intermediate_template_arn.starts_with("arn:")
                        || !a.intermediate_template_arn.contains(":template/"))
                {
                    err(
                        "backend.intermediateTemplateArn",
                        format!(
                            "{:?} is not a template ARN (arn:aws:acm-pca:::template/...)",
                            a.intermediate_template_arn
                        ),
                    );
                }
                if a.issue_timeout >= s.request_timeout {
                    err(
                        "backend.issueTimeout",
                        "must be below server.requestTimeout (callers then get the backend's \
                         RESOURCE_EXHAUSTED / UNAVAILABLE instead of a generic timeout)"
                            .into(),
                    );
                }
            }
            BackendConfig::Vault(v) => {
                for e in v.problems() {
                    errs.push(e);
                }
            }
            BackendConfig::Digicert(_) => {}
        }
        match &self.backend {
            BackendConfig::AwsPca(a) if a.mode == BackendMode::Intermediate => {
                errs.extend(a.intermediate.problems())
            }
            BackendConfig::Vault(v) if v.mode == BackendMode::Intermediate => {
                errs.extend(v.intermediate.problems())
            }
            _ => {}
        }
        match (self.audit.sink, &self.audit.path) {
            (AuditSink::File, None) => errs.push(FieldError {
                field: "audit.path".into(),
                message: "required when sink is file".into(),
            }),
            (AuditSink::Stdout | AuditSink::None, Some(_)) => errs.push(FieldError {
                field: "audit.path".into(),
                message: "only used when sink is file".into(),
            }),
            _ => {}
        }
        if let BackendConfig::Digicert(d) = &self.backend {
            errs.extend(d.problems());
            if d.request_timeout >= s.request_timeout {
                errs.push(FieldError {
                    field: "backend.requestTimeout".into(),
                    message: "must be below server.requestTimeout (callers then get the \
                              backend's RESOURCE_EXHAUSTED / UNAVAILABLE instead of a \
                              generic timeout)"
                        .into(),
                });
            }
        }
        if errs.is_empty() { Ok(()) } else { Err(errs) }
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

impl VaultBackendConfig {
    /// Validation problems, with fields named `backend.<field>`.
    pub fn problems(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut err = |field: &str, message: String| {
            errs.push(FieldError {
                field: format!("backend.{field}"),
                message,
            })
        };
        match reqwest::Url::parse(&self.address) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                if u.path() != "/" && !u.path().is_empty() {
                    err(
                        "address",
                        "give the server's base URL only, without a path such as /v1".into(),
                    );
                }
                if u.scheme() == "http"
                    && (self.tls.ca_file.is_some() || self.tls.client_cert_file.is_some())
                {
                    err("tls", "TLS settings require an https address".into());
                }
            }
            _ => err(
                "address",
                format!("{:?} is not an http(s) URL", self.address),
            ),
        }
        for (field, value) in [("mount", Some(&self.mount)), ("role", Some(&self.role))]
            .into_iter()
            .chain([
                ("serverRole", self.server_role.as_ref()),
                ("issuerRef", self.issuer_ref.as_ref()),
                ("namespace", self.namespace.as_ref()),
            ])
        {
            if let Some(v) = value
                && let Err(e) = check_vault_path(v)
            {
                err(field, e);
            }
        }
        if self.request_timeout.is_zero() {
            err("requestTimeout", "must be > 0".into());
        }
        if self.tls.client_cert_file.is_some() != self.tls.client_key_file.is_some() {
            err(
                "tls.clientKeyFile",
                "clientCertFile and clientKeyFile must be set together".into(),
            );
        }
        if !self.roots_from_mount && self.root_bundle_file.is_none() {
            err(
                "rootBundleFile",
                "required when rootsFromMount is false (there would be no trusted root)".into(),
            );
        }
        if self.root_refresh_interval < Duration::from_secs(1) {
            err("rootRefreshInterval", "must be at least 1s".into());
        }
        match &self.auth {
            VaultAuthConfig::Token(t) => {
                if t.token_file.is_some() == t.token_env.is_some() {
                    err(
                        "auth.tokenFile",
                        "exactly one of tokenFile or tokenEnv must be set".into(),
                    );
                }
                if let Some(e) = &t.token_env
                    && (e.is_empty() || e.contains('='))
                {
                    err(
                        "auth.tokenEnv",
                        format!("{e:?} is not an environment variable name"),
                    );
                }
            }
            VaultAuthConfig::Kubernetes(k) => {
                if k.role.is_empty() {
                    err("auth.role", "must not be empty".into());
                }
                if let Err(e) = check_vault_path(&k.mount) {
                    err("auth.mount", e);
                }
            }
            VaultAuthConfig::AppRole(a) => {
                if let Err(e) = check_vault_path(&a.mount) {
                    err("auth.mount", e);
                }
            }
            VaultAuthConfig::Jwt(j) => {
                if j.role.as_deref() == Some("") {
                    err("auth.role", "must not be empty when set".into());
                }
                if let Err(e) = check_vault_path(&j.mount) {
                    err("auth.mount", e);
                }
            }
        }
        errs
    }
}

/// A Vault path segment list such as `pki_int` or `team/pki`: no empty segments, no
/// leading or trailing slash, nothing that would change the URL's meaning.
fn check_vault_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("must not be empty".into());
    }
    let ok = p.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{p:?} must be path segments of letters, digits, '-', '_' or '.' separated by single '/'"
        ))
    }
}

fn check_trust_domain(td: &str) -> Result<(), String> {
    match normalize_trust_domain(td) {
        Ok(n) if n == td => Ok(()),
        Ok(n) => Err(format!("write the normalized form {n:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn valid_dns_or_ip(n: &str) -> bool {
    if n.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    !n.is_empty()
        && n.len() <= 253
        && n.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A secret value (token, API key). Its `Debug` and `Serialize` never show the value.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Parses `<ns>/<sa>` entries (`authn.trustedNodeAccounts`).
pub fn parse_accounts(list: &[String]) -> Result<Vec<ServiceAccount>, String> {
    list.iter()
        .map(|s| ServiceAccount::from_slash(s).map_err(|e| e.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_defaults_and_needs_an_authenticator_only_if_cert_authn_off() {
        let cfg = Config::parse("").unwrap();
        assert_eq!(cfg.trust_domain, "cluster.local");
        assert!(cfg.validate().is_ok());
    }

    #[test]
    fn unknown_field_is_named() {
        let (field, msg) = Config::parse("server:\n  tls:\n    mdoe: files\n").unwrap_err();
        assert_eq!(field, "server.tls.mdoe");
        assert!(msg.contains("mdoe"), "{msg}");
        let (field, msg) = Config::parse("backend:\n  type: local\n  stateDri: /x\n").unwrap_err();
        assert!(field.starts_with("backend"), "{field}");
        assert!(msg.contains("stateDri"), "{msg}");
        let (field, _) = Config::parse("policy:\n  maxTtl: forever\n").unwrap_err();
        assert_eq!(field, "policy.maxTtl");
    }

    #[test]
    fn validation_names_fields() {
        let cfg = Config::parse(
            "authn:\n  jwt:\n    - issuer: a\n  clientCert: false\nserver:\n  tls:\n    mode: files\n",
        )
        .unwrap();
        let errs = cfg.validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(fields.contains(&"authn.jwt[0].jwksFile"), "{fields:?}");
        assert!(fields.contains(&"server.tls.certFile"), "{fields:?}");
        assert!(fields.contains(&"server.tls.keyFile"), "{fields:?}");
    }

    const VAULT: &str =
        "backend:\n  type: vault\n  address: https://vault:8200\n  mount: pki_int\n  role: r\n";

    #[test]
    fn vault_backend_parses_every_auth_method() {
        for auth in [
            "method: token\n    tokenFile: /t",
            "method: token\n    tokenEnv: VAULT_TOKEN",
            "method: kubernetes\n    role: bridge",
            "method: approle\n    roleIdFile: /r\n    secretIdFile: /s",
            "method: jwt\n    tokenFile: /j\n    role: bridge",
        ] {
            let cfg = Config::parse(&format!("{VAULT}  auth:\n    {auth}\n"))
                .unwrap_or_else(|e| panic!("{auth}: {e:?}"));
            cfg.validate().unwrap_or_else(|e| panic!("{auth}: {e:?}"));
            let BackendConfig::Vault(v) = &cfg.backend else {
                panic!("not vault")
            };
            assert_eq!(v.request_timeout, Duration::from_secs(5));
            assert!(v.roots_from_mount);
        }
        let cfg = Config::parse(&format!(
            "{VAULT}  auth:\n    method: kubernetes\n    role: b\n"
        ))
        .unwrap();
        let BackendConfig::Vault(v) = &cfg.backend else {
            panic!()
        };
        let VaultAuthConfig::Kubernetes(k) = &v.auth else {
            panic!()
        };
        assert_eq!(k.mount, "kubernetes");
        assert_eq!(
            k.token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
    }

    #[test]
    fn vault_unknown_fields_and_bad_values_are_named() {
        let (field, msg) = Config::parse(&format!(
            "{VAULT}  auth:\n    method: approle\n    roleIdFile: /r\n    secretId: oops\n"
        ))
        .unwrap_err();
        assert!(field.starts_with("backend"), "{field}");
        assert!(msg.contains("secretId"), "{msg}");
        let (_, msg) = Config::parse(&format!("{VAULT}  auth:\n    method: ldap\n")).unwrap_err();
        assert!(msg.contains("ldap"), "{msg}");

        let cfg = Config::parse(
            "backend:\n  type: vault\n  address: vault:8200/v1\n  mount: /pki/\n  role: ''\n  \
             requestTimeout: 0s\n  rootsFromMount: false\n  tls:\n    clientCertFile: /c\n  \
             auth:\n    method: token\n",
        )
        .unwrap();
        let fields: Vec<String> = cfg
            .validate()
            .unwrap_err()
            .into_iter()
            .map(|e| e.field)
            .collect();
        for f in [
            "backend.address",
            "backend.mount",
            "backend.role",
            "backend.requestTimeout",
            "backend.rootBundleFile",
            "backend.tls.clientKeyFile",
            "backend.auth.tokenFile",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f} not in {fields:?}");
        }
        let cfg = Config::parse(&format!(
            "{VAULT}  auth:\n    method: token\n    tokenFile: /t\n    tokenEnv: X\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.validate().unwrap_err()[0].field,
            "backend.auth.tokenFile"
        );
        let cfg = Config::parse(
            "backend:\n  type: vault\n  address: https://vault:8200/v1\n  role: r\n  auth:\n    method: token\n    tokenEnv: T\n",
        )
        .unwrap();
        assert_eq!(cfg.validate().unwrap_err()[0].field, "backend.address");
    }

    #[test]
    fn vault_config_holds_no_secret_values() {
        let cfg = Config::parse(&format!(
            "{VAULT}  auth:\n    method: approle\n    roleIdFile: /r\n    secretIdFile: /s\n"
        ))
        .unwrap();
        let json = cfg.redacted_json().to_string();
        assert!(json.contains("\"secretIdFile\":\"/s\""), "{json}");
    }

    #[test]
    fn aws_pca_backend_parses_and_validation_names_fields() {
        let arn = "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/abc";
        let cfg = Config::parse(&format!("backend:\n  type: awsPca\n  caArn: {arn}\n")).unwrap();
        let BackendConfig::AwsPca(a) = &cfg.backend else {
            panic!("not awsPca")
        };
        assert_eq!(a.template_arn, AWS_PCA_DEFAULT_TEMPLATE);
        assert_eq!(a.effective_region().as_deref(), Some("eu-west-1"));
        assert_eq!(a.rate_limit, 20.0);
        assert!(cfg.validate().is_ok());

        let (field, msg) = Config::parse("backend:\n  type: awsPca\n  caArm: x\n").unwrap_err();
        assert!(field.starts_with("backend"), "{field}");
        assert!(msg.contains("caArm"), "{msg}");

        let cfg = Config::parse(
            "backend:\n  type: awsPca\n  caArn: nope\n  rateLimit: 0\n  rateBurst: 0\n  signingAlgorithm: MD5\n  issueTimeout: 10ms\n",
        )
        .unwrap();
        let errs = cfg.validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "backend.caArn",
            "backend.region",
            "backend.rateLimit",
            "backend.rateBurst",
            "backend.signingAlgorithm",
            "backend.issueTimeout",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }

        let cfg = Config::parse(&format!(
            "backend:\n  type: awsPca\n  caArn: {arn}\n  issueTimeout: 10s\n"
        ))
        .unwrap();
        let errs = cfg.validate().unwrap_err();
        assert_eq!(errs[0].field, "backend.issueTimeout", "{errs:?}");
        assert!(
            errs[0].message.contains("server.requestTimeout"),
            "{errs:?}"
        );
    }

    #[test]
    fn digicert_backend_defaults_and_validation_names_fields() {
        let ok = "backend:\n  type: digicert\n  auth: {apiKeyFile: /k}\n  profileId: p1\n  trustBundleFile: /r.pem\n";
        let cfg = Config::parse(ok).unwrap();
        let BackendConfig::Digicert(d) = &cfg.backend else {
            panic!("not digicert")
        };
        assert_eq!(d.base_url, DIGICERT_DEFAULT_BASE_URL);
        assert_eq!(d.api_url(), "https://one.digicert.com/mpki/api/v1");
        assert_eq!(d.seat.strategy, DigicertSeatStrategy::SpiffeId);
        assert_eq!(d.validity_unit, DigicertValidityUnit::Hours);
        assert_eq!(d.request_timeout, Duration::from_secs(5));
        assert_eq!(d.poll_initial_interval, Duration::from_millis(250));
        assert_eq!((d.rate_limit, d.rate_burst), (10.0, 20));
        assert!(cfg.validate().is_ok(), "{:?}", cfg.validate());
        // Empty strings (what a chart renders for unset values) mean unset.
        let cfg = Config::parse(&format!(
            "{ok}  intermediatesFile: \"\"\n  caFile: \"\"\n  seat: {{strategy: spiffeId, id: \"\"}}\n"
        ))
        .unwrap();
        let BackendConfig::Digicert(d) = &cfg.backend else {
            panic!()
        };
        assert!(d.intermediates_file.is_none() && d.ca_file.is_none());
        assert!(cfg.validate().is_ok());

        let (field, msg) =
            Config::parse("backend:\n  type: digicert\n  profileID: x\n").unwrap_err();
        assert!(field.starts_with("backend"), "{field}");
        assert!(msg.contains("profileID"), "{msg}");

        let fields = |yaml: &str| -> Vec<String> {
            Config::parse(yaml)
                .unwrap()
                .validate()
                .unwrap_err()
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        // Missing profileId and trust bundle; both apiKeyFile and apiKeyEnv.
        let f = fields("backend:\n  type: digicert\n  auth: {apiKeyFile: /k, apiKeyEnv: K}\n");
        for want in [
            "backend.profileId",
            "backend.trustBundleFile",
            "backend.auth",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        // No credentials at all; half a client certificate.
        let f = fields(&ok.replace("auth: {apiKeyFile: /k}", "auth: {}"));
        assert_eq!(f, ["backend.auth"]);
        let f = fields(&ok.replace("auth: {apiKeyFile: /k}", "auth: {clientCertFile: /c}"));
        assert_eq!(f, ["backend.auth.clientKeyFile"]);
        // mTLS alone is fine.
        let cfg = Config::parse(&ok.replace(
            "auth: {apiKeyFile: /k}",
            "auth: {clientCertFile: /c, clientKeyFile: /k}\n  baseUrl: https://clientauth.one.digicert.com",
        ))
        .unwrap();
        assert!(cfg.validate().is_ok());
        // Seats.
        assert_eq!(
            fields(&format!("{ok}  seat: {{strategy: fixed}}\n")),
            ["backend.seat.id"]
        );
        assert_eq!(
            fields(&format!("{ok}  seat: {{id: s1}}\n")),
            ["backend.seat.id"]
        );
        assert!(
            Config::parse(&format!("{ok}  seat: {{strategy: fixed, id: s1}}\n"))
                .unwrap()
                .validate()
                .is_ok()
        );
        assert!(Config::parse(&format!("{ok}  seat: {{strategy: perNode}}\n")).is_err());
        assert!(Config::parse(&format!("{ok}  validityUnit: weeks\n")).is_err());
        // Timeouts, polling, limits, URL.
        let f = fields(&format!(
            "{ok}  requestTimeout: 10s\n  pollInitialInterval: 3s\n  pollMaxInterval: 1s\n  rateLimit: 0\n  rateBurst: 0\n  baseUrl: http://one.digicert.com/mpki/api/v1\n"
        ));
        for want in [
            "backend.requestTimeout",
            "backend.pollMaxInterval",
            "backend.rateLimit",
            "backend.rateBurst",
            "backend.baseUrl",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        let errs = Config::parse(&format!("{ok}  requestTimeout: 10s\n"))
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].message.contains("server.requestTimeout"),
            "{errs:?}"
        );
        assert_eq!(
            fields(&format!(
                "{ok}  baseUrl: https://one.digicert.com/mpki/api/v1\n"
            )),
            ["backend.baseUrl"]
        );
    }

    #[test]
    fn kubernetes_validation_names_fields() {
        let cfg = Config::parse(
            "authn:\n  trustedNodeAccounts: [ztunnel]\n  kubernetes:\n    requestTimeout: 30s\n    audiences: []\n    clusters:\n      - id: a\n        inCluster: true\n        kubeconfig: /x\n        qps: 0\n      - id: a\n        trustDomain: Bad\n",
        )
        .unwrap();
        let errs = cfg.validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "authn.trustedNodeAccounts[0]",
            "authn.kubernetes.requestTimeout",
            "authn.kubernetes.audiences",
            "authn.kubernetes.clusters[0].kubeconfig",
            "authn.kubernetes.clusters[0].qps",
            "authn.kubernetes.clusters[1].id",
            "authn.kubernetes.clusters[1].kubeconfig",
            "authn.kubernetes.clusters[1].trustDomain",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        let (field, _) = Config::parse(
            "authn:\n  kubernetes:\n    clusters:\n      - id: a\n        inClustr: true\n",
        )
        .unwrap_err();
        assert!(field.starts_with("authn.kubernetes.clusters"), "{field}");
        let ok = Config::parse(
            "authn:\n  kubernetes:\n    clusters:\n      - id: a\n        inCluster: true\n        trustDomain: a.example\n",
        )
        .unwrap();
        ok.validate().unwrap();
        assert_eq!(ok.trust_domains(), vec!["cluster.local", "a.example"]);
        assert_eq!(
            parse_accounts(&ok.authn.trusted_node_accounts).unwrap(),
            vec![ServiceAccount::new("istio-system", "ztunnel").unwrap()]
        );
    }

    #[test]
    fn cluster_writers_validation_names_fields() {
        let cfg = Config::parse(
            "kubernetes:\n  rootConfigMap:\n    enabled: true\n    name: Bad_Name\n  istiodCert:\n    enabled: true\n    dnsNames: [bad_name]\n    ttl: 1h\n    renewBefore: 2h\n  leaderElection:\n    leaseDuration: 3s\n    retryPeriod: 2s\n",
        )
        .unwrap();
        let errs = cfg.validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "kubernetes.rootConfigMap.enabled",
            "kubernetes.rootConfigMap.name",
            "kubernetes.istiodCert.dnsNames[0]",
            "kubernetes.istiodCert.renewBefore",
            "kubernetes.leaderElection.leaseDuration",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        // Disabled (the default), nothing is checked.
        assert!(Config::parse("").unwrap().validate().is_ok());
        let ic = IstiodCertConfig {
            revisions: vec!["canary".into()],
            ..Default::default()
        };
        assert_eq!(
            ic.effective_dns_names(),
            vec!["istiod.istio-system.svc", "istiod-canary.istio-system.svc"]
        );
    }

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"<redacted>\"");
    }
}
