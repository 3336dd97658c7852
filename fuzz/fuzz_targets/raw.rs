//! Fuzz target "raw": see diskconv::fuzzing::exercise (shared with tests/pure/fuzz_corpus.rs).
#![no_main]
#[allow(unused_imports)]
use diskconv::Format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskconv::fuzzing::exercise(data, Some(Format::Raw));
});
