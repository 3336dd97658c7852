//! Writing fixed and dynamic VHDs at the exact size asked.
//!
//! qemu-img rounds a VHD's size up to a CHS geometry unless told `force_size`; we always
//! keep the size: the creator application is "qem2" (which qemu, Hyper-V and Azure read by
//! current_size), and the geometry is the spec's when it addresses exactly the size, the
//! maximum 65535x16x255 otherwise. Sizes that are not a multiple of 512 are rounded up to
//! the next sector (a VHD has whole sectors) with a note on stderr; `azure=on` rounds up to
//! a whole MiB and forces the fixed subformat, which is what Azure accepts.
//!
//! Fixed output is sequential: guest data at its own offset, then the footer. Dynamic
//! output appends each block (sector bitmap + data) as the first write into it arrives;
//! data goes straight to the file, and only the BAT is held in memory; the footer copy,
//! dynamic header and BAT are written at finish. Every sector of an allocated block is
//! marked present, as qemu's vpc driver does (the sectors the engine leaves out are
//! holes, which read as the zeros they are), so the sequential writer
//! ([`super::stream`]), which must send each bitmap before its data, gives the same bytes.

use std::time::{SystemTime, UNIX_EPOCH};

use super::dynheader::{self, DynHeader, ParentLocator, DYN_HEADER_SIZE};
use super::footer::{DiskType, Footer, FOOTER_SIZE, NO_DATA_OFFSET, VHD_EPOCH};
use super::geometry::{Chs, MAX_SIZE};
use super::reader::MAX_BAT_BYTES;
use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::writer::{write_all_at, ImageWriter, Sink};

/// Default dynamic block size, as every VHD producer uses.
pub const DEFAULT_BLOCK_SIZE: u64 = 2 << 20;
/// Smallest block size we write: below 4 KiB the sector bitmap is smaller than a sector
/// and qemu computes its padded size differently from the spec.
pub const MIN_WRITE_BLOCK_SIZE: u64 = 4096;
/// Where the BAT starts: after the footer copy and the dynamic header.
pub(super) const BAT_OFFSET: u64 = (FOOTER_SIZE + DYN_HEADER_SIZE) as u64;
/// Data areas start on this boundary (good for the host file system).
const DATA_ALIGN: u64 = 4096;

/// The parsed `-o` options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) fixed: bool,
    pub(super) size: u64,
    pub(super) block_size: u64,
    /// Notes for the user (size rounding), passed on through `ImageWriter::warnings`.
    pub(super) notes: Vec<String>,
}

/// Parse and check the options; note any rounding of the size.
pub(super) fn plan(opts: &CreateOptions) -> Result<Plan> {
    let azure = opts.bool_option("azure")?.unwrap_or(false);
    // Accepted for qemu-img compatibility: the exact size is our default anyway.
    let _force_size = opts.bool_option("force_size")?;
    let fixed = match opts.str_option("subformat") {
        None => azure,
        Some("fixed") => true,
        Some("dynamic") if azure => {
            return Err(Error::arg(
                "azure=on needs subformat=fixed (Azure accepts only fixed VHDs)",
            ))
        }
        Some("dynamic") => false,
        Some(other) => {
            return Err(Error::arg(format!(
                "option subformat: '{other}' is not dynamic or fixed"
            )))
        }
    };
    let block_size = match opts.size_option("block_size")? {
        Some(_) if fixed => {
            return Err(Error::arg(
                "option block_size applies only to subformat=dynamic",
            ))
        }
        Some(b) => {
            if !b.is_power_of_two()
                || !(MIN_WRITE_BLOCK_SIZE..=dynheader::MAX_BLOCK_SIZE as u64).contains(&b)
            {
                return Err(Error::arg(format!(
                    "option block_size: {b} is not a power of two between {MIN_WRITE_BLOCK_SIZE} and {} (Hyper-V reads only 512K and 2M)",
                    dynheader::MAX_BLOCK_SIZE
                )));
            }
            b
        }
        None => DEFAULT_BLOCK_SIZE,
    };
    let mut size = opts.size;
    let mut notes = Vec::new();
    if !size.is_multiple_of(512) {
        let up = size.div_ceil(512) * 512;
        notes.push(format!(
            "VHD size {size} is not a multiple of 512; rounded up to {up} bytes"
        ));
        size = up;
    }
    if azure && !size.is_multiple_of(1 << 20) {
        let up = size.div_ceil(1 << 20) << 20;
        notes.push(format!(
            "Azure needs a whole number of MiB; size {size} rounded up to {up} bytes"
        ));
        size = up;
    }
    if size > MAX_SIZE {
        return Err(Error::limit(format!(
            "VHD size {size} exceeds the format's maximum of {MAX_SIZE} bytes (2040 GiB)"
        )));
    }
    if fixed && size == 0 {
        // The file would be the footer alone, at offset 0, where qemu and Virtual PC look
        // for a dynamic disk's footer copy: they then fail to find its dynamic header.
        return Err(Error::arg(
            "a fixed VHD of 0 bytes cannot be written: its file would be the footer alone, which qemu-img and Virtual PC take for a dynamic disk's header copy and cannot open; use subformat=dynamic for an empty disk",
        ));
    }
    if !fixed {
        let entries = size.div_ceil(block_size);
        if entries * 4 > MAX_BAT_BYTES {
            return Err(Error::limit(format!(
                "a {size}-byte dynamic VHD with {block_size}-byte blocks needs a BAT of {} bytes (limit {MAX_BAT_BYTES}); use a larger block_size",
                entries * 4
            )));
        }
    }
    Ok(Plan {
        fixed,
        size,
        block_size,
        notes,
    })
}

/// The footer for an image of `size` bytes.
pub(super) fn make_footer(size: u64, disk_type: DiskType) -> Footer {
    let chs = Chs::for_exact_size(size / 512);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    Footer {
        features: 2,
        version: 0x0001_0000,
        data_offset: if disk_type == DiskType::Fixed {
            NO_DATA_OFFSET
        } else {
            FOOTER_SIZE as u64
        },
        timestamp: now.saturating_sub(VHD_EPOCH).min(u32::MAX as u64) as u32,
        creator_app: *b"qem2",
        // Virtual PC 2007's version, as qemu writes.
        creator_version: 0x0005_0003,
        creator_os: *b"Wi2k",
        original_size: size,
        current_size: size,
        cylinders: chs.cylinders,
        heads: chs.heads,
        sectors_per_track: chs.sectors_per_track,
        disk_type,
        checksum: 0,
        uuid: crate::writer::random_uuid_v4(),
        saved_state: 0,
    }
}

/// Make a VHD writer (see the module docs for the options).
pub fn create_writer(file: Sink, opts: &CreateOptions) -> Result<Box<dyn ImageWriter>> {
    let p = plan(opts)?;
    if p.fixed {
        // The data area's length up front (see the raw writer: in-file writes are cheaper
        // than extending ones); the footer then extends it by 512 bytes.
        file.set_len(p.size)
            .map_err(|e| Error::io("setting output length", e))?;
        Ok(Box::new(FixedWriter {
            file,
            size: p.size,
            notes: p.notes,
        }))
    } else {
        let mut w = DynamicWriter::new(file, p.size, p.block_size);
        w.notes = p.notes;
        Ok(Box::new(w))
    }
}

/// Fixed VHD: the guest bytes, then the footer.
#[derive(Debug)]
struct FixedWriter {
    file: Sink,
    size: u64,
    notes: Vec<String>,
}

impl ImageWriter for FixedWriter {
    fn granularity(&self) -> u64 {
        512
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn warnings(&self) -> Vec<String> {
        self.notes.clone()
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        write_all_at(&self.file, data, offset, "guest data")
    }
    fn streams(&self) -> bool {
        true
    }
    fn output_len(&self) -> Option<u64> {
        self.size.checked_add(FOOTER_SIZE as u64)
    }
    fn finish(self: Box<Self>) -> Result<()> {
        let footer = make_footer(self.size, DiskType::Fixed).to_bytes();
        // Unwritten guest ranges stay holes; the footer write extends the file past them.
        write_all_at(&self.file, &footer, self.size, "VHD footer")
    }
}

/// Dynamic VHD, blocks appended in guest order.
#[derive(Debug)]
struct DynamicWriter {
    file: Sink,
    size: u64,
    block_size: u64,
    bitmap_size: u64,
    bat: Vec<u32>,
    /// File offset where the next block's bitmap goes.
    next_free: u64,
    /// The block being filled.
    current: Option<usize>,
    notes: Vec<String>,
}

impl DynamicWriter {
    fn new(file: Sink, size: u64, block_size: u64) -> Self {
        let entries = size.div_ceil(block_size) as usize;
        let bitmap_size = dynheader::bitmap_size(block_size as u32);
        let next_free = first_block_offset(entries, bitmap_size);
        DynamicWriter {
            file,
            size,
            block_size,
            bitmap_size,
            bat: vec![u32::MAX; entries],
            next_free,
            current: None,
            notes: Vec::new(),
        }
    }

    /// Make `blk` the current block, allocating it at the end of the file.
    fn enter_block(&mut self, blk: usize) -> Result<()> {
        if self.current == Some(blk) {
            return Ok(());
        }
        let slot = self.bat.get_mut(blk).ok_or_else(|| {
            Error::arg(format!("write into block {blk}, past the end of the disk"))
        })?;
        if *slot != u32::MAX {
            return Err(Error::arg(format!(
                "block {blk} written twice (writes must ascend)"
            )));
        }
        let sector = self.next_free / 512;
        *slot = u32::try_from(sector)
            .ok()
            .filter(|&s| s != u32::MAX)
            .ok_or_else(|| Error::limit("VHD grew past the 2 TiB a BAT entry can address"))?;
        let bitmap = vec![0xffu8; self.bitmap_size as usize];
        write_all_at(&self.file, &bitmap, self.next_free, "VHD block bitmap")?;
        self.next_free += self.bitmap_size + self.block_size;
        self.current = Some(blk);
        Ok(())
    }
}

/// Where the first block's bitmap goes in a dynamic VHD with `entries` BAT entries: after
/// the BAT, placed so that data areas start on a 4 KiB boundary.
pub(super) fn first_block_offset(entries: usize, bitmap_size: u64) -> u64 {
    let bat_end = BAT_OFFSET + (entries as u64 * 4).div_ceil(512) * 512;
    (bat_end + bitmap_size).div_ceil(DATA_ALIGN) * DATA_ALIGN - bitmap_size
}

/// The dynamic header of a VHD without a parent.
pub(super) fn dyn_header_bytes(entries: usize, block_size: u64) -> Vec<u8> {
    DynHeader {
        data_offset: u64::MAX,
        table_offset: BAT_OFFSET,
        version: 0x0001_0000,
        max_table_entries: entries as u32,
        block_size: block_size as u32,
        checksum: 0,
        parent_uuid: [0; 16],
        parent_timestamp: 0,
        parent_name: [0; 512],
        locators: [ParentLocator::default(); 8],
    }
    .to_bytes()
    .to_vec()
}

/// The BAT padded to whole sectors with 0xff (unallocated), like qemu.
pub(super) fn bat_bytes(bat: &[u32]) -> Vec<u8> {
    let bat_len = (bat.len() * 4).div_ceil(512) * 512;
    let mut out = vec![0xffu8; bat_len];
    for (c, e) in out.chunks_exact_mut(4).zip(bat) {
        c.copy_from_slice(&e.to_be_bytes());
    }
    out
}

impl ImageWriter for DynamicWriter {
    fn granularity(&self) -> u64 {
        512
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn warnings(&self) -> Vec<String> {
        self.notes.clone()
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| {
                Error::arg(format!(
                    "write of {} bytes at {offset:#x} runs past the virtual size {}",
                    data.len(),
                    self.size
                ))
            })?;
        let bs = self.block_size;
        let mut off = offset;
        while off < end {
            let blk = (off / bs) as usize;
            let in_block = off % bs;
            let n = (bs - in_block).min(end - off);
            self.enter_block(blk)?;
            let host = self.bat[blk] as u64 * 512 + self.bitmap_size + in_block;
            let a = (off - offset) as usize;
            write_all_at(&self.file, &data[a..a + n as usize], host, "guest data")?;
            off += n;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let footer = make_footer(self.size, DiskType::Dynamic).to_bytes();
        let header = dyn_header_bytes(self.bat.len(), self.block_size);
        let bat = bat_bytes(&self.bat);
        write_all_at(&self.file, &footer, 0, "VHD footer copy")?;
        write_all_at(
            &self.file,
            &header,
            FOOTER_SIZE as u64,
            "VHD dynamic header",
        )?;
        write_all_at(&self.file, &bat, BAT_OFFSET, "VHD BAT")?;
        write_all_at(&self.file, &footer, self.next_free, "VHD footer")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let p = plan(&CreateOptions::new(5 << 20)).unwrap();
        assert_eq!((p.fixed, p.size, p.block_size), (false, 5 << 20, 2 << 20));
        let p = plan(&CreateOptions::new(1000).option("azure", "on")).unwrap();
        assert_eq!((p.fixed, p.size), (true, 1 << 20));
        let p = plan(&CreateOptions::new(1000)).unwrap();
        assert_eq!(p.size, 1024);
        assert!(plan(&CreateOptions::new(MAX_SIZE + 512)).is_err());
        assert!(plan(&CreateOptions::new(MAX_SIZE)).is_ok());
        assert!(plan(&CreateOptions::new(1 << 20).option("block_size", "3M")).is_err());
        assert!(plan(&CreateOptions::new(1 << 20).option("subformat", "sparse")).is_err());
        assert!(plan(
            &CreateOptions::new(1 << 20)
                .option("subformat", "dynamic")
                .option("azure", "on")
        )
        .is_err());
        assert!(plan(&CreateOptions::new(1 << 40).option("block_size", "4k")).is_err());
    }
}
