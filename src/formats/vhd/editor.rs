//! A VHD opened for in-place changes: its layout (fixed, or dynamic with its BAT and
//! dynamic header), validated when opened. Resize (`resize.rs`), discard (`discard.rs`)
//! and a conversion into the image with `-n` (`inplace.rs`) each change it; `mod.rs`
//! dispatches to them.

use std::fs::File;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};

use super::dynheader::{DynHeader, DYN_HEADER_SIZE};
use super::footer::{DiskType, Footer, FOOTER_SIZE};
use crate::device::{HostFile, ImageEditor};
use crate::error::{Error, Result};
use crate::options::{OpenOptions, ResizeOptions};
use crate::writer::EditFile;

/// BAT value of an unallocated block.
pub(super) const UNALLOCATED: u32 = u32::MAX;

pub(super) const SECTOR: u64 = 512;

/// An opened VHD, ready to change size.
#[derive(Debug)]
pub struct VhdEditor {
    pub(super) file: EditFile,
    pub(super) path: PathBuf,
    pub(super) size: u64,
    /// The footer the image is read by, as stored (the head copy of a dynamic disk).
    pub(super) footer_raw: [u8; FOOTER_SIZE],
    pub(super) layout: Layout,
}

#[derive(Debug)]
pub(super) enum Layout {
    Fixed { footer_at: u64 },
    Dynamic(Box<Dynamic>),
}

#[derive(Debug)]
pub(super) struct Dynamic {
    pub(super) hdr_at: u64,
    pub(super) hdr_raw: [u8; DYN_HEADER_SIZE],
    pub(super) hdr: DynHeader,
    /// All `max_table_entries` entries.
    pub(super) bat: Vec<u32>,
    /// Where the tail footer is.
    pub(super) tail_at: u64,
}

impl Dynamic {
    pub(super) fn stride(&self) -> u64 {
        self.hdr.bitmap_size() + u64::from(self.hdr.block_size)
    }
    pub(super) fn bat_end(&self, entries: u64) -> u64 {
        self.hdr.table_offset + (entries * 4).next_multiple_of(SECTOR)
    }
    /// End of the last structure or block before the tail footer.
    pub(super) fn data_end(&self) -> u64 {
        let blocks = self
            .bat
            .iter()
            .filter(|&&e| e != UNALLOCATED)
            .map(|&e| u64::from(e) * SECTOR + self.stride())
            .max()
            .unwrap_or(0);
        blocks
            .max(self.hdr_at + DYN_HEADER_SIZE as u64)
            .max(self.bat_end(self.bat.len() as u64))
    }
}

/// Open a VHD for resizing: the reader's checks first (without opening any parent), then
/// the layout the editor relies on: a whole footer at the end, blocks that overlap neither
/// each other nor the headers and BAT.
pub fn open_editor(file: File, path: &Path, opts: &ResizeOptions) -> Result<Box<dyn ImageEditor>> {
    Ok(Box::new(open_vhd(file, path, opts.fail_at_write)?))
}

/// [`open_editor`]'s editor itself, with `fail_at` as its test hook.
pub(super) fn open_vhd(file: File, path: &Path, fail_at: Option<u64>) -> Result<VhdEditor> {
    let dup = || {
        file.try_clone()
            .map_err(|e| Error::io("cannot duplicate the image's descriptor", e).with_path(path))
    };
    let host = HostFile::from_file(dup()?, path)?;
    let len = host.len();
    if len < FOOTER_SIZE as u64 {
        return Err(Error::invalid(format!(
            "file of {len} bytes is too small for a VHD footer ({FOOTER_SIZE} bytes)"
        ))
        .with_path(path));
    }
    let mut tail = [0u8; FOOTER_SIZE];
    host.read_exact_at(&mut tail, len - FOOTER_SIZE as u64, "VHD footer")?;
    let mut head = [0u8; FOOTER_SIZE];
    host.read_exact_at(&mut head, 0, "VHD footer copy")?;
    let no_tail = || {
        Error::unsupported(
            "the VHD has no whole 512-byte footer in its last sector; convert it (diskconv convert) to rewrite it",
        )
        .with_field("footer")
        .at(len - FOOTER_SIZE as u64)
        .with_path(path)
    };
    let tail_footer = Footer::parse(&tail);
    let (footer_raw, footer) = match &tail_footer {
        Ok(f) if f.disk_type == DiskType::Fixed => (tail, f.clone()),
        _ => match Footer::parse(&head) {
            Ok(f) if f.disk_type != DiskType::Fixed => (head, f),
            _ => return Err(no_tail()),
        },
    };
    if footer.disk_type == DiskType::Differencing {
        return Err(Error::unsupported(
            "differencing VHDs cannot be changed in place: their size is their parent's and their unallocated blocks read from it (a grown child would read new space from a parent that has none, a discarded block would show the parent's data); resize or sparsify the parent, or make a standalone copy by converting with a target size (ConvertOptions::target_size)",
        )
        .with_field("footer.disk_type")
        .with_path(path));
    }
    // Only now the reader's checks (parents are never opened: differencing was refused).
    let size = super::reader::open(
        HostFile::from_file(dup()?, path)?,
        &OpenOptions::new().without_backing(),
    )?
    .virtual_size();
    let layout = if footer.disk_type == DiskType::Fixed {
        Layout::Fixed {
            footer_at: len - FOOTER_SIZE as u64,
        }
    } else {
        if tail_footer.is_err() {
            return Err(no_tail());
        }
        let hdr_at = footer.data_offset;
        let mut hdr_raw = [0u8; DYN_HEADER_SIZE];
        host.read_exact_at(&mut hdr_raw, hdr_at, "VHD dynamic header")?;
        let hdr = DynHeader::parse(&hdr_raw).map_err(|e| e.at(hdr_at).with_path(path))?;
        let entries = u64::from(hdr.max_table_entries);
        let raw = host.read_vec(hdr.table_offset, entries * 4, "VHD BAT")?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(BigEndian::read_u32).collect();
        let d = Dynamic {
            hdr_at,
            hdr_raw,
            hdr,
            bat,
            tail_at: len - FOOTER_SIZE as u64,
        };
        check_layout(&d, path)?;
        Layout::Dynamic(Box::new(d))
    };
    Ok(VhdEditor {
        file: EditFile::new(file, path, fail_at),
        path: path.to_path_buf(),
        size,
        footer_raw,
        layout,
    })
}

/// Blocks must not overlap each other, the footer copy, the dynamic header, the BAT or
/// the tail footer: moving one must never clobber another.
fn check_layout(d: &Dynamic, path: &Path) -> Result<()> {
    let mut spans: Vec<(u64, u64, String)> = vec![
        (0, FOOTER_SIZE as u64, "the footer copy".into()),
        (
            d.hdr_at,
            d.hdr_at + DYN_HEADER_SIZE as u64,
            "the dynamic header".into(),
        ),
        (
            d.hdr.table_offset,
            d.hdr.table_offset + d.bat.len() as u64 * 4,
            "the BAT".into(),
        ),
        (
            d.tail_at,
            d.tail_at + FOOTER_SIZE as u64,
            "the tail footer".into(),
        ),
    ];
    for (i, &e) in d.bat.iter().enumerate() {
        if e != UNALLOCATED {
            let s = u64::from(e) * SECTOR;
            spans.push((s, s + d.stride(), format!("block {i}")));
        }
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(Error::corrupt(format!(
                "VHD {} (at {:#x}) overlaps {} (at {:#x}); resizing would damage it",
                w[1].2, w[1].0, w[0].2, w[0].0
            ))
            .with_field("BAT")
            .at(w[1].0)
            .with_path(path));
        }
    }
    Ok(())
}

impl VhdEditor {
    pub(super) fn write_entries(
        &mut self,
        d: &Dynamic,
        first: u64,
        entries: &[u32],
        what: &str,
    ) -> Result<()> {
        let mut b = vec![0u8; entries.len() * 4];
        for (c, &e) in b.chunks_exact_mut(4).zip(entries) {
            BigEndian::write_u32(c, e);
        }
        self.file.write_at(&b, d.hdr.table_offset + first * 4, what)
    }
}
