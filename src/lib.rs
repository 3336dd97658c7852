//! diskconv: read, write and convert raw, qcow2, vhd (vpc), vmdk and vdi disk images.
//!
//! Every format is a [`BlockDevice`] (read side) and an [`ImageWriter`] (write side); one
//! engine ([`convert()`]) streams any device into any writer, reading only mapped data.
//! Files named inside an image (backing files, extents, parents) are never opened unless
//! the caller opts in with [`OpenOptions::allow_references`].
//!
//! # Where things live
//! Everything below is re-exported at the crate root; the modules are floors, each
//! importing only from the floors under it (`tests/layering.rs` keeps it so):
//! - the core: [`error`] (one [`Error`]), [`format`](mod@format) ([`Format`] and its qemu-img names),
//!   [`options`] ([`OpenOptions`], [`CreateOptions`], [`ResizeOptions`], [`parse_size`]),
//!   [`references`] (the gate deciding which files named inside an image may be opened),
//!   [`device`] ([`BlockDevice`], the read side, and [`ImageEditor`], the in-place side),
//!   [`writer`] ([`ImageWriter`], [`AtomicOutput`]) and [`convert`](mod@convert) (the engine,
//!   [`convert_device`], which knows no format and no path);
//! - [`formats`]: one folder per format and the dispatch from a [`Format`] to it;
//! - [`probe`](mod@probe) and [`inspect`](mod@inspect): detection and the safety inspection;
//! - [`ops`]: the commands as functions over files ([`convert()`], [`resize()`]), which the
//!   CLI calls, and over streams ([`convert_to_writer`], [`ConvertedReader`]).
//!
//! ```no_run
//! use diskconv::{open, OpenOptions, DeviceReader};
//! let dev = open("disk.qcow2", &OpenOptions::new())?;
//! let mut reader = DeviceReader::new(dev);
//! std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
//! # Ok::<(), diskconv::Error>(())
//! ```
#![warn(missing_docs)]

// The core: imports nothing from the floors above it (a test keeps it so).
pub mod convert;
pub mod device;
pub mod error;
pub mod format;
pub mod options;
pub mod references;
pub mod writer;
// The formats, one folder each, behind one dispatch.
pub mod formats;
// Partition tables and guest filesystems over any device (sparsify), above the core.
pub mod guest;
// Detection, inspection and the commands, over the formats.
#[doc(hidden)]
pub mod fuzzing;
pub mod inspect;
pub mod ops;
pub mod probe;
#[cfg(feature = "remote")]
pub mod remote;

use std::path::Path;

pub use convert::{convert_device, ConvertOptions, ConvertReport, UnreadableRange};
pub use device::{BlockDevice, DeviceReader, ImageEditor, ImageInfo, Mapping, MappingKind};
pub use error::{Error, ErrorKind, Result};
pub use format::Format;
pub use inspect::{inspect, Finding, FindingKind, Inspection};
pub use ops::convert::{convert, convert_to_path};
pub use ops::resize::resize;
pub use ops::stream::{convert_to_writer, ConvertedReader};
pub use options::{
    parse_bool, parse_size, CreateOptions, OpenOptions, OptionHelp, Preallocation, ResizeOptions,
};
pub use references::MAX_CHAIN_DEPTH;
pub use writer::{
    random_uuid_v4, AtomicOutput, DigestAlgo, ImageWriter, Output, OutputKind, OutputOptions,
};

// The README's code example is compiled as a doctest, so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// Open the image at `path` for reading: the format named in `opts`, or the probed one.
pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    ops::open_source(path.as_ref(), opts)
}

/// Create an empty image (all zeros) of `format` at `path`; returns the writer's notes
/// (e.g. a size rounded up). A file is made atomically; a block device is written in
/// place and zeroed (see [`Output`]).
pub fn create(path: impl AsRef<Path>, format: Format, opts: &CreateOptions) -> Result<Vec<String>> {
    let path = path.as_ref();
    let (out, sink) = Output::open(path, &OutputOptions::default())?;
    let writer = formats::create_writer(format, sink, path, opts)?;
    if out.kind() == OutputKind::Stream && !writer.streams() {
        return Err(Error::arg(format!(
            "this {format} image cannot be written to a pipe or character device; outputs that can: {}",
            formats::STREAMING_OUTPUTS
        ))
        .with_path(path));
    }
    let warnings = writer.warnings();
    writer.finish().map_err(|e| e.with_path(path))?;
    out.finish(true)?;
    Ok(warnings)
}

/// Detect the format of the image at `path`.
pub fn probe(path: impl AsRef<Path>) -> Result<Format> {
    probe::probe(path.as_ref())
}
