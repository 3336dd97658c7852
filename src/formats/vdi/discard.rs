//! Discarding guest ranges of a VDI in place (in-place sparsify).
//!
//! * Dynamic: every block wholly inside a run that holds data gets block map entry
//!   0xFFFFFFFE (`VDI_IMAGE_BLOCK_ZERO`, "discarded"): qemu reads every entry from
//!   0xFFFFFFFE up as zeros, and VirtualBox reads ZERO as zeros even in a differencing
//!   image, where FREE (0xFFFFFFFF) would read the parent. `blocks_allocated` drops by
//!   the blocks freed. qemu-img check wants exactly `blocks_allocated` data entries, none
//!   twice, and qemu appends its next block at index `blocks_allocated`, so the data
//!   indices must stay `0..blocks_allocated`: the space is given back as VirtualBox's
//!   compact does, by moving the blocks stored past the new count into the freed slots
//!   below it, and cutting the file after the new last block. Partial blocks are left.
//!
//!   Order: the moved blocks' data is copied into the freed slots (which only blocks
//!   inside the runs read), flush; one write of the header and the block map's changed
//!   prefix (contiguous from offset 0) switches, flush; the file is cut. A failure
//!   before the switch leaves the image as before outside the runs; after it, as after.
//! * Static: every block is stored and the layout is fixed, so the whole 4 KiB guest
//!   units of the runs are punched in the data area: they read as zeros and the format is
//!   unchanged (the data area starts at a sector, so the filesystem may zero a unit's
//!   edges instead of freeing them).

use super::editor::{is_data, VdiEditor};
use super::header::{ImageType, BLOCK_DISCARDED, HEADER_BLOCK};
use crate::device::{check_discard_runs, whole_units, ImageEditor};
use crate::error::{Error, Result};

/// Hole granularity of a static image's data area (the filesystem block).
const HOLE_UNIT: u64 = 4096;
/// Bytes copied per write when a block moves.
const COPY_CHUNK: u64 = 1 << 20;

/// Discard `runs` of the VDI `ed` edits; see the module comment.
pub fn discard(ed: &mut VdiEditor, runs: &[(u64, u64)]) -> Result<u64> {
    let size = ed.virtual_size();
    check_discard_runs(size, runs).map_err(|e| e.with_path(&ed.path))?;
    if ed.header.image_type == ImageType::Static {
        discard_static(ed, runs)
    } else {
        discard_dynamic(ed, runs)
    }
}

fn discard_static(ed: &mut VdiEditor, runs: &[(u64, u64)]) -> Result<u64> {
    let bs = ed.bs();
    let d = u64::from(ed.header.offset_data);
    let size = ed.virtual_size();
    // Host ranges to punch, merged where blocks lie back to back (so a filesystem block
    // straddling two VDI blocks is freed, not just zeroed).
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for &(off, len) in runs {
        let end = off + len;
        let mut b = off / bs;
        while b * bs < end {
            let e = ed.bmap[b as usize];
            let g0 = b * bs;
            let (s0, s1) = (off.max(g0), end.min(g0 + bs));
            b += 1;
            if !is_data(e) {
                continue;
            }
            // Whole guest units of this piece (a piece reaching the guest's end keeps its
            // last partial unit: nothing past it is read). The data area need not be
            // aligned to the filesystem's blocks: the punch then zeroes the edges.
            let u0 = s0.next_multiple_of(HOLE_UNIT);
            let u1 = if s1 == size {
                s1
            } else {
                s1 / HOLE_UNIT * HOLE_UNIT
            };
            if u0 >= u1 {
                continue;
            }
            let host = ed.host(d, u64::from(e));
            let (a, z) = (host + (u0 - g0), host + (u1 - g0));
            match ranges.last_mut() {
                Some(last) if last.1 == a => last.1 = z,
                _ => ranges.push((a, z)),
            }
        }
    }
    let mut freed = 0;
    for (a, z) in ranges {
        // Only the filesystem blocks wholly inside become holes; the edges are zeroed.
        let (fa, fz) = (a.next_multiple_of(HOLE_UNIT), z / HOLE_UNIT * HOLE_UNIT);
        let stored = if fa < fz {
            ed.file.stored_bytes(fa, fz)
        } else {
            0
        };
        if stored == 0 {
            continue;
        }
        if !ed
            .file
            .punch_hole(a, z - a, "punching a hole in the static VDI's data")?
        {
            return Err(Error::unsupported(
                "the filesystem holding this static VDI cannot punch holes (fallocate PUNCH_HOLE), and a static VDI has no other way to free space",
            )
            .with_path(&ed.path));
        }
        freed += stored;
    }
    Ok(freed)
}

fn discard_dynamic(ed: &mut VdiEditor, runs: &[(u64, u64)]) -> Result<u64> {
    let bs = ed.bs();
    let size = ed.virtual_size();
    let d = u64::from(ed.header.offset_data);
    let mut freed: Vec<usize> = Vec::new();
    for &(off, len) in runs {
        for i in whole_units(off, len, bs, size) {
            if ed.bmap.get(i as usize).is_some_and(|&e| is_data(e)) {
                freed.push(i as usize);
            }
        }
    }
    if freed.is_empty() {
        return Ok(0);
    }
    let n_alloc = u64::from(ed.header.blocks_allocated);
    let n_new = n_alloc - freed.len() as u64;
    // Freed slots below the new count, and the kept blocks stored at or past it.
    let mut holes: Vec<u32> = freed
        .iter()
        .map(|&i| ed.bmap[i])
        .filter(|&e| u64::from(e) < n_new)
        .collect();
    holes.sort_unstable();
    let movers: Vec<usize> = (0..ed.bmap.len())
        .filter(|&i| is_data(ed.bmap[i]) && u64::from(ed.bmap[i]) >= n_new)
        .filter(|i| freed.binary_search(i).is_err())
        .collect();
    if holes.len() != movers.len() {
        return Err(Error::corrupt(format!(
            "the VDI block map does not hold blocks_allocated ({n_alloc}) distinct data blocks; run qemu-img check"
        ))
        .at(0x184)
        .with_path(&ed.path));
    }
    let mut map = ed.bmap.clone();
    for &i in &freed {
        map[i] = BLOCK_DISCARDED;
    }
    let file_len = ed.file_len()?;
    for (&i, &slot) in movers.iter().zip(&holes) {
        copy_block(
            ed,
            ed.host(d, u64::from(ed.bmap[i])),
            ed.host(d, u64::from(slot)),
            file_len,
        )?;
        map[i] = slot;
    }
    if !movers.is_empty() {
        ed.file.sync("flushing the moved VDI data blocks")?;
    }
    let mut h = ed.header.clone();
    h.blocks_allocated = n_new as u32;
    let last = freed
        .iter()
        .chain(&movers)
        .copied()
        .max()
        .expect("freed is not empty");
    let buf = ed.head_and_map(&h, &map[..=last])?;
    debug_assert!(buf.len() >= HEADER_BLOCK);
    ed.file
        .write_at(&buf, 0, "writing the VDI header and its block map")?;
    ed.file.sync("flushing the VDI header and block map")?;
    ed.header = h;
    ed.bmap = map;
    let end = ed.host(d, n_new);
    if file_len > end {
        ed.file
            .set_len(end, "truncating the VDI past its last block")?;
    }
    Ok(freed.len() as u64 * bs)
}

/// Copy one data block from `src` to `dst` in bounded chunks; bytes past the end of the
/// file (a last block stored short) read as zeros.
fn copy_block(ed: &mut VdiEditor, src: u64, dst: u64, file_len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let bs = ed.bs();
    let mut buf = vec![0u8; bs.min(COPY_CHUNK) as usize];
    let mut done = 0;
    while done < bs {
        let n = (bs - done).min(COPY_CHUNK) as usize;
        let part = &mut buf[..n];
        part.fill(0);
        let at = src + done;
        if at < file_len {
            let avail = ((file_len - at) as usize).min(n);
            ed.file
                .file()
                .read_exact_at(&mut part[..avail], at)
                .map_err(|e| {
                    Error::io("reading a VDI data block to move", e)
                        .at(at)
                        .with_path(&ed.path)
                })?;
        }
        ed.file.write_at(
            part,
            dst + done,
            "copying a VDI block into a discarded one's place",
        )?;
        done += n as u64;
    }
    Ok(())
}
