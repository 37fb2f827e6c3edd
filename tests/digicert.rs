//! The DigiCert backend against an in-process FAKE of DigiCert Trust Lifecycle Manager's
//! documented REST API (`istio_ca_bridge::testing::fake_digicert`): no DigiCert server exists
//! offline. The fake really signs (rcgen), checks the shape of every request (and records
//! any drift, which fails the test) and can be switched into PENDING, 429, 401/403, 400 and
//! slow modes. The bridge is the real one, reached with real gRPC calls; openssl verifies
//! the chains it hands out against the fake's root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use istio_ca_bridge::backend::digicert::{DigicertSeatStrategy, DigicertValidityUnit};
use istio_ca_bridge::config::{BackendConfig, Config, DigicertConfig, KeyType};
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::fake_digicert::*;
use istio_ca_bridge::testing::*;
use tokio::time::Instant;
use tonic::Code;

fn write(dir: &Path, name: &str, data: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Files the bridge reads (DigiCert's TLS CA, the trust bundle, the API key, ...).
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(fake: &FakeDigicert) -> Files {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "tls-ca.pem", &fake.tls_ca_pem);
        write(dir.path(), "roots.pem", &fake.root_pem);
        write(dir.path(), "intermediates.pem", &fake.intermediate_pem);
        // A trailing newline, as `kubectl create secret --from-file` leaves it.
        write(dir.path(), "api-key", &format!("{API_KEY}\n"));
        write(dir.path(), "client.crt", &fake.client_cert_pem);
        write(dir.path(), "client.key", &fake.client_key_pem);
        Files { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The digicert backend pointed at `fake`, API key from a file, then `edit`.
    fn configure(
        &self,
        c: &mut Config,
        fake: &FakeDigicert,
        edit: impl FnOnce(&mut DigicertConfig),
    ) {
        let mut d = DigicertConfig {
            base_url: fake.base_url(),
            ca_file: Some(self.path("tls-ca.pem")),
            profile_id: PROFILE.into(),
            trust_bundle_file: Some(self.path("roots.pem")),
            ..Default::default()
        };
        d.auth.api_key_file = Some(self.path("api-key"));
        edit(&mut d);
        c.backend = BackendConfig::Digicert(d);
    }
}

async fn start(fake: &FakeDigicert, edit: impl FnOnce(&mut DigicertConfig)) -> (Bridge, Files) {
    let files = Files::new(fake);
    let b = Bridge::start_with(|c| files.configure(c, fake, edit)).await;
    assert_eq!(b.signer.kind(), "digicert");
    (b, files)
}

/// One workload call for default/<sa>; the gRPC result.
async fn issue(
    b: &Bridge,
    sa: &str,
    key_type: KeyType,
    shape: CsrShape,
) -> Result<Vec<String>, tonic::Status> {
    let mut client = b.client().await;
    let token = b.issuer.token("default", sa);
    let (_, csr) = csr_for(&spiffe("default", sa), key_type, shape);
    call(&mut client, request(csr, Some(&token), 3600))
        .await
        .map(|r| r.cert_chain)
}

/// openssl verifies the response chain (leaf, intermediates, roots) against `root_pem`
/// for both TLS purposes.
fn openssl_verifies(dir: &Path, chain: &[String], root_pem: &str) {
    let root = write(dir, "v-root.pem", root_pem);
    let leaf = write(dir, "v-leaf.pem", &chain[0]);
    let untrusted = write(dir, "v-untrusted.pem", &chain[1..chain.len() - 1].concat());
    for purpose in ["sslclient", "sslserver"] {
        let mut args = vec!["verify", "-purpose", purpose, "-CAfile"];
        args.push(root.to_str().unwrap());
        if chain.len() > 2 {
            args.push("-untrusted");
            args.push(untrusted.to_str().unwrap());
        }
        args.push(leaf.to_str().unwrap());
        let (ok, out) = openssl(&args);
        assert!(ok, "openssl verify {purpose}: {out}");
    }
}

async fn readyz(b: &Bridge) -> u16 {
    b.admin_get("/readyz").await.0
}

async fn wait_ready(b: &Bridge, code: u16, within: Duration) {
    let start = Instant::now();
    loop {
        let c = readyz(b).await;
        if c == code {
            return;
        }
        assert!(
            start.elapsed() < within,
            "/readyz still {c} after {within:?}, wanted {code}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_issue_chains_to_the_digicert_root() {
    let fake = FakeDigicert::start().await;
    let (b, files) = start(&fake, |_| {}).await;
    // The serving certificate came from DigiCert at start: DNS SAN, seat = first DNS name.
    {
        let st = fake.stats();
        assert_eq!(st.seats, vec!["localhost".to_string()]);
        assert_eq!(st.issued, 1);
    }
    // The bundle is exactly the configured root.
    assert_eq!(
        pki::parse_certs_pem(b.root_pem().as_bytes()).unwrap(),
        pki::parse_certs_pem(fake.root_pem.as_bytes()).unwrap()
    );
    let cases = [
        ("ztunnel-ec", KeyType::EcdsaP256, CsrShape::Ztunnel),
        ("agent-ec", KeyType::EcdsaP256, CsrShape::IstioAgent),
        ("agent-rsa", KeyType::Rsa, CsrShape::IstioAgent),
    ];
    for (sa, key_type, shape) in cases {
        let mut client = b.client().await;
        let token = b.issuer.token("default", sa);
        let id = spiffe("default", sa);
        let (key, csr) = csr_for(&id, key_type, shape);
        let chain = call(&mut client, request(csr, Some(&token), 3600))
            .await
            .unwrap_or_else(|s| panic!("{sa}: {s:?}"))
            .cert_chain;
        assert_eq!(chain.len(), 3, "leaf, DigiCert's intermediate, root bundle");
        let target = istio_ca_bridge::identity::SpiffeId::parse(&id).unwrap();
        istio_ca_bridge::cli::request::verify_response(&chain, &target, &key).unwrap();
        let info = pki::cert_info(&pki::parse_certs_pem(chain[0].as_bytes()).unwrap()[0]).unwrap();
        assert_eq!(info.uri_sans, vec![id.clone()]);
        assert!(info.dns_sans.is_empty());
        let life = info.not_after - now() as i64;
        assert!(
            (3500..=3600).contains(&life),
            "one hour asked, one hour issued: {life}"
        );
        assert_eq!(
            pki::parse_certs_pem(chain[1].as_bytes()).unwrap(),
            pki::parse_certs_pem(fake.intermediate_pem.as_bytes()).unwrap(),
            "the fake's root (self-signed) is dropped from the answer's chain"
        );
        openssl_verifies(files.dir.path(), &chain, &fake.root_pem);
    }
    {
        let st = fake.stats();
        assert_eq!(
            st.seats[1..],
            [
                spiffe("default", "ztunnel-ec"),
                spiffe("default", "agent-ec"),
                spiffe("default", "agent-rsa")
            ],
            "strategy spiffeId: one seat per identity"
        );
        assert!(
            st.validities[1..]
                .iter()
                .all(|v| *v == ("hours".to_string(), 1))
        );
        assert_eq!((st.issued, st.pickups, st.throttled), (4, 0, 0));
    }
    fake.assert_no_drift();
    assert_eq!(b.issued(), 3);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_enrollments_are_picked_up_within_the_budget() {
    let fake = FakeDigicert::start().await;
    let (b, files) = start(&fake, |d| {
        d.request_timeout = Duration::from_secs(3);
        d.poll_initial_interval = Duration::from_millis(50);
        d.poll_max_interval = Duration::from_millis(400);
    })
    .await;
    fake.set_mode(Mode::Pending { polls: 4 });
    let t = Instant::now();
    let chain = issue(&b, "pending", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    let took = t.elapsed();
    openssl_verifies(files.dir.path(), &chain, &fake.root_pem);
    assert_eq!(fake.stats().pickups, 4, "ready after the 4th poll");
    // Backoff 50, 100, 200, 400 ms: at least 750 ms of waiting.
    assert!(took >= Duration::from_millis(700), "{took:?}");

    // Never ready: UNAVAILABLE at the end of requestTimeout, nothing issued, and the
    // polling stays bounded (exponential up to pollMaxInterval).
    fake.set_mode(Mode::Pending { polls: 10_000 });
    let before = (b.issued(), fake.issued(), fake.stats().pickups);
    let t = Instant::now();
    let err = issue(&b, "pending", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(took < Duration::from_millis(3500), "{took:?}");
    let polls = fake.stats().pickups - before.2;
    assert!((3..=10).contains(&polls), "{polls} polls in 3 s");
    assert_eq!((b.issued(), fake.issued()), (before.0, before.1));
    // Still serving.
    fake.set_mode(Mode::Immediate);
    issue(&b, "pending", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    fake.assert_no_drift();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_calls_back_off_then_give_resource_exhausted() {
    let fake = FakeDigicert::start().await;
    let (b, _files) = start(&fake, |d| d.request_timeout = Duration::from_secs(4)).await;
    let remote = || {
        b.metrics
            .backend_throttles
            .with_label_values(&["digicert", "remote"])
            .get()
    };
    // A short burst with Retry-After in seconds: waited out, then issued.
    fake.throttle_next(2, Some(RetryAfter::Seconds(1)));
    let t = Instant::now();
    issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "Retry-After honoured: {:?}",
        t.elapsed()
    );
    assert_eq!(remote(), 2);
    // Retry-After as an HTTP date.
    fake.throttle_next(1, Some(RetryAfter::Date(Duration::from_secs(2))));
    let t = Instant::now();
    issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // Without Retry-After: jittered backoff.
    fake.throttle_next(3, None);
    issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    assert_eq!(remote(), 6);

    // Retry-After beyond the budget: RESOURCE_EXHAUSTED at once, nothing issued.
    let before = (b.issued(), fake.issued());
    fake.throttle_next(1000, Some(RetryAfter::Seconds(30)));
    let t = Instant::now();
    let err = issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // A long burst without Retry-After: retried until the budget ends, then
    // RESOURCE_EXHAUSTED.
    fake.throttle_next(1000, None);
    let t = Instant::now();
    let err = issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!((b.issued(), fake.issued()), before);
    fake.throttle_next(0, None);
    issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    assert_eq!(readyz(&b).await, 200, "throttling is not unreadiness");
    fake.assert_no_drift();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_make_the_bridge_unready_until_a_call_succeeds() {
    let fake = FakeDigicert::start().await;
    let (b, files) = start(&fake, |_| {}).await;
    wait_ready(&b, 200, Duration::from_secs(5)).await;
    let before = (b.issued(), fake.issued());
    // DigiCert revokes the key (401).
    fake.set_api_key("rotated-key-2");
    let err = issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let (code, body) = b.admin_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        !body.contains("rotated-key-2") && !body.contains(API_KEY),
        "{body}"
    );
    assert_eq!((b.issued(), fake.issued()), before);
    // The operator writes the new key into the file: read at the next call, which
    // succeeds and makes the bridge ready again.
    write(files.dir.path(), "api-key", "rotated-key-2\n");
    issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    assert_eq!(readyz(&b).await, 200);

    // 403 (no permission on the profile): same, and readiness comes back without
    // traffic once DigiCert accepts the credentials again (GET /hello probe).
    fake.set_mode(Mode::Forbidden);
    let err = issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(readyz(&b).await, 503);
    fake.set_mode(Mode::Immediate);
    wait_ready(&b, 200, Duration::from_secs(8)).await;
    assert!(fake.stats().hellos >= 1);
    fake.assert_no_drift();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_are_invalid_argument_and_slow_answers_unavailable() {
    let fake = FakeDigicert::start().await;
    let (b, _files) = start(&fake, |d| d.request_timeout = Duration::from_secs(2)).await;
    let before = (b.issued(), fake.issued());
    fake.set_mode(Mode::BadRequest);
    let err = issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!((b.issued(), fake.issued()), before);
    assert_eq!(
        readyz(&b).await,
        200,
        "a refused request is not unreadiness"
    );
    fake.set_mode(Mode::Immediate);
    issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();

    // Slower than requestTimeout: UNAVAILABLE when the budget ends, not the server's
    // generic timeout; the enrollment is not sent twice.
    fake.set_delay(Duration::from_secs(4));
    let issued = b.issued();
    let enrollments = fake.stats().enrollments;
    let t = Instant::now();
    let err = issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap_err();
    let took = t.elapsed();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        fake.stats().enrollments,
        enrollments + 1,
        "no second enrollment"
    );
    assert_eq!(b.issued(), issued);
    fake.set_delay(Duration::from_millis(300));
    issue(&b, "a", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    fake.assert_no_drift();
    b.shutdown().await.unwrap();
}

/// A restart storm: 200 concurrent calls against rateLimit 10/s, rateBurst 20. The bucket
/// must keep DigiCert's view of the bridge at most rate + burst calls in any second, hand
/// out only slots that leave time to finish, and refuse the rest with RESOURCE_EXHAUSTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_calls_honours_the_rate_limit() {
    const CALLS: usize = 200;
    const RATE: f64 = 10.0;
    const BURST: u32 = 20;
    let fake = FakeDigicert::start().await;
    let (b, _files) = start(&fake, |d| {
        d.rate_limit = RATE;
        d.rate_burst = BURST;
        d.request_timeout = Duration::from_secs(5);
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
    tokio::time::sleep(Duration::from_millis(2100)).await;
    fake.stats().arrivals.clear();
    let before = fake.issued();
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
    // Slots are handed out while they leave 1 s of the 5 s budget: burst + 4 s of rate.
    let expected = f64::from(BURST) + RATE * 4.0;
    assert!(
        ok as f64 >= expected - 3.0 && ok as f64 <= expected + RATE * 2.0,
        "{ok} issued, expected about {expected}"
    );
    assert_eq!(
        fake.issued() - before,
        ok as u64,
        "refused calls never reach DigiCert"
    );
    let busiest = fake.busiest_second();
    // The bucket's bound is rate + burst; +1 for arrival jitter at the window's edge.
    assert!(
        busiest <= RATE as usize + BURST as usize + 1,
        "{busiest} DigiCert calls within one second"
    );
    let local = b
        .metrics
        .backend_throttles
        .with_label_values(&["digicert", "local"])
        .get();
    assert_eq!(local as usize, exhausted);
    eprintln!(
        "{CALLS} calls in {took:?}: {ok} issued, busiest second at DigiCert {busiest}, {exhausted} RESOURCE_EXHAUSTED"
    );
    fake.assert_no_drift();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_auth_on_the_mtls_host() {
    let fake = FakeDigicert::start_mtls().await;
    let files = Files::new(&fake);
    let b = Bridge::start_with(|c| {
        files.configure(c, &fake, |d| {
            d.auth.api_key_file = None;
            d.auth.client_cert_file = Some(files.path("client.crt"));
            d.auth.client_key_file = Some(files.path("client.key"));
        })
    })
    .await;
    let chain = issue(&b, "mtls", KeyType::EcdsaP256, CsrShape::IstioAgent)
        .await
        .unwrap();
    openssl_verifies(files.dir.path(), &chain, &fake.root_pem);
    assert!(fake.stats().client_cert_connections >= 1);
    fake.assert_no_drift();
    b.shutdown().await.unwrap();

    // Without the client certificate the mTLS host refuses the handshake: the bridge
    // cannot get its serving certificate and says why at start.
    let files2 = Files::new(&fake);
    let mut cfg = test_config(files2.dir.path(), &TestIssuer::new(ISSUER));
    files2.configure(&mut cfg, &fake, |_| {});
    cfg.validate().unwrap();
    let err = istio_ca_bridge::app::App::build(cfg, Default::default())
        .await
        .err()
        .expect("no client certificate, no start");
    let msg = format!("{err:#}");
    eprintln!("start without a client certificate: {msg}");
    assert!(
        msg.contains("serving certificate") && msg.contains("unavailable"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_seat_days_api_key_from_env_and_configured_intermediates() {
    let fake = FakeDigicert::start().await;
    // SAFETY (test-only): a variable no other test reads, set before the bridge starts.
    unsafe { std::env::set_var("ISTIO_CA_BRIDGE_TEST_DIGICERT_KEY", API_KEY) };
    let (b, files) = start(&fake, |d| {
        d.auth.api_key_file = None;
        d.auth.api_key_env = Some("ISTIO_CA_BRIDGE_TEST_DIGICERT_KEY".into());
        d.seat.strategy = DigicertSeatStrategy::Fixed;
        d.seat.id = "mesh-shared-seat".into();
        d.validity_unit = DigicertValidityUnit::Days;
    })
    .await;
    let exceeded = || {
        b.metrics
            .backend_ttl_exceeded
            .with_label_values(&["digicert"])
            .get()
    };
    let before = exceeded();
    issue(&b, "one", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    issue(&b, "two", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    {
        let st = fake.stats();
        assert!(
            st.seats.iter().all(|s| s == "mesh-shared-seat"),
            "strategy fixed: one seat for all, the serving certificate included: {:?}",
            st.seats
        );
        assert_eq!(st.seats.len(), 3);
        // One hour asked, rounded to the minimum of one day: the bridge asked DigiCert for a
        // day, so a day-long leaf is what was asked (nothing over-long, nothing refused).
        assert!(st.validities.iter().all(|v| *v == ("days".to_string(), 1)));
    }
    assert_eq!(exceeded() - before, 0);
    b.shutdown().await.unwrap();

    // DigiCert's answer without the chain: with intermediatesFile the chain is completed;
    // without it the server's chain check refuses the certificate (here the bridge's own
    // serving certificate, so the bridge does not start).
    fake.set_chain_in_answer(false);
    let files2 = Files::new(&fake);
    let b = Bridge::start_with(|c| {
        files2.configure(c, &fake, |d| {
            d.intermediates_file = Some(files2.path("intermediates.pem"));
        })
    })
    .await;
    let chain = issue(&b, "inter", KeyType::EcdsaP256, CsrShape::Ztunnel)
        .await
        .unwrap();
    assert_eq!(chain.len(), 3);
    openssl_verifies(files.dir.path(), &chain, &fake.root_pem);
    b.shutdown().await.unwrap();
    // (The bridge without intermediatesFile cannot even get its serving certificate.)
    let mut cfg = test_config(files2.dir.path(), &TestIssuer::new(ISSUER));
    files2.configure(&mut cfg, &fake, |_| {});
    let err = istio_ca_bridge::app::App::build(cfg, Default::default())
        .await
        .err()
        .expect("an incomplete chain is never used");
    let msg = format!("{err:#}");
    assert!(msg.contains("does not verify"), "{msg}");
    fake.assert_no_drift();
}

/// DigiCert decides itself which root signs, so a root added to `trustBundleFile` is
/// published at once (a rotation starts by itself, re-read every
/// `trustBundleRefreshInterval`), and signingNew waits for as long as leaves under the old
/// root still come back: a CA not yet switched stalls the rotation instead of breaking
/// workloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_added_to_the_trust_bundle_is_published_and_rotated_to_only_once_digicert_signs_under_it()
 {
    let fake = FakeDigicert::start().await;
    let files = Files::new(&fake);
    let state = tempfile::tempdir().unwrap();
    let b = Bridge::start_with(|c| {
        files.configure(c, &fake, |d| {
            d.trust_bundle_refresh_interval = Duration::from_secs(1);
        });
        c.rotation.poll_interval = Duration::from_millis(200);
        c.rotation.state_dir = Some(state.path().to_path_buf());
        // One validity unit (an hour): a leaf issued now outlives signingNew's own wait.
        c.policy.max_ttl = Duration::from_secs(3600);
        c.policy.default_ttl = Duration::from_secs(3600);
    })
    .await;
    let status = || async {
        let (code, body) = b.admin_get("/rotation").await;
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert_eq!(status().await["phase"], "idle");
    let roots = |pem: &str| pki::parse_certs_pem(pem.as_bytes()).unwrap();
    let root_a = roots(&fake.root_pem).remove(0);
    assert_eq!(roots(&b.root_pem()), std::slice::from_ref(&root_a));

    let new_root = istio_ca_bridge::testing::aws::other_root("DigiCert Test Root B");
    let root_b = roots(&new_root).remove(0);
    write(
        files.dir.path(),
        "roots.pem",
        &format!("{}{new_root}", fake.root_pem),
    );
    let start = Instant::now();
    while status().await["phase"] != "publishing" {
        assert!(start.elapsed() < Duration::from_secs(10), "not followed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        status().await["reason"]
            .as_str()
            .unwrap()
            .contains("digicert offers a new root: DigiCert Test Root B")
    );
    // Published everywhere the roots go, while DigiCert still signs under A.
    assert_eq!(roots(&b.root_pem()), [root_a.clone(), root_b.clone()]);
    let chain = issue(&b, "app", KeyType::EcdsaP256, CsrShape::IstioAgent)
        .await
        .unwrap();
    assert_eq!(roots(chain.last().unwrap()), [root_a.clone(), root_b]);

    // The operator skips publishing's wait; DigiCert has not been switched.
    let (code, body) = b.admin_post("/rotation/advance?force=true").await;
    assert_eq!(code, 200, "{body}");
    let next_phase_at = |st: &serde_json::Value| {
        pki::unix_secs(std::time::SystemTime::now()) + st["nextPhaseInSeconds"].as_i64().unwrap()
    };
    let before = next_phase_at(&status().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let chain = issue(&b, "app", KeyType::EcdsaP256, CsrShape::IstioAgent)
        .await
        .unwrap();
    let leaf = pki::parse_certs_pem(chain[0].as_bytes()).unwrap().remove(0);
    let not_after = pki::cert_info(&leaf).unwrap().not_after;
    // That leaf is still under A: signingNew now waits until it has expired.
    let st = status().await;
    assert_eq!(st["phase"], "signingNew");
    let after = next_phase_at(&st);
    assert!(after > before + 1, "{before} -> {after}");
    assert!(after >= not_after, "{st}");
    let (code, body) = b.admin_post("/rotation/advance").await;
    assert_eq!(code, 409, "{body}");
    b.shutdown().await.unwrap();
}
