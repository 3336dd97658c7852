//! Sequential VDI, dynamic and static (issue 14, item 1): plan the source at the block
//! size, send header and block map first, then the blocks strictly forward into a FIFO.
//! Every output is checked with qemu-img (check clean, compare identical), its length
//! against the prediction, and its bytes against the file writer's (UUIDs masked).
use crate::common;
use common::stream::planned_through_fifo;
use common::*;

use std::path::Path;

use diskconv::convert::plan_allocation_with;
use diskconv::formats::{plan_encoder, plan_granularity};
use diskconv::writer::AllocationPlan;
use diskconv::{BlockDevice, ConvertOptions, Format, OpenOptions};

/// A few MiB and one sector over a block multiple, so the last block is partial.
const SRC_SIZE: u64 = (3 << 20) + 512;

fn options(fixed: bool, size: u64, min_sparse: u64) -> ConvertOptions<'static> {
    let mut o = ConvertOptions::new(Format::Vdi);
    if fixed {
        o.create.options.insert("static".into(), "on".into());
    }
    o.create.size = size;
    o.min_sparse = min_sparse;
    o.threads = 2;
    o
}

fn plan(src: &dyn BlockDevice, o: &ConvertOptions) -> AllocationPlan {
    let g = plan_granularity(Format::Vdi, &o.create)
        .unwrap()
        .expect("vdi is planned");
    assert_eq!(g, 1 << 20, "the VDI block size");
    let enc = plan_encoder(Format::Vdi, &o.create).unwrap();
    assert!(enc.is_none());
    plan_allocation_with(src, g, enc, o).unwrap()
}

/// Plan `src` and convert it through a FIFO drained into `dst`; returns (predicted length,
/// bytes sent).
fn through_fifo(src: &dyn BlockDevice, o: &ConvertOptions, dst: &Path) -> (u64, u64) {
    planned_through_fifo(Format::Vdi, src, o, &plan(src, o), dst)
}

/// The file's bytes with the fields each new image gets fresh (image and last-snapshot
/// UUIDs at 0x188..0x1a8) zeroed.
fn masked(p: &Path) -> Vec<u8> {
    let mut b = std::fs::read(p).unwrap();
    b[0x188..0x1a8].fill(0);
    b
}

/// Stream `srcp` as vdi and check everything; returns the output's length.
fn check_case(srcp: &Path, fmt: Format, fixed: bool, min_sparse: u64, dir: &Path) -> u64 {
    let what = format!("{} static={fixed} -S {min_sparse}", srcp.display());
    let src = diskconv::open(srcp, &OpenOptions::new().format(fmt)).unwrap();
    let o = options(fixed, src.virtual_size(), min_sparse);
    let streamed = dir.join("streamed.vdi");
    let (predicted, n) = through_fifo(&*src, &o, &streamed);
    assert_eq!(n, predicted, "{what}: bytes written vs predicted");
    assert_eq!(std::fs::metadata(&streamed).unwrap().len(), n, "{what}");
    assert_qemu_check_clean(&streamed, Format::Vdi);
    assert_qemu_identical(srcp, fmt, &streamed, Format::Vdi);

    // The file writer gives the same bytes (holes where the stream sent zeros).
    let file = dir.join("file.vdi");
    let mut c = options(fixed, 0, min_sparse);
    c.open = OpenOptions::new().format(fmt);
    diskconv::convert(srcp, &file, &c).unwrap();
    assert!(
        masked(&file) == masked(&streamed),
        "{what}: file writer and stream differ"
    );
    n
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img")]
fn dynamic_and_static_with_holes_zeros_and_data() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // A qcow2 source with data, zero clusters (plain and over allocated data), allocated
    // zeros and holes, spread over the blocks.
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
        for fixed in [false, true] {
            for min_sparse in [0u64, 4096, 1 << 20] {
                check_case(srcp, fmt, fixed, min_sparse, dir.path());
            }
        }
    }
    let mib = 1u64 << 20;
    // -S 0 allocates every block; the default drops the blocks of only zeros and holes
    // (1, 2, 4, 5, 6); static always has them all.
    let full = check_case(&q, Format::Qcow2, false, 0, dir.path());
    let sparse = check_case(&q, Format::Qcow2, false, 4096, dir.path());
    let fixed = check_case(&q, Format::Qcow2, true, 4096, dir.path());
    assert_eq!(full, 0x400 + 8 * mib);
    assert_eq!(sparse, 0x400 + 3 * mib);
    assert_eq!(fixed, 0x400 + 8 * mib);
}

/// From the command line: `-O vdi SRC -` (dynamic and static) into a pipe comes out
/// checked clean and identical to the source, as long as predicted.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn cli_streams_vdi_into_a_pipe() {
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
    for (extra, dst) in [
        (&[][..], "-"),
        (&["-o", "static=on"][..], "-"),
        (&[][..], "/dev/stdout"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_diskconv"));
        cmd.args(["convert", "-O", "vdi"])
            .args(extra)
            .args([s(&src), dst])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = cmd.spawn().unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{extra:?} {dst}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let out = dir.path().join("out.vdi");
        std::fs::write(&out, &o.stdout).unwrap();
        assert_qemu_check_clean(&out, Format::Vdi);
        assert_qemu_identical(&out, Format::Vdi, &src, Format::Raw);
        let blocks = if extra.is_empty() { 3 } else { 64 };
        assert_eq!(o.stdout.len() as u64, 0x400 + (blocks << 20), "{extra:?}");
    }
}
