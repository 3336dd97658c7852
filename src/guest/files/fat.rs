//! FAT12/16/32 read-only, with long names: the BPB validated by the sparsify scanner's
//! parser (`guest::fat::layout`), the FAT held in memory (bounded by the volume: its
//! size is checked against the region), cluster chains followed at most once per
//! cluster, so a cycle or a chain into free or out-of-range clusters is an error.
//!
//! FAT has no symlinks, owners or permission bits: files show as 0644 (0444 read-only),
//! directories 0755, owned by 0:0, mtimes in the volume's local time read as UTC.

use std::io::Write;

use super::{check_path, Entry, FileKind, FileSystem, Limited, Meta, Volume, MAX_DIR_ENTRIES};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::guest::fat::{layout, FatLayout};

/// The most bytes of FAT held in memory (a 2 TiB FAT32 volume of 32 KiB clusters).
const MAX_FAT: u64 = 256 << 20;
/// The most bytes of one directory read (65536 entries of 32 bytes, the FAT limit).
const MAX_DIR: u64 = 65536 * 32;

/// A FAT volume opened read-only.
pub struct FatFs {
    vol: Volume,
    l: FatLayout,
    fat: Vec<u8>,
    label: Option<String>,
    serial: u32,
}

/// A directory entry as stored: its name (long if it has one), attributes, first
/// cluster and size.
#[derive(Debug, Clone)]
struct Dirent {
    name: String,
    attr: u8,
    first: u64,
    size: u64,
    mtime: i64,
}

impl Dirent {
    fn is_dir(&self) -> bool {
        self.attr & 0x10 != 0
    }
    fn meta(&self) -> Meta {
        let dir = self.is_dir();
        Meta {
            kind: if dir { FileKind::Dir } else { FileKind::File },
            size: if dir { 0 } else { self.size },
            mode: match (dir, self.attr & 1 != 0) {
                (true, _) => 0o755,
                (false, true) => 0o444,
                (false, false) => 0o644,
            },
            uid: 0,
            gid: 0,
            mtime: self.mtime,
        }
    }
}

/// Open `vol` as FAT: `Ok(None)` when its boot sector is not FAT's.
pub fn open(vol: &Volume) -> Result<Option<FatFs>> {
    if vol.virtual_size() < 512 {
        return Ok(None);
    }
    let mut boot = [0u8; 512];
    vol.read_at(&mut boot, 0)?;
    let l = match layout(&boot, vol.virtual_size()) {
        None => return Ok(None),
        Some(l) => l?,
    };
    let fat_len = ((l.clusters + 2) * u64::from(l.bits)).div_ceil(8);
    if fat_len > MAX_FAT || fat_len > l.fat_bytes {
        return Err(Error::limit(format!(
            "FAT of {fat_len} bytes is over {MAX_FAT} or its BPB_FATSz"
        )));
    }
    let mut fat = vec![0u8; fat_len as usize];
    vol.read_at(&mut fat, l.fat)?;
    let (lab, ser) = if l.bits == 32 {
        (0x47, 0x43)
    } else {
        (0x2B, 0x27)
    };
    let sig = boot[if l.bits == 32 { 0x42 } else { 0x26 }];
    let (label, serial) = if sig == 0x29 {
        let t = String::from_utf8_lossy(&boot[lab..lab + 11])
            .trim_end()
            .to_string();
        let serial = u32::from_le_bytes(boot[ser..ser + 4].try_into().expect("4 bytes"));
        ((!t.is_empty() && t != "NO NAME").then_some(t), serial)
    } else {
        (None, 0)
    };
    Ok(Some(FatFs {
        vol: vol.clone(),
        l,
        fat,
        label,
        serial,
    }))
}

/// Seconds since the epoch of a DOS date and time (read as UTC).
fn dos_time(date: u16, time: u16) -> i64 {
    let (y, m, d) = (
        1980 + i64::from(date >> 9),
        i64::from((date >> 5) & 15).clamp(1, 12),
        i64::from(date & 31).max(1),
    );
    // Days from civil (Howard Hinnant).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86400
        + i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 63) * 60
        + i64::from(time & 31) * 2
}

/// The 8.3 name of a short entry, lower-cased where the NT case bits say so.
fn short_name(e: &[u8]) -> String {
    let lower = |b: &[u8], on: bool| {
        let s: String = b.iter().map(|&c| c as char).collect::<String>();
        let s = s.trim_end().to_string();
        if on {
            s.to_ascii_lowercase()
        } else {
            s
        }
    };
    let mut base = lower(&e[0..8], e[12] & 0x08 != 0);
    if base.starts_with('\u{5}') {
        base.replace_range(0..1, "\u{e5}");
    }
    let ext = lower(&e[8..11], e[12] & 0x10 != 0);
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// The checksum of a short name that its long-name entries carry.
fn lfn_checksum(short: &[u8]) -> u8 {
    short[..11]
        .iter()
        .fold(0u8, |s, &c| s.rotate_right(1).wrapping_add(c))
}

/// Parse the entries of a directory's bytes.
fn parse_dir(bytes: &[u8]) -> Vec<Dirent> {
    let mut out = Vec::new();
    let mut lfn: Vec<u16> = Vec::new();
    let mut lfn_sum = None;
    for e in bytes.chunks_exact(32) {
        match e[0] {
            0 => break,
            0xE5 => {
                lfn.clear();
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr & 0x3F == 0x0F {
            // Long-name pieces come last-first; the one flagged 0x40 starts a name.
            let units: Vec<u16> = [1..11, 14..26, 28..32]
                .into_iter()
                .flat_map(|r| {
                    e[r].chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                })
                .collect();
            if e[0] & 0x40 != 0 {
                lfn.clear();
                lfn_sum = Some(e[13]);
            }
            let mut piece = units;
            piece.extend_from_slice(&lfn);
            lfn = piece;
            continue;
        }
        if attr & 0x08 != 0 {
            lfn.clear();
            continue;
        }
        let short = short_name(e);
        let name = if !lfn.is_empty() && lfn_sum == Some(lfn_checksum(e)) {
            let end = lfn
                .iter()
                .position(|&u| u == 0 || u == 0xFFFF)
                .unwrap_or(lfn.len());
            String::from_utf16_lossy(&lfn[..end])
        } else {
            short
        };
        lfn.clear();
        if name == "." || name == ".." {
            continue;
        }
        let hi = u64::from(u16::from_le_bytes([e[20], e[21]]));
        let lo = u64::from(u16::from_le_bytes([e[26], e[27]]));
        out.push(Dirent {
            name,
            attr,
            first: hi << 16 | lo,
            size: u64::from(u32::from_le_bytes([e[28], e[29], e[30], e[31]])),
            mtime: dos_time(
                u16::from_le_bytes([e[24], e[25]]),
                u16::from_le_bytes([e[22], e[23]]),
            ),
        });
    }
    out
}

impl FatFs {
    fn entry(&self, c: u64) -> u64 {
        match self.l.bits {
            32 => {
                let o = (c * 4) as usize;
                u64::from(
                    u32::from_le_bytes(self.fat[o..o + 4].try_into().expect("4")) & 0x0FFF_FFFF,
                )
            }
            16 => {
                let o = (c * 2) as usize;
                u64::from(u16::from_le_bytes([self.fat[o], self.fat[o + 1]]))
            }
            _ => {
                let o = (c * 3 / 2) as usize;
                let v = u16::from_le_bytes([self.fat[o], self.fat[o + 1]]);
                u64::from(if c.is_multiple_of(2) {
                    v & 0xFFF
                } else {
                    v >> 4
                })
            }
        }
    }

    /// The clusters of the chain starting at `first`, at most `max` of them; an error
    /// for a cluster out of range, free, bad, or seen twice (a cycle).
    fn chain(&self, first: u64, max: u64, what: &str) -> Result<Vec<u64>> {
        let eoc = match self.l.bits {
            32 => 0x0FFF_FFF8,
            16 => 0xFFF8,
            _ => 0xFF8,
        };
        let mut out = Vec::new();
        let mut c = first;
        while c < eoc && (out.len() as u64) < max {
            if c < 2 || c >= self.l.clusters + 2 {
                return Err(Error::corrupt(format!(
                    "{what}: cluster chain reaches cluster {c:#x}, outside 2..{:#x}",
                    self.l.clusters + 2
                )));
            }
            out.push(c);
            c = self.entry(c);
        }
        let mut seen = out.clone();
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::corrupt(format!(
                "{what}: cluster chain passes cluster {:#x} twice (a cycle)",
                w[0]
            )));
        }
        Ok(out)
    }

    /// Read `len` bytes of the chain starting at `first` into `out`.
    fn read_chain(
        &self,
        first: u64,
        len: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<()>,
        what: &str,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cb = self.l.cluster_bytes;
        let need = len.div_ceil(cb);
        let chain = self.chain(first, need, what)?;
        if (chain.len() as u64) < need {
            return Err(Error::corrupt(format!(
                "{what}: {len} bytes but its cluster chain holds only {} clusters of {cb}",
                chain.len()
            )));
        }
        let mut buf = vec![0u8; cb as usize];
        let mut left = len;
        for c in chain {
            self.vol.read_at(&mut buf, self.l.data + (c - 2) * cb)?;
            let n = left.min(cb) as usize;
            out(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    fn dir_bytes(&self, d: Option<&Dirent>, what: &str) -> Result<Vec<u8>> {
        match d {
            None if self.l.bits != 32 => {
                let (off, len) = self.l.root_dir;
                let mut b = vec![0u8; len as usize];
                self.vol.read_at(&mut b, off)?;
                Ok(b)
            }
            _ => {
                let first = d.map_or(self.l.root_cluster, |d| d.first);
                let n = self
                    .chain(first, MAX_DIR.div_ceil(self.l.cluster_bytes), what)?
                    .len() as u64;
                let mut b = Vec::new();
                self.read_chain(
                    first,
                    n * self.l.cluster_bytes,
                    &mut |x| {
                        b.extend_from_slice(x);
                        Ok(())
                    },
                    what,
                )?;
                Ok(b)
            }
        }
    }

    /// The entry at `path` (`None` for the root); an error naming it when missing.
    fn lookup(&self, path: &str) -> Result<Option<Dirent>> {
        self.find(path)?
            .ok_or_else(|| Error::arg(format!("{path}: no such file or directory")))
    }

    /// `Some(entry)` at `path` (`Some(None)` for the root), `None` when a component is
    /// missing.
    fn find(&self, path: &str) -> Result<Option<Option<Dirent>>> {
        check_path(path)?;
        let mut cur: Option<Dirent> = None;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if comp == ".." {
                return Err(Error::arg(format!(
                    "{path}: `..` is resolved before FAT lookup"
                )));
            }
            if cur.as_ref().is_some_and(|d| !d.is_dir()) {
                return Err(Error::arg(format!("{path}: not a directory")));
            }
            let entries = parse_dir(&self.dir_bytes(cur.as_ref(), path)?);
            match entries
                .into_iter()
                .find(|e| e.name.eq_ignore_ascii_case(comp))
            {
                Some(e) => cur = Some(e),
                None => return Ok(None),
            }
        }
        Ok(Some(cur))
    }
}

impl FileSystem for FatFs {
    fn fs_type(&self) -> &str {
        "vfat"
    }
    fn label(&self) -> Option<String> {
        self.label.clone()
    }
    fn uuid(&self) -> Option<String> {
        (self.serial != 0)
            .then(|| format!("{:04X}-{:04X}", self.serial >> 16, self.serial & 0xFFFF))
    }
    fn usage(&self) -> Option<(u64, u64)> {
        let free = (2..self.l.clusters + 2)
            .filter(|&c| self.entry(c) == 0)
            .count() as u64;
        let cb = self.l.cluster_bytes;
        Some((self.l.clusters * cb, (self.l.clusters - free) * cb))
    }
    fn metadata(&self, path: &str) -> Result<Meta> {
        Ok(match self.lookup(path)? {
            Some(d) => d.meta(),
            None => Meta {
                kind: FileKind::Dir,
                size: 0,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
            },
        })
    }
    fn symlink_metadata(&self, path: &str) -> Result<Meta> {
        self.metadata(path)
    }
    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        let d = self.lookup(path)?;
        if d.as_ref().is_some_and(|d| !d.is_dir()) {
            return Err(Error::arg(format!("{path}: not a directory")));
        }
        let mut out: Vec<Entry> = parse_dir(&self.dir_bytes(d.as_ref(), path)?)
            .into_iter()
            .map(|e| Entry {
                meta: e.meta(),
                name: e.name,
                lossy: false,
            })
            .collect();
        out.truncate(MAX_DIR_ENTRIES);
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
    fn read_link(&self, path: &str) -> Result<String> {
        Err(Error::arg(format!("{path}: FAT has no symbolic links")))
    }
    fn read_prefix(&self, path: &str, n: usize) -> Result<Vec<u8>> {
        let d = self.file(path)?;
        let mut v = Vec::new();
        self.read_chain(
            d.first,
            d.size.min(n as u64),
            &mut |x| {
                v.extend_from_slice(x);
                Ok(())
            },
            path,
        )?;
        Ok(v)
    }
    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.find(path)?.is_some())
    }
    fn copy_to(&self, path: &str, out: &mut dyn Write, limit: u64) -> Result<u64> {
        let d = self.file(path)?;
        let mut sink = Limited {
            out,
            limit,
            written: 0,
            what: path,
        };
        self.read_chain(d.first, d.size, &mut |x| sink.put(x), path)?;
        Ok(sink.written)
    }
}

impl FatFs {
    fn file(&self, path: &str) -> Result<Dirent> {
        match self.lookup(path)? {
            Some(d) if !d.is_dir() => Ok(d),
            _ => Err(Error::arg(format!("{path}: is a directory"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_times() {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(b"README  TXT");
        assert_eq!(short_name(&e), "README.TXT");
        e[12] = 0x18;
        assert_eq!(short_name(&e), "readme.txt");
        // 2024-02-29 13:45:58
        let date = ((2024 - 1980) << 9) | (2 << 5) | 29;
        let time = (13 << 11) | (45 << 5) | 29;
        assert_eq!(dos_time(date, time), 1_709_214_358);
        assert_eq!(lfn_checksum(b"README  TXT"), lfn_checksum(b"README  TXT"));
    }
}
