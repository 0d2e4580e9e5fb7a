//! Fuzz target `restore_config`: `replited::server::parse_restore_config`, the replica's
//! decoder of the storage description a primary sends in `RestoreConfig` (opaque bytes on the
//! wire, TOML inside). It must never panic or hang; what it accepts is a directory or an S3
//! bucket with a name. `tests/hostile.rs` replays the inputs kept under
//! `core/tests/fixtures/fuzz/restore_config/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use replited::server::{parse_restore_config, RestoreSource};

fuzz_target!(|data: &[u8]| {
    if let Ok(src) = parse_restore_config(data) {
        match src {
            RestoreSource::Fs(p) => assert!(std::str::from_utf8(data).is_ok(), "{}", p.display()),
            RestoreSource::S3(_, name) => assert!(std::str::from_utf8(data).is_ok(), "{name}"),
        }
    }
});
