//! JSON answers the bridge parses from the outside:
//! - Kubernetes TokenReview answers, into the k8s-openapi types `k8s.rs` deserializes
//!   (`TokenReview`, its `TokenReviewStatus`), with the fields the authenticator reads;
//! - DigiCert enrollment answers and Vault sign answers: their structs
//!   (`backend::digicert::client::Enrollment`, `backend::vault::signer::SignData`) are
//!   private, so this parses the same JSON shapes generically with serde_json and hands
//!   the certificate texts to the public function both backends use,
//!   `backend::remote::issued_chain`.
#![no_main]

use istio_ca_bridge::backend::remote;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewStatus};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn status_fields(s: &TokenReviewStatus) {
    let _ = s.authenticated == Some(true);
    let _ = s.error.as_deref().filter(|e| !e.is_empty());
    let _ = s.audiences.as_deref().unwrap_or_default().len();
    if let Some(u) = &s.user {
        let _ = u
            .username
            .as_deref()
            .map(istio_ca_bridge::identity::ServiceAccount::from_k8s_username);
        let _ = u.groups.as_deref().unwrap_or_default().len();
        let _ = u
            .extra
            .as_ref()
            .and_then(|x| x.get("authentication.kubernetes.io/pod-name"))
            .and_then(|v| v.first());
    }
}

fuzz_target!(|data: &[u8]| {
    // A JWKS answer (`/openid/v1/jwks`, or an OIDC issuer's).
    if let Ok(keys) = istio_ca_bridge::jwks::KeySet::parse(data) {
        assert!(!keys.is_empty());
    }
    if let Ok(review) = serde_json::from_slice::<TokenReview>(data) {
        if let Some(s) = &review.status {
            status_fields(s);
        }
        // What the bridge would send back re-serializes.
        let _ = serde_json::to_vec(&review).expect("TokenReview serializes");
    }
    if let Ok(s) = serde_json::from_slice::<TokenReviewStatus>(data) {
        status_fields(&s);
    }
    let Ok(v) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    // DigiCert: {"certificate": "<leaf + chain PEM>", "status", "request_id", ...}.
    if let Some(pem) = v.get("certificate").and_then(Value::as_str) {
        let _ = remote::issued_chain(pem, [pem]);
    }
    // Vault: {"data": {"certificate", "issuing_ca", "ca_chain": [...]}}.
    if let Some(d) = v.get("data") {
        let leaf = d
            .get("certificate")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let issuing = d
            .get("issuing_ca")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let chain: Vec<&str> = d
            .get("ca_chain")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| vec![issuing]);
        let _ = remote::issued_chain(leaf, chain);
    }
});
