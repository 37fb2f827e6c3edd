//! JWT authentication through the public entry point: a `JwtAuthenticator` loaded from a
//! JWKS file (the fuzz-only issuer in `fuzz/jwt-issuer/`, the dev issuer's shape), asked
//! to `authenticate` arbitrary bearer tokens. Covers the header and payload parsing before
//! verification (`alg` checks, the unverified `iss`), key selection and claim validation,
//! and the signature-only check (`jwks::check_signature`) that Kubernetes tokens get before
//! a TokenReview.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use istio_ca_bridge::config::{DEV_ISSUER, JwtIssuerConfig};
use istio_ca_bridge::server::authn::jwt::JwtAuthenticator;
use istio_ca_bridge::server::authn::{Authenticator, RequestContext};
use libfuzzer_sys::fuzz_target;

/// The fuzz issuer's JWKS (public key only; its private key mints the seed tokens).
const JWKS: &str = include_str!("../jwt-issuer/jwks.json");

struct Setup {
    rt: tokio::runtime::Runtime,
    /// Refuses tokens of unknown issuers; no cluster.
    strict: JwtAuthenticator,
    /// Leaves unknown issuers to a later authenticator; the issuer belongs to "east".
    deferring: JwtAuthenticator,
    /// The same keys, for the signature-only check that runs before a TokenReview.
    keys: istio_ca_bridge::jwks::KeySet,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("istio-ca-bridge-fuzz-jwt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, JWKS).expect("write JWKS");
        let cfg = |cluster: Option<&str>| JwtIssuerConfig {
            issuer: DEV_ISSUER.into(),
            jwks_file: Some(jwks.clone()),
            jwks_uri: None,
            jwks_ca_file: None,
            jwks_token_file: None,
            audiences: vec!["istio-ca".into()],
            trust_domain: None,
            cluster_id: cluster.map(str::to_string),
            refresh_interval: Duration::from_secs(300),
            insecure_http: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (strict, deferring) = rt.block_on(async {
            let strict = JwtAuthenticator::new(&[cfg(None)], "cluster.local")
                .await
                .expect("JWKS loads");
            let deferring = JwtAuthenticator::new(&[cfg(Some("east"))], "cluster.local")
                .await
                .expect("JWKS loads")
                .defer_unknown_issuers(true);
            (strict, deferring)
        });
        Setup {
            rt,
            strict,
            deferring,
            keys: istio_ca_bridge::jwks::KeySet::parse(JWKS.as_bytes()).expect("JWKS parses"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let s = setup();
    // The check Kubernetes tokens get before a TokenReview (k8s::issuer_keys).
    let _ = istio_ca_bridge::jwks::check_signature(token, &s.keys);
    let header = format!("Bearer {token}");
    for (authn, cluster) in [
        (&s.strict, None),
        (&s.deferring, Some("east")),
        (&s.deferring, Some("west")),
    ] {
        let ctx = RequestContext {
            authorization: Some(&header),
            cluster_id: cluster,
            ..Default::default()
        };
        match s.rt.block_on(authn.authenticate(&ctx)) {
            Ok(Some(caller)) => {
                // Only the fuzz issuer's key signs, so only its (seed) tokens get here.
                assert_eq!(caller.identity.trust_domain(), "cluster.local");
                assert_ne!(cluster, Some("west"));
            }
            Ok(None) => {}
            Err(e) => {
                let _ = (e.reason(), e.is_unavailable(), e.to_string());
            }
        }
    }
});
