//! `istio-ca-bridge request`: what istio-agent does, from the command line. Generates a key
//! and an Istio-shaped CSR for a SPIFFE ID, calls CreateCertificate with a bearer token and
//! `clusterid`, verifies the returned chain against the returned roots (and against a
//! given root, if any), and writes key, certificate chain and roots to files.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::backend::Subject;
use crate::identity::SpiffeId;
use crate::pb::IstioCertificateRequest;
use crate::pb::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::pki::KeyType;
use crate::pki::{self, CsrShape};
use crate::trust::TrustBundle;

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    /// CA address, host:port (as in Istio's CA_ADDR).
    #[arg(long, default_value = "localhost:15012")]
    pub addr: String,
    /// Root certificate(s) to trust for the CA's serving certificate (PEM).
    #[arg(long)]
    pub ca_cert: PathBuf,
    /// TLS server name to verify (default: the host part of --addr).
    #[arg(long)]
    pub server_name: Option<String>,
    /// File holding the bearer token (e.g. a projected service account token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Client certificate and key for certificate-based renewal instead of a token.
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// SPIFFE ID to request.
    #[arg(long)]
    pub spiffe_id: String,
    /// Value of the clusterid header.
    #[arg(long, default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, value_enum, default_value = "ecdsa-p256")]
    pub key_type: CliKeyType,
    /// Requested lifetime (e.g. 24h); 0 asks for the server default.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Ask for another pod's identity (ztunnel's ImpersonatedIdentity).
    #[arg(long)]
    pub impersonate: Option<String>,
    /// Shape the CSR like ztunnel's (empty subject) instead of istio-agent's (O=).
    #[arg(long)]
    pub ztunnel: bool,
    /// Directory for key.pem, cert-chain.pem and root-cert.pem.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
    /// Call timeout.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CliKeyType {
    EcdsaP256,
    EcdsaP384,
    Rsa,
}

impl From<CliKeyType> for KeyType {
    fn from(k: CliKeyType) -> Self {
        match k {
            CliKeyType::EcdsaP256 => KeyType::EcdsaP256,
            CliKeyType::EcdsaP384 => KeyType::EcdsaP384,
            CliKeyType::Rsa => KeyType::Rsa,
        }
    }
}

/// Connects a TLS gRPC channel to the CA.
pub async fn connect(
    addr: &str,
    ca_pem: &[u8],
    server_name: Option<&str>,
    client_identity: Option<(Vec<u8>, Vec<u8>)>,
) -> anyhow::Result<Channel> {
    let host = server_name.map(str::to_string).unwrap_or_else(|| {
        addr.rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(addr)
            .trim_matches(['[', ']'])
            .to_string()
    });
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name(host);
    if let Some((cert, key)) = client_identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ch = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    Ok(ch)
}

pub async fn run(args: RequestArgs) -> anyhow::Result<()> {
    crate::install_crypto_provider();
    let id = SpiffeId::parse(&args.spiffe_id).context("--spiffe-id")?;
    let ca_pem = std::fs::read(&args.ca_cert)
        .with_context(|| format!("reading {}", args.ca_cert.display()))?;
    let token = match &args.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let client_identity = match (&args.client_cert, &args.client_key) {
        (Some(c), Some(k)) => Some((std::fs::read(c)?, std::fs::read(k)?)),
        _ => None,
    };
    if token.is_none() && client_identity.is_none() {
        bail!("give --token-file or --client-cert/--client-key");
    }
    let target = match &args.impersonate {
        Some(s) => SpiffeId::parse(s).context("--impersonate")?,
        None => id.clone(),
    };
    let key = pki::generate_key(args.key_type.into())?;
    let shape = if args.ztunnel {
        CsrShape::Ztunnel
    } else {
        CsrShape::IstioAgent
    };
    let csr = pki::workload_csr(&key, &target.uri(), shape)?;

    let channel = connect(
        &args.addr,
        &ca_pem,
        args.server_name.as_deref(),
        client_identity,
    )
    .await?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut metadata = prost_types::Struct::default();
    metadata.fields.insert(
        "CertSigner".into(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(String::new())),
        },
    );
    if let Some(imp) = &args.impersonate {
        metadata.fields.insert(
            crate::server::IMPERSONATED_IDENTITY.into(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(imp.clone())),
            },
        );
    }
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: args.ttl.as_secs() as i64,
        metadata: Some(metadata),
    });
    req.set_timeout(args.timeout);
    if let Some(t) = &token {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}")
                .parse()
                .context("token is not a valid header value")?,
        );
    }
    req.metadata_mut().insert(
        "clusterid",
        args.cluster_id.parse().context("--cluster-id")?,
    );
    let resp = client
        .create_certificate(req)
        .await
        .map_err(|s| anyhow::anyhow!("CreateCertificate failed: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let summary = verify_response(&resp.cert_chain, &target, &key)?;

    std::fs::create_dir_all(&args.out_dir)?;
    crate::backend::local::write_private(
        &args.out_dir.join("key.pem"),
        key.serialize_pem().as_bytes(),
    )?;
    let n = resp.cert_chain.len();
    let chain: String = resp.cert_chain[..n - 1].concat();
    std::fs::write(args.out_dir.join("cert-chain.pem"), chain)?;
    std::fs::write(args.out_dir.join("root-cert.pem"), &resp.cert_chain[n - 1])?;
    println!("{summary}");
    println!(
        "wrote key.pem, cert-chain.pem, root-cert.pem to {}",
        args.out_dir.display()
    );
    Ok(())
}

/// Checks a CreateCertificate answer the way Istio's clients rely on it, returning a summary.
pub fn verify_response(
    chain: &[String],
    target: &SpiffeId,
    key: &rcgen::KeyPair,
) -> anyhow::Result<String> {
    if chain.len() < 2 {
        bail!(
            "response has {} elements; Istio needs at least leaf and roots",
            chain.len()
        );
    }
    for (i, el) in chain.iter().enumerate() {
        if !el.ends_with('\n') {
            bail!("element {i} does not end with a newline");
        }
        let n = pki::parse_certs_pem(el.as_bytes())?.len();
        if i + 1 < chain.len() && n != 1 {
            bail!("element {i} holds {n} certificates; only the last may hold several");
        }
    }
    let leaf = pki::parse_certs_pem(chain[0].as_bytes())?.remove(0);
    let intermediates: Vec<_> = chain[1..chain.len() - 1]
        .iter()
        .map(|p| pki::parse_certs_pem(p.as_bytes()).map(|mut v| v.remove(0)))
        .collect::<Result<_, _>>()?;
    let bundle = TrustBundle::from_pem(chain[chain.len() - 1].as_bytes())?;
    // The same check the bridge applies before answering, here from the client's side;
    // a leaf outliving its root is the bridge's policy (policy.acceptLongerLifetimes may
    // allow it), not something Istio's clients refuse.
    match crate::trust::check_issued(
        &leaf,
        &intermediates,
        &bundle,
        &Subject::Workload(target.clone()),
        &rcgen::PublicKeyData::subject_public_key_info(key),
        SystemTime::now(),
    ) {
        Ok(_) | Err(crate::trust::IssuedError::OutlivesRoot { .. }) => {}
        Err(e) => return Err(anyhow::Error::new(e).context("returned chain does not verify")),
    }
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf)?;
    let info = pki::cert_info(&leaf)?;
    Ok(format!(
        "identity:   {target}\nserial:     {}\nnot before: {}\nnot after:  {}\nissuer:     {}\nchain:      leaf + {} intermediate(s) + {} root(s)",
        info.serial_hex,
        humantime::format_rfc3339_seconds(pki::from_unix(info.not_before)),
        humantime::format_rfc3339_seconds(pki::from_unix(info.not_after)),
        cert.issuer(),
        chain.len() - 2,
        bundle.roots().len(),
    ))
}
