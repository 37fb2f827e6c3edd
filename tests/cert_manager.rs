//! The cert-manager backend against the in-process FAKE Kubernetes API
//! (`istio_ca_bridge::testing::fake_kube`, which serves `cert-manager.io/v1`
//! CertificateRequests: no API server runs offline), driven by the production kube-rs
//! client through a kubeconfig. A test-side loop plays the issuer
//! (`istio_ca_bridge::testing::cm_issuer`): it signs with its own test CA, or denies, fails,
//! never answers, or answers with a wrong name or key. The bridge is the real one, reached
//! with real gRPC calls; openssl verifies what it hands out.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use istio_ca_bridge::backend::cert_manager::{CertManagerConfig, IssuerRefConfig};
use istio_ca_bridge::backend::intermediate::BackendMode;
use istio_ca_bridge::config::{BackendConfig, Config, KeyType};
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::cm_issuer::{Behaviour, CmIssuer};
use istio_ca_bridge::testing::fake_kube::FakeKube;
use istio_ca_bridge::testing::*;
use tonic::Code;

struct Setup {
    fake: Arc<FakeKube>,
    issuer: CmIssuer,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let fake = Arc::new(FakeKube::start_new().await);
        fake.put_namespace("istio-system");
        let issuer = CmIssuer::start(fake.clone());
        let dir = tempfile::tempdir().unwrap();
        fake.write_kubeconfig(&dir.path().join("kubeconfig"), "cm");
        std::fs::write(dir.path().join("roots.pem"), &issuer.root_pem).unwrap();
        Setup { fake, issuer, dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn backend(&self) -> CertManagerConfig {
        CertManagerConfig {
            kubeconfig: Some(self.path("kubeconfig")),
            namespace: "istio-system".into(),
            issuer_ref: IssuerRefConfig {
                name: "istio-ca".into(),
                ..Default::default()
            },
            root_bundle_file: Some(self.path("roots.pem")),
            request_timeout: Duration::from_secs(3),
            qps: 500.0,
            burst: 100,
            ..Default::default()
        }
    }

    async fn bridge(&self, edit: impl FnOnce(&mut CertManagerConfig, &mut Config)) -> Bridge {
        let mut be = self.backend();
        Bridge::start_with(|c| {
            edit(&mut be, c);
            c.backend = BackendConfig::CertManager(be);
        })
        .await
    }

    /// Waits until no CertificateRequest is left.
    async fn all_deleted(&self) {
        eventually(
            "every CertificateRequest is deleted",
            Duration::from_secs(30),
            || async { self.fake.certificate_requests().is_empty() },
        )
        .await;
    }
}

async fn issue(b: &Bridge, sa: &str) -> Result<Vec<String>, tonic::Status> {
    let mut client = b.client().await;
    let token = b.issuer.token("default", sa);
    let (_, csr) = csr_for(
        &spiffe("default", sa),
        KeyType::EcdsaP256,
        CsrShape::IstioAgent,
    );
    call(&mut client, request(csr, Some(&token), 3600))
        .await
        .map(|r| r.cert_chain)
}

fn openssl_verifies(dir: &std::path::Path, chain: &[String]) {
    let write = |n: &str, s: &str| {
        let p = dir.join(n);
        std::fs::write(&p, s).unwrap();
        p.display().to_string()
    };
    let root = write("v-root.pem", chain.last().unwrap());
    let leaf = write("v-leaf.pem", &chain[0]);
    let untrusted = write("v-untrusted.pem", &chain[1..chain.len() - 1].concat());
    for purpose in ["sslclient", "sslserver"] {
        let (ok, out) = openssl(&[
            "verify",
            "-purpose",
            purpose,
            "-CAfile",
            &root,
            "-untrusted",
            &untrusted,
            &leaf,
        ]);
        assert!(ok, "openssl verify {purpose}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_request_per_certificate_with_the_configured_spec_and_deleted_after() {
    let s = Setup::new().await;
    let b = s
        .bridge(|be, _| {
            be.labels.insert("team".into(), "mesh".into());
            be.annotations
                .insert("example.com/owner".into(), "platform".into());
            be.issuer_ref = IssuerRefConfig {
                name: "mesh-ca".into(),
                kind: "ClusterIssuer".into(),
                group: "cert-manager.io".into(),
            };
        })
        .await;
    assert_eq!(b.signer.kind(), "cert_manager");
    let before = s.issuer.handled();
    let chain = issue(&b, "app").await.unwrap();
    // Leaf, the issuer's intermediate, the root bundle.
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert_eq!(chain[2], s.issuer.root_pem);
    let leaf = pki::parse_certs_pem(chain[0].as_bytes()).unwrap().remove(0);
    assert_eq!(
        pki::cert_info(&leaf).unwrap().uri_sans,
        [spiffe("default", "app")]
    );
    openssl_verifies(b.dir.path(), &chain);
    assert_eq!(
        s.issuer.handled(),
        before + 1,
        "one request for one certificate"
    );
    s.all_deleted().await;
    for op in ["create", "watch", "delete"] {
        assert!(
            s.fake.count(&format!("certificaterequests.{op}")) >= 1,
            "{op}"
        );
    }
    b.shutdown().await.unwrap();

    // preserveRequests keeps them: what the request says.
    let b = s
        .bridge(|be, _| {
            be.preserve_requests = true;
            be.labels.insert("team".into(), "mesh".into());
            be.annotations
                .insert("example.com/owner".into(), "platform".into());
        })
        .await;
    let n = s.fake.certificate_requests().len();
    issue(&b, "kept").await.unwrap();
    let crs = s.fake.certificate_requests();
    assert_eq!(crs.len(), n + 1);
    let cr = crs
        .iter()
        .find(|c| {
            let raw = base64::Engine::decode(
                &base64::engine::general_purpose::STANDARD,
                c["spec"]["request"].as_str().unwrap(),
            )
            .unwrap();
            String::from_utf8(raw)
                .unwrap()
                .contains("CERTIFICATE REQUEST")
                && c["status"]["certificate"].as_str().is_some_and(|cert| {
                    let pem =
                        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, cert)
                            .unwrap();
                    let der = pki::parse_certs_pem(&pem).unwrap().remove(0);
                    pki::cert_info(&der).unwrap().uri_sans == [spiffe("default", "kept")]
                })
        })
        .expect("the workload's request");
    let spec = &cr["spec"];
    assert_eq!(spec["duration"], "3600s");
    assert_eq!(spec["isCA"], false);
    assert_eq!(
        spec["usages"],
        serde_json::json!([
            "digital signature",
            "key encipherment",
            "server auth",
            "client auth"
        ])
    );
    assert_eq!(
        spec["issuerRef"],
        serde_json::json!({"name": "istio-ca", "kind": "Issuer", "group": "cert-manager.io"})
    );
    assert_eq!(cr["metadata"]["namespace"], "istio-system");
    assert_eq!(cr["metadata"]["labels"]["team"], "mesh");
    assert_eq!(
        cr["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "istio-ca-bridge"
    );
    assert_eq!(
        cr["metadata"]["annotations"]["example.com/owner"],
        "platform"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_maps_to_its_code_nothing_is_issued_and_every_request_is_deleted() {
    let s = Setup::new().await;
    let b = s.bridge(|_, _| {}).await;
    issue(&b, "warm").await.unwrap();
    s.all_deleted().await;
    let cases = [
        (
            Behaviour::Deny("policy says no".into()),
            Code::InvalidArgument,
        ),
        (
            Behaviour::Fail {
                message: "issuer not ready".into(),
                invalid: false,
            },
            Code::Unavailable,
        ),
        (
            Behaviour::Fail {
                message: "bad request".into(),
                invalid: true,
            },
            Code::InvalidArgument,
        ),
        (Behaviour::Ignore, Code::Unavailable),
        (Behaviour::WrongName, Code::Internal),
        (Behaviour::WrongKey, Code::Internal),
    ];
    for (behaviour, code) in cases {
        s.issuer.set(behaviour.clone());
        let issued = b.issued();
        let err = issue(&b, "app").await.expect_err("refused");
        assert_eq!(err.code(), code, "{behaviour:?}: {err:?}");
        assert_eq!(b.issued(), issued, "{behaviour:?}: nothing issued");
        s.all_deleted().await;
    }
    s.issuer.set(Behaviour::Sign);
    // The API server throttles, or refuses the bridge's RBAC.
    for (http, code) in [
        (429, Code::ResourceExhausted),
        (403, Code::Unavailable),
        (500, Code::Unavailable),
    ] {
        s.fake.set_certificate_request_failure(Some(http));
        let err = issue(&b, "app").await.expect_err("refused");
        assert_eq!(err.code(), code, "HTTP {http}: {err:?}");
        if http == 403 {
            assert_eq!(
                b.admin_get("/readyz").await.0,
                503,
                "not ready while refused"
            );
            // RBAC fixed: ready again without traffic (a probe notices).
            s.fake.set_certificate_request_failure(None);
            eventually(
                "ready again once the API accepts the bridge",
                Duration::from_secs(10),
                || async { b.admin_get("/readyz").await.0 == 200 },
            )
            .await;
        }
        s.fake.set_certificate_request_failure(None);
    }
    // Serving again, ready again after a success.
    issue(&b, "app").await.unwrap();
    assert_eq!(b.admin_get("/readyz").await.0, 200);
    s.all_deleted().await;
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_mode_asks_for_one_ca_certificate_and_signs_locally() {
    let s = Setup::new().await;
    let b = s
        .bridge(|be, _| {
            be.mode = BackendMode::Intermediate;
            be.preserve_requests = true;
        })
        .await;
    let cas: Vec<_> = s
        .fake
        .certificate_requests()
        .into_iter()
        .filter(|c| c["spec"]["isCA"] == true)
        .collect();
    assert_eq!(cas.len(), 1, "one intermediate for this replica");
    assert_eq!(
        cas[0]["spec"]["usages"],
        serde_json::json!(["cert sign", "crl sign", "digital signature"])
    );
    let handled = s.issuer.handled();
    for i in 0..5 {
        let chain = issue(&b, &format!("app{i}")).await.unwrap();
        // Leaf, the bridge's intermediate, the issuer's intermediate, the roots.
        assert_eq!(chain.len(), 4, "{chain:?}");
        openssl_verifies(b.dir.path(), &chain);
    }
    assert_eq!(s.issuer.handled(), handled, "workloads are signed locally");
    b.shutdown().await.unwrap();
}

/// 1,000 identities at once (a restart storm), in direct mode: the bridge stays within its
/// configured client-side rate for the API, every workload gets its certificate in the end
/// (a refused caller retries, as istio-agent does), and no CertificateRequest is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_storm_of_1000_identities_stays_within_the_api_qps_and_leaves_nothing_behind() {
    const N: usize = 1000;
    const QPS: f64 = 200.0;
    const BURST: u32 = 50;
    let s = Setup::new().await;
    let b = Arc::new(
        s.bridge(|be, c| {
            be.qps = QPS;
            be.burst = BURST;
            be.request_timeout = Duration::from_secs(4);
            c.server.request_timeout = Duration::from_secs(6);
        })
        .await,
    );
    // The CSRs and tokens first, and one HTTP/2 connection: the storm is the bridge's
    // load, not the test's key generation or TLS handshakes.
    let prepared: Vec<(String, String, String)> = (0..N)
        .map(|i| {
            let sa = format!("storm{i}");
            let (_, csr) = csr_for(
                &spiffe("default", &sa),
                KeyType::EcdsaP256,
                CsrShape::Ztunnel,
            );
            let token = b.issuer.token("default", &sa);
            (sa, csr, token)
        })
        .collect();
    let client = b.client().await;
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for (i, (sa, csr, token)) in prepared.into_iter().enumerate() {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut refused = 0u32;
            loop {
                match call(&mut client, request(csr.clone(), Some(&token), 3600)).await {
                    Ok(_) => return refused,
                    Err(e) if matches!(e.code(), Code::ResourceExhausted | Code::Unavailable) => {
                        refused += 1;
                        assert!(refused < 100, "{sa} never served: {e:?}");
                        tokio::time::sleep(Duration::from_millis(200 + (i as u64 % 7) * 50)).await;
                    }
                    Err(e) => panic!("{sa}: {e:?}"),
                }
            }
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let took = start.elapsed();
    s.all_deleted().await;
    // The bucket's promise as the API server sees it: over the storm, at most burst +
    // qps x its length; in any one-second window at most burst + qps, give or take a
    // quarter second of scheduling delay (1,000 clients and the bridge share 2 cores, so
    // calls leave up to that late and bunch up).
    let calls: Vec<std::time::Instant> = s
        .fake
        .certificate_request_calls()
        .into_iter()
        .map(|(t, _)| t)
        .filter(|t| *t >= start)
        .collect();
    let span = calls.last().unwrap().duration_since(calls[0]).as_secs_f64();
    let long_run = BURST as f64 + QPS * span + 1.0;
    assert!(
        calls.len() as f64 <= long_run,
        "{} calls in {span:.1}s, limit {long_run:.0}",
        calls.len()
    );
    let limit = BURST as usize + (QPS * 1.25) as usize;
    let mut worst = 0;
    for (i, t) in calls.iter().enumerate() {
        let n = calls[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        worst = worst.max(n);
    }
    assert!(worst <= limit, "{worst} calls in one second, limit {limit}");
    // create + watch + delete per certificate: three calls each, so the rate bounds time.
    assert!(calls.len() >= 3 * N, "{} calls", calls.len());
    eprintln!(
        "storm: {N} certificates in {took:?}, {} API calls, busiest second {worst} (limit {limit}), {retries} retries",
        calls.len()
    );
    Arc::try_unwrap(b).ok().unwrap().shutdown().await.unwrap();
}

/// The roots from a ConfigMap or a Secret, read through the API and followed when they
/// change; or, with `trustFirstAnswer`, from the first answer's `status.ca`, said loudly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roots_from_a_configmap_or_secret_are_followed_and_trust_on_first_use_is_loud() {
    use istio_ca_bridge::backend::cert_manager::ObjectKeyConfig;
    logs();
    let s = Setup::new().await;
    s.fake.put_namespace("pki");
    s.fake.put_configmap(
        "istio-system",
        "mesh-roots",
        serde_json::json!({"ca.crt": s.issuer.root_pem}),
    );
    let b = s
        .bridge(|be, _| {
            be.root_bundle_file = None;
            be.root_bundle_config_map = Some(ObjectKeyConfig {
                name: "mesh-roots".into(),
                ..Default::default()
            });
            be.root_refresh_interval = Duration::from_secs(1);
        })
        .await;
    assert_eq!(b.root_pem(), s.issuer.root_pem);
    issue(&b, "app").await.unwrap();
    // A second root joins the ConfigMap: published within the refresh interval.
    let other = istio_ca_bridge::testing::aws::other_root("Next Mesh Root");
    s.fake.put_configmap(
        "istio-system",
        "mesh-roots",
        serde_json::json!({"ca.crt": format!("{}{other}", s.issuer.root_pem)}),
    );
    eventually(
        "the new root is published",
        Duration::from_secs(5),
        || async { pki::parse_certs_pem(b.root_pem().as_bytes()).unwrap().len() == 2 },
    )
    .await;
    issue(&b, "app").await.unwrap();
    b.shutdown().await.unwrap();

    s.fake
        .put_secret("pki", "mesh-roots", &[("roots.pem", &s.issuer.root_pem)]);
    let b = s
        .bridge(|be, _| {
            be.root_bundle_file = None;
            be.root_bundle_secret = Some(ObjectKeyConfig {
                namespace: Some("pki".into()),
                name: "mesh-roots".into(),
                key: "roots.pem".into(),
            });
        })
        .await;
    assert_eq!(b.root_pem(), s.issuer.root_pem);
    issue(&b, "app").await.unwrap();
    b.shutdown().await.unwrap();

    let b = s
        .bridge(|be, _| {
            be.root_bundle_file = None;
            be.trust_first_answer = true;
        })
        .await;
    assert_eq!(
        b.root_pem(),
        s.issuer.root_pem,
        "status.ca of the first answer"
    );
    assert!(
        logs().contains("TRUST ON FIRST USE"),
        "trust on first use is logged loudly"
    );
    issue(&b, "app").await.unwrap();
    s.all_deleted().await;
    b.shutdown().await.unwrap();
}
