//! A JWT issuer under test control: ES256 and RS256 keys published in a JWKS file that the
//! test bridge trusts, and service-account tokens signed with them.

use std::path::Path;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::KeyPair;

use super::now;

/// A JWT issuer whose keys the test holds, so it can mint valid and invalid tokens.
pub struct TestIssuer {
    /// The `iss` claim.
    pub issuer: String,
    /// The ES256 key (JWKS `kid` "es").
    pub es_key: KeyPair,
    /// The RS256 key (JWKS `kid` "rs").
    pub rs_key: KeyPair,
    /// The public keys as a JWKS document.
    pub jwks: serde_json::Value,
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

impl TestIssuer {
    /// Fresh keys for `issuer`.
    pub fn new(issuer: &str) -> Self {
        let es_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rs_key =
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048).unwrap();
        let raw = rcgen::PublicKeyData::der_bytes(&es_key);
        let spki = rcgen::PublicKeyData::subject_public_key_info(&rs_key);
        let (n, e) = rsa_n_e(&spki);
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "es",
             "x": b64(&raw[1..33]), "y": b64(&raw[33..65])},
            {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "rs", "n": b64(&n), "e": b64(&e)},
        ]});
        Self {
            issuer: issuer.to_string(),
            es_key,
            rs_key,
            jwks,
        }
    }

    /// Writes the JWKS where a bridge config's `jwksFile` points.
    pub fn write_jwks(&self, path: &Path) {
        std::fs::write(path, serde_json::to_vec(&self.jwks).unwrap()).unwrap();
    }

    /// The claims of a valid service-account token for `ns`/`sa` (audience `istio-ca`,
    /// valid for an hour), for tests to alter before signing.
    pub fn claims(&self, ns: &str, sa: &str) -> serde_json::Value {
        let now = now();
        serde_json::json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"],
            "iat": now, "nbf": now, "exp": now + 3600,
        })
    }

    /// A valid ES256 service-account token.
    pub fn token(&self, ns: &str, sa: &str) -> String {
        self.sign_es(&self.claims(ns, sa), Some("es"))
    }

    /// `claims` signed with the ES256 key, with header `kid` (or none).
    pub fn sign_es(&self, claims: &serde_json::Value, kid: Option<&str>) -> String {
        let key = EncodingKey::from_ec_pem(self.es_key.serialize_pem().as_bytes()).unwrap();
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &key).unwrap()
    }

    /// `claims` signed with the RS256 key, with header `kid` (or none).
    pub fn sign_rs(&self, claims: &serde_json::Value, kid: Option<&str>) -> String {
        let key = EncodingKey::from_rsa_pem(self.rs_key.serialize_pem().as_bytes()).unwrap();
        let mut h = Header::new(Algorithm::RS256);
        h.kid = kid.map(str::to_string);
        jsonwebtoken::encode(&h, claims, &key).unwrap()
    }
}

/// (modulus, exponent) of an RSA SubjectPublicKeyInfo, for the JWKS.
fn rsa_n_e(spki: &[u8]) -> (Vec<u8>, Vec<u8>) {
    use x509_parser::prelude::FromDer;
    let (_, info) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki).unwrap();
    let x509_parser::public_key::PublicKey::RSA(rsa) = info.parsed().unwrap() else {
        panic!("not RSA")
    };
    let strip = |b: &[u8]| b.iter().skip_while(|x| **x == 0).copied().collect();
    (strip(rsa.modulus), strip(rsa.exponent))
}
