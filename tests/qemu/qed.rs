//! QED, read only: differential against qemu-img on images it makes (cluster and table
//! sizes, zero clusters, backing-file overlays with and without the raw-backing feature),
//! `info`/`map` JSON equal to qemu-img's, the need-check flag, every validated
//! header field and table entry refused with its exact error kind, bounded memory on
//! 1 GiB tables, and `-O qed` refused.

use crate::common;
use crate::common::readonly;

use std::path::{Path, PathBuf};

use byteorder::{ByteOrder, LittleEndian as LE};
use common::*;
use diskconv::{ErrorKind, Format, MappingKind, OpenOptions};
use readonly::*;

const MIB: u64 = 1 << 20;

fn qed() -> OpenOptions {
    OpenOptions::new().format(Format::Qed)
}

/// Read the whole guest; the first error.
fn read_all(p: &Path) -> diskconv::Result<()> {
    let dev = diskconv::open(p, &qed())?;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < dev.virtual_size() {
        let n = (dev.virtual_size() - off).min(MIB) as usize;
        dev.read_at(&mut buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut a = vec!["qemu-io", "-f", "qed"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(s(img));
    run(&a);
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn qemu_made_images_read_map_and_info_like_qemu() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("src.raw");
    make_raw(&raw, 20 * MIB, 11);
    for (i, opts) in [
        "",
        "cluster_size=4096,table_size=2",
        "cluster_size=16384,table_size=8",
        "cluster_size=1M,table_size=1",
    ]
    .iter()
    .enumerate()
    {
        if opts.ends_with("table_size=1") {
            continue; // qemu cannot open what it makes with one-cluster tables (below)
        }
        let img = d.join(format!("i{i}.qed"));
        let mut a = vec!["convert", "-O", "qed"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([s(&raw), s(&img)]);
        qemu_img(&a);
        assert_converts_like_qemu(&img, "qed", &[], d);
        assert_reads_like_qemu(&img, Format::Qed, d);
        assert_map_like_qemu(&img, "qed", &[]);
        assert_info_like_qemu(&img, "qed");
        assert_eq!(diskconv::probe(&img).unwrap(), Format::Qed, "{opts}");
        let insp = diskconv::inspect(&img, Some(Format::Qed)).unwrap();
        assert!(insp.safe, "{opts}: {:?}", insp.findings);
    }
    // Zero clusters (L2 entry 1): allocated zeros, as qemu maps them.
    let z = d.join("zero.qed");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096",
        s(&z),
        "8M",
    ]);
    qemu_io(
        &z,
        &[
            "write -P 0x11 0 64k",
            "write -z 64k 128k",
            "write -P 0x22 1M 4k",
            "write -z 3M 1M",
        ],
    );
    assert_converts_like_qemu(&z, "qed", &[], d);
    let map = assert_map_like_qemu(&z, "qed", &[]);
    assert!(map
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["present"] == true && e["zero"] == true && e["data"] == false));
    let dev = open_as(&z, Format::Qed);
    assert_eq!(
        dev.map(64 << 10, 128 << 10).unwrap().kind,
        MappingKind::Zero
    );
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn one_cluster_tables_are_read_where_qemu_refuses_them() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t1.qed");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096,table_size=1",
        s(&p),
        "1M",
    ]);
    let o = std::process::Command::new("qemu-img")
        .args(["info", s(&p)])
        .output()
        .unwrap();
    assert!(!o.status.success(), "qemu-img opened a table_size=1 image");
    let dev = open_as(&p, Format::Qed);
    assert_eq!(dev.virtual_size(), MIB);
    assert_eq!(dev.map(0, MIB).unwrap().kind, MappingKind::Unallocated);
    assert_eq!(dev.info().cluster_size, Some(4096));
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn backing_overlays_read_through_the_gate_only() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_raw(&d.join("base.raw"), 12 * MIB, 5);
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        s(&d.join("base.raw")),
        s(&d.join("base.qcow2")),
    ]);
    // -F raw sets the raw-backing feature (qemu never probes it); -F qcow2 leaves the
    // backing file to be probed.
    for (base, fmt) in [("base.raw", "raw"), ("base.qcow2", "qcow2")] {
        let ov = d.join(format!("ov-{fmt}.qed"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qed",
            "-b",
            base,
            "-F",
            fmt,
            s(&ov),
            "16M",
        ]);
        qemu_io(
            &ov,
            &[
                "write -P 0x5a 4096 12288",
                "write -z 2M 1M",
                "write -P 0x6b 13M 64k",
            ],
        );
        let info = assert_info_like_qemu(&ov, "qed");
        assert_eq!(info["backing-filename"], base);
        assert_eq!(
            info.get("backing-filename-format").is_some(),
            fmt == "raw",
            "{info}"
        );
        let e = diskconv::open(&ov, &qed()).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
        assert_converts_like_qemu(&ov, "qed", &["--allow-references"], d);
        assert_map_like_qemu(&ov, "qed", &["--allow-references"]);
    }
    let evil = d.join("evil.qed");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-u",
        "-b",
        "../base.raw",
        "-F",
        "raw",
        s(&evil),
        "1M",
    ]);
    let e = diskconv::open(&evil, &qed().allow_references(true, None))
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
}

/// A small qemu-made image (4 KiB clusters, 2-cluster tables) with one L2 table, and
/// where its parts are.
struct Sample {
    path: PathBuf,
    l1: u64,
    l2: u64,
    /// Host offset of the first set L2 entry, and the data cluster it names.
    entry: u64,
    data: u64,
}

fn sample(dir: &Path) -> Sample {
    let path = dir.join("s.qed");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        "cluster_size=4096,table_size=2",
        s(&path),
        "4M",
    ]);
    let o = std::process::Command::new("qemu-io")
        .args(["-f", "qed", "-c", "write -P 0x33 8k 16k", s(&path)])
        .output()
        .unwrap();
    assert!(o.status.success());
    let h = peek(&path, 0, 64);
    let l1 = LE::read_u64(&h[40..48]);
    let l2 = LE::read_u64(&peek(&path, l1, 8));
    let entry = l2 + 2 * 8;
    let data = LE::read_u64(&peek(&path, entry, 8));
    Sample {
        path,
        l1,
        l2,
        entry,
        data,
    }
}

fn copy_with(good: &Sample, dir: &Path, at: u64, bytes: &[u8]) -> PathBuf {
    let p = dir.join("bad.qed");
    std::fs::copy(&good.path, &p).unwrap();
    patch(&p, at, bytes);
    p
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn need_check_and_unknown_compatible_bits_read_as_qemu_reads_them() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path());
    for (what, at, bits) in [
        ("need check", 16, 0x2u64),
        ("compat bit", 24, 0x10),
        ("autoclear bit", 32, 0x1),
    ] {
        let p = copy_with(&good, dir.path(), at, &bits.to_le_bytes());
        let info = assert_info_like_qemu(&p, "qed");
        // qemu-img 10 says false even for need-check; we say it in a warning.
        assert_eq!(info["dirty-flag"], false, "{what}");
        assert_converts_like_qemu(&p, "qed", &[], dir.path());
        let dev = open_as(&p, Format::Qed);
        assert!(!dev.info().warnings.is_empty(), "{what}");
        // Reading never writes: the flag is still set.
        assert_eq!(peek(&p, at, 8), bits.to_le_bytes(), "{what}");
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn hostile_header_fields_are_refused_with_field_and_kind() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path());
    let len = std::fs::metadata(&good.path).unwrap().len();
    let u32b = |v: u32| v.to_le_bytes().to_vec();
    let u64b = |v: u64| v.to_le_bytes().to_vec();
    let cases: Vec<(&str, u64, Vec<u8>, ErrorKind, &str)> = vec![
        (
            "unknown feature",
            16,
            u64b(0x8),
            ErrorKind::Unsupported,
            "features",
        ),
        (
            "cluster 2 KiB",
            4,
            u32b(2048),
            ErrorKind::InvalidFormat,
            "cluster_size",
        ),
        (
            "cluster 12 KiB",
            4,
            u32b(12288),
            ErrorKind::InvalidFormat,
            "cluster_size",
        ),
        (
            "cluster 128 MiB",
            4,
            u32b(128 << 20),
            ErrorKind::InvalidFormat,
            "cluster_size",
        ),
        (
            "table 0",
            8,
            u32b(0),
            ErrorKind::InvalidFormat,
            "table_size",
        ),
        (
            "table 3",
            8,
            u32b(3),
            ErrorKind::InvalidFormat,
            "table_size",
        ),
        (
            "table 32",
            8,
            u32b(32),
            ErrorKind::InvalidFormat,
            "table_size",
        ),
        (
            "size 1000",
            48,
            u64b(1000),
            ErrorKind::InvalidFormat,
            "image_size",
        ),
        (
            "size past the tables",
            48,
            u64b(1 << 40),
            ErrorKind::InvalidFormat,
            "image_size",
        ),
        (
            "header 0 clusters",
            12,
            u32b(0),
            ErrorKind::InvalidFormat,
            "header_size",
        ),
        (
            "header overflows",
            12,
            u32b(1 << 20),
            ErrorKind::InvalidFormat,
            "header_size",
        ),
        (
            "backing name outside the header",
            16,
            [
                u64b(1),
                u64b(0),
                u64b(0),
                u64b(good.l1),
                u64b(4 * MIB),
                u32b(4090),
                u32b(10),
            ]
            .concat(),
            ErrorKind::InvalidFormat,
            "backing_filename_offset",
        ),
        (
            "backing name too long",
            12,
            [
                u32b(2),
                u64b(1),
                u64b(0),
                u64b(0),
                u64b(good.l1),
                u64b(4 * MIB),
                u32b(64),
                u32b(5000),
            ]
            .concat(),
            ErrorKind::InvalidFormat,
            "backing_filename_size",
        ),
        (
            "L1 unaligned",
            40,
            u64b(good.l1 + 8),
            ErrorKind::Corrupt,
            "l1_table_offset",
        ),
        (
            "L1 in the header",
            40,
            u64b(0),
            ErrorKind::Corrupt,
            "l1_table_offset",
        ),
        (
            "L1 past the end",
            40,
            u64b(len),
            ErrorKind::Corrupt,
            "l1_table_offset",
        ),
    ];
    for (what, at, bytes, kind, field) in cases {
        let p = copy_with(&good, dir.path(), at, &bytes);
        let e = within_small_file_budget(what, &p, || diskconv::open(&p, &qed()).err().unwrap());
        assert_eq!((e.kind(), e.field()), (kind, Some(field)), "{what}: {e}");
        let out = dir.path().join("out.raw");
        let o = ours(&["convert", "-f", "qed", "-O", "raw", s(&p), s(&out)]);
        assert!(!o.status.success(), "{what}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(field), "{what}");
        assert!(!out.exists(), "{what}");
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn hostile_table_entries_are_refused_with_kind() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path());
    let len = std::fs::metadata(&good.path).unwrap().len();
    let u64b = |v: u64| v.to_le_bytes().to_vec();
    // (what, where, value, fails at open (else on read))
    let cases: Vec<(&str, u64, u64, bool)> = vec![
        ("L1 entry past the end", good.l1, len, true),
        ("L1 entry unaligned", good.l1, good.l2 + 512, true),
        ("L1 entry 1", good.l1, 1, true),
        ("L1 entry over the L1 table", good.l1, good.l1, true),
        ("L2 entry past the end", good.entry, len, false),
        ("L2 entry unaligned", good.entry, good.data + 8, false),
        ("L2 entry over the L1 table", good.entry, good.l1, false),
    ];
    for (what, at, value, at_open) in cases {
        let p = copy_with(&good, dir.path(), at, &u64b(value));
        let e = match diskconv::open(&p, &qed()) {
            Err(e) => {
                assert!(at_open, "{what}: refused at open: {e}");
                e
            }
            Ok(_) => {
                assert!(!at_open, "{what}: opened");
                read_all(&p).unwrap_err()
            }
        };
        assert_eq!(
            (e.kind(), e.offset()),
            (ErrorKind::Corrupt, Some(at)),
            "{what}: {e}"
        );
    }
    // With one header cluster the only aligned offset inside it is 0, which means
    // unallocated; the header check itself is proven on the L1 table's offset (above).
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn truncated_images_fail_with_their_kind() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path());
    let len = std::fs::metadata(&good.path).unwrap().len();
    for cut in [0, 63, good.l1 + 100, good.l2 + 8, good.data + 1, len - 1] {
        let p = dir.path().join("cut.qed");
        std::fs::copy(&good.path, &p).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let e = match diskconv::open(&p, &qed()) {
            Err(e) => e,
            Ok(_) => read_all(&p).unwrap_err(),
        };
        let want = if cut < 64 {
            ErrorKind::InvalidFormat
        } else {
            ErrorKind::Corrupt
        };
        assert_eq!(e.kind(), want, "cut at {cut}: {e}");
    }
}

/// Tables of 16 clusters of 64 MiB are 1 GiB each: an image that claims them (a sparse
/// file) is read a page at a time, never a whole table.
#[test]
fn one_gib_tables_are_read_in_bounded_pages() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.qed");
    let cs: u64 = 64 << 20;
    let table = 16 * cs;
    let (l1, l2, data) = (cs, cs + table, cs + 2 * table);
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"QED\0");
    LE::write_u32(&mut h[4..8], cs as u32);
    LE::write_u32(&mut h[8..12], 16);
    LE::write_u32(&mut h[12..16], 1);
    LE::write_u64(&mut h[40..48], l1);
    LE::write_u64(&mut h[48..56], 1 << 40);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(data + cs).unwrap();
    drop(f);
    patch(&p, 0, &h);
    patch(&p, l1, &l2.to_le_bytes());
    patch(&p, l2 + 8, &data.to_le_bytes());
    patch(&p, data + 5, b"hello");
    let got = within_small_file_budget("open and read a 1 GiB-table image", &p, || {
        let dev = diskconv::open(&p, &qed()).unwrap();
        let mut buf = [0u8; 10];
        dev.read_at(&mut buf, cs).unwrap();
        let m = dev.map(0, 3 * cs).unwrap();
        (buf, m)
    });
    assert_eq!(&got.0[5..], b"hello");
    assert_eq!((got.1.kind, got.1.len), (MappingKind::Unallocated, cs));
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn writing_qed_is_refused_as_read_only() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    make_raw(&raw, MIB, 1);
    assert_write_refused(&raw, "qed", dir.path());
    let e =
        diskconv::create(dir.path().join("x.qed"), Format::Qed, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}
