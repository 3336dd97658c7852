//! Fuzz target "guest_files": the input as a raw disk through OS inspection and a bounded
//! walk of every filesystem found; see diskconv::fuzzing::exercise_guest_files (shared
//! with tests/pure/fuzz_corpus.rs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskconv::fuzzing::exercise_guest_files(data);
});
