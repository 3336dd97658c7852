//! The write side: an [`ImageWriter`] receives guest data in ascending order and lays it
//! out in its format; [`AtomicOutput`] makes every output appear whole or not at all.
//!
//! Ascending order is what lets a writer stream to a non-seekable sink; alignment to the
//! writer's granularity is what keeps every writer simple (it never merges partial
//! clusters). Ranges the engine never hands over are zeros.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

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

    /// Whether this writer's host writes only ever move forward (each at or past the end
    /// of the previous one, [`Sink::set_len`] never below it), so that it can write to a
    /// pipe or character device. Checked before any data is read.
    fn streams(&self) -> bool {
        false
    }

    /// The exact number of bytes the output will have, known before the first byte is
    /// written (an HTTP body's Content-Length, an uploader's part sizes); None when the
    /// layout depends on the data (compressed outputs).
    fn output_len(&self) -> Option<u64> {
        None
    }

    /// Write the remaining metadata and flush. Nothing is valid until this returns Ok.
    fn finish(self: Box<Self>) -> Result<()>;
}

/// The guest ranges a conversion will hand to its writer, found before the first byte is
/// written (see [`crate::convert::plan_allocation`]), so that a writer can lay out all of
/// its metadata ahead of the data and write strictly forward.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllocationPlan {
    /// The granule the plan was made for: every range starts on a multiple of it and
    /// ends on one or at the virtual size.
    pub granularity: u64,
    /// The guest size the plan covers.
    pub virtual_size: u64,
    /// Written guest ranges `[start, end)`, ascending, disjoint and never touching
    /// (touching ranges are merged).
    pub ranges: Vec<(u64, u64)>,
    /// Sum of the ranges' lengths.
    pub bytes: u64,
    /// With an encoder (compression): the granules, by guest offset and ascending, that
    /// encoded to `Some`, with their encoded length; every other granule of the ranges is
    /// stored as is. Encoders are deterministic, so the writing pass gets these lengths.
    pub encoded: Vec<(u64, u32)>,
}

impl AllocationPlan {
    /// Add `[start, end)`, which must start at or after the end of every range so far
    /// (the engine's writes ascend).
    pub fn push(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        self.bytes += end - start;
        match self.ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => self.ranges.push((start, end)),
        }
    }

    /// Drop what lies at or past `size` (an output smaller than its source, from
    /// `--target-size`): the engine never writes there, so the layout must not plan it.
    pub fn clip(&mut self, size: u64) {
        let ranges = std::mem::take(&mut self.ranges);
        self.bytes = 0;
        for (a, b) in ranges {
            self.push(a, b.min(size));
        }
        self.encoded.retain(|&(off, _)| off < size);
        self.virtual_size = self.virtual_size.min(size);
    }
}

/// An output file written under a temporary sibling name and renamed into place by
/// [`commit`](Self::commit); dropped without commit, the temporary file is removed, so a
/// failed conversion leaves nothing behind.
///
/// The temporary name is short (`.diskconv-<pid>-<n>.tmp`) so that any destination name
/// the filesystem accepts (up to NAME_MAX) works, and every error names the destination,
/// never the hidden temporary path.
#[derive(Debug)]
pub struct AtomicOutput {
    tmp: PathBuf,
    dest: PathBuf,
    /// The name errors give (the path the user named, which may be a symlink to `dest`).
    shown: PathBuf,
    committed: bool,
}

/// Temporary files of this process not yet committed or removed, for
/// [`remove_temporaries`].
static LIVE_TEMPORARIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remove every temporary output file this process has not committed yet. Meant for a
/// signal handler (SIGINT, SIGTERM) that exits the process without unwinding, so that
/// an interrupted conversion leaves nothing behind.
pub fn remove_temporaries() {
    let live = match LIVE_TEMPORARIES.lock() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    };
    for p in live {
        let _ = std::fs::remove_file(p);
    }
}

fn forget_temporary(tmp: &Path) {
    let mut g = LIVE_TEMPORARIES.lock().unwrap_or_else(|p| p.into_inner());
    g.retain(|p| p != tmp);
}

impl AtomicOutput {
    /// Create the temporary sibling of `dest` and return it with its open file. The
    /// folder `dest` names must exist; `dest` itself is not looked at (see
    /// [`Output::open`] for symlinks, devices and existing files).
    pub fn create(dest: &Path) -> Result<(Self, File)> {
        Self::create_with_mode(dest, dest, 0o666)
    }

    fn create_with_mode(dest: &Path, shown: &Path, mode: u32) -> Result<(Self, File)> {
        use std::os::unix::fs::OpenOptionsExt;
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = parent_dir(dest);
        dest.file_name().ok_or_else(|| {
            Error::arg(format!("output path {} has no file name", dest.display()))
        })?;
        for _ in 0..100u32 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp = dir.join(format!(".diskconv-{}-{n}.tmp", std::process::id()));
            // Registered before it exists, so a signal arriving right after the open
            // still finds it.
            LIVE_TEMPORARIES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(tmp.clone());
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
            {
                Ok(f) => {
                    return Ok((
                        AtomicOutput {
                            tmp,
                            dest: dest.to_path_buf(),
                            shown: shown.to_path_buf(),
                            committed: false,
                        },
                        f,
                    ))
                }
                Err(e) => {
                    forget_temporary(&tmp);
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        continue;
                    }
                    return Err(Error::io(
                        format!("cannot create the output file in {}", dir.display()),
                        e,
                    )
                    .with_path(shown));
                }
            }
        }
        Err(Error::arg("cannot find a free temporary file name").with_path(shown))
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
                .map_err(|e| Error::io("flushing output", e).with_path(&self.shown))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| {
            Error::io("cannot rename the finished output into place", e).with_path(&self.shown)
        })?;
        self.committed = true;
        forget_temporary(&self.tmp);
        Ok(())
    }
}

impl Drop for AtomicOutput {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
            forget_temporary(&self.tmp);
        }
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[doc(hidden)] // a helper of the format writers and editors, not a stable API
/// Positional write of all of `data` at `offset`, with the error naming what was written.
pub fn write_all_at(file: &Sink, data: &[u8], offset: u64, what: &str) -> Result<()> {
    file.write_all_at(data, offset)
        .map_err(|e| Error::io(format!("writing {what}"), e).at(offset))
}

#[doc(hidden)] // a helper of the format writers, not a stable API
/// Make host range `[from, to)` of `file` read as zeros, for ranges a planned writer
/// laid out but the engine never wrote: nothing on a fresh file (the range stays a hole),
/// zeros written on a stream or in place, where the bytes must be sent or old data
/// overwritten. `what` names the range in errors.
pub fn zero_fill_at(file: &Sink, from: u64, to: u64, what: &str) -> Result<()> {
    if file.fresh_file().is_some() {
        return Ok(());
    }
    let mut at = from;
    while at < to {
        let k = (to - at).min(ZEROS.len() as u64) as usize;
        write_all_at(file, &ZEROS[..k], at, what)?;
        at += k as u64;
    }
    Ok(())
}

/// Where a writer's bytes go: a fresh file, an existing file or block device written in
/// place, or a stream (a FIFO or character device).
///
/// Writers see one file API (positional writes, `set_len`, `sync_all`) whatever the
/// destination. A fresh file passes straight through. In place, the sink records which
/// ranges were written so that [`Output::finish`] can zero the rest: a writer may rely on
/// unwritten ranges reading as zeros, as they do in a new file, but a block device holds
/// old data there. A stream turns forward positional writes into sequential ones, filling
/// gaps with zeros, and refuses a write behind what it has already sent.
#[derive(Debug)]
pub struct Sink {
    /// The file, for a fresh or in-place output; None on a stream, whose bytes go through
    /// the [`StreamOut`] inside `track`.
    file: Option<File>,
    track: Option<Arc<Mutex<Track>>>,
    /// Digests of a fresh file hashed on the way while its writes move forward (see
    /// [`Output::request_digests`]).
    follow: Option<Arc<Mutex<Follow>>>,
    /// Bytes written to `file` since its writeback was last started (see [`WRITEBACK`]).
    dirty: std::sync::atomic::AtomicU64,
}

/// Dirty bytes after which a file output's writeback is started. Without it a machine
/// with plenty of memory keeps the whole output in its page cache until the final
/// `sync` (or the caller's), which then waits for all of it; started as the bytes come,
/// the disk writes while the converter still reads and decodes.
const WRITEBACK: u64 = 32 << 20;

/// On-the-way digests of a fresh file: valid while every write starts at or past the end
/// of the previous one (the bytes between are holes, hashed as zeros); dropped at the
/// first write that goes back, and the finished file is read instead.
#[derive(Debug)]
struct Follow {
    pos: u64,
    digests: Option<Digester>,
}

impl Follow {
    fn wrote(&mut self, data: &[u8], offset: u64) {
        let Some(d) = &mut self.digests else {
            return;
        };
        if offset < self.pos {
            self.digests = None;
            return;
        }
        let mut gap = offset - self.pos;
        while gap > 0 {
            let k = gap.min(ZEROS.len() as u64) as usize;
            d.update(&ZEROS[..k]);
            gap -= k as u64;
        }
        d.update(data);
        self.pos = offset + data.len() as u64;
    }
}

/// The sequential side of a stream output, shared by its [`Sink`] and its [`Output`] (which
/// pads the stream to its length once the writer is done).
struct StreamOut {
    w: Box<dyn Write + Send>,
    /// Digests of every byte sent, zeros filling gaps included.
    digests: Option<Digester>,
}

impl std::fmt::Debug for StreamOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamOut").finish_non_exhaustive()
    }
}

impl Write for StreamOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.w.write(buf)?;
        if let Some(d) = &mut self.digests {
            d.update(&buf[..n]);
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.flush()
    }
}

#[derive(Debug)]
enum Track {
    InPlace {
        /// Bytes a block device holds; None for a regular file, which grows.
        capacity: Option<u64>,
        /// The length asked for with `set_len` (the destination is never shrunk).
        len: u64,
        /// Written ranges, start -> end, merged when they touch.
        written: BTreeMap<u64, u64>,
    },
    Stream {
        /// Bytes sent so far.
        pos: u64,
        /// The length the stream will have once finished (zeros past `pos`).
        len: u64,
        out: StreamOut,
    },
}

impl From<File> for Sink {
    fn from(file: File) -> Self {
        Sink {
            file: Some(file),
            track: None,
            follow: None,
            dirty: Default::default(),
        }
    }
}

/// A digest algorithm computed over the output bytes ([`ConvertOptions::digests`](crate::ConvertOptions::digests)).
/// Serialized as its name (`"md5"`, `"sha512"`).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DigestAlgo {
    /// MD5 (OpenStack Glance's `checksum`).
    Md5,
    /// SHA-1.
    Sha1,
    /// SHA-256.
    Sha256,
    /// SHA-512 (Glance's `os_hash_value` with `os_hash_algo=sha512`).
    Sha512,
}

impl serde::Serialize for DigestAlgo {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl DigestAlgo {
    /// Every algorithm, in the order reports list them.
    pub const ALL: [DigestAlgo; 4] = [
        DigestAlgo::Md5,
        DigestAlgo::Sha1,
        DigestAlgo::Sha256,
        DigestAlgo::Sha512,
    ];

    /// The name `--digest` takes and reports give (as md5sum & co. name them).
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgo::Md5 => "md5",
            DigestAlgo::Sha1 => "sha1",
            DigestAlgo::Sha256 => "sha256",
            DigestAlgo::Sha512 => "sha512",
        }
    }

    /// Parse a comma-separated list (`md5,sha256`); duplicates collapse, order is
    /// [`ALL`](Self::ALL)'s.
    pub fn parse_list(s: &str) -> Result<Vec<DigestAlgo>> {
        let mut v = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let a = DigestAlgo::ALL
                .into_iter()
                .find(|a| a.name().eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    Error::arg(format!(
                        "unknown digest algorithm '{name}' (known: md5, sha1, sha256, sha512)"
                    ))
                })?;
            v.push(a);
        }
        if v.is_empty() {
            return Err(Error::arg("no digest algorithm named"));
        }
        v.sort();
        v.dedup();
        Ok(v)
    }

    fn hasher(self) -> Box<dyn sha2::digest::DynDigest + Send> {
        use sha2::Digest;
        match self {
            DigestAlgo::Md5 => Box::new(md5::Md5::new()),
            DigestAlgo::Sha1 => Box::new(sha1::Sha1::new()),
            DigestAlgo::Sha256 => Box::new(sha2::Sha256::new()),
            DigestAlgo::Sha512 => Box::new(sha2::Sha512::new()),
        }
    }
}

impl std::fmt::Display for DigestAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Running digests of one byte sequence (the RustCrypto implementations).
pub struct Digester {
    hashers: Vec<(DigestAlgo, Box<dyn sha2::digest::DynDigest + Send>)>,
}

impl std::fmt::Debug for Digester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algos: Vec<_> = self.hashers.iter().map(|(a, _)| *a).collect();
        f.debug_struct("Digester").field("algos", &algos).finish()
    }
}

impl Digester {
    /// Start the digests `algos` of an empty sequence.
    pub fn new(algos: &[DigestAlgo]) -> Self {
        Digester {
            hashers: algos.iter().map(|&a| (a, a.hasher())).collect(),
        }
    }

    /// Add `data` to every digest.
    pub fn update(&mut self, data: &[u8]) {
        for (_, h) in &mut self.hashers {
            h.update(data);
        }
    }

    /// The digests as lowercase hex, in the order asked.
    pub fn finish(self) -> Vec<(DigestAlgo, String)> {
        self.hashers
            .into_iter()
            .map(|(a, h)| {
                let hex = h
                    .finalize()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>();
                (a, hex)
            })
            .collect()
    }

    /// Digests of the first `len` bytes of `file`, read once from the start (for outputs
    /// written out of order, which cannot be hashed on the way).
    pub fn of_file(file: &File, len: u64, algos: &[DigestAlgo]) -> std::io::Result<Self> {
        let mut d = Digester::new(algos);
        let mut buf = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)?;
            d.update(&buf[..n]);
            at += n as u64;
        }
        Ok(d)
    }
}

/// What [`Output::finish`] knows of the finished output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    /// Bytes of output: those sent on a stream, the file's length, the image's extent
    /// written in place.
    pub len: u64,
    /// The digests asked with [`Output::request_digests`], lowercase hex.
    pub digests: Vec<(DigestAlgo, String)>,
}

fn too_small(capacity: u64, needed: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "the block device holds {capacity} bytes but the output needs {needed} bytes"
    ))
}

fn stream_backwards(offset: u64, pos: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "the writer went back to offset {offset:#x} after sending {pos:#x} bytes; \
         this output format cannot be written to a pipe or character device"
    ))
}

/// Zeros for padding streams and filling gaps in place.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

fn write_zeros(mut w: impl Write, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl Sink {
    /// The file, when this is a fresh, empty regular file (where options such as
    /// preallocation apply and unwritten ranges are holes); None in place or on a stream.
    pub fn fresh_file(&self) -> Option<&File> {
        self.track.is_none().then_some(self.file.as_ref()).flatten()
    }

    fn file(&self) -> std::io::Result<&File> {
        self.file
            .as_ref()
            .ok_or_else(|| std::io::Error::other("a stream output has no file"))
    }

    /// Start writing back the file's dirty pages once [`WRITEBACK`] bytes were written
    /// since the last start. Only starts it (the call does not wait for the disk), and a
    /// failure to start is no error: the final flush still writes everything.
    fn wrote_to_file(&self, file: &File, n: usize) {
        use std::sync::atomic::Ordering;
        let before = self.dirty.fetch_add(n as u64, Ordering::Relaxed);
        if before + n as u64 >= WRITEBACK {
            self.dirty.store(0, Ordering::Relaxed);
            #[cfg(target_os = "linux")]
            // SAFETY: a plain syscall on a descriptor this sink owns; no memory is passed.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
            #[cfg(not(target_os = "linux"))]
            let _ = file;
        }
    }

    /// Write all of `data` at `offset`.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let Some(track) = &self.track else {
            let file = self.file()?;
            file.write_all_at(data, offset)?;
            self.wrote_to_file(file, data.len());
            if let Some(f) = &self.follow {
                f.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .wrote(data, offset);
            }
            return Ok(());
        };
        let mut t = track.lock().unwrap_or_else(|p| p.into_inner());
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| std::io::Error::other("write past 2^64"))?;
        match &mut *t {
            Track::InPlace {
                capacity, written, ..
            } => {
                if let Some(cap) = *capacity {
                    if end > cap {
                        return Err(too_small(cap, end));
                    }
                }
                let file = self.file()?;
                file.write_all_at(data, offset)?;
                self.wrote_to_file(file, data.len());
                record(written, offset, end);
                Ok(())
            }
            Track::Stream { pos, len, out } => {
                if offset < *pos {
                    return Err(stream_backwards(offset, *pos));
                }
                write_zeros(&mut *out, offset - *pos)?;
                out.write_all(data)?;
                *pos = end;
                *len = (*len).max(end);
                Ok(())
            }
        }
    }

    /// Set the output's length, like [`File::set_len`]. In place, a block device is
    /// never resized (an error names both sizes when it is too small) and an existing
    /// file is never shrunk; on a stream, the length may not go below what was sent.
    pub fn set_len(&self, len: u64) -> std::io::Result<()> {
        let Some(track) = &self.track else {
            return self.file()?.set_len(len);
        };
        let mut t = track.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *t {
            Track::InPlace {
                capacity, len: l, ..
            } => {
                match *capacity {
                    Some(cap) if len > cap => return Err(too_small(cap, len)),
                    Some(_) => {}
                    None => {
                        let file = self.file()?;
                        if len > file.metadata()?.len() {
                            file.set_len(len)?;
                        }
                    }
                }
                *l = len;
                Ok(())
            }
            Track::Stream { pos, len: l, .. } => {
                if len < *pos {
                    return Err(stream_backwards(len, *pos));
                }
                *l = len;
                Ok(())
            }
        }
    }

    /// Flush written data to stable storage (a no-op on a stream).
    pub fn sync_all(&self) -> std::io::Result<()> {
        match &self.track {
            Some(t)
                if matches!(
                    *t.lock().unwrap_or_else(|p| p.into_inner()),
                    Track::Stream { .. }
                ) =>
            {
                Ok(())
            }
            _ => self.file()?.sync_all(),
        }
    }
}

/// Add `[start, end)` to the merged set of written ranges.
fn record(written: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if start == end {
        return;
    }
    // Merge with a range that starts at or before `start` and reaches it.
    if let Some((&s, &e)) = written.range(..=start).next_back() {
        if e >= start {
            start = s;
            end = end.max(e);
            written.remove(&s);
        }
    }
    // Swallow ranges that start inside the new one.
    while let Some((&s, &e)) = written.range(start..=end).next() {
        end = end.max(e);
        written.remove(&s);
    }
    written.insert(start, end);
}

/// What kind of destination an [`Output`] writes.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A new file, created under a temporary name and renamed into place.
    New,
    /// An existing regular file, replaced atomically (a new inode with the old file's
    /// mode, owner and group).
    Replace,
    /// An existing regular file written in place (`-n`).
    ExistingFile,
    /// A block device, written in place.
    BlockDevice,
    /// A FIFO or character device (`/dev/stdout`), written sequentially.
    Stream,
    /// A regular file named through an open descriptor (`/dev/stdout` redirected to a
    /// file, `/proc/self/fd/N`): truncated and written in place, since a rename would
    /// not reach the descriptor's file.
    Descriptor,
}

/// How to open a destination.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputOptions {
    /// Write into the existing destination instead of creating it (qemu-img's `-n`):
    /// it must exist, and a regular file is written in place, not replaced.
    pub existing: bool,
    /// The destination already reads as zeros (qemu-img's `--target-is-zero`, only with
    /// `existing`): ranges the writer leaves unwritten are not zeroed.
    pub target_is_zero: bool,
}

/// A destination opened for writing, checked before any input is read: a new or replaced
/// regular file goes through [`AtomicOutput`]; a block device, an existing file under
/// `-n`, a FIFO or a character device is written in place. Nothing but the destination's
/// own name is ever replaced: a symlink is followed and the file it points to is
/// replaced, the link stays.
#[derive(Debug)]
pub struct Output {
    dest: PathBuf,
    kind: OutputKind,
    atomic: Option<AtomicOutput>,
    /// A second handle on the in-place or stream destination, to finish it after the
    /// writer (which owns the [`Sink`]) is gone.
    file: Option<File>,
    track: Option<Arc<Mutex<Track>>>,
    zero_fill: bool,
    existing_len: Option<u64>,
    /// Digests to compute (see [`request_digests`](Self::request_digests)).
    digests: Vec<DigestAlgo>,
    /// A fresh file's on-the-way digests, shared with its sink.
    follow: Option<Arc<Mutex<Follow>>>,
}

fn io_err(what: &str, dest: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.to_string();
    let dest = dest.to_path_buf();
    move |e| Error::io(what, e).with_path(dest)
}

/// Size of an open block device (seeking to its end, which every block driver supports).
fn device_size(file: &File) -> std::io::Result<u64> {
    // SAFETY: lseek on a valid descriptor; positional I/O elsewhere ignores the position.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r as u64)
}

impl Output {
    /// Check and open the destination `dest`, before anything is read: a folder, a
    /// missing or unwritable parent folder, a socket, or `-n` on a missing file fail at
    /// once, naming `dest`. Returns the output and the [`Sink`] to give the writer.
    pub fn open(dest: &Path, opts: &OutputOptions) -> Result<(Output, Sink)> {
        let meta = match std::fs::metadata(dest) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io("cannot open the output", e).with_path(dest)),
        };
        let out = |kind, atomic, file, track, existing_len| Output {
            dest: dest.to_path_buf(),
            kind,
            atomic,
            file,
            track,
            zero_fill: !opts.target_is_zero,
            existing_len,
            digests: Vec::new(),
            follow: None,
        };
        let Some(meta) = meta else {
            if opts.existing {
                return Err(Error::arg(
                    "-n: the output does not exist (it must be created beforehand)",
                )
                .with_path(dest));
            }
            let target = resolve_missing(dest)?;
            let dir = parent_dir(&target);
            match std::fs::metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(
                        Error::arg(format!("{} is not a folder", dir.display())).with_path(dest)
                    )
                }
                Err(e) => {
                    return Err(Error::io(
                        format!("cannot create the output in {}", dir.display()),
                        e,
                    )
                    .with_path(dest))
                }
            }
            let (a, f) = AtomicOutput::create_with_mode(&target, dest, 0o666)?;
            return Ok((out(OutputKind::New, Some(a), None, None, None), f.into()));
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(Error::arg("the output is a directory").with_path(dest));
        }
        if ft.is_socket() {
            return Err(Error::arg(
                "the output is a socket; write to a file, a block device, a FIFO or a character device",
            )
            .with_path(dest));
        }
        if ft.is_file() && !opts.existing && through_descriptor(dest) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(dest)
                .map_err(io_err("cannot open the output for writing", dest))?;
            let handle = file
                .try_clone()
                .map_err(io_err("cannot open the output for writing", dest))?;
            return Ok((
                out(OutputKind::Descriptor, None, Some(handle), None, None),
                file.into(),
            ));
        }
        if ft.is_file() && !opts.existing {
            let target = if std::fs::symlink_metadata(dest)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
            {
                dest.canonicalize()
                    .map_err(io_err("cannot resolve the output's symlink", dest))?
            } else {
                dest.to_path_buf()
            };
            let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
                .map_err(|_| Error::arg("output path contains a NUL byte").with_path(dest))?;
            // SAFETY: access with a valid NUL-terminated path.
            if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
                return Err(Error::io(
                    "the output exists and is not writable",
                    std::io::Error::last_os_error(),
                )
                .with_path(dest));
            }
            // 0600 until the old mode is copied, so a private file's new content is
            // never readable by others, not even briefly.
            let (a, f) = AtomicOutput::create_with_mode(&target, dest, 0o600)?;
            copy_owner_and_mode(&f, &meta).map_err(io_err(
                "cannot give the new output the old file's mode",
                dest,
            ))?;
            return Ok((
                out(OutputKind::Replace, Some(a), None, None, None),
                f.into(),
            ));
        }
        // In place: an existing file under -n, a block device, a FIFO or a character
        // device. Opening a FIFO waits for its reader, as any writer does.
        use std::os::unix::fs::OpenOptionsExt;
        let mut oo = std::fs::OpenOptions::new();
        oo.write(true).custom_flags(libc::O_NOCTTY);
        if ft.is_block_device() {
            // O_EXCL on a block device: refuse one that is mounted or otherwise held.
            oo.custom_flags(libc::O_NOCTTY | libc::O_EXCL);
        }
        let file = oo
            .open(dest)
            .map_err(io_err("cannot open the output for writing", dest))?;
        let now = file
            .metadata()
            .map_err(io_err("cannot stat the output", dest))?;
        if now.file_type() != ft || now.ino() != meta.ino() || now.dev() != meta.dev() {
            return Err(Error::arg("the output changed while it was being opened").with_path(dest));
        }
        let (kind, track, existing_len, file) = if ft.is_block_device() || ft.is_file() {
            let (kind, capacity, len) = if ft.is_block_device() {
                let size =
                    device_size(&file).map_err(io_err("cannot size the block device", dest))?;
                (OutputKind::BlockDevice, Some(size), size)
            } else {
                (OutputKind::ExistingFile, None, now.len())
            };
            let t = Track::InPlace {
                capacity,
                len: 0,
                written: BTreeMap::new(),
            };
            (kind, t, Some(len), Some(file))
        } else {
            let t = Track::Stream {
                pos: 0,
                len: 0,
                out: StreamOut {
                    w: Box::new(file),
                    digests: None,
                },
            };
            (OutputKind::Stream, t, None, None)
        };
        let track = Arc::new(Mutex::new(track));
        let handle = match &file {
            Some(f) => Some(
                f.try_clone()
                    .map_err(io_err("cannot open the output for writing", dest))?,
            ),
            None => None,
        };
        let sink = Sink {
            file,
            track: Some(track.clone()),
            follow: None,
            dirty: Default::default(),
        };
        Ok((out(kind, None, handle, Some(track), existing_len), sink))
    }

    /// A stream output over any [`Write`] (stdout, a socket, an HTTP body, a channel),
    /// named `name` in errors. Like a FIFO: forward positional writes become sequential
    /// ones, gaps and the tail are sent as zeros, a write behind what was sent is refused.
    pub fn from_writer(name: &Path, w: Box<dyn Write + Send>) -> (Output, Sink) {
        let track = Arc::new(Mutex::new(Track::Stream {
            pos: 0,
            len: 0,
            out: StreamOut { w, digests: None },
        }));
        let out = Output {
            dest: name.to_path_buf(),
            kind: OutputKind::Stream,
            atomic: None,
            file: None,
            track: Some(track.clone()),
            zero_fill: true,
            existing_len: None,
            digests: Vec::new(),
            follow: None,
        };
        let sink = Sink {
            file: None,
            track: Some(track),
            follow: None,
            dirty: Default::default(),
        };
        (out, sink)
    }

    /// Compute `algos` over the output's bytes, reported by [`finish`](Self::finish). Call
    /// before anything is written to `sink` (this output's). A stream hashes each byte as
    /// it is sent, and so does a new file while its writer writes in order (raw, vpc
    /// fixed, streamOptimized vmdk), on the thread that writes; a file written out of order
    /// (qcow2, dynamic vpc, vdi, monolithicSparse vmdk) or in place is read once when
    /// finished instead.
    pub fn request_digests(&mut self, algos: &[DigestAlgo], sink: &mut Sink) {
        self.digests = algos.to_vec();
        let fresh = (!algos.is_empty()).then(|| Digester::new(algos));
        if let Some(t) = &self.track {
            if let Track::Stream { out, .. } = &mut *t.lock().unwrap_or_else(|p| p.into_inner()) {
                out.digests = fresh;
            }
        } else if fresh.is_some() && sink.track.is_none() {
            let f = Arc::new(Mutex::new(Follow {
                pos: 0,
                digests: fresh,
            }));
            sink.follow = Some(f.clone());
            self.follow = Some(f);
        }
    }

    /// What kind of destination this is.
    pub fn kind(&self) -> OutputKind {
        self.kind
    }

    /// The destination's size when it is written in place (a block device's size, an
    /// existing file's length); None for new, replaced and stream outputs.
    pub fn existing_len(&self) -> Option<u64> {
        self.existing_len
    }

    /// The destination as given.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    /// Complete the output after the writer finished: rename a new or replaced file into
    /// place, zero what the writer left unwritten in place (unless the target is known to
    /// be zero), pad a stream to its final length. With `sync`, flush to stable storage
    /// first. Dropped without this, a new or replaced file leaves nothing behind. Returns
    /// the output's length and the digests asked for.
    pub fn finish(self, sync: bool) -> Result<Finished> {
        let followed = self.follow.as_ref().and_then(|f| {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            let pos = f.pos;
            f.digests.take().map(|d| (pos, d))
        });
        let hashed = |file: &File, len: u64| -> Result<Finished> {
            let digests = if self.digests.is_empty() {
                Vec::new()
            } else if let Some((pos, mut d)) = followed.filter(|(pos, _)| *pos <= len) {
                // The file's tail past the last write is a hole.
                let mut gap = len - pos;
                while gap > 0 {
                    let k = gap.min(ZEROS.len() as u64) as usize;
                    d.update(&ZEROS[..k]);
                    gap -= k as u64;
                }
                d.finish()
            } else {
                Digester::of_file(file, len, &self.digests)
                    .map_err(io_err(
                        "reading the finished output for its digests",
                        &self.dest,
                    ))?
                    .finish()
            };
            Ok(Finished { len, digests })
        };
        if let Some(a) = self.atomic {
            let f = File::open(a.temp_path())
                .map_err(io_err("cannot reopen the finished output", &self.dest))?;
            let len = f
                .metadata()
                .map_err(io_err("cannot stat the output", &self.dest))?
                .len();
            let done = hashed(&f, len)?;
            a.commit(sync)?;
            return Ok(done);
        }
        let Some(track) = &self.track else {
            // A file named through a descriptor: its write-only handle is reopened for
            // reading through the same name.
            let Some(file) = &self.file else {
                return Ok(Finished::default());
            };
            if sync {
                file.sync_all()
                    .map_err(io_err("flushing output", &self.dest))?;
            }
            let len = file
                .metadata()
                .map_err(io_err("cannot stat the output", &self.dest))?
                .len();
            if self.digests.is_empty() {
                return Ok(Finished {
                    len,
                    digests: Vec::new(),
                });
            }
            let f = File::open(&self.dest)
                .map_err(io_err("cannot reopen the finished output", &self.dest))?;
            return hashed(&f, len);
        };
        let mut t = track.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *t {
            Track::Stream { pos, len, out } => {
                write_zeros(&mut *out, *len - *pos)
                    .and_then(|()| out.flush())
                    .map_err(io_err("writing the output's last zeros", &self.dest))?;
                *pos = *len;
                Ok(Finished {
                    len: *len,
                    digests: out.digests.take().map(Digester::finish).unwrap_or_default(),
                })
            }
            Track::InPlace { len, written, .. } => {
                let Some(file) = &self.file else {
                    return Err(Error::arg("an in-place output has no file").with_path(&self.dest));
                };
                let bound = written.values().next_back().copied().unwrap_or(0).max(*len);
                if self.zero_fill {
                    let block = self.kind == OutputKind::BlockDevice;
                    let mut at = 0u64;
                    let mut gaps: Vec<(u64, u64)> = Vec::new();
                    for (&s, &e) in written.iter() {
                        if s > at {
                            gaps.push((at, s.min(bound)));
                        }
                        at = e;
                    }
                    if at < bound {
                        gaps.push((at, bound));
                    }
                    for (s, e) in gaps {
                        zero_range(file, block, s, e).map_err(io_err(
                            "zeroing unwritten ranges of the output",
                            &self.dest,
                        ))?;
                    }
                }
                if sync {
                    file.sync_all()
                        .map_err(io_err("flushing output", &self.dest))?;
                }
                if self.digests.is_empty() {
                    return Ok(Finished {
                        len: bound,
                        digests: Vec::new(),
                    });
                }
                let f = File::open(&self.dest)
                    .map_err(io_err("cannot reopen the finished output", &self.dest))?;
                hashed(&f, bound)
            }
        }
    }
}

/// Whether `dest` reaches its file through a descriptor link (`/dev/stdout`,
/// `/dev/fd/N`, `/proc/<pid>/fd/N`), whose target names are not real paths.
fn through_descriptor(dest: &Path) -> bool {
    let mut p = dest.to_path_buf();
    for _ in 0..40 {
        if p.starts_with("/proc") || p.starts_with("/dev/fd") {
            return true;
        }
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&p) {
                Ok(t) if t.is_absolute() => p = t,
                Ok(t) => p = parent_dir(&p).join(t),
                Err(_) => return false,
            },
            _ => return false,
        }
    }
    false
}

/// Follow a chain of symlinks ending at a name that does not exist yet (a dangling
/// link), so the new file is created where the link points and the link stays a link.
fn resolve_missing(dest: &Path) -> Result<PathBuf> {
    let mut p = dest.to_path_buf();
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let t = std::fs::read_link(&p)
                    .map_err(io_err("cannot read the output's symlink", dest))?;
                p = if t.is_absolute() {
                    t
                } else {
                    parent_dir(&p).join(t)
                };
            }
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(Error::io("cannot open the output", e).with_path(dest)),
        }
    }
    Err(Error::arg("too many levels of symbolic links").with_path(dest))
}

/// Give `file` the owner, group and permission bits of `old` (the file it replaces).
/// An owner we may not set (not root) is left as ours, and then set-id bits are dropped:
/// they must never pass to a file owned by someone else.
fn copy_owner_and_mode(file: &File, old: &std::fs::Metadata) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    let mut mode = old.mode() & 0o7777;
    // SAFETY: fchown on a valid descriptor.
    if unsafe { libc::fchown(fd, old.uid(), old.gid()) } != 0 {
        // SAFETY: as above; uid -1 leaves the owner unchanged.
        let _ = unsafe { libc::fchown(fd, u32::MAX, old.gid()) };
        mode &= 0o777;
    }
    // SAFETY: fchmod on a valid descriptor.
    if unsafe { libc::fchmod(fd, mode) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make `[start, end)` of an in-place destination read as zeros: BLKZEROOUT on a block
/// device, a punched hole in a file, plain zero writes where neither is supported.
fn zero_range(file: &File, block: bool, start: u64, end: u64) -> std::io::Result<()> {
    if start >= end {
        return Ok(());
    }
    let fd = file.as_raw_fd();
    if block {
        // The ioctl takes whole 512-byte sectors; unaligned edges are written.
        let a = start.next_multiple_of(512);
        let b = end / 512 * 512;
        if a < b {
            let range: [u64; 2] = [a, b - a];
            // SAFETY: BLKZEROOUT reads a [u64; 2] (start, length) from the pointer.
            let r = unsafe { libc::ioctl(fd, libc::_IO(0x12, 127), range.as_ptr()) };
            if r == 0 {
                write_zeros_at(file, start, a)?;
                return write_zeros_at(file, b, end);
            }
        }
    } else {
        let (Ok(s), Ok(l)) = (i64::try_from(start), i64::try_from(end - start)) else {
            return write_zeros_at(file, start, end);
        };
        // SAFETY: fallocate on a valid descriptor; KEEP_SIZE never changes the length.
        let r = unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                s,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    write_zeros_at(file, start, end)
}

fn write_zeros_at(file: &File, mut at: u64, end: u64) -> std::io::Result<()> {
    while at < end {
        let k = (end - at).min(ZEROS.len() as u64) as usize;
        file.write_all_at(&ZEROS[..k], at)?;
        at += k as u64;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_ranges_merge() {
        let mut w = BTreeMap::new();
        record(&mut w, 0, 10);
        record(&mut w, 10, 20);
        record(&mut w, 30, 40);
        assert_eq!(
            w.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(0, 20), (30, 40)]
        );
        record(&mut w, 15, 35);
        assert_eq!(
            w.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(0, 40)]
        );
        record(&mut w, 50, 60);
        record(&mut w, 45, 70);
        record(&mut w, 5, 6);
        assert_eq!(
            w.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>(),
            [(0, 40), (45, 70)]
        );
    }

    #[test]
    fn a_stream_fills_gaps_pads_its_length_and_refuses_going_back() {
        use std::io::Read;
        use std::os::unix::io::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe fills two descriptors, each then owned by one File.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (mut rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            rd.read_to_end(&mut v).unwrap();
            v
        });
        let path = PathBuf::from(format!("/proc/self/fd/{}", wr.as_raw_fd()));
        let (out, sink) = Output::open(&path, &OutputOptions::default()).unwrap();
        drop(wr);
        assert_eq!(out.kind(), OutputKind::Stream);
        sink.set_len(20).unwrap();
        sink.write_all_at(b"ab", 0).unwrap();
        sink.write_all_at(b"cd", 10).unwrap();
        let e = sink.write_all_at(b"x", 5).unwrap_err();
        assert!(e.to_string().contains("cannot be written to a pipe"), "{e}");
        assert!(sink.set_len(4).is_err());
        drop(sink);
        out.finish(true).unwrap();
        let got = reader.join().unwrap();
        let mut want = vec![0u8; 20];
        want[..2].copy_from_slice(b"ab");
        want[10..12].copy_from_slice(b"cd");
        assert_eq!(got, want);
    }

    #[test]
    fn in_place_file_zeroes_what_was_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, vec![0xaau8; 8192]).unwrap();
        let opts = OutputOptions {
            existing: true,
            target_is_zero: false,
        };
        let (out, sink) = Output::open(&p, &opts).unwrap();
        assert_eq!(out.kind(), OutputKind::ExistingFile);
        assert_eq!(out.existing_len(), Some(8192));
        sink.set_len(6000).unwrap();
        sink.write_all_at(&[1u8; 100], 1000).unwrap();
        drop(sink);
        out.finish(false).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 8192, "an existing file is never shrunk");
        assert!(b[..1000].iter().all(|&x| x == 0));
        assert!(b[1000..1100].iter().all(|&x| x == 1));
        assert!(b[1100..6000].iter().all(|&x| x == 0));
        assert!(
            b[6000..].iter().all(|&x| x == 0xaa),
            "past the image: untouched"
        );
    }
}
