//! VHDX: Microsoft's Hyper-V virtual hard disk format (MS-VHDX 1.0).
//!
//! Read: fixed, dynamic and differencing images (the parent only through the reference
//! gate), with a log left by an unclean shutdown replayed in memory. Write: fixed and
//! dynamic images with an empty log (see [`writer`]).
//!
//! What producers write, and this reader accepts:
//! - Hyper-V (Windows Server 2012 and later): region table with the metadata region listed
//!   first, BAT and metadata flagged required, physical sector size 4096, a BAT sized for
//!   the spec's entry count, blocks of 32 MiB (dynamic) and a log that may hold entries
//!   when the host did not close the disk cleanly; differencing disks with a parent
//!   locator of relative_path, volume_path and absolute_win32_path and parent_linkage.
//! - Disk2VHD: two identical headers with the same sequence number (the spec calls that
//!   invalid; qemu and we accept it as long as the two are byte-identical).
//! - qemu-img: BAT before metadata, both regions not flagged required, payload entries of
//!   blocks without data in state ZERO (`block_state_zero=on`, its default, for fixed disks
//!   too), a fixed disk's last block cut short at the virtual size (the file ends with the
//!   guest data, so only that part of the last block is in the file), a BAT holding only
//!   the bitmap entries between payload entries (qemu's count, one short of the spec's
//!   for a last partial chunk), physical sector size 512, and a log with entries when its
//!   driver was stopped between a log write and its flush.

use crate::device::{BlockDevice, HostFile};
use crate::error::Result;
use crate::options::{CreateOptions, OpenOptions, OptionHelp};
use crate::writer::{AllocationPlan, ImageWriter, Sink};

pub mod header;
pub mod log;
pub mod reader;
pub mod writer;

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
