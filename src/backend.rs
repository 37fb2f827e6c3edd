//! The backend seam: who signs certificates.
//!
//! Every backend (the embedded local CA, Vault, AWS Private CA, DigiCert, and the
//! intermediate mode over Vault or AWS Private CA) implements the small async [`Signer`] trait and is held as
//! `Arc<dyn Signer>`. Remote backends are slow, rate limited and sometimes down, so
//! [`SignError`] tells the caller what to do (retry later, give up, back off) rather than
//! what went wrong inside. Cross-cutting concerns (metrics now; limits, deadlines and
//! coalescing later) are decorators over any `Signer`, see [`instrumented`].

pub mod aws_pca;
pub mod digicert;
pub mod instrumented;
pub mod intermediate;
pub mod limit;
pub mod local;
pub mod vault;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

use crate::config::{BackendConfig, BackendMode};
use crate::identity::SpiffeId;
use crate::metrics::Metrics;
use crate::trust::SharedBundle;

/// What a certificate is for. The backend builds the certificate from this, never from
/// the CSR's own contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A workload: one URI SAN, the SPIFFE ID; client and server auth.
    Workload(SpiffeId),
    /// The bridge's own serving certificate (or istiod's): DNS names / IP literals.
    Server { dns_names: Vec<String> },
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Workload(id) => write!(f, "{id}"),
            Subject::Server { dns_names } => write!(f, "dns:{}", dns_names.join(",")),
        }
    }
}

/// A checked request to sign. `public_key_der` is the SubjectPublicKeyInfo taken from a
/// CSR whose signature was verified; `csr_der` is kept for remote backends whose API only
/// accepts a CSR (they must still put only `subject` into the certificate).
#[derive(Debug, Clone)]
pub struct SignRequest {
    pub subject: Subject,
    pub public_key_der: Vec<u8>,
    pub csr_der: Vec<u8>,
    /// Requested lifetime after policy; the backend may shorten it (issuer expiry, role caps).
    pub ttl: Duration,
    /// Who asked, for the audit log; `None` for the bridge's own certificates.
    pub caller: Option<CallerRef>,
}

/// The authenticated caller of a workload request, as the audit log records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerRef {
    pub identity: String,
    pub via: &'static str,
    pub cluster_id: Option<String>,
}

/// What a backend issued: the leaf and the intermediates that link it to a root of the
/// trust bundle (leaf-most first, roots excluded).
#[derive(Debug, Clone)]
pub struct IssuedChain {
    pub leaf: CertificateDer<'static>,
    pub intermediates: Vec<CertificateDer<'static>>,
}

/// Why signing failed, phrased as what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// Transient: backend down, sealed, timed out, not yet ready. Clients retry.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// The backend (or our own limiter) is throttling. Clients back off and retry.
    #[error("backend throttled: {reason}")]
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Permanent: the backend refused this request (policy, bad CSR). Do not retry.
    #[error("backend rejected the request: {0}")]
    Rejected(String),
    /// Anything else; a bug or an unexpected answer.
    #[error("backend error: {0}")]
    Internal(String),
}

impl SignError {
    /// Low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SignError::Unavailable(_) => "unavailable",
            SignError::Throttled { .. } => "throttled",
            SignError::Rejected(_) => "rejected",
            SignError::Internal(_) => "internal",
        }
    }
}

/// Whether the backend can sign right now (drives /readyz).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    NotReady(String),
}

/// Facts about the CA that signs leaves, for expiry gauges and TTL clamping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigningCaInfo {
    /// NotAfter of the certificate that signs leaves (unix seconds), if known.
    pub not_after: Option<i64>,
}

#[async_trait]
pub trait Signer: Send + Sync + 'static {
    /// Short backend name for logs and metric labels (`local`, `vault`, ...).
    fn kind(&self) -> &'static str;

    /// `direct` when the backend signs each certificate, `intermediate` when the bridge
    /// signs with its own intermediate from the backend (audit records, logs).
    fn mode(&self) -> &'static str {
        "direct"
    }

    /// Issues a certificate for `req.subject` with `req.public_key_der`.
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError>;

    /// The current trust bundle; the receiver sees every later change.
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle>;

    fn health(&self) -> Health;

    fn signing_ca(&self) -> SigningCaInfo {
        SigningCaInfo { not_after: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    // The cause is the source, so error chains (`{:#}`) print it once.
    #[error("local CA")]
    Local(#[from] local::LocalError),
    #[error("AWS Private CA")]
    AwsPca(#[from] aws_pca::AwsPcaError),
    #[error("vault")]
    Vault(#[from] vault::VaultError),
    #[error("DigiCert")]
    Digicert(#[from] digicert::DigicertError),
    #[error("intermediate mode")]
    Intermediate(#[from] intermediate::IntermediateError),
}

type UpstreamFuture = futures::future::BoxFuture<
    'static,
    Result<Arc<dyn intermediate::UpstreamAuthority>, BuildError>,
>;

/// How to connect to the upstream of intermediate mode (again, if the first try fails).
fn upstream_connector(
    cfg: &BackendConfig,
    metrics: Arc<Metrics>,
) -> (&'static str, Arc<dyn Fn() -> UpstreamFuture + Send + Sync>) {
    match cfg {
        BackendConfig::Vault(v) => {
            let v = v.clone();
            (
                vault::KIND,
                Arc::new(move || {
                    let (v, metrics) = (v.clone(), metrics.clone());
                    Box::pin(async move {
                        let s = vault::VaultSigner::connect(&v, metrics).await?;
                        Ok(Arc::new(s) as Arc<dyn intermediate::UpstreamAuthority>)
                    })
                }),
            )
        }
        BackendConfig::AwsPca(a) => {
            let a = a.clone();
            (
                aws_pca::KIND,
                Arc::new(move || {
                    let (a, metrics) = (a.clone(), metrics.clone());
                    Box::pin(async move {
                        let s = aws_pca::AwsPca::connect(&a, metrics).await?;
                        Ok(s as Arc<dyn intermediate::UpstreamAuthority>)
                    })
                }),
            )
        }
        BackendConfig::Local(_) | BackendConfig::Digicert(_) => {
            unreachable!("only vault and awsPca have an intermediate mode")
        }
    }
}

/// Builds the configured backend. Remote backends log in and fetch their trust bundle
/// here, so a bridge that cannot reach its CA fails at start with a clear error.
///
/// In intermediate mode the backend signs the bridge's first intermediate here too, so a
/// backend whose answer is not a usable CA stops the start with the reason. If the backend
/// cannot be reached but `intermediate.stateDir` holds a usable intermediate, the bridge
/// starts with it and connects later ([`intermediate::LazyUpstream`]).
/// `max_leaf_ttl` is `policy.maxTtl` (intermediate mode switches early enough for it).
pub async fn build(
    cfg: &BackendConfig,
    trust_domain: &str,
    max_leaf_ttl: Duration,
    metrics: Arc<Metrics>,
) -> Result<Arc<dyn Signer>, BuildError> {
    let icfg = match cfg {
        BackendConfig::Local(l) => {
            return Ok(Arc::new(local::LocalCa::load_or_create(l, trust_domain)?));
        }
        BackendConfig::Digicert(d) => {
            return Ok(Arc::new(digicert::Digicert::connect(d, metrics)?));
        }
        BackendConfig::AwsPca(a) if a.mode == BackendMode::Direct => {
            return Ok(aws_pca::AwsPca::connect(a, metrics).await?);
        }
        BackendConfig::Vault(v) if v.mode == BackendMode::Direct => {
            return Ok(Arc::new(vault::VaultSigner::connect(v, metrics).await?));
        }
        BackendConfig::AwsPca(a) => &a.intermediate,
        BackendConfig::Vault(v) => &v.intermediate,
    };
    let (kind, connect) = upstream_connector(cfg, metrics.clone());
    let upstream = match connect().await {
        Ok(up) => up,
        Err(e) => {
            // A replica restarted during a backend outage starts from its stored
            // intermediate, if it has a usable one, and connects later.
            let stored = icfg
                .state_dir
                .as_deref()
                .and_then(|d| intermediate::stored_bundle(d, icfg, trust_domain));
            let Some(bundle) = stored else {
                return Err(e);
            };
            let msg = format!("{:#}", anyhow::Error::new(e));
            tracing::error!(
                backend = kind,
                error = %msg,
                "BACKEND UNREACHABLE AT START: signing with the stored intermediate CA; no successor can be prepared until the backend answers"
            );
            intermediate::LazyUpstream::start(
                kind,
                bundle,
                msg,
                Box::new(move || {
                    let c = connect();
                    Box::pin(
                        async move { c.await.map_err(|e| format!("{:#}", anyhow::Error::new(e))) },
                    )
                }),
            )
        }
    };
    let signer = intermediate::IntermediateSigner::start(
        upstream,
        icfg,
        trust_domain,
        max_leaf_ttl,
        metrics,
    )
    .await?;
    Ok(Arc::new(signer))
}
