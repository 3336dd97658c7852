//! The VDI pre-header and header (version 1.1), little-endian, in the first 512 bytes.
//!
//! Layout (offsets from the start of the file), as VirtualBox's `VDIPREHEADER` +
//! `VDIHEADER1PLUS` and qemu's `VdiHeader` define it:
//!
//! | offset | size | field |
//! |-------:|-----:|-------|
//! | 0x000 | 64  | text (`<<< ... Disk Image >>>\n`) |
//! | 0x040 | 4   | signature 0xbeda107f |
//! | 0x044 | 4   | version (0x00010001 = 1.1) |
//! | 0x048 | 4   | header size (from 0x48: 0x180 without, 0x190 with LCHS geometry) |
//! | 0x04c | 4   | image type (1 dynamic, 2 static, 3 undo, 4 differencing) |
//! | 0x050 | 4   | image flags |
//! | 0x054 | 256 | description |
//! | 0x154 | 4   | offset of the block map |
//! | 0x158 | 4   | offset of the data area |
//! | 0x15c | 16  | legacy geometry: cylinders, heads, sectors, sector size |
//! | 0x16c | 4   | unused |
//! | 0x170 | 8   | disk size in bytes |
//! | 0x178 | 4   | block size |
//! | 0x17c | 4   | block extra (per-block private data before the block's bytes) |
//! | 0x180 | 4   | blocks in image (block map entries) |
//! | 0x184 | 4   | blocks allocated |
//! | 0x188 | 16×4| UUIDs: image, last snapshot (modification), link, parent |
//! | 0x1c8 | 16  | LCHS geometry (header size >= 0x190 only) |

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};

/// Size of the on-disk header block we read and write (header fields end at 0x1d8).
pub const HEADER_BLOCK: usize = 512;
/// The signature at 0x40.
pub const SIGNATURE: u32 = 0xbeda_107f;
/// Version 1.1, the only one qemu and current VirtualBox write.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Offset of the header proper (after the 64-byte text, signature and version).
pub const PRE_HEADER_SIZE: u32 = 0x48;
/// `sizeof(VDIHEADER1)`: the v1 header without LCHS geometry (what qemu writes).
pub const HEADER1_SIZE: u32 = 0x180;
/// `sizeof(VDIHEADER1PLUS)`: with LCHS geometry (what VirtualBox writes).
pub const HEADER1_PLUS_SIZE: u32 = 0x190;
/// The only sector size VDI (and qemu) uses.
pub const SECTOR_SIZE: u32 = 512;
/// Block size qemu and VirtualBox write.
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Smallest block size we read.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest block size we read (VirtualBox allows any power of two; beyond this is absurd).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Text qemu writes at offset 0.
pub const QEMU_TEXT: &str = "<<< QEMU VM Virtual Disk Image >>>\n";

/// Block map entry: never written (reads as zeros; there is no backing here).
pub const BLOCK_UNALLOCATED: u32 = 0xffff_ffff;
/// Block map entry: discarded, reads as zeros.
pub const BLOCK_DISCARDED: u32 = 0xffff_fffe;

/// VDI image types.
///
/// Closed: the VDI header's image-type field defines exactly these four values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageType {
    /// Blocks allocated on first write (type 1, VirtualBox's "normal").
    Dynamic,
    /// Every block allocated at creation (type 2, "fixed").
    Static,
    /// Undo image (type 3): laid out like a dynamic one.
    Undo,
    /// Differencing image (type 4): unwritten blocks come from a parent.
    Differencing,
}

impl ImageType {
    /// The on-disk value.
    pub fn to_u32(self) -> u32 {
        match self {
            ImageType::Dynamic => 1,
            ImageType::Static => 2,
            ImageType::Undo => 3,
            ImageType::Differencing => 4,
        }
    }
    fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => ImageType::Dynamic,
            2 => ImageType::Static,
            3 => ImageType::Undo,
            4 => ImageType::Differencing,
            _ => return None,
        })
    }
}

/// A cylinders/heads/sectors/sector-size quadruple (legacy or LCHS geometry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Cylinders.
    pub cylinders: u32,
    /// Heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
    /// Bytes per sector.
    pub sector_size: u32,
}

impl Geometry {
    fn parse(b: &[u8]) -> Self {
        Geometry {
            cylinders: LE::read_u32(&b[0..4]),
            heads: LE::read_u32(&b[4..8]),
            sectors: LE::read_u32(&b[8..12]),
            sector_size: LE::read_u32(&b[12..16]),
        }
    }
    fn write(&self, b: &mut [u8]) {
        LE::write_u32(&mut b[0..4], self.cylinders);
        LE::write_u32(&mut b[4..8], self.heads);
        LE::write_u32(&mut b[8..12], self.sectors);
        LE::write_u32(&mut b[12..16], self.sector_size);
    }
}

/// A UUID as stored in a VDI (IPRT byte order: the first three fields little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VdiUuid(pub [u8; 16]);

impl VdiUuid {
    /// True for the all-zero UUID (VirtualBox's "not set").
    pub fn is_null(&self) -> bool {
        self.0 == [0; 16]
    }

    /// A fresh random (version 4) UUID, in VDI byte order.
    pub fn random() -> Self {
        Self::from_rfc_bytes(crate::writer::random_uuid_v4())
    }

    /// Convert from RFC 4122 (big-endian fields) byte order.
    pub fn from_rfc_bytes(mut b: [u8; 16]) -> Self {
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        VdiUuid(b)
    }

    /// The RFC 4122 byte order (the swap is its own inverse).
    pub fn to_rfc_bytes(self) -> [u8; 16] {
        VdiUuid::from_rfc_bytes(self.0).0
    }
}

impl std::fmt::Display for VdiUuid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.to_rfc_bytes();
        for (i, x) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{x:02x}")?;
        }
        Ok(())
    }
}

/// The VDI header. `parse` accepts only images we can read correctly; everything else
/// gets an error naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiHeader {
    /// The informational text at offset 0 (NUL padded).
    pub text: [u8; 64],
    /// Format version (major << 16 | minor).
    pub version: u32,
    /// Size of the header from offset 0x48.
    pub header_size: u32,
    /// Image type.
    pub image_type: ImageType,
    /// Image flags (VirtualBox: 1 = zero-expand hint); informational.
    pub image_flags: u32,
    /// Free-form description (NUL padded).
    pub description: [u8; 256],
    /// File offset of the block map.
    pub offset_bmap: u32,
    /// File offset of block 0 of the data area.
    pub offset_data: u32,
    /// Legacy geometry; its sector size must be 512.
    pub legacy_geometry: Geometry,
    /// Guest size in bytes as stored (may be odd: VBoxManage convertfromraw writes such).
    pub disk_size: u64,
    /// Block (allocation unit) size in bytes.
    pub block_size: u32,
    /// Per-block private bytes before each block's data (always 0 in practice).
    pub block_extra: u32,
    /// Number of block map entries.
    pub blocks_in_image: u32,
    /// Number of blocks stored in the data area.
    pub blocks_allocated: u32,
    /// This image's UUID.
    pub uuid_image: VdiUuid,
    /// UUID of the last modification / snapshot.
    pub uuid_last_snap: VdiUuid,
    /// Differencing images: the parent's image UUID.
    pub uuid_link: VdiUuid,
    /// Differencing images: the parent's modification UUID.
    pub uuid_parent: VdiUuid,
    /// LCHS geometry (present when `header_size >= 0x190`).
    pub lchs_geometry: Option<Geometry>,
}

impl VdiHeader {
    /// A header for a new image of `disk_size` bytes in `block_size` blocks, laid out like
    /// qemu's (block map at 0x200, data right after it, 512-aligned) with the header fields
    /// VirtualBox checks set as VirtualBox writes them (v1.1, header size 0x190, sector
    /// size 512 in both geometries, creation and modification UUIDs set).
    pub fn new(disk_size: u64, block_size: u32, image_type: ImageType) -> Result<Self> {
        let blocks = disk_size.div_ceil(u64::from(block_size));
        let blocks = u32::try_from(blocks).map_err(|_| {
            Error::limit(format!(
                "a {disk_size}-byte VDI needs {blocks} blocks, more than 2^32"
            ))
        })?;
        let bmap_bytes = (u64::from(blocks) * 4).next_multiple_of(u64::from(SECTOR_SIZE));
        let offset_bmap = HEADER_BLOCK as u32;
        let offset_data = u32::try_from(u64::from(offset_bmap) + bmap_bytes)
            .map_err(|_| Error::limit("VDI block map does not fit below 4 GiB"))?;
        let mut text = [0u8; 64];
        text[..QEMU_TEXT.len()].copy_from_slice(QEMU_TEXT.as_bytes());
        let sector_geometry = Geometry {
            sector_size: SECTOR_SIZE,
            ..Default::default()
        };
        Ok(VdiHeader {
            text,
            version: VERSION_1_1,
            header_size: HEADER1_PLUS_SIZE,
            image_type,
            image_flags: 0,
            description: [0; 256],
            offset_bmap,
            offset_data,
            legacy_geometry: sector_geometry,
            disk_size,
            block_size,
            block_extra: 0,
            blocks_in_image: blocks,
            blocks_allocated: if image_type == ImageType::Static {
                blocks
            } else {
                0
            },
            uuid_image: VdiUuid::random(),
            uuid_last_snap: VdiUuid::random(),
            uuid_link: VdiUuid::default(),
            uuid_parent: VdiUuid::default(),
            lchs_geometry: Some(sector_geometry),
        })
    }

    /// Parse and validate the first 512 bytes of a file.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < HEADER_BLOCK {
            return Err(Error::invalid(format!(
                "file too short for a VDI header ({} bytes, need {HEADER_BLOCK})",
                b.len()
            )));
        }
        let u32_at = |o: usize| LE::read_u32(&b[o..o + 4]);
        let bad = |field: &str, off: u64, msg: String| {
            Error::corrupt(msg).with_field(field.to_string()).at(off)
        };
        let unsupported = |field: &str, off: u64, msg: String| {
            Error::unsupported(msg)
                .with_field(field.to_string())
                .at(off)
        };

        let signature = u32_at(0x40);
        if signature != SIGNATURE {
            return Err(Error::invalid(format!(
                "not a VDI image (signature {signature:#010x}, expected {SIGNATURE:#010x})"
            ))
            .with_field("signature")
            .at(0x40));
        }
        let version = u32_at(0x44);
        if version != VERSION_1_1 {
            return Err(unsupported(
                "version",
                0x44,
                format!(
                    "VDI version {}.{} is not supported (only 1.1)",
                    version >> 16,
                    version & 0xffff
                ),
            ));
        }
        let header_size = u32_at(0x48);
        if header_size < HEADER1_SIZE {
            return Err(bad(
                "header_size",
                0x48,
                format!(
                    "VDI header size {header_size:#x} is below the v1 minimum {HEADER1_SIZE:#x}"
                ),
            ));
        }
        let type_raw = u32_at(0x4c);
        let image_type = ImageType::from_u32(type_raw).ok_or_else(|| {
            bad(
                "image_type",
                0x4c,
                format!("unknown VDI image type {type_raw} (known: 1 dynamic, 2 static, 3 undo, 4 differencing)"),
            )
        })?;
        let legacy_geometry = Geometry::parse(&b[0x15c..0x16c]);
        let h = VdiHeader {
            text: b[0..64].try_into().expect("64-byte slice"),
            version,
            header_size,
            image_type,
            image_flags: u32_at(0x50),
            description: b[0x54..0x154].try_into().expect("256-byte slice"),
            offset_bmap: u32_at(0x154),
            offset_data: u32_at(0x158),
            legacy_geometry,
            disk_size: LE::read_u64(&b[0x170..0x178]),
            block_size: u32_at(0x178),
            block_extra: u32_at(0x17c),
            blocks_in_image: u32_at(0x180),
            blocks_allocated: u32_at(0x184),
            uuid_image: VdiUuid(b[0x188..0x198].try_into().expect("16-byte slice")),
            uuid_last_snap: VdiUuid(b[0x198..0x1a8].try_into().expect("16-byte slice")),
            uuid_link: VdiUuid(b[0x1a8..0x1b8].try_into().expect("16-byte slice")),
            uuid_parent: VdiUuid(b[0x1b8..0x1c8].try_into().expect("16-byte slice")),
            lchs_geometry: (header_size >= HEADER1_PLUS_SIZE)
                .then(|| Geometry::parse(&b[0x1c8..0x1d8])),
        };

        // A differencing image's unwritten blocks live in a parent known only by UUID; we
        // never go looking for files, so say so plainly.
        if h.image_type == ImageType::Differencing
            || !h.uuid_parent.is_null()
            || !h.uuid_link.is_null()
        {
            let field = if !h.uuid_parent.is_null() {
                "uuid_parent"
            } else if !h.uuid_link.is_null() {
                "uuid_link"
            } else {
                "image_type"
            };
            return Err(Error::unsupported(format!(
                "differencing VDI needs its parent (parent UUID {}, link UUID {}); \
                 convert it with VirtualBox (VBoxManage clonemedium) to a standalone image first",
                h.uuid_parent, h.uuid_link
            ))
            .with_field(field));
        }
        if h.legacy_geometry.sector_size != SECTOR_SIZE {
            return Err(unsupported(
                "sector_size",
                0x168,
                format!(
                    "VDI sector size {} is not {SECTOR_SIZE}",
                    h.legacy_geometry.sector_size
                ),
            ));
        }
        let bs = h.block_size;
        if bs == 0 || !bs.is_power_of_two() {
            // A malformed header, like the other formats' block-size checks (not a table
            // inconsistency): InvalidFormat.
            return Err(
                Error::invalid(format!("VDI block size {bs} is not a power of two"))
                    .with_field("block_size")
                    .at(0x178),
            );
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(unsupported(
                "block_size",
                0x178,
                format!("VDI block size {bs} is outside {MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE}"),
            ));
        }
        if h.block_extra != 0 {
            // VirtualBox puts block_extra private bytes before each block; neither it nor
            // qemu ever writes such images, and qemu would misread them: refuse.
            return Err(unsupported(
                "block_extra",
                0x17c,
                format!(
                    "VDI block extra data ({} bytes per block) is not supported",
                    h.block_extra
                ),
            ));
        }
        let room = u64::from(h.blocks_in_image) * u64::from(bs);
        if h.disk_size > room {
            return Err(bad(
                "disk_size",
                0x170,
                format!(
                    "VDI disk size {} exceeds blocks_in_image {} x block size {bs} = {room}",
                    h.disk_size, h.blocks_in_image
                ),
            ));
        }
        if h.blocks_allocated > h.blocks_in_image {
            return Err(bad(
                "blocks_allocated",
                0x184,
                format!(
                    "VDI claims {} allocated blocks but has only {} blocks",
                    h.blocks_allocated, h.blocks_in_image
                ),
            ));
        }
        let min_bmap = PRE_HEADER_SIZE + HEADER1_SIZE;
        if h.offset_bmap < min_bmap || !h.offset_bmap.is_multiple_of(SECTOR_SIZE) {
            return Err(bad(
                "offset_bmap",
                0x154,
                format!(
                    "VDI block map offset {:#x} overlaps the header or is not 512-aligned",
                    h.offset_bmap
                ),
            ));
        }
        let bmap_end = u64::from(h.offset_bmap) + u64::from(h.blocks_in_image) * 4;
        if u64::from(h.offset_data) < bmap_end || !h.offset_data.is_multiple_of(SECTOR_SIZE) {
            return Err(bad(
                "offset_data",
                0x158,
                format!(
                    "VDI data offset {:#x} overlaps the block map (ends at {bmap_end:#x}) or is not 512-aligned",
                    h.offset_data
                ),
            ));
        }
        Ok(h)
    }

    /// The guest size: qemu rounds an odd disk size up to whole sectors, and so do we so
    /// both read the same bytes.
    pub fn virtual_size(&self) -> u64 {
        self.disk_size.next_multiple_of(u64::from(SECTOR_SIZE))
    }

    /// Length in bytes of the block map as stored.
    pub fn bmap_len(&self) -> u64 {
        u64::from(self.blocks_in_image) * 4
    }

    /// The text at offset 0 up to its first NUL or newline, for messages.
    pub fn text_str(&self) -> String {
        let end = self
            .text
            .iter()
            .position(|&c| c == 0 || c == b'\n')
            .unwrap_or(self.text.len());
        String::from_utf8_lossy(&self.text[..end]).into_owned()
    }

    /// The 512-byte on-disk form (bytes past the header are zero).
    pub fn to_bytes(&self) -> [u8; HEADER_BLOCK] {
        let mut b = [0u8; HEADER_BLOCK];
        b[0..64].copy_from_slice(&self.text);
        LE::write_u32(&mut b[0x40..], SIGNATURE);
        LE::write_u32(&mut b[0x44..], self.version);
        LE::write_u32(&mut b[0x48..], self.header_size);
        LE::write_u32(&mut b[0x4c..], self.image_type.to_u32());
        LE::write_u32(&mut b[0x50..], self.image_flags);
        b[0x54..0x154].copy_from_slice(&self.description);
        LE::write_u32(&mut b[0x154..], self.offset_bmap);
        LE::write_u32(&mut b[0x158..], self.offset_data);
        self.legacy_geometry.write(&mut b[0x15c..0x16c]);
        LE::write_u64(&mut b[0x170..], self.disk_size);
        LE::write_u32(&mut b[0x178..], self.block_size);
        LE::write_u32(&mut b[0x17c..], self.block_extra);
        LE::write_u32(&mut b[0x180..], self.blocks_in_image);
        LE::write_u32(&mut b[0x184..], self.blocks_allocated);
        b[0x188..0x198].copy_from_slice(&self.uuid_image.0);
        b[0x198..0x1a8].copy_from_slice(&self.uuid_last_snap.0);
        b[0x1a8..0x1b8].copy_from_slice(&self.uuid_link.0);
        b[0x1b8..0x1c8].copy_from_slice(&self.uuid_parent.0);
        if let Some(g) = &self.lchs_geometry {
            g.write(&mut b[0x1c8..0x1d8]);
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn round_trip_and_layout() {
        let mut h =
            VdiHeader::new(3 * (1 << 20) + 1000, DEFAULT_BLOCK_SIZE, ImageType::Dynamic).unwrap();
        h.blocks_allocated = 2;
        let b = h.to_bytes();
        assert_eq!(&b[0x40..0x44], &[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(LE::read_u32(&b[0x154..]), 0x200);
        assert_eq!(LE::read_u32(&b[0x158..]), 0x400);
        assert_eq!(LE::read_u32(&b[0x180..]), 4);
        assert_eq!(LE::read_u32(&b[0x1d4..]), 512);
        assert_eq!(VdiHeader::parse(&b).unwrap(), h);
        assert_eq!(h.virtual_size(), 3 * (1 << 20) + 1024);
        assert_eq!(h.text_str(), "<<< QEMU VM Virtual Disk Image >>>");
    }

    #[test]
    fn uuids_are_random_v4_in_vdi_order() {
        let a = VdiUuid::random();
        let b = VdiUuid::random();
        assert_ne!(a, b);
        assert!(!a.is_null());
        // Version nibble: RFC byte 6 high nibble, stored little-endian at byte 7.
        assert_eq!(a.0[7] >> 4, 4);
        let s = a.to_string();
        assert_eq!(s.len(), 36);
        assert_eq!(&s[14..15], "4");
    }

    fn header() -> [u8; 512] {
        VdiHeader::new(4 << 20, DEFAULT_BLOCK_SIZE, ImageType::Dynamic)
            .unwrap()
            .to_bytes()
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: &[(usize, u32, &str, ErrorKind)] = &[
            (0x40, 0x1234, "signature", ErrorKind::InvalidFormat),
            (0x44, 0x0001_0000, "version", ErrorKind::Unsupported),
            (0x48, 0x10, "header_size", ErrorKind::Corrupt),
            (0x4c, 9, "image_type", ErrorKind::Corrupt),
            (0x4c, 4, "image_type", ErrorKind::Unsupported),
            (0x168, 4096, "sector_size", ErrorKind::Unsupported),
            (0x178, 0, "block_size", ErrorKind::InvalidFormat),
            (0x178, 3 << 19, "block_size", ErrorKind::InvalidFormat),
            (0x178, 1 << 31, "block_size", ErrorKind::Unsupported),
            (0x17c, 512, "block_extra", ErrorKind::Unsupported),
            (0x180, 1, "disk_size", ErrorKind::Corrupt),
            (0x184, 5, "blocks_allocated", ErrorKind::Corrupt),
            (0x154, 0x100, "offset_bmap", ErrorKind::Corrupt),
            (0x158, 0x201, "offset_data", ErrorKind::Corrupt),
            (0x1bc, 1, "uuid_parent", ErrorKind::Unsupported),
            (0x1ac, 1, "uuid_link", ErrorKind::Unsupported),
        ];
        for &(off, val, field, kind) in cases {
            let mut b = header();
            LE::write_u32(&mut b[off..], val);
            let e = VdiHeader::parse(&b).unwrap_err();
            assert_eq!(e.kind(), kind, "{field}: {e}");
            assert_eq!(e.field(), Some(field), "{e}");
        }
        let e = VdiHeader::parse(&header()[..100]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidFormat);
        let mut b = header();
        LE::write_u32(&mut b[0x4c..], 4);
        assert!(VdiHeader::parse(&b)
            .unwrap_err()
            .message()
            .contains("differencing VDI needs its parent"));
    }
}
