//! NTFS read-only, through the `ntfs` crate (0.4): boot sector, MFT records with their
//! fixups, attribute lists, resident and non-resident data, index roots and allocations
//! are parsed and validated by it; names are looked up case-insensitively with the
//! volume's $UpCase table. Compressed and encrypted data are refused by name (the crate
//! does not decompress), sparse runs read as zeros.
//!
//! NTFS has no POSIX owners or modes here: files show as 0644, directories 0755, 0:0.

use std::cell::RefCell;
use std::io::Write;

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::NtfsFileNamespace;
use ntfs::{Ntfs, NtfsAttributeFlags, NtfsFile, NtfsReadSeek};

use super::{check_path, Entry, FileKind, FileSystem, Limited, Meta, Volume, MAX_DIR_ENTRIES};
use crate::device::{BlockDevice, DeviceReader};
use crate::error::{Error, Result};

type Reader = DeviceReader<Box<dyn BlockDevice>>;

/// An NTFS volume opened read-only.
pub struct NtfsFs {
    ntfs: Ntfs,
    r: RefCell<Reader>,
    label: Option<String>,
}

fn err(path: &str, e: ntfs::NtfsError) -> Error {
    Error::corrupt(format!("NTFS {path}: {e}"))
}

/// Seconds since 1970 of an NT timestamp (100 ns units since 1601).
fn unix_time(nt: u64) -> i64 {
    (nt / 10_000_000) as i64 - 11_644_473_600
}

/// Open `vol` as NTFS: `Ok(None)` without the "NTFS    " OEM id.
pub fn open(vol: &Volume) -> Result<Option<NtfsFs>> {
    if vol.virtual_size() < 512 {
        return Ok(None);
    }
    let mut boot = [0u8; 512];
    vol.read_at(&mut boot, 0)?;
    if &boot[3..11] != b"NTFS    " {
        return Ok(None);
    }
    let mut r: Reader = DeviceReader::new(Box::new(vol.clone()) as Box<dyn BlockDevice>);
    let mut ntfs = Ntfs::new(&mut r).map_err(|e| err("boot sector", e))?;
    ntfs.read_upcase_table(&mut r)
        .map_err(|e| err("$UpCase", e))?;
    let label = match ntfs.volume_name(&mut r) {
        Some(Ok(n)) => Some(n.name().to_string_lossy()).filter(|s| !s.is_empty()),
        _ => None,
    };
    Ok(Some(NtfsFs {
        ntfs,
        r: RefCell::new(r),
        label,
    }))
}

impl NtfsFs {
    /// The file at `path`, `None` when a component is missing.
    fn lookup(&self, path: &str) -> Result<Option<NtfsFile<'_>>> {
        check_path(path)?;
        let r = &mut *self.r.borrow_mut();
        let mut cur = self.ntfs.root_directory(r).map_err(|e| err("/", e))?;
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if comp == ".." {
                return Err(Error::arg(format!(
                    "{path}: `..` is resolved before NTFS lookup"
                )));
            }
            if !cur.is_directory() {
                return Ok(None);
            }
            let index = cur.directory_index(r).map_err(|e| err(path, e))?;
            let mut finder = index.finder();
            let Some(entry) = NtfsFileNameIndex::find(&mut finder, &self.ntfs, r, comp) else {
                return Ok(None);
            };
            let entry = entry.map_err(|e| err(path, e))?;
            cur = entry.to_file(&self.ntfs, r).map_err(|e| err(path, e))?;
        }
        Ok(Some(cur))
    }

    fn need(&self, path: &str) -> Result<NtfsFile<'_>> {
        self.lookup(path)?
            .ok_or_else(|| Error::arg(format!("{path}: no such file or directory")))
    }

    /// Stream the unnamed $DATA of `path` to `out`, at most `max` bytes of it.
    fn read_data(
        &self,
        path: &str,
        max: u64,
        out: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let file = self.need(path)?;
        if file.is_directory() {
            return Err(Error::arg(format!("{path}: is a directory")));
        }
        let r = &mut *self.r.borrow_mut();
        let item = file
            .data(r, "")
            .ok_or_else(|| Error::unsupported(format!("{path}: has no unnamed $DATA stream")))?
            .map_err(|e| err(path, e))?;
        let attr = item.to_attribute().map_err(|e| err(path, e))?;
        let flags = attr.flags();
        if flags.contains(NtfsAttributeFlags::COMPRESSED) {
            return Err(Error::unsupported(format!(
                "{path}: NTFS-compressed data is not read"
            )));
        }
        if flags.contains(NtfsAttributeFlags::ENCRYPTED) {
            return Err(Error::encrypted(format!(
                "{path}: EFS-encrypted data cannot be read"
            )));
        }
        let mut value = attr.value(r).map_err(|e| err(path, e))?;
        let mut left = value.len().min(max);
        let mut buf = vec![0u8; 1 << 16];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = value.read(r, &mut buf[..want]).map_err(|e| err(path, e))?;
            if n == 0 {
                return Err(Error::corrupt(format!(
                    "NTFS {path}: data ends {left} bytes before its length"
                )));
            }
            out(&buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
}

fn file_meta(dir: bool, size: u64, mtime: i64) -> Meta {
    Meta {
        kind: if dir { FileKind::Dir } else { FileKind::File },
        size: if dir { 0 } else { size },
        mode: if dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime,
    }
}

impl FileSystem for NtfsFs {
    fn fs_type(&self) -> &str {
        "ntfs"
    }
    fn label(&self) -> Option<String> {
        self.label.clone()
    }
    fn uuid(&self) -> Option<String> {
        Some(format!("{:016X}", self.ntfs.serial_number()))
    }
    fn usage(&self) -> Option<(u64, u64)> {
        None
    }
    fn metadata(&self, path: &str) -> Result<Meta> {
        let f = self.need(path)?;
        let dir = f.is_directory();
        let mtime = unix_time(
            f.info()
                .map_err(|e| err(path, e))?
                .modification_time()
                .nt_timestamp(),
        );
        let size = if dir {
            0
        } else {
            let r = &mut *self.r.borrow_mut();
            match f.data(r, "") {
                Some(Ok(item)) => item
                    .to_attribute()
                    .map(|a| a.value_length())
                    .map_err(|e| err(path, e))?,
                Some(Err(e)) => return Err(err(path, e)),
                None => 0,
            }
        };
        Ok(file_meta(dir, size, mtime))
    }
    fn symlink_metadata(&self, path: &str) -> Result<Meta> {
        self.metadata(path)
    }
    fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        let dir = self.need(path)?;
        if !dir.is_directory() {
            return Err(Error::arg(format!("{path}: not a directory")));
        }
        let r = &mut *self.r.borrow_mut();
        let index = dir.directory_index(r).map_err(|e| err(path, e))?;
        let mut it = index.entries();
        let mut out = Vec::new();
        while let Some(e) = it.next(r) {
            let e = e.map_err(|e| err(path, e))?;
            let Some(name) = e.key() else { continue };
            let name = name.map_err(|e| err(path, e))?;
            // A long name's 8.3 twin is a second entry in the DOS namespace.
            if name.namespace() == NtfsFileNamespace::Dos {
                continue;
            }
            let text = name.name().to_string_lossy();
            // The volume's own metadata files ($MFT, $Bitmap, ...) live in the root.
            if text.starts_with('$') && path == "/" || text == "." {
                continue;
            }
            if out.len() >= MAX_DIR_ENTRIES {
                return Err(Error::limit(format!(
                    "{path} has more than {MAX_DIR_ENTRIES} entries"
                )));
            }
            out.push(Entry {
                lossy: text.contains('\u{fffd}'),
                meta: file_meta(
                    name.is_directory(),
                    name.data_size(),
                    unix_time(name.modification_time().nt_timestamp()),
                ),
                name: text,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| a.name == b.name);
        Ok(out)
    }
    fn read_link(&self, path: &str) -> Result<String> {
        Err(Error::unsupported(format!(
            "{path}: NTFS reparse points are not read"
        )))
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
        Ok(self.lookup(path)?.is_some())
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
