//! Helpers for the guest filesystem tests (sparsify_ext, sparsify_fat): fill the free
//! extents a filesystem's own tools report with junk, sparsify through the library
//! (`guest::scan` + `GuestFree` + `convert_to_path` to qcow2), and check the output
//! against the input with qemu-img as the oracle.
#![allow(dead_code)]

use std::fs::OpenOptions as FsOpen;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskconv::guest::{self, GuestFree, PartitionReport};
use diskconv::{convert_to_path, BlockDevice, ConvertOptions, Format, OpenOptions};

/// Deterministic xorshift (no dependency).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        for c in v.chunks_mut(8) {
            let r = self.next().to_le_bytes();
            c.copy_from_slice(&r[..c.len()]);
        }
        v
    }
}

/// Run a command; panic with its output unless it succeeds; stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command; its exit status and combined output.
pub fn run_status(args: &[&str]) -> (i32, String) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Sort and merge touching or overlapping byte extents.
pub fn merge(mut ext: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ext.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in ext {
        if let Some(last) = out.last_mut() {
            if o <= last.0 + last.1 {
                let end = (o + l).max(last.0 + last.1);
                last.1 = end - last.0;
                continue;
            }
        }
        out.push((o, l));
    }
    out
}

/// Write random junk over every extent (so a scanner that misses one leaves junk that
/// the checks see).
pub fn fill_junk(img: &Path, extents: &[(u64, u64)], seed: u64) {
    let f = FsOpen::new().write(true).open(img).unwrap();
    let mut rng = Rng(seed | 1);
    for &(o, l) in extents {
        let mut done = 0;
        while done < l {
            let n = (l - done).min(1 << 20) as usize;
            f.write_all_at(&rng.bytes(n), o + done).unwrap();
            done += n as u64;
        }
    }
}

/// The whole granules inside each extent.
pub fn interiors(extents: &[(u64, u64)], granule: u64) -> Vec<(u64, u64)> {
    extents
        .iter()
        .filter_map(|&(o, l)| {
            let a = o.div_ceil(granule) * granule;
            let b = (o + l) / granule * granule;
            (b > a).then(|| (a, b - a))
        })
        .collect()
}

/// What sparsifying an image gave.
pub struct Sparsified {
    pub out: PathBuf,
    pub partitions: Vec<PartitionReport>,
    pub granule: u64,
    pub free_bytes: u64,
    /// The free map's runs (disk offset, length).
    pub runs: Vec<(u64, u64)>,
}

/// Scan `img` (raw), wrap it and convert it to qcow2 at `out`.
pub fn sparsify(img: &Path, out: &Path) -> Sparsified {
    let dev = diskconv::open(img, &OpenOptions::new()).unwrap();
    let scan = guest::scan(dev.as_ref()).unwrap();
    let granule = scan.free.granule();
    let free_bytes = scan.free.free_bytes();
    let runs = scan.free.runs().collect();
    let wrapped = GuestFree::new(dev, scan.free);
    convert_to_path(&wrapped, out, &ConvertOptions::new(Format::Qcow2)).unwrap();
    Sparsified {
        out: out.to_path_buf(),
        partitions: scan.partitions,
        granule,
        free_bytes,
        runs,
    }
}

/// Scan only: the report of the one partition (whole disk) and the free bytes.
pub fn scan_only(img: &Path) -> (PartitionReport, u64) {
    let dev = diskconv::open(img, &OpenOptions::new()).unwrap();
    let scan = guest::scan(dev.as_ref()).unwrap();
    assert_eq!(scan.partitions.len(), 1, "{:?}", scan.partitions);
    (scan.partitions[0].clone(), scan.free.free_bytes())
}

/// The output back as raw bytes (converted by qemu-img, the oracle).
pub fn back_to_raw(out: &Path, dir: &Path) -> PathBuf {
    let raw = dir.join(format!(
        "{}.back.raw",
        out.file_name().unwrap().to_str().unwrap()
    ));
    run(&[
        "qemu-img",
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        s(out),
        s(&raw),
    ]);
    raw
}

/// Check the sparsified output against the input: every whole granule of a free extent
/// reads as zeros and is unallocated in the qcow2 (qemu-img map), every other byte is
/// the input's; the report's free bytes are exactly those granules. Returns the output
/// as a raw file for the filesystem checker.
pub fn assert_sparsified(
    input: &Path,
    sp: &Sparsified,
    free: &[(u64, u64)],
    dir: &Path,
) -> PathBuf {
    let holes = interiors(&merge(free.to_vec()), sp.granule);
    let want: u64 = holes.iter().map(|h| h.1).sum();
    assert!(want > 0, "the test made no free granules");
    let (got, tool) = (merge(sp.runs.clone()), merge(holes.clone()));
    if got != tool {
        let i = got.iter().zip(&tool).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "free runs differ from the tool's (whole granules) at run {i}: found {:x?}, tool {:x?}",
            got.get(i),
            tool.get(i)
        );
    }
    assert_eq!(
        sp.free_bytes, want,
        "free bytes found vs the tool's free extents"
    );
    let reported: u64 = sp.partitions.iter().map(|p| p.free_bytes).sum();
    assert_eq!(reported, want, "{:?}", sp.partitions);

    let back = back_to_raw(&sp.out, dir);
    let a = std::fs::read(input).unwrap();
    let b = std::fs::read(&back).unwrap();
    assert_eq!(a.len(), b.len());
    let mut pos = 0u64;
    let check_same = |from: u64, to: u64| {
        let (x, y) = (
            &a[from as usize..to as usize],
            &b[from as usize..to as usize],
        );
        if x != y {
            let i = x.iter().zip(y).position(|(p, q)| p != q).unwrap() as u64 + from;
            panic!("byte {i:#x} (outside the free extents) differs from the input");
        }
    };
    for &(o, l) in &holes {
        check_same(pos, o);
        if let Some(i) = b[o as usize..(o + l) as usize].iter().position(|&c| c != 0) {
            panic!("free byte {:#x} does not read as zero", o + i as u64);
        }
        pos = o + l;
    }
    check_same(pos, a.len() as u64);

    let map: serde_json::Value = serde_json::from_str(&run(&[
        "qemu-img",
        "map",
        "--output=json",
        "-f",
        "qcow2",
        s(&sp.out),
    ]))
    .unwrap();
    // A qcow2 cluster is unallocated when all of it is free: check whole clusters.
    let clusters = interiors(&holes, 65536);
    assert!(!clusters.is_empty(), "no whole free qcow2 cluster to check");
    for e in map.as_array().unwrap() {
        if e["data"].as_bool() != Some(true) {
            continue;
        }
        let (st, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        for &(o, l) in &clusters {
            assert!(
                st + len <= o || o + l <= st,
                "allocated output range {st:#x}+{len:#x} overlaps free {o:#x}+{l:#x}"
            );
        }
    }
    back
}

/// Assert the scan left the filesystem whole and said why (`want` in the reason).
pub fn assert_skipped(img: &Path, want: &str) -> PartitionReport {
    let (p, free) = scan_only(img);
    let reason = p.skipped.clone().unwrap_or_default();
    assert!(
        reason.contains(want),
        "expected a skip naming {want:?}, got {p:?}"
    );
    assert_eq!((free, p.free_bytes), (0, 0), "{p:?}");
    p
}

/// True when every tool is installed; missing ones fail under CI (never a silent pass),
/// otherwise the test is skipped (build.rs also marks it ignored).
pub fn have(tools: &[&str], required: bool) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
        || std::env::var("DISKCONV_REQUIRE_QEMU").is_ok_and(|v| v == "1");
    assert!(
        !ci && !required,
        "missing {missing:?} (./scripts/test installs them)"
    );
    eprintln!("missing {missing:?}: skipped");
    false
}

/// The device of an image, for tests that look at a scan directly.
pub fn open(img: &Path) -> Box<dyn BlockDevice> {
    diskconv::open(img, &OpenOptions::new()).unwrap()
}

/// A device that counts the bytes read through it.
pub struct Counting {
    pub inner: Box<dyn BlockDevice>,
    pub read: std::sync::atomic::AtomicU64,
}

impl BlockDevice for Counting {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn map(&self, offset: u64, max_len: u64) -> diskconv::Result<diskconv::Mapping> {
        self.inner.map(offset, max_len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskconv::Result<()> {
        self.read
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn info(&self) -> diskconv::ImageInfo {
        self.inner.info()
    }
    fn format(&self) -> Format {
        self.inner.format()
    }
}

/// Scan `img` and return (bytes the scan read, free bytes found): the scan must read
/// metadata only, never file data.
pub fn scan_reads(img: &Path) -> (u64, u64) {
    let dev = Counting {
        inner: open(img),
        read: Default::default(),
    };
    let scan = guest::scan(&dev).unwrap();
    (
        dev.read.load(std::sync::atomic::Ordering::Relaxed),
        scan.free.free_bytes(),
    )
}

/// Flip random bytes of `img` inside the `targets` extents `rounds` times (restoring
/// them after each round) and scan: the scanners must never panic, whatever they read.
/// Returns how many rounds were skipped.
pub fn scan_survives_corruption(img: &Path, targets: &[(u64, u64)], rounds: u32, seed: u64) -> u32 {
    scan_survives_corruption_with(img, targets, rounds, seed, |_| {})
}

/// [`scan_survives_corruption`], calling `scanned` with the free runs of every round
/// whose filesystem scanned.
pub fn scan_survives_corruption_with(
    img: &Path,
    targets: &[(u64, u64)],
    rounds: u32,
    seed: u64,
    scanned: impl Fn(Vec<(u64, u64)>),
) -> u32 {
    let f = FsOpen::new().read(true).write(true).open(img).unwrap();
    let mut rng = Rng(seed | 1);
    let mut skipped = 0;
    for _ in 0..rounds {
        let mut saved = Vec::new();
        for _ in 0..1 + rng.next() % 4 {
            let (o, l) = targets[(rng.next() % targets.len() as u64) as usize];
            let off = o + rng.next() % l;
            let mut b = [0u8];
            f.read_exact_at(&mut b, off).unwrap();
            saved.push((off, b[0]));
            f.write_all_at(&[b[0] ^ (1 << (rng.next() % 8))], off)
                .unwrap();
        }
        let dev = open(img);
        let scan = guest::scan(dev.as_ref()).unwrap();
        if scan.partitions[0].skipped.is_some() {
            skipped += 1;
        } else {
            scanned(scan.free.runs().collect());
        }
        for (off, b) in saved.into_iter().rev() {
            f.write_all_at(&[b], off).unwrap();
        }
    }
    skipped
}
