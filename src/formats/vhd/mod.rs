//! VHD, which qemu calls "vpc": Microsoft's Virtual Hard Disk (Virtual PC, Hyper-V before
//! VHDX, Disk2VHD, Azure).
//!
//! Read: fixed, dynamic and differencing images (the parent only through the reference
//! gate). Write: fixed and dynamic at the exact size asked (see [`writer`]).

use crate::device::{BlockDevice, HostFile, ImageEditor};
use crate::error::Result;
use crate::options::{CreateOptions, OpenOptions, OptionHelp, ResizeOptions};
use crate::writer::ImageWriter;

pub mod check;
pub mod discard;
pub mod dynheader;
pub mod editor;
pub mod footer;
pub mod geometry;
pub mod inplace;
pub mod reader;
pub mod resize;
pub mod stream;
pub mod writer;

pub use editor::open_editor;
pub use inplace::open_in_place;

/// Options `-O vpc` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[
    OptionHelp {
        name: "subformat",
        kind: "string",
        help: "dynamic (default: only blocks holding data are stored) or fixed (raw data + footer)",
    },
    OptionHelp {
        name: "force_size",
        kind: "bool",
        help: "accepted for qemu-img compatibility; the exact size is always kept",
    },
    OptionHelp {
        name: "block_size",
        kind: "size",
        help: "dynamic block size, a power of two from 4k to 256M (default 2M; Hyper-V reads 512k and 2M)",
    },
    OptionHelp {
        name: "azure",
        kind: "bool",
        help: "Azure upload: fixed subformat, size rounded up to a whole MiB",
    },
];

/// Does this file look like a VHD? A dynamic or differencing VHD starts with the
/// "conectix" cookie. A fixed one has only its footer, in the last 512 bytes, and a raw
/// guest disk can hold exactly those bytes (the guest writes its own last sector), so a
/// footer there counts only when the file has the shape a fixed VHD has: a valid footer
/// (cookie, checksum) of disk type fixed whose current_size is the length of the data
/// before it (see [`reader::trusted_tail_footer`]). `file_len` is the whole file's length.
pub fn probe(head: &[u8], tail: &[u8], file_len: u64) -> bool {
    head.starts_with(footer::FOOTER_COOKIE) || reader::trusted_tail_footer(tail, file_len)
}

/// A VHD footer in the last sector that [`probe`] does not trust, described for the
/// caller (the probe reads such a file as raw; `inspect` reports it as a polyglot).
pub fn distrusted_footer(head: &[u8], tail: &[u8], file_len: u64) -> Option<String> {
    if probe(head, tail, file_len) {
        return None;
    }
    reader::describe_distrusted_tail_footer(tail, file_len)
}

/// Open a VHD image. Open options: `force_size_calc=chs|current_size` (like qemu's).
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    reader::open(file, opts)
}

/// Make a VHD writer; see [`writer`] for the options and size rules.
pub fn create_writer(
    file: crate::writer::Sink,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    writer::create_writer(file, opts)
}

/// The granule an allocation plan for this output must use: the block size of a dynamic
/// VHD; None for a fixed one, which streams without a plan.
pub fn plan_granularity(opts: &CreateOptions) -> Result<Option<u64>> {
    stream::plan_granularity(opts)
}

/// Make a sequential dynamic VHD writer over `file` for the writes of `plan`.
pub fn create_stream_writer(
    file: crate::writer::Sink,
    opts: &CreateOptions,
    plan: &crate::writer::AllocationPlan,
) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(stream::create_stream_writer(file, opts, plan)?))
}

/// The folder's changes in place, each in its own file over the one editor type.
impl ImageEditor for editor::VhdEditor {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn discard(&mut self, runs: &[(u64, u64)]) -> Result<u64> {
        discard::discard(self, runs)
    }

    fn resize(&mut self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        resize::resize(self, new_size, opts)
    }
}
