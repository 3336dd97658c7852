//! qcow2 in-place resize: grow (L1 in place and moved), shrink, refusals, and the
//! fault-injection sweep, judged by qemu-img (check, info, compare) and compared with
//! `qemu-img resize` on a copy.
use crate::common;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskconv::{ErrorKind, Format, OpenOptions, ResizeOptions};

fn opts() -> ResizeOptions {
    ResizeOptions {
        format: Some(Format::Qcow2),
        ..Default::default()
    }
}

fn shrink_opts() -> ResizeOptions {
    ResizeOptions {
        shrink: true,
        ..opts()
    }
}

/// A raw image of `size` bytes with data scattered over it (or all holes).
fn sample_raw(dir: &Path, name: &str, size: u64, data: bool, seed: u64) -> PathBuf {
    let p = dir.join(name);
    if data {
        make_raw(&p, size, seed);
        // Data right up to the last byte, so the last cluster is mapped.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xa5; 512], size - 512).unwrap();
    } else {
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    }
    p
}

/// qcow2 made by qemu-img from `raw` with `-o` options.
fn qemu_qcow2(dir: &Path, raw: &Path, name: &str, o: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        o,
        s(raw),
        s(&p),
    ]);
    p
}

fn qemu_virtual_size(img: &Path) -> u64 {
    qemu_info(img, Format::Qcow2)["virtual-size"]
        .as_u64()
        .unwrap()
}

/// Guest bytes of `img`, read by us, equal `raw` up to `min(len(raw), new)` and zero
/// from there to `new` (checked through the map, so a 64 GiB tail costs nothing).
fn assert_guest(img: &Path, raw: &Path, new: u64) {
    let dev = diskconv::open(img, &OpenOptions::new().format(Format::Qcow2)).unwrap();
    assert_eq!(
        dev.virtual_size(),
        new,
        "our virtual size of {}",
        img.display()
    );
    let before = std::fs::read(raw).unwrap();
    let kept = (before.len() as u64).min(new) as usize;
    let mut buf = vec![0u8; kept];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(
        buf == before[..kept],
        "kept guest bytes of {}",
        img.display()
    );
    let mut off = kept as u64;
    let mut chunk = vec![0u8; 1 << 20];
    while off < new {
        let m = dev.map(off, new - off).unwrap();
        assert!(m.len > 0);
        if !m.is_zero() {
            let n = m.len.min(1 << 20) as usize;
            dev.read_at(&mut chunk[..n], off).unwrap();
            assert!(
                chunk[..n].iter().all(|&b| b == 0),
                "new space at {off:#x} of {} is not zero",
                img.display()
            );
            off += n as u64;
        } else {
            off += m.len;
        }
    }
}

/// The raw file `raw` cut or zero-extended to `new` bytes.
fn expected_raw(dir: &Path, raw: &Path, new: u64, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::copy(raw, &p).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(new)
        .unwrap();
    p
}

/// Everything a resized image must satisfy: qemu-img check clean, qemu-img info's size,
/// our reading, and qemu-img's reading identical to the expected raw.
fn assert_resized(dir: &Path, img: &Path, raw: &Path, new: u64) {
    assert_qemu_check_clean(img, Format::Qcow2);
    assert_eq!(qemu_virtual_size(img), new);
    assert_guest(img, raw, new);
    if new <= 64 << 20 {
        let exp = expected_raw(dir, raw, new, "expected.raw");
        assert_qemu_identical(img, Format::Qcow2, &exp, Format::Raw);
        std::fs::remove_file(exp).unwrap();
    }
}

/// Resize a copy with `qemu-img resize` and ours, and compare: same virtual size, same
/// guest bytes, both clean.
fn compare_with_qemu(dir: &Path, img: &Path, raw: &Path, new: u64, shrink: bool) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    std::fs::copy(img, &ours).unwrap();
    std::fs::copy(img, &theirs).unwrap();
    let o = if shrink { shrink_opts() } else { opts() };
    diskconv::resize(&ours, new, &o).unwrap_or_else(|e| panic!("resize {}: {e}", img.display()));
    let size = new.to_string();
    let mut args = vec!["resize", "-f", "qcow2"];
    if shrink {
        args.push("--shrink");
    }
    args.push(s(&theirs));
    args.push(&size);
    qemu_img(&args);
    assert_resized(dir, &ours, raw, new);
    assert_qemu_check_clean(&theirs, Format::Qcow2);
    assert_eq!(qemu_virtual_size(&theirs), new);
    assert_qemu_identical(&ours, Format::Qcow2, &theirs, Format::Qcow2);
}

#[test]
fn grow_and_shrink_match_qemu_img_across_cluster_sizes_and_compat() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = (3 << 20) + 512 * 7;
    for (i, data) in [true, false].into_iter().enumerate() {
        let raw = sample_raw(d, "src.raw", size, data, 7 + i as u64);
        for cluster in ["512", "4k", "64k", "2M"] {
            for compat in ["0.10", "1.1"] {
                let o = format!("cluster_size={cluster},compat={compat}");
                let img = qemu_qcow2(d, &raw, "img.qcow2", &o);
                let what = format!("{o} data={data}");
                eprintln!("{what}");
                // Small grow (L1 in place for most cluster sizes), large grow (the L1
                // must move for small clusters), shrink into the data, shrink to one
                // sector.
                for (new, shrink) in [
                    (size + (5 << 20), false),
                    (8 << 30, false),
                    ((1 << 20) + 512, true),
                    (512, true),
                ] {
                    compare_with_qemu(d, &img, &raw, new, shrink);
                }
            }
        }
    }
}

#[test]
fn grow_moves_the_l1_table_of_a_512_byte_cluster_image_to_64_gib() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sample_raw(d, "src.raw", 1 << 20, true, 3);
    for compat in ["0.10", "1.1"] {
        let img = qemu_qcow2(
            d,
            &raw,
            "img.qcow2",
            &format!("cluster_size=512,compat={compat}"),
        );
        let new = 64 << 30;
        compare_with_qemu(d, &img, &raw, new, false);
        // And back down to the original size.
        let ours = d.join("ours.qcow2");
        diskconv::resize(&ours, 1 << 20, &shrink_opts()).unwrap();
        assert_resized(d, &ours, &raw, 1 << 20);
        // The 16 MiB L1 table of the 64 GiB image is gone again.
        assert!(std::fs::metadata(&ours).unwrap().len() < 4 << 20);
    }
}

#[test]
fn images_we_wrote_resize_cleanly() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = (2 << 20) + 4096;
    let raw = sample_raw(d, "src.raw", size, true, 11);
    for (opt, compress) in [
        (vec![("compat", "1.1")], false),
        (vec![("compat", "0.10"), ("cluster_size", "512")], false),
        (vec![("cluster_size", "4k"), ("refcount_bits", "1")], false),
        (vec![("cluster_size", "4k"), ("refcount_bits", "64")], false),
        (vec![("cluster_size", "16k"), ("extended_l2", "on")], false),
        (vec![("cluster_size", "4k")], true),
    ] {
        eprintln!("{opt:?} compress={compress}");
        let img = d.join("ours-made.qcow2");
        let _ = std::fs::remove_file(&img);
        convert(&raw, &img, Format::Qcow2, &opt, compress);
        for (new, shrink) in [(size * 3, false), (1 << 30, false), (1 << 20, true)] {
            compare_with_qemu(d, &img, &raw, new, shrink);
        }
        // A fresh empty image from diskconv::create.
        let empty = d.join("created.qcow2");
        let _ = std::fs::remove_file(&empty);
        let mut co = diskconv::CreateOptions::new(1 << 20);
        for (k, v) in &opt {
            co.options.insert(k.to_string(), v.to_string());
        }
        diskconv::create(&empty, Format::Qcow2, &co).unwrap();
        diskconv::resize(&empty, 10 << 30, &opts()).unwrap();
        assert_qemu_check_clean(&empty, Format::Qcow2);
        assert_eq!(qemu_virtual_size(&empty), 10 << 30);
    }
}

/// Fail the Nth write for N = 1, 2, ... until a run succeeds; after each failure the
/// image must be clean by `qemu-img check` and read exactly as before or as after
/// (through us and through qemu-img).
fn sweep(dir: &Path, img: &Path, raw: &Path, new: u64, shrink: bool) -> u64 {
    let old = qemu_virtual_size(img);
    let before = expected_raw(dir, raw, old, "sweep-before.raw");
    let after = expected_raw(dir, raw, new, "sweep-after.raw");
    let work = dir.join("sweep.qcow2");
    let mut n = 1;
    loop {
        std::fs::copy(img, &work).unwrap();
        let o = ResizeOptions {
            shrink,
            fail_at_write: Some(n),
            ..opts()
        };
        let r = diskconv::resize(&work, new, &o);
        assert_qemu_check_clean(&work, Format::Qcow2);
        let size = qemu_virtual_size(&work);
        let exp = if size == new { &after } else { &before };
        assert!(
            size == new || size == old,
            "size {size} after failing write {n}"
        );
        assert_qemu_identical(&work, Format::Qcow2, exp, Format::Raw);
        assert_guest(&work, raw, size);
        match r {
            Ok(()) => {
                assert_eq!(size, new);
                return n;
            }
            Err(e) => assert!(e.to_string().contains("test hook"), "{e}"),
        }
        n += 1;
        assert!(n < 200, "the hook never stopped failing");
    }
}

#[test]
fn a_failure_at_any_write_leaves_the_image_before_or_after() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sample_raw(d, "src.raw", 1 << 20, true, 5);
    for compat in ["0.10", "1.1"] {
        // 512 B clusters: growing to 1 GiB moves the L1 table and needs new refcount
        // blocks and a bigger refcount table.
        let img = qemu_qcow2(
            d,
            &raw,
            "img.qcow2",
            &format!("cluster_size=512,compat={compat}"),
        );
        let grow = sweep(d, &img, &raw, 1 << 30, false);
        assert!(
            grow >= 4,
            "a moving grow writes tables, flushes, then the header"
        );
        let shrink = sweep(d, &img, &raw, (300 << 10) + 512, true);
        assert!(shrink >= 4);
        // A shrink after a large grow: the freed tail lies under the big L1 table, so a
        // second transaction moves the tables down before the file is cut.
        let big = d.join("big.qcow2");
        std::fs::copy(&img, &big).unwrap();
        diskconv::resize(&big, 4 << 30, &opts()).unwrap();
        let n = sweep(d, &big, &raw, 1 << 20, true);
        assert!(n >= 8, "two transactions: {n}");
        let cut = d.join("sweep.qcow2");
        assert!(
            std::fs::metadata(&cut).unwrap().len()
                < std::fs::metadata(&img).unwrap().len() + (64 << 10)
        );
        // 64 KiB clusters: the L1 fits, only the header changes.
        let img = qemu_qcow2(d, &raw, "img64.qcow2", &format!("compat={compat}"));
        // 400 MiB still fits the one L1 entry: header write, flush.
        assert_eq!(sweep(d, &img, &raw, 400 << 20, false), 3);
        // 100 GiB fits the L1's cluster: zero its tail, flush, header, flush.
        assert_eq!(sweep(d, &img, &raw, 100 << 30, false), 5);
        sweep(d, &img, &raw, 512 << 10, true);
    }
}

fn be32_at(p: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u32::from_be_bytes(b)
}

#[test]
fn the_sweep_holds_when_the_refcount_table_itself_must_grow_and_for_our_images() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sample_raw(d, "src.raw", 1 << 20, true, 17);
    // 512 B clusters: one refcount table cluster covers 8 MiB of file; the 8 MiB L1 of
    // a 32 GiB image pushes the file past that, so the table moves and grows too.
    let img = qemu_qcow2(d, &raw, "img.qcow2", "cluster_size=512");
    assert_eq!(be32_at(&img, 56), 1);
    sweep(d, &img, &raw, 32 << 30, false);
    assert!(
        be32_at(&d.join("sweep.qcow2"), 56) > 1,
        "refcount table grew"
    );
    // Our writer's images with 1-bit and 64-bit refcounts and extended L2 entries.
    for opt in [
        vec![("cluster_size", "4k"), ("refcount_bits", "1")],
        vec![("cluster_size", "4k"), ("refcount_bits", "64")],
        vec![("cluster_size", "16k"), ("extended_l2", "on")],
    ] {
        let img = d.join("ours-made.qcow2");
        let _ = std::fs::remove_file(&img);
        convert(&raw, &img, Format::Qcow2, &opt, false);
        sweep(d, &img, &raw, 8 << 30, false);
        sweep(d, &img, &raw, (300 << 10) + 512, true);
    }
}

#[test]
fn refusals_name_the_reason_and_touch_nothing() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = d.join("a.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "1M"]);
    let sum = sha256_file(&img);
    let e = diskconv::resize(&img, (2 << 20) + 1, &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        e.to_string()
            .contains("The new size must be a multiple of 512"),
        "{e}"
    );
    let e = diskconv::resize(&img, 512 << 10, &opts()).unwrap_err();
    assert_eq!(e.option(), Some("ResizeOptions::shrink"), "{e}");
    let e = diskconv::resize(&img, 0, &shrink_opts()).unwrap_err();
    assert!(e.to_string().contains("positive"), "{e}");
    let e = diskconv::resize(&img, 1 << 62, &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LimitExceeded);
    assert!(e.to_string().contains("at most"), "{e}");
    let e = diskconv::resize(
        &img,
        512 << 10,
        &ResizeOptions {
            preallocation: diskconv::Preallocation::Full,
            ..shrink_opts()
        },
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("Preallocation can't be used for shrinking"),
        "{e}"
    );
    assert_eq!(sha256_file(&img), sum);

    // Internal snapshots.
    qemu_img(&["snapshot", "-c", "s1", s(&img)]);
    let sum = sha256_file(&img);
    let e = diskconv::resize(&img, 2 << 20, &opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("snapshots"), "{e}");
    assert_eq!(sha256_file(&img), sum);

    // A backing file.
    let base = d.join("base.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "1M"]);
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    let e = diskconv::resize(&top, 2 << 20, &opts()).unwrap_err();
    assert!(e.to_string().contains("backing file"), "{e}");

    // External data file.
    let ext = d.join("ext.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", s(&d.join("ext.data"))),
        s(&ext),
        "1M",
    ]);
    let e = diskconv::resize(&ext, 2 << 20, &opts()).unwrap_err();
    assert!(e.to_string().contains("external data file"), "{e}");

    // Encrypted.
    let enc = d.join("enc.qcow2");
    qemu_img(&[
        "create",
        "--object",
        "secret,id=sec0,data=123456",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        s(&enc),
        "1M",
    ]);
    let e = diskconv::resize(&enc, 2 << 20, &opts()).unwrap_err();
    assert!(e.to_string().contains("encrypted"), "{e}");

    // Dirty (as a crashed qemu with lazy refcounts leaves it): bit 0 of the incompatible
    // features at byte 72.
    let dirty = d.join("dirty.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&dirty), "1M"]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dirty)
        .unwrap();
    f.write_all_at(&[0, 0, 0, 0, 0, 0, 0, 1], 72).unwrap();
    drop(f);
    let e = diskconv::resize(&dirty, 2 << 20, &opts()).unwrap_err();
    assert!(e.to_string().contains("dirty"), "{e}");

    // Read-only file.
    let ro = d.join("ro.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&ro), "1M"]);
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&ro, perm).unwrap();
    if std::fs::OpenOptions::new().write(true).open(&ro).is_err() {
        let e = diskconv::resize(&ro, 2 << 20, &opts()).unwrap_err();
        assert!(e.to_string().contains("for writing"), "{e}");
    }
}

#[test]
fn an_image_locked_by_another_process_is_refused() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&img), "1M"]);
    // flock(1) holds the lock in a child; it says so once it has it.
    let Ok(mut child) = Command::new("flock")
        .args(["-x", "-o", s(&img), "-c", "echo locked; read x"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        return;
    };
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    let sum = sha256_file(&img);
    let r = diskconv::resize(&img, 2 << 20, &opts());
    // Closing its stdin ends the shell, and flock with it.
    drop(child.stdin.take());
    child.wait().unwrap();
    let e = r.unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    assert_eq!(sha256_file(&img), sum);
    // Once the lock is gone the resize goes through.
    diskconv::resize(&img, 2 << 20, &opts()).unwrap();
}

#[test]
fn grown_space_reads_as_zeros_even_after_a_shrink_into_a_cluster() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("ones.raw");
    std::fs::write(&raw, vec![0x11u8; 1 << 20]).unwrap();
    let img = qemu_qcow2(d, &raw, "img.qcow2", "cluster_size=64k");
    // Shrink to the middle of a cluster, grow again: the cluster's old tail must not
    // come back.
    diskconv::resize(&img, (1 << 19) + 512, &shrink_opts()).unwrap();
    diskconv::resize(&img, 1 << 20, &opts()).unwrap();
    let mut want = vec![0x11u8; (1 << 19) + 512];
    want.resize(1 << 20, 0);
    let exp = d.join("exp.raw");
    std::fs::write(&exp, &want).unwrap();
    assert_qemu_check_clean(&img, Format::Qcow2);
    assert_qemu_identical(&img, Format::Qcow2, &exp, Format::Raw);
    // The same after qemu-img shrank it (qemu leaves the tail in place).
    let img = qemu_qcow2(d, &raw, "img2.qcow2", "cluster_size=64k");
    qemu_img(&[
        "resize",
        "--shrink",
        s(&img),
        &((1u64 << 19) + 512).to_string(),
    ]);
    diskconv::resize(&img, 1 << 20, &opts()).unwrap();
    assert_qemu_check_clean(&img, Format::Qcow2);
    assert_qemu_identical(&img, Format::Qcow2, &exp, Format::Raw);
}

#[test]
fn full_preallocation_allocates_zeroed_clusters_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sample_raw(d, "src.raw", (1 << 20) + 1024, true, 9);
    for o in [
        "cluster_size=64k,compat=1.1",
        "cluster_size=512,compat=0.10",
        "cluster_size=16k,extended_l2=on",
    ] {
        let img = qemu_qcow2(d, &raw, "img.qcow2", o);
        let new = (3 << 20) + 512;
        let full = ResizeOptions {
            preallocation: diskconv::Preallocation::Full,
            ..opts()
        };
        let ours = d.join("full.qcow2");
        std::fs::copy(&img, &ours).unwrap();
        let len_before = std::fs::metadata(&ours).unwrap().len();
        diskconv::resize(&ours, new, &full).unwrap();
        assert_resized(d, &ours, &raw, new);
        // The new space is allocated: the file grew by at least its size, and every
        // range past the old end maps as data.
        assert!(std::fs::metadata(&ours).unwrap().len() >= len_before + new - raw_len(&raw));
        let dev = diskconv::open(&ours, &OpenOptions::new().format(Format::Qcow2)).unwrap();
        let mut off = raw_len(&raw).div_ceil(1 << 16) * (1 << 16);
        while off < new {
            let m = dev.map(off, new - off).unwrap();
            assert!(
                matches!(m.kind, diskconv::MappingKind::Data { .. }),
                "{o}: {m:?} at {off:#x}"
            );
            off += m.len;
        }
        let theirs = d.join("theirs.qcow2");
        std::fs::copy(&img, &theirs).unwrap();
        qemu_img(&[
            "resize",
            "--preallocation=full",
            s(&theirs),
            &new.to_string(),
        ]);
        assert_qemu_identical(&ours, Format::Qcow2, &theirs, Format::Qcow2);
        // Crash safety holds for it too.
        let n = {
            let before = expected_raw(d, &raw, raw_len(&raw), "b.raw");
            let after = expected_raw(d, &raw, new, "a.raw");
            let mut n = 1;
            loop {
                std::fs::copy(&img, &ours).unwrap();
                let r = diskconv::resize(
                    &ours,
                    new,
                    &ResizeOptions {
                        fail_at_write: Some(n),
                        ..full.clone()
                    },
                );
                assert_qemu_check_clean(&ours, Format::Qcow2);
                let size = qemu_virtual_size(&ours);
                let exp = if size == new { &after } else { &before };
                assert_qemu_identical(&ours, Format::Qcow2, exp, Format::Raw);
                if r.is_ok() {
                    break n;
                }
                n += 1;
                assert!(n < 200);
            }
        };
        assert!(n >= 5, "{o}: {n}");
    }
}

fn raw_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn tables_that_do_not_validate_are_refused_before_any_write() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sample_raw(d, "src.raw", 2 << 20, true, 13);
    let be64 = |f: &std::fs::File, off: u64| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    };

    // Refcount table past the end of the file.
    let img = qemu_qcow2(d, &raw, "rt.qcow2", "cluster_size=4k");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    f.write_all_at(&(1u64 << 40).to_be_bytes(), 48).unwrap();
    drop(f);
    let sum = sha256_file(&img);
    let e = diskconv::resize(&img, 1 << 30, &opts()).unwrap_err();
    assert!(e.to_string().contains("refcount"), "{e}");
    assert_eq!(sha256_file(&img), sum);

    // Refcounts that do not match the tables: a zeroed refcount block makes the shrink's
    // frees underflow, which is found while planning.
    let img = qemu_qcow2(d, &raw, "rb.qcow2", "cluster_size=4k");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let rt = be64(&f, 48);
    let rb = be64(&f, rt);
    f.write_all_at(&[0u8; 4096], rb).unwrap();
    drop(f);
    let sum = sha256_file(&img);
    let e = diskconv::resize(&img, 1 << 20, &shrink_opts()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert_eq!(sha256_file(&img), sum);

    // An L1 entry pointing past the end of the file.
    let img = qemu_qcow2(d, &raw, "l1.qcow2", "cluster_size=4k");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    let l1 = be64(&f, 40);
    f.write_all_at(&((1u64 << 40) | (1 << 63)).to_be_bytes(), l1)
        .unwrap();
    drop(f);
    let sum = sha256_file(&img);
    let e = diskconv::resize(&img, 1 << 20, &shrink_opts()).unwrap_err();
    assert!(e.to_string().contains("L1 entry"), "{e}");
    assert_eq!(sha256_file(&img), sum);
}

#[test]
fn compressed_and_metadata_preallocated_qemu_images_resize_like_qemu_img() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = (3 << 20) + 1536;
    let raw = sample_raw(d, "src.raw", size, true, 21);
    for (o, compress) in [
        ("cluster_size=4k", true),
        ("cluster_size=64k,compat=0.10", true),
        ("cluster_size=64k,preallocation=metadata", false),
        ("cluster_size=512,preallocation=metadata", false),
    ] {
        eprintln!("{o} compress={compress}");
        let img = d.join("img.qcow2");
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2", "-o", o];
        if compress {
            args.push("-c");
        }
        args.push(s(&raw));
        args.push(s(&img));
        qemu_img(&args);
        for (new, shrink) in [
            (size + (1 << 20), false),
            (4 << 30, false),
            ((1 << 20) + 4096, true),
        ] {
            compare_with_qemu(d, &img, &raw, new, shrink);
        }
        sweep(d, &img, &raw, (1 << 20) + 512, true);
    }
}
