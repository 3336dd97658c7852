//! stub
use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::inplace::InPlaceOptions;
use crate::writer::ImageWriter;

/// stub
pub fn open_in_place(
    _file: File,
    _path: &Path,
    _opts: &InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported("todo"))
}
