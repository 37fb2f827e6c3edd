//! The AWS Private CA API as the backend uses it: a narrow seam ([`PcaClient`], like
//! SPIRE's pca_client.go) with the four calls the bridge makes, implemented by the SDK
//! client ([`SdkClient`]), and the reading of the SDK's failures as [`remote::Failure`]s.
//!
//! The SDK's own retries are off: the backend retries through [`remote::Retry`], so that one
//! loop decides within the deadline. Timeouts are the caller's too.

use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_sdk_acmpca::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_acmpca::primitives::Blob;
use aws_sdk_acmpca::types::{SigningAlgorithm, Validity, ValidityPeriodType};

use super::AwsPcaConfig;
use crate::backend::SignError;
use crate::backend::remote::{self, Failure, error_chain};

#[derive(Debug, thiserror::Error)]
pub enum AwsPcaError {
    #[error("{0}")]
    Config(String),
    /// A call at start or in a background refresh failed (nothing retries it there).
    #[error("{0}")]
    Api(Failure),
    #[error("{path}: {message}")]
    ExtraRoots {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("the CA answered an unusable certificate: {0}")]
    BadCaCertificate(String),
}

/// One IssueCertificate: the same parameters on every retry, so the token dedupes.
#[derive(Debug, Clone)]
pub struct Issue<'a> {
    pub ca_arn: &'a str,
    pub csr_pem: &'a str,
    pub signing_algorithm: &'a str,
    pub template_arn: &'a str,
    /// Absolute NotAfter, unix seconds.
    pub not_after: i64,
    pub idempotency_token: &'a str,
}

/// A certificate and its chain as PEM texts (GetCertificate,
/// GetCertificateAuthorityCertificate); the chain may be empty.
#[derive(Debug, Clone, Default)]
pub struct Pems {
    pub certificate: String,
    pub chain: String,
}

impl Pems {
    fn of(certificate: Option<&str>, chain: Option<&str>) -> Self {
        Pems {
            certificate: certificate.unwrap_or_default().to_string(),
            chain: chain.unwrap_or_default().to_string(),
        }
    }
}

/// The Private CA calls the backend makes, each failure already classified.
#[async_trait]
pub trait PcaClient: Send + Sync + 'static {
    /// DescribeCertificateAuthority: the CA's SigningAlgorithm (e.g. SHA256WITHECDSA).
    async fn signing_algorithm(&self, ca_arn: &str) -> Result<String, Failure>;

    /// GetCertificateAuthorityCertificate: the CA certificate and its chain.
    async fn ca_certificate(&self, ca_arn: &str) -> Result<Pems, Failure>;

    /// IssueCertificate: the ARN of the certificate being issued.
    async fn issue_certificate(&self, req: &Issue<'_>) -> Result<String, Failure>;

    /// GetCertificate: the issued certificate, or [`Failure::Pending`] while in progress.
    async fn get_certificate(&self, ca_arn: &str, certificate_arn: &str) -> Result<Pems, Failure>;
}

/// [`PcaClient`] over the AWS SDK.
pub struct SdkClient(aws_sdk_acmpca::Client);

impl SdkClient {
    /// From the SDK default credential chain (optionally assuming `assumeRoleArn`), with the
    /// endpoint override applied to Private CA only (not to STS).
    pub async fn new(cfg: &AwsPcaConfig) -> Result<Self, AwsPcaError> {
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
        Ok(Self(aws_sdk_acmpca::Client::from_conf(conf.build())))
    }
}

#[async_trait]
impl PcaClient for SdkClient {
    async fn signing_algorithm(&self, ca_arn: &str) -> Result<String, Failure> {
        const OP: &str = "DescribeCertificateAuthority";
        let out = self
            .0
            .describe_certificate_authority()
            .certificate_authority_arn(ca_arn)
            .send()
            .await
            .map_err(|e| classify(OP, &e))?;
        out.certificate_authority()
            .and_then(|ca| ca.certificate_authority_configuration())
            .map(|c| c.signing_algorithm().as_str().to_string())
            .ok_or_else(|| unusable(OP, "no CertificateAuthorityConfiguration"))
    }

    async fn ca_certificate(&self, ca_arn: &str) -> Result<Pems, Failure> {
        let out = self
            .0
            .get_certificate_authority_certificate()
            .certificate_authority_arn(ca_arn)
            .send()
            .await
            .map_err(|e| classify("GetCertificateAuthorityCertificate", &e))?;
        Ok(Pems::of(out.certificate(), out.certificate_chain()))
    }

    async fn issue_certificate(&self, req: &Issue<'_>) -> Result<String, Failure> {
        const OP: &str = "IssueCertificate";
        let validity = Validity::builder()
            .r#type(ValidityPeriodType::Absolute)
            .value(req.not_after)
            .build()
            .map_err(|e| Failure::Final(SignError::Internal(format!("validity: {e}"))))?;
        let out = self
            .0
            .issue_certificate()
            .certificate_authority_arn(req.ca_arn)
            .csr(Blob::new(req.csr_pem.as_bytes()))
            .signing_algorithm(SigningAlgorithm::from(req.signing_algorithm))
            .template_arn(req.template_arn)
            .validity(validity)
            .idempotency_token(req.idempotency_token)
            .send()
            .await
            .map_err(|e| classify(OP, &e))?;
        out.certificate_arn()
            .map(str::to_string)
            .ok_or_else(|| unusable(OP, "no CertificateArn"))
    }

    async fn get_certificate(&self, ca_arn: &str, certificate_arn: &str) -> Result<Pems, Failure> {
        let out = self
            .0
            .get_certificate()
            .certificate_authority_arn(ca_arn)
            .certificate_arn(certificate_arn)
            .send()
            .await
            .map_err(|e| classify("GetCertificate", &e))?;
        Ok(Pems::of(out.certificate(), out.certificate_chain()))
    }
}

fn unusable(op: &str, what: &str) -> Failure {
    Failure::Final(SignError::Internal(format!("{op}: {what} in the answer")))
}

/// What a failed SDK call means: throttled, in progress (poll again), transient (retry) or
/// final, with the SignError the caller gets.
fn classify<E, R>(op: &str, e: &SdkError<E, R>) -> remote::Failure
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
                Failure::Throttled {
                    message: msg(),
                    retry_after: None,
                }
            }
            "RequestInProgressException" => Failure::Pending(format!("{op}: issuance in progress")),
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
