//! vhd: not yet implemented (placeholder so the dispatch compiles; the format issue replaces it).

use std::fs::File;

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::formats::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

/// Options `-O vhd` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[];

/// Does the start of a file look like vhd?
pub fn probe(head: &[u8], tail: &[u8]) -> bool {
    head.starts_with(b"conectix") || tail.starts_with(b"conectix")
}

/// Open a vhd image.
pub fn open(_file: HostFile, _opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Err(Error::unsupported("vhd images are not supported yet"))
}

/// Make a vhd writer.
pub fn create_writer(_file: File, _opts: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported(
        "writing vhd images is not supported yet",
    ))
}
