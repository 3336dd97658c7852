//! vdi: not yet implemented (placeholder so the dispatch compiles; the format issue replaces it).

use std::fs::File;

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::formats::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

/// Options `-O vdi` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[];

/// Does the start of a file look like vdi?
pub fn probe(head: &[u8]) -> bool {
    head.len() >= 0x44 && head[0x40..0x44] == [0x7f, 0x10, 0xda, 0xbe]
}

/// Open a vdi image.
pub fn open(_file: HostFile, _opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Err(Error::unsupported("vdi images are not supported yet"))
}

/// Make a vdi writer.
pub fn create_writer(_file: File, _opts: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported(
        "writing vdi images is not supported yet",
    ))
}
