//! istio-ca-bridge-loadgen: drives CreateCertificate (or Vault/OpenBao `pki/sign` directly,
//! for a side-by-side figure) with N calls in flight over TLS, from CSRs and tokens made
//! before the clock starts so that client-side key generation is not measured.
//!
//! Reports requests/s, latency percentiles and errors by gRPC code (or HTTP status), as text
//! and, with `--json`, as one JSON object for scripts. SIGINT (Ctrl-C) stops starting calls
//! and reports what was done so far (a second one exits at once).
//!
//! Attack modes (hardening issue, see scripts/bench_attacks.py): `--no-token` sends no
//! authorization header, `--client-chain`/`--client-key` present a TLS client certificate
//! chain on every connection, `--junk-csr-bytes N` replaces each CSR by N junk bytes, and
//! `--make-padded-chain DIR` writes a leaf padded with self-issued CAs and exits.
//!
//! `--impersonate` makes each call ztunnel's: the caller's token is a node agent's and the
//! identity asked for goes in `ImpersonatedIdentity` (scripts/bench_scale.py).

#[path = "loadgen/chain.rs"]
mod chain;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use istio_ca_bridge::config::KeyType;
use istio_ca_bridge::pb::IstioCertificateRequest;
use istio_ca_bridge::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use istio_ca_bridge::pki::{self, CsrShape};

#[derive(Parser, Debug)]
#[command(name = "istio-ca-bridge-loadgen")]
struct Args {
    /// Target: `bridge` (CreateCertificate over gRPC) or `vault` (POST /v1/<mount>/sign/<role>).
    #[arg(long, value_enum, default_value = "bridge")]
    target: Target,
    /// host:port of the bridge, or the Vault/OpenBao base URL (http://127.0.0.1:8200).
    #[arg(long, required_unless_present = "make_padded_chain")]
    addr: Option<String>,
    /// Root(s) trusted for the bridge's serving certificate.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Development issuer directory: tokens are minted per identity (authn.devIssuer).
    #[arg(long)]
    dev_issuer_dir: Option<PathBuf>,
    /// Vault token (target vault).
    #[arg(long, env = "VAULT_TOKEN")]
    vault_token: Option<String>,
    #[arg(long, default_value = "pki")]
    mount: String,
    #[arg(long, default_value = "istio")]
    role: String,
    /// Calls in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Distinct identities (each gets its own token and CSR).
    #[arg(long, default_value_t = 64)]
    identities: usize,
    /// Stop after this long...
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// ...or after this many calls (each identity once when equal to --identities).
    #[arg(long)]
    count: Option<u64>,
    /// Untimed calls before measuring.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    key_type: istio_ca_bridge::cli::request::CliKeyType,
    #[arg(long, default_value_t = 86400)]
    ttl: i64,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Send no authorization header (an unauthenticated caller).
    #[arg(long)]
    no_token: bool,
    /// Present this certificate chain (PEM, leaf first) as TLS client certificate.
    #[arg(long, requires = "client_key")]
    client_chain: Option<PathBuf>,
    /// Key of the --client-chain leaf (PEM).
    #[arg(long, requires = "client_chain")]
    client_key: Option<PathBuf>,
    /// Replace each CSR by this many junk bytes (large-message attack).
    #[arg(long)]
    junk_csr_bytes: Option<usize>,
    /// Write DIR/chain.pem and DIR/key.pem (a leaf followed by --padding-cas self-issued
    /// CAs) and exit.
    #[arg(long)]
    make_padded_chain: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    padding_cas: usize,
    /// Bearer tokens, one per line (e.g. Kubernetes service-account tokens): call i uses
    /// line i; replaces --dev-issuer-dir, and --identities becomes the number of lines.
    #[arg(long, conflicts_with_all = ["dev_issuer_dir", "no_token"])]
    tokens_file: Option<PathBuf>,
    /// Every call asks for this identity (`<namespace>/<service account>`) instead of
    /// `ns-<i % 100>/sa-<i>`; one CSR serves all calls.
    #[arg(long)]
    identity: Option<String>,
    /// Ask for each call's identity as `ImpersonatedIdentity`, with ztunnel's CSR shape:
    /// the token (`--tokens-file`) is then a node agent's acting for a pod on its node.
    #[arg(long)]
    impersonate: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Target {
    Bridge,
    Vault,
}

struct Work {
    csr: String,
    token: Option<String>,
    uri: String,
}

#[derive(Default)]
struct WorkerResult {
    latencies: Vec<Duration>,
    errors: BTreeMap<String, u64>,
}

enum Client {
    Grpc(IstioCertificateServiceClient<tonic::transport::Channel>),
    Http(reqwest::Client),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    istio_ca_bridge::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.make_padded_chain {
        let uri = format!("spiffe://{}/ns/default/sa/attacker", args.trust_domain);
        chain::write_padded_chain(dir, args.padding_cas, &uri)?;
        eprintln!(
            "wrote {0}/chain.pem (leaf + {1} self-issued CAs) and {0}/key.pem",
            dir.display(),
            args.padding_cas
        );
        return Ok(());
    }
    let addr = args.addr.clone().context("--addr is required")?;
    let key_type: KeyType = args.key_type.into();
    eprintln!(
        "preparing {} identities ({key_type:?} CSRs)...",
        args.identities
    );
    let junk = args.junk_csr_bytes.map(|n| "x".repeat(n));
    let file_tokens: Option<Vec<String>> = match &args.tokens_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        ),
        None => None,
    };
    let identities = file_tokens.as_ref().map_or(args.identities, Vec::len);
    let shape = if args.impersonate {
        CsrShape::Ztunnel
    } else {
        CsrShape::IstioAgent
    };
    let fixed = match &args.identity {
        Some(id) => {
            let (ns, sa) = id
                .split_once('/')
                .context("--identity is <namespace>/<service account>")?;
            let uri = format!("spiffe://{}/ns/{ns}/sa/{sa}", args.trust_domain);
            let csr = pki::workload_csr(&pki::generate_key(key_type)?, &uri, shape)?;
            Some((ns.to_string(), sa.to_string(), uri, csr))
        }
        None => None,
    };
    let work: Vec<Arc<Work>> = (0..identities)
        .map(|i| -> anyhow::Result<Arc<Work>> {
            let (ns, sa, uri, csr) = match &fixed {
                Some((ns, sa, uri, csr)) => (ns.clone(), sa.clone(), uri.clone(), csr.clone()),
                None => {
                    let ns = format!("ns-{}", i % 100);
                    let sa = format!("sa-{i}");
                    let uri = format!("spiffe://{}/ns/{ns}/sa/{sa}", args.trust_domain);
                    let csr = match &junk {
                        Some(j) => j.clone(),
                        None => pki::workload_csr(&pki::generate_key(key_type)?, &uri, shape)?,
                    };
                    (ns, sa, uri, csr)
                }
            };
            let csr = junk.clone().unwrap_or(csr);
            let token = match (&args.target, &args.dev_issuer_dir) {
                (Target::Bridge, _) if args.no_token => None,
                (Target::Bridge, _) if file_tokens.is_some() => {
                    file_tokens.as_ref().map(|t| t[i].clone())
                }
                (Target::Bridge, Some(dir)) => Some(istio_ca_bridge::dev::mint(
                    dir,
                    &ns,
                    &sa,
                    "istio-ca",
                    Duration::from_secs(3600),
                )?),
                (Target::Bridge, None) => {
                    anyhow::bail!(
                        "--dev-issuer-dir (or --no-token) is required for the bridge target"
                    )
                }
                (Target::Vault, _) => None,
            };
            Ok(Arc::new(Work { csr, token, uri }))
        })
        .collect::<Result<_, _>>()?;
    let identity = match (&args.client_chain, &args.client_key) {
        (Some(c), Some(k)) => Some((
            std::fs::read(c).with_context(|| format!("reading {}", c.display()))?,
            std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
        )),
        _ => None,
    };

    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(match args.target {
            Target::Bridge => {
                let ca = std::fs::read(args.ca_cert.as_ref().context("--ca-cert is required")?)?;
                let ch = istio_ca_bridge::cli::request::connect(
                    &addr,
                    &ca,
                    Some(&args.server_name),
                    identity.clone(),
                )
                .await?;
                Client::Grpc(IstioCertificateServiceClient::new(ch))
            }
            Target::Vault => Client::Http(
                reqwest::Client::builder()
                    .pool_max_idle_per_host(args.concurrency)
                    .build()?,
            ),
        });
    }
    let clients = Arc::new(clients);
    let work_len = work.len();
    let work = Arc::new(work);
    let stop = Arc::new(AtomicBool::new(false));
    tokio::spawn(stop_on_sigint(stop.clone()));

    if args.warmup > 0 {
        let w = Arc::new(AtomicU64::new(0));
        drive(
            &args,
            &addr,
            clients.clone(),
            work.clone(),
            (w, stop.clone()),
            Some(args.warmup),
            None,
        )
        .await;
    }
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let results = drive(
        &args,
        &addr,
        clients,
        work,
        (next, stop),
        args.count,
        args.duration,
    )
    .await;
    let elapsed = start.elapsed();

    let mut lat: Vec<Duration> = results
        .iter()
        .flat_map(|r| r.latencies.iter().copied())
        .collect();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for r in &results {
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    lat.sort();
    let ok = lat.len() as u64;
    let failed: u64 = errors.values().sum();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1000.0
    };
    let rps = ok as f64 / elapsed.as_secs_f64();
    // Every call that got an answer, refused or not: the rate of an attack.
    let calls_per_s = (ok + failed) as f64 / elapsed.as_secs_f64();
    let summary = serde_json::json!({
        "target": format!("{:?}", args.target).to_lowercase(),
        "concurrency": args.concurrency,
        "connections": args.connections,
        "identities": work_len,
        "key_type": format!("{key_type:?}"),
        "ok": ok,
        "failed": failed,
        "errors": errors,
        "elapsed_s": elapsed.as_secs_f64(),
        "rps": rps,
        "calls_per_s": calls_per_s,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": lat.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!(
            "{ok} ok, {failed} failed in {:.2}s: {rps:.0} req/s, p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; errors {errors:?}",
            elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            summary["max_ms"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

/// The first SIGINT sets `stop` (workers start no further call); a second one exits.
async fn stop_on_sigint(stop: Arc<AtomicBool>) {
    if tokio::signal::ctrl_c().await.is_ok() {
        stop.store(true, Ordering::Relaxed);
        eprintln!("interrupted: finishing the calls in flight");
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    }
}

/// Runs `concurrency` workers until `count` calls were started, `duration` passed or
/// `stop` is set.
async fn drive(
    args: &Args,
    addr: &str,
    clients: Arc<Vec<Client>>,
    work: Arc<Vec<Arc<Work>>>,
    (next, stop): (Arc<AtomicU64>, Arc<AtomicBool>),
    count: Option<u64>,
    duration: Option<Duration>,
) -> Vec<WorkerResult> {
    let deadline = duration.map(|d| Instant::now() + d);
    let count = match (count, duration) {
        (None, None) => Some(work.len() as u64),
        (c, _) => c,
    };
    let mut tasks = Vec::new();
    for w in 0..args.concurrency {
        let clients = clients.clone();
        let work = work.clone();
        let next = next.clone();
        let stop = stop.clone();
        let ttl = args.ttl;
        let impersonate = args.impersonate;
        let target = args.target;
        let addr = addr.to_string();
        let vault = (
            args.vault_token.clone().unwrap_or_default(),
            args.mount.clone(),
            args.role.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut res = WorkerResult::default();
            let client_idx = w % clients.len();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if count.is_some_and(|c| n >= c)
                    || deadline.is_some_and(|d| Instant::now() >= d)
                    || stop.load(Ordering::Relaxed)
                {
                    break;
                }
                let item = &work[(n as usize) % work.len()];
                let t0 = Instant::now();
                let outcome = match (&clients[client_idx], target) {
                    (Client::Grpc(c), _) => call_bridge(c.clone(), item, ttl, impersonate).await,
                    (Client::Http(c), _) => call_vault(c, &addr, &vault, item, ttl).await,
                };
                match outcome {
                    Ok(()) => res.latencies.push(t0.elapsed()),
                    Err(code) => *res.errors.entry(code).or_default() += 1,
                }
            }
            res
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await {
            out.push(r);
        }
    }
    out
}

async fn call_bridge(
    mut c: IstioCertificateServiceClient<tonic::transport::Channel>,
    w: &Work,
    ttl: i64,
    impersonate: bool,
) -> Result<(), String> {
    let metadata = impersonate.then(|| prost_types::Struct {
        fields: [(
            istio_ca_bridge::server::IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(w.uri.clone())),
            },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: w.csr.clone(),
        validity_duration: ttl,
        metadata,
    });
    if let Some(token) = &w.token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "bad token".to_string())?,
        );
    }
    req.metadata_mut().insert(
        "clusterid",
        tonic::metadata::MetadataValue::from_static("Kubernetes"),
    );
    match c.create_certificate(req).await {
        Ok(r) if r.get_ref().cert_chain.len() >= 2 => Ok(()),
        Ok(_) => Err("SHORT_CHAIN".into()),
        Err(s) => Err(istio_ca_bridge::server::code_name(s.code()).to_string()),
    }
}

async fn call_vault(
    c: &reqwest::Client,
    addr: &str,
    (token, mount, role): &(String, String, String),
    w: &Work,
    ttl: i64,
) -> Result<(), String> {
    let body = serde_json::json!({"csr": w.csr, "uri_sans": w.uri, "ttl": format!("{ttl}s")});
    let r = c
        .post(format!("{addr}/v1/{mount}/sign/{role}"))
        .header("X-Vault-Token", token)
        .json(&body)
        .send()
        .await
        .map_err(|e| {
            if e.is_connect() {
                "CONNECT".to_string()
            } else {
                "IO".to_string()
            }
        })?;
    if r.status().is_success() {
        let _ = r.bytes().await;
        Ok(())
    } else {
        Err(format!("HTTP_{}", r.status().as_u16()))
    }
}
