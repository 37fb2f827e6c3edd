//! The test bridge's side of the fake: its `authn.kubernetes` config pointing at a
//! kubeconfig for the fake, and service-account tokens as the kubelet projects them, signed
//! by a cluster key that the fake publishes at `/openid/v1/jwks`.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use serde_json::json;

use super::FakeKube;
use crate::config::{Config, KubeClusterConfig, KubernetesAuthnConfig};
use crate::testing::now;

/// The issuer of the projected service-account tokens ([`sa_jwt`]).
pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// The `kid` of [`SigningKey::cluster`], the key every fake publishes by default.
pub const CLUSTER_KID: &str = "fake-cluster-sa-key";

/// A service-account signing key (ES256), as the API server's `--service-account-signing-key-file`.
pub struct SigningKey {
    kid: String,
    pkcs8: Vec<u8>,
    point: Vec<u8>,
}

impl SigningKey {
    /// A fresh P-256 key named `kid`.
    pub fn new(kid: &str) -> SigningKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        SigningKey {
            kid: kid.into(),
            pkcs8: kp.serialize_der(),
            point: kp.public_key_raw().to_vec(),
        }
    }

    /// The key the fakes publish unless told otherwise (one per test process).
    pub fn cluster() -> &'static SigningKey {
        static KEY: OnceLock<SigningKey> = OnceLock::new();
        KEY.get_or_init(|| SigningKey::new(CLUSTER_KID))
    }

    /// The public key as a JWK, as the API server lists it in `/openid/v1/jwks`.
    pub fn jwk(&self) -> serde_json::Value {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        json!({
            "use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
            "x": b64(&self.point[1..33]), "y": b64(&self.point[33..65]),
        })
    }

    /// A JWT with these claims, signed by this key.
    pub fn sign(&self, claims: &serde_json::Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// A JWT with these claims, signed by this key but naming key `kid` in its header.
    pub fn sign_as(&self, kid: &str, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.pkcs8);
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// A projected service-account token for `ns`/`sa`, valid for an hour, audience
    /// `istio-ca`; `n` makes each token distinct.
    pub fn sa_jwt(&self, ns: &str, sa: &str, n: &str) -> String {
        let now = now();
        self.sign(&json!({
            "iss": K8S_ISSUER, "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"], "iat": now, "nbf": now, "exp": now + 3600, "jti": n,
        }))
    }
}

/// A service-account token signed by [`SigningKey::cluster`]. The fake API server still
/// decides whether a review authenticates it ([`super::FakeKube::sa_token`]).
pub fn sa_jwt(ns: &str, sa: &str, n: &str) -> String {
    SigningKey::cluster().sa_jwt(ns, sa, n)
}

/// A token that looks like the kubelet's but is not: key `kid` in its header, plausible
/// claims for `default/junk-<n>`, 64 random bytes as its ES256 signature.
pub fn junk_sa_jwt(kid: &str, n: usize) -> String {
    use rand::RngCore;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let now = now();
    let header = json!({"alg": "ES256", "kid": kid});
    let claims = json!({
        "iss": K8S_ISSUER, "sub": format!("system:serviceaccount:default:junk-{n}"),
        "aud": ["istio-ca"], "iat": now, "nbf": now, "exp": now + 3600,
    });
    let mut sig = [0u8; 64];
    rand::rng().fill_bytes(&mut sig);
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        b64(&sig)
    )
}

/// A cluster entry `id` (trust domain `td`, if any) pointing at a kubeconfig for `fake`
/// written to `dir`.
pub fn cluster(fake: &FakeKube, dir: &Path, id: &str, td: Option<&str>) -> KubeClusterConfig {
    let path = dir.join(format!("{id}.kubeconfig"));
    fake.write_kubeconfig(&path, id);
    KubeClusterConfig {
        id: id.into(),
        kubeconfig: Some(path),
        in_cluster: false,
        trust_domain: td.map(str::to_string),
        qps: 100.0,
        burst: 100,
    }
}

/// Turns on Kubernetes authentication in `c` with these clusters (2 s request timeout).
pub fn kube_config(c: &mut Config, clusters: Vec<KubeClusterConfig>) {
    c.authn.kubernetes = Some(KubernetesAuthnConfig {
        clusters,
        request_timeout: Duration::from_secs(2),
        ..Default::default()
    });
}
