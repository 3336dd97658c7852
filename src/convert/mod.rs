//! The streaming convert engine: any [`BlockDevice`] into any [`ImageWriter`].
//!
//! Shape: a dispatcher walks the source's map and cuts the data ranges into work units
//! (1 MiB, or one writer granule when larger); a pool of workers reads each unit, drops
//! all-zero blocks (`-S`) and runs the writer's encoder (compression); the calling thread
//! puts results back in ascending order and hands them to the writer. Zero and
//! unallocated ranges are never read, and never written: only granules that overlap a
//! data range reach the writer, whatever `-S` is (except `-S 0`, which writes everything).
//! A fixed number of units is in flight at once, so memory stays bounded whatever the
//! image size. With `salvage`, ranges that cannot be read become zeros and are reported;
//! with a rate limit, the writer side sleeps between units.
//!
//! Here the options, the report and the engine; beside it `pace.rs` (how many workers,
//! the rate limit) and `salvage.rs` (unreadable ranges), which know nothing of this file,
//! and `tests.rs`.

use std::collections::BTreeMap;

use crate::device::{BlockDevice, MappingKind};
use crate::error::{Error, Result, Side};
use crate::format::Format;
use crate::options::{CreateOptions, OpenOptions};
use crate::writer::{AllocationPlan, Encoder, ImageWriter};

mod pace;
mod salvage;

pub use pace::default_threads;
use pace::RateLimiter;
pub use salvage::UnreadableRange;
use salvage::{coalesce, read_range, record, Unreadable, SALVAGE_SECTOR};

/// Progress callback: (guest bytes done, total guest bytes).
pub type ProgressFn<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// A handle that stops a conversion from another thread (a request handler whose client
/// went away, a shutdown): clone it into [`ConvertOptions::cancel`], keep a clone, and
/// call [`cancel`](Self::cancel). The engine checks it before each work unit (1 MiB, or one
/// writer granule when larger) it reads and before each it writes, so at most the units
/// already in flight are finished; the conversion then fails with
/// [`ErrorKind::Cancelled`](crate::ErrorKind::Cancelled), and a file output is removed
/// like after any other failure.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CancelToken {
    /// A token not cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Ask every conversion holding a clone of this token to stop.
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn check(&self, off: u64) -> Result<()> {
        if self.is_cancelled() {
            return Err(Error::cancelled(format!(
                "the conversion was cancelled at guest offset {off:#x}"
            )));
        }
        Ok(())
    }
}

impl PartialEq for CancelToken {
    /// Two tokens are equal when they are clones of each other (cancelling one cancels
    /// the other).
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

/// How to run a conversion.
#[derive(Clone)]
pub struct ConvertOptions<'a> {
    /// How to open the source (format, references).
    pub open: OpenOptions,
    /// Output format.
    pub format: Format,
    /// Output options; `size` 0 means "the source's virtual size".
    pub create: CreateOptions,
    /// Zero detection granularity (qemu-img's `-S`): aligned all-zero runs this long
    /// inside the source's data ranges are left unallocated (checked in blocks of at most
    /// 1 MiB, rounded up to the writer's granule). Zero and unallocated source ranges are
    /// never written whatever its value, except 0, which writes everything and gives a
    /// fully allocated output.
    pub min_sparse: u64,
    /// Worker threads; 0 means one per core, plus one per other task running when the
    /// conversion starts (see [`default_threads`]).
    pub threads: usize,
    /// Called as the conversion advances.
    pub progress: Option<ProgressFn<'a>>,
    /// Flush the output to stable storage before renaming it into place.
    pub sync: bool,
    /// Write into the existing destination (qemu-img's `-n`), which must already hold at
    /// least the source's size: a raw file or block device, or an image of the output
    /// format (qcow2, vpc, vmdk, vdi, vhdx), whose own options (cluster size, subformat,
    /// backing file, preallocation) stay as they are. Its bytes past the source's size
    /// keep their content.
    pub existing_target: bool,
    /// With `existing_target`: the destination already reads as zeros, so ranges that
    /// are zero in the source are not written (qemu-img's `--target-is-zero`).
    pub target_is_zero: bool,
    /// Keep going past source ranges that cannot be read (qemu-img's `--salvage`): they
    /// are written as zeros and listed in [`ConvertReport::unreadable`].
    pub salvage: bool,
    /// Limit on guest bytes written per second (qemu-img's `-r`); 0 means no limit.
    pub rate_limit: u64,
    /// Give the output this virtual size instead of the source's (`--target-size`):
    /// growing pads with unallocated space; shrinking is refused unless the dropped tail
    /// of the source reads as zeros, or [`shrink`](Self::shrink) allows dropping it.
    pub target_size: Option<u64>,
    /// With [`target_size`](Self::target_size) below the source's size: drop the
    /// source's tail even where it holds data.
    pub shrink: bool,
    /// Digests to compute over the output bytes (`--digest`), reported in
    /// [`ConvertReport::digests`]: on a stream while it is sent, for a file by one read of
    /// the finished output.
    pub digests: Vec<crate::writer::DigestAlgo>,
    /// Stops the conversion when cancelled (see [`CancelToken`]).
    pub cancel: CancelToken,
    /// Test hook for `existing_target` into a non-raw image: make the Nth mutation of the
    /// image fail with EIO, to prove a failure at any point leaves an image its checker
    /// accepts.
    #[doc(hidden)]
    pub fail_at_write: Option<u64>,
}

impl std::fmt::Debug for ConvertOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConvertOptions")
            .field("open", &self.open)
            .field("format", &self.format)
            .field("create", &self.create)
            .field("min_sparse", &self.min_sparse)
            .field("threads", &self.threads)
            .field("progress", &self.progress.map(|_| "Fn(u64, u64)"))
            .field("sync", &self.sync)
            .field("existing_target", &self.existing_target)
            .field("target_is_zero", &self.target_is_zero)
            .field("salvage", &self.salvage)
            .field("rate_limit", &self.rate_limit)
            .field("target_size", &self.target_size)
            .field("shrink", &self.shrink)
            .field("digests", &self.digests)
            .field("cancel", &self.cancel.is_cancelled())
            .field("fail_at_write", &self.fail_at_write)
            .finish()
    }
}

impl<'a> ConvertOptions<'a> {
    /// Defaults like qemu-img: probe the source, `-S 4k`, one thread per core.
    pub fn new(format: Format) -> Self {
        ConvertOptions {
            open: OpenOptions::new(),
            format,
            create: CreateOptions::default(),
            min_sparse: 4096,
            threads: 0,
            progress: None,
            sync: false,
            existing_target: false,
            target_is_zero: false,
            salvage: false,
            rate_limit: 0,
            target_size: None,
            shrink: false,
            digests: Vec::new(),
            cancel: CancelToken::new(),
            fail_at_write: None,
        }
    }
}

/// What a finished conversion has to tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConvertReport {
    /// Guest size of the output (may exceed the source's when the format rounds up).
    pub virtual_size: u64,
    /// Notes from the writer (sizes rounded up, ...).
    pub warnings: Vec<String>,
    /// With [`ConvertOptions::salvage`]: the source ranges that could not be read or
    /// mapped and were written as zeros, ascending and coalesced.
    pub unreadable: Vec<UnreadableRange>,
    /// The output's length as the writer predicted it before the first byte
    /// ([`ImageWriter::output_len`]); None for compressed outputs.
    pub output_len: Option<u64>,
    /// Bytes of output written (the whole output's length; filled by the commands in
    /// [`crate::writer`]'s terms, 0 from [`convert_device`] alone).
    pub size: u64,
    /// The digests asked in [`ConvertOptions::digests`], lowercase hex.
    pub digests: Vec<(crate::writer::DigestAlgo, String)>,
}

/// Size of a work unit when the writer's granule is smaller.
const UNIT: u64 = 1 << 20;

/// One unit of work: the guest range `[start, end)` and the source mappings inside it.
struct Job {
    seq: u64,
    start: u64,
    end: u64,
    /// (offset, len, is_data) pieces; pieces not listed are zero.
    pieces: Vec<(u64, u64, bool)>,
}

/// What a worker made of a unit.
struct Done {
    seq: u64,
    end: u64,
    buf: Vec<u8>,
    start: u64,
    /// Granule-aligned runs to write, relative to `start`, with their encodings when the
    /// writer encodes (one entry per granule then).
    runs: Vec<(usize, usize, Option<Vec<u8>>)>,
}

/// How the workers treat a unit: fixed for one conversion.
#[derive(Clone, Copy)]
struct Plan {
    gran: u64,
    /// Zero detection block (a multiple of `gran`), 0 with `write_all`.
    zero_block: u64,
    /// `-S 0`: every granule is written, zero or not, mapped or not.
    write_all: bool,
    salvage: bool,
}

/// Stream `src` into `writer` and finish it.
///
/// Of [`ConvertOptions`], the engine uses `min_sparse`, `threads`, `progress`, `salvage`,
/// `rate_limit` and `cancel`. The rest (`open`, `format`, `create`, `sync`,
/// `existing_target`, `target_is_zero`, `target_size`, `shrink`, `digests`) are for the
/// commands that open files and make the writer ([`crate::convert()`],
/// [`crate::convert_to_writer`]); here the writer is already made, so its own size and
/// format decide (the output gets `min(source size, writer size)` guest bytes).
///
/// Errors say which side failed ([`Error::side`]): reading `src` or writing `writer`.
/// To get a writer of your own back (its checksums, counters), use
/// [`convert_device_into`].
pub fn convert_device<W: ImageWriter + ?Sized>(
    src: &dyn BlockDevice,
    mut writer: Box<W>,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let report = convert_device_into(src, writer.as_mut(), opts)?;
    writer.finish().map_err(|e| e.on_side(Side::Destination))?;
    if let Some(p) = opts.progress {
        let size = src.virtual_size().min(report.virtual_size);
        p(size, size);
    }
    Ok(report)
}

/// [`convert_device`] into a writer the caller keeps: everything is written, but
/// [`ImageWriter::finish`] is not called, so the caller reads what its own writer
/// gathered and then finishes it (or, for a writer that needs no finishing, just drops
/// it). The output is not valid until it is finished. `progress` hears of each unit
/// written; the closing `(size, size)` report, which [`convert_device`] makes after
/// finishing, is the caller's to make.
pub fn convert_device_into<W: ImageWriter + ?Sized>(
    src: &dyn BlockDevice,
    writer: &mut W,
    opts: &ConvertOptions,
) -> Result<ConvertReport> {
    let size = src.virtual_size().min(writer.virtual_size());
    let gran = writer.granularity().max(1);
    if !gran.is_power_of_two() {
        return Err(Error::arg(format!(
            "writer granularity {gran} is not a power of two"
        )));
    }
    let unit = UNIT.max(gran);
    let write_all = opts.min_sparse == 0;
    // Zero detection block: whole granules, at least -S bytes, at most one unit (a
    // larger -S only leaves fewer, longer zero runs inside data; never writes more).
    let zero_block = if write_all {
        0
    } else {
        (opts.min_sparse.div_ceil(gran).max(1) * gran).min(unit)
    };
    let plan = Plan {
        gran,
        zero_block,
        write_all,
        salvage: opts.salvage,
    };
    let encoder = writer.encoder();
    let threads = match opts.threads {
        0 => default_threads(),
        n => n,
    }
    .clamp(1, 64);
    // Units in flight (read, decoded or encoded, not yet written): the writer stalls now
    // and then (the page cache, writeback), and while it does the workers go on only as
    // far as this lets them. 16 keeps 2 cores busy through those stalls (6 left a
    // decompressing convert 25% slower) at 16 MiB of buffers.
    let in_flight = (threads * 2 + 2).max(16);
    let unreadable: Unreadable = std::sync::Mutex::new(Vec::new());
    let mut limiter = RateLimiter::new(opts.rate_limit);
    // Like qemu-img, progress starts with a 0% report.
    if let Some(p) = opts.progress {
        p(0, size);
    }

    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(in_flight);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Result<Done>>();
    let (token_tx, token_rx) = crossbeam_channel::bounded::<()>(in_flight);
    for _ in 0..in_flight {
        token_tx.send(()).expect("fresh channel has room");
    }
    // Unit buffers go back to the workers once written: fresh 1 MiB allocations cost page
    // faults and TLB shootdowns on every unit. At most `in_flight` buffers ever exist.
    let (pool_tx, pool_rx) = crossbeam_channel::unbounded::<Vec<u8>>();

    std::thread::scope(|s| -> Result<()> {
        // Dispatcher: walk the map, cut into units, wait for a free slot per unit.
        let done_tx_d = done_tx.clone();
        let unreadable_d = &unreadable;
        s.spawn(move || {
            let r = dispatch(src, size, unit, plan, unreadable_d, &opts.cancel, |job| {
                token_rx.recv().is_ok() && job_tx.send(job).is_ok()
            });
            if let Err(e) = r {
                let _ = done_tx_d.send(Err(e.on_side(Side::Source)));
            }
            // job_tx dropped here: workers drain and exit.
        });
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let encoder = encoder.clone();
            let pool_rx = pool_rx.clone();
            let unreadable = &unreadable;
            s.spawn(move || {
                for job in job_rx.iter() {
                    if let Err(e) = opts.cancel.check(job.start) {
                        let _ = done_tx.send(Err(e));
                        break;
                    }
                    let buf = pool_rx.try_recv().unwrap_or_default();
                    let r = work(src, job, buf, plan, encoder.as_deref(), unreadable);
                    let failed = r.is_err();
                    if done_tx.send(r).is_err() || failed {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(job_rx);

        // Writer side: reorder by sequence number and write ascending.
        let mut next = 0u64;
        let mut pending: BTreeMap<u64, Done> = BTreeMap::new();
        let result = (|| -> Result<()> {
            for r in done_rx.iter() {
                let d = r?;
                pending.insert(d.seq, d);
                while let Some(d) = pending.remove(&next) {
                    opts.cancel.check(d.start)?;
                    let mut written = 0u64;
                    for (a, b, enc) in d.runs {
                        let off = d.start + a as u64;
                        match enc {
                            Some(e) => writer.write_encoded(off, &d.buf[a..b], e),
                            None => writer.write(off, &d.buf[a..b]),
                        }
                        .map_err(|e| e.on_side(Side::Destination))?;
                        written += (b - a) as u64;
                    }
                    let _ = pool_tx.send(d.buf);
                    if let Some(p) = opts.progress {
                        p(d.end, size);
                    }
                    next += 1;
                    let _ = token_tx.send(());
                    limiter.wrote(written);
                }
            }
            Ok(())
        })();
        // On error, closing the receivers makes the dispatcher and workers stop.
        drop(done_rx);
        drop(token_tx);
        result
    })?;
    let report = ConvertReport {
        virtual_size: writer.virtual_size(),
        warnings: writer.warnings(),
        unreadable: coalesce(unreadable.into_inner().unwrap_or_else(|e| e.into_inner())),
        output_len: writer.output_len(),
        ..Default::default()
    };
    Ok(report)
}

/// Find the exact guest ranges [`convert_device`] will write for `src` into a writer of
/// granule `granularity` under `opts` (its `min_sparse`, `threads` and `salvage`), by
/// running the engine itself into a writer that keeps only the offsets: a writer that
/// must place its metadata before its data (a sequential qcow2) lays it out from this.
///
/// Costs one read of the source's data ranges (zero detection needs the bytes); holes and
/// zero ranges of the source are not read, and with `-S 0` (everything written) nothing
/// is. The second pass writes exactly these ranges
/// as long as the source does not change in between.
pub fn plan_allocation(
    src: &dyn BlockDevice,
    granularity: u64,
    opts: &ConvertOptions,
) -> Result<AllocationPlan> {
    plan_allocation_with(src, granularity, None, opts)
}

/// [`plan_allocation`] for a writer that encodes (compresses): the planning pass runs
/// `encoder` too and records each encoded granule's length in
/// [`AllocationPlan::encoded`], so a sequential writer can place every compressed
/// cluster before the first byte. Costs a full compression pass on top of the one that
/// writes.
pub fn plan_allocation_with(
    src: &dyn BlockDevice,
    granularity: u64,
    encoder: Option<std::sync::Arc<dyn Encoder>>,
    opts: &ConvertOptions,
) -> Result<AllocationPlan> {
    /// Records the runs the engine hands over and drops their data.
    struct Recorder {
        gran: u64,
        size: u64,
        encoder: Option<std::sync::Arc<dyn Encoder>>,
        plan: std::sync::Arc<std::sync::Mutex<AllocationPlan>>,
    }
    impl ImageWriter for Recorder {
        fn granularity(&self) -> u64 {
            self.gran
        }
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn encoder(&self) -> Option<std::sync::Arc<dyn Encoder>> {
            self.encoder.clone()
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
            let mut p = self.plan.lock().unwrap_or_else(|e| e.into_inner());
            p.push(offset, offset + data.len() as u64);
            Ok(())
        }
        fn write_encoded(&mut self, offset: u64, data: &[u8], encoded: Vec<u8>) -> Result<()> {
            let len = u32::try_from(encoded.len())
                .map_err(|_| Error::limit("an encoded granule is longer than 4 GiB"))?;
            let mut p = self.plan.lock().unwrap_or_else(|e| e.into_inner());
            p.push(offset, offset + data.len() as u64);
            p.encoded.push((offset, len));
            Ok(())
        }
        fn finish(self: Box<Self>) -> Result<()> {
            Ok(())
        }
    }
    let size = src.virtual_size();
    if opts.min_sparse == 0 && encoder.is_none() {
        // `-S 0` writes every granule, so there is nothing to read to know it.
        let mut plan = AllocationPlan {
            granularity,
            virtual_size: size,
            ..AllocationPlan::default()
        };
        plan.push(0, size);
        return Ok(plan);
    }
    let plan = std::sync::Arc::new(std::sync::Mutex::new(AllocationPlan {
        granularity,
        virtual_size: size,
        ..AllocationPlan::default()
    }));
    let rec = Recorder {
        gran: granularity,
        size,
        encoder,
        plan: plan.clone(),
    };
    // The planning pass reports no progress and is not rate limited: only the pass that
    // writes is what the user waits on and limits.
    let mut o = opts.clone();
    o.progress = None;
    o.rate_limit = 0;
    convert_device(src, Box::new(rec), &o)?;
    let plan = plan.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(plan)
}

/// Walk `src`'s map over `[0, size)` and hand each unit that holds data (every unit with
/// `write_all`) to `send`, in ascending order. `send` returns false to stop.
fn dispatch(
    src: &dyn BlockDevice,
    size: u64,
    unit: u64,
    plan: Plan,
    unreadable: &Unreadable,
    cancel: &CancelToken,
    mut send: impl FnMut(Job) -> bool,
) -> Result<()> {
    let mut seq = 0u64;
    let mut cur: Option<Job> = None;
    let mut off = 0u64;
    while off < size {
        // Also per map call: walking a huge, fragmented map can take long by itself.
        cancel.check(off)?;
        let (end, is_data) = match src.map(off, size - off) {
            Ok(m) => {
                if m.offset != off || m.len == 0 {
                    return Err(Error::corrupt(format!(
                        "map at guest offset {off:#x} returned the range {:#x}+{:#x}",
                        m.offset, m.len
                    )));
                }
                (
                    off + m.len.min(size - off),
                    matches!(m.kind, MappingKind::Data { .. }),
                )
            }
            // Like qemu-img --salvage: a sector whose status is unknown is read as data
            // (the read may still succeed; if not, the worker records it).
            Err(e) if plan.salvage => {
                let end = (off / SALVAGE_SECTOR + 1) * SALVAGE_SECTOR;
                record(unreadable, off, end.min(size) - off, &e);
                (end.min(size), true)
            }
            Err(e) => return Err(e),
        };
        if !is_data && !plan.write_all {
            off = end;
            continue;
        }
        let mut s = off;
        while s < end {
            let ustart = s / unit * unit;
            let uend = (ustart + unit).min(size);
            let pend = end.min(uend);
            if cur.as_ref().is_some_and(|j| j.start != ustart)
                && !send(cur.take().expect("checked"))
            {
                return Ok(());
            }
            let job = cur.get_or_insert_with(|| {
                seq += 1;
                Job {
                    seq: seq - 1,
                    start: ustart,
                    end: uend,
                    pieces: Vec::new(),
                }
            });
            job.pieces.push((s, pend - s, is_data));
            s = pend;
        }
        off = end;
    }
    if let Some(j) = cur {
        send(j);
    }
    Ok(())
}

/// Read a unit's data, find the granules to write and encode them.
///
/// Only granules that overlap a data range of the source are ever written (all of them
/// with `write_all`); of those, a zero-detection block whose bytes are all zero is
/// dropped whole. So a hole of the source stays a hole whatever `-S` is, and `-S` only
/// decides which zero runs inside data are dropped.
fn work(
    src: &dyn BlockDevice,
    job: Job,
    mut buf: Vec<u8>,
    plan: Plan,
    encoder: Option<&dyn Encoder>,
    unreadable: &Unreadable,
) -> Result<Done> {
    let len = (job.end - job.start) as usize;
    buf.resize(len, 0);
    let gran = plan.gran as usize;
    let mut has_data = vec![plan.write_all; len.div_ceil(gran)];
    // A reused buffer holds old bytes: zero what no data read overwrites.
    let mut filled = 0usize;
    for &(off, plen, is_data) in &job.pieces {
        let a = (off - job.start) as usize;
        let b = a + plen as usize;
        if is_data {
            buf[filled..a].fill(0);
            filled = b;
            read_range(src, &mut buf[a..b], off, plan.salvage, unreadable)
                .map_err(|e| e.on_side(Side::Source))?;
            for w in &mut has_data[a / gran..b.div_ceil(gran)] {
                *w = true;
            }
        }
    }
    buf[filled..].fill(0);
    let mut runs: Vec<(usize, usize, Option<Vec<u8>>)> = Vec::new();
    let mut push = |a: usize, b: usize| match runs.last_mut() {
        Some(last) if last.1 == a => last.1 = b,
        _ => runs.push((a, b, None)),
    };
    if plan.write_all {
        push(0, len);
    } else {
        let zb = plan.zero_block as usize;
        for a in (0..len).step_by(zb) {
            let b = (a + zb).min(len);
            let grans = a / gran..b.div_ceil(gran);
            if !has_data[grans.clone()].contains(&true) || is_zero(&buf[a..b]) {
                continue;
            }
            for g in grans.filter(|&g| has_data[g]) {
                push(g * gran, ((g + 1) * gran).min(len));
            }
        }
    }
    if let Some(enc) = encoder {
        // One entry per granule so the writer compresses granule by granule.
        let mut out = Vec::with_capacity(runs.len());
        for (a, b, _) in runs {
            let mut g = a;
            while g < b {
                let ge = (g + gran).min(b);
                // The encoder is the writer's (compression): its failure is the output's.
                let e = enc
                    .encode(job.start + g as u64, &buf[g..ge])
                    .map_err(|e| e.on_side(Side::Destination))?;
                out.push((g, ge, e));
                g = ge;
            }
        }
        runs = out;
    }
    Ok(Done {
        seq: job.seq,
        end: job.end,
        buf,
        start: job.start,
        runs,
    })
}

/// True when every byte is zero; word-at-a-time so it runs near memory speed.
pub fn is_zero(buf: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { buf.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && post.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0)
}

#[cfg(test)]
mod tests;
