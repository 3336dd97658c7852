//! VHDX: differential tests against qemu-img in both directions, the corpus images
//! (Hyper-V, Disk2VHD, and a qemu image with a log to replay) bit-exact, differencing
//! disks through the reference gate, and damaged or hostile files refused with the
//! exact error kind.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use byteorder::{ByteOrder, LittleEndian as LE};
use common::*;
use diskconv::{ErrorKind, Format, MappingKind, OpenOptions};

const MIB: u64 = 1 << 20;

fn vhdx() -> OpenOptions {
    OpenOptions::new().format(Format::Vhdx)
}

fn open_err(p: &Path, o: &OpenOptions) -> diskconv::Error {
    match diskconv::open(p, o) {
        Ok(_) => panic!("{} opened", p.display()),
        Err(e) => e,
    }
}

fn qemu_io(img: &Path, cmds: &[String]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "vhdx"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(s(img)).output().unwrap();
    assert!(
        o.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// qemu-io writes at scattered offsets of a `size`-byte disk: the first sector, a run
/// across a 1 MiB boundary, unaligned sectors in the middle, and the last 4 KiB.
fn scattered_writes(size: u64) -> Vec<String> {
    vec![
        "write -P 0xa1 0 512".into(),
        format!("write -P 0xb2 {} 8192", MIB - 4096),
        format!("write -P 0xc3 {} 1536", size / 2 + 512),
        format!("write -P 0xd4 {} 3m", size / 3),
        format!("write -P 0xe5 {} 4096", size - 4096),
    ]
}

fn qemu_create(p: &Path, size: &str, opts: &str) {
    let mut a = vec!["create", "-q", "-f", "vhdx"];
    if !opts.is_empty() {
        a.extend(["-o", opts]);
    }
    a.extend([s(p), size]);
    qemu_img(&a);
}

/// The logical sector size item of a VHDX made by qemu (whose metadata table lists it
/// fourth), set to `lss`: how a 4096-byte-sector disk is made, since qemu-img creates
/// only 512. The metadata region has no checksum; a disk of fewer blocks than the chunk
/// ratio has the same BAT layout at either sector size.
fn set_logical_sector_size(p: &Path, lss: u32) {
    let mut b = std::fs::read(p).unwrap();
    let meta = region_offset(&b, 1);
    let e = meta + 32 + 3 * 32;
    assert_eq!(
        LE::read_u32(&b[e..]),
        0x8141bf1d,
        "not the logical sector item"
    );
    let item = meta + LE::read_u32(&b[e + 16..]) as usize;
    LE::write_u32(&mut b[item..], lss);
    std::fs::write(p, b).unwrap();
}

/// The file offset of region `i` of the first region table.
fn region_offset(b: &[u8], i: usize) -> usize {
    LE::read_u64(&b[(192 << 10) + 16 + i * 32 + 16..]) as usize
}

fn crc_fix(b: &mut [u8], at: usize, len: usize) {
    let buf = &mut b[at..at + len];
    buf[4..8].fill(0);
    let c = crc32c::crc32c(buf);
    LE::write_u32(&mut buf[4..], c);
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn qemu_made_images_read_like_qemu_and_ours_pass_its_check() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 40 * MIB;
    for sub in ["dynamic", "fixed"] {
        for bs in ["1M", "8M", "32M", "256M"] {
            for lss in [512u32, 4096] {
                let what = format!("{sub} block_size={bs} lss={lss}");
                let img = d.join(format!("q-{sub}-{bs}-{lss}.vhdx"));
                qemu_create(&img, "40M", &format!("subformat={sub},block_size={bs}"));
                qemu_io(&img, &scattered_writes(size));
                assert_reads_like_qemu(&img, Format::Vhdx, d);
                // The same disk, for what qemu-img cannot open itself.
                let same = d.join("same.vhdx");
                std::fs::copy(&img, &same).unwrap();
                if lss == 4096 {
                    // qemu-img refuses 4096-byte logical sectors ("Operation not
                    // supported"): we must read the same bytes as from the 512 copy.
                    set_logical_sector_size(&img, lss);
                    let (a, b) = (open_as(&img, Format::Vhdx), open_as(&same, Format::Vhdx));
                    assert_eq!(
                        sha256_device(a.as_ref()),
                        sha256_device(b.as_ref()),
                        "{what}"
                    );
                }
                let dev = open_as(&img, Format::Vhdx);
                assert_eq!(dev.info().cluster_size, Some(size_bytes(bs)), "{what}");
                // Blocks qemu never wrote map as zero, without reading.
                let m = dev.map(size / 2 + 8 * MIB, MIB).unwrap();
                if bs == "1M" {
                    assert!(m.is_zero(), "{what}: {m:?}");
                }
                drop(dev);
                // Ours from theirs, both subformats: qemu-img checks and compares.
                for out_sub in ["dynamic", "fixed"] {
                    let ours = d.join(format!("o-{out_sub}.vhdx"));
                    convert(
                        &img,
                        &ours,
                        Format::Vhdx,
                        &[("subformat", out_sub), ("block_size", bs)],
                        false,
                    );
                    assert_qemu_check_clean(&ours, Format::Vhdx);
                    assert_qemu_identical(&same, Format::Vhdx, &ours, Format::Vhdx);
                    std::fs::remove_file(&ours).unwrap();
                }
                std::fs::remove_file(&same).unwrap();
                std::fs::remove_file(&img).unwrap();
            }
        }
    }
}

fn size_bytes(s: &str) -> u64 {
    s.trim_end_matches('M').parse::<u64>().unwrap() * MIB
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn our_images_read_back_in_qemu_at_every_block_size() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = 24 * MIB + 3 * 512;
    make_raw(&src, size, 7);
    for sub in ["dynamic", "fixed"] {
        for bs in ["1M", "8M", "32M", "256M"] {
            let out = dir.path().join(format!("{sub}-{bs}.vhdx"));
            convert(
                &src,
                &out,
                Format::Vhdx,
                &[("subformat", sub), ("block_size", bs)],
                false,
            );
            assert_qemu_check_clean(&out, Format::Vhdx);
            assert_qemu_identical(&src, Format::Raw, &out, Format::Vhdx);
            let v = qemu_info(&out, Format::Vhdx);
            assert_eq!(v["virtual-size"], size, "{sub} {bs}");
            assert_eq!(v["cluster-size"], size_bytes(bs), "{sub} {bs}");
            assert_eq!(
                sha256_device(open_as(&out, Format::Vhdx).as_ref()),
                sha256_file(&src)
            );
            std::fs::remove_file(&out).unwrap();
        }
    }
    // The default block size and log size are qemu's, and qemu-img create agrees.
    let ours = dir.path().join("d.vhdx");
    let theirs = dir.path().join("q.vhdx");
    convert(&src, &ours, Format::Vhdx, &[("log_size", "2M")], false);
    qemu_create(&theirs, &size.to_string(), "log_size=2M");
    let (a, b) = (
        qemu_info(&ours, Format::Vhdx),
        qemu_info(&theirs, Format::Vhdx),
    );
    assert_eq!(a["cluster-size"], b["cluster-size"]);
    assert_eq!(a["virtual-size"], b["virtual-size"]);
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn info_json_has_qemu_img_keys() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("i.vhdx");
    qemu_create(&img, "3G", "");
    let ours: serde_json::Value = serde_json::from_slice(
        &Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .args(["info", "--output=json", s(&img)])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", s(&img)])).unwrap();
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&ours), keys(&theirs));
    for k in ["virtual-size", "cluster-size", "format", "dirty-flag"] {
        assert_eq!(ours[k], theirs[k], "{k}");
    }
}

#[test]
#[cfg_attr(no_bzip2, ignore = "needs bzip2 for the corpus: apt-get install bzip2")]
fn corpus_vhdx_images_read_bit_exact() {
    let Some(c) = corpus_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let entries = corpus_entries(&c);
    let vhdx: Vec<_> = entries
        .iter()
        .filter(|e| e.format.starts_with("vhdx"))
        .collect();
    assert_eq!(vhdx.len(), 3);
    for e in vhdx {
        let p = corpus_file(&c, &e.file, tmp.path());
        assert_eq!(diskconv::probe(&p).unwrap(), Format::Vhdx, "{}", e.file);
        let dev = open_as(&p, Format::Vhdx);
        assert_eq!(Some(dev.virtual_size()), e.virtual_size, "{}", e.file);
        let replayed = dev.info().warnings.iter().any(|w| w.contains("replayed"));
        assert_eq!(replayed, e.file.contains("dirtylog"), "{}", e.file);
        assert_eq!(
            sha256_device(dev.as_ref()),
            e.expected_sha().unwrap(),
            "{}",
            e.file
        );
        drop(dev);
        // The log is replayed in memory only: the file is unchanged.
        if e.file.contains("dirtylog") {
            let before = sha256_file(&p);
            let _ = open_as(&p, Format::Vhdx);
            assert_eq!(sha256_file(&p), before);
            dirty_log_cases(&p, e.expected_sha().unwrap());
        }
        std::fs::remove_file(&p).unwrap();
    }
}

/// The dirty-log image: a log entry with a wrong checksum is no entry (the spec: a torn
/// log write never happened), and a file shorter than the log says it was is refused.
fn dirty_log_cases(p: &Path, after_replay: &str) {
    let b = std::fs::read(p).unwrap();
    // The current header's log offset.
    let h = if LE::read_u64(&b[(64 << 10) + 8..]) > LE::read_u64(&b[(128 << 10) + 8..]) {
        64 << 10
    } else {
        128 << 10
    };
    let log = LE::read_u64(&b[h + 72..]) as usize;
    let log_len = LE::read_u32(&b[h + 68..]) as usize;
    // Its entries (the image holds seven, each naming itself as the tail, only the
    // last with the header's log GUID: only the last is replayed).
    let entries: Vec<usize> = (log..log + log_len)
        .step_by(4096)
        .filter(|&at| &b[at..at + 4] == b"loge")
        .collect();
    assert!(entries.len() > 1, "{entries:?}");
    let q = p.with_extension("badlog.vhdx");
    // The head entry torn: the older entries carry the log GUIDs of earlier sessions
    // (qemu makes a new one for every log write), so nothing is replayed, and the disk
    // is the one before that write.
    let head = *entries
        .iter()
        .max_by_key(|&&at| LE::read_u64(&b[at + 16..]))
        .unwrap();
    let mut bad = b.clone();
    bad[head + 100] ^= 0x55;
    std::fs::write(&q, &bad).unwrap();
    let dev = open_as(&q, Format::Vhdx);
    assert!(!dev.info().warnings.iter().any(|w| w.contains("replayed")));
    assert_ne!(sha256_device(dev.as_ref()), after_replay);
    drop(dev);
    // Truncated below the head entry's flushed file offset.
    let flushed = LE::read_u64(&b[head + 48..]) as usize;
    std::fs::write(&q, &b[..flushed - MIB as usize]).unwrap();
    let e = open_err(&q, &vhdx());
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("flushed_file_offset"), "{e}");
    std::fs::remove_file(&q).unwrap();
}

/// A dynamic image of ours with data, for the damage cases.
fn sample(dir: &Path) -> (PathBuf, Vec<u8>, String) {
    let src = dir.join("sample.raw");
    make_raw(&src, 6 * MIB, 3);
    let img = dir.join("sample.vhdx");
    convert(&src, &img, Format::Vhdx, &[("block_size", "1M")], false);
    let want = sha256_file(&src);
    (img.clone(), std::fs::read(&img).unwrap(), want)
}

#[test]
fn damaged_headers_and_region_tables_fall_back_or_fail_with_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    let (img, b, want) = sample(dir.path());
    let p = dir.path().join("x.vhdx");
    let write = |b: &[u8]| std::fs::write(&p, b).unwrap();
    // One bad header or region table: the other copy serves, with a warning.
    for at in [
        (64usize << 10) + 200,
        (128 << 10) + 200,
        (192 << 10) + 300,
        (256 << 10) + 300,
    ] {
        let mut c = b.clone();
        c[at] ^= 1;
        write(&c);
        let dev = open_as(&p, Format::Vhdx);
        assert_eq!(sha256_device(dev.as_ref()), want, "damage at {at:#x}");
        assert!(!dev.info().warnings.is_empty(), "damage at {at:#x}");
    }
    // Both bad: the checksum error, as invalid format.
    for (a, field) in [
        ((64usize << 10) + 200, "header.checksum"),
        ((192 << 10) + 300, "region_table.checksum"),
    ] {
        let mut c = b.clone();
        c[a] ^= 1;
        c[a + (64 << 10)] ^= 1;
        write(&c);
        let e = open_err(&p, &vhdx());
        assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e}");
        assert_eq!(e.field(), Some(field), "{e}");
    }
    // Two different headers with one sequence number: neither is current.
    let mut c = b.clone();
    let seq = LE::read_u64(&c[(128 << 10) + 8..]);
    LE::write_u64(&mut c[(64 << 10) + 8..], seq);
    c[(64 << 10) + 20] ^= 1;
    crc_fix(&mut c, 64 << 10, 4096);
    write(&c);
    assert_eq!(open_err(&p, &vhdx()).kind(), ErrorKind::Corrupt);
    // Truncation: inside the header section, then inside the payload.
    write(&b[..512 << 10]);
    assert_eq!(open_err(&p, &vhdx()).kind(), ErrorKind::InvalidFormat);
    write(&b[..b.len() - 4096]);
    let e = open_err(&p, &vhdx());
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("past the end of the file"), "{e}");
    // Not a VHDX at all.
    let mut c = b.clone();
    c[0] = b'x';
    write(&c);
    assert_eq!(open_err(&p, &vhdx()).kind(), ErrorKind::InvalidFormat);
    let _ = img;
}

/// A change made to a sample image's bytes.
type Patch = Box<dyn Fn(&mut Vec<u8>)>;

#[test]
fn hostile_fields_are_refused_with_field_and_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (_, b, _) = sample(dir.path());
    let p = dir.path().join("h.vhdx");
    let bat = region_offset(&b, 0);
    let meta = region_offset(&b, 1);
    let size_item = meta + LE::read_u32(&b[meta + 32 + 32 + 16..]) as usize;
    let fix_tables = |c: &mut Vec<u8>| {
        crc_fix(c, 192 << 10, 64 << 10);
        crc_fix(c, 256 << 10, 64 << 10);
    };
    let cases: Vec<(&str, Patch, ErrorKind)> = vec![
        (
            "a 64 TiB disk whose BAT region is 1 MiB",
            Box::new(move |c| LE::write_u64(&mut c[size_item..], 64 << 40)),
            ErrorKind::Corrupt,
        ),
        (
            "a virtual size past 64 TiB",
            Box::new(move |c| LE::write_u64(&mut c[size_item..], u64::MAX - 511)),
            ErrorKind::InvalidFormat,
        ),
        (
            "a BAT entry past the end of the file",
            Box::new(move |c| LE::write_u64(&mut c[bat..], (1 << 40) | 6)),
            ErrorKind::Corrupt,
        ),
        (
            "a BAT entry inside the header section",
            Box::new(move |c| LE::write_u64(&mut c[bat..], 6)),
            ErrorKind::Corrupt,
        ),
        (
            "a payload block over the metadata region",
            Box::new(move |c| LE::write_u64(&mut c[bat..], meta as u64 | 6)),
            ErrorKind::Corrupt,
        ),
        (
            "an undefined block state",
            Box::new(move |c| LE::write_u64(&mut c[bat..], 5)),
            ErrorKind::Corrupt,
        ),
        (
            "partially present in a dynamic disk",
            Box::new(move |c| {
                let e = LE::read_u64(&c[bat..]);
                LE::write_u64(&mut c[bat..], e | 7)
            }),
            ErrorKind::Corrupt,
        ),
        (
            "overlapping regions",
            Box::new(move |c| {
                for t in [192usize << 10, 256 << 10] {
                    LE::write_u64(&mut c[t + 16 + 32 + 16..], bat as u64);
                }
                fix_tables(c);
            }),
            ErrorKind::Corrupt,
        ),
        (
            "a region past the end of the file",
            Box::new(move |c| {
                for t in [192usize << 10, 256 << 10] {
                    LE::write_u64(&mut c[t + 16 + 16..], 1 << 50);
                }
                fix_tables(c);
            }),
            ErrorKind::Corrupt,
        ),
        (
            "a region count past 2047",
            Box::new(move |c| {
                for t in [192usize << 10, 256 << 10] {
                    LE::write_u32(&mut c[t + 8..], 5000);
                }
                fix_tables(c);
            }),
            ErrorKind::InvalidFormat,
        ),
        (
            "an unknown required region",
            Box::new(move |c| {
                for t in [192usize << 10, 256 << 10] {
                    c[t + 16 + 5] ^= 0x40;
                }
                fix_tables(c);
            }),
            ErrorKind::Unsupported,
        ),
        (
            "a block size of 3 MiB",
            Box::new(move |c| {
                let fp = meta + LE::read_u32(&c[meta + 32 + 16..]) as usize;
                LE::write_u32(&mut c[fp..], 3 << 20)
            }),
            ErrorKind::InvalidFormat,
        ),
        (
            "a metadata item outside its region",
            Box::new(move |c| LE::write_u32(&mut c[meta + 32 + 16..], 0xfff_0000)),
            ErrorKind::InvalidFormat,
        ),
        (
            "a logical sector size of 1000",
            Box::new(move |c| {
                let it = meta + LE::read_u32(&c[meta + 32 + 3 * 32 + 16..]) as usize;
                LE::write_u32(&mut c[it..], 1000)
            }),
            ErrorKind::InvalidFormat,
        ),
    ];
    for (what, f, kind) in cases {
        let mut c = b.clone();
        f(&mut c);
        std::fs::write(&p, &c).unwrap();
        let (r, work) = measure(what, || diskconv::open(&p, &vhdx()).map(|_| ()));
        let e = r.expect_err(what);
        assert_eq!(e.kind(), kind, "{what}: {e}");
        assert_work_within(what, &work, 64 << 20, 16 << 20);
    }
}

/// A differencing child of `parent` (a qemu-made dynamic VHDX of 8 MiB with 1 MiB
/// blocks), written by hand as Hyper-V lays one out: has_parent set, a parent locator
/// naming the parent by relative path and data write GUID, and a BAT with one fully
/// present block (0x22), one partially present block (0x33 in the sectors its bitmap
/// marks), one zero block and the rest not present.
fn make_child(dir: &Path, parent: &Path, linkage_ok: bool) -> (PathBuf, Vec<u8>) {
    let child = dir.join("child.vhdx");
    qemu_create(&child, "8M", "block_size=1M");
    let mut b = std::fs::read(&child).unwrap();
    let pb = std::fs::read(parent).unwrap();
    let (h1, h2) = (64usize << 10, 128usize << 10);
    let cur = if LE::read_u64(&pb[h1 + 8..]) > LE::read_u64(&pb[h2 + 8..]) {
        h1
    } else {
        h2
    };
    let g = &pb[cur + 32..cur + 48];
    let mut guid = format!(
        "{{{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}}}",
        LE::read_u32(&g[0..]),
        LE::read_u16(&g[4..]),
        LE::read_u16(&g[6..]),
        g[8],
        g[9],
        g[10..]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    );
    if !linkage_ok {
        guid = guid.replace('a', "b").replace('1', "2");
    }
    let bat = region_offset(&b, 0);
    let meta = region_offset(&b, 1);
    // has_parent
    let fp = meta + LE::read_u32(&b[meta + 32 + 16..]) as usize;
    let bits = LE::read_u32(&b[fp + 4..]);
    LE::write_u32(&mut b[fp + 4..], bits | 2);
    // The parent locator: a sixth metadata entry, its item at 64 KiB + 4 KiB.
    let utf16 = |s: &str| -> Vec<u8> { s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect() };
    let kv = [
        ("parent_linkage", guid.as_str()),
        ("relative_path", ".\\parent.vhdx"),
    ];
    let mut item = Vec::new();
    item.extend_from_slice(&[
        0xb7, 0xef, 0x4a, 0xb0, 0x9e, 0xd1, 0x81, 0x4a, 0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59,
        0x13,
    ]);
    item.extend_from_slice(&0u16.to_le_bytes());
    item.extend_from_slice(&(kv.len() as u16).to_le_bytes());
    let mut strings = Vec::new();
    let mut entries = Vec::new();
    let base = 20 + kv.len() * 12;
    for (k, v) in kv {
        let (kb, vb) = (utf16(k), utf16(v));
        let ko = base + strings.len();
        strings.extend_from_slice(&kb);
        let vo = base + strings.len();
        strings.extend_from_slice(&vb);
        entries.extend_from_slice(&(ko as u32).to_le_bytes());
        entries.extend_from_slice(&(vo as u32).to_le_bytes());
        entries.extend_from_slice(&(kb.len() as u16).to_le_bytes());
        entries.extend_from_slice(&(vb.len() as u16).to_le_bytes());
    }
    item.extend_from_slice(&entries);
    item.extend_from_slice(&strings);
    let item_off = (64 << 10) + 4096;
    b[meta + item_off..meta + item_off + item.len()].copy_from_slice(&item);
    let count = LE::read_u16(&b[meta + 10..]) as usize;
    let e = meta + 32 + count * 32;
    b[e..e + 16].copy_from_slice(&[
        0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab,
        0x0c,
    ]);
    LE::write_u32(&mut b[e + 16..], item_off as u32);
    LE::write_u32(&mut b[e + 20..], item.len() as u32);
    LE::write_u32(&mut b[e + 24..], 4);
    LE::write_u16(&mut b[meta + 10..], count as u16 + 1);
    // The BAT: every payload entry not present (qemu wrote ZERO), then our blocks.
    for i in 0..8 {
        LE::write_u64(&mut b[bat + i * 8..], 0);
    }
    let end = (b.len() as u64).div_ceil(MIB) * MIB;
    let (full, part, bitmap) = (end, end + MIB, end + 2 * MIB);
    LE::write_u64(&mut b[bat..], full | 6);
    LE::write_u64(&mut b[bat + 8..], part | 7);
    LE::write_u64(&mut b[bat + 16..], 2);
    LE::write_u64(&mut b[bat + 4096 * 8..], bitmap | 6);
    b.resize((end + 3 * MIB) as usize, 0);
    b[full as usize..(full + MIB) as usize].fill(0x22);
    b[part as usize..(part + MIB) as usize].fill(0x33);
    // Block 1's sectors are bits 2048..4096 of the chunk's bitmap: mark 2048..2056
    // (its first 4 KiB) and 3000..3002.
    let bm = bitmap as usize;
    b[bm + 2048 / 8] = 0xff;
    b[bm + 3000 / 8] |= 1 << (3000 % 8);
    b[bm + 3001 / 8] |= 1 << (3001 % 8);
    std::fs::write(&child, &b).unwrap();
    // What the guest sees: the parent's 0x11 except where the child says otherwise.
    let mut want = vec![0x11u8; 8 << 20];
    want[..1 << 20].fill(0x22);
    want[(1 << 20)..(1 << 20) + 4096].fill(0x33);
    want[(1 << 20) + (3000 - 2048) * 512..(1 << 20) + (3002 - 2048) * 512].fill(0x33);
    want[2 << 20..3 << 20].fill(0);
    (child, want)
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn differencing_disks_read_their_parent_only_through_the_gate() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.vhdx");
    qemu_create(&parent, "8M", "block_size=1M");
    qemu_io(&parent, &["write -P 0x11 0 8M".to_string()]);
    let (child, want) = make_child(dir.path(), &parent, true);
    // Refused without the opt-in, naming the locator field.
    let e = open_err(&child, &vhdx());
    assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{e}");
    assert!(e.to_string().contains("relative_path"), "{e}");
    let dev = diskconv::open(&child, &vhdx().allow_references(true, None)).unwrap();
    assert_eq!(dev.info().backing_file.as_deref(), Some("parent.vhdx"));
    let mut got = vec![0u8; 8 << 20];
    dev.read_at(&mut got, 0).unwrap();
    assert!(got == want, "differencing read differs");
    // The map says what comes from where: the zero block is zero, not the parent's.
    let m = dev.map(2 << 20, 1 << 20).unwrap();
    assert_eq!(m.kind, MappingKind::Zero);
    let m = dev.map(0, 8 << 20).unwrap();
    assert!(matches!(m.kind, MappingKind::Data { host: Some(_) }));
    assert_eq!(m.len, 1 << 20);
    // A parent changed since the child was made is refused.
    let (child, _) = make_child(dir.path(), &parent, false);
    let e = open_err(&child, &vhdx().allow_references(true, None));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("parent_linkage"), "{e}");
}

#[test]
fn streamed_output_equals_the_file_output() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    make_raw(&src, 5 * MIB + 512, 11);
    for sub in ["dynamic", "fixed"] {
        let file = dir.path().join(format!("f-{sub}.vhdx"));
        let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .args(["convert", "-O", "vhdx", "-o"])
            .arg(format!("subformat={sub},block_size=1M"))
            .args([s(&src), s(&file)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .args(["convert", "-O", "vhdx", "-o"])
            .arg(format!("subformat={sub},block_size=1M"))
            .args([s(&src), "-"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let streamed = dir.path().join(format!("p-{sub}.vhdx"));
        std::fs::write(&streamed, &o.stdout).unwrap();
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            o.stdout.len() as u64,
            "{sub}"
        );
        for p in [&file, &streamed] {
            let dev = open_as(p, Format::Vhdx);
            assert_eq!(sha256_device(dev.as_ref()), sha256_file(&src), "{sub}");
        }
        if have_qemu() {
            assert_qemu_check_clean(&streamed, Format::Vhdx);
            assert_qemu_identical(&src, Format::Raw, &streamed, Format::Vhdx);
        }
    }
}

#[test]
fn create_options_are_validated_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vhdx");
    let create = |size: u64, kv: &[(&str, &str)]| {
        let mut o = diskconv::CreateOptions::new(size);
        for (k, v) in kv {
            o.options.insert(k.to_string(), v.to_string());
        }
        diskconv::create(&p, Format::Vhdx, &o)
    };
    for (size, kv) in [
        (MIB, vec![("block_size", "3M")]),
        (MIB, vec![("log_size", "1536K")]),
        (MIB, vec![("subformat", "differencing")]),
        (65 << 40, vec![]),
        (MIB, vec![("bogus", "1")]),
    ] {
        let e = create(size, &kv).expect_err(&format!("{kv:?}"));
        assert!(
            matches!(
                e.kind(),
                ErrorKind::InvalidArgument | ErrorKind::LimitExceeded
            ),
            "{kv:?}: {e}"
        );
        assert!(!p.exists());
    }
    create(1000, &[]).unwrap();
    assert_eq!(open_as(&p, Format::Vhdx).virtual_size(), 1024);
    create(MIB, &[("block_size", "512K")]).unwrap();
    assert_eq!(open_as(&p, Format::Vhdx).info().cluster_size, Some(MIB));
}
