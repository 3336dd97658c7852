//! qcow2 (QEMU copy-on-write v2 and v3): read every cluster kind (standard, zero,
//! compressed zlib/zstd, extended L2 subclusters) and write compat 0.10/1.1 images,
//! optionally compressed.
//!
//! `header.rs` holds the on-disk header and extensions, `reader.rs` the L1/L2 walk,
//! `writer.rs` the file writer, `stream.rs` the
//! sequential writer laid out from an allocation plan, `compress.rs` the per-cluster codecs, `resize.rs` the
//! in-place resize, `snapshot_edit.rs` internal snapshots made, deleted and applied in place.

use std::fs::File;

use crate::device::{BlockDevice, HostFile, ImageEditor};
use crate::error::Result;
use crate::options::{CreateOptions, OpenOptions, OptionHelp, ResizeOptions};
use crate::writer::ImageWriter;

mod bitmaps;
pub mod check;
pub mod compress;
pub mod discard;
pub mod editor;
pub mod header;
pub mod inplace;
pub mod measure;
mod prealloc;
pub mod reader;
pub mod resize;
pub mod snapshot;
pub mod snapshot_edit;
pub mod stream;
pub mod writer;

pub use reader::Qcow2Image;

/// Options `-O qcow2` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = writer::CREATE_OPTIONS;

/// Does the start of a file look like qcow2?
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"QFI\xfb")
}

/// Open a qcow2 image. Backing files and external data files are opened only through
/// `opts`' reference gate (refused by default).
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Ok(Box::new(reader::open(file, opts)?))
}

/// Make a qcow2 writer over the empty `file`.
pub fn create_writer(
    file: crate::writer::Sink,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    writer::create_writer(file, opts)
}

/// Make a sequential qcow2 writer over `file` for exactly the writes of `plan`.
pub fn create_stream_writer(
    file: crate::writer::Sink,
    opts: &CreateOptions,
    plan: &crate::writer::AllocationPlan,
) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(stream::create_stream_writer(file, opts, plan)?))
}

/// The granule an allocation plan for this output must use: the cluster size.
pub fn plan_granularity(opts: &CreateOptions) -> Result<u64> {
    Ok(writer::parse_options(opts)?.cs)
}

/// The encoder the planning pass must run to learn the compressed lengths (with `-c`).
pub fn plan_encoder(
    opts: &CreateOptions,
) -> Result<Option<std::sync::Arc<dyn crate::writer::Encoder>>> {
    let p = writer::parse_options(opts)?;
    Ok(p.compress.then(|| {
        std::sync::Arc::new(writer::ClusterEncoder {
            ctype: p.ctype,
            cluster_size: p.cs as usize,
        }) as std::sync::Arc<dyn crate::writer::Encoder>
    }))
}

/// Open a qcow2 image for a conversion to write into in place (see [`inplace`]).
pub fn open_in_place(
    file: File,
    path: &std::path::Path,
    opts: &crate::inplace::InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    inplace::open_in_place(file, path, opts)
}

/// Open a qcow2 image for in-place changes: resize, discard, snapshot (see [`editor`]).
pub fn open_editor(
    file: File,
    path: &std::path::Path,
    opts: &ResizeOptions,
) -> Result<Box<dyn ImageEditor>> {
    editor::open_editor(file, path, opts)
}

/// The folder's changes in place, each in its own file over the one editor type.
impl ImageEditor for editor::Qcow2Editor {
    fn virtual_size(&self) -> u64 {
        self.header.size & !511
    }

    fn discard(&mut self, runs: &[(u64, u64)]) -> Result<u64> {
        discard::discard(self, runs)
    }

    fn snapshot(&mut self, op: &crate::device::SnapshotOp<'_>) -> Result<()> {
        snapshot_edit::run(self, op)
    }

    fn resize(&mut self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        resize::resize(self, new_size, opts)
    }
}
