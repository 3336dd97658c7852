//! On-disk structures of sparse extents: the hosted sparse header (`KDMV`, versions 1-3),
//! the legacy ESX sparse header (`COWD`), and the stream markers of streamOptimized files.
//!
//! All integers are little-endian. Sizes and offsets in headers are in 512-byte sectors.

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::writer::EditFile;

/// Sector size every VMDK offset is counted in.
pub const SECTOR: u64 = 512;
/// Offset of the header's uncleanShutdown byte.
pub const UNCLEAN_SHUTDOWN_AT: u64 = 72;

/// Set or clear the uncleanShutdown byte of the sparse header in `file`, flushed (one
/// sector's byte: the write is atomic).
pub fn write_unclean_shutdown(file: &mut EditFile, on: bool) -> Result<()> {
    let what = if on {
        "marking the VMDK header (uncleanShutdown)"
    } else {
        "clearing the VMDK header's uncleanShutdown"
    };
    file.write_at(&[u8::from(on)], UNCLEAN_SHUTDOWN_AT, what)?;
    file.sync("flushing the VMDK header")
}
/// `KDMV` read as a little-endian u32.
pub const KDMV_MAGIC: u32 = 0x564d_444b;
/// `COWD` read as a little-endian u32.
pub const COWD_MAGIC: u32 = 0x4457_4f43;
/// seSparse const header magic (first u64 of the file).
pub const SESPARSE_MAGIC: u64 = 0x0000_0000_cafe_babe;
/// Header flag: the newline check bytes are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// Header flag: a redundant grain directory exists.
pub const FLAG_RGD: u32 = 1 << 1;
/// Header flag: grain table entry 1 means "zeroed grain".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// Header flag: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// Header flag: the extent carries stream markers.
pub const FLAG_MARKERS: u32 = 1 << 17;
/// `gdOffset` of a streamOptimized leading header: the real one is in the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// compressAlgorithm value for deflate (zlib streams).
pub const COMPRESSION_DEFLATE: u16 = 1;
/// Grain table entry meaning "this grain reads as zeros" (with [`FLAG_ZERO_GRAIN`]).
pub const GTE_ZEROED: u32 = 1;
/// The only grain table size VMware's disk library writes.
pub const GTES_PER_GT: u32 = 512;
/// Largest grain we accept (2 MiB): VMware writes 64 KiB, and a compressed grain is
/// inflated into a buffer this big.
pub const MAX_GRAIN_SECTORS: u64 = 4096;
/// Largest grain directory we load (bytes), like qemu's "L1 size too big" limit.
pub const MAX_GD_BYTES: u64 = 32 << 20;
/// Largest embedded or standalone descriptor (bytes).
pub const MAX_DESCRIPTOR_BYTES: u64 = 1 << 20;

/// Marker types of the streamOptimized marker stream.
pub const MARKER_EOS: u32 = 0;
/// Grain table marker.
pub const MARKER_GT: u32 = 1;
/// Grain directory marker.
pub const MARKER_GD: u32 = 2;
/// Footer marker.
pub const MARKER_FOOTER: u32 = 3;

/// The hosted sparse extent header (`SparseExtentHeader`), 512 bytes on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseHeader {
    /// 1, 2 (zeroed grains) or 3 (streamOptimized / changed block tracking).
    pub version: u32,
    /// FLAG_* bits.
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub grain_size: u64,
    /// Embedded descriptor offset in sectors (0: none).
    pub desc_offset: u64,
    /// Embedded descriptor size in sectors.
    pub desc_size: u64,
    /// Grain table entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Redundant grain directory offset in sectors.
    pub rgd_offset: u64,
    /// Grain directory offset in sectors, or [`GD_AT_END`].
    pub gd_offset: u64,
    /// Sectors before the first grain (metadata overhead).
    pub overhead: u64,
    /// Set while the extent is open for writing.
    pub unclean_shutdown: bool,
    /// The four newline-detection bytes ("\n", " ", "\r", "\n" when intact).
    pub check_bytes: [u8; 4],
    /// 0 none, 1 deflate.
    pub compress_algorithm: u16,
}

/// The newline check bytes a correctly transferred file carries.
pub const CHECK_BYTES: [u8; 4] = [b'\n', b' ', b'\r', b'\n'];

impl SparseHeader {
    /// On-disk size.
    pub const SIZE: usize = 512;

    /// Parse the first 512 bytes of a `KDMV` extent (no semantic validation beyond the
    /// magic; see [`SparseHeader::validate`]).
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < 79 {
            return Err(Error::invalid("VMDK sparse header is truncated").with_field("header"));
        }
        if LE::read_u32(&b[0..4]) != KDMV_MAGIC {
            return Err(Error::invalid("not a VMDK sparse extent (no KDMV magic)")
                .with_field("magicNumber")
                .at(0));
        }
        Ok(SparseHeader {
            version: LE::read_u32(&b[4..8]),
            flags: LE::read_u32(&b[8..12]),
            capacity: LE::read_u64(&b[12..20]),
            grain_size: LE::read_u64(&b[20..28]),
            desc_offset: LE::read_u64(&b[28..36]),
            desc_size: LE::read_u64(&b[36..44]),
            num_gtes_per_gt: LE::read_u32(&b[44..48]),
            rgd_offset: LE::read_u64(&b[48..56]),
            gd_offset: LE::read_u64(&b[56..64]),
            overhead: LE::read_u64(&b[64..72]),
            unclean_shutdown: b[UNCLEAN_SHUTDOWN_AT as usize] != 0,
            check_bytes: [b[73], b[74], b[75], b[76]],
            compress_algorithm: LE::read_u16(&b[77..79]),
        })
    }

    /// Serialize to the 512-byte on-disk form.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        LE::write_u32(&mut b[0..4], KDMV_MAGIC);
        LE::write_u32(&mut b[4..8], self.version);
        LE::write_u32(&mut b[8..12], self.flags);
        LE::write_u64(&mut b[12..20], self.capacity);
        LE::write_u64(&mut b[20..28], self.grain_size);
        LE::write_u64(&mut b[28..36], self.desc_offset);
        LE::write_u64(&mut b[36..44], self.desc_size);
        LE::write_u32(&mut b[44..48], self.num_gtes_per_gt);
        LE::write_u64(&mut b[48..56], self.rgd_offset);
        LE::write_u64(&mut b[56..64], self.gd_offset);
        LE::write_u64(&mut b[64..72], self.overhead);
        b[UNCLEAN_SHUTDOWN_AT as usize] = self.unclean_shutdown as u8;
        b[73..77].copy_from_slice(&self.check_bytes);
        LE::write_u16(&mut b[77..79], self.compress_algorithm);
        b
    }

    /// True when grains are deflate-compressed (qemu's rule: the algorithm field decides).
    pub fn compressed(&self) -> bool {
        self.compress_algorithm == COMPRESSION_DEFLATE
    }

    /// Number of grain directory entries the capacity needs, refusing directories over
    /// [`MAX_GD_BYTES`] before anything is allocated.
    pub fn gd_entries(&self) -> Result<u64> {
        let per_gt = u64::from(self.num_gtes_per_gt) as u128 * self.grain_size as u128;
        if per_gt == 0 {
            return Err(Error::invalid(
                "grain table coverage is zero (numGTEsPerGT or grainSize is 0)",
            )
            .with_field(if self.grain_size == 0 {
                "grainSize"
            } else {
                "numGTEsPerGT"
            }));
        }
        let n = (self.capacity as u128).div_ceil(per_gt);
        if n * 4 > MAX_GD_BYTES as u128 {
            return Err(Error::limit(format!(
                "grain directory of {n} entries exceeds the {} MiB limit (L1 size too big)",
                MAX_GD_BYTES >> 20
            ))
            .with_field("capacity"));
        }
        Ok(n as u64)
    }

    /// Check every field against the extent file's length `file_len`; the one place the
    /// header's sanity is decided. `gd_offset` must already be the real one (footer read).
    pub fn validate(&self, file_len: u64) -> Result<()> {
        if self.version > 3 {
            return Err(Error::unsupported(format!(
                "VMDK sparse extent version {} (1-3 supported)",
                self.version
            ))
            .with_field("version")
            .at(4));
        }
        // Checked early: a fuzzed capacity must fail as "L1 size too big" like qemu.
        let gd_entries = self.gd_entries()?;
        if self.compress_algorithm > COMPRESSION_DEFLATE {
            return Err(Error::unsupported(format!(
                "compression algorithm {}",
                self.compress_algorithm
            ))
            .with_field("compressAlgorithm")
            .at(77));
        }
        if self.flags & FLAG_NL_DETECT != 0 && self.check_bytes != CHECK_BYTES {
            return Err(Error::corrupt(
                "newline check bytes are damaged (file transferred in text mode?)",
            )
            .with_field("singleEndLineChar")
            .at(73));
        }
        let g = self.grain_size;
        if g == 0 || !g.is_power_of_two() {
            return Err(
                Error::invalid(format!("grain size {g} sectors is not a power of two"))
                    .with_field("grainSize")
                    .at(20),
            );
        }
        if g > MAX_GRAIN_SECTORS {
            return Err(Error::limit(format!(
                "grain size {g} sectors exceeds the limit of {MAX_GRAIN_SECTORS}"
            ))
            .with_field("grainSize")
            .at(20));
        }
        if self.num_gtes_per_gt != GTES_PER_GT {
            return Err(Error::invalid(format!(
                "numGTEsPerGT is {} (VMDK requires {GTES_PER_GT})",
                self.num_gtes_per_gt
            ))
            .with_field("numGTEsPerGT")
            .at(44));
        }
        if self.capacity.checked_mul(SECTOR).is_none() {
            return Err(Error::limit("capacity overflows 64 bits")
                .with_field("capacity")
                .at(12));
        }
        let in_file = |off_sectors: u64, len: u64, field: &str, at: u64| -> Result<()> {
            let ok = off_sectors
                .checked_mul(SECTOR)
                .and_then(|o| o.checked_add(len))
                .is_some_and(|end| end <= file_len);
            if ok {
                Ok(())
            } else {
                Err(Error::corrupt(format!(
                    "{field} (sector {off_sectors}, {len} bytes) lies past the end of the file ({file_len} bytes)"
                ))
                .with_field(field.to_string())
                .at(at))
            }
        };
        if self.overhead > file_len / SECTOR {
            return Err(Error::corrupt(format!(
                "file truncated: the header says grains start at sector {}, the file has {} bytes",
                self.overhead, file_len
            ))
            .with_field("overHead")
            .at(64));
        }
        in_file(self.gd_offset, gd_entries * 4, "gdOffset", 56)?;
        if self.flags & FLAG_RGD != 0 && self.rgd_offset != 0 {
            in_file(self.rgd_offset, gd_entries * 4, "rgdOffset", 48)?;
        }
        if self.desc_offset != 0 {
            if self.desc_size > MAX_DESCRIPTOR_BYTES / SECTOR {
                return Err(Error::limit(format!(
                    "embedded descriptor of {} sectors exceeds the 1 MiB limit",
                    self.desc_size
                ))
                .with_field("descriptorSize")
                .at(36));
            }
            in_file(
                self.desc_offset,
                self.desc_size * SECTOR,
                "descriptorOffset",
                28,
            )?;
        }
        Ok(())
    }
}

/// The legacy ESX sparse header (`COWD`, vmfsSparse extents), read only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowdHeader {
    /// Format version.
    pub version: u32,
    /// Flags.
    pub flags: u32,
    /// Extent size in sectors.
    pub capacity: u32,
    /// Grain size in sectors.
    pub grain_size: u32,
    /// Grain directory offset in sectors.
    pub gd_offset: u32,
    /// Grain directory entries.
    pub gd_entries: u32,
}

/// Grain table entries per table in COWD extents.
pub const COWD_GTES_PER_GT: u64 = 4096;

impl CowdHeader {
    /// Parse the start of a `COWD` file.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < 28 || LE::read_u32(&b[0..4]) != COWD_MAGIC {
            return Err(Error::invalid("not a COWD sparse extent").with_field("magic"));
        }
        Ok(CowdHeader {
            version: LE::read_u32(&b[4..8]),
            flags: LE::read_u32(&b[8..12]),
            capacity: LE::read_u32(&b[12..16]),
            grain_size: LE::read_u32(&b[16..20]),
            gd_offset: LE::read_u32(&b[20..24]),
            gd_entries: LE::read_u32(&b[24..28]),
        })
    }

    /// Serialize the fields (the rest of the 2048-byte header is zero).
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        LE::write_u32(&mut b[0..4], COWD_MAGIC);
        LE::write_u32(&mut b[4..8], self.version);
        LE::write_u32(&mut b[8..12], self.flags);
        LE::write_u32(&mut b[12..16], self.capacity);
        LE::write_u32(&mut b[16..20], self.grain_size);
        LE::write_u32(&mut b[20..24], self.gd_offset);
        LE::write_u32(&mut b[24..28], self.gd_entries);
        b
    }

    /// Check the fields against the file length.
    pub fn validate(&self, file_len: u64) -> Result<()> {
        let g = u64::from(self.grain_size);
        if g == 0 || !g.is_power_of_two() || g > MAX_GRAIN_SECTORS {
            return Err(
                Error::invalid(format!("COWD grain size {g} sectors is invalid"))
                    .with_field("granularity")
                    .at(16),
            );
        }
        let need = u64::from(self.capacity).div_ceil(g * COWD_GTES_PER_GT);
        if u64::from(self.gd_entries) < need {
            return Err(Error::corrupt(format!(
                "COWD grain directory has {} entries, the capacity needs {need}",
                self.gd_entries
            ))
            .with_field("l1dir_size")
            .at(24));
        }
        let bytes = u64::from(self.gd_entries) * 4;
        if bytes > MAX_GD_BYTES {
            return Err(
                Error::limit("COWD grain directory too big (L1 size too big)")
                    .with_field("l1dir_size")
                    .at(24),
            );
        }
        if u64::from(self.gd_offset) * SECTOR + bytes > file_len {
            return Err(
                Error::corrupt("COWD grain directory lies past the end of the file")
                    .with_field("l1dir_offset")
                    .at(20),
            );
        }
        Ok(())
    }
}

/// seSparse volatile header magic.
pub const SESPARSE_VOLATILE_MAGIC: u64 = 0x0000_0000_cafe_cafe;
/// The only seSparse version qemu (and we) read.
pub const SESPARSE_VERSION: u64 = 0x0000_0002_0000_0001;

/// The seSparse const header (ESXi 6.5+ snapshot extents), 512 bytes of u64 fields. The
/// format is not documented; like qemu we accept exactly the layout ESXi writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SeSparseHeader {
    /// Format version (must be [`SESPARSE_VERSION`]).
    pub version: u64,
    /// Extent size in sectors.
    pub capacity: u64,
    /// Grain size in sectors (must be 8).
    pub grain_size: u64,
    /// Grain table size in sectors (must be 64: 4096 entries).
    pub grain_table_size: u64,
    /// Flags (must be 0).
    pub flags: u64,
    /// Volatile header offset in sectors.
    pub volatile_header_offset: u64,
    /// Grain directory offset in sectors.
    pub grain_dir_offset: u64,
    /// Grain directory size in sectors.
    pub grain_dir_size: u64,
    /// Start of the grain tables area in sectors.
    pub grain_tables_offset: u64,
    /// Start of the grains area in sectors.
    pub grains_offset: u64,
}

impl SeSparseHeader {
    /// Parse the const header; rejects anything but the layout ESXi writes.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < 512 {
            return Err(Error::invalid("seSparse header is truncated").with_field("header"));
        }
        let q = |i: usize| LE::read_u64(&b[i * 8..i * 8 + 8]);
        if q(0) != SESPARSE_MAGIC {
            return Err(Error::invalid("not a seSparse extent")
                .with_field("magic")
                .at(0));
        }
        let h = SeSparseHeader {
            version: q(1),
            capacity: q(2),
            grain_size: q(3),
            grain_table_size: q(4),
            flags: q(5),
            volatile_header_offset: q(10),
            grain_dir_offset: q(16),
            grain_dir_size: q(17),
            grain_tables_offset: q(18),
            grains_offset: q(24),
        };
        let unsupported = |what: &str, v: u64, off: u64| {
            Err(Error::unsupported(format!("seSparse {what} {v:#x}"))
                .with_field(what.to_string())
                .at(off))
        };
        if h.version != SESPARSE_VERSION {
            return unsupported("version", h.version, 8);
        }
        if h.grain_size != 8 {
            return unsupported("grain size", h.grain_size, 24);
        }
        if h.grain_table_size != 64 {
            return unsupported("grain table size", h.grain_table_size, 32);
        }
        if h.flags != 0 || (6..10).any(|i| q(i) != 0) || b[208..512].iter().any(|&x| x != 0) {
            return unsupported("flags or reserved fields", h.flags, 40);
        }
        Ok(h)
    }

    /// Serialize (fields not modelled are zero).
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        let mut put = |i: usize, v: u64| LE::write_u64(&mut b[i * 8..i * 8 + 8], v);
        put(0, SESPARSE_MAGIC);
        put(1, self.version);
        put(2, self.capacity);
        put(3, self.grain_size);
        put(4, self.grain_table_size);
        put(5, self.flags);
        put(10, self.volatile_header_offset);
        put(11, 1);
        put(16, self.grain_dir_offset);
        put(17, self.grain_dir_size);
        put(18, self.grain_tables_offset);
        put(24, self.grains_offset);
        b
    }

    /// Grain directory entries (u64 each), bounded like every directory.
    pub fn gd_entries(&self) -> Result<u64> {
        let bytes = self
            .grain_dir_size
            .checked_mul(SECTOR)
            .filter(|b| *b <= MAX_GD_BYTES);
        let Some(bytes) = bytes else {
            return Err(
                Error::limit("seSparse grain directory too big (L1 size too big)")
                    .with_field("grain_dir_size")
                    .at(136),
            );
        };
        let need = self.capacity.div_ceil(self.grain_size * 4096);
        if bytes / 8 < need {
            return Err(Error::corrupt(format!(
                "seSparse grain directory has {} entries, the capacity needs {need}",
                bytes / 8
            ))
            .with_field("grain_dir_size")
            .at(136));
        }
        Ok(bytes / 8)
    }

    /// Check the volatile header (512 bytes at `volatile_header_offset`).
    pub fn check_volatile(b: &[u8]) -> Result<()> {
        if b.len() < 512 || LE::read_u64(&b[0..8]) != SESPARSE_VOLATILE_MAGIC {
            return Err(
                Error::invalid("bad seSparse volatile header magic").with_field("volatile header")
            );
        }
        if LE::read_u64(&b[24..32]) != 0 {
            return Err(Error::unsupported(
                "seSparse image is dirty (its journal needs replaying)",
            )
            .with_field("replay_journal"));
        }
        if b[32..512].iter().any(|&x| x != 0) {
            return Err(
                Error::unsupported("non-zero seSparse volatile header padding")
                    .with_field("volatile header"),
            );
        }
        Ok(())
    }

    /// A volatile header for tests and writers.
    pub fn volatile_bytes() -> [u8; 512] {
        let mut b = [0u8; 512];
        LE::write_u64(&mut b[0..8], SESPARSE_VOLATILE_MAGIC);
        b
    }
}

/// A 512-byte stream marker (metadata marker or end-of-stream), or the 12-byte header of
/// a compressed grain when `size != 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    /// Sectors of metadata that follow (markers) or the grain's first guest sector.
    pub val: u64,
    /// Compressed byte count for a grain; 0 for a metadata marker.
    pub size: u32,
    /// MARKER_* type (only meaningful when `size == 0`).
    pub kind: u32,
}

impl Marker {
    /// Parse the first 16 (or, for a grain, 12) bytes.
    pub fn parse(b: &[u8]) -> Result<Self> {
        if b.len() < 12 {
            return Err(Error::corrupt("stream marker is truncated").with_field("marker"));
        }
        let size = LE::read_u32(&b[8..12]);
        let kind = if size == 0 && b.len() >= 16 {
            LE::read_u32(&b[12..16])
        } else {
            0
        };
        Ok(Marker {
            val: LE::read_u64(&b[0..8]),
            size,
            kind,
        })
    }

    /// The 512-byte sector of a metadata marker.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        LE::write_u64(&mut b[0..8], self.val);
        LE::write_u32(&mut b[8..12], self.size);
        LE::write_u32(&mut b[12..16], self.kind);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SparseHeader {
        SparseHeader {
            version: 1,
            flags: FLAG_NL_DETECT | FLAG_RGD,
            capacity: 2048,
            grain_size: 128,
            desc_offset: 1,
            desc_size: 20,
            num_gtes_per_gt: 512,
            rgd_offset: 21,
            gd_offset: 26,
            overhead: 128,
            unclean_shutdown: false,
            check_bytes: CHECK_BYTES,
            compress_algorithm: 0,
        }
    }

    #[test]
    fn header_round_trips_and_validates() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(&b[0..4], b"KDMV");
        assert_eq!(SparseHeader::parse(&b).unwrap(), h);
        h.validate(128 * 512).unwrap();
        assert_eq!(h.gd_entries().unwrap(), 1);
    }

    #[test]
    fn bad_headers_are_refused() {
        let len = 128 * 512;
        let mut h = sample();
        h.grain_size = 0;
        assert!(h.validate(len).is_err());
        h.grain_size = 3;
        assert!(h.validate(len).is_err());
        h.grain_size = 1 << 20;
        assert_eq!(
            h.validate(len).unwrap_err().kind(),
            crate::ErrorKind::LimitExceeded
        );
        let mut h = sample();
        h.num_gtes_per_gt = 506;
        assert_eq!(h.validate(len).unwrap_err().field(), Some("numGTEsPerGT"));
        let mut h = sample();
        h.gd_offset = 1000;
        assert_eq!(h.validate(len).unwrap_err().field(), Some("gdOffset"));
        let mut h = sample();
        h.capacity = u64::MAX / 2;
        assert_eq!(
            h.validate(len).unwrap_err().kind(),
            crate::ErrorKind::LimitExceeded
        );
        let mut h = sample();
        h.check_bytes = [b'\n', b' ', b'\n', 0];
        assert!(h.validate(len).is_err());
        let mut h = sample();
        h.desc_size = 4096;
        assert_eq!(h.validate(len).unwrap_err().field(), Some("descriptorSize"));
    }

    #[test]
    fn sesparse_header_round_trips() {
        let h = SeSparseHeader {
            version: SESPARSE_VERSION,
            capacity: 8192,
            grain_size: 8,
            grain_table_size: 64,
            flags: 0,
            volatile_header_offset: 1,
            grain_dir_offset: 2,
            grain_dir_size: 1,
            grain_tables_offset: 3,
            grains_offset: 67,
        };
        let b = h.to_bytes();
        assert_eq!(SeSparseHeader::parse(&b).unwrap(), h);
        assert_eq!(h.gd_entries().unwrap(), 64);
        SeSparseHeader::check_volatile(&SeSparseHeader::volatile_bytes()).unwrap();
        let mut bad = b;
        bad[24] = 16;
        assert_eq!(
            SeSparseHeader::parse(&bad).unwrap_err().kind(),
            crate::ErrorKind::Unsupported
        );
    }

    #[test]
    fn markers_and_cowd_round_trip() {
        let m = Marker {
            val: 4,
            size: 0,
            kind: MARKER_GT,
        };
        assert_eq!(Marker::parse(&m.to_bytes()).unwrap(), m);
        let c = CowdHeader {
            version: 1,
            flags: 3,
            capacity: 8192,
            grain_size: 16,
            gd_offset: 4,
            gd_entries: 1,
        };
        assert_eq!(CowdHeader::parse(&c.to_bytes()).unwrap(), c);
        c.validate(4096).unwrap();
    }
}
