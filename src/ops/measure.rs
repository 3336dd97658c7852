//! `measure`: how many bytes an output of a given format would take, before writing it.
//!
//! qcow2 and raw give qemu-img's numbers (its formula: qcow2 counts the metadata of a
//! fully allocated image plus the source's data clusters, so it is an upper bound of what
//! `convert` writes; raw is the virtual size). Every other output is measured from the
//! writer's own allocation plan, the one `convert` lays the file out from, so `required`
//! is the exact length of the file `convert` writes and cannot drift from it. A
//! streamOptimized vmdk's grains are compressed: its `required` is found by running the
//! conversion into a counter (exact too), its `fully allocated` is an upper bound.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::convert::{plan_allocation_with, ConvertOptions};
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::{CreateOptions, QemuOptKind};
use crate::writer::{AllocationPlan, Output};

/// What `measure` found, as qemu-img measure reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Measurement {
    /// Bytes the output needs for this source (qemu-img's "required size").
    pub required: u64,
    /// Bytes the output needs when every guest block is written ("fully allocated size").
    pub fully_allocated: u64,
    /// Bytes the source's persistent bitmaps would take in the output, as qemu-img
    /// reports them: for qcow2 v3 outputs of sources that can hold bitmaps (qcow2 v3),
    /// None otherwise. (`convert` copies no bitmaps; qemu-img's does only with --bitmaps.)
    pub bitmaps: Option<u64>,
    /// Whether `fully_allocated` is an upper bound rather than exact (compressed outputs).
    pub fully_allocated_is_bound: bool,
}

/// The options qemu's file protocol declares for creation: qemu-img measure takes them
/// with every output format (they change no number).
const FILE_OPTIONS: &[(&str, QemuOptKind)] = &[
    ("size", QemuOptKind::Size),
    ("preallocation", QemuOptKind::Str),
    ("nocow", QemuOptKind::Bool),
    ("extent_size_hint", QemuOptKind::Size),
];

/// The options qemu's raw driver declares for creation.
const RAW_OPTIONS: &[(&str, QemuOptKind)] = &[("size", QemuOptKind::Size)];

/// A guest of this many bytes, all unallocated: what `--size` measures.
struct Empty(u64);

impl BlockDevice for Empty {
    fn virtual_size(&self) -> u64 {
        self.0
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<crate::device::Mapping> {
        let end = crate::device::map_end(self.0, offset, max_len)?;
        Ok(crate::device::Mapping {
            offset,
            len: end - offset,
            kind: crate::device::MappingKind::Unallocated,
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        crate::device::check_guest_range(self.0, offset, buf.len())?;
        buf.fill(0);
        Ok(())
    }
    fn info(&self) -> crate::device::ImageInfo {
        crate::device::ImageInfo::default()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

/// Counts the bytes a stream output sends.
struct Counter(Arc<AtomicU64>);

impl Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The length of the `format` output `convert` lays out from `plan` (None when its
/// writer cannot tell before writing).
fn planned_len(format: Format, opts: &CreateOptions, plan: &AllocationPlan) -> Result<Option<u64>> {
    let (_out, sink) = Output::from_writer(Path::new("measure"), Box::new(std::io::sink()));
    let w = crate::formats::create_planned_writer(format, sink, Path::new("measure"), opts, plan)?;
    Ok(w.output_len())
}

fn full_plan(size: u64, gran: u64) -> AllocationPlan {
    let mut p = AllocationPlan {
        granularity: gran,
        virtual_size: size,
        ..AllocationPlan::default()
    };
    p.push(0, size);
    p
}

/// Measure a `format` output with `opts` (`opts.compress` for `-c`) of `src`, or, with
/// `src` None, of an empty guest of `opts.size` bytes (qemu-img's `--size`).
/// `convert` gives the engine's settings (`min_sparse`, threads) the planning pass uses.
pub fn measure_device(
    src: Option<&dyn BlockDevice>,
    format: Format,
    opts: &CreateOptions,
    convert: &ConvertOptions,
) -> Result<Measurement> {
    if src.is_none() && opts.size > i64::MAX as u64 {
        // qemu's sizes are signed 64-bit.
        return Err(Error::arg(format!(
            "invalid size {}: must be between 0 and {}",
            opts.size,
            i64::MAX
        )));
    }
    let mut opts = opts.clone();
    if let Some(d) = src {
        opts.size = d.virtual_size();
    }
    let size = opts.size;
    match format {
        // qemu-img's own: every option its driver and the file protocol declare is taken.
        Format::Raw => opts.check_qemu_kinds("raw", &[FILE_OPTIONS, RAW_OPTIONS].concat())?,
        Format::Qcow2 => opts.check_qemu_kinds(
            "qcow2",
            &[FILE_OPTIONS, crate::formats::qcow2::measure::QEMU_OPTIONS].concat(),
        )?,
        _ => opts.check_known(format)?,
    }
    let mut m = Measurement {
        required: 0,
        fully_allocated: 0,
        bitmaps: None,
        fully_allocated_is_bound: false,
    };
    match format {
        Format::Ova => {
            return Err(Error::unsupported(
                "measure -O ova: an appliance is its streamOptimized vmdk plus a few KiB of tar \
                 headers, descriptor and manifest; measure -O vmdk -o subformat=streamOptimized",
            ))
        }
        Format::Raw => {
            let n = size.next_multiple_of(512);
            (m.required, m.fully_allocated) = (n, n);
        }
        Format::Qcow2 => {
            // The size the options name: qemu's formula checks its L1 limit against it.
            let named = match src {
                Some(_) => opts.size_option("size")?.unwrap_or(0),
                None => size,
            };
            let (r, f, b) = crate::formats::qcow2::measure::measure(src, named, &opts)?;
            (m.required, m.fully_allocated, m.bitmaps) = (r, f, b);
        }
        _ => match crate::formats::plan_granularity(format, &opts)? {
            Some(gran) => {
                let plan = match src {
                    Some(d) => {
                        let enc = crate::formats::plan_encoder(format, &opts)?;
                        plan_allocation_with(d, gran, enc, convert)?
                    }
                    None => AllocationPlan {
                        granularity: gran,
                        virtual_size: size,
                        ..AllocationPlan::default()
                    },
                };
                let unknown = || {
                    Error::unsupported(format!(
                        "the {format} writer cannot tell its length before writing"
                    ))
                };
                m.required = planned_len(format, &opts, &plan)?.ok_or_else(unknown)?;
                m.fully_allocated =
                    planned_len(format, &opts, &full_plan(size, gran))?.ok_or_else(unknown)?;
            }
            None => {
                let plan = full_plan(size, 512);
                if let Some(n) = planned_len(format, &opts, &plan)? {
                    // A layout that does not depend on the data (fixed vpc, flat vmdk).
                    (m.required, m.fully_allocated) = (n, n);
                } else {
                    m.required = match src {
                        Some(d) => streamed_len(d, format, &opts, convert)?,
                        None => streamed_len(&Empty(size), format, &opts, convert)?,
                    };
                    // Upper bound: the monolithicSparse layout of every grain, each grain
                    // stored in one more sector than its bytes (marker and deflate's
                    // stored-block overhead stay under 512 bytes for grains up to 64 KiB).
                    let mut sparse = opts.clone();
                    sparse
                        .options
                        .insert("subformat".into(), "monolithicSparse".into());
                    sparse.compress = false;
                    let gran = crate::formats::plan_granularity(format, &sparse)?
                        .ok_or_else(|| Error::unsupported("no sparse layout to bound by"))?;
                    let full = planned_len(format, &sparse, &full_plan(size, gran))?
                        .ok_or_else(|| Error::unsupported("no sparse layout to bound by"))?;
                    m.fully_allocated = full + size.div_ceil(gran) * 512;
                    m.fully_allocated_is_bound = true;
                }
            }
        },
    }
    Ok(m)
}

/// The bytes `convert` sends for `src` as a `format` stream, counted.
fn streamed_len(
    src: &dyn BlockDevice,
    format: Format,
    opts: &CreateOptions,
    convert: &ConvertOptions,
) -> Result<u64> {
    let n = Arc::new(AtomicU64::new(0));
    let mut c = ConvertOptions::new(format);
    c.create = opts.clone();
    c.min_sparse = convert.min_sparse;
    c.threads = convert.threads;
    crate::ops::stream::convert_to_writer(src, Counter(n.clone()), &c)?;
    Ok(n.load(Ordering::Relaxed))
}

/// Open the image at `path` (per `convert.open`) and measure a `format` output of it.
pub fn measure(
    path: &Path,
    format: Format,
    opts: &CreateOptions,
    convert: &ConvertOptions,
) -> Result<Measurement> {
    let dev = super::open_source(path, &convert.open)?;
    measure_device(Some(dev.as_ref()), format, opts, convert)
}
