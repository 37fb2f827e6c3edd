//! Trust material: the bundle of roots clients must trust, published to every reader
//! (response builder, client-certificate authenticator, expiry gauges) through a
//! `tokio::sync::watch` so that a rotation is seen everywhere at once without locks on
//! the hot path, and [`verify`]: path building against the bundle and the one check of
//! every issued certificate. Distribution of the bundle into clusters is
//! [`crate::publish`]'s.

pub mod verify;

pub use verify::{
    ChainFacts, IssuedError, LeafFacts, check_issued, check_issued_full, check_issued_known,
    verify_path,
};

use std::sync::Arc;

use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::pki::{self, PkiError};

/// What the checks need of a root, read once when the bundle is built rather than on
/// every issued or presented certificate.
#[derive(Debug, Clone)]
pub struct RootFacts {
    /// The subject name, DER (compared with a chain's top issuer name).
    pub subject: Vec<u8>,
    /// SubjectPublicKeyInfo, DER.
    pub spki: Vec<u8>,
    pub common_name: Option<String>,
    /// Unix seconds.
    pub not_after: i64,
}

/// Every root a workload certificate may chain to (several during a root rotation).
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    facts: Vec<RootFacts>,
    anchors: Vec<TrustAnchor<'static>>,
    /// All roots concatenated: the last element of every CreateCertificate response.
    pem: String,
    /// Earliest NotAfter among the roots (unix seconds).
    earliest_expiry: i64,
}

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, PkiError> {
        if roots.is_empty() {
            return Err(PkiError::NoCertificate);
        }
        let mut anchors = Vec::with_capacity(roots.len());
        let mut pem = String::new();
        let mut earliest = i64::MAX;
        let mut unique: Vec<CertificateDer<'static>> = Vec::new();
        let mut facts = Vec::new();
        for r in roots {
            if unique.contains(&r) {
                continue;
            }
            let (_, c) = x509_parser::parse_x509_certificate(&r)
                .map_err(|e| PkiError::Certificate(e.to_string()))?;
            let not_after = c.validity().not_after.timestamp();
            earliest = earliest.min(not_after);
            facts.push(RootFacts {
                subject: c.subject().as_raw().to_vec(),
                spki: c.public_key().raw.to_vec(),
                common_name: c
                    .subject()
                    .iter_common_name()
                    .next()
                    .and_then(|a| a.as_str().ok())
                    .map(str::to_string),
                not_after,
            });
            let anchor = webpki::anchor_from_trusted_cert(&r)
                .map_err(|e| PkiError::Certificate(format!("{e:?}")))?
                .to_owned();
            anchors.push(anchor);
            pem.push_str(&pki::cert_pem(&r));
            unique.push(r);
        }
        Ok(Self {
            roots: unique,
            facts,
            anchors,
            pem,
            earliest_expiry: earliest,
        })
    }

    pub fn from_pem(text: &[u8]) -> Result<Self, PkiError> {
        Self::new(pki::parse_certs_pem(text)?)
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
    /// One entry per root, in the order of [`Self::roots`].
    pub fn root_facts(&self) -> &[RootFacts] {
        &self.facts
    }
    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
    pub fn pem(&self) -> &str {
        &self.pem
    }
    pub fn earliest_expiry(&self) -> i64 {
        self.earliest_expiry
    }
}

pub type SharedBundle = Arc<TrustBundle>;
