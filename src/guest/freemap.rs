//! Free space as a bitmap of fixed granules over the whole disk, and the device wrapper
//! that reports it as zeros.
//!
//! A bitmap rather than an extent list: its size is fixed by the disk size (at most
//! [`FreeMap::MAX_BYTES`]), whatever the fragmentation of the guest's free space, so a
//! hostile or merely fragmented 16 TiB filesystem cannot make it grow.

use crate::device::{map_end, BlockDevice, ImageInfo, Mapping, MappingKind};
use crate::error::Result;
use crate::format::Format;

/// Which granules of a disk are free. A granule is free only when a scanner reported
/// every byte of it free.
#[derive(Debug, Clone)]
pub struct FreeMap {
    size: u64,
    shift: u32,
    bits: Vec<u64>,
}

impl FreeMap {
    /// The most memory the bitmap takes, whatever the disk size (16 MiB).
    pub const MAX_BYTES: u64 = 16 << 20;
    /// The smallest granule: one 4 KiB page, the usual filesystem block.
    pub const MIN_GRANULE: u64 = 4096;

    /// An all-used map for a disk of `size` bytes; the granule is the smallest power of
    /// two, at least 4 KiB, that keeps the bitmap within [`MAX_BYTES`](Self::MAX_BYTES).
    pub fn new(size: u64) -> Self {
        let mut shift = Self::MIN_GRANULE.trailing_zeros();
        while size.div_ceil(1u64 << shift) > Self::MAX_BYTES * 8 {
            shift += 1;
        }
        let granules = size.div_ceil(1u64 << shift);
        FreeMap {
            size,
            shift,
            bits: vec![0; granules.div_ceil(64) as usize],
        }
    }

    /// Disk size this map covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Granule size in bytes.
    pub fn granule(&self) -> u64 {
        1 << self.shift
    }

    fn granules(&self) -> u64 {
        self.size.div_ceil(self.granule())
    }

    /// Mark free every granule wholly inside `[offset, offset+len)` (disk offsets); a
    /// partial last granule of the disk counts as whole when the range reaches the end.
    /// Returns the bytes newly marked free.
    pub fn mark_free(&mut self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len).min(self.size);
        let g = self.granule();
        let first = offset.div_ceil(g);
        let last = if end == self.size {
            self.granules()
        } else {
            end / g
        };
        let mut newly = 0;
        for i in first..last.max(first) {
            let (w, b) = ((i / 64) as usize, i % 64);
            if self.bits[w] & (1 << b) == 0 {
                self.bits[w] |= 1 << b;
                newly += self.granule_len(i);
            }
        }
        newly
    }

    /// Mark used again every granule touching `[offset, offset+len)`: how the driver
    /// takes back what a scanner reported before it gave up on a partition.
    pub fn clear(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return;
        }
        let g = self.granule();
        for i in offset / g..end.div_ceil(g) {
            self.bits[(i / 64) as usize] &= !(1 << (i % 64));
        }
    }

    fn granule_len(&self, i: u64) -> u64 {
        let g = self.granule();
        g.min(self.size - i * g)
    }

    fn is_free_granule(&self, i: u64) -> bool {
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Whether the byte at `offset` is free, and how many bytes from `offset` (at most
    /// `max_len`) share that state.
    pub fn run_at(&self, offset: u64, max_len: u64) -> (bool, u64) {
        let end = offset.saturating_add(max_len).min(self.size);
        if offset >= end {
            return (false, 0);
        }
        let g = self.granule();
        let mut i = offset / g;
        let free = self.is_free_granule(i);
        let last = (end - 1) / g;
        while i < last {
            let next = i + 1;
            // Skip whole words of the same state.
            if next.is_multiple_of(64) && next + 64 <= last + 1 {
                let w = self.bits[(next / 64) as usize];
                if (free && w == u64::MAX) || (!free && w == 0) {
                    i = next + 63;
                    continue;
                }
            }
            if self.is_free_granule(next) != free {
                break;
            }
            i = next;
        }
        let run_end = ((i + 1) * g).min(end);
        (free, run_end - offset)
    }

    /// Total free bytes.
    pub fn free_bytes(&self) -> u64 {
        let mut n = 0;
        let mut off = 0;
        while off < self.size {
            let (free, len) = self.run_at(off, self.size - off);
            if free {
                n += len;
            }
            off += len;
        }
        n
    }

    /// The free runs as (disk offset, length), ascending and merged.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut off = 0;
        std::iter::from_fn(move || {
            while off < self.size {
                let (free, len) = self.run_at(off, self.size - off);
                let start = off;
                off += len;
                if free {
                    return Some((start, len));
                }
            }
            None
        })
    }
}

/// A device whose guest-free granules read as zeros and map as [`MappingKind::Zero`];
/// everything else is passed through unchanged.
pub struct GuestFree<D> {
    inner: D,
    free: FreeMap,
}

impl<D: AsRef<dyn BlockDevice>> GuestFree<D> {
    /// Wrap `inner`; `free` must have been built for a disk of its size.
    pub fn new(inner: D, free: FreeMap) -> Self {
        debug_assert_eq!(free.size(), inner.as_ref().virtual_size());
        GuestFree { inner, free }
    }

    /// The free map.
    pub fn free_map(&self) -> &FreeMap {
        &self.free
    }

    /// Give back the wrapped device.
    pub fn into_inner(self) -> D {
        self.inner
    }
}

impl<D: AsRef<dyn BlockDevice> + Send + Sync> BlockDevice for GuestFree<D> {
    fn virtual_size(&self) -> u64 {
        self.inner.as_ref().virtual_size()
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = map_end(self.virtual_size(), offset, max_len)?;
        let m = self.inner.as_ref().map(offset, end - offset)?;
        if m.is_zero() {
            return Ok(m);
        }
        let (free, len) = self.free.run_at(offset, m.len);
        Ok(if free {
            Mapping {
                offset,
                len,
                kind: MappingKind::Zero,
            }
        } else {
            Mapping {
                offset,
                len,
                kind: m.kind,
            }
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.as_ref().read_at(buf, offset)?;
        let mut done = 0u64;
        while done < buf.len() as u64 {
            let (free, len) = self.free.run_at(offset + done, buf.len() as u64 - done);
            if free {
                buf[done as usize..(done + len) as usize].fill(0);
            }
            done += len;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        self.inner.as_ref().info()
    }

    fn format(&self) -> Format {
        self.inner.as_ref().format()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granule_bounds_memory() {
        let m = FreeMap::new(16 << 40);
        assert!(m.bits.len() as u64 * 8 <= FreeMap::MAX_BYTES);
        assert_eq!(m.granule(), 128 << 10);
        assert_eq!(FreeMap::new(2 << 30).granule(), 4096);
    }

    #[test]
    fn only_whole_granules_are_freed() {
        let mut m = FreeMap::new(1 << 20);
        assert_eq!(m.mark_free(100, 8192), 4096); // granule 1 only
        assert_eq!(m.run_at(0, 1 << 20), (false, 4096));
        assert_eq!(m.run_at(4096, 1 << 20), (true, 4096));
        assert_eq!(m.run_at(5000, 10), (true, 10));
        assert_eq!(m.mark_free(0, 1 << 20), (1 << 20) - 4096);
        assert_eq!(m.run_at(0, 1 << 20), (true, 1 << 20));
        m.clear(4097, 1);
        assert_eq!(
            m.runs().collect::<Vec<_>>(),
            vec![(0, 4096), (8192, (1 << 20) - 8192)]
        );
        assert_eq!(m.free_bytes(), (1 << 20) - 4096);
    }

    #[test]
    fn partial_last_granule_counts_when_range_reaches_the_end() {
        let mut m = FreeMap::new(10_000);
        assert_eq!(m.mark_free(8192, 1808), 1808);
        assert_eq!(m.run_at(8192, 5000), (true, 1808));
    }
}
