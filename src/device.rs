//! The core abstraction: a block device answers "where does this guest range live"
//! ([`BlockDevice::map`]) and "what are its bytes" ([`BlockDevice::read_at`]).
//!
//! The convert engine asks `map` first and never reads what is zero or unallocated, so a
//! 1 TiB image holding 2 GiB of data costs 2 GiB of work. `read_at` takes `&self` so
//! several threads can read, decompress and convert at once.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, Side};
use crate::format::Format;

/// What a guest range is.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MappingKind {
    /// Guest data stored in the image; `host` is its offset in the image file when it is
    /// stored uncompressed and contiguously (None for compressed or otherwise indirect data).
    Data {
        /// Host offset of the first byte of the range, when meaningful.
        host: Option<u64>,
    },
    /// Explicitly recorded as zeros (qcow2 zero flag, vmdk zeroed grain, ...).
    Zero,
    /// Not allocated: reads as zeros (or from a backing image when one is attached).
    Unallocated,
}

/// One contiguous guest range of a single [`MappingKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mapping {
    /// Guest offset of the range's start.
    pub offset: u64,
    /// Length in bytes, at least 1 and never past the virtual size.
    pub len: u64,
    /// What the range is.
    pub kind: MappingKind,
}

impl Mapping {
    /// True when the range reads as zeros without reading the image.
    pub fn is_zero(&self) -> bool {
        !matches!(self.kind, MappingKind::Data { .. })
    }
}

/// What qemu's block status says of a guest range (`qemu-img map`'s entry): which image
/// of the backing chain answers for it and how. [`BlockDevice::block_status`] gives it;
/// `map` and `compare` are built on it so they agree with qemu-img.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlockStatus {
    /// Guest offset of the range's start.
    pub offset: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// 0 when this image answers; n when the nth backing image does (or, with `present`
    /// false, the chain's length: nobody does).
    pub depth: u32,
    /// Allocated in some image of the chain (qemu's BDRV_BLOCK_ALLOCATED).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored as data (possibly zero data, with `zero` also set).
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Where it is stored uncompressed: the host offset in `file`.
    pub host: Option<u64>,
    /// The file `host` is in, when it is not the image itself (an extent, a data file, a
    /// backing image).
    pub file: Option<PathBuf>,
}

impl BlockStatus {
    /// qemu's look into the file under data stored at `host`: where the file has a hole
    /// the range reads as zeros (still data), and the range ends where that changes.
    pub fn refine_by_host(mut self, file: &HostFile) -> Self {
        if let (true, false, Some(h)) = (self.data, self.zero, self.host) {
            if let Some((hole, n)) = file.hole_extent(h, self.len) {
                self.len = n.max(1);
                self.zero = hole;
            }
        }
        self
    }

    /// Shorten a status that runs to the end of a device of `size` bytes so that only the
    /// last `unit` reaches it: formats qemu answers one block at a time (vmdk grains, vdi
    /// blocks) set qemu's end-of-file flag on their last block only, and qemu-img
    /// compare's strict mode compares that flag.
    pub fn end_in_units(mut self, size: u64, unit: u64) -> Self {
        let last = (size.saturating_sub(1) / unit.max(1)) * unit.max(1);
        if self.offset + self.len >= size && last > self.offset {
            self.len = last - self.offset;
        }
        self
    }

    /// qemu's view of one of our mappings in a format whose unallocated ranges are
    /// `unallocated_present` (vpc and vdi report them allocated zero; formats with a
    /// backing chain report them unallocated).
    pub fn from_mapping(m: &Mapping, unallocated_present: bool) -> Self {
        let (present, zero, data, host) = match m.kind {
            MappingKind::Data { host } => (true, false, true, host),
            MappingKind::Zero => (true, true, false, None),
            MappingKind::Unallocated => (unallocated_present, true, false, None),
        };
        BlockStatus {
            offset: m.offset,
            len: m.len,
            depth: 0,
            present,
            zero,
            data,
            compressed: false,
            host,
            file: None,
        }
    }
}

/// One internal snapshot of an image (qcow2), as `info` and `snapshot -l` list it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    /// Its ID string (qemu numbers them "1", "2", ...).
    pub id: String,
    /// Its name (tag).
    pub name: String,
    /// Bytes of saved VM state (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// When it was taken: seconds since the epoch.
    pub date_sec: u32,
    /// ... and nanoseconds.
    pub date_nsec: u32,
    /// The guest clock when it was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// The instruction count (record/replay), when recorded.
    pub icount: Option<u64>,
    /// The guest size when it was taken, when recorded.
    pub disk_size: Option<u64>,
}

/// Facts about an opened image, for `info` and `inspect`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ImageInfo {
    /// The qemu-img name of the format ("raw", "qcow2", "vpc", "vmdk", "vdi").
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Allocation unit (qcow2 cluster, vhd block, vmdk grain, vdi block), when the format has one.
    pub cluster_size: Option<u64>,
    /// Whether the image says it was not closed cleanly.
    pub dirty: Option<bool>,
    /// The backing/parent file the image names, if any (never opened unless allowed).
    pub backing_file: Option<String>,
    /// The format the image names for its backing file, if any.
    pub backing_format: Option<String>,
    /// Other files the image names (extents, data file), as written in the image.
    pub referenced_files: Vec<String>,
    /// qemu-img's `format-specific` object: {"type": ..., "data": {...}}.
    pub format_specific: Option<serde_json::Value>,
    /// Things worth telling a user that are not errors (dirty bit, unknown autoclear bits, ...).
    pub warnings: Vec<String>,
    /// Internal snapshots (qcow2), in table order.
    pub snapshots: Vec<SnapshotInfo>,
}

/// A readable disk image of any format.
pub trait BlockDevice: Send + Sync {
    /// Guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// What the range starting at `offset` is, up to `max_len` bytes (the returned range
    /// may be shorter; it is never empty when `offset < virtual_size` and `max_len > 0`).
    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping>;

    /// Fill `buf` with guest bytes starting at `offset`. Reading past the virtual size is
    /// an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Facts about the image for `info`.
    fn info(&self) -> ImageInfo;

    /// The format of this device.
    fn format(&self) -> Format;

    /// qemu's block status of the range at `offset` (up to `max_len` bytes; it may come
    /// back shorter), for `map` and `compare`. The default reads it off [`map`](Self::map);
    /// a format whose answer differs from qemu's that way (backing depth, compressed
    /// clusters, host holes) answers itself.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::from_mapping(
            &self.map(offset, max_len)?,
            false,
        ))
    }

    /// The container the disk was read from (an OVA appliance), as its name and the
    /// facts `info --output=json` shows under that key; None for a plain image.
    fn container_info(&self) -> Option<(&'static str, serde_json::Value)> {
        None
    }

    /// True when qemu's driver for this format answers no block status (vhdx): qemu
    /// then reports every range as allocated data without a host offset, and `map` and
    /// `measure` follow it (see [`qemu_block_status`]). [`block_status`](Self::block_status)
    /// still tells the truth, so `compare` skips what is unallocated.
    fn qemu_status_opaque(&self) -> bool {
        false
    }

    /// The persistent dirty bitmaps the image holds, as (name, granularity in bytes), which
    /// qemu-img measure counts; None when the format cannot store them (qemu's
    /// `bdrv_supports_persistent_dirty_bitmap`: qcow2 v3 only).
    fn persistent_bitmaps(&self) -> Result<Option<Vec<(String, u64)>>> {
        Ok(None)
    }
}

/// What qemu's block layer answers for `dev` at `offset`: its
/// [`block_status`](BlockDevice::block_status), except for formats whose qemu driver has
/// none ([`qemu_status_opaque`](BlockDevice::qemu_status_opaque)), where qemu reports the
/// whole range as allocated data without a host offset.
pub fn qemu_block_status(dev: &dyn BlockDevice, offset: u64, max_len: u64) -> Result<BlockStatus> {
    if !dev.qemu_status_opaque() {
        return dev.block_status(offset, max_len);
    }
    let end = map_end(dev.virtual_size(), offset, max_len)?;
    Ok(BlockStatus {
        offset,
        len: end - offset,
        depth: 0,
        present: true,
        zero: false,
        data: true,
        compressed: false,
        host: None,
        file: None,
    })
}

#[doc(hidden)] // a helper of the format readers, not a stable API
/// Check that `[offset, offset+len)` lies inside a device of size `size`.
pub fn check_guest_range(size: u64, offset: u64, len: usize) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::arg(format!(
            "guest read of {len} bytes at {offset:#x} runs past the virtual size {size}"
        ))),
    }
}

#[doc(hidden)] // a helper of the format readers, not a stable API
/// Check a `map(offset, max_len)` request against a device of `size` bytes and return the
/// end of the range it may answer for (`offset + max_len`, clipped to the size). Every
/// format's `map` starts with this so the contract is enforced in one place.
pub fn map_end(size: u64, offset: u64, max_len: u64) -> Result<u64> {
    if offset >= size || max_len == 0 {
        return Err(Error::arg(format!(
            "map at {offset:#x} is outside the image (size {size})"
        )));
    }
    Ok(size.min(offset.saturating_add(max_len)))
}

#[doc(hidden)] // a helper of the format readers, not a stable API
/// Fill `buf` with what an unallocated range at guest `offset` holds in a copy-on-write
/// image: its backing image's bytes where the backing reaches, zeros past its end or
/// without one (a backing image may be shorter than its overlay).
pub fn read_unallocated(
    backing: Option<&dyn BlockDevice>,
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    let Some(b) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let n = b
        .virtual_size()
        .saturating_sub(offset)
        .min(buf.len() as u64) as usize;
    if n > 0 {
        b.read_at(&mut buf[..n], offset)?;
    }
    buf[n..].fill(0);
    Ok(())
}

#[doc(hidden)] // a helper of the format readers, not a stable API
/// What an unallocated range of `len` bytes at guest `off` of a copy-on-write image is, as
/// qemu reports it: data (without a host offset) where the backing image holds data, so a
/// conversion reads it; unallocated where the backing is zero, ends, or is absent. The
/// answer may cover less than `len` (at least one byte).
pub fn unallocated_kind(
    backing: Option<&dyn BlockDevice>,
    off: u64,
    len: u64,
) -> Result<(u64, MappingKind)> {
    match backing {
        Some(b) if off < b.virtual_size() => {
            let n = len.min(b.virtual_size() - off);
            let m = b.map(off, n)?;
            let n = m.len.clamp(1, n);
            Ok(if m.is_zero() {
                (n, MappingKind::Unallocated)
            } else {
                (n, MappingKind::Data { host: None })
            })
        }
        _ => Ok((len, MappingKind::Unallocated)),
    }
}

#[doc(hidden)] // a helper of the format readers, not a stable API
/// A `map` answer built from consecutive pieces of a table walk (clusters of a
/// copy-on-write image): pieces join the run while they are of the same kind, and data
/// pieces only while they also continue in the host file, so one [`Mapping`] never claims
/// a host range the image does not store in one piece.
#[derive(Debug)]
pub struct MapRun {
    offset: u64,
    end: u64,
    kind: Option<MappingKind>,
}

impl MapRun {
    /// An empty run starting at guest `offset`.
    pub fn new(offset: u64) -> Self {
        MapRun {
            offset,
            end: offset,
            kind: None,
        }
    }

    /// The guest offset the next piece must start at.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Add the piece of `len` bytes at [`end`](Self::end) of kind `kind`; false, leaving
    /// the run as it was, when the piece does not continue it.
    pub fn push(&mut self, len: u64, kind: MappingKind) -> bool {
        if let Some(prev) = self.kind {
            let continues = match (prev, kind) {
                (MappingKind::Data { host: Some(a) }, MappingKind::Data { host: Some(b) }) => {
                    b == a + (self.end - self.offset)
                }
                (a, b) => a == b,
            };
            if !continues {
                return false;
            }
        } else {
            self.kind = Some(kind);
        }
        self.end += len;
        true
    }

    /// The run as one mapping (unallocated when empty).
    pub fn finish(self) -> Mapping {
        Mapping {
            offset: self.offset,
            len: self.end - self.offset,
            kind: self.kind.unwrap_or(MappingKind::Unallocated),
        }
    }
}

#[doc(hidden)] // a helper of the format readers, not a stable API
/// Read the whole guest range `[offset, offset+buf.len())` by walking `map` and reading
/// only data ranges; zero and unallocated ranges are filled with zeros. Formats whose
/// `read_at` is naturally expressed through `map` use this.
pub fn read_via_map(
    dev: &dyn BlockDevice,
    buf: &mut [u8],
    offset: u64,
    mut read_data: impl FnMut(&mut [u8], u64) -> Result<()>,
) -> Result<()> {
    check_guest_range(dev.virtual_size(), offset, buf.len())?;
    let mut done = 0usize;
    while done < buf.len() {
        let m = dev.map(offset + done as u64, (buf.len() - done) as u64)?;
        let n = m.len.min((buf.len() - done) as u64) as usize;
        let part = &mut buf[done..done + n];
        if m.is_zero() {
            part.fill(0);
        } else {
            read_data(part, m.offset)?;
        }
        done += n;
    }
    Ok(())
}

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

/// Lets a borrowed device (`&dyn BlockDevice`) stand where an owner of one
/// (`Box<dyn BlockDevice>`, `Arc<dyn BlockDevice>`) is taken, as in [`DeviceReader`].
impl<'a> AsRef<dyn BlockDevice + 'a> for dyn BlockDevice + 'a {
    fn as_ref(&self) -> &(dyn BlockDevice + 'a) {
        self
    }
}

/// A `Read + Seek` view of any [`BlockDevice`]'s guest bytes, so callers can stream an
/// image's content into anything that takes a reader (hashers, HTTP bodies, tar writers).
///
/// `D` is anything that gives a device: `Box<dyn BlockDevice>` (from [`crate::open`]),
/// `Arc<dyn BlockDevice>`, or a borrowed `&dyn BlockDevice`. A failed read is an
/// [`std::io::Error`] that keeps the kind and carries the whole [`Error`] (side
/// [`Side::Source`]): `diskconv::Error::from(io_error)` gives it back.
pub struct DeviceReader<D> {
    dev: D,
    pos: u64,
}

impl<D> std::fmt::Debug for DeviceReader<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceReader")
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl<'a, D: AsRef<dyn BlockDevice + 'a>> DeviceReader<D> {
    /// A reader positioned at guest offset 0.
    pub fn new(dev: D) -> Self {
        DeviceReader { dev, pos: 0 }
    }
    /// Give back the device.
    pub fn into_inner(self) -> D {
        self.dev
    }
}

impl<'a, D: AsRef<dyn BlockDevice + 'a>> Read for DeviceReader<D> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let dev = self.dev.as_ref();
        let size = dev.virtual_size();
        if self.pos >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (size - self.pos).min(buf.len() as u64) as usize;
        dev.read_at(&mut buf[..n], self.pos)
            .map_err(|e| std::io::Error::from(e.on_side(Side::Source)))?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<'a, D: AsRef<dyn BlockDevice + 'a>> Seek for DeviceReader<D> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let size = self.dev.as_ref().virtual_size() as i128;
        let new = match pos {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => size + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 || new > u64::MAX as i128 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek out of range",
            ));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

/// The in-place side of a format, beside [`BlockDevice`]: operations that change an image
/// that already holds data (resize, and discard for in-place sparsify, today;
/// check-and-repair to come). Each format implements it in its own folder, reached through
/// [`crate::formats::open_editor`].
///
/// Contract: an implementation validates everything before its first write, and orders
/// its writes (new tables written and flushed first, one switching write last) so that a
/// failure at any write leaves the image reading exactly as before or exactly as after
/// (for a discard: as before outside the runs, whose data is free; qcow2 may then hold
/// leaked clusters, never corruption). All writes go through an
/// [`EditFile`](crate::writer::EditFile), whose fault hook lets tests fail every write in
/// turn and prove it.
pub trait ImageEditor: Send {
    /// Current guest size in bytes.
    fn virtual_size(&self) -> u64;

    /// Change the guest size to `new_size`: growing adds space that reads as zeros;
    /// shrinking drops the tail and needs [`ResizeOptions::shrink`](crate::options::ResizeOptions::shrink).
    fn resize(&mut self, new_size: u64, opts: &crate::options::ResizeOptions) -> Result<()>;

    /// Give back the storage of the guest ranges `runs` (ascending, disjoint `(offset,
    /// len)` pairs), which must read as zeros afterwards: in-place sparsify. Blocks wholly
    /// inside a run are unallocated (or marked zero) where the format allows; partial
    /// blocks are left as they are. Returns the bytes of guest data no longer stored. A
    /// format that can free nothing in place refuses with the reason.
    fn discard(&mut self, runs: &[(u64, u64)]) -> Result<u64> {
        let _ = runs;
        Err(Error::unsupported(
            "this image format cannot give back space in place",
        ))
    }
}

/// Check the runs given to [`ImageEditor::discard`]: each non-empty, ascending, disjoint
/// and inside a guest of `size` bytes. Every editor calls it before its first write.
pub fn check_discard_runs(size: u64, runs: &[(u64, u64)]) -> Result<()> {
    let mut prev_end = 0u64;
    for (i, &(off, len)) in runs.iter().enumerate() {
        let end = off.checked_add(len).filter(|&e| e <= size);
        let Some(end) = end.filter(|_| len > 0) else {
            return Err(Error::arg(format!(
                "discard run {i} ({len} bytes at {off:#x}) is empty or runs past the virtual size {size}"
            )));
        };
        if i > 0 && off < prev_end {
            return Err(Error::arg(format!(
                "discard run {i} at {off:#x} starts before the previous run's end {prev_end:#x} (runs must be ascending and disjoint)"
            )));
        }
        prev_end = end;
    }
    Ok(())
}

/// The whole units of `unit` bytes inside `[off, off+len)` of a guest of `size` bytes, as
/// a range of unit indices (empty when the run holds no whole unit): what a discard of
/// that run may drop. A last unit that the guest's end cuts short counts as whole when
/// the run reaches that end (its bytes past the end are never read).
pub fn whole_units(off: u64, len: u64, unit: u64, size: u64) -> std::ops::Range<u64> {
    let first = off.div_ceil(unit);
    let end = if off + len >= size {
        size.div_ceil(unit)
    } else {
        (off + len) / unit
    };
    first..end.max(first)
}
