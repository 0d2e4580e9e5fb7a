//! Fuzz target `file_name`: a thin wrapper around `replited_core::fuzzing::file_name`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| replited_core::fuzzing::file_name(data));
