//! `diskconv resize` and `convert --target-size` from the command line, against
//! `qemu-img resize` on the same input: same sizes, same guest bytes, same refusals.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::*;
use diskconv::Format;

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn diskconv(args: &[&str]) -> Run {
    let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn qemu_resize(args: &[&str]) -> Run {
    let o = Command::new("qemu-img")
        .arg("resize")
        .args(args)
        .output()
        .unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn copy(a: &Path, b: &Path) {
    std::fs::copy(a, b).unwrap();
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn raw_resize_matches_qemu_img_resize() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    make_raw(&base, 3 << 20, 7);
    let ours = dir.path().join("ours.raw");
    let theirs = dir.path().join("theirs.raw");
    copy(&base, &ours);
    copy(&base, &theirs);
    // (args, expected exit code): absolute, relative grow, refused shrink, shrink,
    // relative shrink, zero.
    let steps: &[(&[&str], i32)] = &[
        (&["8M"], 0),
        (&["+1536K"], 0),
        (&["2M"], 1),
        (&["--shrink", "2M"], 0),
        (&["--shrink", "-512K"], 0),
        (&["0"], 1),
        (&["--shrink", "-10G"], 1),
        (&["--preallocation=full", "+1M"], 0),
    ];
    for (args, code) in steps {
        let mut a: Vec<&str> = vec!["-f", "raw"];
        let (flags, size) = args.split_at(args.len() - 1);
        a.extend(flags);
        let mut ours_args = vec!["resize"];
        ours_args.extend(&a);
        ours_args.extend([s(&ours), size[0]]);
        let mut theirs_args = a.clone();
        theirs_args.extend([s(&theirs), size[0]]);
        let r = diskconv(&ours_args);
        let q = qemu_resize(&theirs_args);
        assert_eq!(r.code, Some(*code), "{args:?}: {}", r.stderr);
        assert_eq!(q.code, Some(*code), "qemu-img {args:?}: {}", q.stderr);
        if *code == 0 {
            assert_eq!(r.stdout, "Image resized.\n");
            assert_eq!(q.stdout, r.stdout);
        } else {
            assert!(r.stdout.is_empty());
        }
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "after {args:?}"
        );
    }
    // The refused shrink says what qemu-img says, and why.
    let r = diskconv(&["resize", "-f", "raw", s(&ours), "1M"]);
    assert!(r
        .stderr
        .contains("Use the --shrink option to perform a shrink operation."));
    assert!(r
        .stderr
        .contains("warning: Shrinking an image will delete all data"));
    let r = diskconv(&["resize", "-q", "-f", "raw", s(&ours), "+1M"]);
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), ""));
}

#[test]
fn block_devices_and_unknown_preallocation_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    make_raw(&img, 1 << 20, 1);
    let r = diskconv(&["resize", "--preallocation=metadata", s(&img), "2M"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("preallocation"), "{}", r.stderr);
    // /dev/null is a character device: not an image we can resize, and never truncated.
    let r = diskconv(&["resize", "-f", "raw", "/dev/null", "1M"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert_eq!(std::fs::read(&img).unwrap().len(), 1 << 20);
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn convert_target_size_grows_and_shrinks_only_a_zero_tail() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 2 MiB of data, then a 2 MiB zero tail.
    let src = dir.path().join("src.raw");
    make_raw(&src, 2 << 20, 3);
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.set_len(4 << 20).unwrap();
    drop(f);

    for fmt in ["qcow2", "vpc", "vmdk", "vdi", "raw"] {
        let out = dir.path().join(format!("big.{fmt}"));
        let r = diskconv(&[
            "convert",
            "-O",
            fmt,
            "--target-size",
            "64M",
            s(&src),
            s(&out),
        ]);
        assert_eq!(r.code, Some(0), "{fmt}: {}", r.stderr);
        let info = qemu_info(&out, Format::from_name(fmt).unwrap());
        assert_eq!(info["virtual-size"], 64 << 20, "{fmt}");
        // Same guest bytes as the source padded with zeros.
        let padded = dir.path().join("padded.raw");
        copy(&src, &padded);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&padded)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        assert_qemu_identical(&out, Format::from_name(fmt).unwrap(), &padded, Format::Raw);
        // qemu-img checks these three; raw and vpc have no check.
        if matches!(fmt, "qcow2" | "vmdk" | "vdi") {
            assert_qemu_check_clean(&out, Format::from_name(fmt).unwrap());
        }
    }

    // Shrinking into the zero tail needs no --shrink; into data it does.
    let out = dir.path().join("small.qcow2");
    let r = diskconv(&[
        "convert",
        "-O",
        "qcow2",
        "--target-size",
        "3M",
        s(&src),
        s(&out),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(qemu_info(&out, Format::Qcow2)["virtual-size"], 3 << 20);
    let r = diskconv(&[
        "convert",
        "-O",
        "qcow2",
        "--target-size",
        "1M",
        s(&src),
        s(&out),
    ]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("would drop data"), "{}", r.stderr);
    assert!(r.stderr.contains("--shrink"), "{}", r.stderr);
    // The refused conversion left the earlier output alone.
    assert_eq!(qemu_info(&out, Format::Qcow2)["virtual-size"], 3 << 20);
    let r = diskconv(&[
        "convert",
        "-O",
        "raw",
        "--target-size",
        "1M",
        "--shrink",
        s(&src),
        s(&out),
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&src).unwrap()[..1 << 20].to_vec()
    );
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn every_format_resizes_from_the_cli() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("g.raw");
    make_raw(&raw, 4 << 20, 11);
    for (fmt, opts) in [
        ("qcow2", ""),
        ("qcow2", "compat=0.10,cluster_size=4096"),
        ("vdi", ""),
        ("vpc", "subformat=dynamic"),
        ("vpc", "subformat=fixed"),
        ("vmdk", ""),
    ] {
        let f = Format::from_name(fmt).unwrap();
        let img = dir.path().join(format!("a.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&raw), s(&img)]);
        qemu_img(&args);
        // qemu-img's vpc rounds 4 MiB up to a whole CHS geometry: relative sizes start
        // from what the image holds.
        let before = qemu_info(&img, f)["virtual-size"].as_u64().unwrap();
        let r = diskconv(&["resize", "-f", fmt, s(&img), "+60M"]);
        assert_eq!(r.code, Some(0), "{fmt} {opts}: {}", r.stderr);
        assert_eq!(r.stdout, "Image resized.\n");
        let grown = before + (60 << 20);
        assert_eq!(qemu_info(&img, f)["virtual-size"], grown, "{fmt} {opts}");
        assert_eq!(open_as(&img, f).virtual_size(), grown, "{fmt} {opts}");
        let padded = dir.path().join("padded.raw");
        copy(&raw, &padded);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&padded)
            .unwrap()
            .set_len(grown)
            .unwrap();
        assert_qemu_identical(&img, f, &padded, Format::Raw);
        if matches!(fmt, "qcow2" | "vmdk" | "vdi") {
            assert_qemu_check_clean(&img, f);
        }
        // Shrinking needs --shrink, and then keeps what lies before the new end.
        let r = diskconv(&["resize", "-f", fmt, s(&img), "2M"]);
        assert_eq!(r.code, Some(1), "{fmt} {opts}: {}", r.stderr);
        let r = diskconv(&["resize", "-f", fmt, "--shrink", s(&img), "2M"]);
        assert_eq!(r.code, Some(0), "{fmt} {opts}: {}", r.stderr);
        let shrunk = qemu_info(&img, f)["virtual-size"].as_u64().unwrap();
        assert_eq!(open_as(&img, f).virtual_size(), shrunk, "{fmt} {opts}");
        assert!(
            (2 << 20..(2 << 20) + (64 << 10)).contains(&shrunk),
            "{fmt}: {shrunk}"
        );
        let head = dir.path().join("head.raw");
        let mut want = std::fs::read(&raw).unwrap()[..2 << 20].to_vec();
        want.resize(shrunk as usize, 0);
        std::fs::write(&head, want).unwrap();
        assert_qemu_identical(&img, f, &head, Format::Raw);
    }
}
