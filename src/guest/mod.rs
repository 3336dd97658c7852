//! The guest floor: partition tables and filesystems read over any [`BlockDevice`], to
//! find the blocks the guest's filesystems mark free (what `sparsify` drops).
//!
//! Only metadata is read (partition tables, superblocks, bitmaps, FATs, B+trees), never
//! file data. Every scanner follows one rule: a structure that does not validate, a
//! feature it does not know to be safe, or a filesystem that was not cleanly unmounted
//! makes it report [`Outcome::Skipped`] with the reason, and then nothing in that
//! partition is dropped, because dropping one block in use destroys data.
//!
//! Shape: [`Region`] is a bounds-checked window of a device (a partition, a logical
//! volume); a scanner reports free byte ranges of its region to a [`FreeSink`]; the
//! scan driver ([`scan()`]) records them in a [`FreeMap`] and commits a partition's ranges
//! only when its scanner returns [`Outcome::Scanned`]; [`GuestFree`] wraps the device and
//! reports free granules as [`MappingKind::Zero`](crate::MappingKind::Zero) in `map`, so the convert engine and
//! every writer drop them without knowing filesystems.
//!
//! This floor imports only the core (`tests/pure/layering.rs` keeps it so).

pub mod ext;
pub mod fat;
pub mod files;
pub mod freemap;
pub mod gpt;
pub mod inspect;
pub mod lvm;
pub mod mbr;
pub mod ntfs;
pub mod scan;
pub mod swap;
pub mod table;
pub mod xfs;

pub use freemap::{FreeMap, GuestFree};
pub use scan::{scan, GuestScan, PartitionReport};

use crate::device::BlockDevice;
use crate::error::{Error, Result};

/// A window `[start, start+len)` of a device, read with offsets relative to its start and
/// never outside it, so a scanner cannot touch bytes of another partition.
#[derive(Clone, Copy)]
pub struct Region<'a> {
    dev: &'a dyn BlockDevice,
    start: u64,
    len: u64,
}

impl<'a> Region<'a> {
    /// The whole device.
    pub fn whole(dev: &'a dyn BlockDevice) -> Self {
        Region {
            dev,
            start: 0,
            len: dev.virtual_size(),
        }
    }

    /// The window `[start, start+len)` of `dev`; an error when it runs past the device.
    pub fn new(dev: &'a dyn BlockDevice, start: u64, len: u64) -> Result<Self> {
        match start.checked_add(len) {
            Some(end) if end <= dev.virtual_size() => Ok(Region { dev, start, len }),
            _ => Err(Error::corrupt(format!(
                "region of {len} bytes at {start:#x} runs past the end of the disk ({} bytes)",
                dev.virtual_size()
            ))),
        }
    }

    /// A sub-window, relative to this one.
    pub fn sub(&self, offset: u64, len: u64) -> Result<Region<'a>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(Region {
                dev: self.dev,
                start: self.start + offset,
                len,
            }),
            _ => Err(Error::corrupt(format!(
                "{len} bytes at {offset:#x} run past the end of the region ({} bytes)",
                self.len
            ))),
        }
    }

    /// Offset of this window on its device.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// Length of this window.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device this window is on.
    pub fn device(&self) -> &'a dyn BlockDevice {
        self.dev
    }

    /// Read `buf.len()` bytes at `offset` (relative); `what` names the structure so a
    /// short region gives "`what` ... runs past the end of the region".
    pub fn read_at(&self, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.dev.read_at(buf, self.start + offset),
            _ => Err(Error::corrupt(format!(
                "{what} ({} bytes at {offset:#x}) runs past the end of the region ({} bytes)",
                buf.len(),
                self.len
            ))
            .with_field(what.to_string())
            .at(offset)),
        }
    }

    /// Read `len` bytes at `offset` into a new buffer, after checking they lie in the
    /// region (so the allocation is bounded by the region, never by a claimed size) and
    /// against `limit`, the most the caller is prepared to hold at once.
    pub fn read_vec(&self, offset: u64, len: u64, limit: u64, what: &str) -> Result<Vec<u8>> {
        if len > limit {
            return Err(Error::limit(format!(
                "{what} is {len} bytes, more than the {limit} read at once"
            ))
            .with_field(what.to_string())
            .at(offset));
        }
        let mut v = vec![0u8; len as usize];
        self.read_at(&mut v, offset, what)?;
        Ok(v)
    }
}

/// Where a scanner reports free space: byte ranges relative to the region it was given.
/// Ranges may arrive in any order and may overlap; only whole granules of the
/// [`FreeMap`] inside a reported range are ever dropped.
pub trait FreeSink {
    /// `[offset, offset+len)` of the region is free in the filesystem.
    fn free(&mut self, offset: u64, len: u64);
}

/// What one filesystem scanner made of a region.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Not this filesystem (its magic is absent): the driver tries the next scanner.
    NotMine,
    /// This filesystem, fully validated and scanned: the free ranges reported to the sink
    /// may be dropped.
    Scanned {
        /// Name for the report: "ext4", "vfat", "ntfs", "xfs", "swap", ...
        fs: String,
    },
    /// This filesystem, but nothing in it may be dropped; whatever was reported to the
    /// sink is discarded.
    Skipped {
        /// Name for the report.
        fs: String,
        /// Why, naming the field, offset or flag: "needs_recovery is set (journal not
        /// replayed)", "block bitmap of group 3 fails its checksum", ...
        reason: String,
    },
}

/// A filesystem scanner: looks at the start of `region` for its magic and, when found,
/// reports the free ranges to `sink`. An `Err` (an unreadable block) is treated like
/// [`Outcome::Skipped`] by the driver.
pub type Scanner = fn(region: &Region<'_>, sink: &mut dyn FreeSink) -> Result<Outcome>;
