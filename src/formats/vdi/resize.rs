//! Resizing VDI images in place, dynamic and static, both directions.
//!
//! qemu-img check demands that the block map be a permutation: every allocated entry below
//! `blocks_allocated`, none twice, exactly `blocks_allocated` of them. The data area starts
//! at `offset_data` and a block's host offset is `offset_data + index * block_size`, so
//! moving the data area (to make room for a longer map) renumbers every entry. The writes
//! are ordered so each prefix of them leaves a valid image, reading as before or as after:
//!
//! * Grow, the map fits before `offset_data`: zero whatever stale bytes the new size would
//!   expose, write the new entries past the old map's end, flush, then the one header
//!   sector (disk size, block count) switches.
//! * Grow, the map does not fit (what VBoxManage does, made crash-safe): copy the first `k`
//!   data blocks past the end of the data area (the old image never looks there), flush,
//!   then one write of the header and the whole renumbered map, which also covers the copied
//!   blocks' old place. `offset_data` moves up by `k` blocks; every block stays where it is.
//! * Shrink: when blocks past the new end hold indices the kept blocks must take over,
//!   first one header write shrinks the disk size alone (the dropped blocks become invisible
//!   but stay counted, so the map is still a permutation), flush, then kept blocks are
//!   copied into the dropped ones' slots, flush, then one write of the header and the map's
//!   changed prefix switches; finally the file is truncated past the last used block.
//!
//! The header and the map are contiguous from offset 0, so the switching write is a single
//! positional write: the fault hook, which fails whole writes, proves every prefix valid.

use std::os::unix::fs::FileExt;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::editor::{is_data, VdiEditor};
use super::header::{ImageType, VdiHeader, BLOCK_UNALLOCATED, SECTOR_SIZE};
use super::reader::MAX_BMAP_BYTES;
use crate::device::ImageEditor;
use crate::error::{Error, Result};
use crate::options::{Preallocation, ResizeOptions};

/// qemu's `VDI_BLOCKS_IN_IMAGE_MAX`: the most blocks qemu opens.
const QEMU_MAX_BLOCKS: u64 = 0x3fff_ffff;

impl VdiEditor {
    /// The largest guest size: our reader's block map cap and qemu's block count limit.
    fn max_size(&self) -> u64 {
        (MAX_BMAP_BYTES / 4).min(QEMU_MAX_BLOCKS) * self.bs()
    }

    /// Read one whole block at `off`; bytes past the end of the file read as zeros (a last
    /// block may be stored short).
    fn read_block(&self, off: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; self.bs() as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .file
                .file()
                .read_at(&mut buf[done..], off + done as u64)
                .map_err(|e| {
                    Error::io("reading a VDI data block", e)
                        .at(off)
                        .with_path(&self.path)
                })?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(buf)
    }

    /// The header after a size change: geometry that described the old size is cleared
    /// (VirtualBox treats zero cylinders as "compute from the size").
    fn resized_header(&self, disk_size: u64, blocks: u32, allocated: u32) -> VdiHeader {
        let mut h = self.header.clone();
        h.disk_size = disk_size;
        h.blocks_in_image = blocks;
        h.blocks_allocated = allocated;
        for g in std::iter::once(&mut h.legacy_geometry).chain(h.lchs_geometry.as_mut()) {
            g.cylinders = 0;
            g.heads = 0;
            g.sectors = 0;
        }
        h
    }

    /// Make the file `to` bytes long: holes, or (`full`) written zeros so the space is
    /// reserved on the host.
    fn extend(&mut self, to: u64, full: bool) -> Result<()> {
        let mut off = self.file_len()?;
        if !full {
            if to > off {
                self.file.set_len(to, "extending the VDI data area")?;
            }
            return Ok(());
        }
        let zeros = vec![0u8; self.bs() as usize];
        while off < to {
            let n = (to - off).min(self.bs());
            self.file
                .write_at(&zeros[..n as usize], off, "preallocating VDI blocks")?;
            off += n;
        }
        Ok(())
    }

    fn grow(&mut self, new_size: u64, full: bool) -> Result<()> {
        let bs = self.bs();
        let old_size = self.header.virtual_size();
        let d = u64::from(self.header.offset_data);
        let bii = self.bmap.len() as u64;
        let n_alloc = u64::from(self.header.blocks_allocated);
        let old_needed = old_size.div_ceil(bs);
        let new_blocks = new_size.div_ceil(bs);
        let total = new_blocks.max(bii);
        let fixed = self.header.image_type == ImageType::Static;

        // Stale bytes the new size exposes (the old last block's tail, blocks a shrink left
        // counted past the guest) are zeroed in place: the old image never reads them.
        let mut zero: Vec<(u64, u64)> = Vec::new();
        if !old_size.is_multiple_of(bs) {
            let e = self.bmap[(old_needed - 1) as usize];
            if is_data(e) {
                let tail = old_size % bs;
                zero.push((self.host(d, u64::from(e)) + tail, bs - tail));
            }
        }
        for &e in &self.bmap[old_needed as usize..new_blocks.min(bii) as usize] {
            if is_data(e) {
                zero.push((self.host(d, u64::from(e)), bs));
            }
        }

        // New entries: unallocated, or (static) fresh blocks appended after the used ones.
        let added = if fixed { total - bii } else { 0 };
        let mut map = self.bmap.clone();
        for j in 0..total - bii {
            map.push(if fixed {
                (n_alloc + j) as u32
            } else {
                BLOCK_UNALLOCATED
            });
        }
        let n_alloc_new = n_alloc + added;
        let map_end = u64::from(self.header.offset_bmap) + total * 4;
        let needed_data = map_end.next_multiple_of(u64::from(SECTOR_SIZE));
        let disk_size = new_size;
        let zeros = vec![0u8; bs as usize];
        // Bytes past the data area (a copy an interrupted resize left) are no block's, but
        // appended or moved blocks will land there: drop them so new blocks read as zeros.
        if self.file_len()? > self.host(d, n_alloc) {
            self.file.set_len(
                self.host(d, n_alloc),
                "dropping stale bytes past the VDI data area",
            )?;
        }

        if needed_data <= d {
            for &(off, len) in &zero {
                self.file.write_at(
                    &zeros[..len as usize],
                    off,
                    "zeroing newly exposed VDI bytes",
                )?;
            }
            let data_end = self.host(d, n_alloc_new);
            if fixed {
                self.extend(data_end, full)?;
            }
            if total > bii {
                let mut b = vec![0u8; ((total - bii) * 4) as usize];
                for (c, &e) in b.chunks_exact_mut(4).zip(&map[bii as usize..]) {
                    LE::write_u32(c, e);
                }
                let off = u64::from(self.header.offset_bmap) + bii * 4;
                self.file
                    .write_at(&b, off, "writing new VDI block map entries")?;
            }
            self.file.sync("flushing the new VDI block map")?;
            let h = self.resized_header(disk_size, total as u32, n_alloc_new as u32);
            self.file
                .write_at(&h.to_bytes(), 0, "writing the resized VDI header")?;
            self.file.sync("flushing the VDI header")?;
            self.header = h;
            self.bmap = map;
            return Ok(());
        }

        // Relocation: free the first k blocks of the data area for the longer map.
        let k = (needed_data - d).div_ceil(bs);
        let d_new = d + k * bs;
        let d_new32 = u32::try_from(d_new).map_err(|_| {
            Error::limit(format!(
                "the VDI data area would start at {d_new:#x}, past the 4 GiB a header offset can hold"
            ))
            .with_path(&self.path)
        })?;
        let base = n_alloc.max(k);
        let moved = n_alloc.min(k);
        for e in map.iter_mut() {
            if !is_data(*e) {
                continue;
            }
            let idx = u64::from(*e);
            *e = if idx < moved {
                (base - k + idx) as u32
            } else {
                (idx - k) as u32
            };
        }
        // Static blocks appended past the moved ones: renumber them after the whole set.
        if fixed {
            for (j, e) in map[bii as usize..].iter_mut().enumerate() {
                *e = (n_alloc + j as u64) as u32;
            }
        }
        for &(off, len) in &zero {
            self.file.write_at(
                &zeros[..len as usize],
                off,
                "zeroing newly exposed VDI bytes",
            )?;
        }
        for i in 0..moved {
            let buf = self.read_block(self.host(d, i))?;
            self.file.write_at(
                &buf,
                self.host(d, base + i),
                "copying a VDI data block out of the block map's way",
            )?;
        }
        let data_end = d_new + n_alloc_new * bs;
        self.extend(data_end, full && fixed)?;
        self.file.sync("flushing the moved VDI data blocks")?;
        let mut h = self.resized_header(disk_size, total as u32, n_alloc_new as u32);
        h.offset_data = d_new32;
        let buf = self.head_and_map(&h, &map)?;
        self.file.write_at(
            &buf,
            0,
            "writing the VDI header and its renumbered block map",
        )?;
        self.file.sync("flushing the VDI header and block map")?;
        self.header = h;
        self.bmap = map;
        Ok(())
    }

    fn shrink(&mut self, new_size: u64) -> Result<()> {
        let d = u64::from(self.header.offset_data);
        let n_alloc = u64::from(self.header.blocks_allocated);
        let new_blocks = new_size.div_ceil(self.bs()) as usize;
        let dropped = self.bmap[new_blocks..]
            .iter()
            .filter(|&&e| is_data(e))
            .count() as u64;
        let n_new = n_alloc - dropped;
        // Slots below the new count held by dropped blocks, and kept blocks above it.
        let mut holes: Vec<u32> = self.bmap[new_blocks..]
            .iter()
            .copied()
            .filter(|&e| is_data(e) && u64::from(e) < n_new)
            .collect();
        holes.sort_unstable();
        let movers: Vec<usize> = (0..new_blocks)
            .filter(|&i| is_data(self.bmap[i]) && u64::from(self.bmap[i]) >= n_new)
            .collect();
        debug_assert_eq!(holes.len(), movers.len());
        let mut map = self.bmap[..new_blocks].to_vec();
        let h = self.resized_header(new_size, new_blocks as u32, n_new as u32);

        if movers.is_empty() {
            self.file
                .write_at(&h.to_bytes(), 0, "writing the resized VDI header")?;
        } else {
            // Step 1: the dropped blocks leave the guest but stay counted.
            let mut hidden = self.header.clone();
            hidden.disk_size = new_size;
            self.file
                .write_at(&hidden.to_bytes(), 0, "writing the shrunk VDI disk size")?;
            self.file.sync("flushing the shrunk VDI disk size")?;
            for (&i, &slot) in movers.iter().zip(&holes) {
                let buf = self.read_block(self.host(d, u64::from(map[i])))?;
                self.file.write_at(
                    &buf,
                    self.host(d, u64::from(slot)),
                    "copying a kept VDI block into a dropped one's place",
                )?;
                map[i] = slot;
            }
            self.file.sync("flushing the moved VDI data blocks")?;
            let last = *movers.last().expect("movers is not empty");
            let buf = self.head_and_map(&h, &map[..=last])?;
            self.file
                .write_at(&buf, 0, "writing the VDI header and its block map")?;
        }
        self.file.sync("flushing the VDI header")?;
        let end = self.host(d, n_new);
        if self.file_len()? > end {
            self.file
                .set_len(end, "truncating the VDI past its last block")?;
        }
        self.header = h;
        self.bmap = map;
        Ok(())
    }
}

/// Resize the image to `new_size` in place (see the module doc).
pub(super) fn resize(ed: &mut VdiEditor, new_size: u64, opts: &ResizeOptions) -> Result<()> {
    let old = ed.virtual_size();
    if new_size == 0 || !new_size.is_multiple_of(u64::from(SECTOR_SIZE)) {
        return Err(Error::arg(format!(
            "new VDI size {new_size} is not a positive multiple of {SECTOR_SIZE} bytes"
        ))
        .with_path(&ed.path));
    }
    let max = ed.max_size();
    if new_size > max {
        return Err(Error::limit(format!(
            "new VDI size {new_size} exceeds the maximum of {max} bytes ({} blocks of {} bytes)",
            max / ed.bs(),
            ed.bs()
        ))
        .with_path(&ed.path));
    }
    if new_size == old {
        return Ok(());
    }
    if new_size < old {
        if !opts.shrink {
            return Err(
                Error::arg(crate::options::SHRINK_REFUSED).with_option("ResizeOptions::shrink")
            );
        }
        return ed.shrink(new_size);
    }
    let full = opts.preallocation == Preallocation::Full;
    if full && ed.header.image_type != ImageType::Static {
        return Err(Error::unsupported(
            "preallocation=full is not supported for dynamic VDIs (blocks are allocated as the guest writes them; a static VDI preallocates)",
        )
        .with_path(&ed.path));
    }
    ed.grow(new_size, full)
}
