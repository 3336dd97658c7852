//! Discarding guest ranges of a monolithicSparse VMDK in place (in-place sparsify).
//!
//! Every grain wholly inside a run that is stored (grain table entry above 1) gets entry
//! 0, unallocated, in both the grain directory's table and the redundant directory's
//! table; it reads as zeros (delta disks, whose unallocated grains read the parent, are
//! refused when opened, so 0 is right and needs no zeroed-grain flag). Zeroed grains
//! (entry 1) and partial grains are left. Then the grains' space is punched out of the
//! file, and when the file's tail held only discarded grains, the file is cut after the
//! last grain or table still in use (qemu and VMware append new grains at the end of the
//! file, so holes in the middle stay holes).
//!
//! Order, in batches of bounded size: the changed entries of each table (primary, then
//! redundant), a flush, the holes; the truncation last. A failure at any write leaves
//! every grain either mapped as before (its data still there: holes only follow the
//! flush) or unallocated, in either copy: the guest outside the runs reads exactly as
//! before, and no entry ever points past the end of the file, which `qemu-img check`
//! would report.
//!
//! Refused when opened: streamOptimized (compressed grains packed back to back, written
//! once in order), descriptor files with flat or split extents, and delta disks. Before
//! a batch writes anything, every grain it frees is checked to lie in the file past the
//! header, descriptor, directories and tables.

use std::collections::BTreeMap;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::editor::VmdkEditor;
use super::sparse::SECTOR;
use crate::device::{check_discard_runs, whole_units, ImageEditor};
use crate::error::{Error, Result};

/// Grains freed per batch (bounds the memory a large discard holds).
const BATCH_GRAINS: usize = 1 << 16;

/// Discard `runs` of the VMDK `ed` edits; see the module comment.
pub fn discard(ed: &mut VmdkEditor, runs: &[(u64, u64)]) -> Result<u64> {
    let size = ed.virtual_size();
    check_discard_runs(size, runs).map_err(|e| e.with_path(&ed.path))?;
    let g = ed.grain_bytes();
    let per_gt = u64::from(ed.header.num_gtes_per_gt);
    let meta = metadata(ed);
    let file_len = ed.file_len()?;
    // Grains wholly inside the runs, grouped by grain table.
    let mut by_gt: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut pending = 0usize;
    let mut freed = 0u64;
    let mut tail_freed = false;
    let flush = |ed: &mut VmdkEditor,
                 by_gt: &mut BTreeMap<usize, Vec<usize>>,
                 freed: &mut u64,
                 tail_freed: &mut bool|
     -> Result<()> {
        let (n, tail) = commit(ed, by_gt, &meta, file_len)?;
        *freed += n * g;
        *tail_freed |= tail;
        by_gt.clear();
        Ok(())
    };
    for &(off, len) in runs {
        let mut u = whole_units(off, len, g, size);
        while u.start < u.end {
            let gi = (u.start / per_gt) as usize;
            let end = u.end.min((gi as u64 + 1) * per_gt);
            if ed.gd.get(gi).is_some_and(|&s| s != 0) {
                let v = by_gt.entry(gi).or_default();
                for t in u.start..end {
                    v.push((t % per_gt) as usize);
                }
                pending += (end - u.start) as usize;
                if pending >= BATCH_GRAINS {
                    flush(ed, &mut by_gt, &mut freed, &mut tail_freed)?;
                    pending = 0;
                }
            }
            u.start = end;
        }
    }
    flush(ed, &mut by_gt, &mut freed, &mut tail_freed)?;
    if tail_freed {
        truncate_tail(ed, &meta)?;
    }
    ed.unmark_changing()?;
    Ok(freed)
}

/// Sector ranges holding the header, the descriptor, the directories and every table.
fn metadata(ed: &VmdkEditor) -> Vec<(u64, u64)> {
    let h = &ed.header;
    let gt_sectors = ed.gt_bytes().div_ceil(SECTOR);
    let gd_sectors = (ed.gd.len() as u64 * 4).div_ceil(SECTOR);
    let mut v = vec![(0, (h.desc_offset + h.desc_size).max(1))];
    v.push((h.gd_offset, h.gd_offset + gd_sectors));
    if !ed.rgd.is_empty() {
        v.push((h.rgd_offset, h.rgd_offset + gd_sectors));
    }
    for &s in ed.gd.iter().chain(&ed.rgd).filter(|&&s| s != 0) {
        v.push((u64::from(s), u64::from(s) + gt_sectors));
    }
    v.sort_unstable();
    // Merged into disjoint ranges, so their ends are sorted too.
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn overlaps(meta: &[(u64, u64)], a: u64, b: u64) -> bool {
    // Disjoint and sorted: only the last range starting before b can reach past a.
    let i = meta.partition_point(|&(s, _)| s < b);
    i > 0 && meta[i - 1].1 > a
}

/// One batch: clear the entries in both copies of each table, flush, punch the grains.
/// Returns the grains freed and whether one of them ended the file.
fn commit(
    ed: &mut VmdkEditor,
    by_gt: &BTreeMap<usize, Vec<usize>>,
    meta: &[(u64, u64)],
    file_len: u64,
) -> Result<(u64, bool)> {
    let g = ed.grain_bytes();
    let gs = g / SECTOR;
    // Plan and check everything before the first write.
    let mut plan: Vec<(usize, Vec<u32>, usize, usize)> = Vec::new();
    let mut grains: Vec<u64> = Vec::new();
    for (&gi, idx) in by_gt {
        let gt = ed.read_gt(ed.gd[gi])?;
        let mut new = gt.clone();
        let (mut lo, mut hi) = (usize::MAX, 0);
        for &k in idx {
            let e = gt[k];
            if e <= 1 {
                continue;
            }
            let s = u64::from(e);
            if overlaps(meta, s, s + gs) {
                return Err(Error::corrupt(format!(
                    "grain table {gi} entry {k} names sector {s}, inside the VMDK's header or tables; run qemu-img check"
                ))
                .at(u64::from(ed.gd[gi]) * SECTOR + k as u64 * 4)
                .with_path(&ed.path));
            }
            new[k] = 0;
            lo = lo.min(k);
            hi = hi.max(k + 1);
            grains.push(s);
        }
        if lo < hi {
            plan.push((gi, new, lo, hi));
        }
    }
    if plan.is_empty() {
        return Ok((0, false));
    }
    ed.mark_changing()?;
    for (gi, new, lo, hi) in &plan {
        let mut b = vec![0u8; (hi - lo) * 4];
        for (c, e) in b.chunks_exact_mut(4).zip(&new[*lo..*hi]) {
            LE::write_u32(c, *e);
        }
        let dirs = [Some(ed.gd[*gi]), ed.rgd.get(*gi).copied()];
        for s in dirs.into_iter().flatten().filter(|&s| s != 0) {
            ed.file.write_at(
                &b,
                u64::from(s) * SECTOR + *lo as u64 * 4,
                "clearing discarded VMDK grain table entries",
            )?;
        }
    }
    ed.file.sync("flushing the VMDK grain tables")?;
    grains.sort_unstable();
    let mut tail = false;
    let mut k = 0;
    while k < grains.len() {
        let mut n = 1;
        while k + n < grains.len() && grains[k + n] == grains[k] + n as u64 * gs {
            n += 1;
        }
        let a = grains[k] * SECTOR;
        let b = (a + n as u64 * g).min(file_len);
        tail |= a + n as u64 * g >= file_len;
        if a < b
            && !ed
                .file
                .punch_hole(a, b - a, "punching discarded VMDK grains")?
        {
            break;
        }
        k += n;
    }
    Ok((grains.len() as u64, tail))
}

/// Cut the file after the last grain or table still in use.
fn truncate_tail(ed: &mut VmdkEditor, meta: &[(u64, u64)]) -> Result<()> {
    let gs = ed.grain_bytes() / SECTOR;
    let mut end = meta.iter().map(|&(_, e)| e).max().unwrap_or(1);
    end = end.max(ed.header.overhead);
    for &s in ed.gd.iter().filter(|&&s| s != 0) {
        for e in ed.read_gt(s)? {
            if e > 1 {
                end = end.max(u64::from(e) + gs);
            }
        }
    }
    let keep = end * SECTOR;
    if keep < ed.file_len()? {
        ed.file
            .set_len(keep, "truncating the freed tail of the VMDK")?;
    }
    Ok(())
}
