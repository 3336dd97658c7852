//! Writing VDI images, dynamic (blocks appended in guest order as data arrives) or static
//! (every block allocated, identity block map, unwritten blocks left as file holes).
//!
//! Layout is qemu's: 512-byte header, block map at 0x200, data right after the map
//! (512-aligned). The header and map are written by `finish`, so the data streams out in
//! one pass with one positional write per run of blocks.

use super::header::{ImageType, VdiHeader, BLOCK_UNALLOCATED, DEFAULT_BLOCK_SIZE, SECTOR_SIZE};
use super::reader::MAX_BMAP_BYTES;
use crate::error::{Error, Result};
use crate::writer::{write_all_at, ImageWriter, Sink};

/// A VDI being written.
#[derive(Debug)]
pub struct VdiWriter {
    file: Sink,
    header: VdiHeader,
    size: u64,
    bmap: Vec<u32>,
    /// Lowest guest offset the next write may start at (writes come in ascending order).
    next: u64,
}

impl VdiWriter {
    /// A writer for a `size`-byte guest (rounded up to whole sectors, as qemu does).
    pub fn new(file: Sink, size: u64, fixed: bool) -> Result<Self> {
        let (size, header) = new_header(size, fixed)?;
        let blocks = u64::from(header.blocks_in_image);
        let bmap = if fixed {
            (0..blocks as u32).collect()
        } else {
            vec![BLOCK_UNALLOCATED; blocks as usize]
        };
        Ok(VdiWriter {
            file,
            header,
            size,
            bmap,
            next: 0,
        })
    }

    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }
}

/// The header of a new `size`-byte image (rounded up to whole sectors, as qemu does; the
/// rounded size comes back too), refused when our reader's block map limit would refuse
/// to read it back.
pub(super) fn new_header(size: u64, fixed: bool) -> Result<(u64, VdiHeader)> {
    let size = size
        .checked_next_multiple_of(u64::from(SECTOR_SIZE))
        .ok_or_else(|| Error::arg(format!("VDI size {size} is too large")))?;
    let bs = u64::from(DEFAULT_BLOCK_SIZE);
    let blocks = size.div_ceil(bs);
    let max = MAX_BMAP_BYTES / 4 * bs;
    if blocks * 4 > MAX_BMAP_BYTES {
        return Err(Error::limit(format!(
            "VDI size {size} exceeds the supported maximum of {max} bytes ({} blocks of 1 MiB)",
            MAX_BMAP_BYTES / 4
        )));
    }
    let image_type = if fixed {
        ImageType::Static
    } else {
        ImageType::Dynamic
    };
    Ok((size, VdiHeader::new(size, DEFAULT_BLOCK_SIZE, image_type)?))
}

impl ImageWriter for VdiWriter {
    fn granularity(&self) -> u64 {
        // A static image's blocks are all mapped (identity), so any sector can be written
        // in place and what is never written stays a hole; a dynamic image allocates
        // whole blocks.
        if self.header.image_type == ImageType::Static {
            u64::from(SECTOR_SIZE)
        } else {
            self.block_size()
        }
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn output_len(&self) -> Option<u64> {
        // Static: every block is in the file. Dynamic: known only once the data has come
        // (the sequential writer knows it up front, from its plan).
        (self.header.image_type == ImageType::Static).then(|| {
            u64::from(self.header.offset_data)
                + u64::from(self.header.blocks_allocated) * self.block_size()
        })
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let bs = self.block_size();
        let gran = self.granularity();
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size);
        let Some(end) = end.filter(|_| offset.is_multiple_of(gran) && offset >= self.next) else {
            return Err(Error::arg(format!(
                "VDI writer got {} bytes at {offset:#x}: not aligned to {gran}, out of order or past the size {}",
                data.len(),
                self.size
            )));
        };
        if self.header.image_type == ImageType::Static {
            let host = u64::from(self.header.offset_data) + offset;
            write_nonzero_at(&self.file, data, host)?;
            self.next = end.next_multiple_of(gran);
            return Ok(());
        }
        let first = offset / bs;
        let count = (data.len() as u64).div_ceil(bs);
        // Appended in guest order: the run's blocks are consecutive in the file too.
        let host_block = u64::from(self.header.blocks_allocated);
        for (k, e) in self.bmap[first as usize..(first + count) as usize]
            .iter_mut()
            .enumerate()
        {
            *e = (host_block + k as u64) as u32;
        }
        self.header.blocks_allocated += count as u32;
        let host = u64::from(self.header.offset_data) + host_block * bs;
        write_nonzero_at(&self.file, data, host)?;
        // A partial last block closes the block: nothing may be written into it later.
        self.next = end.next_multiple_of(bs);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<()> {
        let h = &self.header;
        write_all_at(&self.file, &h.to_bytes(), 0, "VDI header")?;
        // The map, padded with zeros to whole sectors, written in bounded chunks.
        let bmap_off = u64::from(h.offset_bmap);
        let map_bytes = u64::from(h.offset_data) - bmap_off;
        let mut chunk = Vec::with_capacity(1 << 20);
        let mut written = 0u64;
        for part in self.bmap.chunks(1 << 18) {
            chunk.clear();
            for e in part {
                chunk.extend_from_slice(&e.to_le_bytes());
            }
            write_all_at(&self.file, &chunk, bmap_off + written, "VDI block map")?;
            written += chunk.len() as u64;
        }
        if written < map_bytes {
            let pad = vec![0u8; (map_bytes - written) as usize];
            write_all_at(&self.file, &pad, bmap_off + written, "VDI block map")?;
        }
        // Whole blocks in the file (a partial last block and unwritten static blocks become
        // zeros / holes), like qemu and VirtualBox.
        let blocks = u64::from(h.blocks_allocated);
        let len = u64::from(h.offset_data) + blocks * self.block_size();
        self.file
            .set_len(len)
            .map_err(|e| Error::io("setting VDI file length", e))?;
        Ok(())
    }
}

/// Write `data` at `host`, skipping all-zero 4 KiB pieces: the file region is new (its
/// length is only set by `finish`; a sink written in place zeroes what was never written),
/// so what is skipped stays a hole and reads as zeros.
/// A block with 4 KiB of data then costs 4 KiB on disk, not the whole 1 MiB block.
fn write_nonzero_at(file: &Sink, data: &[u8], host: u64) -> Result<()> {
    const PIECE: usize = 4096;
    let mut run: Option<usize> = None;
    let mut at = 0usize;
    while at < data.len() {
        let end = (at + PIECE).min(data.len());
        let zero = all_zero(&data[at..end]);
        match (zero, run) {
            (false, None) => run = Some(at),
            (true, Some(start)) => {
                write_all_at(file, &data[start..at], host + start as u64, "VDI data")?;
                run = None;
            }
            _ => {}
        }
        at = end;
    }
    if let Some(start) = run {
        write_all_at(file, &data[start..], host + start as u64, "VDI data")?;
    }
    Ok(())
}

/// True when every byte is zero, 16 bytes at a time (this runs on the writer's thread).
fn all_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|w| u128::from_ne_bytes(w.try_into().expect("16 bytes")) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, HostFile, MappingKind};
    use std::fs::File;

    fn write_image(path: &std::path::Path, size: u64, fixed: bool, writes: &[(u64, Vec<u8>)]) {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        let mut w = Box::new(VdiWriter::new(f.into(), size, fixed).unwrap());
        for (o, d) in writes {
            w.write(*o, d).unwrap();
        }
        w.finish().unwrap();
    }

    #[test]
    fn dynamic_appends_blocks_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.vdi");
        let mib = 1u64 << 20;
        let size = 5 * mib + 1000; // rounds up to 5 MiB + 1024
        let d1 = vec![7u8; 2 * mib as usize];
        let d2 = vec![9u8; (mib + 1000) as usize];
        write_image(&p, size, false, &[(mib, d1), (4 * mib, d2)]);
        let img = super::super::reader::VdiImage::open(HostFile::open(&p).unwrap()).unwrap();
        assert_eq!(img.virtual_size(), 5 * mib + 1024);
        assert_eq!(img.header().blocks_allocated, 4);
        let m = img.map(0, u64::MAX).unwrap();
        assert_eq!((m.len, m.kind), (mib, MappingKind::Unallocated));
        let m = img.map(mib, u64::MAX).unwrap();
        assert_eq!(m.len, 2 * mib);
        assert!(matches!(m.kind, MappingKind::Data { host: Some(0x400) }));
        let mut b = vec![0u8; 4];
        img.read_at(&mut b, 5 * mib + 999).unwrap();
        assert_eq!(b, [9, 0, 0, 0]);
        img.read_at(&mut b, 3 * mib - 2).unwrap();
        assert_eq!(b, [7, 7, 0, 0]);
    }

    #[test]
    fn static_writes_sectors_in_place_and_leaves_the_rest_as_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.vdi");
        let mib = 1u64 << 20;
        write_image(
            &p,
            64 * mib,
            true,
            &[(4096, vec![5u8; 4096]), (40 * mib + 512, vec![6u8; 512])],
        );
        let meta = std::fs::metadata(&p).unwrap();
        let img = super::super::reader::VdiImage::open(HostFile::open(&p).unwrap()).unwrap();
        let data = u64::from(img.header().offset_data);
        assert_eq!(meta.len(), data + 64 * mib);
        // Header, map and the two written ranges: far less than the 64 MiB of blocks.
        assert!(
            meta.blocks() * 512 < mib,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let mut b = vec![0u8; 4];
        img.read_at(&mut b, 8190).unwrap();
        assert_eq!(b, [5, 5, 0, 0]);
        img.read_at(&mut b, 40 * mib + 1022).unwrap();
        assert_eq!(b, [6, 6, 0, 0]);
        // Sector-aligned but still ascending only.
        let f = File::create(dir.path().join("t.vdi")).unwrap();
        let mut w = VdiWriter::new(f.into(), 4 * mib, true).unwrap();
        assert_eq!(w.granularity(), 512);
        w.write(1024, &[1; 512]).unwrap();
        assert!(w.write(512, &[1; 512]).is_err());
        assert!(w.write(1600, &[1; 512]).is_err());
    }

    #[test]
    fn dynamic_blocks_cost_only_their_nonzero_pieces() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vdi");
        let mib = 1u64 << 20;
        let mut block = vec![0u8; mib as usize];
        block[8192..12288].fill(3);
        block[mib as usize - 1] = 4;
        write_image(
            &p,
            8 * mib,
            false,
            &[(2 * mib, block.clone()), (5 * mib, block)],
        );
        let blocks = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(
            blocks < 256 << 10,
            "{blocks} bytes allocated for 16 KiB of data"
        );
        let img = super::super::reader::VdiImage::open(HostFile::open(&p).unwrap()).unwrap();
        assert_eq!(img.header().blocks_allocated, 2);
        let mut b = vec![9u8; mib as usize];
        img.read_at(&mut b, 5 * mib).unwrap();
        assert!(b[..8192].iter().all(|&x| x == 0));
        assert!(b[8192..12288].iter().all(|&x| x == 3));
        assert!(b[12288..mib as usize - 1].iter().all(|&x| x == 0));
        assert_eq!(b[mib as usize - 1], 4);
    }

    #[test]
    fn out_of_order_or_unaligned_writes_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("b.vdi")).unwrap();
        let mut w = VdiWriter::new(f.into(), 4 << 20, false).unwrap();
        assert!(w.write(512, &[1; 512]).is_err());
        w.write(1 << 20, &[1; 1 << 20]).unwrap();
        assert!(w.write(0, &[1; 1 << 20]).is_err());
        assert!(w.write(3 << 20, &[1; 2 << 20]).is_err());
    }

    #[test]
    fn oversized_images_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("c.vdi")).unwrap();
        let e = VdiWriter::new(f.into(), 1 << 50, false).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::LimitExceeded);
    }
}
