//! vdi: differential against qemu-img both ways (dynamic and static, odd sizes, empty and
//! full images), the corpus image, proptest round trips and hostile headers.
use crate::common;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use diskconv::{ErrorKind, Format, MappingKind, OpenOptions};
use proptest::prelude::*;

const MIB: u64 = 1 << 20;

/// Sizes that hit whole blocks, a partial last block, a size that is not a multiple of 512
/// (both sides round it up) and a tiny image.
const SIZES: &[u64] = &[3 * MIB, 5 * MIB + 4096, 2 * MIB + 12345, 700];

fn open_err(path: &Path) -> diskconv::Error {
    let what = format!("refusing {}", path.display());
    match within_small_file_budget(&what, path, || {
        diskconv::open(path, &OpenOptions::new().format(Format::Vdi))
    }) {
        Ok(_) => panic!("{} opened but should not", path.display()),
        Err(e) => e,
    }
}

/// Fill `path` with `size` random bytes (every block holds data).
fn make_full(path: &Path, size: u64, seed: u64) {
    let mut buf = vec![0u8; size as usize];
    Rng(seed | 1).fill(&mut buf);
    std::fs::write(path, buf).unwrap();
}

fn read_all(dev: &dyn diskconv::BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.virtual_size() as usize];
    dev.read_at(&mut v, 0).unwrap();
    v
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn reads_qemu_made_images_bit_exact() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (n, &size) in SIZES.iter().enumerate() {
        let mixed = d.join(format!("mixed{n}.raw"));
        make_raw(&mixed, size, 11 + n as u64);
        let full = d.join(format!("full{n}.raw"));
        make_full(&full, size, 5 + n as u64);
        for static_ in ["off", "on"] {
            // Empty image.
            let empty = d.join(format!("empty{n}-{static_}.vdi"));
            qemu_img(&[
                "create",
                "-f",
                "vdi",
                "-o",
                &format!("static={static_}"),
                s(&empty),
                &size.to_string(),
            ]);
            assert_reads_like_qemu(&empty, Format::Vdi, d);
            let dev = open_as(&empty, Format::Vdi);
            let m = dev.map(0, u64::MAX).unwrap();
            assert_eq!(m.len, dev.virtual_size(), "one run for an empty image");
            if static_ == "off" {
                assert_eq!(m.kind, MappingKind::Unallocated);
            } else {
                assert!(matches!(m.kind, MappingKind::Data { host: Some(_) }));
            }
            // Converted images with holes and with data everywhere.
            for src in [&mixed, &full] {
                let img = d.join(format!(
                    "{}-{static_}.vdi",
                    src.file_stem().unwrap().to_string_lossy()
                ));
                qemu_img(&[
                    "convert",
                    "-O",
                    "vdi",
                    "-o",
                    &format!("static={static_}"),
                    s(src),
                    s(&img),
                ]);
                assert_reads_like_qemu(&img, Format::Vdi, d);
                let q = qemu_info(&img, Format::Vdi);
                let info = open_as(&img, Format::Vdi).info();
                assert_eq!(q["virtual-size"].as_u64(), Some(info.virtual_size));
                assert_eq!(q["cluster-size"].as_u64(), info.cluster_size);
                assert_eq!(info.format, "vdi");
            }
        }
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn our_images_pass_qemu_check_and_compare() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (n, &size) in SIZES.iter().enumerate() {
        let mixed = d.join(format!("mixed{n}.raw"));
        make_raw(&mixed, size, 21 + n as u64);
        let full = d.join(format!("full{n}.raw"));
        make_full(&full, size, 31 + n as u64);
        let empty = d.join(format!("empty{n}.raw"));
        std::fs::File::create(&empty)
            .unwrap()
            .set_len(size)
            .unwrap();
        for src in [&mixed, &full, &empty] {
            for static_ in ["off", "on"] {
                let out = d.join(format!(
                    "{}-{static_}.vdi",
                    src.file_stem().unwrap().to_string_lossy()
                ));
                convert(src, &out, Format::Vdi, &[("static", static_)], false);
                assert_qemu_check_clean(&out, Format::Vdi);
                assert_qemu_identical(src, Format::Raw, &out, Format::Vdi);
                let q = qemu_info(&out, Format::Vdi);
                assert_eq!(
                    q["virtual-size"].as_u64(),
                    Some(size.next_multiple_of(512)),
                    "{}",
                    out.display()
                );
                // The same bytes through our own reader, and the same file qemu writes.
                let dev = open_as(&out, Format::Vdi);
                let mut want = std::fs::read(src).unwrap();
                want.resize(size.next_multiple_of(512) as usize, 0);
                assert!(read_all(dev.as_ref()) == want, "{}", out.display());
                let theirs = d.join("theirs.vdi");
                qemu_img(&[
                    "convert",
                    "-O",
                    "vdi",
                    "-o",
                    &format!("static={static_}"),
                    s(src),
                    s(&theirs),
                ]);
                let ours_bytes = std::fs::read(&out).unwrap();
                let theirs_bytes = std::fs::read(&theirs).unwrap();
                assert_eq!(ours_bytes.len(), theirs_bytes.len(), "{}", out.display());
                // Block map and data are identical to qemu's; only the header differs
                // (UUIDs, and our v1.1 header carries VirtualBox's LCHS geometry).
                assert!(
                    ours_bytes[512..] == theirs_bytes[512..],
                    "{}",
                    out.display()
                );
            }
        }
    }
}

#[test]
fn dynamic_output_stores_only_data_blocks_and_maps_in_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("a.raw");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(8 * MIB).unwrap();
    f.write_all_at(&vec![1u8; 3 * MIB as usize], MIB).unwrap();
    f.write_all_at(&[2u8; 10], 6 * MIB + 5).unwrap();
    drop(f);
    let out = d.join("a.vdi");
    convert(&src, &out, Format::Vdi, &[], false);
    // Header + map sector + 4 data blocks.
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 1024 + 4 * MIB);
    let dev = open_as(&out, Format::Vdi);
    let runs: Vec<_> = {
        let mut v = Vec::new();
        let mut off = 0;
        while off < dev.virtual_size() {
            let m = dev.map(off, u64::MAX).unwrap();
            v.push((m.offset, m.len, m.kind));
            off += m.len;
        }
        v
    };
    assert_eq!(
        runs,
        vec![
            (0, MIB, MappingKind::Unallocated),
            (MIB, 3 * MIB, MappingKind::Data { host: Some(1024) }),
            (4 * MIB, 2 * MIB, MappingKind::Unallocated),
            (
                6 * MIB,
                MIB,
                MappingKind::Data {
                    host: Some(1024 + 3 * MIB)
                }
            ),
            (7 * MIB, MIB, MappingKind::Unallocated),
        ]
    );
    // map never passes max_len, and starts mid-block with the right host offset.
    let m = dev.map(MIB + 100, 5).unwrap();
    assert_eq!(
        (m.offset, m.len, m.kind),
        (MIB + 100, 5, MappingKind::Data { host: Some(1124) })
    );
    assert_eq!(diskconv::probe(&out).unwrap(), Format::Vdi);
}

#[test]
fn static_output_allocates_every_block_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("z.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(3 * MIB + 512)
        .unwrap();
    let out = dir.path().join("z.vdi");
    convert(&src, &out, Format::Vdi, &[("static", "on")], false);
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, 1024 + 4 * MIB);
    assert_eq!(&bytes[0x4c..0x50], &2u32.to_le_bytes());
    assert_eq!(
        &bytes[0x184..0x188],
        &4u32.to_le_bytes(),
        "blocks_allocated"
    );
    for i in 0..4u32 {
        let o = 0x200 + 4 * i as usize;
        assert_eq!(&bytes[o..o + 4], &i.to_le_bytes());
    }
    let dev = open_as(&out, Format::Vdi);
    assert!(read_all(dev.as_ref()).iter().all(|&b| b == 0));
}

#[test]
fn header_is_what_virtualbox_checks() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 2 * MIB, 3);
    let a = dir.path().join("a.vdi");
    let b = dir.path().join("b.vdi");
    convert(&src, &a, Format::Vdi, &[], false);
    convert(&src, &b, Format::Vdi, &[], false);
    let h = std::fs::read(&a).unwrap();
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(0x40), 0xbeda107f);
    assert_eq!(u32_at(0x44), 0x00010001);
    assert_eq!(u32_at(0x48), 0x190, "VDIHEADER1PLUS size");
    assert_eq!(u32_at(0x168), 512, "legacy geometry sector size");
    assert_eq!(u32_at(0x1d4), 512, "LCHS geometry sector size");
    assert_eq!(u32_at(0x178), 1 << 20, "block size");
    assert_ne!(&h[0x188..0x198], &[0u8; 16], "creation uuid");
    assert_ne!(&h[0x198..0x1a8], &[0u8; 16], "modification uuid");
    assert_eq!(&h[0x1a8..0x1c8], &[0u8; 32], "no link or parent");
    let h2 = std::fs::read(&b).unwrap();
    assert_ne!(&h[0x188..0x198], &h2[0x188..0x198], "fresh uuid per image");
}

#[test]
fn compression_and_unknown_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, MIB, 1);
    let out = dir.path().join("a.vdi");
    let mut o = diskconv::ConvertOptions::new(Format::Vdi);
    o.create.compress = true;
    assert_eq!(
        diskconv::convert(&src, &out, &o).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    let mut o = diskconv::ConvertOptions::new(Format::Vdi);
    o.create.options.insert("cluster_size".into(), "64k".into());
    assert!(diskconv::convert(&src, &out, &o).is_err());
    let mut o = diskconv::ConvertOptions::new(Format::Vdi);
    o.create.options.insert("static".into(), "maybe".into());
    assert!(diskconv::convert(&src, &out, &o).is_err());
    assert!(!out.exists());
}

/// A qemu-made image whose map we rewrite: entries in reverse host order and a discarded
/// block (qemu never writes either, VirtualBox does).
#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn reordered_and_discarded_blocks_read_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("full.raw");
    make_full(&src, 4 * MIB, 9);
    let img = d.join("r.vdi");
    qemu_img(&["convert", "-O", "vdi", s(&src), s(&img)]);
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    let entries: [u32; 4] = [3, 0xffff_fffe, 1, 0];
    let map: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    f.write_all_at(&map, 0x200).unwrap();
    drop(f);
    assert_reads_like_qemu(&img, Format::Vdi, d);
    let dev = open_as(&img, Format::Vdi);
    let m = dev.map(MIB, u64::MAX).unwrap();
    assert_eq!((m.len, m.kind), (MIB, MappingKind::Zero));
    let m = dev.map(0, u64::MAX).unwrap();
    assert_eq!(m.len, MIB, "non-consecutive host blocks are separate runs");
    let raw = std::fs::read(&src).unwrap();
    let mut buf = vec![0u8; 2 * MIB as usize];
    dev.read_at(&mut buf, 2 * MIB).unwrap();
    assert!(buf[..MIB as usize] == raw[MIB as usize..2 * MIB as usize]);
    assert!(buf[MIB as usize..] == raw[..MIB as usize]);
}

#[test]
#[cfg_attr(no_bzip2, ignore = "needs bzip2 for the corpus: apt-get install bzip2")]
fn corpus_image_matches_manifest() {
    let Some(dir) = corpus_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for e in corpus_entries(&dir)
        .into_iter()
        .filter(|e| e.format == "vdi")
    {
        let path = corpus_file(&dir, &e.file, tmp.path());
        match e.expected_sha() {
            Some(sha) => {
                let dev = open_as(&path, Format::Vdi);
                assert_eq!(Some(dev.virtual_size()), e.virtual_size, "{}", e.file);
                assert_eq!(sha256_device(dev.as_ref()), sha, "{}", e.file);
            }
            None => {
                assert!(diskconv::open(&path, &OpenOptions::new().format(Format::Vdi)).is_err())
            }
        }
        seen += 1;
    }
    assert!(seen >= 1, "the corpus has a vdi image");
}

/// A valid 512-byte header of a dynamic image, for the hostile-input tests to corrupt.
fn header(disk_size: u64, blocks: u32, allocated: u32) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[..35].copy_from_slice(b"<<< QEMU VM Virtual Disk Image >>>\n");
    let mut put = |o: usize, v: u32| h[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put(0x40, 0xbeda107f);
    put(0x44, 0x00010001);
    put(0x48, 0x180);
    put(0x4c, 1);
    put(0x154, 0x200);
    let bmap = (blocks as u64 * 4).next_multiple_of(512);
    put(0x158, (0x200 + bmap).min(u32::MAX as u64 & !511) as u32);
    put(0x168, 512);
    put(0x178, 1 << 20);
    put(0x180, blocks);
    put(0x184, allocated);
    h[0x170..0x178].copy_from_slice(&disk_size.to_le_bytes());
    h[0x188] = 1;
    h[0x198] = 2;
    h
}

fn put_u32(buf: &mut [u8], o: usize, v: u32) {
    buf[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn hostile_headers_fail_fast_with_named_fields() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _guard = hang_guard("hostile vdi headers");

    // Huge claimed table, tiny file: refused by the table cap, nothing allocated.
    let mut h = header(0x3fff_ff00 * MIB, 0x3fff_ff00, 0);
    h.resize(1024, 0xff);
    let e = open_err(&write_file(d, "huge.vdi", &h));
    assert_eq!(e.kind(), ErrorKind::LimitExceeded, "{e}");
    assert_eq!(e.field(), Some("blocks_in_image"));

    // Table under the cap but past the end of the file.
    let mut h = header(4096 * MIB, 4096, 0);
    h.resize(1024, 0xff);
    let e = open_err(&write_file(d, "short-map.vdi", &h));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("block map"), "{e}");

    // Block index past blocks_allocated.
    let mut h = header(2 * MIB, 2, 1);
    h.resize(1024 + 2 * MIB as usize, 0);
    put_u32(&mut h, 0x200, 0);
    put_u32(&mut h, 0x204, 1);
    let e = open_err(&write_file(d, "idx.vdi", &h));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("blocks_allocated"), "{e}");
    assert_eq!(e.offset(), Some(0x204));

    // Block data past the end of the file.
    let mut h = header(2 * MIB, 2, 2);
    h.resize(1024 + MIB as usize, 0);
    put_u32(&mut h, 0x200, 0);
    put_u32(&mut h, 0x204, 1);
    let e = open_err(&write_file(d, "data-eof.vdi", &h));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("end of the file"), "{e}");

    // Block size 0, not a power of two, absurdly large.
    for (bs, kind) in [
        (0u32, ErrorKind::InvalidFormat),
        (3 << 19, ErrorKind::InvalidFormat),
        (1 << 31, ErrorKind::Unsupported),
    ] {
        let mut h = header(MIB, 1, 0);
        put_u32(&mut h, 0x178, bs);
        h.resize(1024, 0xff);
        let e = open_err(&write_file(d, "bs.vdi", &h));
        assert_eq!(e.kind(), kind, "block size {bs}: {e}");
        assert_eq!(e.field(), Some("block_size"));
    }

    // Disk larger than the map covers; map overlapping the data area.
    let mut h = header(3 * MIB, 2, 0);
    h.resize(1024, 0xff);
    assert_eq!(
        open_err(&write_file(d, "room.vdi", &h)).field(),
        Some("disk_size")
    );
    let mut h = header(MIB, 1000, 0);
    put_u32(&mut h, 0x158, 0x400);
    h.resize(8192, 0xff);
    assert_eq!(
        open_err(&write_file(d, "overlap.vdi", &h)).field(),
        Some("offset_data")
    );

    // Differencing images (by type or by parent UUID) and truncated headers.
    let mut h = header(MIB, 1, 0);
    h.resize(1024, 0xff);
    let mut diff = h.clone();
    put_u32(&mut diff, 0x4c, 4);
    let e = open_err(&write_file(d, "diff.vdi", &diff));
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(
        e.message().contains("differencing VDI needs its parent"),
        "{e}"
    );
    let mut diff = h.clone();
    diff[0x1b8] = 9;
    assert_eq!(
        open_err(&write_file(d, "parent.vdi", &diff)).kind(),
        ErrorKind::Unsupported
    );
    let e = open_err(&write_file(d, "trunc.vdi", &h[..300]));
    assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e}");
    // Probing still says vdi (and open then explains), a wrong version is unsupported.
    let p = write_file(d, "v.vdi", &{
        let mut v = h.clone();
        put_u32(&mut v, 0x44, 0x0001_0000);
        v
    });
    assert_eq!(diskconv::probe(&p).unwrap(), Format::Vdi);
    let probed = within_small_file_budget("probing v.vdi", &p, || {
        diskconv::open(&p, &OpenOptions::new())
    });
    assert_eq!(probed.err().unwrap().kind(), ErrorKind::Unsupported);
}

/// A small valid image (3 blocks, one discarded, one unallocated, partial last block).
fn small_image() -> Vec<u8> {
    let mut h = header(4 * MIB - 1000, 4, 2);
    h.resize(1024 + 2 * MIB as usize, 0);
    for (i, e) in [1u32, 0xffff_fffe, 0xffff_ffff, 0].iter().enumerate() {
        put_u32(&mut h, 0x200 + 4 * i, *e);
    }
    for (i, b) in h[1024..].iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    h
}

#[test]
fn small_crafted_image_reads_as_expected() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "s.vdi", &small_image());
    let dev = open_as(&p, Format::Vdi);
    assert_eq!(
        dev.virtual_size(),
        4 * MIB - 512,
        "odd size rounds up to 512"
    );
    let all = read_all(dev.as_ref());
    assert_eq!(all[0], (MIB / 4096) as u8, "block 0 is data block 1");
    assert!(all[MIB as usize..3 * MIB as usize].iter().all(|&b| b == 0));
    assert_eq!(all[3 * MIB as usize], 0);
    assert_eq!(all[3 * MIB as usize + 8192], 2);
    if have_qemu() {
        assert_reads_like_qemu(&p, Format::Vdi, dir.path());
    }
}

/// VirtualBox's own layout: its text lines, a 0x190 header with LCHS geometry, the map and
/// the data area each aligned to 1 MiB.
#[test]
fn virtualbox_layout_and_texts_are_read() {
    let dir = tempfile::tempdir().unwrap();
    for text in [
        "<<< Oracle VM VirtualBox Disk Image >>>\n",
        "<<< Sun xVM VirtualBox Disk Image >>>\n",
        "<<< innotek VirtualBox Disk Image >>>\n",
    ] {
        let mut h = header(3 * MIB, 3, 2);
        h[..64].fill(0);
        h[..text.len()].copy_from_slice(text.as_bytes());
        put_u32(&mut h, 0x48, 0x190);
        put_u32(&mut h, 0x154, MIB as u32);
        put_u32(&mut h, 0x158, 2 * MIB as u32);
        put_u32(&mut h, 0x1d4, 512);
        h.resize(4 * MIB as usize, 0);
        let map = MIB as usize;
        put_u32(&mut h, map, 0xffff_ffff);
        put_u32(&mut h, map + 4, 1);
        put_u32(&mut h, map + 8, 0);
        h[2 * MIB as usize..3 * MIB as usize].fill(0xaa);
        h[3 * MIB as usize..].fill(0xbb);
        let p = write_file(dir.path(), "vbox.vdi", &h);
        assert_eq!(diskconv::probe(&p).unwrap(), Format::Vdi);
        let dev = open_as(&p, Format::Vdi);
        let all = read_all(dev.as_ref());
        assert!(all[..MIB as usize].iter().all(|&b| b == 0));
        assert!(all[MIB as usize..2 * MIB as usize]
            .iter()
            .all(|&b| b == 0xbb));
        assert!(all[2 * MIB as usize..].iter().all(|&b| b == 0xaa));
        if have_qemu() {
            assert_reads_like_qemu(&p, Format::Vdi, dir.path());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// raw -> vdi -> raw is the identity, for random sizes and data layouts, both subformats.
    #[test]
    fn round_trip_raw_vdi_raw(
        size in 1u64..(6 * MIB),
        pieces in proptest::collection::vec((0u64..(6 * MIB), 1u64..(300 << 10), any::<u8>()), 0..6),
        fixed in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.raw");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(size).unwrap();
        for (off, len, byte) in pieces {
            if off < size {
                let len = len.min(size - off);
                f.write_all_at(&vec![byte; len as usize], off).unwrap();
            }
        }
        drop(f);
        let vdi = dir.path().join("a.vdi");
        convert(&src, &vdi, Format::Vdi, &[("static", if fixed { "on" } else { "off" })], false);
        let back = dir.path().join("b.raw");
        convert(&vdi, &back, Format::Raw, &[], false);
        let mut want = std::fs::read(&src).unwrap();
        want.resize(size.next_multiple_of(512) as usize, 0);
        prop_assert!(std::fs::read(&back).unwrap() == want);
    }

    /// Random corruption of a valid image never panics; if it still opens, every byte can be
    /// mapped and read (or fails with an error).
    #[test]
    fn corrupted_images_never_panic(
        flips in proptest::collection::vec((0usize..0x220, any::<u8>()), 1..8),
        cut in proptest::option::of(0usize..(1024 + 2 * MIB as usize)),
    ) {
        let mut img = small_image();
        for (o, v) in flips {
            img[o] = v;
        }
        if let Some(c) = cut {
            img.truncate(c);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(dir.path(), "c.vdi", &img);
        if let Ok(dev) = diskconv::open(&p, &OpenOptions::new().format(Format::Vdi)) {
            let size = dev.virtual_size();
            let mut off = 0;
            let mut buf = vec![0u8; MIB as usize];
            while off < size {
                let m = dev.map(off, u64::MAX).unwrap();
                prop_assert_eq!(m.offset, off);
                prop_assert!(m.len > 0 && off + m.len <= size);
                let n = m.len.min(MIB);
                let _ = dev.read_at(&mut buf[..n as usize], off);
                off += m.len;
            }
        }
    }
}
