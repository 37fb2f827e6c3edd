//! External tools the tests use as independent peers (openssl, promtool, python3) and
//! subprocesses under a deadline. Tests never skip: a missing tool fails with an install
//! hint.

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Fails with an install hint if an external tool is missing (tests never skip).
pub fn require_tool(tool: &str, hint: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required by this test but was not found: {hint}"
    );
}

/// Runs openssl with args; returns (success, stdout+stderr).
pub fn openssl(args: &[&str]) -> (bool, String) {
    require_tool("openssl", "apt-get install -y openssl");
    let out = Command::new("openssl").args(args).output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// How to get promtool when it is missing.
pub const PROMTOOL_HINT: &str =
    "apt-get install -y prometheus (Debian/Ubuntu package that ships promtool)";

/// Runs `promtool check metrics` on `text` (an independent linter of the exposition
/// format); returns (exit code, output lines).
pub async fn promtool(text: &str) -> (Option<i32>, Vec<String>) {
    require_tool("promtool", PROMTOOL_HINT);
    let out = run_with_timeout(
        "promtool",
        &["check", "metrics"],
        &[],
        Some(text.as_bytes()),
        Duration::from_secs(60),
    )
    .await;
    let lines = out
        .stdout
        .lines()
        .chain(out.stderr.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    (out.code, lines)
}

/// Fails with an install hint unless `python3` can import every module in `modules`
/// (comma-separated, as in an `import` statement). Tests never skip.
pub fn require_python_modules(modules: &str, hint: &str) {
    require_tool("python3", "apt-get install -y python3");
    let out = Command::new("python3")
        .arg("-c")
        .arg(format!("import {modules}"))
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 modules {modules} are required by this test but do not import: {hint}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Output of a subprocess run under a deadline.
pub struct ProcOutput {
    /// Exit code; `None` if killed by a signal.
    pub code: Option<i32>,
    /// Its standard output, lossily decoded.
    pub stdout: String,
    /// Its standard error, lossily decoded.
    pub stderr: String,
}

impl ProcOutput {
    /// Exit code and both streams, for a failing assertion's message.
    pub fn describe(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `program args` with extra `envs` and `stdin` bytes, killing it after `limit`
/// (which fails the test). Never waits longer than `limit`.
pub async fn run_with_timeout(
    program: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> ProcOutput {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(envs.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    if let Some(data) = stdin {
        // Written concurrently so that a child filling its stdout pipe cannot deadlock us.
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
    }
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(out) => {
            let out = out.unwrap();
            ProcOutput {
                code: out.status.code(),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
        Err(_) => panic!("{program} {args:?} did not finish within {limit:?} (killed)"),
    }
}

/// A loopback port that was free a moment ago, for configs that must name a fixed port
/// (a child process cannot report what port 0 became).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
