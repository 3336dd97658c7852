//! Writing a conversion into an existing VDI in place (`convert -n`), dynamic or static,
//! keeping its block size and type.
//!
//! Data goes into the blocks the map names, in place; a block not stored gets the next
//! data block (index `blocks_allocated`, past every other), zeros until written. In
//! batches, once the new blocks' data is written and flushed, one write of the header
//! (the new `blocks_allocated`) and the map's changed prefix, which sit together from
//! offset 0, switches to them: a failure before it leaves the image as it was plus
//! unreferenced bytes past its last block, after it the batch is in. Ranges zero in the
//! source get zeros where a block is stored (see [`crate::inplace`]).
//!
//! Refused before any write: differencing and undo images, an image smaller than the
//! conversion, and a block map that is not the permutation qemu-img check expects.

use std::fs::File;
use std::path::Path;

use super::editor::{is_data, open_vdi, VdiEditor};
use super::header::{ImageType, HEADER_BLOCK};
use crate::error::{Error, Result};
use crate::inplace::{target_too_small, BlockMap, BlockWriter, InPlaceOptions};
use crate::writer::{EditFile, ImageWriter};

/// New blocks a batch holds before its header and map are written.
const BATCH_BLOCKS: u64 = 1024;

/// The block map as [`BlockWriter`] uses it.
struct VdiMap {
    ed: VdiEditor,
    /// The map with this batch's new entries.
    map: Vec<u32>,
    /// `blocks_allocated` with this batch's new blocks.
    allocated: u32,
    /// New blocks in this batch, and the end of the map's changed prefix.
    pending: u64,
    changed_end: usize,
    file_len: u64,
}

/// Open the VDI in `file` for a conversion to write into (see the module comment).
pub fn open_in_place(
    file: File,
    path: &Path,
    opts: &InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    let ed = open_vdi(file, path, opts.fail_at_write)?;
    if !matches!(ed.header.image_type, ImageType::Dynamic | ImageType::Static) {
        return Err(Error::unsupported(format!(
            "a VDI of type {:?} cannot be written into in place (only dynamic and static ones)",
            ed.header.image_type
        ))
        .with_path(path));
    }
    let size = ed.header.virtual_size();
    if size < opts.size {
        return Err(target_too_small(size, opts.size));
    }
    let gran = ed.bs().min(64 << 10);
    let map = VdiMap {
        map: ed.bmap.clone(),
        allocated: ed.header.blocks_allocated,
        pending: 0,
        changed_end: 0,
        file_len: ed.file_len()?,
        ed,
    };
    Ok(Box::new(BlockWriter::new(map, opts, gran)))
}

impl VdiMap {
    fn data(&self) -> u64 {
        u64::from(self.ed.header.offset_data)
    }
}

impl BlockMap for VdiMap {
    fn block_size(&self) -> u64 {
        self.ed.bs()
    }

    fn file(&mut self) -> &mut EditFile {
        &mut self.ed.file
    }

    fn stored(&mut self, b: u64) -> Result<Option<u64>> {
        let e = self.map[b as usize];
        Ok(is_data(e).then(|| self.ed.host(self.data(), u64::from(e))))
    }

    fn allocate(&mut self, b: u64) -> Result<u64> {
        let idx = self.allocated;
        self.allocated = idx.checked_add(1).ok_or_else(|| {
            Error::limit("the VDI would hold more than 2^32 data blocks").with_path(&self.ed.path)
        })?;
        self.map[b as usize] = idx;
        self.changed_end = self.changed_end.max(b as usize + 1);
        self.pending += 1;
        let host = self.ed.host(self.data(), u64::from(idx));
        // Bytes a shorter image left past its last block must not show.
        if host < self.file_len {
            let n = (self.file_len - host).min(self.ed.bs());
            self.ed
                .file
                .zero_range(host, n, "zeroing a new VDI block")?;
        }
        Ok(host)
    }

    fn commit(&mut self, finish: bool) -> Result<()> {
        if self.pending == 0 || (!finish && self.pending < BATCH_BLOCKS) {
            return Ok(());
        }
        // Every new block whole in the file, its data flushed, before the map names it.
        let end = self.ed.host(self.data(), u64::from(self.allocated));
        if self.file_len < end {
            self.ed
                .file
                .set_len(end, "extending the VDI to its new blocks")?;
            self.file_len = end;
        }
        self.ed.file.sync("flushing the new VDI blocks")?;
        let mut h = self.ed.header.clone();
        h.blocks_allocated = self.allocated;
        let buf = self.ed.head_and_map(&h, &self.map[..self.changed_end])?;
        debug_assert!(buf.len() >= HEADER_BLOCK);
        self.ed
            .file
            .write_at(&buf, 0, "writing the VDI header and its block map")?;
        self.ed.file.sync("flushing the VDI header and block map")?;
        self.ed.header = h;
        self.ed.bmap.clone_from(&self.map);
        self.pending = 0;
        self.changed_end = 0;
        Ok(())
    }
}
