//! Sequential qcow2 (issue 14, item 1): plan the source, then write the file writer's
//! layout strictly forward into a FIFO. Every output is checked with qemu-img (check
//! clean, compare identical), its length against the prediction, and its bytes against
//! the same planned writer on a plain file and against the file writer (no plan).
use crate::common;
use common::stream::planned_through_fifo;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::Path;

use diskconv::convert::plan_allocation_with;
use diskconv::formats::{create_planned_writer, plan_encoder, plan_granularity};
use diskconv::writer::{AllocationPlan, Sink};
use diskconv::{convert_device, BlockDevice, ConvertOptions, Format, OpenOptions};

/// A few MiB and one byte over a cluster multiple.
const SRC_SIZE: u64 = (3 << 20) + 65537;

fn options(opts: &[(&str, &str)], size: u64, min_sparse: u64) -> ConvertOptions<'static> {
    let mut o = ConvertOptions::new(Format::Qcow2);
    for (k, v) in opts {
        o.create.options.insert(k.to_string(), v.to_string());
    }
    o.create.size = size;
    o.min_sparse = min_sparse;
    o.threads = 2;
    o
}

fn open(p: &Path, fmt: Format) -> Box<dyn BlockDevice> {
    diskconv::open(p, &OpenOptions::new().format(fmt)).unwrap()
}

fn plan(src: &dyn BlockDevice, o: &ConvertOptions) -> AllocationPlan {
    let g = plan_granularity(Format::Qcow2, &o.create)
        .unwrap()
        .expect("qcow2 is planned");
    let enc = plan_encoder(Format::Qcow2, &o.create).unwrap();
    plan_allocation_with(src, g, enc, o).unwrap()
}

/// The same planned layout written to a fresh regular file.
fn to_file(src: &dyn BlockDevice, o: &ConvertOptions, plan: &AllocationPlan, dst: &Path) {
    let f = std::fs::File::create(dst).unwrap();
    let w = create_planned_writer(Format::Qcow2, Sink::from(f), dst, &o.create, plan).unwrap();
    convert_device(src, w, o).unwrap();
}

/// Stream `srcp` as qcow2 with `opts` and check everything; returns the output's length.
fn check_case(srcp: &Path, fmt: Format, opts: &[(&str, &str)], min_sparse: u64, dir: &Path) -> u64 {
    check_case_c(srcp, fmt, opts, min_sparse, false, dir)
}

fn check_case_c(
    srcp: &Path,
    fmt: Format,
    opts: &[(&str, &str)],
    min_sparse: u64,
    compress: bool,
    dir: &Path,
) -> u64 {
    let what = format!("{} {opts:?} -S {min_sparse} -c {compress}", srcp.display());
    let src = open(srcp, fmt);
    let mut o = options(opts, src.virtual_size(), min_sparse);
    o.create.compress = compress;
    let p = plan(&*src, &o);
    let streamed = dir.join("streamed.qcow2");
    let (predicted, n) = planned_through_fifo(Format::Qcow2, &*src, &o, &p, &streamed);
    assert_eq!(n, predicted, "{what}: bytes written vs predicted");
    assert_eq!(std::fs::metadata(&streamed).unwrap().len(), n, "{what}");
    assert_qemu_check_clean(&streamed, Format::Qcow2);
    assert_qemu_identical(srcp, fmt, &streamed, Format::Qcow2);

    // The file gets the same bytes (holes where the stream sent zeros).
    let file = dir.join("file.qcow2");
    to_file(&*src, &o, &p, &file);
    assert!(
        std::fs::read(&file).unwrap() == std::fs::read(&streamed).unwrap(),
        "{what}: file and stream differ"
    );

    // The file writer (no plan, one pass) lays the same clusters out the same way.
    let classic = dir.join("classic.qcow2");
    let mut c = options(opts, 0, min_sparse);
    c.open = OpenOptions::new().format(fmt);
    c.create.compress = compress;
    diskconv::convert(srcp, &classic, &c).unwrap();
    assert!(
        std::fs::read(&classic).unwrap() == std::fs::read(&streamed).unwrap(),
        "{what}: the file writer's output differs from the stream"
    );
    n
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img")]
fn every_cluster_size_compat_and_refcount_width_streams_clean() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    make_raw(&raw, SRC_SIZE, 14);
    let mut cases: Vec<Vec<(&str, &str)>> = Vec::new();
    for cs in ["512", "4k", "64k", "2M"] {
        cases.push(vec![("cluster_size", cs), ("compat", "0.10")]);
        for rb in ["1", "16", "64"] {
            cases.push(vec![("cluster_size", cs), ("refcount_bits", rb)]);
        }
    }
    cases.push(vec![("refcount_bits", "2"), ("lazy_refcounts", "on")]);
    cases.push(vec![("refcount_bits", "4"), ("cluster_size", "1k")]);
    cases.push(vec![("refcount_bits", "8"), ("cluster_size", "128k")]);
    cases.push(vec![("refcount_bits", "32")]);
    cases.push(vec![("extended_l2", "on"), ("cluster_size", "32k")]);
    for c in &cases {
        check_case(&raw, Format::Raw, c, 4096, dir.path());
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img")]
fn holes_zeros_and_sparse_sizes() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A qcow2 source with data, zero clusters (plain and over allocated data) and holes.
    let q = dir.path().join("zeros.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&q), "8M"]);
    let mut args = vec!["qemu-io", "-f", "qcow2"];
    for c in [
        "write -P 0xab 0 1M",
        "write -z 512k 256k",
        "write -P 0x11 3M 64k",
        "write -z 4M 1M",
        "write -P 0 6M 128k",
        "write -P 0x22 7M 4k",
    ] {
        args.extend(["-c", c]);
    }
    args.push(s(&q));
    run(&args);
    let raw = dir.path().join("src.raw");
    make_raw(&raw, SRC_SIZE, 99);
    for (srcp, fmt) in [(&q, Format::Qcow2), (&raw, Format::Raw)] {
        for s in [0u64, 512, 4096, 1 << 20] {
            for cs in ["4k", "64k"] {
                check_case(srcp, fmt, &[("cluster_size", cs)], s, dir.path());
            }
        }
    }
    // -S 0 allocates every cluster; the default drops zeros and holes.
    let full = check_case(&q, Format::Qcow2, &[], 0, dir.path());
    let sparse = check_case(&q, Format::Qcow2, &[], 4096, dir.path());
    assert!(full >= 8 << 20, "-S 0 writes all 8 MiB: {full}");
    assert!(
        sparse < 4 << 20,
        "zeros and holes stay unallocated: {sparse}"
    );
}

#[test]
fn the_plan_is_what_the_engine_writes() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[1u8; 100], 70_000).unwrap();
    f.write_all_at(&[2u8; 65536], 2 << 20).unwrap();
    // Allocated zeros: dropped by -S 4k, written by -S 0.
    f.write_all_at(&[0u8; 65536], 3 << 20).unwrap();
    drop(f);
    let src = open(&raw, Format::Raw);
    let o = options(&[("cluster_size", "64k")], 4 << 20, 4096);
    let p = plan(&*src, &o);
    assert_eq!(p.granularity, 64 << 10);
    assert_eq!(
        p.ranges,
        vec![(65536, 131072), (2 << 20, (2 << 20) + 65536)]
    );
    assert_eq!(p.bytes, 2 * 65536);
    let o0 = options(&[("cluster_size", "64k")], 4 << 20, 0);
    let p0 = plan(&*src, &o0);
    assert_eq!(p0.ranges, vec![(0, 4 << 20)]);
    assert_eq!(p0.bytes, 4 << 20);
}

#[test]
fn a_write_outside_the_plan_is_refused_and_planned_clusters_never_written_are_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&[7u8; 4096], 512 << 10).unwrap();
    drop(f);
    let src = open(&raw, Format::Raw);
    let o = options(&[("cluster_size", "4k")], 1 << 20, 4096);
    let mut p = plan(&*src, &o);
    assert_eq!(p.ranges, vec![(512 << 10, (512 << 10) + 4096)]);

    // A plan missing the data: the engine's write is refused, naming the offset.
    let empty = AllocationPlan {
        granularity: 4096,
        virtual_size: 1 << 20,
        ..Default::default()
    };
    let out = dir.path().join("refused.qcow2");
    let f = std::fs::File::create(&out).unwrap();
    let w = create_planned_writer(Format::Qcow2, Sink::from(f), &out, &o.create, &empty).unwrap();
    let e = convert_device(&*src, w, &o).unwrap_err();
    assert!(e.to_string().contains("0x80000"), "{e}");
    assert!(e.to_string().contains("allocation plan"), "{e}");

    // A plan with more than the engine writes: the extra clusters are zeros.
    p.ranges.insert(0, (0, 8192));
    p.ranges.push((1020 << 10, 1 << 20));
    p.bytes += 8192 + 4096;
    let out = dir.path().join("extra.qcow2");
    let (predicted, n) = planned_through_fifo(Format::Qcow2, &*src, &o, &p, &out);
    assert_eq!(predicted, n);
    let img = open(&out, Format::Qcow2);
    let mut b = vec![0u8; 1 << 20];
    img.read_at(&mut b, 0).unwrap();
    assert!(b[..512 << 10].iter().all(|&x| x == 0));
    assert!(b[512 << 10..(512 << 10) + 4096].iter().all(|&x| x == 7));
    assert!(b[(512 << 10) + 4096..].iter().all(|&x| x == 0));
    if have_qemu() {
        assert_qemu_check_clean(&out, Format::Qcow2);
        assert_qemu_identical(&raw, Format::Raw, &out, Format::Qcow2);
    }

    // A plan for another granule is an error, not a silent fallback.
    let wrong = AllocationPlan {
        granularity: 512,
        ..p.clone()
    };
    let f = std::fs::File::create(&out).unwrap();
    let e = match create_planned_writer(Format::Qcow2, Sink::from(f), &out, &o.create, &wrong) {
        Ok(_) => panic!("a plan for 512-byte granules was accepted for 4k clusters"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("512-byte granules"), "{e}");
}

#[test]
fn only_qcow2_is_planned_and_only_compressed_with_an_encoder() {
    let mut o = options(&[], 1 << 20, 4096);
    o.create.compress = true;
    assert_eq!(
        plan_granularity(Format::Qcow2, &o.create).unwrap(),
        Some(65536)
    );
    assert!(plan_encoder(Format::Qcow2, &o.create).unwrap().is_some());
    let o = options(&[("cluster_size", "4k")], 1 << 20, 4096);
    assert_eq!(
        plan_granularity(Format::Qcow2, &o.create).unwrap(),
        Some(4096)
    );
    assert!(plan_encoder(Format::Qcow2, &o.create).unwrap().is_none());
    assert_eq!(
        plan_granularity(Format::Raw, &Default::default()).unwrap(),
        None
    );
    let bad = options(&[("cluster_size", "3k")], 1 << 20, 4096);
    let e = plan_granularity(Format::Qcow2, &bad.create).unwrap_err();
    assert!(e.to_string().contains("cluster_size"), "{e}");
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img")]
fn compressed_streams_in_two_passes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    make_raw(&raw, SRC_SIZE, 7);
    for c in [
        vec![],
        vec![("cluster_size", "512")],
        vec![("cluster_size", "4k"), ("refcount_bits", "1")],
        vec![("cluster_size", "4k"), ("refcount_bits", "2")],
        vec![("cluster_size", "2M")],
        vec![("compat", "0.10")],
        vec![("compression_type", "zstd"), ("cluster_size", "16k")],
        vec![("extended_l2", "on")],
    ] {
        for s in [0u64, 4096] {
            check_case_c(&raw, Format::Raw, &c, s, true, dir.path());
        }
    }
}

/// Read `n` bytes at `off` of `p`.
fn read_at(p: &Path, off: u64, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    b
}

fn be32(b: &[u8]) -> u64 {
    u32::from_be_bytes(b[..4].try_into().unwrap()) as u64
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img")]
fn a_sparse_tebibyte_streams_small_with_tables_sized_right() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("big.raw");
    let f = std::fs::File::create(&raw).unwrap();
    let size = 1u64 << 40;
    f.set_len(size).unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for off in [0u64, 1 << 30, 300 << 30, size - (1 << 20)] {
        f.write_all_at(&data, off).unwrap();
    }
    drop(f);
    let src = open(&raw, Format::Raw);
    let o = options(&[], size, 4096);
    let p = plan(&*src, &o);
    assert_eq!(p.bytes, 4 << 20);
    let out = dir.path().join("big.qcow2");
    let (predicted, n) = planned_through_fifo(Format::Qcow2, &*src, &o, &p, &out);
    assert_eq!(predicted, n);
    // Header, the L1 (2048 entries = 16 KiB, one cluster), 64 data clusters with 4 L2
    // tables, 1 refcount block, 1 refcount table cluster.
    let clusters = 1 + 1 + 64 + 4 + 1 + 1;
    assert_eq!(n, clusters * 65536);
    let h = read_at(&out, 0, 104);
    assert_eq!(be64(&h[24..]), size, "virtual size");
    assert_eq!(be32(&h[36..]), 2048, "l1_size");
    assert_eq!(be64(&h[40..]), 65536, "l1_table_offset");
    assert_eq!(
        be64(&h[48..]),
        (clusters - 1) * 65536,
        "refcount_table_offset"
    );
    assert_eq!(be32(&h[56..]), 1, "refcount_table_clusters");
    assert_qemu_check_clean(&out, Format::Qcow2);
    assert_qemu_identical(&raw, Format::Raw, &out, Format::Qcow2);
    let classic = dir.path().join("classic.qcow2");
    convert(&raw, &classic, Format::Qcow2, &[], false);
    assert!(std::fs::read(&classic).unwrap() == std::fs::read(&out).unwrap());
}

/// From the command line: qcow2 (plain and `-c`) into a pipe, through /dev/stdout, is
/// laid out from a first pass and comes out checked clean and identical to the source.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn cli_streams_qcow2_into_a_pipe() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, 3 << 20, 9);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    for extra in [
        &[][..],
        &["-c"][..],
        &["-o", "cluster_size=4096,compat=0.10"][..],
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_diskconv"));
        cmd.args(["convert", "-O", "qcow2"])
            .args(extra)
            .args([s(&src), "/dev/stdout"])
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(child.stdout.as_mut().unwrap(), &mut bytes).unwrap();
        assert!(child.wait().unwrap().success(), "{extra:?}");
        let out = dir.path().join("out.qcow2");
        std::fs::write(&out, &bytes).unwrap();
        assert_qemu_check_clean(&out, Format::Qcow2);
        assert_qemu_identical(&out, Format::Qcow2, &src, Format::Raw);
    }
}
