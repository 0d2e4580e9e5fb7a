//! Fuzz target `wal_scan`: a thin wrapper around `replited_core::fuzzing::wal_scan`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| replited_core::fuzzing::wal_scan(data));
