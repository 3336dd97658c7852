//! vmdk: not yet implemented (placeholder so the dispatch compiles; the format issue replaces it).

use std::fs::File;

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::formats::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

/// Options `-O vmdk` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[];

/// Does the start of a file look like vmdk?
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"KDMV") || head.starts_with(b"# Disk DescriptorFile")
}

/// Open a vmdk image.
pub fn open(_file: HostFile, _opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Err(Error::unsupported("vmdk images are not supported yet"))
}

/// Make a vmdk writer.
pub fn create_writer(_file: File, _opts: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported(
        "writing vmdk images is not supported yet",
    ))
}
