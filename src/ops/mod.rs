//! The commands as library functions: each opens files through the format dispatch and
//! runs the core on them. The CLI is a thin shell over these; other crates call them too.

pub mod convert;
pub mod discard;
pub mod resize;
pub mod sparsify;
pub mod stream;
