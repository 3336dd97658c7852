//! In-place discard (the write side of `sparsify --in-place`), per format, on images made
//! by qemu-img and written by qemu-io: the discarded image compares equal to a reference
//! zeroed by qemu-io `write -z`, `qemu-img check` finds it clean, qemu-img map shows the
//! runs unallocated or zero, and the file takes less room on disk. A failure at every
//! write in turn leaves an image reading as before outside the runs and free of
//! corruption (qcow2: leaks only), which a rerun completes.

use crate::common;

use common::discard::*;
use common::*;
use diskconv::Format;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// Data in most of an 8 MiB guest, distinct patterns per region.
const WRITES: &[(u8, u64, u64)] = &[
    (0x11, 0, MIB),
    (0x22, MIB + 512 * KIB, 3 * MIB),
    (0x33, 5 * MIB, 3 * MIB),
];
/// Runs: one inside the first region with unaligned edges, one across data and a hole,
/// one to the end of the guest (so the tail of the file becomes free).
const RUNS: &[(u64, u64)] = &[
    (60 * KIB, 900 * KIB),
    (MIB + 4 * KIB, 3 * MIB - 8 * KIB),
    (6 * MIB - 3 * KIB, 2 * MIB + 3 * KIB),
];

fn case<'a>(fmt: &'a str, create: &'a [&'a str], unit: u64, checkable: bool) -> Case<'a> {
    Case {
        fmt,
        create,
        size: 8 * MIB,
        writes: WRITES,
        runs: RUNS,
        unit,
        checkable,
        edge: 0,
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn raw_punches_whole_blocks() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run_case(dir.path(), &case("raw", &[], 4096, false));
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn qcow2_unallocates_clusters_and_frees_their_refcounts() {
    if !have_qemu_io() {
        return;
    }
    for (create, unit) in [
        (&["-o", "compat=1.1"][..], 64 * KIB),
        (&["-o", "compat=0.10"][..], 64 * KIB),
        (&["-o", "cluster_size=4096,refcount_bits=1"][..], 4096),
        (&["-o", "cluster_size=512"][..], 512),
        (&["-o", "extended_l2=on"][..], 64 * KIB),
        (&["-o", "refcount_bits=64,lazy_refcounts=on"][..], 64 * KIB),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = run_case(dir.path(), &case("qcow2", create, unit, true));
        // The freed tail is cut off: the file ends at its last data cluster or table
        // (with 512-byte clusters, L2 tables, never freed, sit between the tail's data).
        assert!(
            unit < 4096 || std::fs::metadata(&img).unwrap().len() < 6 * MIB + 512 * KIB,
            "{create:?}: {} bytes",
            std::fs::metadata(&img).unwrap().len()
        );
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn qcow2_failing_every_write_leaves_at_most_leaks() {
    if !have_qemu_io() {
        return;
    }
    for create in [
        &["-o", "compat=1.1"][..],
        &["-o", "cluster_size=16384,extended_l2=on"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let unit = if create[1].contains("16384") {
            16 * KIB
        } else {
            64 * KIB
        };
        let writes = sweep(dir.path(), &case("qcow2", create, unit, true), true);
        // L2 write, flush, refcount write(s), flush, punches, truncation.
        assert!(writes >= 6, "{create:?}: only {writes} writes");
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn vpc_dynamic_unmaps_blocks_and_fixed_punches_holes() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = run_case(
        dir.path(),
        &case("vpc", &["-o", "force_size=on"], 2 * MIB, false),
    );
    // The last block was freed: the file ends with the footer behind block 2.
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(len < 6 * MIB + 64 * KIB, "{len} bytes");
    let dir = tempfile::tempdir().unwrap();
    run_case(
        dir.path(),
        &case("vpc", &["-o", "subformat=fixed,force_size=on"], 4096, false),
    );
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn vpc_failing_every_write_reads_as_before() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let writes = sweep(
        dir.path(),
        &case("vpc", &["-o", "force_size=on"], 2 * MIB, false),
        false,
    );
    // BAT write, flush, punches, footer, flush, truncation.
    assert!(writes >= 5, "only {writes} writes");
    let dir = tempfile::tempdir().unwrap();
    sweep(
        dir.path(),
        &case("vpc", &["-o", "subformat=fixed,force_size=on"], 4096, false),
        false,
    );
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn vmdk_unmaps_grains_in_both_tables() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = run_case(dir.path(), &case("vmdk", &[], 64 * KIB, true));
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(
        len < 6 * MIB + 512 * KIB,
        "{len} bytes: the freed tail stays"
    );
    // The redundant tables say the same: qemu reads the primary ones, so swap the
    // directory offsets in the header and read again.
    let mut b = std::fs::read(&img).unwrap();
    let (rgd, gd) = (b[48..56].to_vec(), b[56..64].to_vec());
    b[48..56].copy_from_slice(&gd);
    b[56..64].copy_from_slice(&rgd);
    let swapped = dir.path().join("swapped.vmdk");
    std::fs::write(&swapped, &b).unwrap();
    qemu_img(&["compare", "-f", "vmdk", "-F", "vmdk", s(&img), s(&swapped)]);
    // Grains made with zeroed_grain=on too.
    let dir = tempfile::tempdir().unwrap();
    run_case(
        dir.path(),
        &case("vmdk", &["-o", "zeroed_grain=on"], 64 * KIB, true),
    );
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn vmdk_failing_every_write_reads_as_before() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let writes = sweep(dir.path(), &case("vmdk", &[], 64 * KIB, true), false);
    // Primary and redundant table, flush, punches, truncation.
    assert!(writes >= 5, "only {writes} writes");
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn vdi_dynamic_compacts_and_static_punches_holes() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, freed) = run_case(dir.path(), &case("vdi", &[], MIB, true));
    // Compacted: the file holds the header, the map and the blocks still in use.
    let len = std::fs::metadata(&img).unwrap().len();
    let kept = 8 * MIB - freed; // every block was written
    assert!(len <= kept + MIB, "{len} bytes for {kept} bytes of blocks");
    let info = qemu_info(&img, Format::Vdi);
    assert!(
        info["actual-size"].as_u64().unwrap() <= kept + MIB,
        "{info}"
    );
    let dir = tempfile::tempdir().unwrap();
    // The data area starts 1 KiB into the file: the punched units' edges stay allocated.
    let c = Case {
        edge: 4096,
        ..case("vdi", &["-o", "static=on"], 4096, true)
    };
    run_case(dir.path(), &c);
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn vdi_failing_every_write_reads_as_before() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let writes = sweep(dir.path(), &case("vdi", &[], MIB, true), false);
    // Moved blocks, flush, header and map, flush, truncation.
    assert!(writes >= 4, "only {writes} writes");
    let dir = tempfile::tempdir().unwrap();
    sweep(
        dir.path(),
        &case("vdi", &["-o", "static=on"], 4096, true),
        false,
    );
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn qcow2_overlay_marks_clusters_zero_over_its_backing_file() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = make(
        dir.path(),
        "base.qcow2",
        "qcow2",
        &[],
        8 * MIB,
        &[(0x44, 0, 8 * MIB)],
    );
    let b = base.to_str().unwrap();
    let (img, _) = run_case(
        dir.path(),
        &case("qcow2", &["-b", b, "-F", "qcow2"], 64 * KIB, true),
    );
    // Every cluster of the runs reads zeros, also those the overlay never stored (they
    // read the backing file's 0x44 before): the zero flag, not unallocated.
    let g = guest(&img, "qcow2", &dir.path().join("g.raw"));
    for (o, l) in whole(RUNS, 64 * KIB, 8 * MIB) {
        assert!(
            g[o as usize..(o + l) as usize].iter().all(|&x| x == 0),
            "{o:#x}+{l:#x} shows the backing file"
        );
    }
    assert_eq!(
        g[(4 * MIB + 600 * KIB) as usize],
        0x44,
        "outside the runs the backing file shows"
    );
    // A version 2 overlay has no zero flag: refused, untouched.
    let v2 = make(
        dir.path(),
        "v2.qcow2",
        "qcow2",
        &["-o", "compat=0.10", "-b", b, "-F", "qcow2"],
        8 * MIB,
        WRITES,
    );
    let before = std::fs::read(&v2).unwrap();
    let e = discard(&v2, Format::Qcow2, RUNS, None).unwrap_err();
    assert_eq!(e.kind(), diskconv::ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("zero flag"), "{e}");
    assert_eq!(std::fs::read(&v2).unwrap(), before);
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn qcow2_compressed_clusters_are_freed_and_survive_every_failure() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = make(dir.path(), "src.raw", "raw", &[], 8 * MIB, WRITES);
    let img = dir.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&raw),
        s(&img),
    ]);
    let dropped = whole(RUNS, 64 * KIB, 8 * MIB);
    let want = reference(&img, "qcow2", &dropped, dir.path().join("ref.qcow2"));
    let orig = dir.path().join("orig.qcow2");
    std::fs::copy(&img, &orig).unwrap();
    let freed = discard(&img, Format::Qcow2, RUNS, None).unwrap();
    // Stored: every written cluster in the dropped ranges (0x11.., 0x22.., 0x33..).
    assert_eq!(freed, (14 + 39 + 32) * 64 * KIB);
    qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(&img), s(&want)]);
    assert_eq!(qemu_check(&img, "qcow2"), (0, 0));
    assert_map_free(&img, "qcow2", &dropped);
    assert!(on_disk(&img) < on_disk(&orig));
    // Every write failed in turn.
    let scratch = dir.path().join("scratch.raw");
    let before = guest(&orig, "qcow2", &scratch);
    let work = dir.path().join("work.qcow2");
    let mut n = 1;
    loop {
        std::fs::copy(&orig, &work).unwrap();
        match discard(&work, Format::Qcow2, RUNS, Some(n)) {
            Ok(_) => break,
            Err(e) => {
                assert!(e.to_string().contains("test hook"), "{e}");
                let now = guest(&work, "qcow2", &scratch);
                assert_same_outside(&before, &now, &dropped, &format!("failing write {n}"));
                assert_eq!(
                    qemu_check(&work, "qcow2").0,
                    0,
                    "corruption after write {n}"
                );
            }
        }
        n += 1;
        assert!(n < 400);
    }
    qemu_img(&["compare", "-f", "qcow2", "-F", "qcow2", s(&work), s(&want)]);
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn qcow2_large_discards_commit_in_several_transactions() {
    if !have_qemu_io() {
        return;
    }
    // 512-byte clusters: 40 MiB are 81920 clusters, more than one transaction holds.
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * MIB;
    let c = Case {
        fmt: "qcow2",
        create: &["-o", "cluster_size=512"],
        size,
        writes: &[(0x55, 0, 40 * MIB)],
        runs: &[(512, 40 * MIB - 512)],
        unit: 512,
        checkable: true,
        edge: 0,
    };
    let (img, freed) = run_case(dir.path(), &c);
    assert_eq!(freed, size - 512);
    let g = guest(&img, "qcow2", &dir.path().join("g.raw"));
    assert!(g[..512].iter().all(|&x| x == 0x55));
}

/// Refusals of what cannot be discarded in place: named, with the reason, the image's
/// bytes untouched.
#[track_caller]
fn assert_refused(img: &std::path::Path, fmt: Format, needles: &[&str]) {
    let before = std::fs::read(img).unwrap();
    let e = discard(img, fmt, RUNS, None).unwrap_err();
    assert_eq!(e.kind(), diskconv::ErrorKind::Unsupported, "{e}");
    for n in needles {
        assert!(e.to_string().contains(n), "{n:?} not in: {e}");
    }
    assert_eq!(std::fs::read(img).unwrap(), before, "refused, yet changed");
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)"
)]
fn what_cannot_be_discarded_in_place_is_refused_with_the_reason() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // qcow2 marked dirty by lazy refcounts: its refcounts are stale.
    let img = make(
        d,
        "lazy.qcow2",
        "qcow2",
        &["-o", "lazy_refcounts=on"],
        8 * MIB,
        WRITES,
    );
    let mut b = std::fs::read(&img).unwrap();
    b[79] |= 1;
    std::fs::write(&img, &b).unwrap();
    assert_refused(
        &img,
        Format::Qcow2,
        &["qcow2", "dirty", "lazy refcounts", "check -r all"],
    );
    // Internal snapshots and persistent bitmaps.
    let img = make(d, "snap.qcow2", "qcow2", &[], 8 * MIB, WRITES);
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    assert_refused(&img, Format::Qcow2, &["snapshot"]);
    let img = make(d, "bm.qcow2", "qcow2", &[], 8 * MIB, WRITES);
    qemu_img(&["bitmap", "--add", s(&img), "b0"]);
    assert_refused(&img, Format::Qcow2, &["bitmap"]);
    // streamOptimized and flat VMDKs.
    let img = make(
        d,
        "so.vmdk",
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        8 * MIB,
        &[],
    );
    assert_refused(
        &img,
        Format::Vmdk,
        &["vmdk", "streamOptimized", "compressed"],
    );
    let img = make(
        d,
        "flat.vmdk",
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
        8 * MIB,
        &[],
    );
    assert_refused(&img, Format::Vmdk, &["vmdk", "monolithicFlat"]);
    // Runs that are not ascending, disjoint and inside the guest.
    let img = make(d, "ok.qcow2", "qcow2", &[], 8 * MIB, WRITES);
    let before = std::fs::read(&img).unwrap();
    for runs in [
        &[(0, MIB), (MIB / 2, MIB)][..],
        &[(7 * MIB, 2 * MIB)][..],
        &[(0, 0)][..],
    ] {
        let e = discard(&img, Format::Qcow2, runs, None).unwrap_err();
        assert_eq!(e.kind(), diskconv::ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("discard run"), "{e}");
    }
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

/// A loop device over a raw file (needs root; skipped with a line where losetup fails,
/// a failure under CI or DISKCONV_REQUIRE_LOOP).
struct Loop(std::path::PathBuf);

impl Loop {
    fn attach(file: &std::path::Path) -> Option<Loop> {
        let o = std::process::Command::new("losetup")
            .args(["-f", "--show", s(file)])
            .output();
        match o {
            Ok(o) if o.status.success() => {
                Some(Loop(String::from_utf8_lossy(&o.stdout).trim().into()))
            }
            other => {
                let msg = format!("losetup failed ({other:?}): needs root");
                if std::env::var_os("CI").is_some()
                    || std::env::var_os("DISKCONV_REQUIRE_LOOP").is_some()
                {
                    panic!("{msg}; CI/DISKCONV_REQUIRE_LOOP is set, so this is a failure");
                }
                eprintln!("SKIP {msg}");
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn raw_block_device_is_zeroed_and_unmapped() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("disk.raw");
    let mut data = vec![0u8; (8 * MIB) as usize];
    Rng(7).fill(&mut data);
    std::fs::write(&file, &data).unwrap();
    let Some(lo) = Loop::attach(&file) else {
        return;
    };
    let freed = discard(&lo.0, Format::Raw, RUNS, None).unwrap();
    let dropped = whole(RUNS, 4096, 8 * MIB);
    assert_eq!(freed, dropped.iter().map(|r| r.1).sum::<u64>());
    drop(lo);
    let got = std::fs::read(&file).unwrap();
    assert_same_outside(&data, &got, &dropped, "loop device");
    for &(o, l) in &dropped {
        assert!(got[o as usize..(o + l) as usize].iter().all(|&x| x == 0));
    }
    // The loop driver turned the zeroing into holes in its backing file.
    assert!(
        on_disk(&file) + freed <= 8 * MIB + 64 * KIB,
        "{}",
        on_disk(&file)
    );
    // Resizing a block device stays refused.
    let Some(lo) = Loop::attach(&file) else {
        return;
    };
    let o = diskconv::ResizeOptions {
        format: Some(Format::Raw),
        ..Default::default()
    };
    let e = diskconv::resize(&lo.0, 16 * MIB, &o).unwrap_err();
    assert!(e.to_string().contains("block device"), "{e}");
}
