//! qcow (version 1), read only: differential against qemu-img on images it makes (plain,
//! zlib-compressed, backing-file overlays), `info`/`map` JSON equal to qemu-img's, every
//! validated header field and table entry refused with its exact error kind, bounded
//! work on hostile sizes, and `-O qcow` refused.

use crate::common;
use crate::common::readonly;

use std::path::{Path, PathBuf};

use byteorder::{BigEndian as BE, ByteOrder};
use common::*;
use diskconv::{ErrorKind, Format, MappingKind, OpenOptions};
use readonly::*;

const MIB: u64 = 1 << 20;

fn qcow() -> OpenOptions {
    OpenOptions::new().format(Format::Qcow)
}

fn open_err(p: &Path) -> diskconv::Error {
    match diskconv::open(p, &qcow()) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e,
    }
}

/// Read the whole guest; the first error.
fn read_all(p: &Path) -> diskconv::Result<()> {
    let dev = diskconv::open(p, &qcow())?;
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < dev.virtual_size() {
        let n = (dev.virtual_size() - off).min(MIB) as usize;
        dev.read_at(&mut buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

/// A raw source with data, written zeros and holes, and an odd tail (not a whole cluster).
fn source(dir: &Path) -> PathBuf {
    let raw = dir.join("src.raw");
    make_raw(&raw, 24 * MIB + 3 * 512, 7);
    raw
}

/// `qemu-img convert -c -O qcow raw out`. qemu-img 10.0 writes the whole image and then
/// exits 1 without a message (its closing zero-length compressed write fails in the qcow
/// driver), so its status is not trusted: qemu-img compare must find the image identical.
fn qemu_compressed(raw: &Path, out: &Path) {
    let _ = std::process::Command::new("qemu-img")
        .args(["convert", "-c", "-O", "qcow", s(raw), s(out)])
        .output()
        .unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "qcow", s(raw), s(out)]);
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut a = vec!["qemu-io", "-f", "qcow"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(s(img));
    run(&a);
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn qemu_made_images_read_map_and_info_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = source(d);
    let plain = d.join("plain.qcow");
    let packed = d.join("packed.qcow");
    let empty = d.join("empty.qcow");
    qemu_img(&["convert", "-O", "qcow", s(&raw), s(&plain)]);
    qemu_compressed(&raw, &packed);
    qemu_img(&["create", "-q", "-f", "qcow", s(&empty), "64M"]);
    for img in [&plain, &packed, &empty] {
        assert_converts_like_qemu(img, "qcow", &[], d);
        assert_reads_like_qemu(img, Format::Qcow, d);
        let map = assert_map_like_qemu(img, "qcow", &[]);
        let info = assert_info_like_qemu(img, "qcow");
        assert_eq!(info["cluster-size"], 4096);
        if img == &packed {
            assert!(map
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["compressed"] == true));
        }
        // Probed (no -f): our format, and inspect calls it safe.
        assert_eq!(diskconv::probe(img).unwrap(), Format::Qcow);
        let i = diskconv::inspect(img, Some(Format::Qcow)).unwrap();
        assert!(i.safe, "{:?}", i.findings);
    }
    // Holes are skipped: the compressed image maps its unwritten clusters unallocated.
    let dev = open_as(&packed, Format::Qcow);
    let m = dev.map(0, dev.virtual_size()).unwrap();
    assert_eq!(m.offset, 0);
    assert!(matches!(
        m.kind,
        MappingKind::Data { .. } | MappingKind::Unallocated
    ));
    // An empty 1 TiB image maps in a few calls, one L1 entry per step (qemu-img map takes
    // minutes on it: not compared).
    let huge = d.join("huge.qcow");
    qemu_img(&["create", "-q", "-f", "qcow", s(&huge), "1T"]);
    let e = open_as(&huge, Format::Qcow);
    let (mut off, mut calls) = (0, 0);
    while off < e.virtual_size() {
        let m = e.map(off, e.virtual_size() - off).unwrap();
        assert_eq!(m.kind, MappingKind::Unallocated);
        off += m.len;
        calls += 1;
    }
    assert!(calls <= 8, "{calls} map calls for an empty 1 TiB image");
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn backing_overlays_read_through_the_gate_only() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    source(d); // src.raw, the backing file
    let ov = d.join("ov.qcow");
    // qcow cannot store the backing format: qemu probes it, and so do we.
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-b",
        "src.raw",
        "-F",
        "raw",
        s(&ov),
        "32M",
    ]);
    qemu_io(
        &ov,
        &[
            "write -P 0x5a 4096 12288",
            "write -P 0x6b 10M 1M",
            "write -P 0x7c 25M 4096",
        ],
    );
    let info = assert_info_like_qemu(&ov, "qcow");
    assert_eq!(info["backing-filename"], "src.raw");
    assert_eq!(info["cluster-size"], 512);
    let e = open_err(&ov);
    assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
    let o = ours(&["convert", "-O", "raw", s(&ov), s(&d.join("x.raw"))]);
    assert!(!o.status.success());
    assert!(!d.join("x.raw").exists());
    assert_converts_like_qemu(&ov, "qcow", &["--allow-references"], d);
    assert_map_like_qemu(&ov, "qcow", &["--allow-references"]);
    // A backing name outside the image's folder is refused even when allowed.
    let evil = d.join("evil.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        s(&evil),
        "1M",
    ]);
    let e = diskconv::open(&evil, &qcow().allow_references(true, None))
        .err()
        .unwrap();
    assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn aes_encrypted_images_are_refused_as_encrypted() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("aes.qcow");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow",
        "--object",
        "secret,id=k,data=pw",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=k",
        s(&p),
        "4M",
    ]);
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::Encrypted, "{e}");
    assert_eq!(e.field(), Some("crypt_method"));
}

/// A small qemu-made image with an L2 table and data clusters, and where its parts are.
struct Sample {
    path: PathBuf,
    l1_offset: u64,
    /// Host offset of the first L2 table and of its first entry that is set (compressed,
    /// in a compressed image).
    l2: u64,
    entry: u64,
}

fn sample(dir: &Path, name: &str, compress: bool) -> Sample {
    let raw = dir.join(format!("{name}.raw"));
    let mut data = vec![0u8; 2 * MIB as usize];
    Rng(3).fill(&mut data[..256 << 10]);
    for (i, b) in data[MIB as usize..].iter_mut().enumerate() {
        *b = b"qcow one "[i % 9];
    }
    std::fs::write(&raw, &data).unwrap();
    let path = dir.join(format!("{name}.qcow"));
    if compress {
        qemu_compressed(&raw, &path);
    } else {
        qemu_img(&["convert", "-O", "qcow", s(&raw), s(&path)]);
    }
    let h = peek(&path, 0, 48);
    let l1_offset = BE::read_u64(&h[40..48]);
    let l2 = BE::read_u64(&peek(&path, l1_offset, 8));
    let entry = (0..512)
        .map(|i| l2 + i * 8)
        .find(|&at| {
            let e = BE::read_u64(&peek(&path, at, 8));
            e != 0 && (!compress || e >> 63 == 1)
        })
        .unwrap();
    Sample {
        path,
        l1_offset,
        l2,
        entry,
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn hostile_header_fields_are_refused_with_field_and_kind() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path(), "good", false);
    let len = std::fs::metadata(&good.path).unwrap().len();
    let u32b = |v: u32| v.to_be_bytes().to_vec();
    let u64b = |v: u64| v.to_be_bytes().to_vec();
    let cases: Vec<(&str, u64, Vec<u8>, ErrorKind, &str)> = vec![
        ("version 2", 4, u32b(2), ErrorKind::Unsupported, "version"),
        ("size 1", 24, u64b(1), ErrorKind::InvalidFormat, "size"),
        (
            "cluster_bits 8",
            32,
            vec![8],
            ErrorKind::InvalidFormat,
            "cluster_bits",
        ),
        (
            "cluster_bits 17",
            32,
            vec![17],
            ErrorKind::InvalidFormat,
            "cluster_bits",
        ),
        (
            "l2_bits 5",
            33,
            vec![5],
            ErrorKind::InvalidFormat,
            "l2_bits",
        ),
        (
            "l2_bits 14",
            33,
            vec![14],
            ErrorKind::InvalidFormat,
            "l2_bits",
        ),
        (
            "crypt_method 1",
            36,
            u32b(1),
            ErrorKind::Encrypted,
            "crypt_method",
        ),
        (
            "crypt_method 7",
            36,
            u32b(7),
            ErrorKind::InvalidFormat,
            "crypt_method",
        ),
        // CVE-2014-0222: a size whose L1 size computation overflows.
        (
            "size near 2^64",
            24,
            u64b(u64::MAX - 4096),
            ErrorKind::LimitExceeded,
            "size",
        ),
        // A size whose L1 table is past our cap (and past the file).
        (
            "size 2^60",
            24,
            u64b(1 << 60),
            ErrorKind::LimitExceeded,
            "size",
        ),
        (
            "L1 past the end",
            40,
            u64b(len),
            ErrorKind::Corrupt,
            "l1_table_offset",
        ),
        (
            "backing name too long",
            8,
            [u64b(48), u32b(1024)].concat(),
            ErrorKind::InvalidFormat,
            "backing_file_size",
        ),
        (
            "backing name past the end",
            8,
            [u64b(len - 4), u32b(8)].concat(),
            ErrorKind::Corrupt,
            "backing_file_offset",
        ),
    ];
    for (what, off, bytes, kind, field) in cases {
        let p = dir.path().join("bad.qcow");
        std::fs::copy(&good.path, &p).unwrap();
        patch(&p, off, &bytes);
        let e = within_small_file_budget(what, &p, || open_err(&p));
        assert_eq!((e.kind(), e.field()), (kind, Some(field)), "{what}: {e}");
        // The CLI names the field too, exits non-zero and leaves no output.
        let out = dir.path().join("out.raw");
        let o = ours(&["convert", "-f", "qcow", "-O", "raw", s(&p), s(&out)]);
        assert!(!o.status.success(), "{what}");
        assert!(String::from_utf8_lossy(&o.stderr).contains(field), "{what}");
        assert!(!out.exists(), "{what}");
    }
    let _ = good.l1_offset;
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn hostile_table_entries_are_refused_with_kind() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plain = sample(d, "plain", false);
    let packed = sample(d, "packed", true);
    let len = std::fs::metadata(&plain.path).unwrap().len();
    let u64b = |v: u64| v.to_be_bytes().to_vec();
    let data_at = BE::read_u64(&peek(&plain.path, plain.entry, 8));
    // (what, image, where, bytes, fails at open (else on read))
    let cases: Vec<(&str, &Sample, u64, Vec<u8>, bool)> = vec![
        (
            "L1 entry past the end",
            &plain,
            plain.l1_offset,
            u64b(len),
            true,
        ),
        (
            "L1 entry unaligned",
            &plain,
            plain.l1_offset,
            u64b(plain.l2 + 8),
            true,
        ),
        (
            "L2 entry past the end",
            &plain,
            plain.entry,
            u64b(len + 4096),
            false,
        ),
        (
            "L2 entry unaligned",
            &plain,
            plain.entry,
            u64b(data_at + 512),
            false,
        ),
        (
            "compressed entry past the end",
            &packed,
            packed.entry,
            u64b((1 << 63) | (100 << 51) | (len - 10)),
            false,
        ),
        (
            "compressed entry of size 0",
            &packed,
            packed.entry,
            u64b((1 << 63) | (4096 * 3)),
            false,
        ),
        (
            "compressed entry on the header",
            &packed,
            packed.entry,
            u64b((1 << 63) | (40 << 51)),
            false,
        ),
    ];
    for (what, img, at, bytes, at_open) in cases {
        let p = d.join("bad.qcow");
        std::fs::copy(&img.path, &p).unwrap();
        patch(&p, at, &bytes);
        let e = match diskconv::open(&p, &qcow()) {
            Err(e) => {
                assert!(at_open, "{what}: refused at open: {e}");
                e
            }
            Ok(_) => {
                assert!(!at_open, "{what}: opened");
                read_all(&p).unwrap_err()
            }
        };
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}");
        assert_eq!(e.offset(), Some(at), "{what}: {e}");
    }
    // Aligned offsets cannot reach the 48-byte header (offset 0 means unallocated), but a
    // compressed cluster's byte offset can, and is refused as an overlap.
    let p = d.join("bad.qcow");
    std::fs::copy(&packed.path, &p).unwrap();
    patch(&p, packed.entry, &u64b((1 << 63) | (40 << 51) | 8));
    let e = read_all(&p).unwrap_err();
    assert!(e.to_string().contains("overlaps the header"), "{e}");
    // Compressed bytes that are not deflate data fail the read, naming the cluster.
    std::fs::copy(&packed.path, &p).unwrap();
    let entry = BE::read_u64(&peek(&p, packed.entry, 8));
    let coffset = entry & ((1 << 51) - 1);
    patch(&p, coffset, &[0xff; 64]);
    let e = read_all(&p).unwrap_err();
    assert_eq!(
        (e.kind(), e.offset()),
        (ErrorKind::Corrupt, Some(coffset)),
        "{e}"
    );
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn truncated_images_fail_with_corrupt_never_short_reads() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let good = sample(dir.path(), "t", false);
    let len = std::fs::metadata(&good.path).unwrap().len();
    for cut in [
        0,
        20,
        47,
        good.l1_offset + 4,
        good.l2 + 100,
        len / 2,
        len - 1,
    ] {
        let p = dir.path().join("cut.qcow");
        std::fs::copy(&good.path, &p).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(cut)
            .unwrap();
        let e = match diskconv::open(&p, &qcow()) {
            Err(e) => e,
            Ok(_) => read_all(&p).unwrap_err(),
        };
        let want = if cut < 48 {
            ErrorKind::InvalidFormat
        } else {
            ErrorKind::Corrupt
        };
        assert_eq!(e.kind(), want, "cut at {cut}: {e}");
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn writing_qcow_is_refused_as_read_only() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    make_raw(&raw, MIB, 1);
    assert_write_refused(&raw, "qcow", dir.path());
    let e =
        diskconv::create(dir.path().join("x.qcow"), Format::Qcow, &Default::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}
