//! Checking and repairing qcow2 metadata, as qemu's `qcow2_check_refcounts` does.
//!
//! The check computes every cluster's reference count from what points at it — the
//! header cluster, the active L1 table, its L2 tables and data clusters (compressed ones
//! by their byte range), each snapshot's L1 table and L2 tables, the snapshot table, the
//! refcount table and blocks, the encryption header and persistent bitmaps — and compares
//! it with the refcount the image stores. A stored count above the references is a leak,
//! one below is a corruption (two L2 entries or tables on one cluster: metadata overlaps
//! show up here too); unaligned tables and clusters, reserved bits, references a cluster
//! or more past the end of the file, refcount overflow and wrong OFLAG_COPIED flags are
//! corruptions. The counts, the image end offset and the fragmentation statistics are
//! qemu's (a cluster is fragmented when it does not follow the previous allocated cluster
//! of its L2 table; compressed clusters always are).
//!
//! Repair writes each changed refcount block whole, in one write, then the changed L1
//! and L2 tables (OFLAG_COPIED), then truncates the file to the image end. Every
//! refcount moves from its stored value straight to the computed one, so after a failure
//! at any write each cluster's count is its old or its new value: counts that were too
//! low are raised first (in their own refcount block writes, before any count is
//! lowered), so no state in between undercounts a cluster that something references.
//! Refcount structures that would need rebuilding (a refcount block missing for a cluster
//! in use, a table entry unaligned or past the end) are reported, not rebuilt.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use byteorder::{BigEndian, ByteOrder};

use super::header::*;
use super::reader::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::check::{read_padded, Repair, Tally};
use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::writer::EditFile;

const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
const REFT_OFFSET_MASK: u64 = !0x1ff;
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// qemu's QCOW_MAX_L1_SIZE in entries.
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// qemu's QCOW_MAX_SNAPSHOTS.
const MAX_SNAPSHOTS: u32 = 65536;
/// All subclusters allocated (extended L2 bitmap's low half).
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// A refcount to write: entry in its block, new value, whether it is raised.
type BlockFix = (usize, u64, bool);

/// One snapshot table entry: what the check needs of it.
struct Snapshot {
    id: String,
    name: String,
    l1_offset: u64,
    l1_size: u32,
}

struct Checker<'a> {
    host: &'a HostFile,
    h: Header,
    ext: Extensions,
    cs: u64,
    cbits: u32,
    /// Computed references per cluster.
    refs: Vec<u64>,
    /// The stored refcount table.
    rt: Vec<u64>,
    refcount_max: u64,
    t: Tally,
    data_file: bool,
    /// Stored refcount blocks read so far.
    blocks: BTreeMap<u64, Vec<u8>>,
    /// Set when the refcount structures would need rebuilding (not done).
    rebuild: bool,
    /// L2 bytes read so far, and the most a real image can make us read: every table
    /// once per L1 table (the active one and each snapshot's). A hostile L1 table
    /// pointing its entries at one cluster over and over stops there.
    l2_read: u64,
    l2_budget: u64,
}

/// Check the qcow2 image in `file`; with `repair`, fix what qemu-img check -r would
/// (except rebuilding the refcount structures), crash-safely.
pub fn check(file: File, path: &Path, repair: Repair, fail_at: Option<u64>) -> Result<Tally> {
    let write = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?;
    let host = HostFile::from_file(file, path)?;
    let head = host.read_vec(0, host.len().min(64 << 10), "qcow2 header")?;
    let h = Header::parse(&head)?;
    if h.crypt_method != 0 && repair != Repair::None {
        return Err(Error::unsupported(
            "repairing an encrypted qcow2 image is not supported",
        ));
    }
    let cs = h.cluster_size();
    let hdr_end = (cs as usize).min(head.len());
    let ext = Extensions::parse(&head[..hdr_end], h.header_length as usize)?;
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    if rt_len > MAX_REFTABLE_BYTES {
        return Err(Error::limit(format!(
            "refcount table of {rt_len} bytes is larger than {MAX_REFTABLE_BYTES}"
        ))
        .with_field("refcount_table_clusters"));
    }
    let rt_bytes = read_padded(&host, h.refcount_table_offset, rt_len, "refcount table")?;
    let rt = rt_bytes.chunks(8).map(BigEndian::read_u64).collect();
    let bits = h.refcount_bits();
    let refcount_max = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let nb = host.len().div_ceil(cs);
    let mut c = Checker {
        host: &host,
        data_file: h.incompatible_features & INCOMPAT_DATA_FILE != 0,
        cbits: h.cluster_bits,
        h,
        ext,
        cs,
        refs: vec![0; nb as usize],
        rt,
        refcount_max,
        t: Tally::default(),
        blocks: BTreeMap::new(),
        rebuild: false,
        l2_read: 0,
        l2_budget: 0,
    };
    c.l2_budget = (u64::from(c.h.nb_snapshots) + 1).saturating_mul(host.len() + cs);
    c.t.total_clusters = c.h.size.div_ceil(cs);
    let snapshots = c.read_snapshots()?;
    c.calculate(&snapshots)?;
    let fixes = c.compare(repair)?;
    let mut edit = EditFile::new(write, path, fail_at);
    if !fixes.is_empty() {
        c.write_refcounts(&mut edit, &fixes)?;
    }
    c.check_copied(repair, &mut edit)?;
    let highest = c.highest_cluster(&fixes)?;
    c.t.image_end_offset = (highest + 1) * cs;
    if repair != Repair::None && (c.t.leaks_fixed > 0 || c.t.corruptions_fixed > 0) {
        edit.sync("flushing the repaired refcounts")?;
    }
    if repair.leaks() && c.t.leaks == 0 && c.t.corruptions == 0 && c.t.check_errors == 0 {
        if c.t.image_end_offset < host.len() {
            edit.set_len(c.t.image_end_offset, "truncating to the image end")?;
            edit.sync("flushing the truncation")?;
        }
        // A clean image is no longer dirty (lazy refcounts): as qemu's qcow2_mark_clean.
        if c.h.incompatible_features & INCOMPAT_DIRTY != 0 {
            let mut f = [0u8; 8];
            BigEndian::write_u64(&mut f, c.h.incompatible_features & !INCOMPAT_DIRTY);
            edit.write_at(&f, 72, "clearing the dirty bit")?;
            edit.sync("flushing the header")?;
        }
    }
    Ok(c.t)
}

impl Checker<'_> {
    fn read_snapshots(&mut self) -> Result<Vec<Snapshot>> {
        let h = &self.h;
        let mut out = Vec::new();
        if h.nb_snapshots == 0 {
            return Ok(out);
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(format!(
                "{} snapshots, more than qemu's limit of {MAX_SNAPSHOTS}",
                h.nb_snapshots
            ))
            .with_field("nb_snapshots"));
        }
        if !h.snapshots_offset.is_multiple_of(self.cs) {
            return Err(Error::corrupt(format!(
                "Snapshot table offset {:#x} is not cluster aligned",
                h.snapshots_offset
            ))
            .with_field("snapshots_offset"));
        }
        let mut off = h.snapshots_offset;
        for i in 0..h.nb_snapshots {
            // The last entry's padding may lie past the end (qemu reads zeros there);
            // an entry wholly past it is a corrupt table.
            if off >= self.host.len() {
                return Err(Error::corrupt(format!(
                    "snapshot table entry {i} at {off:#x} lies past the end of the file"
                ))
                .at(off));
            }
            let fixed = read_padded(self.host, off, 40, "snapshot table entry")?;
            let extra = BigEndian::read_u32(&fixed[36..]) as u64;
            let id_len = BigEndian::read_u16(&fixed[12..]) as u64;
            let name_len = BigEndian::read_u16(&fixed[14..]) as u64;
            if extra > 1024 {
                return Err(Error::corrupt(format!(
                    "snapshot {i}: extra data of {extra} bytes is larger than 1024"
                ))
                .at(off));
            }
            let strings = read_padded(self.host, off + 40 + extra, id_len + name_len, "snapshot")?;
            let id = String::from_utf8_lossy(&strings[..id_len as usize]).into_owned();
            let name = String::from_utf8_lossy(&strings[id_len as usize..]).into_owned();
            out.push(Snapshot {
                id,
                name,
                l1_offset: BigEndian::read_u64(&fixed[0..]),
                l1_size: BigEndian::read_u32(&fixed[8..]),
            });
            off += (40 + extra + id_len + name_len).next_multiple_of(8);
            if off - h.snapshots_offset > 64 << 20 {
                return Err(Error::corrupt("snapshot table larger than 64 MiB"));
            }
        }
        Ok(out)
    }

    /// qemu's `qcow2_inc_refcounts_imrt`.
    fn inc(&mut self, offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let flen = self.host.len();
        if offset.saturating_add(size).saturating_sub(flen) >= self.cs {
            self.t.corrupt(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            ));
            return;
        }
        let first = offset >> self.cbits;
        let last = (offset + size - 1) >> self.cbits;
        for k in first..=last {
            let k = k as usize;
            if k >= self.refs.len() {
                self.refs.resize(k + 1, 0);
            }
            if self.refs[k] == self.refcount_max {
                self.t.corrupt(format!(
                    "ERROR: overflow cluster offset=0x{:x}",
                    (k as u64) << self.cbits
                ));
                continue;
            }
            self.refs[k] += 1;
        }
    }

    fn calculate(&mut self, snapshots: &[Snapshot]) -> Result<()> {
        self.inc(0, self.cs);
        let (l1, n) = (self.h.l1_table_offset, self.h.l1_size);
        self.check_l1(l1, n, true)?;
        if self.data_file && !snapshots.is_empty() {
            self.t.corrupt(format!(
                "ERROR {} snapshots in image with data file",
                snapshots.len()
            ));
        }
        let mut table_end = self.h.snapshots_offset;
        for sn in snapshots {
            if sn.l1_offset % self.cs != 0 {
                self.t.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_offset
                ));
                continue;
            }
            if u64::from(sn.l1_size) > MAX_L1_ENTRIES {
                self.t.corrupt(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.check_l1(sn.l1_offset, sn.l1_size, false)?;
        }
        if !snapshots.is_empty() {
            // The table's length, as qemu computes it while reading the entries.
            let mut off = self.h.snapshots_offset;
            for _ in snapshots {
                let fixed = read_padded(self.host, off, 40, "snapshot table entry")?;
                let extra = BigEndian::read_u32(&fixed[36..]) as u64;
                let id_len = BigEndian::read_u16(&fixed[12..]) as u64;
                let name_len = BigEndian::read_u16(&fixed[14..]) as u64;
                off += (40 + extra + id_len + name_len).next_multiple_of(8);
            }
            table_end = off;
        }
        self.inc(self.h.snapshots_offset, table_end - self.h.snapshots_offset);
        self.inc(
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * self.cs,
        );
        if let Some((off, len)) = self.ext.fde {
            self.inc(off, len);
        }
        self.bitmaps()?;
        self.check_refblocks();
        Ok(())
    }

    fn bitmaps(&mut self) -> Result<()> {
        let Some(b) = self.ext.bitmaps.clone() else {
            return Ok(());
        };
        if self.h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        if b.directory_size > 64 << 20 {
            self.t.corrupt("ERROR bitmap directory larger than 64 MiB");
            return Ok(());
        }
        self.inc(b.directory_offset, b.directory_size);
        let dir = read_padded(
            self.host,
            b.directory_offset,
            b.directory_size,
            "bitmap directory",
        )?;
        let mut p = 0usize;
        for _ in 0..b.nb_bitmaps {
            if p + 24 > dir.len() {
                self.t
                    .corrupt("ERROR bitmap directory entry runs past the directory");
                break;
            }
            let e = &dir[p..];
            let table_off = BigEndian::read_u64(&e[0..]);
            let table_size = u64::from(BigEndian::read_u32(&e[8..]));
            let name_size = BigEndian::read_u16(&e[18..]) as usize;
            let extra = BigEndian::read_u32(&e[20..]) as usize;
            p += (24 + extra + name_size).next_multiple_of(8);
            if table_size > MAX_L1_ENTRIES {
                self.t.corrupt("ERROR bitmap table too large");
                continue;
            }
            self.inc(table_off, table_size * 8);
            let table = read_padded(self.host, table_off, table_size * 8, "bitmap table")?;
            for ent in table.chunks(8).map(BigEndian::read_u64) {
                let off = ent & OFFSET_MASK;
                if off != 0 {
                    self.inc(off, self.cs);
                }
            }
        }
        Ok(())
    }

    fn check_l1(&mut self, offset: u64, size: u32, active: bool) -> Result<()> {
        if size == 0 {
            return Ok(());
        }
        let bytes = u64::from(size) * 8;
        self.inc(offset, bytes);
        // Only what lies in the file is read; the rest reads as zero entries.
        let inside = self.host.len().saturating_sub(offset).min(bytes);
        let l1 = read_padded(self.host, offset, inside, "L1 table")?;
        for e in l1.chunks_exact(8).map(BigEndian::read_u64) {
            if e == 0 {
                continue;
            }
            if e & L1E_RESERVED_MASK != 0 {
                self.t.corrupt(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
            }
            let l2 = e & OFFSET_MASK;
            self.inc(l2, self.cs);
            if !l2.is_multiple_of(self.cs) {
                self.t.corrupt(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.check_l2(l2, active)?;
        }
        Ok(())
    }

    fn check_l2(&mut self, l2_offset: u64, active: bool) -> Result<()> {
        let ext = self.h.extended_l2();
        // Past the end of the file an L2 table reads as zeros: nothing to count.
        let inside = self.host.len().saturating_sub(l2_offset).min(self.cs);
        self.l2_read += inside;
        if self.l2_read > self.l2_budget {
            return Err(Error::limit(format!(
                "the L1 tables reference more L2 table bytes ({}) than the image could hold ({}): refusing to read on",
                self.l2_read, self.l2_budget
            )));
        }
        let table = read_padded(self.host, l2_offset, inside, "L2 table")?;
        let esz = if ext { 16 } else { 8 };
        let csize_shift = 62 - (self.cbits - 8);
        let csize_mask = (1u64 << (self.cbits - 8)) - 1;
        let coff_mask = (1u64 << csize_shift) - 1;
        let mut next_contiguous = 0u64;
        for ent in table.chunks_exact(esz) {
            let e = BigEndian::read_u64(ent);
            let bitmap = if ext {
                BigEndian::read_u64(&ent[8..])
            } else {
                0
            };
            let compressed = e & COMPRESSED != 0;
            let off = e & OFFSET_MASK;
            if !compressed && e & L2E_STD_RESERVED_MASK != 0 {
                self.t.corrupt(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
            }
            if compressed {
                if e & COPIED != 0 {
                    self.t.corrupt(format!(
                        "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                        e & coff_mask
                    ));
                }
                let e = e & !COPIED;
                if self.data_file {
                    self.t.corrupt(format!(
                        "ERROR compressed cluster with data file, entry=0x{e:x}"
                    ));
                    continue;
                }
                if bitmap != 0 {
                    self.t.corrupt(format!(
                        "ERROR compressed cluster with non-zero subcluster allocation bitmap, entry=0x{e:x}"
                    ));
                    continue;
                }
                let coffset = e & coff_mask;
                let nb_csectors = ((e >> csize_shift) & csize_mask) + 1;
                let csize = nb_csectors * 512 - (coffset & 511);
                self.inc(coffset, csize);
                if active {
                    self.t.allocated_clusters += 1;
                    self.t.compressed_clusters += 1;
                    self.t.fragmented_clusters += 1;
                }
                continue;
            }
            let zero_flag = !ext && e & ZERO != 0;
            let allocated = off != 0 || (self.data_file && e & COPIED != 0);
            if zero_flag && off == 0 {
                continue; // ZERO_PLAIN
            }
            if !allocated {
                if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                    self.t.corrupt(
                        "ERROR: Unallocated cluster has non-zero subcluster allocation map",
                    );
                }
                continue;
            }
            if (bitmap >> 32) & bitmap != 0 {
                self.t.corrupt(format!(
                    "ERROR offset={off:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                ));
            }
            if !off.is_multiple_of(self.cs) {
                let contains_data = if ext {
                    bitmap & L2_BITMAP_ALL_ALLOC != 0
                } else {
                    !zero_flag
                };
                self.t.corrupt(if contains_data {
                    format!("ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted.")
                } else {
                    format!("ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.")
                });
            }
            if active {
                self.t.allocated_clusters += 1;
                if next_contiguous != 0 && off != next_contiguous {
                    self.t.fragmented_clusters += 1;
                }
                next_contiguous = off + self.cs;
            }
            if !self.data_file {
                self.inc(off, self.cs);
            }
        }
        Ok(())
    }

    fn check_refblocks(&mut self) {
        let nb = self.host.len().div_ceil(self.cs);
        for i in 0..self.rt.len() {
            let e = self.rt[i];
            let off = e & REFT_OFFSET_MASK;
            if e & REFT_RESERVED_MASK != 0 {
                self.t.corrupt(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.rebuild = true;
                continue;
            }
            if !off.is_multiple_of(self.cs) {
                self.t.corrupt(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                self.rebuild = true;
                continue;
            }
            let cluster = off >> self.cbits;
            if cluster >= nb {
                self.t
                    .corrupt(format!("ERROR refcount block {i} is outside image"));
                self.rebuild = true;
                continue;
            }
            if off != 0 {
                self.inc(off, self.cs);
                let r = self.refs[cluster as usize];
                if r != 1 {
                    self.t
                        .corrupt(format!("ERROR refcount block {i} refcount={r}"));
                    self.rebuild = true;
                }
            }
        }
    }

    /// Entries per refcount block, as a shift.
    fn rb_shift(&self) -> u32 {
        self.cbits + 3 - self.h.refcount_order
    }

    /// The stored refcount of cluster `k`: Ok(None) when no refcount block covers it
    /// (qemu reads 0 there, and would need to rebuild to fix it), Err when the refcount
    /// table entry is unusable.
    fn stored(&mut self, k: u64) -> std::result::Result<Option<u64>, String> {
        let idx = k >> self.rb_shift();
        let Some(&e) = self.rt.get(idx as usize) else {
            return Ok(None);
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs) {
            return Err(format!(
                "Can't get refcount for cluster {k}: Input/output error"
            ));
        }
        if !self.blocks.contains_key(&off) {
            let b = read_padded(self.host, off, self.cs, "refcount block")
                .map_err(|e| format!("Can't get refcount for cluster {k}: {e}"))?;
            self.blocks.insert(off, b);
        }
        let b = &self.blocks[&off];
        let i = (k & ((1u64 << self.rb_shift()) - 1)) as usize;
        Ok(Some(get_refcount(b, i, self.h.refcount_order)))
    }

    /// qemu's `compare_refcounts`: count leaks and undercounted clusters; with `repair`
    /// return the fixes to write (cluster, new refcount).
    fn compare(&mut self, repair: Repair) -> Result<Vec<(u64, u64)>> {
        let mut diffs = Vec::new();
        for k in 0..self.refs.len() as u64 {
            let r2 = self.refs[k as usize];
            match self.stored(k) {
                Ok(r1) => {
                    if r1.unwrap_or(0) != r2 {
                        // A cluster in use that no refcount block covers needs a new
                        // block: a rebuild.
                        self.rebuild |= r1.is_none();
                        diffs.push((k, r1.unwrap_or(0), r2));
                    }
                }
                Err(msg) => self.t.error(msg),
            }
        }
        let mut fixes = Vec::new();
        for (k, r1, r2) in diffs {
            let fixable = !self.rebuild
                && if r1 > r2 {
                    repair.leaks()
                } else {
                    repair.all()
                };
            let what = if fixable {
                "Repairing"
            } else if r1 < r2 {
                "ERROR"
            } else {
                "Leaked"
            };
            self.t
                .findings
                .push(format!("{what} cluster {k} refcount={r1} reference={r2}"));
            if fixable {
                fixes.push((k, r2));
                if r1 > r2 {
                    self.t.leaks_fixed += 1;
                } else {
                    self.t.corruptions_fixed += 1;
                }
            } else if r1 < r2 {
                self.t.corruptions += 1;
            } else {
                self.t.leaks += 1;
            }
        }
        if self.rebuild && repair.leaks() {
            self.t.findings.push(
                "ERROR need to rebuild refcount structures (not done: convert the image to a new one)".into(),
            );
        }
        Ok(fixes)
    }

    /// The highest cluster with a stored refcount or a reference (after the fixes).
    fn highest_cluster(&mut self, fixes: &[(u64, u64)]) -> Result<u64> {
        let fixed: BTreeMap<u64, u64> = fixes.iter().copied().collect();
        let mut highest = 0;
        for k in 0..self.refs.len() as u64 {
            let stored = match fixed.get(&k) {
                Some(&v) => v,
                None => self.stored(k).ok().flatten().unwrap_or(0),
            };
            if stored > 0 || self.refs[k as usize] > 0 {
                highest = k;
            }
        }
        Ok(highest)
    }

    /// Write the fixed refcounts: blocks with raised counts first, then the others, each
    /// block in one write.
    fn write_refcounts(&mut self, edit: &mut EditFile, fixes: &[(u64, u64)]) -> Result<()> {
        let mut per_block: BTreeMap<u64, Vec<BlockFix>> = BTreeMap::new();
        for &(k, v) in fixes {
            let idx = k >> self.rb_shift();
            let off = self.rt[idx as usize] & REFT_OFFSET_MASK;
            let i = (k & ((1u64 << self.rb_shift()) - 1)) as usize;
            let raised = v > get_refcount(&self.blocks[&off], i, self.h.refcount_order);
            per_block.entry(off).or_default().push((i, v, raised));
        }
        let order = self.h.refcount_order;
        let mut ordered: Vec<(u64, Vec<BlockFix>)> = per_block.into_iter().collect();
        ordered.sort_by_key(|(off, f)| (!f.iter().any(|x| x.2), *off));
        let mut raised_any = false;
        for (off, f) in ordered {
            let has_raise = f.iter().any(|x| x.2);
            if !has_raise && raised_any {
                // Raised counts reach the disk before any count is lowered.
                edit.sync("flushing the raised refcounts")?;
                raised_any = false;
            }
            raised_any |= has_raise;
            let mut b = self.blocks[&off].clone();
            for (i, v, _) in f {
                set_refcount(&mut b, i, order, v);
            }
            edit.write_at(&b, off, "writing a repaired refcount block")?;
            self.blocks.insert(off, b);
        }
        Ok(())
    }

    /// qemu's `check_oflag_copied` over the active L1 table, with the (fixed) stored
    /// refcounts; with `-r all` (or `-r leaks` when nothing else is wrong) the flags are
    /// fixed, each L2 table and the L1 table in one write.
    fn check_copied(&mut self, repair: Repair, edit: &mut EditFile) -> Result<()> {
        let fix = repair.all()
            || (repair.leaks()
                && self.t.check_errors == 0
                && self.t.corruptions == 0
                && self.t.leaks == 0);
        let l1_off = self.h.l1_table_offset;
        let l1_bytes = u64::from(self.h.l1_size) * 8;
        let inside = self.host.len().saturating_sub(l1_off).min(l1_bytes);
        let mut l1 = read_padded(self.host, l1_off, inside, "L1 table")?;
        let mut l1_dirty = 0u64;
        let mut copied_read = 0u64;
        let ext = self.h.extended_l2();
        let esz = if ext { 16 } else { 8 };
        for i in 0..l1.len() / 8 {
            let e = BigEndian::read_u64(&l1[i * 8..]);
            let l2_off = e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let rc = match self.stored(l2_off >> self.cbits) {
                Ok(r) => r.unwrap_or(0),
                Err(_) => continue,
            };
            if (rc == 1) != (e & COPIED != 0) {
                self.t.findings.push(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x} refcount={rc}",
                    if fix { "Repairing" } else { "ERROR" }
                ));
                if fix {
                    let ne = if rc == 1 { e | COPIED } else { e & !COPIED };
                    BigEndian::write_u64(&mut l1[i * 8..], ne);
                    l1_dirty += 1;
                } else {
                    self.t.corruptions += 1;
                }
            }
            if !l2_off.is_multiple_of(self.cs) {
                continue;
            }
            let inside = self.host.len().saturating_sub(l2_off).min(self.cs);
            copied_read += inside;
            if copied_read > self.host.len() + self.cs {
                return Err(Error::limit(
                    "the active L1 table references more L2 table bytes than the image could hold",
                ));
            }
            let mut table = read_padded(self.host, l2_off, inside, "L2 table")?;
            let mut dirty = 0u64;
            for j in 0..table.len() / esz {
                let le = BigEndian::read_u64(&table[j * esz..]);
                if le & COMPRESSED != 0 {
                    continue;
                }
                let data = le & OFFSET_MASK;
                let zero_plain = !ext && le & ZERO != 0 && data == 0;
                let allocated = data != 0 || (self.data_file && le & COPIED != 0);
                if zero_plain || !allocated {
                    continue;
                }
                let rc = if self.data_file {
                    1
                } else {
                    match self.stored(data >> self.cbits) {
                        Ok(r) => r.unwrap_or(0),
                        Err(_) => continue,
                    }
                };
                if (rc == 1) != (le & COPIED != 0) {
                    self.t.findings.push(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={le:x} refcount={rc}",
                        if fix { "Repairing" } else { "ERROR" }
                    ));
                    if fix {
                        let ne = if rc == 1 { le | COPIED } else { le & !COPIED };
                        BigEndian::write_u64(&mut table[j * esz..], ne);
                        dirty += 1;
                    } else {
                        self.t.corruptions += 1;
                    }
                }
            }
            if dirty > 0 {
                edit.write_at(&table, l2_off, "writing a repaired L2 table")?;
                self.t.corruptions_fixed += dirty;
            }
        }
        if l1_dirty > 0 {
            edit.write_at(&l1, l1_off, "writing the repaired L1 table")?;
            self.t.corruptions_fixed += l1_dirty;
        }
        Ok(())
    }
}
