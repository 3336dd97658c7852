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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};

use super::compress::decompress;
use super::header::*;
use super::reader::{self, COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::device::{HostFile, ImageEditor};
use crate::error::{Error, Result};
use crate::options::{OpenOptions, Preallocation, ResizeOptions};
use crate::writer::EditFile;

/// The header bytes the switching write covers: size, crypt_method, l1_size,
/// l1_table_offset, refcount_table_offset, refcount_table_clusters. They sit in the first
/// sector, so the write is atomic on every disk and filesystem qemu supports.
const SWITCH_START: usize = 24;
const SWITCH_END: usize = 60;
/// Zeros written per call by preallocation=full.
const PREALLOC_CHUNK: u64 = 1 << 20;

/// A qcow2 image opened for in-place changes.
#[derive(Debug)]
pub struct Qcow2Editor {
    pub(super) file: EditFile,
    pub(super) host: HostFile,
    pub(super) path: PathBuf,
    pub(super) header: Header,
    /// Persistent dirty bitmaps in the image (a resize would leave them the old size,
    /// a discard would change data behind them).
    pub(super) nb_bitmaps: u32,
}

/// Open a qcow2 image for in-place changes: parse and validate the header and the
/// active L1 table with the reader. What a resize cannot keep consistent is refused by
/// `resize`, what a discard cannot by `discard` (their limits differ: a discard keeps a
/// backing file's overlay consistent with the zero flag).
pub fn open_editor(file: File, path: &Path, opts: &ResizeOptions) -> Result<Box<dyn ImageEditor>> {
    Ok(Box::new(open_qcow2(file, path, opts.fail_at_write)?))
}

/// [`open_editor`]'s editor itself, with `fail_at` as its test hook.
pub(super) fn open_qcow2(file: File, path: &Path, fail_at: Option<u64>) -> Result<Qcow2Editor> {
    let clone = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e).with_path(path))?;
    let host = HostFile::from_file(clone, path)?;
    // The reader's checks (header fields, extensions, L1 inside the file) run first.
    let check = HostFile::from_file(
        file.try_clone()
            .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?,
        path,
    )?;
    let header = Header::parse(&host.read_vec(0, host.len().min(64 << 10), "qcow2 header")?)
        .map_err(|e| e.with_path(path))?;
    // Refused before the reader would try to open the data file.
    if header.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        return Err(Error::unsupported(
            "the image keeps its data in an external data file; changing it in place (resize, discard, internal snapshots) is not supported",
        )
        .with_path(path));
    }
    let image = reader::open(check, &OpenOptions::new().without_backing())?;
    let nb_bitmaps = image
        .extensions()
        .bitmaps
        .as_ref()
        .map_or(0, |b| b.nb_bitmaps);
    drop(image);
    Ok(Qcow2Editor {
        file: EditFile::new(file, path, fail_at),
        host,
        path: path.to_path_buf(),
        header,
        nb_bitmaps,
    })
}

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

/// The refcounts: the current (old) table and blocks, read on demand, and the copies of
/// the blocks this transaction changes.
pub(super) struct Refs {
    pub(super) order: u32,
    pub(super) cs: u64,
    /// Entries per refcount block.
    pub(super) rb_entries: u64,
    pub(super) table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    old: HashMap<u64, Vec<u8>>,
    pub(super) new: BTreeMap<u64, Vec<u8>>,
}

impl Refs {
    pub(super) fn load(host: &HostFile, h: &Header) -> Result<Refs> {
        let cs = h.cluster_size();
        let bytes = u64::from(h.refcount_table_clusters) * cs;
        if bytes == 0 || bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(format!(
                "refcount table of {} clusters is outside 1..={} MiB",
                h.refcount_table_clusters,
                MAX_REFTABLE_BYTES >> 20
            ))
            .with_field("refcount_table_clusters")
            .at(56));
        }
        if !h.refcount_table_offset.is_multiple_of(cs) || h.refcount_table_offset == 0 {
            return Err(Error::corrupt(format!(
                "refcount_table_offset {:#x} is not a cluster-aligned offset past the header",
                h.refcount_table_offset
            ))
            .with_field("refcount_table_offset")
            .at(48));
        }
        host.check_range(h.refcount_table_offset, bytes, "refcount table")
            .map_err(|e| e.with_field("refcount_table_offset").at(48))?;
        let raw = host.read_vec(h.refcount_table_offset, bytes, "refcount table")?;
        let table: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        for (i, &e) in table.iter().enumerate() {
            let at = h.refcount_table_offset + i as u64 * 8;
            if e & 0x1ff != 0 || (e != 0 && e % cs != 0) {
                return Err(Error::corrupt(format!(
                    "refcount table entry {i} ({e:#x}) is not cluster aligned"
                ))
                .at(at));
            }
            if e != 0 {
                host.check_range(e, cs, "refcount block")
                    .map_err(|err| err.with_field(format!("refcount table entry {i}")).at(at))?;
            }
        }
        Ok(Refs {
            order: h.refcount_order,
            cs,
            rb_entries: (cs * 8) >> h.refcount_order,
            table,
            table_offset: h.refcount_table_offset,
            table_clusters: u64::from(h.refcount_table_clusters),
            old: HashMap::new(),
            new: BTreeMap::new(),
        })
    }

    pub(super) fn max(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    fn old_block(&mut self, host: &HostFile, i: u64) -> Result<Option<&Vec<u8>>> {
        let off = match self.table.get(i as usize) {
            Some(&o) if o != 0 => o,
            _ => return Ok(None),
        };
        if !self.old.contains_key(&i) {
            let b = host.read_vec(off, self.cs, "refcount block")?;
            self.old.insert(i, b);
        }
        Ok(self.old.get(&i))
    }

    /// The refcount of cluster `c` in the image as it is on disk.
    pub(super) fn get_old(&mut self, host: &HostFile, c: u64) -> Result<u64> {
        let (i, j) = (c / self.rb_entries, c % self.rb_entries);
        let order = self.order;
        let Some(b) = self.old_block(host, i)? else {
            return Ok(0);
        };
        Ok(decode(order, b, j))
    }

    /// The clusters in use now that the state this transaction builds frees, ascending.
    pub(super) fn freed(&mut self, host: &HostFile) -> Result<Vec<u64>> {
        let blocks: Vec<u64> = self.new.keys().copied().collect();
        let mut out = Vec::new();
        for i in blocks {
            for j in 0..self.rb_entries {
                let c = i * self.rb_entries + j;
                if decode(self.order, &self.new[&i], j) == 0 && self.get_old(host, c)? != 0 {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// The refcount of cluster `c` in the state this transaction builds.
    pub(super) fn get_new(&mut self, host: &HostFile, c: u64) -> Result<u64> {
        let (i, j) = (c / self.rb_entries, c % self.rb_entries);
        if let Some(b) = self.new.get(&i) {
            return Ok(decode(self.order, b, j));
        }
        self.get_old(host, c)
    }

    /// Copy block `i` into the new state unchanged (so it gets a new place).
    fn touch(&mut self, host: &HostFile, i: u64) -> Result<()> {
        if !self.new.contains_key(&i) {
            let b = match self.old_block(host, i)? {
                Some(b) => b.clone(),
                None => vec![0u8; self.cs as usize],
            };
            self.new.insert(i, b);
        }
        Ok(())
    }

    /// Change cluster `c`'s refcount by `delta` in the new state.
    pub(super) fn add(&mut self, host: &HostFile, c: u64, delta: i64) -> Result<()> {
        let (i, j) = (c / self.rb_entries, c % self.rb_entries);
        if !self.new.contains_key(&i) {
            let b = match self.old_block(host, i)? {
                Some(b) => b.clone(),
                None => vec![0u8; self.cs as usize],
            };
            self.new.insert(i, b);
        }
        let max = self.max();
        let order = self.order;
        let cs = self.cs;
        let b = self.new.get_mut(&i).expect("just inserted");
        let cur = decode(order, b, j);
        let next = if delta < 0 {
            cur.checked_sub(delta.unsigned_abs())
        } else {
            cur.checked_add(delta as u64).filter(|&v| v <= max)
        };
        let Some(next) = next else {
            return Err(Error::corrupt(format!(
                "refcount of the cluster at {:#x} is {cur}; it cannot change by {delta} (the refcounts do not match the tables: run qemu-img check -r all)",
                c * cs
            )));
        };
        encode(order, b, j, next);
        Ok(())
    }
}

/// Refcount `j` of a block with `1 << order`-bit entries (sub-byte widths are packed
/// from the low bits up, as qemu does).
pub(super) fn decode(order: u32, b: &[u8], j: u64) -> u64 {
    let j = j as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            u64::from((b[j / per] >> (bits * (j % per))) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(b[j]),
        4 => u64::from(BigEndian::read_u16(&b[j * 2..])),
        5 => u64::from(BigEndian::read_u32(&b[j * 4..])),
        _ => BigEndian::read_u64(&b[j * 8..]),
    }
}

pub(super) fn encode(order: u32, b: &mut [u8], j: u64, v: u64) {
    let j = j as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per = 8 / bits;
            let shift = bits * (j % per);
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            b[j / per] = (b[j / per] & !mask) | ((v as u8) << shift);
        }
        3 => b[j] = v as u8,
        4 => BigEndian::write_u16(&mut b[j * 2..], v as u16),
        5 => BigEndian::write_u32(&mut b[j * 4..], v as u32),
        _ => BigEndian::write_u64(&mut b[j * 8..], v),
    }
}

/// Where new clusters go: the first run that is free in the old image (refcount 0) and
/// not yet taken by this transaction, searching from `start`.
pub(super) struct Alloc {
    pub(super) start: u64,
    pub(super) taken: BTreeSet<u64>,
}

impl Alloc {
    /// Search from cluster `start` (the first free cluster of the file at 1).
    pub(super) fn from(start: u64) -> Alloc {
        Alloc {
            start,
            taken: BTreeSet::new(),
        }
    }

    /// `n` contiguous clusters free in the old image and not yet taken.
    pub(super) fn run(&mut self, refs: &mut Refs, host: &HostFile, n: u64) -> Result<u64> {
        // A cluster in use in the old image or taken stays so: the search need never
        // look below the first one that is neither again (many single-cluster
        // allocations would otherwise rescan the whole file each time).
        self.start = self.start.max(1);
        while self.taken.contains(&self.start) || refs.get_old(host, self.start)? != 0 {
            self.start += 1;
        }
        let mut c = self.start;
        'search: loop {
            for k in 0..n {
                let x = c + k;
                if self.taken.contains(&x) || refs.get_old(host, x)? != 0 {
                    c = x + 1;
                    continue 'search;
                }
            }
            for k in 0..n {
                self.taken.insert(c + k);
            }
            return Ok(c);
        }
    }
}

/// Bytes to write at a host offset.
pub(super) type Write = (u64, Vec<u8>);

/// What one resize writes: new tables and where.
pub(super) struct Plan {
    pub(super) writes: Vec<(u64, Vec<u8>)>,
    /// Host ranges to fill with zeros (preallocated data clusters).
    pub(super) zeros: Vec<(u64, u64)>,
    pub(super) header: Header,
}

impl Qcow2Editor {
    /// A read handle over the image at its current length: the editor's own `host` is
    /// sized when opened, so after a write that grew or cut the file it is made anew.
    pub(super) fn reopen_host(&self) -> Result<HostFile> {
        let dup = self
            .file
            .file()
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?;
        HostFile::from_file(dup, &self.path)
    }

    pub(super) fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    pub(super) fn span(&self) -> u64 {
        self.cs() * self.header.l2_entries()
    }

    pub(super) fn read_l1(&self) -> Result<Vec<u64>> {
        let h = &self.header;
        if h.l1_size == 0 {
            return Ok(Vec::new());
        }
        let bytes = u64::from(h.l1_size) * 8;
        self.host
            .check_range(h.l1_table_offset, bytes, "L1 table")
            .map_err(|e| e.with_field("l1_table_offset").at(40))?;
        let raw = self.host.read_vec(h.l1_table_offset, bytes, "L1 table")?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    pub(super) fn read_l2(&self, l1_index: usize, entry: u64) -> Result<Vec<u64>> {
        let off = entry & OFFSET_MASK;
        let at = self.header.l1_table_offset + l1_index as u64 * 8;
        if !off.is_multiple_of(self.cs()) {
            return Err(Error::corrupt(format!(
                "L2 table offset {off:#x} (L1 entry {l1_index}) is not cluster aligned"
            ))
            .at(at));
        }
        self.host
            .check_range(off, self.cs(), "L2 table")
            .map_err(|e| e.with_field(format!("L1 entry {l1_index}")).at(at))?;
        let raw = self.host.read_vec(off, self.cs(), "L2 table")?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

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

        // preallocation=full: every cluster of the new space that is not mapped gets a
        // data cluster of zeros, in one run at the end, and its L2 entry.
        let mut zeros = Vec::new();
        if prealloc && new_size > old_size {
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
                let run = alloc.run(&mut refs, &self.host, n)?;
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
                        self.unshared(&mut refs, e)?;
                        refs.add(&self.host, (e & OFFSET_MASK) / cs, -1)?;
                    }
                    let c = alloc.run(&mut refs, &self.host, 1)?;
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
        }

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

    /// Place the changed refcount blocks and a new refcount table in free clusters and
    /// count those clusters too (a fixed point: a new block's own cluster may fall in a
    /// block not yet changed). The old table and the replaced blocks are freed.
    pub(super) fn finish_refcounts(
        &self,
        refs: &mut Refs,
        alloc: &mut Alloc,
    ) -> Result<(u64, u32, Vec<Write>)> {
        let cs = self.cs();
        let base_new = refs.new.clone();
        let base_taken = alloc.taken.clone();
        let mut want: BTreeSet<u64> = BTreeSet::new();
        for (i, b) in &base_new {
            if b.iter().any(|&x| x != 0) {
                want.insert(*i);
            }
        }
        // Table entries needed: the changed blocks that stay, and every block not
        // changed (it keeps its entry). A shrink may so get a smaller table.
        let old_table = refs.table.clone();
        let needed_entries = |want: &BTreeSet<u64>, changed: &BTreeMap<u64, Vec<u8>>| -> u64 {
            let kept = old_table
                .iter()
                .enumerate()
                .filter(|(i, e)| **e != 0 && !changed.contains_key(&(*i as u64)))
                .map(|(i, _)| i as u64 + 1)
                .max()
                .unwrap_or(0);
            kept.max(want.iter().next_back().map_or(0, |m| m + 1))
                .max(1)
        };
        let mut min_entries = 1;
        for _round in 0..64 {
            refs.new = base_new.clone();
            alloc.taken = base_taken.clone();
            let entries = needed_entries(&want, &refs.new).max(min_entries);
            let rt_clusters = (entries * 8).div_ceil(cs);
            if rt_clusters * cs > MAX_REFTABLE_BYTES {
                return Err(Error::limit(format!(
                    "the refcount table would need {rt_clusters} clusters, past qemu's {} MiB limit",
                    MAX_REFTABLE_BYTES >> 20
                )));
            }
            let rt = alloc.run(refs, &self.host, rt_clusters)?;
            let mut locs = BTreeMap::new();
            for &i in &want {
                locs.insert(i, alloc.run(refs, &self.host, 1)?);
            }
            for k in 0..rt_clusters {
                refs.add(&self.host, rt + k, 1)?;
            }
            for &c in locs.values() {
                refs.add(&self.host, c, 1)?;
            }
            for k in 0..refs.table_clusters {
                refs.add(&self.host, refs.table_offset / cs + k, -1)?;
            }
            // Every changed block replaces its old copy, which becomes free; freeing it
            // may change yet another block.
            let mut released = BTreeSet::new();
            loop {
                let pending: Vec<u64> = refs
                    .new
                    .keys()
                    .copied()
                    .filter(|i| !released.contains(i))
                    .collect();
                if pending.is_empty() {
                    break;
                }
                for i in pending {
                    released.insert(i);
                    if let Some(&o) = refs.table.get(i as usize).filter(|o| **o != 0) {
                        refs.add(&self.host, o / cs, -1)?;
                    }
                }
            }
            let nonzero: BTreeSet<u64> = refs
                .new
                .iter()
                .filter(|(_, b)| b.iter().any(|&x| x != 0))
                .map(|(i, _)| *i)
                .collect();
            let final_entries = needed_entries(&nonzero, &refs.new);
            let fits = final_entries <= rt_clusters * cs / 8;
            if nonzero.is_subset(&want) && fits {
                let mut table = refs.table.clone();
                table.resize((rt_clusters * cs / 8) as usize, 0);
                table.resize((rt_clusters * cs / 8) as usize, 0);
                for i in refs.new.keys() {
                    if let Some(t) = table.get_mut(*i as usize) {
                        *t = locs.get(i).map_or(0, |c| c * cs);
                    }
                }
                let mut tb = vec![0u8; (rt_clusters * cs) as usize];
                for (k, e) in table.iter().enumerate() {
                    BigEndian::write_u64(&mut tb[k * 8..], *e);
                }
                let mut writes = vec![(rt * cs, tb)];
                for (i, c) in &locs {
                    writes.push((c * cs, refs.new[i].clone()));
                }
                return Ok((rt * cs, rt_clusters as u32, writes));
            }
            want.extend(nonzero);
            min_entries = min_entries.max(final_entries);
        }
        Err(Error::corrupt(
            "the refcount blocks did not settle on a layout (refcount structure inconsistent)",
        ))
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

    /// The last cluster with a nonzero refcount in the image as it now is on disk, and
    /// the last one that is not the L1 table, the refcount table or a refcount block.
    pub(super) fn last_used_clusters(&self) -> Result<(u64, u64)> {
        let h = &self.header;
        let cs = self.cs();
        let mut refs = Refs::load(&self.host, h)?;
        let mut meta = BTreeSet::new();
        let l1 = h.l1_table_offset / cs;
        meta.extend(l1..l1 + (u64::from(h.l1_size) * 8).div_ceil(cs));
        let rt = h.refcount_table_offset / cs;
        meta.extend(rt..rt + u64::from(h.refcount_table_clusters));
        meta.extend(refs.table.iter().filter(|&&o| o != 0).map(|o| o / cs));
        let mut last = None;
        let mut c = self.host.len().div_ceil(cs);
        while c > 1 {
            c -= 1;
            if refs.get_old(&self.host, c)? != 0 {
                last.get_or_insert(c);
                if !meta.contains(&c) {
                    return Ok((last.unwrap_or(c), c));
                }
            }
        }
        Ok((last.unwrap_or(0), 0))
    }

    /// Write a plan's tables, flush, switch the header, flush. A failure before the
    /// switch gives the file its old length back (nothing refers to what was written).
    pub(super) fn commit(&mut self, plan: Plan, grow_tail: Option<(u64, usize)>) -> Result<()> {
        let old_len = self.host.len();
        let writes = coalesce(plan.writes);
        let before = (|| -> Result<()> {
            if let Some((off, n)) = grow_tail {
                self.file
                    .write_at(&vec![0u8; n], off, "zeroing the last cluster's tail")?;
            }
            for (off, data) in &writes {
                self.file.write_at(data, *off, "writing new qcow2 tables")?;
            }
            for &(off, len) in &plan.zeros {
                let chunk = vec![0u8; len.min(PREALLOC_CHUNK) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(PREALLOC_CHUNK) as usize;
                    self.file
                        .write_at(&chunk[..n], off + done, "preallocating new clusters")?;
                    done += n as u64;
                }
            }
            if grow_tail.is_some() || !writes.is_empty() || !plan.zeros.is_empty() {
                self.file.sync("flushing the new qcow2 tables")?;
            }
            self.switch(&plan.header)
        })();
        if let Err(e) = before {
            let _ = self.file.file().set_len(old_len);
            return Err(e);
        }
        self.header = plan.header;
        // The file grew by the new tables: read it at its new length from here on.
        self.host = self.reopen_host()?;
        self.file.sync("flushing the qcow2 header")
    }

    fn switch(&mut self, header: &Header) -> Result<()> {
        let b = header.to_bytes();
        self.file.write_at(
            &b[SWITCH_START..SWITCH_END],
            SWITCH_START as u64,
            "writing the qcow2 header (size, L1 and refcount table)",
        )
    }
}

/// Merge writes that touch back to back, so the whole new metadata usually goes out in
/// a few large writes.
pub(super) fn coalesce(mut writes: Vec<(u64, Vec<u8>)>) -> Vec<(u64, Vec<u8>)> {
    writes.sort_by_key(|w| w.0);
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    for (off, data) in writes {
        if let Some(last) = out.last_mut() {
            if last.0 + last.1.len() as u64 == off {
                last.1.extend_from_slice(&data);
                continue;
            }
        }
        out.push((off, data));
    }
    out
}

impl ImageEditor for Qcow2Editor {
    fn virtual_size(&self) -> u64 {
        self.header.size & !511
    }

    fn discard(&mut self, runs: &[(u64, u64)]) -> Result<u64> {
        super::discard::discard(self, runs)
    }

    fn snapshot(&mut self, op: &crate::device::SnapshotOp<'_>) -> Result<()> {
        super::snapshot_edit::run(self, op)
    }

    fn resize(&mut self, new_size: u64, opts: &ResizeOptions) -> Result<()> {
        refuse_unsupported(&self.header, &self.path)?;
        if self.nb_bitmaps > 0 {
            return Err(Error::unsupported(format!(
                "the image has {} persistent dirty bitmap(s); resizing it would leave them the old size (remove them with qemu-img bitmap --remove first)",
                self.nb_bitmaps
            ))
            .with_path(&self.path));
        }
        if !new_size.is_multiple_of(512) {
            return Err(Error::arg("The new size must be a multiple of 512").with_path(&self.path));
        }
        if new_size == 0 {
            return Err(Error::arg("New image size must be positive").with_path(&self.path));
        }
        let old = self.header.size;
        if new_size == old {
            return Ok(());
        }
        let shrinking = new_size < old;
        if shrinking && !opts.shrink {
            return Err(
                Error::arg(crate::options::SHRINK_REFUSED).with_option("ResizeOptions::shrink")
            );
        }
        if shrinking && opts.preallocation != Preallocation::Off {
            return Err(Error::arg(
                "Preallocation can't be used for shrinking an image",
            ));
        }
        let l1 = self.read_l1()?;
        // Grown space must read as zeros: bytes past the old end in its last cluster are
        // zeroed first (the current image never reads them).
        let grow_tail = if shrinking {
            None
        } else {
            self.stale_tail(&l1, old, true)?
        };
        let plan = self.plan(
            new_size,
            !shrinking,
            None,
            opts.preallocation == Preallocation::Full,
        )?;
        self.commit(plan, grow_tail)?;
        if shrinking {
            // The image is the new one now. Its last cluster's bytes past the new end
            // are zeroed (a later grow must not show them).
            let l1 = self.read_l1()?;
            if let Some((off, n)) = self.stale_tail(&l1, new_size, false)? {
                self.file
                    .write_at(&vec![0u8; n], off, "zeroing past the new end")?;
            }
            // Tables that now sit past the last data (the L1 of an earlier large grow,
            // or copies this shrink had to append) move down, in one more transaction
            // of the same kind, so the free tail can be cut off.
            let (last, last_data) = self.last_used_clusters()?;
            if last > last_data + 1 {
                let plan = self.plan(new_size, false, Some(last_data), false)?;
                self.commit(plan, None)?;
            }
            let keep = (self.last_used_clusters()?.0 + 1) * self.cs();
            if keep < self.host.len() {
                self.file.set_len(keep, "truncating the freed tail")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcounts_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let n = 4096 * 8 / u64::from(bits);
            let mut b = vec![0u8; 4096];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            for j in 0..n {
                encode(order, &mut b, j, (j * 7 + 3) & max);
            }
            for j in 0..n {
                assert_eq!(
                    decode(order, &b, j),
                    (j * 7 + 3) & max,
                    "order {order} entry {j}"
                );
            }
        }
        // qemu packs sub-byte refcounts from the low bits: entry 0 of a 1-bit block is bit 0.
        let mut b = vec![0u8; 1];
        encode(0, &mut b, 0, 1);
        assert_eq!(b[0], 1);
        encode(2, &mut b, 1, 0xf);
        assert_eq!(b[0], 0xf1);
    }

    #[test]
    fn coalesce_merges_back_to_back_writes() {
        let w = coalesce(vec![
            (1024, vec![2; 512]),
            (0, vec![1; 512]),
            (512, vec![3; 512]),
        ]);
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].0, 0);
        assert_eq!(&w[0].1[..512], &[1u8; 512][..]);
        assert_eq!(&w[0].1[512..1024], &[3u8; 512][..]);
        let w = coalesce(vec![(0, vec![1; 512]), (4096, vec![1; 512])]);
        assert_eq!(w.len(), 2);
    }
}
