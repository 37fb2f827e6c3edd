//! A development token issuer, so that the quickstart works on a laptop with no cluster:
//! an ES256 key in a directory (mode 0600), its JWKS beside it, and `dev-token` to mint
//! service-account-shaped tokens. Enabled only by `authn.devIssuer`; never in production.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::backend::local::{write_file, write_private};
use crate::config::{DEV_ISSUER, KeyType};
use crate::pki;

const KEY_FILE: &str = "issuer-key.pem";
const JWKS_FILE: &str = "jwks.json";
const KID: &str = "dev-1";

pub fn jwks_path(dir: &Path) -> PathBuf {
    dir.join(JWKS_FILE)
}

/// Creates the issuer key and JWKS in `dir` if missing.
pub fn ensure(dir: &Path) -> anyhow::Result<()> {
    let key_path = dir.join(KEY_FILE);
    if key_path.exists() && jwks_path(dir).exists() {
        return Ok(());
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let key = pki::generate_key(KeyType::EcdsaP256)?;
    // The raw public key is the uncompressed point 04 || X || Y.
    let raw = rcgen::PublicKeyData::der_bytes(&key);
    anyhow::ensure!(
        raw.len() == 65 && raw[0] == 4,
        "unexpected EC point encoding"
    );
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": KID,
        "x": b64(&raw[1..33]), "y": b64(&raw[33..65]),
    }]});
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_file(
        &jwks_path(dir),
        serde_json::to_vec_pretty(&jwks)?.as_slice(),
        0o644,
    )?;
    tracing::warn!(dir = %dir.display(), "created a development token issuer; do not use in production");
    Ok(())
}

/// Mints a token as Kubernetes would project it for `<namespace>/<service_account>`.
pub fn mint(
    dir: &Path,
    namespace: &str,
    service_account: &str,
    audience: &str,
    ttl: Duration,
) -> anyhow::Result<String> {
    let pem = std::fs::read(dir.join(KEY_FILE)).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (start the bridge with authn.devIssuer.dir set to this directory first)",
            dir.join(KEY_FILE).display()
        )
    })?;
    let key = EncodingKey::from_ec_pem(&pem)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = serde_json::json!({
        "iss": DEV_ISSUER,
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        "aud": [audience],
        "iat": now,
        "nbf": now,
        "exp": now + ttl.as_secs(),
    });
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(KID.into());
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}
