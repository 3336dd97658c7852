//! The core abstraction: a block device answers "where does this guest range live"
//! ([`BlockDevice::map`]) and "what are its bytes" ([`BlockDevice::read_at`]).
//!
//! The convert engine asks `map` first and never reads what is zero or unallocated, so a
//! 1 TiB image holding 2 GiB of data costs 2 GiB of work. `read_at` takes `&self` so
//! several threads can read, decompress and convert at once.
//!
//! Here the types, the traits and the readers' helpers; `host.rs` holds [`HostFile`], the
//! bounds-checked image file every reader reads through (it knows nothing of this file).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use crate::error::{Error, Result, Side};
use crate::format::Format;

mod host;

pub use host::{HostFile, RangeSource};

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
    /// `len` bytes at `offset` allocated in this image as data, with no host offset yet:
    /// where a table walk starts before it knows how the range is stored.
    pub fn data(offset: u64, len: u64) -> Self {
        BlockStatus {
            offset,
            len,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            host: None,
            file: None,
        }
    }

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
    Ok(BlockStatus::data(offset, end - offset))
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
/// that already holds data (resize, discard for in-place sparsify, and internal
/// snapshots, today; check-and-repair to come). Each format implements it in its own folder, reached through
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

    /// Create, delete or apply an internal snapshot (`qemu-img snapshot -c/-d/-a`). A
    /// format without internal snapshots refuses with qemu-img's words for each.
    fn snapshot(&mut self, op: &SnapshotOp<'_>) -> Result<()> {
        Err(match op {
            SnapshotOp::Create(_) => Error::unsupported("Operation not supported"),
            SnapshotOp::Apply(_) => Error::unsupported("Block driver does not support snapshots"),
            SnapshotOp::Delete(_) => Error::unsupported("snapshot not found"),
        })
    }
}

/// Which internal snapshot an operation names.
///
/// Closed: a qcow2 snapshot table entry has exactly two keys, its ID and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotSel<'a> {
    /// The first snapshot with this name (qemu-img's `snapshot -d`).
    Name(&'a str),
    /// The snapshot with this ID.
    Id(&'a str),
    /// The snapshot with this ID, else the first with this name (qemu-img's
    /// `snapshot -a`).
    IdOrName(&'a str),
}

impl<'a> SnapshotSel<'a> {
    /// The text the caller gave (for messages).
    pub fn text(&self) -> &'a str {
        match *self {
            SnapshotSel::Name(s) | SnapshotSel::Id(s) | SnapshotSel::IdOrName(s) => s,
        }
    }
}

/// An internal snapshot operation, see [`ImageEditor::snapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotOp<'a> {
    /// Snapshot the current guest content under this name (with the next free ID; names
    /// need not be unique, as in qemu).
    Create(&'a str),
    /// Delete a snapshot.
    Delete(SnapshotSel<'a>),
    /// Make a snapshot's content (and guest size) the current one; the snapshot stays.
    Apply(SnapshotSel<'a>),
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
