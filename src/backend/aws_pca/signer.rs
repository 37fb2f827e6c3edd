//! [`AwsPca`]: leaves (and, in intermediate mode, the bridge's intermediates) from
//! IssueCertificate + GetCertificate through [`Retry`], and the trust bundle from the CA's
//! certificate.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{AwsPcaError, Issue, PcaClient, SdkClient};
use super::{AwsPcaConfig, KIND};
use crate::backend::intermediate::{IntermediateRequest, UpstreamAuthority};
use crate::backend::remote::{self, Backoff, Polling, Retry, TokenBucket};
use crate::backend::{
    Authority, Health, IssuedChain, SignError, SignRequest, Signer, SigningCaInfo,
};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{SharedBundle, TrustBundle};

/// IdempotencyToken for a request: the same CSR for the same subject and lifetime maps to
/// the same token (AWS dedupes for a few minutes), so a retry never issues a second
/// certificate. Hex SHA-256, truncated to the 36 characters the API allows.
pub fn idempotency_token(req: &SignRequest) -> String {
    token_of(&[
        &req.csr_der,
        req.subject.to_string().as_bytes(),
        &req.ttl.as_secs().to_be_bytes(),
    ])
}

/// 32 hex characters of SHA-256 over `parts` (NUL-separated): within the 36 characters an
/// IdempotencyToken may have, and the same for the same request on every retry.
fn token_of(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update([0]);
        }
        h.update(p);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    hex[..32].to_string()
}

/// RequestInProgressException is polled like a transient failure, counted as
/// `in_progress` (the reason docs/aws-pca.md lists).
const IN_PROGRESS: Polling = Polling {
    reason: "in_progress",
    every: Backoff::TRANSIENT,
    jitter: true,
};

/// The CA's own certificate facts, from the last bundle refresh.
struct CaState {
    bundle: watch::Sender<SharedBundle>,
    /// The self-signed roots of the CA's own chain (`extraRootsFile`'s are only trusted).
    chain_roots: arc_swap::ArcSwap<Vec<CertificateDer<'static>>>,
    not_after: Mutex<Option<i64>>,
}

pub struct AwsPca {
    client: Box<dyn PcaClient>,
    cfg: AwsPcaConfig,
    signing_algorithm: String,
    bucket: TokenBucket,
    ca: CaState,
    metrics: Arc<Metrics>,
}

impl AwsPca {
    /// Builds the SDK client from the default credential chain (optionally assuming a
    /// role), then [`Self::with_client`].
    pub async fn connect(
        cfg: &AwsPcaConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, AwsPcaError> {
        let client = SdkClient::new(cfg).await?;
        Self::with_client(Box::new(client), cfg, metrics).await
    }

    /// Reads the signing algorithm (unless configured) and the trust bundle through
    /// `client`, and starts the periodic bundle refresh.
    pub async fn with_client(
        client: Box<dyn PcaClient>,
        cfg: &AwsPcaConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, AwsPcaError> {
        let signing_algorithm = match &cfg.signing_algorithm {
            Some(a) => a.clone(),
            None => client
                .signing_algorithm(&cfg.ca_arn)
                .await
                .map_err(AwsPcaError::Api)?,
        };
        let (bundle, chain_roots, not_after) = fetch_bundle(client.as_ref(), cfg).await?;
        tracing::info!(
            ca = %cfg.ca_arn,
            signing_algorithm,
            roots = bundle.roots().len(),
            "AWS Private CA backend ready"
        );
        let (tx, _) = watch::channel(Arc::new(bundle));
        let me = Arc::new(Self {
            client,
            bucket: TokenBucket::new(cfg.rate_limit, cfg.rate_burst),
            cfg: cfg.clone(),
            signing_algorithm,
            ca: CaState {
                bundle: tx,
                chain_roots: arc_swap::ArcSwap::from_pointee(chain_roots),
                not_after: Mutex::new(Some(not_after)),
            },
            metrics,
        });
        spawn_refresh(Arc::downgrade(&me), cfg.bundle_refresh_interval);
        Ok(me)
    }

    /// Retries until `deadline`: IssueCertificate behind the token bucket, keeping a
    /// quarter of `issueTimeout`, at most 2 s, for the calls themselves; GetCertificate
    /// without it (the bucket guards the IssueCertificate quota).
    fn retry(&self, rate_limited: bool) -> Retry<'_> {
        Retry {
            kind: KIND,
            metrics: &self.metrics,
            bucket: rate_limited.then_some(&self.bucket),
            keep: (self.cfg.issue_timeout / 4).min(Duration::from_secs(2)),
            throttled: Backoff::THROTTLED,
            transient: Backoff::TRANSIENT,
        }
    }

    /// IssueCertificate with `template_arn` and `token`, then GetCertificate until issued;
    /// the answer as an [`IssuedChain`].
    async fn issue(
        &self,
        csr_der: &[u8],
        ttl: Duration,
        template_arn: &str,
        token: &str,
        deadline: Instant,
    ) -> Result<IssuedChain, SignError> {
        let csr_pem = pki::pem_encode("CERTIFICATE REQUEST", csr_der);
        // NotAfter: now + TTL, never past the CA's own NotAfter (AWS refuses that), rounded
        // down to the minute so that a retry sends the very same parameters.
        let now = pki::unix_secs(SystemTime::now());
        let mut not_after = (now + ttl.as_secs() as i64) / 60 * 60;
        if let Some(ca_not_after) = *self.ca.not_after.lock().expect("lock") {
            not_after = not_after.min(ca_not_after);
        }
        if not_after <= now {
            return Err(SignError::Unavailable(
                "the AWS Private CA certificate expires now".into(),
            ));
        }
        let issue = Issue {
            ca_arn: &self.cfg.ca_arn,
            csr_pem: &csr_pem,
            signing_algorithm: &self.signing_algorithm,
            template_arn,
            not_after,
            idempotency_token: token,
        };
        let arn = self
            .retry(true)
            .run_polling("IssueCertificate", deadline, IN_PROGRESS, |_| {
                self.client.issue_certificate(&issue)
            })
            .await?;
        let got = self
            .retry(false)
            .run_polling("GetCertificate", deadline, IN_PROGRESS, |_| {
                self.client.get_certificate(&self.cfg.ca_arn, &arn)
            })
            .await?;
        remote::issued_chain(&got.certificate, [got.chain.as_str()])
            .map_err(|e| SignError::Internal(format!("GetCertificate answer: {e}")))
    }

    async fn refresh_bundle(&self) -> Result<(), AwsPcaError> {
        let (bundle, chain_roots, not_after) =
            fetch_bundle(self.client.as_ref(), &self.cfg).await?;
        *self.ca.not_after.lock().expect("lock") = Some(not_after);
        self.ca.chain_roots.store(Arc::new(chain_roots));
        let changed = {
            let cur = self.ca.bundle.borrow();
            cur.roots() != bundle.roots()
        };
        if changed {
            self.ca.bundle.send_replace(Arc::new(bundle));
        }
        Ok(())
    }
}

/// Reads the CA certificate and its chain; roots (self-signed) plus the extra roots file
/// form the bundle. Returns the bundle, the chain's own roots and the CA certificate's
/// NotAfter.
async fn fetch_bundle(
    client: &dyn PcaClient,
    cfg: &AwsPcaConfig,
) -> Result<(TrustBundle, Vec<CertificateDer<'static>>, i64), AwsPcaError> {
    let out = client
        .ca_certificate(&cfg.ca_arn)
        .await
        .map_err(AwsPcaError::Api)?;
    let bad = |e: pki::PkiError| AwsPcaError::BadCaCertificate(e.to_string());
    let ca = pki::parse_certs_pem(out.certificate.as_bytes())
        .map_err(bad)?
        .remove(0);
    let ca_info = pki::cert_info(&ca).map_err(bad)?;
    let mut certs: Vec<CertificateDer<'static>> = vec![ca];
    if !out.chain.trim().is_empty() {
        certs.extend(pki::parse_certs_pem(out.chain.as_bytes()).map_err(bad)?);
    }
    let mut roots = Vec::new();
    for c in certs {
        if pki::cert_info(&c).map_err(bad)?.self_signed {
            roots.push(c);
        }
    }
    let chain_roots = roots.clone();
    if let Some(path) = &cfg.extra_roots_file {
        let extra_roots = |message: String| AwsPcaError::ExtraRoots {
            path: path.clone(),
            message,
        };
        let text = std::fs::read(path).map_err(|e| extra_roots(e.to_string()))?;
        roots.extend(pki::parse_certs_pem(&text).map_err(|e| extra_roots(e.to_string()))?);
    }
    if roots.is_empty() {
        return Err(AwsPcaError::BadCaCertificate(
            "the CA chain ends in no self-signed root; add the root with extraRootsFile".into(),
        ));
    }
    let bundle = TrustBundle::new(roots).map_err(bad)?;
    Ok((bundle, chain_roots, ca_info.not_after))
}

fn spawn_refresh(me: Weak<AwsPca>, every: Duration) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(pca) = me.upgrade() else { return };
            if let Err(e) = pca.refresh_bundle().await {
                tracing::warn!(error = %e, backend = KIND, "trust bundle refresh failed; keeping the previous bundle");
            }
        }
    });
}

impl Authority for AwsPca {
    fn kind(&self) -> &'static str {
        KIND
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.ca.bundle.subscribe()
    }
    fn signing_roots(&self) -> Option<Vec<CertificateDer<'static>>> {
        Some(self.ca.chain_roots.load().to_vec())
    }
    fn health(&self) -> Health {
        match *self.ca.not_after.lock().expect("lock") {
            Some(t) if t <= pki::unix_secs(SystemTime::now()) => {
                Health::NotReady("the AWS Private CA certificate has expired".into())
            }
            _ => Health::Ready,
        }
    }
}

#[async_trait]
impl Signer for AwsPca {
    /// The answer is checked centrally; only a longer lifetime than requested (AWS honours
    /// `Validity`, moto and templates that override it do not) is noted here.
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let deadline = Instant::now() + self.cfg.issue_timeout;
        let token = idempotency_token(req);
        let issued = self
            .issue(
                &req.csr_der,
                req.ttl,
                &self.cfg.template_arn,
                &token,
                deadline,
            )
            .await?;
        Ok(issued)
    }

    fn signing_ca(&self) -> SigningCaInfo {
        SigningCaInfo {
            not_after: *self.ca.not_after.lock().expect("lock"),
        }
    }
}

/// Intermediate mode: the CA signs the bridge's intermediate with
/// `intermediateTemplateArn` (default SubordinateCACertificate_PathLen0/V1). The answer is
/// checked by the intermediate mode itself: moto ignores templates and returns a
/// certificate without CA:TRUE, which is refused there with that reason.
#[async_trait]
impl UpstreamAuthority for AwsPca {
    async fn sign_intermediate(&self, req: &IntermediateRequest) -> Result<IssuedChain, SignError> {
        // A background task has more patience than a caller: three issue timeouts.
        let deadline = Instant::now() + self.cfg.issue_timeout * 3;
        let token = token_of(&[
            &req.csr_der,
            b"intermediate",
            &req.ttl.as_secs().to_be_bytes(),
        ]);
        self.issue(
            &req.csr_der,
            req.ttl,
            &self.cfg.intermediate_template_arn,
            &token,
            deadline,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Subject;

    #[test]
    fn idempotency_token_is_stable_short_and_request_specific() {
        let id = crate::identity::SpiffeId::parse("spiffe://cluster.local/ns/a/sa/b").unwrap();
        let req = SignRequest {
            subject: Subject::Workload(id),
            public_key_der: vec![1],
            csr_der: vec![1, 2, 3],
            ttl: Duration::from_secs(3600),
            caller: None,
        };
        let t = idempotency_token(&req);
        assert!(t.len() <= 36);
        assert_eq!(t, idempotency_token(&req.clone()));
        let mut other = req.clone();
        other.csr_der.push(4);
        assert_ne!(t, idempotency_token(&other));
        let mut other = req;
        other.ttl = Duration::from_secs(7200);
        assert_ne!(t, idempotency_token(&other));
    }
}
