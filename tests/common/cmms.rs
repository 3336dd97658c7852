//! Images for the compare, map and snapshot tests, made by qemu-img and qemu-io (the
//! oracles), and a way to run our binary beside qemu-img.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Run `qemu-io` on `img` (format `fmt`) with one `-c` per command.
pub fn qemu_io(fmt: &str, img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", fmt]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(img).output().expect("qemu-io");
    assert!(
        out.status.success(),
        "qemu-io {cmds:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The images every test here uses, in `dir`: an 8 MiB raw file with data at 1 MiB, a
/// zero-written range at 3 MiB and qemu's allocated first block, converted by qemu-img to
/// every format and subformat; a 9 MiB copy; a copy with one changed byte; a compressed
/// qcow2; a qcow2 over a backing file with zero clusters.
pub fn make_images(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let p = |n: &str| dir.join(n);
    let q = |a: &[&str]| super::qemu_img(a);
    let raw = p("r.raw");
    q(&["create", "-q", "-f", "raw", super::s(&raw), "8M"]);
    qemu_io(
        "raw",
        &raw,
        &["write -P 1 1M 64k", "write -P 0 3M 64k", "write -P 7 7M 4k"],
    );
    let mut out = vec![(raw.clone(), "raw")];
    for (name, fmt, opts) in [
        ("i.qcow2", "qcow2", ""),
        ("pm.qcow2", "qcow2", "preallocation=metadata"),
        ("c.qcow2", "qcow2", "-c"),
        ("i.vpc", "vpc", ""),
        ("fixed.vpc", "vpc", "subformat=fixed"),
        ("i.vdi", "vdi", ""),
        ("static.vdi", "vdi", "static=on"),
        ("i.vmdk", "vmdk", ""),
        ("so.vmdk", "vmdk", "subformat=streamOptimized"),
        ("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
    ] {
        let dst = p(name);
        let mut a = vec!["convert", "-f", "raw", "-O", fmt];
        if opts == "-c" {
            a.push("-c");
        } else if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([super::s(&raw), super::s(&dst)]);
        q(&a);
        out.push((dst, fmt));
    }
    let big = p("big.raw");
    q(&["create", "-q", "-f", "raw", super::s(&big), "9M"]);
    qemu_io(
        "raw",
        &big,
        &["write -P 1 1M 64k", "write -P 0 3M 64k", "write -P 7 7M 4k"],
    );
    out.push((big, "raw"));
    let diff = p("diff.qcow2");
    q(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        super::s(&raw),
        super::s(&diff),
    ]);
    qemu_io("qcow2", &diff, &["write -P 9 1500k 1"]);
    out.push((diff, "qcow2"));
    let base = p("base.qcow2");
    q(&["create", "-q", "-f", "qcow2", super::s(&base), "8M"]);
    qemu_io("qcow2", &base, &["write -P 3 0 128k", "write -P 4 4M 64k"]);
    let top = p("top.qcow2");
    q(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        super::s(&top),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &["write -P 5 64k 128k", "write -z 4M 64k", "write -z 6M 64k"],
    );
    out.push((top, "qcow2"));
    out
}

/// Run a program in `dir`, returning (exit code, stdout, stderr).
pub fn run_in(dir: &Path, prog: &str, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    (
        o.status.code().expect("exited"),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Our binary.
pub fn diskconv() -> &'static str {
    env!("CARGO_BIN_EXE_diskconv")
}
