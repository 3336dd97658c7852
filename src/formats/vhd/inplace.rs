//! Writing a conversion into an existing VHD in place (`convert -n`), fixed or dynamic,
//! keeping its type, block size and geometry.
//!
//! * Fixed: the guest bytes are the file's first bytes; they are overwritten in place and
//!   ranges zero in the source are zeroed. The footer is not touched.
//! * Dynamic: data goes into the blocks the BAT names, in place (setting the sector bitmap
//!   bits of what was written, for readers that honour them); a block not stored gets a
//!   new one where the tail footer is: first a copy of the footer goes one block further,
//!   then the new block's all-present bitmap overwrites the old footer, so the file always
//!   ends in a whole footer. In batches, once the new blocks' data is flushed, their BAT
//!   entries (4 bytes each) are written, then flushed: a failure leaves every entry naming
//!   a block that holds its data, or unallocated with its block unreferenced. The footer
//!   copy at offset 0, which qemu and this crate read, never changes. Ranges zero in the
//!   source get zeros where a block is stored (see [`crate::inplace`]).
//!
//! Refused before any write: differencing disks (their unallocated blocks read the parent
//! and VHD has no way to mark a block zero), an image smaller than the conversion, and a
//! layout the resize editor refuses (no whole tail footer, overlapping blocks).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use byteorder::{BigEndian, ByteOrder};

use super::editor::{open_vhd, Layout, VhdEditor, SECTOR, UNALLOCATED};
use crate::error::{Error, Result};
use crate::inplace::{target_too_small, BlockMap, BlockWriter, InPlaceOptions};
use crate::writer::{EditFile, ImageWriter};

/// New blocks a batch holds before their BAT entries are written.
const BATCH_BLOCKS: usize = 512;
/// The pieces a fixed disk's data is handled in (any size works: nothing is allocated).
const FIXED_UNIT: u64 = 1 << 20;

/// A VHD as [`BlockWriter`] uses it.
struct VhdMap {
    ed: VhdEditor,
    /// Dynamic disks: the BAT with this batch's new entries; empty for fixed ones.
    bat: Vec<u32>,
    table_offset: u64,
    bitmap_size: u64,
    block_size: u64,
    tail_at: u64,
    /// BAT indices allocated by this batch.
    pending: Vec<usize>,
    /// The sector bitmap of the stored block last written into: (block, bytes).
    bitmap: Option<(u64, Vec<u8>)>,
    /// Blocks this conversion allocated (their bitmaps are already all present).
    fresh_from: u64,
}

/// Open the VHD in `file` for a conversion to write into (see the module comment).
pub fn open_in_place(
    file: File,
    path: &Path,
    opts: &InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    let ed = open_vhd(file, path, opts.fail_at_write)?;
    if ed.size < opts.size {
        return Err(target_too_small(ed.size, opts.size));
    }
    let (bat, table_offset, bitmap_size, block_size, tail_at) = match &ed.layout {
        Layout::Fixed { .. } => (Vec::new(), 0, 0, FIXED_UNIT, 0),
        Layout::Dynamic(d) => (
            d.bat.clone(),
            d.hdr.table_offset,
            d.hdr.bitmap_size(),
            u64::from(d.hdr.block_size),
            d.tail_at,
        ),
    };
    if !block_size.is_power_of_two() {
        return Err(Error::unsupported(format!(
            "the VHD's block size {block_size} is not a power of two; writing into it in place is not supported"
        ))
        .with_path(path));
    }
    let map = VhdMap {
        ed,
        bat,
        table_offset,
        bitmap_size,
        block_size,
        tail_at,
        pending: Vec::new(),
        bitmap: None,
        fresh_from: tail_at,
    };
    Ok(Box::new(BlockWriter::new(
        map,
        opts,
        block_size.min(64 << 10),
    )))
}

impl VhdMap {
    fn fixed(&self) -> bool {
        matches!(self.ed.layout, Layout::Fixed { .. })
    }

    /// Write the cached bitmap back when bits were set in it.
    fn flush_bitmap(&mut self, changed: bool) -> Result<()> {
        if let (true, Some((b, bits))) = (changed, &self.bitmap) {
            let at = u64::from(self.bat[*b as usize]) * SECTOR;
            let bits = bits.clone();
            self.ed
                .file
                .write_at(&bits, at, "writing a VHD block's sector bitmap")?;
        }
        Ok(())
    }
}

impl BlockMap for VhdMap {
    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn file(&mut self) -> &mut EditFile {
        &mut self.ed.file
    }

    fn stored(&mut self, b: u64) -> Result<Option<u64>> {
        if self.fixed() {
            return Ok(Some(b * self.block_size));
        }
        let e = self.bat[b as usize];
        Ok((e != UNALLOCATED).then(|| u64::from(e) * SECTOR + self.bitmap_size))
    }

    fn allocate(&mut self, b: u64) -> Result<u64> {
        let at = self.tail_at;
        let next = at + self.bitmap_size + self.block_size;
        if next / SECTOR > u64::from(u32::MAX) {
            return Err(Error::limit(format!(
                "a new VHD block at {at:#x} would lie past the 2 TiB a BAT entry can address"
            ))
            .with_path(&self.ed.path));
        }
        let footer = self.ed.footer_raw;
        self.ed
            .file
            .write_at(&footer, next, "writing the VHD footer past a new block")?;
        self.ed.file.write_at(
            &vec![0xff; self.bitmap_size as usize],
            at,
            "writing a new VHD block's sector bitmap",
        )?;
        self.bat[b as usize] = (at / SECTOR) as u32;
        self.pending.push(b as usize);
        self.tail_at = next;
        Ok(at + self.bitmap_size)
    }

    fn wrote(&mut self, b: u64, from: u64, to: u64) -> Result<()> {
        if self.fixed() || u64::from(self.bat[b as usize]) * SECTOR >= self.fresh_from {
            return Ok(());
        }
        if self.bitmap.as_ref().map(|(k, _)| *k) != Some(b) {
            let at = u64::from(self.bat[b as usize]) * SECTOR;
            let mut bits = vec![0u8; self.bitmap_size as usize];
            self.ed
                .file
                .file()
                .read_exact_at(&mut bits, at)
                .map_err(|e| {
                    Error::io("reading a VHD block's sector bitmap", e)
                        .at(at)
                        .with_path(&self.ed.path)
                })?;
            self.bitmap = Some((b, bits));
        }
        let (_, bits) = self.bitmap.as_mut().expect("just loaded");
        let mut changed = false;
        for s in from / SECTOR..to.div_ceil(SECTOR) {
            let (byte, bit) = ((s / 8) as usize, 0x80u8 >> (s % 8));
            changed |= bits[byte] & bit == 0;
            bits[byte] |= bit;
        }
        self.flush_bitmap(changed)
    }

    fn commit(&mut self, finish: bool) -> Result<()> {
        if self.pending.is_empty() || (!finish && self.pending.len() < BATCH_BLOCKS) {
            return Ok(());
        }
        self.ed.file.sync("flushing the new VHD blocks")?;
        self.pending.sort_unstable();
        let mut k = 0;
        while k < self.pending.len() {
            let first = self.pending[k];
            let mut n = 1;
            while k + n < self.pending.len() && self.pending[k + n] == first + n {
                n += 1;
            }
            let mut b = vec![0u8; n * 4];
            for (c, e) in b.chunks_exact_mut(4).zip(&self.bat[first..first + n]) {
                BigEndian::write_u32(c, *e);
            }
            self.ed.file.write_at(
                &b,
                self.table_offset + first as u64 * 4,
                "writing VHD BAT entries",
            )?;
            k += n;
        }
        self.ed.file.sync("flushing the VHD BAT")?;
        self.pending.clear();
        if let Layout::Dynamic(d) = &mut self.ed.layout {
            d.bat.clone_from(&self.bat);
            d.tail_at = self.tail_at;
        }
        Ok(())
    }
}
