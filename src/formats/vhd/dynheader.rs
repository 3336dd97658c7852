//! The 1024-byte dynamic disk header ("cxsparse") of dynamic and differencing VHDs: where
//! the BAT is, the block size, and (for differencing disks) who the parent is.

use byteorder::{BigEndian, ByteOrder};

use super::footer::checksum_without_field;
use crate::error::{Error, Result};

/// Size of the dynamic header on disk.
pub const DYN_HEADER_SIZE: usize = 1024;
/// The dynamic header's magic cookie.
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Smallest block size we accept (one sector).
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size we accept. Real producers use 512 KiB or 2 MiB; the bound keeps one
/// block's sector bitmap (block/4096 bytes) small enough to cache.
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;

mod off {
    pub const DATA_OFFSET: usize = 8;
    pub const TABLE_OFFSET: usize = 16;
    pub const VERSION: usize = 24;
    pub const MAX_TABLE_ENTRIES: usize = 28;
    pub const BLOCK_SIZE: usize = 32;
    pub const CHECKSUM: usize = 36;
    pub const PARENT_UUID: usize = 40;
    pub const PARENT_TIMESTAMP: usize = 56;
    pub const PARENT_NAME: usize = 64;
    pub const LOCATORS: usize = 576;
}

/// Byte offset of the checksum field in the dynamic header.
pub const CHECKSUM_OFFSET: usize = off::CHECKSUM;
/// Byte offset of the block size field in the dynamic header.
pub const BLOCK_SIZE_OFFSET: usize = off::BLOCK_SIZE;
/// Byte offset of the max table entries field in the dynamic header.
pub const MAX_TABLE_ENTRIES_OFFSET: usize = off::MAX_TABLE_ENTRIES;
/// Byte offset of the BAT offset field in the dynamic header.
pub const TABLE_OFFSET_OFFSET: usize = off::TABLE_OFFSET;

/// Platform codes of parent locators.
pub mod platform {
    /// No locator.
    pub const NONE: u32 = 0;
    /// Deprecated relative path (ANSI).
    pub const WI2R: u32 = u32::from_be_bytes(*b"Wi2r");
    /// Deprecated absolute path (ANSI).
    pub const WI2K: u32 = u32::from_be_bytes(*b"Wi2k");
    /// Relative path, UTF-16LE.
    pub const W2RU: u32 = u32::from_be_bytes(*b"W2ru");
    /// Absolute path, UTF-16LE.
    pub const W2KU: u32 = u32::from_be_bytes(*b"W2ku");
    /// Mac OS alias blob.
    pub const MAC: u32 = u32::from_be_bytes(*b"Mac ");
    /// Mac OS X file URL, UTF-8.
    pub const MACX: u32 = u32::from_be_bytes(*b"MacX");
}

/// One parent locator entry: where in the file a path to the parent is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentLocator {
    /// Platform code (see [`platform`]).
    pub platform: u32,
    /// Space reserved for the locator (sectors per the spec, bytes in some producers).
    pub data_space: u32,
    /// Length of the locator data in bytes.
    pub data_length: u32,
    /// Reserved field, kept for round-trips.
    pub reserved: u32,
    /// File offset of the locator data.
    pub data_offset: u64,
}

/// The parsed dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    /// Next structure (unused, all ones).
    pub data_offset: u64,
    /// File offset of the BAT.
    pub table_offset: u64,
    /// Header version (0x00010000).
    pub version: u32,
    /// Number of BAT entries.
    pub max_table_entries: u32,
    /// Block size in bytes (power of two).
    pub block_size: u32,
    /// Checksum as stored (verified by [`parse`](Self::parse)).
    pub checksum: u32,
    /// Parent image UUID (differencing disks).
    pub parent_uuid: [u8; 16],
    /// Parent modification time (differencing disks).
    pub parent_timestamp: u32,
    /// Parent file name, UTF-16 as stored (512 bytes).
    pub parent_name: [u8; 512],
    /// The eight parent locators.
    pub locators: [ParentLocator; 8],
}

impl DynHeader {
    /// Parse and validate: cookie, checksum, block size (power of two within
    /// [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`]). Table placement is checked by the reader,
    /// which knows the file length.
    pub fn parse(buf: &[u8]) -> Result<DynHeader> {
        let b = buf.get(..DYN_HEADER_SIZE).ok_or_else(|| {
            Error::invalid(format!(
                "VHD dynamic header needs {DYN_HEADER_SIZE} bytes, only {} available",
                buf.len()
            ))
            .with_field("dynamic_header")
        })?;
        if &b[..8] != DYN_COOKIE {
            return Err(
                Error::invalid("VHD dynamic header has no 'cxsparse' cookie")
                    .with_field("dynamic_header.cookie"),
            );
        }
        let stored = BigEndian::read_u32(&b[off::CHECKSUM..]);
        let computed = checksum_without_field(b, off::CHECKSUM);
        if stored != computed {
            return Err(Error::invalid(format!(
                "VHD dynamic header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ))
            .with_field("dynamic_header.checksum"));
        }
        let block_size = BigEndian::read_u32(&b[off::BLOCK_SIZE..]);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::invalid(format!(
                "VHD block size {block_size} is not a power of two between {MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}"
            ))
            .with_field("dynamic_header.block_size"));
        }
        let mut locators = [ParentLocator::default(); 8];
        for (i, l) in locators.iter_mut().enumerate() {
            let e = &b[off::LOCATORS + 24 * i..off::LOCATORS + 24 * (i + 1)];
            *l = ParentLocator {
                platform: BigEndian::read_u32(&e[0..]),
                data_space: BigEndian::read_u32(&e[4..]),
                data_length: BigEndian::read_u32(&e[8..]),
                reserved: BigEndian::read_u32(&e[12..]),
                data_offset: BigEndian::read_u64(&e[16..]),
            };
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&b[off::PARENT_UUID..off::PARENT_UUID + 16]);
        let mut parent_name = [0u8; 512];
        parent_name.copy_from_slice(&b[off::PARENT_NAME..off::PARENT_NAME + 512]);
        Ok(DynHeader {
            data_offset: BigEndian::read_u64(&b[off::DATA_OFFSET..]),
            table_offset: BigEndian::read_u64(&b[off::TABLE_OFFSET..]),
            version: BigEndian::read_u32(&b[off::VERSION..]),
            max_table_entries: BigEndian::read_u32(&b[off::MAX_TABLE_ENTRIES..]),
            block_size,
            checksum: stored,
            parent_uuid,
            parent_timestamp: BigEndian::read_u32(&b[off::PARENT_TIMESTAMP..]),
            parent_name,
            locators,
        })
    }

    /// Serialize, computing the checksum (the `checksum` field is ignored).
    pub fn to_bytes(&self) -> [u8; DYN_HEADER_SIZE] {
        let mut b = [0u8; DYN_HEADER_SIZE];
        b[..8].copy_from_slice(DYN_COOKIE);
        BigEndian::write_u64(&mut b[off::DATA_OFFSET..], self.data_offset);
        BigEndian::write_u64(&mut b[off::TABLE_OFFSET..], self.table_offset);
        BigEndian::write_u32(&mut b[off::VERSION..], self.version);
        BigEndian::write_u32(&mut b[off::MAX_TABLE_ENTRIES..], self.max_table_entries);
        BigEndian::write_u32(&mut b[off::BLOCK_SIZE..], self.block_size);
        b[off::PARENT_UUID..off::PARENT_UUID + 16].copy_from_slice(&self.parent_uuid);
        BigEndian::write_u32(&mut b[off::PARENT_TIMESTAMP..], self.parent_timestamp);
        b[off::PARENT_NAME..off::PARENT_NAME + 512].copy_from_slice(&self.parent_name);
        for (i, l) in self.locators.iter().enumerate() {
            let e = &mut b[off::LOCATORS + 24 * i..off::LOCATORS + 24 * (i + 1)];
            BigEndian::write_u32(&mut e[0..], l.platform);
            BigEndian::write_u32(&mut e[4..], l.data_space);
            BigEndian::write_u32(&mut e[8..], l.data_length);
            BigEndian::write_u32(&mut e[12..], l.reserved);
            BigEndian::write_u64(&mut e[16..], l.data_offset);
        }
        let sum = checksum_without_field(&b, off::CHECKSUM);
        BigEndian::write_u32(&mut b[off::CHECKSUM..], sum);
        b
    }

    /// `raw` (a stored dynamic header) with a new BAT size and its checksum redone, every
    /// other byte kept. All changed bytes lie in its first sector, so writing that sector
    /// alone switches the header in one atomic step.
    pub fn with_max_table_entries(
        raw: &[u8; DYN_HEADER_SIZE],
        entries: u32,
    ) -> [u8; DYN_HEADER_SIZE] {
        let mut b = *raw;
        BigEndian::write_u32(&mut b[off::MAX_TABLE_ENTRIES..], entries);
        let sum = checksum_without_field(&b, off::CHECKSUM);
        BigEndian::write_u32(&mut b[off::CHECKSUM..], sum);
        b
    }

    /// Bytes of one block's sector bitmap: one bit per sector, padded to whole sectors.
    pub fn bitmap_size(&self) -> u64 {
        bitmap_size(self.block_size)
    }

    /// The parent file name from the header (UTF-16, big-endian per the spec; some
    /// producers wrote little-endian, which is detected), or None when empty.
    pub fn parent_name(&self) -> Option<String> {
        decode_utf16_guess(&self.parent_name, true)
    }
}

/// Bytes of the sector bitmap of a block of `block_size` bytes.
pub fn bitmap_size(block_size: u32) -> u64 {
    (block_size as u64 / 512).div_ceil(8).div_ceil(512) * 512
}

/// Decode NUL-terminated UTF-16 text; `big_endian` is the expected order, swapped when
/// the zero bytes of ASCII text sit on the other side. None when empty or undecodable.
pub fn decode_utf16_guess(bytes: &[u8], big_endian: bool) -> Option<String> {
    let pairs: Vec<[u8; 2]> = bytes.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
    let (hi_zero, lo_zero) = pairs
        .iter()
        .take_while(|p| **p != [0, 0])
        .fold((0usize, 0usize), |(h, l), p| {
            (h + (p[0] == 0) as usize, l + (p[1] == 0) as usize)
        });
    // ASCII in big-endian has the zero byte first; little-endian has it second.
    let be = if hi_zero == lo_zero {
        big_endian
    } else {
        hi_zero > lo_zero
    };
    let units: Vec<u16> = pairs
        .iter()
        .map(|p| {
            if be {
                u16::from_be_bytes(*p)
            } else {
                u16::from_le_bytes(*p)
            }
        })
        .take_while(|&u| u != 0)
        .collect();
    if units.is_empty() {
        return None;
    }
    String::from_utf16(&units).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> DynHeader {
        let mut name = [0u8; 512];
        for (i, c) in "parent.vhd".encode_utf16().enumerate() {
            name[2 * i..2 * i + 2].copy_from_slice(&c.to_be_bytes());
        }
        let mut locators = [ParentLocator::default(); 8];
        locators[0] = ParentLocator {
            platform: platform::W2RU,
            data_space: 512,
            data_length: 24,
            reserved: 0,
            data_offset: 0x1000,
        };
        DynHeader {
            data_offset: u64::MAX,
            table_offset: 1536,
            version: 0x0001_0000,
            max_table_entries: 3,
            block_size: 2 << 20,
            checksum: 0,
            parent_uuid: [1; 16],
            parent_timestamp: 9,
            parent_name: name,
            locators,
        }
    }

    #[test]
    fn round_trip_and_validation() {
        let h = sample();
        let b = h.to_bytes();
        let p = DynHeader::parse(&b).unwrap();
        assert_eq!(p.to_bytes(), b);
        assert_eq!(
            DynHeader {
                checksum: 0,
                ..p.clone()
            },
            h
        );
        assert_eq!(p.parent_name().as_deref(), Some("parent.vhd"));
        assert_eq!(p.bitmap_size(), 512);
        let mut bad = b;
        bad[700] ^= 1;
        assert!(DynHeader::parse(&bad)
            .unwrap_err()
            .message()
            .contains("checksum"));
        for bs in [0u32, 3 << 20, 256, 1 << 30] {
            let b = DynHeader {
                block_size: bs,
                ..h.clone()
            }
            .to_bytes();
            let e = DynHeader::parse(&b).unwrap_err();
            assert_eq!(e.field(), Some("dynamic_header.block_size"), "{bs}");
        }
    }

    #[test]
    fn utf16_guess_handles_both_orders_and_tiny_blocks() {
        let le: Vec<u8> = "a.vhd"
            .encode_utf16()
            .flat_map(|u| u.to_le_bytes())
            .collect();
        assert_eq!(decode_utf16_guess(&le, true).as_deref(), Some("a.vhd"));
        assert_eq!(decode_utf16_guess(&[0; 8], true), None);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(4 << 20), 1024);
    }
}
