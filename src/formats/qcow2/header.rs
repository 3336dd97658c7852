//! The qcow2 header (versions 2 and 3) and its header extensions: parsing, validation and
//! serialisation. Every field of the first cluster is read here and nowhere else.

use byteorder::{BigEndian, ByteOrder};

use crate::error::{Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// Size of the version 2 header (and of the common part of version 3).
pub const V2_HEADER_LEN: usize = 72;
/// Smallest valid version 3 header (without the compression type byte).
pub const V3_MIN_HEADER_LEN: usize = 104;
/// Length of the version 3 header we write (with compression type and padding).
pub const V3_HEADER_LEN: usize = 112;
/// Smallest cluster size qemu accepts (512 B).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster size qemu accepts (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// qemu's cap on the active L1 table (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's cap on the refcount table (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name qemu accepts.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature: the image was not closed cleanly (refcounts may be stale).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: qemu found corruption and marked the image.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: 128-bit L2 entries with 32 subclusters per cluster.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit this crate understands.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is a valid raw image.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension types.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Bitmaps extension.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_FDE: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How compressed clusters are encoded (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CompressionType {
    /// Raw deflate (qemu uses a 4 KiB window).
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// qemu's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// The fixed part of a qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Where the backing file name is stored (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for v2).
    pub header_length: u32,
    /// Compression type byte (v3 with header_length > 104).
    pub compression_type: u8,
}

fn bad(msg: String, field: &str, off: u64) -> Error {
    Error::invalid(msg).with_field(field.to_string()).at(off)
}

impl Header {
    /// Parse and validate the header at the start of `buf` (which must hold at least the
    /// header: 72 bytes for v2, `header_length` for v3).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN {
            return Err(Error::invalid(format!(
                "file too short for a qcow2 header ({} bytes, need {V2_HEADER_LEN})",
                buf.len()
            )));
        }
        let be32 = |o: usize| BigEndian::read_u32(&buf[o..o + 4]);
        let be64 = |o: usize| BigEndian::read_u64(&buf[o..o + 8]);
        if be32(0) != MAGIC {
            return Err(bad("not a qcow2 image (bad magic)".into(), "magic", 0));
        }
        let version = be32(4);
        let mut h = Header {
            version,
            backing_file_offset: be64(8),
            backing_file_size: be32(16),
            cluster_bits: be32(20),
            size: be64(24),
            crypt_method: be32(32),
            l1_size: be32(36),
            l1_table_offset: be64(40),
            refcount_table_offset: be64(48),
            refcount_table_clusters: be32(56),
            nb_snapshots: be32(60),
            snapshots_offset: be64(64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
        };
        match version {
            2 => {}
            3 => {
                if buf.len() < V3_MIN_HEADER_LEN {
                    return Err(Error::invalid(format!(
                        "file too short for a qcow2 v3 header ({} bytes)",
                        buf.len()
                    )));
                }
                h.incompatible_features = be64(72);
                h.compatible_features = be64(80);
                h.autoclear_features = be64(88);
                h.refcount_order = be32(96);
                h.header_length = be32(100);
                let hl = h.header_length as usize;
                if hl < V3_MIN_HEADER_LEN {
                    return Err(bad(
                        format!("qcow2 v3 header_length {hl} is below {V3_MIN_HEADER_LEN}"),
                        "header_length",
                        100,
                    ));
                }
                if hl > 104 {
                    if buf.len() < 105 {
                        return Err(Error::invalid("file too short for the qcow2 header"));
                    }
                    h.compression_type = buf[104];
                }
            }
            v => {
                return Err(bad(
                    format!("unsupported qcow2 version {v} (only 2 and 3 exist)"),
                    "version",
                    4,
                ))
            }
        }
        h.validate().map_err(|e| h.name_unknown_features(buf, e))?;
        Ok(h)
    }

    /// Add the names the image's own feature name table gives to unknown incompatible
    /// bits, so the error says what the image needs ("bit 5 (fancy thing)").
    fn name_unknown_features(&self, buf: &[u8], e: Error) -> Error {
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown == 0 || e.field() != Some("incompatible_features") {
            return e;
        }
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return e;
        }
        let end = buf.len().min(self.cluster_size() as usize);
        let Ok(ext) = Extensions::parse(&buf[..end], self.header_length as usize) else {
            return e;
        };
        let names: Vec<String> = ext
            .features
            .iter()
            .filter(|f| f.kind == 0 && f.bit < 64 && unknown & (1u64 << f.bit) != 0)
            .map(|f| format!("bit {} ({})", f.bit, f.name))
            .collect();
        if names.is_empty() {
            return e;
        }
        Error::unsupported(format!("{}: {}", e.message(), names.join(", ")))
            .with_field("incompatible_features")
            .at(72)
    }

    /// Check every field against qemu's rules; called by `parse`, and by the writer on
    /// what it is about to write.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(bad(
                format!(
                    "cluster_bits {} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B..2 MiB clusters)",
                    self.cluster_bits
                ),
                "cluster_bits",
                20,
            ));
        }
        let cs = self.cluster_size();
        if self.version >= 3 && u64::from(self.header_length) > cs {
            return Err(bad(
                format!(
                    "header_length {} exceeds the cluster size {cs}",
                    self.header_length
                ),
                "header_length",
                100,
            ));
        }
        if self.refcount_order > 6 {
            return Err(bad(
                format!(
                    "refcount_order {} is above 6 (64-bit refcounts)",
                    self.refcount_order
                ),
                "refcount_order",
                96,
            ));
        }
        let unknown = self.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bits: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| b.to_string())
                .collect();
            return Err(Error::unsupported(format!(
                "qcow2 image uses unknown incompatible feature bit(s) {} ({unknown:#x})",
                bits.join(", ")
            ))
            .with_field("incompatible_features")
            .at(72));
        }
        if self.crypt_method != 0 {
            let what = match self.crypt_method {
                1 => "AES",
                2 => "LUKS",
                _ => "unknown method",
            };
            return Err(Error::encrypted(format!(
                "encrypted qcow2 (AES/LUKS) is not supported (crypt_method {} = {what})",
                self.crypt_method
            ))
            .with_field("crypt_method")
            .at(32));
        }
        match (
            self.compression_type,
            self.incompatible_features & INCOMPAT_COMPRESSION != 0,
        ) {
            (0, false) | (1, true) => {}
            (0, true) => {
                return Err(bad(
                    "compression type bit set but compression_type is zlib".into(),
                    "compression_type",
                    104,
                ))
            }
            (1, false) => {
                return Err(bad(
                    "compression_type is zstd but the compression type feature bit is clear".into(),
                    "compression_type",
                    104,
                ))
            }
            (t, _) => {
                return Err(
                    Error::unsupported(format!("unknown qcow2 compression type {t}"))
                        .with_field("compression_type")
                        .at(104),
                )
            }
        }
        if self.backing_file_offset != 0 {
            if self.backing_file_offset > cs {
                return Err(bad(
                    format!(
                        "backing_file_offset {:#x} is outside the header cluster",
                        self.backing_file_offset
                    ),
                    "backing_file_offset",
                    8,
                ));
            }
            if self.backing_file_size > MAX_BACKING_NAME {
                return Err(bad(
                    format!(
                        "backing_file_size {} is above {MAX_BACKING_NAME}",
                        self.backing_file_size
                    ),
                    "backing_file_size",
                    16,
                ));
            }
        }
        if u64::from(self.l1_size) * 8 > MAX_L1_BYTES {
            return Err(Error::limit(format!(
                "active L1 table of {} entries exceeds the {} MiB limit",
                self.l1_size,
                MAX_L1_BYTES >> 20
            ))
            .with_field("l1_size")
            .at(36));
        }
        if !self.l1_table_offset.is_multiple_of(cs) {
            return Err(bad(
                format!(
                    "l1_table_offset {:#x} is not cluster aligned",
                    self.l1_table_offset
                ),
                "l1_table_offset",
                40,
            ));
        }
        let needed = self.l1_entries_needed()?;
        if u64::from(self.l1_size) < needed {
            return Err(Error::corrupt(format!(
                "L1 table of {} entries is too small for a virtual size of {} (needs {needed})",
                self.l1_size, self.size
            ))
            .with_field("l1_size")
            .at(36));
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    /// Whether L2 entries are 128-bit with subclusters.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    /// Bytes per L2 entry.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// The compression type.
    pub fn compression(&self) -> CompressionType {
        if self.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }
    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// L1 entries needed to map `self.size` bytes (an error when that overflows).
    pub fn l1_entries_needed(&self) -> Result<u64> {
        let span = self.cluster_size() * self.l2_entries();
        Ok(self.size.div_ceil(span))
    }

    /// Serialise: 72 bytes for v2, `header_length` bytes for v3.
    pub fn to_bytes(&self) -> Vec<u8> {
        let len = if self.version >= 3 {
            self.header_length as usize
        } else {
            V2_HEADER_LEN
        };
        let mut b = vec![0u8; len.max(V2_HEADER_LEN)];
        BigEndian::write_u32(&mut b[0..], MAGIC);
        BigEndian::write_u32(&mut b[4..], self.version);
        BigEndian::write_u64(&mut b[8..], self.backing_file_offset);
        BigEndian::write_u32(&mut b[16..], self.backing_file_size);
        BigEndian::write_u32(&mut b[20..], self.cluster_bits);
        BigEndian::write_u64(&mut b[24..], self.size);
        BigEndian::write_u32(&mut b[32..], self.crypt_method);
        BigEndian::write_u32(&mut b[36..], self.l1_size);
        BigEndian::write_u64(&mut b[40..], self.l1_table_offset);
        BigEndian::write_u64(&mut b[48..], self.refcount_table_offset);
        BigEndian::write_u32(&mut b[56..], self.refcount_table_clusters);
        BigEndian::write_u32(&mut b[60..], self.nb_snapshots);
        BigEndian::write_u64(&mut b[64..], self.snapshots_offset);
        if self.version >= 3 && b.len() >= V3_MIN_HEADER_LEN {
            BigEndian::write_u64(&mut b[72..], self.incompatible_features);
            BigEndian::write_u64(&mut b[80..], self.compatible_features);
            BigEndian::write_u64(&mut b[88..], self.autoclear_features);
            BigEndian::write_u32(&mut b[96..], self.refcount_order);
            BigEndian::write_u32(&mut b[100..], self.header_length);
            if b.len() > 104 {
                b[104] = self.compression_type;
            }
        }
        b
    }
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Name (NUL padding stripped).
    pub name: String,
}

/// The bitmaps extension's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of persistent bitmaps.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory.
    pub directory_size: u64,
    /// Host offset of the bitmap directory.
    pub directory_offset: u64,
}

/// Header extensions found after the header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    /// Backing file format ("raw", "qcow2", ...).
    pub backing_format: Option<String>,
    /// External data file name.
    pub data_file: Option<String>,
    /// Feature name table.
    pub features: Vec<FeatureName>,
    /// Bitmaps extension.
    pub bitmaps: Option<BitmapsExt>,
    /// Full disk encryption header (offset, length).
    pub fde: Option<(u64, u64)>,
    /// Types of extensions we do not know (kept for `info`).
    pub unknown: Vec<u32>,
}

fn ext_string(data: &[u8], field: &str, off: u64) -> Result<String> {
    let s = data.split(|&b| b == 0).next().unwrap_or(&[]);
    String::from_utf8(s.to_vec())
        .map_err(|_| bad(format!("{field} is not valid UTF-8"), field, off))
}

impl Extensions {
    /// Parse the extensions in `area` (the header cluster up to the backing file name, or
    /// the whole cluster) starting at byte `start`.
    pub fn parse(area: &[u8], start: usize) -> Result<Extensions> {
        let mut ext = Extensions::default();
        let mut off = start;
        while off + 8 <= area.len() {
            let typ = BigEndian::read_u32(&area[off..]);
            let len = BigEndian::read_u32(&area[off + 4..]) as usize;
            if typ == EXT_END {
                break;
            }
            let data_start = off + 8;
            if len > area.len() - data_start {
                return Err(bad(
                    format!("header extension {typ:#x} of {len} bytes runs past the header area"),
                    "header extension length",
                    off as u64 + 4,
                ));
            }
            let data = &area[data_start..data_start + len];
            let at = data_start as u64;
            match typ {
                EXT_BACKING_FORMAT => {
                    if len > 15 {
                        return Err(bad(
                            format!("backing format name of {len} bytes is too long"),
                            "backing format extension",
                            at,
                        ));
                    }
                    ext.backing_format = Some(ext_string(data, "backing format extension", at)?);
                }
                EXT_DATA_FILE => {
                    ext.data_file = Some(ext_string(data, "data file extension", at)?);
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        ext.features.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(
                                e[2..].split(|&b| b == 0).next().unwrap_or(&[]),
                            )
                            .into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        return Err(bad(
                            format!("bitmaps extension of {len} bytes is too short (need 24)"),
                            "bitmaps extension",
                            at,
                        ));
                    }
                    ext.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: BigEndian::read_u32(&data[0..]),
                        directory_size: BigEndian::read_u64(&data[8..]),
                        directory_offset: BigEndian::read_u64(&data[16..]),
                    });
                }
                EXT_FDE => {
                    if len >= 16 {
                        ext.fde = Some((
                            BigEndian::read_u64(&data[0..]),
                            BigEndian::read_u64(&data[8..]),
                        ));
                    }
                }
                other => ext.unknown.push(other),
            }
            off = data_start + len.div_ceil(8) * 8;
        }
        Ok(ext)
    }

    /// Serialise the extensions we write (backing format, data file, feature table),
    /// ending with the end marker.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut push = |typ: u32, data: &[u8]| {
            let mut h = [0u8; 8];
            BigEndian::write_u32(&mut h[0..], typ);
            BigEndian::write_u32(&mut h[4..], data.len() as u32);
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            push(EXT_BACKING_FORMAT, f.as_bytes());
        }
        if let Some(f) = &self.data_file {
            push(EXT_DATA_FILE, f.as_bytes());
        }
        if !self.features.is_empty() {
            let mut t = Vec::with_capacity(self.features.len() * 48);
            for f in &self.features {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.as_bytes();
                let n = &n[..n.len().min(46)];
                e[2..2 + n.len()].copy_from_slice(n);
                t.extend_from_slice(&e);
            }
            push(EXT_FEATURE_TABLE, &t);
        }
        out.extend_from_slice(&[0u8; 8]);
        out
    }

    /// The feature name table qemu writes into every v3 image.
    pub fn qemu_feature_table() -> Vec<FeatureName> {
        [
            (0, 0, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ]
        .iter()
        .map(|&(kind, bit, name)| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        })
        .collect()
    }
}

/// Refcount `i` of a refcount block with entries of `1 << order` bits (qemu's packing:
/// sub-byte entries from the low bits up, wider ones big-endian).
pub fn get_refcount(b: &[u8], i: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            ((b[i / per] >> (bits * (i % per))) & ((1u16 << bits) - 1) as u8) as u64
        }
        3 => b[i] as u64,
        4 => BigEndian::read_u16(&b[i * 2..]) as u64,
        5 => BigEndian::read_u32(&b[i * 4..]) as u64,
        _ => BigEndian::read_u64(&b[i * 8..]),
    }
}

/// Set refcount `i` (see [`get_refcount`]).
pub fn set_refcount(b: &mut [u8], i: usize, order: u32, v: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bits * (i % per));
            let byte = &mut b[i / per];
            *byte = (*byte & !mask) | (((v as u8) << (bits * (i % per))) & mask);
        }
        3 => b[i] = v as u8,
        4 => BigEndian::write_u16(&mut b[i * 2..], v as u16),
        5 => BigEndian::write_u32(&mut b[i * 4..], v as u32),
        _ => BigEndian::write_u64(&mut b[i * 8..], v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_packing_round_trips_at_every_width() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let max = if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            };
            let n = (64 * 8) >> order;
            for i in 0..n {
                set_refcount(&mut b, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_refcount(&b, i, order),
                    (i as u64 * 7) & max,
                    "order {order} entry {i}"
                );
            }
        }
        // qemu packs sub-byte refcounts from the low bits: entry 0 of a 1-bit block is bit 0.
        let mut b = vec![0u8; 1];
        set_refcount(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        set_refcount(&mut b, 1, 2, 0xf);
        assert_eq!(b[0], 0xf1);
    }

    fn sample() -> Header {
        Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: INCOMPAT_COMPRESSION,
            compatible_features: COMPAT_LAZY_REFCOUNTS,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN as u32,
            compression_type: 1,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        let b = h.to_bytes();
        assert_eq!(b.len(), 112);
        assert_eq!(Header::parse(&b).unwrap(), h);
        let mut v2 = sample();
        v2.version = 2;
        v2.incompatible_features = 0;
        v2.compatible_features = 0;
        v2.compression_type = 0;
        v2.header_length = 72;
        assert_eq!(Header::parse(&v2.to_bytes()).unwrap(), v2);
    }

    #[test]
    fn header_rejects_bad_fields() {
        let mut h = sample();
        h.incompatible_features |= 1 << 9;
        let e = Header::parse(&h.to_bytes()).unwrap_err();
        assert!(e.message().contains("bit(s) 9"), "{e}");
        // The image's feature name table names the bit.
        let mut named = h.to_bytes();
        named.extend_from_slice(
            &Extensions {
                features: vec![FeatureName {
                    kind: 0,
                    bit: 9,
                    name: "time travel".into(),
                }],
                ..Default::default()
            }
            .to_bytes(),
        );
        let e = Header::parse(&named).unwrap_err();
        assert!(e.message().contains("bit 9 (time travel)"), "{e}");
        let mut h = sample();
        h.crypt_method = 2;
        let e = Header::parse(&h.to_bytes()).unwrap_err();
        assert!(e.message().contains("encrypted qcow2 (AES/LUKS)"));
        let mut h = sample();
        h.cluster_bits = 22;
        assert!(Header::parse(&h.to_bytes()).is_err());
        let mut h = sample();
        h.l1_size = 1;
        assert!(Header::parse(&h.to_bytes()).is_err());
        let mut h = sample();
        h.compression_type = 0;
        assert!(Header::parse(&h.to_bytes()).is_err());
        assert!(Header::parse(&[0u8; 10]).is_err());
    }

    #[test]
    fn extensions_round_trip() {
        let e = Extensions {
            backing_format: Some("raw".into()),
            data_file: Some("data.raw".into()),
            features: Extensions::qemu_feature_table(),
            ..Default::default()
        };
        let b = e.to_bytes();
        assert_eq!(Extensions::parse(&b, 0).unwrap(), e);
        let mut bad = b.clone();
        BigEndian::write_u32(&mut bad[4..], 10_000);
        assert!(Extensions::parse(&bad, 0).is_err());
    }
}
