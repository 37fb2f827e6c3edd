//! AWS Private CA's configuration (`backend.type: awsPca`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::intermediate::{BackendMode, IntermediateConfig};
use crate::validate::{FieldError, Problems, Shared};

/// The template AWS Private CA applies: copies Subject and SAN from the CSR, sets
/// KU digitalSignature+keyEncipherment and EKU serverAuth+clientAuth (the SPIFFE profile).
pub const AWS_PCA_DEFAULT_TEMPLATE: &str = "arn:aws:acm-pca:::template/EndEntityCertificate/V1";
/// The template for the bridge's own intermediate CA in intermediate mode.
pub const AWS_PCA_INTERMEDIATE_TEMPLATE: &str =
    "arn:aws:acm-pca:::template/SubordinateCACertificate_PathLen0/V1";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct AwsPcaConfig {
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

impl Default for AwsPcaConfig {
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

impl AwsPcaConfig {
    /// The configured region, else the one in the CA ARN.
    pub fn effective_region(&self) -> Option<String> {
        self.region
            .clone()
            .or_else(|| self.ca_arn.split(':').nth(3).map(str::to_string))
            .filter(|r| !r.is_empty())
    }

    /// Problems, with fields relative to `backend`.
    pub fn problems(&self, shared: &Shared) -> Vec<FieldError> {
        let mut p = Problems::new();
        let arn: Vec<&str> = self.ca_arn.split(':').collect();
        if arn.len() != 6
            || arn[0] != "arn"
            || arn[2] != "acm-pca"
            || !arn[5].starts_with("certificate-authority/")
        {
            p.push(
                "caArn",
                format!(
                    "{:?} is not an AWS Private CA ARN (arn:aws:acm-pca:<region>:<account>:certificate-authority/<id>)",
                    self.ca_arn
                ),
            );
        }
        if self.effective_region().is_none() {
            p.push("region", "required when caArn names no region");
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("https://") || e.starts_with("http://"))
        {
            p.push("endpoint", format!("{e:?} is not an http(s) URL"));
        }
        if let Some(r) = &self.assume_role_arn
            && !(r.starts_with("arn:") && r.contains(":iam::") && r.contains(":role/"))
        {
            p.push("assumeRoleArn", format!("{r:?} is not an IAM role ARN"));
        }
        if !is_template_arn(&self.template_arn) {
            p.push(
                "templateArn",
                format!("{:?} is not a certificate template ARN", self.template_arn),
            );
        }
        if let Some(a) = &self.signing_algorithm {
            let known = aws_sdk_acmpca::types::SigningAlgorithm::values();
            if !known.contains(&a.as_str()) {
                p.push(
                    "signingAlgorithm",
                    format!("{a:?} is not one of {}", known.join(", ")),
                );
            }
        }
        p.at_least(
            "issueTimeout",
            self.issue_timeout,
            Duration::from_secs(1),
            "1s",
        );
        p.rate_limit("rateLimit", self.rate_limit, "rateBurst", self.rate_burst);
        p.at_least(
            "bundleRefreshInterval",
            self.bundle_refresh_interval,
            Duration::from_secs(1),
            "1s",
        );
        if self.mode == BackendMode::Intermediate
            && !is_template_arn(&self.intermediate_template_arn)
        {
            p.push(
                "intermediateTemplateArn",
                format!(
                    "{:?} is not a template ARN (arn:aws:acm-pca:::template/...)",
                    self.intermediate_template_arn
                ),
            );
        }
        p.below_request_timeout("issueTimeout", self.issue_timeout, shared);
        if self.mode == BackendMode::Intermediate {
            p.nest("intermediate", self.intermediate.problems());
        }
        p.into_vec()
    }
}

fn is_template_arn(arn: &str) -> bool {
    arn.starts_with("arn:") && arn.contains(":template/")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{backend_problems, section};

    #[test]
    fn aws_pca_backend_parses_and_validation_names_fields() {
        // The `backend` section as the top-level parser reads it, and its problems.
        let parse = |yaml: &str| section::<AwsPcaConfig>(yaml, "backend", "type");
        let validate = |cfg: &AwsPcaConfig| backend_problems(cfg.problems(&Shared::default()));
        let arn = "arn:aws:acm-pca:eu-west-1:111122223333:certificate-authority/abc";
        let cfg = parse(&format!("backend:\n  type: awsPca\n  caArn: {arn}\n")).unwrap();
        let a = &cfg;
        assert_eq!(a.template_arn, AWS_PCA_DEFAULT_TEMPLATE);
        assert_eq!(a.effective_region().as_deref(), Some("eu-west-1"));
        assert_eq!(a.rate_limit, 20.0);
        assert!(validate(&cfg).is_ok());

        let (field, msg) = parse("backend:\n  type: awsPca\n  caArm: x\n").unwrap_err();
        assert!(field.starts_with("backend"), "{field}");
        assert!(msg.contains("caArm"), "{msg}");

        let cfg = parse(
            "backend:\n  type: awsPca\n  caArn: nope\n  rateLimit: 0\n  rateBurst: 0\n  signingAlgorithm: MD5\n  issueTimeout: 10ms\n",
        )
        .unwrap();
        let errs = validate(&cfg).unwrap_err();
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

        let cfg = parse(&format!(
            "backend:\n  type: awsPca\n  caArn: {arn}\n  issueTimeout: 10s\n"
        ))
        .unwrap();
        let errs = validate(&cfg).unwrap_err();
        assert_eq!(errs[0].field, "backend.issueTimeout", "{errs:?}");
        assert!(
            errs[0].message.contains("server.requestTimeout"),
            "{errs:?}"
        );
    }
}
