//! The integration tests that need nothing but the crate: the source's layering, the
//! library's public API, the fuzz corpus replayed.

#[path = "../common/mod.rs"]
mod common;

mod fuzz_corpus;
mod layering;
mod library_api;
