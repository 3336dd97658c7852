//! Writing fixed and dynamic VHDX images, modelled on what qemu-img writes (which Hyper-V
//! accepts), with an empty log.
//!
//! Layout, in ascending file order: the file identifier (0), the two headers (64 KiB,
//! 128 KiB; sequence numbers 1 and 2, so the second is current, with a zero log GUID: no
//! log to replay), the two identical region tables (192 KiB, 256 KiB), the log (1 MiB,
//! `log_size` bytes of zeros), the BAT (rounded up to whole MiB), the metadata region
//! (1 MiB: the table, then the five required items at 64 KiB, as qemu writes them), then
//! the payload blocks. A fixed disk stores every block in guest order; a dynamic disk
//! stores the blocks that receive data, in guest order, and marks the others not present.
//!
//! Everything before the first payload block follows from the options alone, except a
//! dynamic disk's BAT, which follows from the allocation plan; so a fixed disk streams
//! without a plan, a dynamic disk streams with one ([`create_stream_writer`]), and both
//! know their exact length before the first byte. Without a plan, a dynamic disk is written
//! to a seekable file: blocks are appended as data arrives and the head is written last.
//!
//! Options follow qemu's rules: `subformat=dynamic|fixed` (dynamic by default),
//! `block_size` (0 or absent: 8 MiB up to 1 GiB, 16 MiB up to 100 GiB, 32 MiB up to 32 TiB,
//! 64 MiB above; rounded up to a whole MiB and capped at 256 MiB like qemu, with a note;
//! it must then be a power of two), `log_size` (a non-zero multiple of 1 MiB, default
//! 1 MiB), `block_state_zero` accepted for compatibility (blocks without data are always
//! written not present, which every reader reads as zeros). The size is rounded up to
//! whole 512-byte sectors (with a note) and may not exceed 64 TiB.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::*;
use super::reader::MAX_BAT_BYTES;
use crate::error::{Error, Result};
use crate::options::CreateOptions;
use crate::writer::{random_uuid_v4, write_all_at, AllocationPlan, ImageWriter, Sink};

/// The logical (and physical) sector size written.
const LOGICAL_SECTOR: u64 = 512;
/// The physical sector size written (Hyper-V's default for new disks).
const PHYSICAL_SECTOR: u32 = 4096;
/// Size of the metadata region written.
const METADATA_LEN: u64 = MIB;

/// Where everything goes, from the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Layout {
    pub(super) fixed: bool,
    pub(super) size: u64,
    pub(super) block_size: u64,
    pub(super) log_size: u64,
    pub(super) blocks: u64,
    pub(super) chunk_ratio: u64,
    pub(super) bat_offset: u64,
    pub(super) bat_len: u64,
    pub(super) meta_offset: u64,
    pub(super) data_offset: u64,
    pub(super) notes: Vec<String>,
}

/// qemu's default block size for a disk of `size` bytes.
fn default_block_size(size: u64) -> u64 {
    if size > 32 << 40 {
        64 << 20
    } else if size > 100 << 30 {
        32 << 20
    } else if size > 1 << 30 {
        16 << 20
    } else {
        8 << 20
    }
}

/// Parse and check the options.
pub(super) fn layout(opts: &CreateOptions) -> Result<Layout> {
    let fixed = match opts.str_option("subformat") {
        None | Some("dynamic") => false,
        Some("fixed") => true,
        Some(other) => {
            return Err(Error::arg(format!(
                "option subformat: '{other}' is not dynamic or fixed (differencing disks are not written)"
            )))
        }
    };
    let _ = opts.bool_option("block_state_zero")?;
    let mut notes = Vec::new();
    let mut size = opts.size;
    if !size.is_multiple_of(LOGICAL_SECTOR) {
        let up = size.div_ceil(LOGICAL_SECTOR) * LOGICAL_SECTOR;
        notes.push(format!(
            "VHDX size {size} is not a multiple of 512; rounded up to {up} bytes"
        ));
        size = up;
    }
    if size > MAX_VIRTUAL_SIZE {
        return Err(Error::limit(format!(
            "VHDX size {size} is too large; the maximum is 64 TiB ({MAX_VIRTUAL_SIZE} bytes)"
        )));
    }
    let log_size = opts.size_option("log_size")?.unwrap_or(MIB);
    if log_size == 0 || log_size % MIB != 0 || log_size > u32::MAX as u64 + 1 - MIB {
        return Err(Error::arg(format!(
            "option log_size: {log_size} is not a non-zero multiple of 1 MiB below 4 GiB"
        )));
    }
    let asked = opts.size_option("block_size")?.unwrap_or(0);
    let mut block_size = if asked == 0 {
        default_block_size(size)
    } else {
        asked
    };
    if block_size % MIB != 0 {
        let up = block_size.div_ceil(MIB) * MIB;
        notes.push(format!(
            "VHDX block size {block_size} rounded up to a whole MiB: {up} bytes (as qemu-img does)"
        ));
        block_size = up;
    }
    if block_size > MAX_BLOCK_SIZE {
        notes.push(format!(
            "VHDX block size {block_size} capped at the maximum of {MAX_BLOCK_SIZE} bytes (as qemu-img does)"
        ));
        block_size = MAX_BLOCK_SIZE;
    }
    if !block_size.is_power_of_two() {
        return Err(Error::arg(format!(
            "option block_size: {block_size} is not a power of two (VHDX block sizes are 1 MiB to 256 MiB)"
        )));
    }
    let blocks = size.div_ceil(block_size);
    let cr = chunk_ratio(LOGICAL_SECTOR, block_size);
    let entries = bat_entries(blocks, cr, false);
    let bat_len = (entries * 8).div_ceil(MIB).max(1) * MIB;
    if entries * 8 > MAX_BAT_BYTES {
        return Err(Error::limit(format!(
            "a {size}-byte VHDX with {block_size}-byte blocks needs a BAT of {} bytes (limit {MAX_BAT_BYTES}); use a larger block_size",
            entries * 8
        )));
    }
    let bat_offset = HEADER_SECTION_END + log_size;
    let meta_offset = bat_offset + bat_len;
    Ok(Layout {
        fixed,
        size,
        block_size,
        log_size,
        blocks,
        chunk_ratio: cr,
        bat_offset,
        bat_len,
        meta_offset,
        data_offset: meta_offset + METADATA_LEN,
        notes,
    })
}

impl Layout {
    /// Everything from offset 0 to the end of the header section: file identifier,
    /// headers and region tables.
    fn header_section(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SECTION_END as usize];
        b[..8].copy_from_slice(FILE_SIGNATURE);
        let creator = utf16le(&format!("diskconv {}", env!("CARGO_PKG_VERSION")));
        b[8..8 + creator.len()].copy_from_slice(&creator);
        let mut h = Header {
            sequence_number: 1,
            file_write_guid: random_uuid_v4(),
            data_write_guid: random_uuid_v4(),
            log_guid: [0; 16],
            log_version: 0,
            version: 1,
            log_length: self.log_size as u32,
            log_offset: HEADER_SECTION_END,
        };
        for at in HEADER_OFFSETS {
            b[at as usize..at as usize + HEADER_SIZE].copy_from_slice(&h.to_bytes());
            h.sequence_number += 1;
        }
        let rt = RegionTable {
            entries: vec![
                Region {
                    guid: BAT_GUID,
                    file_offset: self.bat_offset,
                    length: self.bat_len as u32,
                    required: true,
                },
                Region {
                    guid: METADATA_GUID,
                    file_offset: self.meta_offset,
                    length: METADATA_LEN as u32,
                    required: true,
                },
            ],
        }
        .to_bytes();
        for at in REGION_TABLE_OFFSETS {
            b[at as usize..at as usize + REGION_TABLE_SIZE].copy_from_slice(&rt);
        }
        b
    }

    /// The metadata region's written part: the table and the five items.
    fn metadata(&self) -> Vec<u8> {
        let mut items = vec![0u8; 8 + 8 + 16 + 4 + 4];
        LE::write_u32(&mut items[0..], self.block_size as u32);
        LE::write_u32(
            &mut items[4..],
            if self.fixed {
                PARAM_LEAVE_BLOCKS_ALLOCATED
            } else {
                0
            },
        );
        LE::write_u64(&mut items[8..], self.size);
        items[16..32].copy_from_slice(&random_uuid_v4());
        LE::write_u32(&mut items[32..], LOGICAL_SECTOR as u32);
        LE::write_u32(&mut items[36..], PHYSICAL_SECTOR);
        let base = METADATA_TABLE_SIZE as u32;
        let vd = META_IS_REQUIRED | META_IS_VIRTUAL_DISK;
        let entry = |id, offset, length, flags| MetadataEntry {
            item_id: id,
            offset: base + offset,
            length,
            flags,
        };
        let table = MetadataTable {
            entries: vec![
                entry(FILE_PARAMETERS_GUID, 0, 8, META_IS_REQUIRED),
                entry(VIRTUAL_SIZE_GUID, 8, 8, vd),
                entry(PAGE83_GUID, 16, 16, vd),
                entry(LOGICAL_SECTOR_GUID, 32, 4, vd),
                entry(PHYSICAL_SECTOR_GUID, 36, 4, vd),
            ],
        };
        let mut b = table.to_bytes();
        b.extend_from_slice(&items);
        b
    }

    /// The BAT's bytes for payload entries `payload` (bitmap entries not present).
    fn bat_bytes(&self, payload: &[u64]) -> Vec<u8> {
        let entries = bat_entries(self.blocks, self.chunk_ratio, false);
        let mut b = vec![0u8; (entries * 8) as usize];
        for (blk, &e) in payload.iter().enumerate() {
            let i = payload_index(blk as u64, self.chunk_ratio) as usize;
            LE::write_u64(&mut b[i * 8..], e);
        }
        b
    }
}

/// The VHDX writer (fixed, planned dynamic, or seekable dynamic).
#[derive(Debug)]
pub struct VhdxWriter {
    file: Sink,
    l: Layout,
    /// Payload BAT entries, one per block (not present until allocated).
    bat: Vec<u64>,
    /// The BAT is final from the start (fixed, or planned dynamic): the head goes first
    /// and the writer streams.
    known: bool,
    head_written: bool,
    /// Where the next allocated block goes (seekable dynamic), or the output's end.
    next: u64,
    written_to: u64,
}

/// Make a writer: a fixed one streams; a dynamic one needs a seekable file (use
/// [`create_stream_writer`] with a plan for a stream).
pub fn create_writer(file: Sink, opts: &CreateOptions) -> Result<VhdxWriter> {
    let l = layout(opts)?;
    let mut bat = vec![bat_entry(PAYLOAD_NOT_PRESENT, 0); l.blocks as usize];
    let mut next = l.data_offset;
    if l.fixed {
        for e in bat.iter_mut() {
            *e = bat_entry(PAYLOAD_FULLY_PRESENT, next);
            next += l.block_size;
        }
    }
    Ok(VhdxWriter {
        file,
        known: l.fixed,
        bat,
        l,
        head_written: false,
        next,
        written_to: 0,
    })
}

/// The granule an allocation plan must use for this output: the block size of a dynamic
/// VHDX; None for a fixed one, which streams without a plan.
pub fn plan_granularity(opts: &CreateOptions) -> Result<Option<u64>> {
    let l = layout(opts)?;
    Ok((!l.fixed).then_some(l.block_size))
}

/// Make a dynamic VHDX writer that writes strictly forward, with the BAT laid out from
/// `plan` (made at the block size).
pub fn create_stream_writer(
    file: Sink,
    opts: &CreateOptions,
    plan: &AllocationPlan,
) -> Result<VhdxWriter> {
    let mut w = create_writer(file, opts)?;
    if w.l.fixed {
        return Ok(w);
    }
    let bs = w.l.block_size;
    if plan.granularity != bs {
        return Err(Error::arg(format!(
            "the allocation plan was made for {}-byte granules but the VHDX block size is {bs}; plan with the block size",
            plan.granularity
        )));
    }
    for &(a, b) in &plan.ranges {
        let (a, b) = (a / bs, b.min(w.l.size).div_ceil(bs).min(w.l.blocks));
        for blk in a..b {
            let slot = &mut w.bat[blk as usize];
            if bat_state(*slot) == PAYLOAD_NOT_PRESENT {
                *slot = bat_entry(PAYLOAD_FULLY_PRESENT, w.next);
                w.next += bs;
            }
        }
    }
    w.known = true;
    Ok(w)
}

impl VhdxWriter {
    fn write_head(&mut self) -> Result<()> {
        write_all_at(
            &self.file,
            &self.l.header_section(),
            0,
            "VHDX header section",
        )?;
        write_all_at(
            &self.file,
            &self.l.bat_bytes(&self.bat),
            self.l.bat_offset,
            "VHDX BAT",
        )?;
        write_all_at(
            &self.file,
            &self.l.metadata(),
            self.l.meta_offset,
            "VHDX metadata",
        )?;
        self.head_written = true;
        Ok(())
    }
}

impl ImageWriter for VhdxWriter {
    fn granularity(&self) -> u64 {
        LOGICAL_SECTOR
    }
    fn virtual_size(&self) -> u64 {
        self.l.size
    }
    fn warnings(&self) -> Vec<String> {
        self.l.notes.clone()
    }
    fn streams(&self) -> bool {
        self.known
    }
    fn output_len(&self) -> Option<u64> {
        self.known.then_some(self.next)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.l.size && offset >= self.written_to)
            .ok_or_else(|| {
                Error::arg(format!(
                    "VHDX writer: write of {} bytes at {offset:#x} is out of order or past the virtual size {}",
                    data.len(),
                    self.l.size
                ))
            })?;
        self.written_to = end;
        if self.known && !self.head_written {
            self.write_head()?;
        }
        let bs = self.l.block_size;
        let mut off = offset;
        while off < end {
            let blk = off / bs;
            let in_block = off % bs;
            let n = (bs - in_block).min(end - off);
            let slot = &mut self.bat[blk as usize];
            if bat_state(*slot) != PAYLOAD_FULLY_PRESENT {
                if self.known {
                    return Err(Error::arg(format!(
                        "VHDX writer: guest offset {off:#x} is not in the allocation plan (did the source change between the planning pass and the conversion?)"
                    )));
                }
                *slot = bat_entry(PAYLOAD_FULLY_PRESENT, self.next);
                self.next += bs;
            }
            let host = bat_offset(*slot) + in_block;
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
        self.file
            .set_len(self.next)
            .map_err(|e| Error::io("setting the VHDX file's length", e))?;
        self.file
            .sync_all()
            .map_err(|e| Error::io("flushing the VHDX file", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(size: u64, kv: &[(&str, &str)]) -> CreateOptions {
        let mut o = CreateOptions {
            size,
            ..Default::default()
        };
        for (k, v) in kv {
            o.options.insert(k.to_string(), v.to_string());
        }
        o
    }

    #[test]
    fn qemu_block_size_rules() {
        assert_eq!(layout(&opts(1 << 30, &[])).unwrap().block_size, 8 << 20);
        assert_eq!(layout(&opts(3 << 30, &[])).unwrap().block_size, 16 << 20);
        assert_eq!(layout(&opts(200 << 30, &[])).unwrap().block_size, 32 << 20);
        let l = layout(&opts(10 << 20, &[("block_size", "512K")])).unwrap();
        assert_eq!(l.block_size, 1 << 20);
        assert_eq!(l.notes.len(), 1);
        let l = layout(&opts(10 << 20, &[("block_size", "512M")])).unwrap();
        assert_eq!(l.block_size, 256 << 20);
        assert!(layout(&opts(10 << 20, &[("block_size", "3M")])).is_err());
        assert!(layout(&opts(10 << 20, &[("log_size", "0")])).is_err());
        assert!(layout(&opts(10 << 20, &[("log_size", "1536K")])).is_err());
        assert!(layout(&opts(65 << 40, &[])).is_err());
        assert_eq!(layout(&opts(1000, &[])).unwrap().size, 1024);
    }

    #[test]
    fn layout_places_regions_after_the_log() {
        let l = layout(&opts(3 << 30, &[("log_size", "2M")])).unwrap();
        assert_eq!(l.bat_offset, 3 << 20);
        assert_eq!(l.meta_offset, 4 << 20);
        assert_eq!(l.data_offset, 5 << 20);
    }
}
