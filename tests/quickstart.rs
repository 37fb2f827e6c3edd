//! The README quickstart, run for real: the binary serves config/local.yaml (ports and state
//! moved to a temp dir), `dev-token` mints a token, `request` gets and verifies a certificate,
//! and OpenSSL verifies what `request` wrote.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use istio_ca_bridge::config::Config;
use istio_ca_bridge::testing::*;

const BIN: &str = env!("CARGO_BIN_EXE_istio-ca-bridge");

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.0 GET (no client library needed for a probe).
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn readme_quickstart_works_end_to_end() {
    require_tool("openssl", "apt-get install -y openssl");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let mut cfg = Config::load(std::path::Path::new("config/local.yaml")).unwrap();
    let (grpc, admin) = (free_port(), free_port());
    cfg.server.listen = format!("127.0.0.1:{grpc}").parse().unwrap();
    cfg.admin.listen = format!("127.0.0.1:{admin}").parse().unwrap();
    cfg.authn.dev_issuer.as_mut().unwrap().dir = d.join("dev-issuer");
    let istio_ca_bridge::config::BackendConfig::Local(l) = &mut cfg.backend else {
        unreachable!("tests start with the local backend")
    };
    l.state_dir = d.join("local-ca");
    let cfg_path = d.join("local.yaml");
    std::fs::write(&cfg_path, serde_norway::to_string(&cfg).unwrap()).unwrap();

    let _server = Killed(
        Command::new(BIN)
            .args(["serve", "--config", cfg_path.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("serve.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = http_get(admin, "/readyz")
            .is_some_and(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"));
        if ready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "bridge never became ready: {}",
            std::fs::read_to_string(d.join("serve.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let tok = Command::new(BIN)
        .args([
            "dev-token",
            "--dir",
            d.join("dev-issuer").to_str().unwrap(),
            "--namespace",
            "default",
            "--service-account",
            "demo",
        ])
        .output()
        .unwrap();
    assert!(
        tok.status.success(),
        "{}",
        String::from_utf8_lossy(&tok.stderr)
    );
    std::fs::write(d.join("demo.token"), &tok.stdout).unwrap();

    for (key_type, extra) in [("ecdsa-p256", None), ("rsa", Some("--ztunnel"))] {
        let out_dir = d.join(format!("out-{key_type}"));
        let mut args = vec![
            "request".to_string(),
            "--addr".into(),
            format!("localhost:{grpc}"),
            "--ca-cert".into(),
            d.join("local-ca/root-cert.pem").display().to_string(),
            "--token-file".into(),
            d.join("demo.token").display().to_string(),
            "--spiffe-id".into(),
            "spiffe://cluster.local/ns/default/sa/demo".into(),
            "--key-type".into(),
            key_type.into(),
            "--out-dir".into(),
            out_dir.display().to_string(),
        ];
        if let Some(e) = extra {
            args.push(e.into());
        }
        let req = Command::new(BIN).args(&args).output().unwrap();
        let stdout = String::from_utf8_lossy(&req.stdout);
        assert!(
            req.status.success(),
            "request failed: {stdout}{}",
            String::from_utf8_lossy(&req.stderr)
        );
        assert!(
            stdout.contains("identity:   spiffe://cluster.local/ns/default/sa/demo"),
            "{stdout}"
        );
        let p = |n: &str| out_dir.join(n).display().to_string();
        let (ok, out) = openssl(&[
            "verify",
            "-CAfile",
            &p("root-cert.pem"),
            &p("cert-chain.pem"),
        ]);
        assert!(ok, "{out}");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(p("key.pem")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    // A token for another identity is refused, and `request` says why and fails.
    let req = Command::new(BIN)
        .args([
            "request",
            "--addr",
            &format!("localhost:{grpc}"),
            "--ca-cert",
            d.join("local-ca/root-cert.pem").to_str().unwrap(),
            "--token-file",
            d.join("demo.token").to_str().unwrap(),
            "--spiffe-id",
            "spiffe://cluster.local/ns/kube-system/sa/admin",
            "--out-dir",
            d.join("nope").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!req.status.success());
    assert!(
        String::from_utf8_lossy(&req.stderr).contains("Unauthenticated"),
        "{}",
        String::from_utf8_lossy(&req.stderr)
    );
}
