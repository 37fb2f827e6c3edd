//! The test bridge's side of the fake: its `authn.kubernetes` config pointing at a
//! kubeconfig for the fake, and service-account tokens shaped like the kubelet's.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use serde_json::json;

use super::FakeKube;
use crate::config::{Config, KubeClusterConfig, KubernetesAuthnConfig};
use crate::testing::now;

/// The issuer of the projected service-account tokens ([`sa_jwt`]).
pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// A service-account token as the kubelet projects it: a JWT from the cluster's issuer.
/// Only its shape and claims matter to the bridge (the fake API server decides validity),
/// and `n` makes each token distinct.
pub fn sa_jwt(ns: &str, sa: &str, n: &str) -> String {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let now = now();
    format!(
        "{}.{}.{}",
        b64(json!({"alg": "RS256", "kid": "k8s"})),
        b64(json!({
            "iss": K8S_ISSUER, "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": ["istio-ca"], "iat": now, "nbf": now, "exp": now + 3600, "jti": n,
        })),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("signature-{n}")),
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
