//! The fixed-size structures of a VHDX file (MS-VHDX 1.0): the file identifier, the two
//! headers, the two region tables, the metadata table and its items, and BAT entries.
//! Every structure is little-endian; GUIDs are stored in Microsoft's mixed-endian layout
//! and kept here as their on-disk bytes.

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};

/// The file identifier's signature, at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
/// Size of the file identifier structure.
pub const FILE_ID_SIZE: usize = 64 << 10;
/// Offsets of the two headers.
pub const HEADER_OFFSETS: [u64; 2] = [64 << 10, 128 << 10];
/// Bytes a header's checksum covers.
pub const HEADER_SIZE: usize = 4096;
/// Offsets of the two region tables.
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 << 10, 256 << 10];
/// Bytes a region table's checksum covers.
pub const REGION_TABLE_SIZE: usize = 64 << 10;
/// End of the header section: every region, the log and every block lie past it.
pub const HEADER_SECTION_END: u64 = 1 << 20;
/// Regions, the log and payload blocks are aligned to (and sized in) this unit.
pub const MIB: u64 = 1 << 20;
/// Most entries a region table or metadata table may hold (the spec's limit).
pub const MAX_TABLE_ENTRIES: u32 = 2047;
/// Size of the metadata table at the start of the metadata region.
pub const METADATA_TABLE_SIZE: usize = 64 << 10;
/// Smallest and largest payload block sizes.
pub const MIN_BLOCK_SIZE: u64 = 1 << 20;
/// See [`MIN_BLOCK_SIZE`].
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// Largest virtual disk the spec allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Sectors one sector bitmap block describes (2^23: 1 MiB of bits).
pub const SECTORS_PER_BITMAP: u64 = 1 << 23;

const HEADER_SIG: &[u8; 4] = b"head";
const REGION_SIG: &[u8; 4] = b"regi";
const METADATA_SIG: &[u8; 8] = b"metadata";

/// A GUID in its on-disk (mixed-endian) byte order.
pub type Guid = [u8; 16];

/// The on-disk bytes of the GUID written `d1-d2-d3-d4`.
pub const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

/// The canonical text form of an on-disk GUID.
pub fn guid_string(g: &Guid) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        LE::read_u32(&g[0..4]),
        LE::read_u16(&g[4..6]),
        LE::read_u16(&g[6..8]),
        g[8],
        g[9],
        g[10..]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// Region: the block allocation table.
pub const BAT_GUID: Guid = guid(
    0x2dc27766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
/// Region: the metadata region.
pub const METADATA_GUID: Guid = guid(
    0x8b7ca206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
/// Metadata item: file parameters (block size, flags).
pub const FILE_PARAMETERS_GUID: Guid = guid(
    0xcaa16737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
/// Metadata item: virtual disk size.
pub const VIRTUAL_SIZE_GUID: Guid = guid(
    0x2fa54224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
/// Metadata item: SCSI page 83 identifier.
pub const PAGE83_GUID: Guid = guid(
    0xbeca12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
/// Metadata item: logical sector size.
pub const LOGICAL_SECTOR_GUID: Guid = guid(
    0x8141bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
/// Metadata item: physical sector size.
pub const PHYSICAL_SECTOR_GUID: Guid = guid(
    0xcda348c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
/// Metadata item: parent locator (differencing disks).
pub const PARENT_LOCATOR_GUID: Guid = guid(
    0xa8d35f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// Parent locator type: a VHDX parent.
pub const PARENT_TYPE_VHDX_GUID: Guid = guid(
    0xb04aefb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// CRC-32C of `buf` with the 4 bytes at `crc_at` taken as zero, as every VHDX checksum
/// is computed.
pub fn checksum(buf: &[u8], crc_at: usize) -> u32 {
    let c = crc32c::crc32c(&buf[..crc_at]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[crc_at + 4..])
}

/// Error unless the checksum stored at `crc_at` matches.
fn verify_checksum(buf: &[u8], crc_at: usize, what: &str) -> Result<()> {
    let stored = LE::read_u32(&buf[crc_at..]);
    let computed = checksum(buf, crc_at);
    if stored != computed {
        return Err(Error::invalid(format!(
            "{what} checksum mismatch: stored {stored:#010x}, computed CRC-32C {computed:#010x}"
        ))
        .with_field(format!("{what}.checksum")));
    }
    Ok(())
}

/// A VHDX header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Which header is current: the valid one with the larger number.
    pub sequence_number: u64,
    /// Changes on the first write to the file in a session.
    pub file_write_guid: Guid,
    /// Changes on the first write of guest-visible data (a child's parent linkage).
    pub data_write_guid: Guid,
    /// All zero when the log is empty; log entries carry the same GUID.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: u16,
    /// Must be 1.
    pub version: u16,
    /// Log size in bytes (a multiple of 1 MiB).
    pub log_length: u32,
    /// Log offset in the file (a multiple of 1 MiB).
    pub log_offset: u64,
}

impl Header {
    /// Parse and verify a 4 KiB header (signature, checksum, version).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < HEADER_SIZE {
            return Err(Error::invalid("VHDX header shorter than 4 KiB").with_field("header"));
        }
        let buf = &buf[..HEADER_SIZE];
        if &buf[0..4] != HEADER_SIG {
            return Err(Error::invalid(format!(
                "VHDX header signature is {:?}, not \"head\"",
                String::from_utf8_lossy(&buf[0..4])
            ))
            .with_field("header.signature"));
        }
        verify_checksum(buf, 4, "header")?;
        let g = |at: usize| -> Guid { buf[at..at + 16].try_into().unwrap() };
        let h = Header {
            sequence_number: LE::read_u64(&buf[8..]),
            file_write_guid: g(16),
            data_write_guid: g(32),
            log_guid: g(48),
            log_version: LE::read_u16(&buf[64..]),
            version: LE::read_u16(&buf[66..]),
            log_length: LE::read_u32(&buf[68..]),
            log_offset: LE::read_u64(&buf[72..]),
        };
        if h.version != 1 {
            return Err(Error::unsupported(format!(
                "VHDX header version {} (only version 1 exists)",
                h.version
            ))
            .with_field("header.version"));
        }
        Ok(h)
    }

    /// The 4 KiB header with its checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE];
        b[0..4].copy_from_slice(HEADER_SIG);
        LE::write_u64(&mut b[8..], self.sequence_number);
        b[16..32].copy_from_slice(&self.file_write_guid);
        b[32..48].copy_from_slice(&self.data_write_guid);
        b[48..64].copy_from_slice(&self.log_guid);
        LE::write_u16(&mut b[64..], self.log_version);
        LE::write_u16(&mut b[66..], self.version);
        LE::write_u32(&mut b[68..], self.log_length);
        LE::write_u64(&mut b[72..], self.log_offset);
        let c = checksum(&b, 4);
        LE::write_u32(&mut b[4..], c);
        b
    }
}

/// One region table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// What the region is (BAT, metadata, or unknown).
    pub guid: Guid,
    /// File offset (a multiple of 1 MiB, past the header section).
    pub file_offset: u64,
    /// Length in bytes (a multiple of 1 MiB).
    pub length: u32,
    /// A reader that does not know this region must refuse the file.
    pub required: bool,
}

/// A region table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionTable {
    /// Its entries, in file order.
    pub entries: Vec<Region>,
}

impl RegionTable {
    /// Parse and verify a 64 KiB region table (signature, checksum, entry count, and each
    /// entry's alignment; overlaps are checked by the reader, which knows the log too).
    pub fn parse(buf: &[u8]) -> Result<RegionTable> {
        if buf.len() < REGION_TABLE_SIZE {
            return Err(
                Error::invalid("VHDX region table shorter than 64 KiB").with_field("region_table")
            );
        }
        let buf = &buf[..REGION_TABLE_SIZE];
        if &buf[0..4] != REGION_SIG {
            return Err(Error::invalid(format!(
                "VHDX region table signature is {:?}, not \"regi\"",
                String::from_utf8_lossy(&buf[0..4])
            ))
            .with_field("region_table.signature"));
        }
        verify_checksum(buf, 4, "region_table")?;
        let count = LE::read_u32(&buf[8..]);
        if count > MAX_TABLE_ENTRIES {
            return Err(Error::invalid(format!(
                "VHDX region table has {count} entries (the limit is {MAX_TABLE_ENTRIES})"
            ))
            .with_field("region_table.entry_count"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let e = &buf[16 + i * 32..16 + (i + 1) * 32];
            let r = Region {
                guid: e[0..16].try_into().unwrap(),
                file_offset: LE::read_u64(&e[16..]),
                length: LE::read_u32(&e[24..]),
                required: LE::read_u32(&e[28..]) & 1 != 0,
            };
            let field = format!("region_table.entry[{i}]");
            if !r.file_offset.is_multiple_of(MIB) || r.file_offset < HEADER_SECTION_END {
                return Err(Error::invalid(format!(
                    "VHDX region {} starts at {:#x}, which is not a multiple of 1 MiB past the header section",
                    guid_string(&r.guid),
                    r.file_offset
                ))
                .with_field(format!("{field}.file_offset")));
            }
            if !(r.length as u64).is_multiple_of(MIB) || r.length == 0 {
                return Err(Error::invalid(format!(
                    "VHDX region {} has length {}, which is not a non-zero multiple of 1 MiB",
                    guid_string(&r.guid),
                    r.length
                ))
                .with_field(format!("{field}.length")));
            }
            entries.push(r);
        }
        Ok(RegionTable { entries })
    }

    /// The 64 KiB table with its checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; REGION_TABLE_SIZE];
        b[0..4].copy_from_slice(REGION_SIG);
        LE::write_u32(&mut b[8..], self.entries.len() as u32);
        for (i, r) in self.entries.iter().enumerate() {
            let e = &mut b[16 + i * 32..16 + (i + 1) * 32];
            e[0..16].copy_from_slice(&r.guid);
            LE::write_u64(&mut e[16..], r.file_offset);
            LE::write_u32(&mut e[24..], r.length);
            LE::write_u32(&mut e[28..], r.required as u32);
        }
        let c = checksum(&b, 4);
        LE::write_u32(&mut b[4..], c);
        b
    }
}

/// Metadata entry flag: the item is user metadata.
pub const META_IS_USER: u32 = 1;
/// Metadata entry flag: the item describes the virtual disk (not the file).
pub const META_IS_VIRTUAL_DISK: u32 = 2;
/// Metadata entry flag: a reader that does not know the item must refuse the file.
pub const META_IS_REQUIRED: u32 = 4;

/// One metadata table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataEntry {
    /// Which item.
    pub item_id: Guid,
    /// Offset from the start of the metadata region (at least 64 KiB unless empty).
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
    /// `META_*` flags.
    pub flags: u32,
}

/// The metadata table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataTable {
    /// Its entries.
    pub entries: Vec<MetadataEntry>,
}

impl MetadataTable {
    /// Parse the 64 KiB metadata table of a region of `region_len` bytes: signature,
    /// entry count, each item inside the region past the table, and no two items of
    /// the same kind or overlapping.
    pub fn parse(buf: &[u8], region_len: u64) -> Result<MetadataTable> {
        if buf.len() < METADATA_TABLE_SIZE {
            return Err(
                Error::invalid("VHDX metadata table shorter than 64 KiB").with_field("metadata")
            );
        }
        if &buf[0..8] != METADATA_SIG {
            return Err(Error::invalid(format!(
                "VHDX metadata table signature is {:?}, not \"metadata\"",
                String::from_utf8_lossy(&buf[0..8])
            ))
            .with_field("metadata.signature"));
        }
        let count = LE::read_u16(&buf[10..]) as u32;
        if count > MAX_TABLE_ENTRIES {
            return Err(Error::invalid(format!(
                "VHDX metadata table has {count} entries (the limit is {MAX_TABLE_ENTRIES})"
            ))
            .with_field("metadata.entry_count"));
        }
        let mut entries: Vec<MetadataEntry> = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let e = &buf[32 + i * 32..32 + (i + 1) * 32];
            let m = MetadataEntry {
                item_id: e[0..16].try_into().unwrap(),
                offset: LE::read_u32(&e[16..]),
                length: LE::read_u32(&e[20..]),
                flags: LE::read_u32(&e[24..]),
            };
            let field = format!("metadata.entry[{i}]");
            let end = m.offset as u64 + m.length as u64;
            if m.length > 0 && (m.offset < METADATA_TABLE_SIZE as u32 || end > region_len) {
                return Err(Error::invalid(format!(
                    "VHDX metadata item {} ({} bytes at {:#x}) lies outside the metadata region's item area ({:#x}..{region_len:#x})",
                    guid_string(&m.item_id),
                    m.length,
                    m.offset,
                    METADATA_TABLE_SIZE
                ))
                .with_field(format!("{field}.offset")));
            }
            for (j, o) in entries.iter().enumerate() {
                if o.item_id == m.item_id {
                    return Err(Error::invalid(format!(
                        "VHDX metadata item {} appears twice (entries {j} and {i})",
                        guid_string(&m.item_id)
                    ))
                    .with_field(format!("{field}.item_id")));
                }
                let oend = o.offset as u64 + o.length as u64;
                if m.length > 0
                    && o.length > 0
                    && (m.offset as u64) < oend
                    && (o.offset as u64) < end
                {
                    return Err(Error::invalid(format!(
                        "VHDX metadata items {j} and {i} overlap ({:#x}..{oend:#x} and {:#x}..{end:#x})",
                        o.offset, m.offset
                    ))
                    .with_field(format!("{field}.offset")));
                }
            }
            entries.push(m);
        }
        Ok(MetadataTable { entries })
    }

    /// The entry for `id`, if present.
    pub fn find(&self, id: &Guid) -> Option<&MetadataEntry> {
        self.entries.iter().find(|e| &e.item_id == id)
    }

    /// The 64 KiB table.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; METADATA_TABLE_SIZE];
        b[0..8].copy_from_slice(METADATA_SIG);
        LE::write_u16(&mut b[10..], self.entries.len() as u16);
        for (i, m) in self.entries.iter().enumerate() {
            let e = &mut b[32 + i * 32..32 + (i + 1) * 32];
            e[0..16].copy_from_slice(&m.item_id);
            LE::write_u32(&mut e[16..], m.offset);
            LE::write_u32(&mut e[20..], m.length);
            LE::write_u32(&mut e[24..], m.flags);
        }
        b
    }
}

/// File parameters flag: blocks stay allocated (a fixed disk).
pub const PARAM_LEAVE_BLOCKS_ALLOCATED: u32 = 1;
/// File parameters flag: a differencing disk.
pub const PARAM_HAS_PARENT: u32 = 2;

/// BAT entry state of a payload block: not stored (dynamic: zeros; differencing: parent).
pub const PAYLOAD_NOT_PRESENT: u8 = 0;
/// Payload state: contents undefined (read as zeros, or the parent's).
pub const PAYLOAD_UNDEFINED: u8 = 1;
/// Payload state: reads as zeros.
pub const PAYLOAD_ZERO: u8 = 2;
/// Payload state: unmapped by a trim (read as zeros, or the parent's).
pub const PAYLOAD_UNMAPPED: u8 = 3;
/// Payload state: all of the block is stored at the entry's offset.
pub const PAYLOAD_FULLY_PRESENT: u8 = 6;
/// Payload state: the sector bitmap says which sectors are stored (differencing only).
pub const PAYLOAD_PARTIALLY_PRESENT: u8 = 7;
/// Sector bitmap state: no bitmap block.
pub const BITMAP_NOT_PRESENT: u8 = 0;
/// Sector bitmap state: the 1 MiB bitmap is stored at the entry's offset.
pub const BITMAP_PRESENT: u8 = 6;

/// The state bits of a BAT entry.
pub fn bat_state(e: u64) -> u8 {
    (e & 7) as u8
}

/// The file offset of a BAT entry (its 44-bit field counts MiB).
pub fn bat_offset(e: u64) -> u64 {
    e & !0xF_FFFF
}

/// A BAT entry of `state` at file `offset` (a multiple of 1 MiB).
pub fn bat_entry(state: u8, offset: u64) -> u64 {
    offset | state as u64
}

/// Payload blocks per sector bitmap block: 2^23 sectors over the sectors of a block.
pub fn chunk_ratio(logical_sector_size: u64, block_size: u64) -> u64 {
    SECTORS_PER_BITMAP * logical_sector_size / block_size
}

/// BAT index of payload block `blk`: a sector bitmap entry follows every `chunk_ratio`
/// payload entries.
pub fn payload_index(blk: u64, chunk_ratio: u64) -> u64 {
    blk + blk / chunk_ratio
}

/// BAT index of the sector bitmap entry of chunk `chunk`.
pub fn bitmap_index(chunk: u64, chunk_ratio: u64) -> u64 {
    chunk * (chunk_ratio + 1) + chunk_ratio
}

/// Total BAT entries for `blocks` payload blocks: the spec's count, which for a
/// differencing disk includes the bitmap entry of a last partial chunk. For other disks
/// qemu counts only the bitmap entries between payload entries; both are accepted (the
/// reader needs only the entries it uses).
pub fn bat_entries(blocks: u64, chunk_ratio: u64, has_parent: bool) -> u64 {
    if has_parent {
        blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
    } else if blocks == 0 {
        0
    } else {
        blocks + (blocks - 1) / chunk_ratio
    }
}

/// The UTF-16LE bytes of `s`.
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Decode UTF-16LE `b` (an odd length or unpaired surrogate is an error).
pub fn from_utf16le(b: &[u8]) -> Option<String> {
    if !b.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = b.chunks_exact(2).map(LE::read_u16).collect();
    String::from_utf16(&units).ok()
}

#[doc(hidden)] // for the fuzz target: reach past the checksums
/// `data` with the checksums of both headers and both region tables recomputed (the
/// caller makes sure the file is long enough to hold them).
pub fn with_checksums_fixed(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let spans = [
        (HEADER_OFFSETS[0], HEADER_SIZE),
        (HEADER_OFFSETS[1], HEADER_SIZE),
        (REGION_TABLE_OFFSETS[0], REGION_TABLE_SIZE),
        (REGION_TABLE_OFFSETS[1], REGION_TABLE_SIZE),
    ];
    for (at, len) in spans {
        let at = at as usize;
        if let Some(s) = out.get_mut(at..at + len) {
            let c = checksum(s, 4);
            LE::write_u32(&mut s[4..], c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_layout_matches_the_spec() {
        assert_eq!(
            &BAT_GUID[..8],
            &[0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42]
        );
        assert_eq!(
            guid_string(&BAT_GUID),
            "2dc27766-f623-4200-9d64-115e9bfd4a08"
        );
    }

    #[test]
    fn header_round_trips_and_checks_crc() {
        let h = Header {
            sequence_number: 7,
            file_write_guid: [1; 16],
            data_write_guid: [2; 16],
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: 1 << 20,
        };
        let mut b = h.to_bytes();
        assert_eq!(Header::parse(&b).unwrap(), h);
        b[100] ^= 1;
        let e = Header::parse(&b).unwrap_err();
        assert_eq!(e.field(), Some("header.checksum"));
    }

    #[test]
    fn region_table_round_trips() {
        let t = RegionTable {
            entries: vec![Region {
                guid: BAT_GUID,
                file_offset: 2 << 20,
                length: 1 << 20,
                required: true,
            }],
        };
        assert_eq!(RegionTable::parse(&t.to_bytes()).unwrap(), t);
    }

    #[test]
    fn bat_indices_interleave() {
        let cr = chunk_ratio(512, 32 << 20);
        assert_eq!(cr, 128);
        assert_eq!(payload_index(127, cr), 127);
        assert_eq!(payload_index(128, cr), 129);
        assert_eq!(bitmap_index(0, cr), 128);
        assert_eq!(bat_entries(129, cr, false), 130);
        assert_eq!(bat_entries(129, cr, true), 258);
    }
}
