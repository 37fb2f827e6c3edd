//! The tracing output of every bridge in a test binary, kept in memory so that tests can
//! assert on what the bridge logged (refusal reasons, secrets never logged).

use std::sync::{Arc, Mutex, OnceLock};

/// Everything the bridges of this test binary logged so far (`istio_ca_bridge=info,warn`).
/// The first call installs the global subscriber, so call it before starting a bridge.
/// Tests run in parallel, so assertions look for text unique to their case.
pub fn logs() -> String {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    let buf = BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "istio_ca_bridge=info,warn",
            ))
            .with_ansi(false)
            .with_writer(move || LogWriter(w.clone()))
            .try_init();
        buf
    });
    String::from_utf8_lossy(&buf.lock().unwrap()).into_owned()
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
