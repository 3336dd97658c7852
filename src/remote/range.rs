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
    /// The last read-ahead GET (its start and bytes), while its tail is unread.
    ahead: Mutex<Option<(u64, Vec<u8>)>>,
    /// Where the last large read ended.
    last_end: AtomicU64,
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
            ahead: Mutex::new(None),
            last_end: AtomicU64::new(u64::MAX),
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
        let end = offset + buf.len() as u64;
        if buf.len() as u64 >= 2 * BLOCK {
            // Guest data in a large run: not cached (it is read once). A run that starts
            // where the last one ended is read ahead, READ_AHEAD bytes per GET: on a
            // server with a high cost per request (Swift's proxy) that is what makes
            // sequential reading fast; a run elsewhere is one GET of its own size.
            let mut ra = self
                .ahead
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?;
            if let Some((start, data)) = ra.as_ref() {
                if offset >= *start && end <= *start + data.len() as u64 {
                    let from = (offset - start) as usize;
                    buf.copy_from_slice(&data[from..from + buf.len()]);
                    if end == *start + data.len() as u64 {
                        *ra = None;
                    }
                    return Ok(());
                }
            }
            let sequential = ra
                .as_ref()
                .is_some_and(|(s, d)| offset == *s + d.len() as u64)
                || self.last_end.load(Ordering::Relaxed) == offset;
            let upto = if sequential && self.read_ahead > 0 {
                end.max(offset + self.read_ahead).min(self.len)
            } else {
                end
            };
            let v = self.get(offset, upto)?;
            buf.copy_from_slice(&v[..buf.len()]);
            *ra = (upto > end).then_some((offset, v));
            self.last_end.store(end, Ordering::Relaxed);
            return Ok(());
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let mut idx = first;
        while idx <= last {
            let b = match self.block(idx) {
                Some(b) => b,
                None => {
                    // Fetch this block and the following missing ones in one request.
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
