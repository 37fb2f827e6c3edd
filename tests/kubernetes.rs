//! Kubernetes identity, black-box: the bridge runs in-process and talks, through its real
//! kube-rs client and a kubeconfig file, to the fake API server of
//! `istio_ca_bridge::testing::fake_kube` (a fake because no kube-apiserver runs offline; it
//! follows the documented API).
//!
//! Proves: TokenReview authentication with every refusal rule (UNAUTHENTICATED, nothing
//! issued), one review per token however many calls (and per burst of concurrent calls),
//! cluster selection by `clusterid` with per-cluster trust domains, ztunnel impersonation
//! decided from the watch-fed pod cache (no per-request GET), and behaviour while the API
//! server is gone or hanging (cached identities keep working, new tokens get UNAVAILABLE
//! quickly, service resumes when it is back); and the root ConfigMap in every namespace,
//! written only by the replica holding the Lease.

use std::time::{Duration, Instant};

use base64::Engine;
use istio_ca_bridge::config::Config;
use istio_ca_bridge::pki;
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

/// The cluster of the impersonation tests: two nodes, a ztunnel on each, workloads.
fn populate(fake: &FakeKube) {
    for (ns, name, uid, sa, node, phase) in [
        (
            "istio-system",
            "ztunnel-n1",
            "uid-zt1",
            "ztunnel",
            "node-1",
            "Running",
        ),
        (
            "istio-system",
            "ztunnel-n2",
            "uid-zt2",
            "ztunnel",
            "node-2",
            "Running",
        ),
        ("default", "web-1", "uid-web1", "web", "node-1", "Running"),
        ("default", "db-1", "uid-db1", "db", "node-2", "Running"),
        (
            "default",
            "batch-1",
            "uid-batch1",
            "batch",
            "node-1",
            "Failed",
        ),
        ("default", "job-1", "uid-job1", "job", "node-1", "Succeeded"),
    ] {
        fake.put_pod(pod_json(ns, name, uid, sa, node, phase));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ztunnel_impersonation_is_decided_from_the_watched_pods() {
    logs();
    let fake = FakeKube::start_new().await;
    populate(&fake);
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let b = Bridge::start_with(|c| kube_config(c, vec![kc])).await;
    let mut client = b.client().await;
    eventually("pod watch started", Duration::from_secs(10), || async {
        fake.count("pods.watch") >= 1
    })
    .await;

    let zt = sa_jwt("istio-system", "ztunnel", "zt1");
    fake.sa_token(
        &zt,
        "istio-system",
        "ztunnel",
        Some(("ztunnel-n1", "uid-zt1")),
    );
    let zt_id = spiffe("istio-system", "ztunnel");
    let web = spiffe("default", "web");

    // Allowed: a live pod with the requested identity runs on ztunnel's node.
    let chain = ask(&mut client, &web, &zt, Some("Kubernetes"), Some(&web))
        .await
        .expect("ztunnel may act for a pod on its node");
    assert_eq!(leaf_uri(&chain), web);
    // ztunnel's own identity (no impersonation) works too.
    let chain = ask(&mut client, &zt_id, &zt, Some("Kubernetes"), None)
        .await
        .unwrap();
    assert_eq!(leaf_uri(&chain), zt_id);
    let mut issued = 2;
    // The audit log tells who asked for whom: ztunnel (via TokenReview, in its cluster) for
    // the web pod's identity.
    let recs = b.audit_records().await;
    let rec = recs
        .iter()
        .find(|r| r["identity"] == web.as_str())
        .expect("audit record of the impersonated certificate");
    assert_eq!(rec["caller"], zt_id.as_str());
    assert_eq!(rec["via"], "token_review");
    assert_eq!(rec["cluster_id"], "Kubernetes");
    assert_eq!(rec["mode"], "direct");

    // Callers and targets that must be refused.
    let web_tok = sa_jwt("default", "web", "web");
    fake.sa_token(&web_tok, "default", "web", Some(("web-1", "uid-web1")));
    let bad_uid = sa_jwt("istio-system", "ztunnel", "bad-uid");
    fake.sa_token(
        &bad_uid,
        "istio-system",
        "ztunnel",
        Some(("ztunnel-n1", "uid-of-some-other-pod")),
    );
    let swapped = sa_jwt("istio-system", "ztunnel", "swapped");
    fake.sa_token(
        &swapped,
        "istio-system",
        "ztunnel",
        Some(("ztunnel-n1", "uid-zt2")),
    );
    let unbound = sa_jwt("istio-system", "ztunnel", "unbound");
    fake.sa_token(&unbound, "istio-system", "ztunnel", None);
    let db = spiffe("default", "db");
    let batch = spiffe("default", "batch");
    let job = spiffe("default", "job");
    let ghost = spiffe("default", "ghost");
    let other_td = "spiffe://other.example/ns/default/sa/web".to_string();
    // (case, caller token, ImpersonatedIdentity, CSR URI, reason that must be logged)
    let denied: Vec<(&str, &str, String, String, &str)> = vec![
        (
            "caller is not a trusted node account",
            &web_tok,
            db.clone(),
            db.clone(),
            "caller spiffe://cluster.local/ns/default/sa/web is not a trusted node account",
        ),
        (
            "target runs on another node",
            &zt,
            db.clone(),
            db.clone(),
            "no live pod with service account default/db on node node-1",
        ),
        (
            "target pod Failed",
            &zt,
            batch.clone(),
            batch.clone(),
            "no live pod with service account default/batch on node node-1",
        ),
        (
            "target pod Succeeded",
            &zt,
            job.clone(),
            job.clone(),
            "no live pod with service account default/job on node node-1",
        ),
        (
            "no pod with the target identity",
            &zt,
            ghost.clone(),
            ghost.clone(),
            "no live pod with service account default/ghost on node node-1",
        ),
        (
            "caller pod uid unknown",
            &bad_uid,
            web.clone(),
            web.clone(),
            "caller pod ztunnel-n1 (uid uid-of-some-other-pod) not found",
        ),
        (
            "caller pod uid belongs to another pod",
            &swapped,
            web.clone(),
            web.clone(),
            "caller pod uid uid-zt2 belongs to pod istio-system/ztunnel-n2, not ztunnel-n1",
        ),
        (
            "caller token bound to no pod",
            &unbound,
            web.clone(),
            web.clone(),
            "credential names no pod",
        ),
        (
            "malformed SPIFFE ID",
            &zt,
            "spiffe://cluster.local/ns/default/web".into(),
            web.clone(),
            "impersonated identity is not a SPIFFE ID",
        ),
        (
            "not a SPIFFE ID",
            &zt,
            "default/web".into(),
            web.clone(),
            "impersonated identity is not a SPIFFE ID: not a SPIFFE ID",
        ),
        (
            "other trust domain",
            &zt,
            other_td.clone(),
            other_td.clone(),
            "outside the caller's trust domain",
        ),
    ];
    for (name, token, target, csr_uri, reason) in &denied {
        let e = ask(
            &mut client,
            csr_uri,
            token,
            Some("Kubernetes"),
            Some(target),
        )
        .await
        .expect_err(name);
        assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
        assert_eq!(b.issued(), issued, "{name}: issued");
        assert!(
            logs().contains(reason),
            "{name}: reason {reason:?} not logged"
        );
    }

    // A pod that appears later (watch event) becomes impersonable; no single-pod GET.
    let api = spiffe("default", "api");
    let e = ask(&mut client, &api, &zt, Some("Kubernetes"), Some(&api))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    fake.put_pod(pod_json(
        "default", "api-1", "uid-api1", "api", "node-1", "Pending",
    ));
    fake.bookmark();
    let client2 = client.clone();
    eventually("new pod impersonable", Duration::from_secs(10), || {
        let (api, zt) = (api.clone(), zt.clone());
        let mut c = client2.clone();
        async move {
            ask(&mut c, &api, &zt, Some("Kubernetes"), Some(&api))
                .await
                .is_ok()
        }
    })
    .await;
    issued += 1;
    assert_eq!(b.issued(), issued);
    // It fails, then another is deleted: no longer impersonable (calls racing the watch
    // event may still succeed, so only the end state is asserted).
    fake.put_pod(pod_json(
        "default", "api-1", "uid-api1", "api", "node-1", "Failed",
    ));
    eventually("failed pod refused", Duration::from_secs(10), || {
        let (api, zt) = (api.clone(), zt.clone());
        let mut c = client2.clone();
        async move {
            ask(&mut c, &api, &zt, Some("Kubernetes"), Some(&api))
                .await
                .is_err_and(|e| e.code() == Code::Unauthenticated)
        }
    })
    .await;
    fake.delete_pod("default", "web-1");
    eventually("deleted pod refused", Duration::from_secs(10), || {
        let (web, zt) = (web.clone(), zt.clone());
        let mut c = client2.clone();
        async move {
            ask(&mut c, &web, &zt, Some("Kubernetes"), Some(&web))
                .await
                .is_err()
        }
    })
    .await;

    // Everything came from one LIST and the WATCH that followed it.
    assert_eq!(fake.count("pods.get"), 0, "no per-request pod GET");
    assert_eq!(fake.count("pods.list"), 1);
    assert_eq!(fake.count("other"), 0);
    let queries = fake.pod_queries();
    assert!(
        queries[0].contains("resourceVersion=0")
            && queries[0].contains("resourceVersionMatch=NotOlderThan")
            && !queries[0].contains("watch"),
        "{queries:?}"
    );
    let w = &queries[1];
    for p in [
        "watch=true",
        "allowWatchBookmarks=true",
        "timeoutSeconds=",
        "resourceVersion=1006",
    ] {
        assert!(w.contains(p), "watch query {w} lacks {p}");
    }
    // Each review was one request, however many impersonation calls used the token.
    assert_eq!(fake.count("tokenreviews"), 5);
    drop(client2);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_outage_keeps_cached_identities_and_fails_new_tokens_unavailable() {
    let mut fake = FakeKube::start_new().await;
    populate(&fake);
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let b = Bridge::start_with(|c| kube_config(c, vec![kc])).await;
    let mut client = b.client().await;
    eventually("pod watch started", Duration::from_secs(10), || async {
        fake.count("pods.watch") >= 1
    })
    .await;

    let id = spiffe("default", "web");
    let cached = sa_jwt("default", "web", "cached");
    fake.sa_token(&cached, "default", "web", None);
    let zt = sa_jwt("istio-system", "ztunnel", "zt");
    fake.sa_token(
        &zt,
        "istio-system",
        "ztunnel",
        Some(("ztunnel-n1", "uid-zt1")),
    );
    ask(&mut client, &id, &cached, Some("Kubernetes"), None)
        .await
        .unwrap();
    ask(&mut client, &id, &zt, Some("Kubernetes"), Some(&id))
        .await
        .unwrap();
    let reviews = fake.count("tokenreviews");

    // The API server goes away.
    fake.stop().await;
    let fresh = sa_jwt("default", "web", "fresh");
    fake.sa_token(&fresh, "default", "web", None);
    for _ in 0..3 {
        // Cached identities keep working, impersonation from the last known pods too.
        ask(&mut client, &id, &cached, Some("Kubernetes"), None)
            .await
            .expect("cached identity during the outage");
        ask(&mut client, &id, &zt, Some("Kubernetes"), Some(&id))
            .await
            .expect("impersonation from the cached pods during the outage");
        // A new token cannot be checked: UNAVAILABLE (clients retry), promptly.
        let t = Instant::now();
        let e = ask(&mut client, &id, &fresh, Some("Kubernetes"), None)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    }
    assert_eq!(b.issued(), 2 + 6);

    // It comes back on the same port: the new token works (failures were not cached).
    fake.start().await;
    let mut c2 = client.clone();
    eventually(
        "new token accepted after recovery",
        Duration::from_secs(10),
        || {
            let (id, fresh) = (id.clone(), fresh.clone());
            let mut c = c2.clone();
            async move {
                ask(&mut c, &id, &fresh, Some("Kubernetes"), None)
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    assert_eq!(fake.count("tokenreviews"), reviews + 1);

    // An API server that accepts but hangs: bounded by authn.kubernetes.requestTimeout.
    fake.set_review_delay(Duration::from_secs(8));
    let slow = sa_jwt("default", "web", "slow");
    fake.sa_token(&slow, "default", "web", None);
    let t = Instant::now();
    let e = ask(&mut c2, &id, &slow, Some("Kubernetes"), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    // Meanwhile cached identities are unaffected.
    let t = Instant::now();
    ask(&mut c2, &id, &cached, Some("Kubernetes"), None)
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(1));
    fake.set_review_delay(Duration::ZERO);
    let metrics = b.admin_get("/metrics").await.1;
    assert!(
        metrics
            .contains(r#"istio_ca_bridge_authentication_failures_total{reason="unavailable"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            r#"istio_ca_bridge_token_reviews_total{cluster="Kubernetes",result="error"} 4"#
        ),
        "{metrics}"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_configmap_in_every_namespace_written_by_the_lease_holder_only() {
    let fake = FakeKube::start_new().await;
    let all = ["default", "istio-system", "kube-system", "shop"];
    for ns in all.iter().chain(&["kube-public", "kube-node-lease"]) {
        fake.put_namespace(ns);
    }
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let edit = |c: &mut Config| {
        kube_config(c, vec![kc.clone()]);
        c.kubernetes.root_config_map.enabled = true;
        let le = &mut c.kubernetes.leader_election;
        le.lease_duration = Duration::from_secs(2);
        le.retry_period = Duration::from_millis(500);
    };
    const CM: &str = "istio-ca-root-cert";
    let root_of = |ns: &str| {
        fake.configmap(ns, CM)
            .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_string))
    };
    let holder = || {
        fake.lease("istio-system", "istio-ca-bridge")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };

    // Replica A (its own local CA, so its root tells who wrote a ConfigMap).
    let a = Bridge::start_with(edit).await;
    let root_a = a.root_pem();
    eventually(
        "A publishes everywhere",
        Duration::from_secs(10),
        || async {
            all.iter()
                .all(|ns| root_of(ns).as_deref() == Some(root_a.as_str()))
        },
    )
    .await;
    for ns in all {
        let cm = fake.configmap(ns, CM).unwrap();
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true", "{ns}");
    }
    for ns in ["kube-public", "kube-node-lease"] {
        assert!(fake.configmap(ns, CM).is_none(), "{ns} must be skipped");
    }
    let holder_a = holder().expect("A holds the lease");
    let leader_metric = r#"istio_ca_bridge_kubernetes_leader{cluster="Kubernetes"}"#;

    // Replica B with another root: while A holds the lease, B writes nothing.
    let b = Bridge::start_with(edit).await;
    let root_b = b.root_pem();
    assert_ne!(root_a, root_b);
    fake.put_namespace("late");
    eventually(
        "A publishes into a new namespace",
        Duration::from_secs(10),
        || async { root_of("late").as_deref() == Some(root_a.as_str()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for ns in all.iter().chain(&["late"]) {
        assert_eq!(root_of(ns).as_deref(), Some(root_a.as_str()), "{ns}");
    }
    assert_eq!(holder().as_deref(), Some(holder_a.as_str()));
    assert!(
        a.admin_get("/metrics")
            .await
            .1
            .contains(&format!("{leader_metric} 1"))
    );
    assert!(
        b.admin_get("/metrics")
            .await
            .1
            .contains(&format!("{leader_metric} 0"))
    );

    // A stops (and releases the lease): B takes over and publishes its bundle.
    a.shutdown().await.unwrap();
    eventually("B takes over", Duration::from_secs(10), || async {
        all.iter()
            .chain(&["late"])
            .all(|ns| root_of(ns).as_deref() == Some(root_b.as_str()))
    })
    .await;
    let holder_b = holder().expect("B holds the lease");
    assert_ne!(holder_a, holder_b);
    let lease = fake.lease("istio-system", "istio-ca-bridge").unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 2, "{lease}");
    assert!(fake.count("leases.replace") > 2);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_tls_secret_is_issued_verifiable_and_renewed() {
    require_tool("openssl", "apt-get install -y openssl");
    logs();
    let fake = FakeKube::start_new().await;
    fake.put_namespace("istio-system");
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let state = kdir.path().join("ca");
    let edit = |renew_before: u64| {
        let (kc, state) = (kc.clone(), state.clone());
        move |c: &mut Config| {
            kube_config(c, vec![kc]);
            // A CA that survives a restart of the bridge.
            let istio_ca_bridge::config::BackendConfig::Local(l) = &mut c.backend else {
                unreachable!("tests start with the local backend")
            };
            l.state_dir = state;
            let ic = &mut c.kubernetes.istiod_cert;
            ic.enabled = true;
            ic.revisions = vec!["canary".into()];
            ic.ttl = Duration::from_secs(8);
            ic.renew_before = Duration::from_secs(renew_before);
            let le = &mut c.kubernetes.leader_election;
            le.lease_duration = Duration::from_secs(2);
            le.retry_period = Duration::from_millis(500);
        }
    };
    let b = Bridge::start_with(edit(5)).await;
    let field = |s: &serde_json::Value, k: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(s["data"][k].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    eventually("istiod-tls written", Duration::from_secs(10), || async {
        fake.secret("istio-system", "istiod-tls").is_some()
    })
    .await;
    let s = fake.secret("istio-system", "istiod-tls").unwrap();
    assert_eq!(s["type"], "kubernetes.io/tls");
    let (crt, key, ca) = (
        field(&s, "tls.crt"),
        field(&s, "tls.key"),
        field(&s, "ca.crt"),
    );
    assert_eq!(ca, b.root_pem(), "ca.crt is the trust bundle");
    assert!(!crt.contains("PRIVATE KEY") && key.contains("PRIVATE KEY"));
    let info = pki::cert_info(&pki::parse_certs_pem(crt.as_bytes()).unwrap()[0]).unwrap();
    assert_eq!(
        info.dns_sans,
        vec!["istiod.istio-system.svc", "istiod-canary.istio-system.svc"]
    );
    assert!(!info.is_ca);
    // An independent verifier: chains to ca.crt for TLS servers, and the key matches.
    let dir = kdir.path();
    let (crt_f, key_f, ca_f) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    std::fs::write(&crt_f, &crt).unwrap();
    std::fs::write(&key_f, &key).unwrap();
    std::fs::write(&ca_f, &ca).unwrap();
    let p = |x: &std::path::PathBuf| x.display().to_string();
    let (ok, out) = openssl(&[
        "verify",
        "-purpose",
        "sslserver",
        "-CAfile",
        &p(&ca_f),
        &p(&crt_f),
    ]);
    assert!(ok, "{out}");
    let (_, cert_pub) = openssl(&["x509", "-noout", "-pubkey", "-in", &p(&crt_f)]);
    let (_, key_pub) = openssl(&["pkey", "-pubout", "-in", &p(&key_f)]);
    assert_eq!(cert_pub, key_pub, "tls.key belongs to tls.crt");

    // Renewed when less than renewBefore is left (8 s lifetime, 5 s before expiry).
    let serial = info.serial_hex.clone();
    eventually("istiod-tls renewed", Duration::from_secs(10), || async {
        let s = fake.secret("istio-system", "istiod-tls").unwrap();
        let crt = field(&s, "tls.crt");
        pki::cert_info(&pki::parse_certs_pem(crt.as_bytes()).unwrap()[0])
            .unwrap()
            .serial_hex
            != serial
    })
    .await;
    assert!(logs().contains("istiod certificate written"));
    assert!(no_log_contains_key(&key));
    b.shutdown().await.unwrap();

    // A restart with the same CA keeps a Secret that is still good (no new issuance).
    let s = fake.secret("istio-system", "istiod-tls").unwrap();
    let serial = pki::cert_info(&pki::parse_certs_pem(field(&s, "tls.crt").as_bytes()).unwrap()[0])
        .unwrap()
        .serial_hex;
    let applies = fake.count("secrets.apply");
    let gets = fake.count("secrets.get");
    let b = Bridge::start_with(edit(1)).await;
    eventually(
        "restarted bridge checked the Secret",
        Duration::from_secs(10),
        || async { fake.count("secrets.get") > gets },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = fake.secret("istio-system", "istiod-tls").unwrap();
    let now_serial =
        pki::cert_info(&pki::parse_certs_pem(field(&s, "tls.crt").as_bytes()).unwrap()[0])
            .unwrap()
            .serial_hex;
    assert_eq!(now_serial, serial, "existing certificate kept");
    assert_eq!(fake.count("secrets.apply"), applies);
    b.shutdown().await.unwrap();
}

/// The private key never shows up in what the bridges logged.
fn no_log_contains_key(key_pem: &str) -> bool {
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    !logs().contains(&body[..40])
}

/// The local CA, with a trust bundle the test can change (root rotation, step 1: add the
/// new root beside the old one).
struct Rotating {
    inner: std::sync::Arc<dyn istio_ca_bridge::backend::Signer>,
    bundle: tokio::sync::watch::Sender<istio_ca_bridge::trust::SharedBundle>,
}

#[async_trait::async_trait]
impl istio_ca_bridge::backend::Signer for Rotating {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    async fn sign(
        &self,
        req: &istio_ca_bridge::backend::SignRequest,
    ) -> Result<istio_ca_bridge::backend::IssuedChain, istio_ca_bridge::backend::SignError> {
        self.inner.sign(req).await
    }
    fn trust_bundle(&self) -> tokio::sync::watch::Receiver<istio_ca_bridge::trust::SharedBundle> {
        self.bundle.subscribe()
    }
    fn health(&self) -> istio_ca_bridge::backend::Health {
        self.inner.health()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_change_reaches_every_configmap_and_istiod_tls() {
    use istio_ca_bridge::config::{BackendConfig, LocalBackendConfig};
    use istio_ca_bridge::trust::TrustBundle;
    let fake = FakeKube::start_new().await;
    for ns in ["default", "istio-system"] {
        fake.put_namespace(ns);
    }
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let inner = istio_ca_bridge::backend::build(
        &BackendConfig::Local(LocalBackendConfig {
            state_dir: kdir.path().join("ca"),
            ..Default::default()
        }),
        TD,
        std::time::Duration::from_secs(86400),
        std::sync::Arc::new(istio_ca_bridge::metrics::Metrics::new(false)),
    )
    .await
    .unwrap();
    let old = inner.trust_bundle().borrow().clone();
    let signer = std::sync::Arc::new(Rotating {
        inner,
        bundle: tokio::sync::watch::channel(old.clone()).0,
    });
    let b = Bridge::start_opts(
        |c| {
            kube_config(c, vec![kc]);
            c.kubernetes.root_config_map.enabled = true;
            c.kubernetes.root_config_map.resync_interval = Duration::from_secs(1);
            c.kubernetes.istiod_cert.enabled = true;
            let le = &mut c.kubernetes.leader_election;
            le.lease_duration = Duration::from_secs(2);
            le.retry_period = Duration::from_millis(500);
        },
        istio_ca_bridge::app::Options {
            signer: Some(signer.clone()),
        },
    )
    .await;
    const CM: &str = "istio-ca-root-cert";
    let published = |pem: String| {
        let fake = &fake;
        async move {
            let cms = ["default", "istio-system"].iter().all(|ns| {
                fake.configmap(ns, CM)
                    .is_some_and(|cm| cm["data"]["root-cert.pem"].as_str() == Some(pem.as_str()))
            });
            let secret = fake.secret("istio-system", "istiod-tls").is_some_and(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(s["data"]["ca.crt"].as_str().unwrap())
                    .unwrap()
                    == pem.as_bytes()
            });
            cms && secret
        }
    };
    eventually("old bundle published", Duration::from_secs(10), || {
        published(old.pem().to_string())
    })
    .await;

    // Rotation step 1: a new root joins the bundle; every ConfigMap and istiod's ca.crt
    // must carry both roots.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "new root");
    let new_root = p.self_signed(&key).unwrap();
    let mut roots = old.roots().to_vec();
    roots.push(new_root.der().clone());
    let both = TrustBundle::new(roots).unwrap();
    assert_eq!(both.roots().len(), 2);
    signer
        .bundle
        .send_replace(std::sync::Arc::new(both.clone()));
    eventually("two-root bundle published", Duration::from_secs(10), || {
        published(both.pem().to_string())
    })
    .await;

    // Someone deletes a ConfigMap: the resync puts it back.
    fake.delete_configmap("default", CM);
    assert!(fake.configmap("default", CM).is_none());
    eventually(
        "deleted ConfigMap restored",
        Duration::from_secs(10),
        || published(both.pem().to_string()),
    )
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_elect_exactly_one_writer() {
    let fake = FakeKube::start_new().await;
    for ns in ["default", "istio-system", "shop"] {
        fake.put_namespace(ns);
    }
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let edit = |c: &mut Config| {
        kube_config(c, vec![kc.clone()]);
        c.kubernetes.root_config_map.enabled = true;
        let le = &mut c.kubernetes.leader_election;
        le.lease_duration = Duration::from_secs(2);
        le.retry_period = Duration::from_millis(200);
    };
    // Both race to create the Lease (one gets 409 AlreadyExists) and then to renew it.
    let (a, b) = tokio::join!(Bridge::start_with(edit), Bridge::start_with(edit));
    let leader_metric = r#"istio_ca_bridge_kubernetes_leader{cluster="Kubernetes"} 1"#;
    eventually("a leader is elected", Duration::from_secs(10), || async {
        fake.configmap("shop", "istio-ca-root-cert").is_some()
    })
    .await;
    let holder = fake.lease("istio-system", "istio-ca-bridge").unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let leaders = [
            a.admin_get("/metrics").await.1.contains(leader_metric),
            b.admin_get("/metrics").await.1.contains(leader_metric),
        ];
        assert_eq!(leaders.iter().filter(|l| **l).count(), 1, "{leaders:?}");
        let now = fake.lease("istio-system", "istio-ca-bridge").unwrap();
        assert_eq!(
            now["spec"]["holderIdentity"],
            holder.as_str(),
            "leader changed"
        );
    }
    // Every ConfigMap holds the leader's root, not a mix.
    let winner = if a.admin_get("/metrics").await.1.contains(leader_metric) {
        a.root_pem()
    } else {
        b.root_pem()
    };
    for ns in ["default", "istio-system", "shop"] {
        let cm = fake.configmap(ns, "istio-ca-root-cert").unwrap();
        assert_eq!(cm["data"]["root-cert.pem"], winner.as_str(), "{ns}");
    }
    assert_eq!(
        fake.lease("istio-system", "istio-ca-bridge").unwrap()["spec"]["leaseTransitions"],
        0
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Impersonation before the pod cache has synced cannot be decided: it is a transient
/// UNAVAILABLE (ztunnel retries), not an authentication failure, and it issues nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_before_the_pod_cache_syncs_is_unavailable_then_works() {
    logs();
    let fake = FakeKube::start_new().await;
    populate(&fake);
    fake.set_pods_failure(Some(403));
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let b = Bridge::start_with(|c| kube_config(c, vec![kc])).await;
    let mut client = b.client().await;
    eventually("pod list refused", Duration::from_secs(10), || async {
        fake.count("pods.failed") >= 1
    })
    .await;

    let zt = sa_jwt("istio-system", "ztunnel", "zt1");
    fake.sa_token(
        &zt,
        "istio-system",
        "ztunnel",
        Some(("ztunnel-n1", "uid-zt1")),
    );
    let web = spiffe("default", "web");
    for _ in 0..2 {
        let e = ask(&mut client, &web, &zt, Some("Kubernetes"), Some(&web))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
    assert_eq!(b.issued(), 0);
    // ztunnel's own identity needs no pod facts.
    ask(
        &mut client,
        &spiffe("istio-system", "ztunnel"),
        &zt,
        Some("Kubernetes"),
        None,
    )
    .await
    .unwrap();
    let metrics = b.admin_get("/metrics").await.1;
    assert!(
        metrics
            .contains(r#"istio_ca_bridge_authentication_failures_total{reason="unavailable"} 2"#),
        "{metrics}"
    );

    // Pods become listable: the same request now succeeds.
    fake.set_pods_failure(None);
    let c2 = client.clone();
    eventually(
        "impersonation allowed once pods are listed",
        Duration::from_secs(45),
        || {
            let (web, zt) = (web.clone(), zt.clone());
            let mut c = c2.clone();
            async move {
                ask(&mut c, &web, &zt, Some("Kubernetes"), Some(&web))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    b.shutdown().await.unwrap();
}
