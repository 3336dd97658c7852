//! The in-place side: [`EditFile`], through which every mutation of an edited image goes
//! (counted, so a test can fail the Nth one), and the exclusive lock an edit holds.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::zeros::write_zeros_at;
use crate::error::{Error, Result};

#[doc(hidden)] // a helper of the format writers and editors, not a stable API
/// Take an exclusive advisory lock on an image for the whole of an in-place edit: a second
/// diskconv on the same image is refused instead of interleaving its writes with ours. The
/// format dispatch takes it for every editor, before the editor reads anything.
pub fn lock_exclusive(file: &File, path: &Path) -> Result<()> {
    // SAFETY: flock on a valid descriptor has no memory effects.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Error::io(
                "Failed to get \"write\" lock: the image is in use by another process",
                e,
            )
            .with_path(path));
        }
        return Err(Error::io("cannot lock the image", e).with_path(path));
    }
    Ok(())
}

#[doc(hidden)] // a helper of the format writers and editors, not a stable API
/// The file an in-place operation ([`crate::device::ImageEditor`]) changes. Every mutation
/// (write, length change, flush) goes through here and is counted, so a test can make the
/// Nth one fail and check the image is still whole: crash safety proven, not argued.
#[derive(Debug)]
pub struct EditFile {
    file: File,
    path: PathBuf,
    writes: u64,
    fail_at: Option<u64>,
}

impl EditFile {
    /// Wrap `file` (opened read-write at `path`); `fail_at` is the test hook (see
    /// [`crate::options::ResizeOptions::fail_at_write`]).
    pub fn new(file: File, path: &Path, fail_at: Option<u64>) -> Self {
        EditFile {
            file,
            path: path.to_path_buf(),
            writes: 0,
            fail_at,
        }
    }

    /// The file, for reads.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// How many mutations ran so far (the last failed one included).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    fn step(&mut self, what: &str) -> Result<()> {
        self.writes += 1;
        if self.fail_at == Some(self.writes) {
            return Err(Error::io(
                format!("{what} (write {} failed by the test hook)", self.writes),
                std::io::Error::from_raw_os_error(libc::EIO),
            )
            .with_path(&self.path));
        }
        Ok(())
    }

    /// Write all of `data` at `offset`.
    pub fn write_at(&mut self, data: &[u8], offset: u64, what: &str) -> Result<()> {
        self.step(what)?;
        self.file.write_all_at(data, offset).map_err(|e| {
            Error::io(what.to_string(), e)
                .at(offset)
                .with_path(&self.path)
        })
    }

    /// Set the file's length.
    pub fn set_len(&mut self, len: u64, what: &str) -> Result<()> {
        self.step(what)?;
        self.file
            .set_len(len)
            .map_err(|e| Error::io(what.to_string(), e).with_path(&self.path))
    }

    /// Give back the storage of `[offset, offset+len)`, which reads as zeros afterwards
    /// (fallocate PUNCH_HOLE|KEEP_SIZE: a file's blocks are freed, a block device is told
    /// to zero and unmap). Ok(false) when the filesystem or device cannot do it (nothing
    /// changed); callers for which the hole is only a saving ignore that.
    pub fn punch_hole(&mut self, offset: u64, len: u64, what: &str) -> Result<bool> {
        self.step(what)?;
        if len == 0 {
            return Ok(true);
        }
        let (Ok(s), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(Error::arg(format!(
                "{what}: range of {len} bytes at {offset:#x} is past what fallocate takes"
            )));
        };
        // SAFETY: fallocate on a valid descriptor; KEEP_SIZE never changes the length.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                s,
                l,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => Ok(false),
            _ => Err(Error::io(what.to_string(), e)
                .at(offset)
                .with_path(&self.path)),
        }
    }

    /// Make `[offset, offset+len)` read as zeros and keep it allocated (fallocate
    /// ZERO_RANGE, which may also extend the file; written zeros where the filesystem or
    /// device cannot), so a preallocated image stays preallocated.
    pub fn zero_range(&mut self, offset: u64, len: u64, what: &str) -> Result<()> {
        self.step(what)?;
        if len == 0 {
            return Ok(());
        }
        if let (Ok(s), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) {
            // SAFETY: fallocate on a valid descriptor.
            let r =
                unsafe { libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_ZERO_RANGE, s, l) };
            if r == 0 {
                return Ok(());
            }
        }
        write_zeros_at(&self.file, offset, offset + len).map_err(|e| {
            Error::io(what.to_string(), e)
                .at(offset)
                .with_path(&self.path)
        })
    }

    /// Bytes of `[a, b)` the filesystem stores (not holes), by SEEK_DATA/SEEK_HOLE; all of
    /// them when the filesystem cannot say.
    pub fn stored_bytes(&self, a: u64, b: u64) -> u64 {
        let fd = self.file.as_raw_fd();
        let mut off = a;
        let mut n = 0;
        while off < b {
            // SAFETY: lseek on a valid descriptor; reads are positional.
            let d = unsafe { libc::lseek(fd, off as i64, libc::SEEK_DATA) };
            if d < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return n + (b - off);
            }
            let d = d as u64;
            if d >= b {
                break;
            }
            // SAFETY: as above.
            let h = unsafe { libc::lseek(fd, d as i64, libc::SEEK_HOLE) };
            let h = if h < 0 { b } else { (h as u64).min(b) };
            n += h.saturating_sub(d);
            off = h.max(d + 1);
        }
        n
    }

    /// Flush data and metadata to stable storage: the barrier between "new tables
    /// written" and "the switching write".
    pub fn sync(&mut self, what: &str) -> Result<()> {
        self.step(what)?;
        self.file
            .sync_all()
            .map_err(|e| Error::io(what.to_string(), e).with_path(&self.path))
    }
}
