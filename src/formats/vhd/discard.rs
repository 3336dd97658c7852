//! Discarding guest ranges of a VHD in place (in-place sparsify).
//!
//! * Dynamic: every block wholly inside a run gets BAT entry 0xFFFFFFFF (unallocated:
//!   reads as zeros, there is no parent); its sector bitmap and data are then punched out
//!   of the file, and when the blocks at the end of the file were among them, the footer
//!   moves back behind the last block still in use and the file is cut there. Partial
//!   blocks are left as they are, bitmap included (qemu ignores the bitmap of a dynamic
//!   disk). Order: the BAT entries, flush; the holes; the footer at the new end, flush;
//!   the truncation. A failure at any write leaves each block mapped as before or
//!   unallocated (both read correctly: only blocks inside the runs change), and the head
//!   footer copy, the one qemu and we read, is never rewritten; a footer written at the
//!   new end before the cut is an exact copy, so the tail footer is valid at every step.
//!   qemu appends new blocks after the last mapped one, so holes in the middle stay holes.
//! * Fixed: the format is the guest bytes plus a footer, so whole 4 KiB units of the runs
//!   are punched as in a raw file (they read as zeros and the format is unchanged).
//! * Differencing disks are refused when opened (an unallocated block would read the
//!   parent's data, and VHD has no zero marker).

use super::editor::{Layout, VhdEditor, SECTOR, UNALLOCATED};
use crate::device::{check_discard_runs, whole_units};
use crate::error::{Error, Result};

/// Hole granularity of a fixed disk's data area (the filesystem block).
const HOLE_UNIT: u64 = 4096;

/// Discard `runs` of the VHD `ed` edits; see the module comment.
pub fn discard(ed: &mut VhdEditor, runs: &[(u64, u64)]) -> Result<u64> {
    check_discard_runs(ed.size, runs).map_err(|e| e.with_path(&ed.path))?;
    match &ed.layout {
        Layout::Fixed { .. } => discard_fixed(ed, runs),
        Layout::Dynamic(_) => discard_dynamic(ed, runs),
    }
}

fn discard_fixed(ed: &mut VhdEditor, runs: &[(u64, u64)]) -> Result<u64> {
    let mut freed = 0;
    for &(off, len) in runs {
        let u = whole_units(off, len, HOLE_UNIT, ed.size);
        let (a, b) = (u.start * HOLE_UNIT, (u.end * HOLE_UNIT).min(ed.size));
        if a >= b {
            continue;
        }
        let stored = ed.file.stored_bytes(a, b);
        if stored == 0 {
            continue;
        }
        if !ed
            .file
            .punch_hole(a, b - a, "punching a hole in the fixed VHD's data")?
        {
            return Err(Error::unsupported(
                "the filesystem holding this fixed VHD cannot punch holes (fallocate PUNCH_HOLE), and a fixed VHD has no other way to free space",
            )
            .with_path(&ed.path));
        }
        freed += stored;
    }
    Ok(freed)
}

fn discard_dynamic(ed: &mut VhdEditor, runs: &[(u64, u64)]) -> Result<u64> {
    let Layout::Dynamic(d) = &ed.layout else {
        unreachable!("called for dynamic disks only")
    };
    let bs = u64::from(d.hdr.block_size);
    let stride = d.stride();
    let mut blocks: Vec<usize> = Vec::new();
    for &(off, len) in runs {
        for i in whole_units(off, len, bs, ed.size) {
            if d.bat.get(i as usize).is_some_and(|&e| e != UNALLOCATED) {
                blocks.push(i as usize);
            }
        }
    }
    if blocks.is_empty() {
        return Ok(0);
    }
    let Layout::Dynamic(mut d) = std::mem::replace(&mut ed.layout, Layout::Fixed { footer_at: 0 })
    else {
        unreachable!()
    };
    let r = discard_blocks(ed, &mut d, &blocks, stride);
    // On failure the in-memory BAT may be ahead of the file's; the editor is spent.
    ed.layout = Layout::Dynamic(d);
    r?;
    Ok(blocks.len() as u64 * bs)
}

fn discard_blocks(
    ed: &mut VhdEditor,
    d: &mut super::editor::Dynamic,
    blocks: &[usize],
    stride: u64,
) -> Result<()> {
    // 1. The BAT entries, in runs of consecutive indices, then a flush.
    let mut k = 0;
    while k < blocks.len() {
        let mut n = 1;
        while k + n < blocks.len() && blocks[k + n] == blocks[k] + n {
            n += 1;
        }
        ed.write_entries(
            d,
            blocks[k] as u64,
            &vec![UNALLOCATED; n],
            "unmapping discarded VHD blocks",
        )?;
        k += n;
    }
    let hosts: Vec<u64> = blocks
        .iter()
        .map(|&i| u64::from(d.bat[i]) * SECTOR)
        .collect();
    for &i in blocks {
        d.bat[i] = UNALLOCATED;
    }
    ed.file.sync("flushing the VHD BAT")?;
    // 2. The blocks' bitmaps and data, punched (a saving only: skipped where the
    //    filesystem cannot).
    let mut hosts = hosts;
    hosts.sort_unstable();
    let mut k = 0;
    while k < hosts.len() {
        let mut n = 1;
        while k + n < hosts.len() && hosts[k + n] == hosts[k] + n as u64 * stride {
            n += 1;
        }
        let a = hosts[k];
        let b = (a + n as u64 * stride).min(d.tail_at);
        if a < b
            && !ed
                .file
                .punch_hole(a, b - a, "punching discarded VHD blocks")?
        {
            break;
        }
        k += n;
    }
    // 3. A free tail: the footer moves back behind the last block in use, then the cut.
    let end = d.data_end();
    if end < d.tail_at {
        let footer = ed.footer_raw;
        ed.file
            .write_at(&footer, end, "writing the VHD footer at the new end")?;
        ed.file.sync("flushing the VHD footer")?;
        ed.file.set_len(end + 512, "truncating the VHD")?;
        d.tail_at = end;
    }
    Ok(())
}
