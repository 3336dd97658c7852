//! Writing a conversion into an existing VHDX in place (`convert -n`), dynamic or fixed,
//! keeping its block size, sector sizes, log and metadata.
//!
//! Before anything else, as the specification asks of a writer (and qemu does when it
//! opens an image read-write), both headers are rewritten in turn with the next sequence
//! numbers and new file and data write GUIDs, each write going to the header that is not
//! current, so one valid header is current at every step. Data then goes into the payload
//! blocks the BAT names as fully present, in place; a block in any other state (not
//! present, zero, unmapped) gets a new block past the end of the file, 1 MiB aligned, as
//! qemu appends them. In batches, once the new blocks' data is flushed, their BAT entries
//! (8 bytes each, written directly: each is inside one sector, so it is old or new after
//! any failure) are written, then flushed: a failure leaves every entry naming a block
//! that holds its data, or in its old state with its new block unreferenced at the end of
//! the file. Ranges zero in the source get zeros where a block is stored (see
//! [`crate::inplace`]).
//!
//! Refused before any write: differencing disks (their blocks read the parent sector by
//! sector through bitmaps), an image whose log still holds entries (an unclean shutdown:
//! open it once with Hyper-V or qemu to replay it), and an image smaller than the
//! conversion.

use std::fs::File;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::*;
use super::reader::open_image;
use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::inplace::{target_too_small, BlockMap, BlockWriter, InPlaceOptions};
use crate::options::OpenOptions;
use crate::writer::{random_uuid_v4, EditFile, ImageWriter};

/// New blocks a batch holds before their BAT entries are written.
const BATCH_BLOCKS: usize = 256;

/// The BAT as [`BlockWriter`] uses it.
struct VhdxMap {
    file: EditFile,
    /// One entry per payload block, with this batch's new ones.
    payload: Vec<u64>,
    chunk_ratio: u64,
    bat_offset: u64,
    block_size: u64,
    /// Where the next new block goes, and the file's length.
    end: u64,
    file_len: u64,
    pending: Vec<usize>,
}

/// Open the VHDX in `file` for a conversion to write into (see the module comment).
pub fn open_in_place(
    file: File,
    path: &Path,
    opts: &InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    let dup = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e).with_path(path))?;
    let img = open_image(
        HostFile::from_file(dup, path)?,
        &OpenOptions::new().without_backing(),
    )?;
    if img.params.has_parent {
        return Err(Error::unsupported(
            "a differencing VHDX cannot be written into in place: its blocks read the parent's data sector by sector; convert into a new image instead",
        )
        .with_path(path));
    }
    if img.replayed || img.header.log_guid != [0u8; 16] {
        return Err(Error::unsupported(
            "the VHDX log holds entries an unclean shutdown left: open the image once with Hyper-V or qemu (qemu-img check -r all) to replay them, then write into it",
        )
        .with_path(path));
    }
    if img.params.virtual_size < opts.size {
        return Err(target_too_small(img.params.virtual_size, opts.size));
    }
    let file_len = file
        .metadata()
        .map_err(|e| Error::io("cannot stat the image", e).with_path(path))?
        .len();
    let mut edit = EditFile::new(file, path, opts.fail_at_write);
    let mut header = img.header.clone();
    let mut current = img.current;
    for _ in 0..2 {
        header.sequence_number += 1;
        header.file_write_guid = random_uuid_v4();
        header.data_write_guid = random_uuid_v4();
        let slot = 1 - current;
        edit.write_at(
            &header.to_bytes(),
            HEADER_OFFSETS[slot],
            "writing a VHDX header with new write GUIDs",
        )?;
        edit.sync("flushing the VHDX header")?;
        current = slot;
    }
    let block_size = img.params.block_size;
    let map = VhdxMap {
        file: edit,
        payload: img.payload.clone(),
        chunk_ratio: img.chunk_ratio,
        bat_offset: img.bat_offset,
        block_size,
        end: file_len.next_multiple_of(MIB),
        file_len,
        pending: Vec::new(),
    };
    Ok(Box::new(BlockWriter::new(
        map,
        opts,
        block_size.min(64 << 10),
    )))
}

impl BlockMap for VhdxMap {
    fn block_size(&self) -> u64 {
        self.block_size
    }

    fn file(&mut self) -> &mut EditFile {
        &mut self.file
    }

    fn stored(&mut self, b: u64) -> Result<Option<u64>> {
        let e = self.payload[b as usize];
        Ok((bat_state(e) == PAYLOAD_FULLY_PRESENT).then(|| bat_offset(e)))
    }

    fn allocate(&mut self, b: u64) -> Result<u64> {
        let at = self.end;
        self.end = at + self.block_size;
        self.payload[b as usize] = bat_entry(PAYLOAD_FULLY_PRESENT, at);
        self.pending.push(b as usize);
        if at < self.file_len {
            let n = (self.file_len - at).min(self.block_size);
            self.file.zero_range(at, n, "zeroing a new VHDX block")?;
        }
        Ok(at)
    }

    fn commit(&mut self, finish: bool) -> Result<()> {
        if self.pending.is_empty() || (!finish && self.pending.len() < BATCH_BLOCKS) {
            return Ok(());
        }
        if self.file_len < self.end {
            self.file
                .set_len(self.end, "extending the VHDX to its new blocks")?;
            self.file_len = self.end;
        }
        self.file.sync("flushing the new VHDX blocks")?;
        self.pending.sort_unstable();
        let mut k = 0;
        while k < self.pending.len() {
            // Entries of consecutive blocks in one chunk are consecutive in the BAT.
            let first = self.pending[k];
            let chunk = first as u64 / self.chunk_ratio;
            let mut n = 1;
            while k + n < self.pending.len()
                && self.pending[k + n] == first + n
                && (first + n) as u64 / self.chunk_ratio == chunk
            {
                n += 1;
            }
            let mut buf = vec![0u8; n * 8];
            for (c, e) in buf.chunks_exact_mut(8).zip(&self.payload[first..first + n]) {
                LE::write_u64(c, *e);
            }
            let at = self.bat_offset + payload_index(first as u64, self.chunk_ratio) * 8;
            self.file.write_at(&buf, at, "writing VHDX BAT entries")?;
            k += n;
        }
        self.file.sync("flushing the VHDX BAT")?;
        self.pending.clear();
        Ok(())
    }
}
