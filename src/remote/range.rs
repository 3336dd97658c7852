//! Object input: an object read where it lies, by ranged GETs, never downloaded first.
//!
//! [`CachedSource`] is the cache over any [`Fetch`] backend (S3 here, Swift and plain
//! HTTP(S) in [`super::swift`] and [`super::http`]). [`open_s3`] gives a [`BlockDevice`] of any format over an object: the format's reader
//! asks for headers and tables in small pieces, which a bounded block cache serves
//! (whole blocks of [`BLOCK`] bytes, consecutive missing blocks fetched in one request),
//! and for guest data in large runs, which go straight to one GET each. Every GET carries
//! `If-Match` with the ETag seen when the object was opened, so an object replaced
//! between two reads is an error, never a mix of two images.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use opendal::Operator;

use crate::device::{BlockDevice, HostFile, RangeSource};
use crate::error::{ErrorKind, Result};
use crate::options::OpenOptions;

use super::s3::{runtime, s3_error, S3Config, S3Url};

/// Cache block: small reads (headers, tables) are rounded out to whole blocks.
pub const BLOCK: u64 = 256 << 10;
/// Blocks the cache keeps (16 MiB).
const CACHE_BLOCKS: usize = 64;
/// Bytes fetched at once along a sequential run of large reads.
const READ_AHEAD: u64 = 8 << 20;
/// Read-ahead buffers kept while their bytes are unread. The converter's workers read
/// units out of order (as far as its units in flight allow), so units before a new
/// read-ahead may still be unread when it is fetched: dropping the older buffers then
/// would fetch those bytes twice.
const AHEAD_BUFS: usize = 3;
/// How far out of order the converter's workers may read (its units in flight, 16 MiB,
/// and one read-ahead, with room to spare): a read this far behind the frontier is a
/// straggler, this far past it still continues the run.
const OUT_OF_ORDER: u64 = 32 << 20;

/// One read-ahead GET while some of its bytes are unread.
struct Ahead {
    start: u64,
    data: Vec<u8>,
    /// Bytes of `data` not yet handed to a reader; the buffer is dropped at 0.
    unread: u64,
}

/// A sequential run of large reads: its read-ahead buffers and how far it has fetched.
struct Run {
    /// The latest read-ahead GETs (at most [`AHEAD_BUFS`]), while bytes of them are unread.
    bufs: Vec<Ahead>,
    /// Where the run's last GET ended: a read starting here (or a little past) continues
    /// it. A read a little behind it is a straggler (a worker that fell behind), read
    /// alone so nothing is fetched twice; a read anywhere else starts a new run.
    frontier: u64,
}

impl Ahead {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64
    }
}

/// What an [`open_s3`] device has fetched so far, for callers that account for traffic.
#[derive(Debug, Default)]
pub struct FetchStats {
    bytes: AtomicU64,
    requests: AtomicU64,
}

impl FetchStats {
    /// Bytes received in ranged GETs.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Ranged GETs sent.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

struct Cache {
    blocks: HashMap<u64, Arc<Vec<u8>>>,
    order: VecDeque<u64>,
}

/// Where a [`CachedSource`] gets its bytes: one ranged request per call, counted in the
/// shared [`FetchStats`]. S3, Swift and plain HTTP(S) each provide one.
pub trait Fetch: Send + Sync + std::fmt::Debug {
    /// The bytes `start..end` of the object (exactly that many, or an error).
    fn fetch(&self, start: u64, end: u64) -> std::io::Result<Vec<u8>>;
}

/// A [`RangeSource`] over a [`Fetch`] backend: small reads are served from a bounded cache
/// of whole [`BLOCK`]s (consecutive missing blocks fetched in one request), large ones go
/// straight to one request each.
pub struct CachedSource<F: Fetch> {
    fetch: F,
    len: u64,
    cache: Mutex<Cache>,
    stats: Arc<FetchStats>,
    /// The sequential run of large reads being served.
    ahead: Mutex<Run>,
    /// Bytes fetched at once along a sequential run (0: none).
    read_ahead: u64,
}

impl<F: Fetch> std::fmt::Debug for CachedSource<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSource")
            .field("fetch", &self.fetch)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<F: Fetch> CachedSource<F> {
    /// A source of `len` bytes fetched by `fetch`, counted in `stats` (bytes and requests).
    pub fn new(fetch: F, len: u64, stats: Arc<FetchStats>) -> Self {
        CachedSource {
            fetch,
            len,
            cache: Mutex::new(Cache {
                blocks: HashMap::new(),
                order: VecDeque::new(),
            }),
            stats,
            ahead: Mutex::new(Run {
                bufs: Vec::new(),
                frontier: u64::MAX,
            }),
            read_ahead: READ_AHEAD,
        }
    }

    /// No read-ahead: for servers whose cost per request is low (S3), where bytes read
    /// ahead past the end of a data run would be fetched for nothing.
    pub fn without_read_ahead(mut self) -> Self {
        self.read_ahead = 0;
        self
    }

    fn get(&self, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let v = self.fetch.fetch(start, end)?;
        self.stats
            .bytes
            .fetch_add(v.len() as u64, Ordering::Relaxed);
        if v.len() as u64 != end - start {
            return Err(std::io::Error::other(format!(
                "the server sent {} bytes for a range of {}; the object changed?",
                v.len(),
                end - start
            )));
        }
        Ok(v)
    }

    fn block(&self, idx: u64) -> Option<Arc<Vec<u8>>> {
        self.cache.lock().ok()?.blocks.get(&idx).cloned()
    }

    fn insert(&self, idx: u64, data: Arc<Vec<u8>>) {
        if let Ok(mut c) = self.cache.lock() {
            if c.blocks.insert(idx, data).is_none() {
                c.order.push_back(idx);
            }
            while c.order.len() > CACHE_BLOCKS {
                if let Some(old) = c.order.pop_front() {
                    c.blocks.remove(&old);
                }
            }
        }
    }

    /// Guest data in a large run: not cached (it is read once). A run that starts where
    /// the last one ended is read ahead, READ_AHEAD bytes per GET: on a server with a high
    /// cost per request (Swift's proxy) that is what makes sequential reading fast; a run
    /// elsewhere is one GET of its own size.
    fn read_run(&self, ra: &mut Run, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        // A read at or up to OUT_OF_ORDER past the frontier continues the run (the bytes between
        // are units other workers are reading now); one up to OUT_OF_ORDER behind it is a
        // straggler, served alone.
        let f = ra.frontier;
        let straggler = offset < f && f - offset <= OUT_OF_ORDER;
        let continues = offset >= f && offset - f <= OUT_OF_ORDER;
        let upto = if continues && self.read_ahead > 0 {
            end.max(offset + self.read_ahead).min(self.len)
        } else {
            end
        };
        let v = self.get(offset, upto)?;
        buf.copy_from_slice(&v[..buf.len()]);
        if !straggler {
            ra.frontier = upto;
        }
        if upto > end {
            if ra.bufs.len() == AHEAD_BUFS {
                ra.bufs.remove(0);
            }
            ra.bufs.push(Ahead {
                start: offset,
                unread: upto - end,
                data: v,
            });
        }
        Ok(())
    }

    /// Headers and tables: whole [`BLOCK`]s from the cache, the missing ones fetched
    /// (consecutive ones in one request).
    fn read_blocks(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let mut idx = first;
        while idx <= last {
            let b = match self.block(idx) {
                Some(b) => b,
                None => {
                    let mut upto = idx;
                    while upto < last && self.block(upto + 1).is_none() {
                        upto += 1;
                    }
                    let s = idx * BLOCK;
                    let e = ((upto + 1) * BLOCK).min(self.len);
                    let v = self.get(s, e)?;
                    for (i, chunk) in v.chunks(BLOCK as usize).enumerate() {
                        self.insert(idx + i as u64, Arc::new(chunk.to_vec()));
                    }
                    Arc::new(v[..(BLOCK as usize).min(v.len())].to_vec())
                }
            };
            let bs = idx * BLOCK;
            let from = offset.max(bs);
            let to = end.min(bs + b.len() as u64);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&b[(from - bs) as usize..(to - bs) as usize]);
            idx += 1;
        }
        Ok(())
    }
}

/// An S3 object as a [`Fetch`] backend.
struct S3Fetch {
    op: Operator,
    url: String,
    key: String,
    len: u64,
    etag: Option<String>,
    secrets: Vec<String>,
    /// Declared last so it is dropped last, after the client whose tasks run on it.
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for S3Fetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Fetch")
            .field("url", &self.url)
            .field("len", &self.len)
            .field("etag", &self.etag)
            .finish_non_exhaustive()
    }
}

impl Fetch for S3Fetch {
    fn fetch(&self, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
        let r = self.rt.block_on(async {
            let mut rd = self.op.read_with(&self.key).range(start..end);
            if let Some(t) = &self.etag {
                rd = rd.if_match(t);
            }
            rd.await
        });
        let buf = r.map_err(|e| {
            let e = s3_error(&self.url, "reading", &e, &self.secrets);
            std::io::Error::other(e.message().to_string())
        })?;
        Ok(buf.to_vec())
    }
}

impl<F: Fetch> RangeSource for CachedSource<F> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let large = buf.len() as u64 >= 2 * BLOCK;
        let mut ra = self
            .ahead
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        // Bytes a read-ahead already holds are served from it, whatever the read's size
        // (the end of a data run is often read in a small piece, or by a read that runs
        // past the buffer's end): only the rest is fetched.
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let Some(i) = ra.bufs.iter().position(|a| at >= a.start && at < a.end()) else {
                break;
            };
            let a = &mut ra.bufs[i];
            let from = (at - a.start) as usize;
            let n = (a.data.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&a.data[from..from + n]);
            a.unread = a.unread.saturating_sub(n as u64);
            if a.unread == 0 {
                ra.bufs.remove(i);
            }
            done += n;
        }
        let (buf, offset) = (&mut buf[done..], offset + done as u64);
        if buf.is_empty() {
            Ok(())
        } else if large {
            self.read_run(&mut ra, buf, offset)
        } else {
            drop(ra);
            self.read_blocks(buf, offset)
        }
    }
}

/// Open the object `url` as an image (probed, or of `opts.format`), read by ranges. The
/// returned [`FetchStats`] count what the device fetches. Backing files and other images
/// an object names are never opened.
pub fn open_s3(
    url: &S3Url,
    cfg: &S3Config,
    opts: &OpenOptions,
) -> Result<(Box<dyn BlockDevice>, Arc<FetchStats>)> {
    let name = url.to_string();
    let rt = runtime()?;
    let secrets: Vec<String> = cfg.secret_strings();
    let op = cfg.operator(&url.bucket).map_err(|e| e.with_path(&name))?;
    let meta = rt
        .block_on(async { op.stat(&url.key).await })
        .map_err(|e| s3_error(&name, "opening", &e, &secrets))?;
    let len = meta.content_length();
    let etag = meta.etag().map(str::to_string);
    let stats = Arc::new(FetchStats::default());
    let fetch = S3Fetch {
        rt,
        op,
        url: name.clone(),
        key: url.key.clone(),
        len,
        etag,
        secrets,
    };
    let src = CachedSource::new(fetch, len, stats.clone()).without_read_ahead();
    let dev = open_range_source(Arc::new(src), len, &name, opts)?;
    Ok((dev, stats))
}

/// Open the bytes of `src` (`len` long, named `name` in messages) as an image: probed, or
/// of `opts.format`. Backing files and other images it names are never opened.
pub(crate) fn open_range_source(
    src: Arc<dyn RangeSource>,
    len: u64,
    name: &str,
    opts: &OpenOptions,
) -> Result<Box<dyn BlockDevice>> {
    let file = HostFile::from_source(src, len, std::path::Path::new(name))?;
    // Images it names (backing files) stay refused unless `opts` allows references; they
    // would be looked for beside the URL, which is no folder.
    crate::formats::open_host(file, opts).map_err(|e| {
        if e.kind() == ErrorKind::UnsafeReference {
            e
        } else {
            e.with_path(name)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory object: what the cache logic fetches, without a server.
    #[derive(Debug)]
    struct Bytes(Vec<u8>);

    impl Fetch for Bytes {
        fn fetch(&self, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
            Ok(self.0[start as usize..end as usize].to_vec())
        }
    }

    fn object(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    /// Reads `units` 1 MiB units of an object in `order`: (bytes fetched, requests, len).
    fn read_in(order: impl Fn(&mut Vec<usize>)) -> (u64, u64, u64) {
        const UNIT: usize = 1 << 20;
        let len = 40 * UNIT + 12345;
        let data = object(len);
        let stats = Arc::new(FetchStats::default());
        let src = CachedSource::new(Bytes(data.clone()), len as u64, stats.clone());
        let mut units: Vec<usize> = (0..len.div_ceil(UNIT)).collect();
        order(&mut units);
        let mut seen = vec![0u8; len];
        for u in units {
            let a = u * UNIT;
            let b = (a + UNIT).min(len);
            src.read_exact_at(&mut seen[a..b], a as u64).unwrap();
        }
        assert!(seen == data, "content differs");
        let left: Vec<(u64, u64, u64)> = src
            .ahead
            .lock()
            .unwrap()
            .bufs
            .iter()
            .map(|a| (a.start, a.end(), a.unread))
            .collect();
        assert!(left.is_empty(), "buffers left {left:?}");
        (stats.bytes(), stats.requests(), len as u64)
    }

    /// Units read in the order two workers finish them are each fetched once, and a
    /// sequential run is still fetched READ_AHEAD bytes per request.
    #[test]
    fn out_of_order_sequential_reads_fetch_each_byte_once() {
        // In order but for a unit now and then read two places late.
        let (bytes, requests, len) = read_in(|o| {
            for k in (5..o.len() - 3).step_by(9) {
                o.swap(k, k + 2);
            }
        });
        assert_eq!(bytes, len);
        assert!(requests <= 12, "{requests} requests");
        // Each pair swapped: every second unit is a straggler, the others continue.
        let (bytes, requests, len) = read_in(|o| o.chunks_mut(2).for_each(|p| p.reverse()));
        assert_eq!(bytes, len);
        assert!(requests <= 12, "{requests} requests");
        // Six workers with 16 units in flight: any order within windows of 12 units.
        let (bytes, requests, len) = read_in(|o| {
            for w in o.chunks_mut(12) {
                let n = w.len();
                for i in 0..n {
                    w.swap(i, (i * 7 + 5) % n);
                }
            }
        });
        assert_eq!(bytes, len, "{requests} requests");
        // Strictly in order.
        let (bytes, requests, len) = read_in(|_| {});
        assert_eq!((bytes, requests), (len, 6));
    }

    /// Without read-ahead, every large read is one GET of its own size.
    #[test]
    fn without_read_ahead_fetches_only_what_is_read() {
        let len = 9 << 20;
        let stats = Arc::new(FetchStats::default());
        let src =
            CachedSource::new(Bytes(object(len)), len as u64, stats.clone()).without_read_ahead();
        let mut buf = vec![0u8; 1 << 20];
        src.read_exact_at(&mut buf, 0).unwrap();
        src.read_exact_at(&mut buf, 1 << 20).unwrap();
        assert_eq!((stats.bytes(), stats.requests()), (2 << 20, 2));
    }
}
