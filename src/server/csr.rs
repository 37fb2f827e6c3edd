//! CSR policy: parse, prove possession, and check the request against the identity the
//! caller may have. What passes is only the public key (plus the original DER for remote
//! backends); certificates are built from policy, never from the CSR's contents.
//!
//! The default is istio-csr's strict policy: the only name allowed is one URI SAN equal
//! to the identity being certified; no CN, DNS, IP or email names; only the SAN, key
//! usage and extended key usage extensions; CA requests are refused. The subject must be
//! one of the two shapes Istio's clients send: empty (ztunnel) or a single empty `O`
//! (istio-agent); anything else would be copied into the certificate by backends whose
//! template takes the subject from the CSR. The CSR must be signed with SHA-256 or
//! stronger (no SHA-1 proof of possession).

use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS9_EXTENSION_REQUEST, OID_X509_COMMON_NAME, OID_X509_EXT_BASIC_CONSTRAINTS,
    OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE, OID_X509_EXT_SUBJECT_ALT_NAME,
    OID_X509_ORGANIZATION_NAME,
};
use x509_parser::prelude::*;

use crate::identity::SpiffeId;
use crate::pki::KeyType;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("empty CSR")]
    Empty,
    #[error("CSR is {0} bytes, over the limit")]
    TooLarge(usize),
    #[error("CSR is not PEM: {0}")]
    NotPem(String),
    #[error("expected one PEM block of type CERTIFICATE REQUEST, found {0}")]
    WrongPem(String),
    #[error("malformed CSR: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify (no proof of possession)")]
    BadSignature,
    #[error("key type not allowed: {0}")]
    KeyNotAllowed(String),
    #[error("RSA key of {0} bits is too small")]
    WeakRsa(usize),
    #[error("subject must be empty or a single empty O (what Istio's clients send); found {0}")]
    SubjectNotAllowed(String),
    #[error("CSR signature algorithm {0} is not allowed (SHA-256 or stronger required)")]
    WeakSignature(String),
    #[error("{0} SANs are not allowed")]
    SanNotAllowed(&'static str),
    #[error("CSR must carry exactly one URI SAN, found {0}")]
    UriCount(usize),
    #[error("URI SAN is not an Istio SPIFFE ID: {0}")]
    NotSpiffe(String),
    #[error("URI SAN {requested} does not match the caller identity {allowed}")]
    IdentityMismatch { requested: String, allowed: String },
    #[error("extension {0} is not allowed")]
    ExtensionNotAllowed(String),
    #[error("CSR asks for a CA certificate")]
    CaRequested,
    #[error("attribute {0} is not allowed")]
    AttributeNotAllowed(String),
}

impl CsrError {
    /// Identity mismatches are authorization failures (UNAUTHENTICATED), the rest are
    /// malformed or disallowed input (INVALID_ARGUMENT).
    pub fn is_identity_mismatch(&self) -> bool {
        matches!(self, CsrError::IdentityMismatch { .. })
    }

    /// Low-cardinality label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::Empty | CsrError::NotPem(_) | CsrError::WrongPem(_) => "not_pem",
            CsrError::TooLarge(_) => "too_large",
            CsrError::Malformed(_) => "malformed",
            CsrError::BadSignature | CsrError::WeakSignature(_) => "bad_signature",
            CsrError::KeyNotAllowed(_) | CsrError::WeakRsa(_) => "key",
            CsrError::SubjectNotAllowed(_) => "subject",
            CsrError::SanNotAllowed(_) | CsrError::UriCount(_) | CsrError::NotSpiffe(_) => "san",
            CsrError::IdentityMismatch { .. } => "identity_mismatch",
            CsrError::ExtensionNotAllowed(_) | CsrError::AttributeNotAllowed(_) => "extension",
            CsrError::CaRequested => "ca_requested",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CsrPolicy {
    pub key_types: Vec<KeyType>,
    pub min_rsa_bits: usize,
    pub max_bytes: usize,
}

/// A CSR that passed every check.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    /// SubjectPublicKeyInfo DER: the only part of the CSR that goes into the certificate.
    pub public_key_der: Vec<u8>,
    /// The whole CSR in DER, for backends whose API takes a CSR.
    pub csr_der: Vec<u8>,
    pub key_type: KeyType,
}

/// Decodes PEM (`CERTIFICATE REQUEST` / `NEW CERTIFICATE REQUEST`) or raw DER.
pub fn decode(input: &[u8], max_bytes: usize) -> Result<Vec<u8>, CsrError> {
    if input.len() > max_bytes {
        return Err(CsrError::TooLarge(input.len()));
    }
    // DER is taken as it is: trimming "whitespace" would cut a signature whose last byte
    // happens to be 0x20, 0x0a, ... (about one CSR in fifty).
    if input.first() == Some(&0x30) {
        return Ok(input.to_vec());
    }
    let trimmed = input.trim_ascii();
    if trimmed.is_empty() {
        return Err(CsrError::Empty);
    }
    let blocks = ::pem::parse_many(trimmed).map_err(|e| CsrError::NotPem(e.to_string()))?;
    match blocks.as_slice() {
        [] => Err(CsrError::NotPem("no PEM block".into())),
        [one] if one.tag() == "CERTIFICATE REQUEST" || one.tag() == "NEW CERTIFICATE REQUEST" => {
            Ok(one.contents().to_vec())
        }
        [one] => Err(CsrError::WrongPem(one.tag().to_string())),
        many => Err(CsrError::WrongPem(format!("{} blocks", many.len()))),
    }
}

/// Runs every check of the policy; `target` is the identity the caller may be certified as.
pub fn check(input: &[u8], target: &SpiffeId, policy: &CsrPolicy) -> Result<CheckedCsr, CsrError> {
    let der = decode(input, policy.max_bytes)?;
    let (rest, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed("trailing data after the CSR".into()));
    }
    let info = &csr.certification_request_info;
    let key_type = check_key(&info.subject_pki, policy)?;
    check_signature_algorithm(&csr.signature_algorithm.algorithm)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    check_subject(&info.subject)?;
    let mut uris = Vec::new();
    for attr in info.iter_attributes() {
        if attr.oid != OID_PKCS9_EXTENSION_REQUEST {
            return Err(CsrError::AttributeNotAllowed(attr.oid.to_id_string()));
        }
        let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() else {
            return Err(CsrError::Malformed("unparsable extension request".into()));
        };
        for ext in &req.extensions {
            check_extension(ext, &mut uris)?;
        }
    }
    match uris.as_slice() {
        [one] => {
            let requested = SpiffeId::parse(one).map_err(|_| CsrError::NotSpiffe(truncate(one)))?;
            if &requested != target {
                return Err(CsrError::IdentityMismatch {
                    requested: requested.to_string(),
                    allowed: target.to_string(),
                });
            }
        }
        other => return Err(CsrError::UriCount(other.len())),
    }
    Ok(CheckedCsr {
        public_key_der: info.subject_pki.raw.to_vec(),
        csr_der: der.clone(),
        key_type,
    })
}

fn check_key(spki: &SubjectPublicKeyInfo<'_>, policy: &CsrPolicy) -> Result<KeyType, CsrError> {
    let alg = &spki.algorithm.algorithm;
    let kind = if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(CsrError::Malformed("bad RSA public key".into()));
        };
        let bits = rsa.key_size();
        if bits < policy.min_rsa_bits {
            return Err(CsrError::WeakRsa(bits));
        }
        if bits > 8192 {
            return Err(CsrError::KeyNotAllowed(format!("RSA {bits}")));
        }
        KeyType::Rsa
    } else if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => KeyType::EcdsaP256,
            Some(c) if c == OID_NIST_EC_P384 => KeyType::EcdsaP384,
            Some(c) => return Err(CsrError::KeyNotAllowed(format!("EC curve {c}"))),
            None => return Err(CsrError::KeyNotAllowed("EC key without named curve".into())),
        }
    } else {
        return Err(CsrError::KeyNotAllowed(format!("algorithm {alg}")));
    };
    if !policy.key_types.contains(&kind) {
        return Err(CsrError::KeyNotAllowed(format!("{kind:?}")));
    }
    Ok(kind)
}

/// The signature algorithms a proof of possession may use: SHA-256 or stronger.
fn check_signature_algorithm(alg: &x509_parser::der_parser::Oid<'_>) -> Result<(), CsrError> {
    use x509_parser::oid_registry::{
        OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ECDSA_WITH_SHA512,
    };
    let allowed = [
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_SIG_ECDSA_WITH_SHA512,
    ];
    if allowed.contains(alg) {
        Ok(())
    } else {
        Err(CsrError::WeakSignature(alg.to_id_string()))
    }
}

/// Empty, or exactly one RDN holding one empty `O`: the two shapes Istio's clients send.
/// The message names attribute types only, never their values.
fn check_subject(subject: &X509Name<'_>) -> Result<(), CsrError> {
    let attrs: Vec<_> = subject.iter_attributes().collect();
    let rdns = subject.iter_rdn().count();
    match attrs.as_slice() {
        [] => Ok(()),
        [o] if rdns == 1
            && *o.attr_type() == OID_X509_ORGANIZATION_NAME
            && o.as_str().is_ok_and(str::is_empty) =>
        {
            Ok(())
        }
        _ => {
            let names: Vec<String> = attrs
                .iter()
                .map(|a| {
                    let t = a.attr_type();
                    if *t == OID_X509_COMMON_NAME {
                        "CN".to_string()
                    } else if *t == OID_X509_ORGANIZATION_NAME {
                        if a.as_str().is_ok_and(str::is_empty) {
                            "O=(empty)".to_string()
                        } else {
                            "O=(a value)".to_string()
                        }
                    } else {
                        t.to_id_string()
                    }
                })
                .take(8)
                .collect();
            Err(CsrError::SubjectNotAllowed(names.join(", ")))
        }
    }
}

fn check_extension(ext: &X509Extension<'_>, uris: &mut Vec<String>) -> Result<(), CsrError> {
    let oid = &ext.oid;
    if *oid == OID_X509_EXT_SUBJECT_ALT_NAME {
        let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
            return Err(CsrError::Malformed("unparsable subjectAltName".into()));
        };
        for name in &san.general_names {
            match name {
                GeneralName::URI(u) => uris.push(u.to_string()),
                GeneralName::DNSName(_) => return Err(CsrError::SanNotAllowed("DNS")),
                GeneralName::IPAddress(_) => return Err(CsrError::SanNotAllowed("IP")),
                GeneralName::RFC822Name(_) => return Err(CsrError::SanNotAllowed("email")),
                _ => return Err(CsrError::SanNotAllowed("other")),
            }
        }
        Ok(())
    } else if *oid == OID_X509_EXT_KEY_USAGE || *oid == OID_X509_EXT_EXTENDED_KEY_USAGE {
        // Accepted but ignored: usages come from policy.
        if matches!(
            ext.parsed_extension(),
            ParsedExtension::UnsupportedExtension { .. } | ParsedExtension::ParseError { .. }
        ) {
            return Err(CsrError::Malformed("unparsable key usage".into()));
        }
        Ok(())
    } else if *oid == OID_X509_EXT_BASIC_CONSTRAINTS {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) if bc.ca => Err(CsrError::CaRequested),
            _ => Err(CsrError::ExtensionNotAllowed("basicConstraints".into())),
        }
    } else {
        Err(CsrError::ExtensionNotAllowed(oid.to_id_string()))
    }
}

fn truncate(s: &str) -> String {
    if s.len() > 128 {
        format!("{}...", &s[..s.floor_char_boundary(128)])
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, CsrShape};

    fn policy() -> CsrPolicy {
        CsrPolicy {
            key_types: vec![KeyType::Rsa, KeyType::EcdsaP256, KeyType::EcdsaP384],
            min_rsa_bits: 2048,
            max_bytes: 64 * 1024,
        }
    }

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://cluster.local/ns/default/sa/demo").unwrap()
    }

    fn good_pem() -> String {
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        pki::workload_csr(&key, &id().uri(), CsrShape::IstioAgent).unwrap()
    }

    #[test]
    fn accepts_pem_der_and_the_legacy_pem_label() {
        let pem = good_pem();
        let checked = check(pem.as_bytes(), &id(), &policy()).unwrap();
        assert_eq!(checked.key_type, KeyType::EcdsaP256);
        let der = ::pem::parse(&pem).unwrap().contents().to_vec();
        assert_eq!(checked.csr_der, der);
        check(&der, &id(), &policy()).unwrap();
        let legacy = pki::pem_encode("NEW CERTIFICATE REQUEST", &der);
        check(legacy.as_bytes(), &id(), &policy()).unwrap();
    }

    #[test]
    fn rejects_wrong_containers() {
        let pem = good_pem();
        let two = format!("{pem}{pem}");
        assert!(matches!(
            check(two.as_bytes(), &id(), &policy()),
            Err(CsrError::WrongPem(_))
        ));
        let der = ::pem::parse(&pem).unwrap().contents().to_vec();
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(matches!(
            check(&trailing, &id(), &policy()),
            Err(CsrError::Malformed(_))
        ));
        assert_eq!(
            check(b"  \n", &id(), &policy()).unwrap_err(),
            CsrError::Empty
        );
        let big = vec![b'A'; 64 * 1024 + 1];
        assert!(matches!(
            check(&big, &id(), &policy()),
            Err(CsrError::TooLarge(_))
        ));
    }

    #[test]
    fn key_type_policy_is_configurable() {
        let mut p = policy();
        p.key_types = vec![KeyType::Rsa];
        assert!(matches!(
            check(good_pem().as_bytes(), &id(), &p),
            Err(CsrError::KeyNotAllowed(_))
        ));
    }

    /// A CSR made by OpenSSL (an independent encoder) with the given subject and digest.
    fn openssl_csr(subj: &str, digest: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("csr.der");
        let st = std::process::Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args([
                "-nodes", digest, "-subj", subj, "-outform", "DER", "-keyout",
            ])
            .arg(dir.path().join("key.pem"))
            .arg("-addext")
            .arg(format!("subjectAltName=critical,URI:{}", id().uri()))
            .arg("-out")
            .arg(&out)
            .output()
            .expect("openssl is required: apt-get install openssl");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        std::fs::read(out).unwrap()
    }

    #[test]
    fn only_the_two_istio_subject_shapes_pass() {
        // ztunnel (empty) and istio-agent (one empty O), from rcgen.
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        for shape in [CsrShape::Ztunnel, CsrShape::IstioAgent] {
            let pem = pki::workload_csr(&key, &id().uri(), shape).unwrap();
            check(pem.as_bytes(), &id(), &policy()).unwrap();
        }
        // What AWS's EndEntityCertificate/V1 would copy into the certificate.
        for subj in [
            "/O=system:masters/O=Acme Admins",
            "/O=system:masters",
            "/CN=admin",
            "/OU=x",
            "/C=US",
        ] {
            let e = check(&openssl_csr(subj, "-sha256"), &id(), &policy()).unwrap_err();
            assert!(matches!(e, CsrError::SubjectNotAllowed(_)), "{subj}: {e}");
            assert!(
                !e.to_string().contains("masters"),
                "values are not echoed: {e}"
            );
        }
        check(&openssl_csr("/", "-sha256"), &id(), &policy()).unwrap();
    }

    #[test]
    fn der_is_not_trimmed() {
        // A DER CSR whose signature ends in a byte that is ASCII whitespace must parse:
        // make CSRs until one does (about one in fifty), then check it.
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let der = (0..2000)
            .map(|_| {
                let pem = pki::workload_csr(&key, &id().uri(), CsrShape::Ztunnel).unwrap();
                ::pem::parse(&pem).unwrap().into_contents()
            })
            .find(|d| d.last().is_some_and(|b| b.is_ascii_whitespace()))
            .expect("a CSR ending in a whitespace byte");
        check(&der, &id(), &policy()).unwrap();
    }

    #[test]
    fn sha1_proof_of_possession_is_refused() {
        let e = check(&openssl_csr("/", "-sha1"), &id(), &policy()).unwrap_err();
        assert!(matches!(e, CsrError::WeakSignature(_)), "{e}");
        check(&openssl_csr("/", "-sha384"), &id(), &policy()).unwrap();
    }

    #[test]
    fn mismatch_is_an_identity_error() {
        let other = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/other").unwrap();
        let e = check(good_pem().as_bytes(), &other, &policy()).unwrap_err();
        assert!(e.is_identity_mismatch(), "{e}");
    }
}
