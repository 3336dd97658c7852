//! Writing monolithicSparse VMDK strictly forward (a pipe, a character device, an HTTP
//! body whose length must be known up front), from an [`AllocationPlan`] made at the
//! grain size before the first byte.
//!
//! The layout is the file writer's ([`super::writer`]): header, embedded descriptor,
//! redundant grain directory and tables, grain directory and tables, then one grain for
//! every planned grain in guest order. The file writer appends grains in the order they
//! arrive, which is guest order, so from the plan every grain table is known before any
//! data and both writers give the same bytes; the file's length is known too. A stream
//! cannot leave holes, so planned grains the engine does not write and the tail of a
//! partial last grain are sent as zeros (a fresh file gets holes, which read the same).

use byteorder::{ByteOrder, LittleEndian as LE};

use super::sparse::{GTES_PER_GT, SECTOR};
use super::writer::{sparse_header, Layout, Subformat, VmdkOptions, DESC_SECTORS, GRAIN_SECTORS};
use crate::error::{Error, Result};
use crate::writer::{write_all_at, zero_fill_at, AllocationPlan, ImageWriter, Sink};

/// Metadata is sent in pieces of about this size, so memory stays bounded whatever the
/// size of the grain tables (64 MiB for a 2 TiB disk).
const BATCH: usize = 1 << 20;

/// The granule a plan for a monolithicSparse output must use: the grain size.
pub fn plan_granularity() -> u64 {
    GRAIN_SECTORS * SECTOR
}

/// The sequential monolithicSparse writer.
#[derive(Debug)]
pub struct PlannedSparseWriter {
    file: Sink,
    opts: VmdkOptions,
    layout: Layout,
    desc: String,
    /// Planned grains as runs `[first, end)`, ascending and disjoint.
    runs: Vec<(u64, u64)>,
    /// Grains planned in all.
    grains: u64,
    head_written: bool,
    /// Index of the run the last write fell in, and the grains planned before it.
    cursor: (usize, u64),
    /// Host end of what was sent so far.
    pos: u64,
    /// Guest end of the last write (writes must ascend).
    written_to: u64,
}

/// Make a sequential monolithicSparse writer over `file` that accepts the writes of
/// `plan` (made at [`plan_granularity`]); `opts` are the parsed create options.
pub fn create(file: Sink, opts: VmdkOptions, plan: &AllocationPlan) -> Result<PlannedSparseWriter> {
    if opts.subformat != Subformat::MonolithicSparse {
        return Err(Error::arg(
            "the planned VMDK writer is for subformat=monolithicSparse; streamOptimized streams without a plan",
        ));
    }
    let grain = plan_granularity();
    if plan.granularity != grain {
        return Err(Error::arg(format!(
            "the allocation plan was made for {}-byte granules but the VMDK grain is {grain}; \
             plan with the grain size",
            plan.granularity
        )));
    }
    let layout = Layout::new(opts.capacity);
    let size = opts.capacity * SECTOR;
    let total_grains = size.div_ceil(grain);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &(a, b) in &plan.ranges {
        let (a, b) = (a / grain, b.min(size).div_ceil(grain).min(total_grains));
        if a >= b {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => runs.push((a, b)),
        }
    }
    let grains: u64 = runs.iter().map(|r| r.1 - r.0).sum();
    if layout.grain_offset + grains * GRAIN_SECTORS > u64::from(u32::MAX) {
        return Err(Error::limit(
            "monolithicSparse VMDK cannot hold more than 2 TiB of allocated data",
        ));
    }
    let desc = opts.descriptor("monolithicSparse", &opts.extent_name);
    if desc.len() as u64 > DESC_SECTORS * SECTOR {
        return Err(Error::arg("descriptor does not fit in 20 sectors"));
    }
    Ok(PlannedSparseWriter {
        file,
        opts,
        layout,
        desc,
        runs,
        grains,
        head_written: false,
        cursor: (0, 0),
        pos: 0,
        written_to: 0,
    })
}

impl PlannedSparseWriter {
    fn total(&self) -> u64 {
        (self.layout.grain_offset + self.grains * GRAIN_SECTORS) * SECTOR
    }

    /// Send everything before the first grain: header, descriptor, both grain directories
    /// and their tables (each table entry is the sector of its grain's slot).
    fn write_head(&mut self) -> Result<()> {
        let l = self.layout;
        let mut buf: Vec<u8> = Vec::with_capacity(BATCH + 4096);
        let mut at = 0u64;
        let file = &self.file;
        let flush = |buf: &mut Vec<u8>, at: &mut u64, what: &str| -> Result<()> {
            write_all_at(file, buf, *at, what)?;
            *at += buf.len() as u64;
            buf.clear();
            Ok(())
        };
        buf.extend_from_slice(&sparse_header(&self.opts, &l).to_bytes());
        let mut desc = self.desc.as_bytes().to_vec();
        desc.resize((DESC_SECTORS * SECTOR) as usize, 0);
        buf.extend_from_slice(&desc);
        flush(&mut buf, &mut at, "VMDK header and descriptor")?;
        let per_gt = u64::from(GTES_PER_GT);
        for red in [true, false] {
            let base = if red { l.rgd } else { l.gd };
            debug_assert_eq!(at, base * SECTOR);
            for i in 0..l.gt_count {
                let mut e = [0u8; 4];
                LE::write_u32(&mut e, l.gt_sector(i, red) as u32);
                buf.extend_from_slice(&e);
            }
            buf.resize((l.gd_sectors * SECTOR) as usize, 0);
            flush(&mut buf, &mut at, "grain directory")?;
            // Walk the planned grains once per copy, table by table.
            let (mut run, mut slot) = (0usize, 0u64);
            let mut gt = vec![0u32; GTES_PER_GT as usize];
            let mut bytes = vec![0u8; gt.len() * 4];
            for i in 0..l.gt_count {
                gt.fill(0);
                let (lo, hi) = (i * per_gt, (i + 1) * per_gt);
                while let Some(&(a, b)) = self.runs.get(run) {
                    if a >= hi {
                        break;
                    }
                    let (s, e) = (a.max(lo), b.min(hi));
                    for g in s..e {
                        let sector = l.grain_offset + (slot + g - a) * GRAIN_SECTORS;
                        gt[(g - lo) as usize] = sector as u32;
                    }
                    if b > hi {
                        break;
                    }
                    slot += b - a;
                    run += 1;
                }
                LE::write_u32_into(&gt, &mut bytes);
                buf.extend_from_slice(&bytes);
                if buf.len() >= BATCH {
                    flush(&mut buf, &mut at, "grain table")?;
                }
            }
            flush(&mut buf, &mut at, "grain table")?;
        }
        self.pos = at;
        self.zeros_to(l.grain_offset * SECTOR)?;
        self.head_written = true;
        Ok(())
    }

    /// Bring the output up to host offset `to` with zeros (on a fresh file, a hole).
    fn zeros_to(&mut self, to: u64) -> Result<()> {
        if to <= self.pos {
            return Ok(());
        }
        zero_fill_at(&self.file, self.pos, to, "unwritten VMDK grains")?;
        self.pos = to;
        Ok(())
    }

    /// The slot (grains before it in host order) of planned grain `g`, moving the cursor
    /// forward; an error for a grain the plan does not hold.
    fn slot_of(&mut self, g: u64) -> Result<u64> {
        let (mut run, mut before) = self.cursor;
        while let Some(&(a, b)) = self.runs.get(run) {
            if g < a {
                break;
            }
            if g < b {
                self.cursor = (run, before);
                return Ok(before + g - a);
            }
            before += b - a;
            run += 1;
        }
        Err(Error::arg(format!(
            "VMDK writer: guest offset {:#x} is not in the allocation plan (did the source \
             change between the planning pass and the conversion?)",
            g * plan_granularity()
        )))
    }
}

impl ImageWriter for PlannedSparseWriter {
    fn granularity(&self) -> u64 {
        plan_granularity()
    }

    fn virtual_size(&self) -> u64 {
        self.opts.capacity * SECTOR
    }

    fn warnings(&self) -> Vec<String> {
        if self.opts.uncompressed_c {
            vec![
                "-c has no effect on subformat monolithicSparse: like qemu-img, only streamOptimized grains are compressed".to_string(),
            ]
        } else {
            Vec::new()
        }
    }

    fn streams(&self) -> bool {
        true
    }

    fn output_len(&self) -> Option<u64> {
        Some(self.total())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let grain = plan_granularity();
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| {
                e <= self.virtual_size()
                    && offset >= self.written_to
                    && offset.is_multiple_of(grain)
            })
            .ok_or_else(|| {
                Error::arg(format!(
                    "VMDK writer: write of {} bytes at {offset:#x} is out of order, not \
                     grain-aligned or past the end",
                    data.len()
                ))
            })?;
        if !self.head_written {
            self.write_head()?;
        }
        // Grains of one planned run have consecutive slots: one host write per run.
        let mut done = 0usize;
        while done < data.len() {
            let g = (offset + done as u64) / grain;
            let slot = self.slot_of(g)?;
            let (_, b) = self.runs[self.cursor.0];
            let n = ((b - g) * grain).min((data.len() - done) as u64) as usize;
            let host = (self.layout.grain_offset + slot * GRAIN_SECTORS) * SECTOR;
            self.zeros_to(host)?;
            write_all_at(&self.file, &data[done..done + n], host, "grain data")?;
            self.pos = host + n as u64;
            done += n;
        }
        self.written_to = end.next_multiple_of(grain);
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if !self.head_written {
            self.write_head()?;
        }
        let total = self.total();
        self.zeros_to(total)?;
        self.file
            .set_len(total)
            .map_err(|e| Error::io("setting output length", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::HostFile;
    use crate::options::CreateOptions;

    fn plan(ranges: &[(u64, u64)], size: u64) -> AllocationPlan {
        let mut p = AllocationPlan {
            granularity: plan_granularity(),
            virtual_size: size,
            ..AllocationPlan::default()
        };
        for &(a, b) in ranges {
            p.push(a, b);
        }
        p
    }

    #[test]
    fn planned_grains_get_slots_in_guest_order_and_match_the_file_writer() {
        let dir = tempfile::tempdir().unwrap();
        let k64 = 64u64 << 10;
        // Two grain tables (512 grains each), a partial last grain.
        let size = 600 * k64 + 1024;
        let o = CreateOptions::new(size);
        let writes: &[(u64, u64)] = &[(k64, 3 * k64), (510 * k64, 513 * k64), (599 * k64, size)];
        let data = |a: u64, b: u64| -> Vec<u8> { (a..b).map(|i| (i / 512 % 251) as u8).collect() };
        let mut outs = Vec::new();
        for planned in [false, true] {
            let p = dir.path().join(format!("o{planned}.vmdk"));
            let f = std::fs::File::create(&p).unwrap();
            let vo = VmdkOptions::parse(&o, &p).unwrap();
            let mut w: Box<dyn ImageWriter> = if planned {
                Box::new(create(f.into(), vo, &plan(writes, size)).unwrap())
            } else {
                Box::new(super::super::writer::SparseWriter::new(f.into(), vo).unwrap())
            };
            let predicted = w.output_len();
            for &(a, b) in writes {
                w.write(a, &data(a, b)).unwrap();
            }
            if planned {
                assert!(w.write(0, &[1; 512]).is_err(), "backwards");
            }
            w.finish().unwrap();
            let bytes = std::fs::read(&p).unwrap();
            if planned {
                assert_eq!(predicted, Some(bytes.len() as u64));
            }
            let img = super::super::reader::open(HostFile::open(&p).unwrap(), &Default::default())
                .unwrap();
            let mut b = vec![0u8; 4];
            img.read_at(&mut b, 3 * k64 - 2).unwrap();
            assert_eq!(b[..2], data(3 * k64 - 2, 3 * k64)[..]);
            assert_eq!(b[2..], [0, 0]);
            img.read_at(&mut b, size - 4).unwrap();
            assert_eq!(b, data(size - 4, size));
            outs.push(bytes);
        }
        // Same bytes but the descriptor's fresh CID.
        let desc = (SECTOR as usize)..((1 + DESC_SECTORS) * SECTOR) as usize;
        assert_eq!(outs[0].len(), outs[1].len());
        assert_eq!(outs[0][..desc.start], outs[1][..desc.start]);
        assert_eq!(outs[0][desc.end..], outs[1][desc.end..]);
    }

    #[test]
    fn writes_outside_the_plan_and_wrong_granules_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.vmdk");
        let o = CreateOptions::new(4 << 20);
        let vo = VmdkOptions::parse(&o, &p).unwrap();
        let f = std::fs::File::create(&p).unwrap();
        let mut w = create(f.into(), vo.clone(), &plan(&[(0, 1 << 16)], 4 << 20)).unwrap();
        let e = w.write(1 << 20, &[1; 1 << 16]).unwrap_err();
        assert!(e.to_string().contains("not in the allocation plan"), "{e}");
        let wrong = AllocationPlan {
            granularity: 1 << 20,
            ..plan(&[], 4 << 20)
        };
        let f = std::fs::File::create(&p).unwrap();
        assert!(create(f.into(), vo, &wrong).is_err());
    }
}
