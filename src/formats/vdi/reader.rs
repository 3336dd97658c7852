//! Reading VDI images: the block map is loaded and checked up front (it is small: 4 bytes
//! per block, capped), so `map` and `read_at` are lock-free lookups.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::{ImageType, VdiHeader, BLOCK_DISCARDED, BLOCK_UNALLOCATED, HEADER_BLOCK};
use crate::device::{read_via_map, BlockDevice, HostFile, ImageInfo, Mapping, MappingKind};
use crate::error::{Error, Result};
use crate::format::Format;

/// Largest block map we load (8 Mi entries: 8 TiB in 1 MiB blocks).
pub const MAX_BMAP_BYTES: u64 = 32 << 20;

/// An opened VDI image (dynamic, static or undo; never differencing).
#[derive(Debug)]
pub struct VdiImage {
    file: HostFile,
    header: VdiHeader,
    size: u64,
    block_shift: u32,
    /// Entries for the blocks that cover the virtual size, in host order.
    bmap: Vec<u32>,
}

/// What one block map entry means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Unallocated,
    Zero,
    Data(u32),
}

fn classify(e: u32) -> Entry {
    match e {
        BLOCK_UNALLOCATED => Entry::Unallocated,
        BLOCK_DISCARDED => Entry::Zero,
        i => Entry::Data(i),
    }
}

impl VdiImage {
    /// Parse the header, load the block map and check every entry against the header and
    /// the real file length.
    pub fn open(file: HostFile) -> Result<Self> {
        let head_len = file.len().min(HEADER_BLOCK as u64);
        let head = file.read_vec(0, head_len, "VDI header")?;
        let header = VdiHeader::parse(&head).map_err(|e| e.with_path(file.path()))?;
        let size = header.virtual_size();
        let bs = u64::from(header.block_size);
        let block_shift = header.block_size.trailing_zeros();

        // The claimed table must be within our cap and inside the file before anything
        // is allocated for it.
        let bmap_len = header.bmap_len();
        if bmap_len > MAX_BMAP_BYTES {
            return Err(Error::limit(format!(
                "VDI block map of {} entries ({bmap_len} bytes) exceeds the {MAX_BMAP_BYTES}-byte limit",
                header.blocks_in_image
            ))
            .with_field("blocks_in_image")
            .at(0x180)
            .with_path(file.path()));
        }
        file.check_range(u64::from(header.offset_bmap), bmap_len, "VDI block map")?;

        // Only the entries covering the guest matter (blocks_in_image may be larger).
        let needed = size.div_ceil(bs);
        let raw = file.read_vec(u64::from(header.offset_bmap), needed * 4, "VDI block map")?;
        let mut bmap = Vec::with_capacity(needed as usize);
        for (i, c) in raw.chunks_exact(4).enumerate() {
            let e = LE::read_u32(c);
            if let Entry::Data(idx) = classify(e) {
                let entry_off = u64::from(header.offset_bmap) + i as u64 * 4;
                if idx >= header.blocks_allocated {
                    return Err(Error::corrupt(format!(
                        "VDI block {i} points at data block {idx}, past blocks_allocated {}",
                        header.blocks_allocated
                    ))
                    .with_field("block map entry")
                    .at(entry_off)
                    .with_path(file.path()));
                }
                // The guest part of the block (the last one may be partial) must be in the file.
                let host = u64::from(header.offset_data) + u64::from(idx) * bs;
                let used = bs.min(size - i as u64 * bs);
                if host + used > file.len() {
                    return Err(Error::corrupt(format!(
                        "VDI block {i} (data block {idx} at {host:#x}, {used} bytes) runs past the end of the file ({} bytes)",
                        file.len()
                    ))
                    .with_field("block map entry")
                    .at(entry_off)
                    .with_path(file.path()));
                }
            }
            bmap.push(e);
        }
        Ok(VdiImage {
            file,
            header,
            size,
            block_shift,
            bmap,
        })
    }

    /// The parsed header.
    pub fn header(&self) -> &VdiHeader {
        &self.header
    }

    fn block_size(&self) -> u64 {
        1u64 << self.block_shift
    }

    /// Host offset of guest `offset`, which must lie in an allocated block.
    fn host_offset(&self, offset: u64) -> Result<u64> {
        let i = (offset >> self.block_shift) as usize;
        match self.bmap.get(i).copied().map(classify) {
            Some(Entry::Data(idx)) => Ok(u64::from(self.header.offset_data)
                + (u64::from(idx) << self.block_shift)
                + (offset & (self.block_size() - 1))),
            _ => Err(Error::arg(format!(
                "guest offset {offset:#x} is not in an allocated VDI block"
            ))),
        }
    }
}

impl BlockDevice for VdiImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    /// qemu reports this format's unallocated blocks as allocated zeros, and looks into
    /// the file under the data (holes: zero data) of a static image only (block/vdi.c sets
    /// BDRV_BLOCK_RECURSE for VDI_TYPE_STATIC): a dynamic image's blocks are whole data.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<crate::device::BlockStatus> {
        let m = self.map(offset, max_len)?;
        let st = crate::device::BlockStatus::from_mapping(&m, true);
        let st = if self.header.image_type == ImageType::Static {
            st.refine_by_host(&self.file)
        } else {
            st
        };
        Ok(st.end_in_units(self.size, self.block_size()))
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = crate::device::map_end(self.size, offset, max_len)?;
        let bs = self.block_size();
        let mut i = (offset >> self.block_shift) as usize;
        let first = classify(self.bmap[i]);
        let mut run_end = (i as u64 + 1) * bs;
        let mut prev = first;
        // Extend over following blocks of the same kind; data only while the host blocks
        // are consecutive, so the run is one contiguous host range.
        while run_end < end {
            let next = classify(self.bmap[i + 1]);
            let same = match (prev, next) {
                (Entry::Data(a), Entry::Data(b)) => b == a.wrapping_add(1),
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            prev = next;
            i += 1;
            run_end += bs;
        }
        let kind = match first {
            Entry::Unallocated => MappingKind::Unallocated,
            Entry::Zero => MappingKind::Zero,
            Entry::Data(_) => MappingKind::Data {
                host: Some(self.host_offset(offset)?),
            },
        };
        Ok(Mapping {
            offset,
            len: run_end.min(end) - offset,
            kind,
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_via_map(self, buf, offset, |part, guest| {
            let host = self.host_offset(guest)?;
            self.file.read_exact_at(part, host, "VDI data block")
        })
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "vdi".into(),
            virtual_size: self.size,
            cluster_size: Some(self.block_size()),
            dirty: Some(false),
            ..Default::default()
        }
    }

    fn format(&self) -> Format {
        Format::Vdi
    }
}
