//! vhd (vpc) resize in place: fixed and dynamic, grow (with and without moving blocks out
//! of a growing BAT's way) and shrink, on images qemu-img (CHS-sized and force_size),
//! qemu-io and our writer made and on the corpus' Hyper-V, Virtual PC and Disk2VHD disks.
//! qemu-img has no vpc check, so every state is judged by qemu-img info's size and
//! `qemu-img compare` / `convert -O raw` content, and by our reader. The fault sweep fails
//! every write in turn; bad sizes, differencing disks and locked images are refused.
use crate::common;
use common::resize::*;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use diskconv::formats::vhd::footer::{DiskType, Footer};
use diskconv::{ErrorKind, Format, Preallocation, ResizeOptions};

const MIB: u64 = 1 << 20;
const FMT: Format = Format::Vhd;

/// Our reading and qemu's of `img` both equal `e`, and qemu-img info reports its size.
/// Guests over 1 GiB (the corpus' 127 GiB disks) are compared by qemu-img compare and our
/// map instead of hashing every zero.
fn assert_image_is(img: &Path, e: &Expect) {
    let dev = open_as(img, FMT);
    assert_eq!(
        dev.virtual_size(),
        e.size,
        "our virtual size of {}",
        img.display()
    );
    if e.size <= HASHED {
        assert_eq!(
            sha256_device(dev.as_ref()),
            e.sha,
            "our read of {}",
            img.display()
        );
    } else {
        // Every range we map as data must hold what the expected raw holds there.
        let f = std::fs::File::open(&e.raw).unwrap();
        let mut off = 0;
        while off < e.size {
            let m = dev.map(off, e.size - off).unwrap();
            if !m.is_zero() {
                let n = m.len.min(64 * MIB) as usize;
                let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
                dev.read_at(&mut a, off).unwrap();
                f.read_exact_at(&mut b, off).unwrap();
                assert!(a == b, "our read of {} at {off:#x}", img.display());
                off += n as u64;
                continue;
            }
            off += m.len;
        }
    }
    assert_eq!(qemu_info(img, FMT)["virtual-size"].as_u64(), Some(e.size));
    assert_qemu_identical(img, FMT, &e.raw, Format::Raw);
}

/// Images of the guest in `raw`: qemu-img fixed and dynamic, each CHS-sized and with
/// force_size; a dynamic one qemu-io wrote back to front (its blocks out of guest order);
/// ours fixed, dynamic, and dynamic with 64 KiB blocks (whose BAT fills up fast).
fn sources(dir: &Path, raw: &Path) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for (name, o) in [
        ("qemu-fixed", "subformat=fixed"),
        ("qemu-fixed-force", "subformat=fixed,force_size=on"),
        ("qemu-dyn", "subformat=dynamic"),
        ("qemu-dyn-force", "subformat=dynamic,force_size=on"),
    ] {
        let p = dir.join(format!("{name}.vhd"));
        qemu_img(&["convert", "-f", "raw", "-O", "vpc", "-o", o, s(raw), s(&p)]);
        v.push((name.to_string(), p));
    }
    let p = dir.join("qemu-io.vhd");
    let size = std::fs::metadata(raw).unwrap().len();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vpc",
        "-o",
        "force_size=on",
        s(&p),
        &size.to_string(),
    ]);
    let data = std::fs::read(raw).unwrap();
    let tmp = dir.join("chunk");
    for b in (0..size.div_ceil(MIB)).rev() {
        let end = ((b + 1) * MIB).min(size);
        let chunk = &data[(b * MIB) as usize..end as usize];
        if chunk.iter().any(|&x| x != 0) {
            std::fs::write(&tmp, chunk).unwrap();
            let cmd = format!("write -s {} {} {}", s(&tmp), b * MIB, chunk.len());
            run(&["qemu-io", "-f", "vpc", "-c", &cmd, s(&p)]);
        }
    }
    v.push(("qemu-io-reversed".to_string(), p));
    for (name, o) in [
        ("ours-fixed", vec![("subformat", "fixed")]),
        ("ours-dyn", vec![("subformat", "dynamic")]),
        (
            "ours-dyn-64k",
            vec![("subformat", "dynamic"), ("block_size", "64k")],
        ),
    ] {
        let p = dir.join(format!("{name}.vhd"));
        convert(raw, &p, FMT, &o, false);
        v.push((name.to_string(), p));
    }
    v
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn grow_and_shrink_round_trips() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    guest(&raw, 7 * MIB, &[0, 1, 3, 6], 3);
    for (name, img) in sources(dir.path(), &raw) {
        let d = |s: &str| dir.path().join(format!("{name}.{s}"));
        let mut e = qemu_guest(&img, FMT, d("0.raw"));
        let dynamic = name.contains("dyn") || name.contains("io");
        let steps: &[u64] = &[
            20 * MIB + 512,
            // Past what a 2 MiB-block BAT's first sector holds: blocks move.
            300 * MIB,
            3 * MIB + 4096,
            11 * MIB,
            2 * MIB,
        ];
        for (k, &size) in steps.iter().enumerate() {
            let next = e.resized(size, d(&format!("{}.raw", k + 1)));
            diskconv::resize(&img, size, &resize_opts(FMT, true))
                .unwrap_or_else(|err| panic!("{name}: resize to {size}: {err}"));
            assert_image_is(&img, &next);
            if dynamic && size > e.size {
                assert_unallocated(&img, FMT, e.size.next_multiple_of(2 * MIB).min(size), size);
            }
            e = next;
        }
        let len = std::fs::metadata(&img).unwrap().len();
        if dynamic {
            assert!(len < 12 * MIB, "{name}: {len} bytes after the round trip");
        } else {
            assert_eq!(len, 2 * MIB + 512, "{name}");
        }
    }
}

/// Resize with a failure at each write in turn (N = 1, 2, ... until it succeeds): each
/// failure leaves an image reading exactly as before or exactly as after. Returns the
/// number of writes of the full resize.
fn sweep(
    src: &Path,
    before: &Expect,
    new_size: u64,
    dir: &Path,
    tag: &str,
    o: &ResizeOptions,
) -> u64 {
    let after = before.resized(new_size, dir.join(format!("{tag}.after.raw")));
    let img = dir.join(format!("{tag}.vhd"));
    let mut n = 1;
    loop {
        std::fs::copy(src, &img).unwrap();
        let fo = ResizeOptions {
            fail_at_write: Some(n),
            ..o.clone()
        };
        match diskconv::resize(&img, new_size, &fo) {
            Ok(()) => {
                assert_image_is(&img, &after);
                return n - 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("test hook"), "{tag} N={n}: {e}");
                let size = open_as(&img, FMT).virtual_size();
                assert_image_is(&img, if size == new_size { &after } else { before });
                // The tail footer alone (what the spec calls authoritative) must describe
                // a valid image too: check it against the head copy's view.
                tail_footer_alone_is_valid(&img, dir, before, &after);
            }
        }
        n += 1;
        assert!(n < 200, "{tag}: the hook never stopped failing");
    }
}

/// Rebuild `img` with its head footer copy replaced by the tail footer, and check it reads
/// as before or as after: a reader that trusts only the tail sees a whole image.
fn tail_footer_alone_is_valid(img: &Path, dir: &Path, before: &Expect, after: &Expect) {
    let b = std::fs::read(img).unwrap();
    let tail = &b[b.len() - 512..];
    let f = Footer::parse(tail).unwrap_or_else(|e| panic!("tail footer of {}: {e}", img.display()));
    if f.disk_type == DiskType::Fixed {
        return;
    }
    let copy = dir.join("tail-only.vhd");
    let mut c = b.clone();
    c[..512].copy_from_slice(tail);
    std::fs::write(&copy, &c).unwrap();
    let size = open_as(&copy, FMT).virtual_size();
    assert_image_is(&copy, if size == after.size { after } else { before });
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn a_failure_at_any_write_leaves_before_or_after() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    guest(&raw, 7 * MIB, &[0, 1, 3, 6], 3);
    let srcs = sources(dir.path(), &raw);
    let get = |n: &str| srcs.iter().find(|(x, _)| x == n).unwrap().1.clone();
    let o = resize_opts(FMT, true);
    let mut counts = Vec::new();
    for name in [
        "qemu-fixed",
        "ours-fixed",
        "qemu-dyn",
        "qemu-io-reversed",
        "ours-dyn-64k",
    ] {
        let img = get(name);
        let before = qemu_guest(&img, FMT, dir.path().join(format!("{name}.before.raw")));
        let t = |s: &str| format!("{name}-{s}");
        counts.push(sweep(&img, &before, 9 * MIB, dir.path(), &t("grow"), &o));
        counts.push(sweep(
            &img,
            &before,
            3 * MIB + 512,
            dir.path(),
            &t("shrink"),
            &o,
        ));
        if name == "ours-dyn-64k" {
            // 128 entries fill the BAT's first sector: 20 MiB needs more, and the first
            // data blocks move to the end of the file.
            counts.push(sweep(&img, &before, 20 * MIB, dir.path(), &t("move"), &o));
        }
        if name == "qemu-fixed" {
            let full = ResizeOptions {
                preallocation: Preallocation::Full,
                ..o.clone()
            };
            counts.push(sweep(&img, &before, 9 * MIB, dir.path(), &t("full"), &full));
        }
    }
    assert!(
        counts.iter().all(|&c| c >= 2),
        "writes per resize: {counts:?}"
    );
    assert!(
        *counts.iter().max().unwrap() >= 10,
        "the move sweep moved blocks: {counts:?}"
    );
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn corpus_vhds_resize() {
    if !have_qemu() {
        return;
    }
    let Some(corpus) = corpus_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "hyperv2012r2-dynamic.vhd.bz2",
        "virtualpc-dynamic.vhd.bz2",
        "d2v-zerofilled.vhd.bz2",
    ] {
        let img = corpus_file(&corpus, name, dir.path());
        let before = qemu_guest(&img, FMT, dir.path().join(format!("{name}.0.raw")));
        // Grow by more than the BAT's padding holds, then shrink below the original.
        for (k, size) in [before.size + 3 * 1024 * MIB, before.size / 2 + 512]
            .into_iter()
            .enumerate()
        {
            let next = before.resized(size, dir.path().join(format!("{name}.{k}.raw")));
            diskconv::resize(&img, size, &resize_opts(FMT, true))
                .unwrap_or_else(|e| panic!("{name}: resize to {size}: {e}"));
            assert_image_is(&img, &next);
        }
    }
}

#[test]
fn bad_sizes_differencing_and_locked_images_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    guest(&raw, 3 * MIB, &[0, 2], 3);
    let img = dir.path().join("a.vhd");
    convert(&raw, &img, FMT, &[], false);
    let before = std::fs::read(&img).unwrap();
    let cases: &[(u64, ResizeOptions, &str)] = &[
        (4 * MIB + 1, resize_opts(FMT, false), "multiple of 512"),
        (0, resize_opts(FMT, false), "positive"),
        (MIB, resize_opts(FMT, false), "ResizeOptions::shrink"),
        (2041 << 30, resize_opts(FMT, false), "2040 GiB"),
        (
            8 * MIB,
            ResizeOptions {
                preallocation: Preallocation::Full,
                ..resize_opts(FMT, false)
            },
            "preallocation",
        ),
    ];
    for (size, o, what) in cases {
        let e = diskconv::resize(&img, *size, o).unwrap_err();
        assert!(e.to_string().contains(what), "{size}: {e}");
        assert_eq!(
            std::fs::read(&img).unwrap(),
            before,
            "{size} changed the file"
        );
    }
    assert_eq!(
        diskconv::resize(&img, 2041 << 30, &resize_opts(FMT, false))
            .unwrap_err()
            .kind(),
        ErrorKind::LimitExceeded
    );

    // Locked by another process.
    let holder = std::fs::File::open(&img).unwrap();
    use std::os::unix::io::AsRawFd;
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    let e = diskconv::resize(&img, 4 * MIB, &resize_opts(FMT, false)).unwrap_err();
    assert!(e.to_string().contains("lock"), "{e}");
    drop(holder);
    assert_eq!(std::fs::read(&img).unwrap(), before);

    // A differencing disk: both footers say so.
    let diff = dir.path().join("diff.vhd");
    let mut b = before.clone();
    let mut f = Footer::parse(&b[..512]).unwrap();
    f.disk_type = DiskType::Differencing;
    let fb = f.to_bytes();
    let len = b.len();
    b[..512].copy_from_slice(&fb);
    b[len - 512..].copy_from_slice(&fb);
    std::fs::write(&diff, &b).unwrap();
    let e = diskconv::resize(&diff, 8 * MIB, &resize_opts(FMT, false)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(
        e.to_string().contains("differencing") && e.to_string().contains("parent"),
        "{e}"
    );
    assert_eq!(std::fs::read(&diff).unwrap(), b);

    // A BAT entry pointing into another block.
    let bad = dir.path().join("bad.vhd");
    let mut b = before.clone();
    let hdr = diskconv::formats::vhd::dynheader::DynHeader::parse(&b[512..1536]).unwrap();
    let t = hdr.table_offset as usize;
    let first = u32::from_be_bytes(b[t..t + 4].try_into().unwrap());
    b[t + 4..t + 8].copy_from_slice(&(first + 1).to_be_bytes());
    std::fs::write(&bad, &b).unwrap();
    let e = diskconv::resize(&bad, 8 * MIB, &resize_opts(FMT, false)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(std::fs::read(&bad).unwrap(), b);
}
