//! `sparsify`: read the guest's partition tables and filesystems ([`crate::guest`]) and
//! drop the blocks they mark free, either while copying into a new image of any format
//! (the convert engine over a [`GuestFree`] device) or in place through the format's
//! editor ([`ImageEditor::discard`](crate::device::ImageEditor::discard)).

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::convert::{ConvertOptions, ConvertReport};
use crate::device::{BlockDevice, HostFile};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::formats::{open_editor, open_with};
use crate::guest::{self, GuestFree, PartitionReport};
use crate::options::ResizeOptions;

/// Options of [`sparsify`] and [`sparsify_in_place`].
#[derive(Clone)]
pub struct SparsifyOptions<'a> {
    /// How the source is opened (`convert.open`: `-f`, references) and, for a copy, how
    /// the output is written (format, `-o`, `-c`, `-S`, threads, progress, digests).
    pub convert: ConvertOptions<'a>,
}

impl<'a> SparsifyOptions<'a> {
    /// Copy into `format` with convert's defaults.
    pub fn new(format: Format) -> Self {
        SparsifyOptions {
            convert: ConvertOptions::new(format),
        }
    }
}

/// What a sparsify did: one line per partition, and the totals.
#[derive(Debug, Clone, Serialize)]
pub struct SparsifyReport {
    /// The partition table found: "gpt", "mbr", "none" or "untrusted".
    pub table: String,
    /// One entry per partition (and per logical volume), in disk order.
    pub partitions: Vec<PartitionReport>,
    /// Notes that are not a partition's (a GPT read from its backup header).
    pub notes: Vec<String>,
    /// Guest bytes the filesystems mark free and that were dropped (they read as zeros
    /// in the result).
    pub dropped_bytes: u64,
    /// Guest size.
    pub virtual_size: u64,
    /// A copy: the bytes of the output written. In place: the bytes the image file
    /// occupies on its filesystem afterwards.
    pub output_size: u64,
    /// In place: the bytes the image file occupied before.
    pub size_before: Option<u64>,
    /// A copy: the conversion's own report (warnings, digests).
    #[serde(skip)]
    pub convert: Option<ConvertReport>,
}

impl SparsifyReport {
    fn from_scan(scan: &guest::GuestScan, virtual_size: u64) -> Self {
        SparsifyReport {
            table: scan.table.clone(),
            partitions: scan.partitions.clone(),
            notes: scan.notes.clone(),
            dropped_bytes: scan.free.free_bytes(),
            virtual_size,
            output_size: 0,
            size_before: None,
            convert: None,
        }
    }
}

fn scanned(
    src: &Path,
    opts: &SparsifyOptions,
) -> Result<(GuestFree<Box<dyn BlockDevice>>, SparsifyReport)> {
    let dev = open_with(src, &opts.convert.open)?;
    let scan = guest::scan(dev.as_ref()).map_err(|e| e.with_path(src))?;
    let report = SparsifyReport::from_scan(&scan, dev.virtual_size());
    Ok((GuestFree::new(dev, scan.free), report))
}

/// Copy the image at `src` into a new image `dst` (any output format, options as for
/// [`convert`](crate::convert())), with every block the guest's filesystems mark free
/// read as zeros and left unallocated. `src` is only ever read; `dst` is checked and
/// opened first and written atomically, as by convert.
pub fn sparsify(src: &Path, dst: &Path, opts: &SparsifyOptions) -> Result<SparsifyReport> {
    crate::ops::convert::refuse_same_file(src, dst)?;
    let dest = crate::ops::convert::open_output(dst, &opts.convert)?;
    let (dev, mut report) = scanned(src, opts)?;
    let r = crate::ops::convert::convert_into(&dev, dest, &opts.convert)?;
    report.output_size = r.size;
    report.convert = Some(r);
    Ok(report)
}

/// [`sparsify`] into a stream (a pipe, stdout, an upload body), for output formats that
/// stream; others are refused before anything is written.
pub fn sparsify_to_writer(
    src: &Path,
    sink: impl Write + Send + 'static,
    opts: &SparsifyOptions,
) -> Result<SparsifyReport> {
    let (dev, mut report) = scanned(src, opts)?;
    let r = crate::ops::stream::convert_to_writer(&dev, sink, &opts.convert)?;
    report.output_size = r.size;
    report.convert = Some(r);
    Ok(report)
}

/// Runs handed to the editor at once: bounds the memory of a fragmented free map.
const DISCARD_BATCH: usize = 4096;

/// Sparsify the image at `path` in place: the blocks the guest's filesystems mark free
/// are given back through the format's editor (raw: holes punched; qcow2: clusters
/// discarded; vpc, vdi, vmdk: blocks that become wholly free unallocated where the format
/// allows). A format whose editor can free nothing in place is refused, with the
/// reason, before the image is scanned or written.
///
/// One writable handle only: the editor's, opened (and locked) first so no other
/// diskconv edits the image meanwhile; the scan reads through a read-only handle. The
/// free runs are discarded in batches; each batch is one of the editor's atomic edits,
/// so a failure leaves the image reading as before that batch (the runs already given
/// back were free, so the guest sees no difference either way).
pub fn sparsify_in_place(path: &Path, opts: &SparsifyOptions) -> Result<SparsifyReport> {
    let format = match opts.convert.open.format {
        Some(f) => f,
        None => crate::probe::probe_file(&HostFile::open(path)?)?,
    };
    let before = allocated(path)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("cannot open the image for writing", e).with_path(path))?;
    let ropts = ResizeOptions {
        format: Some(format),
        ..Default::default()
    };
    // A format that cannot be edited in place at all answers with its editor's refusal,
    // which speaks of resizing too: say what sparsify cannot do and what to run instead.
    let mut editor = open_editor(format, file, path, &ropts).map_err(|e| {
        if e.kind() != crate::ErrorKind::Unsupported {
            return e;
        }
        Error::unsupported(format!(
            "cannot sparsify a {format} image in place (diskconv does not change {format} \
             images in place); write a sparsified copy instead: diskconv sparsify {} NEW \
             (then replace the image with NEW)",
            path.display()
        ))
        .with_path(path)
    })?;
    editor.discard(&[]).map_err(|e| {
        Error::new(
            e.kind(),
            format!(
                "cannot sparsify this {format} image in place: {}",
                e.message()
            ),
        )
        .with_path(path)
    })?;
    let mut open = opts.convert.open.clone();
    open.format = Some(format);
    let dev = open_with(path, &open)?;
    let scan = guest::scan(dev.as_ref()).map_err(|e| e.with_path(path))?;
    let mut report = SparsifyReport::from_scan(&scan, dev.virtual_size());
    drop(dev);
    if editor.virtual_size() != scan.free.size() {
        return Err(Error::arg(format!(
            "the image's size changed while it was scanned ({} then {} bytes)",
            scan.free.size(),
            editor.virtual_size()
        ))
        .with_path(path));
    }
    let mut dropped = 0;
    let mut batch = Vec::with_capacity(DISCARD_BATCH);
    for run in scan.free.runs() {
        batch.push(run);
        if batch.len() == DISCARD_BATCH {
            dropped += editor.discard(&batch).map_err(|e| e.with_path(path))?;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        dropped += editor.discard(&batch).map_err(|e| e.with_path(path))?;
    }
    drop(editor);
    report.dropped_bytes = dropped;
    report.size_before = Some(before);
    report.output_size = allocated(path)?;
    Ok(report)
}

fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)
        .map_err(|e| Error::io("cannot stat the image", e).with_path(path))?;
    Ok(m.blocks() * 512)
}
