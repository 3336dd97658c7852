//! VDI: VirtualBox's native disk format, version 1.1, dynamic and static.
//!
//! A 512-byte header, a block map (one little-endian u32 per block: a data block index,
//! 0xffffffff unallocated or 0xfffffffe discarded), then the data blocks. Differencing
//! images name their parent only by UUID and are refused with a clear error.
//!
//! Sizes that are not a multiple of 512 are rounded up to whole sectors, both when reading
//! (as qemu does for images VBoxManage convertfromraw made) and when writing (as qemu-img
//! does), so we and qemu always agree on the virtual size.

use crate::device::{BlockDevice, HostFile, ImageEditor};
use crate::error::{Error, Result};
use crate::options::{CreateOptions, OpenOptions, OptionHelp, ResizeOptions};
use crate::writer::ImageWriter;

pub mod check;
pub mod discard;
pub mod editor;
pub mod header;
pub mod inplace;
pub mod reader;
pub mod resize;
pub mod stream;
pub mod writer;

pub use editor::open_editor;
pub use inplace::open_in_place;
pub use reader::VdiImage;
pub use writer::VdiWriter;

/// Options `-O vdi` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[OptionHelp {
    name: "static",
    kind: "bool",
    help:
        "off (default: dynamic, only blocks holding data are stored) or on (every block allocated)",
}];

/// Does the start of a file look like vdi? The signature at 0x40 plus a version whose
/// major number VirtualBox ever used (0 or 1); unsupported versions then fail on open
/// with a clear message instead of being read as raw.
pub fn probe(head: &[u8]) -> bool {
    if head.len() < 0x48 {
        return false;
    }
    let sig = u32::from_le_bytes([head[0x40], head[0x41], head[0x42], head[0x43]]);
    let version = u32::from_le_bytes([head[0x44], head[0x45], head[0x46], head[0x47]]);
    sig == header::SIGNATURE && version >> 16 <= 1
}

/// Open a vdi image.
pub fn open(file: HostFile, _opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Ok(Box::new(VdiImage::open(file)?))
}

/// Make a vdi writer.
pub fn create_writer(
    file: crate::writer::Sink,
    opts: &CreateOptions,
) -> Result<Box<dyn ImageWriter>> {
    if opts.compress {
        return Err(Error::unsupported("vdi images cannot be compressed"));
    }
    let fixed = opts.bool_option("static")?.unwrap_or(false);
    Ok(Box::new(VdiWriter::new(file, opts.size, fixed)?))
}

/// Make a sequential vdi writer over `file` for exactly the writes of `plan`.
pub fn create_stream_writer(
    file: crate::writer::Sink,
    opts: &CreateOptions,
    plan: &crate::writer::AllocationPlan,
) -> Result<Box<dyn ImageWriter>> {
    Ok(Box::new(stream::create_stream_writer(file, opts, plan)?))
}

/// The granule an allocation plan for this output must use: the block size.
pub fn plan_granularity() -> u64 {
    stream::plan_granularity()
}

/// The folder's changes in place, each in its own file over the one editor type.
impl ImageEditor for editor::VdiEditor {
    fn virtual_size(&self) -> u64 {
        self.header.virtual_size()
    }

    fn discard(&mut self, runs: &[(u64, u64)]) -> Result<u64> {
        discard::discard(self, runs)
    }

    fn resize(&mut self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        resize::resize(self, new_size, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_needs_signature_and_known_version() {
        let mut h = header::VdiHeader::new(1 << 20, 1 << 20, header::ImageType::Dynamic)
            .unwrap()
            .to_bytes();
        assert!(probe(&h));
        assert!(!probe(&h[..0x44]));
        h[0x46] = 7;
        assert!(!probe(&h));
        h[0x46] = 0;
        h[0x40] = 0;
        assert!(!probe(&h));
    }
}
