//! Fuzz target `wal_header`: a thin wrapper around `replited_core::fuzzing::wal_header`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| replited_core::fuzzing::wal_header(data));
