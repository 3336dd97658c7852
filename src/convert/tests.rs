//! The engine's tests, over an in-memory source with a chosen map and failing ranges.

use super::*;
use crate::device::Mapping;
use std::sync::{Arc, Mutex};

/// A source of `size` bytes whose map is `ranges` (offset, len, is_data) and whose
/// data reads from `bytes`; reads touching `bad` fail.
struct Mem {
    bytes: Vec<u8>,
    ranges: Vec<(u64, u64, bool)>,
    bad: Option<(u64, u64)>,
    bad_map: Option<u64>,
}

impl BlockDevice for Mem {
    fn virtual_size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        if self.bad_map == Some(offset) {
            return Err(Error::corrupt("bad table"));
        }
        let &(o, l, d) = self
            .ranges
            .iter()
            .find(|(o, l, _)| offset >= *o && offset < o + l)
            .expect("covered");
        Ok(Mapping {
            offset,
            len: (o + l - offset).min(max_len),
            kind: if d {
                MappingKind::Data { host: None }
            } else {
                MappingKind::Unallocated
            },
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if let Some((b, l)) = self.bad {
            if offset < b + l && b < offset + buf.len() as u64 {
                return Err(Error::corrupt("bad sector").at(offset));
            }
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
        Ok(())
    }
    fn info(&self) -> crate::device::ImageInfo {
        crate::device::ImageInfo::default()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

/// Every (offset, data) a writer received, in order.
type Writes = Vec<(u64, Vec<u8>)>;

/// Records every write.
struct Rec {
    gran: u64,
    size: u64,
    writes: Arc<Mutex<Writes>>,
}

impl ImageWriter for Rec {
    fn granularity(&self) -> u64 {
        self.gran
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.writes.lock().unwrap().push((offset, data.to_vec()));
        Ok(())
    }
    fn finish(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

fn run(src: &Mem, gran: u64, opts: &ConvertOptions) -> Result<(Writes, ConvertReport)> {
    let writes = Arc::new(Mutex::new(Vec::new()));
    let w = Rec {
        gran,
        size: src.virtual_size(),
        writes: writes.clone(),
    };
    let r = convert_device(src, Box::new(w), opts)?;
    let v = writes.lock().unwrap().clone();
    Ok((v, r))
}

fn written(w: &[(u64, Vec<u8>)]) -> u64 {
    w.iter().map(|(_, d)| d.len() as u64).sum()
}

/// 4 KiB of data every 256 KiB over 4 MiB, the rest unallocated.
fn holey() -> Mem {
    let size = 4u64 << 20;
    let mut bytes = vec![0u8; size as usize];
    let mut ranges = Vec::new();
    for o in (0..size).step_by(256 << 10) {
        bytes[o as usize..o as usize + 4096].fill(0xab);
        ranges.push((o, 4096, true));
        ranges.push((o + 4096, (256 << 10) - 4096, false));
    }
    Mem {
        bytes,
        ranges,
        bad: None,
        bad_map: None,
    }
}

#[test]
fn large_sparse_size_never_writes_source_holes() {
    let src = holey();
    for s in [4096u64, 64 << 10, 1 << 20, 16 << 20] {
        let mut o = ConvertOptions::new(Format::Raw);
        o.min_sparse = s;
        let (w, _) = run(&src, 512, &o).unwrap();
        assert_eq!(written(&w), 16 * 4096, "-S {s}");
        for (off, d) in &w {
            assert_eq!(off % (256 << 10), 0, "-S {s}");
            assert!(d.iter().all(|&b| b == 0xab));
        }
    }
    // A granule larger than the data is written whole, holes inside it as zeros.
    let mut o = ConvertOptions::new(Format::Raw);
    o.min_sparse = 1 << 20;
    let (w, _) = run(&src, 64 << 10, &o).unwrap();
    assert_eq!(written(&w), 16 * (64 << 10));
    // -S 0 writes everything.
    o.min_sparse = 0;
    let (w, _) = run(&src, 512, &o).unwrap();
    assert_eq!(written(&w), 4 << 20);
}

#[test]
fn zero_runs_inside_data_follow_sparse_size() {
    // One data range of 1 MiB: 64 KiB of data, 128 KiB of zeros, data to the end.
    let size = 1u64 << 20;
    let mut bytes = vec![1u8; size as usize];
    bytes[64 << 10..192 << 10].fill(0);
    let src = Mem {
        bytes,
        ranges: vec![(0, size, true)],
        bad: None,
        bad_map: None,
    };
    let mut o = ConvertOptions::new(Format::Raw);
    o.min_sparse = 64 << 10;
    let (w, _) = run(&src, 512, &o).unwrap();
    assert_eq!(written(&w), size - (128 << 10));
    o.min_sparse = 256 << 10;
    let (w, _) = run(&src, 512, &o).unwrap();
    assert_eq!(written(&w), size);
}

#[test]
fn salvage_writes_zeros_for_unreadable_sectors_and_reports_them() {
    let size = 2u64 << 20;
    let src = Mem {
        bytes: vec![7u8; size as usize],
        ranges: vec![(0, size, true)],
        bad: Some((0x10_0200, 1024)),
        bad_map: None,
    };
    let mut o = ConvertOptions::new(Format::Raw);
    let e = run(&src, 512, &o).unwrap_err();
    assert_eq!(e.kind(), crate::ErrorKind::Corrupt);
    o.salvage = true;
    let (w, r) = run(&src, 512, &o).unwrap();
    assert_eq!(
        r.unreadable
            .iter()
            .map(|u| (u.offset, u.len))
            .collect::<Vec<_>>(),
        vec![(0x10_0200, 1024)]
    );
    // Everything is written (the zeros are shorter than -S), the bad sectors as zeros.
    assert_eq!(written(&w), size);
    for (off, d) in &w {
        for (i, &b) in d.iter().enumerate() {
            let at = off + i as u64;
            let bad = (0x10_0200..0x10_0600).contains(&at);
            assert_eq!(b, if bad { 0 } else { 7 }, "byte {at:#x}");
        }
    }
}

#[test]
fn salvage_reads_past_a_failing_map() {
    let size = 1u64 << 20;
    let src = Mem {
        bytes: vec![3u8; size as usize],
        ranges: vec![(0, 4096, true), (4096, size - 4096, true)],
        bad: None,
        bad_map: Some(4096),
    };
    let mut o = ConvertOptions::new(Format::Raw);
    assert!(run(&src, 512, &o).is_err());
    o.salvage = true;
    let (w, r) = run(&src, 512, &o).unwrap();
    assert_eq!(written(&w), size);
    assert_eq!(r.unreadable.len(), 1);
    assert_eq!((r.unreadable[0].offset, r.unreadable[0].len), (4096, 512));
}
