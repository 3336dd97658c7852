//! The qcow (version 1) header: 48 big-endian bytes at offset 0, validated the way qemu's
//! `qcow_open` validates it (block/qcow.c), plus the checks qemu leaves to chance (the
//! L1 table and the backing file name inside the file).

use byteorder::{BigEndian as BE, ByteOrder};

use crate::error::{Error, Result};

/// "QFI\xfb", shared with qcow2; the version tells them apart.
pub const MAGIC: u32 = 0x5146_49fb;
/// The only version this format has.
pub const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_SIZE: usize = 48;
/// No encryption.
pub const CRYPT_NONE: u32 = 0;
/// AES-CBC with a key derived from a password (qemu no longer opens these in its
/// emulators; qemu-img reads them only with the key).
pub const CRYPT_AES: u32 = 1;
/// Longest backing file name qemu reads (`len > 1023` is refused).
pub const MAX_BACKING_NAME: u32 = 1023;
/// An L2 entry with this bit is a compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 63;

/// The parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow1Header {
    /// Offset of the backing file name, 0 for none.
    pub backing_file_offset: u64,
    /// Length of the backing file name in bytes.
    pub backing_file_size: u32,
    /// Modification time (seconds since the epoch; qemu writes 0).
    pub mtime: u32,
    /// Guest size in bytes (qemu reads it rounded down to whole sectors).
    pub size: u64,
    /// log2 of the cluster size: 9..=16.
    pub cluster_bits: u8,
    /// log2 of the entries of an L2 table: 6..=13 (tables of 512 bytes to 64 KiB).
    pub l2_bits: u8,
    /// 0 none, 1 AES.
    pub crypt_method: u32,
    /// Offset of the L1 table.
    pub l1_table_offset: u64,
}

fn bad(msg: impl Into<String>, field: &str, at: u64) -> Error {
    Error::invalid(msg).with_field(field).at(at)
}

impl Qcow1Header {
    /// Parse and validate the first [`HEADER_SIZE`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_SIZE {
            return Err(Error::invalid(format!(
                "qcow header needs {HEADER_SIZE} bytes, the file has {}",
                b.len()
            ))
            .with_field("header"));
        }
        if BE::read_u32(&b[0..4]) != MAGIC {
            return Err(bad(
                "not a qcow image (magic is not 'QFI\\xfb')",
                "magic",
                0,
            ));
        }
        let version = BE::read_u32(&b[4..8]);
        if version != VERSION {
            return Err(Error::unsupported(format!(
                "qcow (v1) does not support qcow version {version}{}",
                if version == 2 || version == 3 {
                    " (it is a qcow2 image: read it with -f qcow2)"
                } else {
                    ""
                }
            ))
            .with_field("version")
            .at(4));
        }
        let h = Qcow1Header {
            backing_file_offset: BE::read_u64(&b[8..16]),
            backing_file_size: BE::read_u32(&b[16..20]),
            mtime: BE::read_u32(&b[20..24]),
            size: BE::read_u64(&b[24..32]),
            cluster_bits: b[32],
            l2_bits: b[33],
            crypt_method: BE::read_u32(&b[36..40]),
            l1_table_offset: BE::read_u64(&b[40..48]),
        };
        if h.size <= 1 {
            return Err(bad(
                format!(
                    "image size {} is too small (must be at least 2 bytes)",
                    h.size
                ),
                "size",
                24,
            ));
        }
        if !(9..=16).contains(&h.cluster_bits) {
            return Err(bad(
                format!(
                    "cluster_bits {} is outside 9..=16 (cluster size must be between 512 and 64k)",
                    h.cluster_bits
                ),
                "cluster_bits",
                32,
            ));
        }
        if !(6..=13).contains(&h.l2_bits) {
            return Err(bad(
                format!(
                    "l2_bits {} is outside 6..=13 (L2 table size must be between 512 and 64k)",
                    h.l2_bits
                ),
                "l2_bits",
                33,
            ));
        }
        match h.crypt_method {
            CRYPT_NONE => {}
            CRYPT_AES => {
                return Err(Error::encrypted(
                    "qcow image is AES-encrypted (crypt_method 1): its content cannot be read without the key, which diskconv does not take; decrypt it with qemu-img convert --object secret,... first",
                )
                .with_field("crypt_method")
                .at(36))
            }
            m => {
                return Err(bad(
                    format!("invalid encryption method {m} in qcow header (known: 0 none, 1 AES)"),
                    "crypt_method",
                    36,
                ))
            }
        }
        if h.backing_file_offset != 0 && h.backing_file_size > MAX_BACKING_NAME {
            return Err(bad(
                format!(
                    "backing file name of {} bytes is too long (at most {MAX_BACKING_NAME})",
                    h.backing_file_size
                ),
                "backing_file_size",
                16,
            ));
        }
        // CVE-2014-0222: the L1 size computed from the size must not overflow.
        h.l1_entries()?;
        Ok(h)
    }

    /// The header as written on disk.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        BE::write_u32(&mut b[0..4], MAGIC);
        BE::write_u32(&mut b[4..8], VERSION);
        BE::write_u64(&mut b[8..16], self.backing_file_offset);
        BE::write_u32(&mut b[16..20], self.backing_file_size);
        BE::write_u32(&mut b[20..24], self.mtime);
        BE::write_u64(&mut b[24..32], self.size);
        b[32] = self.cluster_bits;
        b[33] = self.l2_bits;
        BE::write_u32(&mut b[36..40], self.crypt_method);
        BE::write_u64(&mut b[40..48], self.l1_table_offset);
        b
    }

    /// Bytes of a cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries of an L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << self.l2_bits
    }

    /// Guest bytes one L1 entry covers.
    pub fn l1_span(&self) -> u64 {
        1 << (u32::from(self.cluster_bits) + u32::from(self.l2_bits))
    }

    /// Guest size as qemu reads it: whole sectors.
    pub fn virtual_size(&self) -> u64 {
        self.size & !511
    }

    /// Entries of the L1 table: the size divided by an L1 entry's span, rounded up,
    /// refused where qemu refuses it ("Image too large": the rounding overflows, or
    /// the table would exceed `INT_MAX` bytes).
    pub fn l1_entries(&self) -> Result<u64> {
        let span = self.l1_span();
        let n = self
            .size
            .checked_add(span - 1)
            .map(|s| s / span)
            .filter(|&n| n <= (i32::MAX as u64) / 8)
            .ok_or_else(|| {
                Error::limit(format!(
                    "image too large: size {} needs an L1 table of more than {} entries (cluster_bits {} + l2_bits {})",
                    self.size,
                    i32::MAX / 8,
                    self.cluster_bits,
                    self.l2_bits
                ))
                .with_field("size")
                .at(24)
            })?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Qcow1Header {
        Qcow1Header {
            backing_file_offset: 0,
            backing_file_size: 0,
            mtime: 0,
            size: 10 << 20,
            cluster_bits: 12,
            l2_bits: 9,
            crypt_method: 0,
            l1_table_offset: 48,
        }
    }

    #[test]
    fn round_trips() {
        let h = sample();
        assert_eq!(Qcow1Header::parse(&h.to_bytes()).unwrap(), h);
        assert_eq!(h.l1_entries().unwrap(), 5);
    }

    #[test]
    fn refuses_each_bad_field_with_its_name() {
        use crate::ErrorKind as K;
        type Case = (fn(&mut Qcow1Header), &'static str, K);
        let cases: Vec<Case> = vec![
            (|h| h.size = 1, "size", K::InvalidFormat),
            (|h| h.cluster_bits = 8, "cluster_bits", K::InvalidFormat),
            (|h| h.cluster_bits = 17, "cluster_bits", K::InvalidFormat),
            (|h| h.l2_bits = 5, "l2_bits", K::InvalidFormat),
            (|h| h.l2_bits = 14, "l2_bits", K::InvalidFormat),
            (|h| h.crypt_method = 1, "crypt_method", K::Encrypted),
            (|h| h.crypt_method = 2, "crypt_method", K::InvalidFormat),
            (
                |h| {
                    h.backing_file_offset = 48;
                    h.backing_file_size = 1024
                },
                "backing_file_size",
                K::InvalidFormat,
            ),
            // CVE-2014-0222: size near 2^64 wraps the L1 size computation.
            (|h| h.size = u64::MAX - 100, "size", K::LimitExceeded),
            (
                |h| {
                    h.cluster_bits = 9;
                    h.l2_bits = 6;
                    h.size = 1 << 62
                },
                "size",
                K::LimitExceeded,
            ),
        ];
        for (f, field, kind) in cases {
            let mut h = sample();
            f(&mut h);
            let e = Qcow1Header::parse(&h.to_bytes()).unwrap_err();
            assert_eq!((e.kind(), e.field()), (kind, Some(field)), "{e}");
        }
        let mut b = sample().to_bytes();
        b[7] = 2;
        let e = Qcow1Header::parse(&b).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(e.to_string().contains("qcow2"), "{e}");
        assert!(Qcow1Header::parse(&b[..47]).is_err());
    }
}
