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

/// Check the window a frame at the start of `src` asks for against [`MAX_ZSTD_WINDOW`].
fn check_zstd_window(src: &[u8]) -> Result<()> {
    let window = zstd_window(src)?;
    if window > MAX_ZSTD_WINDOW {
        return Err(Error::limit(format!(
            "compressed cluster asks for a zstd window of {window} bytes (limit {MAX_ZSTD_WINDOW})"
        )));
    }
    Ok(())
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<()> {
    #[cfg(feature = "zstd-c")]
    return zstd_c::decompress(input, out);
    #[cfg(not(feature = "zstd-c"))]
    zstd_decompress_pure(input, out)
}

/// The pure-Rust (ruzstd) decoder: frames one after the other until the cluster is full.
/// Kept in the `zstd-c` build, where tests check that both paths read each other's output.
#[cfg_attr(feature = "zstd-c", allow(dead_code))]
fn zstd_decompress_pure(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut src = input;
    let mut done = 0usize;
    while done < out.len() {
        check_zstd_window(src)?;
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
        #[cfg(feature = "zstd-c")]
        CompressionType::Zstd => zstd_c::compress(input, limit),
        #[cfg(not(feature = "zstd-c"))]
        CompressionType::Zstd => zstd_compress_pure(input, limit),
    }
}

/// The pure-Rust (ruzstd) compressor with [`ClusterMatcher`]; None when the frame
/// would be longer than `limit`.
#[cfg_attr(feature = "zstd-c", allow(dead_code))]
fn zstd_compress_pure(input: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
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

/// zstd through libzstd: one frame per cluster, like qemu.
#[cfg(feature = "zstd-c")]
mod zstd_c {
    use std::cell::RefCell;

    use super::{check_zstd_window, MAX_ZSTD_WINDOW};
    use crate::error::{Error, Result};
    use zstd::zstd_safe;

    /// libzstd's level 1: about 2% larger clusters than qemu's level 3 (standard
    /// workload) for two thirds of its CPU time.
    const LEVEL: i32 = 1;

    thread_local! {
        static CCTX: RefCell<Option<zstd_safe::CCtx<'static>>> = const { RefCell::new(None) };
        static DCTX: RefCell<Option<zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
    }

    fn err(what: &str, code: zstd_safe::ErrorCode) -> Error {
        Error::corrupt(format!(
            "compressed cluster is not valid zstd data: {what}: {}",
            zstd_safe::get_error_name(code)
        ))
    }

    /// Decode frames one after the other into `out` until it is full; a frame that would
    /// produce more than the rest of the cluster is an error, as in the pure path.
    pub(super) fn decompress(input: &[u8], out: &mut [u8]) -> Result<()> {
        DCTX.with(|cell| {
            let mut slot = cell.borrow_mut();
            let dctx = match slot.as_mut() {
                Some(d) => d,
                None => {
                    let mut d = zstd_safe::DCtx::create();
                    // Defence in depth: the frame header check below already refuses these.
                    let log = MAX_ZSTD_WINDOW.trailing_zeros();
                    d.set_parameter(zstd_safe::DParameter::WindowLogMax(log))
                        .map_err(|c| err("window limit", c))?;
                    slot.insert(d)
                }
            };
            let mut src = input;
            let mut done = 0usize;
            while done < out.len() {
                check_zstd_window(src)?;
                let flen =
                    zstd_safe::find_frame_compressed_size(src).map_err(|c| err("frame", c))?;
                let n = dctx
                    .decompress(&mut out[done..], &src[..flen])
                    .map_err(|c| {
                        if zstd_safe::get_error_name(c).contains("too small") {
                            Error::corrupt(format!(
                                "compressed cluster decompresses to more than {} bytes",
                                out.len()
                            ))
                        } else {
                            err("frame", c)
                        }
                    })?;
                done += n;
                src = &src[flen..];
            }
            Ok(())
        })
    }

    /// One frame of `input`; None when it would be longer than `limit`.
    pub(super) fn compress(input: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
        CCTX.with(|cell| {
            let mut slot = cell.borrow_mut();
            let cctx = match slot.as_mut() {
                Some(c) => c,
                None => {
                    let mut c = zstd_safe::CCtx::create();
                    c.set_parameter(zstd_safe::CParameter::CompressionLevel(LEVEL))
                        .map_err(|c| err("compression level", c))?;
                    slot.insert(c)
                }
            };
            let mut out = Vec::with_capacity(limit);
            // A frame that does not fit in `limit` bytes fails with "dst too small".
            match cctx.compress2(&mut out, input) {
                Ok(_) => Ok(Some(out)),
                Err(_) => Ok(None),
            }
        })
    }
}

/// Largest offset a match may use: a frame holds one cluster (at most 2 MiB).
const ZSTD_WINDOW: u64 = 2 << 20;
/// Hash table size (log2) of [`ClusterMatcher`].
const HASH_BITS: u32 = 15;
/// Shortest match worth a sequence.
const MIN_MATCH: usize = 4;
/// Longest match handed to ruzstd: its encoder (0.8.3) writes match lengths from 65539 up
/// with the baseline of the code below (32771), which libzstd (qemu) then decodes as
/// 32768 bytes longer, and ruzstd's own decoder too: a long match is cut into several.
const MAX_MATCH: usize = 65538;
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
        // The first sequence of a block always carries a literal: ruzstd's encoder
        // panics building its literal-length table when every sequence of a block has
        // none (a table of the single symbol 0; found on runs in 2 MiB clusters).
        let mut i = self.last + 1;
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
                    let len = len.min(MAX_MATCH);
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

    /// Clusters of every kind the workload has: text-like, random, runs, mixed.
    fn sample_clusters(cs: usize) -> Vec<Vec<u8>> {
        let mut x = 99u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let words: Vec<Vec<u8>> = (0..300)
            .map(|_| {
                (0..2 + rnd() % 8)
                    .map(|_| b'a' + (rnd() % 26) as u8)
                    .collect()
            })
            .collect();
        let mut text = Vec::new();
        while text.len() < cs {
            text.extend_from_slice(&words[(rnd() % 300) as usize]);
            text.push(b' ');
        }
        text.truncate(cs);
        let random: Vec<u8> = (0..cs).map(|_| rnd() as u8).collect();
        let mut mixed = text.clone();
        mixed[cs / 2..].copy_from_slice(&random[cs / 2..]);
        let runs: Vec<u8> = (0..cs).map(|i| (i / 1000) as u8).collect();
        let period: Vec<u8> = (0..cs).map(|i| (i % 7) as u8).collect();
        vec![text, random, mixed, runs, period, vec![0u8; cs]]
    }

    #[test]
    fn every_sample_round_trips_at_every_cluster_size() {
        // Both codecs once panicked here: zlib-rs's quick strategy (level 1) when its
        // output room is short, ruzstd's encoder on blocks of literal-free sequences.
        for shift in 9..=21 {
            let cs = 1usize << shift;
            for (k, c) in sample_clusters(cs).into_iter().enumerate() {
                for t in [CompressionType::Zlib, CompressionType::Zstd] {
                    match compress(t, &c, cs).unwrap() {
                        Some(z) => {
                            assert!(z.len() < cs);
                            let mut out = vec![0u8; cs];
                            decompress(t, &z, &mut out).unwrap();
                            assert!(out == c, "{t:?} cluster size {cs} sample {k}");
                        }
                        // Only random and half-random data may be stored as is.
                        None => assert!(k == 1 || k == 2, "{t:?} cluster size {cs} sample {k}"),
                    }
                }
            }
        }
    }

    /// Both zstd paths read each other's clusters, and both refuse oversized windows.
    #[cfg(feature = "zstd-c")]
    #[test]
    fn libzstd_and_ruzstd_read_each_other() {
        for cs in [512usize, 4096, 65536, 2 << 20] {
            for (k, c) in sample_clusters(cs).into_iter().enumerate() {
                let limit = cs - 1;
                let from_c = zstd_c::compress(&c, limit).unwrap();
                let from_rust = zstd_compress_pure(&c, limit).unwrap();
                for (who, z) in [("libzstd", from_c), ("ruzstd", from_rust)] {
                    let Some(z) = z else { continue };
                    let what = format!("{who}'s cluster, size {cs}, sample {k}");
                    let mut a = vec![1u8; cs];
                    let mut b = vec![2u8; cs];
                    zstd_c::decompress(&z, &mut a).expect(&what);
                    zstd_decompress_pure(&z, &mut b).expect(&what);
                    assert!(a == c && b == c, "{what}");
                    // A frame longer than the room left is refused by both.
                    let mut small = vec![0u8; cs / 2];
                    assert!(zstd_c::decompress(&z, &mut small).is_err());
                    assert!(zstd_decompress_pure(&z, &mut small).is_err());
                }
            }
        }
        // Frame header asking for a 16 MiB window (Window_Descriptor exponent 14).
        let hostile = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 14 << 3, 0, 0, 0, 0];
        let mut out = vec![0u8; 65536];
        for r in [
            zstd_c::decompress(&hostile, &mut out),
            zstd_decompress_pure(&hostile, &mut out),
        ] {
            assert!(r.unwrap_err().to_string().contains("window"));
        }
    }

    /// Images whose clusters libzstd compressed pass `qemu-img check` and hold what
    /// their source holds, as qemu-img reads them (each backend is checked by the tool
    /// that must accept its output; the default backend's images are in tests/qemu/matrix.rs).
    #[cfg(feature = "zstd-c")]
    #[test]
    #[cfg_attr(no_qemu, ignore = "needs qemu-img (apt-get install qemu-utils)")]
    fn libzstd_images_pass_qemu_img_check() {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        let mut data = Vec::new();
        for (k, c) in sample_clusters(65536).into_iter().enumerate() {
            data.extend_from_slice(&c);
            data.resize(data.len() + (k % 3) * 65536, 0);
        }
        data.resize(data.len().next_multiple_of(1 << 20), 0);
        std::fs::write(&raw, &data).unwrap();
        for cs in ["4096", "65536", "2097152"] {
            let out = dir.path().join(format!("z{cs}.qcow2"));
            let mut o = crate::ConvertOptions::new(crate::Format::Qcow2);
            o.create.compress = true;
            o.create
                .options
                .insert("compression_type".into(), "zstd".into());
            o.create.options.insert("cluster_size".into(), cs.into());
            crate::convert(&raw, &out, &o).unwrap();
            let qemu = |args: &[&str]| {
                let r = Command::new("qemu-img").args(args).output().unwrap();
                assert!(r.status.success(), "qemu-img {args:?}: {r:?}");
                String::from_utf8_lossy(&r.stdout).into_owned()
            };
            let o = out.to_str().unwrap();
            qemu(&["check", "-f", "qcow2", o]);
            let info = qemu(&["info", "-f", "qcow2", o]);
            assert!(info.contains("compression type: zstd"), "{info}");
            qemu(&[
                "compare",
                "-f",
                "raw",
                "-F",
                "qcow2",
                raw.to_str().unwrap(),
                o,
            ]);
        }
    }
}
