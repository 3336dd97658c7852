//! The convert engine's throughput on an in-memory device into a null writer: measures
//! the engine itself (map walk, zero detection, reorder, threads) without disk I/O.
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diskconv::writer::{Encoder, ImageWriter};
use diskconv::{BlockDevice, ConvertOptions, Format, ImageInfo, Mapping, MappingKind, Result};

/// 256 MiB: alternating 1 MiB of data, 1 MiB of written zeros, 2 MiB hole.
struct MemDevice {
    data: Vec<u8>,
}

const SIZE: u64 = 256 << 20;

impl BlockDevice for MemDevice {
    fn virtual_size(&self) -> u64 {
        SIZE
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let period = 4 << 20;
        let in_period = offset % period;
        let (kind, end) = if in_period < 2 << 20 {
            (
                MappingKind::Data { host: None },
                offset - in_period + (2 << 20),
            )
        } else {
            (MappingKind::Unallocated, offset - in_period + period)
        };
        Ok(Mapping {
            offset,
            len: (end - offset).min(max_len),
            kind,
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let o = offset as usize % self.data.len();
        let n = buf.len().min(self.data.len() - o);
        buf[..n].copy_from_slice(&self.data[o..o + n]);
        buf[n..].fill(0);
        Ok(())
    }
    fn info(&self) -> ImageInfo {
        ImageInfo::default()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

struct NullWriter {
    bytes: u64,
    encoder: Option<Arc<dyn Encoder>>,
}

impl ImageWriter for NullWriter {
    fn granularity(&self) -> u64 {
        64 << 10
    }
    fn virtual_size(&self) -> u64 {
        SIZE
    }
    fn encoder(&self) -> Option<Arc<dyn Encoder>> {
        self.encoder.clone()
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> Result<()> {
        self.bytes += data.len() as u64;
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        assert!(self.bytes > 0);
        Ok(())
    }
}

/// Deflate each granule, as the qcow2 and vmdk writers do.
struct Deflate;
impl Encoder for Deflate {
    fn encode(&self, _offset: u64, data: &[u8]) -> Result<Option<Vec<u8>>> {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).expect("in memory");
        Ok(Some(e.finish().expect("in memory")))
    }
}

fn bench(c: &mut Criterion) {
    // 1 MiB random then 1 MiB zeros per 2 MiB.
    let mut data = vec![0u8; 2 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for b in data[..1 << 20].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let dev = MemDevice { data };
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Bytes(SIZE));
    g.sample_size(10);
    g.bench_function("plain_256MiB", |b| {
        b.iter(|| {
            let w = Box::new(NullWriter {
                bytes: 0,
                encoder: None,
            });
            diskconv::convert_device(&dev, w, &ConvertOptions::new(Format::Raw)).unwrap();
        })
    });
    g.bench_function("deflate_256MiB", |b| {
        b.iter(|| {
            let w = Box::new(NullWriter {
                bytes: 0,
                encoder: Some(Arc::new(Deflate)),
            });
            diskconv::convert_device(&dev, w, &ConvertOptions::new(Format::Raw)).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
