//! The state directory (`intermediate.stateDir`): the current intermediate's key (mode
//! 0600, directory 0700), its chain and the trust bundle it was checked with, so a
//! restarted replica reuses it instead of asking the backend again, even while the
//! backend is down ([`stored_bundle`]).

use std::path::Path;

use super::generation::{Generation, check_and_build};
use super::{IntermediateConfig, IntermediateError, now_secs};
use crate::backend::{IssuedChain, local, remote};
use crate::pki;
use crate::trust::TrustBundle;

const KEY_FILE: &str = "intermediate-key.pem";
const CHAIN_FILE: &str = "intermediate-chain.pem";
/// The trust bundle when the intermediate was stored: lets a replica restarted during a
/// backend outage start with its stored intermediate ([`stored_bundle`]).
const ROOTS_FILE: &str = "roots.pem";

fn state_err(path: &Path, e: impl std::fmt::Display) -> IntermediateError {
    IntermediateError::State {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Loads a still-usable intermediate from the state directory; `None` when there is none,
/// it expires within `readyMargin`, or no longer chains to the bundle.
pub(super) fn load(
    dir: &Path,
    cfg: &IntermediateConfig,
    trust_domain: &str,
    bundle: &TrustBundle,
) -> Result<Option<Generation>, IntermediateError> {
    let (kp, cp) = (dir.join(KEY_FILE), dir.join(CHAIN_FILE));
    if !kp.exists() || !cp.exists() {
        return Ok(None);
    }
    let key = pki::load_key_pair(&std::fs::read(&kp).map_err(|e| state_err(&kp, e))?)
        .map_err(|e| state_err(&kp, e))?;
    let mut certs = pki::parse_certs_pem(&std::fs::read(&cp).map_err(|e| state_err(&cp, e))?)
        .map_err(|e| state_err(&cp, e))?;
    let leaf = certs.remove(0);
    let issued = IssuedChain::new(leaf, certs);
    match check_and_build(issued, key, cfg, trust_domain, bundle) {
        Ok(g) if g.remaining(now_secs()) > cfg.ready_margin.as_secs() as i64 => Ok(Some(g)),
        Ok(g) => {
            tracing::info!(serial = %g.serial(), "the stored intermediate CA is about to expire; getting a new one");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(error = %remote::error_chain(&e), "the stored intermediate CA is unusable; getting a new one");
            Ok(None)
        }
    }
}

/// The roots stored beside a usable intermediate in `dir`, if there is one: a replica
/// restarted while the backend is down can then start from its stored intermediate.
pub fn stored_bundle(
    dir: &Path,
    cfg: &IntermediateConfig,
    trust_domain: &str,
) -> Option<TrustBundle> {
    let roots = std::fs::read(dir.join(ROOTS_FILE)).ok()?;
    let bundle = TrustBundle::from_pem(&roots).ok()?;
    load(dir, cfg, trust_domain, &bundle).ok()??;
    Some(bundle)
}

pub(super) fn save(
    dir: &Path,
    g: &Generation,
    bundle: &TrustBundle,
) -> Result<(), IntermediateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| state_err(dir, e))?;
    local::write_private(&dir.join(KEY_FILE), g.key_pem.as_bytes())
        .map_err(|e| state_err(dir, e))?;
    local::write_file(&dir.join(CHAIN_FILE), g.chain_pem.as_bytes(), 0o644)
        .map_err(|e| state_err(dir, e))?;
    local::write_file(&dir.join(ROOTS_FILE), bundle.pem().as_bytes(), 0o644)
        .map_err(|e| state_err(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::intermediate::test_support::{cfg, chain, generation};

    #[test]
    fn state_round_trips_with_a_private_key_file() {
        let (bundle, g) = generation();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("int");
        save(&state, &g, &bundle).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&state), 0o700);
        let back = load(&state, &cfg(), "cluster.local", &bundle)
            .unwrap()
            .unwrap();
        assert_eq!(back.serial(), g.serial());
        assert_eq!(
            stored_bundle(&state, &cfg(), "cluster.local")
                .unwrap()
                .roots(),
            bundle.roots()
        );
        // Another root: the stored one is not used.
        let (other, _, _) = chain(Some(0), true);
        assert!(
            load(&state, &cfg(), "cluster.local", &other)
                .unwrap()
                .is_none()
        );
    }
}
