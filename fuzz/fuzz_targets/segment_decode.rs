//! Fuzz target `segment_decode`: a thin wrapper around `replited_core::fuzzing::segment_decode`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| replited_core::fuzzing::segment_decode(data));
