//! JSON Web Key Sets and JWT signature checks, shared by the OIDC/JWT authenticator
//! (`server::authn::jwt`) and the Kubernetes service-account key check that runs before a
//! TokenReview (`k8s::issuer_keys`).
//!
//! Only asymmetric keys are kept (RSA, P-256, P-384, Ed25519), and a token's `alg` must fit
//! the key's family (and the key's own `alg`, if it pins one): that rules out `alg: none` and
//! HMAC-with-a-public-key confusion.

use std::path::PathBuf;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Header};

/// A JWKS document larger than this is refused (real ones are a few KiB; a hostile or
/// broken server must not make the bridge buffer without bound).
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("fetching {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("JWKS is not valid JSON: {0}")]
    Parse(String),
    #[error("JWKS holds no usable key")]
    NoKeys,
    #[error("building HTTP client: {0}")]
    Client(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Family {
    fn allows(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            Family::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            Family::P256 => alg == ES256,
            Family::P384 => alg == ES384,
            Family::Ed25519 => alg == EdDSA,
        }
    }
}

/// One usable verification key.
pub struct Key {
    kid: Option<String>,
    family: Family,
    /// The JWK's own `alg`, if it pins one.
    alg: Option<String>,
    pub key: DecodingKey,
}

impl Key {
    fn from_jwk(jwk: &Jwk) -> Option<Key> {
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => Family::P256,
                EllipticCurve::P384 => Family::P384,
                _ => return None,
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                Family::Ed25519
            }
            // Symmetric keys can never verify a token here.
            _ => return None,
        };
        let key = DecodingKey::from_jwk(jwk).ok()?;
        Some(Key {
            kid: jwk.common.key_id.clone(),
            family,
            alg: jwk.common.key_algorithm.map(|a| format!("{a:?}")),
            key,
        })
    }

    /// Whether this key may have signed a token with this header.
    fn fits(&self, header: &Header) -> bool {
        let kid_ok = match &header.kid {
            Some(kid) => self.kid.as_deref() == Some(kid.as_str()),
            None => true,
        };
        kid_ok
            && self.family.allows(header.alg)
            && self
                .alg
                .as_deref()
                .is_none_or(|a| a == format!("{:?}", header.alg))
    }
}

/// The usable keys of one JWKS document (never empty).
pub struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document; unusable keys (symmetric, unknown curves) are skipped.
    pub fn parse(body: &[u8]) -> Result<KeySet, JwksError> {
        if body.len() > MAX_JWKS_BYTES {
            return Err(JwksError::Parse(format!(
                "document is over {MAX_JWKS_BYTES} bytes"
            )));
        }
        let set: JwkSet =
            serde_json::from_slice(body).map_err(|e| JwksError::Parse(e.to_string()))?;
        let keys: Vec<Key> = set.keys.iter().filter_map(Key::from_jwk).collect();
        if keys.is_empty() {
            return Err(JwksError::NoKeys);
        }
        Ok(KeySet { keys })
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys that may have signed a token with this header (by kid, family and alg).
    pub fn candidates<'a>(&'a self, header: &'a Header) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |k| k.fits(header))
    }
}

/// Why a token's header is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a JWT at all.
    Malformed(String),
    /// A JWT, but not signed in a way we accept.
    Refused(String),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Malformed(m) | HeaderError::Refused(m) => f.write_str(m),
        }
    }
}

/// A token's header, refused when it cannot be a signed token we accept: not a JWT,
/// `alg: none`, or a symmetric algorithm.
pub fn signed_header(token: &str) -> Result<Header, HeaderError> {
    let raw = token.split('.').next().unwrap_or("");
    let alg_none = base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, raw)
        .ok()
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .map(|h| {
            let alg = h.get("alg").and_then(|a| a.as_str()).unwrap_or("");
            alg.is_empty() || alg.eq_ignore_ascii_case("none")
        });
    match alg_none {
        None => return Err(HeaderError::Malformed("token is not a JWT".into())),
        Some(true) => return Err(HeaderError::Refused("unsigned token (alg none)".into())),
        Some(false) => {}
    }
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| HeaderError::Malformed(format!("bad JWT header: {e}")))?;
    if matches!(
        header.alg,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err(HeaderError::Refused(
            "symmetric (HS*) tokens are not accepted".into(),
        ));
    }
    Ok(header)
}

/// The outcome of checking a token's signature against a key set.
#[derive(Debug, PartialEq, Eq)]
pub enum Signature {
    /// One of the keys verifies it.
    Valid,
    /// No key of the set fits its header (kid, alg): the set may be out of date.
    UnknownKey,
    /// It is not a signed token we accept, or the fitting keys do not verify it.
    Invalid(String),
}

/// Checks only the signature (claims are someone else's business): one verification per
/// fitting key, so a token naming its `kid` costs one.
pub fn check_signature(token: &str, keys: &KeySet) -> Signature {
    let header = match signed_header(token) {
        Ok(h) => h,
        Err(e) => return Signature::Invalid(e.to_string()),
    };
    let Some((message, signature)) = token.rsplit_once('.') else {
        return Signature::Invalid("token is not a JWT".into());
    };
    let mut any = false;
    for k in keys.candidates(&header) {
        any = true;
        if jsonwebtoken::crypto::verify(signature, message.as_bytes(), &k.key, header.alg)
            .unwrap_or(false)
        {
            return Signature::Valid;
        }
    }
    if any {
        Signature::Invalid("bad token signature".into())
    } else {
        Signature::UnknownKey
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn signatures_are_checked_by_kid_and_family() {
        crate::install_crypto_provider();
        let key = crate::testing::SigningKey::new("k1");
        let other = crate::testing::SigningKey::new("k2");
        let set = KeySet::parse(
            serde_json::json!({"keys": [key.jwk(), {"kty": "oct", "k": "c2VjcmV0"}]})
                .to_string()
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(set.len(), 1, "the symmetric key is skipped");
        let claims = serde_json::json!({"sub": "x"});
        assert_eq!(check_signature(&key.sign(&claims), &set), Signature::Valid);
        assert_eq!(
            check_signature(&other.sign(&claims), &set),
            Signature::UnknownKey
        );
        // The right kid with another key's signature.
        let forged = other.sign_as("k1", &claims);
        assert_eq!(
            check_signature(&forged, &set),
            Signature::Invalid("bad token signature".into())
        );
        let none = format!(
            "{}.{}.",
            b64(&serde_json::json!({"alg": "none", "kid": "k1"})),
            b64(&claims)
        );
        assert!(matches!(
            check_signature(&none, &set),
            Signature::Invalid(_)
        ));
        let hs = format!(
            "{}.{}.c2ln",
            b64(&serde_json::json!({"alg": "HS256", "kid": "k1"})),
            b64(&claims)
        );
        assert!(matches!(check_signature(&hs, &set), Signature::Invalid(_)));
        assert!(matches!(
            check_signature("garbage", &set),
            Signature::Invalid(_)
        ));
    }

    #[test]
    fn documents_without_usable_keys_or_too_large_are_refused() {
        assert!(matches!(
            KeySet::parse(br#"{"keys": []}"#),
            Err(JwksError::NoKeys)
        ));
        assert!(matches!(KeySet::parse(b"nope"), Err(JwksError::Parse(_))));
        let big = vec![b' '; MAX_JWKS_BYTES + 1];
        assert!(matches!(KeySet::parse(&big), Err(JwksError::Parse(_))));
    }
}
