//! `istio-ca-bridge rotate status|start|advance|abort`: the root rotation, driven through a
//! running bridge's admin port (loopback, e.g. `kubectl port-forward` or `kubectl exec`, or a
//! bearer token from `admin.rotationTokenFile`).

use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Action {
    /// Show the phase, its wait and the roots.
    Status,
    /// Generate the next root and begin publishing it next to the current one.
    Start,
    /// Go to the next phase now (refused before its wait is over, unless --force).
    Advance,
    /// Step back one phase (never into a state where a live certificate stops chaining).
    Abort,
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    pub action: Action,
    /// The bridge's admin port.
    #[arg(
        long,
        default_value = "http://127.0.0.1:15014",
        env = "ISTIO_CA_BRIDGE_ADMIN"
    )]
    pub admin: String,
    /// Skip a phase's wait (advance) or the wait for the new root's certificates (abort).
    #[arg(long)]
    pub force: bool,
    /// Why the rotation starts (kept in its state and shown by status).
    #[arg(long)]
    pub reason: Option<String>,
    /// A file with the bearer token of admin.rotationTokenFile (for a non-loopback admin
    /// address).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Runs the step; prints the status as JSON. An `Err` carries the bridge's refusal.
pub async fn run(a: RotateArgs) -> anyhow::Result<()> {
    let base = a.admin.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mut req = match a.action {
        Action::Status => client.get(format!("{base}/rotation")),
        Action::Start | Action::Advance | Action::Abort => {
            let step = format!("{:?}", a.action).to_lowercase();
            let mut q: Vec<(&str, String)> = Vec::new();
            if a.force {
                q.push(("force", "true".into()));
            }
            if let Some(r) = &a.reason {
                q.push(("reason", r.clone()));
            }
            client.post(format!("{base}/rotation/{step}")).query(&q)
        }
    };
    if let Some(f) = &a.token_file {
        let t = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        req = req.bearer_auth(t.trim());
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("calling the admin port at {base}"))?;
    let code = resp.status();
    let body: serde_json::Value = resp
        .json()
        .await
        .with_context(|| format!("reading the answer of {base} ({code})"))?;
    if !code.is_success() {
        let msg = body["error"].as_str().unwrap_or("no reason given");
        anyhow::bail!("{code}: {msg}");
    }
    println!("{body:#}");
    Ok(())
}
