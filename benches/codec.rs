//! Each compressed-cluster codec on one 64 KiB cluster of the standard workload's kinds of
//! data (text-like words, which compress about 3x, and random bytes, which do not): the
//! per-cluster cost that bounds `convert -c` and reading a compressed image, without I/O
//! or threads. `cargo bench --bench codec` (add `--features zstd-c` for libzstd's zstd).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use diskconv::formats::qcow2::compress::{compress, decompress};
use diskconv::formats::qcow2::header::CompressionType;

const CLUSTER: usize = 64 << 10;

/// A small deterministic generator (xorshift), so every run measures the same bytes.
fn next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Words of 2 to 9 letters from a 2000-word vocabulary, separated by spaces, as
/// gen-workload.py writes its text.
fn text_cluster() -> Vec<u8> {
    let mut s = 42u64;
    let vocab: Vec<Vec<u8>> = (0..2000)
        .map(|_| {
            let n = 2 + next(&mut s) % 8;
            (0..n).map(|_| b'a' + (next(&mut s) % 26) as u8).collect()
        })
        .collect();
    let mut out = Vec::with_capacity(CLUSTER + 16);
    while out.len() < CLUSTER {
        out.extend_from_slice(&vocab[(next(&mut s) % 2000) as usize]);
        out.push(b' ');
    }
    out.truncate(CLUSTER);
    out
}

fn random_cluster() -> Vec<u8> {
    let mut s = 7u64;
    (0..CLUSTER).map(|_| next(&mut s) as u8).collect()
}

fn codecs(c: &mut Criterion) {
    let kinds = [("text", text_cluster()), ("random", random_cluster())];
    let types = [
        ("zlib", CompressionType::Zlib),
        ("zstd", CompressionType::Zstd),
    ];
    let mut g = c.benchmark_group("cluster");
    g.throughput(Throughput::Bytes(CLUSTER as u64));
    for (tname, t) in types {
        for (kname, data) in &kinds {
            g.bench_function(BenchmarkId::new(format!("{tname}-compress"), kname), |b| {
                b.iter(|| compress(t, data, CLUSTER).unwrap())
            });
            // Random data is stored, not compressed: only compressible clusters are read
            // back through the decoder.
            if let Some(z) = compress(t, data, CLUSTER).unwrap() {
                let mut out = vec![0u8; CLUSTER];
                g.bench_function(
                    BenchmarkId::new(format!("{tname}-decompress"), kname),
                    |b| b.iter(|| decompress(t, &z, &mut out).unwrap()),
                );
            }
        }
    }
    g.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
