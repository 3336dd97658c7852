//! VHDX: Microsoft's Hyper-V virtual hard disk format (MS-VHDX 1.0).
//!
//! Read: fixed, dynamic and differencing images (the parent only through the reference
//! gate), with a log left by an unclean shutdown replayed in memory. Write: fixed and
//! dynamic images with an empty log (see [`writer`]).
//!
//! What producers write, and this reader accepts (checked on the corpus images):
//! - Hyper-V (Windows Server 2012, "Microsoft Windows 6.2"): the metadata region at 2 MiB
//!   and the BAT at 3 MiB (the region table lists the BAT first), both flagged required;
//!   32 MiB blocks; physical sector size 4096; payload states fully present, zero and not
//!   present; a log that holds entries when the host did not close the disk cleanly;
//!   differencing disks with a parent locator of parent_linkage, relative_path,
//!   volume_path and absolute_win32_path (only the relative path is ever followed).
//! - Disk2VHD ("d2v"): two identical headers with the same sequence number (the spec
//!   calls that invalid; qemu and we accept it when the two are byte-identical); metadata
//!   at 2 MiB, BAT at 3 MiB; 2 MiB blocks; the page 83 item listed last.
//! - qemu-img: BAT at 1 MiB past the log, metadata after it, neither flagged required;
//!   blocks without data in state zero (its `block_state_zero=on` default, fixed disks
//!   too); a fixed disk's file ending with the guest data (only the part of the last block
//!   inside the virtual size is in the file); a BAT holding only the bitmap entries between
//!   payload entries (its count, one short of the spec's for a last partial chunk); physical
//!   sector size 512; a log whose older entries carry the log GUIDs of earlier sessions (a
//!   new GUID for every write), each entry naming itself as the tail.

use crate::device::{BlockDevice, HostFile};
use crate::error::Result;
use crate::options::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::{AllocationPlan, ImageWriter, Sink};

pub mod check;
pub mod header;
pub mod inplace;
pub mod log;
pub mod reader;
pub mod writer;

pub use inplace::open_in_place;

/// Options `-O vhdx` accepts (qemu-img's names).
pub const CREATE_OPTIONS: &[OptionHelp] = &[
    OptionHelp {
        name: "subformat",
        kind: "string",
        help: "dynamic (default: only blocks holding data are stored) or fixed (every block stored)",
    },
    OptionHelp {
        name: "block_size",
        kind: "size",
        help: "payload block size, a power of two from 1M to 256M (default 0: 8M up to 1G, 16M up to 100G, 32M up to 32T, 64M above, as qemu)",
    },
    OptionHelp {
        name: "log_size",
        kind: "size",
        help: "log size, a multiple of 1M (default 1M); the log is written empty",
    },
    OptionHelp {
        name: "block_state_zero",
        kind: "bool",
        help: "accepted for qemu-img compatibility; blocks without data are written not present",
    },
];

/// Does this file look like a VHDX? Its file identifier starts with "vhdxfile".
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(header::FILE_SIGNATURE)
}

/// Open a VHDX image (no open options).
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    reader::open(file, opts)
}

/// Make a VHDX writer; see [`writer`] for the options and layout.
pub fn create_writer(file: Sink, opts: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(writer::create_writer(file, opts)?))
}

/// The granule an allocation plan for this output must use: the block size of a dynamic
/// VHDX; None for a fixed one, which streams without a plan.
pub fn plan_granularity(opts: &CreateOptions) -> Result<Option<u64>> {
    writer::plan_granularity(opts)
}

/// Make a sequential dynamic VHDX writer over `file` for the writes of `plan`.
pub fn create_stream_writer(
    file: Sink,
    opts: &CreateOptions,
    plan: &AllocationPlan,
) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(writer::create_stream_writer(file, opts, plan)?))
}

/// In-place changes (resize, discard) are not implemented for VHDX: refused with the
/// reason, before anything is written.
pub fn open_editor(
    _file: std::fs::File,
    path: &std::path::Path,
    _opts: &crate::options::ResizeOptions,
) -> Result<Box<dyn crate::device::ImageEditor>> {
    Err(crate::error::Error::unsupported(
        "resizing or discarding inside a VHDX in place is not supported; convert it (diskconv convert -O vhdx with --target-size, or to another format) instead",
    )
    .with_path(path))
}
