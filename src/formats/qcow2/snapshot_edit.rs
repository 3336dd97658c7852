//! Creating, deleting and applying qcow2 internal snapshots in place (`snapshot -c/-d/-a`).
//!
//! Each operation is one transaction of the kind `resize.rs` makes: everything new goes
//! into clusters that are free in the current image (refcount 0) — an active L1 table,
//! copies of the active L2 tables whose `QCOW_OFLAG_COPIED` flags must change, the
//! snapshot table, the changed refcount blocks and a refcount table pointing at them — is
//! flushed, and then one write of header bytes 24..72 (size, l1_size, l1_table_offset,
//! refcount_table_offset, refcount_table_clusters, nb_snapshots, snapshots_offset), inside
//! the first sector, switches from the old state to the new one. Nothing the old state uses
//! is written over, and what the new state no longer uses has refcount 0 in the new
//! refcounts. So a failure or a kill at any write leaves the image as before or as after,
//! which `qemu-img check` finds clean: no leaks either (qemu itself writes refcounts in
//! place first and leaks clusters when stopped half way). Once the switch is flushed,
//! the clusters the new state freed get holes punched, as qemu's discards give them back.
//!
//! Refcounts count paths: every L1 table (the active one and each snapshot's) adds one to
//! each L2 table it names and, through it, one to each data cluster (every cluster a
//! compressed cluster's bytes touch). So:
//! - create: the current L1 table becomes the snapshot's as it is, and a new active L1
//!   adds one path to everything. An active L2 table that holds a COPIED entry (a data
//!   cluster only it used) is copied with the flags cleared; the others are shared.
//! - delete: the snapshot's paths go, its L1 table is freed; active tables whose COPIED
//!   flags no longer match their refcounts (now 1) are copied with the flags set.
//! - apply: the snapshot's L1 is copied into a new active L1 (its paths added, the old
//!   active's removed), the guest size becomes the snapshot's (as qemu does), and its L2
//!   tables that hold COPIED entries are copied with the flags cleared.
//!
//! IDs, names, the table layout (24 bytes of extra data, unknown extra data kept) and the
//! messages are qemu-img's: create takes the next numeric ID and allows a name that is
//! already used; delete by name; apply by ID, else name.

use byteorder::{BigEndian, ByteOrder};

use super::editor::{coalesce, Alloc, Qcow2Editor, Refs, Write};
use super::header::*;
use super::reader::{COMPRESSED, COPIED, OFFSET_MASK};
use super::snapshot::{self, Snapshot, KNOWN_EXTRA, MAX_SNAPSHOTS, MAX_TABLE_BYTES};
use crate::device::{HostFile, SnapshotInfo, SnapshotOp, SnapshotSel};
use crate::error::{Error, Result};

/// The header bytes the switching write covers, size through snapshots_offset: all in
/// the first sector, so the write is atomic.
const SWITCH_START: usize = 24;
const SWITCH_END: usize = 72;
/// qemu's limit on a snapshot name (`QEMUSnapshotInfo.name`, 256 bytes with its NUL).
const MAX_NAME: usize = 255;

/// Run `op` on the image `ed` edits; see the module comment.
pub fn run(ed: &mut Qcow2Editor, op: &SnapshotOp<'_>) -> Result<()> {
    refuse(ed, op)?;
    let (table, table_len) = snapshot::read_table_len(&ed.host, &ed.header)?;
    let (header, writes, freed) = {
        let mut p = Planner::new(ed)?;
        match *op {
            SnapshotOp::Create(name) => p.create(table, table_len, name)?,
            SnapshotOp::Delete(sel) => {
                let i = find(&table, sel).ok_or_else(|| Error::arg("snapshot not found"))?;
                p.delete(table, table_len, i)?
            }
            SnapshotOp::Apply(sel) => {
                let i = find(&table, sel).ok_or_else(|| {
                    Error::arg("Failed to load snapshot: No such file or directory")
                })?;
                p.apply(&table[i])?
            }
        }
        let (rt, rt_clusters, mut w) = ed.finish_refcounts(&mut p.refs, &mut p.alloc)?;
        p.header.refcount_table_offset = rt;
        p.header.refcount_table_clusters = rt_clusters;
        p.writes.append(&mut w);
        let freed = p.refs.freed(p.host)?;
        (p.header, std::mem::take(&mut p.writes), freed)
    };
    commit(ed, header, writes)?;
    give_back(ed, &freed);
    Ok(())
}

/// Give the space of the clusters the new state freed back to the filesystem, as qemu
/// does when it deletes a snapshot (`pass-discard-snapshot`). Nothing names them any
/// more, so this is only a saving: a failure leaves them allocated, and is not one of the
/// operation's (qemu ignores its discard errors too).
fn give_back(ed: &mut Qcow2Editor, freed: &[u64]) {
    let cs = ed.cs();
    let len = ed.host.len();
    let mut k = 0;
    while k < freed.len() {
        let mut n = 1;
        while k + n < freed.len() && freed[k + n] == freed[k] + n as u64 {
            n += 1;
        }
        let a = freed[k] * cs;
        let end = ((freed[k] + n as u64) * cs).min(len);
        if a < end
            && !matches!(
                ed.file
                    .punch_hole(a, end - a, "punching freed qcow2 clusters"),
                Ok(true)
            )
        {
            return;
        }
        k += n;
    }
}

fn refuse(ed: &Qcow2Editor, op: &SnapshotOp<'_>) -> Result<()> {
    let h = &ed.header;
    let why = if h.incompatible_features & INCOMPAT_DIRTY != 0 {
        Some("the image is marked dirty (its refcounts may be stale): run qemu-img check -r all first".to_string())
    } else if h.incompatible_features & INCOMPAT_CORRUPT != 0 {
        Some("the image is marked corrupt: run qemu-img check -r all first".to_string())
    } else if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
        Some("Operation not supported (the image keeps its data in an external data file, which internal snapshots cannot share)".to_string())
    } else if matches!(op, SnapshotOp::Apply(_)) && ed.nb_bitmaps > 0 {
        Some(format!(
            "Device has active dirty bitmaps ({} persistent bitmap(s) would not see the change; remove them with qemu-img bitmap --remove first)",
            ed.nb_bitmaps
        ))
    } else if matches!(op, SnapshotOp::Create(_)) && h.nb_snapshots >= MAX_SNAPSHOTS {
        Some(format!(
            "File too large (the image has {} snapshots, qemu's limit)",
            h.nb_snapshots
        ))
    } else {
        None
    };
    match why {
        Some(m) => Err(Error::unsupported(m).with_path(&ed.path)),
        None => Ok(()),
    }
}

/// qemu's lookups: `-d` by name (the first with it), `-a` by ID and then by name.
fn find(table: &[Snapshot], sel: SnapshotSel<'_>) -> Option<usize> {
    let by_id = |v: &str| table.iter().position(|s| s.raw_id == v.as_bytes());
    let by_name = |v: &str| table.iter().position(|s| s.raw_name == v.as_bytes());
    match sel {
        SnapshotSel::Name(v) => by_name(v),
        SnapshotSel::Id(v) => by_id(v),
        SnapshotSel::IdOrName(v) => by_id(v).or_else(|| by_name(v)),
    }
}

/// C's `strtoul(s, NULL, 10)` on an ID, as qemu numbers new snapshots with it.
fn strtoul(s: &[u8]) -> u64 {
    let mut i = s.iter().take_while(|c| c.is_ascii_whitespace()).count();
    let neg = match s.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let mut v: u64 = 0;
    for &c in s[i.min(s.len())..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
    {
        match v
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
        {
            Some(n) => v = n,
            None => return u64::MAX,
        }
    }
    if neg {
        v.wrapping_neg()
    } else {
        v
    }
}

/// The state one operation builds: refcount changes, new clusters and their bytes, and
/// the header that switches to them.
struct Planner<'a> {
    host: &'a HostFile,
    ed: &'a Qcow2Editor,
    refs: Refs,
    alloc: Alloc,
    writes: Vec<Write>,
    header: Header,
    cs: u64,
    /// u64 words per L2 entry (2 with extended L2 entries).
    words: usize,
}

impl<'a> Planner<'a> {
    fn new(ed: &'a Qcow2Editor) -> Result<Planner<'a>> {
        Ok(Planner {
            host: &ed.host,
            ed,
            refs: Refs::load(&ed.host, &ed.header)?,
            alloc: Alloc::from(1),
            writes: Vec::new(),
            header: ed.header.clone(),
            cs: ed.cs(),
            words: (ed.header.l2_entry_size() / 8) as usize,
        })
    }

    fn create(&mut self, mut table: Vec<Snapshot>, table_len: u64, name: &str) -> Result<()> {
        let h = self.ed.header.clone();
        let next = table
            .iter()
            .map(|s| strtoul(&s.raw_id))
            .max()
            .unwrap_or(0)
            .wrapping_add(1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let raw_name = name.as_bytes()[..name.len().min(MAX_NAME)].to_vec();
        let raw_id = next.to_string().into_bytes();
        // The current L1 table becomes the snapshot's, unchanged; a new one is the active.
        let (sn_l1, sn_l1_size) = if h.l1_size == 0 {
            (0, 0)
        } else {
            (h.l1_table_offset, h.l1_size)
        };
        table.push(Snapshot {
            info: SnapshotInfo {
                id: String::from_utf8_lossy(&raw_id).into_owned(),
                name: String::from_utf8_lossy(&raw_name).into_owned(),
                vm_state_size: 0,
                date_sec: now.as_secs() as u32,
                date_nsec: now.subsec_micros() * 1000,
                vm_clock_nsec: 0,
                // qemu-img's snapshot info is zeroed, icount included.
                icount: Some(0),
                disk_size: Some(h.size),
            },
            l1_table_offset: sn_l1,
            l1_size: sn_l1_size,
            raw_id,
            raw_name,
            unknown_extra: Vec::new(),
            extra_size: KNOWN_EXTRA,
        });
        if h.l1_size > 0 {
            let l1 = self.ed.read_l1()?;
            self.paths(&l1, 1, "the active L1 table")?;
            let l1 = self.active_entries(&l1)?;
            self.new_l1(&l1)?;
        }
        self.write_table(&table, table_len)
    }

    fn delete(&mut self, mut table: Vec<Snapshot>, table_len: u64, i: usize) -> Result<()> {
        let sn = table.remove(i);
        let sl1 = self.snapshot_l1(&sn)?;
        self.paths(&sl1, -1, "the snapshot's L1 table")?;
        self.free_l1(sn.l1_table_offset, sn.l1_size)?;
        let l1 = self.ed.read_l1()?;
        let fixed = self.active_entries(&l1)?;
        if fixed != l1 {
            self.free_l1(self.ed.header.l1_table_offset, self.ed.header.l1_size)?;
            self.new_l1(&fixed)?;
        }
        self.write_table(&table, table_len)
    }

    fn apply(&mut self, sn: &Snapshot) -> Result<()> {
        let h = self.ed.header.clone();
        let size = sn.info.disk_size.unwrap_or(h.size);
        let span = self.cs * h.l2_entries();
        let needed = size.div_ceil(span).max(u64::from(sn.l1_size));
        if needed * 8 > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "snapshot '{}' has a disk size of {size} bytes, past what an L1 table of {} MiB maps",
                sn.info.name,
                MAX_L1_BYTES >> 20
            ))
            .with_field("disk_size"));
        }
        let mut l1 = self.snapshot_l1(sn)?;
        l1.resize(needed as usize, 0);
        self.paths(&l1, 1, "the snapshot's L1 table")?;
        let old = self.ed.read_l1()?;
        self.paths(&old, -1, "the active L1 table")?;
        self.free_l1(h.l1_table_offset, h.l1_size)?;
        let l1 = self.active_entries(&l1)?;
        self.header.size = size;
        if l1.is_empty() {
            self.header.l1_size = 0;
            self.header.l1_table_offset = 0;
        } else {
            self.new_l1(&l1)?;
        }
        Ok(())
    }

    /// Change `c`'s refcount by `delta`, refusing what the refcount width cannot hold.
    fn bump(&mut self, c: u64, delta: i64) -> Result<()> {
        if delta > 0 {
            let cur = self.refs.get_new(self.host, c)?;
            if cur
                .checked_add(delta as u64)
                .is_none_or(|n| n > self.refs.max())
            {
                return Err(Error::arg(format!(
                    "Invalid argument (the refcount of the cluster at {:#x} would pass {}, the most {}-bit refcounts hold)",
                    c * self.cs,
                    self.refs.max(),
                    self.ed.header.refcount_bits()
                )));
            }
        }
        self.refs.add(self.host, c, delta)
    }

    /// An L1 table of `n` entries at `off`, checked as qemu's `qcow2_validate_table` does.
    fn read_l1_at(&self, off: u64, n: u32, what: &str) -> Result<Vec<u64>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let bytes = u64::from(n) * 8;
        if bytes > MAX_L1_BYTES || !off.is_multiple_of(self.cs) || off == 0 {
            return Err(Error::corrupt(format!(
                "{what} ({n} entries at {off:#x}) is not a cluster-aligned table of at most {} MiB",
                MAX_L1_BYTES >> 20
            ))
            .at(off));
        }
        self.host.check_range(off, bytes, what)?;
        let raw = self.host.read_vec(off, bytes, what)?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    fn snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        self.read_l1_at(
            sn.l1_table_offset,
            sn.l1_size,
            &format!("the L1 table of snapshot '{}'", sn.info.name),
        )
    }

    /// The L2 table at `off`, named by entry `i` of `what`.
    fn read_l2(&self, off: u64, i: usize, what: &str) -> Result<Vec<u64>> {
        if !off.is_multiple_of(self.cs) {
            return Err(Error::corrupt(format!(
                "L2 table offset {off:#x} (entry {i} of {what}) is not cluster aligned"
            ))
            .at(off));
        }
        self.host
            .check_range(off, self.cs, "L2 table")
            .map_err(|e| e.with_field(format!("entry {i} of {what}")))?;
        let raw = self.host.read_vec(off, self.cs, "L2 table")?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }

    /// The host clusters an L2 entry's first word uses: one for a standard (or
    /// allocated zero) cluster, every one its bytes touch for a compressed one.
    fn clusters_of(&self, e: u64) -> Result<std::ops::Range<u64>> {
        let cs = self.cs;
        let bits = self.ed.header.cluster_bits;
        let (start, end) = if e & COMPRESSED != 0 {
            let shift = 62 - (bits - 8);
            let coffset = e & ((1u64 << shift) - 1);
            let nsect = ((e >> shift) & ((1u64 << (bits - 8)) - 1)) + 1;
            let start = coffset & !511;
            (start, start + nsect * 512)
        } else {
            let off = e & OFFSET_MASK;
            if off == 0 {
                return Ok(0..0);
            }
            if !off.is_multiple_of(cs) {
                return Err(Error::corrupt(format!(
                    "an L2 entry names host offset {off:#x}, not cluster aligned; run qemu-img check -r all"
                ))
                .at(off));
            }
            (off, off + cs)
        };
        if start >= self.host.len() {
            return Err(Error::corrupt(format!(
                "an L2 entry names host offset {start:#x}, past the end of the file; run qemu-img check -r all"
            ))
            .at(start));
        }
        Ok(start / cs..end.div_ceil(cs))
    }

    /// Add `delta` to everything `l1` names: each L2 table, and each data cluster
    /// through it. Every one must be in use now (a refcount of 0 is corruption that
    /// counting on would free live data).
    fn paths(&mut self, l1: &[u64], delta: i64, what: &str) -> Result<()> {
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            let l2 = self.read_l2(off, i, what)?;
            self.in_use(off / self.cs)?;
            self.bump(off / self.cs, delta)?;
            for w in l2.chunks_exact(self.words) {
                for c in self.clusters_of(w[0])? {
                    self.in_use(c)?;
                    self.bump(c, delta)?;
                }
            }
        }
        Ok(())
    }

    fn in_use(&mut self, c: u64) -> Result<()> {
        if self.refs.get_old(self.host, c)? == 0 {
            return Err(Error::corrupt(format!(
                "the cluster at {:#x} is in use but has refcount 0; run qemu-img check -r all",
                c * self.cs
            ))
            .at(c * self.cs));
        }
        Ok(())
    }

    /// The entries of the new active L1 table, whose paths are already counted: each
    /// L2 table keeps its place when its COPIED flags match the new refcounts, or is
    /// copied (a new cluster of its own) with the flags that do. L1 entries get COPIED
    /// where their L2 table's new refcount is 1.
    fn active_entries(&mut self, l1: &[u64]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(l1.len());
        for (i, &e) in l1.iter().enumerate() {
            let off = e & OFFSET_MASK;
            if off == 0 {
                out.push(e);
                continue;
            }
            let mut l2 = self.read_l2(off, i, "the active L1 table")?;
            let mut changed = false;
            for k in (0..l2.len()).step_by(self.words) {
                let w = l2[k];
                if w & COMPRESSED != 0 || w & OFFSET_MASK == 0 {
                    continue;
                }
                let sole = self.refs.get_new(self.host, (w & OFFSET_MASK) / self.cs)? == 1;
                if sole != (w & COPIED != 0) {
                    l2[k] = if sole { w | COPIED } else { w & !COPIED };
                    changed = true;
                }
            }
            let mut at = off;
            if changed {
                // The old table stays as it is for whoever else names it (a snapshot).
                let c = self.alloc.run(&mut self.refs, self.host, 1)?;
                self.bump(c, 1)?;
                self.bump(off / self.cs, -1)?;
                let mut b = vec![0u8; self.cs as usize];
                for (k, w) in l2.iter().enumerate() {
                    BigEndian::write_u64(&mut b[k * 8..], *w);
                }
                self.writes.push((c * self.cs, b));
                at = c * self.cs;
            }
            let sole = self.refs.get_new(self.host, at / self.cs)? == 1;
            let flags = e & !OFFSET_MASK & !COPIED;
            out.push(at | flags | if sole { COPIED } else { 0 });
        }
        Ok(out)
    }

    /// Write `l1` as the active L1 table, in new clusters.
    fn new_l1(&mut self, l1: &[u64]) -> Result<()> {
        let n = (l1.len() as u64 * 8).div_ceil(self.cs).max(1);
        let c = self.alloc.run(&mut self.refs, self.host, n)?;
        for k in 0..n {
            self.bump(c + k, 1)?;
        }
        let mut b = vec![0u8; (n * self.cs) as usize];
        for (k, e) in l1.iter().enumerate() {
            BigEndian::write_u64(&mut b[k * 8..], *e);
        }
        self.writes.push((c * self.cs, b));
        self.header.l1_table_offset = c * self.cs;
        self.header.l1_size = l1.len() as u32;
        Ok(())
    }

    /// Free the clusters of an L1 table of `n` entries at `off` (no longer named).
    fn free_l1(&mut self, off: u64, n: u32) -> Result<()> {
        if off == 0 || n == 0 {
            return Ok(());
        }
        for k in 0..(u64::from(n) * 8).div_ceil(self.cs) {
            self.bump(off / self.cs + k, -1)?;
        }
        Ok(())
    }

    /// Write `table` in new clusters, free the old one (`old_len` bytes), and point
    /// the new header at it.
    fn write_table(&mut self, table: &[Snapshot], old_len: u64) -> Result<()> {
        let h = &self.ed.header;
        if h.nb_snapshots > 0 && old_len > 0 {
            let first = h.snapshots_offset / self.cs;
            let end = (h.snapshots_offset + old_len).div_ceil(self.cs);
            for c in first..end {
                self.bump(c, -1)?;
            }
        }
        let mut bytes = snapshot::table_bytes(table, h.size);
        if bytes.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::limit(format!(
                "File too large (the snapshot table would take {} bytes, past qemu's limit of {MAX_TABLE_BYTES})",
                bytes.len()
            )));
        }
        self.header.nb_snapshots = table.len() as u32;
        if table.is_empty() {
            self.header.snapshots_offset = 0;
            return Ok(());
        }
        let n = (bytes.len() as u64).div_ceil(self.cs);
        let c = self.alloc.run(&mut self.refs, self.host, n)?;
        for k in 0..n {
            self.bump(c + k, 1)?;
        }
        bytes.resize((n * self.cs) as usize, 0);
        self.writes.push((c * self.cs, bytes));
        self.header.snapshots_offset = c * self.cs;
        Ok(())
    }
}

/// Write the new clusters, flush, switch the header, flush. A failure before the switch
/// gives the file its old length back (nothing names what was written); once the switch
/// write was tried, the file is left alone (the header may name the new tables).
fn commit(ed: &mut Qcow2Editor, header: Header, writes: Vec<Write>) -> Result<()> {
    let old_len = ed.host.len();
    let before = (|| -> Result<()> {
        for (off, data) in &coalesce(writes) {
            ed.file
                .write_at(data, *off, "writing new qcow2 tables for the snapshot")?;
        }
        ed.file.sync("flushing the new qcow2 tables")
    })();
    if let Err(e) = before {
        let _ = ed.file.file().set_len(old_len);
        return Err(e.with_path(&ed.path));
    }
    let b = header.to_bytes();
    ed.file.write_at(
        &b[SWITCH_START..SWITCH_END],
        SWITCH_START as u64,
        "writing the qcow2 header (L1, refcount and snapshot tables)",
    )?;
    ed.header = header;
    ed.host = ed.reopen_host()?;
    ed.file.sync("flushing the qcow2 header")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_numbered_as_strtoul_reads_them() {
        assert_eq!(strtoul(b"12"), 12);
        assert_eq!(strtoul(b"  7abc"), 7);
        assert_eq!(strtoul(b"abc"), 0);
        assert_eq!(strtoul(b""), 0);
        assert_eq!(strtoul(b"+3"), 3);
        assert_eq!(strtoul(b"-1"), u64::MAX);
        assert_eq!(strtoul(b"99999999999999999999999"), u64::MAX);
    }
}
