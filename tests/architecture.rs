//! The structure docs/architecture.md describes, checked on the source text so it cannot
//! silently rot:
//! - top-level modules only import downward, in the layer order below (so there are no
//!   import cycles between them);
//! - no source file is over 800 lines, and the config root stays under 500;
//! - each backend is one folder whose files no other backend's folder imports;
//! - backends do not verify their own answers (only `trust::verify`, through
//!   `backend::checked`, does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Lowest first. A module may import modules of a lower layer only (the same layer does
/// not count as lower, so two modules of one layer never import each other).
const LAYERS: &[&[&str]] = &[
    &["identity", "pb"],
    &["validate", "pki", "jwks"],
    &["trust", "rotation"],
    &["metrics"],
    &["backend"],
    &["config"],
    &["k8s"],
    &["audit", "dev"],
    &["server"],
    &["publish", "admin"],
    &["cli", "app"],
    // Test support (feature `testing`): builds whole bridges, so it sits on top.
    &["testing"],
];

const BACKENDS: &[&str] = &["local", "vault", "aws_pca", "digicert", "cert_manager"];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file's text without its trailing `#[cfg(test)] mod tests` (tests may use anything
/// they test against).
fn non_test(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Every `crate::<name>` the code refers to (comments, where doc links may point
/// anywhere, do not count).
fn crate_refs(text: &str) -> Vec<String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `istio_ca_bridge::` is not this pattern; `$crate::` is fine
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

/// The top-level module a file under src/ belongs to (`src/backend/vault/x.rs` ->
/// `backend`), or None for lib.rs, main.rs and binaries.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.trim_end_matches(".rs").to_string();
    (!matches!(name.as_str(), "lib" | "main" | "bin")).then_some(name)
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

#[test]
fn top_level_modules_import_only_lower_layers() {
    let src = src_dir();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for f in &files {
        let Some(from) = top_module(&src, f) else {
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for to in crate_refs(non_test(&text)) {
            if to != from && rank(&to).is_some() {
                edges
                    .entry((from.clone(), to))
                    .or_default()
                    .push(f.strip_prefix(&src).unwrap().display().to_string());
            }
        }
    }
    let mut unknown: Vec<String> = files
        .iter()
        .filter_map(|f| top_module(&src, f))
        .filter(|m| rank(m).is_none())
        .collect();
    unknown.dedup();
    assert!(
        unknown.is_empty(),
        "top-level modules missing from LAYERS (add them where they belong): {unknown:?}"
    );
    let upward: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| rank(to).unwrap() >= rank(from).unwrap())
        .map(|((from, to), files)| format!("{from} -> {to} (in {})", files.join(", ")))
        .collect();
    assert!(
        upward.is_empty(),
        "imports that go sideways or upward between top-level modules:\n  {}",
        upward.join("\n  ")
    );
}

#[test]
fn no_source_file_is_over_800_lines_and_the_config_root_under_500() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("tests"), &mut files);
    let long: Vec<String> = files
        .iter()
        .map(|f| (f, std::fs::read_to_string(f).unwrap().lines().count()))
        .filter(|(_, n)| *n > 800)
        .map(|(f, n)| format!("{} ({n} lines)", f.display()))
        .collect();
    assert!(long.is_empty(), "files over 800 lines: {long:?}");
    let config = std::fs::read_to_string(root.join("src/config.rs")).unwrap();
    assert!(
        config.lines().count() < 500,
        "src/config.rs is the config root; keep it small"
    );
}

#[test]
fn backend_folders_do_not_import_each_other() {
    let backend = src_dir().join("backend");
    for b in BACKENDS {
        let mut files = vec![backend.join(format!("{b}.rs"))];
        rust_files(&backend.join(b), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for other in BACKENDS.iter().filter(|o| *o != b) {
                for pattern in [
                    format!("backend::{other}::"),
                    format!("super::{other}::"),
                    format!("super::super::{other}::"),
                ] {
                    assert!(
                        !non_test(&text).contains(&pattern),
                        "{} uses {other}'s code ({pattern}); shared code belongs in backend::remote or backend itself",
                        f.display()
                    );
                }
            }
        }
    }
}

#[test]
fn backends_do_not_check_their_own_answers() {
    // The one leaf check is trust::verify::check_issued, applied to every signer by
    // backend::checked. A backend that verifies paths or compares keys itself is a second
    // copy that can drift (intermediate mode checks its own CA certificate, which is not
    // an answer to a caller, so it is not listed here).
    let backend = src_dir().join("backend");
    for b in BACKENDS {
        let mut files = vec![backend.join(format!("{b}.rs"))];
        rust_files(&backend.join(b), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for pattern in ["verify_path(", "check_issued(", "!= req.public_key_der"] {
                assert!(
                    !non_test(&text).contains(pattern),
                    "{} checks its own answers ({pattern}); leave that to backend::checked",
                    f.display()
                );
            }
        }
    }
}
