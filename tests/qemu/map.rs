//! map: our JSON and human output equal qemu-img map's, byte for byte, on images qemu-img
//! made in every format and subformat (sparse raw, compressed and zero clusters, a
//! backing chain, streamOptimized and flat vmdk), over the whole image and sub-ranges.
use crate::common;
use common::cmms::*;
use common::*;

use diskconv::{MapRange, OpenOptions};

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn map_equals_qemu_img() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = make_images(dir.path());
    let mut compared = 0;
    for (img, fmt) in &images {
        let name = img.file_name().unwrap().to_str().unwrap();
        for range in [
            &[][..],
            &["--start-offset", "100k", "--max-length", "5M"][..],
        ] {
            for output in ["json", "human"] {
                let out = format!("--output={output}");
                let mut qa = vec!["map", "-f", fmt, out.as_str()];
                qa.extend_from_slice(range);
                qa.push(name);
                let (qc, qout, _) = run_in(dir.path(), "qemu-img", &qa);
                let mut da = vec!["map", "-f", fmt, "--allow-references", out.as_str()];
                da.extend_from_slice(range);
                da.push(name);
                let (dc, dout, derr) = run_in(dir.path(), diskconv(), &da);
                assert_eq!(qc, dc, "exit code of {da:?} ({derr})");
                if qc == 0 {
                    assert_eq!(qout, dout, "{da:?}");
                    if output == "json" {
                        let a: serde_json::Value = serde_json::from_str(&qout).unwrap();
                        let b: serde_json::Value = serde_json::from_str(&dout).unwrap();
                        assert_eq!(a, b);
                    }
                    compared += 1;
                }
            }
        }
    }
    // Human output of compressed images is refused by both: everything else compared.
    assert!(compared >= images.len() * 3, "compared {compared}");
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn map_library_reports_depth_and_kinds() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make_images(dir.path());
    let opts = OpenOptions::new().allow_references(true, None);
    let e = diskconv::map(&dir.path().join("top.qcow2"), &opts, MapRange::default()).unwrap();
    // 0..64k comes from the backing file, 64k..192k from the top, 4M zero in the top.
    assert_eq!((e[0].start, e[0].length, e[0].depth), (0, 65536, 1));
    assert!(e[0].data && e[0].offset.is_some());
    assert_eq!((e[1].start, e[1].length, e[1].depth), (65536, 131072, 0));
    let z = e.iter().find(|x| x.start == 4 << 20).unwrap();
    assert!(z.zero && z.present && !z.data && z.depth == 0);
    let c = diskconv::map(&dir.path().join("c.qcow2"), &opts, MapRange::default()).unwrap();
    assert!(c.iter().any(|x| x.compressed && x.offset.is_none()));
    // A sub-range is clipped like qemu-img's: starts at the offset, ends at the limit.
    let r = MapRange {
        start: 1 << 20,
        max_length: Some(1 << 30),
    };
    let p = diskconv::map(&dir.path().join("i.qcow2"), &opts, r).unwrap();
    assert_eq!(p[0].start, 1 << 20);
    assert_eq!(p.iter().map(|x| x.length).sum::<u64>(), 7 << 20);
}

/// Our map, JSON and human, whole and in ranges, equals qemu-img's (exit code and stdout,
/// byte for byte) on every variant: each driver's block status rules (vdi blocks whole
/// and vhdx one data range without offset, the file's holes where qemu looks into the
/// file, preallocated zero clusters with their offset, depth 0 past a short backing
/// image, the backing file named in the human table) and qemu-img's merging.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn map_equals_qemu_img_on_every_variant() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = common::variants::make_variants(dir.path());
    let mut compared = 0;
    let mut refused = 0;
    for (img, fmt) in &images {
        let name = img.file_name().unwrap().to_str().unwrap();
        for range in [
            &[][..],
            &["--start-offset", "100k", "--max-length", "5M"][..],
            &["--start-offset", "7340033"][..],
        ] {
            for output in ["json", "human"] {
                let out = format!("--output={output}");
                let mut qa = vec!["map", "-f", fmt, out.as_str()];
                qa.extend_from_slice(range);
                qa.push(name);
                let (qc, qout, qerr) = run_in(dir.path(), "qemu-img", &qa);
                let mut da = vec!["map", "-f", fmt, "--allow-references", out.as_str()];
                da.extend_from_slice(range);
                da.push(name);
                let (dc, dout, derr) = run_in(dir.path(), diskconv(), &da);
                assert_eq!(qc, dc, "exit code of {da:?}: {qerr} / {derr}");
                assert_eq!(qout, dout, "{da:?}");
                if qc == 0 {
                    compared += 1;
                } else {
                    // Only the human table refuses (compressed data, vhdx), after its header.
                    assert_eq!(output, "human", "{da:?}: {qerr}");
                    assert!(dout.starts_with("Offset"), "{da:?}");
                    refused += 1;
                }
            }
        }
    }
    assert!(compared >= images.len() * 4, "compared {compared}");
    assert!(refused > 0);
}
