//! The AWS Private CA backend against a real acm-pca API: moto's server (`pip install
//! "moto[server]"`), started per test on a loopback port. A CA is created and activated
//! through the API exactly as on AWS (CreateCertificateAuthority, GetCertificateAuthorityCsr,
//! IssueCertificate with RootCACertificate/V1, ImportCertificateAuthorityCertificate); the
//! bridge reaches it with dummy credentials through the SDK's endpoint override, either
//! directly or through a fault-injecting HTTP proxy (`istio_ca_bridge::testing::aws`), which
//! also counts what reaches moto (moto itself ignores IdempotencyToken, so the proxy plays
//! AWS's dedupe).

use std::time::Duration;

use istio_ca_bridge::config::KeyType;
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::aws::*;
use istio_ca_bridge::testing::*;
use tokio::time::Instant;
use tonic::Code;

/// Puts `testing::aws::TEST_ENV` (dummy credentials for the SDK's default chain) in the
/// environment, once. Here and not in the library: setting the environment is `unsafe`,
/// which the library forbids.
fn aws_test_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in TEST_ENV {
            // SAFETY (test-only): set once, before any AWS client exists, to constants.
            unsafe { std::env::set_var(k, v) };
        }
    });
}

fn write(dir: &std::path::Path, name: &str, data: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_csrs_get_chains_to_the_private_ca_root() {
    aws_test_env();
    let moto = Moto::start().await;
    let (arn, root) = create_root_ca(&moto.url).await;
    let extra_dir = tempfile::tempdir().unwrap();
    let extra_file = extra_dir.path().join("extra-roots.pem");
    let extra_a = other_root("next root A");
    std::fs::write(&extra_file, &extra_a).unwrap();
    let b = Bridge::start_with(|c| {
        aws_backend(c, &arn, &moto.url, |a| {
            a.extra_roots_file = Some(extra_file.clone());
            a.bundle_refresh_interval = Duration::from_secs(1);
        })
    })
    .await;
    assert_eq!(b.signer.kind(), "aws_pca");
    // The bundle is the CA's root (GetCertificateAuthorityCertificate) plus the extra roots.
    let pca_root = pki::parse_certs_pem(root.as_bytes()).unwrap().remove(0);
    let roots = |pem: &str| pki::parse_certs_pem(pem.as_bytes()).unwrap();
    assert_eq!(
        roots(&b.root_pem()),
        vec![pca_root.clone(), roots(&extra_a).remove(0)]
    );
    // The serving certificate came from the Private CA too: this client trusts only its root.
    let mut client = b.client().await;
    let token = b.issuer.token("default", "bookinfo");
    let id = spiffe("default", "bookinfo");
    let exceeded = || {
        b.metrics
            .backend_ttl_exceeded
            .with_label_values(&["aws_pca"])
            .get()
    };
    let before = exceeded();
    let root_f = write(b.dir.path(), "pca-root.pem", &root);
    let cases = [
        (KeyType::EcdsaP256, CsrShape::Ztunnel),
        (KeyType::EcdsaP256, CsrShape::IstioAgent),
        (KeyType::Rsa, CsrShape::IstioAgent),
    ];
    for (key_type, shape) in cases {
        let (key, csr) = csr_for(&id, key_type, shape);
        let chain = call(&mut client, request(csr, Some(&token), 3600))
            .await
            .unwrap_or_else(|s| panic!("{key_type:?} {shape:?}: {s:?}"))
            .cert_chain;
        assert_eq!(
            chain.len(),
            2,
            "leaf + root bundle (a root CA has no intermediates)"
        );
        let target = istio_ca_bridge::identity::SpiffeId::parse(&id).unwrap();
        istio_ca_bridge::cli::request::verify_response(&chain, &target, &key).unwrap();
        let leaf = pki::parse_certs_pem(chain[0].as_bytes()).unwrap().remove(0);
        let info = pki::cert_info(&leaf).unwrap();
        assert_eq!(info.uri_sans, vec![id.clone()], "SAN kept");
        assert!(info.dns_sans.is_empty());
        let leaf_f = write(b.dir.path(), "leaf.pem", &chain[0]);
        for purpose in ["sslclient", "sslserver"] {
            let (ok, out) = openssl(&["verify", "-purpose", purpose, "-CAfile", &root_f, &leaf_f]);
            assert!(ok, "openssl verify {purpose} {key_type:?}: {out}");
        }
        // moto ignores Validity and signs for a year: the rule is accept + count + log.
        let life = info.not_after - now() as i64;
        assert!(life > 300 * 86400, "moto signs for a year: {life}");
    }
    assert_eq!(exceeded() - before, 3, "every over-long leaf is counted");

    // The bundle is re-read periodically: a changed extra roots file shows up by itself.
    let extra_b = other_root("next root B");
    std::fs::write(&extra_file, &extra_b).unwrap();
    let want = vec![pca_root, roots(&extra_b).remove(0)];
    let start = Instant::now();
    while roots(&b.root_pem()) != want {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "bundle not refreshed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = b.admin_get("/metrics").await;
    assert!(
        metrics.contains("istio_ca_bridge_backend_ttl_exceeded_total{backend=\"aws_pca\"}"),
        "{metrics}"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_retried_within_the_deadline_and_never_issue_twice() {
    aws_test_env();
    let moto = Moto::start().await;
    let (arn, _) = create_root_ca(&moto.url).await;
    let proxy = Proxy::start(&moto.url).await;
    let b = Bridge::start_with(|c| {
        c.server.request_timeout = Duration::from_secs(10);
        aws_backend(c, &arn, &proxy.url, |a| {
            a.issue_timeout = Duration::from_secs(3);
        })
    })
    .await;
    let mut client = b.client().await;
    let token = b.issuer.token("default", "faults");
    let id = spiffe("default", "faults");
    proxy.take_stats();

    async fn attempt(
        client: &mut istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient<tonic::transport::Channel>,
        id: &str,
        token: &str,
    ) -> (Result<(), Code>, Duration) {
        let (_, csr) = csr_for(id, KeyType::EcdsaP256, CsrShape::Ztunnel);
        let start = Instant::now();
        let r = call(client, request(csr, Some(token), 3600)).await;
        (r.map(|_| ()).map_err(|s| s.code()), start.elapsed())
    }

    // A burst of ThrottlingException: retried with backoff, same token, issued once.
    proxy.faults(Faults {
        throttle_issue: 3,
        ..Default::default()
    });
    let (r, _) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Ok(()), "throttling burst within the deadline");
    assert_eq!(one_token(&proxy.take_stats()), (4, 1));

    // Issuance in progress for a while: GetCertificate is polled until ready.
    proxy.faults(Faults {
        in_progress: 4,
        ..Default::default()
    });
    let (r, _) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Ok(()), "RequestInProgressException polled through");
    let s = proxy.take_stats();
    assert_eq!(s.get_calls, 5);
    assert_eq!(one_token(&s), (1, 1));

    // The IssueCertificate answer is lost (connection dropped after moto issued): the
    // retry carries the same token, so AWS (here the proxy) answers with the same
    // certificate instead of issuing another.
    proxy.faults(Faults {
        reset_issue_after_forward: 1,
        reset_get: 2,
        ..Default::default()
    });
    let (r, _) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Ok(()), "connection resets retried");
    let s = proxy.take_stats();
    assert_eq!(
        one_token(&s),
        (2, 1),
        "retried with the same token, issued once"
    );
    assert_eq!(s.get_calls, 3);

    // Slow answers that fit the deadline.
    proxy.faults(Faults {
        delay: Duration::from_millis(400),
        ..Default::default()
    });
    let (r, took) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Ok(()), "slow but in time");
    assert!(took >= Duration::from_millis(800), "{took:?}");
    assert_eq!(one_token(&proxy.take_stats()), (1, 1));

    // Throttled beyond the deadline: RESOURCE_EXHAUSTED, nothing issued, within the budget.
    proxy.faults(Faults {
        throttle_issue_always: true,
        ..Default::default()
    });
    let (r, took) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Err(Code::ResourceExhausted));
    assert!(took < Duration::from_secs(4), "{took:?}");
    let (received, forwarded) = one_token(&proxy.take_stats());
    assert!(received >= 3, "retried before giving up: {received}");
    assert_eq!(forwarded, 0);

    // Never ready within the deadline: UNAVAILABLE (istio-agent and ztunnel retry).
    proxy.faults(Faults {
        in_progress_always: true,
        ..Default::default()
    });
    let (r, took) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Err(Code::Unavailable));
    assert!(took < Duration::from_secs(4), "{took:?}");
    assert_eq!(one_token(&proxy.take_stats()), (1, 1));

    // Slower than the deadline: UNAVAILABLE after issueTimeout, not after requestTimeout.
    proxy.faults(Faults {
        delay: Duration::from_secs(5),
        ..Default::default()
    });
    let (r, took) = attempt(&mut client, &id, &token).await;
    assert_eq!(r, Err(Code::Unavailable));
    assert!(took < Duration::from_secs(4), "{took:?}");
    proxy.faults(Faults::default());

    let m = &b.metrics;
    assert!(
        m.backend_throttles
            .with_label_values(&["aws_pca", "remote"])
            .get()
            >= 6
    );
    assert!(
        m.backend_retries
            .with_label_values(&["aws_pca", "in_progress"])
            .get()
            >= 4
    );
    assert!(
        m.backend_retries
            .with_label_values(&["aws_pca", "transient"])
            .get()
            >= 3
    );
    b.shutdown().await.unwrap();
}

/// A restart storm: 500 concurrent calls against a bucket of 5/s (burst 5). moto signs
/// about a dozen certificates a second on this machine, so the rate stays well below that;
/// the bucket must hold it, hand out only slots that leave time to finish within
/// `issueTimeout`, and refuse the rest at once with RESOURCE_EXHAUSTED (never reaching AWS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_holds_the_configured_rate_under_a_burst() {
    const CALLS: usize = 500;
    const RATE: f64 = 5.0;
    const BURST: u32 = 5;
    const ISSUE_TIMEOUT: Duration = Duration::from_secs(8);
    aws_test_env();
    let moto = Moto::start().await;
    let (arn, _) = create_root_ca(&moto.url).await;
    let proxy = Proxy::start(&moto.url).await;
    let b = Bridge::start_with(|c| {
        c.server.request_timeout = Duration::from_secs(15);
        aws_backend(c, &arn, &proxy.url, |a| {
            a.issue_timeout = ISSUE_TIMEOUT;
            a.rate_limit = RATE;
            a.rate_burst = BURST;
        })
    })
    .await;
    let token = b.issuer.token("default", "storm");
    let id = spiffe("default", "storm");
    let csrs: Vec<String> = (0..CALLS)
        .map(|_| csr_for(&id, KeyType::EcdsaP256, CsrShape::Ztunnel).1)
        .collect();
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(b.client().await);
    }
    // Let the bucket refill after the serving certificate.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    proxy.take_stats();
    let start = Instant::now();
    let calls = csrs.into_iter().enumerate().map(|(i, csr)| {
        let mut c = clients[i % clients.len()].clone();
        let req = request(csr, Some(&token), 3600);
        async move { call(&mut c, req).await.map(|_| ()).map_err(|s| s.code()) }
    });
    let results = futures::future::join_all(calls).await;
    let took = start.elapsed();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let exhausted = results
        .iter()
        .filter(|r| **r == Err(Code::ResourceExhausted))
        .count();
    assert_eq!(
        ok + exhausted,
        CALLS,
        "only OK or RESOURCE_EXHAUSTED: {results:?}"
    );
    // Slots are handed out while they leave 2 s of the 8 s budget: burst + 6 s of rate
    // (a little more when the calls reach the backend spread over time on a busy machine).
    let expected = f64::from(BURST) + RATE * 6.0;
    assert!(
        ok as f64 >= expected - 3.0 && ok as f64 <= expected + RATE * 3.0,
        "{ok} issued, expected about {expected}"
    );
    assert!(took < ISSUE_TIMEOUT + Duration::from_secs(3), "{took:?}");
    let s = proxy.take_stats();
    assert_eq!(s.forward_times.len(), ok, "refused calls never reach AWS");
    assert!(
        s.forwarded.values().all(|n| *n == 1),
        "no token issued twice"
    );
    let mut t = s.forward_times.clone();
    t.sort();
    let span = (t[ok - 1] - t[0]).as_secs_f64();
    let ideal = (ok as f64 - f64::from(BURST)) / RATE;
    assert!(
        span >= ideal - 0.3,
        "{ok} calls spread over {span:.2}s, expected >= {ideal:.2}s"
    );
    // No one-second window sees more than the rate plus the burst (+1 for arrival jitter
    // at the window edges).
    let mut worst = 0;
    for (i, a) in t.iter().enumerate() {
        let n = t[i..]
            .iter()
            .take_while(|b| **b - *a < Duration::from_secs(1))
            .count();
        worst = worst.max(n);
    }
    assert!(
        worst <= RATE as usize + BURST as usize + 2,
        "{worst} IssueCertificate calls within one second"
    );
    let local = b
        .metrics
        .backend_throttles
        .with_label_values(&["aws_pca", "local"])
        .get();
    assert_eq!(local as usize, exhausted);
    let waits = b
        .metrics
        .backend_rate_limit_wait
        .with_label_values(&["aws_pca"])
        .get_sample_count();
    assert!(waits as usize >= ok);
    eprintln!(
        "{CALLS} calls in {took:?}: {ok} issued over {span:.2}s (busiest second {worst}), {exhausted} RESOURCE_EXHAUSTED"
    );
    b.shutdown().await.unwrap();
}

/// Rotating an AWS Private CA's root means a new CA: the operator publishes the new CA's
/// root first (`extraRootsFile`: trusted only, no phases), then points `caArn` at the new
/// CA. The bridge, restarted on the same `rotation.stateDir`, sees the CA sign under a
/// root already published and rotates to it through the phases, A staying trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_ca_whose_root_was_published_first_is_rotated_to() {
    aws_test_env();
    let moto = Moto::start().await;
    let (arn_a, root_a) = create_root_ca(&moto.url).await;
    let (arn_b, root_b) = create_root_ca(&moto.url).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("extra-roots.pem");
    std::fs::write(&extra, &root_b).unwrap();
    let state = dir.path().join("state");
    let start = |arn: String| {
        let (extra, state, url) = (extra.clone(), state.clone(), moto.url.clone());
        Bridge::start_with(move |c| {
            aws_backend(c, &arn, &url, |a| a.extra_roots_file = Some(extra));
            c.rotation.state_dir = Some(state);
        })
    };
    let der = |pem: &str| pki::parse_certs_pem(pem.as_bytes()).unwrap().remove(0);
    let roots = |b: &Bridge| pki::parse_certs_pem(b.root_pem().as_bytes()).unwrap();
    let status = async |b: &Bridge| {
        let (code, body) = b.admin_get("/rotation").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };

    // B is only trusted: published at once, no rotation.
    let b = start(arn_a).await;
    assert_eq!(roots(&b), [der(&root_a), der(&root_b)]);
    assert_eq!(status(&b).await["phase"], "idle");
    b.shutdown().await.unwrap();

    // caArn now names B's CA.
    let b = start(arn_b).await;
    let st = status(&b).await;
    assert_eq!(st["phase"], "publishing", "{st}");
    assert!(
        st["reason"].as_str().unwrap().contains("now signs under"),
        "{st}"
    );
    assert_eq!(roots(&b), [der(&root_a), der(&root_b)], "A stays trusted");
    let mut client = b.client().await;
    let token = b.issuer.token("default", "app");
    let (_, csr) = csr_for(
        &spiffe("default", "app"),
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
    );
    let chain = call(&mut client, request(csr, Some(&token), 3600))
        .await
        .unwrap()
        .cert_chain;
    assert_eq!(
        pki::parse_certs_pem(chain.last().unwrap().as_bytes()).unwrap(),
        [der(&root_a), der(&root_b)]
    );
    b.shutdown().await.unwrap();
}
