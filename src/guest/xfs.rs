//! XFS: the free extents are the records of each allocation group's by-block-number
//! free-space B+tree (rooted in its AGF), once the superblock, every AGF and every tree
//! block validate (magic, v5 CRC32C, owner, self address, UUID, levels, siblings) and the
//! internal log is proved clean.
//!
//! The log rule follows the kernel's `xlog_find_tail` as xfsprogs uses it
//! (`xlog_is_dirty`, which makes `xfs_repair -n` refuse): find the head from the cycle
//! numbers stamped in every 512-byte log block, then the last record before it must be a
//! lone unmount record ending exactly at the head. Anything else (a torn or
//! out-of-order tail, an external log, a record of other operations) is not provably
//! clean, and the filesystem is skipped.
//!
//! The by-size tree is walked with the same checks and must index as many extents of
//! as many blocks. Only the by-block tree's records are dropped: the AG free list (AGFL) blocks
//! are left as they are, and no record may cover an AG header, a tree block, a root of
//! another AG tree, an AGFL block or the log.

use std::collections::HashSet;

use super::{FreeSink, Outcome, Region};
use crate::error::Result;

type Check<T> = std::result::Result<T, String>;

const SB_MAGIC: &[u8; 4] = b"XFSB";
const AGF_MAGIC: &[u8; 4] = b"XAGF";
const AGFL_MAGIC: &[u8; 4] = b"XAFL";
const BNO_MAGIC_V4: &[u8; 4] = b"ABTB";
const BNO_MAGIC_V5: &[u8; 4] = b"AB3B";
const CNT_MAGIC_V4: &[u8; 4] = b"ABTC";
const CNT_MAGIC_V5: &[u8; 4] = b"AB3C";
const LOG_MAGIC: u32 = 0xfeed_babe;
const NULL_AGBLOCK: u32 = 0xffff_ffff;
/// Deeper than any real free-space tree (the kernel's old fixed maximum).
const MAX_LEVELS: u32 = 9;
/// Log block (basic block) size: cycle numbers are stamped per 512 bytes.
const BB: u64 = 512;
/// How far around the log head the cycle numbers are verified, in basic blocks: more
/// than the log buffers that can be in flight at once (8 of 256 KiB).
const LOG_WINDOW: u64 = 4096;
const XLOG_UNMOUNT_TRANS: u8 = 0x20;
const XLOG_HEADER_CYCLE_SIZE: u64 = 32 << 10;

/// Incompatible features that leave the allocation groups' free-space trees as read
/// here: ftype, sparse inodes, meta_uuid, bigtime, nrext64, exchange-range, parent.
/// Not needsrepair (0x10), nor metadir, realtime groups or any later one.
const INCOMPAT_KNOWN: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x20 | 0x40 | 0x80;
const INCOMPAT_META_UUID: u32 = 0x4;
const INCOMPAT_NEEDSREPAIR: u32 = 0x10;
/// finobt, rmapbt, reflink, inobtcount.
const RO_COMPAT_KNOWN: u32 = 0xf;

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().unwrap())
}

/// XFS metadata CRC: CRC32C of the block with its checksum field taken as zero, stored
/// little-endian.
pub(crate) fn crc_ok(buf: &[u8], crc_off: usize) -> bool {
    let stored = u32::from_le_bytes(buf[crc_off..crc_off + 4].try_into().unwrap());
    let crc = crc32c::crc32c(&buf[..crc_off]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    let crc = crc32c::crc32c_append(crc, &buf[crc_off + 4..]);
    crc == stored
}

/// The superblock fields the scan needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// 4 or 5 (v5: CRCs and self-describing metadata).
    pub version: u16,
    /// Bytes per filesystem block.
    pub block_size: u32,
    /// Bytes per sector (AG headers are one sector each).
    pub sect_size: u32,
    /// Blocks in the data device.
    pub dblocks: u64,
    /// Blocks per allocation group (the last may be shorter).
    pub agblocks: u32,
    /// Allocation groups.
    pub agcount: u32,
    /// log2 of `agblocks` rounded up: how filesystem block numbers split into AG and block.
    pub agblklog: u8,
    /// Filesystem block where the internal log starts (0: external log).
    pub logstart: u64,
    /// Log length in blocks.
    pub logblocks: u32,
    /// UUID that stamps v5 metadata blocks (`sb_meta_uuid` with meta_uuid, else `sb_uuid`).
    pub meta_uuid: [u8; 16],
    /// `sb_uuid`, which stamps log records.
    pub uuid: [u8; 16],
    /// The root directory's inode number.
    pub root_ino: u64,
    /// Bytes per inode (256..=2048).
    pub inode_size: u16,
    /// log2 of inodes per block.
    pub inopblog: u8,
    /// log2 of filesystem blocks per directory block.
    pub dirblklog: u8,
    /// Directory entries carry a file-type byte (v5 incompat ftype, v4 features2 bit).
    pub ftype: bool,
    /// `sb_fname`, the label (up to 12 bytes, NUL padded).
    pub label: [u8; 12],
    /// Free data blocks.
    pub fdblocks: u64,
}

impl Superblock {
    /// Parse the primary superblock (one sector). `None` without the XFSB magic (not
    /// ours); `Err` names what does not validate or is not known to be safe.
    pub fn parse(b: &[u8]) -> Option<Check<Self>> {
        if b.len() < 512 || &b[0..4] != SB_MAGIC {
            return None;
        }
        Some(Self::parse_xfs(b))
    }

    fn parse_xfs(b: &[u8]) -> Check<Self> {
        let versionnum = be16(b, 0x64);
        let version = versionnum & 0xf;
        if version != 4 && version != 5 {
            return Err(format!("superblock version {version} is not 4 or 5"));
        }
        let block_size = be32(b, 0x04);
        let blocklog = b[0x78];
        if !block_size.is_power_of_two()
            || !(512..=65536).contains(&block_size)
            || 1u32 << blocklog.min(31) != block_size
        {
            return Err(format!(
                "superblock blocksize {block_size} (blocklog {blocklog}) is not a power of two in 512..=65536"
            ));
        }
        let sect_size = u32::from(be16(b, 0x66));
        let sectlog = b[0x79];
        if !sect_size.is_power_of_two()
            || !(512..=32768).contains(&sect_size)
            || 1u32 << sectlog.min(31) != sect_size
            || sect_size > block_size
        {
            return Err(format!("superblock sectsize {sect_size} is invalid"));
        }
        if b.len() < sect_size as usize {
            return Err("superblock sector is short".into());
        }
        if version == 5 && !crc_ok(&b[..sect_size as usize], 0xe0) {
            return Err("superblock fails its CRC32C".into());
        }
        if b[0x7e] != 0 {
            return Err("sb_inprogress is set (mkfs did not finish)".into());
        }
        let dblocks = be64(b, 0x08);
        let agblocks = be32(b, 0x54);
        let agcount = be32(b, 0x58);
        let agblklog = b[0x7c];
        if agblocks < 64 || agcount == 0 {
            return Err(format!(
                "superblock agblocks {agblocks} / agcount {agcount} is too small"
            ));
        }
        let want_log = 32 - (agblocks - 1).leading_zeros();
        if u32::from(agblklog) != want_log {
            return Err(format!(
                "superblock agblklog {agblklog} does not match agblocks {agblocks}"
            ));
        }
        let full = u64::from(agcount) * u64::from(agblocks);
        if dblocks > full || dblocks <= full - u64::from(agblocks) {
            return Err(format!(
                "superblock dblocks {dblocks} disagrees with {agcount} AGs of {agblocks} blocks"
            ));
        }
        if version == 5 {
            let incompat = be32(b, 0xd8);
            if incompat & INCOMPAT_NEEDSREPAIR != 0 {
                return Err("the needsrepair feature is set: run xfs_repair".into());
            }
            if incompat & !INCOMPAT_KNOWN != 0 {
                return Err(format!(
                    "unknown incompatible features {:#x}",
                    incompat & !INCOMPAT_KNOWN
                ));
            }
            let ro = be32(b, 0xd4);
            if ro & !RO_COMPAT_KNOWN != 0 {
                return Err(format!(
                    "unknown read-only compatible features {:#x}",
                    ro & !RO_COMPAT_KNOWN
                ));
            }
            let log_incompat = be32(b, 0xdc);
            if log_incompat != 0 {
                return Err(format!(
                    "log incompatible features {log_incompat:#x} are set: the log holds items to replay"
                ));
            }
        }
        let inode_size = be16(b, 0x68);
        let inopblog = b[0x7b];
        if !inode_size.is_power_of_two()
            || !(256..=2048).contains(&inode_size)
            || u32::from(inode_size) << inopblog.min(16) != block_size
        {
            return Err(format!(
                "superblock inodesize {inode_size} (inopblog {inopblog}) does not fit the block size"
            ));
        }
        let dirblklog = b[0xc0];
        if u32::from(blocklog) + u32::from(dirblklog) > 16 {
            return Err(format!(
                "superblock dirblklog {dirblklog} makes directory blocks over 64 KiB"
            ));
        }
        let uuid: [u8; 16] = b[0x20..0x30].try_into().unwrap();
        let meta_uuid = if version == 5 && be32(b, 0xd8) & INCOMPAT_META_UUID != 0 {
            b[0xf8..0x108].try_into().unwrap()
        } else {
            uuid
        };
        Ok(Superblock {
            version,
            block_size,
            sect_size,
            dblocks,
            agblocks,
            agcount,
            agblklog,
            logstart: be64(b, 0x30),
            logblocks: be32(b, 0x60),
            meta_uuid,
            uuid,
            root_ino: be64(b, 0x38),
            inode_size,
            inopblog,
            dirblklog,
            ftype: if version == 5 {
                be32(b, 0xd8) & 0x1 != 0
            } else {
                be32(b, 0xc8) & 0x200 != 0
            },
            label: b[0x6c..0x78].try_into().unwrap(),
            fdblocks: be64(b, 0x90),
        })
    }

    fn ag_len(&self, agno: u32) -> u32 {
        if agno + 1 == self.agcount {
            (self.dblocks - u64::from(agno) * u64::from(self.agblocks)) as u32
        } else {
            self.agblocks
        }
    }

    pub(crate) fn ag_byte(&self, agno: u32, agbno: u32) -> u64 {
        (u64::from(agno) * u64::from(self.agblocks) + u64::from(agbno)) * u64::from(self.block_size)
    }
}

/// The AGF fields the walk needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Agf {
    length: u32,
    bno_root: u32,
    bno_level: u32,
    cnt_root: u32,
    cnt_level: u32,
    /// Other tree roots (cnt, rmap, refcount), which no free record may cover.
    other_roots: Vec<u32>,
    flfirst: u32,
    fllast: u32,
    flcount: u32,
    freeblks: u32,
    longest: u32,
}

impl Agf {
    fn parse(b: &[u8], sb: &Superblock, agno: u32) -> Check<Self> {
        let what = format!("AGF of AG {agno}");
        if &b[0..4] != AGF_MAGIC {
            return Err(format!("{what} has magic {:02x?}, not XAGF", &b[0..4]));
        }
        if sb.version == 5 {
            if !crc_ok(b, 0xd8) {
                return Err(format!("{what} fails its CRC32C"));
            }
            if b[0x40..0x50] != sb.meta_uuid {
                return Err(format!("{what} carries another filesystem's UUID"));
            }
        }
        if be32(b, 0x04) != 1 || be32(b, 0x08) != agno {
            return Err(format!(
                "{what}: version {} / seqno {} is wrong",
                be32(b, 0x04),
                be32(b, 0x08)
            ));
        }
        let length = be32(b, 0x0c);
        if length != sb.ag_len(agno) {
            return Err(format!(
                "{what}: length {length} is not the AG's {} blocks",
                sb.ag_len(agno)
            ));
        }
        let agf = Agf {
            length,
            bno_root: be32(b, 0x10),
            bno_level: be32(b, 0x1c),
            cnt_root: be32(b, 0x14),
            cnt_level: be32(b, 0x20),
            other_roots: vec![be32(b, 0x14), be32(b, 0x18), be32(b, 0x58)],
            flfirst: be32(b, 0x28),
            fllast: be32(b, 0x2c),
            flcount: be32(b, 0x30),
            freeblks: be32(b, 0x34),
            longest: be32(b, 0x38),
        };
        for (name, root, level) in [
            ("bno", agf.bno_root, agf.bno_level),
            ("cnt", agf.cnt_root, agf.cnt_level),
        ] {
            if root == 0 || root >= length {
                return Err(format!("{what}: {name} root {root} is outside the AG"));
            }
            if level == 0 || level > MAX_LEVELS {
                return Err(format!(
                    "{what}: {name} level {level} is not in 1..={MAX_LEVELS}"
                ));
            }
        }
        if agf.freeblks > length || agf.longest > agf.freeblks {
            return Err(format!(
                "{what}: freeblks {} / longest {} disagree with the length {length}",
                agf.freeblks, agf.longest
            ));
        }
        Ok(agf)
    }
}

/// One allocation group being walked.
struct Ag<'r, 'a> {
    region: &'r Region<'a>,
    sb: &'r Superblock,
    agno: u32,
    agf: Agf,
}

/// The two free-space trees: the same records, by block number and by size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Tree {
    #[default]
    Bno,
    Cnt,
}

/// What one walk of a free-space tree found.
#[derive(Default)]
struct Walk {
    tree: Tree,
    blocks: Vec<u32>,
    free: u64,
    records: u64,
    longest: u32,
    /// By-bno: the end of the last record; by-cnt: the last (count, start).
    last_end: u64,
    last_cnt: Option<(u32, u32)>,
    /// Per level, the block visited last: the next one's left sibling.
    last_at_level: Vec<Option<(u32, u32)>>,
}

impl Ag<'_, '_> {
    fn what(&self, tree: Tree, agbno: u32) -> String {
        let name = if tree == Tree::Bno { "bno" } else { "cnt" };
        format!("{name} tree block {agbno} of AG {}", self.agno)
    }

    fn read_block(&self, agbno: u32) -> Check<Vec<u8>> {
        let bs = u64::from(self.sb.block_size);
        self.region
            .read_vec(self.sb.ag_byte(self.agno, agbno), bs, bs, "xfs btree block")
            .map_err(|e| e.to_string())
    }

    /// Walk the subtree at `agbno` (expected at `level`). Without `emit`, collect the
    /// tree's blocks and check its shape; with it, report each record to the sink after
    /// checking it covers none of the `forbidden` blocks (sorted).
    fn walk(
        &self,
        agbno: u32,
        level: u32,
        seen: &mut HashSet<u32>,
        w: &mut Walk,
        emit: &mut Option<(&[u32], &mut dyn FreeSink)>,
    ) -> Check<()> {
        let what = self.what(w.tree, agbno);
        if agbno == 0 || agbno >= self.agf.length {
            return Err(format!("{what} is outside the AG"));
        }
        if !seen.insert(agbno) {
            return Err(format!("{what} is reached twice (a loop in the tree)"));
        }
        let b = self.read_block(agbno)?;
        let v5 = self.sb.version == 5;
        let (magic, hdr) = match (w.tree, v5) {
            (Tree::Bno, true) => (BNO_MAGIC_V5, 56),
            (Tree::Bno, false) => (BNO_MAGIC_V4, 16),
            (Tree::Cnt, true) => (CNT_MAGIC_V5, 56),
            (Tree::Cnt, false) => (CNT_MAGIC_V4, 16),
        };
        if &b[0..4] != magic {
            return Err(format!(
                "{what} has magic {:02x?}, not {:?}",
                &b[0..4],
                std::str::from_utf8(magic).unwrap()
            ));
        }
        if v5 {
            if !crc_ok(&b, 0x34) {
                return Err(format!("{what} fails its CRC32C"));
            }
            let daddr = self.sb.ag_byte(self.agno, agbno) / BB;
            if be64(&b, 0x10) != daddr
                || be32(&b, 0x30) != self.agno
                || b[0x20..0x30] != self.sb.meta_uuid
            {
                return Err(format!(
                    "{what} names another place, AG or filesystem in its header"
                ));
            }
        }
        let blevel = u32::from(be16(&b, 4));
        let numrecs = be16(&b, 6) as usize;
        if blevel != level {
            return Err(format!("{what} is at level {blevel}, expected {level}"));
        }
        let left = be32(&b, 8);
        let right = be32(&b, 12);
        // Siblings are checked against the walk, never followed.
        let prev = w.last_at_level[level as usize];
        let want_left = prev.map_or(NULL_AGBLOCK, |(p, _)| p);
        if left != want_left || prev.is_some_and(|(_, pr)| pr != agbno) {
            return Err(format!("{what}: sibling pointers disagree with the tree"));
        }
        w.last_at_level[level as usize] = Some((agbno, right));
        let room = (self.sb.block_size as usize - hdr) / if level == 0 { 8 } else { 12 };
        let is_root = agbno == self.root(w.tree).0;
        if numrecs > room || (numrecs == 0 && !(is_root && level == 0)) {
            return Err(format!("{what} holds {numrecs} records (room for {room})"));
        }
        if emit.is_none() {
            w.blocks.push(agbno);
        }
        if level == 0 {
            for i in 0..numrecs {
                let start = be32(&b, hdr + 8 * i);
                let count = be32(&b, hdr + 8 * i + 4);
                let end = u64::from(start) + u64::from(count);
                if count == 0 || start == 0 || end > u64::from(self.agf.length) {
                    return Err(format!(
                        "{what}: free extent {start}+{count} lies outside the AG's {} blocks",
                        self.agf.length
                    ));
                }
                let in_order = match w.tree {
                    Tree::Bno => u64::from(start) >= w.last_end,
                    Tree::Cnt => w.last_cnt < Some((count, start)),
                };
                if !in_order {
                    return Err(format!(
                        "{what}: free extent {start}+{count} is out of order"
                    ));
                }
                w.last_end = end;
                w.last_cnt = Some((count, start));
                w.records += 1;
                w.free += u64::from(count);
                w.longest = w.longest.max(count);
                if let Some((forbidden, sink)) = emit {
                    let k = forbidden.partition_point(|&f| f < start);
                    if k < forbidden.len() && u64::from(forbidden[k]) < end {
                        return Err(format!(
                            "{what}: free extent {start}+{count} covers metadata block {}",
                            forbidden[k]
                        ));
                    }
                    let bs = u64::from(self.sb.block_size);
                    sink.free(self.sb.ag_byte(self.agno, start), u64::from(count) * bs);
                }
            }
        } else {
            let ptrs = hdr + room * 8;
            let mut last_key = (0u32, 0u32);
            for i in 0..numrecs {
                let (k0, k1) = (be32(&b, hdr + 8 * i), be32(&b, hdr + 8 * i + 4));
                // By-bno keys are start blocks; by-cnt keys are (count, start).
                let key = if w.tree == Tree::Bno {
                    (k0, 0)
                } else {
                    (k1, k0)
                };
                if i > 0 && key <= last_key {
                    return Err(format!("{what}: keys are out of order"));
                }
                last_key = key;
                let child = be32(&b, ptrs + 4 * i);
                self.walk(child, level - 1, seen, w, emit)?;
            }
        }
        Ok(())
    }

    fn root(&self, tree: Tree) -> (u32, u32) {
        match tree {
            Tree::Bno => (self.agf.bno_root, self.agf.bno_level),
            Tree::Cnt => (self.agf.cnt_root, self.agf.cnt_level),
        }
    }

    fn walk_tree(&self, tree: Tree, emit: Option<(&[u32], &mut dyn FreeSink)>) -> Check<Walk> {
        let (root, levels) = self.root(tree);
        let mut w = Walk {
            tree,
            last_at_level: vec![None; levels as usize],
            ..Walk::default()
        };
        let mut seen = HashSet::new();
        let mut emit = emit;
        self.walk(root, levels - 1, &mut seen, &mut w, &mut emit)?;
        for (level, last) in w.last_at_level.iter().enumerate() {
            if last.is_some_and(|(_, right)| right != NULL_AGBLOCK) {
                return Err(format!(
                    "{:?} tree of AG {}: the last block of level {level} has a right sibling",
                    tree, self.agno
                ));
            }
        }
        Ok(w)
    }

    /// The AGFL's blocks (free-list blocks held in reserve: not free, not dropped).
    fn agfl(&self) -> Check<Vec<u32>> {
        let ss = u64::from(self.sb.sect_size);
        let at = self.sb.ag_byte(self.agno, 0) + 3 * ss;
        let b = self
            .region
            .read_vec(at, ss, ss, "xfs AGFL")
            .map_err(|e| e.to_string())?;
        let hdr = if self.sb.version == 5 {
            if &b[0..4] != AGFL_MAGIC || !crc_ok(&b, 0x20) {
                return Err(format!(
                    "AGFL of AG {} fails its magic or CRC32C",
                    self.agno
                ));
            }
            36
        } else {
            0
        };
        let size = (b.len() - hdr) as u32 / 4;
        let (first, last, count) = (self.agf.flfirst, self.agf.fllast, self.agf.flcount);
        if count > size || (count > 0 && (first >= size || last >= size)) {
            return Err(format!(
                "AGF of AG {}: free list {first}..{last} ({count}) does not fit the AGFL's {size} slots",
                self.agno
            ));
        }
        let mut v = Vec::new();
        for k in 0..count {
            let slot = ((first + k) % size) as usize;
            v.push(be32(&b, hdr + 4 * slot));
        }
        if count > 0 && (first + count - 1) % size != last {
            return Err(format!(
                "AGF of AG {}: flfirst, fllast and flcount disagree",
                self.agno
            ));
        }
        Ok(v)
    }
}

/// Read one 512-byte log block; its cycle number and whether it is a record header.
fn log_block(region: &Region<'_>, log_at: u64, bb: u64) -> Check<(u32, Vec<u8>)> {
    let b = region
        .read_vec(log_at + bb * BB, BB, BB, "xfs log block")
        .map_err(|e| e.to_string())?;
    let w0 = be32(&b, 0);
    let cycle = if w0 == LOG_MAGIC { be32(&b, 4) } else { w0 };
    Ok((cycle, b))
}

/// Cycle numbers of `n` log blocks from `from`, read at once.
fn cycles(region: &Region<'_>, log_at: u64, from: u64, n: u64) -> Check<Vec<u32>> {
    let b = region
        .read_vec(log_at + from * BB, n * BB, 2 * LOG_WINDOW * BB, "xfs log")
        .map_err(|e| e.to_string())?;
    Ok(b.chunks(BB as usize)
        .map(|c| {
            let w0 = be32(c, 0);
            if w0 == LOG_MAGIC {
                be32(c, 4)
            } else {
                w0
            }
        })
        .collect())
}

/// Prove the internal log clean, as `xlog_find_tail` decides it.
fn check_log(region: &Region<'_>, sb: &Superblock) -> Check<()> {
    if sb.logstart == 0 {
        return Err("the log is on an external device: cannot prove it clean".into());
    }
    let agno = sb.logstart >> sb.agblklog;
    let agbno = sb.logstart & ((1u64 << sb.agblklog) - 1);
    if agno >= u64::from(sb.agcount)
        || agbno + u64::from(sb.logblocks) > u64::from(sb.ag_len(agno as u32))
        || sb.logblocks == 0
    {
        return Err(format!(
            "sb_logstart {} / logblocks {} lie outside an AG",
            sb.logstart, sb.logblocks
        ));
    }
    let log_at = sb.ag_byte(agno as u32, agbno as u32);
    let bbs = u64::from(sb.logblocks) * u64::from(sb.block_size) / BB;
    let cycle = |bb: u64| log_block(region, log_at, bb).map(|c| c.0);
    let first = cycle(0)?;
    let last = cycle(bbs - 1)?;
    // The head: the first block of the older cycle (or the end, if all are one cycle).
    let head = if first == last {
        if first == 0 {
            // A zeroed log (after xfs_repair -L): nothing to replay.
            let from = bbs.saturating_sub(LOG_WINDOW);
            if cycles(region, log_at, from, bbs - from)?
                .iter()
                .any(|&c| c != 0)
            {
                return Err("the log's cycle numbers are out of order".into());
            }
            return Ok(());
        }
        bbs
    } else if last.checked_add(1) == Some(first) {
        let (mut lo, mut hi) = (0u64, bbs - 1);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if cycle(mid)? == first {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    } else {
        return Err(format!(
            "log cycle numbers {first} (start) and {last} (end) are not one apart: not provably clean"
        ));
    };
    // Around the head every block must be of the right cycle: no out-of-order writes.
    let from = head.saturating_sub(LOG_WINDOW);
    let window = cycles(region, log_at, from, (head + LOG_WINDOW).min(bbs) - from)?;
    for (bb, c) in (from..).zip(window) {
        let want = if bb < head { first } else { last };
        if c != want {
            return Err(format!(
                "log block {bb} has cycle {c}, expected {want}: the log tail is torn, not provably clean"
            ));
        }
    }
    // The last record before the head.
    let mut rh = head;
    let hdr = loop {
        if rh == 0 || head - rh >= LOG_WINDOW {
            return Err("no log record header before the log head: not provably clean".into());
        }
        rh -= 1;
        let (_, b) = log_block(region, log_at, rh)?;
        if be32(&b, 0) == LOG_MAGIC {
            break b;
        }
    };
    let h_version = be32(&hdr, 8);
    let h_len = u64::from(be32(&hdr, 0x0c));
    let h_lsn = be64(&hdr, 0x10);
    let h_num_logops = be32(&hdr, 0x28);
    let h_size = u64::from(be32(&hdr, 0x140));
    let hblks = if h_version & 2 != 0 {
        h_size.div_ceil(XLOG_HEADER_CYCLE_SIZE).max(1)
    } else {
        1
    };
    if h_lsn != (u64::from(first) << 32 | rh) || hdr[0x130..0x140] != sb.uuid {
        return Err(format!(
            "log record header at block {rh} has LSN {h_lsn:#x} or a UUID that does not fit"
        ));
    }
    if rh + hblks + h_len.div_ceil(BB) != head || h_num_logops != 1 {
        return Err(
            "the last log record is not an unmount record ending at the head: the log is dirty"
                .into(),
        );
    }
    let (_, op) = log_block(region, log_at, rh + hblks)?;
    if op[9] & XLOG_UNMOUNT_TRANS == 0 {
        return Err("the last log record is not an unmount record: the log is dirty".into());
    }
    Ok(())
}

fn scan_fs(region: &Region<'_>, sb: &Superblock, sink: &mut dyn FreeSink) -> Check<()> {
    let bytes = sb.dblocks.saturating_mul(u64::from(sb.block_size));
    if bytes > region.len() {
        return Err(format!(
            "superblock dblocks {} ({bytes} bytes) is larger than the partition ({} bytes)",
            sb.dblocks,
            region.len()
        ));
    }
    check_log(region, sb)?;
    let log_ag = (sb.logstart >> sb.agblklog) as u32;
    let log_bno = (sb.logstart & ((1u64 << sb.agblklog) - 1)) as u32;
    for agno in 0..sb.agcount {
        let ss = u64::from(sb.sect_size);
        let agf_buf = region
            .read_vec(sb.ag_byte(agno, 0) + ss, ss, ss, "xfs AGF")
            .map_err(|e| e.to_string())?;
        let agf = Agf::parse(&agf_buf, sb, agno)?;
        let ag = Ag {
            region,
            sb,
            agno,
            agf,
        };
        let shape = ag.walk_tree(Tree::Bno, None)?;
        // The by-size tree must index the same extents.
        let by_cnt = ag.walk_tree(Tree::Cnt, None)?;
        if (by_cnt.records, by_cnt.free) != (shape.records, shape.free) {
            return Err(format!(
                "AG {agno}: the by-size tree holds {} extents of {} blocks, the by-block tree {} of {}",
                by_cnt.records, by_cnt.free, shape.records, shape.free
            ));
        }
        if shape.free != u64::from(ag.agf.freeblks) || shape.longest != ag.agf.longest {
            return Err(format!(
                "bno tree of AG {agno} holds {} free blocks (longest {}), its AGF says {} (longest {})",
                shape.free, shape.longest, ag.agf.freeblks, ag.agf.longest
            ));
        }
        // What no free record may cover: the AG headers (sb, AGF, AGI, AGFL sectors),
        // the tree's own blocks, the other roots, the free list, the log.
        let mut forbidden = shape.blocks;
        let headers = (4 * ss).div_ceil(u64::from(sb.block_size)) as u32;
        forbidden.extend(0..headers);
        forbidden.extend(by_cnt.blocks);
        forbidden.extend(ag.agf.other_roots.iter().copied().filter(|&r| r != 0));
        forbidden.extend(ag.agfl()?);
        if agno == log_ag {
            forbidden.extend(log_bno..log_bno + sb.logblocks);
        }
        forbidden.sort_unstable();
        ag.walk_tree(Tree::Bno, Some((&forbidden, sink)))?;
    }
    Ok(())
}

/// Report the free blocks of an XFS filesystem at the start of `region`: the records of
/// every AG's by-block-number free-space tree, once everything validates and the log is
/// proved clean.
pub fn scan(region: &Region<'_>, sink: &mut dyn FreeSink) -> Result<Outcome> {
    if region.len() < 512 {
        return Ok(Outcome::NotMine);
    }
    let mut head = [0u8; 512];
    region.read_at(&mut head, 0, "xfs superblock")?;
    if &head[0..4] != SB_MAGIC {
        return Ok(Outcome::NotMine);
    }
    let fs = "xfs".to_string();
    let ss = u64::from(be16(&head, 0x66)).clamp(512, 32768);
    let sector = match region.read_vec(0, ss, 32768, "xfs superblock") {
        Ok(s) => s,
        Err(e) => {
            return Ok(Outcome::Skipped {
                fs,
                reason: e.to_string(),
            })
        }
    };
    let sb = match Superblock::parse(&sector) {
        None => return Ok(Outcome::NotMine),
        Some(Err(reason)) => return Ok(Outcome::Skipped { fs, reason }),
        Some(Ok(sb)) => sb,
    };
    Ok(match scan_fs(region, &sb, sink) {
        Ok(()) => Outcome::Scanned { fs },
        Err(reason) => Outcome::Skipped { fs, reason },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb_bytes() -> Vec<u8> {
        let mut b = vec![0u8; 512];
        b[0..4].copy_from_slice(SB_MAGIC);
        b[4..8].copy_from_slice(&4096u32.to_be_bytes());
        b[8..16].copy_from_slice(&76800u64.to_be_bytes());
        b[0x54..0x58].copy_from_slice(&19200u32.to_be_bytes());
        b[0x58..0x5c].copy_from_slice(&4u32.to_be_bytes());
        b[0x64..0x66].copy_from_slice(&0xb4b5u16.to_be_bytes());
        b[0x66..0x68].copy_from_slice(&512u16.to_be_bytes());
        b[0x68..0x6a].copy_from_slice(&512u16.to_be_bytes());
        b[0x78] = 12;
        b[0x79] = 9;
        b[0x7b] = 3;
        b[0x7c] = 15;
        seal(&mut b);
        b
    }

    fn seal(b: &mut [u8]) {
        b[0xe0..0xe4].fill(0);
        let crc = crc32c::crc32c(b);
        b[0xe0..0xe4].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn superblock_is_validated() {
        let b = sb_bytes();
        let sb = Superblock::parse(&b).unwrap().unwrap();
        assert_eq!((sb.block_size, sb.agcount, sb.ag_len(3)), (4096, 4, 19200));
        let mut bad = b.clone();
        bad[0x100] ^= 1;
        assert!(Superblock::parse(&bad)
            .unwrap()
            .unwrap_err()
            .contains("CRC32C"));
        for (off, val, why) in [
            (0xd8, 0x10u32, "needsrepair"),
            (0xd8, 0x100, "unknown incompatible"),
            (0xdc, 1, "log incompatible"),
        ] {
            let mut f = b.clone();
            f[off..off + 4].copy_from_slice(&val.to_be_bytes());
            seal(&mut f);
            let e = Superblock::parse(&f).unwrap().unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        let mut f = b.clone();
        f[0x7e] = 1;
        seal(&mut f);
        assert!(Superblock::parse(&f)
            .unwrap()
            .unwrap_err()
            .contains("inprogress"));
        let mut f = b.clone();
        f[8..16].copy_from_slice(&(76800u64 + 19200).to_be_bytes());
        seal(&mut f);
        assert!(Superblock::parse(&f)
            .unwrap()
            .unwrap_err()
            .contains("dblocks"));
        let mut f = b;
        f[0] = b'Y';
        assert!(Superblock::parse(&f).is_none());
    }
}
