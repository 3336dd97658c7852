//! Resizing fixed and dynamic VHDs in place, both directions; differencing ones refused.
//!
//! A dynamic VHD carries its footer twice: a copy at offset 0, which qemu and we read, and
//! the one at the end, which the specification calls authoritative. Each is written whole
//! (one sector, its own checksum), the tail first and the head last, and each alone always
//! describes a valid image: everything a new footer needs (the longer BAT, the dynamic
//! header that counts it, moved blocks) is written and flushed before either footer, and
//! everything it makes obsolete is dropped only after both.
//!
//! * Fixed grow: a copy of the old footer goes to the new end first (the image still reads
//!   as before, its data area just longer), then the old footer's sector and any stale
//!   bytes are zeroed, then the new footer overwrites that copy.
//! * Fixed shrink: the new footer overwrites the old one in place (a data area longer than
//!   the size is valid), then is written at the new end, then the file is truncated.
//! * Dynamic grow: stale blocks past the old size are unmapped and a partial last block's
//!   tail zeroed. When the BAT must grow past the blocks that follow it, those blocks are
//!   copied to the end of the file (behind a footer copy written there first), flushed,
//!   and each BAT entry switched with one 4-byte write, as Hyper-V moves them; then the new
//!   entries, the dynamic header (one sector holds every changed field), the footers.
//! * Dynamic shrink: the footers first, then the dropped blocks are unmapped, then the file
//!   is truncated behind a footer written at the new end when the tail held only them.

use std::os::unix::fs::FileExt;

use super::dynheader::{DynHeader, DYN_HEADER_SIZE};
use super::editor::{Dynamic, Layout, VhdEditor, SECTOR, UNALLOCATED};
use super::footer::{Footer, FOOTER_SIZE};
use super::geometry::{Chs, MAX_SIZE};
use super::reader::MAX_BAT_BYTES;
use crate::error::{Error, Result};
use crate::options::{Preallocation, ResizeOptions};

/// Bytes of zeros written per call.
const ZERO_CHUNK: u64 = 1 << 20;

impl VhdEditor {
    fn new_footer(&self, size: u64) -> [u8; FOOTER_SIZE] {
        Footer::resized(&self.footer_raw, size, Chs::for_exact_size(size / SECTOR))
    }

    fn zero(&mut self, from: u64, to: u64) -> Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK as usize];
        let mut off = from;
        while off < to {
            let n = (to - off).min(ZERO_CHUNK);
            self.file
                .write_at(&zeros[..n as usize], off, "zeroing newly exposed VHD bytes")?;
            off += n;
        }
        Ok(())
    }

    fn resize_fixed(
        &mut self,
        new_size: u64,
        footer_at: u64,
        prealloc: Preallocation,
    ) -> Result<()> {
        let old = self.size;
        let new = self.new_footer(new_size);
        if new_size > old {
            if new_size > footer_at {
                // The image still reads as before with its footer here; the old one and the
                // stale bytes behind the old size can then be zeroed.
                let copy = self.footer_raw;
                self.file
                    .write_at(&copy, new_size, "writing a VHD footer copy at the new end")?;
            }
            let to = match prealloc {
                Preallocation::Full => new_size,
                Preallocation::Off => new_size.min(footer_at + FOOTER_SIZE as u64),
            };
            self.zero(old, to)?;
            self.file.sync("flushing the VHD's new space")?;
        }
        if new_size >= footer_at {
            self.file
                .write_at(&new, new_size, "writing the resized VHD footer")?;
            self.file.sync("flushing the VHD footer")?;
        } else {
            self.file
                .write_at(&new, footer_at, "writing the resized VHD footer in place")?;
            self.file.sync("flushing the VHD footer")?;
            self.file
                .write_at(&new, new_size, "writing the VHD footer at the new end")?;
            self.file.sync("flushing the VHD footer")?;
            self.file
                .set_len(new_size + FOOTER_SIZE as u64, "truncating the VHD")?;
        }
        self.footer_raw = new;
        self.layout = Layout::Fixed {
            footer_at: new_size,
        };
        Ok(())
    }

    fn switch_footers(&mut self, tail_at: u64, new: &[u8; FOOTER_SIZE]) -> Result<()> {
        self.file
            .write_at(new, tail_at, "writing the resized VHD footer")?;
        self.file.sync("flushing the VHD footer")?;
        self.file
            .write_at(new, 0, "writing the resized VHD footer copy at offset 0")?;
        self.file.sync("flushing the VHD footer copy")
    }

    fn grow_dynamic(&mut self, new_size: u64, mut d: Box<Dynamic>) -> Result<Box<Dynamic>> {
        let bs = u64::from(d.hdr.block_size);
        let old = self.size;
        let old_needed = old.div_ceil(bs);
        let new_e = new_size.div_ceil(bs);
        let max_e = d.bat.len() as u64;
        let mut dirty = false;

        // Blocks a shrink left mapped past the old size would surface: unmap them.
        let stale_end = new_e.min(max_e);
        if (old_needed..stale_end).any(|i| d.bat[i as usize] != UNALLOCATED) {
            let cleared = vec![UNALLOCATED; (stale_end - old_needed) as usize];
            self.write_entries(&d, old_needed, &cleared, "unmapping stale VHD blocks")?;
            d.bat[old_needed as usize..stale_end as usize].fill(UNALLOCATED);
            dirty = true;
        }
        // The bytes of a partial last block past the old size.
        if !old.is_multiple_of(bs) {
            let e = d.bat[(old_needed - 1) as usize];
            if e != UNALLOCATED {
                let data = u64::from(e) * SECTOR + d.hdr.bitmap_size();
                self.zero(data + old % bs, data + bs)?;
                dirty = true;
            }
        }

        let mut tail_at = d.tail_at;
        if new_e > max_e {
            let bat_end = d.bat_end(new_e);
            let hdr_end = d.hdr_at + DYN_HEADER_SIZE as u64;
            if d.hdr_at < bat_end && hdr_end > d.hdr.table_offset {
                return Err(Error::unsupported(format!(
                    "the VHD's dynamic header (at {:#x}) follows its BAT: the BAT cannot grow to {new_e} entries there",
                    d.hdr_at
                ))
                .with_path(&self.path));
            }
            let stride = d.stride();
            let mut movers: Vec<(usize, u64)> = d
                .bat
                .iter()
                .enumerate()
                .filter(|&(_, &e)| e != UNALLOCATED)
                .map(|(i, &e)| (i, u64::from(e) * SECTOR))
                .filter(|&(_, s)| s < bat_end && s + stride > d.hdr.table_offset)
                .collect();
            movers.sort_by_key(|&(_, s)| s);
            let dest0 = tail_at.max(bat_end);
            let new_tail = dest0 + movers.len() as u64 * stride;
            if (new_tail + FOOTER_SIZE as u64) / SECTOR > u64::from(u32::MAX) {
                return Err(Error::limit(format!(
                    "moving the VHD's blocks out of the BAT's way would put one past the 2 TiB a BAT entry can address (at {new_tail:#x})"
                ))
                .with_path(&self.path));
            }
            if new_tail > tail_at {
                let copy = self.footer_raw;
                self.file
                    .write_at(&copy, new_tail, "writing a VHD footer copy at the new end")?;
            }
            for (j, &(_, src)) in movers.iter().enumerate() {
                let mut buf = vec![0u8; stride as usize];
                self.file.file().read_exact_at(&mut buf, src).map_err(|e| {
                    Error::io("reading a VHD block to move", e)
                        .at(src)
                        .with_path(&self.path)
                })?;
                self.file.write_at(
                    &buf,
                    dest0 + j as u64 * stride,
                    "copying a VHD block out of the BAT's way",
                )?;
            }
            self.file.sync("flushing the moved VHD blocks")?;
            for (j, &(i, _)) in movers.iter().enumerate() {
                let sector = ((dest0 + j as u64 * stride) / SECTOR) as u32;
                self.write_entries(
                    &d,
                    i as u64,
                    &[sector],
                    "pointing a BAT entry at its moved block",
                )?;
                d.bat[i] = sector;
            }
            if !movers.is_empty() {
                self.file.sync("flushing the BAT")?;
            }
            // The new entries and the BAT's sector padding, unallocated.
            let pad = ((bat_end - d.hdr.table_offset) / 4 - max_e) as usize;
            self.write_entries(
                &d,
                max_e,
                &vec![UNALLOCATED; pad],
                "writing the new BAT entries",
            )?;
            self.file.sync("flushing the BAT")?;
            let hdr = DynHeader::with_max_table_entries(&d.hdr_raw, new_e as u32);
            self.file.write_at(
                &hdr[..SECTOR as usize],
                d.hdr_at,
                "writing the VHD dynamic header",
            )?;
            self.file.sync("flushing the VHD dynamic header")?;
            d.hdr_raw = hdr;
            d.hdr.max_table_entries = new_e as u32;
            d.bat.resize(new_e as usize, UNALLOCATED);
            tail_at = new_tail;
            dirty = false;
        }
        if dirty {
            self.file.sync("flushing the VHD blocks")?;
        }
        let new = self.new_footer(new_size);
        self.switch_footers(tail_at, &new)?;
        self.footer_raw = new;
        d.tail_at = tail_at;
        Ok(d)
    }

    fn shrink_dynamic(&mut self, new_size: u64, mut d: Box<Dynamic>) -> Result<Box<Dynamic>> {
        let bs = u64::from(d.hdr.block_size);
        let new_e = new_size.div_ceil(bs) as usize;
        let new = self.new_footer(new_size);
        self.switch_footers(d.tail_at, &new)?;
        self.footer_raw = new;
        // The dropped blocks are invisible now: unmap them, then give back the file's tail.
        if d.bat[new_e..].iter().any(|&e| e != UNALLOCATED) {
            let cleared = vec![UNALLOCATED; d.bat.len() - new_e];
            self.write_entries(&d, new_e as u64, &cleared, "unmapping dropped VHD blocks")?;
            d.bat[new_e..].fill(UNALLOCATED);
            self.file.sync("flushing the BAT")?;
        }
        let end = d.data_end();
        if end < d.tail_at {
            self.file
                .write_at(&new, end, "writing the VHD footer at the new end")?;
            self.file.sync("flushing the VHD footer")?;
            self.file
                .set_len(end + FOOTER_SIZE as u64, "truncating the VHD")?;
            d.tail_at = end;
        }
        Ok(d)
    }
}

/// Resize the image to `new_size` in place (see the module doc).
pub(super) fn resize(ed: &mut VhdEditor, new_size: u64, opts: &ResizeOptions) -> Result<()> {
    if new_size == 0 || !new_size.is_multiple_of(SECTOR) {
        return Err(Error::arg(format!(
            "new VHD size {new_size} is not a positive multiple of {SECTOR} bytes"
        ))
        .with_path(&ed.path));
    }
    if new_size > MAX_SIZE {
        return Err(Error::limit(format!(
            "new VHD size {new_size} exceeds the format's maximum of {MAX_SIZE} bytes (2040 GiB)"
        ))
        .with_path(&ed.path));
    }
    if let Layout::Dynamic(d) = &ed.layout {
        let entries = new_size.div_ceil(u64::from(d.hdr.block_size));
        if entries * 4 > MAX_BAT_BYTES {
            return Err(Error::limit(format!(
                "new VHD size {new_size} in blocks of {} bytes needs a BAT of {} bytes, over the {MAX_BAT_BYTES}-byte limit",
                d.hdr.block_size,
                entries * 4
            ))
            .with_path(&ed.path));
        }
        if opts.preallocation == Preallocation::Full {
            return Err(Error::unsupported(
                "preallocation=full is not supported for dynamic VHDs (new blocks are allocated as the guest writes them)",
            )
            .with_path(&ed.path));
        }
    }
    let old = ed.size;
    if new_size == old {
        return Ok(());
    }
    if new_size < old && !opts.shrink {
        return Err(Error::arg(crate::options::SHRINK_REFUSED).with_option("ResizeOptions::shrink"));
    }
    let layout = std::mem::replace(&mut ed.layout, Layout::Fixed { footer_at: 0 });
    let r = match layout {
        Layout::Fixed { footer_at } => {
            ed.layout = Layout::Fixed { footer_at };
            ed.resize_fixed(new_size, footer_at, opts.preallocation)
        }
        Layout::Dynamic(d) => {
            // On failure the editor is spent: its view of the file may be stale.
            let r = if new_size > old {
                ed.grow_dynamic(new_size, d)
            } else {
                ed.shrink_dynamic(new_size, d)
            };
            r.map(|d| ed.layout = Layout::Dynamic(d))
        }
    };
    if r.is_ok() {
        ed.size = new_size;
    }
    r
}
