//! vmdk: qemu-made images of every subformat read bit-exact, our monolithicSparse and
//! streamOptimized outputs judged by qemu-img, the VMware marker stream, the corpus, and
//! hostile inputs.
use crate::common;
use common::*;

use std::path::Path;

use diskconv::{BlockDevice, ErrorKind, Format, MappingKind, OpenOptions};
use proptest::prelude::*;

fn open_refs(p: &Path) -> diskconv::Result<Box<dyn BlockDevice>> {
    diskconv::open(
        p,
        &OpenOptions::new()
            .format(Format::Vmdk)
            .allow_references(true, None),
    )
}

fn err(r: diskconv::Result<Box<dyn BlockDevice>>) -> diskconv::Error {
    match r {
        Ok(_) => panic!("opened an image that must be refused"),
        Err(e) => e,
    }
}

fn open_vmdk(p: &Path) -> diskconv::Result<Box<dyn BlockDevice>> {
    diskconv::open(p, &OpenOptions::new().format(Format::Vmdk))
}

/// Assert `dev` holds the bytes of the raw file `raw` (zero-extended to the device size),
/// reading only where either side has data.
fn assert_same_as_raw(dev: &dyn BlockDevice, raw: &Path) {
    let src = open_as(raw, Format::Raw);
    let size = dev.virtual_size();
    assert!(size >= src.virtual_size(), "device smaller than source");
    let mut off = 0u64;
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    while off < size {
        let m = dev.map(off, (size - off).min(1 << 20)).unwrap();
        assert_eq!(m.offset, off);
        let mut n = m.len;
        let src_zero = if off < src.virtual_size() {
            let sm = src.map(off, n.min(src.virtual_size() - off)).unwrap();
            n = n.min(sm.len);
            sm.is_zero()
        } else {
            true
        };
        if !(m.is_zero() && src_zero) {
            let n = n as usize;
            dev.read_at(&mut a[..n], off).unwrap();
            b[..n].fill(0);
            if off < src.virtual_size() {
                let k = n.min((src.virtual_size() - off) as usize);
                src.read_at(&mut b[..k], off).unwrap();
            }
            assert!(a[..n] == b[..n], "content differs at {off:#x}+{n:#x}");
        }
        off += n;
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn qemu_made_images_read_bit_exact() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    make_raw(&src, (5 << 20) + 1536, 21);
    let cases: &[&str] = &[
        "subformat=monolithicSparse",
        "subformat=monolithicSparse,zeroed_grain=on",
        "subformat=monolithicSparse,adapter_type=lsilogic,hwversion=7",
        "subformat=streamOptimized",
        "subformat=monolithicFlat",
        "subformat=twoGbMaxExtentSparse",
        "subformat=twoGbMaxExtentFlat",
        "compat6=on",
    ];
    for (i, o) in cases.iter().enumerate() {
        let img = dir.path().join(format!("q{i}.vmdk"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            o,
            s(&src),
            s(&img),
        ]);
        let dev = open_refs(&img).unwrap_or_else(|e| panic!("{o}: {e}"));
        assert_same_as_raw(dev.as_ref(), &src);
        let qi = qemu_info(&img, Format::Vmdk);
        assert_eq!(
            dev.virtual_size(),
            qi["virtual-size"].as_u64().unwrap(),
            "{o}"
        );
        let ours = dev.info().format_specific.unwrap();
        let theirs = &qi["format-specific"];
        for k in ["cid", "parent-cid", "create-type"] {
            assert_eq!(ours["data"][k], theirs["data"][k], "{o}: {k}");
        }
        let (oe, te) = (&ours["data"]["extents"], &theirs["data"]["extents"]);
        assert_eq!(
            oe.as_array().unwrap().len(),
            te.as_array().unwrap().len(),
            "{o}"
        );
        for (x, y) in oe.as_array().unwrap().iter().zip(te.as_array().unwrap()) {
            for k in ["virtual-size", "cluster-size", "format", "compressed"] {
                assert_eq!(x.get(k), y.get(k), "{o}: extent {k}");
            }
        }
        if o.contains("Flat") || o.contains("twoGb") {
            // Files named inside the image are refused by default, naming the extent.
            let e = err(open_vmdk(&img));
            assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{o}");
            assert!(e.to_string().contains("extent 0"), "{e}");
        } else {
            assert_reads_like_qemu(&img, Format::Vmdk, dir.path());
        }
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn qemu_split_images_with_several_extents() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    let f = std::fs::File::create(&src).unwrap();
    let size = (2u64 << 30) + (3 << 20);
    f.set_len(size).unwrap();
    use std::os::unix::fs::FileExt;
    let mut rng = Rng(5);
    for at in [0u64, 1 << 20, (2 << 30) - 4096, (2 << 30) + (1 << 20)] {
        let mut b = vec![0u8; 70000];
        rng.fill(&mut b);
        f.write_all_at(&b, at.min(size - 70000)).unwrap();
    }
    drop(f);
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let img = dir.path().join(format!("{sub}.vmdk"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&src),
            s(&img),
        ]);
        let dev = open_refs(&img).unwrap();
        assert_eq!(dev.virtual_size(), size);
        assert_eq!(dev.info().referenced_files.len(), 2, "{sub}");
        assert_same_as_raw(dev.as_ref(), &src);
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn our_images_are_read_by_qemu_and_check_clean() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        0u64,
        512,
        65536,
        3 * 65536 + 512,
        (5 << 20) + 1536,
        (7 << 20) + 513,
    ];
    let variants: &[&[(&str, &str)]] = &[
        &[],
        &[
            ("adapter_type", "lsilogic"),
            ("hwversion", "11"),
            ("zeroed_grain", "on"),
        ],
        &[("subformat", "streamOptimized")],
        &[("subformat", "streamOptimized"), ("compression_level", "0")],
        &[
            ("subformat", "streamOptimized"),
            ("compression_level", "9"),
            ("adapter_type", "buslogic"),
            ("toolsversion", "12345"),
        ],
    ];
    for (si, &size) in sizes.iter().enumerate() {
        let src = dir.path().join(format!("s{si}.raw"));
        make_raw(&src, size, 100 + si as u64);
        for (vi, opts) in variants.iter().enumerate() {
            let out = dir.path().join(format!("o{si}-{vi}.vmdk"));
            if size == 0 {
                // qemu reads capacity 0 as "the descriptor lists the extents" and
                // refuses every empty VMDK, its own included: so we refuse to write one.
                let mut o = diskconv::ConvertOptions::new(Format::Vmdk);
                for (k, v) in opts.iter() {
                    o.create.options.insert(k.to_string(), v.to_string());
                }
                let e = diskconv::convert(&src, &out, &o).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::InvalidArgument);
                assert!(!out.exists());
                continue;
            }
            convert(&src, &out, Format::Vmdk, opts, false);
            let dev = open_as(&out, Format::Vmdk);
            assert_eq!(dev.virtual_size(), size.div_ceil(512) * 512);
            assert_same_as_raw(dev.as_ref(), &src);
            assert_qemu_check_clean(&out, Format::Vmdk);
            assert_qemu_identical(&src, Format::Raw, &out, Format::Vmdk);
            let qi = qemu_info(&out, Format::Vmdk);
            let want = if opts.contains(&("subformat", "streamOptimized")) {
                "streamOptimized"
            } else {
                "monolithicSparse"
            };
            assert_eq!(qi["format-specific"]["data"]["create-type"], want);
            assert_reads_like_qemu(&out, Format::Vmdk, dir.path());
        }
    }
}

#[test]
fn compress_flag_compresses_only_the_stream_subformat() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 1 << 20, 9);
    let out = dir.path().join("c.vmdk");
    // Like qemu's vmdk driver: -c with monolithicSparse stores grains uncompressed, and
    // the writer says so.
    let mut o = diskconv::ConvertOptions::new(Format::Vmdk);
    o.create.compress = true;
    let r = diskconv::convert(&src, &out, &o).unwrap();
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("compression has no effect")),
        "{r:?}"
    );
    assert_same_as_raw(open_as(&out, Format::Vmdk).as_ref(), &src);
    let plain = dir.path().join("p.vmdk");
    convert(&src, &plain, Format::Vmdk, &[], false);
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        std::fs::metadata(&plain).unwrap().len()
    );
    std::fs::remove_file(&out).unwrap();
    convert(
        &src,
        &out,
        Format::Vmdk,
        &[("subformat", "streamOptimized")],
        true,
    );
    assert_same_as_raw(open_as(&out, Format::Vmdk).as_ref(), &src);
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn stream_optimized_output_has_vmware_marker_stream() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    // Data in the first and third grain tables (32 MiB each), none in the second.
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(80 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    let mut rng = Rng(77);
    for at in [0u64, 5 << 20, 70 << 20, (80 << 20) - 1000] {
        let mut b = vec![0u8; 1000];
        rng.fill(&mut b);
        f.write_all_at(&b, at).unwrap();
    }
    drop(f);
    let out = dir.path().join("s.vmdk");
    convert(
        &src,
        &out,
        Format::Vmdk,
        &[("subformat", "streamOptimized")],
        false,
    );
    let b = std::fs::read(&out).unwrap();
    assert_eq!(b.len() % 512, 0);
    let hdr = &b[..512];
    assert_eq!(&hdr[0..4], b"KDMV");
    assert_eq!(le32(hdr, 4), 3, "version 3");
    assert_eq!(le32(hdr, 8), 0x30001, "NL detect + compressed + markers");
    assert_eq!(le64(hdr, 56), u64::MAX, "gdOffset = GD_AT_END");
    assert_eq!(u16::from_le_bytes([hdr[77], hdr[78]]), 1, "deflate");
    let desc = String::from_utf8_lossy(&b[512..512 * (1 + le64(hdr, 36) as usize)]);
    assert!(desc.contains("createType=\"streamOptimized\""));
    assert!(desc.contains("ddb.adapterType = \"lsilogic\""));
    assert!(desc.contains("ddb.toolsVersion"));
    assert!(desc.contains("ddb.virtualHWVersion"));
    // Walk the stream.
    let mut pos = le64(hdr, 64) as usize * 512;
    let mut events = Vec::new();
    let mut grains = std::collections::BTreeMap::new();
    let mut gts = std::collections::BTreeMap::new();
    let mut gd_at = 0;
    while pos < b.len() {
        let (val, size, kind) = (le64(&b, pos), le32(&b, pos + 8), le32(&b, pos + 12));
        if size != 0 {
            grains.insert(pos / 512, val);
            events.push(('g', val));
            pos += (12 + size as usize).next_multiple_of(512);
            continue;
        }
        match kind {
            1 => {
                assert_eq!(val, 4);
                gts.insert(pos / 512 + 1, pos);
                events.push(('t', 0));
            }
            2 => {
                gd_at = pos / 512 + 1;
                events.push(('d', val));
            }
            3 => {
                assert_eq!(val, 1);
                let footer = &b[pos + 512..pos + 1024];
                assert_eq!(&footer[..56], &hdr[..56], "footer equals header");
                assert_eq!(&footer[64..], &hdr[64..], "footer equals header");
                assert_eq!(le64(footer, 56) as usize, gd_at, "footer gdOffset");
                events.push(('f', 0));
            }
            0 => {
                assert_eq!(val, 0);
                assert_eq!(pos, b.len() - 512, "EOS is the last sector");
                events.push(('e', 0));
            }
            k => panic!("unknown marker {k}"),
        }
        pos += 512 + val as usize * 512;
    }
    let order: String = events.iter().map(|e| e.0).collect();
    // Grains of table 0, its GT, grains of table 2, its GT, then GD, footer, EOS.
    assert!(
        order.starts_with('g') && order.ends_with("tdfe"),
        "marker order {order}"
    );
    assert_eq!(
        order.matches('t').count(),
        2,
        "only tables holding grains: {order}"
    );
    let first_t = order.find('t').unwrap();
    assert!(order[..first_t].chars().all(|c| c == 'g'));
    // Grains ascend by LBA.
    let lbas: Vec<u64> = events.iter().filter(|e| e.0 == 'g').map(|e| e.1).collect();
    assert!(lbas.windows(2).all(|w| w[0] < w[1]));
    // GD entries point at the GTs, GT entries at grains carrying the right LBA.
    let gd: Vec<u32> = (0..3).map(|i| le32(&b, gd_at * 512 + 4 * i)).collect();
    assert_eq!(gd[1], 0);
    for (ti, &gt) in gd.iter().enumerate() {
        if gt == 0 {
            continue;
        }
        assert!(gts.contains_key(&(gt as usize)));
        for e in 0..512 {
            let s = le32(&b, gt as usize * 512 + 4 * e) as usize;
            if s != 0 {
                assert_eq!(grains[&s], ((ti * 512 + e) * 128) as u64);
            }
        }
    }
    assert_same_as_raw(open_as(&out, Format::Vmdk).as_ref(), &src);
}

#[test]
#[cfg_attr(no_bzip2, ignore = "needs bzip2 for the corpus: apt-get install bzip2")]
fn corpus_vmdks_read_bit_exact_or_fail_cleanly() {
    let Some(dir) = corpus_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for e in corpus_entries(&dir)
        .into_iter()
        .filter(|e| e.format.starts_with("vmdk") || e.file.contains(".vmdk"))
    {
        let p = corpus_file(&dir, &e.file, tmp.path());
        match e.expected_sha() {
            Some(sha) => {
                let dev = open_vmdk(&p).unwrap_or_else(|err| panic!("{}: {err}", e.file));
                assert_eq!(sha256_device(dev.as_ref()), sha, "{}", e.file);
                assert_eq!(Some(dev.virtual_size()), e.virtual_size, "{}", e.file);
                seen += 1;
            }
            None => {
                let err = within_small_file_budget(&e.file, &p, || open_vmdk(&p))
                    .err()
                    .expect("must fail like qemu-img");
                assert!(
                    matches!(
                        err.kind(),
                        ErrorKind::LimitExceeded | ErrorKind::Corrupt | ErrorKind::InvalidFormat
                    ),
                    "{}: {err}",
                    e.file
                );
            }
        }
    }
    assert!(seen >= 4, "expected the corpus VMDKs");
}

/// A small monolithicSparse image made by us, as bytes.
fn small_sparse(dir: &Path, stream: bool) -> (Vec<u8>, std::path::PathBuf) {
    let src = dir.join("small.raw");
    std::fs::write(&src, vec![7u8; 65536]).unwrap();
    let out = dir.join(if stream { "small-s.vmdk" } else { "small.vmdk" });
    let o: &[(&str, &str)] = if stream {
        &[("subformat", "streamOptimized")]
    } else {
        &[]
    };
    convert(&src, &out, Format::Vmdk, o, false);
    (std::fs::read(&out).unwrap(), out)
}

fn patched(dir: &Path, name: &str, base: &[u8], at: usize, val: &[u8]) -> std::path::PathBuf {
    let mut b = base.to_vec();
    b[at..at + val.len()].copy_from_slice(val);
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn read_all(dev: &dyn BlockDevice) -> diskconv::Result<()> {
    let mut buf = vec![0u8; dev.virtual_size().min(1 << 20) as usize];
    dev.read_at(&mut buf, 0)
}

#[test]
fn bad_inputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, _) = small_sparse(d, false);
    let cases: &[(&str, usize, &[u8], &str)] = &[
        ("grain0", 20, &0u64.to_le_bytes(), "grainSize"),
        ("grainhuge", 20, &(1u64 << 40).to_le_bytes(), "grainSize"),
        ("grain3", 20, &3u64.to_le_bytes(), "grainSize"),
        ("gdpast", 56, &(1u64 << 30).to_le_bytes(), "gdOffset"),
        ("gtes", 44, &500u32.to_le_bytes(), "numGTEsPerGT"),
        ("version", 4, &9u32.to_le_bytes(), "version"),
        ("desc", 36, &100000u64.to_le_bytes(), "descriptorSize"),
        ("capacity", 12, &(1u64 << 50).to_le_bytes(), "capacity"),
        ("nl", 75, b"\n", "singleEndLineChar"),
    ];
    for (name, at, val, field) in cases {
        let p = patched(d, name, &base, *at, val);
        let e = open_vmdk(&p)
            .err()
            .unwrap_or_else(|| panic!("{name} opened"));
        assert_eq!(e.field(), Some(*field), "{name}: {e}");
    }
    // A grain table pointing past the end of the file fails on read, not with a panic.
    let gd = le64(&base, 56) as usize;
    let gt = le32(&base, gd * 512) as usize;
    let p = patched(d, "gte", &base, gt * 512, &0x00ff_ffffu32.to_le_bytes());
    let dev = open_vmdk(&p).unwrap();
    assert_eq!(
        read_all(dev.as_ref()).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    // A GD entry pointing past the end fails on map/read.
    let p = patched(d, "gde", &base, gd * 512, &0x00ff_ffffu32.to_le_bytes());
    let dev = open_vmdk(&p).unwrap();
    assert!(dev.map(0, 1 << 20).is_err());

    // streamOptimized: a compressed grain whose size runs past the file.
    let (sbase, _) = small_sparse(d, true);
    let first = 128 * 512;
    let p = patched(d, "gsize", &sbase, first + 8, &120000u32.to_le_bytes());
    let dev = open_vmdk(&p).unwrap();
    assert_eq!(
        read_all(dev.as_ref()).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
    let p = patched(d, "gzip", &sbase, first + 12, &[0xff; 16]);
    let dev = open_vmdk(&p).unwrap();
    assert!(read_all(dev.as_ref()).is_err());
    // A broken footer.
    let n = sbase.len();
    let p = patched(d, "footer", &sbase, n - 1536 + 12, &9u32.to_le_bytes());
    assert_eq!(err(open_vmdk(&p)).field(), Some("footer"));
    // Truncated to the header alone.
    let p = d.join("trunc.vmdk");
    std::fs::write(&p, &base[..512]).unwrap();
    assert!(open_vmdk(&p).is_err());

    // A 1 KiB file claiming 1 PiB fails in milliseconds without allocating.
    let mut h = base[..1024].to_vec();
    h[12..20].copy_from_slice(&(1u64 << 41).to_le_bytes());
    let p = d.join("huge.vmdk");
    std::fs::write(&p, &h).unwrap();
    assert!(within_small_file_budget("huge.vmdk", &p, || open_vmdk(&p)).is_err());

    // Descriptor over 1 MiB.
    let mut big = b"# Disk DescriptorFile\nversion=1\n".to_vec();
    big.resize((1 << 20) + 10, b'#');
    let p = d.join("bigdesc.vmdk");
    std::fs::write(&p, &big).unwrap();
    assert_eq!(err(open_vmdk(&p)).kind(), ErrorKind::LimitExceeded);

    // seSparse is refused clearly.
    let mut se = vec![0u8; 4096];
    se[..8].copy_from_slice(&0xcafe_babeu64.to_le_bytes());
    let p = d.join("se.vmdk");
    std::fs::write(&p, &se).unwrap();
    assert_eq!(err(open_vmdk(&p)).kind(), ErrorKind::Unsupported);
}

#[test]
fn descriptor_extents_are_confined_to_the_image_folder() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("img");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(dir.path().join("outside.bin"), vec![1u8; 4096]).unwrap();
    std::fs::write(sub.join("data.bin"), vec![2u8; 4096]).unwrap();
    let desc = |extent: &str| {
        format!(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"data.bin\" 0\n{extent}\n"
        )
    };
    for bad in [
        "RW 8 FLAT \"/etc/passwd\" 0",
        "RW 8 FLAT \"../outside.bin\" 0",
        "RW 8 SPARSE \"../outside.bin\"",
        "RW 8 FLAT \"sub/../../outside.bin\" 0",
    ] {
        let p = sub.join("d.vmdk");
        std::fs::write(&p, desc(bad)).unwrap();
        let e = err(open_vmdk(&p));
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{bad}");
        let e = err(open_refs(&p));
        assert_eq!(e.kind(), ErrorKind::UnsafeReference, "{bad}: {e}");
        assert!(e.to_string().contains("extent 1"), "{e}");
    }
    // FLAT + ZERO + FLAT at an offset, all inside the folder, concatenate.
    let p = sub.join("ok.vmdk");
    std::fs::write(&p, desc("RW 4 ZERO\nRDONLY 2 FLAT \"data.bin\" 6\n")).unwrap();
    let dev = open_refs(&p).unwrap();
    assert_eq!(dev.virtual_size(), (8 + 4 + 2) * 512);
    let mut all = vec![9u8; 14 * 512];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all[..4096].iter().all(|&x| x == 2));
    assert!(all[4096..6144].iter().all(|&x| x == 0));
    assert!(all[6144..].iter().all(|&x| x == 2));
    let m = dev.map(4096, 1 << 20).unwrap();
    assert_eq!((m.len, m.kind), (2048, MappingKind::Zero));
    assert_eq!(dev.info().referenced_files, vec!["data.bin", "data.bin"]);
}

#[test]
fn empty_sparse_image_maps_as_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.vmdk");
    diskconv::create(&p, Format::Vmdk, &diskconv::CreateOptions::new(1 << 40)).unwrap();
    assert!(std::fs::metadata(&p).unwrap().len() < 300 << 20);
    let dev = open_vmdk(&p).unwrap();
    // One call answers for the whole TiB, reading each of its 32768 grain tables (2 KiB,
    // all present, all empty) once, with one read call each.
    let (m, work) = measure("mapping an empty TiB", || dev.map(0, 1 << 40).unwrap());
    assert_eq!((m.len, m.kind), (1 << 40, MappingKind::Unallocated));
    let tables = (1u64 << 40) / (512 * 65536);
    assert_work_within(
        "mapping an empty TiB",
        &work,
        tables * 2048 + (1 << 20),
        32 << 20,
    );
    assert!(work.io.reads <= tables + 64, "{work:?}");
    if have_qemu() {
        assert_qemu_check_clean(&p, Format::Vmdk);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn raw_vmdk_raw_round_trip(
        size in 0u64..(3 << 20),
        seed in 1u64..1000,
        stream in any::<bool>(),
        level in 0u32..10,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.raw");
        make_raw(&src, size, seed);
        let out = dir.path().join("a.vmdk");
        let lvl = level.to_string();
        let mut o = vec![("compression_level", lvl.as_str())];
        if stream {
            o.push(("subformat", "streamOptimized"));
        }
        convert(&src, &out, Format::Vmdk, &o, false);
        let dev = open_as(&out, Format::Vmdk);
        prop_assert_eq!(dev.virtual_size(), size.div_ceil(512) * 512);
        assert_same_as_raw(dev.as_ref(), &src);
        let back = dir.path().join("b.raw");
        convert(&out, &back, Format::Raw, &[], false);
        let mut a = std::fs::read(&src).unwrap();
        a.resize(dev.virtual_size() as usize, 0);
        prop_assert!(a == std::fs::read(&back).unwrap());
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn delta_disk_reads_through_its_parent_only_when_allowed() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base_raw = d.join("base.raw");
    make_raw(&base_raw, 4 << 20, 31);
    let base = d.join("base.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", s(&base_raw), s(&base)]);
    let child = d.join("child.vmdk");
    qemu_img(&[
        "create",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        s(&child),
    ]);
    run(&[
        "qemu-io",
        "-c",
        "write -P 0x55 1M 100k",
        "-c",
        "write -P 0x66 3000k 1k",
        s(&child),
    ]);
    assert_eq!(err(open_vmdk(&child)).kind(), ErrorKind::UnsafeReference);
    let dev = open_refs(&child).unwrap();
    assert_eq!(dev.info().backing_file.as_deref(), Some("base.vmdk"));
    let want = d.join("want.raw");
    qemu_img(&["convert", "-f", "vmdk", "-O", "raw", s(&child), s(&want)]);
    assert_eq!(sha256_device(dev.as_ref()), sha256_file(&want));
    // A parent whose CID does not match is refused, as qemu does.
    let mut b = std::fs::read(&child).unwrap();
    // qemu writes the id without leading zeros: change each digit, keep the length.
    let at = b.windows(10).position(|w| w == b"parentCID=").unwrap() + 10;
    let end = at + b[at..].iter().position(|&c| c == b'\n').unwrap();
    for c in &mut b[at..end] {
        *c = if *c == b'1' { b'2' } else { b'1' };
    }
    std::fs::write(&child, &b).unwrap();
    assert_eq!(err(open_refs(&child)).field(), Some("parentCID"));
    // A parentCID that no longer parses (here: its line run into the next) is an error
    // too, never a delta disk read without its parent.
    b[end] = b' ';
    std::fs::write(&child, &b).unwrap();
    let e = err(open_refs(&child));
    assert!(e.message().contains("names a parent"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Damaged images never panic: every open, map and read returns Ok or an error.
    #[test]
    fn mutated_images_never_panic(
        stream in any::<bool>(),
        edits in proptest::collection::vec((0usize..5, any::<u32>(), any::<u8>()), 1..12),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut b, _) = small_sparse(dir.path(), stream);
        let n = b.len();
        for (zone, pos, val) in edits {
            let at = match zone {
                0 | 4 => pos as usize % 512,
                1 => 512 + pos as usize % 2048,
                2 => n - 1 - pos as usize % 2048,
                _ => pos as usize % n,
            };
            if zone == 4 {
                // Whole 64-bit header fields set to extreme values.
                let f = 12 + (pos as usize % 8) * 8;
                b[f..f + 8].fill(val);
            } else {
                b[at] = val;
            }
        }
        let p = dir.path().join("m.vmdk");
        std::fs::write(&p, &b).unwrap();
        if let Ok(dev) = open_vmdk(&p) {
            let size = dev.virtual_size();
            let mut off = 0;
            let mut buf = vec![0u8; 1 << 16];
            for _ in 0..256 {
                if off >= size {
                    break;
                }
                match dev.map(off, size - off) {
                    Ok(m) => {
                        prop_assert!(m.len > 0 && m.offset == off);
                        let k = m.len.min(buf.len() as u64) as usize;
                        let _ = dev.read_at(&mut buf[..k], off);
                        off += m.len;
                    }
                    Err(_) => break,
                }
            }
        }
    }
}

/// seSparse GTE for an allocated grain at cluster `c` (qemu's decoding, inverted).
fn se_alloc(c: u64) -> u64 {
    (3 << 60) | ((c & 0xfff) << 48) | (c >> 12)
}

#[test]
fn sesparse_extent_reads_like_qemu() {
    use diskconv::formats::vmdk::sparse::{SeSparseHeader, SESPARSE_VERSION};
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = SeSparseHeader {
        version: SESPARSE_VERSION,
        capacity: 8192,
        grain_size: 8,
        grain_table_size: 64,
        flags: 0,
        volatile_header_offset: 1,
        grain_dir_offset: 2,
        grain_dir_size: 1,
        grain_tables_offset: 3,
        grains_offset: 67,
    };
    let ext = d.join("t-sesparse.vmdk");
    let f = std::fs::File::create(&ext).unwrap();
    f.write_all_at(&h.to_bytes(), 0).unwrap();
    f.write_all_at(&SeSparseHeader::volatile_bytes(), 512)
        .unwrap();
    f.write_all_at(&0x1000_0000_0000_0000u64.to_le_bytes(), 2 * 512)
        .unwrap();
    // grain -> (GTE, cluster data)
    let mut rng = Rng(3);
    let mut expect = vec![0u8; 8192 * 512];
    let grains: &[(u64, u64)] = &[(0, 0), (7, 1), (100, 2), (1023, 5000)];
    for &(g, c) in grains {
        f.write_all_at(&se_alloc(c).to_le_bytes(), 3 * 512 + g * 8)
            .unwrap();
        let mut b = vec![0u8; 4096];
        rng.fill(&mut b);
        f.write_all_at(&b, (67 + c * 8) * 512).unwrap();
        expect[(g * 4096) as usize..(g * 4096 + 4096) as usize].copy_from_slice(&b);
    }
    // A zeroed grain and a scsi-unmapped one read as zeros.
    f.write_all_at(&(2u64 << 60).to_le_bytes(), 3 * 512 + 8 * 8)
        .unwrap();
    f.write_all_at(&(1u64 << 60).to_le_bytes(), 3 * 512 + 9 * 8)
        .unwrap();
    drop(f);
    let desc = d.join("t.vmdk");
    std::fs::write(
        &desc,
        // No blank line right before the extent: qemu's sscanf skips it and reads the
        // extent twice (once from the blank line), doubling the disk.
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"seSparse\"\n# Extent description\nRW 8192 SESPARSE \"t-sesparse.vmdk\"\n\n#DDB\nddb.adapterType = \"lsilogic\"\n",
    )
    .unwrap();
    let dev = open_refs(&desc).unwrap();
    assert_eq!(dev.virtual_size(), 8192 * 512);
    let mut got = vec![1u8; expect.len()];
    dev.read_at(&mut got, 0).unwrap();
    assert!(got == expect);
    assert_eq!(dev.map(8 * 4096, 1 << 20).unwrap().kind, MappingKind::Zero);
    if have_qemu() {
        let raw = d.join("q.raw");
        qemu_img(&["convert", "-f", "vmdk", "-O", "raw", s(&desc), s(&raw)]);
        assert!(std::fs::read(&raw).unwrap() == expect, "qemu disagrees");
    }
    // A bad grain table entry is an error, not a panic.
    let f = std::fs::OpenOptions::new().write(true).open(&ext).unwrap();
    f.write_all_at(&(7u64 << 60).to_le_bytes(), 3 * 512 + 10 * 8)
        .unwrap();
    drop(f);
    let dev = open_refs(&desc).unwrap();
    assert_eq!(
        dev.read_at(&mut got, 0).unwrap_err().kind(),
        ErrorKind::Corrupt
    );
}

#[test]
fn legacy_cowd_extent_reads_like_qemu() {
    use diskconv::formats::vmdk::sparse::CowdHeader;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.vmdk");
    let h = CowdHeader {
        version: 1,
        flags: 3,
        capacity: 4096,
        grain_size: 8,
        gd_offset: 4,
        gd_entries: 1,
    };
    let f = std::fs::File::create(&p).unwrap();
    f.write_all_at(&h.to_bytes(), 0).unwrap();
    // qemu insists on finding a CID in the text at 0x200.
    f.write_all_at(b"CID=12345678\nparentCID=ffffffff\n", 512)
        .unwrap();
    f.write_all_at(&5u32.to_le_bytes(), 4 * 512).unwrap();
    let mut expect = vec![0u8; 4096 * 512];
    let mut rng = Rng(11);
    for (i, g) in [0u64, 3, 4, 511].iter().enumerate() {
        let sector = 37 + 8 * i as u32;
        f.write_all_at(&sector.to_le_bytes(), 5 * 512 + g * 4)
            .unwrap();
        let mut b = vec![0u8; 4096];
        rng.fill(&mut b);
        f.write_all_at(&b, u64::from(sector) * 512).unwrap();
        expect[(g * 4096) as usize..(g * 4096 + 4096) as usize].copy_from_slice(&b);
    }
    drop(f);
    let dev = open_vmdk(&p).unwrap();
    let mut got = vec![1u8; expect.len()];
    dev.read_at(&mut got, 0).unwrap();
    assert!(got == expect);
    // Grains 3 and 4 are host-contiguous: one mapping.
    let m = dev.map(3 * 4096, 1 << 20).unwrap();
    assert_eq!(m.len, 8192);
    if have_qemu() {
        assert_reads_like_qemu(&p, Format::Vmdk, dir.path());
    }
}
