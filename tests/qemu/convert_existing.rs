//! `convert -n` into an existing image of every format we write, judged by qemu-img: the
//! targets are made by `qemu-img create` in many options (and often filled with junk by
//! qemu-io first), written by `diskconv convert -n`, then `qemu-img check` must find them
//! clean, their first SRC-size bytes must be SRC's (`qemu-img compare` where the sizes
//! match), the bytes past SRC must keep their content, and `qemu-img info` must show the
//! options unchanged. Refusals (a smaller target, streamOptimized) leave the file byte for
//! byte as it was; and a failure at any write leaves an image qemu-img accepts (at most
//! leaked clusters) whose every byte is the old or the new one.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::discard::qemu_check;
use common::*;
use diskconv::{ConvertOptions, Format};

/// The source: 6 MiB + 4 KiB (a last partial cluster for every cluster size above 4 KiB)
/// mixing holes, random data, written zeros and text.
const SRC_SIZE: u64 = (6 << 20) + 4096;
/// Targets larger than the source.
const BIG: u64 = 16 << 20;
/// The junk qemu-io writes over a whole target before the conversion.
const JUNK: u8 = 0x5a;

fn source(dir: &Path) -> PathBuf {
    let p = dir.join("src.raw");
    make_raw(&p, SRC_SIZE, 11);
    // Data in the last bytes too, so the last partial cluster holds data.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.write_all_at(&[0xc3; 1000], SRC_SIZE - 1000).unwrap();
    p
}

/// `diskconv ARGS`: (exit code, stderr).
fn diskconv(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn create(fmt: &str, opts: &str, img: &Path, size: u64) {
    let size = size.to_string();
    let mut a = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    a.extend([s(img), size.as_str()]);
    qemu_img(&a);
}

fn junk(fmt: &str, img: &Path, size: u64) {
    run(&[
        "qemu-io",
        "-f",
        fmt,
        "-c",
        &format!("write -P {JUNK:#x} 0 {size}"),
        s(img),
    ]);
}

/// The guest bytes qemu-img reads from `img`.
fn guest(fmt: &str, img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("guest.raw");
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(img), s(&raw)]);
    let b = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    b
}

/// What `qemu-img info` says of the options a conversion must not change.
fn options(fmt: &str, img: &Path) -> serde_json::Value {
    let mut v = qemu_info(img, Format::from_name(fmt).unwrap());
    let o = v.as_object_mut().unwrap();
    for k in ["actual-size", "dirty-flag", "filename", "children"] {
        o.remove(k);
    }
    // The VHDX/VMDK CIDs and GUIDs are identities, not options; keep the rest.
    if let Some(d) = o
        .get_mut("format-specific")
        .and_then(|f| f.get_mut("data"))
        .and_then(|d| d.as_object_mut())
    {
        d.remove("cid");
        d.remove("parent-cid");
    }
    v
}

#[track_caller]
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        panic!(
            "{what}: byte {i:#x} is {:#04x}, expected {:#04x}",
            got[i], want[i]
        );
    }
}

struct Case {
    fmt: &'static str,
    opts: &'static str,
    junk: bool,
}

const CASES: &[Case] = &[
    Case {
        fmt: "qcow2",
        opts: "cluster_size=4096",
        junk: true,
    },
    Case {
        fmt: "qcow2",
        opts: "cluster_size=65536",
        junk: false,
    },
    Case {
        fmt: "qcow2",
        opts: "cluster_size=2M",
        junk: true,
    },
    Case {
        fmt: "qcow2",
        opts: "compat=0.10",
        junk: true,
    },
    Case {
        fmt: "qcow2",
        opts: "compat=0.10,cluster_size=4096",
        junk: false,
    },
    Case {
        fmt: "qcow2",
        opts: "preallocation=metadata",
        junk: true,
    },
    Case {
        fmt: "qcow2",
        opts: "preallocation=full",
        junk: false,
    },
    Case {
        fmt: "qcow2",
        opts: "compat=0.10,preallocation=metadata",
        junk: false,
    },
    Case {
        fmt: "qcow2",
        opts: "compat=0.10,preallocation=full",
        junk: true,
    },
    Case {
        fmt: "qcow2",
        opts: "cluster_size=2M,preallocation=metadata",
        junk: true,
    },
    Case {
        fmt: "qcow2",
        opts: "extended_l2=on",
        junk: true,
    },
    Case {
        fmt: "qcow2",
        opts: "refcount_bits=1",
        junk: true,
    },
    Case {
        fmt: "vpc",
        opts: "subformat=dynamic",
        junk: true,
    },
    Case {
        fmt: "vpc",
        opts: "subformat=dynamic",
        junk: false,
    },
    Case {
        fmt: "vpc",
        opts: "subformat=fixed",
        junk: true,
    },
    Case {
        fmt: "vdi",
        opts: "static=off",
        junk: true,
    },
    Case {
        fmt: "vdi",
        opts: "static=off",
        junk: false,
    },
    Case {
        fmt: "vdi",
        opts: "static=on",
        junk: true,
    },
    Case {
        fmt: "vmdk",
        opts: "subformat=monolithicSparse",
        junk: true,
    },
    Case {
        fmt: "vmdk",
        opts: "subformat=monolithicSparse,zeroed_grain=on",
        junk: false,
    },
    Case {
        fmt: "vhdx",
        opts: "subformat=dynamic",
        junk: true,
    },
    Case {
        fmt: "vhdx",
        opts: "subformat=dynamic,block_size=1M",
        junk: false,
    },
    Case {
        fmt: "vhdx",
        opts: "subformat=fixed",
        junk: true,
    },
];

/// Every case into a target larger than the source: the prefix is SRC, the tail keeps
/// what it held (junk, or zeros), the image is clean and its options unchanged.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn writes_into_every_format_and_option_keeping_the_tail_and_the_options() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let _guard = hang_guard("convert -n matrix");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let want = std::fs::read(&src).unwrap();
    for c in CASES {
        let what = format!("{} {} junk={}", c.fmt, c.opts, c.junk);
        let img = d.join(format!("t.{}", c.fmt));
        let _ = std::fs::remove_file(&img);
        create(c.fmt, c.opts, &img, BIG);
        let vsize = qemu_info(&img, Format::from_name(c.fmt).unwrap())["virtual-size"]
            .as_u64()
            .unwrap();
        if c.junk {
            junk(c.fmt, &img, vsize);
        }
        let before = guest(c.fmt, &img, d);
        let opts_before = options(c.fmt, &img);
        let (code, err) = diskconv(&["convert", "-n", "-O", c.fmt, s(&src), s(&img)]);
        assert_eq!(code, 0, "{what}: {err}");
        if c.fmt != "vpc" {
            let (corrupt, leaks) = qemu_check(&img, c.fmt);
            assert_eq!((corrupt, leaks), (0, 0), "{what}: qemu-img check");
        }
        let after = guest(c.fmt, &img, d);
        assert_bytes(
            &after[..SRC_SIZE as usize],
            &want,
            &format!("{what}: prefix"),
        );
        assert_bytes(
            &after[SRC_SIZE as usize..],
            &before[SRC_SIZE as usize..],
            &format!("{what}: tail"),
        );
        if !c.junk {
            // The tail read as zeros: qemu-img compare judges the whole image.
            qemu_img(&["compare", "-f", "raw", "-F", c.fmt, s(&src), s(&img)]);
        }
        assert_eq!(options(c.fmt, &img), opts_before, "{what}: qemu-img info");
        // Our own reader agrees with qemu-img.
        assert_reads_like_qemu(&img, Format::from_name(c.fmt).unwrap(), d);
    }
}

/// Targets exactly the source's size: `qemu-img compare` says identical, over junk.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn a_target_of_the_same_size_compares_identical() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    for (fmt, opts) in [
        ("qcow2", "cluster_size=2M"),
        ("qcow2", "compat=0.10,preallocation=full"),
        ("vdi", "static=on"),
        ("vmdk", ""),
        ("vhdx", "subformat=fixed"),
    ] {
        let img = d.join(format!("same.{fmt}"));
        let _ = std::fs::remove_file(&img);
        create(fmt, opts, &img, SRC_SIZE);
        junk(fmt, &img, SRC_SIZE);
        let (code, err) = diskconv(&["convert", "-n", "-O", fmt, s(&src), s(&img)]);
        assert_eq!(code, 0, "{fmt} {opts}: {err}");
        qemu_img(&["compare", "-f", "raw", "-F", fmt, s(&src), s(&img)]);
        if fmt != "vpc" {
            assert_eq!(qemu_check(&img, fmt), (0, 0), "{fmt} {opts}");
        }
    }
}

/// A monolithicFlat VMDK: the flat extent its descriptor names is written, through the
/// reference gate (refused without --allow-references, untouched), the descriptor kept.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn a_monolithic_flat_vmdk_is_written_through_the_reference_gate() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let want = std::fs::read(&src).unwrap();
    let img = d.join("flat.vmdk");
    let extent = d.join("flat-flat.vmdk");
    create("vmdk", "subformat=monolithicFlat", &img, BIG);
    junk("vmdk", &img, BIG);
    let (desc, data) = (sha256_file(&img), sha256_file(&extent));
    let (code, err) = diskconv(&["convert", "-n", "-O", "vmdk", s(&src), s(&img)]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--allow-references"), "{err}");
    assert_eq!(
        (sha256_file(&img), sha256_file(&extent)),
        (desc.clone(), data)
    );
    let opts_before = options("vmdk", &img);
    let (code, err) = diskconv(&[
        "convert",
        "-n",
        "--allow-references",
        "-O",
        "vmdk",
        s(&src),
        s(&img),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(sha256_file(&img), desc, "the descriptor changed");
    assert_eq!(qemu_check(&img, "vmdk"), (0, 0));
    let after = guest("vmdk", &img, d);
    assert_bytes(&after[..SRC_SIZE as usize], &want, "flat prefix");
    assert!(
        after[SRC_SIZE as usize..].iter().all(|&b| b == JUNK),
        "flat tail"
    );
    assert_eq!(options("vmdk", &img), opts_before);
}

/// A qcow2 overlay: ranges zero in the source must hide the backing file's data (zero
/// flags in v3, stored zeros in v2), and the backing file name stays.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn an_overlay_keeps_its_backing_file_and_hides_its_data() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let base = d.join("base.qcow2");
    create("qcow2", "", &base, BIG);
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x77 0 16M",
        s(&base),
    ]);
    for compat in ["1.1", "0.10"] {
        for cs in ["65536", "4096"] {
            let img = d.join("overlay.qcow2");
            let _ = std::fs::remove_file(&img);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat},cluster_size={cs}"),
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                s(&img),
                &BIG.to_string(),
            ]);
            junk("qcow2", &img, 1 << 20);
            let opts_before = options("qcow2", &img);
            let sum = sha256_file(&img);
            // The last cluster is filled only in part and the backing file supplies the
            // rest: read only when referenced files may be opened.
            if !SRC_SIZE.is_multiple_of(cs.parse::<u64>().unwrap()) {
                let (code, err) = diskconv(&["convert", "-n", "-O", "qcow2", s(&src), s(&img)]);
                assert_eq!(code, 1, "compat {compat} cluster {cs}: {err}");
                assert!(err.contains("--allow-references"), "{err}");
                assert_eq!(
                    sha256_file(&img),
                    sum,
                    "compat {compat}: refused, yet changed"
                );
            }
            let (code, err) = diskconv(&[
                "convert",
                "-n",
                "--allow-references",
                "-O",
                "qcow2",
                s(&src),
                s(&img),
            ]);
            assert_eq!(code, 0, "compat {compat}: {err}");
            assert_eq!(qemu_check(&img, "qcow2"), (0, 0), "compat {compat}");
            let after = guest("qcow2", &img, d);
            let want = std::fs::read(&src).unwrap();
            assert_bytes(&after[..SRC_SIZE as usize], &want, "overlay prefix");
            assert!(
                after[SRC_SIZE as usize..].iter().all(|&b| b == 0x77),
                "compat {compat}: the tail still reads the backing file"
            );
            let info = options("qcow2", &img);
            assert_eq!(info, opts_before, "compat {compat}");
            assert_eq!(info["backing-filename"], "base.qcow2");
        }
    }
}

/// A target smaller than the source is refused with qemu-img's words, exit 1, before
/// anything is written.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn a_smaller_target_is_refused_untouched() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    for (fmt, opts) in [
        ("qcow2", ""),
        ("qcow2", "compat=0.10"),
        ("vpc", "subformat=dynamic"),
        ("vpc", "subformat=fixed"),
        ("vdi", ""),
        ("vmdk", ""),
        ("vhdx", ""),
        ("raw", ""),
    ] {
        let img = d.join(format!("small.{fmt}"));
        let _ = std::fs::remove_file(&img);
        create(fmt, opts, &img, 4 << 20);
        junk(fmt, &img, 4 << 20);
        let sum = sha256_file(&img);
        // qemu-img says the same.
        let q = Command::new("qemu-img")
            .args(["convert", "-n", "-O", fmt, s(&src), s(&img)])
            .output()
            .unwrap();
        assert_eq!(q.status.code(), Some(1), "qemu-img {fmt}");
        assert!(
            String::from_utf8_lossy(&q.stderr).contains("output file is smaller than input file")
        );
        assert_eq!(sha256_file(&img), sum);
        let (code, err) = diskconv(&["convert", "-n", "-O", fmt, s(&src), s(&img)]);
        assert_eq!(code, 1, "{fmt} {opts}: {err}");
        assert!(
            err.contains("output file is smaller than input file"),
            "{fmt}: {err}"
        );
        assert_eq!(sha256_file(&img), sum, "{fmt} {opts}: the target changed");
    }
}

/// streamOptimized cannot be written in place: refused with the reason, untouched (qemu-img
/// writes into an empty one and fails at the first grain it holds, after writing others).
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn stream_optimized_is_refused_untouched() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let img = d.join("so.vmdk");
    create("vmdk", "subformat=streamOptimized", &img, BIG);
    let sum = sha256_file(&img);
    let (code, err) = diskconv(&["convert", "-n", "-O", "vmdk", s(&src), s(&img)]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("streamOptimized") && err.contains("compressed"),
        "{err}"
    );
    assert_eq!(sha256_file(&img), sum);
    // Options have no effect with -n, as qemu-img says.
    let img = d.join("opt.qcow2");
    create("qcow2", "", &img, BIG);
    let sum = sha256_file(&img);
    let (code, err) = diskconv(&[
        "convert",
        "-n",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&src),
        s(&img),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no effect"), "{err}");
    assert_eq!(sha256_file(&img), sum);
    // -O names the existing image's format: another format is refused, as qemu-img does.
    for fmt in ["vpc", "vmdk", "vhdx", "qcow2"] {
        let img = d.join("other.vdi");
        let _ = std::fs::remove_file(&img);
        create("vdi", "", &img, BIG);
        let sum = sha256_file(&img);
        let (code, err) = diskconv(&["convert", "-n", "-O", fmt, s(&src), s(&img)]);
        assert_eq!(code, 1, "{fmt}: {err}");
        assert!(
            err.contains(&format!("Image is not in {fmt} format")),
            "{err}"
        );
        assert_eq!(sha256_file(&img), sum, "{fmt}");
    }
}

/// With --target-is-zero the ranges zero in the source are not written: over a fresh
/// target the result compares identical; over junk the junk shows there (proof they were
/// skipped), while data ranges are the source's.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn target_is_zero_skips_the_zero_ranges() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = source(d);
    let want = std::fs::read(&src).unwrap();
    for (fmt, opts) in [
        ("qcow2", ""),
        ("qcow2", "compat=0.10,cluster_size=4096"),
        ("vpc", "subformat=dynamic"),
        ("vdi", ""),
        ("vmdk", ""),
        ("vhdx", ""),
    ] {
        let img = d.join(format!("tz.{fmt}"));
        let _ = std::fs::remove_file(&img);
        create(fmt, opts, &img, BIG);
        let (code, err) = diskconv(&[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            fmt,
            s(&src),
            s(&img),
        ]);
        assert_eq!(code, 0, "{fmt}: {err}");
        qemu_img(&["compare", "-f", "raw", "-F", fmt, s(&src), s(&img)]);
        if fmt != "vpc" {
            assert_eq!(qemu_check(&img, fmt), (0, 0), "{fmt}");
        }
        // Over junk: the first 64 KiB-aligned all-zero range of the source keeps it.
        std::fs::remove_file(&img).unwrap();
        create(fmt, opts, &img, BIG);
        junk(fmt, &img, 4 << 20);
        let (code, err) = diskconv(&[
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            fmt,
            s(&src),
            s(&img),
        ]);
        assert_eq!(code, 0, "{fmt}: {err}");
        let got = guest(fmt, &img, d);
        let mut kept = 0;
        for (i, (g, w)) in got.iter().zip(&want).enumerate().take(4 << 20) {
            if *w != 0 {
                assert_eq!(g, w, "{fmt}: data byte {i:#x}");
            } else if *g == JUNK {
                kept += 1;
            }
        }
        assert!(kept > 0, "{fmt}: no junk left in the source's zero ranges");
    }
}

/// A failure at the Nth mutation, for every N of a small conversion: the image passes
/// `qemu-img check` (leaked clusters allowed) and each guest byte is the old or the new
/// one; once N is past the last mutation the conversion succeeds.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn a_failure_at_any_write_leaves_a_consistent_image() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let _guard = hang_guard("convert -n failure sweep");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("small-src.raw");
    make_raw(&src, (2 << 20) + 4096, 3);
    let new = std::fs::read(&src).unwrap();
    let base = d.join("base.qcow2");
    create("qcow2", "", &base, 4 << 20);
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x77 0 4M",
        s(&base),
    ]);
    let cases: &[(&str, &str, bool)] = &[
        ("qcow2", "cluster_size=4096", false),
        ("qcow2", "compat=0.10,cluster_size=4096", false),
        ("qcow2", "cluster_size=65536", true),
        ("qcow2", "compat=0.10,cluster_size=65536", true),
        ("vpc", "subformat=dynamic", false),
        ("vpc", "subformat=fixed", false),
        ("vdi", "", false),
        ("vdi", "static=on", false),
        ("vmdk", "", false),
        ("vhdx", "block_size=1M", false),
        ("vhdx", "subformat=fixed,block_size=1M", false),
    ];
    for &(fmt, opts, backing) in cases {
        let what = format!("{fmt} {opts} backing={backing}");
        let f = Format::from_name(fmt).unwrap();
        let orig = d.join(format!("orig.{fmt}"));
        let _ = std::fs::remove_file(&orig);
        if backing {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                s(&orig),
                "4M",
            ]);
            // Some clusters stored (junk), the rest reading the backing file.
            junk(fmt, &orig, 1 << 19);
        } else {
            create(fmt, opts, &orig, 4 << 20);
            // Junk over the first MiB: stored blocks to overwrite, unallocated ones after.
            junk(fmt, &orig, 1 << 20);
        }
        let old = guest(fmt, &orig, d);
        let work = d.join(format!("work.{fmt}"));
        let mut n = 1;
        loop {
            std::fs::copy(&orig, &work).unwrap();
            let mut o = ConvertOptions::new(f);
            o.existing_target = true;
            o.fail_at_write = Some(n);
            o.open = diskconv::OpenOptions::new()
                .format(Format::Raw)
                .allow_references(true, None);
            let r = diskconv::convert(&src, &work, &o);
            if fmt != "vpc" {
                let (corrupt, _leaks) = qemu_check(&work, fmt);
                assert_eq!(corrupt, 0, "{what}: failing write {n}");
            }
            let got = guest(fmt, &work, d);
            assert_eq!(got.len(), old.len(), "{what}: write {n}");
            for (i, &g) in got.iter().enumerate() {
                let ok = g == old[i] || new.get(i).is_some_and(|&v| v == g);
                assert!(
                    ok,
                    "{what}: failing write {n}: byte {i:#x} is {g:#04x}, neither old {:#04x} nor new {:?}",
                    old[i],
                    new.get(i)
                );
            }
            // Our reader opens it and agrees.
            if !backing {
                assert_reads_like_qemu(&work, f, d);
            }
            match r {
                Ok(_) => {
                    assert_bytes(&got[..new.len()], &new, &format!("{what}: done"));
                    assert_bytes(
                        &got[new.len()..],
                        &old[new.len()..],
                        &format!("{what}: tail"),
                    );
                    if fmt != "vpc" {
                        assert_eq!(qemu_check(&work, fmt), (0, 0), "{what}: done");
                    }
                    break;
                }
                Err(e) => assert!(e.to_string().contains("test hook"), "{what}: {e}"),
            }
            n += 1;
            assert!(n < 2000, "{what}: the hook never stopped failing");
        }
        eprintln!("{what}: {n} runs");
        assert!(n > 3, "{what}: too few writes to prove anything");
    }
}
