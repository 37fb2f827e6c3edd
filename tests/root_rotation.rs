//! Root rotation, black-box: a fleet of simulated workloads renewing at half-life goes from
//! root A to root B through every phase with no failed handshake; the shared state lives in
//! one Kubernetes Secret of the fake API server (two replicas, one writer per transition,
//! the ConfigMaps and the ClusterTrustBundle following each phase), or in the state directory (a restarted bridge
//! resumes its phase); the `rotate` CLI drives it and refuses to skip a wait unless forced.
//!
//! The Kubernetes API is `istio_ca_bridge::testing::fake_kube` (no kube-apiserver runs
//! offline), reached through the production kube-rs client; the handshakes are real rustls
//! mutual TLS, each side verifying the other with the roots it holds.

use std::path::Path;
use std::time::{Duration, Instant};

use istio_ca_bridge::config::{BackendConfig, Config};
use istio_ca_bridge::pki;
use istio_ca_bridge::rotation::Phase;
use istio_ca_bridge::testing::fake_kube::*;
use istio_ca_bridge::testing::fleet::{self, Workload};
use istio_ca_bridge::testing::*;

const MAX_TTL: Duration = Duration::from_secs(20);
const SKEW: Duration = Duration::from_secs(2);

/// Runs `istio-ca-bridge rotate <args>` against `admin`: (success, stdout, stderr).
fn rotate(admin: std::net::SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_istio-ca-bridge"))
        .arg("rotate")
        .args(args)
        .arg("--admin")
        .arg(format!("http://{admin}"))
        .output()
        .expect("run the binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn status(b: &Bridge) -> serde_json::Value {
    let (code, body) = b.admin_get("/rotation").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn phase_of(s: &serde_json::Value) -> Phase {
    serde_json::from_value(s["phase"].clone()).unwrap()
}

/// Common names of the roots in a PEM bundle.
fn root_names(pem: &str) -> Vec<String> {
    pki::parse_certs_pem(pem.as_bytes())
        .unwrap()
        .iter()
        .map(|c| {
            let (_, x) = x509_parser::parse_x509_certificate(c).unwrap();
            x.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn rotation_records(records: &[serde_json::Value]) -> Vec<serde_json::Value> {
    records
        .iter()
        .filter(|r| r["event"] == "root_rotation")
        .cloned()
        .collect()
}

fn short_lifetimes(c: &mut Config) {
    c.policy.max_ttl = MAX_TTL;
    c.policy.default_ttl = MAX_TTL;
    c.rotation.skew = SKEW;
    c.rotation.poll_interval = Duration::from_millis(200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_rotates_from_a_to_b_across_two_replicas_with_no_failed_handshake() {
    let fake = FakeKube::start_new().await;
    for ns in ["default", "istio-system", "fleet"] {
        fake.put_namespace(ns);
    }
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let edit = |c: &mut Config| {
        kube_config(c, vec![kc.clone()]);
        c.kubernetes.root_config_map.enabled = true;
        c.kubernetes.cluster_trust_bundle.enabled = true;
        let le = &mut c.kubernetes.leader_election;
        le.lease_duration = Duration::from_secs(2);
        le.retry_period = Duration::from_millis(200);
        short_lifetimes(c);
    };
    let (a, b) = tokio::join!(Bridge::start_with(edit), Bridge::start_with(edit));
    assert_eq!(a.root_pem(), b.root_pem(), "one root for both replicas");
    let root_a = root_names(&a.root_pem());
    assert_eq!(root_a.len(), 1);
    let replicas = [&a, &b];
    let ports = [a.grpc.port(), b.grpc.port()];

    const N: usize = 50;
    let mut tokens = Vec::new();
    let mut workloads: Vec<Workload> = Vec::new();
    let token_for = |i: usize| {
        let t = sa_jwt("fleet", &format!("w{i}"), &format!("w{i}"));
        fake.sa_token(&t, "fleet", &format!("w{i}"), None);
        t
    };
    for i in 0..N {
        tokens.push(token_for(i));
        let uri = format!("spiffe://{TD}/ns/fleet/sa/w{i}");
        workloads.push(
            Workload::enroll(ports[i % 2], &uri, &a.root_pem(), &tokens[i], MAX_TTL)
                .await
                .unwrap(),
        );
    }
    let mut failures: Vec<String> = fleet::all_pairs(&workloads).await;
    assert!(failures.is_empty(), "{failures:?}");

    let (ok, out, err) = rotate(a.admin, &["start", "--reason", "test rotation"]);
    assert!(ok, "{out}{err}");
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(phase_of(&started), Phase::Publishing);
    assert_eq!(started["reason"], "test rotation");

    let cm_roots = || {
        fake.configmap("fleet", "istio-ca-root-cert")
            .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(root_names))
            .unwrap_or_default()
    };
    let ctb_roots = || {
        fake.cluster_trust_bundle("istio.io:istiod-ca:root-cert")
            .filter(|c| c["spec"]["signerName"] == "istio.io/istiod-ca")
            .and_then(|c| c["spec"]["trustBundle"].as_str().map(root_names))
            .unwrap_or_default()
    };
    eventually(
        "the ConfigMaps and the ClusterTrustBundle follow publishing (A + B)",
        Duration::from_secs(5),
        || async {
            let names = root_names(&a.root_pem());
            names.len() == 2 && names[0] == root_a[0] && cm_roots() == names && ctb_roots() == names
        },
    )
    .await;
    let mut seen = vec![Phase::Publishing];
    let mut root_b: Option<String> = None;
    let mut last_ring = Instant::now();
    let deadline = Instant::now() + MAX_TTL * 8;
    let mut done_at: Option<i64> = None;
    loop {
        assert!(
            Instant::now() < deadline,
            "rotation did not finish: {seen:?}"
        );
        let now = pki::unix_secs(std::time::SystemTime::now());
        // Renew whoever is due, on alternating replicas.
        for (i, w) in workloads.iter_mut().enumerate() {
            if w.due(now) {
                let port = ports[(i + w.renewals as usize) % 2];
                if let Err(e) = w.renew(port, &tokens[i], MAX_TTL).await {
                    failures.push(e);
                }
            }
        }
        if last_ring.elapsed() > Duration::from_secs(1) {
            failures.extend(fleet::ring(&workloads).await);
            last_ring = Instant::now();
        }
        let st = status(&a).await;
        let phase = phase_of(&st);
        if phase != *seen.last().unwrap() {
            seen.push(phase);
            // Both replicas apply the phase within a poll interval; they hand out the same
            // bundle, and the ConfigMaps hold it.
            let want = a.root_pem();
            eventually("both replicas agree", Duration::from_secs(2), || async {
                b.root_pem() == a.root_pem()
            })
            .await;
            let names = root_names(&want);
            eventually(
                "the ConfigMaps and the ClusterTrustBundle follow",
                Duration::from_secs(5),
                || async { cm_roots() == names && ctb_roots() == names },
            )
            .await;
            match phase {
                Phase::SigningNew => {
                    assert_eq!(names.len(), 2, "{names:?}");
                    root_b = names.iter().find(|n| !root_a.contains(n)).cloned();
                }
                Phase::Retiring | Phase::Done => {
                    assert_eq!(names, vec![root_b.clone().unwrap()], "{phase}");
                }
                _ => {}
            }
            // A pod that starts now learns the roots of the phase and talks to everyone.
            let i = workloads.len();
            tokens.push(token_for(i));
            let uri = format!("spiffe://{TD}/ns/fleet/sa/w{i}");
            match Workload::enroll(ports[i % 2], &uri, &want, &tokens[i], MAX_TTL).await {
                Ok(w) => workloads.push(w),
                Err(e) => failures.push(format!("new pod in {phase}: {e}")),
            }
            failures.extend(fleet::all_pairs(&workloads).await);
            if phase == Phase::Done {
                done_at = Some(pki::unix_secs(std::time::SystemTime::now()));
            }
        }
        // After done, run until every workload has renewed under B alone.
        if let Some(t) = done_at
            && workloads
                .iter()
                .all(|w| !w.due(t) && w.roots.roots().len() == 1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    assert_eq!(
        seen,
        [
            Phase::Publishing,
            Phase::SigningNew,
            Phase::Retiring,
            Phase::Done
        ]
    );
    let b_name = root_b.unwrap();
    for w in &workloads {
        assert_eq!(w.issuer_cn(), b_name, "{}", w.uri);
        assert!(w.renewals >= 1 || w.uri.ends_with(&format!("w{}", workloads.len() - 1)));
    }

    // One writer per transition: four transitions in the state, four audit records across
    // both replicas, each naming its writer.
    let st = status(&b).await;
    let history = st["history"].as_array().unwrap();
    assert_eq!(history.len(), 4, "{history:?}");
    let mut records = rotation_records(&a.audit_records().await);
    records.extend(rotation_records(&b.audit_records().await));
    assert_eq!(records.len(), 4, "{records:#?}");
    for h in history {
        let matching: Vec<_> = records
            .iter()
            .filter(|r| r["to"] == h["to"] && r["by"] == h["by"])
            .collect();
        assert_eq!(matching.len(), 1, "{h}: {records:#?}");
    }
    assert_eq!(records.iter().filter(|r| r["action"] == "auto").count(), 3);
    let secret = fake.secret("istio-system", "istio-ca-bridge-ca").unwrap();
    assert!(
        secret["data"]["next-ca-cert.pem"].is_null(),
        "the old root is gone"
    );
    // The phase gauge on both replicas.
    for r in replicas {
        assert_eq!(metric(r, "istio_ca_bridge_root_rotation_phase", ""), 4.0);
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

fn state_dir(dir: &Path) -> impl Fn(&mut Config) + '_ {
    move |c: &mut Config| {
        let BackendConfig::Local(l) = &mut c.backend else {
            unreachable!()
        };
        l.state_dir = dir.to_path_buf();
        c.policy.max_ttl = Duration::from_secs(3600);
        c.policy.default_ttl = Duration::from_secs(3600);
        c.rotation.poll_interval = Duration::from_millis(200);
    }
}

/// The leaf's issuer common name for a fresh workload certificate from `b`.
async fn issuer_of_new_leaf(b: &Bridge) -> (String, usize) {
    let mut client = b.client().await;
    let token = b.issuer.token("default", "probe");
    let chain = ask(
        &mut client,
        &format!("spiffe://{TD}/ns/default/sa/probe"),
        &token,
        None,
        None,
    )
    .await
    .unwrap();
    let leaf = &pki::parse_certs_pem(chain[0].as_bytes()).unwrap()[0];
    let (_, x) = x509_parser::parse_x509_certificate(leaf).unwrap();
    let cn = x
        .issuer()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    (cn, root_names(chain.last().unwrap()).len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_resumes_its_phase_and_no_wait_is_skipped_unless_forced() {
    let state = tempfile::tempdir().unwrap();
    let sd = state.path().join("ca");
    let b = Bridge::start_with(state_dir(&sd)).await;
    let root_a = root_names(&b.root_pem())[0].clone();
    let st = status(&b).await;
    assert_eq!(phase_of(&st), Phase::Idle);
    assert!(st["store"].as_str().unwrap().contains("state directory"));

    // Nothing to advance or abort yet.
    let (ok, _, err) = rotate(b.admin, &["advance"]);
    assert!(!ok && err.contains("no rotation is in progress"), "{err}");

    let (ok, out, err) = rotate(b.admin, &["start"]);
    assert!(ok, "{out}{err}");
    let (ok, _, err) = rotate(b.admin, &["start"]);
    assert!(!ok && err.contains("already in progress"), "{err}");
    // Publishing waits maxTtl + skew (1h + 5m): advancing now is refused, with the reason.
    let (ok, _, err) = rotate(b.admin, &["advance"]);
    assert!(!ok, "advanced without waiting");
    assert!(
        err.contains("--force") && err.contains("every workload renews"),
        "{err}"
    );
    let (cn, roots) = issuer_of_new_leaf(&b).await;
    assert_eq!(
        (cn.as_str(), roots),
        (root_a.as_str(), 2),
        "A signs, A+B trusted"
    );
    // A VM's certificate under A, to renew with later (client-certificate authentication).
    let vm = format!("spiffe://{TD}/ns/vms/sa/db");
    let (vm_key, csr) = csr_for(&vm, pki::KeyType::EcdsaP256, pki::CsrShape::IstioAgent);
    let mut client = b.client().await;
    let answer = call(
        &mut client,
        request(csr, Some(&b.issuer.token("vms", "db")), 3600),
    )
    .await
    .unwrap()
    .cert_chain;
    let vm_chain = answer[..answer.len() - 1].concat();

    let (ok, out, err) = rotate(b.admin, &["advance", "--force"]);
    assert!(ok, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(phase_of(&st), Phase::SigningNew);
    let root_b = st["roots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "next")
        .unwrap()["commonName"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(root_a, root_b);
    let (cn, roots) = issuer_of_new_leaf(&b).await;
    assert_eq!(
        (cn.as_str(), roots),
        (root_b.as_str(), 2),
        "B signs, A+B trusted"
    );
    assert_eq!(metric(&b, "istio_ca_bridge_root_rotation_phase", ""), 2.0);
    let records = rotation_records(&b.audit_records().await);
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(records[1]["forced"], true);
    b.shutdown().await.unwrap();

    // Restarted on the same state: still signingNew, B signs, A+B trusted.
    let b = Bridge::start_with(state_dir(&sd)).await;
    let st = status(&b).await;
    assert_eq!(phase_of(&st), Phase::SigningNew);
    assert_eq!(
        root_names(&b.root_pem()),
        vec![root_a.clone(), root_b.clone()]
    );
    let (cn, _) = issuer_of_new_leaf(&b).await;
    assert_eq!(cn, root_b);
    // The VM's certificate under A still renews (A is trusted, and its key is the bridge's),
    // and the renewal is signed by B.
    let ch = istio_ca_bridge::cli::request::connect(
        &format!("localhost:{}", b.grpc.port()),
        b.root_pem().as_bytes(),
        Some("localhost"),
        Some((vm_chain.into_bytes(), vm_key.serialize_pem().into_bytes())),
    )
    .await
    .unwrap();
    let mut vm_client =
        istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient::new(
            ch,
        );
    let (_, csr) = csr_for(&vm, pki::KeyType::EcdsaP256, pki::CsrShape::IstioAgent);
    let renewed = call(&mut vm_client, request(csr, None, 3600))
        .await
        .expect("an A-signed client certificate renews in signingNew")
        .cert_chain;
    let leaf = &pki::parse_certs_pem(renewed[0].as_bytes()).unwrap()[0];
    let (_, x) = x509_parser::parse_x509_certificate(leaf).unwrap();
    assert_eq!(
        x.issuer()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        root_b
    );
    // The serving certificate was re-issued under B as well.
    eventually(
        "serving certificate under B",
        Duration::from_secs(5),
        || async {
            let b_only = b.root_pem();
            let pem = pki::parse_certs_pem(b_only.as_bytes()).unwrap();
            let b_pem = pki::cert_pem(&pem[1]);
            serving_serial(b.grpc, &b_pem, "localhost").await.is_ok()
        },
    )
    .await;

    // Abort steps back to A signing; B's certificates keep B trusted, so going back to idle
    // waits for them unless forced.
    let (ok, out, err) = rotate(b.admin, &["abort"]);
    assert!(ok, "{out}{err}");
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(phase_of(&st), Phase::Publishing);
    assert_eq!(st["paused"], true);
    let (cn, roots) = issuer_of_new_leaf(&b).await;
    assert_eq!((cn.as_str(), roots), (root_a.as_str(), 2));
    let (ok, _, err) = rotate(b.admin, &["abort"]);
    assert!(!ok && err.contains("alive until"), "{err}");
    let (ok, out, err) = rotate(b.admin, &["abort", "--force"]);
    assert!(ok, "{out}{err}");
    assert_eq!(root_names(&b.root_pem()), vec![root_a.clone()]);
    assert_eq!(phase_of(&status(&b).await), Phase::Idle);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_ca_does_not_rotate_here_and_says_so() {
    let files = tempfile::tempdir().unwrap();
    let d = files.path().to_path_buf();
    // A root made by the bridge itself, then configured as files.
    let gen_dir = d.join("gen");
    let seed = Bridge::start_with(state_dir(&gen_dir)).await;
    seed.shutdown().await.unwrap();
    let b = Bridge::start_with(|c| {
        let BackendConfig::Local(l) = &mut c.backend else {
            unreachable!()
        };
        l.ca_cert_file = Some(gen_dir.join("root-cert.pem"));
        l.ca_key_file = Some(gen_dir.join("root-key.pem"));
    })
    .await;
    let (code, body) = b.admin_get("/rotation").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("does not rotate its root here"), "{body}");
    let (ok, _, err) = rotate(b.admin, &["start"]);
    assert!(!ok && err.contains("404"), "{err}");
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_kept_in_the_state_directory_is_carried_into_the_shared_secret_and_a_deleted_secret_restored()
 {
    let state = tempfile::tempdir().unwrap();
    let sd = state.path().join("ca");
    // A single replica from before: its root in the state directory.
    let old = Bridge::start_with(state_dir(&sd)).await;
    let root = old.root_pem();
    old.shutdown().await.unwrap();

    let fake = FakeKube::start_new().await;
    fake.put_namespace("istio-system");
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let b = Bridge::start_with(|c| {
        state_dir(&sd)(c);
        kube_config(c, vec![kc.clone()]);
    })
    .await;
    assert_eq!(b.root_pem(), root, "the same root, not a new one");
    let secret = fake.secret("istio-system", "istio-ca-bridge-ca").unwrap();
    let cert = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        secret["data"]["ca-cert.pem"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(String::from_utf8(cert).unwrap(), root);
    assert!(
        status(&b).await["store"]
            .as_str()
            .unwrap()
            .contains("Secret")
    );

    // Deleted by mistake: written back from memory within a poll interval, same root, so a
    // restart finds it instead of making a new root.
    fake.delete_secret("istio-system", "istio-ca-bridge-ca");
    eventually("the Secret is restored", Duration::from_secs(5), || async {
        fake.secret("istio-system", "istio-ca-bridge-ca").is_some()
    })
    .await;
    b.shutdown().await.unwrap();
    std::fs::remove_dir_all(&sd).unwrap();
    let b = Bridge::start_with(|c| {
        state_dir(&sd)(c);
        kube_config(c, vec![kc.clone()]);
    })
    .await;
    assert_eq!(b.root_pem(), root, "the restored Secret's root");
    b.shutdown().await.unwrap();
}
