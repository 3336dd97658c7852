//! A monolithicSparse VMDK opened for in-place changes: its header, descriptor and grain
//! directories, validated when opened (other kinds are refused with what to run instead).
//! Resize (`resize.rs`), discard (`discard.rs`) and a conversion into the image with
//! `-n` (`inplace.rs`) each change it; `mod.rs` dispatches to them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::descriptor::{Descriptor, ExtentType};
use super::sparse::{
    write_unclean_shutdown, SparseHeader, FLAG_MARKERS, FLAG_RGD, GD_AT_END, KDMV_MAGIC, SECTOR,
};
use crate::device::{HostFile, ImageEditor};
use crate::error::{Error, Result};
use crate::options::{OpenOptions, ResizeOptions};
use crate::writer::EditFile;

/// How to write a resized copy instead, for the refusals.
const CONVERT_HINT: &str =
    "write a new copy instead: convert to vmdk with a target size (ConvertOptions::target_size) to resize, or sparsify into a new image";

/// An opened monolithicSparse VMDK, ready to change size.
#[derive(Debug)]
pub struct VmdkEditor {
    pub(super) file: EditFile,
    pub(super) path: PathBuf,
    pub(super) header: SparseHeader,
    /// The descriptor text as stored (up to its first NUL).
    pub(super) desc: String,
    /// Grain directory and redundant directory (empty when there is none).
    pub(super) gd: Vec<u32>,
    pub(super) rgd: Vec<u32>,
    /// This editor set the header's uncleanShutdown flag ([`VmdkEditor::mark_changing`]).
    marked: bool,
}

fn refuse(what: &str, path: &Path) -> Error {
    Error::unsupported(format!(
        "{what}: only monolithicSparse VMDKs are changed in place (resized, or sparsified with --in-place); {CONVERT_HINT}"
    ))
    .with_path(path)
}

/// Open a monolithicSparse VMDK for resizing; everything else is refused with the reason.
/// The reader's checks run first, then every directory entry is checked to name a whole
/// grain table inside the file, before any write.
pub fn open_editor(file: File, path: &Path, opts: &ResizeOptions) -> Result<Box<dyn ImageEditor>> {
    Ok(Box::new(open_vmdk(file, path, opts.fail_at_write)?))
}

/// [`open_editor`]'s editor itself, with `fail_at` as its test hook.
pub(super) fn open_vmdk(file: File, path: &Path, fail_at: Option<u64>) -> Result<VmdkEditor> {
    let dup = || {
        file.try_clone()
            .map_err(|e| Error::io("cannot duplicate the image's descriptor", e).with_path(path))
    };
    let host = HostFile::from_file(dup()?, path)?;
    let len = host.len();
    let head = host.read_vec(0, len.min(512), "VMDK header")?;
    if head.len() < 512 || LE::read_u32(&head[..4]) != KDMV_MAGIC {
        let kind = match Descriptor::parse(&head) {
            Ok(d) if d.create_type.is_some() => format!(
                "a {} VMDK keeps its data in extent files named by this descriptor",
                d.create_type.unwrap_or_default()
            ),
            _ => "this VMDK is not a hosted sparse extent (KDMV)".to_string(),
        };
        return Err(refuse(&kind, path));
    }
    let header = SparseHeader::parse(&head).map_err(|e| e.with_path(path))?;
    if header.compressed() || header.flags & FLAG_MARKERS != 0 || header.gd_offset == GD_AT_END {
        return Err(refuse(
            "a streamOptimized VMDK is written once, in order, with compressed grains packed back to back: there is no room to grow its tables, and a freed grain's space cannot be given back",
            path,
        ));
    }
    if header.desc_offset == 0 || header.desc_size == 0 {
        return Err(refuse(
            "this sparse extent has no embedded descriptor (it belongs to a split or descriptor-file VMDK)",
            path,
        ));
    }
    let raw = host.read_vec(
        header.desc_offset * SECTOR,
        header.desc_size * SECTOR,
        "embedded descriptor",
    )?;
    let d = Descriptor::parse(&raw).map_err(|e| e.with_path(path))?;
    match d.create_type.as_deref() {
        Some("monolithicSparse") => {}
        other => {
            return Err(refuse(
                &format!(
                    "createType {:?} keeps its data elsewhere",
                    other.unwrap_or("(none)")
                ),
                path,
            ))
        }
    }
    if d.parent_cid.is_some_and(|c| c != u32::MAX) || d.parent_hint.is_some() {
        return Err(refuse(
            "a delta disk's size is its parent's (a grown delta would read new space from a parent that has none)",
            path,
        ));
    }
    if d.extents.len() != 1
        || d.extents[0].kind != ExtentType::Sparse
        || d.extents[0].sectors != header.capacity
    {
        return Err(refuse(
            &format!(
                "the embedded descriptor lists {} extents, not one SPARSE extent of the header's {} sectors",
                d.extents.len(),
                header.capacity
            ),
            path,
        ));
    }
    if header.desc_offset != 1 {
        return Err(refuse(
            &format!(
                "the embedded descriptor sits at sector {}, not right after the header, so the two cannot switch in one write",
                header.desc_offset
            ),
            path,
        ));
    }
    super::reader::open(
        HostFile::from_file(dup()?, path)?,
        &OpenOptions::new().without_backing(),
    )?;
    header.validate(len).map_err(|e| e.with_path(path))?;
    let entries = header.gd_entries()?;
    let load = |at: u64, field: &str| -> Result<Vec<u32>> {
        let raw = host.read_vec(at * SECTOR, entries * 4, "grain directory")?;
        let gd: Vec<u32> = raw.chunks_exact(4).map(LE::read_u32).collect();
        let gt_bytes = u64::from(header.num_gtes_per_gt) * 4;
        for (i, &e) in gd.iter().enumerate() {
            if e != 0 && u64::from(e) * SECTOR + gt_bytes > len {
                return Err(Error::corrupt(format!(
                    "{field} entry {i} names a grain table at sector {e}, past the end of the file"
                ))
                .with_field(field.to_string())
                .at(at * SECTOR + 4 * i as u64)
                .with_path(path));
            }
        }
        Ok(gd)
    };
    let gd = load(header.gd_offset, "gdOffset")?;
    let rgd = if header.flags & FLAG_RGD != 0 && header.rgd_offset != 0 {
        load(header.rgd_offset, "rgdOffset")?
    } else {
        Vec::new()
    };
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Ok(VmdkEditor {
        file: EditFile::new(file, path, fail_at),
        path: path.to_path_buf(),
        header,
        desc: String::from_utf8_lossy(&raw[..end]).into_owned(),
        gd,
        rgd,
        marked: false,
    })
}

impl VmdkEditor {
    /// Before a change's first table write: the header's uncleanShutdown byte set and
    /// flushed, as VMware marks an image it has open. A change cut off between a grain
    /// table and its redundant copy is then told from damage (`check` counts the stale
    /// copy as a leak, which `-r leaks` mends, not as a corruption). An image that came
    /// marked is left marked.
    pub(super) fn mark_changing(&mut self) -> Result<()> {
        if self.marked || self.header.unclean_shutdown {
            return Ok(());
        }
        write_unclean_shutdown(&mut self.file, true)?;
        self.marked = true;
        Ok(())
    }

    /// After a change's last flush: the flag [`Self::mark_changing`] set, cleared.
    pub(super) fn unmark_changing(&mut self) -> Result<()> {
        if !self.marked {
            return Ok(());
        }
        write_unclean_shutdown(&mut self.file, false)?;
        self.marked = false;
        Ok(())
    }

    pub(super) fn grain_bytes(&self) -> u64 {
        self.header.grain_size * SECTOR
    }

    pub(super) fn gt_bytes(&self) -> u64 {
        u64::from(self.header.num_gtes_per_gt) * 4
    }

    pub(super) fn file_len(&self) -> Result<u64> {
        Ok(self
            .file
            .file()
            .metadata()
            .map_err(|e| Error::io("cannot stat the image", e).with_path(&self.path))?
            .len())
    }

    pub(super) fn read_gt(&self, sector: u32) -> Result<Vec<u32>> {
        let mut b = vec![0u8; self.gt_bytes() as usize];
        let at = u64::from(sector) * SECTOR;
        self.file.file().read_exact_at(&mut b, at).map_err(|e| {
            Error::io("reading a VMDK grain table", e)
                .at(at)
                .with_path(&self.path)
        })?;
        Ok(b.chunks_exact(4).map(LE::read_u32).collect())
    }
}
