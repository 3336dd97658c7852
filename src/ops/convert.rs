//! `convert` on files: open the destination (checked first), open the source through the
//! format dispatch, run the engine ([`crate::convert::convert_device`]), commit.

use std::path::Path;

use crate::convert::{convert_device, plan_allocation_with, ConvertOptions, ConvertReport};
use crate::device::BlockDevice;
use crate::error::{Error, Result, Side};
use crate::format::Format;
use crate::formats::{
    check_in_place, create_planned_writer, create_writer, open_in_place_writer, plan_encoder,
    plan_granularity,
};
use crate::inplace::InPlaceOptions;
use crate::options::OpenOptions;
use crate::writer::{Digester, ImageWriter, Output, OutputKind, OutputOptions, Sink};

/// The outputs that can be written to a pipe or character device, for error messages
/// (each such writer answers true to [`ImageWriter::streams`]).
pub const STREAMING_OUTPUTS: &str =
    "raw, qcow2, vdi, dynamic vpc and monolithicSparse vmdk and dynamic vhdx (laid out from a first pass over the source), fixed vpc and fixed vhdx, vmdk with -o subformat=streamOptimized, ova";

/// Convert the image at `src` into the image `dst`; `src` is only ever opened read-only.
///
/// `dst` is checked and opened before `src` is opened, so a bad destination (a folder, a
/// missing or read-only folder) fails before anything is read. A new or existing regular
/// file is written to a temporary sibling and renamed at the end (through a symlink, at
/// the file it points to), so on error nothing is left at `dst`. A block device is written
/// in place and must be large enough; a FIFO or character device (`/dev/stdout`) is
/// written sequentially, for output formats that stream. See [`Output`].
pub fn convert(src: &Path, dst: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    refuse_same_file(src, dst)?;
    let dest = open_output(dst, opts)?;
    let dev = super::open_source(src, &opts.open).map_err(|e| e.on_side(Side::Source))?;
    convert_into(dev.as_ref(), dest, opts)
}

/// [`convert`] from an already opened device into the image `dst`.
pub fn convert_to_path(
    src: &dyn BlockDevice,
    dst: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let dest = open_output(dst, opts)?;
    convert_into(src, dest, opts)
}

/// Where a conversion writes, opened before the source.
pub(crate) enum Dest {
    /// A new or replaced file, a raw file or block device written in place, a stream.
    Output(Output, Sink),
    /// An existing image of the output format (not raw), written in place by its format's
    /// in-place writer: the file, opened read-write, and its path.
    Image(std::fs::File, std::path::PathBuf),
}

pub(crate) fn open_output(dst: &Path, opts: &ConvertOptions) -> Result<Dest> {
    if opts.target_is_zero && !opts.existing_target {
        return Err(Error::arg(
            "target_is_zero needs existing_target: only an existing image can already read as zeros",
        )
        .with_option("ConvertOptions::target_is_zero"));
    }
    if opts.existing_target {
        check_in_place(opts.format).map_err(|e| e.with_path(dst))?;
        // qemu-img refuses -o with -n too: the image's own options stay.
        if let Some(k) = opts.create.options.keys().next() {
            return Err(Error::arg(format!(
                "creation option '{k}' has no effect when writing into an existing image (ConvertOptions::existing_target): the image keeps its own options"
            ))
            .with_path(dst));
        }
        if opts.format != Format::Raw {
            return open_image(dst)
                .map(|(f, p)| Dest::Image(f, p))
                .map_err(|e| e.on_side(Side::Destination));
        }
    }
    Output::open(
        dst,
        &OutputOptions {
            existing: opts.existing_target,
            target_is_zero: opts.target_is_zero,
        },
    )
    .map(|(o, s)| Dest::Output(o, s))
    .map_err(|e| e.on_side(Side::Destination))
}

/// Open the existing image `dst` (a regular file or a block device) read-write.
fn open_image(dst: &Path) -> Result<(std::fs::File, std::path::PathBuf)> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = match std::fs::metadata(dst) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(
                Error::arg("-n: the output does not exist (it must be created beforehand)")
                    .with_path(dst),
            )
        }
        Err(e) => return Err(Error::io("cannot open the output", e).with_path(dst)),
    };
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::arg(
            "writing into an existing image needs a regular file or a block device holding it",
        )
        .with_path(dst));
    }
    let mut oo = std::fs::OpenOptions::new();
    oo.read(true).write(true).custom_flags(libc::O_NOCTTY);
    if ft.is_block_device() {
        // Refuse a block device that is mounted or otherwise held.
        oo.custom_flags(libc::O_NOCTTY | libc::O_EXCL);
    }
    let f = oo
        .open(dst)
        .map_err(|e| Error::io("cannot open the output for writing", e).with_path(dst))?;
    Ok((f, dst.to_path_buf()))
}

/// Put the destination's path on an error of the conversion, unless the source failed
/// (its errors name the source).
fn at_dst(e: Error, dst: &Path) -> Error {
    match e.side() {
        Some(Side::Source) => e,
        _ => e.with_path(dst),
    }
}

pub(crate) fn convert_into(
    dev: &dyn BlockDevice,
    dest: Dest,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    match dest {
        Dest::Output(out, sink) => {
            let (out, writer) = prepare(dev, out, sink, opts)?;
            run(dev, out, writer, opts)
        }
        Dest::Image(file, path) => convert_in_place(dev, file, &path, opts),
    }
}

/// Convert into the existing image `file` at `path` with its format's in-place writer.
fn convert_in_place(
    dev: &dyn BlockDevice,
    file: std::fs::File,
    path: &Path,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let mut size = dev.virtual_size();
    if let Some(target) = opts.target_size {
        check_target_size(dev, target, opts.shrink).map_err(|e| at_dst(e, path))?;
        size = target;
    }
    if opts.create.compress {
        return Err(Error::unsupported(
            "compressed writes into an existing image (ConvertOptions::existing_target) are not supported: write a new compressed image instead",
        )
        .with_path(path));
    }
    let handle = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the output's descriptor", e).with_path(path))?;
    // -O names the format of the image written into: a file of another format is refused
    // as qemu-img refuses it, before its format's editor reads anything else.
    let dup = handle
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the output's descriptor", e).with_path(path))?;
    let found = crate::probe::probe_file(&crate::device::HostFile::from_file(dup, path)?)
        .map_err(|e| e.on_side(Side::Destination))?;
    if found != opts.format {
        let what = match found {
            Format::Raw => format!("it carries no {} signature", opts.format),
            other => format!("it is a {other} image"),
        };
        return Err(Error::invalid(format!(
            "Image is not in {} format: {what} (-O names the format of the existing image, ConvertOptions::format)",
            opts.format
        ))
        .with_path(path));
    }
    // The image's backing file goes through the same gate as the source's references.
    let mut open = OpenOptions::new().allow_references(opts.open.allow_references, None);
    open.opener = Some(crate::formats::open_with);
    let in_place = InPlaceOptions {
        size,
        target_is_zero: opts.target_is_zero,
        open,
        fail_at_write: opts.fail_at_write,
    };
    let writer = open_in_place_writer(opts.format, file, path, &in_place)
        .map_err(|e| e.on_side(Side::Destination))?;
    let mut report = convert_device(dev, writer, opts).map_err(|e| at_dst(e, path))?;
    let io = |what: &'static str| move |e| Error::io(what, e).with_path(path);
    if opts.sync {
        handle.sync_all().map_err(io("flushing the output"))?;
    }
    // The report gives the image's own size, which may exceed the source's.
    let open = OpenOptions::new().format(opts.format).without_backing();
    report.virtual_size = crate::formats::open_with(path, &open)
        .map_err(|e| e.on_side(Side::Destination))?
        .virtual_size();
    // Seeking to the end sizes a block device as well as a file.
    report.size = std::io::Seek::seek(&mut &handle, std::io::SeekFrom::End(0))
        .map_err(io("cannot size the output"))?;
    if !opts.digests.is_empty() {
        report.digests = Digester::of_file(&handle, report.size, &opts.digests)
            .map_err(io("reading the finished output"))?
            .finish();
    }
    Ok(report)
}

/// Everything before the first guest byte is read: the target size checked, the writer
/// made, a stream refused for a writer that cannot stream, the digests requested.
pub(crate) fn prepare(
    dev: &dyn BlockDevice,
    mut out: Output,
    sink: Sink,
    opts: &ConvertOptions,
) -> Result<(Output, Box<dyn ImageWriter>)> {
    let dst = out.path().to_path_buf();
    let mut create = opts.create.clone();
    if let Some(target) = opts.target_size {
        check_target_size(dev, target, opts.shrink).map_err(|e| at_dst(e, &dst))?;
        create.size = target;
    }
    if create.size == 0 {
        create.size = dev.virtual_size();
    }
    if let (true, Some(len)) = (opts.existing_target, out.existing_len()) {
        if len < create.size {
            return Err(Error::arg(format!(
                "output file is smaller than input file ({len} bytes, the input needs {})",
                create.size
            ))
            .with_path(&dst));
        }
    }
    // Before the writer is made: a header written by its constructor is output too.
    let mut sink = sink;
    out.request_digests(&opts.digests, &mut sink);
    let planned = match out.kind() {
        OutputKind::Stream => {
            plan_granularity(opts.format, &create).map_err(|e| e.with_path(&dst))?
        }
        _ => None,
    };
    let writer = match planned {
        // A stream cannot go back to fill in tables: plan the layout from the source
        // first (one extra pass over its data ranges, twice the compression with -c),
        // then write header, tables and data in ascending order.
        Some(gran) => {
            let encoder = plan_encoder(opts.format, &create).map_err(|e| e.with_path(&dst))?;
            let mut plan =
                plan_allocation_with(dev, gran, encoder, opts).map_err(|e| at_dst(e, &dst))?;
            plan.clip(create.size);
            create_planned_writer(opts.format, sink, &dst, &create, &plan)
                .map_err(|e| e.on_side(Side::Destination))?
        }
        None => create_writer(opts.format, sink, &dst, &create)
            .map_err(|e| e.on_side(Side::Destination))?,
    };
    if out.kind() == OutputKind::Stream && !writer.streams() {
        return Err(refuse_stream(opts).with_path(&dst));
    }
    Ok((out, writer))
}

/// The error for an output format that cannot be written to a stream.
pub(crate) fn refuse_stream(opts: &ConvertOptions) -> Error {
    Error::arg(format!(
        "this {} output cannot be written to a pipe or character device (it writes out of \
         order); outputs that can: {}",
        opts.format, STREAMING_OUTPUTS
    ))
}

/// Run the engine into a prepared writer and finish the output, filling the report's
/// output length and digests.
pub(crate) fn run(
    dev: &dyn BlockDevice,
    out: Output,
    writer: Box<dyn ImageWriter>,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let dst = out.path().to_path_buf();
    let mut report = convert_device(dev, writer, opts).map_err(|e| at_dst(e, &dst))?;
    let done = out
        .finish(opts.sync)
        .map_err(|e| e.on_side(Side::Destination))?;
    report.size = done.len;
    report.digests = done.digests;
    Ok(report)
}

pub(crate) fn refuse_same_file(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(Error::arg(
                "output is the same file as the input; refusing to overwrite it",
            )
            .with_path(dst));
        }
    }
    Ok(())
}

/// May the output be `target` bytes long? Growing always; shrinking only when the source's
/// tail past `target` reads as zeros (unallocated, zero, or data that is all zero bytes),
/// or `shrink` says to drop it. Runs before any output is written, in bounded memory.
fn check_target_size(dev: &dyn BlockDevice, target: u64, shrink: bool) -> Result<()> {
    if target == 0 {
        return Err(Error::arg("the target size must be positive")
            .with_option("ConvertOptions::target_size"));
    }
    let size = dev.virtual_size();
    if target >= size || shrink {
        return Ok(());
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = target;
    while off < size {
        let m = dev
            .map(off, size - off)
            .map_err(|e| e.on_side(Side::Source))?;
        let end = (m.offset + m.len).min(size);
        if matches!(m.kind, crate::device::MappingKind::Data { .. }) {
            let mut at = off;
            while at < end {
                let n = (end - at).min(buf.len() as u64) as usize;
                dev.read_at(&mut buf[..n], at)
                    .map_err(|e| e.on_side(Side::Source))?;
                if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
                    return Err(Error::arg(format!(
                        "target size {target} would drop data: the source holds non-zero bytes at guest offset {:#x} (its size is {size}); set ConvertOptions::shrink to drop them",
                        at + i as u64
                    ))
                    .with_option("ConvertOptions::shrink"));
                }
                at += n as u64;
            }
        }
        off = end;
    }
    Ok(())
}
