//! Lifecycle tests, shutdown: it drains in-flight calls within the grace period (in-process
//! and on SIGTERM to the real binary, which exits 0), gives up on calls slower than the
//! grace period, and a draining server issues nothing to new connections.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use istio_ca_bridge::app::Options;
use istio_ca_bridge::backend::local::LocalCa;
use istio_ca_bridge::backend::{Health, IssuedChain, SignError, SignRequest, Signer, Subject};
use istio_ca_bridge::config::{KeyType, LocalConfig};
use istio_ca_bridge::pki::CsrShape;
use istio_ca_bridge::testing::*;
use istio_ca_bridge::trust::SharedBundle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The local CA, made slow: every workload signature takes `delay`.
struct SlowSigner {
    inner: LocalCa,
    delay: Duration,
    started: AtomicUsize,
    finished: Mutex<Vec<Instant>>,
}

impl SlowSigner {
    async fn new(dir: &Path, delay: Duration) -> Arc<SlowSigner> {
        let cfg = LocalConfig {
            state_dir: dir.join("slow-ca"),
            ..Default::default()
        };
        Arc::new(SlowSigner {
            inner: LocalCa::open_standalone(&cfg, TD).await.unwrap(),
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

impl istio_ca_bridge::backend::Authority for SlowSigner {
    fn kind(&self) -> &'static str {
        "slow"
    }
    fn trust_bundle(&self) -> watch::Receiver<SharedBundle> {
        self.inner.trust_bundle()
    }
    fn health(&self) -> Health {
        self.inner.health()
    }
}

#[async_trait]
impl Signer for SlowSigner {
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
    let slow = SlowSigner::new(tmp.path(), delay).await;
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
    let slow = SlowSigner::new(tmp.path(), delay).await;
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
      insecureHttp: true
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
