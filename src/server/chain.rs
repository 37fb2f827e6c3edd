//! Checks what a backend issued before anyone sees it, and lays out the response.
//!
//! Whatever the backend, the answer must chain to the current trust bundle, carry exactly
//! the identity asked for, have the workload profile (not a CA, both EKUs) and not outlive
//! its issuers. The response is `[leaf, intermediates.., root bundle]`, one PEM per element
//! except the last, each ending in a newline.

use std::sync::LazyLock;
use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use x509_parser::prelude::*;

use crate::backend::{IssuedChain, Subject};
use crate::pki;
use crate::trust::TrustBundle;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("malformed certificate from backend: {0}")]
    Malformed(String),
    #[error("issued chain does not verify against the trust bundle: {0}")]
    Untrusted(String),
    #[error("issued certificate has the wrong names: {0}")]
    WrongNames(String),
    #[error("issued certificate has the wrong profile: {0}")]
    Profile(String),
}

static ALGS: LazyLock<&'static [&'static dyn SignatureVerificationAlgorithm]> =
    LazyLock::new(|| {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .all
    });

/// Verifies a chain against the bundle for the given usage (client or server auth).
pub fn verify_path(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    usage: webpki::KeyUsage,
    now: SystemTime,
) -> Result<(), String> {
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| format!("{e:?}"))?;
    let time = UnixTime::since_unix_epoch(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|e| e.to_string())?,
    );
    ee.verify_for_usage(
        &ALGS,
        bundle.anchors(),
        intermediates,
        time,
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("{e:?}"))
}

/// Verifies `issued` for `subject` and returns the response chain.
pub fn finish(
    issued: &IssuedChain,
    bundle: &TrustBundle,
    subject: &Subject,
    now: SystemTime,
) -> Result<Vec<String>, ChainError> {
    verify_path(
        &issued.leaf,
        &issued.intermediates,
        bundle,
        webpki::KeyUsage::client_auth(),
        now,
    )
    .map_err(ChainError::Untrusted)?;
    let (_, leaf) =
        parse_x509_certificate(&issued.leaf).map_err(|e| ChainError::Malformed(e.to_string()))?;
    check_leaf(&leaf, subject)?;
    let leaf_not_after = leaf.validity().not_after.timestamp();
    for c in &issued.intermediates {
        let info = pki::cert_info(c).map_err(|e| ChainError::Malformed(e.to_string()))?;
        if info.not_after < leaf_not_after {
            return Err(ChainError::Profile(format!(
                "leaf outlives its issuer {} ({} > {})",
                info.subject, leaf_not_after, info.not_after
            )));
        }
    }
    let mut out = Vec::with_capacity(issued.intermediates.len() + 2);
    out.push(pki::cert_pem(&issued.leaf));
    for c in &issued.intermediates {
        out.push(pki::cert_pem(c));
    }
    out.push(bundle.pem().to_string());
    Ok(out)
}

fn check_leaf(leaf: &X509Certificate<'_>, subject: &Subject) -> Result<(), ChainError> {
    if matches!(leaf.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
        return Err(ChainError::Profile("leaf is a CA certificate".into()));
    }
    let eku = leaf
        .extended_key_usage()
        .map_err(|e| ChainError::Malformed(e.to_string()))?
        .ok_or_else(|| ChainError::Profile("no extended key usage".into()))?;
    if !(eku.value.server_auth && eku.value.client_auth) {
        return Err(ChainError::Profile(
            "extended key usage must include serverAuth and clientAuth".into(),
        ));
    }
    let san = leaf
        .subject_alternative_name()
        .map_err(|e| ChainError::Malformed(e.to_string()))?
        .ok_or_else(|| ChainError::WrongNames("no subjectAltName".into()))?;
    match subject {
        Subject::Workload(id) => {
            let uris: Vec<&str> = san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect();
            let want = id.uri();
            if uris.first() != Some(&want.as_str()) {
                return Err(ChainError::WrongNames(format!(
                    "first URI SAN is {:?}, expected {want}",
                    uris.first()
                )));
            }
            if san.value.general_names.len() != 1 {
                return Err(ChainError::WrongNames(
                    "workload certificate carries names besides its SPIFFE ID".into(),
                ));
            }
        }
        Subject::Server { dns_names } => {
            for n in dns_names {
                let present = pki::names_include(&san.value.general_names, n);
                if !present {
                    return Err(ChainError::WrongNames(format!("{n} missing")));
                }
            }
        }
    }
    Ok(())
}
