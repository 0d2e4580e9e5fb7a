//! Fuzz target `proto_frame`: a thin wrapper around `replited_core::fuzzing::proto_frame`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| replited_core::fuzzing::proto_frame(data));
