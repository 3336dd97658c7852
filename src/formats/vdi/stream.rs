//! Writing VDI strictly forward (a pipe, a character device, an HTTP body whose length
//! must be known up front), from an [`AllocationPlan`] made at the block size before the
//! first byte.
//!
//! The layout is the file writer's: header, block map, then the data blocks. Dynamic, a
//! block gets a slot when a planned range touches it, in guest order, which is the order
//! the file writer appends blocks in, so both give the same bytes; static, every block is
//! mapped to itself. The map is therefore known before any data, and the file's length
//! too. A stream cannot leave holes, so the parts of an allocated block the engine does
//! not write (zeros under `-S`, the tail of a partial last block) are sent as zeros.

use super::header::{ImageType, VdiHeader, BLOCK_UNALLOCATED};
use super::writer::new_header;
use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::writer::{write_all_at, zero_fill_at, AllocationPlan, ImageWriter, Sink};

/// The sequential VDI writer.
pub struct VdiStreamWriter {
    file: Sink,
    header: VdiHeader,
    size: u64,
    bmap: Vec<u32>,
    head_written: bool,
    /// Host end of what was sent so far.
    pos: u64,
    /// Guest end of the last write (writes must ascend).
    written_to: u64,
}

/// Make a sequential VDI writer over `file` that accepts the writes of `plan` (made at
/// [`plan_granularity`], the block size).
pub fn create_stream_writer(
    file: Sink,
    opts: &CreateOptions,
    plan: &AllocationPlan,
) -> Result<VdiStreamWriter> {
    if opts.compress {
        return Err(Error::unsupported("vdi images cannot be compressed"));
    }
    let fixed = opts.bool_option("static")?.unwrap_or(false);
    let (size, mut header) = new_header(opts.size, fixed)?;
    let bs = u64::from(header.block_size);
    if plan.granularity != bs {
        return Err(Error::arg(format!(
            "the allocation plan was made for {}-byte granules but the VDI block size is {bs}; \
             plan with the block size",
            plan.granularity
        )));
    }
    let blocks = u64::from(header.blocks_in_image);
    let bmap = if header.image_type == ImageType::Static {
        (0..header.blocks_in_image).collect()
    } else {
        let mut bmap = vec![BLOCK_UNALLOCATED; blocks as usize];
        let mut next = 0u32;
        for &(a, b) in &plan.ranges {
            let (a, b) = (a / bs, b.min(size).div_ceil(bs).min(blocks));
            for e in &mut bmap[a.min(b) as usize..b as usize] {
                if *e == BLOCK_UNALLOCATED {
                    *e = next;
                    next += 1;
                }
            }
        }
        header.blocks_allocated = next;
        bmap
    };
    Ok(VdiStreamWriter {
        file,
        header,
        size,
        bmap,
        head_written: false,
        pos: 0,
        written_to: 0,
    })
}

/// The granule a plan for a VDI output must use: the block size.
pub fn plan_granularity() -> u64 {
    u64::from(super::header::DEFAULT_BLOCK_SIZE)
}

impl VdiStreamWriter {
    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    fn total(&self) -> u64 {
        u64::from(self.header.offset_data)
            + u64::from(self.header.blocks_allocated) * self.block_size()
    }

    /// Send the header and the block map (padded to whole sectors), in pieces of about
    /// 1 MiB so memory stays bounded whatever the map's size.
    fn write_head(&mut self) -> Result<()> {
        let h = &self.header;
        write_all_at(&self.file, &h.to_bytes(), 0, "VDI header")?;
        let mut at = u64::from(h.offset_bmap);
        let end = u64::from(h.offset_data);
        let mut chunk = Vec::with_capacity(1 << 20);
        for part in self.bmap.chunks(1 << 18) {
            chunk.clear();
            for e in part {
                chunk.extend_from_slice(&e.to_le_bytes());
            }
            write_all_at(&self.file, &chunk, at, "VDI block map")?;
            at += chunk.len() as u64;
        }
        if at < end {
            let pad = vec![0u8; (end - at) as usize];
            write_all_at(&self.file, &pad, at, "VDI block map")?;
        }
        self.pos = end;
        self.head_written = true;
        Ok(())
    }

    /// Bring the output up to host offset `to` with zeros (on a fresh file, a hole).
    fn zeros_to(&mut self, to: u64) -> Result<()> {
        if to <= self.pos {
            return Ok(());
        }
        zero_fill_at(&self.file, self.pos, to, "unwritten VDI data")?;
        self.pos = to;
        Ok(())
    }
}

impl ImageWriter for VdiStreamWriter {
    fn granularity(&self) -> u64 {
        self.block_size()
    }

    fn virtual_size(&self) -> u64 {
        self.size
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
        let bs = self.block_size();
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size && offset >= self.written_to && offset.is_multiple_of(bs))
            .ok_or_else(|| {
                Error::arg(format!(
                    "VDI writer: write of {} bytes at {offset:#x} is out of order, not aligned \
                     to {bs} or past the size {}",
                    data.len(),
                    self.size
                ))
            })?;
        if !self.head_written {
            self.write_head()?;
        }
        let data_start = u64::from(self.header.offset_data);
        let first = offset / bs;
        // Blocks of one write have consecutive slots when the plan covers them, so the
        // whole run usually goes out in a single write.
        let mut run: Option<(u64, usize, usize)> = None; // (host, from, to)
        for g in first..end.div_ceil(bs) {
            let k = (g - first) as usize;
            let slot = self.bmap[g as usize];
            if slot == BLOCK_UNALLOCATED {
                return Err(Error::arg(format!(
                    "VDI writer: guest offset {:#x} is not in the allocation plan (did the \
                     source change between the planning pass and the conversion?)",
                    g * bs
                )));
            }
            let host = data_start + u64::from(slot) * bs;
            let a = k * bs as usize;
            let b = (a + bs as usize).min(data.len());
            run = match run {
                Some((h, from, to)) if h + (to - from) as u64 == host => Some((h, from, b)),
                other => {
                    if let Some((h, from, to)) = other {
                        self.send(h, &data[from..to])?;
                    }
                    Some((host, a, b))
                }
            };
        }
        if let Some((h, from, to)) = run {
            self.send(h, &data[from..to])?;
        }
        self.written_to = end.next_multiple_of(bs);
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
            .map_err(|e| Error::io("setting VDI file length", e))
    }
}

impl VdiStreamWriter {
    fn send(&mut self, host: u64, data: &[u8]) -> Result<()> {
        if host < self.pos {
            return Err(Error::arg(format!(
                "VDI writer: data for host offset {host:#x} comes after {:#x} was sent",
                self.pos
            )));
        }
        self.zeros_to(host)?;
        write_all_at(&self.file, data, host, "VDI data")?;
        self.pos = host + data.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, HostFile};
    use std::fs::File;

    fn plan(ranges: &[(u64, u64)], size: u64) -> AllocationPlan {
        let mut p = AllocationPlan {
            granularity: 1 << 20,
            virtual_size: size,
            ranges: Vec::new(),
            bytes: 0,
            encoded: Vec::new(),
        };
        for &(a, b) in ranges {
            p.push(a, b);
        }
        p
    }

    fn opts(size: u64, fixed: bool) -> CreateOptions {
        let o = CreateOptions::new(size);
        if fixed {
            o.option("static", "on")
        } else {
            o
        }
    }

    #[test]
    fn dynamic_maps_planned_blocks_in_guest_order_and_zero_fills_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.vdi");
        let mib = 1u64 << 20;
        let size = 5 * mib + 1000;
        let f = File::create(&p).unwrap();
        let pl = plan(&[(mib, 3 * mib), (4 * mib, size)], size);
        let mut w = Box::new(create_stream_writer(f.into(), &opts(size, false), &pl).unwrap());
        assert_eq!(w.output_len(), Some(0x400 + 4 * mib));
        // Only part of the first planned block is written: the rest must read as zeros.
        w.write(2 * mib, &vec![7u8; mib as usize]).unwrap();
        w.write(4 * mib, &vec![9u8; (mib + 1024) as usize]).unwrap();
        assert!(w.write(0, &[1; 512]).is_err());
        let len = w.output_len().unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
        let img = super::super::reader::VdiImage::open(HostFile::open(&p).unwrap()).unwrap();
        assert_eq!(img.header().blocks_allocated, 4);
        let mut b = vec![1u8; 4];
        img.read_at(&mut b, 2 * mib - 2).unwrap();
        assert_eq!(b, [0, 0, 7, 7]);
        img.read_at(&mut b, 4 * mib - 2).unwrap();
        assert_eq!(b, [0, 0, 9, 9]);
        img.read_at(&mut b, 5 * mib + 1020).unwrap();
        assert_eq!(b, [9, 9, 9, 9]);
    }

    #[test]
    fn writes_outside_the_plan_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("b.vdi")).unwrap();
        let mib = 1u64 << 20;
        let pl = plan(&[(mib, 2 * mib)], 4 * mib);
        let mut w = create_stream_writer(f.into(), &opts(4 * mib, false), &pl).unwrap();
        let e = w.write(2 * mib, &[1; 1 << 20]).unwrap_err();
        assert!(e.to_string().contains("not in the allocation plan"), "{e}");
        let wrong = AllocationPlan {
            granularity: 65536,
            ..pl
        };
        let f = File::create(dir.path().join("c.vdi")).unwrap();
        assert!(create_stream_writer(f.into(), &opts(4 * mib, false), &wrong).is_err());
    }

    #[test]
    fn static_maps_every_block_and_has_the_full_length() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("s.vdi")).unwrap();
        let mib = 1u64 << 20;
        let w = create_stream_writer(f.into(), &opts(3 * mib, true), &plan(&[], 3 * mib)).unwrap();
        assert_eq!(w.bmap, vec![0, 1, 2]);
        assert_eq!(w.output_len(), Some(0x400 + 3 * mib));
    }
}
