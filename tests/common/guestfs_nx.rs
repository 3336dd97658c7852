//! Helpers for the sparsify tests that build real filesystems (NTFS, XFS): junk written
//! into the extents the filesystem's own tools call free, the library's scan and
//! conversion, and the byte-for-byte and allocation checks of the output.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskconv::guest::{GuestFree, GuestScan};
use diskconv::{ConvertOptions, Format, MappingKind, OpenOptions};

use crate::common::{oracles_required, Rng};

/// Whether `tool` is installed; panics when it must be (CI, or build.rs saw it and the
/// test was not ignored), like the qemu-img check of `common`.
#[track_caller]
pub fn have(tool: &str, package: &str, missing_at_build: bool) -> bool {
    if Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    assert!(
        !oracles_required() && missing_at_build,
        "{tool} not found: `apt-get install {package}` (or ./scripts/test)"
    );
    eprintln!("{tool} not found: skipped (apt-get install {package})");
    false
}

/// Run a command; returns (success, stdout + stderr).
pub fn try_run(args: &[&str]) -> (bool, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Sort and merge byte extents.
pub fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in v {
        if l == 0 {
            continue;
        }
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

/// Total bytes of extents.
pub fn total(v: &[(u64, u64)]) -> u64 {
    v.iter().map(|e| e.1).sum()
}

/// Overwrite `extents` of the file with random bytes (what a deleted file leaves).
pub fn fill_junk(img: &Path, extents: &[(u64, u64)], seed: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; 1 << 20];
    for &(o, l) in extents {
        let mut done = 0;
        while done < l {
            let n = (l - done).min(1 << 20) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all_at(&buf[..n], o + done).unwrap();
            done += n as u64;
        }
    }
}

/// Scan a raw image the way `sparsify` does.
pub fn scan(img: &Path) -> GuestScan {
    let dev = diskconv::open(img, &OpenOptions::default()).unwrap();
    diskconv::guest::scan(dev.as_ref()).unwrap()
}

/// Scan `img` and convert it to a raw `out` through [`GuestFree`]; returns the scan.
pub fn sparsify_to(img: &Path, out: &Path) -> GuestScan {
    let dev = diskconv::open(img, &OpenOptions::default()).unwrap();
    let found = diskconv::guest::scan(dev.as_ref()).unwrap();
    let wrapped = GuestFree::new(dev, found.free.clone());
    diskconv::convert_to_path(&wrapped, out, &ConvertOptions::new(Format::Raw)).unwrap();
    found
}

/// The output of sparsify must be the input with exactly the scan's free runs zeroed,
/// those runs must lie inside what the tools call free (`tool_free`, merged) and be
/// unallocated in the output file.
pub fn check_output(input: &Path, output: &Path, tool_free: &[(u64, u64)], found: &GuestScan) {
    let runs: Vec<(u64, u64)> = found.free.runs().collect();
    for &(o, l) in &runs {
        assert!(
            tool_free
                .iter()
                .any(|&(to, tl)| o >= to && o + l <= to + tl),
            "dropped {l} bytes at {o:#x}, which the filesystem's tools do not call free"
        );
    }
    let a = std::fs::File::open(input).unwrap();
    let b = std::fs::File::open(output).unwrap();
    let size = a.metadata().unwrap().len();
    assert_eq!(b.metadata().unwrap().len(), size, "output size");
    let chunk = 1u64 << 20;
    let (mut x, mut y) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut ri = 0;
    let mut off = 0;
    while off < size {
        let n = chunk.min(size - off) as usize;
        a.read_exact_at(&mut x[..n], off).unwrap();
        b.read_exact_at(&mut y[..n], off).unwrap();
        while ri < runs.len() && runs[ri].0 + runs[ri].1 <= off {
            ri += 1;
        }
        let mut j = ri;
        while j < runs.len() && runs[j].0 < off + n as u64 {
            let s = runs[j].0.max(off) - off;
            let e = (runs[j].0 + runs[j].1).min(off + n as u64) - off;
            x[s as usize..e as usize].fill(0);
            j += 1;
        }
        if x[..n] != y[..n] {
            let i = (0..n).find(|&i| x[i] != y[i]).unwrap();
            panic!(
                "output differs from the input (free runs zeroed) at byte {:#x}",
                off + i as u64
            );
        }
        off += n as u64;
    }
    let out = diskconv::open(output, &OpenOptions::default()).unwrap();
    for &(o, l) in &runs {
        let mut at = o;
        while at < o + l {
            let m = out.map(at, o + l - at).unwrap();
            assert!(
                !matches!(m.kind, MappingKind::Data { .. }),
                "free range at {at:#x} is allocated in the output"
            );
            at += m.len;
        }
    }
}

/// A fresh temporary folder and a path in it.
pub fn tmp() -> (tempfile::TempDir, impl Fn(&str) -> PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, move |n: &str| p.join(n))
}

/// Copy of `img` for a hostile variant.
pub fn copy(img: &Path, to: &Path) {
    std::fs::copy(img, to).unwrap();
}

/// Patch bytes of a file.
pub fn patch(img: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Read bytes of a file.
pub fn peek(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(img).unwrap();
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, offset).unwrap();
    v
}

/// The scan must have skipped the only partition with a reason containing `why`, and
/// dropped nothing.
#[track_caller]
pub fn assert_skipped(found: &GuestScan, fs: &str, why: &str) {
    assert_eq!(found.partitions.len(), 1, "{:?}", found.partitions);
    let p = &found.partitions[0];
    assert_eq!(p.filesystem.as_deref(), Some(fs), "{p:?}");
    let reason = p
        .skipped
        .as_deref()
        .unwrap_or_else(|| panic!("not skipped: {p:?}"));
    assert!(
        reason.contains(why),
        "reason {reason:?} does not say {why:?}"
    );
    assert_eq!(p.free_bytes, 0);
    assert_eq!(found.free.free_bytes(), 0, "something was dropped");
    eprintln!("skipped as expected: {reason}");
}

/// Flip 1 to 4 random bytes inside `targets` (byte ranges of the image), scan, put the
/// bytes back; `iters` times. The scan must never panic or fail, and a skipped
/// partition must drop nothing. Returns how many runs were skipped.
pub fn mutate_and_scan(img: &Path, targets: &[(u64, u64)], iters: usize, seed: u64) -> usize {
    let clean = scan(img).free.free_bytes();
    let mut rng = Rng(seed | 1);
    let mut skipped = 0;
    for _ in 0..iters {
        let mut saved = Vec::new();
        for _ in 0..1 + rng.next() % 4 {
            let (o, l) = targets[(rng.next() % targets.len() as u64) as usize];
            let at = o + rng.next() % l;
            let old = peek(img, at, 1)[0];
            saved.push((at, old));
            patch(img, at, &[old ^ (1 + (rng.next() % 255) as u8)]);
        }
        let found = scan(img);
        for p in &found.partitions {
            if p.skipped.is_some() {
                assert_eq!(p.free_bytes, 0, "{p:?}");
                skipped += 1;
            }
        }
        for (at, old) in saved.into_iter().rev() {
            patch(img, at, &[old]);
        }
    }
    assert_eq!(scan(img).free.free_bytes(), clean, "the image was restored");
    skipped
}

/// Copy `img` into a new sparse disk file at `offset`, with `tail` bytes after it.
pub fn embed(img: &Path, disk: &Path, offset: u64, tail: u64) {
    let src = std::fs::File::open(img).unwrap();
    let len = src.metadata().unwrap().len();
    let dst = std::fs::File::create(disk).unwrap();
    dst.set_len(offset + len + tail).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(1 << 20) as usize;
        src.read_exact_at(&mut buf[..n], at).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], offset + at).unwrap();
        }
        at += n as u64;
    }
}

/// Scan `len` bytes at `offset` of `disk` as one partition: its report and its free
/// runs, relative to the partition.
pub fn scan_at(
    disk: &Path,
    offset: u64,
    len: u64,
) -> (diskconv::guest::PartitionReport, Vec<(u64, u64)>) {
    let dev = diskconv::open(disk, &OpenOptions::default()).unwrap();
    let mut map = diskconv::guest::FreeMap::new(dev.virtual_size());
    let region = diskconv::guest::Region::new(dev.as_ref(), offset, len).unwrap();
    let report = diskconv::guest::scan::scan_region(&mut map, region, "test");
    let runs = map.runs().map(|(o, l)| (o - offset, l)).collect();
    (report, runs)
}
