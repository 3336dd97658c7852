//! Writing streamOptimized VMDK the way VMware does: a version 3 header with the
//! compressed and markers flags and `gdOffset = GD_AT_END`, the embedded descriptor,
//! compressed grains (each `{lba u64, size u32}` + zlib stream, padded to a sector), a
//! GT marker and grain table after the grains of each table, the GD marker and grain
//! directory, a footer marker with a copy of the header (real `gdOffset`), and the
//! end-of-stream marker.
//!
//! The file is written strictly front to back, so it can go to a pipe. Compression runs
//! in the engine's [`Encoder`] hook on worker threads; this writer only appends.

use std::cell::RefCell;
use std::sync::Arc;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::writer::{write_all_at, Encoder, ImageWriter, Sink};

use super::sparse::{
    Marker, SparseHeader, CHECK_BYTES, COMPRESSION_DEFLATE, FLAG_COMPRESSED, FLAG_MARKERS,
    FLAG_NL_DETECT, GD_AT_END, GTES_PER_GT, MARKER_EOS, MARKER_FOOTER, MARKER_GD, MARKER_GT,
    SECTOR,
};
use super::writer::{VmdkOptions, GRAIN_SECTORS};

const GRAIN: u64 = GRAIN_SECTORS * SECTOR;
const GT_BYTES: u64 = GTES_PER_GT as u64 * 4;

thread_local! {
    static DEFLATE: RefCell<Option<(u32, flate2::Compress)>> = const { RefCell::new(None) };
}

/// Compress one grain of guest data at `offset` into its on-disk record: the grain
/// header `{lba, size}`, the zlib stream, zero padding to a whole sector.
pub fn encode_grain(offset: u64, data: &[u8], level: u32) -> Result<Vec<u8>> {
    // A last partial grain is padded to whole sectors, as VMware's tools do.
    let padded;
    let plain = if !data.len().is_multiple_of(SECTOR as usize) {
        let mut v = data.to_vec();
        v.resize(data.len().next_multiple_of(SECTOR as usize), 0);
        padded = v;
        &padded[..]
    } else {
        data
    };
    let mut out = Vec::with_capacity(plain.len() / 2 + 1024);
    out.resize(12, 0);
    DEFLATE.with(|cell| -> Result<()> {
        let mut slot = cell.borrow_mut();
        if !matches!(slot.as_ref(), Some((l, _)) if *l == level) {
            *slot = Some((
                level,
                flate2::Compress::new(flate2::Compression::new(level), true),
            ));
        }
        let (_, z) = slot.as_mut().expect("just set");
        z.reset();
        // Room for the worst case of every level: zlib-rs's level 1 ("quick") spends up to
        // 9 bits per literal and panics instead of returning when its output is full.
        out.reserve(plain.len() + plain.len() / 8 + 1024);
        loop {
            let st = z
                .compress_vec(
                    &plain[z.total_in() as usize..],
                    &mut out,
                    flate2::FlushCompress::Finish,
                )
                .map_err(|e| Error::arg(format!("deflate failed: {e}")))?;
            if st == flate2::Status::StreamEnd {
                return Ok(());
            }
            out.reserve(64 << 10);
        }
    })?;
    let size = (out.len() - 12) as u32;
    LE::write_u64(&mut out[0..8], offset / SECTOR);
    LE::write_u32(&mut out[8..12], size);
    out.resize(out.len().next_multiple_of(SECTOR as usize), 0);
    Ok(out)
}

/// The per-grain compressor the engine runs on its workers.
#[derive(Debug)]
struct GrainEncoder {
    level: u32,
}

impl Encoder for GrainEncoder {
    fn encode(&self, offset: u64, data: &[u8]) -> Result<Option<Vec<u8>>> {
        // Every grain of a streamOptimized extent is compressed, even when it grows.
        encode_grain(offset, data, self.level).map(Some)
    }
}

/// The streamOptimized writer.
#[derive(Debug)]
pub struct StreamWriter {
    file: Sink,
    opts: VmdkOptions,
    header: SparseHeader,
    /// Next byte to write (always a sector multiple).
    pos: u64,
    gd: Vec<u32>,
    cur_gt: Option<u64>,
    gt: Vec<u32>,
    encoder: Arc<GrainEncoder>,
}

impl StreamWriter {
    /// Write the header and descriptor and return the writer.
    pub fn new(file: Sink, opts: VmdkOptions) -> Result<Self> {
        let desc = opts.descriptor("streamOptimized", &opts.extent_name);
        let desc_sectors = (desc.len() as u64).div_ceil(SECTOR).max(1);
        let overhead = (1 + desc_sectors).next_multiple_of(GRAIN_SECTORS);
        let gd_entries = opts
            .capacity
            .div_ceil(GRAIN_SECTORS * u64::from(GTES_PER_GT));
        let header = SparseHeader {
            version: 3,
            flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
            capacity: opts.capacity,
            grain_size: GRAIN_SECTORS,
            desc_offset: 1,
            desc_size: desc_sectors,
            num_gtes_per_gt: GTES_PER_GT,
            rgd_offset: 0,
            gd_offset: GD_AT_END,
            overhead,
            unclean_shutdown: false,
            check_bytes: CHECK_BYTES,
            compress_algorithm: COMPRESSION_DEFLATE,
        };
        let mut head = vec![0u8; (overhead * SECTOR) as usize];
        head[..512].copy_from_slice(&header.to_bytes());
        head[512..512 + desc.len()].copy_from_slice(desc.as_bytes());
        write_all_at(&file, &head, 0, "VMDK header and descriptor")?;
        Ok(StreamWriter {
            file,
            header,
            pos: overhead * SECTOR,
            gd: vec![0; gd_entries as usize],
            cur_gt: None,
            gt: vec![0; GTES_PER_GT as usize],
            encoder: Arc::new(GrainEncoder { level: opts.level }),
            opts,
        })
    }

    fn append(&mut self, data: &[u8], what: &str) -> Result<()> {
        write_all_at(&self.file, data, self.pos, what)?;
        self.pos += data.len() as u64;
        Ok(())
    }

    fn sector(&self) -> Result<u32> {
        u32::try_from(self.pos / SECTOR).map_err(|_| {
            Error::limit("streamOptimized VMDK cannot grow past 2 TiB of compressed data")
        })
    }

    fn flush_gt(&mut self) -> Result<()> {
        if let Some(i) = self.cur_gt.take() {
            let marker = Marker {
                val: GT_BYTES / SECTOR,
                size: 0,
                kind: MARKER_GT,
            };
            self.append(&marker.to_bytes(), "grain table marker")?;
            self.gd[i as usize] = self.sector()?;
            let mut b = vec![0u8; GT_BYTES as usize];
            LE::write_u32_into(&self.gt, &mut b);
            self.append(&b, "grain table")?;
            self.gt.fill(0);
        }
        Ok(())
    }

    fn put_grain(&mut self, offset: u64, record: &[u8]) -> Result<()> {
        if !offset.is_multiple_of(GRAIN) || offset >= self.opts.capacity * SECTOR {
            return Err(Error::arg(format!(
                "streamOptimized grain at {offset:#x} is not grain-aligned or past the end"
            )));
        }
        let g = offset / GRAIN;
        let ti = g / u64::from(GTES_PER_GT);
        if self.cur_gt.is_some_and(|c| ti < c) {
            return Err(Error::arg(
                "streamOptimized grains must arrive in ascending order",
            ));
        }
        if self.cur_gt != Some(ti) {
            self.flush_gt()?;
            self.cur_gt = Some(ti);
        }
        let gi = (g % u64::from(GTES_PER_GT)) as usize;
        if self.gt[gi] != 0 {
            return Err(Error::arg(format!("grain at {offset:#x} written twice")));
        }
        self.gt[gi] = self.sector()?;
        self.append(record, "compressed grain")
    }
}

impl ImageWriter for StreamWriter {
    fn granularity(&self) -> u64 {
        GRAIN
    }

    fn virtual_size(&self) -> u64 {
        self.opts.capacity * SECTOR
    }

    fn encoder(&self) -> Option<Arc<dyn Encoder>> {
        Some(self.encoder.clone())
    }

    fn streams(&self) -> bool {
        true
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        for (k, chunk) in data.chunks(GRAIN as usize).enumerate() {
            let off = offset + k as u64 * GRAIN;
            let rec = encode_grain(off, chunk, self.opts.level)?;
            self.put_grain(off, &rec)?;
        }
        Ok(())
    }

    fn write_encoded(&mut self, offset: u64, data: &[u8], encoded: Vec<u8>) -> Result<()> {
        if data.len() as u64 > GRAIN {
            return self.write(offset, data);
        }
        self.put_grain(offset, &encoded)
    }

    fn finish(mut self: Box<Self>) -> Result<()> {
        self.flush_gt()?;
        let gd_sectors = (self.gd.len() as u64 * 4).div_ceil(SECTOR).max(1);
        let marker = Marker {
            val: gd_sectors,
            size: 0,
            kind: MARKER_GD,
        };
        self.append(&marker.to_bytes(), "grain directory marker")?;
        let gd_sector = self.pos / SECTOR;
        let mut b = vec![0u8; (gd_sectors * SECTOR) as usize];
        LE::write_u32_into(&self.gd, &mut b[..self.gd.len() * 4]);
        self.append(&b, "grain directory")?;
        let marker = Marker {
            val: 1,
            size: 0,
            kind: MARKER_FOOTER,
        };
        self.append(&marker.to_bytes(), "footer marker")?;
        let mut footer = self.header;
        footer.gd_offset = gd_sector;
        self.append(&footer.to_bytes(), "footer")?;
        let eos = Marker {
            val: 0,
            size: 0,
            kind: MARKER_EOS,
        };
        self.append(&eos.to_bytes(), "end-of-stream marker")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inflate the zlib payload of grain record `rec` (marker `m`) into `out`; bytes produced.
    fn inflate(rec: &[u8], m: &Marker, out: &mut [u8]) -> u64 {
        let mut z = flate2::Decompress::new(true);
        z.decompress(
            &rec[12..12 + m.size as usize],
            out,
            flate2::FlushDecompress::Finish,
        )
        .unwrap();
        z.total_out()
    }

    #[test]
    fn grain_record_inflates_back() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let rec = encode_grain(3 * GRAIN, &data, 6).unwrap();
        assert_eq!(rec.len() % 512, 0);
        let m = Marker::parse(&rec).unwrap();
        assert_eq!(m.val, 3 * GRAIN_SECTORS);
        let mut out = vec![0u8; 65536];
        assert_eq!(inflate(&rec, &m, &mut out), 65536);
        assert_eq!(out, data);
        // Partial last grain: padded to a whole sector.
        let rec = encode_grain(0, &data[..1000], 0).unwrap();
        let m = Marker::parse(&rec).unwrap();
        assert_eq!(inflate(&rec, &m, &mut out), 1024);
    }
}
