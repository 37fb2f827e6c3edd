//! Thin entry point: parse arguments, set up logging, then hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use istio_ca_bridge::{app, cli, config::Config, dev};

#[derive(Parser)]
#[command(
    name = "istio-ca-bridge",
    version,
    about = "Istio external CA backed by your own PKI"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "ISTIO_CA_BRIDGE_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the CA.
    Serve {
        #[arg(long, env = "ISTIO_CA_BRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and print the effective config (secrets redacted).
    CheckConfig { config: PathBuf },
    /// Request a certificate like istio-agent does, verify it and write it to files.
    Request(cli::request::RequestArgs),
    /// Rotate the local CA's root through a running bridge's admin port
    /// (docs/root-rotation.md).
    Rotate(cli::rotate::RotateArgs),
    /// Mint a token from the development issuer (authn.devIssuer).
    DevToken {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "default")]
        service_account: String,
        #[arg(long, default_value = "istio-ca")]
        audience: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

fn init_logging(format: LogFormat) {
    // vaultrs and rustify log every failed Vault request at ERROR without detail; the Vault
    // backend logs the same failures with their cause, once. RUST_LOG overrides this.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,vaultrs=off,rustify=off"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.log_format);
    istio_ca_bridge::install_crypto_provider();
    match args.cmd {
        Cmd::CheckConfig { config } => match cli::check_config(&config) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Cmd::DevToken {
            dir,
            namespace,
            service_account,
            audience,
            ttl,
        } => match dev::mint(&dir, &namespace, &service_account, &audience, ttl) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Request(r) => run_async(cli::request::run(r)),
        Cmd::Rotate(r) => run_async(cli::rotate::run(r)),
        Cmd::Serve { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            run_async(async move {
                let app = app::App::build(cfg, app::Options::default()).await?;
                app.run(app::shutdown_signal()).await
            })
        }
    }
}

fn run_async(f: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(f) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "fatal");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
