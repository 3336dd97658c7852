//! One file per subcommand: its flags (a `clap::Args` struct, whose doc comment and
//! `#[command]` attributes are the command's `--help`) and its `exec`.

#[cfg(feature = "remote")]
pub mod abort_uploads;
pub mod cat;
pub mod check;
pub mod compare;
pub mod convert;
pub mod copy_out;
pub mod create;
pub mod info;
pub mod inspect;
pub mod ls;
pub mod map;
pub mod measure;
#[cfg(feature = "remote")]
pub mod register;
pub mod resize;
pub mod snapshot;
pub mod sparsify;
