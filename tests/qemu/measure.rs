//! measure: equal to qemu-img measure for qcow2 and raw outputs (several -o shapes, from
//! images and from --size), and exact for our other writers: each measured input is
//! converted and the output file's length must equal `required` (file length, not
//! allocated blocks: the plan fixes the length, while which zero gaps end up as holes is
//! the filesystem's business); a fully written source must give `fully allocated`
//! (streamOptimized, compressed: at most, since that is an upper bound).
use crate::common;
use common::cmms::*;
use common::*;

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn qcow2_and_raw_equal_qemu_img() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = make_images(dir.path());
    let outputs: &[&[&str]] = &[
        &["-O", "raw"],
        &["-O", "qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
        &["-O", "qcow2", "-o", "compat=0.10"],
        &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=2M"],
    ];
    for (img, fmt) in &images {
        let name = img.file_name().unwrap().to_str().unwrap();
        for out in outputs {
            let mut a = vec!["measure", "--output=json", "-f", fmt];
            a.extend_from_slice(out);
            a.push(name);
            let (qc, q, qe) = run_in(dir.path(), "qemu-img", &a);
            a.insert(1, "--allow-references");
            let (dc, d, de) = run_in(dir.path(), diskconv(), &a);
            assert_eq!((qc, dc), (0, 0), "{a:?}: {qe} / {de}");
            assert_eq!(q, d, "{a:?}");
        }
    }
    for size in ["1G", "100M", "12345k", "3T"] {
        for out in outputs {
            let mut a = vec!["measure", "--size", size];
            a.extend_from_slice(out);
            let (_, q, _) = run_in(dir.path(), "qemu-img", &a);
            let (_, d, _) = run_in(dir.path(), diskconv(), &a);
            assert_eq!(q, d, "{a:?}");
        }
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn our_writers_are_exact() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut images = make_images(dir.path());
    // A source with every block written, for the fully allocated sizes.
    let full = dir.path().join("full.raw");
    // No zero sector anywhere, so every block is written.
    let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&full, bytes).unwrap();
    images.push((full.clone(), "raw"));
    let outputs: &[&[&str]] = &[
        &["-O", "vpc"],
        &["-O", "vpc", "-o", "subformat=fixed"],
        &["-O", "vdi"],
        &["-O", "vdi", "-o", "static=on"],
        &["-O", "vmdk"],
        &["-O", "vmdk", "-o", "subformat=streamOptimized"],
    ];
    let mut checked = 0;
    for (img, fmt) in &images {
        let name = img.file_name().unwrap().to_str().unwrap();
        for out in outputs {
            let mut a = vec!["measure", "--allow-references", "--output=json", "-f", fmt];
            a.extend_from_slice(out);
            a.push(name);
            let (dc, d, de) = run_in(dir.path(), diskconv(), &a);
            assert_eq!(dc, 0, "{a:?}: {de}");
            let m = json(&d);
            let (req, fully) = (
                m["required"].as_u64().unwrap(),
                m["fully-allocated"].as_u64().unwrap(),
            );
            let mut c = vec!["convert", "--allow-references", "-f", fmt];
            c.extend_from_slice(out);
            c.extend([name, "out.img"]);
            let (cc, _, ce) = run_in(dir.path(), diskconv(), &c);
            assert_eq!(cc, 0, "{c:?}: {ce}");
            let len = std::fs::metadata(dir.path().join("out.img")).unwrap().len();
            assert_eq!(len, req, "{a:?}: converted file length vs required");
            let compressed = out.contains(&"subformat=streamOptimized");
            if img == &full {
                if compressed {
                    assert!(len <= fully, "{a:?}: {len} > bound {fully}");
                } else {
                    assert_eq!(len, fully, "{a:?}: fully written source vs fully allocated");
                }
            }
            assert!(req <= fully, "{a:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, images.len() * outputs.len());
    // qemu-img measure has no -c; ours takes it and, for qcow2, keeps qemu's formula,
    // an upper bound of what a compressed conversion writes.
    for (img, _) in &images {
        let name = img.file_name().unwrap().to_str().unwrap();
        let (_, d, e) = run_in(
            dir.path(),
            diskconv(),
            &[
                "measure",
                "--allow-references",
                "--output=json",
                "-O",
                "qcow2",
                "-c",
                name,
            ],
        );
        let req = json(&d)["required"]
            .as_u64()
            .unwrap_or_else(|| panic!("{e}"));
        let c = [
            "convert",
            "--allow-references",
            "-c",
            "-O",
            "qcow2",
            name,
            "out.img",
        ];
        assert_eq!(run_in(dir.path(), diskconv(), &c).0, 0);
        let len = std::fs::metadata(dir.path().join("out.img")).unwrap().len();
        assert!(len <= req, "{name}: compressed {len} > measured {req}");
    }
    // Human output names the bound.
    let (_, h, _) = run_in(
        dir.path(),
        diskconv(),
        &[
            "measure",
            "-O",
            "vmdk",
            "-o",
            "subformat=streamOptimized",
            "--size",
            "1G",
        ],
    );
    assert!(
        h.contains("required size: ") && h.contains("(upper bound: compressed)"),
        "{h}"
    );
}

/// Our measure equals qemu-img's (exit code and stdout, JSON and human) for raw and qcow2
/// outputs of every variant source, with -O left out (raw), qemu's -o options (compat
/// 0.10 and 1.1: the bitmaps key depends on the output's version and on whether the
/// source can hold bitmaps; preallocation; backing_file; options that change no number;
/// values qemu refuses) and with --size.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn equals_qemu_img_for_every_source_and_option() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = common::variants::make_variants(dir.path());
    // Every source gets these; a few get the long list.
    let short: &[&[&str]] = &[
        &[],
        &["-O", "raw"],
        &["-O", "qcow2"],
        &["-O", "qcow2", "-o", "compat=0.10"],
        &["-O", "qcow2", "-o", "cluster_size=4k"],
    ];
    let long: &[&[&str]] = &[
        &["-O", "qcow2", "-o", "compat=1.1"],
        &["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=1"],
        &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=2M"],
        &["-O", "qcow2", "-o", "extended_l2=on,cluster_size=8k"],
        &["-O", "qcow2", "-o", "preallocation=metadata"],
        &["-O", "qcow2", "-o", "preallocation=falloc"],
        &["-O", "qcow2", "-o", "preallocation=full,compat=0.10"],
        &["-O", "qcow2", "-o", "preallocation=bogus"],
        &[
            "-O",
            "qcow2",
            "-o",
            "backing_file=other.qcow2,backing_fmt=qcow2",
        ],
        &["-O", "qcow2", "-o", "compat=0.10,lazy_refcounts=on"],
        &["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"],
        &["-O", "qcow2", "-o", "compat=v3"],
        &[
            "-O",
            "qcow2",
            "-o",
            "refcount_bits=0x20,compression_type=zstd",
        ],
        &["-O", "qcow2", "-o", "refcount_bits=3"],
        &["-O", "qcow2", "-o", "cluster_size=4M"],
        &[
            "-O",
            "qcow2",
            "-o",
            "nocow=on,extent_size_hint=1M,data_file=x,encryption=off",
        ],
        &["-O", "qcow2", "-o", "nocow=maybe"],
        &["-O", "qcow2", "-o", "size=1T,cluster_size=512"],
        &["-O", "qcow2", "-o", "bogus=1"],
        &["-O", "raw", "-o", "preallocation=full,nocow=on"],
        &["-O", "raw", "-o", "cluster_size=64k"],
    ];
    let is_long = |n: &str| {
        [
            "w.qcow2",
            "w.v2.qcow2",
            "bm.qcow2",
            "hw.vdi",
            "w.vhdx",
            "top8.qcow2",
            "w.raw",
        ]
        .contains(&n)
    };
    let mut compared = 0;
    for (img, fmt) in &images {
        let name = img.file_name().unwrap().to_str().unwrap();
        let outs = short.iter().chain(long.iter().filter(|_| is_long(name)));
        for out in outs {
            for output in ["--output=json", "--output=human"] {
                let mut a = vec!["measure", output, "-f", fmt];
                a.extend_from_slice(out);
                a.push(name);
                let (qc, q, qe) = run_in(dir.path(), "qemu-img", &a);
                a.insert(1, "--allow-references");
                let (dc, d, de) = run_in(dir.path(), diskconv(), &a);
                assert_eq!(qc, dc, "exit code of {a:?}: {qe} / {de}");
                assert_eq!(q, d, "{a:?}");
                compared += usize::from(qc == 0);
            }
        }
    }
    assert!(
        compared >= images.len() * short.len() * 2,
        "compared {compared}"
    );
    // The bitmaps key: present for v3 outputs of a v3 qcow2, nonzero with bitmaps.
    let (_, j, _) = run_in(
        dir.path(),
        diskconv(),
        &["measure", "--output=json", "-O", "qcow2", "bm.qcow2"],
    );
    assert!(json(&j)["bitmaps"].as_u64().unwrap() > 0, "{j}");
    let (_, j, _) = run_in(
        dir.path(),
        diskconv(),
        &["measure", "--output=json", "-O", "qcow2", "w.v2.qcow2"],
    );
    assert!(json(&j).get("bitmaps").is_none(), "{j}");
    for size in [
        "0",
        "511",
        "100M",
        "12345k",
        "3T",
        "1E",
        "8E",
        "9223372036854775807",
    ] {
        for out in short.iter().chain(long) {
            for output in ["--output=json", "--output=human"] {
                let mut a = vec!["measure", output, "--size", size];
                a.extend_from_slice(out);
                let (qc, q, qe) = run_in(dir.path(), "qemu-img", &a);
                let (dc, d, de) = run_in(dir.path(), diskconv(), &a);
                assert_eq!(qc, dc, "exit code of {a:?}: {qe} / {de}");
                assert_eq!(q, d, "{a:?}");
            }
        }
    }
}
