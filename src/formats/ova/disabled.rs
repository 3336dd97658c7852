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

/// Why an appliance is not written into or changed in place: its disk is a member of a
/// tar archive, whose length the archive's headers and manifest fix.
pub fn in_place_refused() -> Error {
    Error::unsupported("an OVA appliance cannot be changed in place: convert its disk instead")
}

/// Why `check` does not check an appliance: its disk is checked as the image it is.
pub fn check_refused() -> Error {
    Error::unsupported("check an OVA appliance's disk: extract it or convert it first")
}
