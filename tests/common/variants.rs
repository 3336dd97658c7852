//! Images in every format and subformat qemu-img reads, for the map and measure tests that
//! compare us with qemu-img: each written by qemu-io with data, an all-zero data block,
//! a zero-written range (`write -z`), a partial cluster and the last sector; the same
//! images with their files' zero blocks punched into holes (what qemu's file driver
//! reports as zero); conversions by qemu-img and by us (whose files have holes); backing
//! chains (a backing image shorter than its overlay, three levels, subclusters over a
//! backing file, a vmdk delta disk); an external data file; persistent bitmaps; a sparse
//! image past qemu-img map's 1 GiB probe.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::cmms::{diskconv, run_in};

/// qemu-io commands writing the pattern every image gets (an 8 MiB guest).
const PATTERN: &[&str] = &[
    "write -P 1 0 4k",
    "write -P 1 1M 64k",
    "write -P 0 3M 64k",
    "write -z 5M 64k",
    "write -P 7 7M 4k",
    "write -P 2 8388096 512",
];

/// Punch a hole over every zero 4 KiB block of `path` (`fallocate --dig-holes`).
pub fn dig_holes(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; 4096];
    let mut off = 0u64;
    while off + 4096 <= len {
        f.read_exact_at(&mut buf, off).unwrap();
        if buf.iter().all(|&b| b == 0) {
            use std::os::unix::io::AsRawFd;
            // SAFETY: fallocate on a descriptor we own, within the file.
            unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as i64,
                    4096,
                );
            }
        }
        off += 4096;
    }
}

fn qemu(dir: &Path, args: &[&str]) {
    let (c, _, e) = run_in(dir, "qemu-img", args);
    assert_eq!(c, 0, "qemu-img {args:?}: {e}");
}

fn written(dir: &Path, name: &str, fmt: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
    let mut a = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    a.extend([name, size]);
    qemu(dir, &a);
    // Run in `dir`: qemu resolves an external data file from the working folder.
    let mut a = vec!["-f", fmt];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(name);
    let (c, _, e) = run_in(dir, "qemu-io", &a);
    assert_eq!(c, 0, "qemu-io {a:?}: {e}");
    dir.join(name)
}

/// The images, as (path, qemu-img format name), all in `dir` (file names only are given
/// to the tools, which run in `dir`).
pub fn make_variants(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    // Every format and subformat, written by qemu-io; then again with holes dug.
    let kinds: &[(&str, &'static str, &str)] = &[
        ("raw", "raw", ""),
        ("qcow2", "qcow2", ""),
        ("v2.qcow2", "qcow2", "compat=0.10"),
        ("pm.qcow2", "qcow2", "preallocation=metadata"),
        ("fa.qcow2", "qcow2", "preallocation=falloc"),
        ("x.qcow2", "qcow2", "extended_l2=on"),
        ("c4k.qcow2", "qcow2", "cluster_size=4k"),
        ("vpc", "vpc", ""),
        ("fixed.vpc", "vpc", "subformat=fixed"),
        ("vdi", "vdi", ""),
        ("static.vdi", "vdi", "static=on"),
        ("vmdk", "vmdk", ""),
        ("zg.vmdk", "vmdk", "zeroed_grain=on"),
        ("flat.vmdk", "vmdk", "subformat=monolithicFlat"),
        ("split.vmdk", "vmdk", "subformat=twoGbMaxExtentSparse"),
        ("vhdx", "vhdx", ""),
        ("fixed.vhdx", "vhdx", "subformat=fixed"),
        ("qed", "qed", ""),
        ("qcow", "qcow", ""),
    ];
    for holes in [false, true] {
        for (suffix, fmt, opts) in kinds {
            let name = format!("{}w.{suffix}", if holes { "h" } else { "" });
            let p = written(dir, &name, fmt, opts, "8M", PATTERN);
            if holes {
                let stem = name.trim_end_matches(".vmdk");
                for f in std::fs::read_dir(dir).unwrap() {
                    let f = f.unwrap().path();
                    let n = f.file_name().unwrap().to_str().unwrap().to_string();
                    if n == name || (n.starts_with(&format!("{stem}-")) && n.ends_with(".vmdk")) {
                        dig_holes(&f);
                    }
                }
            }
            out.push((p, *fmt));
        }
    }
    // Conversions of the raw image: by qemu-img (no holes) and by us (holes).
    let conversions: &[(&str, &'static str, &[&str])] = &[
        ("qcow2", "qcow2", &[]),
        ("cc.qcow2", "qcow2", &["-c"]),
        ("vpc", "vpc", &[]),
        ("fixed.vpc", "vpc", &["-o", "subformat=fixed"]),
        ("vdi", "vdi", &[]),
        ("static.vdi", "vdi", &["-o", "static=on"]),
        ("vmdk", "vmdk", &[]),
        ("so.vmdk", "vmdk", &["-o", "subformat=streamOptimized"]),
        ("vhdx", "vhdx", &[]),
    ];
    for (suffix, fmt, extra) in conversions {
        for (tool, prefix) in [("qemu-img", "q"), (diskconv(), "d")] {
            let name = format!("{prefix}c.{suffix}");
            let mut a = vec!["convert", "-f", "raw", "-O", fmt];
            a.extend_from_slice(extra);
            a.extend(["w.raw", name.as_str()]);
            let (c, _, e) = run_in(dir, tool, &a);
            assert_eq!(c, 0, "{tool} {a:?}: {e}");
            out.push((dir.join(&name), *fmt));
        }
    }
    // Backing chains.
    written(
        dir,
        "base4.qcow2",
        "qcow2",
        "",
        "4M",
        &["write -P 3 0 128k", "write -P 4 3M 64k", "write -z 2M 64k"],
    );
    let top = written(
        dir,
        "top8.qcow2",
        "qcow2",
        "backing_file=base4.qcow2,backing_fmt=qcow2",
        "8M",
        &[
            "write -P 5 64k 64k",
            "write -z 3M 64k",
            "write -P 6 5M 64k",
            "write -z 6M 64k",
        ],
    );
    out.push((top, "qcow2"));
    written(
        dir,
        "base.raw",
        "raw",
        "",
        "8M",
        &["write -P 1 1M 1M", "write -P 2 6M 4k"],
    );
    written(
        dir,
        "mid.qcow2",
        "qcow2",
        "backing_file=base.raw,backing_fmt=raw",
        "8M",
        &["write -P 7 1536k 64k", "write -z 6M 64k"],
    );
    let top3 = written(
        dir,
        "top3.qcow2",
        "qcow2",
        "backing_file=mid.qcow2,backing_fmt=qcow2",
        "8M",
        &["write -P 8 1M 4k"],
    );
    out.push((top3, "qcow2"));
    let xl2 = written(
        dir,
        "xl2.qcow2",
        "qcow2",
        "extended_l2=on,backing_file=base.raw,backing_fmt=raw",
        "8M",
        &["write -P 8 1M 4k", "write -P 8 7M 4k", "write -z 1100k 8k"],
    );
    out.push((xl2, "qcow2"));
    written(
        dir,
        "vbase.vmdk",
        "vmdk",
        "",
        "4M",
        &["write -P 1 1M 64k", "write -P 0 3M 64k"],
    );
    let child = written(
        dir,
        "vchild.vmdk",
        "vmdk",
        "backing_file=vbase.vmdk,backing_fmt=vmdk",
        "8M",
        &["write -P 2 1M 4k", "write -P 2 5M 4k"],
    );
    out.push((child, "vmdk"));
    for (name, fmt) in [("q8.qed", "qed"), ("q8.qcow", "qcow")] {
        let p = written(
            dir,
            name,
            fmt,
            "backing_file=base4.qcow2,backing_fmt=qcow2",
            "8M",
            &["write -P 1 5M 4k", "write -P 1 64k 4k"],
        );
        out.push((p, fmt));
    }
    for (name, opts) in [
        ("df.qcow2", "data_file=df.data"),
        ("dfr.qcow2", "data_file=dfr.data,data_file_raw=on"),
    ] {
        let p = written(
            dir,
            name,
            "qcow2",
            opts,
            "8M",
            &["write -P 1 1M 64k", "write -z 3M 64k"],
        );
        out.push((p, "qcow2"));
    }
    // Persistent bitmaps (counted by measure).
    let bm = written(dir, "bm.qcow2", "qcow2", "", "8M", &["write -P 1 1M 64k"]);
    qemu(dir, &["bitmap", "--add", "-g", "64k", "bm.qcow2", "first"]);
    qemu(
        dir,
        &[
            "bitmap",
            "--add",
            "-g",
            "4k",
            "bm.qcow2",
            "a-longer-bitmap-name",
        ],
    );
    qemu(dir, &["bitmap", "--add", "--disable", "bm.qcow2", "off"]);
    out.push((bm, "qcow2"));
    // Sparse images past qemu-img map's 1 GiB probe.
    let far = [
        "write -P 1 0 4k",
        "write -P 2 1073737728 8k",
        "write -P 3 2G 1M",
    ];
    out.push((written(dir, "big.vdi", "vdi", "", "2560M", &far), "vdi"));
    out.push((written(dir, "big.raw", "raw", "", "2560M", &far), "raw"));
    out
}
