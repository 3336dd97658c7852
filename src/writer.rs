//! The write side: an [`ImageWriter`] receives guest data in ascending order and lays it
//! out in its format; [`AtomicOutput`] makes every output appear whole or not at all.
//!
//! Ascending order is what lets a writer stream to a non-seekable sink; alignment to the
//! writer's granularity is what keeps every writer simple (it never merges partial
//! clusters). Ranges the engine never hands over are zeros.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

/// A per-granule transform (compression) the engine may run on worker threads.
pub trait Encoder: Send + Sync {
    /// Encode one granule of guest data at `offset`. `None` means "store it as is"
    /// (compression did not shrink it); the engine then calls [`ImageWriter::write`].
    fn encode(&self, offset: u64, data: &[u8]) -> Result<Option<Vec<u8>>>;
}

/// A sink for guest data in one image format.
///
/// The engine guarantees: calls come in strictly ascending, non-overlapping order; every
/// `offset` is a multiple of [`granularity`](Self::granularity) and every length is too,
/// except a run that ends at the virtual size; every range never written is guest zeros.
pub trait ImageWriter: Send {
    /// Allocation unit the writer wants data aligned to (a power of two, at least 512).
    fn granularity(&self) -> u64;

    /// The guest size the output will have (may be larger than asked, e.g. rounded up
    /// to whole sectors or MiB for Azure).
    fn virtual_size(&self) -> u64;

    /// An encoder to run on worker threads, one granule at a time, when the writer
    /// compresses. With an encoder, [`write_encoded`](Self::write_encoded) receives each
    /// granule that encoded to `Some`.
    fn encoder(&self) -> Option<Arc<dyn Encoder>> {
        None
    }

    /// Write a run of guest data (one or more whole granules).
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;

    /// Write one granule whose encoded form is `encoded` (`data` is the plain form).
    fn write_encoded(&mut self, offset: u64, data: &[u8], encoded: Vec<u8>) -> Result<()> {
        let _ = encoded;
        self.write(offset, data)
    }

    /// Things the user should know about the output that are not errors (e.g. "size
    /// rounded up to a whole sector"); the CLI prints them as notes.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Write the remaining metadata and flush. Nothing is valid until this returns Ok.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// An output file written under a temporary sibling name and renamed into place by
/// [`commit`](Self::commit); dropped without commit, the temporary file is removed, so a
/// failed conversion leaves nothing behind.
#[derive(Debug)]
pub struct AtomicOutput {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicOutput {
    /// Create the temporary sibling of `dest` and return it with its open file.
    pub fn create(dest: &Path) -> Result<(Self, File)> {
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest.file_name().ok_or_else(|| {
            Error::arg(format!("output path {} has no file name", dest.display()))
        })?;
        for attempt in 0..100u32 {
            let tmp = dir.join(format!(
                ".{}.diskconv-{}-{}.tmp",
                name.to_string_lossy(),
                std::process::id(),
                attempt
            ));
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(f) => {
                    return Ok((
                        AtomicOutput {
                            tmp,
                            dest: dest.to_path_buf(),
                            committed: false,
                        },
                        f,
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(Error::io("cannot create temporary output file", e).with_path(&tmp))
                }
            }
        }
        Err(Error::arg("cannot find a free temporary file name").with_path(dest))
    }

    /// The temporary path being written.
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Rename the temporary file over the destination; with `sync`, first flush its data
    /// to stable storage so a crash cannot leave a renamed but incomplete file. (Off by
    /// default in the CLI, like qemu-img convert's default `-t unsafe` cache mode.)
    pub fn commit(mut self, sync: bool) -> Result<()> {
        if sync {
            File::open(&self.tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("flushing output", e).with_path(&self.tmp))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            Error::io("cannot rename temporary output into place", e).with_path(&self.dest)
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Positional write of all of `data` at `offset`, with the error naming what was written.
pub fn write_all_at(file: &File, data: &[u8], offset: u64, what: &str) -> Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(data, offset)
        .map_err(|e| Error::io(format!("writing {what}"), e).at(offset))
}

/// A fresh random version-4 UUID in RFC 4122 byte order, for the formats that stamp one
/// on each new image. Random bytes from the OS; if /dev/urandom is unreadable, from std's
/// randomly keyed SipHash (uniqueness is all a UUID needs, not secrecy).
pub fn random_uuid_v4() -> [u8; 16] {
    use std::io::Read;
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let a = s.hash_one((t, std::process::id(), 1u8));
        let c = s.hash_one((t, std::process::id(), 2u8));
        b[..8].copy_from_slice(&a.to_le_bytes());
        b[8..].copy_from_slice(&c.to_le_bytes());
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

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
        write_all_at(&self.file, data, offset, what).map_err(|e| e.with_path(&self.path))
    }

    /// Set the file's length.
    pub fn set_len(&mut self, len: u64, what: &str) -> Result<()> {
        self.step(what)?;
        self.file
            .set_len(len)
            .map_err(|e| Error::io(what.to_string(), e).with_path(&self.path))
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
