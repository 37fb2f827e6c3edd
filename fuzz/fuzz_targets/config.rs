//! `config::Config::parse` (YAML with field paths in errors) on arbitrary text, then
//! `validate` and the other pure functions of a parsed config.
#![no_main]

use istio_ca_bridge::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::parse(text) else {
        return;
    };
    let _ = cfg.validate();
    let _ = cfg.trust_domains();
    let _ = cfg.redacted_json();
});
