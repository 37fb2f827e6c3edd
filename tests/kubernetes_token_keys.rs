//! Service-account tokens are checked against the cluster's published issuer keys
//! (`GET /openid/v1/jwks`) before a TokenReview is spent on them, black-box against the fake
//! API server through the production kube-rs client.
//!
//! Proves: a flood of JWT-shaped junk (the cluster's own `kid`, random signatures; or random
//! `kid`s) costs no TokenReview and does not hold up a real workload; a rotated cluster key
//! is picked up on demand, an unpublished one is refused; and when the keys cannot be
//! fetched, tokens still work, with unchecked ones held to the reduced lane while tokens that
//! verified against the last keys keep the rest of the budget.

use std::time::{Duration, Instant};

use istio_ca_bridge::testing::fake_kube::*;
use istio_ca_bridge::testing::*;
use serde_json::json;
use tonic::Code;

/// Sends every token at `in_flight` concurrent calls, one connection each (so that no
/// connection uses up its authentication-failure budget and gets slowed down,
/// `server::tarpit`); returns the codes seen.
async fn flood(b: &Bridge, tokens: Vec<String>, in_flight: usize) -> Vec<Code> {
    let id = spiffe("default", "junk");
    let tokens = std::sync::Arc::new(tokio::sync::Mutex::new(tokens));
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let mut client = b.client().await;
        let tokens = tokens.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut codes = Vec::new();
            loop {
                let Some(t) = tokens.lock().await.pop() else {
                    return codes;
                };
                let code = match ask(&mut client, &id, &t, Some("Kubernetes"), None).await {
                    Ok(_) => Code::Ok,
                    Err(e) => e.code(),
                };
                codes.push(code);
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_tokens_cost_no_token_review_and_do_not_hold_up_real_workloads() {
    logs();
    let fake = FakeKube::start_new().await;
    let kdir = tempfile::tempdir().unwrap();
    let mut kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    // A small budget, so that junk reaching the API server would starve the real workload.
    kc.qps = 5.0;
    kc.burst = 5;
    let b = Bridge::start_with(|c| kube_config(c, vec![kc])).await;

    // 600 tokens with the cluster's real kid and random signatures, 64 in flight, while a
    // real workload with a fresh token asks.
    let junk: Vec<String> = (0..600).map(|n| junk_sa_jwt(CLUSTER_KID, n)).collect();
    let id = spiffe("default", "web");
    let real = sa_jwt("default", "web", "real");
    fake.sa_token(&real, "default", "web", None);
    let flood_task = flood(&b, junk, 64);
    let mut client = b.client().await;
    let real_call = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        let r = ask(&mut client, &id, &real, Some("Kubernetes"), None).await;
        (r, t.elapsed())
    };
    let (codes, (real_result, real_took)) = tokio::join!(flood_task, real_call);
    assert_eq!(codes.len(), 600);
    assert!(
        codes.iter().all(|c| *c == Code::Unauthenticated),
        "every junk token is UNAUTHENTICATED: {:?}",
        codes
            .iter()
            .filter(|c| **c != Code::Unauthenticated)
            .count()
    );
    let chain = real_result.expect("the real workload is answered");
    assert_eq!(leaf_uri(&chain), id);
    assert_eq!(
        fake.count("tokenreviews"),
        1,
        "only the real token was reviewed"
    );
    eprintln!("real workload answered in {real_took:?} during the flood");
    assert_eq!(b.issued(), 1);

    // Junk naming random keys: refused the same way; the keys are re-fetched on demand at
    // most once per 10 s, however many unknown kids arrive.
    let jwks_before = fake.count("jwks");
    let junk: Vec<String> = (0..200)
        .map(|n| junk_sa_jwt(&format!("kid-{n}"), n))
        .collect();
    let codes = flood(&b, junk, 64).await;
    assert!(codes.iter().all(|c| *c == Code::Unauthenticated));
    assert_eq!(fake.count("tokenreviews"), 1);
    assert!(
        fake.count("jwks") <= jwks_before + 1,
        "one on-demand refresh at most: {} -> {}",
        jwks_before,
        fake.count("jwks")
    );
    let checks = |result: &str| {
        metric(
            &b,
            "istio_ca_bridge_token_signature_checks_total",
            &format!(r#"cluster="Kubernetes",result="{result}""#),
        )
    };
    assert_eq!(checks("bad_signature"), 600.0);
    assert_eq!(checks("unknown_key"), 200.0);
    assert_eq!(checks("verified"), 1.0);
    assert!(logs().contains("no TokenReview sent"));
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_cluster_key_is_picked_up_and_an_unpublished_one_refused() {
    let fake = FakeKube::start_new().await;
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let b = Bridge::start_with(|c| kube_config(c, vec![kc])).await;
    let mut client = b.client().await;
    let id = spiffe("default", "web");

    let old = sa_jwt("default", "web", "old");
    fake.sa_token(&old, "default", "web", None);
    ask(&mut client, &id, &old, Some("Kubernetes"), None)
        .await
        .unwrap();

    // The API server gets a second signing key (both published, as during its rotation).
    let new_key = SigningKey::new("rotated-key");
    fake.publish_keys(&[SigningKey::cluster(), &new_key]);
    let new = new_key.sa_jwt("default", "web", "new");
    fake.sa_token(&new, "default", "web", None);
    // The routine refresh has not run yet; the unknown kid triggers one fetch.
    tokio::time::sleep(istio_ca_bridge::k8s::issuer_keys::MIN_ON_DEMAND_REFRESH).await;
    let before = fake.count("jwks");
    ask(&mut client, &id, &new, Some("Kubernetes"), None)
        .await
        .expect("a token signed by the new key");
    assert_eq!(fake.count("jwks"), before + 1);

    // A key the cluster does not publish, even for a token the API server would accept
    // (the fake's review is per token): refused without a review.
    let stranger = SigningKey::new("not-published").sa_jwt("default", "web", "stranger");
    fake.sa_token(&stranger, "default", "web", None);
    let reviews = fake.count("tokenreviews");
    let e = ask(&mut client, &id, &stranger, Some("Kubernetes"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // Another key's signature under the published kid: refused too.
    let forged = SigningKey::new("x").sign_as(
        CLUSTER_KID,
        &json!({"iss": K8S_ISSUER, "sub": "system:serviceaccount:default:web",
                "aud": ["istio-ca"], "exp": now() + 600}),
    );
    fake.sa_token(&forged, "default", "web", None);
    let e = ask(&mut client, &id, &forged, Some("Kubernetes"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(fake.count("tokenreviews"), reviews);
    assert_eq!(b.issued(), 2);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_keys_unchecked_tokens_get_a_reduced_lane_and_checked_ones_the_rest() {
    logs();
    let fake = FakeKube::start_new().await;
    let kdir = tempfile::tempdir().unwrap();
    let mut kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    // Budget 8/s, burst 8: the unverified lane gets 2/s, burst 2.
    kc.qps = 8.0;
    kc.burst = 8;
    // The path is forbidden from the start (e.g. the discovery binding was removed).
    fake.set_jwks_failure(Some(403));
    let b = Bridge::start_with(|c| kube_config(c, vec![kc])).await;
    let mut client = b.client().await;
    let id = spiffe("default", "web");

    // Tokens still work, through TokenReview alone.
    let first = sa_jwt("default", "web", "first");
    fake.sa_token(&first, "default", "web", None);
    ask(&mut client, &id, &first, Some("Kubernetes"), None)
        .await
        .expect("a valid token works while the keys cannot be fetched");
    assert!(logs().contains("cannot fetch the service-account issuer keys"));

    // The keys become readable; once fetched, the path breaks again.
    fake.set_jwks_failure(None);
    tokio::time::sleep(istio_ca_bridge::k8s::issuer_keys::MIN_ON_DEMAND_REFRESH).await;
    let second = sa_jwt("default", "web", "second");
    fake.sa_token(&second, "default", "web", None);
    ask(&mut client, &id, &second, Some("Kubernetes"), None)
        .await
        .unwrap();
    fake.set_jwks_failure(Some(403));
    tokio::time::sleep(istio_ca_bridge::k8s::issuer_keys::MIN_ON_DEMAND_REFRESH).await;

    // Junk naming unknown keys cannot be refused now (the keys may have rotated), so it is
    // reviewed, but only in the reduced lane; a token that verifies against the last keys
    // seen is answered meanwhile.
    let reviews = fake.count("tokenreviews");
    let junk: Vec<String> = (0..40)
        .map(|n| junk_sa_jwt(&format!("kid-{n}"), n))
        .collect();
    let third = sa_jwt("default", "web", "third");
    fake.sa_token(&third, "default", "web", None);
    let t = Instant::now();
    let real = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ask(&mut client, &id, &third, Some("Kubernetes"), None).await
    };
    let (codes, real) = tokio::join!(flood(&b, junk, 16), real);
    let took = t.elapsed();
    real.expect("the verified token keeps its lane");
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Unauthenticated | Code::Unavailable))
    );
    let junk_reviews = fake.count("tokenreviews") - reviews - 1;
    let bound = 2 + (2.0 * took.as_secs_f64()).ceil() as u64;
    assert!(
        junk_reviews <= bound,
        "{junk_reviews} junk reviews in {took:?} (lane allows {bound})"
    );
    let unchecked = metric(
        &b,
        "istio_ca_bridge_token_signature_checks_total",
        r#"cluster="Kubernetes",result="keys_unavailable""#,
    );
    assert!(unchecked >= 41.0, "{unchecked}");
    assert_eq!(b.issued(), 3);
    b.shutdown().await.unwrap();
}
