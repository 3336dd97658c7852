//! Checking VMDK sparse extents (monolithicSparse, streamOptimized: a `KDMV` file; the
//! extents a descriptor file lists are in [`super::check_extents`]).
//!
//! qemu's `vmdk_co_check` only asks that every allocated grain start inside the file (and
//! fails the whole check when one does not). Here, beyond that:
//! - every grain table inside the file, every grain wholly inside it (a compressed
//!   grain: its 12-byte header and its compressed bytes), no two grains overlapping each
//!   other, a grain table, a grain directory or the header;
//! - the redundant grain directory and its tables equal to the primary ones (qemu writes
//!   both; a reader uses the primary);
//! - streamOptimized: every grain table entry points at a grain whose header names that
//!   entry's guest sector; in VMware's layout (the grain directory found through the
//!   footer) the marker stream from `overHead` is well formed too (grains, grain table /
//!   grain directory / footer markers, up to an end-of-stream marker). qemu's layout (the
//!   tables up front, grains appended, no end-of-stream marker) has no stream to walk.
//!
//! Repair (`-r all`) rewrites the redundant grain tables from the primary ones (and the
//! redundant directory entries that are missing their table are reported, not
//! allocated). No reader uses the redundant copy, so a failure at any write leaves the
//! guest data and the primary metadata as they were.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::reader::read_kdmv_header;
use super::sparse::*;
use crate::check::{read_padded, Repair, Tally};
use crate::device::HostFile;
use crate::error::Result;
use crate::writer::EditFile;

/// Check one `KDMV` sparse extent into `t`; `edit` (the extent opened for writing) is
/// needed only to repair the redundant grain tables with `-r all`.
pub(super) fn check_sparse(
    host: &HostFile,
    edit: Option<EditFile>,
    repair: Repair,
    t: &mut Tally,
) -> Result<()> {
    let len = host.len();
    let lead = SparseHeader::parse(&read_padded(host, 0, SECTOR, "header")?)?;
    let h = read_kdmv_header(host)?;
    h.validate(len)?;
    let n = h.gd_entries()?;
    let gt_bytes = u64::from(h.num_gtes_per_gt) * 4;
    let grain = h.grain_size * SECTOR;
    let stream = h.compressed() || h.flags & FLAG_MARKERS != 0;
    // Only VMware's layout (the directory at the end, found through the footer) is a
    // marker stream from `overHead` to an end-of-stream marker. qemu's streamOptimized
    // keeps its tables up front like monolithicSparse and appends grains as they are
    // written, with no other marker and no end-of-stream marker; a failed partial write
    // leaves a cluster of zeros (or of the backing file's bytes) among them. There only
    // the grains the tables name are looked at, as qemu's reader does.
    let walk = stream && lead.gd_offset == GD_AT_END;
    let gd = read_padded(host, h.gd_offset * SECTOR, n * 4, "grain directory")?;
    // Metadata ranges: header sector, GD, RGD, GTs (bytes); grains.
    let mut meta: Vec<(u64, u64, String)> = vec![(0, SECTOR, "the header".into())];
    meta.push((
        h.gd_offset * SECTOR,
        h.gd_offset * SECTOR + n * 4,
        "the grain directory".into(),
    ));
    let rgd_on = h.flags & FLAG_RGD != 0 && h.rgd_offset != 0 && !stream;
    if rgd_on {
        meta.push((
            h.rgd_offset * SECTOR,
            h.rgd_offset * SECTOR + n * 4,
            "the redundant grain directory".into(),
        ));
    }
    // VMware's streamOptimized: the grains the marker stream holds, by offset, with their LBA.
    let stream_grains = if walk {
        walk_stream(host, &h, t)
    } else {
        Default::default()
    };
    let mut grains: Vec<(u64, u64, u64)> = Vec::new();
    let mut gts: Vec<Option<Vec<u8>>> = Vec::with_capacity(n as usize);
    for (i, g) in gd.chunks_exact(4).map(LE::read_u32).enumerate() {
        if g == 0 {
            gts.push(None);
            continue;
        }
        let off = u64::from(g) * SECTOR;
        if off + gt_bytes > len {
            t.corrupt(format!(
                "ERROR: grain table {i} at {off:#x} runs past the end of the file ({len} bytes)"
            ));
            gts.push(None);
            continue;
        }
        meta.push((off, off + gt_bytes, format!("grain table {i}")));
        let gt = host.read_vec(off, gt_bytes, "grain table")?;
        for (j, e) in gt.chunks_exact(4).map(LE::read_u32).enumerate() {
            if e == 0 || (e == GTE_ZEROED && h.flags & FLAG_ZERO_GRAIN != 0) {
                continue;
            }
            let guest = (i as u64 * u64::from(h.num_gtes_per_gt) + j as u64) * h.grain_size;
            if guest >= h.capacity {
                t.leak(format!(
                    "Leaked grain: table {i} entry {j} maps sector {guest}, past the capacity"
                ));
                continue;
            }
            let start = u64::from(e) * SECTOR;
            if start >= len {
                t.corrupt(format!(
                    "ERROR: cluster offset for sector {guest} points after EOF"
                ));
                continue;
            }
            let stop = if h.compressed() {
                let hdr = read_padded(host, start, 12, "grain header")?;
                let lba = LE::read_u64(&hdr);
                let size = u64::from(LE::read_u32(&hdr[8..]));
                let a_grain = if walk {
                    stream_grains.get(&start) == Some(&lba)
                } else {
                    // qemu writes a grain after the tables, its deflate output at most
                    // twice the grain (its buffer's size).
                    start >= h.overhead * SECTOR && size != 0 && size <= 2 * grain
                };
                if !a_grain {
                    t.corrupt(format!(
                        "ERROR: grain table {i} entry {j} (sector {guest}) points at {start:#x}, which is not a grain of the marker stream"
                    ));
                } else if lba != guest {
                    t.corrupt(format!(
                        "ERROR: grain at {start:#x} is for sector {lba}, but grain table {i} entry {j} maps sector {guest} to it"
                    ));
                }
                start + 12 + size
            } else {
                start + grain
            };
            if stop > len {
                t.corrupt(format!(
                    "ERROR: grain for sector {guest} at {start:#x}..{stop:#x} runs past the end of the file ({len} bytes)"
                ));
                continue;
            }
            grains.push((start, stop, guest));
        }
        gts.push(Some(gt));
    }
    // Overlaps: grains with each other and with metadata.
    grains.sort();
    for w in grains.windows(2) {
        if w[1].0 < w[0].1 {
            t.corrupt(format!(
                "ERROR: grains for sectors {} and {} overlap at {:#x}",
                w[0].2, w[1].2, w[1].0
            ));
        }
    }
    for &(a, b, guest) in &grains {
        for (ma, mb, what) in &meta {
            if a < *mb && *ma < b {
                t.corrupt(format!(
                    "ERROR: grain for sector {guest} at {a:#x} overlaps {what}"
                ));
            }
        }
    }
    if rgd_on {
        check_redundant(host, &h, n, &gts, repair, edit, t)?;
    }
    Ok(())
}

/// Compare the redundant directory's tables with the primary's; with `-r all` copy the
/// primary tables over the redundant ones.
fn check_redundant(
    host: &HostFile,
    h: &SparseHeader,
    n: u64,
    gts: &[Option<Vec<u8>>],
    repair: Repair,
    mut edit: Option<EditFile>,
    t: &mut Tally,
) -> Result<()> {
    let len = host.len();
    let gt_bytes = u64::from(h.num_gtes_per_gt) * 4;
    let rgd = read_padded(
        host,
        h.rgd_offset * SECTOR,
        n * 4,
        "redundant grain directory",
    )?;
    let mut fixed = false;
    for (i, r) in rgd.chunks_exact(4).map(LE::read_u32).enumerate() {
        let primary = &gts[i];
        let roff = u64::from(r) * SECTOR;
        if r == 0 {
            if primary.is_some() {
                t.corrupt(format!(
                    "ERROR: redundant grain directory entry {i} is empty, the primary has a table"
                ));
            }
            continue;
        }
        if roff + gt_bytes > len {
            t.corrupt(format!(
                "ERROR: redundant grain table {i} at {roff:#x} runs past the end of the file"
            ));
            continue;
        }
        let red = host.read_vec(roff, gt_bytes, "redundant grain table")?;
        let want: Vec<u8> = primary
            .clone()
            .unwrap_or_else(|| vec![0; gt_bytes as usize]);
        if red != want {
            // With the header's uncleanShutdown set, a change was cut off between a table
            // and its copy: readers use the primary and nothing is lost, so the stale copy
            // counts as a leak (as qemu-img counts what an interrupted write leaves),
            // mended by `-r leaks`. Without it, the copy is damaged.
            let cut_off = h.unclean_shutdown;
            let mend = if cut_off {
                repair.leaks()
            } else {
                repair.all()
            };
            if let (true, Some(edit)) = (mend, edit.as_mut()) {
                t.findings.push(format!(
                    "Repairing redundant grain table {i} at {roff:#x} from the primary"
                ));
                edit.write_at(&want, roff, "writing a redundant grain table")?;
                if cut_off {
                    t.leaks_fixed += 1;
                } else {
                    t.corruptions_fixed += 1;
                }
                fixed = true;
            } else if cut_off {
                t.leak(format!(
                    "Leaked change: redundant grain table {i} at {roff:#x} is behind the primary (the image was not closed cleanly)"
                ));
            } else {
                t.corrupt(format!(
                    "ERROR: redundant grain table {i} at {roff:#x} differs from the primary"
                ));
            }
        }
    }
    if let (true, Some(edit)) = (fixed, edit.as_mut()) {
        edit.sync("flushing the redundant grain tables")?;
        if h.unclean_shutdown {
            // The copies agree again: the image is closed cleanly.
            write_unclean_shutdown(edit, false)?;
        }
    }
    Ok(())
}

/// Walk a streamOptimized marker stream from `overHead`: the grains it holds (sector
/// offset -> LBA); malformations are corruptions.
fn walk_stream(
    host: &HostFile,
    h: &SparseHeader,
    t: &mut Tally,
) -> std::collections::HashMap<u64, u64> {
    let mut grains = std::collections::HashMap::new();
    let len = host.len();
    let mut off = h.overhead * SECTOR;
    loop {
        if off.saturating_add(16) > len {
            t.corrupt(format!(
                "ERROR: the marker stream runs past the end of the file at {off:#x} (no end-of-stream marker)"
            ));
            return grains;
        }
        let Ok(b) = host.read_vec(off, 16, "stream marker") else {
            t.error(format!("ERROR: cannot read the stream marker at {off:#x}"));
            return grains;
        };
        let Ok(m) = Marker::parse(&b) else {
            return grains;
        };
        if m.size != 0 {
            grains.insert(off, m.val);
            off += (12 + u64::from(m.size)).next_multiple_of(SECTOR);
            continue;
        }
        match m.kind {
            // qemu pads after it with zeros; what follows is never read.
            MARKER_EOS => return grains,
            MARKER_GT | MARKER_GD | MARKER_FOOTER => {
                off = off.saturating_add(SECTOR.saturating_add(m.val.saturating_mul(SECTOR)));
            }
            k => {
                t.corrupt(format!("ERROR: unknown stream marker type {k} at {off:#x}"));
                return grains;
            }
        }
    }
}
