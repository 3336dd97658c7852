//! Compressed clusters: raw deflate (zlib type) and zstd, each cluster on its own, with
//! the output always bounded to exactly one cluster (a hostile stream cannot make us
//! allocate or produce more).

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::header::CompressionType;
use crate::error::{Error, Result};

/// Largest zstd window we accept in a compressed cluster. qemu compresses whole clusters
/// (window <= 2 MiB); the cap bounds the decoder's memory on hostile frames.
const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// Deflate level for zlib clusters. qemu uses level 6 with a 4 KiB window; zlib-rs's
/// level 1 (its "quick" strategy) with a 32 KiB window makes files about 3% larger than
/// qemu's at well under half the CPU time of level 6 (measured on the standard workload).
const ZLIB_LEVEL: u32 = 1;

/// Output room that always holds a whole deflate stream of `n` input bytes: zlib-rs's
/// quick strategy needs up to 9 bits per literal and panics, rather than returning, when
/// its pending bits do not fit the output.
pub(crate) fn deflate_bound(n: usize) -> usize {
    n + n / 8 + 1024
}

/// Decompress one cluster from `input` into `out` (exactly one cluster long). Trailing
/// bytes after the stream (the rest of the last sector) are ignored, as qemu does.
pub fn decompress(ctype: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match ctype {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    thread_local! {
        static DEC: RefCell<Decompress> = RefCell::new(Decompress::new(false));
    }
    DEC.with(|d| {
        let mut d = d.borrow_mut();
        d.reset(false);
        let r = d.decompress(input, out, FlushDecompress::Finish);
        let produced = d.total_out() as usize;
        match r {
            // Like qemu: a full cluster is success even when the stream goes on.
            Ok(_) if produced == out.len() => Ok(()),
            Ok(_) => Err(Error::corrupt(format!(
                "compressed cluster inflates to {produced} bytes instead of {}",
                out.len()
            ))),
            Err(e) => Err(Error::corrupt(format!(
                "compressed cluster is not valid deflate data: {e}"
            ))),
        }
    })
}

/// Window size a zstd frame header asks for (None: not a zstd frame header we accept).
fn zstd_window(src: &[u8]) -> Result<u64> {
    let bad = |m: &str| Error::corrupt(format!("compressed cluster: {m}"));
    if src.len() < 6 || src[..4] != [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(bad("not a zstd frame"));
    }
    let fhd = src[4];
    let single_segment = fhd & 0x20 != 0;
    if !single_segment {
        let wd = src[5];
        let exp = u64::from(wd >> 3);
        let mant = u64::from(wd & 7);
        let base = 1u64 << (10 + exp);
        return Ok(base + base / 8 * mant);
    }
    // Single segment: the window is the frame content size.
    let dict_bytes = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_bytes = [1usize, 2, 4, 8][usize::from(fhd >> 6)];
    let at = 5 + dict_bytes;
    let f = src
        .get(at..at + fcs_bytes)
        .ok_or_else(|| bad("truncated zstd frame header"))?;
    let mut v = 0u64;
    for (i, b) in f.iter().enumerate() {
        v |= u64::from(*b) << (8 * i);
    }
    if fcs_bytes == 2 {
        v += 256;
    }
    Ok(v)
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut src = input;
    let mut done = 0usize;
    while done < out.len() {
        let window = zstd_window(src)?;
        if window > MAX_ZSTD_WINDOW {
            return Err(Error::limit(format!(
                "compressed cluster asks for a zstd window of {window} bytes (limit {MAX_ZSTD_WINDOW})"
            )));
        }
        DEC.with(|d| -> Result<()> {
            let mut dec = d.borrow_mut();
            decode_frame(&mut dec, &mut src, out, &mut done)
        })?;
    }
    Ok(())
}

thread_local! {
    /// Reused per thread: a fresh decoder allocates its tables for every cluster.
    static DEC: RefCell<ruzstd::decoding::FrameDecoder> =
        RefCell::new(ruzstd::decoding::FrameDecoder::new());
}

/// Decode one zstd frame from `src` into `out[*done..]`.
fn decode_frame(
    dec: &mut ruzstd::decoding::FrameDecoder,
    src: &mut &[u8],
    out: &mut [u8],
    done: &mut usize,
) -> Result<()> {
    use ruzstd::decoding::BlockDecodingStrategy;
    use std::io::Read;
    let err = |e: &dyn std::fmt::Display| {
        Error::corrupt(format!("compressed cluster is not valid zstd data: {e}"))
    };
    dec.init(&mut *src).map_err(|e| err(&e))?;
    loop {
        let finished = dec
            .decode_blocks(&mut *src, BlockDecodingStrategy::UptoBlocks(1))
            .map_err(|e| err(&e))?;
        loop {
            let n = dec.read(&mut out[*done..]).map_err(|e| err(&e))?;
            *done += n;
            if n == 0 {
                break;
            }
        }
        if dec.can_collect() > 0 {
            return Err(Error::corrupt(format!(
                "compressed cluster decompresses to more than {} bytes",
                out.len()
            )));
        }
        if finished {
            break;
        }
    }
    Ok(())
}

/// Compress one cluster (`data` padded with zeros to `cluster_size`); None when the
/// result would not be smaller than `cluster_size - 1` bytes (qemu then stores the
/// cluster uncompressed).
pub fn compress(
    ctype: CompressionType,
    data: &[u8],
    cluster_size: usize,
) -> Result<Option<Vec<u8>>> {
    let padded;
    let input = if data.len() < cluster_size {
        let mut p = vec![0u8; cluster_size];
        p[..data.len()].copy_from_slice(data);
        padded = p;
        &padded[..]
    } else {
        data
    };
    let limit = cluster_size - 1;
    match ctype {
        CompressionType::Zlib => {
            thread_local! {
                static ENC: RefCell<(Compress, Vec<u8>)> = RefCell::new((
                    Compress::new(Compression::new(ZLIB_LEVEL), false),
                    Vec::new(),
                ));
            }
            ENC.with(|c| {
                let (c, scratch) = &mut *c.borrow_mut();
                c.reset();
                scratch.clear();
                scratch.reserve(deflate_bound(input.len()));
                match c.compress_vec(input, scratch, FlushCompress::Finish) {
                    // Copied out so a stored cluster holds no slack capacity while it
                    // waits in the writer's queue.
                    Ok(Status::StreamEnd) if scratch.len() <= limit => Ok(Some(scratch.to_vec())),
                    Ok(_) => Ok(None),
                    Err(e) => Err(Error::invalid(format!("deflate failed: {e}"))),
                }
            })
        }
        CompressionType::Zstd => {
            use ruzstd::encoding::{CompressionLevel, FrameCompressor};
            type Zc = FrameCompressor<std::io::Cursor<Vec<u8>>, Vec<u8>, ClusterMatcher>;
            thread_local! {
                // Reused per worker thread: building the compressor costs as much as a cluster.
                static ENC: RefCell<Zc> = RefCell::new(Zc::new_with_matcher(
                    ClusterMatcher::default(),
                    CompressionLevel::Fastest,
                ));
            }
            ENC.with(|c| {
                let mut c = c.borrow_mut();
                let src = c
                    .take_source()
                    .map(|cur| cur.into_inner())
                    .unwrap_or_default();
                let mut src = src;
                src.clear();
                src.extend_from_slice(input);
                c.set_source(std::io::Cursor::new(src));
                c.set_drain(Vec::with_capacity(limit));
                c.compress();
                let out = c.take_drain().unwrap_or_default();
                Ok((out.len() <= limit).then_some(out))
            })
        }
    }
}

/// Largest offset a match may use: a frame holds one cluster (at most 2 MiB).
const ZSTD_WINDOW: u64 = 2 << 20;
/// Hash table size (log2) of [`ClusterMatcher`].
const HASH_BITS: u32 = 15;
/// Shortest match worth a sequence.
const MIN_MATCH: usize = 4;
/// Largest block ruzstd's frame compressor hands to a matcher.
const BLOCK: usize = 128 << 10;

/// A greedy single-probe hash matcher (LZ4-like) for ruzstd's encoder. ruzstd's own
/// matcher clears a 1 MiB table per frame and probes every position, which made zstd
/// clusters about four times slower than qemu's libzstd; here the whole frame (one
/// cluster) is the window and stale table entries are told apart by a running base, so
/// nothing is cleared between clusters.
#[derive(Default)]
pub struct ClusterMatcher {
    /// Everything committed in the current frame.
    data: Vec<u8>,
    /// Start of the last committed block in `data`.
    last: usize,
    /// hash -> `base` + position + 1; entries at or below `base` belong to older frames.
    table: Vec<u32>,
    base: u32,
    spare: Vec<u8>,
}

fn read_u32(d: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([d[i], d[i + 1], d[i + 2], d[i + 3]])
}

fn read_u64(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[i..i + 8]);
    u64::from_le_bytes(b)
}

impl ruzstd::encoding::Matcher for ClusterMatcher {
    fn get_next_space(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.spare);
        v.clear();
        v.resize(BLOCK, 0);
        v
    }

    fn get_last_space(&mut self) -> &[u8] {
        &self.data[self.last..]
    }

    fn commit_space(&mut self, space: Vec<u8>) {
        self.last = self.data.len();
        self.data.extend_from_slice(&space);
        self.spare = space;
    }

    fn skip_matching(&mut self) {
        // An RLE block: leaving its positions out of the table only costs matches.
    }

    fn start_matching(&mut self, mut handle: impl for<'a> FnMut(ruzstd::encoding::Sequence<'a>)) {
        use ruzstd::encoding::Sequence;
        if self.table.is_empty() {
            self.table = vec![0; 1 << HASH_BITS];
        }
        let d = &self.data;
        let table = &mut self.table;
        let base = self.base as usize;
        let end = d.len();
        let mut anchor = self.last;
        let mut i = self.last;
        while i + MIN_MATCH <= end {
            let v = read_u32(d, i);
            let h = (v.wrapping_mul(2_654_435_761) >> (32 - HASH_BITS)) as usize;
            let cand = table[h] as usize;
            table[h] = (base + i + 1) as u32;
            if cand > base {
                let c = cand - base - 1;
                if read_u32(d, c) == v {
                    let mut len = MIN_MATCH;
                    while i + len + 8 <= end {
                        let x = read_u64(d, c + len) ^ read_u64(d, i + len);
                        if x != 0 {
                            len += (x.trailing_zeros() / 8) as usize;
                            break;
                        }
                        len += 8;
                    }
                    if i + len + 8 > end {
                        while i + len < end && d[c + len] == d[i + len] {
                            len += 1;
                        }
                    }
                    handle(Sequence::Triple {
                        literals: &d[anchor..i],
                        offset: i - c,
                        match_len: len,
                    });
                    i += len;
                    anchor = i;
                    continue;
                }
            }
            // Skip faster through data that does not match (incompressible clusters).
            i += 1 + ((i - anchor) >> 6);
        }
        if anchor < end {
            handle(Sequence::Literals {
                literals: &d[anchor..end],
            });
        }
    }

    fn reset(&mut self, _level: ruzstd::encoding::CompressionLevel) {
        // Move the base past every position of the finished frame instead of clearing.
        let next = u64::from(self.base) + self.data.len() as u64 + 1;
        if next + ZSTD_WINDOW + BLOCK as u64 >= u64::from(u32::MAX) {
            self.table.fill(0);
            self.base = 0;
        } else {
            self.base = next as u32;
        }
        self.data.clear();
        self.last = 0;
    }

    fn window_size(&self) -> u64 {
        ZSTD_WINDOW
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_types_round_trip_and_refuse_overflow() {
        for t in [CompressionType::Zlib, CompressionType::Zstd] {
            let mut data = vec![0u8; 65536];
            for (i, b) in data.iter_mut().enumerate() {
                *b = (i / 100) as u8;
            }
            let c = compress(t, &data[..60000], 65536).unwrap().unwrap();
            let mut tail = c.clone();
            tail.extend_from_slice(&[0xaa; 300]);
            let mut out = vec![1u8; 65536];
            decompress(t, &tail, &mut out).unwrap();
            assert_eq!(&out[..60000], &data[..60000]);
            assert!(out[60000..].iter().all(|&b| b == 0));
            // Output is bounded to the cluster: zlib stops there (like qemu), zstd
            // reports the excess.
            let mut small = vec![0u8; 4096];
            assert_eq!(
                decompress(t, &c, &mut small).is_err(),
                t == CompressionType::Zstd
            );
            assert!(decompress(t, &[1, 2, 3], &mut out).is_err());
        }
        // Many frames through the same per-thread compressor (stale hash entries must
        // never produce a match), at every cluster size, with mixed content.
        let mut x = 7u64;
        for round in 0..40usize {
            let cs = 512usize << (round % 13);
            let mut data = vec![0u8; cs];
            for (i, b) in data.iter_mut().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = match (i / 700 + round) % 4 {
                    0 => x as u8,
                    1 => (i % 44) as u8,
                    2 => 0,
                    _ => (i / 3) as u8,
                };
            }
            for t in [CompressionType::Zlib, CompressionType::Zstd] {
                if let Some(c) = compress(t, &data, cs).unwrap() {
                    assert!(c.len() < cs);
                    let mut out = vec![0u8; cs];
                    decompress(t, &c, &mut out).unwrap();
                    assert!(out == data, "{t:?} round {round} cluster {cs}");
                }
            }
        }
        // Random data does not shrink: stored as is.
        let mut x = 1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(CompressionType::Zlib, &noise, 4096)
            .unwrap()
            .is_none());
    }
}
