//! The QED header: 64 little-endian bytes at offset 0 (docs/interop/qed_spec.txt),
//! validated the way qemu's `bdrv_qed_do_open` validates it (block/qed.c).

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};

/// "QED\0".
pub const MAGIC: u32 = u32::from_le_bytes(*b"QED\0");
/// Bytes of the header.
pub const HEADER_SIZE: usize = 64;
/// The image has a backing file.
pub const F_BACKING_FILE: u64 = 0x01;
/// The image was not closed cleanly and needs a consistency check before use.
pub const F_NEED_CHECK: u64 = 0x02;
/// The backing file is raw: never probe it.
pub const F_BACKING_FORMAT_NO_PROBE: u64 = 0x04;
/// Every feature bit qemu knows; any other is an on-disk format change.
pub const FEATURE_MASK: u64 = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE;
/// Smallest cluster size.
pub const MIN_CLUSTER_SIZE: u32 = 4 << 10;
/// Largest cluster size.
pub const MAX_CLUSTER_SIZE: u32 = 64 << 20;
/// Largest table size, in clusters.
pub const MAX_TABLE_SIZE: u32 = 16;
/// Longest backing file name qemu reads (its buffer is PATH_MAX bytes with the NUL).
pub const MAX_BACKING_NAME: u32 = 4095;

/// The parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QedHeader {
    /// Bytes of a cluster: a power of two from 4 KiB to 64 MiB.
    pub cluster_size: u32,
    /// Clusters of an L1 or L2 table: a power of two from 1 to 16.
    pub table_size: u32,
    /// Clusters the header occupies (the backing file name lies inside them).
    pub header_size: u32,
    /// Feature bits ([`FEATURE_MASK`]).
    pub features: u64,
    /// Compatible feature bits (none defined; unknown ones are ignored).
    pub compat_features: u64,
    /// Feature bits a writer that does not know them clears (none defined).
    pub autoclear_features: u64,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
    /// Guest size in bytes, a multiple of 512.
    pub image_size: u64,
    /// Offset of the backing file name from the start of the file.
    pub backing_filename_offset: u32,
    /// Length of the backing file name.
    pub backing_filename_size: u32,
}

fn bad(msg: impl Into<String>, field: &str, at: u64) -> Error {
    Error::invalid(msg).with_field(field).at(at)
}

impl QedHeader {
    /// Parse and validate the first [`HEADER_SIZE`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_SIZE {
            return Err(Error::invalid(format!(
                "QED header needs {HEADER_SIZE} bytes, the file has {}",
                b.len()
            ))
            .with_field("header"));
        }
        if LE::read_u32(&b[0..4]) != MAGIC {
            return Err(bad(
                "image not in QED format (magic is not 'QED\\0')",
                "magic",
                0,
            ));
        }
        let h = QedHeader {
            cluster_size: LE::read_u32(&b[4..8]),
            table_size: LE::read_u32(&b[8..12]),
            header_size: LE::read_u32(&b[12..16]),
            features: LE::read_u64(&b[16..24]),
            compat_features: LE::read_u64(&b[24..32]),
            autoclear_features: LE::read_u64(&b[32..40]),
            l1_table_offset: LE::read_u64(&b[40..48]),
            image_size: LE::read_u64(&b[48..56]),
            backing_filename_offset: LE::read_u32(&b[56..60]),
            backing_filename_size: LE::read_u32(&b[60..64]),
        };
        let unknown = h.features & !FEATURE_MASK;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "unsupported QED features {unknown:#x} (known: backing file 0x1, need check 0x2, raw backing 0x4)"
            ))
            .with_field("features")
            .at(16));
        }
        let cs = h.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cs) {
            return Err(bad(
                format!("QED cluster size {cs} is invalid (a power of two from 4 KiB to 64 MiB)"),
                "cluster_size",
                4,
            ));
        }
        if !h.table_size.is_power_of_two() || h.table_size > MAX_TABLE_SIZE {
            return Err(bad(
                format!(
                    "QED table size {} is invalid (a power of two from 1 to {MAX_TABLE_SIZE} clusters)",
                    h.table_size
                ),
                "table_size",
                8,
            ));
        }
        if !h.image_size.is_multiple_of(512) {
            return Err(bad(
                format!("QED image size {} is not a multiple of 512", h.image_size),
                "image_size",
                48,
            ));
        }
        if let Some(max) = h.max_image_size() {
            if h.image_size > max {
                return Err(bad(
                    format!(
                        "QED image size {} is invalid: tables of {} clusters of {cs} bytes address at most {max}",
                        h.image_size, h.table_size
                    ),
                    "image_size",
                    48,
                ));
            }
        }
        // qemu computes the header's bytes in 32 bits; a header of no cluster would put
        // the tables over the header itself.
        if h.header_size == 0 || h.header_size > u32::MAX / cs {
            return Err(bad(
                format!(
                    "QED header size of {} clusters is invalid (1 to {} clusters of {cs} bytes)",
                    h.header_size,
                    u32::MAX / cs
                ),
                "header_size",
                12,
            ));
        }
        if h.features & F_BACKING_FILE != 0 {
            let off = u64::from(h.backing_filename_offset);
            let len = u64::from(h.backing_filename_size);
            if off + len > h.header_bytes() || (len > 0 && off < HEADER_SIZE as u64) {
                return Err(bad(
                    format!(
                        "QED backing filename ({len} bytes at {off:#x}) is not inside the header's clusters after its fields ({HEADER_SIZE}..{})",
                        h.header_bytes()
                    ),
                    "backing_filename_offset",
                    56,
                ));
            }
            if h.backing_filename_size > MAX_BACKING_NAME {
                return Err(bad(
                    format!(
                        "QED backing filename of {len} bytes is too long (at most {MAX_BACKING_NAME})"
                    ),
                    "backing_filename_size",
                    60,
                ));
            }
        }
        Ok(h)
    }

    /// The header as written on disk.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        LE::write_u32(&mut b[0..4], MAGIC);
        LE::write_u32(&mut b[4..8], self.cluster_size);
        LE::write_u32(&mut b[8..12], self.table_size);
        LE::write_u32(&mut b[12..16], self.header_size);
        LE::write_u64(&mut b[16..24], self.features);
        LE::write_u64(&mut b[24..32], self.compat_features);
        LE::write_u64(&mut b[32..40], self.autoclear_features);
        LE::write_u64(&mut b[40..48], self.l1_table_offset);
        LE::write_u64(&mut b[48..56], self.image_size);
        LE::write_u32(&mut b[56..60], self.backing_filename_offset);
        LE::write_u32(&mut b[60..64], self.backing_filename_size);
        b
    }

    /// Bytes of an L1 or L2 table.
    pub fn table_bytes(&self) -> u64 {
        u64::from(self.table_size) * u64::from(self.cluster_size)
    }

    /// Entries of a table.
    pub fn table_entries(&self) -> u64 {
        self.table_bytes() / 8
    }

    /// Guest bytes one L1 entry (one L2 table) covers.
    pub fn l2_span(&self) -> u64 {
        self.table_entries() * u64::from(self.cluster_size)
    }

    /// Bytes of the header's clusters.
    pub fn header_bytes(&self) -> u64 {
        u64::from(self.header_size) * u64::from(self.cluster_size)
    }

    /// The largest guest the tables address (None: more than 64 bits can say).
    pub fn max_image_size(&self) -> Option<u64> {
        self.l2_span().checked_mul(self.table_entries())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> QedHeader {
        QedHeader {
            cluster_size: 64 << 10,
            table_size: 4,
            header_size: 1,
            features: 0,
            compat_features: 0,
            autoclear_features: 0,
            l1_table_offset: 64 << 10,
            image_size: 1 << 30,
            backing_filename_offset: 0,
            backing_filename_size: 0,
        }
    }

    #[test]
    fn round_trips() {
        let h = sample();
        assert_eq!(QedHeader::parse(&h.to_bytes()).unwrap(), h);
        assert_eq!(h.table_entries(), 32768);
        assert_eq!(h.l2_span(), 2 << 30);
    }

    #[test]
    fn refuses_each_bad_field_with_its_name() {
        use crate::ErrorKind as K;
        type Case = (fn(&mut QedHeader), &'static str, K);
        let cases: Vec<Case> = vec![
            (|h| h.features = 0x8, "features", K::Unsupported),
            (|h| h.cluster_size = 2048, "cluster_size", K::InvalidFormat),
            (
                |h| h.cluster_size = 128 << 20,
                "cluster_size",
                K::InvalidFormat,
            ),
            (
                |h| h.cluster_size = 3 << 12,
                "cluster_size",
                K::InvalidFormat,
            ),
            (|h| h.table_size = 0, "table_size", K::InvalidFormat),
            (|h| h.table_size = 3, "table_size", K::InvalidFormat),
            (|h| h.table_size = 32, "table_size", K::InvalidFormat),
            (|h| h.image_size = 1000, "image_size", K::InvalidFormat),
            (
                |h| {
                    h.cluster_size = 4096;
                    h.table_size = 1;
                    h.image_size = 1 << 40
                },
                "image_size",
                K::InvalidFormat,
            ),
            (|h| h.header_size = 0, "header_size", K::InvalidFormat),
            (|h| h.header_size = 1 << 16, "header_size", K::InvalidFormat),
            (
                |h| {
                    h.features = F_BACKING_FILE;
                    h.backing_filename_offset = 65530;
                    h.backing_filename_size = 10
                },
                "backing_filename_offset",
                K::InvalidFormat,
            ),
            (
                |h| {
                    h.features = F_BACKING_FILE;
                    h.backing_filename_offset = 8;
                    h.backing_filename_size = 10
                },
                "backing_filename_offset",
                K::InvalidFormat,
            ),
            (
                |h| {
                    h.features = F_BACKING_FILE;
                    h.backing_filename_offset = 64;
                    h.backing_filename_size = 5000
                },
                "backing_filename_size",
                K::InvalidFormat,
            ),
        ];
        for (f, field, kind) in cases {
            let mut h = sample();
            f(&mut h);
            let e = QedHeader::parse(&h.to_bytes()).unwrap_err();
            assert_eq!((e.kind(), e.field()), (kind, Some(field)), "{e}");
        }
        assert!(QedHeader::parse(&sample().to_bytes()[..63]).is_err());
    }
}
