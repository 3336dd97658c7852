//! Raw images: the file's bytes are the guest's bytes.
//!
//! Reading asks the filesystem where the holes are (SEEK_DATA/SEEK_HOLE), so an all-hole
//! 1 TiB file maps in one call; writing leaves zero ranges as holes. A block device has
//! no holes we can see: every range of it is data (zero detection still drops zeros).

use std::fs::File;
#[cfg(test)]
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::device::{
    check_guest_range, BlockDevice, BlockStatus, HostFile, ImageEditor, ImageInfo, Mapping,
    MappingKind,
};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::{CreateOptions, OpenOptions, OptionHelp, Preallocation, ResizeOptions};
use crate::writer::{write_all_at, EditFile, ImageWriter, Sink};

/// Options `-O raw` accepts.
pub const CREATE_OPTIONS: &[OptionHelp] = &[OptionHelp {
    name: "preallocation",
    kind: "string",
    help: "off (default: zero ranges stay holes) or falloc (reserve every block)",
}];

/// An opened raw image.
#[derive(Debug)]
pub struct RawImage {
    file: HostFile,
    /// Whether SEEK_DATA/SEEK_HOLE describe the file (false for a block device, where
    /// the answer would be a guess).
    holes: bool,
}

/// Open a raw image (always succeeds for a readable file: any bytes are a raw disk).
pub fn open(file: HostFile, _opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    use std::os::unix::fs::FileTypeExt;
    let block = file
        .file()
        .metadata()
        .map_err(|e| Error::io("cannot stat image", e))?
        .file_type()
        .is_block_device();
    let holes = !block && !file.is_remote();
    Ok(Box::new(RawImage { file, holes }))
}

/// `lseek(fd, offset, whence)`; None when the filesystem says there is no such region
/// (ENXIO) or cannot tell (EINVAL on filesystems without SEEK_DATA support).
fn seek_data_hole(file: &File, offset: u64, whence: libc::c_int) -> Option<u64> {
    let off = i64::try_from(offset).ok()?;
    // SAFETY: lseek on a valid descriptor has no memory effects; we only use pread elsewhere,
    // so moving the file position is harmless.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    (r >= 0).then_some(r as u64)
}

impl RawImage {
    /// The guest size: the file length rounded up to whole 512-byte sectors, as qemu's
    /// file driver reports it (`info` and `convert` give 1024 for a 1000-byte file); the
    /// bytes past the end of the file read as zeros.
    fn size(&self) -> u64 {
        self.file.len().next_multiple_of(512)
    }
}

impl BlockDevice for RawImage {
    fn virtual_size(&self) -> u64 {
        self.size()
    }

    /// As qemu's file driver: every range is present at its own offset, holes read as zero.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        let m = self.map(offset, max_len)?;
        let mut s = BlockStatus::from_mapping(&m, true);
        s.host = Some(m.offset);
        Ok(s)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = crate::device::map_end(self.size(), offset, max_len)?;
        let size = self.file.len();
        if offset >= size {
            // The padding up to a whole sector.
            return Ok(Mapping {
                offset,
                len: end - offset,
                kind: MappingKind::Unallocated,
            });
        }
        let end = end.min(size);
        let f = self.file.file();
        let data = |o, e| Mapping {
            offset: o,
            len: e - o,
            kind: MappingKind::Data { host: Some(o) },
        };
        if !self.holes {
            return Ok(data(offset, end));
        }
        let Some(data_start) = seek_data_hole(f, offset, libc::SEEK_DATA) else {
            // ENXIO: no data after offset (or no SEEK_DATA support: treat all as data).
            let errno = std::io::Error::last_os_error().raw_os_error();
            if errno == Some(libc::ENXIO) {
                return Ok(Mapping {
                    offset,
                    len: end - offset,
                    kind: MappingKind::Unallocated,
                });
            }
            return Ok(data(offset, end));
        };
        if data_start > offset {
            return Ok(Mapping {
                offset,
                len: data_start.min(end) - offset,
                kind: MappingKind::Unallocated,
            });
        }
        let hole = seek_data_hole(f, offset, libc::SEEK_HOLE).unwrap_or(end);
        Ok(data(offset, hole.clamp(offset + 1, end)))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.size(), offset, buf.len())?;
        let len = self.file.len();
        let inside = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.file
            .read_exact_at(&mut buf[..inside], offset, "guest data")?;
        buf[inside..].fill(0);
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "raw".into(),
            virtual_size: self.size(),
            ..Default::default()
        }
    }

    fn format(&self) -> Format {
        Format::Raw
    }
}

/// Writes guest data at the same offsets; what is never written stays a hole.
#[derive(Debug)]
pub struct RawWriter {
    file: Sink,
    size: u64,
}

/// Make a raw writer; the file must be empty (so unwritten ranges are holes) or an
/// in-place [`Sink`], which zeroes what is not written.
pub fn create_writer(file: Sink, opts: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    match opts.str_option("preallocation").unwrap_or("off") {
        "off" => {}
        "falloc" => {
            // Only a fresh file needs reserving: a device or existing file has its blocks.
            if let (true, Some(file)) = (opts.size > 0, file.fresh_file()) {
                let r = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, opts.size as i64) };
                if r != 0 {
                    return Err(Error::io(
                        "preallocating output",
                        std::io::Error::from_raw_os_error(r),
                    ));
                }
            }
        }
        other => {
            return Err(Error::arg(format!(
                "option preallocation: '{other}' is not off or falloc"
            )))
        }
    }
    // Whole sectors, as qemu-img creates raw files (1000 bytes asked make 1024).
    let size = opts
        .size
        .checked_next_multiple_of(512)
        .ok_or_else(|| Error::arg(format!("raw size {} is too large", opts.size)))?;
    // Set the length first, like qemu-img: guest data then lands inside the file instead of
    // extending it past holes write after write, which costs the filesystem far more.
    file.set_len(size)
        .map_err(|e| Error::io("setting output length", e))?;
    Ok(Box::new(RawWriter { file, size }))
}

impl ImageWriter for RawWriter {
    fn granularity(&self) -> u64 {
        512
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        write_all_at(&self.file, data, offset, "guest data")
    }
    fn streams(&self) -> bool {
        true
    }
    fn output_len(&self) -> Option<u64> {
        Some(self.size)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        self.file
            .set_len(self.size)
            .map_err(|e| Error::io("setting output length", e))?;
        Ok(())
    }
}

/// The in-place side of a raw image: its length is its guest size.
#[derive(Debug)]
pub struct RawEditor {
    file: EditFile,
    len: u64,
    /// A block device: its size is the device's, so it can be discarded in, not resized.
    block: bool,
}

/// Open a raw image for in-place changes: a regular file, or a block device (which only
/// [`ImageEditor::discard`] changes: its size is the device's, changed by the tool that
/// owns it, lvresize or rbd resize, never by us).
pub fn open_editor(file: File, path: &Path, opts: &ResizeOptions) -> Result<Box<dyn ImageEditor>> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file
        .metadata()
        .map_err(|e| Error::io("cannot stat the image", e).with_path(path))?;
    let block = meta.file_type().is_block_device();
    if !meta.is_file() && !block {
        return Err(Error::unsupported(
            "not a regular file or block device: nothing to change in place",
        )
        .with_path(path));
    }
    let len = if block {
        HostFile::from_file(
            file.try_clone()
                .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?,
            path,
        )?
        .len()
    } else {
        meta.len()
    };
    Ok(Box::new(RawEditor {
        file: EditFile::new(file, path, opts.fail_at_write),
        len,
        block,
    }))
}

/// Zeros written per call by `--preallocation=full`.
const PREALLOC_CHUNK: usize = 1 << 20;

impl ImageEditor for RawEditor {
    fn virtual_size(&self) -> u64 {
        self.len
    }

    fn resize(&mut self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        if self.block {
            return Err(Error::unsupported(
                "not a regular file: a block device's size is the device's (resize the device itself, e.g. with lvresize or rbd resize)",
            ));
        }
        let old = self.len;
        if new_size == old {
            return Ok(());
        }
        if new_size < old && !opts.shrink {
            return Err(
                Error::arg(crate::options::SHRINK_REFUSED).with_option("ResizeOptions::shrink")
            );
        }
        if new_size < old || opts.preallocation == Preallocation::Off {
            // One length change: atomic, so the image is before or after, never between.
            self.file.set_len(new_size, "setting the new length")?;
        } else {
            let zeros = vec![0u8; PREALLOC_CHUNK];
            let mut off = old;
            let r = (|| -> Result<()> {
                while off < new_size {
                    let n = (new_size - off).min(PREALLOC_CHUNK as u64) as usize;
                    self.file
                        .write_at(&zeros[..n], off, "preallocating new space")?;
                    off += n as u64;
                }
                self.file.sync("flushing the new space")
            })();
            if let Err(e) = r {
                // Back to "before": drop whatever part of the new tail was written.
                let _ = self.file.file().set_len(old);
                return Err(e);
            }
        }
        self.len = new_size;
        Ok(())
    }

    fn discard(&mut self, runs: &[(u64, u64)]) -> Result<u64> {
        discard_raw(&mut self.file, self.len, self.block, runs)
    }
}

/// Hole granularity: holes exist only in whole filesystem blocks (a punch over part of
/// one writes zeros), and a block device zeroes whole logical sectors; 4 KiB is both on
/// every filesystem and device this runs on, and smaller blocks only lose a little.
const HOLE_UNIT: u64 = 4096;

/// Raw discard, as qemu's write-zeroes with unmap on a raw file or host device:
/// fallocate(PUNCH_HOLE|KEEP_SIZE) over the whole 4 KiB units of each run. On a file the
/// blocks are freed and read back as zeros; on a block device the kernel zeroes and
/// unmaps (REQ_OP_WRITE_ZEROES), and refuses when the device cannot, rather than
/// writing zeros that give nothing back. BLKDISCARD is never used: a discarded range
/// need not read as zeros afterwards. Each punch stands alone, so a failure at any run
/// leaves the earlier runs punched and the rest as they were, all outside the runs
/// untouched. Returns the bytes that were stored (SEEK_DATA) and are now holes; on a
/// block device, every byte punched.
fn discard_raw(file: &mut EditFile, len: u64, block: bool, runs: &[(u64, u64)]) -> Result<u64> {
    // The reader rounds a partial last sector up (it reads as zeros): runs may reach
    // that rounded end, and the punch stops at the file's.
    crate::device::check_discard_runs(len.next_multiple_of(512), runs)?;
    let mut freed = 0;
    for &(off, n) in runs {
        let units = crate::device::whole_units(off, n.min(len.saturating_sub(off)), HOLE_UNIT, len);
        let (a, b) = (units.start * HOLE_UNIT, (units.end * HOLE_UNIT).min(len));
        if a >= b {
            continue;
        }
        // A file's last partial block is zeroed by the punch but stays allocated: it
        // is punched when it holds data, and never counted as given back.
        let whole_end = if block { b } else { b / HOLE_UNIT * HOLE_UNIT };
        let stored = if block {
            b - a
        } else {
            file.stored_bytes(a, whole_end.max(a))
        };
        if stored == 0 && (whole_end == b || file.stored_bytes(whole_end.max(a), b) == 0) {
            continue;
        }
        if !file.punch_hole(a, b - a, "punching a hole in the raw image")? {
            return Err(Error::unsupported(if block {
                "the block device cannot zero and unmap ranges (fallocate PUNCH_HOLE): BLKDISCARD would not guarantee zeros and writing zeros gives nothing back"
            } else {
                "the filesystem holding the image cannot punch holes (fallocate PUNCH_HOLE)"
            }));
        }
        freed += stored;
    }
    Ok(freed)
}

/// qemu-img's answer for a format it has no checks for.
pub fn check_refused() -> crate::error::Error {
    crate::error::Error::unsupported("This image format does not support checks")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_map_as_unallocated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 40).unwrap();
        f.write_all_at(&[1u8; 4096], 1 << 30).unwrap();
        drop(f);
        let img = open(HostFile::open(&p).unwrap(), &OpenOptions::new()).unwrap();
        let m = img.map(0, u64::MAX).unwrap();
        assert_eq!(m.kind, MappingKind::Unallocated);
        assert!(m.len <= 1 << 30 && m.len > 0);
        let m = img.map(1 << 30, u64::MAX).unwrap();
        assert!(matches!(m.kind, MappingKind::Data { .. }));
        let m = img.map((1 << 30) + 4096, u64::MAX).unwrap();
        assert!(m.offset + m.len == 1 << 40 || m.kind == MappingKind::Unallocated);
        let mut b = [0u8; 8];
        img.read_at(&mut b, 1 << 30).unwrap();
        assert_eq!(b, [1u8; 8]);
        assert!(img.read_at(&mut b, (1 << 40) - 4).is_err());
    }

    #[test]
    fn a_partial_last_sector_reads_as_a_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("odd.raw");
        std::fs::write(&p, vec![9u8; 1000]).unwrap();
        let img = open(HostFile::open(&p).unwrap(), &OpenOptions::new()).unwrap();
        assert_eq!(img.virtual_size(), 1024);
        assert_eq!(img.info().virtual_size, 1024);
        let m = img.map(0, u64::MAX).unwrap();
        assert!(matches!(m.kind, MappingKind::Data { .. }));
        assert_eq!(m.len, 1000);
        let m = img.map(1000, u64::MAX).unwrap();
        assert_eq!((m.len, m.kind), (24, MappingKind::Unallocated));
        let mut b = [1u8; 32];
        img.read_at(&mut b, 992).unwrap();
        assert_eq!(&b[..8], &[9u8; 8]);
        assert!(b[8..].iter().all(|&x| x == 0));
        assert!(img.read_at(&mut b, 1000).is_err());
    }
}
