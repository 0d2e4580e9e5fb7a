//! Fuzz target `proto_primary`: a thin wrapper around `replited_core::fuzzing::proto_primary`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| replited_core::fuzzing::proto_primary(data));
