//! AWS Private CA backend: every certificate is one `IssueCertificate` call.
//!
//! One request: wait for the client-side token bucket (below the account's 25 TPS
//! IssueCertificate quota, so a restart storm queues here instead of being throttled
//! there), `IssueCertificate` with the CSR, an absolute validity and an idempotency token
//! derived from the request (so a retry after a lost answer never issues twice), then
//! `GetCertificate` until the asynchronous issuance is done. Everything happens within
//! `issueTimeout`: `ThrottlingException` and transient failures are retried with jittered
//! backoff while the deadline allows, then the call fails with [`SignError::Throttled`] or
//! [`SignError::Unavailable`]. The SDK's own retries are off so that this one loop decides.
//!
//! What comes back is checked: the leaf must carry exactly the requested names. A leaf
//! living longer than requested (AWS honours `Validity`; moto and templates that override
//! it do not) is accepted, logged and counted in
//! `istio_ca_bridge_backend_ttl_exceeded_total`: it cannot be shortened after signing,
//! clients renew at half of the lifetime they see, and refusing would turn a CA setting
//! into an outage. The trust bundle is the CA's root (from
//! `GetCertificateAuthorityCertificate`) plus an optional extra roots file, re-read
//! periodically.

mod config;

pub use config::*;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_acmpca::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{SigningAlgorithm, Validity, ValidityPeriodType};
use rustls_pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::Instant;

use super::intermediate::{IntermediateRequest, UpstreamAuthority};
use super::remote::{TokenBucket, backoff};
use super::{
    Authority, Health, IssuedChain, SignError, SignRequest, Signer, SigningCaInfo, Subject,
};
use crate::metrics::Metrics;
use crate::pki;
use crate::trust::{SharedBundle, TrustBundle};

pub(crate) const KIND: &str = "aws_pca";

#[derive(Debug, thiserror::Error)]
pub enum AwsPcaError {
    #[error("{0}")]
    Config(String),
    #[error("{op} failed: {message}")]
    Api { op: &'static str, message: String },
    #[error("{path}: {message}")]
    ExtraRoots { path: PathBuf, message: String },
    #[error("the CA answered an unusable certificate: {0}")]
    BadCaCertificate(String),
}

/// How one failed API call should be handled.
#[derive(Debug)]
enum Failure {
    /// ThrottlingException: back off and retry while the deadline allows.
    Throttled(String),
    /// GetCertificate: not issued yet.
    InProgress,
    /// Network trouble, timeouts, 5xx: retry while the deadline allows.
    Transient(String),
    /// Do not retry; already the final answer.
    Final(SignError),
}

fn classify<E, R>(op: &str, e: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let msg = || {
        format!(
            "{op}: {}: {}",
            e.code().unwrap_or("error"),
            e.message().unwrap_or("")
        )
    };
    match e {
        SdkError::TimeoutError(_) => Failure::Transient(format!("{op}: timed out")),
        SdkError::DispatchFailure(d) => {
            if d.is_user() {
                Failure::Final(SignError::Internal(format!("{op}: {d:?}")))
            } else {
                Failure::Transient(format!("{op}: connection failed: {d:?}"))
            }
        }
        SdkError::ResponseError(_) => {
            Failure::Transient(format!("{op}: broken response: {}", error_chain(e)))
        }
        SdkError::ConstructionFailure(_) => {
            Failure::Final(SignError::Internal(format!("{op}: {}", error_chain(e))))
        }
        SdkError::ServiceError(_) => match e.code().unwrap_or("") {
            "ThrottlingException" | "TooManyRequestsException" | "RequestLimitExceeded" => {
                Failure::Throttled(msg())
            }
            "RequestInProgressException" => Failure::InProgress,
            // Quota on the number of certificates: waiting a few seconds will not help.
            "LimitExceededException" => Failure::Final(SignError::Throttled {
                reason: msg(),
                retry_after: None,
            }),
            "MalformedCSRException" => Failure::Final(SignError::Rejected(msg())),
            "InternalFailure" | "ServiceUnavailable" | "ServiceUnavailableException" => {
                Failure::Transient(msg())
            }
            // Configuration or CA state (disabled, deleted, no permission): an operator
            // must act; clients may retry meanwhile.
            "InvalidStateException"
            | "ResourceNotFoundException"
            | "AccessDeniedException"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "InvalidSignatureException"
            | "RequestFailedException" => Failure::Final(SignError::Unavailable(msg())),
            _ => Failure::Final(SignError::Internal(msg())),
        },
        _ => Failure::Transient(format!("{op}: {}", error_chain(e))),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

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

/// The CA's own certificate facts, from the last bundle refresh.
struct CaState {
    bundle: watch::Sender<SharedBundle>,
    not_after: Mutex<Option<i64>>,
}

pub struct AwsPca {
    client: aws_sdk_acmpca::Client,
    cfg: AwsPcaConfig,
    signing_algorithm: SigningAlgorithm,
    bucket: TokenBucket,
    ca: CaState,
    metrics: Arc<Metrics>,
}

impl AwsPca {
    /// Builds the client from the SDK default credential chain (optionally assuming a
    /// role), reads the signing algorithm (unless configured) and the trust bundle, and
    /// starts the periodic bundle refresh.
    pub async fn connect(
        cfg: &AwsPcaConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, AwsPcaError> {
        let region = cfg
            .effective_region()
            .ok_or_else(|| AwsPcaError::Config("no region".into()))?;
        let region = aws_config::Region::new(region);
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(region.clone())
            .load()
            .await;
        let base = match &cfg.assume_role_arn {
            Some(role) => {
                let provider = aws_config::sts::AssumeRoleProvider::builder(role)
                    .session_name("istio-ca-bridge")
                    .region(region)
                    .configure(&base)
                    .build()
                    .await;
                base.into_builder()
                    .credentials_provider(aws_sdk_acmpca::config::SharedCredentialsProvider::new(
                        provider,
                    ))
                    .build()
            }
            None => base,
        };
        // The endpoint override applies to Private CA only (not to STS).
        let mut conf = aws_sdk_acmpca::config::Builder::from(&base)
            .retry_config(aws_sdk_acmpca::config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_sdk_acmpca::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .build(),
            );
        if let Some(e) = &cfg.endpoint {
            conf = conf.endpoint_url(e);
        }
        let client = aws_sdk_acmpca::Client::from_conf(conf.build());

        let signing_algorithm = match &cfg.signing_algorithm {
            Some(a) => SigningAlgorithm::from(a.as_str()),
            None => {
                let out = client
                    .describe_certificate_authority()
                    .certificate_authority_arn(&cfg.ca_arn)
                    .send()
                    .await
                    .map_err(|e| AwsPcaError::Api {
                        op: "DescribeCertificateAuthority",
                        message: error_chain(&e),
                    })?;
                out.certificate_authority()
                    .and_then(|ca| ca.certificate_authority_configuration())
                    .map(|c| c.signing_algorithm().clone())
                    .ok_or_else(|| AwsPcaError::Api {
                        op: "DescribeCertificateAuthority",
                        message: "no CertificateAuthorityConfiguration in the answer".into(),
                    })?
            }
        };
        let (bundle, not_after) = fetch_bundle(&client, cfg).await?;
        tracing::info!(
            ca = %cfg.ca_arn,
            signing_algorithm = signing_algorithm.as_str(),
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
                not_after: Mutex::new(Some(not_after)),
            },
            metrics,
        });
        spawn_refresh(Arc::downgrade(&me), cfg.bundle_refresh_interval);
        Ok(me)
    }

    fn count_retry(&self, reason: &str) {
        self.metrics
            .backend_retries
            .with_label_values(&[KIND, reason])
            .inc();
    }

    fn count_throttle(&self, source: &str) {
        self.metrics
            .backend_throttles
            .with_label_values(&[KIND, source])
            .inc();
    }

    /// Waits for a slot of the bucket (see [`TokenBucket::acquire`]), keeping a quarter of
    /// `issueTimeout`, at most 2 s, for the calls themselves.
    async fn rate_limit(&self, deadline: Instant) -> Result<(), SignError> {
        let keep = (self.cfg.issue_timeout / 4).min(Duration::from_secs(2));
        self.bucket
            .acquire(deadline, keep, KIND, &self.metrics)
            .await
    }

    /// IssueCertificate with retries; returns the certificate ARN.
    async fn issue(
        &self,
        csr_der: &[u8],
        ttl: Duration,
        template_arn: &str,
        token: &str,
        deadline: Instant,
    ) -> Result<String, SignError> {
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
        let validity = Validity::builder()
            .r#type(ValidityPeriodType::Absolute)
            .value(not_after)
            .build()
            .map_err(|e| SignError::Internal(format!("validity: {e}")))?;
        let mut attempt = 0u32;
        loop {
            self.rate_limit(deadline).await?;
            let call = self
                .client
                .issue_certificate()
                .certificate_authority_arn(&self.cfg.ca_arn)
                .csr(Blob::new(csr_pem.as_bytes()))
                .signing_algorithm(self.signing_algorithm.clone())
                .template_arn(template_arn)
                .validity(validity.clone())
                .idempotency_token(token)
                .send();
            let failure = match tokio::time::timeout_at(deadline, call).await {
                Err(_) => {
                    return Err(SignError::Unavailable(
                        "IssueCertificate: no answer within issueTimeout".into(),
                    ));
                }
                Ok(Ok(out)) => {
                    return out.certificate_arn().map(str::to_string).ok_or_else(|| {
                        SignError::Internal("IssueCertificate: no CertificateArn".into())
                    });
                }
                Ok(Err(e)) => classify("IssueCertificate", &e),
            };
            self.retry_or_fail(failure, &mut attempt, deadline).await?;
        }
    }

    /// Sleeps before the next attempt, or returns the final error when the deadline does
    /// not leave room for one.
    async fn retry_or_fail(
        &self,
        failure: Failure,
        attempt: &mut u32,
        deadline: Instant,
    ) -> Result<(), SignError> {
        let (delay, reason, on_deadline) = match failure {
            Failure::Final(e) => return Err(e),
            Failure::Throttled(m) => {
                self.count_throttle("remote");
                let d = backoff(*attempt, Duration::from_millis(100), Duration::from_secs(2));
                (
                    d,
                    "throttled",
                    SignError::Throttled {
                        reason: m,
                        retry_after: Some(d),
                    },
                )
            }
            Failure::Transient(m) => (
                backoff(*attempt, Duration::from_millis(100), Duration::from_secs(1)),
                "transient",
                SignError::Unavailable(m),
            ),
            Failure::InProgress => (
                backoff(*attempt, Duration::from_millis(100), Duration::from_secs(1)),
                "in_progress",
                SignError::Unavailable(
                    "GetCertificate: issuance still in progress at the deadline".into(),
                ),
            ),
        };
        if Instant::now() + delay >= deadline {
            return Err(on_deadline);
        }
        tracing::debug!(reason, attempt = *attempt, delay = ?delay, "retrying AWS Private CA call");
        self.count_retry(reason);
        *attempt += 1;
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// GetCertificate until issued; returns (certificate PEM, chain PEM).
    async fn fetch(&self, arn: &str, deadline: Instant) -> Result<(String, String), SignError> {
        let mut attempt = 0u32;
        loop {
            let call = self
                .client
                .get_certificate()
                .certificate_authority_arn(&self.cfg.ca_arn)
                .certificate_arn(arn)
                .send();
            let failure = match tokio::time::timeout_at(deadline, call).await {
                Err(_) => {
                    return Err(SignError::Unavailable(
                        "GetCertificate: no answer within issueTimeout".into(),
                    ));
                }
                Ok(Ok(out)) => {
                    let cert = out.certificate().unwrap_or_default().to_string();
                    let chain = out.certificate_chain().unwrap_or_default().to_string();
                    return Ok((cert, chain));
                }
                Ok(Err(e)) => classify("GetCertificate", &e),
            };
            self.retry_or_fail(failure, &mut attempt, deadline).await?;
        }
    }

    /// Checks the issued leaf against the request and splits the chain.
    fn assemble(
        &self,
        req: &SignRequest,
        cert_pem: &str,
        chain_pem: &str,
    ) -> Result<IssuedChain, SignError> {
        let bad = |m: String| SignError::Internal(format!("GetCertificate answer: {m}"));
        let leaf = pki::parse_certs_pem(cert_pem.as_bytes())
            .map_err(|e| bad(e.to_string()))?
            .remove(0);
        let info = pki::cert_info(&leaf).map_err(|e| bad(e.to_string()))?;
        if info.is_ca {
            return Err(bad("the leaf is a CA certificate".into()));
        }
        match &req.subject {
            Subject::Workload(id) => {
                if info.uri_sans != [id.uri()] || !info.dns_sans.is_empty() {
                    return Err(bad(format!(
                        "names {:?} {:?} instead of {id}",
                        info.uri_sans, info.dns_sans
                    )));
                }
            }
            Subject::Server { dns_names } => {
                for n in dns_names {
                    let is_ip = n.parse::<std::net::IpAddr>().is_ok();
                    if !is_ip && !info.dns_sans.iter().any(|d| d.eq_ignore_ascii_case(n)) {
                        return Err(bad(format!("DNS name {n} missing")));
                    }
                }
            }
        }
        let wanted = pki::unix_secs(SystemTime::now()) + req.ttl.as_secs() as i64;
        // A few minutes of slack for clock differences and issuance time.
        if info.not_after > wanted + 300 {
            tracing::warn!(
                subject = %req.subject,
                requested_ttl_secs = req.ttl.as_secs(),
                not_after = info.not_after,
                "AWS Private CA issued a longer lifetime than requested; accepted"
            );
            self.metrics
                .backend_ttl_exceeded
                .with_label_values(&[KIND])
                .inc();
        }
        let intermediates = pki::chain_links([chain_pem], &leaf).map_err(|e| bad(e.to_string()))?;
        Ok(IssuedChain::new(leaf, intermediates))
    }

    async fn refresh_bundle(&self) -> Result<(), AwsPcaError> {
        let (bundle, not_after) = fetch_bundle(&self.client, &self.cfg).await?;
        *self.ca.not_after.lock().expect("lock") = Some(not_after);
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
/// form the bundle. Returns the bundle and the CA certificate's NotAfter.
async fn fetch_bundle(
    client: &aws_sdk_acmpca::Client,
    cfg: &AwsPcaConfig,
) -> Result<(TrustBundle, i64), AwsPcaError> {
    let out = client
        .get_certificate_authority_certificate()
        .certificate_authority_arn(&cfg.ca_arn)
        .send()
        .await
        .map_err(|e| AwsPcaError::Api {
            op: "GetCertificateAuthorityCertificate",
            message: error_chain(&e),
        })?;
    let bad = |e: pki::PkiError| AwsPcaError::BadCaCertificate(e.to_string());
    let ca = pki::parse_certs_pem(out.certificate().unwrap_or_default().as_bytes())
        .map_err(bad)?
        .remove(0);
    let ca_info = pki::cert_info(&ca).map_err(bad)?;
    let mut certs: Vec<CertificateDer<'static>> = vec![ca];
    if let Some(chain) = out.certificate_chain().filter(|c| !c.trim().is_empty()) {
        certs.extend(pki::parse_certs_pem(chain.as_bytes()).map_err(bad)?);
    }
    let mut roots = Vec::new();
    for c in certs {
        if pki::cert_info(&c).map_err(bad)?.self_signed {
            roots.push(c);
        }
    }
    if let Some(path) = &cfg.extra_roots_file {
        let text = std::fs::read(path).map_err(|e| AwsPcaError::ExtraRoots {
            path: path.clone(),
            message: e.to_string(),
        })?;
        roots.extend(
            pki::parse_certs_pem(&text).map_err(|e| AwsPcaError::ExtraRoots {
                path: path.clone(),
                message: e.to_string(),
            })?,
        );
    }
    if roots.is_empty() {
        return Err(AwsPcaError::BadCaCertificate(
            "the CA chain ends in no self-signed root; add the root with extraRootsFile".into(),
        ));
    }
    let bundle = TrustBundle::new(roots).map_err(bad)?;
    Ok((bundle, ca_info.not_after))
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
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        let deadline = Instant::now() + self.cfg.issue_timeout;
        let token = idempotency_token(req);
        let arn = self
            .issue(
                &req.csr_der,
                req.ttl,
                &self.cfg.template_arn,
                &token,
                deadline,
            )
            .await?;
        let (cert, chain) = self.fetch(&arn, deadline).await?;
        self.assemble(req, &cert, &chain)
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
        let arn = self
            .issue(
                &req.csr_der,
                req.ttl,
                &self.cfg.intermediate_template_arn,
                &token,
                deadline,
            )
            .await?;
        let (cert, chain) = self.fetch(&arn, deadline).await?;
        let bad = |m: String| SignError::Internal(format!("GetCertificate answer: {m}"));
        let leaf = pki::parse_certs_pem(cert.as_bytes())
            .map_err(|e| bad(e.to_string()))?
            .remove(0);
        let intermediates =
            pki::chain_links([chain.as_str()], &leaf).map_err(|e| bad(e.to_string()))?;
        Ok(IssuedChain::new(leaf, intermediates))
    }
}

#[async_trait]
impl super::Plugin for AwsPcaConfig {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn problems(&self, shared: &crate::validate::Shared) -> Vec<crate::validate::FieldError> {
        AwsPcaConfig::problems(self, shared)
    }

    async fn build(&self, ctx: &super::BuildContext) -> Result<Arc<dyn Signer>, super::BuildError> {
        let what = |e| super::BuildError::new("AWS Private CA", e);
        if self.mode == super::intermediate::BackendMode::Direct {
            let s = AwsPca::connect(self, ctx.metrics.clone())
                .await
                .map_err(what)?;
            return Ok(s);
        }
        let (cfg, metrics) = (self.clone(), ctx.metrics.clone());
        let connect: super::intermediate::UpstreamConnect = Arc::new(move || {
            let (cfg, metrics) = (cfg.clone(), metrics.clone());
            Box::pin(async move {
                let s = AwsPca::connect(&cfg, metrics).await.map_err(what)?;
                Ok(s as Arc<dyn super::intermediate::UpstreamAuthority>)
            })
        });
        super::intermediate::build(KIND, connect, &self.intermediate, ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
