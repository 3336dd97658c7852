//! Writing a dynamic VHD strictly forward (for a pipe, a character device, or an HTTP body
//! whose length must be known up front), from an [`AllocationPlan`] made at the block size
//! before the first byte.
//!
//! Layout, in ascending file order: the footer copy, the dynamic header, the BAT, then one
//! block (sector bitmap, data) for every block a planned range touches, in guest order,
//! then the footer. The BAT follows from the plan alone, so the file's length is known
//! before anything is written. Each bitmap is sent before its block's data is known, so
//! every bit is set (as qemu's vpc driver does when it allocates a block): the sectors the
//! engine leaves out of a planned block are sent as zeros and read as zeros through the
//! bitmap too (diskconv honours sector bitmaps; qemu ignores them for non-differencing
//! disks). The file writer marks every sector of its blocks present too, and a fresh file
//! has holes where the stream sends zeros, so both give the same bytes.

use super::dynheader;
use super::footer::{DiskType, FOOTER_SIZE};
use super::writer::{
    bat_bytes, dyn_header_bytes, first_block_offset, make_footer, plan, BAT_OFFSET,
};
use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::writer::{write_all_at, AllocationPlan, ImageWriter, Sink};

/// The sequential dynamic VHD writer.
#[derive(Debug)]
pub struct VhdStreamWriter {
    file: Sink,
    size: u64,
    block_size: u64,
    bitmap_size: u64,
    /// Host sector of every planned block, `u32::MAX` for the others.
    bat: Vec<u32>,
    /// File offset of the footer: the end of the last block.
    end: u64,
    head_written: bool,
    /// Guest blocks below this have had their bitmaps sent.
    bitmaps_to: usize,
    /// Guest end of the last write (writes must ascend).
    written_to: u64,
    notes: Vec<String>,
}

/// The granule the plan for a dynamic VHD must use (its block size); None for a fixed
/// VHD, which streams without a plan.
pub fn plan_granularity(opts: &CreateOptions) -> Result<Option<u64>> {
    let p = plan(opts)?;
    Ok((!p.fixed).then_some(p.block_size))
}

/// Make a sequential dynamic VHD writer over `file` that accepts the writes of `plan`
/// (made with [`crate::convert::plan_allocation`] at the block size).
pub fn create_stream_writer(
    file: Sink,
    opts: &CreateOptions,
    plan_: &AllocationPlan,
) -> Result<VhdStreamWriter> {
    let p = plan(opts)?;
    if p.fixed {
        return Err(Error::arg(
            "the planned VHD writer is for subformat=dynamic; a fixed VHD streams without a plan",
        ));
    }
    let bs = p.block_size;
    if plan_.granularity != bs {
        return Err(Error::arg(format!(
            "the allocation plan was made for {}-byte granules but the VHD block size is {bs}; \
             plan with the block size",
            plan_.granularity
        )));
    }
    let entries = p.size.div_ceil(bs) as usize;
    let bitmap_size = dynheader::bitmap_size(bs as u32);
    let mut bat = vec![u32::MAX; entries];
    let mut next = first_block_offset(entries, bitmap_size);
    for &(a, b) in &plan_.ranges {
        let (a, b) = (a / bs, b.min(p.size).div_ceil(bs).min(entries as u64));
        for blk in a..b {
            let slot = &mut bat[blk as usize];
            if *slot != u32::MAX {
                continue;
            }
            *slot = u32::try_from(next / 512)
                .ok()
                .filter(|&s| s != u32::MAX)
                .ok_or_else(|| Error::limit("VHD grew past the 2 TiB a BAT entry can address"))?;
            next += bitmap_size + bs;
        }
    }
    Ok(VhdStreamWriter {
        file,
        size: p.size,
        block_size: bs,
        bitmap_size,
        bat,
        end: next,
        head_written: false,
        bitmaps_to: 0,
        written_to: 0,
        notes: p.notes,
    })
}

impl VhdStreamWriter {
    fn write_head(&mut self) -> Result<()> {
        let footer = make_footer(self.size, DiskType::Dynamic).to_bytes();
        write_all_at(&self.file, &footer, 0, "VHD footer copy")?;
        let header = dyn_header_bytes(self.bat.len(), self.block_size);
        write_all_at(
            &self.file,
            &header,
            FOOTER_SIZE as u64,
            "VHD dynamic header",
        )?;
        write_all_at(&self.file, &bat_bytes(&self.bat), BAT_OFFSET, "VHD BAT")?;
        self.head_written = true;
        Ok(())
    }

    /// Send the bitmaps of the planned blocks below `to` not sent yet (a planned block the
    /// engine skips still gets its bitmap; its data follows as zeros).
    fn bitmaps_below(&mut self, to: usize) -> Result<()> {
        let bitmap = vec![0xffu8; self.bitmap_size as usize];
        while self.bitmaps_to < to {
            let slot = self.bat[self.bitmaps_to];
            if slot != u32::MAX {
                write_all_at(&self.file, &bitmap, slot as u64 * 512, "VHD block bitmap")?;
            }
            self.bitmaps_to += 1;
        }
        Ok(())
    }
}

impl ImageWriter for VhdStreamWriter {
    fn granularity(&self) -> u64 {
        512
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn warnings(&self) -> Vec<String> {
        self.notes.clone()
    }
    fn streams(&self) -> bool {
        true
    }
    fn output_len(&self) -> Option<u64> {
        Some(self.end + FOOTER_SIZE as u64)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size && offset >= self.written_to)
            .ok_or_else(|| {
                Error::arg(format!(
                    "VHD writer: write of {} bytes at {offset:#x} is out of order or past the virtual size {}",
                    data.len(),
                    self.size
                ))
            })?;
        self.written_to = end;
        if !self.head_written {
            self.write_head()?;
        }
        let bs = self.block_size;
        let mut off = offset;
        while off < end {
            let blk = (off / bs) as usize;
            let in_block = off % bs;
            let n = (bs - in_block).min(end - off);
            let slot = self.bat[blk];
            if slot == u32::MAX {
                return Err(Error::arg(format!(
                    "VHD writer: guest offset {off:#x} is not in the allocation plan (did the \
                     source change between the planning pass and the conversion?)"
                )));
            }
            self.bitmaps_below(blk + 1)?;
            let host = slot as u64 * 512 + self.bitmap_size + in_block;
            let a = (off - offset) as usize;
            write_all_at(&self.file, &data[a..a + n as usize], host, "guest data")?;
            off += n;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        if !self.head_written {
            self.write_head()?;
        }
        self.bitmaps_below(self.bat.len())?;
        let footer = make_footer(self.size, DiskType::Dynamic).to_bytes();
        // The unwritten tail of the last block comes before the footer: zeros on a
        // stream, a hole in a fresh file.
        write_all_at(&self.file, &footer, self.end, "VHD footer")
    }
}
