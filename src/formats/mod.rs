//! The formats: one folder each, and the dispatch that picks one. Nothing else is here.
//!
//! A format module provides `probe`, `open`, `create_writer` and `create_options`; nothing
//! outside its folder knows its on-disk layout, and no folder imports another.

use std::fs::File;
use std::path::Path;

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

mod edit;
#[cfg(feature = "ova")]
pub mod ova;
#[cfg(not(feature = "ova"))]
#[path = "ova/disabled.rs"]
pub mod ova;
pub use edit::{check_image, check_in_place, open_editor, open_in_place_writer};
pub mod qcow1;
pub mod qcow2;
pub mod qed;
pub mod raw;
pub mod vdi;
pub mod vhd;
pub mod vhdx;
pub mod vmdk;

impl Format {
    /// Does `head` (the first bytes of a file, up to 64 KiB) and `tail` (its last 512
    /// bytes, or fewer for a short file) of a file of `file_len` bytes look like this
    /// format? Raw always answers false.
    pub fn probe(self, head: &[u8], tail: &[u8], file_len: u64) -> bool {
        match self {
            Format::Raw => false,
            Format::Qcow2 => qcow2::probe(head),
            Format::Vhd => vhd::probe(head, tail, file_len),
            Format::Vmdk => vmdk::probe(head),
            Format::Vdi => vdi::probe(head),
            Format::Vhdx => vhdx::probe(head),
            Format::Ova => ova::probe(head, file_len),
            Format::Qcow => qcow1::probe(head),
            Format::Qed => qed::probe(head),
        }
    }

    /// A signature of this format that the file carries but that [`probe`](Self::probe)
    /// does not trust (a VHD footer in the last sector of a file that does not have a
    /// fixed VHD's length), described; None when there is none.
    pub fn distrusted_signature(self, head: &[u8], tail: &[u8], file_len: u64) -> Option<String> {
        match self {
            Format::Vhd => vhd::distrusted_footer(head, tail, file_len),
            _ => None,
        }
    }

    /// The `-o` options this format accepts when writing.
    pub fn create_options(self) -> &'static [OptionHelp] {
        match self {
            Format::Raw => raw::CREATE_OPTIONS,
            Format::Qcow2 => qcow2::CREATE_OPTIONS,
            Format::Vhd => vhd::CREATE_OPTIONS,
            Format::Vmdk => vmdk::CREATE_OPTIONS,
            Format::Vdi => vdi::CREATE_OPTIONS,
            Format::Vhdx => vhdx::CREATE_OPTIONS,
            Format::Ova => ova::CREATE_OPTIONS,
            Format::Qcow => qcow1::CREATE_OPTIONS,
            Format::Qed => qed::CREATE_OPTIONS,
        }
    }
}

impl CreateOptions {
    /// Check every option key is one of `format`'s, so typos are errors, not silence.
    pub fn check_known(&self, format: Format) -> Result<()> {
        self.check_keys(format, format.create_options())
    }
}

/// Open `path` with `opts`: the named format, or the probed one.
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    open_host(HostFile::open(path)?, opts)
}

/// Open the already opened `file` (named `path` in errors and for resolving the files it
/// references) with `opts`: the named format, or the probed one.
pub fn open_file(file: File, path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    open_host(HostFile::from_file(file, path)?, opts)
}

/// [`open_with`] over an already opened file (or a [`HostFile::from_source`]).
pub fn open_host(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let path = file.path().to_path_buf();
    let path = path.as_path();
    // Referenced images (backing files, parents) open through this same dispatch.
    let mut opts = opts.clone();
    opts.opener = Some(open_with);
    let opts = &opts;
    let format = match opts.format {
        Some(f) => f,
        None => crate::probe::probe_file(&file)?,
    };
    let dev = match format {
        Format::Raw => raw::open(file, opts),
        Format::Qcow2 => qcow2::open(file, opts),
        Format::Vhd => vhd::open(file, opts),
        Format::Vmdk => vmdk::open(file, opts),
        Format::Vdi => vdi::open(file, opts),
        Format::Vhdx => vhdx::open(file, opts),
        Format::Ova => ova::open(file, opts),
        Format::Qcow => qcow1::open(file, opts),
        Format::Qed => qed::open(file, opts),
    };
    dev.map_err(|e| e.with_path(path))
}

/// Refuse writing (or changing in place) the formats this crate only reads (qcow, qed),
/// with the reason and what to write instead.
pub fn check_writable(format: Format) -> Result<()> {
    match format {
        Format::Qcow => Err(qcow1::read_only()),
        Format::Qed => Err(qed::read_only()),
        _ => Ok(()),
    }
}

/// Make a writer of `format` over the output `file` (a fresh file, or a
/// [`Sink`](crate::writer::Sink) from [`Output::open`](crate::writer::Output::open)) for
/// the destination `path`.
pub fn create_writer(
    format: Format,
    file: impl Into<crate::writer::Sink>,
    path: &Path,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    check_writable(format).map_err(|e| e.with_path(path))?;
    opts.check_known(format)?;
    // qemu-img's check, per driver: only qcow2 and vmdk take compressed writes.
    if opts.compress && !matches!(format, Format::Qcow2 | Format::Vmdk | Format::Ova) {
        return Err(
            Error::unsupported("Compression not supported for this file format").with_path(path),
        );
    }
    let file = file.into();
    let w = match format {
        Format::Raw => raw::create_writer(file, opts),
        Format::Qcow2 => qcow2::create_writer(file, opts),
        Format::Vhd => vhd::create_writer(file, opts),
        Format::Vmdk => vmdk::create_writer(file, path, opts),
        Format::Vdi => vdi::create_writer(file, opts),
        Format::Vhdx => vhdx::create_writer(file, opts),
        Format::Ova => ova::create_writer(file, path, opts),
        Format::Qcow => qcow1::create_writer(file),
        Format::Qed => qed::create_writer(file),
    };
    w.map_err(|e| e.with_path(path))
}

/// The granule an [`AllocationPlan`](crate::writer::AllocationPlan) must be made with
/// ([`crate::convert::plan_allocation`], or [`crate::convert::plan_allocation_with`] and
/// [`plan_encoder`]) for [`create_planned_writer`] to lay out a sequential `format` output
/// with these options; None when the output needs no plan (raw, fixed vpc and
/// streamOptimized vmdk stream without one).
pub fn plan_granularity(format: Format, opts: &CreateOptions) -> Result<Option<u64>> {
    check_writable(format)?;
    opts.check_known(format)?;
    match format {
        Format::Qcow2 => qcow2::plan_granularity(opts).map(Some),
        Format::Vhd => vhd::plan_granularity(opts),
        Format::Vdi => Ok(Some(vdi::plan_granularity())),
        Format::Vmdk => vmdk::plan_granularity(opts),
        Format::Vhdx => vhdx::plan_granularity(opts),
        Format::Raw | Format::Ova | Format::Qcow | Format::Qed => Ok(None),
    }
}

/// The encoder the planning pass must run for a planned `format` output with these
/// options (compressed qcow2, whose layout depends on every compressed length); None
/// when the plan needs only the allocation.
pub fn plan_encoder(
    format: Format,
    opts: &CreateOptions,
) -> Result<Option<std::sync::Arc<dyn crate::writer::Encoder>>> {
    opts.check_known(format)?;
    match format {
        Format::Qcow2 => qcow2::plan_encoder(opts),
        _ => Ok(None),
    }
}

/// Make a writer of `format` whose layout follows `plan` where the format needs one to
/// write strictly forward: qcow2, vdi, dynamic vpc and monolithicSparse vmdk get their
/// sequential writers (tables first, then data; [`ImageWriter::streams`] true, [`ImageWriter::output_len`] exact;
/// compressed qcow2, the plan must hold the compressed lengths); every other format gets the writer
/// [`create_writer`] makes.
pub fn create_planned_writer(
    format: Format,
    file: impl Into<crate::writer::Sink>,
    path: &Path,
    opts: &CreateOptions,
    plan: &crate::writer::AllocationPlan,
) -> Result<Box<dyn ImageWriter>> {
    if plan_granularity(format, opts)
        .map_err(|e| e.with_path(path))?
        .is_none()
    {
        return create_writer(format, file, path, opts);
    }
    let w = match format {
        Format::Vhd => vhd::create_stream_writer(file.into(), opts, plan),
        Format::Vdi => vdi::create_stream_writer(file.into(), opts, plan),
        Format::Vmdk => vmdk::create_stream_writer(file.into(), path, opts, plan),
        Format::Vhdx => vhdx::create_stream_writer(file.into(), opts, plan),
        _ => qcow2::create_stream_writer(file.into(), opts, plan),
    };
    w.map_err(|e| e.with_path(path))
}
