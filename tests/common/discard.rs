//! Helpers the in-place discard tests share: images made by qemu-img and written by
//! qemu-io, references made by qemu-io's `write -z`, and the checks every format's
//! discard must pass (qemu-img compare, check, map, the file's allocated size).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskconv::ops::discard::discard_in_place;
use diskconv::Format;

use super::{qemu_img, run, s};

/// An image of `fmt` made by `qemu-img create -f fmt OPTS img size`, then written by
/// qemu-io: each `(pattern, offset, len)` as `write -P pattern offset len`.
pub fn make(
    dir: &Path,
    name: &str,
    fmt: &str,
    opts: &[&str],
    size: u64,
    writes: &[(u8, u64, u64)],
) -> PathBuf {
    let img = dir.join(name);
    let size_s = size.to_string();
    let mut a = vec!["create", "-q", "-f", fmt];
    a.extend_from_slice(opts);
    a.extend([s(&img), size_s.as_str()]);
    qemu_img(&a);
    qemu_io_writes(&img, fmt, writes);
    img
}

/// qemu-io `write -P` of each `(pattern, offset, len)`.
pub fn qemu_io_writes(img: &Path, fmt: &str, writes: &[(u8, u64, u64)]) {
    if writes.is_empty() {
        return;
    }
    let cmds: Vec<String> = writes
        .iter()
        .map(|(p, o, l)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    let mut a = vec!["qemu-io", "-f", fmt];
    for c in &cmds {
        a.extend(["-c", c.as_str()]);
    }
    a.push(s(img));
    run(&a);
}

/// The whole `unit`-sized pieces of `runs` in a guest of `size` bytes (a last unit cut
/// short by the end counts when the run reaches the end): what a discard drops.
pub fn whole(runs: &[(u64, u64)], unit: u64, size: u64) -> Vec<(u64, u64)> {
    runs.iter()
        .filter_map(|&(o, l)| {
            let a = o.div_ceil(unit) * unit;
            let b = if o + l >= size {
                size
            } else {
                (o + l) / unit * unit
            };
            (a < b).then(|| (a, b - a))
        })
        .collect()
}

/// A copy of `img` with `ranges` zeroed by qemu-io `write -z`: what the discarded image
/// must compare equal to.
pub fn reference(img: &Path, fmt: &str, ranges: &[(u64, u64)], to: PathBuf) -> PathBuf {
    std::fs::copy(img, &to).unwrap();
    let cmds: Vec<String> = ranges
        .iter()
        .map(|(o, l)| format!("write -z {o} {l}"))
        .collect();
    let mut a = vec!["qemu-io", "-f", fmt];
    for c in &cmds {
        a.extend(["-c", c.as_str()]);
    }
    a.push(s(&to));
    if !cmds.is_empty() {
        run(&a);
    }
    to
}

/// The guest bytes qemu reads from `img`.
pub fn guest(img: &Path, fmt: &str, scratch: &Path) -> Vec<u8> {
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(img), s(scratch)]);
    let b = std::fs::read(scratch).unwrap();
    std::fs::remove_file(scratch).unwrap();
    b
}

/// Assert `a` and `b` hold the same bytes outside `skip` (sorted ranges).
#[track_caller]
pub fn assert_same_outside(a: &[u8], b: &[u8], skip: &[(u64, u64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: guest sizes differ");
    let mut from = 0u64;
    let cmp = |x: u64, y: u64| {
        let (x, y) = (x as usize, y as usize);
        if a[x..y] != b[x..y] {
            let at = (x..y).find(|&i| a[i] != b[i]).unwrap();
            panic!("{what}: guest byte {at:#x} changed outside the discarded runs");
        }
    };
    for &(o, l) in skip {
        cmp(from, o);
        from = o + l;
    }
    cmp(from, a.len() as u64);
}

/// `qemu-img check` verdict: (corruptions, leaks); panics on anything but exit codes 0
/// (clean) and 3 (leaks only).
pub fn qemu_check(img: &Path, fmt: &str) -> (u64, u64) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", fmt, "--output=json", s(img)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code();
    assert!(
        matches!(code, Some(0) | Some(3)),
        "qemu-img check {} exit {code:?}: {text}{}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert_eq!(n("check-errors"), 0, "{text}");
    (n("corruptions"), n("leaks"))
}

/// Every byte of `ranges` reads as zeros without data in qemu's map (zero or unallocated).
#[track_caller]
pub fn assert_map_free(img: &Path, fmt: &str, ranges: &[(u64, u64)]) {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "-f", fmt, "--output=json", s(img)])).unwrap();
    for &(o, l) in ranges {
        for m in v.as_array().unwrap() {
            let (mo, ml) = (m["start"].as_u64().unwrap(), m["length"].as_u64().unwrap());
            if mo < o + l && o < mo + ml {
                assert!(
                    m["data"] == false || m["zero"] == true,
                    "{}: qemu-img map shows data in discarded range {o:#x}+{l:#x}: {m}",
                    img.display()
                );
            }
        }
    }
}

/// Bytes the file occupies on disk.
pub fn on_disk(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Run the discard through the library entry sparsify uses.
pub fn discard(
    img: &Path,
    fmt: Format,
    runs: &[(u64, u64)],
    fail_at: Option<u64>,
) -> diskconv::Result<u64> {
    discard_in_place(img, Some(fmt), runs, fail_at)
}

/// One format's discard case.
pub struct Case<'a> {
    pub fmt: &'a str,
    pub create: &'a [&'a str],
    pub size: u64,
    pub writes: &'a [(u8, u64, u64)],
    pub runs: &'a [(u64, u64)],
    /// The format's allocation unit: what a discard unallocates whole.
    pub unit: u64,
    /// Whether qemu-img can check the format.
    pub checkable: bool,
    /// Bytes at each edge of a dropped range that may stay allocated (zeroed, not freed:
    /// a data area not aligned to the filesystem's blocks).
    pub edge: u64,
}

/// Make the case's image, discard its runs, and check everything: compare against
/// the `write -z` reference, check clean, the runs free in qemu's map, the returned
/// count and the file smaller on disk by about that much. Returns (image, discarded
/// ranges, bytes freed, on-disk bytes before and after).
pub fn run_case(dir: &Path, c: &Case) -> (PathBuf, u64) {
    let f = Format::from_name(c.fmt).unwrap();
    let img = make(
        dir,
        &format!("img.{}", c.fmt),
        c.fmt,
        c.create,
        c.size,
        c.writes,
    );
    let dropped = whole(c.runs, c.unit, c.size);
    let want = reference(&img, c.fmt, &dropped, dir.join(format!("ref.{}", c.fmt)));
    let before = on_disk(&img);
    let len_before = std::fs::metadata(&img).unwrap().len();
    let freed = discard(&img, f, c.runs, None).unwrap_or_else(|e| panic!("{}: {e}", c.fmt));
    qemu_img(&["compare", "-f", c.fmt, "-F", c.fmt, s(&img), s(&want)]);
    if c.checkable {
        assert_eq!(
            qemu_check(&img, c.fmt),
            (0, 0),
            "{}: check after discard",
            c.fmt
        );
    }
    let inner: Vec<(u64, u64)> = dropped
        .iter()
        .filter(|&&(_, l)| l > 2 * c.edge)
        .map(|&(o, l)| (o + c.edge, l - 2 * c.edge))
        .collect();
    assert_map_free(&img, c.fmt, &inner);
    // What was stored in the dropped units: the writes' whole units there.
    let stored: u64 = dropped
        .iter()
        .map(|&(o, l)| {
            (o / c.unit..(o + l).div_ceil(c.unit))
                .filter(|u| {
                    let (a, b) = (u * c.unit, (u + 1) * c.unit);
                    c.writes.iter().any(|&(_, wo, wl)| wo < b && a < wo + wl)
                })
                .count() as u64
                * c.unit
        })
        .sum();
    // Counted from the filesystem's extents, which an unaligned data area shifts.
    let slack = 2 * c.edge * dropped.len() as u64;
    assert!(
        freed.abs_diff(stored) <= slack,
        "{}: {freed} bytes reported freed, {stored} were stored",
        c.fmt
    );
    let after = on_disk(&img);
    eprintln!(
        "{} {:?}: freed {freed} bytes; on disk {before} -> {after}; length {len_before} -> {}",
        c.fmt,
        c.create,
        std::fs::metadata(&img).unwrap().len()
    );
    // Units below the filesystem's 4 KiB block free only the blocks they fill whole (a
    // 512-byte qcow2 cluster run is broken by an L2 table every 32 KiB).
    let counted = if c.unit < 4096 { freed / 8 * 7 } else { freed };
    assert!(
        after + counted <= before + 64 * 1024,
        "{}: on disk {before} -> {after} bytes, but {freed} were freed",
        c.fmt
    );
    assert!(std::fs::metadata(&img).unwrap().len() <= len_before);
    // A second discard of the same runs frees nothing and changes nothing.
    assert_eq!(
        discard(&img, f, c.runs, None).unwrap(),
        0,
        "{}: second discard",
        c.fmt
    );
    qemu_img(&["compare", "-f", c.fmt, "-F", c.fmt, s(&img), s(&want)]);
    (img, freed)
}

/// Fail every write of the case's discard in turn: after each failure the image must
/// read as before outside the discarded units, `qemu-img check` must find no corruption
/// (leaks only where `leaks_ok`), and a discard run again must finish the job. Returns
/// how many writes the whole discard makes.
pub fn sweep(dir: &Path, c: &Case, leaks_ok: bool) -> u64 {
    let f = Format::from_name(c.fmt).unwrap();
    let orig = make(
        dir,
        &format!("orig.{}", c.fmt),
        c.fmt,
        c.create,
        c.size,
        c.writes,
    );
    let dropped = whole(c.runs, c.unit, c.size);
    let want = reference(&orig, c.fmt, &dropped, dir.join(format!("ref.{}", c.fmt)));
    let scratch = dir.join("scratch.raw");
    let before = guest(&orig, c.fmt, &scratch);
    let work = dir.join(format!("work.{}", c.fmt));
    let mut saw_leaks = false;
    for n in 1.. {
        assert!(n < 400, "{}: the hook never stopped failing", c.fmt);
        std::fs::copy(&orig, &work).unwrap();
        match discard(&work, f, c.runs, Some(n)) {
            Ok(_) => {
                qemu_img(&["compare", "-f", c.fmt, "-F", c.fmt, s(&work), s(&want)]);
                if c.checkable {
                    assert_eq!(qemu_check(&work, c.fmt), (0, 0));
                }
                assert!(
                    saw_leaks || !leaks_ok || n == 1,
                    "{}: no failure left a leak",
                    c.fmt
                );
                return n - 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("test hook"), "{}: {e}", c.fmt);
                let now = guest(&work, c.fmt, &scratch);
                assert_same_outside(
                    &before,
                    &now,
                    &dropped,
                    &format!("{} failing write {n}", c.fmt),
                );
                if c.checkable {
                    let (corrupt, leaks) = qemu_check(&work, c.fmt);
                    assert_eq!(corrupt, 0, "{}: corruption after failing write {n}", c.fmt);
                    assert!(
                        leaks == 0 || leaks_ok,
                        "{}: {leaks} leaks after failing write {n}",
                        c.fmt
                    );
                    saw_leaks |= leaks > 0;
                }
                // Run again to completion: the image reaches the discarded state.
                discard(&work, f, c.runs, None)
                    .unwrap_or_else(|e| panic!("{} rerun after {n}: {e}", c.fmt));
                qemu_img(&["compare", "-f", c.fmt, "-F", c.fmt, s(&work), s(&want)]);
                if c.checkable {
                    assert_eq!(qemu_check(&work, c.fmt).0, 0);
                }
            }
        }
    }
    unreachable!()
}
