//! The 512-byte VHD footer ("hard disk footer"), present at the end of every VHD and, for
//! dynamic and differencing disks, copied at offset 0.
//!
//! All fields are big-endian. The checksum is the one's complement of the byte sum of the
//! footer with the checksum field taken as zero.

use byteorder::{BigEndian, ByteOrder};

use super::geometry::Chs;
use crate::error::{Error, Result};

/// Size of the footer on disk.
pub const FOOTER_SIZE: usize = 512;
/// The footer's magic cookie.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// `data_offset` value of a fixed disk (no dynamic header).
pub const NO_DATA_OFFSET: u64 = u64::MAX;
/// VHD timestamps count seconds from 2000-01-01 00:00:00 UTC.
pub const VHD_EPOCH: u64 = 946_684_800;

/// Field offsets inside the footer (for error messages and checksums).
mod off {
    pub const FEATURES: usize = 8;
    pub const VERSION: usize = 12;
    pub const DATA_OFFSET: usize = 16;
    pub const TIMESTAMP: usize = 24;
    pub const CREATOR_APP: usize = 28;
    pub const CREATOR_VERSION: usize = 32;
    pub const CREATOR_OS: usize = 36;
    pub const ORIGINAL_SIZE: usize = 40;
    pub const CURRENT_SIZE: usize = 48;
    pub const CYLINDERS: usize = 56;
    pub const HEADS: usize = 58;
    pub const SECTORS: usize = 59;
    pub const DISK_TYPE: usize = 60;
    pub const CHECKSUM: usize = 64;
    pub const UUID: usize = 68;
    pub const SAVED_STATE: usize = 84;
}

/// Byte offset of the checksum field in the footer.
pub const CHECKSUM_OFFSET: usize = off::CHECKSUM;
/// Byte offset of the disk type field in the footer.
pub const DISK_TYPE_OFFSET: usize = off::DISK_TYPE;

/// The kind of VHD a footer describes.
///
/// Closed: the VHD specification (frozen at 1.0) defines exactly these disk types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// Guest data followed by the footer.
    Fixed,
    /// Sparse: dynamic header, BAT, blocks.
    Dynamic,
    /// Sparse, with sectors not present read from a parent image.
    Differencing,
}

impl DiskType {
    /// The on-disk code.
    pub fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
    /// Parse the on-disk code.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            2 => Some(DiskType::Fixed),
            3 => Some(DiskType::Dynamic),
            4 => Some(DiskType::Differencing),
            _ => None,
        }
    }
    /// Lowercase name for messages.
    pub fn name(self) -> &'static str {
        match self {
            DiskType::Fixed => "fixed",
            DiskType::Dynamic => "dynamic",
            DiskType::Differencing => "differencing",
        }
    }
}

/// One's complement of the byte sum, the checksum both the footer and the dynamic header use
/// (the caller zeroes the checksum field first).
pub fn vhd_checksum(bytes: &[u8]) -> u32 {
    !bytes
        .iter()
        .fold(0u32, |acc, &b| acc.wrapping_add(b as u32))
}

/// Checksum of a structure whose checksum field (4 bytes) sits at `field`.
pub fn checksum_without_field(bytes: &[u8], field: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(b as u32));
    !sum
}

/// The parsed footer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footer {
    /// Feature flags (bit 1 is "reserved, always set").
    pub features: u32,
    /// File format version (0x00010000).
    pub version: u32,
    /// Offset of the dynamic header; [`NO_DATA_OFFSET`] for fixed disks.
    pub data_offset: u64,
    /// Creation time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    /// Application that created the image ("vpc ", "win ", "qemu", "qem2", "d2v ", ...).
    pub creator_app: [u8; 4],
    /// Version of that application.
    pub creator_version: u32,
    /// Host OS of the creator ("Wi2k", "Mac ").
    pub creator_os: [u8; 4],
    /// Size at creation, bytes.
    pub original_size: u64,
    /// Current size, bytes.
    pub current_size: u64,
    /// CHS geometry: cylinders.
    pub cylinders: u16,
    /// CHS geometry: heads.
    pub heads: u8,
    /// CHS geometry: sectors per track.
    pub sectors_per_track: u8,
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// Checksum as stored (verified by [`parse`](Self::parse)).
    pub checksum: u32,
    /// Image UUID (a differencing child stores its parent's in the dynamic header).
    pub uuid: [u8; 16],
    /// Saved-state flag.
    pub saved_state: u8,
}

impl Footer {
    /// Parse and validate a footer: cookie, checksum and disk type. `buf` must hold at
    /// least [`FOOTER_SIZE`] bytes (a shorter buffer is an error, not a panic).
    pub fn parse(buf: &[u8]) -> Result<Footer> {
        let b = buf.get(..FOOTER_SIZE).ok_or_else(|| {
            Error::invalid(format!(
                "VHD footer needs {FOOTER_SIZE} bytes, only {} available",
                buf.len()
            ))
            .with_field("footer")
        })?;
        if &b[..8] != FOOTER_COOKIE {
            return Err(
                Error::invalid("no 'conectix' cookie: not a VHD footer").with_field("cookie")
            );
        }
        let stored = BigEndian::read_u32(&b[off::CHECKSUM..]);
        let computed = checksum_without_field(b, off::CHECKSUM);
        if stored != computed {
            return Err(Error::invalid(format!(
                "VHD footer checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
            ))
            .with_field("footer.checksum"));
        }
        let code = BigEndian::read_u32(&b[off::DISK_TYPE..]);
        let disk_type = DiskType::from_code(code).ok_or_else(|| {
            Error::unsupported(format!(
                "VHD disk type {code} (only 2 fixed, 3 dynamic and 4 differencing exist)"
            ))
            .with_field("footer.disk_type")
        })?;
        let mut creator_app = [0u8; 4];
        creator_app.copy_from_slice(&b[off::CREATOR_APP..off::CREATOR_APP + 4]);
        let mut creator_os = [0u8; 4];
        creator_os.copy_from_slice(&b[off::CREATOR_OS..off::CREATOR_OS + 4]);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[off::UUID..off::UUID + 16]);
        Ok(Footer {
            features: BigEndian::read_u32(&b[off::FEATURES..]),
            version: BigEndian::read_u32(&b[off::VERSION..]),
            data_offset: BigEndian::read_u64(&b[off::DATA_OFFSET..]),
            timestamp: BigEndian::read_u32(&b[off::TIMESTAMP..]),
            creator_app,
            creator_version: BigEndian::read_u32(&b[off::CREATOR_VERSION..]),
            creator_os,
            original_size: BigEndian::read_u64(&b[off::ORIGINAL_SIZE..]),
            current_size: BigEndian::read_u64(&b[off::CURRENT_SIZE..]),
            cylinders: BigEndian::read_u16(&b[off::CYLINDERS..]),
            heads: b[off::HEADS],
            sectors_per_track: b[off::SECTORS],
            disk_type,
            checksum: stored,
            uuid,
            saved_state: b[off::SAVED_STATE],
        })
    }

    /// Serialize, computing the checksum (the `checksum` field is ignored).
    pub fn to_bytes(&self) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(FOOTER_COOKIE);
        BigEndian::write_u32(&mut b[off::FEATURES..], self.features);
        BigEndian::write_u32(&mut b[off::VERSION..], self.version);
        BigEndian::write_u64(&mut b[off::DATA_OFFSET..], self.data_offset);
        BigEndian::write_u32(&mut b[off::TIMESTAMP..], self.timestamp);
        b[off::CREATOR_APP..off::CREATOR_APP + 4].copy_from_slice(&self.creator_app);
        BigEndian::write_u32(&mut b[off::CREATOR_VERSION..], self.creator_version);
        b[off::CREATOR_OS..off::CREATOR_OS + 4].copy_from_slice(&self.creator_os);
        BigEndian::write_u64(&mut b[off::ORIGINAL_SIZE..], self.original_size);
        BigEndian::write_u64(&mut b[off::CURRENT_SIZE..], self.current_size);
        BigEndian::write_u16(&mut b[off::CYLINDERS..], self.cylinders);
        b[off::HEADS] = self.heads;
        b[off::SECTORS] = self.sectors_per_track;
        BigEndian::write_u32(&mut b[off::DISK_TYPE..], self.disk_type.code());
        b[off::UUID..off::UUID + 16].copy_from_slice(&self.uuid);
        b[off::SAVED_STATE] = self.saved_state;
        let sum = vhd_checksum(&b);
        BigEndian::write_u32(&mut b[off::CHECKSUM..], sum);
        b
    }

    /// `raw` (a stored footer) with a new current size and CHS geometry and its checksum
    /// redone; every other byte, reserved ones included, stays as stored (a resize changes
    /// the size, not the image's identity or creator).
    pub fn resized(raw: &[u8; FOOTER_SIZE], current_size: u64, chs: Chs) -> [u8; FOOTER_SIZE] {
        let mut b = *raw;
        BigEndian::write_u64(&mut b[off::CURRENT_SIZE..], current_size);
        BigEndian::write_u16(&mut b[off::CYLINDERS..], chs.cylinders);
        b[off::HEADS] = chs.heads;
        b[off::SECTORS] = chs.sectors_per_track;
        let sum = checksum_without_field(&b, off::CHECKSUM);
        BigEndian::write_u32(&mut b[off::CHECKSUM..], sum);
        b
    }

    /// Total sectors described by the CHS geometry.
    pub fn chs_sectors(&self) -> u64 {
        self.cylinders as u64 * self.heads as u64 * self.sectors_per_track as u64
    }

    /// The creator application as text (for messages and info).
    pub fn creator_app_str(&self) -> String {
        String::from_utf8_lossy(&self.creator_app).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Footer {
        Footer {
            features: 2,
            version: 0x0001_0000,
            data_offset: 512,
            timestamp: 0x1234_5678,
            creator_app: *b"qem2",
            creator_version: 0x0005_0003,
            creator_os: *b"Wi2k",
            original_size: 5 << 20,
            current_size: 5 << 20,
            cylinders: 150,
            heads: 4,
            sectors_per_track: 17,
            disk_type: DiskType::Dynamic,
            checksum: 0,
            uuid: [7; 16],
            saved_state: 0,
        }
    }

    #[test]
    fn round_trip_and_checksum() {
        let f = sample();
        let b = f.to_bytes();
        let p = Footer::parse(&b).unwrap();
        assert_eq!(p.to_bytes(), b);
        assert_eq!(Footer { checksum: 0, ..p }, f);
        let mut bad = b;
        bad[100] ^= 1;
        let e = Footer::parse(&bad).unwrap_err();
        assert!(e.message().contains("checksum"), "{e}");
        let mut bad = b;
        BigEndian::write_u32(&mut bad[off::DISK_TYPE..], 5);
        let sum = checksum_without_field(&bad, off::CHECKSUM);
        BigEndian::write_u32(&mut bad[off::CHECKSUM..], sum);
        assert!(Footer::parse(&bad).is_err());
        assert!(Footer::parse(&b[..511]).is_err());
        assert!(Footer::parse(&[0u8; 512]).is_err());
    }
}
