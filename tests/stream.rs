//! Converting into a stream (issue 14), for every output format and subformat: `DST` = `-`, [`diskconv::convert_to_writer`],
//! [`diskconv::ConvertedReader`], the predicted output length, `--digest`, `--output=json`,
//! and sinks that fail or go away.
//!
//! The thread-count and peak-memory checks run in a child process of this test binary
//! (the test re-runs itself with `STREAM_CHILD` set), so that other tests running in
//! parallel neither add threads nor raise the high-water mark being measured.
mod common;
use common::*;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use diskconv::{ConvertOptions, ConvertedReader, DigestAlgo, Format};

fn dc() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_diskconv"));
    c.stdin(Stdio::null());
    c
}

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// One output format and subformat: its `-O`, `-o` and `-c`.
struct Case {
    name: &'static str,
    format: Format,
    options: &'static str,
    compress: bool,
}

const fn case(name: &'static str, format: Format, options: &'static str, compress: bool) -> Case {
    Case {
        name,
        format,
        options,
        compress,
    }
}

/// Every output format and subformat diskconv writes (vmdk monolithicFlat and the split
/// subformats are refused as outputs: they are several files).
const CASES: &[Case] = &[
    case("raw", Format::Raw, "", false),
    case("qcow2", Format::Qcow2, "", false),
    case("qcow2 compat 0.10", Format::Qcow2, "compat=0.10", false),
    case("qcow2 4k clusters", Format::Qcow2, "cluster_size=4k", false),
    case(
        "qcow2 2M clusters, 1-bit refcounts",
        Format::Qcow2,
        "cluster_size=2M,refcount_bits=1",
        false,
    ),
    case("qcow2 extended L2", Format::Qcow2, "extended_l2=on", false),
    case("qcow2 -c", Format::Qcow2, "", true),
    case("qcow2 -c compat 0.10", Format::Qcow2, "compat=0.10", true),
    case(
        "qcow2 -c zstd 4k",
        Format::Qcow2,
        "compression_type=zstd,cluster_size=4k",
        true,
    ),
    case("vpc fixed", Format::Vhd, "subformat=fixed", false),
    case("vpc dynamic", Format::Vhd, "", false),
    case(
        "vpc dynamic 512K blocks",
        Format::Vhd,
        "block_size=512K",
        false,
    ),
    case("vmdk monolithicSparse", Format::Vmdk, "", false),
    case(
        "vmdk monolithicSparse zeroed_grain",
        Format::Vmdk,
        "zeroed_grain=on",
        false,
    ),
    case(
        "vmdk streamOptimized",
        Format::Vmdk,
        "subformat=streamOptimized",
        false,
    ),
    case("vdi dynamic", Format::Vdi, "", false),
    case("vdi static", Format::Vdi, "static=on", false),
];

impl Case {
    /// Whether the output's exact length is known before its first byte: always on a
    /// stream but for streamOptimized vmdk (compressed in one pass); for a file, only
    /// where the file writer needs no plan to know it (raw, vpc fixed, vdi static).
    fn knows_len(&self, stream: bool) -> bool {
        if self.options.contains("streamOptimized") {
            return false;
        }
        stream
            || match self.format {
                Format::Raw => true,
                Format::Vhd => self.options.contains("fixed"),
                Format::Vdi => self.options.contains("static"),
                _ => false,
            }
    }
}

fn convert_args<'a>(c: &'a Case, src: &'a str, dst: &'a str) -> Vec<&'a str> {
    let mut v = vec!["convert", "-O", c.format.name()];
    if !c.options.is_empty() {
        v.extend(["-o", c.options]);
    }
    if c.compress {
        v.push("-c");
    }
    v.extend([src, dst]);
    v
}

/// Blank the fields a fresh image of `format` gets anew (checked against a real diff of two
/// conversions: a vhd footer's timestamp, checksum and unique id; a vmdk descriptor's CID,
/// long content id and extent file name; a vdi's image and snapshot UUIDs), so two conversions of one source compare equal byte for byte.
fn mask(format: Format, img: &mut [u8]) {
    match format {
        Format::Vhd => {
            let f = img.len() - 512;
            assert_eq!(&img[f..f + 8], b"conectix", "vhd footer");
            // A dynamic VHD starts with a copy of its footer.
            let copy = img.starts_with(b"conectix").then_some(0);
            for f in std::iter::once(f).chain(copy) {
                img[f + 24..f + 28].fill(0);
                img[f + 64..f + 84].fill(0);
            }
        }
        Format::Vmdk => {
            assert_eq!(&img[..4], b"KDMV", "vmdk sparse header");
            let le = |o: usize| u64::from_le_bytes(img[o..o + 8].try_into().unwrap()) as usize;
            let (start, len) = (le(28) * 512, le(36) * 512);
            let text = String::from_utf8_lossy(&img[start..start + len]).into_owned();
            let norm: Vec<String> = text
                .trim_end_matches('\0')
                .lines()
                .map(|l| {
                    if l.starts_with("CID=") {
                        "CID=masked".to_string()
                    } else if l.starts_with("ddb.longContentID") || l.starts_with("ddb.uuid") {
                        "ddb.masked".to_string()
                    } else if let Some(i) = l.find(" SPARSE \"") {
                        format!("{} SPARSE \"masked\"", &l[..i])
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            let mut area = norm.join("\n").into_bytes();
            assert!(area.len() <= len, "descriptor grew past its area");
            area.resize(len, 0);
            img[start..start + len].copy_from_slice(&area);
        }
        Format::Vdi => {
            assert_eq!(
                &img[0x40..0x44],
                &0xbeda_107fu32.to_le_bytes(),
                "vdi header"
            );
            // Image and last-snapshot UUIDs.
            img[0x188..0x1a8].fill(0);
        }
        _ => {}
    }
}

fn tool_sum(tool: &str, path: &Path) -> String {
    let out = run(&[tool, s(path)]);
    out.split_whitespace().next().unwrap().to_string()
}

fn json_of(text: &[u8]) -> serde_json::Value {
    serde_json::from_slice(text)
        .unwrap_or_else(|e| panic!("not json ({e}): {}", String::from_utf8_lossy(text)))
}

/// A raw source with data, holes and zero runs, of an odd-ish size.
fn source(dir: &Path) -> PathBuf {
    let p = dir.join("src.raw");
    make_raw(&p, (12 << 20) + (64 << 10), 14);
    p
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img")]
fn stdout_equals_file_output_digests_and_length_for_every_streaming_format() {
    have_qemu();
    let _g = hang_guard("stream vs file");
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for c in CASES {
        eprintln!("{}", c.name);
        let file = dir.path().join(format!("out-{}.img", c.format.name()));
        let streamed = dir.path().join(format!("streamed-{}.img", c.format.name()));
        let digest = "md5,sha1,sha256,sha512";

        let mut a = convert_args(c, s(&src), s(&file));
        a.extend(["--digest", digest, "--output=json"]);
        let o = dc().args(&a).output().unwrap();
        ok(&o, c.name);
        let file_json = json_of(&o.stdout);

        let mut a = convert_args(c, s(&src), "-");
        a.extend(["--digest", digest, "--output=json", "-p"]);
        let o = dc()
            .args(&a)
            .stdout(std::fs::File::create(&streamed).unwrap())
            .output()
            .unwrap();
        ok(&o, c.name);
        // stdout is the image: the report (and the progress) went to stderr.
        let err = String::from_utf8_lossy(&o.stderr);
        let stream_json = json_of(err[err.find('{').expect("json on stderr")..].as_bytes());

        let mut fb = std::fs::read(&file).unwrap();
        let mut sb = std::fs::read(&streamed).unwrap();
        for (j, b, what) in [(&file_json, &fb, "file"), (&stream_json, &sb, "stream")] {
            assert_eq!(j["format"], c.format.name(), "{} {what}", c.name);
            assert_eq!(j["size"], b.len() as u64, "{} {what}: size", c.name);
            assert_eq!(
                j["virtual-size"],
                qemu_info(&file, c.format)["virtual-size"],
                "{} {what}",
                c.name
            );
            if c.knows_len(what == "stream") {
                assert_eq!(j["expected-size"], b.len() as u64, "{} {what}", c.name);
            } else {
                assert!(j.get("expected-size").is_none(), "{} {what}: {j}", c.name);
            }
        }
        assert_eq!(file_json["filename"], s(&file));
        assert!(stream_json.get("filename").is_none());
        for (algo, tool) in [
            ("md5", "md5sum"),
            ("sha1", "sha1sum"),
            ("sha256", "sha256sum"),
            ("sha512", "sha512sum"),
        ] {
            assert_eq!(
                file_json["digests"][algo],
                tool_sum(tool, &file),
                "{}",
                c.name
            );
            assert_eq!(
                stream_json["digests"][algo],
                tool_sum(tool, &streamed),
                "{}",
                c.name
            );
        }
        assert_qemu_check_clean_if_checkable(&streamed, c.format);
        assert_qemu_check_clean_if_checkable(&file, c.format);
        assert_qemu_identical(&src, Format::Raw, &streamed, c.format);
        assert_qemu_identical(&src, Format::Raw, &file, c.format);
        assert_eq!(fb.len(), sb.len(), "{}", c.name);
        mask(c.format, &mut fb);
        mask(c.format, &mut sb);
        assert!(fb == sb, "{}: stream and file output differ", c.name);
    }
}

/// `qemu-img check` knows no raw or vpc checks; it checks qcow2, vmdk and vdi.
fn assert_qemu_check_clean_if_checkable(img: &Path, fmt: Format) {
    if matches!(fmt, Format::Qcow2 | Format::Vmdk | Format::Vdi) {
        assert_qemu_check_clean(img, fmt);
    }
}

#[test]
fn a_reader_that_goes_away_stops_the_conversion_with_an_error() {
    let _g = hang_guard("EPIPE");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    make_raw(&src, 64 << 20, 5);
    for c in CASES {
        let mut child = dc()
            .args(convert_args(c, s(&src), "-"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut mib = vec![0u8; 1 << 20];
        out.read_exact(&mut mib).unwrap();
        drop(out);
        let o = child.wait_with_output().unwrap();
        assert!(!o.status.success(), "{}", c.name);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains("-:") && e.contains("Broken pipe"),
            "{}: {e}",
            c.name
        );
    }
    // And through a shell, as users write it.
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' convert -O raw '{}' - | head -c 1M | wc -c",
            env!("CARGO_BIN_EXE_diskconv"),
            s(&src)
        ))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1048576");
    assert!(String::from_utf8_lossy(&o.stderr).contains("Broken pipe"));
}

#[test]
fn a_full_device_stops_the_conversion_with_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    make_raw(&src, 8 << 20, 6);
    let o = dc()
        .args(["convert", "-O", "raw", s(&src), "-"])
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("-:") && e.contains("No space left"), "{e}");
    let o = dc()
        .args(["convert", "-O", "raw", s(&src), "/dev/full"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("/dev/full") && e.contains("No space left"),
        "{e}"
    );
}

/// A disk that fills mid-conversion (a 4 MiB tmpfs): every output format fails naming its
/// destination, and leaves nothing there; a stream into a file on it (stdout redirected)
/// fails naming `-`.
#[test]
fn a_disk_that_fills_stops_every_format_with_an_error_naming_the_destination() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIP a_disk_that_fills_stops_every_format: needs root to mount a tmpfs");
        return;
    }
    let _g = hang_guard("ENOSPC");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    // Random bytes: nothing is sparse, so every format needs more than the 4 MiB.
    std::fs::write(&src, {
        let mut b = vec![0u8; 8 << 20];
        Rng(6).fill(&mut b);
        b
    })
    .unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir(&small).unwrap();
    run(&["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", s(&small)]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(small.clone());
    for c in CASES.iter().filter(|c| !c.compress) {
        let dst = small.join("out.img");
        let o = dc()
            .args(convert_args(c, s(&src), s(&dst)))
            .output()
            .unwrap();
        assert!(!o.status.success(), "{}", c.name);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(
            e.contains(s(&dst)) && e.contains("No space left"),
            "{}: {e}",
            c.name
        );
        let left: Vec<_> = std::fs::read_dir(&small).unwrap().collect();
        assert!(left.is_empty(), "{}: {left:?} left behind", c.name);
    }
    let redirected = small.join("stdout.img");
    let o = dc()
        .args(["convert", "-O", "qcow2", s(&src), "-"])
        .stdout(std::fs::File::create(&redirected).unwrap())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("-:") && e.contains("No space left"), "{e}");
}

fn opts(format: Format, options: &str) -> ConvertOptions<'static> {
    let mut o = ConvertOptions::new(format);
    if !options.is_empty() {
        o.create.parse_option_string(options).unwrap();
    }
    o
}

fn case_opts(c: &Case) -> ConvertOptions<'static> {
    let mut o = opts(c.format, c.options);
    o.create.compress = c.compress;
    o
}

fn sha(data: &[u8], algo: DigestAlgo) -> String {
    let mut d = diskconv::writer::Digester::new(&[algo]);
    d.update(data);
    d.finish().remove(0).1
}

#[test]
fn library_push_and_pull_give_the_file_conversion_s_bytes() {
    let _g = hang_guard("library stream");
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let dev: Arc<dyn diskconv::BlockDevice> =
        Arc::from(diskconv::open(&src, &diskconv::OpenOptions::new()).unwrap());
    for c in CASES {
        let mut o = case_opts(c);
        o.digests = vec![DigestAlgo::Md5, DigestAlgo::Sha512];
        let file = dir.path().join(format!("lib-{}", c.format.name()));
        let rf = diskconv::convert_to_path(dev.as_ref(), &file, &o).unwrap();
        let mut fb = std::fs::read(&file).unwrap();
        assert_eq!(rf.size, fb.len() as u64);
        assert_eq!(rf.digests[0].1, sha(&fb, DigestAlgo::Md5));

        // Push.
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let rp = diskconv::convert_to_writer(dev.as_ref(), Shared(buf.clone()), &o).unwrap();
        let mut pb = std::mem::take(&mut *buf.lock().unwrap());
        assert_eq!(rp.size, pb.len() as u64, "{}", c.name);
        if rf.output_len.is_some() {
            assert_eq!(rp.output_len, rf.output_len, "{}", c.name);
        }
        assert_eq!(
            rp.digests,
            vec![
                (DigestAlgo::Md5, sha(&pb, DigestAlgo::Md5)),
                (DigestAlgo::Sha512, sha(&pb, DigestAlgo::Sha512))
            ]
        );

        // Pull.
        let mut r = ConvertedReader::new(dev.clone(), o.clone()).unwrap();
        let predicted = r.len();
        let mut rb = Vec::new();
        r.read_to_end(&mut rb).unwrap();
        let rr = r.finish().unwrap();
        assert_eq!(rr.size, rb.len() as u64);
        assert_eq!(rr.digests[1].1, sha(&rb, DigestAlgo::Sha512));
        if c.knows_len(true) {
            assert_eq!(predicted, Some(rb.len() as u64), "{}", c.name);
        } else {
            assert_eq!(predicted, None, "{}", c.name);
        }

        mask(c.format, &mut fb);
        mask(c.format, &mut pb);
        mask(c.format, &mut rb);
        assert!(fb == pb, "{}: push differs from the file", c.name);
        assert!(fb == rb, "{}: pull differs from the file", c.name);
    }
    // Every pulled image is the file output's bytes, which the CLI test checks with
    // qemu-img (check clean, compare identical).
}

#[test]
fn a_slow_reader_holds_the_conversion_back() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let _g = hang_guard("backpressure");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    make_raw(&src, 256 << 20, 8);
    let dev: Arc<dyn diskconv::BlockDevice> =
        Arc::from(diskconv::open(&src, &diskconv::OpenOptions::new()).unwrap());
    let done: &'static AtomicU64 = Box::leak(Box::new(AtomicU64::new(0)));
    let progress: &'static (dyn Fn(u64, u64) + Sync) =
        Box::leak(Box::new(move |d: u64, _t: u64| {
            done.fetch_max(d, Ordering::Relaxed);
        }));
    let mut o = opts(Format::Raw, "");
    o.progress = Some(progress);
    o.min_sparse = 0;
    let mut r = ConvertedReader::new(dev, o).unwrap();
    let mut mib = vec![0u8; 1 << 20];
    r.read_exact(&mut mib).unwrap();
    // Time for the conversion to run ahead if nothing held it back (not asserted on).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ahead = done.load(Ordering::Relaxed);
    assert!(
        ahead < 16 << 20,
        "the conversion wrote {ahead} bytes while 1 MiB was read"
    );
    drop(r);
}

/// Run the test `name` of this binary again in a child process with `STREAM_CHILD` set,
/// alone, and require it to pass; true in the child, where the caller does the work.
fn in_child(name: &str) -> bool {
    if std::env::var_os("STREAM_CHILD").is_some() {
        return true;
    }
    let _g = hang_guard(name);
    let o = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env("STREAM_CHILD", "1")
        .output()
        .unwrap();
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("1 passed"),
        "child {name}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    false
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

#[test]
fn a_reader_dropped_half_way_leaves_no_thread_behind() {
    if !in_child("a_reader_dropped_half_way_leaves_no_thread_behind") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    make_raw(&src, 64 << 20, 9);
    let dev: Arc<dyn diskconv::BlockDevice> =
        Arc::from(diskconv::open(&src, &diskconv::OpenOptions::new()).unwrap());
    let before = threads();
    for c in CASES {
        let mut o = case_opts(c);
        o.threads = 4;
        o.digests = vec![DigestAlgo::Sha256];
        let mut r = ConvertedReader::new(dev.clone(), o).unwrap();
        let mut mib = vec![0u8; 1 << 20];
        r.read_exact(&mut mib).unwrap();
        assert!(
            threads() > before,
            "{}: the conversion runs on threads",
            c.name
        );
        drop(r);
        // Joined threads may linger in /proc for a moment after they exit; wait (a hang
        // guard, never a timing assertion) for the count to come back.
        let mut n = threads();
        for _ in 0..500 {
            if n <= before {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            n = threads();
        }
        assert_eq!(
            n, before,
            "{}: threads left after the reader was dropped",
            c.name
        );

        // Pushed into a sink whose reader goes away after 1 MiB (EPIPE): an error
        // naming the output, and no thread left either.
        struct Closing(usize);
        impl Write for Closing {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if self.0 >= 1 << 20 {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
                let n = b.len().min((1 << 20) - self.0);
                self.0 += n;
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut o = case_opts(c);
        o.threads = 4;
        let e = diskconv::convert_to_writer(dev.as_ref(), Closing(0), &o).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("-:") && msg.to_lowercase().contains("broken pipe"),
            "{}: {msg}",
            c.name
        );
        let mut n = threads();
        for _ in 0..500 {
            if n <= before {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
            n = threads();
        }
        assert_eq!(n, before, "{}: threads left after EPIPE", c.name);
    }
}

fn vm_hwm_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[test]
fn a_1_tib_sparse_source_streams_as_stream_optimized_vmdk_in_bounded_memory() {
    if !in_child("a_1_tib_sparse_source_streams_as_stream_optimized_vmdk_in_bounded_memory") {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    let tib = 1u64 << 40;
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(tib).unwrap();
        let mut data = vec![0u8; 8 << 20];
        Rng(77).fill(&mut data);
        for at in [0, tib / 3, tib / 2 + 12345 * 512, tib - (8 << 20)] {
            f.write_all_at(&data, at).unwrap();
        }
    }
    let dev = diskconv::open(&src, &diskconv::OpenOptions::new().format(Format::Raw)).unwrap();
    struct Count(Arc<std::sync::atomic::AtomicU64>);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut o = opts(Format::Vmdk, "subformat=streamOptimized");
    o.digests = vec![DigestAlgo::Sha256];
    let r = diskconv::convert_to_writer(dev.as_ref(), Count(n.clone()), &o).unwrap();
    let sent = n.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(r.size, sent);
    assert_eq!(r.virtual_size, tib);
    assert!(sent > 32 << 20, "the data was sent ({sent} bytes)");
    let hwm = vm_hwm_kib();
    assert!(
        hwm < 64 << 10,
        "peak RSS {hwm} KiB streaming a 1 TiB source (limit 64 MiB)"
    );
}

#[test]
fn digests_of_files_written_out_of_order_are_those_of_the_finished_file() {
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    for (fmt, opt) in [
        ("qcow2", ""),
        ("vpc", "subformat=dynamic"),
        ("vdi", ""),
        ("vmdk", ""),
    ] {
        let dst = dir.path().join(format!("o-{fmt}"));
        let mut a = vec!["convert", "-O", fmt];
        if !opt.is_empty() {
            a.extend(["-o", opt]);
        }
        a.extend([s(&src), s(&dst), "--digest", "sha256,md5", "--output=json"]);
        let o = dc().args(&a).output().unwrap();
        ok(&o, fmt);
        let j = json_of(&o.stdout);
        assert_eq!(j["digests"]["sha256"], sha256_file(&dst), "{fmt}");
        assert_eq!(j["digests"]["md5"], tool_sum("md5sum", &dst), "{fmt}");
        assert_eq!(j["size"], std::fs::metadata(&dst).unwrap().len(), "{fmt}");
    }
}

#[test]
fn a_failing_conversion_reports_its_error_through_the_reader() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    make_raw(&src, 8 << 20, 4);
    let dev: Arc<dyn diskconv::BlockDevice> =
        Arc::from(diskconv::open(&src, &diskconv::OpenOptions::new()).unwrap());
    // Growing past the source is fine; a shrink that drops data fails before any byte.
    let mut o = opts(Format::Raw, "");
    o.target_size = Some(1 << 20);
    let e = ConvertedReader::new(dev.clone(), o).unwrap_err();
    assert!(e.to_string().contains("target size"), "{e}");
    // A source that fails to read at 5 MiB: read gives the error after the bytes before
    // it, and finish gives the conversion's own error.
    struct Failing;
    impl diskconv::BlockDevice for Failing {
        fn virtual_size(&self) -> u64 {
            16 << 20
        }
        fn map(&self, offset: u64, max_len: u64) -> diskconv::Result<diskconv::Mapping> {
            Ok(diskconv::Mapping {
                offset,
                len: max_len.min((16 << 20) - offset),
                kind: diskconv::MappingKind::Data { host: None },
            })
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> diskconv::Result<()> {
            if offset >= 5 << 20 {
                return Err(diskconv::Error::corrupt("test: unreadable").at(offset));
            }
            buf.fill(7);
            Ok(())
        }
        fn info(&self) -> diskconv::ImageInfo {
            diskconv::ImageInfo::default()
        }
        fn format(&self) -> Format {
            Format::Raw
        }
    }
    let mut o = opts(Format::Raw, "");
    o.threads = 1;
    let mut r = ConvertedReader::new(Arc::new(Failing), o.clone()).unwrap();
    let mut v = Vec::new();
    let e = r.read_to_end(&mut v).unwrap_err();
    assert!(e.to_string().contains("test: unreadable"), "{e}");
    assert_eq!(v.len(), 5 << 20);
    assert!(v.iter().all(|&b| b == 7));
    let e = r.finish().unwrap_err();
    assert!(e.to_string().contains("test: unreadable"), "{e}");
    // Pushed, the same error, naming the output.
    let e = diskconv::convert_to_writer(&Failing, std::io::sink(), &o).unwrap_err();
    assert!(e.to_string().contains("test: unreadable"), "{e}");
}
