//! The one check of every issued certificate, whatever backend or mode issued it.
//!
//! Before anyone sees a leaf it must:
//! - chain to the trust bundle (path built by rustls-webpki, as ztunnel builds it), for
//!   client auth (workloads) or server auth (serving certificates);
//! - certify exactly the public key that was asked for;
//! - carry the workload profile (not a CA; extended key usage exactly serverAuth and
//!   clientAuth; an empty subject, or the single empty `O` istio-agent asks for) and
//!   exactly the SPIFFE ID asked for, or, for a serving certificate, every name asked for;
//! - not outlive any certificate of its chain.
//!
//! Backends do not check their own answers; [`crate::backend::checked`] calls this for
//! every `Signer`.

use std::sync::LazyLock;
use std::time::SystemTime;

use rustls_pki_types::{CertificateDer, SignatureVerificationAlgorithm, UnixTime};
use x509_parser::prelude::*;

use super::TrustBundle;
use crate::identity::Subject;
use crate::pki;

/// Why an issued certificate was refused. Each is a backend (or bridge) bug or
/// misconfiguration, never the caller's fault.
#[derive(Debug, thiserror::Error)]
pub enum IssuedError {
    #[error("malformed certificate: {0}")]
    Malformed(String),
    #[error("the chain does not verify against the trust bundle: {0}")]
    Untrusted(String),
    #[error("the certificate is for another public key than the one asked for")]
    WrongKey,
    #[error("the certificate has the wrong names: {0}")]
    WrongNames(String),
    #[error("the certificate has the wrong profile: {0}")]
    Profile(String),
    #[error("the certificate lives longer than asked: {0}")]
    TooLong(String),
    #[error(
        "the certificate outlives its root (leaf until {leaf_not_after}, root until {root_not_after})"
    )]
    OutlivesRoot {
        leaf_not_after: i64,
        root_not_after: i64,
    },
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

/// The usage a certificate for `subject` is verified for.
pub fn usage_for(subject: &Subject) -> webpki::KeyUsage {
    match subject {
        Subject::Workload(_) => webpki::KeyUsage::client_auth(),
        Subject::Server { .. } => webpki::KeyUsage::server_auth(),
    }
}

/// What the check found out about an accepted leaf, for those who handle it next (the
/// audit record, the serving certificate's renewal), so nobody parses it again.
#[derive(Debug, Clone)]
pub struct LeafFacts {
    pub serial_hex: String,
    /// Unix seconds.
    pub not_before: i64,
    pub not_after: i64,
    /// The issuer's name (DER).
    pub issuer_name: Vec<u8>,
    /// The issuer's name and the authority key identifier extension, if any (DER): tells
    /// apart two roots of a rotation that share a name.
    pub issuer_key: Vec<u8>,
}

/// What a full check ([`check_issued_full`]) established about everything above a leaf.
/// A leaf of the same in-process CA (whose key was matched with its certificate once, when
/// it was loaded) is then checked against it by [`check_issued_known`] without verifying a
/// signature again.
#[derive(Debug, Clone)]
pub struct ChainFacts {
    /// The leaf's issuer name and authority key identifier ([`LeafFacts::issuer_key`]).
    issuer_key: Vec<u8>,
    intermediates: Vec<CertificateDer<'static>>,
    /// The usage the chain was verified for.
    server_auth: bool,
    /// The earliest NotAfter above the leaf (its intermediates, and the latest root of the
    /// bundle it ends in), unix seconds: no leaf may outlive it.
    until: i64,
    /// Set when the latest root is what bounds `until` (reported as OutlivesRoot).
    root_until: Option<i64>,
}

/// Checks an issued leaf and its intermediates (roots excluded) for `subject` and
/// `public_key_der` (the SubjectPublicKeyInfo that was asked to be certified); the leaf's
/// NotAfter.
pub fn check_issued(
    leaf_der: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    subject: &Subject,
    public_key_der: &[u8],
    now: SystemTime,
) -> Result<i64, IssuedError> {
    check_issued_full(
        leaf_der,
        intermediates,
        bundle,
        subject,
        public_key_der,
        now,
    )
    .map(|(leaf, _)| leaf.not_after)
}

/// [`check_issued`], also returning what it found out about the leaf and the chain above it.
pub fn check_issued_full(
    leaf_der: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    bundle: &TrustBundle,
    subject: &Subject,
    public_key_der: &[u8],
    now: SystemTime,
) -> Result<(LeafFacts, ChainFacts), IssuedError> {
    let (_, leaf) =
        parse_x509_certificate(leaf_der).map_err(|e| IssuedError::Malformed(e.to_string()))?;
    check_leaf(&leaf, subject, public_key_der)?;
    verify_path(leaf_der, intermediates, bundle, usage_for(subject), now)
        .map_err(IssuedError::Untrusted)?;
    let facts = leaf_facts(&leaf);
    let leaf_not_after = facts.not_after;
    let mut until = i64::MAX;
    let mut top_issuer = leaf.issuer().as_raw().to_vec();
    for c in intermediates {
        let (_, ic) =
            parse_x509_certificate(c).map_err(|e| IssuedError::Malformed(e.to_string()))?;
        let na = ic.validity().not_after.timestamp();
        if na < leaf_not_after {
            return Err(IssuedError::Profile(format!(
                "leaf outlives its issuer {} ({leaf_not_after} > {na})",
                ic.subject()
            )));
        }
        until = until.min(na);
        top_issuer = ic.issuer().as_raw().to_vec();
    }
    // The root the path ends in: the bundle's roots named as the top of the chain's issuer
    // (the path was just verified, so one of them signed it). The leaf must not outlive
    // every one of them.
    let latest_root = bundle
        .root_facts()
        .iter()
        .filter(|r| r.subject == top_issuer)
        .map(|r| r.not_after)
        .max();
    let mut root_until = None;
    if let Some(latest) = latest_root {
        if latest < leaf_not_after {
            return Err(IssuedError::OutlivesRoot {
                leaf_not_after,
                root_not_after: latest,
            });
        }
        if latest < until {
            until = latest;
            root_until = Some(latest);
        }
    }
    let chain = ChainFacts {
        issuer_key: facts.issuer_key.clone(),
        intermediates: intermediates
            .iter()
            .map(|c| c.clone().into_owned())
            .collect(),
        server_auth: matches!(subject, Subject::Server { .. }),
        until,
        root_until,
    };
    Ok((facts, chain))
}

/// Checks a leaf that an in-process CA signed with a key known to match its certificate,
/// against what the full check of an earlier leaf of that CA, with the same trust bundle,
/// established ([`ChainFacts`]). Everything about the leaf itself is checked as in
/// [`check_issued`] (key, names, profile, validity, lifetime within the chain); what is not
/// repeated is the signature verification of a chain already verified.
pub fn check_issued_known(
    leaf_der: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    known: &ChainFacts,
    subject: &Subject,
    public_key_der: &[u8],
    now: SystemTime,
) -> Result<LeafFacts, IssuedError> {
    let (_, leaf) =
        parse_x509_certificate(leaf_der).map_err(|e| IssuedError::Malformed(e.to_string()))?;
    check_leaf(&leaf, subject, public_key_der)?;
    if known.server_auth != matches!(subject, Subject::Server { .. }) {
        return Err(IssuedError::Untrusted(
            "the chain was verified for another usage".into(),
        ));
    }
    let facts = leaf_facts(&leaf);
    if facts.issuer_key != known.issuer_key
        || intermediates.len() != known.intermediates.len()
        || intermediates
            .iter()
            .zip(&known.intermediates)
            .any(|(a, b)| a.as_ref() != b.as_ref())
    {
        return Err(IssuedError::Untrusted(
            "the leaf's issuer or chain is not the one verified for its CA".into(),
        ));
    }
    let now = pki::unix_secs(now);
    if now < facts.not_before || now > facts.not_after || now > known.until {
        return Err(IssuedError::Untrusted(
            "the leaf or its chain is not valid now".into(),
        ));
    }
    if facts.not_after > known.until {
        return Err(match known.root_until {
            Some(root_not_after) => IssuedError::OutlivesRoot {
                leaf_not_after: facts.not_after,
                root_not_after,
            },
            None => IssuedError::Profile(format!(
                "leaf outlives its issuer ({} > {})",
                facts.not_after, known.until
            )),
        });
    }
    Ok(facts)
}

/// The key and profile checks of a leaf, before anything about its chain.
fn check_leaf(
    leaf: &X509Certificate<'_>,
    subject: &Subject,
    public_key_der: &[u8],
) -> Result<(), IssuedError> {
    if leaf.public_key().raw != public_key_der {
        return Err(IssuedError::WrongKey);
    }
    check_profile(leaf, subject)
}

/// The facts of a parsed leaf.
pub fn leaf_facts(leaf: &X509Certificate<'_>) -> LeafFacts {
    let issuer_name = leaf.issuer().as_raw().to_vec();
    let mut issuer_key = issuer_name.clone();
    if let Some(aki) = leaf
        .extensions()
        .iter()
        .find(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
    {
        issuer_key.extend_from_slice(aki.value);
    }
    LeafFacts {
        serial_hex: crate::pki::serial_hex(leaf.raw_serial()),
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
        issuer_name,
        issuer_key,
    }
}

/// A workload leaf's subject is what the CSR check allowed: empty, or one empty `O`
/// (backends whose template copies the CSR's subject). Never anything with a value.
fn check_workload_subject(subject: &X509Name<'_>) -> Result<(), IssuedError> {
    let attrs: Vec<_> = subject.iter_attributes().collect();
    let ok = match attrs.as_slice() {
        [] => true,
        [o] => {
            subject.iter_rdn().count() == 1
                && *o.attr_type() == x509_parser::oid_registry::OID_X509_ORGANIZATION_NAME
                && o.as_str().is_ok_and(str::is_empty)
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(IssuedError::Profile(format!(
            "workload subject must be empty, found {} attribute(s)",
            attrs.len()
        )))
    }
}

/// The workload profile every leaf the bridge hands out has: not a CA, extended key usage
/// exactly serverAuth + clientAuth, an empty subject (or one empty `O`) and exactly one
/// SAN, a URI, which is returned. Client certificates presented for renewal must have it
/// too.
pub fn workload_profile<'a>(leaf: &'a X509Certificate<'_>) -> Result<&'a str, IssuedError> {
    let e = leaf_eku(leaf)?;
    let only_both = e.server_auth
        && e.client_auth
        && !e.any
        && !e.code_signing
        && !e.email_protection
        && !e.time_stamping
        && !e.ocsp_signing
        && e.other.is_empty();
    if !only_both {
        return Err(IssuedError::Profile(
            "extended key usage must be exactly serverAuth and clientAuth".into(),
        ));
    }
    check_workload_subject(leaf.subject())?;
    match san_names(leaf)? {
        [GeneralName::URI(u)] => Ok(u),
        names => Err(IssuedError::WrongNames(format!(
            "subjectAltName must be exactly one URI, is {names:?}"
        ))),
    }
}

/// A leaf's extended key usage, once it is known not to be a CA.
fn leaf_eku<'a>(leaf: &'a X509Certificate<'_>) -> Result<&'a ExtendedKeyUsage<'a>, IssuedError> {
    if matches!(leaf.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
        return Err(IssuedError::Profile("leaf is a CA certificate".into()));
    }
    leaf.extended_key_usage()
        .map_err(|e| IssuedError::Malformed(e.to_string()))?
        .map(|eku| eku.value)
        .ok_or_else(|| IssuedError::Profile("no extended key usage".into()))
}

fn san_names<'a>(leaf: &'a X509Certificate<'_>) -> Result<&'a [GeneralName<'a>], IssuedError> {
    match leaf.subject_alternative_name() {
        Ok(Some(san)) => Ok(san.value.general_names.as_slice()),
        Ok(None) => Ok(&[]),
        Err(e) => Err(IssuedError::Malformed(e.to_string())),
    }
}

fn check_profile(leaf: &X509Certificate<'_>, subject: &Subject) -> Result<(), IssuedError> {
    match subject {
        Subject::Workload(id) => {
            let want = id.uri();
            let uri = workload_profile(leaf)?;
            if uri != want {
                return Err(IssuedError::WrongNames(format!(
                    "subjectAltName is URI:{uri}, expected exactly URI:{want}"
                )));
            }
        }
        Subject::Server { dns_names } => {
            if !leaf_eku(leaf)?.server_auth {
                return Err(IssuedError::Profile(
                    "extended key usage must include serverAuth".into(),
                ));
            }
            let names = san_names(leaf)?;
            for n in dns_names {
                if !pki::names_include(names, n) {
                    return Err(IssuedError::WrongNames(format!(
                        "{n} missing from subjectAltName"
                    )));
                }
            }
        }
    }
    Ok(())
}
