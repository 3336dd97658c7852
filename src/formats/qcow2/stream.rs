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
//! Compressed output is refused: its table offsets depend on the compressed sizes.

use byteorder::{BigEndian, ByteOrder};

use super::header::MAX_REFTABLE_BYTES;
use super::reader::COPIED;
use super::writer::{header_bytes, parse_options, Params};
use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::writer::{write_all_at, AllocationPlan, ImageWriter, Sink};

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

/// The sequential qcow2 writer.
pub struct Qcow2StreamWriter {
    file: Sink,
    p: Params,
    lay: Layout,
    /// Planned guest clusters as runs (first guest cluster, end, host cluster of the first).
    runs: Vec<(u64, u64, u64)>,
    /// L1 indices that have an L2 table, ascending.
    l2_tables: Vec<u64>,
    /// The header cluster's bytes, built up front so that a bad header fails before any
    /// byte is sent.
    head: Vec<u8>,
    head_written: bool,
    /// Index into `runs` of the run the last write fell in.
    cursor: usize,
    /// Host end of what was written so far.
    pos: u64,
    /// Guest end of the last write (writes must ascend).
    written_to: u64,
}

/// Make a sequential qcow2 writer over `file` that will accept exactly the writes of
/// `plan` (made with [`crate::convert::plan_allocation`] at the cluster size).
pub fn create_stream_writer(
    file: Sink,
    opts: &CreateOptions,
    plan: &AllocationPlan,
) -> Result<Qcow2StreamWriter> {
    let p = parse_options(opts)?;
    if p.compress {
        return Err(Error::unsupported(
            "compressed qcow2 cannot be written sequentially (its tables depend on the \
             compressed sizes); write it to a regular file, or leave out -c",
        ));
    }
    let cs = p.cs;
    if plan.granularity != cs {
        return Err(Error::arg(format!(
            "the allocation plan was made for {}-byte granules but the qcow2 cluster size is \
             {cs}; plan with the cluster size",
            plan.granularity
        )));
    }
    let guest_clusters = p.size.div_ceil(cs);
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    let mut data = 0u64;
    for &(a, b) in &plan.ranges {
        let (a, b) = (a / cs, b.min(p.size).div_ceil(cs).min(guest_clusters));
        if a >= b {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.1 >= a => {
                data += b.saturating_sub(last.1);
                last.1 = last.1.max(b);
            }
            _ => {
                runs.push((a, b, data));
                data += b - a;
            }
        }
    }
    let mut l2_tables: Vec<u64> = Vec::new();
    for &(a, b, _) in &runs {
        for i in a / p.l2_entries..=(b - 1) / p.l2_entries {
            if l2_tables.last() != Some(&i) {
                l2_tables.push(i);
            }
        }
    }
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
    for r in &mut runs {
        r.2 += data_start;
    }
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
    Ok(Qcow2StreamWriter {
        file,
        p,
        lay,
        runs,
        l2_tables,
        head,
        head_written: false,
        cursor: 0,
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

/// Set the first `n` refcounts of the block `out` (entries `bits` wide) to 1.
fn fill_ones(out: &mut [u8], n: u64, bits: u64) {
    out.fill(0);
    for i in 0..n {
        match bits {
            64 => BigEndian::write_u64(&mut out[(i * 8) as usize..], 1),
            32 => BigEndian::write_u32(&mut out[(i * 4) as usize..], 1),
            16 => BigEndian::write_u16(&mut out[(i * 2) as usize..], 1),
            8 => out[i as usize] = 1,
            _ => {
                let bit = i * bits;
                out[(bit / 8) as usize] |= 1 << (bit % 8);
            }
        }
    }
}

impl Qcow2StreamWriter {
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

        // Refcount blocks: every cluster of the file has refcount 1.
        let bits = 1u64 << self.p.refcount_order;
        let per_block = (cs * 8) / bits;
        let mut full = vec![0u8; cs as usize];
        fill_ones(&mut full, per_block, bits);
        for b in 0..lay.refblocks {
            let n = lay.total.saturating_sub(b * per_block).min(per_block);
            if n == per_block {
                em.put(&full, "refcount blocks")?;
            } else {
                fill_ones(&mut cl, n, bits);
                em.put(&cl, "refcount blocks")?;
            }
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
        let mut run = 0usize;
        for &i in &self.l2_tables {
            cl.fill(0);
            let (lo, hi) = (i * l2e, (i + 1) * l2e);
            while run < self.runs.len() && self.runs[run].1 <= lo {
                run += 1;
            }
            let mut k = run;
            while k < self.runs.len() && self.runs[k].0 < hi {
                let (a, b, host) = self.runs[k];
                for g in a.max(lo)..b.min(hi) {
                    let at = ((g - lo) * words * 8) as usize;
                    let entry = ((host + g - a) * cs) | COPIED;
                    BigEndian::write_u64(&mut cl[at..], entry);
                    if self.p.extended_l2 {
                        // Every subcluster allocated.
                        BigEndian::write_u64(&mut cl[at + 8..], 0xffff_ffff);
                    }
                }
                k += 1;
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
}

impl ImageWriter for Qcow2StreamWriter {
    fn granularity(&self) -> u64 {
        self.p.cs
    }

    fn virtual_size(&self) -> u64 {
        self.p.size
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
        let cs = self.p.cs;
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.p.size && offset >= self.written_to && offset % cs == 0)
            .ok_or_else(|| {
                Error::arg(format!(
                    "qcow2 writer: write of {} bytes at {offset:#x} is out of order, unaligned or past the virtual size",
                    data.len()
                ))
            })?;
        self.written_to = end;
        if !self.head_written {
            self.write_head()?;
        }
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let g = at / cs;
            while self.cursor < self.runs.len() && self.runs[self.cursor].1 <= g {
                self.cursor += 1;
            }
            let Some(&(a, b, host)) = self.runs.get(self.cursor).filter(|r| r.0 <= g) else {
                return Err(Error::arg(format!(
                    "qcow2 writer: guest offset {at:#x} is not in the allocation plan (did the \
                     source change between the planning pass and the conversion?)"
                )));
            };
            let n = ((b - g) * cs).min((data.len() - done) as u64) as usize;
            let h = (host + g - a) * cs;
            self.zeros_to(h)?;
            write_all_at(&self.file, &data[done..done + n], h, "guest data")?;
            self.pos = h + n as u64;
            done += n;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if !self.head_written {
            self.write_head()?;
        }
        let total = self.lay.total * self.p.cs;
        self.zeros_to(total)?;
        self.file
            .set_len(total)
            .map_err(|e| Error::io("setting output length", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_ones_at_every_width() {
        let mut b = vec![0u8; 16];
        fill_ones(&mut b, 3, 1);
        assert_eq!(b[0], 0b111);
        fill_ones(&mut b, 2, 4);
        assert_eq!(b[0], 0x11);
        fill_ones(&mut b, 2, 16);
        assert_eq!(&b[..4], &[0, 1, 0, 1]);
        fill_ones(&mut b, 1, 64);
        assert_eq!(&b[..8], &[0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(b[8..].iter().all(|&x| x == 0));
    }
}
