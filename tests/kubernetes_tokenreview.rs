//! Kubernetes identity by TokenReview, black-box.
//!
//! The bridge runs in-process and talks, through its real kube-rs client and a kubeconfig
//! file, to the fake API server of `istio_ca_bridge::testing::fake_kube` (a fake because no
//! kube-apiserver runs offline; it follows the documented API).
//!
//! Proves: TokenReview authentication with every refusal rule (UNAUTHENTICATED, nothing
//! issued), one review per token however many calls (and per burst of concurrent calls),
//! cluster selection by `clusterid` with per-cluster trust domains, and API errors and the
//! client-side rate limit answering UNAVAILABLE.

use std::time::{Duration, Instant};

use base64::Engine;
use istio_ca_bridge::testing::fake_kube::*;
use istio_ca_bridge::testing::*;
use serde_json::json;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_review_authenticates_and_one_review_serves_many_calls() {
    let fake = FakeKube::start_new().await;
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let b = Bridge::start_with(|c| kube_config(c, vec![kc])).await;
    let mut client = b.client().await;
    let id = spiffe("default", "bookinfo");

    let a = sa_jwt("default", "bookinfo", "a");
    fake.sa_token(&a, "default", "bookinfo", Some(("bookinfo-1", "uid-1")));
    let chain = ask(&mut client, &id, &a, Some("Kubernetes"), None)
        .await
        .expect("TokenReview-authenticated call");
    assert_eq!(leaf_uri(&chain), id);
    assert_eq!(fake.count("tokenreviews"), 1);
    assert_eq!(fake.review_audiences(), vec![vec!["istio-ca".to_string()]]);

    // N more calls with the same token: no further review (also without a clusterid
    // header, which means the local cluster).
    for i in 0..5 {
        let cluster = if i % 2 == 0 { Some("Kubernetes") } else { None };
        ask(&mut client, &id, &a, cluster, None).await.unwrap();
    }
    assert_eq!(fake.count("tokenreviews"), 1, "cached review reused");

    // A second token costs a second review.
    let a2 = sa_jwt("default", "bookinfo", "a2");
    fake.sa_token(&a2, "default", "bookinfo", None);
    ask(&mut client, &id, &a2, Some("Kubernetes"), None)
        .await
        .unwrap();
    assert_eq!(fake.count("tokenreviews"), 2);

    // Eight concurrent calls with one new token share one in-flight review.
    fake.set_review_delay(Duration::from_millis(400));
    let c = sa_jwt("default", "reviews", "c");
    fake.sa_token(&c, "default", "reviews", None);
    let cid = spiffe("default", "reviews");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut client = client.clone();
        let (c, cid) = (c.clone(), cid.clone());
        tasks.push(tokio::spawn(async move {
            ask(&mut client, &cid, &c, Some("Kubernetes"), None).await
        }));
    }
    for t in tasks {
        assert_eq!(leaf_uri(&t.await.unwrap().unwrap()), cid);
    }
    assert_eq!(fake.count("tokenreviews"), 3, "one review for the burst");
    fake.set_review_delay(Duration::ZERO);

    // Tokens that are not for the API server never reach it: the JWT issuer's tokens
    // are verified locally, and a non-JWT string is refused outright.
    let jwt_token = b.issuer.token("default", "bookinfo");
    ask(&mut client, &id, &jwt_token, Some("Kubernetes"), None)
        .await
        .expect("JWT issuer token");
    let e = ask(&mut client, &id, "not-a-jwt", Some("Kubernetes"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(fake.count("tokenreviews"), 3);
    assert_eq!(b.issued(), 1 + 5 + 1 + 8 + 1);
    assert_eq!(fake.count("unauthorized"), 0);
    let metrics = b.admin_get("/metrics").await.1;
    assert!(
        metrics.contains("citadel_server_success_cert_issuance_count 16"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"istio_ca_bridge_token_reviews_total{cluster="Kubernetes",result="authenticated"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"istio_ca_bridge_token_review_cache_hits_total{cluster="Kubernetes"}"#),
        "{metrics}"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_token_review_refusal_is_unauthenticated_and_issues_nothing() {
    let fake = FakeKube::start_new().await;
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let b = Bridge::start_with(|c| kube_config(c, vec![kc])).await;
    let mut client = b.client().await;
    let id = spiffe("default", "demo");
    let sa_user = |groups: serde_json::Value| json!({"username": "system:serviceaccount:default:demo", "uid": "x", "groups": groups});

    logs();
    let mut reviewed = 0;
    // (case, what the API server answers, reason that must be logged)
    let cases: Vec<(&str, Option<Review>, &str)> = vec![
        (
            "unknown token: unauthenticated",
            None,
            "not authenticated: [invalid bearer token, token lookup failed]",
        ),
        (
            "review says not authenticated",
            Some(Review::Raw(json!({"authenticated": false, "user": {},
                "error": "token has been invalidated"}))),
            "not authenticated: token has been invalidated",
        ),
        (
            "token audience is not istio-ca (API server refuses it)",
            Some(Review::ServiceAccount {
                namespace: "default".into(),
                name: "demo".into(),
                pod: None,
                audiences: vec!["https://kubernetes.default.svc.cluster.local".into()],
            }),
            "is invalid for the target audiences [\"istio-ca\"]",
        ),
        (
            "review confirms another audience",
            Some(Review::Raw(json!({"authenticated": true,
                "user": sa_user(json!(["system:serviceaccounts", "system:authenticated"])),
                "audiences": ["https://kubernetes.default.svc.cluster.local"]}))),
            "(review confirmed [\"https://kubernetes.default.svc.cluster.local\"])",
        ),
        (
            "review confirms no audience",
            Some(Review::Raw(json!({"authenticated": true,
                "user": sa_user(json!(["system:serviceaccounts", "system:authenticated"]))}))),
            "(review confirmed [])",
        ),
        (
            "user not in system:serviceaccounts",
            Some(Review::Raw(json!({"authenticated": true,
                "user": sa_user(json!(["system:authenticated"])),
                "audiences": ["istio-ca"]}))),
            "user is not in group system:serviceaccounts",
        ),
        (
            "user is not a service account",
            Some(Review::Raw(json!({"authenticated": true,
                "user": {"username": "system:node:node-1",
                         "groups": ["system:serviceaccounts", "system:nodes"]},
                "audiences": ["istio-ca"]}))),
            "user is not a service account",
        ),
    ];
    let mut first_refused = None;
    for (i, (name, review, reason)) in cases.into_iter().enumerate() {
        let token = sa_jwt("default", "demo", &format!("bad-{i}"));
        first_refused.get_or_insert(token.clone());
        if let Some(r) = review {
            fake.set_review(&token, r);
        }
        let e = ask(&mut client, &id, &token, Some("Kubernetes"), None)
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
        assert!(!e.message().contains(&token), "{name}: token leaked");
        reviewed += 1;
        assert_eq!(fake.count("tokenreviews"), reviewed, "{name}");
        assert!(
            logs().contains(reason),
            "{name}: reason {reason:?} not logged"
        );
    }

    // A valid token naming a cluster nobody configured: refused without a review.
    let good = sa_jwt("default", "demo", "good");
    fake.sa_token(&good, "default", "demo", None);
    let e = ask(&mut client, &id, &good, Some("no-such-cluster"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(logs().contains(r#"unknown cluster id "no-such-cluster""#));
    // An expired token: refused without a review.
    let now = now();
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
    };
    let expired = format!(
        "{}.{}.c2ln",
        b64(json!({"alg": "RS256"})),
        b64(
            json!({"iss": K8S_ISSUER, "sub": "system:serviceaccount:default:demo",
                   "aud": ["istio-ca"], "exp": now - 3600})
        )
    );
    fake.sa_token(&expired, "default", "demo", None);
    let e = ask(&mut client, &id, &expired, Some("Kubernetes"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(fake.count("tokenreviews"), reviewed);
    assert!(logs().contains("token expired (no TokenReview sent)"));
    // A valid token, but the CSR asks for another identity.
    let e = ask(
        &mut client,
        &spiffe("default", "other"),
        &good,
        Some("Kubernetes"),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(b.issued(), 0, "nothing issued for any refusal");

    // The mismatched call did review the good token; the next call reuses that review.
    reviewed += 1;
    ask(&mut client, &id, &good, Some("Kubernetes"), None)
        .await
        .unwrap();
    assert_eq!(b.issued(), 1);
    assert_eq!(fake.count("tokenreviews"), reviewed);

    // A refused token is answered from memory for a moment (a burst of retries costs one
    // review), but not for long: once the API server accepts it, so do we.
    let refused = first_refused.expect("first case token");
    // (Its refusal may have been remembered since the first case, or have expired.)
    ask(&mut client, &id, &refused, Some("Kubernetes"), None)
        .await
        .unwrap_err();
    let reviewed = fake.count("tokenreviews");
    for _ in 0..3 {
        ask(&mut client, &id, &refused, Some("Kubernetes"), None)
            .await
            .unwrap_err();
    }
    assert_eq!(fake.count("tokenreviews"), reviewed, "refusal remembered");
    fake.sa_token(&refused, "default", "demo", None);
    tokio::time::sleep(istio_ca_bridge::server::authn::token_review::NEGATIVE_TTL).await;
    ask(&mut client, &id, &refused, Some("Kubernetes"), None)
        .await
        .expect("accepted once the API server accepts it");
    assert_eq!(fake.count("tokenreviews"), reviewed + 1);
    assert_eq!(b.issued(), 2);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusterid_selects_the_cluster_and_its_trust_domain() {
    let east = FakeKube::start_new().await;
    let west = FakeKube::start_new().await;
    let kdir = tempfile::tempdir().unwrap();
    let ce = cluster(&east, kdir.path(), "east", Some("east.example.com"));
    let cw = cluster(&west, kdir.path(), "west", Some("west.example.com"));
    let b = Bridge::start_with(|c| kube_config(c, vec![ce, cw])).await;
    let mut client = b.client().await;

    let te = sa_jwt("shop", "cart", "east");
    east.sa_token(&te, "shop", "cart", None);
    let tw = sa_jwt("shop", "cart", "west");
    west.sa_token(&tw, "shop", "cart", None);
    let east_id = "spiffe://east.example.com/ns/shop/sa/cart";
    let west_id = "spiffe://west.example.com/ns/shop/sa/cart";

    let chain = ask(&mut client, east_id, &te, Some("east"), None)
        .await
        .unwrap();
    assert_eq!(leaf_uri(&chain), east_id);
    let chain = ask(&mut client, west_id, &tw, Some("west"), None)
        .await
        .unwrap();
    assert_eq!(leaf_uri(&chain), west_id);
    assert_eq!(
        (east.count("tokenreviews"), west.count("tokenreviews")),
        (1, 1)
    );

    // East's token presented as west's: west's API server does not know it.
    let e = ask(&mut client, west_id, &te, Some("west"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(
        (east.count("tokenreviews"), west.count("tokenreviews")),
        (1, 2)
    );
    // No clusterid: the local (first) cluster, whose cached review is reused.
    let chain = ask(&mut client, east_id, &te, None, None).await.unwrap();
    assert_eq!(leaf_uri(&chain), east_id);
    assert_eq!(east.count("tokenreviews"), 1);
    // An identity in the wrong trust domain for the cluster is refused.
    let e = ask(
        &mut client,
        "spiffe://west.example.com/ns/shop/sa/cart",
        &te,
        Some("east"),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(b.issued(), 3);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_and_the_client_rate_limit_answer_unavailable() {
    logs();
    let fake = FakeKube::start_new().await;
    let kdir = tempfile::tempdir().unwrap();
    let mut kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    // One review per 2 s, no burst: the second new token cannot get a slot in time.
    kc.qps = 0.5;
    kc.burst = 1;
    let b = Bridge::start_with(|c| {
        kube_config(c, vec![kc]);
        c.authn.kubernetes.as_mut().unwrap().request_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = b.client().await;
    let id = spiffe("default", "web");
    let first = sa_jwt("default", "web", "first");
    fake.sa_token(&first, "default", "web", None);
    ask(&mut client, &id, &first, Some("Kubernetes"), None)
        .await
        .unwrap();

    // Rate limited: UNAVAILABLE at once (no slot within requestTimeout), no request sent;
    // the cached token is unaffected.
    let second = sa_jwt("default", "web", "second");
    fake.sa_token(&second, "default", "web", None);
    let t = Instant::now();
    let e = ask(&mut client, &id, &second, Some("Kubernetes"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(fake.count("tokenreviews"), 1);
    assert!(logs().contains("client-side rate limit"));
    ask(&mut client, &id, &first, Some("Kubernetes"), None)
        .await
        .unwrap();

    // The API server refuses the bridge's own call (RBAC) or fails: UNAVAILABLE, never
    // UNAUTHENTICATED (the caller's token was not judged) and never cached.
    tokio::time::sleep(Duration::from_millis(2100)).await; // a rate-limit slot again
    fake.set_review_failure(Some(403));
    let e = ask(&mut client, &id, &second, Some("Kubernetes"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(logs().contains("cannot create resource"));
    fake.set_review_failure(None);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    ask(&mut client, &id, &second, Some("Kubernetes"), None)
        .await
        .expect("works once RBAC is fixed");
    assert_eq!(fake.count("tokenreviews"), 3);
    assert_eq!(b.issued(), 3);
    b.shutdown().await.unwrap();
}
