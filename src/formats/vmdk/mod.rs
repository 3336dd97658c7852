//! VMDK (VMware virtual disk).
//!
//! Reads hosted sparse extents (`KDMV` v1-3, zeroed grains, redundant grain directory),
//! streamOptimized files (VMware's marker layout with the header in the footer, and
//! qemu's without markers), legacy `COWD` and ESXi seSparse extents, descriptor files
//! concatenating FLAT / SPARSE / VMFS / SESPARSE / ZERO extents, and delta disks (read
//! through their parent). Extent and parent files are opened only through the
//! [`OpenOptions`] reference gate. Writes monolithicSparse (default; to a stream laid out
//! from a first pass, [`planned`]) and streamOptimized as VMware writes it.

use std::fs::File;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::check::{read_padded, Repair, Tally};
use crate::device::{BlockDevice, HostFile, ImageEditor};
use crate::error::{Error, Result};
use crate::options::{CreateOptions, OpenOptions, OptionHelp, ResizeOptions};
use crate::writer::{EditFile, ImageWriter};

pub mod check;
pub mod check_extents;
pub mod descriptor;
pub mod discard;
pub mod editor;
pub mod inplace;
pub mod inplace_flat;
pub mod planned;
pub mod reader;
pub mod resize;
pub mod sparse;
pub mod stream;
pub mod writer;

pub use editor::open_editor;
pub use inplace::open_in_place;
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

/// Check the VMDK image in `file` (a `KDMV` sparse file, or a descriptor file whose extents
/// [`check_extents`] checks); with `-r all`, restore the redundant grain tables. A
/// descriptor file's extents are opened through `refs` (the reference gate) and checked
/// without repair.
pub fn check(
    file: File,
    path: &Path,
    repair: Repair,
    fail_at: Option<u64>,
    refs: &OpenOptions,
) -> Result<Tally> {
    let write = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?;
    let host = HostFile::from_file(file, path)?;
    let magic = read_padded(&host, 0, 4, "VMDK magic")?;
    if LE::read_u32(&magic) != sparse::KDMV_MAGIC {
        if check_extents::is_descriptor_file(&host)? {
            return check_extents::check(&host, path, repair, refs);
        }
        return Err(Error::unsupported(
            "checking a legacy COWD (vmfsSparse) or seSparse VMDK extent is not supported: only monolithicSparse, streamOptimized and descriptor files listing FLAT, SPARSE and ZERO extents",
        ));
    }
    let mut t = Tally::default();
    check::check_sparse(
        &host,
        Some(EditFile::new(write, path, fail_at)),
        repair,
        &mut t,
    )?;
    Ok(t)
}

/// The folder's changes in place, each in its own file over the one editor type.
impl ImageEditor for editor::VmdkEditor {
    fn virtual_size(&self) -> u64 {
        self.header.capacity * sparse::SECTOR
    }

    fn discard(&mut self, runs: &[(u64, u64)]) -> Result<u64> {
        discard::discard(self, runs)
    }

    fn resize(&mut self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        resize::resize(self, new_size, opts)
    }
}
