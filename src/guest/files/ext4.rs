//! ext2/3/4, read through the `ext4-view` crate: it validates the superblock, group
//! descriptors, extent trees and directory blocks (checksums where the filesystem has
//! them), replays the journal in memory, resolves symlinks inside the filesystem with a
//! cap on their number and on path length, and reads extents, indirect blocks, hash-tree
//! and linear directories and inline data. What it lacks, and this file adds: a check
//! that the filesystem the superblock claims fits in the volume (so its group table is
//! bounded by the volume, not by a claimed block count), the used-space counters, and the
//! mapping to [`FileSystem`].

use std::io::Write;

use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType, Metadata};

use super::{check_path, Entry, FileKind, FileSystem, Limited, Meta, Volume, MAX_DIR_ENTRIES};
use crate::device::BlockDevice;
use crate::error::{Error, Result};

const MAGIC: u16 = 0xEF53;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const COMPAT_HAS_JOURNAL: u32 = 0x4;

/// The superblock counters `ext4-view` does not expose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// "ext2", "ext3" (a journal) or "ext4" (extents, flex_bg or 64bit).
    pub name: &'static str,
    /// Bytes per block.
    pub block_size: u64,
    /// Blocks in the filesystem.
    pub blocks: u64,
    /// Free blocks (including the reserved ones).
    pub free: u64,
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

/// Parse the counters from the 1024-byte superblock. `None` without the magic; an error
/// when the claimed size is absurd or larger than the `vol_len` bytes it lives in.
pub fn counters(sb: &[u8], vol_len: u64) -> Option<Result<Counters>> {
    if sb.len() < 1024 || u16::from_le_bytes([sb[0x38], sb[0x39]]) != MAGIC {
        return None;
    }
    let log = le32(sb, 0x18);
    if log > 6 {
        return Some(Err(Error::corrupt(format!(
            "ext superblock s_log_block_size {log} is over 6 (64 KiB blocks)"
        ))
        .with_field("s_log_block_size")));
    }
    let block_size = 1024u64 << log;
    let incompat = le32(sb, 0x60);
    let wide = incompat & INCOMPAT_64BIT != 0;
    let hi = |o: usize| {
        if wide {
            u64::from(le32(sb, o)) << 32
        } else {
            0
        }
    };
    let blocks = u64::from(le32(sb, 0x04)) | hi(0x150);
    let free = u64::from(le32(sb, 0x0C)) | hi(0x158);
    let bytes = blocks.checked_mul(block_size);
    if bytes.is_none_or(|b| b > vol_len) || free > blocks {
        return Some(Err(Error::corrupt(format!(
            "ext superblock claims {blocks} blocks of {block_size} bytes ({free} free), more \
             than the {vol_len}-byte volume holds"
        ))
        .with_field("s_blocks_count")));
    }
    let name = if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) != 0 {
        "ext4"
    } else if le32(sb, 0x5C) & COMPAT_HAS_JOURNAL != 0 {
        "ext3"
    } else {
        "ext2"
    };
    Some(Ok(Counters {
        name,
        block_size,
        blocks,
        free,
    }))
}

/// The volume as `ext4-view`'s reader.
struct Reader(Volume);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_at(dst, start).map_err(|e| Box::new(e) as _)
    }
}

/// An ext2/3/4 filesystem opened read-only.
pub struct ExtFs {
    fs: Ext4,
    counters: Counters,
}

/// Open `vol` as ext2/3/4: `Ok(None)` without the magic.
pub fn open(vol: &Volume) -> Result<Option<ExtFs>> {
    if vol.virtual_size() < 2048 {
        return Ok(None);
    }
    let mut sb = vec![0u8; 1024];
    vol.read_at(&mut sb, 1024)?;
    let counters = match counters(&sb, vol.virtual_size()) {
        None => return Ok(None),
        Some(c) => c?,
    };
    let fs = Ext4::load(Box::new(Reader(vol.clone()))).map_err(|e| convert(e, "superblock"))?;
    Ok(Some(ExtFs { fs, counters }))
}

/// Our error for one of `ext4-view`'s, naming the guest path.
fn convert(e: Ext4Error, path: &str) -> Error {
    let msg = format!("{path}: {e}");
    match e {
        Ext4Error::Io(inner) => match inner.downcast::<Error>() {
            Ok(ours) => ours.context(format!("reading ext {path}")),
            Err(other) => Error::corrupt(format!("{path}: {other}")),
        },
        Ext4Error::Corrupt(_) => Error::corrupt(format!("ext filesystem is corrupt at {msg}")),
        Ext4Error::Incompatible(_) | Ext4Error::Encrypted => Error::unsupported(msg),
        Ext4Error::TooManySymlinks | Ext4Error::PathTooLong | Ext4Error::FileTooLarge => {
            Error::limit(msg)
        }
        _ => Error::arg(msg),
    }
}

fn meta(m: &Metadata) -> Meta {
    let kind = match m.file_type() {
        FileType::Regular => FileKind::File,
        FileType::Directory => FileKind::Dir,
        FileType::Symlink => FileKind::Symlink,
        FileType::CharacterDevice => FileKind::CharDevice,
        FileType::BlockDevice => FileKind::BlockDevice,
        FileType::Fifo => FileKind::Fifo,
        FileType::Socket => FileKind::Socket,
    };
    Meta {
        kind,
        size: m.len(),
        mode: u32::from(m.mode()) & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime: m.modified().seconds(),
    }
}

impl FileSystem for ExtFs {
    fn fs_type(&self) -> &str {
        self.counters.name
    }
    fn label(&self) -> Option<String> {
        let l = self.fs.label().display().to_string();
        (!l.is_empty()).then_some(l)
    }
    fn uuid(&self) -> Option<String> {
        Some(uuid_string(self.fs.uuid().as_bytes()))
    }
    fn usage(&self) -> Option<(u64, u64)> {
        let c = self.counters;
        Some((c.blocks * c.block_size, (c.blocks - c.free) * c.block_size))
    }
    fn metadata(&self, path: &str) -> Result<Meta> {
        check_path(path)?;
        self.fs
            .metadata(path)
            .map(|m| meta(&m))
            .map_err(|e| convert(e, path))
    }
    fn symlink_metadata(&self, path: &str) -> Result<Meta> {
        check_path(path)?;
        self.fs
            .symlink_metadata(path)
            .map(|m| meta(&m))
            .map_err(|e| convert(e, path))
    }
    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        check_path(path)?;
        let mut out = Vec::new();
        for e in self.fs.read_dir(path).map_err(|e| convert(e, path))? {
            let e = e.map_err(|e| convert(e, path))?;
            let raw = e.file_name();
            let raw = raw.as_ref();
            if raw == b"." || raw == b".." {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(Error::limit(format!(
                    "{path} has more than {MAX_DIR_ENTRIES} entries"
                )));
            }
            let name = String::from_utf8_lossy(raw).into_owned();
            let m = e.metadata().map_err(|err| convert(err, path))?;
            out.push(Entry {
                lossy: std::str::from_utf8(raw).is_err(),
                name,
                meta: meta(&m),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
    fn read_link(&self, path: &str) -> Result<String> {
        check_path(path)?;
        let t = self.fs.read_link(path).map_err(|e| convert(e, path))?;
        Ok(String::from_utf8_lossy(t.as_ref()).into_owned())
    }
    fn read_prefix(&self, path: &str, n: usize) -> Result<Vec<u8>> {
        check_path(path)?;
        let mut f = self.fs.open(path).map_err(|e| convert(e, path))?;
        let mut buf = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match f
                .read_bytes(&mut buf[got..])
                .map_err(|e| convert(e, path))?
            {
                0 => break,
                k => got += k,
            }
        }
        buf.truncate(got);
        Ok(buf)
    }
    fn exists(&self, path: &str) -> Result<bool> {
        check_path(path)?;
        self.fs.exists(path).map_err(|e| convert(e, path))
    }
    fn copy_to(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64> {
        check_path(path)?;
        let mut f = self.fs.open(path).map_err(|e| convert(e, path))?;
        let mut sink = Limited {
            out,
            limit,
            written: 0,
            what: path,
        };
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read_bytes(&mut buf).map_err(|e| convert(e, path))?;
            if n == 0 {
                return Ok(sink.written);
            }
            sink.put(&buf[..n])?;
        }
    }
}

/// A UUID as blkid prints it: lower-case, 8-4-4-4-12, bytes in on-disk order.
pub fn uuid_string(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_refuse_a_filesystem_larger_than_its_volume() {
        let mut sb = vec![0u8; 1024];
        sb[0x38..0x3A].copy_from_slice(&MAGIC.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&1000u32.to_le_bytes());
        sb[0x0C..0x10].copy_from_slice(&400u32.to_le_bytes());
        let c = counters(&sb, 1 << 20).unwrap().unwrap();
        assert_eq!(
            (c.name, c.blocks, c.free, c.block_size),
            ("ext2", 1000, 400, 1024)
        );
        let e = counters(&sb, 1000 * 1024 - 1).unwrap().unwrap_err();
        assert!(e.to_string().contains("more than the"), "{e}");
        sb[0x18] = 40;
        assert!(counters(&sb, u64::MAX).unwrap().is_err());
        sb[0x38] = 0;
        assert!(counters(&sb, 1 << 20).is_none());
    }

    #[test]
    fn uuid_text() {
        let b: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(uuid_string(&b), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }
}
