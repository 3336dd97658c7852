//! Writing qcow2 strictly forward (for a pipe, a character device, or an HTTP body whose
//! length must be known up front), from an [`AllocationPlan`] made before the first byte.
//!
//! The layout is the file writer's ([`super::writer`]), so a stream and a file get the
//! same bytes: the header cluster, the L1 table, then the data clusters in guest order
//! with each L2 table right after the data it maps, then the refcount blocks and the
//! refcount table. From the plan alone every cluster's place is known (the walk the file
//! writer makes as the data arrives is made here up front), so the L1 table is sent
//! before the data, each L2 table as soon as the data it maps has gone, the refcounts
//! last, the file's length is known before anything is written, and nothing is written
//! twice. Every cluster is referenced as often as its refcount says, so `qemu-img check`
//! finds neither errors nor leaks.
//!
//! Compressed output takes two passes: the planning pass compresses every cluster once
//! to learn its length ([`AllocationPlan::encoded`]), the layout is computed from those
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
use crate::writer::{write_all_at, zero_fill_at, AllocationPlan, Encoder, ImageWriter, Sink};

/// Metadata is sent in pieces of about this size, so a pipe sees few large writes while
/// memory stays bounded whatever the tables' size.
const BATCH: usize = 1 << 20;

/// Where one planned guest cluster's data goes, in host bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A whole host cluster of its own.
    Raw(u64),
    /// Compressed: start and length, possibly sharing host clusters with its neighbours.
    Compressed(u64, u64),
}

/// One step of the file writer's allocation, replayed from the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Guest cluster `g` goes there.
    Cluster(u64, Place),
    /// The L2 table of L1 index `i` goes at this host byte (after the data it maps).
    Table(u64, u64),
}

/// The walk over the planned guest clusters in ascending order that allocates host
/// clusters the way the file writer does: plain clusters on fresh host clusters,
/// compressed ones packed back to back (a host cluster shared by as many as its refcount
/// width allows), each L2 table after the last cluster of its range. Run once up front
/// to size the file and place the tables, and again in lockstep with the engine's
/// writes: the same walk gives the same places every time. Holds only positions, so the
/// writer can keep it next to the plan it walks.
#[derive(Debug, Clone)]
struct Walk {
    /// Index into the runs and the next guest cluster in it.
    run: usize,
    next: u64,
    /// Index into the encoded lengths.
    enc: usize,
    refs: Refcounts,
    /// Free byte in the last host cluster where compressed data may continue.
    cfree: Option<u64>,
    /// L1 index of the table the last placed cluster belongs to, not yet placed.
    group: Option<u64>,
}

/// What the walk needs of the image shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    cs: u64,
    l2e: u64,
    max_rc: u64,
}

impl Walk {
    fn new(p: &Params, runs: &[(u64, u64)]) -> Self {
        let mut refs = Refcounts::default();
        // The header cluster and the L1 table, as the file writer allocates them.
        refs.alloc(1 + (p.l1_size * 8).div_ceil(p.cs));
        Walk {
            run: 0,
            next: runs.first().map_or(0, |r| r.0),
            enc: 0,
            refs,
            cfree: None,
            group: None,
        }
    }

    /// The next planned guest cluster, not yet placed.
    fn peek(&self, runs: &[(u64, u64)]) -> Option<u64> {
        (self.run < runs.len()).then_some(self.next)
    }

    /// The next step: the table of the range just left, or the next cluster.
    fn step(&mut self, sh: &Shape, runs: &[(u64, u64)], encoded: &[(u64, u32)]) -> Option<Step> {
        let g = self.peek(runs);
        if let Some(c) = self.group {
            if g.is_none_or(|g| g / sh.l2e != c) {
                self.group = None;
                self.cfree = None;
                return Some(Step::Table(c, self.refs.alloc(1) * sh.cs));
            }
        }
        let g = g?;
        self.next += 1;
        if self.next >= runs[self.run].1 {
            self.run += 1;
            if let Some(r) = runs.get(self.run) {
                self.next = r.0;
            }
        }
        self.group = Some(g / sh.l2e);
        let cs = sh.cs;
        let off = g * cs;
        while self.enc < encoded.len() && encoded[self.enc].0 < off {
            self.enc += 1;
        }
        let n = match encoded.get(self.enc) {
            Some(&(o, n)) if o == off && n > 0 && u64::from(n) < cs => u64::from(n),
            _ => {
                self.cfree = None;
                return Some(Step::Cluster(g, Place::Raw(self.refs.alloc(1) * cs)));
            }
        };
        let start = match self.cfree {
            Some(p) if self.refs.tail() < sh.max_rc => {
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
        Some(Step::Cluster(g, Place::Compressed(start, n)))
    }
}

/// The sequential qcow2 writer.
pub struct Qcow2StreamWriter {
    file: Sink,
    p: Params,
    shape: Shape,
    /// Planned guest clusters as runs [first, end).
    runs: Vec<(u64, u64)>,
    /// Encoded lengths from the plan (compressed output only).
    encoded: Vec<(u64, u32)>,
    /// Refcounts of the whole file, as runs.
    refcounts: Vec<(u64, u64, u64)>,
    /// Host byte of each L2 table, by L1 index, ascending.
    l2_tables: Vec<(u64, u64)>,
    l1_clusters: u64,
    /// First cluster of the refcount blocks, their count, and the table's clusters.
    refblocks_at: u64,
    refblocks: u64,
    reftable_clusters: u64,
    /// Clusters in the file.
    total: u64,
    /// The header cluster's bytes, built up front so that a bad header fails before any
    /// byte is sent.
    head: Vec<u8>,
    head_written: bool,
    /// The lockstep walk, and the L2 table it is filling (words, two per entry with
    /// extended L2).
    walk: Walk,
    table: Vec<u64>,
    /// Host end of what was written so far.
    pos: u64,
    /// Guest end of the last write (writes must ascend).
    written_to: u64,
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
    let shape = Shape {
        cs,
        l2e: p.l2_entries,
        max_rc: u64::MAX >> (64 - (1u32 << p.refcount_order)),
    };
    let start = Walk::new(&p, &runs);
    let mut walk = start.clone();
    let mut l2_tables = Vec::new();
    while let Some(step) = walk.step(&shape, &runs, &plan.encoded) {
        if let Step::Table(i, host) = step {
            l2_tables.push((i, host));
        }
    }
    let mut refs = walk.refs;
    let n = refs.next;
    let per_block = (cs * 8) >> p.refcount_order;
    // Refcount blocks cover themselves and the table: find the fixpoint.
    let (mut blocks, mut tclusters) = (0u64, 0u64);
    loop {
        let b = (n + blocks + tclusters).div_ceil(per_block);
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
    if n.checked_mul(cs).is_none_or(|e| e > 1 << 56) {
        return Err(Error::limit(
            "qcow2 data would lie beyond 64 PiB, which L2 entries cannot address",
        ));
    }
    if p.compress {
        let shift = 62 - (p.cluster_bits - 8);
        if n * cs > 1u64 << shift.min(56) {
            return Err(Error::limit(format!(
                "compressed data up to host offset {:#x} is beyond what a {cs}-byte-cluster descriptor can address",
                n * cs
            )));
        }
    }
    let refblocks_at = refs.alloc(blocks + tclusters);
    let total = refs.next;
    let l1_offset = if p.l1_size == 0 { 0 } else { cs };
    let head = header_bytes(&p, l1_offset, (refblocks_at + blocks) * cs, tclusters)?;
    let words = (cs / 8) as usize;
    Ok(Qcow2StreamWriter {
        file,
        p,
        shape,
        runs,
        encoded: plan.encoded.clone(),
        refcounts: refs.runs,
        l2_tables,
        l1_clusters: (p.l1_size * 8).div_ceil(cs),
        refblocks_at,
        refblocks: blocks,
        reftable_clusters: tclusters,
        total,
        head,
        head_written: false,
        walk: start,
        table: vec![0; words],
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
        match place {
            Place::Raw(h) => h | COPIED,
            Place::Compressed(start, n) => {
                let shift = 62 - (self.p.cluster_bits - 8);
                let nsect = (start + n - 1) / 512 - start / 512;
                COMPRESSED | (nsect << shift) | start
            }
        }
    }

    /// Send the header cluster and the L1 table (every L2 table's place is known).
    fn write_head(&mut self) -> Result<()> {
        let cs = self.p.cs;
        let mut cl = vec![0u8; cs as usize];
        let mut em = Emitter {
            file: &self.file,
            buf: Vec::with_capacity(BATCH + cs as usize),
            at: 0,
        };
        cl[..self.head.len()].copy_from_slice(&self.head);
        em.put(&cl, "qcow2 header")?;
        let per_cluster = cs / 8;
        let mut r = 0usize;
        for k in 0..self.l1_clusters {
            cl.fill(0);
            for j in 0..per_cluster {
                let i = k * per_cluster + j;
                if let Some(&(t, host)) = self.l2_tables.get(r).filter(|t| t.0 == i) {
                    debug_assert_eq!(t, i);
                    BigEndian::write_u64(&mut cl[(j * 8) as usize..], host | COPIED);
                    r += 1;
                }
            }
            em.put(&cl, "L1 table")?;
        }
        em.flush("L1 table")?;
        self.pos = em.at;
        self.head_written = true;
        Ok(())
    }

    /// Bring the output up to host offset `to` with zeros: planned clusters the engine
    /// did not write (none when the plan is exact). A fresh file gets a hole instead.
    fn zeros_to(&mut self, to: u64) -> Result<()> {
        if to <= self.pos {
            return Ok(());
        }
        zero_fill_at(&self.file, self.pos, to, "unwritten data clusters")?;
        self.pos = to;
        Ok(())
    }

    /// Record the L2 entry of guest cluster `g` in the table being filled.
    fn set_entry(&mut self, g: u64, place: Place) {
        let words = if self.p.extended_l2 { 2 } else { 1 };
        let at = ((g % self.shape.l2e) * words) as usize;
        self.table[at] = self.entry(place);
        if self.p.extended_l2 && matches!(place, Place::Raw(_)) {
            // Every subcluster allocated.
            self.table[at + 1] = 0xffff_ffff;
        }
    }

    /// Send the filled L2 table at `host` and start an empty one.
    fn send_table(&mut self, host: u64) -> Result<()> {
        self.zeros_to(host)?;
        let mut bytes = vec![0u8; self.p.cs as usize];
        BigEndian::write_u64_into(&self.table, &mut bytes);
        write_all_at(&self.file, &bytes, host, "L2 table")?;
        self.pos = host + self.p.cs;
        self.table.fill(0);
        Ok(())
    }

    /// Walk to guest cluster `g` and return its place, sending the L2 tables the walk
    /// passes and skipping planned clusters before `g` (plain ones are left as zeros; a
    /// skipped compressed one would leave an invalid stream behind, so it is an error).
    /// With None, walk to the end.
    fn place_for(&mut self, g: Option<u64>) -> Result<Place> {
        let target = g.unwrap_or(u64::MAX);
        if let Some(g) = g {
            if self.walk.peek(&self.runs).is_none_or(|n| n > g) {
                return Err(self.not_planned(g));
            }
        }
        loop {
            let Some(step) = self.walk.step(&self.shape, &self.runs, &self.encoded) else {
                return match g {
                    None => Ok(Place::Raw(0)),
                    Some(g) => Err(self.not_planned(g)),
                };
            };
            match step {
                Step::Table(_, host) => self.send_table(host)?,
                Step::Cluster(n, _) if n > target => return Err(self.not_planned(target)),
                Step::Cluster(n, place) => {
                    self.set_entry(n, place);
                    if n == target {
                        return Ok(place);
                    }
                    if let Place::Compressed(..) = place {
                        return Err(Error::arg(format!(
                            "qcow2 writer: the compressed cluster at guest offset {:#x} was \
                             planned but not written (did the source change between the two \
                             passes?)",
                            n * self.p.cs
                        )));
                    }
                }
            }
        }
    }

    fn not_planned(&self, g: u64) -> Error {
        Error::arg(format!(
            "qcow2 writer: guest offset {:#x} is not in the allocation plan (did the source \
             change between the planning pass and the conversion?)",
            g * self.p.cs
        ))
    }

    fn check_order(&mut self, offset: u64, len: usize) -> Result<()> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.p.size && offset >= self.written_to && offset.is_multiple_of(self.p.cs))
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

    /// Send the refcount blocks and the refcount table, the end of the file.
    fn write_refcounts(&mut self) -> Result<()> {
        let cs = self.p.cs;
        self.zeros_to(self.refblocks_at * cs)?;
        let mut cl = vec![0u8; cs as usize];
        let mut em = Emitter {
            file: &self.file,
            buf: Vec::with_capacity(BATCH + cs as usize),
            at: self.pos,
        };
        let mut run = 0usize;
        for b in 0..self.refblocks {
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
        let per_cluster = cs / 8;
        for k in 0..self.reftable_clusters {
            cl.fill(0);
            for j in 0..per_cluster {
                let i = k * per_cluster + j;
                if i < self.refblocks {
                    BigEndian::write_u64(&mut cl[(j * 8) as usize..], (self.refblocks_at + i) * cs);
                }
            }
            em.put(&cl, "refcount table")?;
        }
        em.flush("refcount table")?;
        self.pos = em.at;
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
        Some(self.total * self.p.cs)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_order(offset, data.len())?;
        let cs = self.p.cs as usize;
        // Consecutive plain clusters land on consecutive host clusters: one write each run.
        let mut piece: Option<(u64, usize, usize)> = None; // (host, from, to)
        let mut done = 0usize;
        while done < data.len() {
            let g = (offset + done as u64) / self.p.cs;
            let n = cs.min(data.len() - done);
            // A table due before this cluster goes out first: send what is pending.
            let table_due = self.walk.group.is_some_and(|c| c != g / self.shape.l2e);
            if table_due {
                if let Some((ph, a, b)) = piece.take() {
                    self.send(ph, &data[a..b], "guest data")?;
                }
            }
            let h = match self.place_for(Some(g))? {
                Place::Raw(h) => h,
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
                        self.send(ph, &data[a..b], "guest data")?;
                    }
                    Some((h, done, done + n))
                }
            };
            done += n;
        }
        if let Some((ph, a, b)) = piece {
            self.send(ph, &data[a..b], "guest data")?;
        }
        Ok(())
    }

    fn write_encoded(&mut self, offset: u64, data: &[u8], encoded: Vec<u8>) -> Result<()> {
        self.check_order(offset, data.len())?;
        let g = offset / self.p.cs;
        match self.place_for(Some(g))? {
            Place::Compressed(start, n) if n == encoded.len() as u64 => {
                self.send(start, &encoded, "compressed cluster")
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
        self.write_refcounts()?;
        let total = self.total * self.p.cs;
        debug_assert_eq!(self.pos, total);
        self.file
            .set_len(total)
            .map_err(|e| Error::io("setting output length", e))
    }
}

impl Qcow2StreamWriter {
    /// Write `data` at host byte `host`, at or past what was sent.
    fn send(&mut self, host: u64, data: &[u8], what: &str) -> Result<()> {
        if host < self.pos {
            return Err(Error::arg(format!(
                "qcow2 writer: {what} for host offset {host:#x} comes after {:#x} was sent",
                self.pos
            )));
        }
        self.zeros_to(host)?;
        write_all_at(&self.file, data, host, what)?;
        self.pos = host + data.len() as u64;
        Ok(())
    }
}
