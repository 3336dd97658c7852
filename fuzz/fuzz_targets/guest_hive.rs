//! Fuzz target "guest_hive": the input as a Windows registry hive through the lookups
//! Windows inspection makes; see diskconv::fuzzing::exercise_hive (shared with
//! tests/pure/fuzz_corpus.rs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskconv::fuzzing::exercise_hive(data);
});
