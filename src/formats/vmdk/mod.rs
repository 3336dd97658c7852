//! VMDK (VMware virtual disk).
//!
//! Reads hosted sparse extents (`KDMV` v1-3, zeroed grains, redundant grain directory),
//! streamOptimized files (VMware's marker layout with the header in the footer, and
//! qemu's without markers), legacy `COWD` and ESXi seSparse extents, descriptor files
//! concatenating FLAT / SPARSE / VMFS / SESPARSE / ZERO extents, and delta disks (read
//! through their parent). Extent and parent files are opened only through the
//! [`OpenOptions`] reference gate. Writes monolithicSparse (default; to a stream laid out
//! from a first pass, [`planned`]) and streamOptimized as VMware writes it.

use crate::device::{BlockDevice, HostFile};
use crate::error::Result;
use crate::options::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

pub mod check;
pub mod check_extents;
pub mod descriptor;
pub mod discard;
pub mod inplace;
pub mod inplace_flat;
pub mod planned;
pub mod reader;
pub mod resize;
pub mod sparse;
pub mod stream;
pub mod writer;

pub use inplace::open_in_place;
pub use resize::open_editor;
use writer::{Subformat, VmdkOptions};

/// Options `-O vmdk` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = writer::CREATE_OPTIONS;

/// Does the start of a file look like vmdk? (`KDMV`/`COWD` magic, or descriptor text
/// whose first line after comments is `version=N`, as qemu probes.)
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"KDMV")
        || head.starts_with(b"COWD")
        || descriptor::looks_like_descriptor(head)
}

/// Open a vmdk image.
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    reader::open(file, opts)
}

/// Make a vmdk writer (`subformat=monolithicSparse` or `streamOptimized`) for an output
/// that will be renamed to `dest` (named in the embedded descriptor).
pub fn create_writer(
    file: crate::writer::Sink,
    dest: &std::path::Path,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    let o = VmdkOptions::parse(opts, dest)?;
    Ok(match o.subformat {
        Subformat::MonolithicSparse => Box::new(writer::SparseWriter::new(file, o)?),
        Subformat::StreamOptimized => Box::new(stream::StreamWriter::new(file, o)?),
    })
}

/// The granule an allocation plan for this output must use: the grain size for
/// monolithicSparse; None for streamOptimized, which streams without a plan.
pub fn plan_granularity(opts: &CreateOptions) -> Result<Option<u64>> {
    let o = VmdkOptions::parse(opts, std::path::Path::new("-"))?;
    Ok((o.subformat == Subformat::MonolithicSparse).then(planned::plan_granularity))
}

/// Make the writer for a planned vmdk output: the sequential monolithicSparse writer for
/// the writes of `plan`, or the streamOptimized writer (which needs no plan).
pub fn create_stream_writer(
    file: crate::writer::Sink,
    dest: &std::path::Path,
    opts: &CreateOptions,
    plan: &crate::writer::AllocationPlan,
) -> Result<Box<dyn ImageWriter>> {
    let o = VmdkOptions::parse(opts, dest)?;
    Ok(match o.subformat {
        Subformat::MonolithicSparse => Box::new(planned::create(file, o, plan)?),
        Subformat::StreamOptimized => Box::new(stream::StreamWriter::new(file, o)?),
    })
}
