//! `istio-ca-bridge check-config` on the real binary: every shipped example is valid,
//! changes nothing on disk and prints an effective config that is itself valid; broken
//! configs exit 2 with a message that names the offending field.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_istio-ca-bridge")
}

/// Runs `check-config <file>` in `cwd`.
fn check_config(file: &Path, cwd: &Path) -> Output {
    Command::new(bin())
        .arg("check-config")
        .arg(file)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run istio-ca-bridge check-config")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every entry of `dir`, recursively, relative to it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.strip_prefix(dir).unwrap().to_path_buf());
        if p.is_dir() {
            out.extend(
                tree(&p)
                    .into_iter()
                    .map(|c| p.strip_prefix(dir).unwrap().join(c)),
            );
        }
    }
    out.sort();
    out
}

#[test]
fn every_example_config_passes_check_config_and_creates_nothing() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut examples: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    examples.sort();
    assert!(
        examples.iter().any(|p| p.ends_with("local.yaml")),
        "config/local.yaml is missing: {examples:?}"
    );
    let repo_before = tree(&dir);
    for example in &examples {
        // A fresh working directory: relative paths in the example (config/local.yaml's
        // `.state/...`) resolve here, and nothing may appear.
        let cwd = tempfile::tempdir().unwrap();
        let out = check_config(example, cwd.path());
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert!(
            out.status.success(),
            "{}: exit {}\nstderr:\n{stderr}",
            example.display(),
            out.status
        );
        assert_eq!(
            tree(cwd.path()),
            Vec::<PathBuf>::new(),
            "check-config {} created files in its working directory",
            example.display()
        );
        // The effective config is JSON, names every section, and is itself a valid config
        // that checks to the same effective config.
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "{}: effective config is not JSON ({e}):\n{stdout}",
                example.display()
            )
        });
        for section in [
            "trustDomain",
            "server",
            "admin",
            "authn",
            "policy",
            "backend",
            "metrics",
        ] {
            assert!(
                json.get(section).is_some(),
                "{}: no {section} in\n{stdout}",
                example.display()
            );
        }
        let effective = cwd.path().join("effective.json");
        std::fs::write(&effective, &stdout).unwrap();
        let again = check_config(&effective, cwd.path());
        assert!(
            again.status.success(),
            "{}: the printed effective config does not check:\n{}",
            example.display(),
            text(&again.stderr)
        );
        assert_eq!(
            text(&again.stdout),
            stdout,
            "{}: the effective config does not round-trip",
            example.display()
        );
    }
    assert_eq!(tree(&dir), repo_before, "check-config changed config/");
}

/// A broken config and what its error must say.
struct Broken {
    name: &'static str,
    yaml: &'static str,
    /// Every one of these must appear in stderr.
    expect: &'static [&'static str],
}

#[test]
fn broken_configs_exit_2_and_name_the_field() {
    let cases = [
        Broken {
            name: "unknown field",
            yaml: "server: {tls: {mdoe: files}}\n",
            expect: &["server.tls", "mdoe"],
        },
        Broken {
            name: "bad duration",
            yaml: "policy: {maxTtl: forever}\n",
            expect: &["policy.maxTtl", "forever"],
        },
        Broken {
            name: "bad enum",
            yaml: "policy: {overMax: sometimes}\n",
            expect: &["policy.overMax", "sometimes"],
        },
        Broken {
            name: "files mode without certFile",
            yaml: "server: {tls: {mode: files, keyFile: /etc/tls/tls.key}}\n",
            expect: &["server.tls.certFile"],
        },
        Broken {
            name: "JWT issuer with jwksFile and jwksUri",
            yaml: "authn:\n  jwt:\n    - issuer: https://a.test\n      jwksFile: /etc/jwks.json\n      jwksUri: https://a.test/jwks\n",
            expect: &["authn.jwt[0].jwksFile"],
        },
        Broken {
            name: "invalid trust domain",
            yaml: "trustDomain: \"Bad Domain\"\n",
            expect: &["trustDomain", "Bad Domain"],
        },
        Broken {
            name: "unknown backend type",
            yaml: "backend: {type: nosuch}\n",
            expect: &["backend", "nosuch"],
        },
        Broken {
            name: "no authenticator",
            yaml: "authn: {clientCert: false}\n",
            expect: &["authn", "no authenticator"],
        },
        Broken {
            name: "YAML syntax error",
            yaml: "trustDomain: cluster.local\nserver: a: b\n",
            expect: &["line 2"],
        },
        Broken {
            name: "YAML bad indentation",
            yaml: "server:\n  listen: 127.0.0.1:15012\n tls: {}\n",
            expect: &["line 3"],
        },
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let file = dir.path().join(format!("case{i}.yaml"));
        std::fs::write(&file, c.yaml).unwrap();
        let out = check_config(&file, dir.path());
        let stderr = text(&out.stderr);
        if out.status.code() != Some(2) {
            failures.push(format!(
                "{}: exit {} (want 2); stderr: {stderr}",
                c.name, out.status
            ));
            continue;
        }
        if !out.stdout.is_empty() {
            failures.push(format!(
                "{}: printed a config: {}",
                c.name,
                text(&out.stdout)
            ));
        }
        for want in c.expect {
            if !stderr.contains(want) {
                failures.push(format!("{}: stderr lacks {want:?}: {stderr}", c.name));
            }
        }
        // Parse errors also say which file.
        if stderr.contains("field `") && !stderr.contains(&file.display().to_string()) {
            failures.push(format!(
                "{}: stderr does not name the file: {stderr}",
                c.name
            ));
        }
    }

    // A path that does not exist.
    let missing = dir.path().join("no-such-dir/bridge.yaml");
    let out = check_config(&missing, dir.path());
    let stderr = text(&out.stderr);
    if out.status.code() != Some(2) || !stderr.contains(&missing.display().to_string()) {
        failures.push(format!(
            "missing file: exit {}, stderr: {stderr} (want 2 and the path)",
            out.status
        ));
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
