//! Writing a conversion into an existing monolithicFlat VMDK in place (`convert -n`): a
//! descriptor file naming one flat extent, which holds the guest bytes as they are.
//!
//! The guest bytes are overwritten in the extent, ranges zero in the source are zeroed (see
//! [`crate::inplace`]); the descriptor is not touched. The extent is a file the descriptor
//! names, so it is opened only through the reference gate (relative, inside the image's
//! folder, and only when referenced files may be opened: `InPlaceOptions::open`), and
//! locked like the descriptor. Refused before any write: anything but one read-write flat
//! extent covering the disk, a delta disk, an extent file shorter than the disk, and a disk
//! smaller than the conversion.

use std::fs::File;
use std::path::Path;

use super::descriptor::{Access, Descriptor, ExtentType};
use crate::error::{Error, Result};
use crate::inplace::{target_too_small, BlockMap, BlockWriter, InPlaceOptions};
use crate::writer::{lock_exclusive, EditFile, ImageWriter};

/// Largest descriptor file read.
const MAX_DESCRIPTOR: u64 = 64 << 10;
/// The pieces the extent is handled in (any size works: nothing is allocated).
const UNIT: u64 = 1 << 20;

/// Open the monolithicFlat VMDK whose descriptor `descriptor` (locked, kept open so it
/// stays locked) is at `path`, its text `text`.
pub fn open_in_place(
    descriptor: File,
    path: &Path,
    text: &[u8],
    opts: &InPlaceOptions,
) -> Result<Box<dyn ImageWriter>> {
    let refuse = |why: String| Err(Error::unsupported(why).with_path(path));
    if text.len() as u64 >= MAX_DESCRIPTOR {
        return refuse(format!(
            "the VMDK descriptor is {MAX_DESCRIPTOR} bytes or longer"
        ));
    }
    let d = Descriptor::parse(text).map_err(|e| e.with_path(path))?;
    if d.parent_cid.is_some_and(|c| c != u32::MAX) || d.parent_hint.is_some() {
        return refuse("a delta VMDK's unallocated sectors read its parent; writing into it in place is not supported".into());
    }
    let [e] = d.extents.as_slice() else {
        return refuse(format!(
            "the monolithicFlat descriptor lists {} extents, not one",
            d.extents.len()
        ));
    };
    if e.kind != ExtentType::Flat || e.access != Access::Rw {
        return refuse("the descriptor's extent is not a read-write FLAT extent".into());
    }
    let name = e.file.as_deref().unwrap_or_default();
    let extent = opts.open.resolve_reference(path, name, "extent")?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&extent)
        .map_err(|err| {
            Error::io("cannot open the flat extent for writing", err).with_path(&extent)
        })?;
    lock_exclusive(&file, &extent)?;
    let size = e.sectors * 512;
    if size < opts.size {
        return Err(target_too_small(size, opts.size));
    }
    let base = e.offset * 512;
    let len = file
        .metadata()
        .map_err(|err| Error::io("cannot stat the flat extent", err).with_path(&extent))?
        .len();
    if len < base + size {
        return refuse(format!(
            "the flat extent {} holds {len} bytes, fewer than the {} its descriptor gives it",
            extent.display(),
            base + size
        ));
    }
    let map = Flat {
        file: EditFile::new(file, &extent, opts.fail_at_write),
        base,
        _descriptor: descriptor,
    };
    Ok(Box::new(BlockWriter::new(map, opts, 64 << 10)))
}

/// The flat extent as [`BlockWriter`] uses it.
struct Flat {
    file: EditFile,
    base: u64,
    _descriptor: File,
}

impl BlockMap for Flat {
    fn block_size(&self) -> u64 {
        UNIT
    }
    fn file(&mut self) -> &mut EditFile {
        &mut self.file
    }
    fn stored(&mut self, b: u64) -> Result<Option<u64>> {
        Ok(Some(self.base + b * UNIT))
    }
    fn allocate(&mut self, _b: u64) -> Result<u64> {
        unreachable!("every range of a flat extent is stored")
    }
    fn commit(&mut self, _finish: bool) -> Result<()> {
        Ok(())
    }
}
