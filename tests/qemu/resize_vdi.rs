//! vdi resize in place: grow (with and without moving data blocks out of the block map's
//! way) and shrink round trips on images qemu-img, qemu-io and our writer made, judged by
//! qemu-img check, info and compare and by our reader; the fault sweep over every write;
//! bad sizes, bad tables and locked images refused without a write.
use crate::common;
use common::resize::*;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use diskconv::{ErrorKind, Format, ResizeOptions};

const MIB: u64 = 1 << 20;
const FMT: Format = Format::Vdi;

/// The raw a resize to `new_size` must give: the first bytes kept, the rest zeros.
fn resized_raw(from: &Path, new_size: u64, to: &Path) {
    std::fs::copy(from, to).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(to).unwrap();
    f.set_len(new_size.min(std::fs::metadata(from).unwrap().len()))
        .unwrap();
    f.set_len(new_size).unwrap();
}

/// Our reading and qemu's of `img` both equal the raw `expect`; qemu-img check is clean
/// and qemu-img info reports its size.
fn assert_image_is(img: &Path, expect: &Path) {
    let size = std::fs::metadata(expect).unwrap().len();
    let dev = open_as(img, FMT);
    assert_eq!(
        dev.virtual_size(),
        size,
        "our virtual size of {}",
        img.display()
    );
    assert_eq!(sha256_device(dev.as_ref()), sha256_file(expect), "our read");
    assert_eq!(qemu_info(img, FMT)["virtual-size"].as_u64(), Some(size));
    assert_qemu_check_clean(img, FMT);
    assert_qemu_identical(img, FMT, expect, Format::Raw);
}

/// `resize` and check the result, keeping `raw` (the expected guest) in step.
fn step(img: &Path, raw: &Path, new_size: u64) {
    let next = raw.with_extension("next");
    resized_raw(raw, new_size, &next);
    diskconv::resize(img, new_size, &resize_opts(FMT, true))
        .unwrap_or_else(|e| panic!("resize {} to {new_size}: {e}", img.display()));
    std::fs::rename(&next, raw).unwrap();
    assert_image_is(img, raw);
}

/// The images to resize: qemu-img dynamic and static, a qemu-io one whose blocks were
/// written back to front (so its block map is not in guest order), and our writer's two.
fn sources(dir: &Path, raw: &Path) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    for (name, o) in [("qemu-dyn", "static=off"), ("qemu-static", "static=on")] {
        let p = dir.join(format!("{name}.vdi"));
        qemu_img(&["convert", "-f", "raw", "-O", "vdi", "-o", o, s(raw), s(&p)]);
        v.push((name.to_string(), p));
    }
    let p = dir.join("qemu-io.vdi");
    let size = std::fs::metadata(raw).unwrap().len();
    qemu_img(&["create", "-q", "-f", "vdi", s(&p), &size.to_string()]);
    let data = std::fs::read(raw).unwrap();
    for b in (0..size.div_ceil(MIB)).rev() {
        let end = ((b + 1) * MIB).min(size);
        let chunk = &data[(b * MIB) as usize..end as usize];
        if chunk.iter().all(|&x| x == 0) {
            continue;
        }
        qemu_io_write(&p, b * MIB, chunk);
    }
    v.push(("qemu-io-reversed".to_string(), p));
    for (name, o) in [("ours-dyn", "off"), ("ours-static", "on")] {
        let p = dir.join(format!("{name}.vdi"));
        convert(raw, &p, FMT, &[("static", o)], false);
        v.push((name.to_string(), p));
    }
    v
}

/// Write `data` at `off` of the vdi `img` with qemu-io (`write -s FILE` takes the bytes
/// from a file).
fn qemu_io_write(img: &Path, off: u64, data: &[u8]) {
    let tmp = img.with_extension("chunk");
    std::fs::write(&tmp, data).unwrap();
    let cmd = format!("write -s {} {off} {}", s(&tmp), data.len());
    run(&["qemu-io", "-f", "vdi", "-c", &cmd, s(img)]);
    std::fs::remove_file(&tmp).unwrap();
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn grow_and_shrink_round_trips() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw0 = dir.path().join("guest.raw");
    // A partial last block (3.5 MiB), data in the first, second and last blocks.
    guest(&raw0, 3 * MIB + MIB / 2, &[0, 1, 3], 1);
    for (name, img) in sources(dir.path(), &raw0) {
        let raw = dir.path().join(format!("{name}.expect"));
        std::fs::copy(&raw0, &raw).unwrap();
        assert_image_is(&img, &raw);
        // Grow inside the block map's room: the new space is unallocated (dynamic).
        step(&img, &raw, 6 * MIB + 512);
        if !name.contains("static") {
            assert_unallocated(&img, FMT, 4 * MIB, 6 * MIB + 512);
        }
        // Grow past the room: the first data blocks move to the end of the file, and the
        // data area starts a whole block later.
        let data_at = |p: &Path| {
            let mut b = [0u8; 4];
            std::fs::File::open(p)
                .unwrap()
                .read_exact_at(&mut b, 0x158)
                .unwrap();
            u32::from_le_bytes(b)
        };
        let before = data_at(&img);
        step(&img, &raw, 300 * MIB);
        assert_eq!(data_at(&img), before + MIB as u32, "{name}: offset_data");
        if !name.contains("static") {
            assert_unallocated(&img, FMT, 4 * MIB, 300 * MIB);
            let len = std::fs::metadata(&img).unwrap().len();
            assert!(
                len < 6 * MIB,
                "{name}: grow allocated data: file is {len} bytes"
            );
        }
        // Shrink into the middle of a block, then grow again: the dropped tail of that
        // block must read as zeros, not as the old bytes.
        step(&img, &raw, MIB + 4096);
        step(&img, &raw, 9 * MIB);
        step(&img, &raw, 2 * MIB);
        let len = std::fs::metadata(&img).unwrap().len();
        assert!(len <= 3 * MIB + 2048, "{name}: shrink left {len} bytes");
    }
}

/// One resize that fails at each write in turn (N = 1, 2, ... until it succeeds): every
/// failure leaves the image reading exactly as before or exactly as after, clean for
/// qemu-img check. Returns how many writes the full resize took.
fn sweep(src: &Path, before_raw: &Path, new_size: u64, dir: &Path, tag: &str) -> u64 {
    let after_raw = dir.join(format!("{tag}.after.raw"));
    resized_raw(before_raw, new_size, &after_raw);
    let img = dir.join(format!("{tag}.vdi"));
    let mut n = 1;
    loop {
        std::fs::copy(src, &img).unwrap();
        let o = ResizeOptions {
            fail_at_write: Some(n),
            ..resize_opts(FMT, true)
        };
        match diskconv::resize(&img, new_size, &o) {
            Ok(()) => {
                assert_image_is(&img, &after_raw);
                return n - 1;
            }
            Err(e) => {
                assert!(e.to_string().contains("test hook"), "{tag} N={n}: {e}");
                let size = open_as(&img, FMT).virtual_size();
                let expect = if size == new_size {
                    &after_raw
                } else {
                    before_raw
                };
                assert_image_is(&img, expect);
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
    guest(&raw, 3 * MIB + MIB / 2, &[0, 1, 3], 1);
    let srcs = sources(dir.path(), &raw);
    // Our dynamic writer lays blocks out as qemu-img does; the other four differ.
    for (name, img) in srcs.iter().filter(|(n, _)| n != "ours-dyn") {
        let grow_fit = sweep(img, &raw, 8 * MIB, dir.path(), &format!("{name}-fit"));
        let grow_move = sweep(img, &raw, 140 * MIB, dir.path(), &format!("{name}-move"));
        let shrink = sweep(img, &raw, MIB + 512, dir.path(), &format!("{name}-shrink"));
        assert!(
            grow_fit >= 3 && grow_move >= 4 && shrink >= 2,
            "{name}: {grow_fit} {grow_move} {shrink}"
        );
    }
    // A static image grown with preallocation=full: the new blocks are written zeros.
    let (_, st) = srcs.iter().find(|(n, _)| n == "qemu-static").unwrap();
    let img = dir.path().join("full.vdi");
    std::fs::copy(st, &img).unwrap();
    let full = ResizeOptions {
        preallocation: diskconv::Preallocation::Full,
        ..resize_opts(FMT, false)
    };
    diskconv::resize(&img, 12 * MIB, &full).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&img).unwrap().blocks() * 512 >= 12 * MIB);
    let expect = dir.path().join("full.raw");
    resized_raw(&raw, 12 * MIB, &expect);
    assert_image_is(&img, &expect);

    // A shrink that must move kept blocks into dropped ones' slots: the reversed image's
    // last guest block holds data block 0.
    let (_, rev) = &srcs[2];
    let shrink_move = sweep(rev, &raw, 2 * MIB, dir.path(), "rev-shrink-move");
    assert!(shrink_move >= 6, "{shrink_move} writes");
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn corpus_vdi_grows_and_shrinks() {
    if !have_qemu() {
        return;
    }
    let Some(corpus) = corpus_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.vdi");
    std::fs::copy(corpus.join("bwlehrpool-image-default.vdi"), &img).unwrap();
    let raw = dir.path().join("c.raw");
    qemu_img(&["convert", "-f", "vdi", "-O", "raw", s(&img), s(&raw)]);
    // 1 GiB in 1024 blocks: the map's 4 KiB fill its room, so any grow moves blocks.
    for size in [1536 * MIB, 700 * MIB + 512] {
        step(&img, &raw, size);
    }
}

#[test]
fn bad_sizes_and_tables_are_refused_before_any_write() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    guest(&raw, 3 * MIB, &[0, 2], 1);
    let img = dir.path().join("a.vdi");
    convert(&raw, &img, FMT, &[], false);
    let before = std::fs::read(&img).unwrap();
    let cases: &[(u64, ResizeOptions, &str)] = &[
        (4 * MIB + 1, resize_opts(FMT, false), "multiple of 512"),
        (0, resize_opts(FMT, false), "positive"),
        (MIB, resize_opts(FMT, false), "ResizeOptions::shrink"),
        (9 << 40, resize_opts(FMT, false), "maximum"),
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
    let full = ResizeOptions {
        preallocation: diskconv::Preallocation::Full,
        ..resize_opts(FMT, false)
    };
    let e = diskconv::resize(&img, 8 * MIB, &full).unwrap_err();
    assert!(e.to_string().contains("preallocation"), "{e}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let e = diskconv::resize(&img, 9 << 40, &resize_opts(FMT, false)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded);
    assert!(e.to_string().contains(&(8u64 << 40).to_string()), "{e}");

    // Two block map entries naming the same data block.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&0u32.to_le_bytes(), 0x200 + 8).unwrap();
    drop(f);
    let bad = std::fs::read(&img).unwrap();
    let e = diskconv::resize(&img, 8 * MIB, &resize_opts(FMT, false)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("used twice"), "{e}");
    assert_eq!(std::fs::read(&img).unwrap(), bad);
}

#[test]
fn an_image_in_use_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("guest.raw");
    guest(&raw, 2 * MIB, &[0], 1);
    let img = dir.path().join("a.vdi");
    convert(&raw, &img, FMT, &[], false);
    let holder = std::fs::File::open(&img).unwrap();
    use std::os::unix::io::AsRawFd;
    assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
    let before = std::fs::read(&img).unwrap();
    let e = diskconv::resize(&img, 4 * MIB, &resize_opts(FMT, false)).unwrap_err();
    assert!(e.to_string().contains("lock"), "{e}");
    assert_eq!(std::fs::read(&img).unwrap(), before);
    drop(holder);
    diskconv::resize(&img, 4 * MIB, &resize_opts(FMT, false)).unwrap();
    assert_eq!(open_as(&img, FMT).virtual_size(), 4 * MIB);
}
