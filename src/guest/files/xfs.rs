//! XFS v4 and v5 read-only, our own reader (no crate reads XFS): the superblock is the
//! one the sparsifier validates ([`crate::guest::xfs::Superblock`]); inodes (v1/v2 cores,
//! v3 cores with their CRC32C and self number), data forks in local, extent-list and
//! B-tree format (v4 "BMAP" and v5 "BMA3" blocks, CRC, owner and self address checked);
//! short-form, block, leaf and node directories (every data block of the directory's
//! data range is read, which is the same walk for all three block formats; the leaf and
//! free-index blocks only speed up lookups, which here scan the entries); local and
//! remote symlinks (v5 "XSLM" headers checked).
//!
//! Every block address is checked against the filesystem and the volume, every count
//! against the bytes that hold it; extent lists, directory sizes, B-tree depth and
//! symlink chains are capped. Unwritten extents and holes read as zeros. The log is not
//! replayed: a filesystem not cleanly unmounted shows its state as of its last
//! checkpoint.

use std::io::Write;

use super::{check_path, Entry, FileKind, FileSystem, Limited, Meta, Volume, MAX_DIR_ENTRIES};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::guest::xfs::{be16, be32, be64, crc_ok, Superblock};

/// The most extents one file may map (16 bytes each in memory).
const MAX_EXTENTS: usize = 1 << 20;
/// Deeper than any real block-map B-tree.
const MAX_BTREE_LEVELS: u16 = 10;
/// Directory data blocks live below this byte offset (XFS_DIR2_LEAF_OFFSET).
const DIR_DATA_END: u64 = 32 << 30;
/// The most directory bytes read (leaf and node directories of a million entries fit).
const MAX_DIR_BYTES: u64 = 256 << 20;
/// Symlinks followed while resolving one path (Linux's MAXSYMLINKS).
const MAX_SYMLINKS: u32 = 40;
/// Path components walked while resolving one path, symlink targets included.
const MAX_COMPONENTS: usize = 4096;
const FMT_LOCAL: u8 = 1;
const FMT_EXTENTS: u8 = 2;
const FMT_BTREE: u8 = 3;
const DIFLAG2_BIGTIME: u64 = 0x8;
const DIFLAG2_NREXT64: u64 = 0x10;

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::corrupt(format!("XFS {what}"))
}

/// One mapping of file blocks to filesystem blocks.
#[derive(Debug, Clone, Copy)]
struct Extent {
    /// First file block.
    off: u64,
    /// First filesystem block (AG-encoded).
    fsb: u64,
    len: u64,
    unwritten: bool,
}

/// An inode, validated, with its data fork bytes.
#[derive(Debug, Clone)]
struct Inode {
    ino: u64,
    mode: u16,
    format: u8,
    uid: u32,
    gid: u32,
    mtime: i64,
    size: u64,
    nextents: u64,
    fork: Vec<u8>,
}

impl Inode {
    fn kind(&self) -> Result<FileKind> {
        Ok(match self.mode & 0o170000 {
            0o100000 => FileKind::File,
            0o040000 => FileKind::Dir,
            0o120000 => FileKind::Symlink,
            0o020000 => FileKind::CharDevice,
            0o060000 => FileKind::BlockDevice,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            m => return Err(corrupt(format!("inode {}: di_mode type {m:#o}", self.ino))),
        })
    }

    fn meta(&self) -> Result<Meta> {
        let kind = self.kind()?;
        Ok(Meta {
            kind,
            size: self.size,
            mode: u32::from(self.mode & 0o7777),
            uid: self.uid,
            gid: self.gid,
            mtime: self.mtime,
        })
    }
}

/// An XFS filesystem opened read-only.
pub struct XfsFs {
    vol: Volume,
    sb: Superblock,
}

/// Open `vol` as XFS: `Ok(None)` without the XFSB magic.
pub fn open(vol: &Volume) -> Result<Option<XfsFs>> {
    if vol.virtual_size() < 4096 {
        return Ok(None);
    }
    let mut b = vec![0u8; 4096];
    vol.read_at(&mut b, 0)?;
    let sb = match Superblock::parse(&b) {
        None => return Ok(None),
        Some(r) => r.map_err(|m| corrupt(format!("superblock: {m}")))?,
    };
    let bytes = sb.dblocks.checked_mul(u64::from(sb.block_size));
    if bytes.is_none_or(|n| n > vol.virtual_size()) {
        return Err(corrupt(format!(
            "superblock claims {} blocks of {} bytes, more than the {}-byte volume",
            sb.dblocks,
            sb.block_size,
            vol.virtual_size()
        ))
        .with_field("sb_dblocks"));
    }
    Ok(Some(XfsFs {
        vol: vol.clone(),
        sb,
    }))
}

/// Seconds since 1970 of an inode timestamp.
fn timestamp(raw: u64, bigtime: bool) -> i64 {
    if bigtime {
        // Nanoseconds since the old 32-bit minimum, 1901-12-13.
        (raw / 1_000_000_000) as i64 - (1i64 << 31)
    } else {
        i64::from((raw >> 32) as u32 as i32)
    }
}

impl XfsFs {
    fn bs(&self) -> u64 {
        u64::from(self.sb.block_size)
    }

    /// Byte offset of filesystem block `fsb` (AG number in the high bits), checked to lie
    /// with `count` blocks inside an AG and the filesystem.
    fn fsb_byte(&self, fsb: u64, count: u64, what: &dyn Fn() -> String) -> Result<u64> {
        let agno = fsb >> self.sb.agblklog;
        let agbno = fsb & ((1u64 << self.sb.agblklog) - 1);
        let bad = agno >= u64::from(self.sb.agcount)
            || agbno
                .checked_add(count)
                .is_none_or(|e| e > u64::from(self.sb.agblocks))
            || agno * u64::from(self.sb.agblocks) + agbno + count > self.sb.dblocks;
        if bad {
            return Err(corrupt(format!(
                "{}: {count} blocks at block {fsb:#x} (AG {agno}, block {agbno}) lie outside \
                 the filesystem",
                what()
            )));
        }
        Ok(self.sb.ag_byte(agno as u32, agbno as u32))
    }

    fn read_fsb(&self, fsb: u64, count: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>> {
        let at = self.fsb_byte(fsb, count, what)?;
        let mut b = vec![0u8; (count * self.bs()) as usize];
        self.vol.read_at(&mut b, at)?;
        Ok(b)
    }

    /// Read and validate inode `ino`.
    fn inode(&self, ino: u64) -> Result<Inode> {
        let sb = &self.sb;
        let ino_log = u32::from(sb.agblklog) + u32::from(sb.inopblog);
        let agno = ino >> ino_log;
        let agino = ino & ((1u64 << ino_log) - 1);
        let agbno = agino >> sb.inopblog;
        let idx = agino & ((1u64 << sb.inopblog) - 1);
        let what = || format!("inode {ino}");
        if ino == 0 || agno >= u64::from(sb.agcount) {
            return Err(corrupt(format!(
                "inode number {ino} is outside the filesystem"
            )));
        }
        let at = self.fsb_byte((agno << sb.agblklog) | agbno, 1, &what)?;
        let isz = usize::from(sb.inode_size);
        let mut b = vec![0u8; isz];
        self.vol.read_at(&mut b, at + idx * isz as u64)?;
        if &b[0..2] != b"IN" {
            return Err(corrupt(format!("inode {ino}: di_magic is not IN")).at(at));
        }
        let version = b[4];
        let core = match (version, sb.version) {
            (1 | 2, 4) => 100,
            (3, 5) => {
                if !crc_ok(&b, 0x64) {
                    return Err(corrupt(format!("inode {ino} fails its CRC32C")).at(at));
                }
                if be64(&b, 0x98) != ino || b[0xa0..0xb0] != sb.meta_uuid {
                    return Err(corrupt(format!(
                        "inode {ino}: di_ino or di_uuid is not its own"
                    )));
                }
                176
            }
            (v, s) => {
                return Err(corrupt(format!(
                    "inode {ino}: di_version {v} on a v{s} filesystem"
                )))
            }
        };
        let flags2 = if version == 3 { be64(&b, 0x78) } else { 0 };
        let forkoff = usize::from(b[0x52]) * 8;
        let fork_end = if forkoff == 0 { isz } else { core + forkoff };
        if fork_end > isz {
            return Err(corrupt(format!(
                "inode {ino}: di_forkoff {forkoff} is past the inode"
            )));
        }
        let nextents = if flags2 & DIFLAG2_NREXT64 != 0 {
            be64(&b, 0x18)
        } else {
            u64::from(be32(&b, 0x4c))
        };
        let uid = be32(&b, 0x08);
        let gid = be32(&b, 0x0c);
        Ok(Inode {
            ino,
            mode: be16(&b, 0x02),
            format: b[5],
            uid,
            gid,
            mtime: timestamp(be64(&b, 0x28), flags2 & DIFLAG2_BIGTIME != 0),
            size: be64(&b, 0x38),
            nextents,
            fork: b[core..fork_end].to_vec(),
        })
    }

    fn parse_extent(rec: &[u8]) -> Extent {
        let l0 = be64(rec, 0);
        let l1 = be64(rec, 8);
        Extent {
            unwritten: l0 >> 63 != 0,
            off: (l0 & ((1 << 63) - 1)) >> 9,
            fsb: ((l0 & 0x1ff) << 43) | (l1 >> 21),
            len: l1 & ((1 << 21) - 1),
        }
    }

    /// The extents of `ino`'s data fork, in file order, each checked.
    fn extents(&self, ino: &Inode) -> Result<Vec<Extent>> {
        let mut out = Vec::new();
        match ino.format {
            FMT_EXTENTS => {
                let n = ino.nextents;
                if n > (ino.fork.len() / 16) as u64 {
                    return Err(corrupt(format!(
                        "inode {}: di_nextents {n} do not fit its data fork",
                        ino.ino
                    ))
                    .with_field("di_nextents"));
                }
                for rec in ino.fork.chunks_exact(16).take(n as usize) {
                    out.push(Self::parse_extent(rec));
                }
            }
            FMT_BTREE => self.btree_root(ino, &mut out)?,
            f => {
                return Err(Error::unsupported(format!(
                    "XFS inode {}: data fork format {f} is not a block map",
                    ino.ino
                )))
            }
        }
        let mut next = 0u64;
        for e in &out {
            if e.off < next || e.len == 0 {
                return Err(corrupt(format!(
                    "inode {}: extents overlap or are out of order at file block {}",
                    ino.ino, e.off
                )));
            }
            self.fsb_byte(e.fsb, e.len, &|| format!("inode {} extent", ino.ino))?;
            next = e.off + e.len;
        }
        Ok(out)
    }

    /// Walk a B-tree data fork from its root in the inode.
    fn btree_root(&self, ino: &Inode, out: &mut Vec<Extent>) -> Result<()> {
        let f = &ino.fork;
        if f.len() < 4 {
            return Err(corrupt(format!("inode {}: B-tree root is short", ino.ino)));
        }
        let level = be16(f, 0);
        let n = usize::from(be16(f, 2));
        let maxrecs = (f.len() - 4) / 16;
        if level == 0 || level > MAX_BTREE_LEVELS || n > maxrecs {
            return Err(corrupt(format!(
                "inode {}: B-tree root level {level} with {n} records (at most {maxrecs})",
                ino.ino
            )));
        }
        let ptrs = 4 + maxrecs * 8;
        let mut budget = MAX_EXTENTS;
        for i in 0..n {
            self.btree_block(ino.ino, be64(f, ptrs + i * 8), level - 1, out, &mut budget)?;
        }
        Ok(())
    }

    /// One block of a block-map B-tree; `budget` caps the blocks read in all, so a
    /// tree whose pointers repeat cannot make the walk exponential.
    fn btree_block(
        &self,
        ino: u64,
        fsb: u64,
        level: u16,
        out: &mut Vec<Extent>,
        budget: &mut usize,
    ) -> Result<()> {
        let what = || format!("inode {ino} block-map B-tree block {fsb:#x}");
        if *budget == 0 {
            return Err(Error::limit(format!(
                "{}: B-tree has too many blocks",
                what()
            )));
        }
        *budget -= 1;
        let b = self.read_fsb(fsb, 1, &what)?;
        let (magic, hdr): (&[u8], usize) = if self.sb.version == 5 {
            (b"BMA3", 72)
        } else {
            (b"BMAP", 24)
        };
        if &b[0..4] != magic || be16(&b, 4) != level {
            return Err(corrupt(format!("{}: bad magic or level", what())));
        }
        if self.sb.version == 5
            && (!crc_ok(&b, 0x40)
                || be64(&b, 0x18) != self.fsb_byte(fsb, 1, &what)? / 512
                || be64(&b, 0x38) != ino
                || b[0x28..0x38] != self.sb.meta_uuid)
        {
            return Err(corrupt(format!(
                "{}: fails its CRC32C, or its self address, owner or UUID is wrong",
                what()
            )));
        }
        let n = usize::from(be16(&b, 6));
        let maxrecs = (b.len() - hdr) / 16;
        if n > maxrecs {
            return Err(corrupt(format!(
                "{}: {n} records, at most {maxrecs}",
                what()
            )));
        }
        if level == 0 {
            if out.len() + n > MAX_EXTENTS {
                return Err(Error::limit(format!(
                    "XFS inode {ino} has more than {MAX_EXTENTS} extents"
                )));
            }
            for i in 0..n {
                out.push(Self::parse_extent(&b[hdr + i * 16..]));
            }
            return Ok(());
        }
        let ptrs = hdr + maxrecs * 8;
        for i in 0..n {
            self.btree_block(ino, be64(&b, ptrs + i * 8), level - 1, out, budget)?;
        }
        Ok(())
    }

    /// Stream bytes `[0, len)` of the file mapped by `ext`, holes and unwritten extents
    /// as zeros, in pieces of at most 1 MiB.
    fn stream(
        &self,
        ext: &[Extent],
        len: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let bs = self.bs();
        let zeros = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        let zero_to = |pos: &mut u64, to: u64, out: &mut dyn FnMut(&[u8]) -> Result<()>| {
            while *pos < to {
                let n = (to - *pos).min(zeros.len() as u64);
                out(&zeros[..n as usize])?;
                *pos += n;
            }
            Ok::<(), Error>(())
        };
        for e in ext {
            let start = e.off.saturating_mul(bs);
            if start >= len {
                break;
            }
            zero_to(&mut pos, start, out)?;
            let end = e.off.saturating_add(e.len).saturating_mul(bs).min(len);
            if e.unwritten {
                zero_to(&mut pos, end, out)?;
                continue;
            }
            let base = self.fsb_byte(e.fsb, e.len, &|| "extent".into())?;
            let mut buf = vec![0u8; (1 << 20).min(end - pos) as usize];
            while pos < end {
                let n = (end - pos).min(buf.len() as u64) as usize;
                self.vol.read_at(&mut buf[..n], base + (pos - start))?;
                out(&buf[..n])?;
                pos += n as u64;
            }
        }
        zero_to(&mut pos, len, out)
    }

    /// The entries (name, inode) of directory `d`, `.` and `..` left out.
    fn dir_entries(&self, d: &Inode) -> Result<Vec<(Vec<u8>, u64)>> {
        if d.format == FMT_LOCAL {
            return self.shortform(d);
        }
        let ext = self.extents(d)?;
        let dbs = self.bs() << self.sb.dirblklog;
        let data_len = d.size.min(DIR_DATA_END);
        if data_len > MAX_DIR_BYTES {
            return Err(Error::limit(format!(
                "XFS directory inode {} holds {data_len} bytes, over {MAX_DIR_BYTES}",
                d.ino
            )));
        }
        let mut out = Vec::new();
        let mut block = Vec::with_capacity(dbs as usize);
        let mut at = 0u64;
        // Directory blocks are addressed by file offset; the data range may have holes
        // where blocks were freed, so each mapped directory block is parsed alone.
        let mapped: Vec<Extent> = ext
            .into_iter()
            .filter(|e| !e.unwritten && e.off.saturating_mul(self.bs()) < data_len)
            .collect();
        for e in &mapped {
            let base = self.fsb_byte(e.fsb, e.len, &|| "directory extent".into())?;
            for i in 0..e.len {
                let off = (e.off + i) * self.bs();
                if off >= data_len {
                    break;
                }
                if block.is_empty() {
                    if !off.is_multiple_of(dbs) {
                        return Err(corrupt(format!(
                            "directory inode {}: block at offset {off} is not at a directory \
                             block boundary",
                            d.ino
                        )));
                    }
                    at = off;
                } else if off != at + block.len() as u64 {
                    return Err(corrupt(format!(
                        "directory inode {}: directory block at offset {at} has a hole",
                        d.ino
                    )));
                }
                let mut b = vec![0u8; self.bs() as usize];
                self.vol.read_at(&mut b, base + i * self.bs())?;
                block.extend_from_slice(&b);
                if block.len() as u64 == dbs {
                    self.data_block(d.ino, &block, at, &mut out)?;
                    block.clear();
                }
            }
        }
        if !block.is_empty() {
            return Err(corrupt(format!(
                "directory inode {}: directory block at offset {at} is only partly mapped",
                d.ino
            )));
        }
        Ok(out)
    }

    /// The entries of one directory data block ("XD2B"/"XDB3" block form with its leaf
    /// at the end, or "XD2D"/"XDD3").
    fn data_block(
        &self,
        ino: u64,
        b: &[u8],
        off: u64,
        out: &mut Vec<(Vec<u8>, u64)>,
    ) -> Result<()> {
        let v5 = self.sb.version == 5;
        let what = || format!("directory inode {ino} block at offset {off}");
        let (block_form, hdr) = match (&b[0..4], v5) {
            (b"XD2B", false) => (true, 16),
            (b"XD2D", false) => (false, 16),
            (b"XDB3", true) => (true, 64),
            (b"XDD3", true) => (false, 64),
            _ => return Err(corrupt(format!("{}: bad magic {:02x?}", what(), &b[0..4]))),
        };
        if v5 && (!crc_ok(b, 4) || be64(b, 0x28) != ino || b[0x18..0x28] != self.sb.meta_uuid) {
            return Err(corrupt(format!(
                "{}: fails its CRC32C, or its owner or UUID is wrong",
                what()
            )));
        }
        let mut end = b.len();
        if block_form {
            let count = be32(b, b.len() - 8) as usize;
            let leaf = count.checked_mul(8).and_then(|l| l.checked_add(8));
            match leaf {
                Some(l) if l <= b.len() - hdr => end = b.len() - l,
                _ => return Err(corrupt(format!("{}: leaf count {count} too large", what()))),
            }
        }
        let ft = usize::from(self.sb.ftype);
        let mut p = hdr;
        while p < end {
            if end - p < 8 {
                return Err(corrupt(format!("{}: entry at {p} is cut short", what())));
            }
            if be16(b, p) == 0xffff {
                let len = usize::from(be16(b, p + 2));
                if len < 8 || !len.is_multiple_of(8) || len > end - p {
                    return Err(corrupt(format!(
                        "{}: free space length {len} at {p}",
                        what()
                    )));
                }
                p += len;
                continue;
            }
            let namelen = usize::from(b[p + 8]);
            let size = (8 + 1 + namelen + ft + 2).div_ceil(8) * 8;
            if namelen == 0 || size > end - p {
                return Err(corrupt(format!(
                    "{}: entry at {p} (namelen {namelen})",
                    what()
                )));
            }
            let name = &b[p + 9..p + 9 + namelen];
            if name != b"." && name != b".." {
                out.push((name.to_vec(), be64(b, p)));
                if out.len() > MAX_DIR_ENTRIES {
                    return Err(Error::limit(format!(
                        "XFS directory inode {ino} has more than {MAX_DIR_ENTRIES} entries"
                    )));
                }
            }
            p += size;
        }
        Ok(())
    }

    /// The entries of a short-form directory (in the inode).
    fn shortform(&self, d: &Inode) -> Result<Vec<(Vec<u8>, u64)>> {
        let f = &d.fork;
        let what = || format!("short-form directory inode {}", d.ino);
        if f.len() < 6 {
            return Err(corrupt(format!("{}: header is cut short", what())));
        }
        let count = usize::from(f[0]);
        let wide = f[1] != 0;
        let isz: usize = if wide { 8 } else { 4 };
        let size = (d.size as usize).min(f.len());
        let ft = usize::from(self.sb.ftype);
        let mut p = 2 + isz;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let namelen = p
                .checked_add(3)
                .filter(|&q| q <= size)
                .map(|_| usize::from(f[p]));
            let Some(namelen) = namelen.filter(|&n| n > 0 && p + 3 + n + ft + isz <= size) else {
                return Err(corrupt(format!(
                    "{}: entry at {p} runs past di_size",
                    what()
                )));
            };
            let name = f[p + 3..p + 3 + namelen].to_vec();
            let q = p + 3 + namelen + ft;
            let ino = if wide {
                be64(f, q)
            } else {
                u64::from(be32(f, q))
            };
            out.push((name, ino));
            p = q + isz;
        }
        Ok(out)
    }

    /// The target of symlink inode `l`.
    fn link_target(&self, l: &Inode) -> Result<Vec<u8>> {
        if l.size == 0 || l.size > 1024 {
            return Err(corrupt(format!(
                "symlink inode {}: di_size {} is not in 1..=1024",
                l.ino, l.size
            )));
        }
        let n = l.size as usize;
        if l.format == FMT_LOCAL {
            return l
                .fork
                .get(..n)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| corrupt(format!("symlink inode {}: target past its fork", l.ino)));
        }
        let ext = self.extents(l)?;
        let mut out = Vec::with_capacity(n);
        for e in &ext {
            let b = self.read_fsb(e.fsb, e.len, &|| format!("symlink inode {}", l.ino))?;
            for blk in b.chunks(self.bs() as usize) {
                let data = if self.sb.version == 5 {
                    if &blk[0..4] != b"XSLM" || !crc_ok(blk, 12) || be64(blk, 0x20) != l.ino {
                        return Err(corrupt(format!(
                            "symlink inode {}: remote block header (XSLM, CRC, owner) is bad",
                            l.ino
                        )));
                    }
                    let bytes = be32(blk, 8) as usize;
                    blk.get(56..56 + bytes).ok_or_else(|| {
                        corrupt(format!("symlink inode {}: sl_bytes {bytes}", l.ino))
                    })?
                } else {
                    blk
                };
                out.extend_from_slice(data);
            }
        }
        out.truncate(n);
        if out.len() != n {
            return Err(corrupt(format!(
                "symlink inode {}: target is cut short",
                l.ino
            )));
        }
        Ok(out)
    }

    /// Resolve `path` to an inode; symlinks followed inside the filesystem (the last
    /// one only when `follow`), `..` never above the root. `None` when a component is
    /// missing.
    fn resolve(&self, path: &str, follow: bool) -> Result<Option<Inode>> {
        check_path(path)?;
        let mut todo: Vec<Vec<u8>> = split(path.as_bytes());
        let mut stack = vec![self.inode(self.sb.root_ino)?];
        let mut links = 0u32;
        let mut walked = 0usize;
        while let Some(comp) = todo.pop() {
            walked += 1;
            if walked > MAX_COMPONENTS {
                return Err(Error::limit(format!(
                    "{path}: over {MAX_COMPONENTS} components"
                )));
            }
            if comp == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let cur = stack.last().expect("root stays");
            if cur.kind()? != FileKind::Dir {
                return Ok(None);
            }
            let Some((_, ino)) = self.dir_entries(cur)?.into_iter().find(|(n, _)| *n == comp)
            else {
                return Ok(None);
            };
            let node = self.inode(ino)?;
            if node.kind()? == FileKind::Symlink && (follow || !todo.is_empty()) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::limit(format!(
                        "{path}: more than {MAX_SYMLINKS} symlinks"
                    )));
                }
                let target = self.link_target(&node)?;
                if target.first() == Some(&b'/') {
                    stack.truncate(1);
                }
                todo.extend(split(&target));
                continue;
            }
            stack.push(node);
        }
        Ok(stack.pop())
    }

    fn need(&self, path: &str, follow: bool) -> Result<Inode> {
        self.resolve(path, follow)?
            .ok_or_else(|| Error::arg(format!("{path}: no such file or directory")))
    }

    fn read_data(
        &self,
        path: &str,
        max: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let f = self.need(path, true)?;
        if f.kind()? != FileKind::File {
            return Err(Error::arg(format!("{path}: not a regular file")));
        }
        if f.format == FMT_LOCAL {
            let n = (f.size as usize).min(max as usize);
            let data = f
                .fork
                .get(..n)
                .ok_or_else(|| corrupt(format!("inode {}: local data past its fork", f.ino)))?;
            return out(data);
        }
        let ext = self.extents(&f)?;
        self.stream(&ext, f.size.min(max), out)
    }
}

/// Components of `path` in reverse (so the next is popped), `.` and empty ones dropped.
fn split(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&c| c == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .rev()
        .map(<[u8]>::to_vec)
        .collect()
}

fn blkid_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl FileSystem for XfsFs {
    fn fs_type(&self) -> &str {
        "xfs"
    }
    fn label(&self) -> Option<String> {
        let l = &self.sb.label;
        let n = l.iter().position(|&c| c == 0).unwrap_or(l.len());
        Some(String::from_utf8_lossy(&l[..n]).into_owned()).filter(|s| !s.is_empty())
    }
    fn uuid(&self) -> Option<String> {
        Some(blkid_uuid(&self.sb.uuid))
    }
    fn usage(&self) -> Option<(u64, u64)> {
        let size = self.sb.dblocks * self.bs();
        let free = self.sb.fdblocks.min(self.sb.dblocks) * self.bs();
        Some((size, size - free))
    }
    fn metadata(&self, path: &str) -> Result<Meta> {
        self.need(path, true)?.meta()
    }
    fn symlink_metadata(&self, path: &str) -> Result<Meta> {
        self.need(path, false)?.meta()
    }
    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        let d = self.need(path, true)?;
        if d.kind()? != FileKind::Dir {
            return Err(Error::arg(format!("{path}: not a directory")));
        }
        let mut out = Vec::new();
        for (name, ino) in self.dir_entries(&d)? {
            let text = String::from_utf8_lossy(&name).into_owned();
            out.push(Entry {
                lossy: std::str::from_utf8(&name).is_err(),
                meta: self.inode(ino)?.meta()?,
                name: text,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
    fn read_link(&self, path: &str) -> Result<String> {
        let l = self.need(path, false)?;
        if l.kind()? != FileKind::Symlink {
            return Err(Error::arg(format!("{path}: not a symlink")));
        }
        Ok(String::from_utf8_lossy(&self.link_target(&l)?).into_owned())
    }
    fn read_prefix(&self, path: &str, n: usize) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_data(path, n as u64, &mut |x| {
            v.extend_from_slice(x);
            Ok(())
        })?;
        Ok(v)
    }
    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.resolve(path, true)?.is_some())
    }
    fn copy_to(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64> {
        let mut sink = Limited {
            out,
            limit,
            written: 0,
            what: path,
        };
        self.read_data(path, u64::MAX, &mut |x| sink.put(x))?;
        Ok(sink.written)
    }
}
