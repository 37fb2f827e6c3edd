//! Trust distribution through the Kubernetes API, black-box: the root ConfigMap in every
//! namespace and istiod's TLS Secret, written only by the replica holding the Lease, and
//! kept current when the trust bundle changes.
//!
//! The bridge runs in-process and talks, through its real kube-rs client and a kubeconfig
//! file, to the fake API server of `istio_ca_bridge::testing::fake_kube` (a fake because no
//! kube-apiserver runs offline; it follows the documented API).
//!
//! Proves: ConfigMaps in every (new) namespace from the Lease holder only, istiod's TLS
//! Secret issued, verifiable and renewed (its key never logged), a trust-bundle change
//! reaching every ConfigMap and istiod's TLS, and replicas starting together electing
//! exactly one writer, sharing one generated CA through one Secret.

use std::time::Duration;

use base64::Engine;
use istio_ca_bridge::config::Config;
use istio_ca_bridge::pki;
use istio_ca_bridge::testing::fake_kube::*;
use istio_ca_bridge::testing::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_configmap_in_every_namespace_written_by_the_lease_holder_only() {
    let fake = FakeKube::start_new().await;
    let all = ["default", "istio-system", "kube-system", "shop"];
    for ns in all.iter().chain(&["kube-public", "kube-node-lease"]) {
        fake.put_namespace(ns);
    }
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let edit = |c: &mut Config| {
        kube_config(c, vec![kc.clone()]);
        c.kubernetes.root_config_map.enabled = true;
        // Each replica its own root (not the shared Secret), so a root tells who wrote.
        c.kubernetes.ca_secret.enabled = false;
        let le = &mut c.kubernetes.leader_election;
        le.lease_duration = Duration::from_secs(2);
        le.retry_period = Duration::from_millis(500);
    };
    const CM: &str = "istio-ca-root-cert";
    let root_of = |ns: &str| {
        fake.configmap(ns, CM)
            .and_then(|cm| cm["data"]["root-cert.pem"].as_str().map(str::to_string))
    };
    let holder = || {
        fake.lease("istio-system", "istio-ca-bridge")
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };

    // Replica A (its own local CA, so its root tells who wrote a ConfigMap).
    let a = Bridge::start_with(edit).await;
    let root_a = a.root_pem();
    eventually(
        "A publishes everywhere",
        Duration::from_secs(10),
        || async {
            all.iter()
                .all(|ns| root_of(ns).as_deref() == Some(root_a.as_str()))
        },
    )
    .await;
    for ns in all {
        let cm = fake.configmap(ns, CM).unwrap();
        assert_eq!(cm["metadata"]["labels"]["istio.io/config"], "true", "{ns}");
    }
    for ns in ["kube-public", "kube-node-lease"] {
        assert!(fake.configmap(ns, CM).is_none(), "{ns} must be skipped");
    }
    let holder_a = holder().expect("A holds the lease");
    let leader_metric = r#"istio_ca_bridge_kubernetes_leader{cluster="Kubernetes"}"#;

    // Replica B with another root: while A holds the lease, B writes nothing.
    let b = Bridge::start_with(edit).await;
    let root_b = b.root_pem();
    assert_ne!(root_a, root_b);
    fake.put_namespace("late");
    eventually(
        "A publishes into a new namespace",
        Duration::from_secs(10),
        || async { root_of("late").as_deref() == Some(root_a.as_str()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for ns in all.iter().chain(&["late"]) {
        assert_eq!(root_of(ns).as_deref(), Some(root_a.as_str()), "{ns}");
    }
    assert_eq!(holder().as_deref(), Some(holder_a.as_str()));
    assert!(
        a.admin_get("/metrics")
            .await
            .1
            .contains(&format!("{leader_metric} 1"))
    );
    assert!(
        b.admin_get("/metrics")
            .await
            .1
            .contains(&format!("{leader_metric} 0"))
    );

    // A stops (and releases the lease): B takes over and publishes its bundle.
    a.shutdown().await.unwrap();
    eventually("B takes over", Duration::from_secs(10), || async {
        all.iter()
            .chain(&["late"])
            .all(|ns| root_of(ns).as_deref() == Some(root_b.as_str()))
    })
    .await;
    let holder_b = holder().expect("B holds the lease");
    assert_ne!(holder_a, holder_b);
    let lease = fake.lease("istio-system", "istio-ca-bridge").unwrap();
    assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 2, "{lease}");
    assert!(fake.count("leases.replace") > 2);
    b.shutdown().await.unwrap();
}

/// A bundle change in a cluster of many namespaces reaches the API server at the cluster's
/// `qps` (after `burst`), not as one burst: counted applies, not timings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_configmap_writes_keep_to_the_clusters_rate_limit() {
    let fake = FakeKube::start_new().await;
    const N: usize = 40;
    for i in 0..N {
        fake.put_namespace(&format!("ns-{i}"));
    }
    let kdir = tempfile::tempdir().unwrap();
    let mut kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    kc.qps = 10.0;
    kc.burst = 5;
    let b = Bridge::start_with(|c: &mut Config| {
        kube_config(c, vec![kc.clone()]);
        c.kubernetes.root_config_map.enabled = true;
        c.kubernetes.ca_secret.enabled = false;
    })
    .await;
    eventually("the first apply", Duration::from_secs(10), || async {
        fake.count("configmaps.apply") > 0
    })
    .await;
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // At most the burst and one second's refill (plus one for the slot taken at t0 and
    // the time the sleep overran), far fewer than N.
    let allowed = 5 + 10.0f64.mul_add(t0.elapsed().as_secs_f64(), 2.0) as u64;
    let applies = fake.count("configmaps.apply");
    assert!(
        applies <= allowed,
        "{applies} applies in ~1 s, allowed {allowed}"
    );
    assert!(applies < N as u64);
    let root = b.root_pem();
    eventually("every namespace", Duration::from_secs(15), || async {
        fake.configmaps_holding("istio-ca-root-cert", root.trim()) == N
    })
    .await;
    assert_eq!(fake.count("configmaps.apply"), N as u64);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istiod_tls_secret_is_issued_verifiable_and_renewed() {
    require_tool("openssl", "apt-get install -y openssl");
    logs();
    let fake = FakeKube::start_new().await;
    fake.put_namespace("istio-system");
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let state = kdir.path().join("ca");
    let edit = |renew_before: u64| {
        let (kc, state) = (kc.clone(), state.clone());
        move |c: &mut Config| {
            kube_config(c, vec![kc]);
            // A CA that survives a restart of the bridge.
            let istio_ca_bridge::config::BackendConfig::Local(l) = &mut c.backend else {
                unreachable!("tests start with the local backend")
            };
            l.state_dir = state;
            let ic = &mut c.kubernetes.istiod_cert;
            ic.enabled = true;
            ic.revisions = vec!["canary".into()];
            ic.ttl = Duration::from_secs(8);
            ic.renew_before = Duration::from_secs(renew_before);
            let le = &mut c.kubernetes.leader_election;
            le.lease_duration = Duration::from_secs(2);
            le.retry_period = Duration::from_millis(500);
        }
    };
    let b = Bridge::start_with(edit(5)).await;
    let field = |s: &serde_json::Value, k: &str| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(s["data"][k].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    eventually("istiod-tls written", Duration::from_secs(10), || async {
        fake.secret("istio-system", "istiod-tls").is_some()
    })
    .await;
    let s = fake.secret("istio-system", "istiod-tls").unwrap();
    assert_eq!(s["type"], "kubernetes.io/tls");
    let (crt, key, ca) = (
        field(&s, "tls.crt"),
        field(&s, "tls.key"),
        field(&s, "ca.crt"),
    );
    assert_eq!(ca, b.root_pem(), "ca.crt is the trust bundle");
    assert!(!crt.contains("PRIVATE KEY") && key.contains("PRIVATE KEY"));
    let info = pki::cert_info(&pki::parse_certs_pem(crt.as_bytes()).unwrap()[0]).unwrap();
    assert_eq!(
        info.dns_sans,
        vec!["istiod.istio-system.svc", "istiod-canary.istio-system.svc"]
    );
    assert!(!info.is_ca);
    // An independent verifier: chains to ca.crt for TLS servers, and the key matches.
    let dir = kdir.path();
    let (crt_f, key_f, ca_f) = (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt"));
    std::fs::write(&crt_f, &crt).unwrap();
    std::fs::write(&key_f, &key).unwrap();
    std::fs::write(&ca_f, &ca).unwrap();
    let p = |x: &std::path::PathBuf| x.display().to_string();
    let (ok, out) = openssl(&[
        "verify",
        "-purpose",
        "sslserver",
        "-CAfile",
        &p(&ca_f),
        &p(&crt_f),
    ]);
    assert!(ok, "{out}");
    let (_, cert_pub) = openssl(&["x509", "-noout", "-pubkey", "-in", &p(&crt_f)]);
    let (_, key_pub) = openssl(&["pkey", "-pubout", "-in", &p(&key_f)]);
    assert_eq!(cert_pub, key_pub, "tls.key belongs to tls.crt");

    // Renewed when less than renewBefore is left (8 s lifetime, 5 s before expiry).
    let serial = info.serial_hex.clone();
    eventually("istiod-tls renewed", Duration::from_secs(10), || async {
        let s = fake.secret("istio-system", "istiod-tls").unwrap();
        let crt = field(&s, "tls.crt");
        pki::cert_info(&pki::parse_certs_pem(crt.as_bytes()).unwrap()[0])
            .unwrap()
            .serial_hex
            != serial
    })
    .await;
    assert!(logs().contains("istiod certificate written"));
    assert!(no_log_contains_key(&key));
    b.shutdown().await.unwrap();

    // A restart with the same CA keeps a Secret that is still good (no new issuance).
    let s = fake.secret("istio-system", "istiod-tls").unwrap();
    let serial = pki::cert_info(&pki::parse_certs_pem(field(&s, "tls.crt").as_bytes()).unwrap()[0])
        .unwrap()
        .serial_hex;
    let applies = fake.count("secrets.apply");
    let gets = fake.count("secrets.get");
    let b = Bridge::start_with(edit(1)).await;
    eventually(
        "restarted bridge checked the Secret",
        Duration::from_secs(10),
        || async { fake.count("secrets.get") > gets },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = fake.secret("istio-system", "istiod-tls").unwrap();
    let now_serial =
        pki::cert_info(&pki::parse_certs_pem(field(&s, "tls.crt").as_bytes()).unwrap()[0])
            .unwrap()
            .serial_hex;
    assert_eq!(now_serial, serial, "existing certificate kept");
    assert_eq!(fake.count("secrets.apply"), applies);
    b.shutdown().await.unwrap();
}

/// The private key never shows up in what the bridges logged.
fn no_log_contains_key(key_pem: &str) -> bool {
    let body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    !logs().contains(&body[..40])
}

/// The local CA, with a trust bundle the test can change (root rotation, step 1: add the
/// new root beside the old one).
struct Rotating {
    inner: std::sync::Arc<dyn istio_ca_bridge::backend::Signer>,
    bundle: tokio::sync::watch::Sender<istio_ca_bridge::trust::SharedBundle>,
}

impl istio_ca_bridge::backend::Authority for Rotating {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn trust_bundle(&self) -> tokio::sync::watch::Receiver<istio_ca_bridge::trust::SharedBundle> {
        self.bundle.subscribe()
    }
    fn health(&self) -> istio_ca_bridge::backend::Health {
        self.inner.health()
    }
}

#[async_trait::async_trait]
impl istio_ca_bridge::backend::Signer for Rotating {
    async fn sign(
        &self,
        req: &istio_ca_bridge::backend::SignRequest,
    ) -> Result<istio_ca_bridge::backend::IssuedChain, istio_ca_bridge::backend::SignError> {
        self.inner.sign(req).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_change_reaches_every_configmap_and_istiod_tls() {
    use istio_ca_bridge::config::{BackendConfig, LocalConfig};
    use istio_ca_bridge::trust::TrustBundle;
    let fake = FakeKube::start_new().await;
    for ns in ["default", "istio-system"] {
        fake.put_namespace(ns);
    }
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let inner = BackendConfig::Local(LocalConfig {
        state_dir: kdir.path().join("ca"),
        ..Default::default()
    })
    .build(&istio_ca_bridge::backend::BuildContext {
        trust_domain: TD.into(),
        max_leaf_ttl: std::time::Duration::from_secs(86400),
        metrics: std::sync::Arc::new(istio_ca_bridge::metrics::Metrics::new(false)),
        rotation: Default::default(),
        ca_store: None,
    })
    .await
    .unwrap();
    let old = inner.trust_bundle().borrow().clone();
    let signer = std::sync::Arc::new(Rotating {
        inner,
        bundle: tokio::sync::watch::channel(old.clone()).0,
    });
    let b = Bridge::start_opts(
        |c| {
            kube_config(c, vec![kc]);
            c.kubernetes.root_config_map.enabled = true;
            c.kubernetes.root_config_map.resync_interval = Duration::from_secs(1);
            c.kubernetes.istiod_cert.enabled = true;
            let le = &mut c.kubernetes.leader_election;
            le.lease_duration = Duration::from_secs(2);
            le.retry_period = Duration::from_millis(500);
        },
        istio_ca_bridge::app::Options {
            signer: Some(signer.clone()),
        },
    )
    .await;
    const CM: &str = "istio-ca-root-cert";
    let published = |pem: String| {
        let fake = &fake;
        async move {
            let cms = ["default", "istio-system"].iter().all(|ns| {
                fake.configmap(ns, CM)
                    .is_some_and(|cm| cm["data"]["root-cert.pem"].as_str() == Some(pem.as_str()))
            });
            let secret = fake.secret("istio-system", "istiod-tls").is_some_and(|s| {
                base64::engine::general_purpose::STANDARD
                    .decode(s["data"]["ca.crt"].as_str().unwrap())
                    .unwrap()
                    == pem.as_bytes()
            });
            cms && secret
        }
    };
    eventually("old bundle published", Duration::from_secs(10), || {
        published(old.pem().to_string())
    })
    .await;

    // Rotation step 1: a new root joins the bundle; every ConfigMap and istiod's ca.crt
    // must carry both roots.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "new root");
    let new_root = p.self_signed(&key).unwrap();
    let mut roots = old.roots().to_vec();
    roots.push(new_root.der().clone());
    let both = TrustBundle::new(roots).unwrap();
    assert_eq!(both.roots().len(), 2);
    signer
        .bundle
        .send_replace(std::sync::Arc::new(both.clone()));
    eventually("two-root bundle published", Duration::from_secs(10), || {
        published(both.pem().to_string())
    })
    .await;

    // Someone deletes a ConfigMap: the resync puts it back.
    fake.delete_configmap("default", CM);
    assert!(fake.configmap("default", CM).is_none());
    eventually(
        "deleted ConfigMap restored",
        Duration::from_secs(10),
        || published(both.pem().to_string()),
    )
    .await;
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_elect_exactly_one_writer() {
    let fake = FakeKube::start_new().await;
    for ns in ["default", "istio-system", "shop"] {
        fake.put_namespace(ns);
    }
    let kdir = tempfile::tempdir().unwrap();
    let kc = cluster(&fake, kdir.path(), "Kubernetes", None);
    let edit = |c: &mut Config| {
        kube_config(c, vec![kc.clone()]);
        c.kubernetes.root_config_map.enabled = true;
        let le = &mut c.kubernetes.leader_election;
        le.lease_duration = Duration::from_secs(2);
        le.retry_period = Duration::from_millis(200);
    };
    // Both race to create the Lease (one gets 409 AlreadyExists) and then to renew it.
    let (a, b) = tokio::join!(Bridge::start_with(edit), Bridge::start_with(edit));
    let leader_metric = r#"istio_ca_bridge_kubernetes_leader{cluster="Kubernetes"} 1"#;
    eventually("a leader is elected", Duration::from_secs(10), || async {
        fake.configmap("shop", "istio-ca-root-cert").is_some()
    })
    .await;
    let holder = fake.lease("istio-system", "istio-ca-bridge").unwrap()["spec"]["holderIdentity"]
        .as_str()
        .unwrap()
        .to_string();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let leaders = [
            a.admin_get("/metrics").await.1.contains(leader_metric),
            b.admin_get("/metrics").await.1.contains(leader_metric),
        ];
        assert_eq!(leaders.iter().filter(|l| **l).count(), 1, "{leaders:?}");
        let now = fake.lease("istio-system", "istio-ca-bridge").unwrap();
        assert_eq!(
            now["spec"]["holderIdentity"],
            holder.as_str(),
            "leader changed"
        );
    }
    // They share one CA: one Secret, created once, and one root.
    assert_eq!(a.root_pem(), b.root_pem(), "one root for both replicas");
    let secret = fake
        .secret("istio-system", "istio-ca-bridge-ca")
        .expect("the CA Secret");
    assert!(secret["data"]["ca-key.pem"].is_string());
    assert_eq!(fake.count("secrets.replace"), 0);
    assert!(fake.count("secrets.create") <= 2);
    // Every ConfigMap holds the leader's root, not a mix.
    let winner = if a.admin_get("/metrics").await.1.contains(leader_metric) {
        a.root_pem()
    } else {
        b.root_pem()
    };
    for ns in ["default", "istio-system", "shop"] {
        let cm = fake.configmap(ns, "istio-ca-root-cert").unwrap();
        assert_eq!(cm["data"]["root-cert.pem"], winner.as_str(), "{ns}");
    }
    assert_eq!(
        fake.lease("istio-system", "istio-ca-bridge").unwrap()["spec"]["leaseTransitions"],
        0
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
