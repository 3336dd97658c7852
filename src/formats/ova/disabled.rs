//! OVA without the `ova` feature: never probed, refused when named.

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::options::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

/// No options: the format is not built.
pub const CREATE_OPTIONS: &[OptionHelp] = &[];

fn off() -> Error {
    Error::unsupported("OVA support is not built in (cargo feature `ova`)")
}

/// Never matches.
pub fn probe(_head: &[u8], _file_len: u64) -> bool {
    false
}

/// Refused.
pub fn open(_file: HostFile, _opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Err(off())
}

/// Refused.
pub fn create_writer(
    _file: crate::writer::Sink,
    _dest: &std::path::Path,
    _opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    Err(off())
}
