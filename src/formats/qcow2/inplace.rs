//! Writing a conversion into an existing qcow2 image in place (`convert -n`), keeping the
//! image's cluster size, version, refcount width, backing file and preallocation.
//!
//! Each guest cluster is written whole (the writer's granule is the cluster; a last
//! cluster the conversion fills only in part is completed with the image's own bytes,
//! read before anything is written). A cluster the image stores uncompressed and alone
//! (COPIED, refcount 1) is overwritten where it is; any other (unallocated, zero,
//! compressed, shared) gets a new cluster past the end of the file. Ranges that are zero in
//! the source (unless the image already reads as zeros) become: in a version 3 image, the
//! zero flag (a stored cluster keeps its place, as with qemu's zero writes without unmap);
//! in a version 2 image, zeros written over a stored cluster, nothing where nothing is
//! stored, and a new cluster of zeros where a backing file would show through.
//!
//! Writes go in batches (at most 1 GiB or 65536 new clusters each), ordered so a failure at
//! any write leaves an image `qemu-img check` accepts, with at most leaked clusters:
//!
//! 1. data, into the clusters it overwrites and the new clusters at the end of the file;
//! 2. new L2 tables, and the refcounts counting every new cluster (changed refcount blocks
//!    and a refcount table in clusters free in the image), flushed, then one header write
//!    switching to them, as every change does ([`super::editor`]): before it the new clusters
//!    are unreferenced with refcount 0 (a failure gives the file its old length back);
//! 3. the changed entries of the existing L2 tables and the L1 entries of the new ones,
//!    then a flush: only now do tables name the new clusters, all counted already;
//! 4. the clusters the batch stopped referencing (compressed or shared ones it replaced)
//!    are decremented in the next batch's refcount transaction: until then they leak.
//!
//! Refused before any write: images marked dirty or corrupt (their refcounts cannot be
//! trusted), internal snapshots (their clusters would need copying), persistent dirty
//! bitmaps (the writes would bypass them), encryption, an external data file, an image
//! smaller than the conversion, and a last cluster the conversion fills only in part whose
//! rest comes from the backing file, unless referenced files may be opened (the source's
//! `allow_references`: the backing file is then read through the reference gate).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::Path;

use byteorder::{BigEndian, ByteOrder};

use super::discard::metadata_clusters;
use super::editor::{open_qcow2, Alloc, Plan, Qcow2Editor, Refs};
use super::header::*;
use super::reader::{self, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::device::{BlockDevice, MappingKind};
use crate::error::{Error, Result};
use crate::inplace::{target_too_small, Gaps, InPlaceOptions};
use crate::options::OpenOptions;
use crate::writer::ImageWriter;

/// Extended L2 bitmap: every subcluster allocated.
const ALL_ALLOC: u64 = 0x0000_0000_ffff_ffff;
/// Extended L2 bitmap: every subcluster reads as zeros, none allocated.
const ALL_ZEROES: u64 = 0xffff_ffff_0000_0000;
/// A batch commits once it allocated this many bytes ...
const BATCH_BYTES: u64 = 1 << 30;
/// ... or this many clusters ...
const BATCH_CLUSTERS: usize = 1 << 16;
/// ... or holds this many bytes of changed L2 tables.
const BATCH_TABLE_BYTES: u64 = 64 << 20;

/// An L2 table the batch changes.
struct Table {
    off: u64,
    words: Vec<u64>,
    /// Allocated by this batch (written whole before the switch, its L1 entry after).
    fresh: bool,
    /// Words changed since loaded: `[lo, hi)`.
    lo: usize,
    hi: usize,
}

/// The in-place writer (see the module comment).
pub struct Qcow2InPlace {
    ed: Qcow2Editor,
    size: u64,
    gaps: Gaps,
    /// The image's guest bytes from `size` to the end of its cluster (zeros past the
    /// image's end): what a last, partly converted cluster keeps.
    tail: Vec<u8>,
    l1: Vec<u64>,
    backing: bool,
    v3: bool,
    ext: bool,
    wpe: usize,
    per_table: u64,
    tables: BTreeMap<usize, Table>,
    /// Clusters this batch allocated.
    fresh: Vec<u64>,
    /// Clusters this batch stops referencing (decremented by the next transaction).
    dec: Vec<u64>,
    /// Clusters the previous batch stopped referencing, its tables written.
    carry: Vec<u64>,
    /// The next cluster to allocate (past everything in the file).
    next: u64,
    refs: Refs,
    /// Metadata clusters, sorted: a data entry naming one is corruption.
    meta: Vec<u64>,
}

/// Open the qcow2 image in `file` for a conversion to write into (see the module comment).
pub fn open_in_place(
    file: File,
    path: &Path,
    opts: &InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    let ed = open_qcow2(file, path, opts.fail_at_write)?;
    let h = ed.header.clone();
    refuse(&ed)?;
    if h.size < opts.size {
        return Err(target_too_small(h.size, opts.size));
    }
    let cs = ed.cs();
    let backing = h.backing_file_offset != 0 && h.backing_file_size != 0;
    let tail = read_tail(&ed, opts, backing)?;
    let l1 = ed.read_l1()?;
    let refs = Refs::load(&ed.host, &h)?;
    let meta = metadata_clusters(&h, &l1, &refs.table);
    let next = ed.host.len().div_ceil(cs);
    Ok(Box::new(Qcow2InPlace {
        size: opts.size,
        gaps: Gaps::new(opts),
        tail,
        l1,
        backing,
        v3: h.version >= 3,
        ext: h.extended_l2(),
        wpe: (h.l2_entry_size() / 8) as usize,
        per_table: h.l2_entries(),
        tables: BTreeMap::new(),
        fresh: Vec::new(),
        dec: Vec::new(),
        carry: Vec::new(),
        next,
        refs,
        meta,
        ed,
    }))
}

fn refuse(ed: &Qcow2Editor) -> Result<()> {
    let h = &ed.header;
    let why = if h.incompatible_features & INCOMPAT_DIRTY != 0 {
        "the image is marked dirty (its refcounts may be stale): run qemu-img check -r all first"
            .to_string()
    } else if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        "the image is marked corrupt: run qemu-img check -r all first".to_string()
    } else if h.nb_snapshots > 0 {
        format!(
            "the image has {} internal snapshot(s) sharing its clusters, which writing into it in place would have to copy; delete them with qemu-img snapshot -d, or convert into a new image",
            h.nb_snapshots
        )
    } else if ed.nb_bitmaps > 0 {
        format!(
            "the image has {} persistent dirty bitmap(s) that writing into it would bypass; remove them with qemu-img bitmap --remove first, or convert into a new image",
            ed.nb_bitmaps
        )
    } else if h.crypt_method != 0 {
        "the image is encrypted; writing into it in place is not supported".to_string()
    } else {
        return Ok(());
    };
    Err(Error::unsupported(why).with_path(&ed.path))
}

/// The image's bytes from `size` to the end of its cluster, read before any write; from
/// the backing file where it supplies them, which is opened only through the reference
/// gate (`opts.open`).
fn read_tail(ed: &Qcow2Editor, opts: &InPlaceOptions, backing: bool) -> Result<Vec<u8>> {
    let cs = ed.cs();
    let size = opts.size;
    if size.is_multiple_of(cs) {
        return Ok(Vec::new());
    }
    let end = size.next_multiple_of(cs);
    let mut tail = vec![0u8; (end - size) as usize];
    let upto = end.min(ed.header.size);
    if upto <= size {
        return Ok(tail);
    }
    let dev = reader::open(ed.reopen_host()?, &OpenOptions::new().without_backing())?;
    let mut off = size;
    let mut needs_backing = false;
    while backing && off < upto {
        let m = dev.map(off, upto - off)?;
        needs_backing |= m.kind == MappingKind::Unallocated;
        off = m.offset + m.len;
    }
    if needs_backing && !opts.open.allow_references {
        return Err(Error::unsupported(format!(
            "the conversion fills the image's cluster at guest offset {:#x} only up to {size:#x} (the source's size), and the backing file supplies the rest of it, which is read only when referenced files may be opened (OpenOptions::allow_references); or convert with a target size that is a multiple of the cluster size ({cs})",
            end - cs
        ))
        .with_option("OpenOptions::allow_references")
        .with_path(&ed.path));
    }
    let n = (upto - size) as usize;
    if needs_backing {
        reader::open(ed.reopen_host()?, &opts.open)?.read_at(&mut tail[..n], size)?;
    } else {
        dev.read_at(&mut tail[..n], size)?;
    }
    Ok(tail)
}

impl Qcow2InPlace {
    fn cs(&self) -> u64 {
        self.ed.cs()
    }

    fn at(&self, c: u64) -> (usize, usize) {
        (
            (c / self.per_table) as usize,
            (c % self.per_table) as usize * self.wpe,
        )
    }

    /// A new cluster past everything in the file (and free: refcount 0, not metadata).
    fn alloc(&mut self) -> Result<u64> {
        loop {
            let c = self.next;
            self.next += 1;
            if self.refs.get_old(&self.ed.host, c)? == 0 && self.meta.binary_search(&c).is_err() {
                self.fresh.push(c);
                return Ok(c);
            }
        }
    }

    /// Cluster `c`'s entry words (the second is 0 without extended L2), loading its table,
    /// or creating it with `create`; None when the table does not exist and is not created.
    fn entry(&mut self, c: u64, create: bool) -> Result<Option<(u64, u64)>> {
        let (i, k) = self.at(c);
        if !self.tables.contains_key(&i) {
            let cs = self.cs();
            let e = self.l1[i];
            let off = e & OFFSET_MASK;
            let t = if off != 0 {
                if e & COPIED == 0 || self.refs.get_old(&self.ed.host, off / cs)? != 1 {
                    return Err(Error::corrupt(format!(
                        "the L2 table at {off:#x} (L1 entry {i}) is shared or its refcount is not 1 in an image without snapshots; run qemu-img check -r all"
                    ))
                    .at(self.ed.header.l1_table_offset + i as u64 * 8)
                    .with_path(&self.ed.path));
                }
                Table {
                    off,
                    words: self.ed.read_l2(i, e)?,
                    fresh: false,
                    lo: usize::MAX,
                    hi: 0,
                }
            } else if create {
                let c = self.alloc()?;
                Table {
                    off: c * cs,
                    words: vec![0; (cs / 8) as usize],
                    fresh: true,
                    lo: usize::MAX,
                    hi: 0,
                }
            } else {
                return Ok(None);
            };
            self.tables.insert(i, t);
        }
        let t = &self.tables[&i];
        Ok(Some((
            t.words[k],
            if self.ext { t.words[k + 1] } else { 0 },
        )))
    }

    fn set_entry(&mut self, c: u64, e: u64, b: u64) {
        let (i, k) = self.at(c);
        let ext = self.ext;
        let wpe = self.wpe;
        let t = self.tables.get_mut(&i).expect("entry() loaded the table");
        if t.words[k] != e || (ext && t.words[k + 1] != b) {
            t.words[k] = e;
            if ext {
                t.words[k + 1] = b;
            }
            t.lo = t.lo.min(k);
            t.hi = t.hi.max(k + wpe);
        }
    }

    /// The host offset of the uncompressed cluster entry `e` names when this image alone
    /// uses it (so it can be overwritten where it is); None for anything else. A cluster
    /// that is metadata or miscounted is corruption.
    fn own_cluster(&mut self, e: u64, guest: u64) -> Result<Option<u64>> {
        let cs = self.cs();
        let host = e & OFFSET_MASK;
        if e & COMPRESSED != 0 || host == 0 || e & COPIED == 0 {
            return Ok(None);
        }
        let bad = |what: String| {
            Err(Error::corrupt(format!(
                "the L2 entry of guest offset {guest:#x} names host offset {host:#x}, {what}; run qemu-img check -r all"
            )))
        };
        if !host.is_multiple_of(cs) {
            return bad("not cluster aligned".into());
        }
        if self.meta.binary_search(&(host / cs)).is_ok() {
            return bad("which holds metadata".into());
        }
        let n = self.refs.get_old(&self.ed.host, host / cs)?;
        if n != 1 {
            return bad(format!(
                "whose refcount is {n}, not the 1 its COPIED flag says"
            ));
        }
        Ok(Some(host))
    }

    /// The host clusters entry `e` uses (a compressed one may span two).
    fn used_clusters(&self, e: u64) -> Vec<u64> {
        let cs = self.cs();
        if e & COMPRESSED != 0 {
            let bits = self.ed.header.cluster_bits;
            let shift = 62 - (bits - 8);
            let coffset = e & ((1u64 << shift) - 1);
            let nsect = ((e >> shift) & ((1u64 << (bits - 8)) - 1)) + 1;
            let start = coffset & !511;
            (start / cs..(start + nsect * 512).div_ceil(cs)).collect()
        } else if e & OFFSET_MASK != 0 {
            vec![(e & OFFSET_MASK) / cs]
        } else {
            Vec::new()
        }
    }

    /// Where cluster `c`'s new data goes: its own cluster, or a new one (the entry then
    /// names it, and what the old entry used is released).
    fn put_cluster(&mut self, c: u64) -> Result<u64> {
        let cs = self.cs();
        let (e, _) = self.entry(c, true)?.expect("created");
        let host = match self.own_cluster(e, c * cs)? {
            Some(h) => h,
            None => {
                let old = self.used_clusters(e);
                self.dec.extend(old);
                self.alloc()? * cs
            }
        };
        let b = if self.ext { ALL_ALLOC } else { 0 };
        self.set_entry(c, host | COPIED, b);
        Ok(host)
    }

    /// Make the whole cluster `c` read as zeros (see the module comment).
    fn zero_cluster(&mut self, c: u64) -> Result<()> {
        let cs = self.cs();
        let Some((e, b)) = self.entry(c, self.backing)? else {
            return Ok(());
        };
        if let Some(host) = self.own_cluster(e, c * cs)? {
            if self.ext {
                self.set_entry(c, e, ALL_ZEROES);
            } else if self.v3 {
                self.set_entry(c, e | ZERO, 0);
            } else {
                self.ed.file.zero_range(
                    host,
                    cs,
                    "zeroing a cluster that is zero in the source",
                )?;
            }
            return Ok(());
        }
        let old = self.used_clusters(e);
        let reads_zero = old.is_empty()
            && (!self.backing
                || if self.ext {
                    b >> 32 == 0xffff_ffff
                } else {
                    e & ZERO != 0
                });
        if reads_zero {
            return Ok(());
        }
        self.dec.extend(old);
        if self.ext {
            self.set_entry(c, 0, ALL_ZEROES);
        } else if self.v3 {
            self.set_entry(c, ZERO, 0);
        } else if !self.backing {
            self.set_entry(c, 0, 0);
        } else {
            // Version 2 has no zero flag: zeros must be stored to hide the backing file.
            let host = self.alloc()? * cs;
            self.ed.file.zero_range(
                host,
                cs,
                "writing a cluster of zeros over the backing file",
            )?;
            self.set_entry(c, host | COPIED, 0);
        }
        Ok(())
    }

    /// The last cluster, which the conversion fills up to `size` only: `head` followed by
    /// the image's own bytes.
    fn last_cluster(&mut self, c: u64, head: &[u8]) -> Result<()> {
        let mut buf = head.to_vec();
        buf.extend_from_slice(&self.tail);
        if crate::convert::is_zero(&buf) {
            return self.zero_cluster(c);
        }
        let host = self.put_cluster(c)?;
        self.ed.file.write_at(&buf, host, "writing guest data")
    }

    /// Make guest `[a, b)` read as zeros (`a` on a cluster boundary, `b` too or the end).
    fn zero_range(&mut self, a: u64, b: u64) -> Result<()> {
        let cs = self.cs();
        let mut c = a / cs;
        while c * cs < b {
            let i = (c / self.per_table) as usize;
            if !self.backing && self.l1[i] & OFFSET_MASK == 0 && !self.tables.contains_key(&i) {
                // No table, no backing file: the whole span reads as zeros.
                c = (i as u64 + 1) * self.per_table;
                continue;
            }
            let end = ((c + 1) * cs).min(b);
            if end - c * cs < cs {
                let head = vec![0u8; (end - c * cs) as usize];
                self.last_cluster(c, &head)?;
            } else {
                self.zero_cluster(c)?;
            }
            c += 1;
            if c.is_multiple_of(self.per_table) {
                self.maybe_commit()?;
            }
        }
        Ok(())
    }

    fn maybe_commit(&mut self) -> Result<()> {
        self.tables.retain(|_, t| t.fresh || t.lo < t.hi);
        let cs = self.cs();
        if self.fresh.len() >= BATCH_CLUSTERS
            || self.fresh.len() as u64 * cs >= BATCH_BYTES
            || self.tables.len() as u64 * cs >= BATCH_TABLE_BYTES
        {
            self.commit()?;
        }
        Ok(())
    }

    /// Write the batch's metadata (steps 2 and 3 of the module comment).
    fn commit(&mut self) -> Result<()> {
        let cs = self.cs();
        let dirty = self.tables.values().any(|t| t.fresh || t.lo < t.hi);
        if !dirty && self.fresh.is_empty() && self.carry.is_empty() {
            return Ok(());
        }
        let bytes = |w: &[u64]| {
            let mut b = vec![0u8; w.len() * 8];
            for (c, v) in b.chunks_exact_mut(8).zip(w) {
                BigEndian::write_u64(c, *v);
            }
            b
        };
        if !self.fresh.is_empty() || !self.carry.is_empty() {
            let mut writes: Vec<(u64, Vec<u8>)> = self
                .tables
                .values()
                .filter(|t| t.fresh)
                .map(|t| (t.off, bytes(&t.words)))
                .collect();
            let old_header = self.ed.header.clone();
            let mut refs = Refs::load(&self.ed.host, &old_header)?;
            for &c in &self.fresh {
                refs.add(&self.ed.host, c, 1)?;
            }
            for &c in &self.carry {
                refs.add(&self.ed.host, c, -1)?;
            }
            let mut alloc = Alloc {
                start: self.next,
                taken: self.fresh.iter().copied().collect(),
            };
            let (rt, rt_clusters, mut rt_writes) =
                self.ed.finish_refcounts(&mut refs, &mut alloc)?;
            // What the switch frees: the old refcount table and the blocks it replaced.
            let mut freed: BTreeSet<u64> = (0..u64::from(old_header.refcount_table_clusters))
                .map(|k| old_header.refcount_table_offset / cs + k)
                .collect();
            freed.extend(
                refs.new
                    .keys()
                    .filter_map(|&i| refs.table.get(i as usize).copied())
                    .filter(|&o| o != 0)
                    .map(|o| o / cs),
            );
            let mut header = old_header;
            header.refcount_table_offset = rt;
            header.refcount_table_clusters = rt_clusters;
            writes.append(&mut rt_writes);
            self.ed.commit(
                Plan {
                    writes,
                    zeros: Vec::new(),
                    header,
                },
                None,
            )?;
            for c in freed {
                self.ed
                    .file
                    .punch_hole(c * cs, cs, "punching a replaced refcount cluster")?;
            }
        }
        // The new clusters are counted: the tables may name them now.
        let mut wrote = false;
        let l1_at = self.ed.header.l1_table_offset;
        for (&i, t) in &self.tables {
            if t.fresh {
                self.l1[i] = t.off | COPIED;
                let mut b = [0u8; 8];
                BigEndian::write_u64(&mut b, self.l1[i]);
                self.ed
                    .file
                    .write_at(&b, l1_at + i as u64 * 8, "writing a qcow2 L1 entry")?;
                wrote = true;
            } else if t.lo < t.hi {
                self.ed.file.write_at(
                    &bytes(&t.words[t.lo..t.hi]),
                    t.off + t.lo as u64 * 8,
                    "writing qcow2 L2 entries",
                )?;
                wrote = true;
            }
        }
        if wrote {
            self.ed.file.sync("flushing the qcow2 L2 tables")?;
        }
        self.tables.clear();
        self.fresh.clear();
        self.carry = std::mem::take(&mut self.dec);
        self.next = self.next.max(self.ed.host.len().div_ceil(cs));
        self.refs = Refs::load(&self.ed.host, &self.ed.header)?;
        self.meta = metadata_clusters(&self.ed.header, &self.l1, &self.refs.table);
        Ok(())
    }
}

impl ImageWriter for Qcow2InPlace {
    fn granularity(&self) -> u64 {
        self.cs()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if let Some((a, b)) = self.gaps.before(offset, data.len() as u64) {
            self.zero_range(a, b)?;
        }
        let cs = self.cs() as usize;
        // Clusters back to back in the file go out in one write.
        let mut run: Option<(u64, usize, usize)> = None;
        let mut pos = 0usize;
        while pos < data.len() {
            let c = (offset + pos as u64) / cs as u64;
            let n = cs.min(data.len() - pos);
            if n < cs {
                if let Some((h, s, l)) = run.take() {
                    self.ed
                        .file
                        .write_at(&data[s..s + l], h, "writing guest data")?;
                }
                self.last_cluster(c, &data[pos..])?;
            } else {
                let host = self.put_cluster(c)?;
                run = match run {
                    Some((h, s, l)) if h + l as u64 == host => Some((h, s, l + n)),
                    Some((h, s, l)) => {
                        self.ed
                            .file
                            .write_at(&data[s..s + l], h, "writing guest data")?;
                        Some((host, pos, n))
                    }
                    None => Some((host, pos, n)),
                };
            }
            pos += n;
        }
        if let Some((h, s, l)) = run {
            self.ed
                .file
                .write_at(&data[s..s + l], h, "writing guest data")?;
        }
        self.maybe_commit()
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if let Some((a, b)) = self.gaps.rest() {
            self.zero_range(a, b)?;
        }
        // The batch, then the decrements it carried over.
        self.commit()?;
        self.commit()?;
        self.ed.file.sync("flushing the qcow2 image")
    }
}
