//! Fuzz target `proto_replica`: a thin wrapper around `replited_core::fuzzing::proto_replica`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| replited_core::fuzzing::proto_replica(data));
