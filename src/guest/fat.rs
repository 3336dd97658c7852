//! FAT12, FAT16 and FAT32: the free clusters are the FAT entries that read 0.
//!
//! Facts from Microsoft's FAT specification (FAT: General Overview of On-Disk Format) and
//! the kernel's `fs/fat`. No crate exposes the allocation map over a read-only device
//! (`fatfs` needs Read+Write+Seek and gives only a free count), so this is ours.
//!
//! The region is claimed as FAT when its boot sector looks like one (jump, bytes per
//! sector, sectors per cluster, reserved sectors, FAT count, media byte); exFAT and NTFS
//! (their own OEM names) are not FAT. Then the BPB is validated: total sectors within
//! the region, the FATs and root directory within the volume, FAT32 fields, FATs large
//! enough for the cluster count; the type (12, 16 or 32) follows the kernel: a zero
//! 16-bit FAT size means FAT32, otherwise the cluster count decides.
//!
//! Safety: every FAT copy is read (only the active one on a FAT32 with mirroring off) and
//! a cluster is free only when all copies say so; copies that disagree about whether a
//! cluster is free make the volume Skipped, as do the dirty flags (the boot sector's
//! state byte the kernel sets while mounted; the clean-shutdown and hard-error bits of
//! FAT entry 1 on FAT16 and FAT32), a FAT entry 0 without the media byte, and a FAT32
//! root directory cluster marked free. FSInfo's free count is a hint and is not read.
//! The FATs are streamed in chunks; memory does not grow with the volume.

use super::{FreeSink, Outcome, Region};
use crate::error::{Error, Result};

/// Entries decoded per chunk when streaming FAT16/FAT32 tables.
const CHUNK_ENTRIES: u64 = 16384;

struct Skip(String);

impl From<Error> for Skip {
    fn from(e: Error) -> Self {
        Skip(e.to_string())
    }
}

type Step<T> = std::result::Result<T, Skip>;

fn skip<T>(reason: impl Into<String>) -> Step<T> {
    Err(Skip(reason.into()))
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Fat12,
    Fat16,
    Fat32,
}

/// The validated layout of a FAT volume, in bytes where it says so.
#[derive(Debug, Clone)]
struct Layout {
    kind: Kind,
    cluster_bytes: u64,
    /// Byte offset of each FAT copy to read.
    fats: Vec<u64>,
    /// Byte offset of cluster 2.
    data: u64,
    /// Clusters in the data region (numbered 2..clusters+2).
    clusters: u64,
    root_cluster: u64,
    media: u8,
}

impl Layout {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Fat12 => "fat12",
            Kind::Fat16 => "fat16",
            Kind::Fat32 => "fat32",
        }
    }
}

/// Whether the boot sector looks like FAT at all (else NotMine, so the next scanner
/// tries).
fn looks_like_fat(b: &[u8]) -> bool {
    let jump = b[0] == 0xEB && b[2] == 0x90 || b[0] == 0xE9;
    let oem = &b[3..11];
    if oem == b"EXFAT   " || oem == b"NTFS    " {
        return false;
    }
    let bps = le16(b, 0x0B);
    let spc = b[0x0D];
    let media = b[0x15];
    jump && matches!(bps, 512 | 1024 | 2048 | 4096)
        && spc.is_power_of_two()
        && le16(b, 0x0E) >= 1
        && (1..=4).contains(&b[0x10])
        && (media == 0xF0 || media >= 0xF8)
}

/// Validate the BPB of `b` (the boot sector) for a region of `region_len` bytes, and
/// that the volume was cleanly unmounted (what the free-space scan needs).
fn parse_bpb(b: &[u8], region_len: u64) -> Step<Layout> {
    let l = parse_layout(b, region_len)?;
    let kind = l.kind;
    // The kernel's "dirty" bit in the boot sector (BS_Reserved1 / FAT32's at 0x41).
    let state = if kind == Kind::Fat32 {
        b[0x41]
    } else {
        b[0x25]
    };
    let boot_sig = if kind == Kind::Fat32 {
        b[0x42]
    } else {
        b[0x26]
    };
    if matches!(boot_sig, 0x28 | 0x29) && state & 1 != 0 {
        return skip("the boot sector's dirty flag is set: not cleanly unmounted");
    }
    Ok(l)
}

/// Validate the BPB of `b` (the boot sector) for a region of `region_len` bytes: the
/// layout only (a reader may read a volume that was not cleanly unmounted).
fn parse_layout(b: &[u8], region_len: u64) -> Step<Layout> {
    if le16(b, 0x1FE) != 0xAA55 {
        return skip("boot sector signature (0x55AA at offset 510) is missing");
    }
    let bps = le16(b, 0x0B) as u64;
    let spc = b[0x0D] as u64;
    let cluster_bytes = bps * spc;
    if cluster_bytes > 64 << 10 {
        return skip(format!(
            "BPB_SecPerClus {spc} x BPB_BytsPerSec {bps}: clusters over 64 KiB"
        ));
    }
    let reserved = le16(b, 0x0E) as u64;
    let nfats = b[0x10] as u64;
    let root_entries = le16(b, 0x11) as u64;
    let tot16 = le16(b, 0x13) as u64;
    let tot32 = le32(b, 0x20) as u64;
    let total = if tot16 != 0 { tot16 } else { tot32 };
    if total == 0 {
        return skip("BPB_TotSec16 and BPB_TotSec32 are both 0");
    }
    if total * bps > region_len {
        return skip(format!(
            "BPB_TotSec {total} sectors of {bps} bytes run past the region ({region_len} bytes)"
        ));
    }
    let fatsz16 = le16(b, 0x16) as u64;
    let fat32 = fatsz16 == 0;
    let fatsz = if fat32 { le32(b, 0x24) as u64 } else { fatsz16 };
    if fatsz == 0 {
        return skip("BPB_FATSz16 and BPB_FATSz32 are both 0");
    }
    if fat32 && root_entries != 0 {
        return skip(format!(
            "BPB_RootEntCnt {root_entries} on FAT32 (must be 0)"
        ));
    }
    if !fat32 && root_entries == 0 {
        return skip("BPB_RootEntCnt is 0 on FAT12/16");
    }
    if !(root_entries * 32).is_multiple_of(bps) {
        return skip(format!(
            "BPB_RootEntCnt {root_entries} does not fill whole sectors"
        ));
    }
    let root_sectors = root_entries * 32 / bps;
    let meta = reserved + nfats * fatsz + root_sectors;
    if meta >= total {
        return skip(format!(
            "reserved, FAT and root directory sectors ({meta}) fill the volume ({total} sectors)"
        ));
    }
    let clusters = (total - meta) / spc;
    let kind = if fat32 {
        Kind::Fat32
    } else if clusters < 4085 {
        Kind::Fat12
    } else if clusters < 65525 {
        Kind::Fat16
    } else {
        return skip(format!(
            "{clusters} clusters are too many for FAT16 (BPB_FATSz16 {fatsz16})"
        ));
    };
    if kind == Kind::Fat32 && clusters > 0x0FFF_FFF5 {
        return skip(format!("{clusters} clusters are too many for FAT32"));
    }
    if clusters == 0 {
        return skip("the data region holds no cluster");
    }
    let bits = match kind {
        Kind::Fat12 => 12,
        Kind::Fat16 => 16,
        Kind::Fat32 => 32,
    };
    if fatsz * bps * 8 / bits < clusters + 2 {
        return skip(format!(
            "BPB_FATSz {fatsz} sectors hold fewer than the {} entries of {clusters} clusters",
            clusters + 2
        ));
    }
    let mut root_cluster = 0;
    let mut fats: Vec<u64> = (0..nfats).map(|i| (reserved + i * fatsz) * bps).collect();
    if kind == Kind::Fat32 {
        let ver = le16(b, 0x2A);
        if ver != 0 {
            return skip(format!("BPB_FSVer {ver:#x} is not 0"));
        }
        let ext = le16(b, 0x28);
        if ext & 0x80 != 0 {
            // Mirroring off: only the active FAT is meaningful.
            let active = (ext & 0xF) as u64;
            if active >= nfats {
                return skip(format!("BPB_ExtFlags active FAT {active} of {nfats}"));
            }
            fats = vec![fats[active as usize]];
        }
        root_cluster = le32(b, 0x2C) as u64;
        if root_cluster < 2 || root_cluster >= clusters + 2 {
            return skip(format!(
                "BPB_RootClus {root_cluster} is outside clusters 2..{}",
                clusters + 1
            ));
        }
    }
    Ok(Layout {
        kind,
        cluster_bytes,
        fats,
        data: meta * bps,
        clusters,
        root_cluster,
        media: b[0x15],
    })
}

/// The layout of a FAT12/16/32 volume as the file reader (`files::fat`) needs it, from
/// the validated BPB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatLayout {
    /// 12, 16 or 32: bits per FAT entry.
    pub bits: u32,
    /// Bytes per cluster.
    pub cluster_bytes: u64,
    /// Byte offset of the FAT used (the active one when mirroring is off).
    pub fat: u64,
    /// Bytes in one FAT.
    pub fat_bytes: u64,
    /// FAT12/16: byte offset and length of the fixed root directory.
    pub root_dir: (u64, u64),
    /// FAT32: the root directory's first cluster.
    pub root_cluster: u64,
    /// Byte offset of cluster 2.
    pub data: u64,
    /// Clusters in the data region (numbered 2..clusters+2).
    pub clusters: u64,
}

/// The layout of the FAT volume whose boot sector is `b` (512 bytes) in a region of
/// `region_len` bytes: `None` when it is not FAT (exFAT included), an error naming the
/// BPB field that does not validate. A volume not cleanly unmounted is still read.
pub fn layout(b: &[u8], region_len: u64) -> Option<Result<FatLayout>> {
    if b.len() < 512 || !looks_like_fat(b) {
        return None;
    }
    let l = match parse_layout(b, region_len) {
        Ok(l) => l,
        Err(Skip(why)) => return Some(Err(Error::corrupt(format!("FAT boot sector: {why}")))),
    };
    let bps = le16(b, 0x0B) as u64;
    let fatsz = if le16(b, 0x16) == 0 {
        le32(b, 0x24) as u64
    } else {
        le16(b, 0x16) as u64
    };
    let root_len = le16(b, 0x11) as u64 * 32;
    Some(Ok(FatLayout {
        bits: match l.kind {
            Kind::Fat12 => 12,
            Kind::Fat16 => 16,
            Kind::Fat32 => 32,
        },
        cluster_bytes: l.cluster_bytes,
        fat: l.fats[0],
        fat_bytes: fatsz * bps,
        root_dir: (l.data - root_len, root_len),
        root_cluster: l.root_cluster,
        data: l.data,
        clusters: l.clusters,
    }))
}

/// Decode entries `[first, first+n)` of a FAT16/32 table from `bytes` (which start at
/// entry `first`).
fn decode(kind: Kind, bytes: &[u8], out: &mut Vec<u32>) {
    out.clear();
    match kind {
        Kind::Fat16 => out.extend(bytes.chunks_exact(2).map(|c| le16(c, 0) as u32)),
        Kind::Fat32 => out.extend(bytes.chunks_exact(4).map(|c| le32(c, 0) & 0x0FFF_FFFF)),
        Kind::Fat12 => {
            let n = bytes.len() * 2 / 3;
            for i in 0..n {
                let o = i * 3 / 2;
                let v = le16(bytes, o);
                out.push(if i % 2 == 0 { v & 0xFFF } else { v >> 4 } as u32);
            }
        }
    }
}

/// Scan a FAT12/16/32 volume at the start of `region`.
pub fn scan(region: &Region<'_>, sink: &mut dyn FreeSink) -> Result<Outcome> {
    if region.len() < 512 {
        return Ok(Outcome::NotMine);
    }
    let mut boot = [0u8; 512];
    region.read_at(&mut boot, 0, "FAT boot sector")?;
    if &boot[3..11] == b"EXFAT   " {
        return exfat::scan(region, &boot, sink);
    }
    if !looks_like_fat(&boot) {
        return Ok(Outcome::NotMine);
    }
    let l = match parse_bpb(&boot, region.len()) {
        Ok(l) => l,
        Err(Skip(reason)) => {
            return Ok(Outcome::Skipped {
                fs: "fat".to_string(),
                reason,
            })
        }
    };
    let fs = l.name().to_string();
    let scanned = check_backup_boot(region, &boot, &l).and_then(|()| scan_fat(region, &l, sink));
    Ok(match scanned {
        Ok(()) => Outcome::Scanned { fs },
        Err(Skip(reason)) => Outcome::Skipped { fs, reason },
    })
}

/// FAT32 keeps a copy of its boot sector (BPB_BkBootSec, usually sector 6): the BPB
/// there must match, since nothing else protects the layout fields from a stray write.
/// The state byte at 0x41 is left out: the kernel marks only the primary dirty.
fn check_backup_boot(region: &Region<'_>, boot: &[u8], l: &Layout) -> Step<()> {
    let bk = le16(boot, 0x32) as u64;
    if l.kind != Kind::Fat32 || bk == 0 || bk == 0xFFFF {
        return Ok(());
    }
    let bps = le16(boot, 0x0B) as u64;
    if bk >= le16(boot, 0x0E) as u64 {
        return skip(format!(
            "BPB_BkBootSec {bk} is outside the reserved sectors"
        ));
    }
    let backup = region.read_vec(bk * bps, 512, 512, "FAT32 backup boot sector")?;
    if let Some(i) = (0x0B..0x41).find(|&i| backup[i] != boot[i]) {
        return skip(format!(
            "the backup boot sector (BPB_BkBootSec {bk}) differs from the boot sector at offset {i:#x}"
        ));
    }
    Ok(())
}

fn scan_fat(region: &Region<'_>, l: &Layout, sink: &mut dyn FreeSink) -> Step<()> {
    let entries = l.clusters + 2;
    // FAT12 is small (at most 4086 entries, 6 KiB): one chunk, as entries straddle bytes.
    let (chunk, width_num, width_den) = match l.kind {
        Kind::Fat12 => (entries + 1, 3, 2),
        Kind::Fat16 => (CHUNK_ENTRIES, 2, 1),
        Kind::Fat32 => (CHUNK_ENTRIES, 4, 1),
    };
    let mut copies: Vec<Vec<u32>> = vec![Vec::new(); l.fats.len()];
    let mut run: Option<(u64, u64)> = None;
    let mut first = 0u64;
    while first < entries {
        let n = chunk.min(entries - first);
        let (byte_off, byte_len) = if l.kind == Kind::Fat12 {
            (0, (n * 3).div_ceil(2))
        } else {
            (first * width_num / width_den, n * width_num / width_den)
        };
        for (copy, &fat) in copies.iter_mut().zip(&l.fats) {
            let bytes = region.read_vec(fat + byte_off, byte_len, 1 << 20, "FAT")?;
            decode(l.kind, &bytes, copy);
            copy.truncate(n as usize);
        }
        if first == 0 {
            check_reserved_entries(l, &copies)?;
        }
        for i in 0..n as usize {
            let c = first + i as u64;
            if c < 2 {
                continue;
            }
            let free = copies[0][i] == 0;
            if let Some(k) = copies.iter().position(|t| (t[i] == 0) != free) {
                return skip(format!(
                    "FAT copies 1 and {} disagree whether cluster {c} is free",
                    k + 1
                ));
            }
            if !free {
                continue;
            }
            if c == l.root_cluster {
                return skip(format!(
                    "the root directory's cluster {c} (BPB_RootClus) is marked free"
                ));
            }
            run = match run {
                Some((s, e)) if e == c => Some((s, c + 1)),
                Some((s, e)) => {
                    emit(l, sink, s, e);
                    Some((c, c + 1))
                }
                None => Some((c, c + 1)),
            };
        }
        first += n;
    }
    if let Some((s, e)) = run {
        emit(l, sink, s, e);
    }
    Ok(())
}

fn emit(l: &Layout, sink: &mut dyn FreeSink, first: u64, end: u64) {
    sink.free(
        l.data + (first - 2) * l.cluster_bytes,
        (end - first) * l.cluster_bytes,
    );
}

/// FAT entries 0 and 1: the media byte, and on FAT16/32 the clean-shutdown and
/// hard-error bits (set means clean / no error).
fn check_reserved_entries(l: &Layout, copies: &[Vec<u32>]) -> Step<()> {
    for (k, t) in copies.iter().enumerate() {
        if (t[0] & 0xFF) as u8 != l.media {
            return skip(format!(
                "FAT {} entry 0 is {:#x}, without the media byte {:#x}",
                k + 1,
                t[0],
                l.media
            ));
        }
        let (clean, hard) = match l.kind {
            Kind::Fat12 => continue,
            Kind::Fat16 => (0x8000, 0x4000),
            Kind::Fat32 => (0x0800_0000, 0x0400_0000),
        };
        if t[1] & clean == 0 {
            return skip(format!(
                "FAT {} entry 1 has the clean-shutdown bit clear: not cleanly unmounted",
                k + 1
            ));
        }
        if t[1] & hard == 0 {
            return skip(format!(
                "FAT {} entry 1 has the hard-error bit clear: disk errors were seen",
                k + 1
            ));
        }
    }
    Ok(())
}

/// exFAT: the free clusters are the clear bits of the allocation bitmap (the FAT only
/// chains fragmented files, so it says nothing of allocation).
///
/// Facts from Microsoft's exFAT specification. Checked: the boot checksum (sector 11
/// of the main boot region), the must-be-zero bytes, the layout within the volume and
/// the region, VolumeDirty and MediaFailure (Skipped), the allocation bitmap entry of
/// the active FAT, and that the bitmap's own clusters, the up-case table's and the root
/// directory's are marked in use. The bitmap is streamed cluster by cluster along its
/// FAT chain.
mod exfat {
    use super::{le16, le32, skip, FreeSink, Outcome, Region, Skip, Step};
    use crate::error::Result;

    fn le64(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    /// Most bytes read at once from a cluster (clusters may be 32 MiB).
    const PIECE: u64 = 64 << 10;

    pub(super) struct Vol {
        bps: u64,
        cluster_bytes: u64,
        fat: u64,
        heap: u64,
        clusters: u64,
        root: u64,
        active_fat: u8,
    }

    impl Vol {
        fn cluster_offset(&self, c: u64) -> u64 {
            self.heap + (c - 2) * self.cluster_bytes
        }
    }

    /// The boot checksum of the exFAT specification over the first 11 sectors, leaving
    /// out VolumeFlags and PercentInUse (they change without the checksum).
    pub(super) fn boot_checksum(sectors: &[u8]) -> u32 {
        let mut c = 0u32;
        for (i, &b) in sectors.iter().enumerate() {
            if i == 106 || i == 107 || i == 112 {
                continue;
            }
            c = c.rotate_right(1).wrapping_add(b as u32);
        }
        c
    }

    pub(super) fn parse(b: &[u8], region_len: u64) -> Step<Vol> {
        if le16(b, 510) != 0xAA55 {
            return skip("boot sector signature (0x55AA at offset 510) is missing");
        }
        if b[11..64].iter().any(|&x| x != 0) {
            return skip("the MustBeZero bytes 11..64 of the boot sector are not zero");
        }
        let bps_shift = b[108] as u32;
        let spc_shift = b[109] as u32;
        if !(9..=12).contains(&bps_shift) || spc_shift > 25 - bps_shift {
            return skip(format!(
                "BytesPerSectorShift {bps_shift} / SectorsPerClusterShift {spc_shift}"
            ));
        }
        let bps = 1u64 << bps_shift;
        let cluster_bytes = bps << spc_shift;
        let rev = le16(b, 104);
        if rev >> 8 != 1 {
            return skip(format!("FileSystemRevision {rev:#x} is not 1.x"));
        }
        let flags = le16(b, 106);
        if flags & 0x2 != 0 {
            return skip("VolumeFlags has VolumeDirty set: not cleanly unmounted");
        }
        if flags & 0x4 != 0 {
            return skip("VolumeFlags has MediaFailure set");
        }
        let nfats = b[110];
        if !(1..=2).contains(&nfats) {
            return skip(format!("NumberOfFats {nfats}"));
        }
        let active_fat = (flags & 1) as u8;
        if active_fat >= nfats {
            return skip("VolumeFlags names the second FAT of a volume with one");
        }
        let vol_len = le64(b, 72);
        let fat_off = le32(b, 80) as u64;
        let fat_len = le32(b, 84) as u64;
        let heap_off = le32(b, 88) as u64;
        let clusters = le32(b, 92) as u64;
        let root = le32(b, 96) as u64;
        if vol_len.checked_mul(bps).is_none_or(|v| v > region_len) {
            return skip(format!(
                "VolumeLength {vol_len} sectors run past the region ({region_len} bytes)"
            ));
        }
        if fat_off < 24 || fat_off + fat_len * nfats as u64 > heap_off {
            return skip(format!(
                "FatOffset {fat_off} / FatLength {fat_len} do not fit before ClusterHeapOffset {heap_off}"
            ));
        }
        if clusters == 0 || heap_off + (clusters << spc_shift) > vol_len {
            return skip(format!(
                "ClusterCount {clusters} from ClusterHeapOffset {heap_off} runs past VolumeLength {vol_len}"
            ));
        }
        if fat_len * bps < (clusters + 2) * 4 {
            return skip(format!(
                "FatLength {fat_len} holds fewer than the {} entries",
                clusters + 2
            ));
        }
        if root < 2 || root >= clusters + 2 {
            return skip(format!(
                "FirstClusterOfRootDirectory {root} is outside clusters 2..{}",
                clusters + 1
            ));
        }
        Ok(Vol {
            bps,
            cluster_bytes,
            fat: (fat_off + active_fat as u64 * fat_len) * bps,
            heap: heap_off * bps,
            clusters,
            root,
            active_fat,
        })
    }

    /// Reads FAT entries with a one-sector cache.
    struct Fat<'r, 'a> {
        region: &'r Region<'a>,
        v: &'r Vol,
        cache: Option<(u64, Vec<u8>)>,
    }

    impl Fat<'_, '_> {
        fn entry(&mut self, c: u64) -> Step<u32> {
            let off = self.v.fat + c * 4;
            let sector = off / self.v.bps;
            if self.cache.as_ref().map(|x| x.0) != Some(sector) {
                let bps = self.v.bps;
                let b = self.region.read_vec(sector * bps, bps, bps, "exFAT FAT")?;
                self.cache = Some((sector, b));
            }
            Ok(le32(
                &self.cache.as_ref().unwrap().1,
                (off % self.v.bps) as usize,
            ))
        }

        /// The clusters of a chain from `first`, as many as `len` bytes need (or to its
        /// end when `len` is None), refusing loops and clusters outside the heap.
        fn chain(&mut self, first: u64, len: Option<u64>, what: &str) -> Step<Vec<u64>> {
            let want = len.map(|l| l.div_ceil(self.v.cluster_bytes));
            let mut out = Vec::new();
            let mut c = first;
            loop {
                if c < 2 || c >= self.v.clusters + 2 {
                    return skip(format!("{what}: cluster {c} is outside the heap"));
                }
                out.push(c);
                if want.is_some_and(|w| out.len() as u64 >= w) {
                    return Ok(out);
                }
                if out.len() as u64 > self.v.clusters {
                    return skip(format!("{what}: its FAT chain loops"));
                }
                let next = self.entry(c)? as u64;
                if next == 0xFFFF_FFFF {
                    if want.is_some() {
                        return skip(format!("{what}: its FAT chain ends early"));
                    }
                    return Ok(out);
                }
                c = next;
            }
        }
    }

    pub(super) fn scan(
        region: &Region<'_>,
        boot: &[u8],
        sink: &mut dyn FreeSink,
    ) -> Result<Outcome> {
        let fs = "exfat".to_string();
        Ok(match scan_inner(region, boot, sink) {
            Ok(()) => Outcome::Scanned { fs },
            Err(Skip(reason)) => Outcome::Skipped { fs, reason },
        })
    }

    fn scan_inner(region: &Region<'_>, boot: &[u8], sink: &mut dyn FreeSink) -> Step<()> {
        let bps = 1u64 << boot[108].clamp(9, 12);
        let main = region.read_vec(0, 12 * bps, 12 * 4096, "exFAT main boot region")?;
        let v = parse(&main[..512], region.len())?;
        let want = boot_checksum(&main[..11 * bps as usize]);
        let sum = &main[11 * bps as usize..12 * bps as usize];
        if sum.chunks_exact(4).any(|c| le32(c, 0) != want) {
            return skip(format!(
                "the boot checksum (sector 11) is {:#010x}, computed {want:#010x}",
                le32(sum, 0)
            ));
        }
        let mut fat = Fat {
            region,
            v: &v,
            cache: None,
        };
        let media = fat.entry(0)?;
        if media & 0xFF != 0xF8 {
            return skip(format!(
                "FAT entry 0 is {media:#x}, not the media value 0xF8"
            ));
        }
        // The root directory: find the allocation bitmap and the up-case table.
        let root = fat.chain(v.root, None, "the root directory")?;
        let mut bitmap: Option<(u64, u64)> = None;
        let mut upcase: Option<(u64, u64)> = None;
        'dir: for &c in &root {
            let mut done = 0;
            while done < v.cluster_bytes {
                let n = PIECE.min(v.cluster_bytes - done);
                let b = region.read_vec(
                    v.cluster_offset(c) + done,
                    n,
                    PIECE,
                    "exFAT root directory",
                )?;
                for e in b.chunks_exact(32) {
                    match e[0] {
                        0x00 => break 'dir,
                        0x81 if e[1] & 1 == v.active_fat => {
                            bitmap = Some((le32(e, 20) as u64, le64(e, 24)))
                        }
                        0x82 => upcase = Some((le32(e, 20) as u64, le64(e, 24))),
                        _ => {}
                    }
                }
                done += n;
            }
        }
        let Some((bm_first, bm_len)) = bitmap else {
            return skip("the root directory has no allocation bitmap entry for the active FAT");
        };
        if bm_len < v.clusters.div_ceil(8) {
            return skip(format!(
                "the allocation bitmap's DataLength {bm_len} is under the {} bytes of {} clusters",
                v.clusters.div_ceil(8),
                v.clusters
            ));
        }
        let bm_clusters = fat.chain(
            bm_first,
            Some(v.clusters.div_ceil(8)),
            "the allocation bitmap",
        )?;
        let mut must_be_used: Vec<(u64, &str)> = bm_clusters
            .iter()
            .map(|&c| (c, "allocation bitmap"))
            .collect();
        must_be_used.extend(root.iter().map(|&c| (c, "root directory")));
        if let Some((first, len)) = upcase {
            let up = fat.chain(first, Some(len.max(1)), "the up-case table")?;
            must_be_used.extend(up.into_iter().map(|c| (c, "up-case table")));
        }
        must_be_used.sort_unstable();

        // Stream the bitmap: bit i is cluster i + 2.
        let total_bytes = v.clusters.div_ceil(8);
        let mut byte = 0u64;
        let mut run: Option<(u64, u64)> = None;
        let mut check = must_be_used.iter().peekable();
        for &c in &bm_clusters {
            let mut done = 0;
            while done < v.cluster_bytes && byte < total_bytes {
                let n = PIECE.min(v.cluster_bytes - done).min(total_bytes - byte);
                let b = region.read_vec(
                    v.cluster_offset(c) + done,
                    n,
                    PIECE,
                    "exFAT allocation bitmap",
                )?;
                for (k, &x) in b.iter().enumerate() {
                    let base = (byte + k as u64) * 8;
                    for bit in 0..8 {
                        let i = base + bit;
                        if i >= v.clusters {
                            break;
                        }
                        let cl = i + 2;
                        let used = x & (1 << bit) != 0;
                        while let Some(&&(m, what)) = check.peek() {
                            if m > cl {
                                break;
                            }
                            if m == cl && !used {
                                return skip(format!(
                                    "the allocation bitmap marks cluster {cl} of the {what} free"
                                ));
                            }
                            check.next();
                        }
                        if used {
                            continue;
                        }
                        run = match run {
                            Some((s, e)) if e == cl => Some((s, cl + 1)),
                            Some((s, e)) => {
                                sink.free(v.cluster_offset(s), (e - s) * v.cluster_bytes);
                                Some((cl, cl + 1))
                            }
                            None => Some((cl, cl + 1)),
                        };
                    }
                }
                byte += n;
                done += n;
            }
        }
        if let Some((s, e)) = run {
            sink.free(v.cluster_offset(s), (e - s) * v.cluster_bytes);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FAT16 boot sector: 512-byte sectors, 4 per cluster, 2 FATs of 32 sectors,
    /// 512 root entries, 40000 sectors.
    fn fat16() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0] = 0xEB;
        b[2] = 0x90;
        b[3..11].copy_from_slice(b"mkfs.fat");
        b[0x0B..0x0D].copy_from_slice(&512u16.to_le_bytes());
        b[0x0D] = 4;
        b[0x0E] = 4;
        b[0x10] = 2;
        b[0x11..0x13].copy_from_slice(&512u16.to_le_bytes());
        b[0x13..0x15].copy_from_slice(&40000u16.to_le_bytes());
        b[0x15] = 0xF8;
        b[0x16..0x18].copy_from_slice(&40u16.to_le_bytes());
        b[0x26] = 0x29;
        b[0x1FE] = 0x55;
        b[0x1FF] = 0xAA;
        b
    }

    fn why(b: &[u8]) -> String {
        match parse_bpb(b, 40000 * 512) {
            Ok(_) => String::new(),
            Err(Skip(r)) => r,
        }
    }

    #[test]
    fn fat16_layout() {
        let b = fat16();
        assert!(looks_like_fat(&b));
        let l = parse_bpb(&b, 40000 * 512).ok().unwrap();
        assert_eq!(l.kind, Kind::Fat16);
        assert_eq!(l.fats, vec![4 * 512, 44 * 512]);
        assert_eq!(l.data, (4 + 80 + 32) * 512);
        assert_eq!(l.clusters, (40000 - 116) / 4);
        assert_eq!(l.cluster_bytes, 2048);
    }

    #[test]
    fn bpb_validation_names_the_field() {
        let mut b = fat16();
        b[0x13..0x15].copy_from_slice(&0u16.to_le_bytes());
        assert!(why(&b).contains("BPB_TotSec"));
        let mut b = fat16();
        b[0x13..0x15].copy_from_slice(&50000u16.to_le_bytes());
        assert!(why(&b).contains("run past the region"));
        let mut b = fat16();
        b[0x16] = 2;
        assert!(why(&b).contains("BPB_FATSz"));
        let mut b = fat16();
        b[0x11] = 1;
        assert!(why(&b).contains("BPB_RootEntCnt"));
        let mut b = fat16();
        b[0x25] = 1;
        assert!(why(&b).contains("dirty"));
        let mut b = fat16();
        b[0x1FE] = 0;
        assert!(why(&b).contains("signature"));
        let mut b = fat16();
        b[3..11].copy_from_slice(b"EXFAT   ");
        assert!(!looks_like_fat(&b));
        assert!(matches!(exfat::parse(&b, 1 << 30), Err(Skip(r)) if r.contains("MustBeZero")));
        let mut b = fat16();
        b[0x0D] = 3;
        assert!(!looks_like_fat(&b));
    }

    #[test]
    fn fat12_entries_decode() {
        // Entries 0xFF8, 0xFFF, 0x003, 0x000 packed in 6 bytes.
        let bytes = [0xF8, 0xFF, 0xFF, 0x03, 0x00, 0x00];
        let mut out = Vec::new();
        decode(Kind::Fat12, &bytes, &mut out);
        assert_eq!(out, vec![0xFF8, 0xFFF, 0x003, 0x000]);
        decode(Kind::Fat32, &[0, 0, 0, 0xF0, 1, 0, 0, 0], &mut out);
        assert_eq!(out, vec![0, 1], "FAT32's top 4 bits are reserved");
    }
}
