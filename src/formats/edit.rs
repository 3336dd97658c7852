//! The dispatch of the in-place side: which format's editor, in-place writer or checker
//! takes an existing image. Dispatch only, like `mod.rs`; each format's logic is in its folder.

use std::fs::File;
use std::path::Path;

use super::{check_writable, ova, qcow1, qcow2, qed, raw, vdi, vhd, vhdx, vmdk};
use crate::device::ImageEditor;
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::{OpenOptions, ResizeOptions};
use crate::writer::ImageWriter;

/// Whether `format` can be written into an existing image in place (`-n`): every format
/// this crate writes except an OVA appliance (its disk is a member of a tar archive).
pub fn check_in_place(format: Format) -> Result<()> {
    check_writable(format)?;
    match format {
        Format::Ova => Err(ova::in_place_refused()),
        _ => Ok(()),
    }
}

/// Open the existing image in `file` (at `path`, of `format`, not raw: raw is written
/// through [`Output`](crate::writer::Output)) for a conversion to write into in place;
/// each format refuses, before any write, an image it cannot write into (with the reason)
/// or one smaller than `opts.size`.
pub fn open_in_place_writer(
    format: Format,
    file: File,
    path: &Path,
    opts: &crate::inplace::InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    check_in_place(format).map_err(|e| e.with_path(path))?;
    crate::writer::lock_exclusive(&file, path)?;
    let w = match format {
        Format::Qcow2 => qcow2::open_in_place(file, path, opts),
        Format::Vhd => vhd::open_in_place(file, path, opts),
        Format::Vmdk => vmdk::open_in_place(file, path, opts),
        Format::Vdi => vdi::open_in_place(file, path, opts),
        Format::Vhdx => vhdx::open_in_place(file, path, opts),
        _ => Err(Error::unsupported(
            "only qcow2, vpc, vmdk, vdi and vhdx have in-place writers",
        )),
    };
    w.map_err(|e| e.with_path(path))
}

/// Open the image in `file` (at `path`, of `format`) for in-place changes; each format's
/// editor refuses the subformats it cannot change (with the reason and what to do instead).
pub fn open_editor(
    format: Format,
    file: File,
    path: &Path,
    opts: &ResizeOptions,
) -> Result<Box<dyn ImageEditor>> {
    crate::writer::lock_exclusive(&file, path)?;
    match format {
        Format::Raw => raw::open_editor(file, path, opts),
        Format::Qcow2 => qcow2::open_editor(file, path, opts),
        Format::Vhd => vhd::open_editor(file, path, opts),
        Format::Vmdk => vmdk::open_editor(file, path, opts),
        Format::Vdi => vdi::open_editor(file, path, opts),
        Format::Vhdx => vhdx::open_editor(file, path, opts),
        Format::Ova => Err(ova::in_place_refused()),
        Format::Qcow | Format::Qed => Err(check_writable(format).unwrap_err().with_path(path)),
    }
}

/// Check (and with `repair`, repair in place) the image in `file` (opened read-write when
/// repairing) at `path` with its format's checker; `fail_at` is the repair's test hook.
/// Raw has no checker (the caller reports it as qemu-img does). `refs` is the reference
/// gate for the files a vmdk descriptor lists as its extents.
pub fn check_image(
    format: Format,
    file: File,
    path: &Path,
    repair: crate::check::Repair,
    fail_at: Option<u64>,
    refs: &OpenOptions,
) -> Result<crate::check::Tally> {
    match format {
        Format::Raw => Err(raw::check_refused()),
        Format::Qcow => Err(qcow1::check_refused()),
        Format::Qcow2 => qcow2::check::check(file, path, repair, fail_at),
        Format::Vhd => vhd::check::check(file, path, repair, fail_at),
        Format::Vmdk => vmdk::check(file, path, repair, fail_at, refs),
        Format::Vdi => vdi::check::check(file, path, repair, fail_at),
        Format::Vhdx => vhdx::check::check(file, path, repair, fail_at),
        Format::Ova => Err(ova::check_refused()),
        Format::Qed => Err(qed::check_refused()),
    }
}
