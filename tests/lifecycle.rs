//! Lifecycle tests: the serving certificate rotates (issued and from files) under continuous
//! load without a single failed call, shutdown drains in-flight calls within the grace
//! period (in-process and on SIGTERM to the real binary), and a draining server issues
//! nothing to new connections.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use istio_ca_bridge::app::Options;
use istio_ca_bridge::backend::local::LocalCa;
use istio_ca_bridge::backend::{Health, IssuedChain, SignError, SignRequest, Signer, Subject};
use istio_ca_bridge::config::{KeyType, LocalBackendConfig, ServingCertMode};
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::*;
use istio_ca_bridge::trust::SharedBundle;
use tokio::sync::watch;
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

/// The local CA, made slow: every workload signature takes `delay`.
struct SlowSigner {
    inner: LocalCa,
    delay: Duration,
    started: AtomicUsize,
    finished: Mutex<Vec<Instant>>,
}

impl SlowSigner {
    fn new(dir: &Path, delay: Duration) -> Arc<SlowSigner> {
        let cfg = LocalBackendConfig {
            state_dir: dir.join("slow-ca"),
            ..Default::default()
        };
        Arc::new(SlowSigner {
            inner: LocalCa::load_or_create(&cfg, TD).unwrap(),
            delay,
            started: AtomicUsize::new(0),
            finished: Mutex::new(Vec::new()),
        })
    }

    async fn wait_started(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.started.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} calls reached the signer",
                self.started.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl Signer for SlowSigner {
    fn kind(&self) -> &'static str {
        "slow"
    }
    async fn sign(&self, req: &SignRequest) -> Result<IssuedChain, SignError> {
        if !matches!(req.subject, Subject::Workload(_)) {
            return self.inner.sign(req).await;
        }
        self.started.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let r = self.inner.sign(req).await;
        self.finished.lock().unwrap().push(Instant::now());
        r
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.inner.trust_bundle()
    }
    fn health(&self) -> Health {
        self.inner.health()
    }
}

/// Starts `n` calls spread over a few connections; each task returns its result.
async fn spawn_calls(
    b: &Bridge,
    n: usize,
) -> Vec<JoinHandle<Result<istio_ca_bridge::pb::IstioCertificateResponse, tonic::Status>>> {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(b.client().await);
    }
    (0..n)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let sa = format!("drain-{i}");
            let token = b.issuer.token("default", &sa);
            let (_, csr) = csr_for(
                &spiffe("default", &sa),
                KeyType::EcdsaP256,
                CsrShape::Ztunnel,
            );
            tokio::spawn(async move { call(&mut client, request(csr, Some(&token), 3600)).await })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_calls_within_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    let delay = Duration::from_millis(1500);
    let slow = SlowSigner::new(tmp.path(), delay);
    let grace = Duration::from_secs(10);
    let mut b = Bridge::start_opts(
        |c| c.server.shutdown_grace = grace,
        Options {
            signer: Some(slow.clone()),
        },
    )
    .await;
    let calls = spawn_calls(&b, 20).await;
    // Shut down once every call is inside the backend (about 300 ms in on an idle
    // machine), so all 20 are genuinely in flight.
    slow.wait_started(20).await;
    let shutdown_at = Instant::now();
    b.begin_shutdown();
    let run = b.task.take().unwrap();
    let result = tokio::time::timeout(grace + Duration::from_secs(10), run)
        .await
        .expect("run() returns")
        .expect("run() did not panic");
    let run_done = Instant::now();
    result.expect("run() returns Ok after draining");

    let mut failures = Vec::new();
    for (i, c) in calls.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(10), c).await {
            Ok(Ok(Ok(resp))) if resp.cert_chain.len() == 2 => {}
            other => failures.push(format!("call {i}: {other:?}")),
        }
    }
    assert!(
        failures.is_empty(),
        "in-flight calls failed during shutdown:\n{}",
        failures.join("\n")
    );
    let finished = slow.finished.lock().unwrap().clone();
    assert_eq!(finished.len(), 20);
    let last_signed = finished.into_iter().max().unwrap();
    assert!(
        run_done >= last_signed,
        "run() returned before the in-flight calls were signed"
    );
    let took = run_done - shutdown_at;
    assert!(
        took < grace / 2,
        "draining took {took:?}; expected about {delay:?}, well within the {grace:?} grace"
    );
    // The listener is closed: a new connection gets nothing.
    assert!(
        connect(b.grpc.port(), &b.root_pem()).await.is_err(),
        "the gRPC port still accepts connections after run() returned"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_on_calls_slower_than_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    let delay = Duration::from_secs(5);
    let slow = SlowSigner::new(tmp.path(), delay);
    let grace = Duration::from_millis(500);
    let mut b = Bridge::start_opts(
        |c| c.server.shutdown_grace = grace,
        Options {
            signer: Some(slow.clone()),
        },
    )
    .await;
    let calls = spawn_calls(&b, 3).await;
    slow.wait_started(3).await;
    let shutdown_at = Instant::now();
    b.begin_shutdown();
    let run = b.task.take().unwrap();
    let result = tokio::time::timeout(delay + Duration::from_secs(5), run)
        .await
        .expect("run() returns")
        .expect("run() did not panic");
    let took = shutdown_at.elapsed();
    result.expect("run() returns Ok when the grace period is over");
    assert!(
        took >= grace - Duration::from_millis(50),
        "run() returned after {took:?}, before the {grace:?} grace was over"
    );
    assert!(
        took < grace + Duration::from_millis(1500),
        "run() took {took:?}; it must give up after the {grace:?} grace, not wait for the {delay:?} backend"
    );
    assert!(
        slow.finished.lock().unwrap().is_empty(),
        "the slow calls were still running when run() returned"
    );
    // Abandoned calls are answered UNAVAILABLE (retryable) and never get a certificate,
    // even though the backend would have finished later.
    let issued_before = b.issued();
    for c in calls {
        let r = tokio::time::timeout(Duration::from_secs(3), c)
            .await
            .expect("abandoned call answered promptly")
            .expect("call task");
        let e = r.expect_err("abandoned call must not succeed");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    }
    tokio::time::sleep(delay).await;
    assert_eq!(
        b.issued(),
        issued_before,
        "a certificate was issued after shutdown"
    );
    assert!(
        slow.finished.lock().unwrap().is_empty(),
        "the backend work of abandoned calls was not dropped"
    );
}

/// Kills the child process if the test fails before it exited.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_in_flight_call_finish_and_exits_zero_within_the_grace() {
    istio_ca_bridge::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let issuer = Arc::new(TestIssuer::new("https://sigterm.test"));
    // Key A (ES256, kid "es") is published at start; key B (RS256, kid "rs") only by the
    // slow refresh that a token signed with B triggers.
    let mut only_a = issuer.jwks.clone();
    only_a["keys"].as_array_mut().unwrap().truncate(1);
    let both = issuer.jwks.clone();
    let jwks_delay = Duration::from_secs(3);
    let fetches = Arc::new(AtomicUsize::new(0));
    let (slow_tx, mut slow_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let jwks_app = {
        let fetches = fetches.clone();
        axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let n = fetches.fetch_add(1, Ordering::SeqCst);
                let (only_a, both, slow_tx) = (only_a.clone(), both.clone(), slow_tx.clone());
                async move {
                    if n == 0 {
                        return axum::Json(only_a);
                    }
                    let _ = slow_tx.send(());
                    tokio::time::sleep(jwks_delay).await;
                    axum::Json(both)
                }
            }),
        )
    };
    let jwks_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let jwks_addr = jwks_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(jwks_listener, jwks_app).await.unwrap() });

    let (grpc_port, admin_port) = (free_port(), free_port());
    assert_ne!(grpc_port, admin_port);
    let grace = Duration::from_secs(10);
    let config = dir.path().join("bridge.yaml");
    std::fs::write(
        &config,
        format!(
            "trustDomain: {TD}
server:
  listen: 127.0.0.1:{grpc_port}
  tls:
    mode: issued
    dnsNames: [localhost]
  shutdownGrace: {grace}s
admin:
  listen: 127.0.0.1:{admin_port}
authn:
  jwt:
    - issuer: {iss}
      jwksUri: http://{jwks_addr}/jwks
      refreshInterval: 5m
backend:
  type: local
  stateDir: {state}
",
            grace = grace.as_secs(),
            iss = issuer.issuer,
            state = dir.path().join("ca").display(),
        ),
    )
    .unwrap();
    let log_path = dir.path().join("stderr.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_istio-ca-bridge"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("RUST_LOG", "info")
            .env("ISTIO_CA_BRIDGE_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start istio-ca-bridge"),
    );
    let stderr = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Ready within a bounded time.
    let readyz = format!("http://127.0.0.1:{admin_port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("istio-ca-bridge exited early ({status}):\n{}", stderr());
        }
        if let Ok(r) = reqwest::get(&readyz).await
            && r.status() == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never became ready:\n{}",
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root = std::fs::read_to_string(dir.path().join("ca/root-cert.pem")).unwrap();
    let mut client = connect(grpc_port, &root).await.expect("connect");
    let id = spiffe("default", "sigterm");
    let (_, csr) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    call(
        &mut client,
        request(csr.clone(), Some(&issuer.token("default", "sigterm")), 3600),
    )
    .await
    .expect("a call with key A works");
    assert_eq!(fetches.load(Ordering::SeqCst), 1);

    // A token signed by key B makes the bridge refresh the JWKS, which takes `jwks_delay`:
    // the call is in flight inside the bridge until then.
    let token_b = issuer.sign_rs(&issuer.claims("default", "sigterm"), Some("rs"));
    let in_flight = {
        let mut client = client.clone();
        let csr = csr.clone();
        tokio::spawn(async move {
            let r = call(&mut client, request(csr, Some(&token_b), 3600)).await;
            (r, Instant::now())
        })
    };
    tokio::time::timeout(Duration::from_secs(15), slow_rx.recv())
        .await
        .expect("the bridge refreshes the JWKS for the unknown kid")
        .unwrap();
    assert!(!in_flight.is_finished());
    let pid = child.0.id().to_string();
    let term_at = Instant::now();
    let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(kill.success());

    // Draining: readiness goes down while the call is still in flight...
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(r) = reqwest::get(&readyz).await
            && r.status() == 503
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readyz never reported draining:\n{}",
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...and a new connection gets no certificate.
    let (_, csr2) = csr_for(&id, KeyType::EcdsaP256, CsrShape::IstioAgent);
    let token_a = issuer.token("default", "sigterm");
    let late = tokio::time::timeout(Duration::from_secs(2), async {
        let mut c = connect(grpc_port, &root).await?;
        Ok::<_, anyhow::Error>(call(&mut c, request(csr2, Some(&token_a), 3600)).await?)
    })
    .await;
    match late {
        Ok(Err(e)) => eprintln!("new connection while draining: {e:#}"),
        Ok(Ok(_)) => panic!("a connection made while draining was issued a certificate"),
        Err(_) => panic!("a connection made while draining hung instead of failing fast"),
    }
    if in_flight.is_finished() {
        let (r, _) = in_flight.await.unwrap();
        panic!("the in-flight call ended before the JWKS answered, while draining: {r:?}");
    }

    let (result, call_done) = tokio::time::timeout(Duration::from_secs(15), in_flight)
        .await
        .expect("the in-flight call completes")
        .unwrap();
    let resp = result.expect("the call in flight at SIGTERM succeeds");
    assert_eq!(resp.cert_chain.len(), 2);
    assert!(
        call_done - term_at >= jwks_delay / 2,
        "the call was not in flight at SIGTERM"
    );

    let deadline = term_at + grace + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "still running long after the grace:\n{}",
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = term_at.elapsed();
    let log = stderr();
    assert!(status.success(), "exit status {status}:\n{log}");
    assert!(
        exited_after < grace,
        "exited {exited_after:?} after SIGTERM; grace {grace:?}"
    );
    for needle in ["SIGTERM received", "draining", "drained"] {
        assert!(log.contains(needle), "stderr lacks {needle:?}:\n{log}");
    }
}
