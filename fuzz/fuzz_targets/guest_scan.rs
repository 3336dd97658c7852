//! Fuzz target "guest_scan": the input as a raw disk through the partition table and
//! filesystem scanners; see diskconv::fuzzing::exercise_guest_scan (shared with
//! tests/pure/fuzz_corpus.rs).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskconv::fuzzing::exercise_guest_scan(data);
});
