//! qemu-img parity of the command line, judged by qemu-img itself: `-S`, `-c`, `-o help`,
//! `-q`, `-p`, usage errors, signals, `-U`/`-T`/`-r`/`--salvage`, `create`, and `info`
//! on vmdk descriptors, backing files and odd-sized files (issue 10, items 6 and 9-19).
use crate::common;
use common::*;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use diskconv::Format;

const MIB: u64 = 1 << 20;

fn dc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .output()
        .unwrap()
}

fn qemu(args: &[&str]) -> Output {
    Command::new("qemu-img").args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "{:?}: {}{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// Bytes the filesystem allocated to the file.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// A 64 MiB raw file holding 4 KiB of data every 256 KiB, holes between: the kind of
/// image where a large `-S` used to write the holes out.
fn small_holes(dir: &Path) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join("holes.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 * MIB).unwrap();
    let mut rng = Rng(77);
    let mut buf = vec![0u8; 4096];
    for off in (0..64 * MIB).step_by(256 << 10) {
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).unwrap();
    }
    p
}

/// Only the entries of `dir` (names), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn large_sparse_sizes_keep_source_holes_as_holes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = small_holes(dir.path());
    for (fmt, opts) in [
        (Format::Raw, ""),
        (Format::Qcow2, ""),
        (Format::Vdi, "static=on"),
        (Format::Vdi, ""),
        (Format::Vhd, "subformat=fixed"),
        (Format::Vhd, ""),
        (Format::Vmdk, ""),
    ] {
        for sz in ["4k", "64k", "1M", "16M"] {
            let ours = dir.path().join(format!("d{sz}{opts}.{}", fmt.name()));
            let theirs = dir.path().join(format!("q{sz}{opts}.{}", fmt.name()));
            let mut a = vec!["convert", "-O", fmt.name(), "-S", sz];
            if !opts.is_empty() {
                a.extend(["-o", opts]);
            }
            let mut d = a.clone();
            d.extend([s(&src), s(&ours)]);
            ok(&dc(&d));
            let mut q = a.clone();
            q.extend([s(&src), s(&theirs)]);
            ok(&qemu(&q));
            let (da, qa) = (allocated(&ours), allocated(&theirs));
            assert!(
                da <= qa,
                "{fmt} -S {sz}: we allocate {da} bytes, qemu-img {qa}"
            );
            // 16 data pieces of 4 KiB per 4 MiB at most a granule each: far from 64 MiB.
            assert!(da < 20 * MIB, "{fmt} -S {sz}: {da} bytes allocated");
            assert_qemu_identical(&ours, fmt, &src, Format::Raw);
            if fmt != Format::Raw && fmt != Format::Vhd {
                assert_qemu_check_clean(&ours, fmt);
            }
        }
    }
}

#[test]
fn sparse_size_is_checked_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, MIB, 3);
    let dst = dir.path().join("b.raw");
    let bad_multiple = "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).";
    for (arg, msg) in [
        ("1", bad_multiple.to_string()),
        ("100", bad_multiple.to_string()),
        ("1G", bad_multiple.to_string()),
        ("32M", bad_multiple.to_string()),
        (
            "abc",
            "Invalid buffer size for sparse output specified: 'abc'.".to_string(),
        ),
        (
            "-1",
            "Invalid buffer size for sparse output specified. Must be between 0 and 9223372036854775807.".to_string(),
        ),
    ] {
        let o = dc(&["convert", "-S", arg, s(&src), s(&dst)]);
        assert_eq!(o.status.code(), Some(1), "-S {arg}");
        assert!(text(&o.stderr).contains(&msg), "-S {arg}: {}", text(&o.stderr));
        assert!(!dst.exists());
        if have_qemu() {
            let q = qemu(&["convert", "-S", arg, s(&src), s(&dst)]);
            assert_eq!(q.status.code(), Some(1), "qemu-img -S {arg}");
            assert!(text(&q.stderr).contains(&msg), "{}", text(&q.stderr));
            let _ = std::fs::remove_file(&dst);
        }
    }
    for arg in ["0", "512", "1.5k", "16M"] {
        ok(&dc(&["convert", "-S", arg, s(&src), s(&dst)]));
        assert_eq!(sha256_file(&src), sha256_file(&dst), "-S {arg}");
    }
}

#[test]
fn compress_is_refused_where_qemu_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 2 * MIB, 5);
    for fmt in ["raw", "vpc", "vdi"] {
        let dst = dir.path().join(format!("c.{fmt}"));
        let o = dc(&["convert", "-c", "-O", fmt, s(&src), s(&dst)]);
        assert_eq!(o.status.code(), Some(1), "{fmt}");
        let e = text(&o.stderr);
        assert!(
            e.contains("Compression not supported for this file format"),
            "{fmt}: {e}"
        );
        assert!(!dst.exists());
        if have_qemu() {
            let q = qemu(&["convert", "-c", "-O", fmt, s(&src), s(&dst)]);
            assert_eq!(q.status.code(), Some(1));
            assert!(text(&q.stderr).contains("Compression not supported for this file format"));
        }
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn compress_with_monolithic_sparse_vmdk_stores_grains_as_qemu_does() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 4 * MIB, 8);
    let plain = dir.path().join("plain.vmdk");
    let ours = dir.path().join("c.vmdk");
    let theirs = dir.path().join("q.vmdk");
    ok(&dc(&["convert", "-O", "vmdk", s(&src), s(&plain)]));
    let o = dc(&["convert", "-c", "-O", "vmdk", s(&src), s(&ours)]);
    ok(&o);
    assert!(
        text(&o.stderr).contains("compression has no effect on subformat monolithicSparse"),
        "{}",
        text(&o.stderr)
    );
    ok(&qemu(&["convert", "-c", "-O", "vmdk", s(&src), s(&theirs)]));
    // qemu-img writes the grains uncompressed: same length as without -c; so do we.
    let q_plain = dir.path().join("qplain.vmdk");
    ok(&qemu(&["convert", "-O", "vmdk", s(&src), s(&q_plain)]));
    assert_eq!(file_len(&theirs), file_len(&q_plain));
    assert_eq!(file_len(&ours), file_len(&plain));
    assert_qemu_identical(&ours, Format::Vmdk, &src, Format::Raw);
    assert_qemu_check_clean(&ours, Format::Vmdk);
    // -q silences the note.
    let quiet = dir.path().join("quiet.vmdk");
    let o = dc(&["convert", "-q", "-c", "-O", "vmdk", s(&src), s(&quiet)]);
    ok(&o);
    assert_eq!(text(&o.stderr), "");
    // streamOptimized compresses.
    let st = dir.path().join("s.vmdk");
    let o = dc(&[
        "convert",
        "-c",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        s(&src),
        s(&st),
    ]);
    ok(&o);
    assert_eq!(text(&o.stderr), "");
    assert!(file_len(&st) < file_len(&plain));
    assert_qemu_identical(&st, Format::Vmdk, &src, Format::Raw);
}

fn size_bytes(s: &str) -> u64 {
    diskconv::parse_size(s).unwrap()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn zero_byte_vmdk_is_refused_because_qemu_cannot_open_one() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("empty.raw");
    std::fs::write(&src, b"").unwrap();
    for sub in ["monolithicSparse", "streamOptimized"] {
        let dst = dir.path().join(format!("{sub}.vmdk"));
        let opt = format!("subformat={sub}");
        let o = dc(&["convert", "-O", "vmdk", "-o", &opt, s(&src), s(&dst)]);
        assert_eq!(o.status.code(), Some(1), "{sub}");
        assert!(
            text(&o.stderr).contains("a vmdk cannot be 0 bytes"),
            "{}",
            text(&o.stderr)
        );
        let o = dc(&["create", "-f", "vmdk", "-o", &opt, s(&dst), "0"]);
        assert_eq!(o.status.code(), Some(1), "create {sub}");
        assert!(!dst.exists());
        if have_qemu() {
            // Why we refuse: what qemu-img makes of it, qemu-img itself cannot open.
            let q = dir.path().join(format!("q-{sub}.vmdk"));
            ok(&qemu(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &opt,
                s(&q),
                "0",
            ]));
            let i = qemu(&["info", s(&q)]);
            assert!(!i.status.success(), "qemu-img opened its 0-byte {sub} vmdk");
        }
    }
    // Other formats represent 0 bytes and qemu-img opens them.
    if have_qemu() {
        for fmt in ["raw", "qcow2", "vdi"] {
            let dst = dir.path().join(format!("z.{fmt}"));
            ok(&dc(&["convert", "-O", fmt, s(&src), s(&dst)]));
            let v = qemu_info(&dst, Format::from_name(fmt).unwrap());
            assert_eq!(v["virtual-size"], 0, "{fmt}");
        }
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn static_vdi_leaves_unwritten_blocks_as_holes() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = small_holes(dir.path());
    let ours = dir.path().join("d.vdi");
    let theirs = dir.path().join("q.vdi");
    ok(&dc(&[
        "convert",
        "-O",
        "vdi",
        "-o",
        "static=on",
        s(&src),
        s(&ours),
    ]));
    ok(&qemu(&[
        "convert",
        "-O",
        "vdi",
        "-o",
        "static=on",
        s(&src),
        s(&theirs),
    ]));
    // The file length is what makes it static.
    assert_eq!(file_len(&ours), file_len(&theirs));
    let (da, qa) = (allocated(&ours), allocated(&theirs));
    assert!(da <= qa, "we allocate {da} bytes, qemu-img {qa}");
    assert!(da < 4 * MIB, "{da}");
    assert_qemu_check_clean(&ours, Format::Vdi);
    assert_qemu_identical(&ours, Format::Vdi, &src, Format::Raw);
    let v = qemu_info(&ours, Format::Vdi);
    assert_eq!(v["virtual-size"], 64 * MIB);
}

#[test]
fn option_help_needs_no_files() {
    let o = dc(&["convert", "-O", "qcow2", "-o", "help"]);
    ok(&o);
    assert!(
        text(&o.stdout).contains("cluster_size"),
        "{}",
        text(&o.stdout)
    );
    let o = dc(&["create", "-f", "vdi", "-o", "help"]);
    ok(&o);
    let ours = text(&o.stdout);
    // qemu-img's layout: its header line, then `  name=<type>` padded to 22, ` - `, help.
    assert!(ours.starts_with("Supported vdi options:\n"), "{ours}");
    assert!(ours.contains("\n  static=<bool (on/off)> - "), "{ours}");
    if have_qemu() {
        let q = text(&qemu(&["create", "-f", "vdi", "-o", "help"]).stdout);
        assert_eq!(q.lines().next(), ours.lines().next());
        assert!(q.contains("\n  static=<bool (on/off)> - "), "{q}");
    }
}

#[test]
fn usage_errors_exit_1_like_qemu() {
    for args in [
        vec!["convert"],
        vec!["convert", "only-one"],
        vec!["convert", "-Z", "a", "b"],
        vec!["frobnicate"],
        vec![],
        vec!["create"],
        vec!["create", "-f", "raw", "x.img"],
        vec!["info"],
    ] {
        let o = dc(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o.stderr));
        assert!(!text(&o.stderr).is_empty(), "{args:?}");
    }
    if have_qemu() {
        for args in [vec!["convert"], vec!["convert", "-Z", "a", "b"]] {
            assert_eq!(qemu(&args).status.code(), Some(1), "qemu-img {args:?}");
        }
    }
    for args in [vec!["--help"], vec!["convert", "--help"], vec!["--version"]] {
        ok(&dc(&args));
    }
}

#[test]
fn help_shows_usage_and_format_names() {
    let o = dc(&["convert", "--help"]);
    ok(&o);
    let h = text(&o.stdout);
    assert!(h.contains("diskconv convert [OPTIONS] SRC DST"), "{h}");
    assert!(!h.contains("[DST]"), "{h}");
    assert!(h.contains("raw qcow2 vpc (alias vhd) vmdk vdi"), "{h}");
    let o = dc(&["--help"]);
    assert!(text(&o.stdout).contains("raw qcow2 vpc (alias vhd) vmdk vdi"));
}

#[test]
fn progress_goes_to_stdout_and_quiet_silences_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 3 * MIB, 2);
    let dst = dir.path().join("b.raw");
    let o = dc(&["convert", "-p", "-O", "raw", s(&src), s(&dst)]);
    ok(&o);
    let out = text(&o.stdout);
    assert!(out.starts_with("    (0.00/100%)\r"), "{out:?}");
    assert!(out.contains("    (100.00/100%)\r"), "{out:?}");
    assert_eq!(text(&o.stderr), "");
    if have_qemu() {
        let q = qemu(&["convert", "-p", "-O", "raw", s(&src), s(&dst)]);
        assert!(text(&q.stdout).contains("    (100.00/100%)\r"));
    }
    let o = dc(&["convert", "-p", "-q", "-O", "raw", s(&src), s(&dst)]);
    ok(&o);
    assert_eq!(text(&o.stdout), "");
    assert_eq!(sha256_file(&src), sha256_file(&dst));
}

/// Start a conversion slowed by `-r` so it is still running, send `sig`, and return how
/// the process ended.
fn interrupted(
    prog: &str,
    extra: &[&str],
    src: &Path,
    dst: &Path,
    sig: i32,
) -> std::process::ExitStatus {
    let mut args = vec!["convert", "-r", "1M", "-O", "qcow2"];
    args.extend_from_slice(extra);
    args.extend([s(src), s(dst)]);
    let mut child = Command::new(prog)
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The rate limit keeps 32 MiB of data busy for about 30 s; 0.5 s is only the head
    // start the process needs to be writing, not a bound on anything.
    std::thread::sleep(std::time::Duration::from_millis(500));
    unsafe { libc::kill(child.id() as i32, sig) };
    child.wait().unwrap()
}

#[test]
fn signals_end_the_process_like_qemu_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    {
        let mut rng = Rng(5);
        let mut buf = vec![0u8; (32 * MIB) as usize];
        rng.fill(&mut buf);
        std::fs::write(&src, &buf).unwrap();
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let dst = dir.path().join("out.qcow2");
        let st = interrupted(env!("CARGO_BIN_EXE_diskconv"), &[], &src, &dst, sig);
        assert_eq!(st.signal(), Some(sig), "diskconv: {st:?}");
        assert_eq!(names(dir.path()), vec!["a.raw"], "nothing left after {sig}");
        if have_qemu() {
            let st = interrupted("qemu-img", &[], &src, &dst, sig);
            assert_eq!(st.signal(), Some(sig), "qemu-img: {st:?}");
            let _ = std::fs::remove_file(&dst);
        }
    }
}

#[test]
fn force_share_cache_and_rate_flags_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 2 * MIB, 6);
    let dst = dir.path().join("b.qcow2");
    ok(&dc(&[
        "convert",
        "-U",
        "--force-share",
        "-T",
        "none",
        "-r",
        "1G",
        "--rate",
        "1.5G",
        "-O",
        "qcow2",
        s(&src),
        s(&dst),
    ]));
    if have_qemu() {
        assert_qemu_identical(&dst, Format::Qcow2, &src, Format::Raw);
    }
    std::fs::remove_file(&dst).unwrap();
    for (args, msg) in [
        (vec!["-T", "foo"], "Invalid source cache option: foo"),
        (vec!["-t", "bar"], "Invalid cache option: bar"),
        (vec!["-r", "abc"], "Invalid rate limit specified: 'abc'."),
        (vec!["-r", "1x"], "Invalid rate limit specified: '1x'."),
        (
            vec!["-r", "-5"],
            "Invalid rate limit specified. Must be between 0 and 9223372036854775807.",
        ),
    ] {
        let mut a = vec!["convert"];
        a.extend_from_slice(&args);
        a.extend([s(&src), s(&dst)]);
        let o = dc(&a);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            text(&o.stderr).contains(msg),
            "{args:?}: {}",
            text(&o.stderr)
        );
        assert!(!dst.exists());
        if have_qemu() {
            let mut q = vec!["convert"];
            q.extend_from_slice(&args);
            q.extend([s(&src), s(&dst)]);
            let o = qemu(&q);
            assert_eq!(o.status.code(), Some(1), "qemu-img {args:?}");
            assert!(text(&o.stderr).contains(msg), "{}", text(&o.stderr));
            // qemu-img checks -t only after creating the output (and leaves it).
            let _ = std::fs::remove_file(&dst);
        }
    }
}

/// A compressed qcow2 (made by qemu-img) whose fourth cluster's L2 entry points far past
/// the end of the file, so reading that cluster fails in both tools.
fn qcow2_with_unreadable_cluster(dir: &Path) -> (PathBuf, PathBuf) {
    let raw = dir.join("src.raw");
    {
        let mut b = vec![0u8; (2 * MIB) as usize];
        for (i, c) in b.iter_mut().enumerate() {
            *c = b"salvage me, said the disk "[i % 26];
        }
        std::fs::write(&raw, &b).unwrap();
    }
    let img = dir.join("broken.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&raw), s(&img)]);
    let mut bytes = std::fs::read(&img).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let cluster_bits = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let e = be64(&bytes, l2 + 3 * 8);
    let x = 62 - (cluster_bits - 8);
    assert_ne!(e & (1 << 62), 0, "cluster 3 is compressed");
    let sectors = (e >> x) & ((1u64 << (cluster_bits - 8)) - 1);
    let new = (1u64 << 62) | (sectors << x) | (1u64 << 36);
    bytes[l2 + 24..l2 + 32].copy_from_slice(&new.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    (img, raw)
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn salvage_writes_zeros_for_unreadable_ranges_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qcow2_with_unreadable_cluster(dir.path());
    let ours = dir.path().join("d.raw");
    let theirs = dir.path().join("q.raw");
    let o = dc(&["convert", "-O", "raw", s(&img), s(&ours)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!ours.exists());
    assert_eq!(
        qemu(&["convert", "-O", "raw", s(&img), s(&theirs)])
            .status
            .code(),
        Some(1)
    );
    let o = dc(&["convert", "--salvage", "-O", "raw", s(&img), s(&ours)]);
    ok(&o);
    let e = text(&o.stderr);
    assert!(
        e.contains("could not read 65536 bytes at offset 196608 (0x30000); wrote zeros"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "one line per range: {e}");
    // Still reported with -q: the lines say which guest bytes were lost.
    let quiet = dir.path().join("quiet.raw");
    let o = dc(&[
        "convert",
        "-q",
        "--salvage",
        "-O",
        "raw",
        s(&img),
        s(&quiet),
    ]);
    ok(&o);
    assert!(
        text(&o.stderr).contains("wrote zeros"),
        "{}",
        text(&o.stderr)
    );
    ok(&qemu(&[
        "convert",
        "--salvage",
        "-O",
        "raw",
        s(&img),
        s(&theirs),
    ]));
    assert_eq!(sha256_file(&ours), sha256_file(&theirs));
    let bytes = std::fs::read(&ours).unwrap();
    assert!(bytes[196608..262144].iter().all(|&b| b == 0));
    assert!(bytes[..196608].iter().all(|&b| b != 0));
    // Into a compressed output too (one granule per unit there).
    let oq = dir.path().join("d.qcow2");
    ok(&dc(&[
        "convert",
        "--salvage",
        "-c",
        "-O",
        "qcow2",
        s(&img),
        s(&oq),
    ]));
    assert_qemu_identical(&oq, Format::Qcow2, &theirs, Format::Raw);
    assert_qemu_check_clean(&oq, Format::Qcow2);
}

#[test]
fn create_prints_and_makes_what_qemu_img_create_does() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("raw", "", "1G"),
        ("qcow2", "", "1G"),
        ("qcow2", "cluster_size=4k,compat=0.10", "10M"),
        ("vpc", "", "1G"),
        ("vpc", "subformat=fixed", "10M"),
        ("vmdk", "", "1G"),
        ("vmdk", "subformat=streamOptimized", "10M"),
        ("vdi", "", "1G"),
        ("vdi", "static=on", "10M"),
        ("vhdx", "", "1G"),
        ("vhdx", "subformat=fixed", "10M"),
    ];
    for (i, (fmt, opts, size)) in cases.iter().enumerate() {
        let name = format!("img{i}.{fmt}");
        let ours = dir.path().join("ours").join(&name);
        let theirs = dir.path().join("theirs").join(&name);
        std::fs::create_dir_all(ours.parent().unwrap()).unwrap();
        std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
        let mut a = vec!["create", "-f", fmt];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        // Run from each folder so both print the same relative name.
        let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .args(&a)
            .args([&name, *size])
            .current_dir(ours.parent().unwrap())
            .output()
            .unwrap();
        ok(&o);
        let line = text(&o.stdout);
        assert!(
            line.starts_with(&format!("Formatting '{name}', fmt={fmt} ")),
            "{line}"
        );
        if !have_qemu() {
            continue;
        }
        let q = Command::new("qemu-img")
            .args(&a)
            .args([&name, *size])
            .current_dir(theirs.parent().unwrap())
            .output()
            .unwrap();
        ok(&q);
        assert_eq!(line, text(&q.stdout), "{fmt} {opts}");
        let f = Format::from_name(fmt).unwrap();
        let (vo, vq) = (qemu_info(&ours, f), qemu_info(&theirs, f));
        for k in ["virtual-size", "format", "cluster-size"] {
            // Our vpc keeps the exact size asked (see src/formats/vhd/writer.rs); qemu-img
            // rounds it up to a CHS geometry.
            if f == Format::Vhd && k == "virtual-size" {
                assert_eq!(vo[k], size_bytes(size));
                continue;
            }
            assert_eq!(vo[k], vq[k], "{fmt} {opts}: {k}");
        }
        if matches!(f, Format::Qcow2 | Format::Vdi | Format::Vmdk | Format::Vhdx) {
            assert_qemu_check_clean(&ours, f);
        }
        if f != Format::Vhd {
            assert_qemu_identical(&ours, f, &theirs, f);
        }
    }
    // -q prints nothing; errors as qemu-img words them.
    let p = dir.path().join("q.raw");
    let o = dc(&["create", "-q", s(&p), "1M"]);
    ok(&o);
    assert_eq!(text(&o.stdout), "");
    assert_eq!(file_len(&p), MIB);
    for (args, msg) in [
        (
            vec!["create", "x.raw"],
            "Image creation needs a size parameter",
        ),
        (
            vec!["create", "x.raw", "1x"],
            "Invalid image size specified: '1x'.",
        ),
        (
            vec!["create", "-f", "nosuch", "x.raw", "1M"],
            "unknown format 'nosuch'",
        ),
        (
            vec!["create", "-f", "qcow2", "-o", "foo=bar", "x.raw", "1M"],
            "no option 'foo'",
        ),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .args(&args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            text(&o.stderr).contains(msg),
            "{args:?}: {}",
            text(&o.stderr)
        );
        assert!(!dir.path().join("x.raw").exists());
    }
}

/// qemu-img info --output=json of a vmdk, without the keys only we print.
fn vmdk_specific(v: &serde_json::Value) -> serde_json::Value {
    let mut d = v["format-specific"]["data"].clone();
    let m = d.as_object_mut().unwrap();
    m.remove("adapter-type");
    m.remove("hwversion");
    d
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn info_describes_vmdk_extents_without_opening_them() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 8 * MIB, 4);
    for sub in [
        "monolithicFlat",
        "twoGbMaxExtentFlat",
        "twoGbMaxExtentSparse",
        "monolithicSparse",
        "streamOptimized",
    ] {
        let img = dir.path().join(format!("{sub}.vmdk"));
        qemu_img(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            s(&src),
            s(&img),
        ]);
        let o = dc(&["info", "--output=json", s(&img)]);
        ok(&o);
        let ours: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let q = qemu_info(&img, Format::Vmdk);
        assert_eq!(ours["virtual-size"], q["virtual-size"], "{sub}");
        let (od, qd) = (vmdk_specific(&ours), vmdk_specific(&q));
        for k in ["cid", "parent-cid", "create-type"] {
            assert_eq!(od[k], qd[k], "{sub}: {k}");
        }
        let (oe, qe) = (
            od["extents"].as_array().unwrap(),
            qd["extents"].as_array().unwrap(),
        );
        assert_eq!(oe.len(), qe.len(), "{sub}");
        for (a, b) in oe.iter().zip(qe) {
            for k in ["filename", "format", "virtual-size"] {
                assert_eq!(
                    Path::new(a[k].as_str().unwrap_or_default()).file_name(),
                    Path::new(b[k].as_str().unwrap_or_default()).file_name(),
                    "{sub}: extent {k}"
                );
                assert_eq!(a[k].is_string(), b[k].is_string());
                if !a[k].is_string() {
                    assert_eq!(a[k], b[k], "{sub}: extent {k}");
                }
            }
        }
        // The human output never shows the keys qemu-img does not print.
        let o = dc(&["info", s(&img)]);
        ok(&o);
        let h = text(&o.stdout);
        assert!(h.contains("extents:"), "{h}");
        assert!(
            !h.contains("adapter type") && !h.contains("hwversion"),
            "{h}"
        );
        // Whole-file images: line for line what qemu-img prints.
        if matches!(sub, "monolithicSparse" | "streamOptimized") {
            assert_eq!(h, text(&qemu(&["info", s(&img)]).stdout), "{sub}");
        }
        // -U is accepted as qemu-img info accepts it.
        ok(&dc(&["info", "-U", "--force-share", s(&img)]));
        // json keeps them.
        assert_eq!(ours["format-specific"]["data"]["adapter-type"], "ide");
        // Converting still needs the opt-in for the extents.
        if sub.starts_with("twoGb") || sub == "monolithicFlat" {
            let out = dir.path().join("out.raw");
            let o = dc(&["convert", s(&img), s(&out)]);
            assert_eq!(o.status.code(), Some(1));
            assert!(text(&o.stderr).contains("unsafe reference"));
            ok(&dc(&["convert", "--allow-references", s(&img), s(&out)]));
            assert_eq!(sha256_file(&out), sha256_file(&src));
        }
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn info_prints_full_backing_filename_like_qemu() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let base = dir.path().join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        s(&dir.path().join("base.vmdk")),
        "1M",
    ]);
    let abs = s(&base).to_string();
    for (over, backing, fmt) in [
        ("top.qcow2", "base.qcow2", "qcow2"),
        ("sub/top.qcow2", "../base.qcow2", "qcow2"),
        ("abs.qcow2", abs.as_str(), "qcow2"),
        // A vmdk delta disk names its parent the same way.
        ("sub/delta.vmdk", "../base.vmdk", "vmdk"),
    ] {
        let o = Command::new("qemu-img")
            .args(["create", "-q", "-f", fmt, "-F", fmt, "-b", backing, over])
            .current_dir(dir.path())
            .output()
            .unwrap();
        ok(&o);
        let run_in = |prog: &str, args: &[&str]| {
            Command::new(prog)
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap()
        };
        let ours: serde_json::Value = serde_json::from_slice(
            &run_in(
                env!("CARGO_BIN_EXE_diskconv"),
                &["info", "--output=json", over],
            )
            .stdout,
        )
        .unwrap();
        let theirs: serde_json::Value =
            serde_json::from_slice(&run_in("qemu-img", &["info", "--output=json", over]).stdout)
                .unwrap();
        for k in [
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
        ] {
            assert_eq!(ours[k], theirs[k], "{over}: {k}");
        }
        let grep = |o: Output| -> Vec<String> {
            text(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("backing file"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            grep(run_in(env!("CARGO_BIN_EXE_diskconv"), &["info", over])),
            grep(run_in("qemu-img", &["info", over])),
            "{over}"
        );
    }
}

#[test]
fn odd_length_files_round_up_to_whole_sectors_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("odd.raw");
    std::fs::write(&src, vec![0x5au8; 1000]).unwrap();
    let o = dc(&["info", "--output=json", s(&src)]);
    ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["virtual-size"], 1024);
    assert_eq!(v["children"][0]["info"]["virtual-size"], 1024);
    let out = dir.path().join("out.raw");
    ok(&dc(&["convert", "-f", "raw", s(&src), s(&out)]));
    let b = std::fs::read(&out).unwrap();
    assert_eq!(b.len(), 1024);
    assert!(b[..1000].iter().all(|&x| x == 0x5a) && b[1000..].iter().all(|&x| x == 0));
    if have_qemu() {
        let q = qemu_info(&src, Format::Raw);
        assert_eq!(q["virtual-size"], v["virtual-size"]);
        assert_eq!(q["children"][0]["info"]["virtual-size"], 1024);
        let h = text(&dc(&["info", s(&src)]).stdout);
        assert_eq!(h, text(&qemu(&["info", s(&src)]).stdout));
        let qo = dir.path().join("q.raw");
        qemu_img(&["convert", "-f", "raw", "-O", "raw", s(&src), s(&qo)]);
        assert_eq!(std::fs::read(&qo).unwrap(), b);
    }
}
