//! The test suite's fake Kubernetes API server (`istio_ca_bridge::testing::fake_kube`) as a
//! process of its own, for benchmarks that run the release bridge against it
//! (`scripts/bench_tokens.py`) and for the Helm chart's live run of its Kubernetes installs
//! (`tests/helm/check_chart.py live`). Built only with the `testing` feature.
//!
//! It writes into `--dir`:
//! - `kubeconfig`: for the bridge's `authn.kubernetes.clusters[].kubeconfig`;
//! - `real-tokens`: `--real` service-account tokens of `default/web`, signed by the cluster
//!   key and registered as valid (one per line);
//! - `junk-tokens`: `--junk` JWT-shaped tokens with the cluster key's `kid`, plausible claims
//!   and random signatures, which the fake does not know (one per line);
//! - `ready`, last, once it serves.
//!
//! `GET http://127.0.0.1:<--control-port>/counts` answers the requests seen per endpoint, as
//! JSON (`tokenreviews`, `jwks`). It runs until killed.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use istio_ca_bridge::testing::fake_kube::{CLUSTER_KID, FakeKube, junk_sa_jwt, sa_jwt};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    dir: PathBuf,
    #[arg(long)]
    control_port: u16,
    #[arg(long, default_value_t = 1)]
    real: usize,
    #[arg(long, default_value_t = 600)]
    junk: usize,
    /// Each TokenReview is answered after this long (an API server's latency).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5ms")]
    review_latency: Duration,
    /// Namespaces that exist from the start (repeatable); the bridge writes root ConfigMaps
    /// and `istiod-tls` only into existing ones.
    #[arg(long = "namespace")]
    namespaces: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let fake = std::sync::Arc::new(FakeKube::start_new().await);
    fake.set_review_delay(args.review_latency);
    for ns in &args.namespaces {
        fake.put_namespace(ns);
    }
    fake.write_kubeconfig(&args.dir.join("kubeconfig"), "Kubernetes");
    let mut real = String::new();
    for i in 0..args.real {
        let t = sa_jwt("default", "web", &format!("real-{i}"));
        fake.sa_token(&t, "default", "web", None);
        real.push_str(&t);
        real.push('\n');
    }
    std::fs::write(args.dir.join("real-tokens"), real)?;
    let junk: Vec<String> = (0..args.junk)
        .map(|n| junk_sa_jwt(CLUSTER_KID, n))
        .collect();
    std::fs::write(args.dir.join("junk-tokens"), junk.join("\n") + "\n")?;

    let counts = {
        let fake = fake.clone();
        axum::Router::new().route(
            "/counts",
            axum::routing::get(move || {
                let fake = fake.clone();
                async move {
                    serde_json::json!({
                        "tokenreviews": fake.count("tokenreviews"),
                        "jwks": fake.count("jwks"),
                    })
                    .to_string()
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.control_port)).await?;
    std::fs::write(args.dir.join("ready"), fake.addr.to_string())?;
    axum::serve(listener, counts).await?;
    Ok(())
}
