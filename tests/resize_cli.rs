//! `diskconv resize` and `convert --target-size` from the command line, against
//! `qemu-img resize` on the same input: same sizes, same guest bytes, same refusals.

mod common;

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
