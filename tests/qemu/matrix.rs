//! Every writer through every reader: an image written in one format and converted to
//! each other one keeps its guest bytes, and qemu-img agrees with us on each output.
use crate::common;
use common::*;
use diskconv::{ConvertOptions, Format, OpenOptions};

/// (label, format, options, compress)
type Target = (
    &'static str,
    Format,
    &'static [(&'static str, &'static str)],
    bool,
);

const TARGETS: &[Target] = &[
    ("raw", Format::Raw, &[], false),
    ("qcow2", Format::Qcow2, &[], false),
    (
        "qcow2-v2-4k",
        Format::Qcow2,
        &[("compat", "0.10"), ("cluster_size", "4k")],
        false,
    ),
    ("qcow2-zlib", Format::Qcow2, &[], true),
    (
        "qcow2-zstd",
        Format::Qcow2,
        &[("compression_type", "zstd")],
        true,
    ),
    ("vpc-dynamic", Format::Vhd, &[], false),
    ("vpc-fixed", Format::Vhd, &[("subformat", "fixed")], false),
    ("vmdk-sparse", Format::Vmdk, &[], false),
    (
        "vmdk-stream",
        Format::Vmdk,
        &[("subformat", "streamOptimized")],
        false,
    ),
    ("vdi", Format::Vdi, &[], false),
    ("vdi-static", Format::Vdi, &[("static", "on")], false),
    ("vhdx-dynamic", Format::Vhdx, &[("block_size", "1M")], false),
    ("vhdx-fixed", Format::Vhdx, &[("subformat", "fixed")], false),
];

fn convert_to(src: &std::path::Path, dst: &std::path::Path, t: &Target) {
    let mut o = ConvertOptions::new(t.1);
    for (k, v) in t.2 {
        o.create.options.insert(k.to_string(), v.to_string());
    }
    o.create.compress = t.3;
    diskconv::convert(src, dst, &o).unwrap_or_else(|e| panic!("{} -> {}: {e}", src.display(), t.0));
}

#[test]
fn every_writer_through_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Sector multiple (vpc and vdi round sizes up to sectors), not a cluster multiple.
    let size = (3 << 20) + 7 * 512;
    make_raw(&src, size, 42);
    let want = sha256_file(&src);
    let qemu = have_qemu();
    for a in TARGETS {
        let first = dir.path().join(format!("first.{}", a.0));
        convert_to(&src, &first, a);
        // Probing must find the format we wrote.
        let dev = diskconv::open(&first, &OpenOptions::new()).unwrap();
        assert_eq!(dev.format(), a.1, "{} probes as {}", a.0, dev.format());
        assert_eq!(dev.virtual_size(), size, "{}", a.0);
        assert_eq!(sha256_device(dev.as_ref()), want, "{} reads back", a.0);
        if qemu {
            assert_qemu_identical(&src, Format::Raw, &first, a.1);
        }
        for b in TARGETS {
            let second = dir.path().join(format!("second.{}.{}", a.0, b.0));
            convert_to(&first, &second, b);
            let dev = diskconv::open(&second, &OpenOptions::new().format(b.1)).unwrap();
            assert_eq!(sha256_device(dev.as_ref()), want, "{} -> {}", a.0, b.0);
            if qemu && a.0 == "qcow2" {
                assert_qemu_identical(&src, Format::Raw, &second, b.1);
            }
            std::fs::remove_file(&second).unwrap();
        }
    }
}

#[test]
fn empty_images_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    for t in TARGETS {
        let p = dir.path().join(format!("empty.{}", t.0));
        let mut o = diskconv::CreateOptions::new(1 << 20);
        for (k, v) in t.2 {
            o.options.insert(k.to_string(), v.to_string());
        }
        diskconv::create(&p, t.1, &o).unwrap_or_else(|e| panic!("{}: {e}", t.0));
        let dev = diskconv::open(&p, &OpenOptions::new()).unwrap();
        assert_eq!(dev.format(), t.1);
        assert_eq!(dev.virtual_size(), 1 << 20);
        let mut off = 0;
        while off < 1 << 20 {
            let m = dev.map(off, (1 << 20) - off).unwrap();
            if !m.is_zero() {
                let mut b = vec![0u8; m.len as usize];
                dev.read_at(&mut b, off).unwrap();
                assert!(b.iter().all(|&x| x == 0), "{} reads non-zero", t.0);
            }
            off += m.len;
        }
    }
}
