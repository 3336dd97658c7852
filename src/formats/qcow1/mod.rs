//! qcow: QEMU's copy-on-write format, version 1 (block/qcow.c). Read only.
//!
//! A 48-byte big-endian header, the backing file name after it, an L1 table of L2 table
//! offsets, L2 tables of cluster offsets; an entry with bit 63 set is a cluster
//! compressed with raw deflate (zlib window 12, no header), its compressed length in the
//! bits above the offset. What qemu-img writes: 4 KiB clusters and 512-entry L2 tables,
//! or, with a backing file, 512-byte clusters and 4096-entry L2 tables; the L1 table right
//! after the header and name (8-byte aligned), L2 tables and clusters cluster-aligned at
//! the end of the file as they are allocated, compressed clusters at byte offsets.
//!
//! Refused as qemu refuses them: a version other than 1, a size under 2 bytes,
//! cluster_bits outside 9..=16, l2_bits outside 6..=13, an L1 size that overflows
//! (CVE-2014-0222), a backing name over 1023 bytes, an unknown crypt_method. AES-encrypted
//! images (crypt_method 1) are refused with [`ErrorKind::Encrypted`](crate::ErrorKind).
//! Refused beyond qemu: tables and clusters past the end of the file, unaligned, or
//! overlapping the header, the backing name or the L1 table.

use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::options::{OpenOptions, OptionHelp};
use crate::writer::ImageWriter;

pub mod header;
pub mod reader;

pub use reader::Qcow1Image;

/// `-O qcow` is refused, so it takes no options.
pub const CREATE_OPTIONS: &[OptionHelp] = &[];

/// Does the start of a file look like qcow v1? qcow2's magic with version 1, as qemu's
/// `qcow_probe` checks (a file too short for the whole header then fails to open,
/// naming it, rather than passing for qcow2 or raw).
pub fn probe(head: &[u8]) -> bool {
    head.starts_with(b"QFI\xfb") && head.get(4..8) == Some(&header::VERSION.to_be_bytes())
}

/// Open a qcow image; its backing file only through `opts`' reference gate.
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Ok(Box::new(Qcow1Image::open(file, opts)?))
}

/// The error every write path gives: this format is read only.
pub fn read_only() -> Error {
    Error::unsupported(
        "diskconv does not write qcow images (qcow version 1 is read only here): write qcow2 instead (or raw, vpc, vmdk, vdi, vhdx); an existing qcow image converts with diskconv convert -O qcow2 IN OUT",
    )
}

/// Writing qcow is refused ([`read_only`]).
pub fn create_writer(_file: crate::writer::Sink) -> Result<Box<dyn ImageWriter>> {
    Err(read_only())
}

/// qemu-img's answer for a format it has no checks for.
pub fn check_refused() -> crate::error::Error {
    crate::error::Error::unsupported("This image format does not support checks")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_needs_version_1() {
        let h = header::Qcow1Header {
            backing_file_offset: 0,
            backing_file_size: 0,
            mtime: 0,
            size: 1 << 20,
            cluster_bits: 12,
            l2_bits: 9,
            crypt_method: 0,
            l1_table_offset: 48,
        }
        .to_bytes();
        assert!(probe(&h));
        assert!(probe(&h[..8]));
        assert!(!probe(&h[..7]));
        let mut v2 = h;
        v2[7] = 2;
        assert!(!probe(&v2));
    }
}
