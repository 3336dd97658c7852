//! qcow2: differential tests against qemu-img in both directions, round trips, the
//! corpus, and hostile images.
use crate::common;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskconv::{ErrorKind, Format, MappingKind, OpenOptions};
use proptest::prelude::*;

/// Sizes used for the option matrix: a few MiB and one byte over a cluster multiple.
const SRC_SIZE: u64 = (3 << 20) + 65537;

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["qemu-io", "-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run(&args);
}

/// `qemu-img convert -O qcow2 -o OPTS [-c] src dst`.
fn qemu_make(src: &Path, dst: &Path, opts: &str, compress: bool) {
    let mut a = vec!["convert", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        a.push("-o");
        a.push(opts);
    }
    if compress {
        a.push("-c");
    }
    a.push(s(src));
    a.push(s(dst));
    qemu_img(&a);
}

fn open_err(p: &Path) -> diskconv::Error {
    let what = format!("refusing {}", p.display());
    match within_small_file_budget(&what, p, || {
        diskconv::open(p, &OpenOptions::new().format(Format::Qcow2))
    }) {
        Ok(_) => panic!("{} opened but should not", p.display()),
        Err(e) => e,
    }
}

/// Overwrite bytes of a file in place.
fn patch(p: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

fn read_be64(p: &Path, off: u64) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).unwrap();
    u64::from_be_bytes(b)
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn reads_qemu_images_across_options() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, SRC_SIZE, 21);
    let cases: &[(&str, bool)] = &[
        ("compat=0.10", false),
        ("compat=0.10", true),
        ("compat=1.1", false),
        ("cluster_size=512", false),
        ("cluster_size=512", true),
        ("cluster_size=4k", false),
        ("cluster_size=64k", true),
        ("cluster_size=2M", false),
        ("cluster_size=2M", true),
        ("compression_type=zstd", true),
        ("compression_type=zstd,cluster_size=4k", true),
        ("extended_l2=on", false),
        ("extended_l2=on,cluster_size=16k", true),
        ("lazy_refcounts=on,refcount_bits=8", false),
    ];
    for (i, (opts, c)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("q{i}.qcow2"));
        qemu_make(&src, &img, opts, *c);
        assert_reads_like_qemu(&img, Format::Qcow2, dir.path());
        // The map must only say Data where qemu's content is non-zero or allocated, and
        // compressed clusters carry no host offset.
        let dev = open_as(&img, Format::Qcow2);
        let m = dev.map(0, dev.virtual_size()).unwrap();
        assert!(m.len > 0 && m.len <= dev.virtual_size());
        // Compressed clusters map as data without a host offset; uncompressed ones
        // (clusters that did not shrink) with one.
        let mut compressed = 0;
        let mut off = 0;
        while off < dev.virtual_size() {
            let m = dev.map(off, u64::MAX).unwrap();
            if m.kind == (MappingKind::Data { host: None }) {
                compressed += m.len;
            }
            off += m.len;
        }
        assert_eq!(compressed > 0, *c, "{opts}");
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn reads_zero_clusters_subclusters_and_odd_sizes() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Zero flag on an allocated cluster and on an unallocated one (v3).
    let z = dir.path().join("z.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&z), "1M"]);
    qemu_io(
        &z,
        &[
            "write -P 0xab 0 192k",
            "write -z 64k 64k",
            "write -z 512k 64k",
        ],
    );
    assert_reads_like_qemu(&z, Format::Qcow2, dir.path());
    let dev = open_as(&z, Format::Qcow2);
    assert_eq!(dev.map(65536, 1 << 20).unwrap().kind, MappingKind::Zero);
    assert_eq!(
        dev.map(512 << 10, 65536).unwrap(),
        diskconv::Mapping {
            offset: 512 << 10,
            len: 65536,
            kind: MappingKind::Zero
        }
    );
    assert_eq!(
        dev.map(192 << 10, 65536).unwrap().kind,
        MappingKind::Unallocated
    );
    // v2 has no zero flag: qemu writes zeros another way; we must still read alike.
    let z2 = dir.path().join("z2.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "compat=0.10", s(&z2), "1M"]);
    qemu_io(&z2, &["write -P 0x11 0 128k", "write -z 64k 64k"]);
    assert_reads_like_qemu(&z2, Format::Qcow2, dir.path());

    // Extended L2: zero and data subclusters inside one cluster.
    let e = dir.path().join("e.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "extended_l2=on", s(&e), "1M"]);
    qemu_io(
        &e,
        &[
            "write -P 0xab 0 64k",
            "write -z 4k 4k",
            "write -P 0xcd 200k 2k",
            "write -z 300k 6k",
        ],
    );
    assert_reads_like_qemu(&e, Format::Qcow2, dir.path());
    let dev = open_as(&e, Format::Qcow2);
    let m = dev.map(0, 1 << 20).unwrap();
    assert_eq!(m.len, 4096);
    assert!(matches!(m.kind, MappingKind::Data { host: Some(_) }));
    assert_eq!(dev.map(4096, 1 << 20).unwrap().kind, MappingKind::Zero);
    let m = dev.map(200 << 10, 1 << 20).unwrap();
    assert_eq!(m.len, 2048);

    // Odd sizes: one byte over a cluster (qemu rounds up to a sector) and 0 bytes.
    for (name, size) in [("odd.qcow2", "65537"), ("empty.qcow2", "0")] {
        let p = dir.path().join(name);
        qemu_img(&["create", "-f", "qcow2", s(&p), size]);
        if size != "0" {
            qemu_io(&p, &["write -P 0x5a 65024 1024"]);
        }
        assert_reads_like_qemu(&p, Format::Qcow2, dir.path());
        let info = qemu_info(&p, Format::Qcow2);
        assert_eq!(
            open_as(&p, Format::Qcow2).virtual_size(),
            info["virtual-size"].as_u64().unwrap()
        );
    }
}

/// Our writer over the option matrix: qemu-img check clean (no leaks), identical content,
/// same virtual size, and our own reader agrees.
#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn writer_output_is_clean_and_identical_for_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, SRC_SIZE, 33);
    let src_sha = sha256_file(&src);
    let cases: &[(&[(&str, &str)], bool)] = &[
        (&[], false),
        (&[], true),
        (&[("compat", "0.10")], false),
        (&[("compat", "0.10")], true),
        (&[("cluster_size", "512")], false),
        (&[("cluster_size", "512")], true),
        (&[("cluster_size", "4k")], false),
        (
            &[("cluster_size", "4k"), ("compression_type", "zstd")],
            true,
        ),
        (&[("cluster_size", "2M")], false),
        (&[("cluster_size", "2M")], true),
        (&[("compression_type", "zstd")], true),
        (&[("extended_l2", "on")], false),
        (&[("extended_l2", "on"), ("cluster_size", "16k")], true),
        (&[("lazy_refcounts", "on"), ("preallocation", "off")], false),
        (&[("refcount_bits", "1")], true),
        (&[("refcount_bits", "8")], true),
        (&[("refcount_bits", "64")], false),
    ];
    for (i, (opts, c)) in cases.iter().enumerate() {
        let img = dir.path().join(format!("w{i}.qcow2"));
        convert(&src, &img, Format::Qcow2, opts, *c);
        assert_qemu_check_clean(&img, Format::Qcow2);
        assert_qemu_identical(&src, Format::Raw, &img, Format::Qcow2);
        let info = qemu_info(&img, Format::Qcow2);
        assert_eq!(
            info["virtual-size"].as_u64().unwrap(),
            SRC_SIZE.next_multiple_of(512),
            "{opts:?}"
        );
        let dev = open_as(&img, Format::Qcow2);
        // Our reader: same bytes as the source (plus the zero padding to a sector).
        let back = dir.path().join(format!("w{i}.raw"));
        convert(&img, &back, Format::Raw, &[], false);
        let f = std::fs::OpenOptions::new().write(true).open(&back).unwrap();
        f.set_len(SRC_SIZE).unwrap();
        assert_eq!(sha256_file(&back), src_sha, "{opts:?} -c={c}");
        // info matches qemu-img's format-specific data.
        let ours = dev.info().format_specific.unwrap();
        assert_eq!(ours, info["format-specific"], "{opts:?}");
        assert_eq!(
            dev.info().cluster_size,
            info["cluster-size"].as_u64(),
            "{opts:?}"
        );
    }
    // Compression shrinks this compressible input.
    let plain = std::fs::metadata(dir.path().join("w0.qcow2"))
        .unwrap()
        .len();
    let packed = std::fs::metadata(dir.path().join("w1.qcow2"))
        .unwrap()
        .len();
    assert!(packed < plain, "compressed {packed} >= plain {plain}");
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn empty_and_zero_sized_images_are_valid() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (size, opts) in [
        (0u64, vec![]),
        (1 << 30, vec![]),
        (1 << 30, vec![("compat", "0.10")]),
        (65537, vec![("cluster_size", "512")]),
    ] {
        let p = dir.path().join(format!("e{size}.qcow2"));
        let mut o = diskconv::CreateOptions::new(size);
        for (k, v) in &opts {
            o = o.option(k, v);
        }
        diskconv::create(&p, Format::Qcow2, &o).unwrap();
        assert_qemu_check_clean(&p, Format::Qcow2);
        let info = qemu_info(&p, Format::Qcow2);
        assert_eq!(
            info["virtual-size"].as_u64().unwrap(),
            size.next_multiple_of(512)
        );
        let dev = open_as(&p, Format::Qcow2);
        if size > 0 {
            let m = dev.map(0, u64::MAX).unwrap();
            assert_eq!(m.kind, MappingKind::Unallocated);
            assert_eq!(m.len, dev.virtual_size());
        }
        assert!(std::fs::metadata(&p).unwrap().len() <= 4 << 20);
    }
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [
        vec![("cluster_size", "3000")],
        vec![("cluster_size", "4M")],
        vec![("compat", "0.10"), ("compression_type", "zstd")],
        vec![("compat", "0.10"), ("lazy_refcounts", "on")],
        vec![("compat", "0.10"), ("refcount_bits", "8")],
        vec![("refcount_bits", "3")],
        vec![("extended_l2", "on"), ("cluster_size", "4k")],
        vec![("compression_type", "lz4")],
        vec![("preallocation", "full")],
        vec![("backing_file", "x")],
    ] {
        let p = dir.path().join("bad.qcow2");
        let mut o = diskconv::CreateOptions::new(1 << 20);
        for (k, v) in &opts {
            o = o.option(k, v);
        }
        let e = diskconv::create(&p, Format::Qcow2, &o).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{opts:?}: {e}");
        assert!(!p.exists());
    }
    // 512-byte clusters cannot address 1 PiB (L1 limit): a clear error, not a huge table.
    let o = diskconv::CreateOptions::new(1 << 50).option("cluster_size", "512");
    let e = diskconv::create(dir.path().join("big.qcow2"), Format::Qcow2, &o).unwrap_err();
    assert!(e.message().contains("cluster_size"), "{e}");
}

fn segments() -> impl Strategy<Value = (u64, Vec<(u64, u64, u8)>)> {
    (1u64..400_000).prop_flat_map(|size| {
        (
            Just(size),
            prop::collection::vec((0..size, 1u64..70_000, 0u8..3), 0..8),
        )
    })
}

fn write_segments(p: &Path, size: u64, segs: &[(u64, u64, u8)], seed: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed | 1);
    for &(off, len, kind) in segs {
        let len = len.min(size - off) as usize;
        let mut buf = vec![0u8; len];
        match kind {
            0 => rng.fill(&mut buf),
            1 => buf
                .iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 7) as u8 + 1),
            _ => {}
        }
        f.write_all_at(&buf, off).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    /// raw -> qcow2 -> raw, plain and compressed, is bit-exact.
    #[test]
    fn round_trip_is_bit_exact(
        (size, segs) in segments(),
        cluster in prop::sample::select(vec!["512", "4k", "64k"]),
        zstd in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("s.raw");
        write_segments(&src, size, &segs, seed);
        let want = std::fs::read(&src).unwrap();
        for compress in [false, true] {
            let q = dir.path().join(format!("q{compress}.qcow2"));
            let ctype = if zstd { "zstd" } else { "zlib" };
            convert(&src, &q, Format::Qcow2, &[("cluster_size", cluster), ("compression_type", ctype)], compress);
            let back = dir.path().join(format!("b{compress}.raw"));
            convert(&q, &back, Format::Raw, &[], false);
            let got = std::fs::read(&back).unwrap();
            prop_assert_eq!(got.len() as u64, size.next_multiple_of(512));
            prop_assert!(got[..want.len()] == want[..], "content differs");
            prop_assert!(got[want.len()..].iter().all(|&b| b == 0));
        }
    }
}

#[test]
#[cfg_attr(no_bzip2, ignore = "needs bzip2 for the corpus: apt-get install bzip2")]
fn corpus_qcow2_reads_bit_exact() {
    let Some(dir) = corpus_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for e in corpus_entries(&dir)
        .into_iter()
        .filter(|e| e.format.starts_with("qcow2") || e.file.ends_with(".qcow2"))
    {
        let p = corpus_file(&dir, &e.file, tmp.path());
        match e.expected_sha() {
            Some(sha) => {
                let dev = open_as(&p, Format::Qcow2);
                assert_eq!(Some(dev.virtual_size()), e.virtual_size, "{}", e.file);
                assert_eq!(sha256_device(dev.as_ref()), sha, "{}", e.file);
                seen += 1;
            }
            None => {
                assert!(diskconv::open(&p, &OpenOptions::new().format(Format::Qcow2)).is_err());
            }
        }
    }
    assert!(seen >= 2, "expected the two qcow2 corpus images");
}

/// A small valid image made by our writer, for the hostile-input tests.
fn small_image(dir: &Path, name: &str) -> PathBuf {
    let src = dir.join(format!("{name}.raw"));
    make_raw(&src, 1 << 20, 5);
    let p = dir.join(name);
    convert(&src, &p, Format::Qcow2, &[], false);
    p
}

#[test]
fn hostile_images_fail_cleanly_and_fast() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _guard = hang_guard("hostile qcow2 images");

    // Truncated inside the header, and after the header cluster (L1 and data gone).
    let p = small_image(d, "trunc.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(50)
        .unwrap();
    assert_eq!(open_err(&p).kind(), ErrorKind::InvalidFormat);
    let p = small_image(d, "trunc2.qcow2");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(65536)
        .unwrap();
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(e.field(), Some("l1_table_offset"), "{e}");

    // L1 table far past the end of the file.
    let p = small_image(d, "l1.qcow2");
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("l1_table_offset"), "{e}");

    // Unknown incompatible bit: named.
    let p = small_image(d, "incompat.qcow2");
    patch(&p, 72, &(1u64 << 20).to_be_bytes());
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.message().contains("20"), "{e}");

    // Encryption.
    let p = small_image(d, "crypt.qcow2");
    patch(&p, 32, &1u32.to_be_bytes());
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::Encrypted);
    assert!(
        e.message()
            .contains("encrypted qcow2 (AES/LUKS) is not supported"),
        "{e}"
    );

    // Bad cluster_bits, bad version.
    let p = small_image(d, "cbits.qcow2");
    patch(&p, 20, &30u32.to_be_bytes());
    assert_eq!(open_err(&p).field(), Some("cluster_bits"));
    let p = small_image(d, "ver.qcow2");
    patch(&p, 4, &7u32.to_be_bytes());
    assert_eq!(open_err(&p).field(), Some("version"));

    // An L2 entry pointing far past the end of the file: map and read fail clearly, and
    // a conversion fails without leaving output.
    let p = small_image(d, "l2.qcow2");
    let l1 = read_be64(&p, 40);
    let l2 = read_be64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    let mut first = None;
    for i in 0..16u64 {
        if read_be64(&p, l2 + i * 8) != 0 {
            first = Some(i);
            break;
        }
    }
    let i = first.expect("some allocated cluster");
    patch(&p, l2 + i * 8, &((1u64 << 45) | (1 << 63)).to_be_bytes());
    let dev = open_as(&p, Format::Qcow2);
    let e = dev.map(i * 65536, 65536).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        dev.read_at(&mut buf, i * 65536).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let out = d.join("never.raw");
    let o = diskconv::ConvertOptions::new(Format::Raw);
    assert!(diskconv::convert(&p, &out, &o).is_err());
    assert!(!out.exists());

    // A compressed descriptor with garbage: a clear error on read.
    let p = small_image(d, "comp.qcow2");
    let l1 = read_be64(&p, 40);
    let l2 = read_be64(&p, l1) & 0x00ff_ffff_ffff_fe00;
    patch(
        &p,
        l2 + i * 8,
        &((1u64 << 62) | (3u64 << 54) | 4096).to_be_bytes(),
    );
    let dev = open_as(&p, Format::Qcow2);
    assert!(dev.read_at(&mut buf, i * 65536).is_err());

    // 1 KiB file claiming 1 PiB: refused at once, without a huge allocation.
    let p = d.join("huge.qcow2");
    let mut h = vec![0u8; 1024];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(1u64 << 50).to_be_bytes());
    h[36..40].copy_from_slice(&(1u32 << 21).to_be_bytes());
    h[40..48].copy_from_slice(&65536u64.to_be_bytes());
    h[100..104].copy_from_slice(&112u32.to_be_bytes());
    std::fs::write(&p, &h).unwrap();
    let e = open_err(&p);
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    // Same with an L1 table too small for the size.
    h[36..40].copy_from_slice(&1u32.to_be_bytes());
    std::fs::write(&p, &h).unwrap();
    assert!(open_err(&p).message().contains("too small"));
    // And an L1 table above the 32 MiB cap.
    h[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(&p, &h).unwrap();
    assert_eq!(open_err(&p).kind(), ErrorKind::LimitExceeded);

    // A header extension whose length runs past the cluster.
    let p = small_image(d, "ext.qcow2");
    patch(&p, 112 + 4, &0xffff_0000u32.to_be_bytes());
    assert_eq!(open_err(&p).kind(), ErrorKind::InvalidFormat);
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn backing_and_data_files_go_through_the_gate() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    make_raw(&base, 1 << 20, 9);
    let ov = d.join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        s(&ov),
        "2M",
    ]);
    qemu_io(&ov, &["write -P 0x77 64k 64k", "write -z 256k 64k"]);

    // Refused by default, naming the field and the path.
    let e = open_err(&ov);
    assert_eq!(e.kind(), ErrorKind::UnsafeReference);
    assert_eq!(e.field(), Some("backing_file"));
    assert!(e.to_string().contains("base.raw"), "{e}");

    // Allowed: reads through to the backing image like qemu, and a conversion flattens.
    let opts = OpenOptions::new()
        .format(Format::Qcow2)
        .allow_references(true, None);
    let dev = diskconv::open(&ov, &opts).unwrap();
    let info = dev.info();
    assert_eq!(info.backing_file.as_deref(), Some("base.raw"));
    assert_eq!(info.backing_format.as_deref(), Some("raw"));
    let flat = d.join("flat.raw");
    qemu_img(&["convert", "-O", "raw", s(&ov), s(&flat)]);
    assert_eq!(sha256_device(dev.as_ref()), sha256_file(&flat));
    let ours = d.join("ours.raw");
    let mut co = diskconv::ConvertOptions::new(Format::Raw);
    co.open = opts.clone();
    diskconv::convert(&ov, &ours, &co).unwrap();
    assert_eq!(sha256_file(&ours), sha256_file(&flat));

    // External data file: refused by default, read when allowed.
    let df = d.join("df.qcow2");
    // qemu resolves data_file against its working directory.
    let run_in = |args: &[&str]| {
        let st = Command::new(args[0])
            .args(&args[1..])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(st.status.success(), "{args:?}: {st:?}");
    };
    run_in(&[
        "qemu-img",
        "create",
        "-f",
        "qcow2",
        "-o",
        "data_file=df.data",
        "df.qcow2",
        "1M",
    ]);
    run_in(&[
        "qemu-io",
        "-c",
        "write -P 0x42 0 100k",
        "-c",
        "write -P 0x43 512k 4k",
        "df.qcow2",
    ]);
    let e = open_err(&df);
    assert_eq!(e.kind(), ErrorKind::UnsafeReference);
    assert_eq!(e.field(), Some("data_file"));
    assert!(e.to_string().contains("df.data"), "{e}");
    let dev = diskconv::open(&df, &opts).unwrap();
    assert_eq!(dev.info().referenced_files, vec!["df.data".to_string()]);
    let flat = d.join("df.raw");
    run_in(&["qemu-img", "convert", "-O", "raw", "df.qcow2", "df.raw"]);
    assert_eq!(sha256_device(dev.as_ref()), sha256_file(&flat));
    assert_eq!(
        dev.info().format_specific.unwrap(),
        qemu_info(&df, Format::Qcow2)["format-specific"]
    );
}

#[test]
fn dirty_and_corrupt_bits_are_reported_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = small_image(dir.path(), "dirty.qcow2");
    let want = sha256_device(open_as(&p, Format::Qcow2).as_ref());
    patch(&p, 72, &3u64.to_be_bytes());
    let dev = open_as(&p, Format::Qcow2);
    let info = dev.info();
    assert_eq!(info.dirty, Some(true));
    assert_eq!(info.format_specific.unwrap()["data"]["corrupt"], true);
    assert_eq!(info.warnings.len(), 2, "{:?}", info.warnings);
    assert_eq!(sha256_device(dev.as_ref()), want);
}

/// Read every guest byte through map/read_at, stopping at the first error.
fn read_all_tolerant(dev: &dyn diskconv::BlockDevice) {
    let size = dev.virtual_size();
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0;
    while off < size {
        let Ok(m) = dev.map(off, 1 << 16) else { return };
        let n = m.len.min(1 << 16) as usize;
        if dev.read_at(&mut buf[..n], off).is_err() {
            return;
        }
        off += n as u64;
    }
}

#[test]
fn random_corruption_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    make_raw(&src, 512 << 10, 77);
    let mut images = Vec::new();
    for (i, (opts, c)) in [
        (vec![("cluster_size", "4k")], true),
        (
            vec![("cluster_size", "4k"), ("compression_type", "zstd")],
            true,
        ),
        (vec![("cluster_size", "16k"), ("extended_l2", "on")], false),
        (vec![("cluster_size", "512"), ("compat", "0.10")], false),
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.path().join(format!("g{i}.qcow2"));
        convert(&src, &p, Format::Qcow2, &opts, c);
        images.push(std::fs::read(&p).unwrap());
    }
    let mut rng = Rng(0x5eed);
    let target = dir.path().join("fuzz.qcow2");
    for iter in 0..400 {
        let mut img = images[iter % images.len()].clone();
        for _ in 0..(1 + rng.next() % 8) {
            // Mostly the header and the metadata at the start and end of the file.
            let pos = match rng.next() % 3 {
                0 => rng.next() % 512,
                1 => img.len() as u64 - 1 - rng.next() % (img.len() as u64 / 4),
                _ => rng.next() % img.len() as u64,
            } as usize;
            img[pos] ^= 1 << (rng.next() % 8);
        }
        std::fs::write(&target, &img).unwrap();
        if let Ok(dev) = diskconv::open(&target, &OpenOptions::new().format(Format::Qcow2)) {
            let _ = dev.info();
            read_all_tolerant(dev.as_ref());
        }
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn sparse_terabyte_image_maps_in_few_steps() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tb.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&p), "4T"]);
    qemu_io(&p, &["write -P 0x99 3T 128k"]);
    let dev = open_as(&p, Format::Qcow2);
    // Three map calls cover 4 TiB: they read the L2 table in use, not 64 Mi entries.
    let (_, work) = measure("mapping 4 TiB", || {
        let m = dev.map(0, u64::MAX).unwrap();
        assert_eq!((m.len, m.kind), (3 << 40, MappingKind::Unallocated));
        let m = dev.map(3 << 40, u64::MAX).unwrap();
        assert_eq!(m.len, 128 << 10);
        assert!(matches!(m.kind, MappingKind::Data { host: Some(_) }));
        let m = dev.map((3 << 40) + (128 << 10), u64::MAX).unwrap();
        assert_eq!(m.offset + m.len, 4 << 40);
    });
    assert_work_within("mapping 4 TiB", &work, 1 << 20, 1 << 20);
    let out = dir.path().join("tb.copy.qcow2");
    convert(&p, &out, Format::Qcow2, &[], false);
    assert_qemu_check_clean(&out, Format::Qcow2);
    assert_qemu_identical(&p, Format::Qcow2, &out, Format::Qcow2);
    assert!(std::fs::metadata(&out).unwrap().len() < 4 << 20);
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn dirty_lazy_refcount_images_and_internal_snapshots_read_like_qemu() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A crash with lazy refcounts leaves the dirty bit set.
    let lz = dir.path().join("lazy.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&lz),
        "1M",
    ]);
    let _ = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x61 0 64k", "-c", "flush"])
        .args(["-c", "write -P 0x62 128k 64k", "-c", "abort", s(&lz)])
        .output()
        .unwrap();
    let dev = open_as(&lz, Format::Qcow2);
    assert_eq!(dev.info().dirty, Some(true));
    assert_reads_like_qemu(&lz, Format::Qcow2, dir.path());

    // Internal snapshots share clusters (no COPIED flag); only the active state is read.
    let sn = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&sn), "1M"]);
    qemu_io(&sn, &["write -P 1 0 128k"]);
    qemu_img(&["snapshot", "-c", "s1", s(&sn)]);
    qemu_io(&sn, &["write -P 2 64k 128k"]);
    assert_reads_like_qemu(&sn, Format::Qcow2, dir.path());
    let info = open_as(&sn, Format::Qcow2).info();
    // `info` lists the snapshot (as qemu-img does) instead of warning about it.
    assert_eq!(info.snapshots.len(), 1);
    assert_eq!(info.snapshots[0].name, "s1");
}
