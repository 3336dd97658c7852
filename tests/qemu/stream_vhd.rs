//! Sequential dynamic VHD (issue 14, item 1): plan the source at the block size, send the
//! footer copy, dynamic header and BAT first, then the blocks in guest order, strictly
//! forward into a FIFO. Every output is compared with the source by qemu-img and by our
//! reader, its length against the prediction, and its bytes against the same layout
//! written to a plain file.
use crate::common;
use common::stream::planned_through_fifo;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::Path;

use diskconv::convert::plan_allocation_with;
use diskconv::formats::{create_planned_writer, plan_granularity};
use diskconv::writer::{AllocationPlan, Sink};
use diskconv::{convert_device, BlockDevice, ConvertOptions, Format, OpenOptions};

/// A few MiB and one sector over a block multiple.
const SRC_SIZE: u64 = (5 << 20) + 512;

fn options(opts: &[(&str, &str)], size: u64, min_sparse: u64) -> ConvertOptions<'static> {
    let mut o = ConvertOptions::new(Format::Vhd);
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
    let g = plan_granularity(Format::Vhd, &o.create)
        .unwrap()
        .expect("dynamic vpc is planned");
    plan_allocation_with(src, g, None, o).unwrap()
}

/// The image's bytes with the fields every new VHD gets fresh (timestamp, checksum and
/// unique id of the footer and its copy) zeroed.
fn masked(p: &Path) -> Vec<u8> {
    let mut b = std::fs::read(p).unwrap();
    let tail = b.len() - 512;
    for f in [0, tail] {
        assert_eq!(&b[f..f + 8], b"conectix", "footer at {f}");
        b[f + 24..f + 28].fill(0);
        b[f + 64..f + 84].fill(0);
    }
    b
}

/// Stream `srcp` as vpc with `opts` and check everything; returns the output's length.
fn check_case(srcp: &Path, fmt: Format, opts: &[(&str, &str)], min_sparse: u64, dir: &Path) -> u64 {
    let what = format!("{} {opts:?} -S {min_sparse}", srcp.display());
    let src = open(srcp, fmt);
    let o = options(opts, src.virtual_size(), min_sparse);
    let p = plan(&*src, &o);
    let streamed = dir.join("streamed.vhd");
    let (predicted, n) = planned_through_fifo(Format::Vhd, &*src, &o, &p, &streamed);
    assert_eq!(n, predicted, "{what}: bytes written vs predicted");
    assert_eq!(std::fs::metadata(&streamed).unwrap().len(), n, "{what}");
    let ours = open(&streamed, Format::Vhd);
    assert_eq!(ours.virtual_size(), src.virtual_size(), "{what}");
    assert_eq!(
        sha256_device(&*ours),
        sha256_device(&*src),
        "{what}: our reader"
    );
    if have_qemu() {
        assert_qemu_identical(srcp, fmt, &streamed, Format::Vhd);
        let info = qemu_info(&streamed, Format::Vhd);
        assert_eq!(
            info["virtual-size"].as_u64().unwrap(),
            src.virtual_size(),
            "{what}"
        );
    }

    // The same planned layout into a fresh file: the same bytes (holes where the stream
    // sent zeros), apart from the fresh identity fields.
    let file = dir.join("file.vhd");
    let f = std::fs::File::create(&file).unwrap();
    let w = create_planned_writer(Format::Vhd, Sink::from(f), &file, &o.create, &p).unwrap();
    convert_device(&*src, w, &o).unwrap();
    assert!(
        masked(&file) == masked(&streamed),
        "{what}: file and stream differ"
    );

    // The file writer (no plan) allocates the same blocks, with the same bitmaps.
    let classic = dir.join("classic.vhd");
    let mut c = options(opts, 0, min_sparse);
    c.open = OpenOptions::new().format(fmt);
    diskconv::convert(srcp, &classic, &c).unwrap();
    assert!(
        masked(&classic) == masked(&streamed),
        "{what}: the file writer's output differs from the stream"
    );
    n
}

#[test]
fn block_sizes_holes_zeros_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let rand = dir.path().join("rand.raw");
    make_raw(&rand, SRC_SIZE, 21);
    // Data in the first block, allocated zeros filling the second, a hole for the third,
    // a short piece in the last (partial) block.
    let mixed = dir.path().join("mixed.raw");
    let f = std::fs::File::create(&mixed).unwrap();
    f.set_len(SRC_SIZE).unwrap();
    f.write_all_at(&[0xabu8; 100_000], 4096).unwrap();
    f.write_all_at(&vec![0u8; 2 << 20], 2 << 20).unwrap();
    f.write_all_at(&[0x5au8; 512], SRC_SIZE - 512).unwrap();
    drop(f);
    for srcp in [&rand, &mixed] {
        for bs in [None, Some("512K"), Some("4k")] {
            let opts: Vec<(&str, &str)> = bs.map(|b| ("block_size", b)).into_iter().collect();
            for min_sparse in [0u64, 4096] {
                check_case(srcp, Format::Raw, &opts, min_sparse, dir.path());
            }
        }
    }
    // -S 0 allocates every block; the default leaves the zero and hole blocks out.
    let full = check_case(&mixed, Format::Raw, &[], 0, dir.path());
    let sparse = check_case(&mixed, Format::Raw, &[], 4096, dir.path());
    assert!(full > 3 * (2 << 20), "-S 0: all three blocks: {full}");
    assert!(sparse < 2 * (2 << 20) + (1 << 20), "two blocks: {sparse}");
}

#[test]
fn an_empty_source_streams_headers_and_footer_only() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("empty.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let n = check_case(&raw, Format::Raw, &[], 4096, dir.path());
    // Footer copy, header, one sector of BAT, padding to the 4 KiB data boundary minus
    // the bitmap, no blocks, footer.
    assert!(n <= 8192, "{n}");
}

#[test]
fn a_write_outside_the_plan_is_refused_and_planned_blocks_never_written_are_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&[7u8; 4096], 2 << 20).unwrap();
    drop(f);
    let src = open(&raw, Format::Raw);
    let o = options(&[("block_size", "1M")], 4 << 20, 4096);
    let mut p = plan(&*src, &o);
    assert_eq!(p.ranges, vec![(2 << 20, 3 << 20)]);

    let empty = AllocationPlan {
        granularity: 1 << 20,
        virtual_size: 4 << 20,
        ..Default::default()
    };
    let out = dir.path().join("refused.vhd");
    let f = std::fs::File::create(&out).unwrap();
    let w = create_planned_writer(Format::Vhd, Sink::from(f), &out, &o.create, &empty).unwrap();
    let e = convert_device(&*src, w, &o).unwrap_err();
    assert!(e.to_string().contains("0x200000"), "{e}");
    assert!(e.to_string().contains("allocation plan"), "{e}");

    // Extra planned blocks, before and after the data: present, and zeros.
    p.ranges.insert(0, (0, 1 << 20));
    p.ranges.push((3 << 20, 4 << 20));
    let out = dir.path().join("extra.vhd");
    let (predicted, n) = planned_through_fifo(Format::Vhd, &*src, &o, &p, &out);
    assert_eq!(predicted, n);
    assert_eq!(sha256_device(&*open(&out, Format::Vhd)), sha256_file(&raw));
    if have_qemu() {
        assert_qemu_identical(&raw, Format::Raw, &out, Format::Vhd);
    }

    let wrong = AllocationPlan {
        granularity: 512,
        ..p.clone()
    };
    let f = std::fs::File::create(&out).unwrap();
    let e = match create_planned_writer(Format::Vhd, Sink::from(f), &out, &o.create, &wrong) {
        Ok(_) => panic!("a plan for 512-byte granules was accepted for 1 MiB blocks"),
        Err(e) => e,
    };
    assert!(e.to_string().contains("512-byte granules"), "{e}");
}

#[test]
fn only_dynamic_vpc_is_planned() {
    let o = options(&[], 1 << 20, 4096);
    assert_eq!(
        plan_granularity(Format::Vhd, &o.create).unwrap(),
        Some(2 << 20)
    );
    let o = options(&[("block_size", "512K")], 1 << 20, 4096);
    assert_eq!(
        plan_granularity(Format::Vhd, &o.create).unwrap(),
        Some(512 << 10)
    );
    let o = options(&[("subformat", "fixed")], 1 << 20, 4096);
    assert_eq!(plan_granularity(Format::Vhd, &o.create).unwrap(), None);
    let bad = options(&[("block_size", "3M")], 1 << 20, 4096);
    let e = plan_granularity(Format::Vhd, &bad.create).unwrap_err();
    assert!(e.to_string().contains("block_size"), "{e}");
}

/// From the command line: `-O vpc SRC -` and through /dev/stdout into a pipe.
#[test]
fn cli_streams_dynamic_vpc_into_a_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, 3 << 20, 9);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    for (extra, dst) in [
        (&[][..], "-"),
        (&["-o", "block_size=512K"][..], "/dev/stdout"),
        (&["-S", "0"][..], "-"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_diskconv"));
        cmd.args(["convert", "-O", "vpc"])
            .args(extra)
            .args([s(&src), dst])
            .stdout(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(child.stdout.as_mut().unwrap(), &mut bytes).unwrap();
        assert!(child.wait().unwrap().success(), "{extra:?}");
        let out = dir.path().join("out.vhd");
        std::fs::write(&out, &bytes).unwrap();
        assert_eq!(sha256_device(&*open(&out, Format::Vhd)), sha256_file(&src));
        if have_qemu() {
            assert_qemu_identical(&out, Format::Vhd, &src, Format::Raw);
        }
    }
}

/// The library's push (`convert_to_writer`) and pull (`ConvertedReader`) give a dynamic
/// VHD of the predicted length that reads as the source.
#[test]
fn library_push_and_pull_stream_dynamic_vpc() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, 3 << 20, 17);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .unwrap()
        .set_len(9 << 20)
        .unwrap();
    let dev: std::sync::Arc<dyn BlockDevice> = std::sync::Arc::from(open(&src, Format::Raw));
    let o = options(&[("block_size", "512K")], 0, 4096);
    // A pipe-like sink: the writer sees only `Write`.
    let pushed_path = dir.path().join("pushed.out");
    let f = std::fs::File::create(&pushed_path).unwrap();
    let r = diskconv::convert_to_writer(dev.as_ref(), std::io::BufWriter::new(f), &o).unwrap();
    let pushed = std::fs::read(&pushed_path).unwrap();
    assert_eq!(r.output_len, Some(pushed.len() as u64));
    assert_eq!(r.size, pushed.len() as u64);
    let mut reader = diskconv::ConvertedReader::new(dev.clone(), o).unwrap();
    let mut pulled = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut pulled).unwrap();
    assert_eq!(pulled.len(), pushed.len());
    for (name, bytes) in [("pushed.vhd", &pushed), ("pulled.vhd", &pulled)] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        assert_eq!(
            sha256_device(&*open(&p, Format::Vhd)),
            sha256_file(&src),
            "{name}"
        );
        if have_qemu() {
            assert_qemu_identical(&p, Format::Vhd, &src, Format::Raw);
        }
    }
    assert!(masked(&dir.path().join("pushed.vhd")) == masked(&dir.path().join("pulled.vhd")));
}
