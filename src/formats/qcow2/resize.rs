//! Resizing qcow2 (v2 and v3) in place.
//!
//! Every resize is one transaction that never writes over a cluster the current image
//! uses. The new metadata — an L1 table, the boundary L2 table, the refcount blocks whose
//! counts change and a refcount table pointing at them — goes into clusters that are free
//! in the current image (refcount 0), is flushed, and then one write of header bytes
//! 24..60 (size, l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters)
//! switches from the old state to the new one. Before that write the new clusters are
//! unreferenced with refcount 0; after it the old L1, L2, refcount blocks and table are
//! unreferenced with refcount 0 in the new refcounts. So a failure at any write leaves
//! an image that reads exactly as before or exactly as after and that `qemu-img check`
//! finds clean — no leaks either, which qemu's own in-place ordering (refcounts first,
//! then the tables) would leave.
//!
//! When nothing is freed and the L1 table already has room (in its entries or in the
//! unused tail of its last cluster), only the header changes. Shrinking frees the data
//! and L2 clusters past the new end (clusters are kept up to the one holding the new
//! end, as qemu does), then truncates the file where its tail became free; tables that
//! would keep the tail in use (the big L1 of an earlier grow) first move down in a
//! second transaction of the same kind. `preallocation=full` allocates zeroed data
//! clusters for the new space in the same transaction. Images this
//! cannot keep consistent are refused before anything is written: internal snapshots,
//! encryption, external data files, a backing file, persistent bitmaps, and images
//! marked dirty or corrupt.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use byteorder::{BigEndian, ByteOrder};

use super::compress::decompress;
use super::editor::{Alloc, Plan, Qcow2Editor, Refs, Write};
use super::header::*;
use super::reader::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::error::{Error, Result};
use crate::options::{Preallocation, ResizeOptions};

fn refuse_unsupported(h: &Header, path: &Path) -> Result<()> {
    let why = if h.incompatible_features & INCOMPAT_DIRTY != 0 {
        Some("the image is marked dirty (its refcounts may be stale): run qemu-img check -r all first".to_string())
    } else if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        Some("the image is marked corrupt: run qemu-img check -r all first".to_string())
    } else if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        Some(
            "the image keeps its data in an external data file; resizing it is not supported"
                .to_string(),
        )
    } else if h.nb_snapshots > 0 {
        Some(format!(
            "Can't resize an image which has snapshots ({} internal snapshot(s)); delete them with qemu-img snapshot -d, or convert to a new image with a target size (ConvertOptions::target_size)",
            h.nb_snapshots
        ))
    } else if h.backing_file_offset != 0 && h.backing_file_size != 0 {
        Some("the image has a backing file: grown space would show the backing file's data; resizing overlays is not supported (convert to a new image with a target size, ConvertOptions::target_size)".to_string())
    } else {
        None
    };
    match why {
        Some(m) => Err(Error::unsupported(m).with_path(path)),
        None => Ok(()),
    }
}

impl Qcow2Editor {
    /// A copied L2 table takes over its original's references, which is right only when
    /// nothing else (a snapshot) shares the original.
    fn unshared(&self, refs: &mut Refs, l1_entry: u64) -> Result<()> {
        let off = l1_entry & OFFSET_MASK;
        let n = refs.get_old(&self.host, off / self.cs())?;
        if n != 1 {
            return Err(Error::corrupt(format!(
                "the L2 table at {off:#x} has refcount {n}, not 1, in an image without snapshots (run qemu-img check -r all)"
            ))
            .at(off));
        }
        Ok(())
    }

    /// Decrement the refcounts of what one L2 entry (`words`: one or two u64) maps.
    fn free_entry(&self, refs: &mut Refs, words: &[u64]) -> Result<()> {
        let e = words[0];
        let cs = self.cs();
        if e & COMPRESSED != 0 {
            let shift = 62 - (self.header.cluster_bits - 8);
            let coffset = e & ((1u64 << shift) - 1);
            let nsect = ((e >> shift) & ((1u64 << (self.header.cluster_bits - 8)) - 1)) + 1;
            let start = coffset & !511;
            let end = start + nsect * 512;
            for c in start / cs..end.div_ceil(cs) {
                refs.add(&self.host, c, -1)?;
            }
        } else if e & OFFSET_MASK != 0 {
            refs.add(&self.host, (e & OFFSET_MASK) / cs, -1)?;
        }
        Ok(())
    }

    /// Build the new state for `new_size`: the tables to write (in clusters free in the
    /// current image) and the header that switches to them. When nothing is freed and
    /// the L1 has room, the plan is the header alone.
    /// `relocate_above`: also move the L1 table and the refcount blocks that lie past
    /// this cluster (to let the file be cut back after a shrink).
    fn plan(
        &self,
        new_size: u64,
        alloc_at_end: bool,
        relocate_above: Option<u64>,
        prealloc: bool,
    ) -> Result<Plan> {
        let h = &self.header;
        let cs = self.cs();
        let span = self.span();
        let words = (h.l2_entry_size() / 8) as usize;
        let old_size = h.size;
        let old_l1 = self.read_l1()?;
        let new_needed = new_size.div_ceil(span);
        if new_needed * 8 > MAX_L1_BYTES {
            return Err(Error::limit(format!(
                "Failed to grow the L1 table: File too large (a qcow2 image with {cs}-byte clusters holds at most {} bytes: {} L1 entries of {span} bytes, the {} MiB L1 limit)",
                (MAX_L1_BYTES / 8) * span,
                MAX_L1_BYTES / 8,
                MAX_L1_BYTES >> 20
            )));
        }
        let mut refs = Refs::load(&self.host, h)?;
        let file_clusters = self.host.len().div_ceil(cs);
        let mut alloc = Alloc {
            start: if alloc_at_end { file_clusters } else { 1 },
            taken: BTreeSet::new(),
        };
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();

        // Drop every mapping from the cluster after the last kept guest byte on: on a
        // shrink that is the dropped tail; on a grow it is normally nothing, and when an
        // image maps clusters past its end they must not reappear as guest data.
        let keep = old_size.min(new_size).div_ceil(cs) * cs;
        let mut new_l1 = old_l1.clone();
        let mut l1_changed = false;
        let first_whole = keep.div_ceil(span) as usize;
        for (i, &e) in old_l1.iter().enumerate().skip(first_whole) {
            if e & OFFSET_MASK == 0 {
                continue;
            }
            let l2 = self.read_l2(i, e)?;
            for w in l2.chunks_exact(words) {
                self.free_entry(&mut refs, w)?;
            }
            refs.add(&self.host, (e & OFFSET_MASK) / cs, -1)?;
            new_l1[i] = 0;
            l1_changed = true;
        }
        if !keep.is_multiple_of(span) {
            let i = (keep / span) as usize;
            if let Some(&e) = old_l1.get(i).filter(|e| *e & OFFSET_MASK != 0) {
                let mut l2 = self.read_l2(i, e)?;
                let from = ((keep % span) / cs) as usize * words;
                let mut changed = false;
                for k in (from..l2.len()).step_by(words) {
                    if l2[k..k + words].iter().any(|&w| w != 0) {
                        self.free_entry(&mut refs, &l2[k..k + words])?;
                        l2[k..k + words].fill(0);
                        changed = true;
                    }
                }
                if changed {
                    self.unshared(&mut refs, e)?;
                    refs.add(&self.host, (e & OFFSET_MASK) / cs, -1)?;
                    if l2.iter().all(|&w| w == 0) {
                        new_l1[i] = 0;
                    } else {
                        let c = alloc.run(&mut refs, &self.host, 1)?;
                        refs.add(&self.host, c, 1)?;
                        let mut b = vec![0u8; cs as usize];
                        for (k, w) in l2.iter().enumerate() {
                            BigEndian::write_u64(&mut b[k * 8..], *w);
                        }
                        writes.push((c * cs, b));
                        new_l1[i] = (c * cs) | COPIED;
                    }
                    l1_changed = true;
                }
            }
        }

        // preallocation=full: the new space's unmapped clusters get zeroed data clusters.
        let (zeros, tables_added) = if prealloc && new_size > old_size {
            self.preallocate(
                &mut refs,
                &mut alloc,
                &old_l1,
                &mut new_l1,
                &mut writes,
                new_size,
            )?
        } else {
            (Vec::new(), false)
        };
        l1_changed |= tables_added;

        let mut header = h.clone();
        header.size = new_size;
        let old_l1_clusters = (u64::from(h.l1_size) * 8).div_ceil(cs);
        let capacity = if h.l1_table_offset != 0 {
            old_l1_clusters * cs / 8
        } else {
            0
        };
        // A shrink also moves an L1 that would keep clusters it no longer needs (after
        // a large grow), so the file can be cut back.
        let l1_oversized = (new_size < old_size && (new_needed * 8).div_ceil(cs) < old_l1_clusters)
            || relocate_above.is_some_and(|m| {
                h.l1_table_offset != 0 && h.l1_table_offset / cs + old_l1_clusters > m + 1
            });
        if !l1_changed && new_needed <= u64::from(h.l1_size) && !l1_oversized {
            // Header only.
        } else if !l1_changed && new_needed <= capacity && !l1_oversized {
            // The unused tail of the L1's last cluster takes the new entries; it is
            // unread by the current image, so zeroing it first is safe.
            let from = u64::from(h.l1_size) * 8;
            let len = (new_needed * 8 - from) as usize;
            writes.push((h.l1_table_offset + from, vec![0u8; len]));
            header.l1_size = new_needed as u32;
        } else {
            let n = (new_needed * 8).div_ceil(cs).max(1);
            let c = alloc.run(&mut refs, &self.host, n)?;
            for k in 0..n {
                refs.add(&self.host, c + k, 1)?;
            }
            let mut b = vec![0u8; (n * cs) as usize];
            for (k, e) in new_l1.iter().take(new_needed as usize).enumerate() {
                BigEndian::write_u64(&mut b[k * 8..], *e);
            }
            writes.push((c * cs, b));
            if h.l1_table_offset != 0 {
                for k in 0..old_l1_clusters {
                    refs.add(&self.host, h.l1_table_offset / cs + k, -1)?;
                }
            }
            header.l1_size = new_needed as u32;
            header.l1_table_offset = c * cs;
        }

        if let Some(m) = relocate_above {
            for i in 0..refs.table.len() as u64 {
                if refs.table[i as usize] / cs > m {
                    refs.touch(&self.host, i)?;
                }
            }
        }
        if !refs.new.is_empty() {
            let (rt_offset, rt_clusters, mut rt_writes) =
                self.finish_refcounts(&mut refs, &mut alloc)?;
            header.refcount_table_offset = rt_offset;
            header.refcount_table_clusters = rt_clusters;
            writes.append(&mut rt_writes);
        }
        Ok(Plan {
            writes,
            zeros,
            header,
        })
    }

    /// preallocation=full: every cluster of the new space that is not mapped gets a data
    /// cluster of zeros, in one run at the end, and its L2 entry in a new copy of its
    /// table. Returns the host ranges to zero and whether the L1 changed.
    fn preallocate(
        &self,
        refs: &mut Refs,
        alloc: &mut Alloc,
        old_l1: &[u64],
        new_l1: &mut Vec<u64>,
        writes: &mut Vec<Write>,
        new_size: u64,
    ) -> Result<(Vec<(u64, u64)>, bool)> {
        let h = &self.header;
        let (cs, span) = (self.cs(), self.span());
        let words = (h.l2_entry_size() / 8) as usize;
        let old_size = h.size;
        let mut zeros = Vec::new();
        let mut l1_changed = false;
        let first = old_size / cs;
        let end = new_size.div_ceil(cs);
        let mut tables: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        let mut todo = Vec::new();
        for c in first..end {
            let i = (c * cs / span) as usize;
            if let std::collections::btree_map::Entry::Vacant(v) = tables.entry(i) {
                let t = match old_l1.get(i).filter(|e| *e & OFFSET_MASK != 0) {
                    Some(&e) => self.read_l2(i, e)?,
                    None => vec![0u64; (cs / 8) as usize],
                };
                v.insert(t);
            }
            let k = ((c * cs % span) / cs) as usize * words;
            if tables[&i][k..k + words].iter().all(|&w| w == 0) {
                todo.push((i, k));
            }
        }
        if !todo.is_empty() {
            let n = todo.len() as u64;
            let run = alloc.run(refs, &self.host, n)?;
            for (j, (i, k)) in todo.iter().enumerate() {
                let host = (run + j as u64) * cs;
                refs.add(&self.host, run + j as u64, 1)?;
                let t = tables.get_mut(i).expect("loaded");
                t[*k] = host | COPIED;
                if words == 2 {
                    // Every subcluster allocated (and zero on disk).
                    t[*k + 1] = 0xffff_ffff;
                }
            }
            zeros.push((run * cs, n * cs));
            let changed: BTreeSet<usize> = todo.iter().map(|t| t.0).collect();
            for (i, t) in tables {
                if !changed.contains(&i) {
                    continue;
                }
                if let Some(&e) = old_l1.get(i).filter(|e| *e & OFFSET_MASK != 0) {
                    self.unshared(refs, e)?;
                    refs.add(&self.host, (e & OFFSET_MASK) / cs, -1)?;
                }
                let c = alloc.run(refs, &self.host, 1)?;
                refs.add(&self.host, c, 1)?;
                let mut b = vec![0u8; cs as usize];
                for (k, w) in t.iter().enumerate() {
                    BigEndian::write_u64(&mut b[k * 8..], *w);
                }
                writes.push((c * cs, b));
                if new_l1.len() <= i {
                    new_l1.resize(i + 1, 0);
                }
                new_l1[i] = (c * cs) | COPIED;
                l1_changed = true;
            }
        }
        Ok((zeros, l1_changed))
    }

    /// The L2 entry of the cluster holding guest byte `guest` (None: unmapped).
    fn entry_of(&self, l1: &[u64], guest: u64) -> Result<Option<Vec<u64>>> {
        let span = self.span();
        let i = (guest / span) as usize;
        let Some(&e) = l1.get(i).filter(|e| *e & OFFSET_MASK != 0) else {
            return Ok(None);
        };
        let l2 = self.read_l2(i, e)?;
        let words = (self.header.l2_entry_size() / 8) as usize;
        let k = ((guest % span) / self.cs()) as usize * words;
        Ok(Some(l2[k..k + words].to_vec()))
    }

    /// Bytes of the cluster holding guest byte `from` that lie at and after `from`, as
    /// (host offset, bytes) when they are an uncompressed cluster's and not all zero.
    fn stale_tail(&self, l1: &[u64], from: u64, growing: bool) -> Result<Option<(u64, usize)>> {
        let cs = self.cs();
        if from.is_multiple_of(cs) {
            return Ok(None);
        }
        let Some(w) = self.entry_of(l1, from)? else {
            return Ok(None);
        };
        let e = w[0];
        let in_cluster = from % cs;
        if e & COMPRESSED != 0 {
            if !growing {
                // Past the end after a shrink; a later grow checks it again.
                return Ok(None);
            }
            if !growing {
                // Past the end after a shrink; a later grow checks it again.
                return Ok(None);
            }
            let shift = 62 - (self.header.cluster_bits - 8);
            let coffset = e & ((1u64 << shift) - 1);
            let nsect = ((e >> shift) & ((1u64 << (self.header.cluster_bits - 8)) - 1)) + 1;
            let flen = self.host.len();
            let n = (nsect * 512 - (coffset & 511)).min(flen.saturating_sub(coffset));
            let input = self.host.read_vec(coffset, n, "compressed cluster")?;
            let mut out = vec![0u8; cs as usize];
            decompress(self.header.compression(), &input, &mut out).map_err(|e| e.at(coffset))?;
            if out[in_cluster as usize..].iter().any(|&b| b != 0) {
                return Err(Error::unsupported(format!(
                    "the last cluster (guest offset {:#x}) is compressed and holds data past the current end; growing would expose it (convert the image with a target size instead, ConvertOptions::target_size)",
                    from - in_cluster
                )));
            }
            return Ok(None);
        }
        let host = e & OFFSET_MASK;
        if host == 0 || (!self.header.extended_l2() && e & ZERO != 0) {
            return Ok(None);
        }
        let start = host + in_cluster;
        let end = (host + cs).min(self.host.len());
        if end <= start {
            return Ok(None);
        }
        let tail = self
            .host
            .read_vec(start, end - start, "last data cluster")?;
        if tail.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        Ok(Some((start, tail.len())))
    }
}

/// Resize the image to `new_size` in place (see the module doc).
pub(super) fn resize(ed: &mut Qcow2Editor, new_size: u64, opts: &ResizeOptions) -> Result<()> {
    refuse_unsupported(&ed.header, &ed.path)?;
    if ed.nb_bitmaps > 0 {
        return Err(Error::unsupported(format!(
            "the image has {} persistent dirty bitmap(s); resizing it would leave them the old size (remove them with qemu-img bitmap --remove first)",
            ed.nb_bitmaps
        ))
        .with_path(&ed.path));
    }
    if !new_size.is_multiple_of(512) {
        return Err(Error::arg("The new size must be a multiple of 512").with_path(&ed.path));
    }
    if new_size == 0 {
        return Err(Error::arg("New image size must be positive").with_path(&ed.path));
    }
    let old = ed.header.size;
    if new_size == old {
        return Ok(());
    }
    let shrinking = new_size < old;
    if shrinking && !opts.shrink {
        return Err(Error::arg(crate::options::SHRINK_REFUSED).with_option("ResizeOptions::shrink"));
    }
    if shrinking && opts.preallocation != Preallocation::Off {
        return Err(Error::arg(
            "Preallocation can't be used for shrinking an image",
        ));
    }
    let l1 = ed.read_l1()?;
    // Grown space must read as zeros: bytes past the old end in its last cluster are
    // zeroed first (the current image never reads them).
    let grow_tail = if shrinking {
        None
    } else {
        ed.stale_tail(&l1, old, true)?
    };
    let plan = ed.plan(
        new_size,
        !shrinking,
        None,
        opts.preallocation == Preallocation::Full,
    )?;
    ed.commit(plan, grow_tail)?;
    if shrinking {
        // The image is the new one now. Its last cluster's bytes past the new end
        // are zeroed (a later grow must not show them).
        let l1 = ed.read_l1()?;
        if let Some((off, n)) = ed.stale_tail(&l1, new_size, false)? {
            ed.file
                .write_at(&vec![0u8; n], off, "zeroing past the new end")?;
        }
        // Tables that now sit past the last data (the L1 of an earlier large grow,
        // or copies this shrink had to append) move down, in one more transaction
        // of the same kind, so the free tail can be cut off.
        let (last, last_data) = ed.last_used_clusters()?;
        if last > last_data + 1 {
            let plan = ed.plan(new_size, false, Some(last_data), false)?;
            ed.commit(plan, None)?;
        }
        let keep = (ed.last_used_clusters()?.0 + 1) * ed.cs();
        if keep < ed.host.len() {
            ed.file.set_len(keep, "truncating the freed tail")?;
        }
    }
    Ok(())
}
