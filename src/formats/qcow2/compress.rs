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

/// The pure-Rust decoder (structured-zstd): frames one after the other until the cluster
/// is full. Kept in the `zstd-c` build, where tests check that both paths read each
/// other's output and decode every frame alike.
#[cfg_attr(feature = "zstd-c", allow(dead_code))]
fn zstd_decompress_pure(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut src = input;
    let mut done = 0usize;
    while done < out.len() {
        check_zstd_window(src)?;
        let n = DEC.with(|d| decode_frame(&mut d.borrow_mut(), &mut src, &mut out[done..]))?;
        done += n;
    }
    Ok(())
}

thread_local! {
    /// Reused per thread: a fresh decoder allocates its tables for every cluster.
    static DEC: RefCell<structured_zstd::decoding::FrameDecoder> = RefCell::new(new_decoder());
}

/// A decoder held to the same limits as the frame header check, and that verifies a
/// frame's content checksum when it carries one (as libzstd does; qemu writes none).
fn new_decoder() -> structured_zstd::decoding::FrameDecoder {
    use structured_zstd::decoding::{ContentChecksum, FrameDecoder};
    let mut d = FrameDecoder::new();
    // Defence in depth: the frame header check already refuses larger windows.
    d.set_max_window_size(MAX_ZSTD_WINDOW)
        .expect("8 MiB lies within the decoder's window range");
    d.set_content_checksum(ContentChecksum::Verify);
    d
}

/// Decode the zstd frame at the start of `src` into `out`, straight into the slice (no
/// window buffer), and move `src` past it; returns the bytes it produced. A frame that
/// would produce more than `out` holds is an error, never a partial cluster.
fn decode_frame(
    dec: &mut structured_zstd::decoding::FrameDecoder,
    src: &mut &[u8],
    out: &mut [u8],
) -> Result<usize> {
    use structured_zstd::decoding::errors::FrameDecoderError;
    let err = |e: &dyn std::fmt::Display| {
        Error::corrupt(format!("compressed cluster is not valid zstd data: {e}"))
    };
    // Exactly one frame: the rest of the cluster's last sector is not zstd data, and
    // `decode_all` would read it as the next frame.
    let flen = structured_zstd::decoding::find_frame_compressed_size(src)
        .map_err(|e| err(&format!("{e:?}")))?;
    let (frame, rest) = src.split_at(flen);
    let n = dec.decode_all(frame, out).map_err(|e| match e {
        FrameDecoderError::TargetTooSmall => Error::corrupt(format!(
            "compressed cluster decompresses to more than {} bytes",
            out.len()
        )),
        e => err(&e),
    })?;
    *src = rest;
    Ok(n)
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

/// The pure-Rust compressor (structured-zstd at level 1: clusters the size of libzstd level
/// 1's, on the standard workload, for 1.1x its CPU time); None when the frame would be
/// longer than `limit`.
#[cfg_attr(feature = "zstd-c", allow(dead_code))]
fn zstd_compress_pure(input: &[u8], limit: usize) -> Result<Option<Vec<u8>>> {
    use structured_zstd::encoding::{CompressionLevel, FrameCompressor};
    thread_local! {
        // Reused per worker thread: building the compressor's tables costs more than a
        // cluster; the frame is built in `scratch` and copied out.
        static ENC: RefCell<(FrameCompressor, Vec<u8>)> = RefCell::new((
            FrameCompressor::new(CompressionLevel::from_level(1)),
            Vec::new(),
        ));
    }
    ENC.with(|c| {
        let (c, scratch) = &mut *c.borrow_mut();
        c.compress_independent_frame_into(input, scratch);
        // Copied out so a stored cluster holds no slack capacity while it waits in the
        // writer's queue.
        Ok((scratch.len() <= limit).then(|| scratch.to_vec()))
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
        // Many frames through the same per-thread compressor (nothing of one frame may
        // leak into the next), at every cluster size, with mixed content.
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
        // output room is short, ruzstd's encoder (before structured-zstd's) on blocks of
        // literal-free sequences.
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
    fn libzstd_and_pure_rust_read_each_other() {
        for cs in [512usize, 4096, 65536, 2 << 20] {
            for (k, c) in sample_clusters(cs).into_iter().enumerate() {
                let limit = cs - 1;
                let from_c = zstd_c::compress(&c, limit).unwrap();
                let from_rust = zstd_compress_pure(&c, limit).unwrap();
                for (who, z) in [
                    ("libzstd", from_c),
                    ("structured-zstd's encoder", from_rust),
                ] {
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

    /// A libzstd frame of `data` at `level`; `fcs`: the header carries the content size
    /// (qemu's frames do), `checksum`: the frame ends with a content checksum.
    #[cfg(feature = "zstd-c")]
    fn libzstd_frame(data: &[u8], level: i32, fcs: bool, checksum: bool) -> Vec<u8> {
        use zstd::zstd_safe::{CCtx, CParameter};
        let mut c = CCtx::create();
        c.set_parameter(CParameter::CompressionLevel(level))
            .unwrap();
        c.set_parameter(CParameter::ContentSizeFlag(fcs)).unwrap();
        c.set_parameter(CParameter::ChecksumFlag(checksum)).unwrap();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        c.compress2(&mut out, data).unwrap();
        out
    }

    /// Decode `z` into a cluster of `cs` bytes with both decoders: they must agree on
    /// success and on every byte (a frame that decodes differently is a blocker).
    #[cfg(feature = "zstd-c")]
    fn decode_alike(z: &[u8], cs: usize, what: &str) -> Option<Vec<u8>> {
        let mut a = vec![1u8; cs];
        let mut b = vec![2u8; cs];
        let ra = zstd_c::decompress(z, &mut a);
        let rb = zstd_decompress_pure(z, &mut b);
        match (ra, rb) {
            (Ok(()), Ok(())) => {
                assert!(a == b, "{what}: libzstd and the pure decoder differ");
                Some(a)
            }
            (Err(_), Err(_)) => None,
            (ra, rb) => panic!("{what}: libzstd {ra:?}, pure decoder {rb:?}"),
        }
    }

    /// The pure decoder against libzstd on every cluster size qemu writes (512 B to 2 MiB),
    /// on frames from libzstd at qemu's level (3) and others, with and without a content
    /// size and a checksum, from our own encoder, and clusters of two frames: both decode
    /// each to the cluster it came from, and both refuse it in a cluster too small.
    #[cfg(feature = "zstd-c")]
    #[test]
    fn pure_decoder_matches_libzstd_on_every_size_and_level() {
        let mut frames = 0;
        for shift in 9..=21 {
            let cs = 1usize << shift;
            for (k, c) in sample_clusters(cs).into_iter().enumerate() {
                let mut made: Vec<(String, Vec<u8>)> = Vec::new();
                for level in [-5, 1, 3, 9, 19] {
                    // Level 19 on megabyte clusters costs seconds and tests nothing new.
                    if level == 19 && cs > 64 << 10 {
                        continue;
                    }
                    for (fcs, sum) in [(true, false), (false, false), (true, true)] {
                        let z = libzstd_frame(&c, level, fcs, sum);
                        made.push((format!("libzstd level {level} fcs {fcs} checksum {sum}"), z));
                    }
                }
                if let Some(z) = zstd_compress_pure(&c, cs - 1).unwrap() {
                    made.push(("structured-zstd's encoder".into(), z));
                }
                let half = cs / 2;
                let mut two = libzstd_frame(&c[..half], 3, true, false);
                two.extend_from_slice(&libzstd_frame(&c[half..], 3, false, false));
                made.push(("two frames".into(), two));
                for (who, z) in made {
                    let what = format!("{who}, cluster size {cs}, sample {k}");
                    // The rest of the last sector follows a frame in an image.
                    let mut padded = z.clone();
                    padded.extend_from_slice(&[0x5a; 511]);
                    let out = decode_alike(&padded, cs, &what);
                    assert!(out.as_deref() == Some(&c[..]), "{what}: not the cluster");
                    // Below half: a cluster the first of two frames alone fills reads as
                    // that frame, as qemu does.
                    let small = cs / 2 - 1;
                    assert!(
                        decode_alike(&z, small, &what).is_none(),
                        "{what}: too small"
                    );
                    frames += 1;
                }
            }
        }
        assert!(frames > 1000, "{frames} frames");
    }

    /// Damaged frames (bits flipped, bytes replaced, frames cut short): neither decoder
    /// panics, and when both accept a frame they produce the same bytes. Neither decoder
    /// finds every damage (qemu writes no checksum): libzstd refuses a few frames the pure
    /// decoder reads (and ruzstd did), the pure decoder refuses more that libzstd reads.
    #[cfg(feature = "zstd-c")]
    #[test]
    fn pure_decoder_agrees_with_libzstd_on_damaged_frames() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut frames = Vec::new();
        for cs in [512usize, 4096, 65536] {
            for c in sample_clusters(cs) {
                for (level, sum) in [(3, false), (1, true)] {
                    frames.push((cs, libzstd_frame(&c, level, true, sum)));
                }
            }
        }
        let (mut same, mut only_c, mut only_pure, mut neither) = (0, 0, 0, 0);
        for _ in 0..20_000 {
            let (cs, z) = &frames[rnd() as usize % frames.len()];
            let mut z = z.clone();
            for _ in 0..1 + rnd() % 3 {
                // Half the damage in the first 64 bytes, where the headers are.
                let span = if rnd() % 2 == 0 {
                    z.len().min(64)
                } else {
                    z.len()
                };
                let at = rnd() as usize % span;
                match rnd() % 3 {
                    0 => z[at] ^= 1 << (rnd() % 8),
                    1 => z[at] = rnd() as u8,
                    _ => z.truncate(at.max(6)),
                }
            }
            let mut a = vec![0u8; *cs];
            let mut b = vec![0u8; *cs];
            match (
                zstd_c::decompress(&z, &mut a).is_ok(),
                zstd_decompress_pure(&z, &mut b).is_ok(),
            ) {
                (true, true) => {
                    assert!(a == b, "a damaged frame decodes differently: {z:02x?}");
                    same += 1;
                }
                (true, false) => only_c += 1,
                (false, true) => only_pure += 1,
                (false, false) => neither += 1,
            }
        }
        eprintln!("damaged frames: both read alike {same}, both refuse {neither}, only libzstd reads {only_c}, only the pure decoder reads {only_pure}");
        assert!(same > 1000 && neither > 1000);
    }

    /// Every compressed cluster of images qemu-img writes, at every cluster size, decodes
    /// alike with both decoders and to the source's bytes.
    #[cfg(feature = "zstd-c")]
    #[test]
    #[cfg_attr(no_qemu, ignore = "needs qemu-img (apt-get install qemu-utils)")]
    fn qemu_img_zstd_clusters_decode_alike() {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("src.raw");
        // The standard workload's kinds of 64 KiB: words, random, a 4 KiB random block in
        // zeros, and the samples, 4 MiB in all.
        let mut data = Vec::new();
        for c in sample_clusters(1 << 20) {
            data.extend_from_slice(&c[..512 << 10]);
        }
        let random = sample_clusters(4096).swap_remove(1);
        for i in 0..16 {
            data.extend_from_slice(&random);
            data.resize(data.len() + 60 * 1024 + i * 512, 0);
        }
        data.resize(4 << 20, 0);
        std::fs::write(&raw, &data).unwrap();
        let mut clusters = 0;
        for shift in 9..=21 {
            let cs = 1usize << shift;
            let img = dir.path().join(format!("z{cs}.qcow2"));
            let r = Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2", "-c", "-o"])
                .arg(format!("compression_type=zstd,cluster_size={cs}"))
                .args([&raw, &img])
                .output()
                .unwrap();
            assert!(r.status.success(), "qemu-img convert: {r:?}");
            let f = std::fs::read(&img).unwrap();
            let be = |at: usize| u64::from_be_bytes(f[at..at + 8].try_into().unwrap());
            let l1_size = u32::from_be_bytes(f[36..40].try_into().unwrap()) as usize;
            let l1 = be(40) as usize;
            let x = 62 - (shift - 8);
            for i in 0..l1_size {
                let l2 = (be(l1 + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
                if l2 == 0 {
                    continue;
                }
                for j in 0..cs / 8 {
                    let e = be(l2 + 8 * j);
                    if e >> 62 & 1 == 0 {
                        continue;
                    }
                    let off = (e & ((1 << x) - 1)) as usize;
                    let sectors = ((e >> x) & ((1 << (shift - 8)) - 1)) as usize + 1;
                    let end = (off & !511) + sectors * 512;
                    let z = &f[off..end.min(f.len())];
                    let guest = (i * cs / 8 + j) * cs;
                    let what = format!("qemu-img's cluster at guest {guest:#x}, size {cs}");
                    let out = decode_alike(z, cs, &what).expect(&what);
                    assert!(out == data[guest..guest + cs], "{what}: not the source");
                    clusters += 1;
                }
            }
        }
        assert!(clusters > 5000, "{clusters} compressed clusters");
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
