//! Writing qcow2 strictly forward (for a pipe, a character device, or an HTTP body whose
//! length must be known up front), from an [`AllocationPlan`] made before the first byte.
//!
//! Layout, in ascending file order: the header cluster, the refcount table, the refcount
//! blocks, the L1 table, the L2 tables (one per L1 entry that maps anything, ascending),
//! then the data clusters in guest order. Every table is computed from the plan alone, so
//! the file's length is known before anything is written and nothing is ever written
//! twice. Every cluster up to the end is referenced once and has refcount 1, so
//! `qemu-img check` finds neither errors nor leaks.
//!
//! Compressed output takes two passes: the planning pass compresses every cluster once
//! to learn its length ([`AllocationPlan::encoded`]), the tables are laid out from those
//! lengths (compressed clusters packed back to back, sharing host clusters as the file
//! writer does), and the writing pass compresses again, which gives the same bytes
//! (the codecs are deterministic); a length that differs is an error, not a corrupt image.
//! Compression thus costs twice its CPU time, and the output length is known only after
//! the planning pass.

use byteorder::{BigEndian, ByteOrder};

use std::sync::Arc;

use super::header::MAX_REFTABLE_BYTES;
use super::reader::{COMPRESSED, COPIED};
use super::writer::{
    fill_refcount_block, header_bytes, parse_options, ClusterEncoder, Params, Refcounts,
};
use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::writer::{write_all_at, AllocationPlan, Encoder, ImageWriter, Sink};

/// Metadata is sent in pieces of about this size, so a pipe sees few large writes while
/// memory stays bounded whatever the tables' size.
const BATCH: usize = 1 << 20;

/// Where everything goes, in clusters.
#[derive(Debug, Clone, Copy)]
struct Layout {
    reftable_clusters: u64,
    refblocks: u64,
    l1_clusters: u64,
    /// First cluster of the L1 table (0 when the image has no L1 entries).
    l1_start: u64,
    l2_start: u64,
    data_start: u64,
    /// Clusters in the file.
    total: u64,
}

/// Where one planned guest cluster's data goes, in bytes from the start of the data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A whole host cluster of its own.
    Raw(u64),
    /// Compressed: start and length, possibly sharing host clusters with its neighbours.
    Compressed(u64, u64),
}

/// Walks the planned guest clusters in ascending order and places each one the way the
/// file writer would: plain clusters on fresh host clusters, compressed ones packed back
/// to back (a host cluster shared by as many as its refcount width allows). Run once to
/// size the data area and learn its refcounts, again for the L2 tables, and again in
/// lockstep with the engine's writes: the same walk gives the same places every time.
#[derive(Clone)]
struct Placer<'a> {
    cs: u64,
    max_rc: u64,
    runs: &'a [(u64, u64)],
    encoded: &'a [(u64, u32)],
    /// Index into `runs` and the next guest cluster in it.
    run: usize,
    next: u64,
    /// Index into `encoded`.
    enc: usize,
    refs: Refcounts,
    /// Free byte in the last host cluster where compressed data may continue.
    cfree: Option<u64>,
}

impl<'a> Placer<'a> {
    fn new(p: &Params, runs: &'a [(u64, u64)], encoded: &'a [(u64, u32)]) -> Self {
        Placer {
            cs: p.cs,
            max_rc: u64::MAX >> (64 - (1u32 << p.refcount_order)),
            runs,
            encoded,
            run: 0,
            next: runs.first().map_or(0, |r| r.0),
            enc: 0,
            refs: Refcounts::default(),
            cfree: None,
        }
    }

    /// The next planned guest cluster, not yet placed.
    fn peek(&self) -> Option<u64> {
        (self.run < self.runs.len()).then_some(self.next)
    }

    /// Place the next planned guest cluster.
    fn place(&mut self) -> Option<(u64, Place)> {
        let g = self.peek()?;
        self.next += 1;
        if self.next >= self.runs[self.run].1 {
            self.run += 1;
            if let Some(r) = self.runs.get(self.run) {
                self.next = r.0;
            }
        }
        let off = g * self.cs;
        while self.enc < self.encoded.len() && self.encoded[self.enc].0 < off {
            self.enc += 1;
        }
        let n = match self.encoded.get(self.enc) {
            Some(&(o, n)) if o == off && n > 0 && u64::from(n) < self.cs => u64::from(n),
            _ => {
                self.cfree = None;
                return Some((g, Place::Raw(self.refs.alloc(1) * self.cs)));
            }
        };
        let cs = self.cs;
        let start = match self.cfree {
            Some(p) if self.refs.tail() < self.max_rc => {
                self.refs.inc_tail();
                let extra = (p + n - 1) / cs - p / cs;
                if extra > 0 {
                    self.refs.alloc(extra);
                }
                p
            }
            _ => self.refs.alloc(n.div_ceil(cs)) * cs,
        };
        let end = start + n;
        self.cfree = (end % cs != 0).then_some(end);
        Some((g, Place::Compressed(start, n)))
    }
}

/// The sequential qcow2 writer.
pub struct Qcow2StreamWriter {
    file: Sink,
    p: Params,
    lay: Layout,
    /// Planned guest clusters as runs [first, end).
    runs: Vec<(u64, u64)>,
    /// Encoded lengths from the plan (compressed output only).
    encoded: Vec<(u64, u32)>,
    /// Refcounts of the whole file, as runs.
    refcounts: Vec<(u64, u64, u64)>,
    /// L1 indices that have an L2 table, ascending.
    l2_tables: Vec<u64>,
    /// The header cluster's bytes, built up front so that a bad header fails before any
    /// byte is sent.
    head: Vec<u8>,
    head_written: bool,
    /// Progress of the lockstep walk: planned clusters placed so far, the walk's state
    /// kept as indices so the writer owns no borrow of itself.
    walk: WalkState,
    /// Host end of what was written so far.
    pos: u64,
    /// Guest end of the last write (writes must ascend).
    written_to: u64,
}

/// A [`Placer`]'s position, saved between writes.
#[derive(Clone, Default)]
struct WalkState {
    run: usize,
    next: u64,
    enc: usize,
    refs: Refcounts,
    cfree: Option<u64>,
}

/// Make a sequential qcow2 writer over `file` that will accept exactly the writes of
/// `plan` (made with [`crate::convert::plan_allocation`] at the cluster size, or with
/// [`crate::convert::plan_allocation_with`] and the writer's encoder for `-c`).
pub fn create_stream_writer(
    file: Sink,
    opts: &CreateOptions,
    plan: &AllocationPlan,
) -> Result<Qcow2StreamWriter> {
    let p = parse_options(opts)?;
    let cs = p.cs;
    if plan.granularity != cs {
        return Err(Error::arg(format!(
            "the allocation plan was made for {}-byte granules but the qcow2 cluster size is \
             {cs}; plan with the cluster size",
            plan.granularity
        )));
    }
    if !p.compress && !plan.encoded.is_empty() {
        return Err(Error::arg(
            "the allocation plan holds compressed lengths but the output is not compressed",
        ));
    }
    let guest_clusters = p.size.div_ceil(cs);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in &plan.ranges {
        let (a, b) = (a / cs, b.min(p.size).div_ceil(cs).min(guest_clusters));
        if a >= b {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => runs.push((a, b)),
        }
    }
    let mut l2_tables: Vec<u64> = Vec::new();
    for &(a, b) in &runs {
        for i in a / p.l2_entries..=(b - 1) / p.l2_entries {
            if l2_tables.last() != Some(&i) {
                l2_tables.push(i);
            }
        }
    }
    let mut placer = Placer::new(&p, &runs, &plan.encoded);
    while placer.place().is_some() {}
    let data = placer.refs.next;
    let data_refs = placer.refs.runs;

    let l1_clusters = (p.l1_size * 8).div_ceil(cs);
    let fixed = 1 + l1_clusters + l2_tables.len() as u64 + data;
    let per_block = (cs * 8) >> p.refcount_order;
    // Refcount blocks cover themselves and the table: find the fixpoint.
    let (mut blocks, mut tclusters) = (0u64, 0u64);
    loop {
        let b = (fixed + blocks + tclusters).div_ceil(per_block);
        let t = (b * 8).div_ceil(cs);
        if (b, t) == (blocks, tclusters) {
            break;
        }
        (blocks, tclusters) = (b, t);
    }
    if tclusters * cs > MAX_REFTABLE_BYTES {
        return Err(Error::limit(format!(
            "the image needs a refcount table of {} bytes, above qemu's {} MiB limit; use a larger cluster_size",
            tclusters * cs,
            MAX_REFTABLE_BYTES >> 20
        )));
    }
    let l1_start = 1 + tclusters + blocks;
    let l2_start = l1_start + l1_clusters;
    let data_start = l2_start + l2_tables.len() as u64;
    let total = data_start + data;
    if total.checked_mul(cs).map_or(true, |e| e > 1 << 56) {
        return Err(Error::limit(
            "qcow2 data would lie beyond 64 PiB, which L2 entries cannot address",
        ));
    }
    if p.compress {
        let shift = 62 - (p.cluster_bits - 8);
        if total * cs > 1u64 << shift.min(56) {
            return Err(Error::limit(format!(
                "compressed data up to host offset {:#x} is beyond what a {cs}-byte-cluster descriptor can address",
                total * cs
            )));
        }
    }
    let mut refcounts = vec![(0, data_start, 1)];
    refcounts.extend(data_refs.iter().map(|&(s, l, rc)| (s + data_start, l, rc)));
    let lay = Layout {
        reftable_clusters: tclusters,
        refblocks: blocks,
        l1_clusters,
        l1_start: if p.l1_size == 0 { 0 } else { l1_start },
        l2_start,
        data_start,
        total,
    };
    let head = header_bytes(&p, lay.l1_start * cs, cs, tclusters)?;
    let walk = WalkState {
        next: runs.first().map_or(0, |r| r.0),
        ..WalkState::default()
    };
    Ok(Qcow2StreamWriter {
        file,
        p,
        lay,
        runs,
        encoded: plan.encoded.clone(),
        refcounts,
        l2_tables,
        head,
        head_written: false,
        walk,
        pos: 0,
        written_to: 0,
    })
}

/// Collects metadata bytes in order and sends them in batches.
struct Emitter<'a> {
    file: &'a Sink,
    buf: Vec<u8>,
    at: u64,
}

impl Emitter<'_> {
    fn put(&mut self, bytes: &[u8], what: &str) -> Result<()> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= BATCH {
            self.flush(what)?;
        }
        Ok(())
    }

    fn flush(&mut self, what: &str) -> Result<()> {
        write_all_at(self.file, &self.buf, self.at, what)?;
        self.at += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

impl Qcow2StreamWriter {
    /// The L2 entry of a placed cluster.
    fn entry(&self, place: Place) -> u64 {
        let base = self.lay.data_start * self.p.cs;
        match place {
            Place::Raw(h) => (base + h) | COPIED,
            Place::Compressed(start, n) => {
                let start = base + start;
                let shift = 62 - (self.p.cluster_bits - 8);
                let nsect = (start + n - 1) / 512 - start / 512;
                COMPRESSED | (nsect << shift) | start
            }
        }
    }

    /// Send every table, from the header to the last L2 table.
    fn write_head(&mut self) -> Result<()> {
        let cs = self.p.cs;
        let lay = self.lay;
        let mut cl = vec![0u8; cs as usize];
        let mut em = Emitter {
            file: &self.file,
            buf: Vec::with_capacity(BATCH + cs as usize),
            at: 0,
        };
        cl[..self.head.len()].copy_from_slice(&self.head);
        em.put(&cl, "qcow2 header")?;

        // Refcount table: block i sits at cluster 1 + T + i.
        let per_cluster = cs / 8;
        for k in 0..lay.reftable_clusters {
            cl.fill(0);
            for j in 0..per_cluster {
                let i = k * per_cluster + j;
                if i < lay.refblocks {
                    let host = (1 + lay.reftable_clusters + i) * cs;
                    BigEndian::write_u64(&mut cl[(j * 8) as usize..], host);
                }
            }
            em.put(&cl, "refcount table")?;
        }
        em.flush("refcount table")?;

        let mut run = 0usize;
        for b in 0..lay.refblocks {
            fill_refcount_block(
                &self.refcounts,
                self.p.refcount_order,
                cs,
                b,
                &mut run,
                &mut cl,
            );
            em.put(&cl, "refcount blocks")?;
        }
        em.flush("refcount blocks")?;

        // L1: entry i points at the r-th L2 table when i is the r-th index that has one.
        let mut r = 0usize;
        for k in 0..lay.l1_clusters {
            cl.fill(0);
            for j in 0..per_cluster {
                let i = k * per_cluster + j;
                if self.l2_tables.get(r) == Some(&i) {
                    let host = (lay.l2_start + r as u64) * cs;
                    BigEndian::write_u64(&mut cl[(j * 8) as usize..], host | COPIED);
                    r += 1;
                }
            }
            em.put(&cl, "L1 table")?;
        }
        em.flush("L1 table")?;

        // L2 tables, each mapping the planned clusters of its range to their data.
        let l2e = self.p.l2_entries;
        let words = if self.p.extended_l2 { 2 } else { 1 };
        let mut placer = Placer::new(&self.p, &self.runs, &self.encoded);
        for &i in &self.l2_tables {
            cl.fill(0);
            let (lo, hi) = (i * l2e, (i + 1) * l2e);
            while placer.peek().is_some_and(|g| g < hi) {
                let (g, place) = placer.place().expect("peeked");
                let at = ((g - lo) * words * 8) as usize;
                BigEndian::write_u64(&mut cl[at..], self.entry(place));
                if self.p.extended_l2 && matches!(place, Place::Raw(_)) {
                    // Every subcluster allocated.
                    BigEndian::write_u64(&mut cl[at + 8..], 0xffff_ffff);
                }
            }
            em.put(&cl, "L2 table")?;
        }
        em.flush("L2 table")?;
        debug_assert_eq!(em.at, lay.data_start * cs);
        self.pos = lay.data_start * cs;
        self.head_written = true;
        Ok(())
    }

    /// Bring the output up to host offset `to` with zeros: planned clusters the engine
    /// did not write (none when the plan is exact). A fresh file gets a hole instead.
    fn zeros_to(&mut self, to: u64) -> Result<()> {
        if to <= self.pos {
            return Ok(());
        }
        if self.file.fresh_file().is_none() {
            static Z: [u8; 64 << 10] = [0; 64 << 10];
            let mut at = self.pos;
            while at < to {
                let k = (to - at).min(Z.len() as u64) as usize;
                write_all_at(&self.file, &Z[..k], at, "unwritten data clusters")?;
                at += k as u64;
            }
        }
        self.pos = to;
        Ok(())
    }

    /// Place the planned cluster at guest cluster `g`, skipping planned clusters before
    /// it (plain ones are left as zeros; a skipped compressed one would leave an invalid
    /// stream behind, so it is an error). With None, skip all that is left.
    fn place_for(&mut self, g: Option<u64>) -> Result<Place> {
        let end = g.is_none();
        let g = g.unwrap_or(u64::MAX);
        let w = std::mem::take(&mut self.walk);
        let mut placer = Placer {
            run: w.run,
            next: w.next,
            enc: w.enc,
            refs: w.refs,
            cfree: w.cfree,
            ..Placer::new(&self.p, &self.runs, &self.encoded)
        };
        let r = loop {
            match placer.peek() {
                Some(n) if n < g => {
                    if let Some((n, Place::Compressed(..))) = placer.place() {
                        break Err(Error::arg(format!(
                            "qcow2 writer: the compressed cluster at guest offset {:#x} was \
                             planned but not written (did the source change between the two \
                             passes?)",
                            n * self.p.cs
                        )));
                    }
                }
                Some(n) if n == g => break Ok(placer.place().expect("peeked").1),
                None if end => break Ok(Place::Raw(0)),
                _ => {
                    break Err(Error::arg(format!(
                        "qcow2 writer: guest offset {:#x} is not in the allocation plan (did \
                         the source change between the planning pass and the conversion?)",
                        g * self.p.cs
                    )))
                }
            }
        };
        self.walk = WalkState {
            run: placer.run,
            next: placer.next,
            enc: placer.enc,
            refs: placer.refs,
            cfree: placer.cfree,
        };
        r
    }

    fn check_order(&mut self, offset: u64, len: usize) -> Result<()> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.p.size && offset >= self.written_to && offset % self.p.cs == 0)
            .ok_or_else(|| {
                Error::arg(format!(
                    "qcow2 writer: write of {len} bytes at {offset:#x} is out of order, unaligned or past the virtual size"
                ))
            })?;
        self.written_to = end;
        if !self.head_written {
            self.write_head()?;
        }
        Ok(())
    }
}

impl ImageWriter for Qcow2StreamWriter {
    fn granularity(&self) -> u64 {
        self.p.cs
    }

    fn virtual_size(&self) -> u64 {
        self.p.size
    }

    fn encoder(&self) -> Option<Arc<dyn Encoder>> {
        self.p.compress.then(|| {
            Arc::new(ClusterEncoder {
                ctype: self.p.ctype,
                cluster_size: self.p.cs as usize,
            }) as Arc<dyn Encoder>
        })
    }

    fn streams(&self) -> bool {
        true
    }

    fn output_len(&self) -> Option<u64> {
        Some(self.lay.total * self.p.cs)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_order(offset, data.len())?;
        let cs = self.p.cs as usize;
        let base = self.lay.data_start * self.p.cs;
        // Consecutive plain clusters land on consecutive host clusters: one write each run.
        let mut piece: Option<(u64, usize, usize)> = None; // (host, from, to)
        let mut done = 0usize;
        while done < data.len() {
            let g = (offset + done as u64) / self.p.cs;
            let n = cs.min(data.len() - done);
            let h = match self.place_for(Some(g))? {
                Place::Raw(h) => base + h,
                Place::Compressed(..) => {
                    return Err(Error::arg(format!(
                        "qcow2 writer: guest offset {:#x} was planned compressed but came \
                         uncompressed (compression is not deterministic?)",
                        g * self.p.cs
                    )))
                }
            };
            piece = match piece {
                Some((ph, a, b)) if ph + (b - a) as u64 == h => Some((ph, a, done + n)),
                other => {
                    if let Some((ph, a, b)) = other {
                        self.zeros_to(ph)?;
                        write_all_at(&self.file, &data[a..b], ph, "guest data")?;
                        self.pos = ph + (b - a) as u64;
                    }
                    Some((h, done, done + n))
                }
            };
            done += n;
        }
        if let Some((ph, a, b)) = piece {
            self.zeros_to(ph)?;
            write_all_at(&self.file, &data[a..b], ph, "guest data")?;
            self.pos = ph + (b - a) as u64;
        }
        Ok(())
    }

    fn write_encoded(&mut self, offset: u64, data: &[u8], encoded: Vec<u8>) -> Result<()> {
        self.check_order(offset, data.len())?;
        let g = offset / self.p.cs;
        let base = self.lay.data_start * self.p.cs;
        match self.place_for(Some(g))? {
            Place::Compressed(start, n) if n == encoded.len() as u64 => {
                let h = base + start;
                self.zeros_to(h)?;
                write_all_at(&self.file, &encoded, h, "compressed cluster")?;
                self.pos = h + n;
                Ok(())
            }
            _ => Err(Error::arg(format!(
                "qcow2 writer: the cluster at guest offset {offset:#x} compressed to {} bytes, \
                 not the length the planning pass found (compression is not deterministic, or \
                 the source changed between the passes)",
                encoded.len()
            ))),
        }
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if !self.head_written {
            self.write_head()?;
        }
        self.place_for(None)?;
        let total = self.lay.total * self.p.cs;
        self.zeros_to(total)?;
        self.file
            .set_len(total)
            .map_err(|e| Error::io("setting output length", e))
    }
}
