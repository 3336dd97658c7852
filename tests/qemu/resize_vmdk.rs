//! vmdk resize in place: monolithicSparse grow (inside a grain table, with new grain
//! tables, and with both grain directories moved) and shrink, on images qemu-img, qemu-io
//! and our writer made, judged by qemu-img check, info and compare, our reader, and the
//! redundant directory's consistency; the fault sweep; streamOptimized, flat, split and
//! delta disks and bad sizes refused.
use crate::common;
use common::resize::*;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use diskconv::formats::vmdk::descriptor::Descriptor;
use diskconv::formats::vmdk::sparse::SparseHeader;
use diskconv::{ErrorKind, Format, MappingKind, Preallocation, ResizeOptions};

const MIB: u64 = 1 << 20;
const FMT: Format = Format::Vmdk;

/// The grain directory and its redundant copy name tables of identical content (for the
/// grains inside the capacity: entries past it are never read), and the descriptor's
/// extent line and geometry match the header's capacity.
fn assert_tables_consistent(img: &Path) {
    let b = std::fs::read(img).unwrap();
    let h = SparseHeader::parse(&b[..512]).unwrap();
    let entries = h.gd_entries().unwrap() as usize;
    let dir = |at: u64| -> Vec<u32> {
        (0..entries)
            .map(|i| {
                let o = (at * 512) as usize + 4 * i;
                u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
            })
            .collect()
    };
    let (gd, rgd) = (dir(h.gd_offset), dir(h.rgd_offset));
    for (i, (&a, &r)) in gd.iter().zip(&rgd).enumerate() {
        assert_eq!(a == 0, r == 0, "{}: directory entry {i}", img.display());
        if a != 0 {
            let grains = h.capacity.div_ceil(h.grain_size) as usize;
            let n = (grains - i * 512).min(512) * 4;
            let t = |s: u32| &b[(s as usize) * 512..(s as usize) * 512 + n];
            assert!(
                t(a) == t(r),
                "{}: grain table {i} differs from its copy",
                img.display()
            );
        }
    }
    let d = Descriptor::parse(
        &b[(h.desc_offset * 512) as usize..((h.desc_offset + h.desc_size) * 512) as usize],
    )
    .unwrap();
    assert_eq!(
        d.total_sectors().unwrap(),
        h.capacity,
        "{}: descriptor extent",
        img.display()
    );
    let heads: u64 = d.ddb("geometry.heads").unwrap().parse().unwrap();
    let cyl: u64 = d.ddb("geometry.cylinders").unwrap().parse().unwrap();
    assert_eq!(
        cyl,
        h.capacity / (heads * 63),
        "{}: ddb.geometry.cylinders",
        img.display()
    );
}

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
    assert_qemu_check_clean(img, FMT);
    assert_qemu_identical(img, FMT, &e.raw, Format::Raw);
    assert_tables_consistent(img);
}

fn sources(dir: &Path, raw: &Path) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for (name, o) in [
        ("qemu", "subformat=monolithicSparse"),
        ("qemu-zeroed", "zeroed_grain=on"),
        ("qemu-lsilogic", "adapter_type=lsilogic,hwversion=7"),
    ] {
        let p = dir.join(format!("{name}.vmdk"));
        qemu_img(&["convert", "-f", "raw", "-O", "vmdk", "-o", o, s(raw), s(&p)]);
        v.push((name.to_string(), p));
    }
    let p = dir.join("qemu-io.vmdk");
    let size = std::fs::metadata(raw).unwrap().len();
    qemu_img(&["create", "-q", "-f", "vmdk", s(&p), &size.to_string()]);
    let data = std::fs::read(raw).unwrap();
    let tmp = dir.join("chunk");
    for b in (0..size.div_ceil(MIB)).rev() {
        let end = ((b + 1) * MIB).min(size);
        let chunk = &data[(b * MIB) as usize..end as usize];
        if chunk.iter().any(|&x| x != 0) {
            std::fs::write(&tmp, chunk).unwrap();
            let cmd = format!("write -s {} {} {}", s(&tmp), b * MIB, chunk.len());
            run(&["qemu-io", "-f", "vmdk", "-c", &cmd, s(&p)]);
        }
    }
    v.push(("qemu-io-reversed".to_string(), p));
    for (name, o) in [
        ("ours", vec![]),
        ("ours-zeroed", vec![("zeroed_grain", "on")]),
    ] {
        let p = dir.join(format!("{name}.vmdk"));
        convert(raw, &p, FMT, &o, false);
        v.push((name.to_string(), p));
    }
    v
}

fn assert_unallocated(img: &Path, from: u64, to: u64) {
    let dev = open_as(img, FMT);
    let mut off = from;
    while off < to {
        let m = dev.map(off, to - off).unwrap();
        assert!(m.is_zero(), "data at {off:#x} of {}", img.display());
        assert_ne!(
            m.kind,
            MappingKind::Zero,
            "zeroed (not unallocated) at {off:#x}"
        );
        off += m.len;
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn grow_and_shrink_round_trips() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    // The last MiB is partial: 7 MiB + 12 KiB ends inside a 64 KiB grain.
    guest(&raw, 7 * MIB + 12288, &[0, 1, 3, 7], 5);
    for (name, img) in sources(dir.path(), &raw) {
        let d = |s: &str| dir.path().join(format!("{name}.{s}"));
        let mut e = qemu_guest(&img, FMT, d("0.raw"));
        let steps: &[u64] = &[
            // Inside the first grain table's 32 MiB.
            20 * MIB + 512,
            // New grain tables, the directories' sector still has room.
            100 * MIB,
            3 * MIB + 4096,
            // Stale grains past 3 MiB + 4 KiB must not come back.
            11 * MIB,
            // More than 128 tables: both directories move to the end.
            5 << 30,
            2 * MIB,
        ];
        for (k, &size) in steps.iter().enumerate() {
            let next = e.resized(size, d(&format!("{}.raw", k + 1)));
            diskconv::resize(&img, size, &resize_opts(FMT, true))
                .unwrap_or_else(|err| panic!("{name}: resize to {size}: {err}"));
            assert_image_is(&img, &next);
            if size > e.size {
                assert_unallocated(&img, e.size.next_multiple_of(MIB).min(size), size);
            }
            e = next;
        }
        // qemu can write into space we added (its grain tables exist).
        let p = dir.path().join("w.vmdk");
        std::fs::copy(&img, &p).unwrap();
        diskconv::resize(&p, 3 << 30, &resize_opts(FMT, false)).unwrap();
        run(&[
            "qemu-io",
            "-f",
            "vmdk",
            "-c",
            "write -P 0x5a 2500M 64k",
            s(&p),
        ]);
        assert_qemu_check_clean(&p, FMT);
        let dev = open_as(&p, FMT);
        let mut b = vec![0u8; 65536];
        dev.read_at(&mut b, 2500 * MIB).unwrap();
        assert!(
            b.iter().all(|&x| x == 0x5a),
            "{name}: qemu's write after our grow"
        );
    }
}

fn sweep(src: &Path, before: &Expect, new_size: u64, dir: &Path, tag: &str) -> u64 {
    let after = before.resized(new_size, dir.join(format!("{tag}.after.raw")));
    let img = dir.join(format!("{tag}.vmdk"));
    let mut n = 1;
    loop {
        std::fs::copy(src, &img).unwrap();
        let fo = ResizeOptions {
            fail_at_write: Some(n),
            ..resize_opts(FMT, true)
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
            }
        }
        n += 1;
        assert!(n < 100, "{tag}: the hook never stopped failing");
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn a_failure_at_any_write_leaves_before_or_after() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    guest(&raw, 7 * MIB + 12288, &[0, 1, 3, 7], 5);
    let srcs = sources(dir.path(), &raw);
    let mut counts = Vec::new();
    for (name, img) in srcs
        .iter()
        .filter(|(n, _)| n == "qemu" || n == "ours-zeroed")
    {
        let before = qemu_guest(img, FMT, dir.path().join(format!("{name}.before.raw")));
        // A shrink, then a grow over the grains it left: the stale-grain clearing runs.
        let shrunk = dir.path().join(format!("{name}.shrunk.vmdk"));
        std::fs::copy(img, &shrunk).unwrap();
        diskconv::resize(&shrunk, 3 * MIB + 4096, &resize_opts(FMT, true)).unwrap();
        let shrunk_e = before.resized(3 * MIB + 4096, dir.path().join(format!("{name}.s.raw")));
        let t = |s: &str| format!("{name}-{s}");
        counts.push(sweep(
            img,
            &before,
            3 * MIB + 4096,
            dir.path(),
            &t("shrink"),
        ));
        counts.push(sweep(&shrunk, &shrunk_e, 20 * MIB, dir.path(), &t("stale")));
        counts.push(sweep(img, &before, 100 * MIB, dir.path(), &t("tables")));
        counts.push(sweep(img, &before, 5 << 30, dir.path(), &t("move-gd")));
    }
    assert!(
        counts.iter().all(|&c| c >= 2),
        "writes per resize: {counts:?}"
    );
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn other_subformats_and_bad_sizes_are_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    guest(&raw, 3 * MIB, &[0, 2], 5);
    for (sub, what) in [
        ("streamOptimized", "streamOptimized"),
        ("monolithicFlat", "monolithicFlat"),
        ("twoGbMaxExtentSparse", "twoGbMaxExtentSparse"),
        ("twoGbMaxExtentFlat", "twoGbMaxExtentFlat"),
    ] {
        let p = dir.path().join(format!("{sub}.vmdk"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&raw),
            s(&p),
        ]);
        let before = std::fs::read(&p).unwrap();
        let e = diskconv::resize(&p, 8 * MIB, &resize_opts(FMT, false)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{sub}: {e}");
        let m = e.to_string();
        assert!(
            m.contains(what) && m.contains("ConvertOptions::target_size"),
            "{sub}: {m}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }
    // A delta disk.
    let base = dir.path().join("base.vmdk");
    convert(&raw, &base, FMT, &[], false);
    let child = dir.path().join("child.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        s(&base),
        "-F",
        "vmdk",
        s(&child),
    ]);
    let e = diskconv::resize(&child, 8 * MIB, &resize_opts(FMT, false)).unwrap_err();
    assert!(e.to_string().contains("delta"), "{e}");

    let before = std::fs::read(&base).unwrap();
    let cases: &[(u64, ResizeOptions, &str)] = &[
        (4 * MIB + 1, resize_opts(FMT, false), "multiple of 512"),
        (0, resize_opts(FMT, false), "positive"),
        (MIB, resize_opts(FMT, false), "ResizeOptions::shrink"),
        (2 << 40, resize_opts(FMT, false), "maximum"),
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
        let e = diskconv::resize(&base, *size, o).unwrap_err();
        assert!(e.to_string().contains(what), "{size}: {e}");
        assert_eq!(
            std::fs::read(&base).unwrap(),
            before,
            "{size} changed the file"
        );
    }
    // A grain directory entry past the end of the file.
    let b = std::fs::read(&base).unwrap();
    let h = SparseHeader::parse(&b[..512]).unwrap();
    let bad = dir.path().join("bad.vmdk");
    let mut c = b.clone();
    let at = (h.gd_offset * 512) as usize;
    c[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&bad, &c).unwrap();
    assert!(diskconv::resize(&bad, 8 * MIB, &resize_opts(FMT, false)).is_err());
    assert_eq!(std::fs::read(&bad).unwrap(), c);
    // In use.
    let holder = std::fs::File::open(&base).unwrap();
    use std::os::unix::io::AsRawFd;
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    let e = diskconv::resize(&base, 8 * MIB, &resize_opts(FMT, false)).unwrap_err();
    assert!(e.to_string().contains("lock"), "{e}");
    assert_eq!(std::fs::read(&base).unwrap(), before);
}
