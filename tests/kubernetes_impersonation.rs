//! ztunnel impersonation, black-box: whether a node's ztunnel may ask for a workload's
//! identity is decided from the watch-fed pod cache (no per-request GET).
//!
//! The bridge runs in-process and talks, through its real kube-rs client and a kubeconfig
//! file, to the fake API server of `istio_ca_bridge::testing::fake_kube` (a fake because no
//! kube-apiserver runs offline; it follows the documented API).
//!
//! Proves: the impersonation rules against the watched pods, behaviour while the API server
//! is gone or hanging (cached identities keep working, new tokens get UNAVAILABLE quickly,
//! service resumes when it is back), and UNAVAILABLE before the pod cache has synced.

use std::time::{Duration, Instant};

use istio_ca_bridge::testing::fake_kube::*;
use istio_ca_bridge::testing::*;
use tonic::Code;

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
    // No CA Secret: the resourceVersions asserted below count the pods and namespaces alone.
    let b = Bridge::start_with(|c| {
        kube_config(c, vec![kc]);
        c.kubernetes.ca_secret.enabled = false;
    })
    .await;
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

/// A pod watch that keeps failing stops authorizing impersonation after
/// `podCacheMaxStaleness` (pods deleted meanwhile would still look live): UNAVAILABLE,
/// nothing issued; once the watch is back, impersonation works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pod_cache_stops_authorizing_impersonation_until_fresh() {
    let mut fake = FakeKube::start_new().await;
    populate(&fake);
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let b = Bridge::start_with(|c| {
        kube_config(c, vec![kc]);
        c.authn.kubernetes.as_mut().unwrap().pod_cache_max_staleness = Duration::from_secs(2);
    })
    .await;
    let mut client = b.client().await;
    eventually("pod watch started", Duration::from_secs(10), || async {
        fake.count("pods.watch") >= 1
    })
    .await;
    let id = spiffe("default", "web");
    let zt = sa_jwt("istio-system", "ztunnel", "zt-stale");
    fake.sa_token(
        &zt,
        "istio-system",
        "ztunnel",
        Some(("ztunnel-n1", "uid-zt1")),
    );
    // Reviewed and cached while the API server is up.
    ask(&mut client, &id, &zt, Some("Kubernetes"), Some(&id))
        .await
        .unwrap();

    fake.stop().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = b.issued();
    let e = ask(&mut client, &id, &zt, Some("Kubernetes"), Some(&id))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert_eq!(b.issued(), before, "nothing issued from a stale cache");
    // The caller's own identity needs no pod cache: still served from the review cache.
    ask(
        &mut client,
        &spiffe("istio-system", "ztunnel"),
        &zt,
        Some("Kubernetes"),
        None,
    )
    .await
    .unwrap();

    fake.start().await;
    // A change shows the watch is back (a quiet cluster is proven by the 30s re-list).
    fake.put_pod(pod_json(
        "default", "web-2", "uid-web2", "web", "node-1", "Running",
    ));
    eventually(
        "impersonation after recovery",
        Duration::from_secs(40),
        || {
            let (id, zt) = (id.clone(), zt.clone());
            let mut c = client.clone();
            async move {
                ask(&mut c, &id, &zt, Some("Kubernetes"), Some(&id))
                    .await
                    .is_ok()
            }
        },
    )
    .await;
    b.shutdown().await.unwrap();
}
