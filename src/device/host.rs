//! [`HostFile`]: the image file a reader reads, every read bounds-checked against the
//! file's real length, or an object read by ranges ([`RangeSource`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[doc(hidden)] // a helper of the format readers, not a stable API
/// An image file opened for reading, with positional reads that are bounds-checked
/// against the file's real length so a lying header yields an error naming the field.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    len: u64,
    path: PathBuf,
    /// Where the bytes really come from when they are not in `file` (an object read by
    /// ranges); `file` is then `/dev/null`, only there for callers probing holes.
    source: Option<std::sync::Arc<dyn RangeSource>>,
}

/// Bytes at offsets that do not live in a local file (an object in a bucket, read by
/// ranged requests): what [`HostFile::from_source`] reads through.
pub trait RangeSource: Send + Sync + std::fmt::Debug {
    /// Fill `buf` with the bytes at `offset` (the range lies inside the source).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl HostFile {
    /// Open `path` read-only: a regular file or a block device (see
    /// [`from_file`](Self::from_file) for what is refused).
    pub fn open(path: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        // Refused before opening too: opening a FIFO waits for a writer, and opening a
        // character device can have effects. O_NONBLOCK keeps a path swapped for a FIFO
        // after this check from blocking; from_file then refuses it on the descriptor.
        match std::fs::metadata(path) {
            Ok(m) => check_source_type(&m, path)?,
            // qemu-img and many tools take "-" for standard input: say why we do not.
            Err(_) if path == Path::new("-") => {
                return Err(Error::arg(
                    "standard input cannot be read as an image: images are read at random \
                     offsets and need a known size, so no format can be read from a pipe; \
                     save the stream to a file first",
                )
                .with_path(path))
            }
            Err(_) => {}
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io("cannot open image", e).with_path(path))?;
        let hf = Self::from_file(file, path)?;
        use std::os::unix::io::AsRawFd;
        let fd = hf.file.as_raw_fd();
        // SAFETY: fcntl on a valid descriptor, clearing one status flag.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        Ok(hf)
    }

    /// Wrap an already opened file: a regular file, or a block device (sized by seeking
    /// to its end, since its metadata says 0). A folder, FIFO, character device or socket
    /// is refused: images are read at random offsets and need a known size, and an
    /// unknown length must never read as an empty image.
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io("cannot stat image", e).with_path(path))?;
        check_source_type(&meta, path)?;
        let len = if std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
            use std::os::unix::io::AsRawFd;
            // SAFETY: lseek on a valid descriptor; reads are positional, so moving the
            // file position is harmless.
            let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
            if end < 0 {
                return Err(Error::io(
                    "cannot find the size of the block device",
                    std::io::Error::last_os_error(),
                )
                .with_path(path));
            }
            end as u64
        } else {
            meta.len()
        };
        Ok(HostFile {
            file,
            len,
            path: path.to_path_buf(),
            source: None,
        })
    }

    /// An image of `len` bytes whose reads go to `source`, named `name` in errors. It has
    /// no holes to probe (SEEK_DATA on it finds none) and cannot be written.
    pub fn from_source(
        source: std::sync::Arc<dyn RangeSource>,
        len: u64,
        name: &Path,
    ) -> Result<Self> {
        let file = File::open("/dev/null").map_err(|e| Error::io("cannot open /dev/null", e))?;
        Ok(HostFile {
            file,
            len,
            path: name.to_path_buf(),
            source: Some(source),
        })
    }

    /// Whether the bytes come from a [`RangeSource`] rather than [`file`](Self::file).
    pub fn is_remote(&self) -> bool {
        self.source.is_some()
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Whether `[host, host+len)` starts in a hole of the file, and how far that lasts
    /// (SEEK_DATA/SEEK_HOLE): what qemu's file driver tells block status. None when the
    /// file cannot say (a remote object, a filesystem without SEEK_DATA).
    pub fn hole_extent(&self, host: u64, len: u64) -> Option<(bool, u64)> {
        use std::os::unix::io::AsRawFd;
        if self.is_remote() || len == 0 {
            return None;
        }
        let fd = self.file.as_raw_fd();
        let seek = |whence| {
            // SAFETY: lseek on a valid descriptor; every read is positional.
            let r = unsafe { libc::lseek(fd, i64::try_from(host).ok()?, whence) };
            (r >= 0).then_some(r as u64)
        };
        let end = host.saturating_add(len);
        match seek(libc::SEEK_DATA) {
            Some(d) if d > host => Some((true, d.min(end) - host)),
            Some(_) => Some((false, seek(libc::SEEK_HOLE).unwrap_or(end).min(end) - host)),
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => {
                Some((true, len))
            }
            None => None,
        }
    }

    /// Read exactly `buf.len()` bytes at `offset`; `what` names the structure being read so
    /// a short file yields "`what` at 0x.. runs past end of file (len ..)".
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        self.check_range(offset, buf.len() as u64, what)?;
        let read = match &self.source {
            Some(s) => s.read_exact_at(buf, offset),
            None => self.file.read_exact_at(buf, offset),
        };
        read.map_err(|e| {
            Error::io(format!("reading {what}"), e)
                .at(offset)
                .with_path(&self.path)
        })
    }

    /// Read `len` bytes at `offset` into a new buffer (after checking they lie in the file,
    /// so the allocation is bounded by the real file size).
    pub fn read_vec(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        self.check_range(offset, len, what)?;
        let mut v = vec![0u8; len as usize];
        self.read_exact_at(&mut v, offset, what)?;
        Ok(v)
    }

    /// Error unless `[offset, offset+len)` lies inside the file.
    pub fn check_range(&self, offset: u64, len: u64, what: &str) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::corrupt(format!(
                "{what} ({len} bytes at {offset:#x}) runs past the end of the file ({} bytes)",
                self.len
            ))
            .with_field(what.to_string())
            .at(offset)
            .with_path(&self.path)),
        }
    }
}

/// Refuse a source that is neither a regular file nor a block device, naming what it is.
fn check_source_type(meta: &std::fs::Metadata, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = if t.is_file() || t.is_block_device() {
        return Ok(());
    } else if t.is_dir() {
        return Err(Error::arg("is a directory, not a disk image").with_path(path));
    } else if t.is_fifo() {
        "a FIFO or pipe"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    };
    Err(Error::arg(format!(
        "is {what}, not a regular file or block device: images are read at random offsets \
         and need a known size, so no format can be read from a pipe or character device; \
         save the stream to a file first"
    ))
    .with_path(path))
}
