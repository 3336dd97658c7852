//! A VDI opened for in-place changes: its header and block map, validated when opened.
//! Resize (`resize.rs`), discard (`discard.rs`) and a conversion into the image with
//! `-n` (`inplace.rs`) each change it; `mod.rs` dispatches to them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::{VdiHeader, BLOCK_DISCARDED, BLOCK_UNALLOCATED, HEADER_BLOCK};
use super::reader::VdiImage;
use crate::device::{HostFile, ImageEditor};
use crate::error::{Error, Result};
use crate::options::ResizeOptions;
use crate::writer::EditFile;

/// An opened VDI, ready to change size.
#[derive(Debug)]
pub struct VdiEditor {
    pub(super) file: EditFile,
    pub(super) path: PathBuf,
    pub(super) header: VdiHeader,
    /// All `blocks_in_image` entries.
    pub(super) bmap: Vec<u32>,
}

pub(super) fn is_data(e: u32) -> bool {
    e != BLOCK_UNALLOCATED && e != BLOCK_DISCARDED
}

/// Open a VDI for resizing: the reader's checks run first, then the whole block map is
/// checked to be the permutation qemu-img check expects, all before any write.
pub fn open_editor(file: File, path: &Path, opts: &ResizeOptions) -> Result<Box<dyn ImageEditor>> {
    Ok(Box::new(open_vdi(file, path, opts.fail_at_write)?))
}

/// [`open_editor`]'s editor itself, with `fail_at` as its test hook.
pub(super) fn open_vdi(file: File, path: &Path, fail_at: Option<u64>) -> Result<VdiEditor> {
    let clone = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e).with_path(path))?;
    let host = HostFile::from_file(clone, path)?;
    let img = VdiImage::open(host)?;
    let header = img.header().clone();
    drop(img);
    let host = HostFile::from_file(
        file.try_clone()
            .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?,
        path,
    )?;
    let raw = host.read_vec(
        u64::from(header.offset_bmap),
        header.bmap_len(),
        "VDI block map",
    )?;
    let bmap: Vec<u32> = raw.chunks_exact(4).map(LE::read_u32).collect();
    let mut seen = vec![false; header.blocks_allocated as usize];
    let mut count = 0u64;
    for (i, &e) in bmap.iter().enumerate() {
        if !is_data(e) {
            continue;
        }
        let at = u64::from(header.offset_bmap) + i as u64 * 4;
        let bad = |msg: String| {
            Error::corrupt(format!("{msg}; run qemu-img check before resizing"))
                .with_field("block map entry")
                .at(at)
                .with_path(path)
        };
        match seen.get_mut(e as usize) {
            None => {
                return Err(bad(format!(
                    "VDI block {i} points at data block {e}, past blocks_allocated {}",
                    header.blocks_allocated
                )))
            }
            Some(true) => return Err(bad(format!("VDI data block {e} is used twice"))),
            Some(s) => *s = true,
        }
        count += 1;
    }
    if count != u64::from(header.blocks_allocated) {
        return Err(Error::corrupt(format!(
            "VDI block map holds {count} allocated blocks but blocks_allocated says {}; run qemu-img check before resizing",
            header.blocks_allocated
        ))
        .with_field("blocks_allocated")
        .at(0x184)
        .with_path(path));
    }
    Ok(VdiEditor {
        file: EditFile::new(file, path, fail_at),
        path: path.to_path_buf(),
        header,
        bmap,
    })
}

impl VdiEditor {
    pub(super) fn bs(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    /// Host offset of data block `idx` when the data area starts at `data`.
    pub(super) fn host(&self, data: u64, idx: u64) -> u64 {
        data + idx * self.bs()
    }

    pub(super) fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .file()
            .metadata()
            .map_err(|e| Error::io("cannot stat the image", e).with_path(&self.path))?
            .len())
    }

    /// The bytes `[0, offset_bmap + entries*4)`: `header`, whatever lies between it and the
    /// map (kept as it is), then `map`.
    pub(super) fn head_and_map(&self, header: &VdiHeader, map: &[u32]) -> Result<Vec<u8>> {
        let bmap_off = header.offset_bmap as usize;
        let mut buf = vec![0u8; bmap_off + map.len() * 4];
        buf[..HEADER_BLOCK].copy_from_slice(&header.to_bytes());
        if bmap_off > HEADER_BLOCK {
            self.file
                .file()
                .read_exact_at(&mut buf[HEADER_BLOCK..bmap_off], HEADER_BLOCK as u64)
                .map_err(|e| Error::io("reading the VDI header area", e).with_path(&self.path))?;
        }
        for (c, &e) in buf[bmap_off..].chunks_exact_mut(4).zip(map) {
            LE::write_u32(c, e);
        }
        Ok(buf)
    }
}
