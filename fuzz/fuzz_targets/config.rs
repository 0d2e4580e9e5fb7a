//! Fuzz target `config`: `replited::config::Config::parse` (environment expansion, TOML, every
//! validation) on arbitrary text. It must never panic, overflow its stack or hang; every refusal
//! names the file; an accepted config has at least one database, each naming a file.
//! `tests/hostile.rs` replays the inputs kept under `core/tests/fixtures/fuzz/config/` through
//! the same checks.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Config::load refuses a file that is not UTF-8 before parsing (read_to_string); the text
    // is what reaches the parser.
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/fuzz/replited.toml");
    match replited::config::Config::parse(path, &text) {
        Ok(c) => {
            assert!(!c.databases.is_empty());
            for d in &c.databases {
                assert!(d.db.file_name().is_some(), "{}", d.db.display());
            }
        }
        Err(e) => assert!(e.to_string().contains("/fuzz/replited.toml"), "{e}"),
    }
});
