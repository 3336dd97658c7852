//! A qcow2 image opened for in-place changes, and the one transaction every change makes
//! (resize, discard, snapshot, a conversion into the image with `-n`).
//!
//! A change never writes over a cluster the current image uses. Its new metadata (L1 and
//! L2 tables, the refcount blocks whose counts change and a refcount table pointing at
//! them) goes into clusters that are free in the current image (refcount 0), is flushed,
//! and then one write of header bytes switches from the old state to the new one. Before
//! that write the new clusters are unreferenced with refcount 0; after it the old tables
//! are unreferenced with refcount 0 in the new refcounts. So a failure at any write
//! leaves an image that reads exactly as before or exactly as after and that `qemu-img
//! check` finds clean, with no leaks either. The changes themselves are in `resize.rs`,
//! `discard.rs`, `snapshot_edit.rs` and `inplace.rs`; `mod.rs` dispatches to them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};

use super::header::*;
use super::reader::{self, OFFSET_MASK};
use crate::device::{HostFile, ImageEditor};
use crate::error::{Error, Result};
use crate::options::{OpenOptions, ResizeOptions};
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
        Ok(get_refcount(b, j as usize, order))
    }

    /// The clusters in use now that the state this transaction builds frees, ascending.
    pub(super) fn freed(&mut self, host: &HostFile) -> Result<Vec<u64>> {
        let blocks: Vec<u64> = self.new.keys().copied().collect();
        let mut out = Vec::new();
        for i in blocks {
            for j in 0..self.rb_entries {
                let c = i * self.rb_entries + j;
                if get_refcount(&self.new[&i], j as usize, self.order) == 0
                    && self.get_old(host, c)? != 0
                {
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
            return Ok(get_refcount(b, j as usize, self.order));
        }
        self.get_old(host, c)
    }

    /// Copy block `i` into the new state unchanged (so it gets a new place).
    pub(super) fn touch(&mut self, host: &HostFile, i: u64) -> Result<()> {
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
        let cur = get_refcount(b, j as usize, order);
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
        set_refcount(b, j as usize, order, next);
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
