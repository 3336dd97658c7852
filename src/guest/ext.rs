//! ext2, ext3 and ext4: the free blocks are the clear bits of the block bitmaps.
//!
//! Facts from the kernel's `Documentation/filesystems/ext4` and e2fsprogs' `lib/ext2fs`
//! (`csum.c`, `openfs.c`, `closefs.c`); no crate exposes the block bitmaps (`ext4-view`
//! reads files only), so this is ours.
//!
//! What is accepted: 1 KiB to 64 KiB blocks; 32-byte and (with `64bit`) larger group
//! descriptors; `flex_bg` (a group's bitmaps and inode table in another group);
//! `meta_bg`; `sparse_super` and `sparse_super2`; `uninit_bg` and `metadata_csum` (group
//! descriptors checked with crc16 or crc32c, block bitmaps and the superblock with
//! crc32c); `BLOCK_UNINIT` groups, whose bitmap is computed as the kernel does (all free
//! but the superblock backup, group descriptors, reserved GDT blocks and the group's own
//! bitmaps and inode table); `bigalloc` (a bit is a cluster), except that its
//! `BLOCK_UNINIT` groups are kept whole.
//!
//! What makes the filesystem Skipped (nothing dropped): a bad superblock, descriptor or
//! bitmap checksum; counts that disagree (a descriptor's free count against its bitmap,
//! the superblock's free count against the groups'); a group's superblock backup, group
//! descriptors, bitmaps or inode table marked free in a bitmap; needs_recovery, a journal
//! holding transactions, `s_state` not clean or with errors, multi-mount protection
//! saying the filesystem is in use; an unknown incompat or
//! ro_compat feature (or a snapshot); a filesystem larger than its region.
//!
//! Memory: the bitmaps are read one block at a time, group by group (with a one-block
//! cache of descriptors and of the group that hosts other groups' metadata), so a
//! 16 TiB filesystem costs a few blocks.

use super::{FreeSink, Outcome, Region};
use crate::error::{Error, Result};

const SB_OFFSET: u64 = 1024;
const SB_LEN: usize = 1024;
const MAGIC: u16 = 0xEF53;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;

const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// Incompat features that change nothing about where blocks are or how the block
/// bitmaps read (RECOVER and JOURNAL_DEV are handled apart: they make us stop).
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
const RO_COMPAT_QUOTA: u32 = 0x100;
const RO_COMPAT_BIGALLOC: u32 = 0x200;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const RO_COMPAT_READONLY: u32 = 0x1000;
const RO_COMPAT_PROJECT: u32 = 0x2000;
const RO_COMPAT_SHARED_BLOCKS: u32 = 0x4000;
const RO_COMPAT_VERITY: u32 = 0x8000;
const RO_COMPAT_ORPHAN_PRESENT: u32 = 0x10000;
/// Ro_compat features whose block bitmaps mean what plain ext2's do. HAS_SNAPSHOT (0x80,
/// exclude bitmaps) and REPLICA (0x800) are left out on purpose.
const RO_COMPAT_KNOWN: u32 = RO_COMPAT_SPARSE_SUPER
    | RO_COMPAT_LARGE_FILE
    | RO_COMPAT_HUGE_FILE
    | RO_COMPAT_GDT_CSUM
    | RO_COMPAT_DIR_NLINK
    | RO_COMPAT_EXTRA_ISIZE
    | RO_COMPAT_QUOTA
    | RO_COMPAT_BIGALLOC
    | RO_COMPAT_METADATA_CSUM
    | RO_COMPAT_READONLY
    | RO_COMPAT_PROJECT
    | RO_COMPAT_SHARED_BLOCKS
    | RO_COMPAT_VERITY
    | RO_COMPAT_ORPHAN_PRESENT;

const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;
const STATE_ORPHAN: u16 = 0x4;

const BG_BLOCK_UNINIT: u16 = 0x2;

/// Why a scan stopped: the filesystem is Skipped with this reason.
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

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

/// crc32c as the kernel's `crc32c_le(seed, ...)`: no inversion on entry or exit.
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

/// crc16 as e2fsprogs' `ext2fs_crc16` (reflected 0x8005, no final inversion).
fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc ^= b as u16;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Csum {
    /// No group descriptor checksums.
    None,
    /// `uninit_bg` (gdt_csum): crc16 of the descriptors.
    Crc16,
    /// `metadata_csum`: crc32c of the superblock, descriptors and bitmaps.
    Crc32c { seed: u32 },
}

/// The superblock fields the scan needs, validated.
#[derive(Debug, Clone)]
struct Super {
    name: &'static str,
    block_size: u64,
    blocks_count: u64,
    free_blocks: u64,
    first_data_block: u64,
    /// Blocks per cluster (1 without bigalloc).
    ratio: u64,
    blocks_per_group: u64,
    clusters_per_group: u64,
    inodes_per_group: u64,
    inode_size: u64,
    desc_size: usize,
    groups: u64,
    desc_per_block: u64,
    /// Group descriptor blocks (all groups, as `s_gdb_count`).
    gdt_blocks: u64,
    reserved_gdt: u64,
    itb_per_group: u64,
    compat: u32,
    ro_compat: u32,
    incompat: u32,
    first_meta_bg: u64,
    backup_bgs: [u32; 2],
    csum: Csum,
    uuid: [u8; 16],
    journal_inum: u32,
    /// With INCOMPAT_MMP: the multi-mount protection block.
    mmp_block: Option<u64>,
}

impl Super {
    fn has_ro(&self, f: u32) -> bool {
        self.ro_compat & f != 0
    }

    fn has_in(&self, f: u32) -> bool {
        self.incompat & f != 0
    }

    fn group_first_block(&self, g: u64) -> u64 {
        self.first_data_block + g * self.blocks_per_group
    }

    /// Blocks in group `g` (the last one may be short).
    fn group_blocks(&self, g: u64) -> u64 {
        let first = self.group_first_block(g);
        self.blocks_per_group.min(self.blocks_count - first)
    }

    fn group_clusters(&self, g: u64) -> u64 {
        self.group_blocks(g).div_ceil(self.ratio)
    }

    /// Whether group `g` holds a superblock backup (ext4_bg_has_super).
    fn has_super(&self, g: u64) -> bool {
        if g == 0 {
            return true;
        }
        if self.compat & COMPAT_SPARSE_SUPER2 != 0 {
            return g == self.backup_bgs[0] as u64 || g == self.backup_bgs[1] as u64;
        }
        if g <= 1 || !self.has_ro(RO_COMPAT_SPARSE_SUPER) {
            return true;
        }
        if g & 1 == 0 {
            return false;
        }
        [3u64, 5, 7].iter().any(|&r| is_power_of(g, r))
    }

    /// Blocks at the start of group `g` taken by the superblock (backup), group
    /// descriptors and reserved GDT blocks (ext4_num_base_meta_clusters, in blocks).
    fn base_meta_blocks(&self, g: u64) -> u64 {
        let sb = self.has_super(g) as u64;
        let meta_bg = self.has_in(INCOMPAT_META_BG);
        let mut n = sb;
        if !meta_bg || g < self.first_meta_bg * self.desc_per_block {
            if sb == 1 {
                n += if meta_bg {
                    self.first_meta_bg
                } else {
                    self.gdt_blocks
                };
                n += self.reserved_gdt;
            }
        } else {
            let first = g / self.desc_per_block * self.desc_per_block;
            if g == first || g == first + 1 || g == first + self.desc_per_block - 1 {
                n += 1;
            }
        }
        // Group 0 of a bigalloc filesystem with 1 KiB blocks starts at block 0, before
        // the superblock's block 1: count it too.
        if g == 0 && self.ratio > 1 && self.block_size == 1024 {
            n += 1;
        }
        n
    }

    /// Block holding group descriptor block `i` (ext2fs_descriptor_block_loc2, primary).
    fn gdt_block(&self, i: u64) -> u64 {
        let adjust = (self.ratio > 1 && self.block_size == 1024) as u64;
        if !self.has_in(INCOMPAT_META_BG) || i < self.first_meta_bg {
            return self.first_data_block + 1 + i + adjust;
        }
        let bg = i * self.desc_per_block;
        self.group_first_block(bg) + self.has_super(bg) as u64
    }
}

fn is_power_of(mut n: u64, base: u64) -> bool {
    while n > 1 && n.is_multiple_of(base) {
        n /= base;
    }
    n == 1
}

/// The superblock's revision and feature words `(rev, incompat, ro_compat, compat)`, after
/// the checks that decide whether the filesystem may be read at all: magic, features we
/// know, the superblock checksum, and a clean state.
fn parse_features(sb: &[u8]) -> Step<(u32, u32, u32, u32)> {
    if le16(sb, 0x38) != MAGIC {
        return skip("bad magic");
    }
    let incompat = le32(sb, 0x60);
    let ro_compat = le32(sb, 0x64);
    let compat = le32(sb, 0x5C);
    let rev = le32(sb, 0x4C);
    if rev > 1 {
        return skip(format!("s_rev_level {rev} is unknown"));
    }
    let (incompat, ro_compat, compat) = if rev == 0 {
        // Revision 0 has no feature fields; whatever they hold means nothing.
        (0, 0, 0)
    } else {
        (incompat, ro_compat, compat)
    };
    if incompat & INCOMPAT_JOURNAL_DEV != 0 {
        return skip("an external journal device (INCOMPAT_JOURNAL_DEV), not a filesystem");
    }
    if incompat & INCOMPAT_RECOVER != 0 {
        return skip("needs_recovery is set: the journal has not been replayed");
    }
    if incompat & INCOMPAT_COMPRESSION != 0 {
        return skip("the compression feature is not known to be safe");
    }
    let unknown = incompat & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return skip(format!("unknown incompat features {unknown:#x}"));
    }
    let unknown = ro_compat & !RO_COMPAT_KNOWN;
    if unknown != 0 {
        return skip(format!(
            "unknown or unsafe ro_compat features {unknown:#x} (0x80 is a snapshot)"
        ));
    }
    if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
        if ro_compat & RO_COMPAT_GDT_CSUM != 0 {
            return skip("both gdt_csum and metadata_csum are set");
        }
        let t = sb[0x175];
        if t != 1 {
            return skip(format!("s_checksum_type {t} is not crc32c"));
        }
        let want = crc32c_raw(!0, &sb[..0x3FC]);
        let have = le32(sb, 0x3FC);
        if want != have {
            return skip(format!(
                "superblock checksum (s_checksum) is {have:#010x}, computed {want:#010x}"
            ));
        }
    }
    let state = le16(sb, 0x3A);
    if state & STATE_VALID == 0 {
        return skip(format!(
            "s_state {state:#x}: not cleanly unmounted (mounted, or crashed)"
        ));
    }
    if state & STATE_ERROR != 0 {
        return skip(format!("s_state {state:#x}: errors detected, fsck needed"));
    }
    if state & STATE_ORPHAN != 0 {
        return skip(format!("s_state {state:#x}: orphans being recovered"));
    }
    Ok((rev, incompat, ro_compat, compat))
}

/// Parse and validate a superblock (1024 bytes). `Err` names what is wrong or unsafe.
fn parse_super(sb: &[u8]) -> Step<Super> {
    let (rev, incompat, ro_compat, compat) = parse_features(sb)?;
    let log_bs = le32(sb, 0x18);
    if log_bs > 6 {
        return skip(format!(
            "s_log_block_size {log_bs}: blocks over 64 KiB are not ext"
        ));
    }
    let block_size = 1024u64 << log_bs;
    let bigalloc = ro_compat & RO_COMPAT_BIGALLOC != 0;
    let log_cs = le32(sb, 0x1C);
    let ratio = if bigalloc {
        if log_cs < log_bs || log_cs - log_bs > 16 {
            return skip(format!(
                "s_log_cluster_size {log_cs} with s_log_block_size {log_bs}"
            ));
        }
        1u64 << (log_cs - log_bs)
    } else {
        1
    };
    let sixty_four = incompat & INCOMPAT_64BIT != 0;
    let blocks_count = le32(sb, 0x4) as u64
        | if sixty_four {
            (le32(sb, 0x150) as u64) << 32
        } else {
            0
        };
    let free_blocks = le32(sb, 0xC) as u64
        | if sixty_four {
            (le32(sb, 0x158) as u64) << 32
        } else {
            0
        };
    let first_data_block = le32(sb, 0x14) as u64;
    let want_first = (block_size == 1024 && !bigalloc) as u64;
    if first_data_block != want_first {
        return skip(format!(
            "s_first_data_block {first_data_block} with {block_size}-byte blocks (expected {want_first})"
        ));
    }
    if blocks_count <= first_data_block {
        return skip(format!("s_blocks_count {blocks_count} is too small"));
    }
    if free_blocks > blocks_count {
        return skip(format!(
            "s_free_blocks_count {free_blocks} exceeds s_blocks_count {blocks_count}"
        ));
    }
    let bits = block_size * 8;
    let blocks_per_group = le32(sb, 0x20) as u64;
    let clusters_per_group = if bigalloc {
        le32(sb, 0x24) as u64
    } else {
        blocks_per_group
    };
    if clusters_per_group == 0
        || clusters_per_group > bits
        || clusters_per_group % 8 != 0
        || blocks_per_group != clusters_per_group * ratio
    {
        return skip(format!(
            "s_blocks_per_group {blocks_per_group} / s_clusters_per_group {clusters_per_group} do not fit {block_size}-byte bitmaps"
        ));
    }
    let inodes_per_group = le32(sb, 0x28) as u64;
    if inodes_per_group == 0 || inodes_per_group > bits {
        return skip(format!("s_inodes_per_group {inodes_per_group}"));
    }
    let inode_size = if rev == 0 { 128 } else { le16(sb, 0x58) as u64 };
    if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > block_size {
        return skip(format!("s_inode_size {inode_size}"));
    }
    let desc_size = if sixty_four {
        let d = le16(sb, 0xFE) as usize;
        if d < 64 || !d.is_power_of_two() || d > 1024 {
            return skip(format!("s_desc_size {d} with 64bit"));
        }
        d
    } else {
        32
    };
    let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
    let inodes_count = le32(sb, 0x0) as u64;
    if groups.checked_mul(inodes_per_group) != Some(inodes_count) {
        return skip(format!(
            "s_inodes_count {inodes_count} is not {groups} groups x {inodes_per_group} inodes"
        ));
    }
    let desc_per_block = block_size / desc_size as u64;
    let gdt_blocks = groups.div_ceil(desc_per_block);
    let reserved_gdt = if rev == 0 { 0 } else { le16(sb, 0xCE) as u64 };
    let first_meta_bg = le32(sb, 0x104) as u64;
    if incompat & INCOMPAT_META_BG != 0 && first_meta_bg > gdt_blocks {
        return skip(format!(
            "s_first_meta_bg {first_meta_bg} exceeds the {gdt_blocks} descriptor blocks"
        ));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&sb[0x68..0x78]);
    let csum = if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
        let seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
            le32(sb, 0x270)
        } else {
            crc32c_raw(!0, &uuid)
        };
        Csum::Crc32c { seed }
    } else if ro_compat & RO_COMPAT_GDT_CSUM != 0 {
        Csum::Crc16
    } else {
        Csum::None
    };
    let ext4_features =
        (incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG | INCOMPAT_META_BG)) != 0
            || ro_compat
                & (RO_COMPAT_HUGE_FILE
                    | RO_COMPAT_GDT_CSUM
                    | RO_COMPAT_DIR_NLINK
                    | RO_COMPAT_EXTRA_ISIZE
                    | RO_COMPAT_METADATA_CSUM
                    | RO_COMPAT_BIGALLOC)
                != 0;
    let name = if ext4_features {
        "ext4"
    } else if compat & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    Ok(Super {
        name,
        block_size,
        blocks_count,
        free_blocks,
        first_data_block,
        ratio,
        blocks_per_group,
        clusters_per_group,
        inodes_per_group,
        inode_size,
        desc_size,
        groups,
        desc_per_block,
        gdt_blocks,
        reserved_gdt,
        itb_per_group: (inodes_per_group * inode_size).div_ceil(block_size),
        compat,
        ro_compat,
        incompat,
        first_meta_bg,
        backup_bgs: [le32(sb, 0x24C), le32(sb, 0x250)],
        csum,
        uuid,
        journal_inum: if compat & COMPAT_HAS_JOURNAL != 0 {
            le32(sb, 0xE0)
        } else {
            0
        },
        mmp_block: (incompat & INCOMPAT_MMP != 0)
            .then(|| u64::from_le_bytes(sb[0x168..0x170].try_into().unwrap())),
    })
}

/// One group descriptor, the fields the scan uses.
#[derive(Debug, Clone, Copy)]
struct Desc {
    block_bitmap: u64,
    inode_bitmap: u64,
    inode_table: u64,
    free_clusters: u64,
    flags: u16,
    bitmap_csum: u32,
}

/// Parse descriptor `g` from its bytes, checking its checksum.
fn parse_desc(s: &Super, g: u64, d: &[u8]) -> Step<Desc> {
    let big = s.desc_size >= 64;
    let hi32 = |o: usize| if big { (le32(d, o) as u64) << 32 } else { 0 };
    let hi16 = |o: usize| if big { (le16(d, o) as u64) << 16 } else { 0 };
    let stored = le16(d, 0x1E);
    match s.csum {
        Csum::None => {}
        Csum::Crc16 => {
            let mut c = crc16(!0, &s.uuid);
            c = crc16(c, &(g as u32).to_le_bytes());
            c = crc16(c, &d[..0x1E]);
            c = crc16(c, &d[0x20..s.desc_size]);
            if c != stored {
                return skip(format!(
                    "group {g}: descriptor checksum (bg_checksum) is {stored:#06x}, computed {c:#06x}"
                ));
            }
        }
        Csum::Crc32c { seed } => {
            let mut c = crc32c_raw(seed, &(g as u32).to_le_bytes());
            c = crc32c_raw(c, &d[..0x1E]);
            c = crc32c_raw(c, &[0, 0]);
            c = crc32c_raw(c, &d[0x20..s.desc_size]);
            let c = (c & 0xFFFF) as u16;
            if c != stored {
                return skip(format!(
                    "group {g}: descriptor checksum (bg_checksum) is {stored:#06x}, computed {c:#06x}"
                ));
            }
        }
    }
    let desc = Desc {
        block_bitmap: le32(d, 0x0) as u64 | hi32(0x20),
        inode_bitmap: le32(d, 0x4) as u64 | hi32(0x24),
        inode_table: le32(d, 0x8) as u64 | hi32(0x28),
        free_clusters: le16(d, 0xC) as u64 | hi16(0x2C),
        flags: le16(d, 0x12),
        bitmap_csum: le16(d, 0x18) as u32
            | if s.desc_size >= 0x3A {
                (le16(d, 0x38) as u32) << 16
            } else {
                0
            },
    };
    let in_fs = |b: u64, n: u64| {
        b >= s.first_data_block && b.checked_add(n).is_some_and(|e| e <= s.blocks_count)
    };
    if !in_fs(desc.block_bitmap, 1)
        || !in_fs(desc.inode_bitmap, 1)
        || !in_fs(desc.inode_table, s.itb_per_group)
    {
        return skip(format!(
            "group {g}: bitmap or inode table outside the filesystem (block bitmap {}, inode bitmap {}, inode table {})",
            desc.block_bitmap, desc.inode_bitmap, desc.inode_table
        ));
    }
    if !s.has_in(INCOMPAT_FLEX_BG) {
        let first = s.group_first_block(g);
        let end = first + s.group_blocks(g);
        let inside = |b: u64, n: u64| b >= first && b + n <= end;
        if !inside(desc.block_bitmap, 1)
            || !inside(desc.inode_bitmap, 1)
            || !inside(desc.inode_table, s.itb_per_group)
        {
            return skip(format!(
                "group {g}: bitmap or inode table outside its group without flex_bg"
            ));
        }
    }
    if desc.free_clusters > s.group_clusters(g) {
        return skip(format!(
            "group {g}: bg_free_blocks_count {} exceeds the group's {} clusters",
            desc.free_clusters,
            s.group_clusters(g)
        ));
    }
    Ok(desc)
}

fn bit(bm: &[u8], i: u64) -> bool {
    bm[(i / 8) as usize] & (1 << (i % 8)) != 0
}

fn set_bit(bm: &mut [u8], i: u64) {
    bm[(i / 8) as usize] |= 1 << (i % 8);
}

/// The reader: the region, the superblock and the block caches.
struct Ext<'r, 'a> {
    region: &'r Region<'a>,
    s: Super,
    /// The last group descriptor block read: (index, bytes).
    gdt: Option<(u64, Vec<u8>)>,
    /// The last bitmap read for another group than the one being scanned.
    host: Option<(u64, Vec<u8>)>,
}

impl Ext<'_, '_> {
    fn read_block(&self, block: u64, what: &str) -> Step<Vec<u8>> {
        let bs = self.s.block_size;
        Ok(self.region.read_vec(block * bs, bs, bs, what)?)
    }

    fn desc(&mut self, g: u64) -> Step<Desc> {
        let i = g / self.s.desc_per_block;
        if self.gdt.as_ref().map(|(j, _)| *j) != Some(i) {
            let blk = self.s.gdt_block(i);
            if blk >= self.s.blocks_count {
                return skip(format!(
                    "group descriptor block {i} at block {blk} is past the end"
                ));
            }
            let b = self.read_block(blk, "ext group descriptors")?;
            self.gdt = Some((i, b));
        }
        let (_, b) = self.gdt.as_ref().unwrap();
        let o = ((g % self.s.desc_per_block) as usize) * self.s.desc_size;
        let d = b[o..o + self.s.desc_size].to_vec();
        parse_desc(&self.s, g, &d)
    }

    /// Group `g`'s block bitmap (read and checksummed, or computed for BLOCK_UNINIT);
    /// None for a BLOCK_UNINIT group of a bigalloc filesystem (kept whole).
    fn bitmap(&mut self, g: u64, d: &Desc) -> Step<Option<Vec<u8>>> {
        let s = &self.s;
        let uninit = s.csum != Csum::None && d.flags & BG_BLOCK_UNINIT != 0;
        if uninit {
            if s.ratio > 1 {
                return Ok(None);
            }
            let mut bm = vec![0u8; s.block_size as usize];
            let n = s.group_blocks(g);
            let base = s.base_meta_blocks(g).min(n);
            for i in 0..base {
                set_bit(&mut bm, i);
            }
            let first = s.group_first_block(g);
            let own = [
                (d.block_bitmap, 1),
                (d.inode_bitmap, 1),
                (d.inode_table, s.itb_per_group),
            ];
            for (b, len) in own {
                for blk in b..b + len {
                    if blk >= first && blk < first + n {
                        set_bit(&mut bm, blk - first);
                    }
                }
            }
            return Ok(Some(bm));
        }
        let bm = self.read_block(d.block_bitmap, "ext block bitmap")?;
        if let Csum::Crc32c { seed } = self.s.csum {
            let len = (self.s.clusters_per_group / 8) as usize;
            let mut c = crc32c_raw(seed, &bm[..len]);
            if self.s.desc_size < 0x3A {
                c &= 0xFFFF;
            }
            if c != d.bitmap_csum {
                return skip(format!(
                    "group {g}: block bitmap checksum (bg_block_bitmap_csum) is {:#x}, computed {c:#x}",
                    d.bitmap_csum
                ));
            }
        }
        Ok(Some(bm))
    }

    /// Whether `block` is marked in use in its group's bitmap (`cur` is group `g`'s).
    fn block_used(&mut self, block: u64, g: u64, cur: &[u8]) -> Step<bool> {
        let s = &self.s;
        let h = (block - s.first_data_block) / s.blocks_per_group;
        let i = (block - s.group_first_block(h)) / s.ratio;
        if h == g {
            return Ok(bit(cur, i));
        }
        if self.host.as_ref().map(|(j, _)| *j) != Some(h) {
            let d = self.desc(h)?;
            match self.bitmap(h, &d)? {
                Some(bm) => self.host = Some((h, bm)),
                None => {
                    return skip(format!(
                        "group {h} is BLOCK_UNINIT on bigalloc but holds metadata of group {g}"
                    ))
                }
            }
        }
        Ok(bit(&self.host.as_ref().unwrap().1, i))
    }

    /// Fail unless multi-mount protection says no node has the filesystem in use.
    fn check_mmp(&mut self) -> Step<()> {
        let Some(blk) = self.s.mmp_block else {
            return Ok(());
        };
        if blk < self.s.first_data_block || blk >= self.s.blocks_count {
            return skip(format!("s_mmp_block {blk} is outside the filesystem"));
        }
        let b = self.read_block(blk, "ext MMP block")?;
        if le32(&b, 0) != 0x004D_4D50 {
            return skip("the MMP block has a bad magic (mmp_magic)");
        }
        let seq = le32(&b, 4);
        if seq != 0xFF4D_4D50 {
            return skip(format!(
                "MMP says the filesystem is in use or being checked (mmp_seq {seq:#x})"
            ));
        }
        Ok(())
    }

    /// Fail unless the journal is empty: jbd2's `s_start` is 0 when nothing awaits replay.
    fn check_journal(&mut self) -> Step<()> {
        let ino = self.s.journal_inum as u64;
        if ino == 0 {
            return Ok(());
        }
        if ino > self.s.groups * self.s.inodes_per_group {
            return skip(format!("s_journal_inum {ino} is past the inodes"));
        }
        let g = (ino - 1) / self.s.inodes_per_group;
        let idx = (ino - 1) % self.s.inodes_per_group;
        let d = self.desc(g)?;
        let off = d.inode_table * self.s.block_size + idx * self.s.inode_size;
        let inode = self.region.read_vec(off, 128, 128, "ext journal inode")?;
        let flags = le32(&inode, 0x20);
        let iblock = &inode[0x28..0x28 + 60];
        let first = if flags & 0x80000 != 0 {
            self.extent_block0(iblock)?
        } else {
            Some(le32(iblock, 0) as u64)
        };
        let Some(blk) = first.filter(|&b| b > 0 && b < self.s.blocks_count) else {
            return skip("the journal inode maps no valid first block");
        };
        let jsb = self.read_block(blk, "ext journal superblock")?;
        if be32(&jsb, 0) != 0xC03B_3998 {
            return skip("the journal superblock has a bad magic");
        }
        let start = be32(&jsb, 28);
        if start != 0 {
            return skip(format!(
                "the journal holds transactions not yet replayed (jbd2 s_start {start})"
            ));
        }
        Ok(())
    }

    /// The physical block of logical block 0 in an extent tree rooted at `node`.
    fn extent_block0(&self, root: &[u8]) -> Step<Option<u64>> {
        let mut node = root.to_vec();
        for _ in 0..6 {
            if le16(&node, 0) != 0xF30A {
                return skip("the journal inode's extent header has a bad magic");
            }
            let entries = le16(&node, 2) as usize;
            let depth = le16(&node, 6);
            if entries == 0 || 12 + entries * 12 > node.len() {
                return Ok(None);
            }
            let e = &node[12..24];
            if depth == 0 {
                if le32(e, 0) != 0 {
                    return Ok(None);
                }
                return Ok(Some(le32(e, 8) as u64 | (le16(e, 6) as u64) << 32));
            }
            let child = le32(e, 4) as u64 | (le16(e, 8) as u64) << 32;
            if child == 0 || child >= self.s.blocks_count {
                return Ok(None);
            }
            node = self.read_block(child, "ext journal extent block")?;
        }
        skip("the journal inode's extent tree is too deep")
    }
}

/// Scan an ext2/3/4 filesystem at the start of `region`.
pub fn scan(region: &Region<'_>, sink: &mut dyn FreeSink) -> Result<Outcome> {
    if region.len() < SB_OFFSET + SB_LEN as u64 {
        return Ok(Outcome::NotMine);
    }
    let mut sb = [0u8; SB_LEN];
    region.read_at(&mut sb, SB_OFFSET, "ext superblock")?;
    if le16(&sb, 0x38) != MAGIC {
        return Ok(Outcome::NotMine);
    }
    let s = match parse_super(&sb) {
        Ok(s) => s,
        Err(Skip(reason)) => {
            return Ok(Outcome::Skipped {
                fs: "ext".to_string(),
                reason,
            })
        }
    };
    let fs = s.name.to_string();
    Ok(match scan_groups(region, s, sink) {
        Ok(()) => Outcome::Scanned { fs },
        Err(Skip(reason)) => Outcome::Skipped { fs, reason },
    })
}

fn scan_groups(region: &Region<'_>, s: Super, sink: &mut dyn FreeSink) -> Step<()> {
    let fs_bytes = s.blocks_count.checked_mul(s.block_size);
    if fs_bytes.is_none_or(|b| b > region.len()) {
        return skip(format!(
            "the filesystem ({} blocks of {}) is larger than its region ({} bytes)",
            s.blocks_count,
            s.block_size,
            region.len()
        ));
    }
    let fs_bytes = fs_bytes.unwrap();
    let mut ext = Ext {
        region,
        s,
        gdt: None,
        host: None,
    };
    ext.check_mmp()?;
    ext.check_journal()?;
    let mut free_total = 0u64;
    let mut pending: Option<(u64, u64)> = None;
    for g in 0..ext.s.groups {
        let d = ext.desc(g)?;
        let Some(bm) = ext.bitmap(g, &d)? else {
            // Kept whole; its count still adds up.
            free_total += d.free_clusters;
            continue;
        };
        let s = &ext.s;
        let n = s.group_clusters(g);
        let used = count_used(&bm, n);
        if n - used != d.free_clusters {
            return skip(format!(
                "group {g}: bg_free_blocks_count is {} but the block bitmap has {} free",
                d.free_clusters,
                n - used
            ));
        }
        free_total += d.free_clusters;
        let base = s
            .base_meta_blocks(g)
            .min(s.group_blocks(g))
            .div_ceil(s.ratio);
        if let Some(i) = (0..base).find(|&i| !bit(&bm, i)) {
            return skip(format!(
                "group {g}: the block bitmap marks cluster {i} free, inside the superblock and group descriptors"
            ));
        }
        let meta = [
            ("block bitmap", d.block_bitmap, 1),
            ("inode bitmap", d.inode_bitmap, 1),
            ("inode table", d.inode_table, s.itb_per_group),
        ];
        for (what, b, len) in meta {
            for blk in b..b + len {
                if !ext.block_used(blk, g, &bm)? {
                    return skip(format!(
                        "group {g}: its {what} (block {blk}) is marked free in a block bitmap"
                    ));
                }
            }
        }
        let s = &ext.s;
        let first = s.group_first_block(g);
        let cluster_bytes = s.ratio * s.block_size;
        for (start, len) in free_runs(&bm, n) {
            let off = (first + start * s.ratio) * s.block_size;
            let end = (off + len * cluster_bytes).min(fs_bytes);
            // A run reaching the end of a group continues into the next one: report them
            // as one, so a granule straddling the boundary (1 KiB blocks) is dropped too.
            match pending {
                Some((o, e)) if e == off => pending = Some((o, end)),
                Some((o, e)) => {
                    sink.free(o, e - o);
                    pending = Some((off, end));
                }
                None => pending = Some((off, end)),
            }
        }
    }
    if let Some((o, e)) = pending {
        sink.free(o, e - o);
    }
    let s = &ext.s;
    if free_total * s.ratio != s.free_blocks {
        return skip(format!(
            "s_free_blocks_count is {} but the groups have {} free",
            s.free_blocks,
            free_total * s.ratio
        ));
    }
    Ok(())
}

/// Set bits among the first `n` of `bm`.
fn count_used(bm: &[u8], n: u64) -> u64 {
    let full = (n / 8) as usize;
    let mut c: u64 = bm[..full].iter().map(|b| b.count_ones() as u64).sum();
    for i in full as u64 * 8..n {
        c += bit(bm, i) as u64;
    }
    c
}

/// Runs of clear bits among the first `n` of `bm`, as (first bit, count).
fn free_runs(bm: &[u8], n: u64) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < n {
        if i % 8 == 0 && i + 8 <= n && bm[(i / 8) as usize] == 0xFF {
            i += 8;
            continue;
        }
        if bit(bm, i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < n {
            if i % 8 == 0 && i + 8 <= n && bm[(i / 8) as usize] == 0 {
                i += 8;
            } else if !bit(bm, i) {
                i += 1;
            } else {
                break;
            }
        }
        runs.push((start, i - start));
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_kernel_convention() {
        // The standard check value of CRC-32C is 0xE3069283; the kernel's raw form is
        // its inverse.
        assert_eq!(crc32c_raw(!0, b"123456789"), !0xE306_9283);
    }

    #[test]
    fn crc16_matches_e2fsprogs() {
        // CRC-16/MODBUS (init 0xFFFF, reflected 0x8005, no xorout) check value.
        assert_eq!(crc16(0xFFFF, b"123456789"), 0x4B37);
    }

    #[test]
    fn sparse_super_backups() {
        let groups: Vec<u64> = (0..60)
            .filter(|&g| is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7))
            .collect();
        assert_eq!(groups, vec![1, 3, 5, 7, 9, 25, 27, 49]);
    }

    #[test]
    fn runs_and_counts() {
        let bm = [0b0000_0111u8, 0x00, 0xFF, 0b1000_0000];
        assert_eq!(count_used(&bm, 32), 3 + 8 + 1);
        assert_eq!(free_runs(&bm, 32), vec![(3, 13), (24, 7)]);
        assert_eq!(free_runs(&bm, 20), vec![(3, 13)]);
        assert_eq!(free_runs(&[0u8; 2], 12), vec![(0, 12)]);
    }

    fn minimal_super() -> Vec<u8> {
        let mut sb = vec![0u8; 1024];
        sb[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        sb[0x3A] = 1; // clean
        sb[0x4C] = 1; // dynamic rev
        sb[0x58..0x5A].copy_from_slice(&256u16.to_le_bytes());
        sb[0x18] = 2; // 4 KiB
        sb[0x04..0x08].copy_from_slice(&65536u32.to_le_bytes());
        sb[0x20..0x24].copy_from_slice(&32768u32.to_le_bytes());
        sb[0x24..0x28].copy_from_slice(&32768u32.to_le_bytes());
        sb[0x28..0x2C].copy_from_slice(&8192u32.to_le_bytes());
        sb[0x00..0x04].copy_from_slice(&16384u32.to_le_bytes());
        sb
    }

    #[test]
    fn metadata_at_the_start_of_groups() {
        // 4 KiB blocks, 64-byte descriptors (64 a block), 200 groups of 1024 blocks.
        let mut sb = minimal_super();
        sb[0x60] |= 0x80; // 64bit
        sb[0xFE] = 64;
        sb[0x64] |= 0x1; // sparse_super
        sb[0x04..0x08].copy_from_slice(&(200u32 * 1024).to_le_bytes());
        sb[0x20..0x24].copy_from_slice(&1024u32.to_le_bytes());
        sb[0x24..0x28].copy_from_slice(&1024u32.to_le_bytes());
        sb[0x28..0x2C].copy_from_slice(&256u32.to_le_bytes());
        sb[0x00..0x04].copy_from_slice(&(200u32 * 256).to_le_bytes());
        sb[0xCE] = 10; // reserved GDT blocks
        let s = parse_super(&sb).ok().unwrap();
        assert_eq!((s.groups, s.gdt_blocks), (200, 4));
        let base: Vec<u64> = [0, 1, 2, 3, 4, 9, 25, 26]
            .map(|g| s.base_meta_blocks(g))
            .to_vec();
        assert_eq!(base, vec![15, 15, 0, 15, 0, 15, 15, 0]);
        assert_eq!(s.gdt_block(2), 3);

        // meta_bg from descriptor block 1: groups 64.. keep one descriptor block in
        // the first, second and last group of each metagroup.
        let mut mb = sb.clone();
        mb[0x60] |= 0x10;
        mb[0xCE] = 0;
        mb[0x104] = 1; // s_first_meta_bg
        let s = parse_super(&mb).ok().unwrap();
        assert_eq!(s.base_meta_blocks(0), 2); // superblock + 1 old-style GDT block
        assert_eq!(s.base_meta_blocks(64), 1); // GDT, no superblock backup
        assert_eq!(s.base_meta_blocks(65), 1);
        assert_eq!(s.base_meta_blocks(81), 1); // 81 = 3^4: a superblock backup, no GDT
        assert_eq!(s.base_meta_blocks(127), 1);
        assert_eq!(s.base_meta_blocks(66), 0);
        assert_eq!(s.gdt_block(1), 64 * 1024);
        assert_eq!(s.gdt_block(0), 1);

        // sparse_super2: backups only where s_backup_bgs say.
        let mut s2 = sb.clone();
        s2[0x5D] |= 0x02; // compat 0x200
        s2[0x24C..0x250].copy_from_slice(&1u32.to_le_bytes());
        s2[0x250..0x254].copy_from_slice(&199u32.to_le_bytes());
        let s = parse_super(&s2).ok().unwrap();
        let has: Vec<u64> = (0..200).filter(|&g| s.has_super(g)).collect();
        assert_eq!(has, vec![0, 1, 199]);
    }

    #[test]
    fn superblock_validation_names_the_field() {
        let s = parse_super(&minimal_super()).ok().unwrap();
        assert_eq!((s.name, s.groups, s.block_size), ("ext2", 2, 4096));
        assert_eq!(s.itb_per_group, 512);
        let why = |patch: &dyn Fn(&mut Vec<u8>)| {
            let mut sb = minimal_super();
            patch(&mut sb);
            match parse_super(&sb) {
                Ok(_) => String::new(),
                Err(Skip(r)) => r,
            }
        };
        assert!(why(&|b| b[0x60] |= 0x4).contains("needs_recovery"));
        assert!(why(&|b| b[0x3A] = 0).contains("s_state"));
        assert!(why(&|b| b[0x3A] = 3).contains("errors"));
        assert!(why(&|b| b[0x61] |= 0x10).contains("unknown incompat")); // dirdata
        assert!(why(&|b| b[0x62] |= 0x40).contains("unknown incompat"));
        assert!(why(&|b| b[0x64] |= 0x80).contains("ro_compat"));
        assert!(why(&|b| b[0x18] = 7).contains("s_log_block_size"));
        assert!(why(&|b| b[0x28] = 1).contains("s_inodes_count"));
        assert!(why(&|b| b[0x14] = 1).contains("s_first_data_block"));
        assert!(why(&|b| b[0x0E] = 0xFF).contains("s_free_blocks_count"));
        // metadata_csum: the superblock checksum is checked.
        let bad = why(&|b| {
            b[0x65] |= 0x04; // metadata_csum (0x400)
            b[0x175] = 1;
        });
        assert!(bad.contains("s_checksum"), "{bad}");
        let good = why(&|b| {
            b[0x65] |= 0x04;
            b[0x175] = 1;
            let c = crc32c_raw(!0, &b[..0x3FC]);
            b[0x3FC..].copy_from_slice(&c.to_le_bytes());
        });
        assert_eq!(good, "");
    }
}
