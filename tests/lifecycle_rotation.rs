//! Lifecycle tests, serving certificate: it rotates, both when issued by the backend and
//! when read from files (a Kubernetes Secret volume, swapped atomically), under continuous
//! load over long-lived and fresh connections without a single failed call, and a broken
//! file update is ignored.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use istio_ca_bridge::config::{KeyType, ServingCertMode};
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::*;
use tokio::task::JoinHandle;

/// What one load task did.
#[derive(Default)]
struct Outcome {
    ok: usize,
    failures: Vec<String>,
}

/// Continuous CreateCertificate traffic plus a handshake probe that records which serving
/// certificate each new TLS handshake got.
struct Load {
    stop: Arc<AtomicBool>,
    reuse: Vec<JoinHandle<Outcome>>,
    fresh: Vec<JoinHandle<Outcome>>,
    probe: JoinHandle<Outcome>,
    /// Serial of the serving certificate seen by each probe handshake, in order.
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Load {
    /// `reuse` tasks call over one long-lived connection each; `fresh` tasks open a new
    /// connection (new TLS handshake) for every call.
    fn start(b: &Bridge, reuse: usize, fresh: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let port = b.grpc.port();
        let root = b.root_pem();
        let spawn = |i: usize, new_conn: bool| {
            let stop = stop.clone();
            let root = root.clone();
            let sa = format!("load-{i}");
            let token = b.issuer.token("default", &sa);
            let (_, csr) = csr_for(
                &spiffe("default", &sa),
                KeyType::EcdsaP256,
                CsrShape::IstioAgent,
            );
            tokio::spawn(async move {
                let mut out = Outcome::default();
                let mut client = None;
                while !stop.load(Ordering::SeqCst) {
                    if new_conn || client.is_none() {
                        match connect(port, &root).await {
                            Ok(c) => client = Some(c),
                            Err(e) => {
                                out.failures.push(format!("connect: {e:#}"));
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        }
                    }
                    let c = client.as_mut().expect("connected");
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        call(c, request(csr.clone(), Some(&token), 3600)),
                    )
                    .await;
                    match r {
                        Ok(Ok(resp)) if resp.cert_chain.len() == 2 => out.ok += 1,
                        Ok(Ok(resp)) => out
                            .failures
                            .push(format!("bad chain {:?}", resp.cert_chain)),
                        Ok(Err(s)) => out.failures.push(format!("call: {s:?}")),
                        Err(_) => out.failures.push("call timed out".into()),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                out
            })
        };
        let reuse_tasks = (0..reuse).map(|i| spawn(i, false)).collect();
        let fresh_tasks = (reuse..reuse + fresh).map(|i| spawn(i, true)).collect();

        let seen = Arc::new(Mutex::new(Vec::new()));
        let probe = {
            let stop = stop.clone();
            let seen = seen.clone();
            let addr = b.grpc;
            tokio::spawn(async move {
                let mut out = Outcome::default();
                while !stop.load(Ordering::SeqCst) {
                    match serving_serial(addr, &root, "localhost").await {
                        Ok(serial) => {
                            out.ok += 1;
                            seen.lock().unwrap().push((Instant::now(), serial));
                        }
                        Err(e) => out.failures.push(format!("probe handshake: {e}")),
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                out
            })
        };
        Load {
            stop,
            reuse: reuse_tasks,
            fresh: fresh_tasks,
            probe,
            seen,
        }
    }

    fn distinct_serials(&self) -> BTreeSet<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn last_serial(&self) -> Option<String> {
        self.seen.lock().unwrap().last().map(|(_, s)| s.clone())
    }

    /// Serials seen by handshakes that started after `t`.
    fn serials_since(&self, t: Instant) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at > t)
            .map(|(_, s)| s.clone())
            .collect()
    }

    /// Waits (bounded) until a probe handshake gets the certificate with `serial`.
    async fn wait_for_serial(&self, serial: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while self.last_serial().as_deref() != Some(serial) {
            assert!(
                Instant::now() < deadline,
                "new handshakes did not get serving certificate {serial} within {within:?}; seen: {:?}",
                self.distinct_serials()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the load; asserts that nothing failed and every task made progress.
    async fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let mut failures = Vec::new();
        let mut totals = [0usize; 3];
        let groups = [self.reuse, self.fresh, vec![self.probe]];
        for (g, handles) in groups.into_iter().enumerate() {
            for h in handles {
                let out = tokio::time::timeout(Duration::from_secs(20), h)
                    .await
                    .expect("load task stops")
                    .expect("load task did not panic");
                assert!(out.ok >= 3, "a load task barely ran ({} calls)", out.ok);
                totals[g] += out.ok;
                failures.extend(out.failures);
            }
        }
        assert!(
            failures.is_empty(),
            "{} failed calls/handshakes (ok: reuse {}, new-connection {}, probe {}):\n{}",
            failures.len(),
            totals[0],
            totals[1],
            totals[2],
            failures
                .iter()
                .take(20)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        (totals[0], totals[1], totals[2])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issued_serving_certificate_rotates_under_load_without_failed_calls() {
    let b = Bridge::start_with(|c| {
        c.server.tls.ttl = Duration::from_secs(4);
        c.server.tls.renew_before = Duration::from_secs(2);
    })
    .await;
    assert_eq!(b.metrics.serving_cert_rotations.get(), 1);
    let load = Load::start(&b, 2, 2);

    // Keep the load on for at least 7 s and until two renewals were seen by new
    // handshakes (bounded, so a starved machine fails instead of hanging).
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let rotations = b.metrics.serving_cert_rotations.get();
        let distinct = load.distinct_serials().len();
        if start.elapsed() >= Duration::from_millis(7000) && rotations >= 3 && distinct >= 3 {
            break;
        }
        if start.elapsed() >= Duration::from_secs(20) {
            break;
        }
    }
    let distinct = load.distinct_serials();
    let (reuse, fresh, probes) = load.finish().await;
    let rotations = b.metrics.serving_cert_rotations.get();
    assert!(
        rotations >= 3,
        "expected the initial certificate and >= 2 renewals, got {rotations}"
    );
    assert!(
        distinct.len() >= 3,
        "new handshakes saw only {} serving certificates: {distinct:?}",
        distinct.len()
    );
    assert_eq!(b.metrics.serving_cert_errors.get(), 0);
    eprintln!(
        "rotations {rotations}, serials seen {}, calls: reuse {reuse}, new-connection {fresh}, probes {probes}",
        distinct.len()
    );
    b.shutdown().await.unwrap();
}

/// A CA made in the test; the bridge's backend uses it so that the bundle clients trust
/// also verifies serving certificates the test issues into files.
struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    key_pem: String,
}

impl TestCa {
    fn new() -> TestCa {
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let key_pem = key.serialize_pem();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "lifecycle test CA");
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = rcgen::CertifiedIssuer::self_signed(p, key).unwrap();
        TestCa { issuer, key_pem }
    }

    /// A serving certificate for `localhost`: (cert PEM, key PEM, serial hex).
    fn serving(&self) -> (String, String, String) {
        let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        p.serial_number = Some(istio_ca_bridge::backend::local::random_serial());
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let serial = pki::cert_info(cert.der()).unwrap().serial_hex;
        (cert.pem(), key.serialize_pem(), serial)
    }
}

/// Serving cert files laid out like a Kubernetes Secret volume: `current` is a symlink to
/// a versioned directory and is swapped atomically, so cert and key change together.
struct SecretDir {
    root: PathBuf,
    version: usize,
}

impl SecretDir {
    fn new(root: &Path) -> SecretDir {
        SecretDir {
            root: root.to_path_buf(),
            version: 0,
        }
    }
    fn cert_file(&self) -> PathBuf {
        self.root.join("current/tls.crt")
    }
    fn key_file(&self) -> PathBuf {
        self.root.join("current/tls.key")
    }
    fn publish(&mut self, cert_pem: &str, key_pem: &str) {
        self.version += 1;
        let name = format!("v{}", self.version);
        let dir = self.root.join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tls.crt"), cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), key_pem).unwrap();
        let tmp = self.root.join("current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.root.join("current")).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_certificate_files_are_reloaded_under_load_and_a_broken_update_is_ignored() {
    let files = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let ca_cert = files.path().join("ca.pem");
    let ca_key = files.path().join("ca-key.pem");
    std::fs::write(&ca_cert, ca.issuer.pem()).unwrap();
    std::fs::write(&ca_key, &ca.key_pem).unwrap();
    let mut secret = SecretDir::new(files.path());
    let (cert_a, key_a, serial_a) = ca.serving();
    secret.publish(&cert_a, &key_a);

    let (cert_file, key_file) = (secret.cert_file(), secret.key_file());
    let b = Bridge::start_with(move |c| {
        c.server.tls.mode = ServingCertMode::Files;
        c.server.tls.cert_file = Some(cert_file);
        c.server.tls.key_file = Some(key_file);
        c.server.tls.reload_interval = Duration::from_millis(200);
        let istio_ca_bridge::config::BackendConfig::Local(l) = &mut c.backend else {
            unreachable!("tests start with the local backend")
        };
        l.ca_cert_file = Some(ca_cert);
        l.ca_key_file = Some(ca_key);
    })
    .await;
    assert_eq!(b.root_pem(), ca.issuer.pem(), "the bundle is the test CA");
    let load = Load::start(&b, 2, 2);
    let wait = Duration::from_secs(10);
    load.wait_for_serial(&serial_a, wait).await;

    // A new certificate and key: new handshakes get it, nothing fails.
    let (cert_b, key_b, serial_b) = ca.serving();
    secret.publish(&cert_b, &key_b);
    load.wait_for_serial(&serial_b, wait).await;
    assert_eq!(b.metrics.serving_cert_rotations.get(), 2);

    // A broken update (garbage certificate) is refused; the current certificate stays.
    let errors_before = b.metrics.serving_cert_errors.get();
    secret.publish("this is not a certificate\n", &key_b);
    let broken_at = Instant::now();
    let deadline = broken_at + wait;
    while b.metrics.serving_cert_errors.get() == errors_before {
        assert!(Instant::now() < deadline, "broken files were never noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several more reload ticks (each retries and fails) with handshakes continuing.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let after_broken = load.serials_since(broken_at);
    assert!(
        after_broken.len() >= 3,
        "too few handshakes after the broken update: {after_broken:?}"
    );
    assert!(
        after_broken.iter().all(|s| *s == serial_b),
        "a broken update must keep {serial_b} serving; handshakes got {after_broken:?}"
    );
    assert_eq!(b.metrics.serving_cert_rotations.get(), 2);
    assert!(b.metrics.serving_cert_errors.get() > errors_before);

    // Fixing the files is picked up again.
    let (cert_c, key_c, serial_c) = ca.serving();
    secret.publish(&cert_c, &key_c);
    load.wait_for_serial(&serial_c, wait).await;
    assert_eq!(b.metrics.serving_cert_rotations.get(), 3);

    let distinct = load.distinct_serials();
    let expected: BTreeSet<String> = [serial_a, serial_b, serial_c].into_iter().collect();
    assert_eq!(
        distinct, expected,
        "handshakes only ever got the published certificates"
    );
    load.finish().await;
    b.shutdown().await.unwrap();
}
