//! diskconv: read, write and convert raw, qcow2, vhd (vpc), vmdk and vdi disk images.
//!
//! Every format is a [`BlockDevice`] (read side) and an [`ImageWriter`] (write side); one
//! engine ([`convert()`]) streams any device into any writer, reading only mapped data.
//! Files named inside an image (backing files, extents, parents) are never opened unless
//! the caller opts in with [`OpenOptions::allow_references`].
//!
//! ```no_run
//! use diskconv::{open, OpenOptions, DeviceReader};
//! let dev = open("disk.qcow2", &OpenOptions::new())?;
//! let mut reader = DeviceReader::new(dev);
//! std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
//! # Ok::<(), diskconv::Error>(())
//! ```
#![warn(missing_docs)]

pub mod convert;
pub mod device;
pub mod error;
pub mod formats;
#[doc(hidden)]
pub mod fuzzing;
pub mod inspect;
pub mod probe;
pub mod writer;

use std::path::Path;

pub use convert::{convert, convert_device, ConvertOptions, ConvertReport};
pub use device::{BlockDevice, DeviceReader, ImageInfo, Mapping, MappingKind};
pub use error::{Error, ErrorKind, Result};
pub use formats::{CreateOptions, Format, OpenOptions};
pub use inspect::{inspect, Finding, FindingKind, Inspection};
pub use writer::{AtomicOutput, ImageWriter};

// The README's code example is compiled as a doctest, so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Open the image at `path` for reading: the format named in `opts`, or the probed one.
pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    formats::open_with(path.as_ref(), opts)
}

/// Create an empty image (all zeros) of `format` at `path`, atomically; returns the
/// writer's notes (e.g. a size rounded up).
pub fn create(path: impl AsRef<Path>, format: Format, opts: &CreateOptions) -> Result<Vec<String>> {
    let path = path.as_ref();
    let (out, file) = AtomicOutput::create(path)?;
    let writer = formats::create_writer(format, file, path, opts)?;
    let warnings = writer.warnings();
    writer.finish().map_err(|e| e.with_path(path))?;
    out.commit(true)?;
    Ok(warnings)
}

/// Detect the format of the image at `path`.
pub fn probe(path: impl AsRef<Path>) -> Result<Format> {
    probe::probe(path.as_ref())
}
