//! QED: the QEMU enhanced disk format (docs/interop/qed_spec.txt, block/qed.c). Read only.
//!
//! A 64-byte little-endian header in the first `header_size` clusters (with the backing
//! file name), an L1 table of `table_size` clusters, L2 tables of the same size, data
//! clusters; an L2 entry of 1 is a zero cluster. What qemu-img writes: 64 KiB clusters
//! and tables of 4 clusters by default (`-o cluster_size=,table_size=`), the header in one
//! cluster, the L1 table right after it, L2 tables and clusters at the end of the file as
//! they are allocated; with `-F raw` the backing-format-no-probe feature.
//!
//! Refused as qemu refuses them: unknown feature bits, a cluster size that is not a power
//! of two from 4 KiB to 64 MiB, a table size that is not a power of two from 1 to 16, an
//! image size not a multiple of 512 or beyond what the tables address, a header size that
//! overflows 32 bits, a backing name outside the header's clusters or over 4095 bytes,
//! tables and clusters that are unaligned, in the header's clusters or past the end of the
//! file. Refused beyond qemu: a header of 0 clusters, tables and clusters overlapping the
//! L1 table. Accepted beyond qemu: tables of one cluster (the spec allows them; qemu's
//! table offset check refuses every such image it creates). An image whose need-check
//! flag is set (not closed cleanly) reads as it is, with a warning (qemu-img 10 reports its
//! dirty-flag false, and so does `info`); unknown compatible
//! and autoclear bits are reported and ignored.

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::options::{OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

pub mod header;
pub mod reader;

pub use reader::QedImage;

/// `-O qed` is refused, so it takes no options.
pub const CREATE_OPTIONS: &[OptionHelp] = &[];

/// Does the start of a file look like QED? Its magic, as qemu's `bdrv_qed_probe` checks.
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"QED\0")
}

/// Open a QED image; its backing file only through `opts`' reference gate.
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Ok(Box::new(QedImage::open(file, opts)?))
}

/// The error every write path gives: this format is read only.
pub fn read_only() -> Error {
    Error::unsupported(
        "diskconv does not write qed images (qed is read only here): write qcow2 instead (or raw, vpc, vmdk, vdi, vhdx); an existing qed image converts with diskconv convert -O qcow2 IN OUT",
    )
}

/// Writing QED is refused ([`read_only`]).
pub fn create_writer(_file: crate::writer::Sink) -> Result<Box<dyn ImageWriter>> {
    Err(read_only())
}

/// Why `check` does not check QED: not implemented (qemu-img checks it).
pub fn check_refused() -> Error {
    Error::unsupported(
        "checking qed images is not implemented (diskconv reads them; qemu-img check -f qed checks them)",
    )
}
