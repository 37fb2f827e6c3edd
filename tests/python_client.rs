//! An independent client stack talks to the real server: Python grpcio with stubs generated
//! from proto/ca.proto at run time and CSRs built by the `cryptography` package in
//! istio-agent and ztunnel shape (tests/python/ca_client.py). What it gets back is then
//! verified by OpenSSL. Nothing on the client side shares code with the server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use istio_ca_bridge::testing::*;
use serde_json::Value;

const PY_HINT: &str = "pip install grpcio grpcio-tools cryptography";
/// Per script run: protoc + key generation + a call take ~1 s; keepalive adds its idle time.
const SCRIPT_LIMIT: Duration = Duration::from_secs(90);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/ca_client.py")
}

/// Token and root files for the script, in the bridge's temp dir.
fn client_files(b: &Bridge, ns: &str, sa: &str) -> (String, String) {
    let token = b.dir.path().join(format!("token-{ns}-{sa}"));
    std::fs::write(&token, b.issuer.token(ns, sa)).unwrap();
    (
        token.display().to_string(),
        b.root_file().display().to_string(),
    )
}

/// Runs the script; returns its JSON summary and the raw output (for messages).
async fn run_script(
    b: &Bridge,
    mode: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (Value, ProcOutput) {
    require_python_modules("grpc, grpc_tools, cryptography", PY_HINT);
    let (token, root) = client_files(b, "default", "bookinfo");
    let address = format!("127.0.0.1:{}", b.grpc.port());
    let script = script().display().to_string();
    let mut args = vec![
        script.as_str(),
        mode,
        "--address",
        &address,
        "--server-name",
        "localhost",
        "--root",
        &root,
        "--token-file",
        &token,
        "--trust-domain",
        TD,
        "--ns",
        "default",
        "--sa",
        "bookinfo",
    ];
    args.extend_from_slice(extra);
    let out = run_with_timeout("python3", &args, envs, None, SCRIPT_LIMIT).await;
    let json: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("script printed no JSON ({e}):\n{}", out.describe()));
    (json, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_gets_verifiable_chains_for_istio_csr_shapes() {
    require_tool("openssl", "apt-get install -y openssl");
    let b = Bridge::start().await;
    let id = spiffe("default", "bookinfo");
    let mut expected_issued = 0;
    for shape in ["agent", "ztunnel"] {
        for key in ["ec", "rsa"] {
            let out_dir = b.dir.path().join(format!("py-{shape}-{key}"));
            let out_s = out_dir.display().to_string();
            let (json, out) = run_script(
                &b,
                "issue",
                &[
                    "--shape", shape, "--key", key, "--ttl", "86400", "--out", &out_s,
                ],
                &[],
            )
            .await;
            let what = format!("{shape}/{key}: {}", out.describe());
            assert_eq!(out.code, Some(0), "{what}");
            assert_eq!(json["ok"], true, "{what}");
            assert_eq!(json["problems"], serde_json::json!([]), "{what}");
            // Layout of protocol section 3, as the Python side saw it.
            assert!(json["chain_elements"].as_u64().unwrap() >= 2, "{what}");
            assert!(json["roots"].as_u64().unwrap() >= 1, "{what}");
            assert_eq!(json["uri_sans"], serde_json::json!([id]), "{what}");
            assert_eq!(json["dns_sans"], serde_json::json!([]), "{what}");
            assert_eq!(json["san_critical"], true, "{what}");
            assert_eq!(json["leaf_subject"], "", "{what}");
            let life = json["not_after"].as_i64().unwrap() - json["not_before"].as_i64().unwrap();
            assert_eq!(life, 86400 + 120, "{what}");
            if shape == "agent" {
                assert_eq!(json["o_encoding"], "PrintableString", "{what}");
            }

            // The files it wrote verify with OpenSSL for both TLS roles.
            let leaf = out_dir.join("leaf.pem").display().to_string();
            let root = out_dir.join("root.pem").display().to_string();
            assert_eq!(json["leaf_file"], leaf.as_str());
            assert_eq!(json["root_file"], root.as_str());
            for purpose in ["sslclient", "sslserver"] {
                let (ok, o) = openssl(&["verify", "-purpose", purpose, "-CAfile", &root, &leaf]);
                assert!(ok, "{shape}/{key}: openssl verify -purpose {purpose}: {o}");
                assert!(o.contains(": OK"), "{o}");
            }
            // The private key the client kept matches the certificate.
            let key_f = out_dir.join("key.pem").display().to_string();
            let (_, cert_pub) = openssl(&["x509", "-in", &leaf, "-noout", "-pubkey"]);
            let (ok, key_pub) = openssl(&["pkey", "-in", &key_f, "-pubout"]);
            assert!(ok, "{key_pub}");
            assert_eq!(cert_pub.trim(), key_pub.trim(), "{shape}/{key}");

            expected_issued += 1;
            assert_eq!(b.issued(), expected_issued, "{shape}/{key}");
        }
    }
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_gets_exact_error_codes() {
    let b = Bridge::start().await;
    let (json, out) = run_script(&b, "errors", &[], &[]).await;
    let what = out.describe();
    assert_eq!(out.code, Some(0), "{what}");
    assert_eq!(json["ok"], true, "{what}");
    let cases = json["cases"].as_array().unwrap();
    let got = |name: &str| {
        cases
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("case {name} missing: {what}"))["got"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(got("csr_for_other_namespace"), "UNAUTHENTICATED", "{what}");
    assert_eq!(got("garbage_csr_text"), "INVALID_ARGUMENT", "{what}");
    assert_eq!(got("garbage_csr_pem"), "INVALID_ARGUMENT", "{what}");
    assert_eq!(got("no_token"), "UNAUTHENTICATED", "{what}");
    assert_eq!(cases.len(), 4, "{what}");
    assert_eq!(b.issued(), 0, "no failed request may issue anything");
    // The server kept serving: the same client stack still gets a certificate.
    let out_s = b.dir.path().join("after-errors").display().to_string();
    let (json, out) = run_script(&b, "issue", &["--out", &out_s], &[]).await;
    assert_eq!(json["ok"], true, "{}", out.describe());
    assert_eq!(b.issued(), 1);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_keepalive_pings_every_second_do_not_get_the_channel_closed() {
    let b = Bridge::start().await;
    let (json, out) = run_script(
        &b,
        "keepalive",
        &["--idle", "5"],
        &[
            ("GRPC_VERBOSITY", "debug"),
            ("GRPC_TRACE", "http_keepalive"),
        ],
    )
    .await;
    let what = out.describe();
    assert_eq!(out.code, Some(0), "{what}");
    assert_eq!(json["ok"], true, "{what}");
    let calls = json["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{what}");
    assert!(calls.iter().all(|c| c["code"] == "OK"), "{what}");
    // Exactly one connection: IDLE/CONNECTING then READY, and never anything after READY.
    let states: Vec<&str> = json["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[1].as_str().unwrap())
        .collect();
    assert_eq!(states.last(), Some(&"READY"), "{what}");
    assert_eq!(
        states.iter().filter(|s| **s == "READY").count(),
        1,
        "{what}"
    );
    // The server never told the client to go away, for pings or anything else.
    let err = out.stderr.to_lowercase();
    for bad in [
        "too_many_pings",
        "too many pings",
        "goaway",
        "keepalive watchdog timeout",
    ] {
        assert!(!err.contains(bad), "client log mentions {bad:?}:\n{what}");
    }
    // And pings did flow and were answered while idle (otherwise this proves nothing):
    // the http_keepalive trace logs "Finish keepalive ping" for every ping ACK received.
    let acked = err.matches("finish keepalive ping").count();
    assert!(
        acked >= 3,
        "expected several acknowledged keepalive pings in the grpc trace, saw {acked}:\n{what}"
    );
    assert_eq!(b.issued(), 2);
    b.shutdown().await.unwrap();
}
