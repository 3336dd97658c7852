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
                static ENC: RefCell<Compress> =
                    RefCell::new(Compress::new(Compression::default(), false));
            }
            ENC.with(|c| {
                let mut c = c.borrow_mut();
                c.reset();
                let mut out = Vec::with_capacity(limit);
                match c.compress_vec(input, &mut out, FlushCompress::Finish) {
                    Ok(Status::StreamEnd) if out.len() <= limit => Ok(Some(out)),
                    Ok(_) => Ok(None),
                    Err(e) => Err(Error::invalid(format!("deflate failed: {e}"))),
                }
            })
        }
        CompressionType::Zstd => {
            use ruzstd::encoding::{CompressionLevel, FrameCompressor, MatchGeneratorDriver};
            type Zc = FrameCompressor<std::io::Cursor<Vec<u8>>, Vec<u8>, MatchGeneratorDriver>;
            thread_local! {
                // Reused per worker thread: building the matcher costs as much as a cluster.
                static ENC: RefCell<Zc> = RefCell::new(Zc::new(CompressionLevel::Fastest));
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
