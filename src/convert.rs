//! The streaming convert engine: any [`BlockDevice`] into any [`ImageWriter`]. It knows no
//! format and no path: opening files and committing the output is [`crate::ops::convert`]'s.
//!
//! Shape: a dispatcher walks the source's map and cuts the data ranges into work units
//! (1 MiB, or one writer granule when larger); a pool of workers reads each unit, drops
//! all-zero granules and runs the writer's encoder (compression); the calling thread puts
//! results back in ascending order and hands them to the writer. Zero and unallocated
//! ranges are never read. A fixed number of units is in flight at once, so memory stays
//! bounded whatever the image size.

use crate::device::{BlockDevice, MappingKind};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::{CreateOptions, OpenOptions};
use crate::writer::{Encoder, ImageWriter};
use std::collections::BTreeMap;

/// Progress callback: (guest bytes done, total guest bytes).
pub type ProgressFn<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// How to run a conversion.
#[derive(Clone)]
pub struct ConvertOptions<'a> {
    /// How to open the source (format, references).
    pub open: OpenOptions,
    /// Output format.
    pub format: Format,
    /// Output options; `size` 0 means "the source's virtual size".
    pub create: CreateOptions,
    /// Zero detection granularity (qemu-img's `-S`): aligned all-zero runs this long are
    /// left unallocated. 0 writes everything, giving a fully allocated output.
    pub min_sparse: u64,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Called as the conversion advances.
    pub progress: Option<ProgressFn<'a>>,
    /// Flush the output to stable storage before renaming it into place.
    pub sync: bool,
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
        }
    }
}

/// What a finished conversion has to tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertReport {
    /// Guest size of the output (may exceed the source's when the format rounds up).
    pub virtual_size: u64,
    /// Notes from the writer (sizes rounded up, ...).
    pub warnings: Vec<String>,
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

/// Stream `src` into `writer` and finish it.
pub fn convert_device(
    src: &dyn BlockDevice,
    mut writer: Box<dyn ImageWriter>,
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
    // Zero detection block: whole granules, at least -S bytes.
    let zero_block = if opts.min_sparse == 0 {
        0
    } else {
        opts.min_sparse.div_ceil(gran).max(1) * gran
    };
    let encoder = writer.encoder();
    let threads = match opts.threads {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2),
        n => n,
    }
    .clamp(1, 64);
    let in_flight = threads * 2 + 2;

    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(in_flight);
    let (done_tx, done_rx) = crossbeam_channel::unbounded::<Result<Done>>();
    let (token_tx, token_rx) = crossbeam_channel::bounded::<()>(in_flight);
    for _ in 0..in_flight {
        token_tx.send(()).expect("fresh channel has room");
    }
    let write_all = opts.min_sparse == 0;
    // Unit buffers go back to the workers once written: fresh 1 MiB allocations cost page
    // faults and TLB shootdowns on every unit. At most `in_flight` buffers ever exist.
    let (pool_tx, pool_rx) = crossbeam_channel::unbounded::<Vec<u8>>();

    std::thread::scope(|s| -> Result<()> {
        // Dispatcher: walk the map, cut into units, wait for a free slot per unit.
        let done_tx_d = done_tx.clone();
        s.spawn(move || {
            let r = dispatch(src, size, unit, write_all, |job| {
                token_rx.recv().is_ok() && job_tx.send(job).is_ok()
            });
            if let Err(e) = r {
                let _ = done_tx_d.send(Err(e));
            }
            // job_tx dropped here: workers drain and exit.
        });
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            let encoder = encoder.clone();
            let pool_rx = pool_rx.clone();
            s.spawn(move || {
                for job in job_rx.iter() {
                    let buf = pool_rx.try_recv().unwrap_or_default();
                    let r = work(
                        src,
                        job,
                        buf,
                        gran,
                        zero_block,
                        write_all,
                        encoder.as_deref(),
                    );
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
                    for (a, b, enc) in d.runs {
                        let off = d.start + a as u64;
                        match enc {
                            Some(e) => writer.write_encoded(off, &d.buf[a..b], e)?,
                            None => writer.write(off, &d.buf[a..b])?,
                        }
                    }
                    let _ = pool_tx.send(d.buf);
                    if let Some(p) = opts.progress {
                        p(d.end, size);
                    }
                    next += 1;
                    let _ = token_tx.send(());
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
    };
    writer.finish()?;
    if let Some(p) = opts.progress {
        p(size, size);
    }
    Ok(report)
}

/// Walk `src`'s map over `[0, size)` and hand each unit that holds data (every unit when
/// `write_all`) to `send`, in ascending order. `send` returns false to stop.
fn dispatch(
    src: &dyn BlockDevice,
    size: u64,
    unit: u64,
    write_all: bool,
    mut send: impl FnMut(Job) -> bool,
) -> Result<()> {
    let mut seq = 0u64;
    let mut cur: Option<Job> = None;
    let mut off = 0u64;
    while off < size {
        let m = src.map(off, size - off)?;
        if m.offset != off || m.len == 0 {
            return Err(Error::corrupt(format!(
                "map at guest offset {off:#x} returned the range {:#x}+{:#x}",
                m.offset, m.len
            )));
        }
        let end = off + m.len.min(size - off);
        let is_data = matches!(m.kind, MappingKind::Data { .. });
        if !is_data && !write_all {
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
fn work(
    src: &dyn BlockDevice,
    job: Job,
    mut buf: Vec<u8>,
    gran: u64,
    zero_block: u64,
    write_all: bool,
    encoder: Option<&dyn Encoder>,
) -> Result<Done> {
    let len = (job.end - job.start) as usize;
    buf.resize(len, 0);
    // Which zero blocks hold mapped data (only those can be non-zero).
    let block = if write_all { gran } else { zero_block };
    let nblocks = len.div_ceil(block as usize);
    let mut wanted = vec![write_all; nblocks];
    // A reused buffer holds old bytes: zero what no data read overwrites.
    let mut filled = 0usize;
    for &(off, plen, is_data) in &job.pieces {
        let a = (off - job.start) as usize;
        let b = a + plen as usize;
        if is_data {
            buf[filled..a].fill(0);
            filled = b;
            src.read_at(&mut buf[a..b], off)?;
            for w in &mut wanted[a / block as usize..b.div_ceil(block as usize)] {
                *w = true;
            }
        }
    }
    buf[filled..].fill(0);
    let mut runs: Vec<(usize, usize, Option<Vec<u8>>)> = Vec::new();
    for (i, want) in wanted.iter().enumerate() {
        if !want {
            continue;
        }
        let a = i * block as usize;
        let b = (a + block as usize).min(len);
        if !write_all && is_zero(&buf[a..b]) {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.1 == a && encoder.is_none() => last.1 = b,
            _ => runs.push((a, b, None)),
        }
    }
    if let Some(enc) = encoder {
        // One entry per granule so the writer compresses granule by granule.
        let mut out = Vec::with_capacity(runs.len());
        for (a, b, _) in runs {
            let mut g = a;
            while g < b {
                let ge = (g + gran as usize).min(b);
                let e = enc.encode(job.start + g as u64, &buf[g..ge])?;
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
