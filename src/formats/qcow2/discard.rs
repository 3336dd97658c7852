//! Discarding guest ranges of a qcow2 image in place (in-place sparsify).
//!
//! Every cluster wholly inside a run loses its storage: its L2 entry becomes "unallocated"
//! (entry 0), or "zero, unallocated" (`QCOW_OFLAG_ZERO`, offset cleared; for extended L2
//! entries the all-zeroes subcluster bitmap) when the image has a backing file whose data
//! must not show through. Uncompressed and compressed clusters are both handled: the
//! refcount of every host cluster the entry used is decremented, and a host cluster whose
//! count reaches 0 is free. Partial clusters are left as they are. Clusters whose L2 table
//! does not exist are left too (they store nothing here; in an overlay they keep reading
//! the backing file).
//!
//! The writes follow qemu's own discard order, in transactions of bounded size:
//!
//! 1. the changed L2 entries (each table's changed span, in place), then a flush;
//! 2. the refcount blocks, decremented in place, then a flush;
//! 3. holes punched in the file over the clusters that became free (their space really
//!    goes back to the filesystem; skipped where it cannot punch);
//! 4. after the last transaction, when the file's tail became free, one truncation to the
//!    last cluster still in use.
//!
//! A failure at any write therefore leaves: in step 1, some entries unallocated while
//! their clusters still count 1 (leaked clusters: `qemu-img check` reports leaks, exit
//! code 3, never corruption; `qemu-img check -r leaks` reclaims them); in step 2, fewer
//! leaks; in steps 3 and 4, a clean image with some space not yet given back. No cluster is
//! ever free while an L2 entry still points at it, and every guest byte outside the runs
//! reads exactly as before. An entry is 8 bytes inside one sector, so even a torn write of
//! an L2 span leaves each entry old or new.
//!
//! Refused before any write: images marked dirty (lazy refcounts not yet repaired: the
//! refcounts cannot be trusted) or corrupt, internal snapshots (their L2 tables and
//! clusters are shared and would need copying), persistent dirty bitmaps (a discard
//! changes data behind them), an external data file, and a version 2 image with a backing
//! file (v2 has no zero flag, so an unallocated cluster would show the backing file's
//! data). Every entry's cluster is checked to be aligned, not metadata, and counted at
//! least as often as this discard frees it before its transaction writes anything.

use std::collections::{BTreeMap, HashMap};

use byteorder::{BigEndian, ByteOrder};

use super::editor::{Qcow2Editor, Refs};
use super::header::*;
use super::reader::{COMPRESSED, OFFSET_MASK, ZERO};
use crate::device::{check_discard_runs, HostFile};
use crate::error::{Error, Result};

/// Extended L2 bitmap: every subcluster reads as zeros, none allocated.
const ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// Refcount decrements one transaction holds before it is written (bounds memory; each
/// transaction alone is crash-safe).
const MAX_DECREMENTS: usize = 1 << 16;
/// L2 bytes one transaction holds before it is written.
const MAX_L2_BYTES: u64 = 8 << 20;
/// Refcount blocks kept in memory while checking.
const REF_CACHE: usize = 32;

/// Discard `runs` of the image `ed` edits; see the module comment.
pub fn discard(ed: &mut Qcow2Editor, runs: &[(u64, u64)]) -> Result<u64> {
    refuse(ed)?;
    let size = crate::device::ImageEditor::virtual_size(ed);
    check_discard_runs(size, runs).map_err(|e| e.with_path(&ed.path))?;
    let h = ed.header.clone();
    let cs = ed.cs();
    let backing = h.backing_file_offset != 0 && h.backing_file_size != 0;
    let ext = h.extended_l2();
    let wpe = if ext { 2 } else { 1 };
    let per_table = h.l2_entries();
    let l1 = ed.read_l1()?;
    let mut refs = RefCounts::new(Refs::load(&ed.host, &h)?);
    let meta = metadata_clusters(&h, &l1, &refs.refs.table);
    let mut d = Discarder {
        cs,
        backing,
        ext,
        wpe,
        refs: &mut refs,
        meta: &meta,
        txn: Txn::default(),
        freed_bytes: 0,
        any_free: false,
    };
    let mut cur: Option<Table> = None;
    for &(off, len) in runs {
        let units = crate::device::whole_units(off, len, cs, size);
        let mut c = units.start;
        while c < units.end {
            let i = (c / per_table) as usize;
            let chunk_end = units.end.min((i as u64 + 1) * per_table);
            if cur.as_ref().map(|t| t.idx) != Some(i) {
                if let Some(t) = cur.as_mut() {
                    d.txn.take_span(t);
                }
                cur = None;
                if let Some(&e) = l1.get(i).filter(|e| *e & OFFSET_MASK != 0) {
                    let l2_off = e & OFFSET_MASK;
                    if d.refs.get(&ed.host, l2_off / cs)? != 1 {
                        return Err(Error::corrupt(format!(
                            "the L2 table at {l2_off:#x} (L1 entry {i}) does not have refcount 1 in an image without snapshots; run qemu-img check -r all"
                        ))
                        .at(l2_off)
                        .with_path(&ed.path));
                    }
                    cur = Some(Table {
                        idx: i,
                        off: l2_off,
                        words: ed.read_l2(i, e)?,
                        lo: usize::MAX,
                        hi: 0,
                    });
                }
            }
            if let Some(t) = cur.as_mut() {
                for cl in c..chunk_end {
                    let k = ((cl % per_table) as usize) * wpe;
                    d.entry(ed, t, k, cl * cs)?;
                    if d.txn.full() {
                        d.txn.take_span(t);
                        d.commit(ed)?;
                    }
                }
            }
            c = chunk_end;
        }
    }
    if let Some(t) = cur.as_mut() {
        d.txn.take_span(t);
    }
    d.commit(ed)?;
    let (freed, any_free) = (d.freed_bytes, d.any_free);
    if any_free {
        truncate_tail(ed)?;
    }
    Ok(freed)
}

fn refuse(ed: &Qcow2Editor) -> Result<()> {
    let h = &ed.header;
    let backing = h.backing_file_offset != 0 && h.backing_file_size != 0;
    let why = if h.incompatible_features & INCOMPAT_DIRTY != 0 {
        Some(if h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0 {
            "the image is marked dirty with lazy refcounts, so its refcounts are stale: run qemu-img check -r all first".to_string()
        } else {
            "the image is marked dirty (its refcounts may be stale): run qemu-img check -r all first".to_string()
        })
    } else if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        Some("the image is marked corrupt: run qemu-img check -r all first".to_string())
    } else if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        Some("the image keeps its data in an external data file; discarding into it is not supported (sparsify to a new image instead)".to_string())
    } else if h.nb_snapshots > 0 {
        Some(format!(
            "the image has {} internal snapshot(s) sharing its clusters; delete them with qemu-img snapshot -d, or sparsify to a new image",
            h.nb_snapshots
        ))
    } else if ed.nb_bitmaps > 0 {
        Some(format!(
            "the image has {} persistent dirty bitmap(s) that a discard would bypass; remove them with qemu-img bitmap --remove first, or sparsify to a new image",
            ed.nb_bitmaps
        ))
    } else if backing && h.version < 3 {
        Some("a version 2 qcow2 with a backing file has no zero flag: a discarded cluster would read the backing file's data (upgrade with qemu-img amend -o compat=1.1, or sparsify to a new image)".to_string())
    } else {
        None
    };
    match why {
        Some(m) => Err(Error::unsupported(m).with_path(&ed.path)),
        None => Ok(()),
    }
}

/// Every cluster holding metadata, sorted: a data entry naming one is corruption that a
/// discard must never turn into a freed (and punched) table.
pub(super) fn metadata_clusters(h: &Header, l1: &[u64], reftable: &[u64]) -> Vec<u64> {
    let cs = h.cluster_size();
    let mut v = vec![0u64];
    let l1c = h.l1_table_offset / cs;
    v.extend(l1c..l1c + (u64::from(h.l1_size) * 8).div_ceil(cs));
    let rt = h.refcount_table_offset / cs;
    v.extend(rt..rt + u64::from(h.refcount_table_clusters));
    v.extend(reftable.iter().filter(|&&o| o != 0).map(|o| o / cs));
    v.extend(
        l1.iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .map(|o| o / cs),
    );
    v.sort_unstable();
    v.dedup();
    v
}

/// Refcounts as they are on disk, read through a small cache.
struct RefCounts {
    refs: Refs,
    cache: HashMap<u64, Vec<u8>>,
}

impl RefCounts {
    fn new(refs: Refs) -> Self {
        RefCounts {
            refs,
            cache: HashMap::new(),
        }
    }

    fn block_offset(&self, i: u64) -> Option<u64> {
        self.refs.table.get(i as usize).copied().filter(|&o| o != 0)
    }

    fn get(&mut self, host: &HostFile, c: u64) -> Result<u64> {
        let (i, j) = (c / self.refs.rb_entries, c % self.refs.rb_entries);
        let Some(off) = self.block_offset(i) else {
            return Ok(0);
        };
        if !self.cache.contains_key(&i) {
            if self.cache.len() >= REF_CACHE {
                self.cache.clear();
            }
            let b = host.read_vec(off, self.refs.cs, "refcount block")?;
            self.cache.insert(i, b);
        }
        Ok(get_refcount(&self.cache[&i], j as usize, self.refs.order))
    }
}

/// The L2 table being changed: its entries as they now are, and the span of words
/// changed since it was last written.
struct Table {
    idx: usize,
    off: u64,
    words: Vec<u64>,
    lo: usize,
    hi: usize,
}

/// One transaction: L2 spans to write, then refcount decrements.
#[derive(Default)]
struct Txn {
    l2: Vec<(u64, Vec<u8>)>,
    l2_bytes: u64,
    dec: BTreeMap<u64, u64>,
}

impl Txn {
    fn full(&self) -> bool {
        self.dec.len() >= MAX_DECREMENTS || self.l2_bytes >= MAX_L2_BYTES
    }

    fn take_span(&mut self, t: &mut Table) {
        if t.lo < t.hi {
            let mut b = vec![0u8; (t.hi - t.lo) * 8];
            for (c, w) in b.chunks_exact_mut(8).zip(&t.words[t.lo..t.hi]) {
                BigEndian::write_u64(c, *w);
            }
            self.l2_bytes += b.len() as u64;
            self.l2.push((t.off + t.lo as u64 * 8, b));
        }
        t.lo = usize::MAX;
        t.hi = 0;
    }
}

struct Discarder<'a> {
    cs: u64,
    backing: bool,
    ext: bool,
    wpe: usize,
    refs: &'a mut RefCounts,
    meta: &'a [u64],
    txn: Txn,
    freed_bytes: u64,
    any_free: bool,
}

impl Discarder<'_> {
    /// Plan the discard of the entry at word `k` of table `t` (guest offset `guest`):
    /// its new words, and the decrements of what it used, checked against the refcounts.
    fn entry(&mut self, ed: &Qcow2Editor, t: &mut Table, k: usize, guest: u64) -> Result<()> {
        let cs = self.cs;
        let e = t.words[k];
        let at = t.off + k as u64 * 8;
        let mut clusters: Vec<u64> = Vec::new();
        if e & COMPRESSED != 0 {
            let shift = 62 - (ed.header.cluster_bits - 8);
            let coffset = e & ((1u64 << shift) - 1);
            let nsect = ((e >> shift) & ((1u64 << (ed.header.cluster_bits - 8)) - 1)) + 1;
            let start = coffset & !511;
            let end = start + nsect * 512;
            clusters.extend(start / cs..end.div_ceil(cs));
        } else if e & OFFSET_MASK != 0 {
            let host = e & OFFSET_MASK;
            if !host.is_multiple_of(cs) {
                return Err(Error::corrupt(format!(
                    "the L2 entry of guest offset {guest:#x} names host offset {host:#x}, not cluster aligned; run qemu-img check -r all"
                ))
                .at(at)
                .with_path(&ed.path));
            }
            clusters.push(host / cs);
        }
        for &c in &clusters {
            if self.meta.binary_search(&c).is_ok() {
                return Err(Error::corrupt(format!(
                    "the L2 entry of guest offset {guest:#x} names the cluster at {:#x}, which holds metadata; run qemu-img check -r all",
                    c * cs
                ))
                .at(at)
                .with_path(&ed.path));
            }
            let pending = self.txn.dec.get(&c).copied().unwrap_or(0);
            let n = self.refs.get(&ed.host, c)?;
            if n <= pending {
                return Err(Error::corrupt(format!(
                    "the cluster at {:#x} (guest offset {guest:#x}) has refcount {n}, fewer than the entries using it; run qemu-img check -r all",
                    c * cs
                ))
                .at(at)
                .with_path(&ed.path));
            }
        }
        let (new0, new1) = match (self.backing, self.ext) {
            (false, _) => (0, 0),
            (true, false) => (ZERO, 0),
            (true, true) => (0, ALL_ZEROES),
        };
        let old1 = if self.ext { t.words[k + 1] } else { 0 };
        let change = if clusters.is_empty() {
            // Stores nothing; in an overlay, make it read zeros instead of the backing
            // file (unless it already does).
            self.backing
                && if self.ext {
                    old1 & ALL_ZEROES != ALL_ZEROES || old1 & 0xffff_ffff != 0
                } else {
                    e & ZERO == 0
                }
        } else {
            true
        };
        if !change {
            return Ok(());
        }
        t.words[k] = new0;
        if self.ext {
            t.words[k + 1] = new1;
        }
        t.lo = t.lo.min(k);
        t.hi = t.hi.max(k + self.wpe);
        if !clusters.is_empty() {
            self.freed_bytes += cs;
        }
        for c in clusters {
            *self.txn.dec.entry(c).or_insert(0) += 1;
        }
        Ok(())
    }

    /// Write the transaction: L2 spans, flush, refcount blocks, flush, holes.
    fn commit(&mut self, ed: &mut Qcow2Editor) -> Result<()> {
        let txn = std::mem::take(&mut self.txn);
        if txn.l2.is_empty() {
            return Ok(());
        }
        for (off, b) in &txn.l2 {
            ed.file
                .write_at(b, *off, "writing discarded qcow2 L2 entries")?;
        }
        ed.file.sync("flushing the qcow2 L2 tables")?;
        let per = self.refs.refs.rb_entries;
        let order = self.refs.refs.order;
        let mut freed: Vec<u64> = Vec::new();
        let mut it = txn.dec.iter().peekable();
        while let Some(&(&c0, _)) = it.peek() {
            let i = c0 / per;
            let off = self.refs.block_offset(i).ok_or_else(|| {
                Error::corrupt(format!(
                    "no refcount block covers the cluster at {:#x}",
                    c0 * self.cs
                ))
            })?;
            let mut b = ed.host.read_vec(off, self.refs.refs.cs, "refcount block")?;
            let (mut lo, mut hi) = (usize::MAX, 0usize);
            while let Some(&(&c, &n)) = it.peek() {
                if c / per != i {
                    break;
                }
                it.next();
                let j = c % per;
                let cur = get_refcount(&b, j as usize, order);
                let Some(next) = cur.checked_sub(n) else {
                    return Err(Error::corrupt(format!(
                        "the refcount of the cluster at {:#x} changed under the discard ({cur}, freeing {n})",
                        c * self.cs
                    ))
                    .with_path(&ed.path));
                };
                set_refcount(&mut b, j as usize, order, next);
                if next == 0 {
                    freed.push(c);
                }
                // The bytes holding entry j (sub-byte widths share a byte).
                let bit = j as usize * (1usize << order);
                lo = lo.min(bit / 8);
                hi = hi.max((bit + (1usize << order)).div_ceil(8));
            }
            ed.file
                .write_at(&b[lo..hi], off + lo as u64, "decrementing qcow2 refcounts")?;
        }
        ed.file.sync("flushing the qcow2 refcounts")?;
        self.refs.cache.clear();
        // Give the freed clusters' space back, run by run.
        let mut k = 0;
        while k < freed.len() {
            let mut n = 1;
            while k + n < freed.len() && freed[k + n] == freed[k] + n as u64 {
                n += 1;
            }
            let (a, len) = (freed[k] * self.cs, n as u64 * self.cs);
            let a_end = (a + len).min(ed.host.len());
            if a < a_end
                && !ed
                    .file
                    .punch_hole(a, a_end - a, "punching freed qcow2 clusters")?
            {
                break;
            }
            k += n;
        }
        self.any_free |= !freed.is_empty();
        Ok(())
    }
}

/// Cut the file back to its last cluster in use, when the discard freed its tail.
fn truncate_tail(ed: &mut Qcow2Editor) -> Result<()> {
    let keep = (ed.last_used_clusters()?.0 + 1) * ed.cs();
    if keep < ed.host.len() {
        ed.file
            .set_len(keep, "truncating the freed tail of the qcow2 image")?;
        ed.host = ed.reopen_host()?;
    }
    Ok(())
}
