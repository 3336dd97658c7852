//! qcow2: not yet implemented (placeholder so the dispatch compiles; the format issue replaces it).

use std::fs::File;

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::formats::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

/// Options `-O qcow2` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[];

/// Does the start of a file look like qcow2?
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"QFI\xfb")
}

/// Open a qcow2 image.
pub fn open(_file: HostFile, _opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Err(Error::unsupported("qcow2 images are not supported yet"))
}

/// Make a qcow2 writer.
pub fn create_writer(_file: File, _opts: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported(
        "writing qcow2 images is not supported yet",
    ))
}
