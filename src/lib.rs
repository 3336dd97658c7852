//! diskconv: read, write and convert raw, qcow2, vhd (vpc), vmdk, vdi and vhdx disk images, and read qcow (v1) and qed.
//!
//! Every format is a [`BlockDevice`] (read side) and an [`ImageWriter`] (write side); one
//! engine ([`convert()`]) streams any device into any writer, reading only mapped data.
//! Files named inside an image (backing files, extents, parents) are never opened unless
//! the caller opts in with [`OpenOptions::allow_references`].
//!
//! # Where things live
//! Everything below is re-exported at the crate root; the modules are floors, each
//! importing only from the floors under it (`tests/pure/layering.rs` keeps it so):
//! - the core: [`error`] (one [`Error`]), [`format`](mod@format) ([`Format`] and its qemu-img names),
//!   [`options`] ([`OpenOptions`], [`CreateOptions`], [`ResizeOptions`], [`parse_size`]),
//!   [`references`] (the gate deciding which files named inside an image may be opened),
//!   [`device`] ([`BlockDevice`], the read side, and [`ImageEditor`], the in-place side;
//!   `src/device/host.rs`, the bounds-checked image file), [`inplace`] (`convert -n` into
//!   an existing image),
//!   [`writer`] ([`ImageWriter`] and, one file each under `src/writer/`: the allocation
//!   plan, [`AtomicOutput`], the sink, the [`DigestAlgo`] digests, [`Output`], UUIDs and
//!   the in-place `EditFile` with its lock), the check vocabulary ([`Tally`], [`Repair`]:
//!   `src/check.rs`, shared by every format's checker and [`ops::check`], which re-exports
//!   it) and [`convert`](mod@convert) (the engine, [`convert_device`], which knows no
//!   format and no path; `src/convert/`); no core file is over 700 lines;
//! - `formats`: one folder per format, none importing another nor [`ops`], with no circle
//!   of imports inside a folder (the in-place side: `editor.rs` under `resize.rs`,
//!   `discard.rs` and `inplace.rs`), and the
//!   dispatch from a [`Format`] to it (hidden: its on-disk structures are public for the
//!   crate's tests and fuzzers only, with no stability promise; [`create_writer`] is the
//!   dispatch a user needs);
//! - [`probe`](mod@probe) and [`inspect`](mod@inspect): detection and the safety inspection;
//! - [`guest`]: partition tables and filesystems over any device, the free blocks
//!   [`sparsify()`] drops;
//! - [`ops`]: the commands as functions over files ([`convert()`], [`resize()`]), which the
//!   CLI calls, and over streams ([`convert_to_writer`], [`ConvertedReader`]).
//!
//! The `diskconv` command is not in this crate's modules: it is the binary in
//! `src/bin/diskconv/` (feature `cli`), built on this public API only. Its `main.rs` parses
//! and dispatches; `commands/` holds one file per subcommand (its flags and its `exec`);
//! the files beside them hold what several commands share (progress, signals, sizes, JSON,
//! the stdin and object-storage destinations).
//!
//! ```no_run
//! use diskconv::{open, OpenOptions, DeviceReader};
//! let dev = open("disk.qcow2", &OpenOptions::new())?;
//! let mut reader = DeviceReader::new(dev);
//! std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
//! # Ok::<(), diskconv::Error>(())
//! ```
//!
//! # Taking images from strangers
//!
//! An upload service or image registry links the library without the CLI's crates
//! (`default-features = false`; the `cli` feature is the binary's). Its path through the
//! API, as `examples/uploader.rs` and `examples/registry_probe.rs` walk it:
//!
//! 1. **Inspect the file it will use.** [`inspect_file`] takes the opened [`std::fs::File`],
//!    the format the uploader claimed and [`InspectLimits`] (largest virtual size, by
//!    default 64 TiB; allocation-table entries; map-walk bounds, an unfinished walk being
//!    unsafe), and returns the [`Inspection`] with the device it opened: nothing is opened
//!    again by path, so what was checked is what gets read.
//! 2. **Decide.** [`Inspection::is_safe`] is false for any [`Finding`] whose
//!    [`hazard`](Finding::hazard) is set: names other files, encrypted, corrupt, polyglot,
//!    past a limit, a format that is not the claimed one, ...
//! 3. **Normalise and stream.** [`convert_to_writer`] writes the device as raw (or any
//!    format that streams) into any [`std::io::Write`], computing the
//!    [`ConvertOptions::digests`] (md5 and sha512 for Glance's `checksum` and
//!    `os_hash_value`) on the way; [`ConvertedReader`] gives the same as a [`std::io::Read`].
//!    A [`CancelToken`] in [`ConvertOptions::cancel`] stops it within one work unit.
//! 4. **Record.** [`Inspection`], [`ImageInfo`], [`ConvertReport`] and [`Format`] are
//!    `serde::Serialize`, for a registry to store.
//! 5. **Answer errors by side.** [`Error::side`] says whether the upload or the sink
//!    failed, [`Error::kind`] what class of failure ([`ErrorKind::Encrypted`],
//!    [`ErrorKind::Cancelled`], ...), [`Error::io_kind`] the [`std::io::ErrorKind`]; an
//!    [`Error`] converts to a [`std::io::Error`] of that kind and back without loss.
//!
//! ```no_run
//! use diskconv::{convert_to_writer, inspect_file, ConvertOptions, DigestAlgo, Format, InspectLimits, Side};
//! let file = std::fs::File::open("upload.qcow2")?;
//! let (report, dev) = inspect_file(file, "upload.qcow2", Some(Format::Qcow2), &InspectLimits::default())?;
//! let Some(dev) = dev.filter(|_| report.is_safe()) else {
//!     for f in report.unsafe_findings() {
//!         eprintln!("refused: {}: {}", f.kind, f.detail);
//!     }
//!     return Ok(());
//! };
//! let mut opts = ConvertOptions::new(Format::Raw);
//! opts.digests = vec![DigestAlgo::Md5, DigestAlgo::Sha512];
//! match convert_to_writer(dev.as_ref(), std::io::sink(), &opts) {
//!     Ok(done) => println!("{}", serde_json::json!({
//!         "disk_format": report.opened_as,
//!         "virtual_size": done.virtual_size,
//!         "digests": done.digests,
//!     })),
//!     Err(e) if e.side() == Some(Side::Destination) => eprintln!("our sink failed: {e}"),
//!     Err(e) => eprintln!("the upload is unreadable: {e}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![warn(missing_docs)]

// The core: imports nothing from the floors above it (a test keeps it so).
// The check vocabulary (Tally, Repair, read_padded) the formats' checkers and `ops::check`
// share; its public paths are `ops::check` and the crate root, re-exported below.
mod check;
pub mod convert;
pub mod device;
pub mod error;
pub mod format;
pub mod inplace;
pub mod options;
pub mod references;
pub mod writer;
// The formats, one folder each, behind one dispatch. Unstable: their on-disk structures
// are public for the crate's own tests and fuzzers only; the stable surface is the
// dispatch re-exported below.
#[doc(hidden)]
pub mod formats;
// Partition tables and guest filesystems over any device (sparsify), above the core.
pub mod guest;
// Detection, inspection and the commands, over the formats.
#[doc(hidden)]
pub mod fuzzing;
pub mod inspect;
pub mod ops;
// A raw image arriving on a pipe (`rbd export ... - | diskconv convert -f raw - ...`).
pub mod pipe;
pub mod probe;
#[cfg(feature = "remote")]
pub mod remote;

use std::path::Path;

pub use convert::{
    convert_device, convert_device_into, CancelToken, ConvertOptions, ConvertReport,
    UnreadableRange,
};
pub use device::{
    BlockDevice, BlockStatus, DeviceReader, ImageEditor, ImageInfo, Mapping, MappingKind,
    SnapshotInfo, SnapshotOp, SnapshotSel,
};
pub use error::{Error, ErrorKind, Result, Side};
pub use format::Format;
pub use formats::create_writer;
pub use inspect::{
    inspect, inspect_file, inspect_with, Finding, FindingKind, InspectLimits, Inspection,
};
pub use ops::check::{check, CheckOptions, CheckReport, Repair, Tally};
pub use ops::compare::{
    compare, compare_devices, CompareError, CompareOptions, CompareOutcome, CompareReport,
    CompareStage,
};
pub use ops::convert::{convert, convert_to_path, STREAMING_OUTPUTS};
pub use ops::map::{map, map_device, map_human, map_human_partial, map_json, MapEntry, MapRange};
pub use ops::measure::{measure, measure_device, Measurement};
pub use ops::resize::resize;
pub use ops::snapshot::{snapshot_edit, snapshot_table, snapshots, snapshots_json};
pub use ops::sparsify::{
    sparsify, sparsify_in_place, sparsify_to_writer, SparsifyOptions, SparsifyReport,
};
pub use ops::stream::{convert_to_writer, ConvertedReader};
pub use options::{
    parse_bool, parse_size, CreateOptions, OpenOptions, OptionHelp, Preallocation, ResizeOptions,
};
pub use pipe::{spool, PipeSource, SPOOL_BLOCK};
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

/// Open an already opened `file` for reading (`path` names it in errors and is where
/// files it references resolve from): the format named in `opts`, or the probed one. The
/// device reads through this descriptor only, so a file swapped at `path` meanwhile is
/// never read; see [`inspect_file`] to check an untrusted file first.
pub fn open_file(
    file: std::fs::File,
    path: impl AsRef<Path>,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockDevice>> {
    formats::open_file(file, path.as_ref(), opts)
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
            ops::convert::STREAMING_OUTPUTS
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
