//! CSR policy: parse, prove possession, and check the request against the identity the
//! caller may have. What passes is only the public key (plus the original DER for remote
//! backends); certificates are built from policy, never from the CSR's contents.
//!
//! The default is istio-csr's strict policy: the only name allowed is one URI SAN equal
//! to the identity being certified; no CN, DNS, IP or email names; only the SAN, key
//! usage and extended key usage extensions; CA requests are refused.

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
    #[error("subject must be empty or O= only; found {0}")]
    SubjectNotAllowed(String),
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
            CsrError::BadSignature => "bad_signature",
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
    let trimmed = input.trim_ascii();
    if trimmed.is_empty() {
        return Err(CsrError::Empty);
    }
    if trimmed[0] == 0x30 {
        return Ok(trimmed.to_vec());
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

fn check_subject(subject: &X509Name<'_>) -> Result<(), CsrError> {
    for attr in subject.iter_attributes() {
        let t = attr.attr_type();
        if *t == OID_X509_ORGANIZATION_NAME {
            continue;
        }
        let what = if *t == OID_X509_COMMON_NAME {
            "CN".to_string()
        } else {
            t.to_id_string()
        };
        return Err(CsrError::SubjectNotAllowed(what));
    }
    Ok(())
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

    #[test]
    fn mismatch_is_an_identity_error() {
        let other = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/other").unwrap();
        let e = check(good_pem().as_bytes(), &other, &policy()).unwrap_err();
        assert!(e.is_identity_mismatch(), "{e}");
    }
}
