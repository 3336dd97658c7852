//! Probing (issue 10, items 5 and 5b): a VHD footer in the last sector of a file counts
//! only when the file has a fixed VHD's length, and every format qemu-img reads but we do
//! not is refused by name instead of being converted as raw. Through the library and the
//! CLI (`convert`, `info`, `inspect`), with qemu-img making the foreign images it can.
use crate::common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use diskconv::{ErrorKind, FindingKind, Format, OpenOptions};

/// The CLI's exit code, stdout and stderr.
struct Cli {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn cli(args: &[&str]) -> Cli {
    let out = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .output()
        .expect("run diskconv");
    Cli {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The footer of a fixed VHD of `size` bytes made by our writer.
fn fixed_footer(size: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.vhd");
    let opts = diskconv::CreateOptions::new(size).option("subformat", "fixed");
    diskconv::create(&p, Format::Vhd, &opts).unwrap();
    let b = std::fs::read(&p).unwrap();
    b[b.len() - 512..].to_vec()
}

/// Item 5: an 8 MiB raw disk whose last sector holds a valid footer of a 512-byte fixed
/// VHD is raw, 8 MiB, read verbatim; inspect reports the polyglot; `-f vpc` still reads
/// the footer's disk, because a named format is never second-guessed.
#[test]
fn a_guest_written_footer_does_not_make_a_raw_disk_a_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("guest.img");
    make_raw(&p, 8 << 20, 51);
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 512..].copy_from_slice(&fixed_footer(512));
    std::fs::write(&p, &bytes).unwrap();

    assert_eq!(diskconv::probe(&p).unwrap(), Format::Raw);
    let dev = diskconv::open(&p, &OpenOptions::new()).unwrap();
    assert_eq!(dev.format(), Format::Raw);
    assert_eq!(dev.virtual_size(), 8 << 20);
    assert_eq!(sha256_device(dev.as_ref()), sha256_file(&p));

    let i = diskconv::inspect(&p, None).unwrap();
    assert_eq!(i.detected_format, Some(Format::Raw));
    assert_eq!(i.virtual_size, Some(8 << 20));
    assert!(!i.safe, "{i:?}");
    let poly: Vec<_> = i
        .findings
        .iter()
        .filter(|f| f.kind == FindingKind::Polyglot)
        .collect();
    assert_eq!(poly.len(), 1, "{i:?}");
    assert_eq!(poly[0].format, Some(Format::Vhd));
    assert!(
        poly[0].detail.contains("512-byte disk"),
        "{}",
        poly[0].detail
    );
    let run = cli(&["inspect", p.to_str().unwrap()]);
    assert_eq!(run.code, Some(2), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("Polyglot"), "{}", run.stdout);

    // The CLI converts all 8 MiB, byte for byte.
    let out = dir.path().join("out.raw");
    let run = cli(&["convert", "-O", "raw", s(&p), s(&out)]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(sha256_file(&out), sha256_file(&p));
    let run = cli(&["info", "--output=json", s(&p)]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual-size"], 8u64 << 20);

    // Named, the footer is honoured: the caller chose.
    let named = diskconv::open(&p, &OpenOptions::new().format(Format::Vhd)).unwrap();
    assert_eq!(named.virtual_size(), 512);
    assert!(!named.info().warnings.is_empty(), "size mismatch is warned");

    // qemu-img probes VHDs by the cookie at offset 0 only: it calls this raw too.
    if have_qemu() {
        let q: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", s(&p)])).unwrap();
        assert_eq!(q["format"], "raw");
        assert_eq!(q["virtual-size"], 8u64 << 20);
    }
}

/// Real fixed VHDs keep probing as VHDs: qemu's, ours, and the 511-byte footer quirk.
#[test]
fn fixed_vhds_of_the_right_shape_still_probe() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    make_raw(&raw, (3 << 20) + 1024, 52);
    let ours = dir.path().join("ours.vhd");
    convert(&raw, &ours, Format::Vhd, &[("subformat", "fixed")], false);
    assert_eq!(diskconv::probe(&ours).unwrap(), Format::Vhd);
    let i = diskconv::inspect(&ours, Some(Format::Vhd)).unwrap();
    assert!(i.safe, "{:?}", i.findings);
    let mut b = std::fs::read(&ours).unwrap();
    b.pop();
    let short = dir.path().join("short.vhd");
    std::fs::write(&short, &b).unwrap();
    assert_eq!(diskconv::probe(&short).unwrap(), Format::Vhd);
    // Old qemu ("qemu" creator) wrote the size asked as current_size and the geometry's,
    // larger, as the data: its rule (the geometry) fits the file, so it is a VHD. The same
    // footer from a creator sized by current_size does not fit: raw.
    let chs_size = 5_257_216u64; // 151/4/17, what the spec's algorithm gives for 5 MiB
    let exact = dir.path().join("chs.vhd");
    diskconv::create(
        &exact,
        Format::Vhd,
        &diskconv::CreateOptions::new(chs_size).option("subformat", "fixed"),
    )
    .unwrap();
    for (creator, want) in [(b"qemu", Format::Vhd), (b"win ", Format::Raw)] {
        let mut b = std::fs::read(&exact).unwrap();
        let n = b.len();
        let f = &mut b[n - 512..];
        f[28..32].copy_from_slice(creator);
        f[48..56].copy_from_slice(&(5u64 << 20).to_be_bytes());
        f[64..68].fill(0);
        let sum = !f.iter().fold(0u32, |a, &x| a.wrapping_add(x as u32));
        f[64..68].copy_from_slice(&sum.to_be_bytes());
        let p = dir.path().join("old-qemu.vhd");
        std::fs::write(&p, &b).unwrap();
        assert_eq!(diskconv::probe(&p).unwrap(), want);
        if want == Format::Vhd {
            let dev = diskconv::open(&p, &OpenOptions::new()).unwrap();
            assert_eq!(dev.virtual_size(), chs_size);
        }
    }
    if have_qemu() {
        for force in ["on", "off"] {
            let q = dir.path().join(format!("q-{force}.vhd"));
            let o = format!("subformat=fixed,force_size={force}");
            qemu_img(&[
                "convert",
                "-f",
                "raw",
                "-O",
                "vpc",
                "-o",
                &o,
                s(&raw),
                s(&q),
            ]);
            assert_eq!(diskconv::probe(&q).unwrap(), Format::Vhd, "{o}");
        }
    }
}

/// A file carrying `magic` at offset 0 followed by pseudo-random data, `len` bytes.
fn with_magic(dir: &Path, name: &str, magic: &[u8], len: usize) -> PathBuf {
    let mut b = vec![0u8; len];
    Rng(7).fill(&mut b);
    b[..magic.len()].copy_from_slice(magic);
    let p = dir.join(name);
    std::fs::write(&p, &b).unwrap();
    p
}

/// Everything a user can do with a file of a format we do not read: probing, `convert`
/// and `info` refuse it naming the format (and leave no output), `inspect` calls it
/// unsupported and unsafe, and `-f raw` reads the file's bytes.
fn assert_refused(p: &Path, name: &str) {
    let what = format!("{} ({name})", p.display());
    let want = format!(
        "{name} images are not supported yet; use -f raw to read the file's bytes as a disk"
    );
    let e = diskconv::probe(p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{what}: {e}");
    assert!(e.to_string().contains(&want), "{what}: {e}");
    let e = diskconv::open(p, &OpenOptions::new()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{what}: {e}");

    let i = diskconv::inspect(p, None).unwrap();
    assert!(!i.safe, "{what}");
    assert_eq!(i.detected_format, None, "{what}");
    assert_eq!(i.unsupported_format.as_deref(), Some(name), "{what}");
    assert!(i.has(FindingKind::ForeignFormat), "{what}");
    let i = diskconv::inspect(p, Some(Format::Raw)).unwrap();
    assert!(!i.safe && i.has(FindingKind::FormatMismatch), "{what}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    for args in [
        vec!["convert", "-O", "raw", s(p), s(&out)],
        vec!["convert", "-O", "qcow2", s(p), s(&out)],
        vec!["info", s(p)],
    ] {
        let run = cli(&args);
        assert_eq!(run.code, Some(1), "{what}: {args:?}: {}", run.stderr);
        assert!(run.stderr.contains(&want), "{what}: {}", run.stderr);
        assert!(!out.exists(), "{what}: {args:?} left output");
    }
    let run = cli(&["inspect", "--output=json", s(p)]);
    assert_eq!(run.code, Some(2), "{what}: {}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["safe"], false);
    assert_eq!(v["unsupported-format"], name);
    let run = cli(&["inspect", s(p)]);
    assert!(
        run.stdout
            .contains(&format!("detected format: {name} (not supported)")),
        "{what}: {}",
        run.stdout
    );

    // -f raw still forces raw: the file's own bytes, all of them (a length that is not a
    // whole number of sectors rounds up with zeros, as qemu-img reads it).
    let len = std::fs::metadata(p).unwrap().len();
    let dev = diskconv::open(p, &OpenOptions::new().format(Format::Raw)).unwrap();
    assert_eq!(dev.virtual_size(), len.next_multiple_of(512));
    let run = cli(&["convert", "-f", "raw", "-O", "raw", s(p), s(&out)]);
    assert_eq!(run.code, Some(0), "{what}: {}", run.stderr);
    let mut want = std::fs::read(p).unwrap();
    want.resize(len.next_multiple_of(512) as usize, 0);
    assert_eq!(std::fs::read(&out).unwrap(), want, "{what}");
    let run = cli(&["info", "-f", "raw", "--output=json", s(p)]);
    assert_eq!(run.code, Some(0), "{what}: {}", run.stderr);
}

/// Item 5b, each signature of qemu's probe functions, hand-made as qemu checks them.
#[test]
fn every_foreign_signature_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut bochs = vec![0u8; 72];
    bochs[..22].copy_from_slice(b"Bochs Virtual HD Image");
    bochs[32..39].copy_from_slice(b"Redolog");
    bochs[48..55].copy_from_slice(b"Growing");
    bochs[64..68].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    let cloop: &[u8] =
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("luks", b"LUKS\xba\xbe\0\x01".to_vec()),
        ("parallels", b"WithoutFreeSpace\x02\0\0\0".to_vec()),
        ("parallels", b"WithouFreSpacExt\x02\0\0\0".to_vec()),
        ("bochs", bochs),
        ("cloop", cloop.to_vec()),
    ];
    for (i, (name, magic)) in cases.iter().enumerate() {
        let p = with_magic(d, &format!("img{i}"), magic, 1 << 20);
        assert_refused(&p, name);
    }
    // dmg: the 512-byte "koly" trailer at the end.
    let p = with_magic(d, "trailer.img", b"", 1 << 20);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 512..].fill(0);
    b[n - 512..n - 508].copy_from_slice(b"koly");
    std::fs::write(&p, &b).unwrap();
    assert_refused(&p, "dmg");
}

/// The foreign formats qemu-img can make: it says what they are, and we refuse each by
/// that name.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn qemu_made_foreign_images_are_refused_by_name() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["parallels", "luks"] {
        let p = dir.path().join(format!("x.{fmt}"));
        let mut args = vec!["create", "-q", "-f", fmt];
        if fmt == "luks" {
            args.extend([
                "--object",
                "secret,id=s0,data=diskconv",
                "-o",
                "key-secret=s0,iter-time=10",
            ]);
        }
        args.extend([s(&p), "4M"]);
        qemu_img(&args);
        // qemu-img probes each as its format (luks too: info needs no secret).
        let v: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", s(&p)])).unwrap();
        assert_eq!(v["format"], fmt);
        assert_refused(&p, fmt);
    }
}

/// The VHDX images of the shared corpus (Hyper-V, Disk2VHD, qemu) probe as vhdx.
#[test]
fn corpus_vhdx_images_probe_as_vhdx() {
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
        std::fs::remove_file(&p).unwrap();
    }
}

/// A footer that does not fit the file, beside another format's header, still makes the
/// file ambiguous (it is no longer a fixed VHD's footer on raw data), and inspect names
/// both formats.
#[test]
fn a_distrusted_footer_beside_a_header_is_ambiguous() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = b"QFI\xfb\0\0\0\x03".to_vec();
    b.resize(64 << 10, 0);
    b.extend_from_slice(&fixed_footer(1 << 20));
    let p = dir.path().join("poly");
    std::fs::write(&p, &b).unwrap();
    let e = diskconv::probe(&p).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidFormat);
    assert!(e.message().contains("(qcow2, vpc)"), "{e}");
    let i = diskconv::inspect(&p, None).unwrap();
    assert_eq!(i.claiming_formats, vec!["qcow2", "vpc"]);
    assert!(!i.safe);
    let run = cli(&["inspect", s(&p)]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stdout
            .contains("detected format: ambiguous (qcow2, vpc)"),
        "{}",
        run.stdout
    );
}
