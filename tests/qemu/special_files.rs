//! Sources and destinations that are not plain new files: block devices, FIFOs, character
//! devices, sockets, folders, symlinks, existing files (mode, owner, hard links), `-n`.
//! Every case here once lost data silently with exit 0 (issue 10, items 2-4, 7, 8, 10, 14).
//!
//! Loop-device tests need root and a working `losetup`; where it fails they print a SKIP
//! line, and fail instead when `CI` or `DISKCONV_REQUIRE_LOOP` is set.
use crate::common;
use common::*;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use diskconv::{BlockDevice, ConvertOptions, Format, ImageInfo, Mapping, MappingKind};

fn dc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_fails_with(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "should fail; stderr: {e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}: {e}");
    }
    assert!(!e.contains(".diskconv-"), "names a temporary file: {e}");
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "failed: {}", stderr(o));
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A raw sample with data up to its last sector (where a backup GPT would be).
fn sample(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    make_raw(&p, size, size ^ 0x5eed);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"END-OF-DISK-SECTOR", size - 512).unwrap();
    p
}

fn read_prefix(p: &Path, n: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    let mut v = vec![0u8; n];
    f.read_exact(&mut v).unwrap();
    v
}

/// An attached loop device, detached on drop (also when the test panics).
struct Loop {
    dev: PathBuf,
}

impl Loop {
    /// Attach `file`; None (after a SKIP line) where the machine does not allow it, a
    /// panic instead when CI or DISKCONV_REQUIRE_LOOP asks for every test to run.
    fn attach(file: &Path, test: &str) -> Option<Loop> {
        let r = Command::new("losetup")
            .args(["-f", "--show", s(file)])
            .output();
        let why = match r {
            Ok(o) if o.status.success() => {
                let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
                return Some(Loop {
                    dev: PathBuf::from(dev),
                });
            }
            Ok(o) => stderr(&o),
            Err(e) => e.to_string(),
        };
        let msg = format!("{test}: losetup failed ({}): needs root", why.trim());
        if std::env::var_os("CI").is_some() || std::env::var_os("DISKCONV_REQUIRE_LOOP").is_some() {
            panic!("{msg}; CI/DISKCONV_REQUIRE_LOOP is set, so this is a failure");
        }
        eprintln!("SKIP {msg}");
        None
    }
    fn path(&self) -> &Path {
        &self.dev
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

// ---------------------------------------------------------------- sources

#[test]
fn block_device_source_reads_with_its_real_size() {
    let dir = tempfile::tempdir().unwrap();
    let size = 5 << 20;
    let raw = sample(dir.path(), "disk.raw", size);
    let Some(lo) = Loop::attach(&raw, "block_device_source") else {
        return;
    };
    let dev = diskconv::open(lo.path(), &diskconv::OpenOptions::new()).unwrap();
    assert_eq!(dev.format(), Format::Raw);
    assert_eq!(dev.virtual_size(), size);
    // Holes of a device are unknown: all of it is data, one mapping.
    let m = dev.map(0, u64::MAX).unwrap();
    assert_eq!((m.offset, m.len), (0, size));
    assert!(matches!(m.kind, MappingKind::Data { .. }));
    assert_eq!(sha256_device(dev.as_ref()), sha256_file(&raw));
    drop(dev);

    let o = dc(&["info", "--output=json", s(lo.path())]);
    assert_ok(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["virtual-size"], size);
    assert_eq!(v["format"], "raw");

    let out = dir.path().join("out.qcow2");
    assert_ok(&dc(&["convert", "-O", "qcow2", s(lo.path()), s(&out)]));
    let back = diskconv::open(&out, &diskconv::OpenOptions::new()).unwrap();
    assert_eq!(back.virtual_size(), size);
    assert_eq!(sha256_device(back.as_ref()), sha256_file(&raw));
    if have_qemu() {
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(&out), s(&raw)]);
    }

    let o = dc(&["inspect", "--output=json", s(lo.path())]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["virtual-size"], size, "{v}");
}

#[test]
fn block_device_holding_an_image_is_probed() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sample(dir.path(), "disk.raw", 3 << 20);
    let q = dir.path().join("disk.qcow2");
    convert(&raw, &q, Format::Qcow2, &[], false);
    // Pad to whole sectors so the loop device shows the whole file.
    let len = std::fs::metadata(&q).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&q)
        .unwrap()
        .set_len(len.next_multiple_of(512))
        .unwrap();
    let Some(lo) = Loop::attach(&q, "block_device_probe") else {
        return;
    };
    let dev = diskconv::open(lo.path(), &diskconv::OpenOptions::new()).unwrap();
    assert_eq!(dev.format(), Format::Qcow2);
    assert_eq!(sha256_device(dev.as_ref()), sha256_file(&raw));
}

#[test]
fn pipes_char_devices_and_sockets_are_refused_as_sources() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let out = dir.path().join("out.raw");
    for (src, what) in [
        (fifo.as_path(), "FIFO"),
        (Path::new("/dev/null"), "character device"),
        (Path::new("/dev/zero"), "character device"),
        (sock.as_path(), "socket"),
    ] {
        // A FIFO with no writer: opening it plainly would block forever.
        for args in [
            vec!["info", s(src)],
            vec!["info", "-f", "raw", s(src)],
            vec!["convert", "-O", "raw", s(src), s(&out)],
            vec!["convert", "-f", "raw", "-O", "qcow2", s(src), s(&out)],
            vec!["inspect", s(src)],
        ] {
            let o = dc(&args);
            let e = stderr(&o);
            assert!(!o.status.success(), "{args:?} must fail");
            assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
            if args[0] != "inspect" {
                assert!(
                    e.contains(what) && e.contains("no format can be read"),
                    "{args:?}: {e}"
                );
            }
            assert!(!out.exists(), "{args:?} left an output");
        }
        let e = diskconv::open(src, &diskconv::OpenOptions::new().format(Format::Raw))
            .err()
            .unwrap();
        assert_eq!(e.kind(), diskconv::ErrorKind::InvalidArgument, "{e}");
    }
    // A pipe on stdin, as `cat x | diskconv convert /dev/stdin out` gives it, or "-".
    let raw = sample(dir.path(), "a.raw", 1 << 20);
    for args in [
        vec!["convert", "-O", "raw", "/dev/stdin", s(&out)],
        vec!["info", "/dev/stdin"],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .args(&args)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let bytes = std::fs::read(&raw).unwrap();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        });
        let o = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        // Only "-" with -f raw reads a pipe (tests/remote/stdin_spool.rs, tests/remote/ceph_rbd.rs).
        assert_fails_with(&o, &["FIFO or pipe", "no format can be read"]);
        assert!(!out.exists());
    }
}

#[test]
fn a_directory_is_refused_in_info_and_convert_alike() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("folder");
    std::fs::create_dir(&d).unwrap();
    let out = dir.path().join("out.raw");
    for args in [
        vec!["info", s(&d)],
        vec!["info", "-f", "raw", s(&d)],
        vec!["info", "--output=json", "-f", "raw", s(&d)],
        vec!["convert", "-O", "raw", s(&d), s(&out)],
        vec!["convert", "-f", "raw", "-O", "raw", s(&d), s(&out)],
    ] {
        let o = dc(&args);
        assert_fails_with(&o, &["is a directory, not a disk image"]);
        assert!(o.stdout.is_empty(), "{args:?} printed {:?}", o.stdout);
        assert!(!out.exists());
    }
}

// ---------------------------------------------------------------- destinations

#[test]
fn a_symlink_destination_stays_a_link_and_its_target_gets_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sample(dir.path(), "a.raw", 2 << 20);
    let sub = dir.path().join("real");
    std::fs::create_dir(&sub).unwrap();
    // An existing target, and a dangling link whose target does not exist yet.
    let target = sub.join("t.img");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.img");
    std::os::unix::fs::symlink("real/t.img", &link).unwrap();
    let dangling_target = sub.join("new.img");
    let dangling = dir.path().join("dangling.img");
    std::os::unix::fs::symlink(&dangling_target, &dangling).unwrap();
    for (l, t) in [(&link, &target), (&dangling, &dangling_target)] {
        assert_ok(&dc(&["convert", "-O", "raw", s(&raw), s(l)]));
        assert!(std::fs::symlink_metadata(l)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(sha256_file(t), sha256_file(&raw));
    }
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&sub), ["new.img", "t.img"], "no temporaries left");
    assert_eq!(
        names(dir.path()),
        ["a.raw", "dangling.img", "link.img", "real"]
    );
}

/// Convert `src` into a FIFO read by a thread; returns (exit output, bytes the reader got).
fn convert_into_fifo(dir: &Path, args: &[&str], src: &Path) -> (Output, Vec<u8>) {
    let fifo = dir.join(format!("fifo-{}", args.join("-").replace('/', "_")));
    mkfifo(&fifo);
    let f2 = fifo.clone();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::fs::File::open(&f2)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        v
    });
    let mut a = vec!["convert"];
    a.extend_from_slice(args);
    a.push(s(src));
    a.push(s(&fifo));
    let o = dc(&a);
    if !o.status.success() {
        // If diskconv failed before opening the FIFO, the reader still waits for a
        // writer: open and close one (non-blocking: fails at once if the reader is gone).
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo);
    }
    let got = reader.join().unwrap();
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo(),
        "the FIFO was replaced"
    );
    (o, got)
}

#[test]
fn a_fifo_destination_receives_what_a_file_would_for_streaming_formats() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sample(dir.path(), "a.raw", 3 << 20);
    let q = dir.path().join("a.qcow2");
    convert(&raw, &q, Format::Qcow2, &[], false);
    for (args, fmt) in [
        (vec!["-O", "raw"], Format::Raw),
        (vec!["-O", "vpc", "-o", "subformat=fixed"], Format::Vhd),
        (vec!["-O", "vpc"], Format::Vhd),
        (
            vec!["-O", "vmdk", "-o", "subformat=streamOptimized"],
            Format::Vmdk,
        ),
        (vec!["-O", "vmdk"], Format::Vmdk),
    ] {
        let (o, got) = convert_into_fifo(dir.path(), &args, &q);
        assert_ok(&o);
        let file = dir.path().join(format!("file.{}", fmt.name()));
        let mut a = vec!["convert"];
        a.extend_from_slice(&args);
        a.extend([s(&q), s(&file)]);
        assert_ok(&dc(&a));
        let want = std::fs::read(&file).unwrap();
        assert_eq!(got.len(), want.len(), "{args:?}");
        if fmt == Format::Raw {
            assert!(got == want, "raw through a FIFO differs from a file output");
        }
        // vpc and vmdk stamp a time and a random id: compare what they hold.
        let piped = dir.path().join(format!("piped.{}", fmt.name()));
        std::fs::write(&piped, &got).unwrap();
        assert_eq!(
            sha256_device(open_as(&piped, fmt).as_ref()),
            sha256_file(&raw),
            "{args:?}"
        );
        if have_qemu() {
            qemu_img(&["compare", "-f", fmt.name(), "-F", "raw", s(&piped), s(&raw)]);
        }
    }
}

#[test]
fn dev_stdout_as_destination_writes_to_the_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sample(dir.path(), "a.raw", 2 << 20);
    let file = dir.path().join("b.raw");
    assert_ok(&dc(&["convert", "-O", "raw", s(&raw), s(&file)]));
    let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(["convert", "-O", "raw", s(&raw), "/dev/stdout"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_ok(&o);
    assert!(
        o.stdout == std::fs::read(&file).unwrap(),
        "stdout bytes differ"
    );
    // /dev/stdout redirected to a file: that file gets the image (a rename could not
    // reach the descriptor), and /dev/stdout stays what it is.
    let redirected = dir.path().join("redirected.raw");
    std::fs::write(&redirected, b"old").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(["convert", "-O", "raw", s(&raw), "/dev/stdout"])
        .stdout(std::fs::File::create(&redirected).unwrap())
        .output()
        .unwrap();
    assert_ok(&o);
    assert!(std::fs::read(&redirected).unwrap() == std::fs::read(&file).unwrap());
    assert!(std::fs::symlink_metadata("/dev/stdout")
        .unwrap()
        .file_type()
        .is_symlink());
    // /dev/stdout redirected to a pipe whose reader is gone: an error, never exit 0.
    let mut child = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(["convert", "-O", "raw", s(&raw), "/dev/stdout"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(
        !o.status.success(),
        "a closed pipe must fail the conversion"
    );
    // A character device: /dev/null takes every output format (all of them stream).
    assert_ok(&dc(&["convert", "-O", "raw", s(&raw), "/dev/null"]));
    assert_ok(&dc(&["convert", "-O", "vmdk", s(&raw), "/dev/null"]));
    assert!(Path::new("/dev/null")
        .metadata()
        .unwrap()
        .file_type()
        .is_char_device());
}

/// Fill a file with a byte, so what a conversion leaves unwritten is visible.
fn filled(p: &Path, len: usize, byte: u8) {
    std::fs::write(p, vec![byte; len]).unwrap();
}

#[test]
fn a_block_device_destination_is_written_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4u64 << 20;
    let raw = sample(dir.path(), "a.raw", size);
    let backing = dir.path().join("dev.img");
    filled(&backing, 6 << 20, 0xaa);
    let Some(lo) = Loop::attach(&backing, "block_device_destination") else {
        return;
    };
    // raw: the source's bytes, its holes zeroed (the device held 0xaa there), the
    // device's tail past the image untouched; the device node stays a device.
    assert_ok(&dc(&["convert", "-O", "raw", s(&raw), s(lo.path())]));
    assert!(lo.path().metadata().unwrap().file_type().is_block_device());
    let got = read_prefix(lo.path(), 6 << 20);
    assert!(
        got[..size as usize] == std::fs::read(&raw).unwrap()[..],
        "device content differs"
    );
    assert!(
        got[size as usize..].iter().all(|&b| b == 0xaa),
        "past the image: untouched"
    );
    // qcow2 on a device, as on an LVM volume.
    assert_ok(&dc(&["convert", "-O", "qcow2", s(&raw), s(lo.path())]));
    let dev = open_as(lo.path(), Format::Qcow2);
    assert_eq!(sha256_device(dev.as_ref()), sha256_file(&raw));
    drop(dev);
    if have_qemu() {
        qemu_img(&["compare", "-f", "qcow2", "-F", "raw", s(lo.path()), s(&raw)]);
    }

    // Too small: refused before writing, naming both sizes; the device is unchanged.
    let small = dir.path().join("small.img");
    filled(&small, 1 << 20, 0x55);
    let Some(sl) = Loop::attach(&small, "block_device_destination") else {
        return;
    };
    for n in [false, true] {
        let mut a = vec!["convert", "-O", "raw"];
        if n {
            a.push("-n");
        }
        a.extend([s(&raw), s(sl.path())]);
        let o = dc(&a);
        let want: &[&str] = if n {
            &[
                "output file is smaller than input file",
                "1048576",
                "4194304",
            ]
        } else {
            &["holds 1048576 bytes", "needs 4194304 bytes"]
        };
        assert_fails_with(&o, want);
        assert!(read_prefix(sl.path(), 1 << 20).iter().all(|&b| b == 0x55));
    }
}

#[test]
fn n_writes_into_an_existing_raw_target() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3usize << 20;
    let raw = sample(dir.path(), "a.raw", size as u64);
    let src = std::fs::read(&raw).unwrap();
    let q = dir.path().join("a.qcow2");
    convert(&raw, &q, Format::Qcow2, &[], false);
    let t = dir.path().join("target.raw");
    filled(&t, size + 4096, 0xaa);
    let ino = t.metadata().unwrap().ino();
    assert_ok(&dc(&["convert", "-n", "-O", "raw", s(&q), s(&t)]));
    let got = std::fs::read(&t).unwrap();
    assert_eq!(t.metadata().unwrap().ino(), ino, "-n writes in place");
    assert_eq!(got.len(), size + 4096, "never shrunk");
    assert!(
        got[..size] == src[..],
        "guest bytes, with the source's zeros written"
    );
    assert!(got[size..].iter().all(|&b| b == 0xaa));

    // --target-is-zero: zero ranges are not written (a target made of 0xaa shows it).
    filled(&t, size, 0xaa);
    assert_ok(&dc(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "raw",
        s(&q),
        s(&t),
    ]));
    let got = std::fs::read(&t).unwrap();
    let m = open_as(&q, Format::Qcow2);
    let mut kept = 0u64;
    let mut off = 0u64;
    while off < size as u64 {
        let Mapping { len, kind, .. } = m.map(off, u64::MAX).unwrap();
        let (a, b) = (off as usize, (off + len) as usize);
        if matches!(kind, MappingKind::Data { .. }) {
            // Data ranges: exact, except all-zero granules, which are skipped too.
            for (g, w) in got[a..b].chunks(4096).zip(src[a..b].chunks(4096)) {
                assert!(g == w || (w.iter().all(|&x| x == 0) && g.iter().all(|&x| x == 0xaa)));
            }
        } else {
            assert!(
                got[a..b].iter().all(|&x| x == 0xaa),
                "zero range at {a:#x} was written"
            );
            kept += len;
        }
        off += len;
    }
    assert!(kept > 0, "the sample has holes");

    // Refusals.
    let missing = dir.path().join("missing.raw");
    for (args, needles) in [
        (
            vec!["convert", "-n", "-O", "raw", s(&q), s(&missing)],
            vec!["missing.raw", "does not exist"],
        ),
        (
            vec!["convert", "-n", "-O", "qcow2", s(&q), s(&t)],
            vec!["Image is not in qcow2 format", "target.raw"],
        ),
        (
            vec!["convert", "--target-is-zero", "-O", "raw", s(&q), s(&t)],
            vec!["--target-is-zero requires use of -n flag"],
        ),
    ] {
        assert_fails_with(&dc(&args), &needles);
    }
    let short = dir.path().join("short.raw");
    filled(&short, 4096, 1);
    assert_fails_with(
        &dc(&["convert", "-n", "-O", "raw", s(&q), s(&short)]),
        &["output file is smaller than input file"],
    );
    assert_eq!(std::fs::read(&short).unwrap(), vec![1u8; 4096]);
    assert!(!missing.exists());
}

#[test]
fn replacing_a_file_keeps_its_mode_owner_and_group() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sample(dir.path(), "a.raw", 1 << 20);
    let dst = dir.path().join("private.qcow2");
    std::fs::write(&dst, b"old content").unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600)).unwrap();
    let link = dir.path().join("hardlink");
    std::fs::hard_link(&dst, &link).unwrap();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let (uid, gid) = (4321u32, 8765u32);
    if root {
        std::os::unix::fs::chown(&dst, Some(uid), Some(gid)).unwrap();
    } else {
        eprintln!("SKIP owner part of replacing_a_file_keeps_its_mode_owner_and_group: not root");
    }
    let before = dst.metadata().unwrap();
    assert_ok(&dc(&["convert", "-O", "qcow2", s(&raw), s(&dst)]));
    let after = dst.metadata().unwrap();
    assert_eq!(after.mode() & 0o7777, 0o600);
    assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
    if root {
        assert_eq!((after.uid(), after.gid()), (uid, gid));
    }
    // An atomic overwrite is a new inode: a hard link keeps the old content.
    assert_ne!(after.ino(), before.ino());
    assert_eq!(std::fs::read(&link).unwrap(), b"old content");
    assert_eq!(
        sha256_device(open_as(&dst, Format::Qcow2).as_ref()),
        sha256_file(&raw)
    );
    // A new file gets the usual mode (0666 minus the umask), not 0600.
    let fresh = dir.path().join("fresh.raw");
    assert_ok(&dc(&["convert", "-O", "raw", s(&raw), s(&fresh)]));
    // SAFETY: umask is process-wide; set it back at once.
    let mask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    assert_eq!(fresh.metadata().unwrap().mode() & 0o777, 0o666 & !mask);
}

/// A source that counts every map and read, to prove a bad destination reads nothing.
struct Counting {
    size: u64,
    calls: AtomicU64,
}

impl BlockDevice for Counting {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, offset: u64, max_len: u64) -> diskconv::Result<Mapping> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Mapping {
            offset,
            len: max_len.min(self.size - offset),
            kind: MappingKind::Data { host: None },
        })
    }
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> diskconv::Result<()> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        buf.fill(7);
        Ok(())
    }
    fn info(&self) -> ImageInfo {
        ImageInfo::default()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

#[test]
fn a_bad_destination_fails_before_the_source_is_read_and_names_dst() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let nodir = dir.path().join("nodir").join("out.qcow2");
    let sock = dir.path().join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let bad: [(&Path, &str); 3] = [
        (&folder, "the output is a directory"),
        (&nodir, "cannot create the output in"),
        (&sock, "the output is a socket"),
    ];
    for (dst, why) in bad {
        let src = Counting {
            size: 1 << 30,
            calls: AtomicU64::new(0),
        };
        let e =
            diskconv::convert_to_path(&src, dst, &ConvertOptions::new(Format::Qcow2)).unwrap_err();
        assert_eq!(e.path(), Some(dst), "{e}");
        assert!(e.to_string().contains(why), "{e}");
        assert_eq!(
            src.calls.load(Ordering::SeqCst),
            0,
            "the source was touched"
        );
        // The CLI checks DST before it even opens SRC: a missing source is not what
        // the error is about.
        let o = dc(&["convert", "-O", "qcow2", "/nonexistent/src.img", s(dst)]);
        assert_fails_with(&o, &[s(dst), why]);
        assert!(!stderr(&o).contains("src.img"), "{}", stderr(&o));
    }
    assert!(!dir.path().join("nodir").exists());
}

#[test]
fn an_unwritable_folder_fails_at_once_naming_dst() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIP an_unwritable_folder_fails_at_once_naming_dst: needs root to run as nobody"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let dst = ro.join("out.raw");
    let bin = env!("CARGO_BIN_EXE_diskconv");
    use std::os::unix::process::CommandExt;
    let o = Command::new(bin)
        .args(["convert", "-O", "raw", "/nonexistent/src.img", s(&dst)])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_fails_with(&o, &[s(&dst), "Permission denied"]);
    assert!(!stderr(&o).contains("src.img"));
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0);
}

#[test]
fn destination_names_up_to_name_max_work() {
    let dir = tempfile::tempdir().unwrap();
    let raw = sample(dir.path(), "a.raw", 1 << 20);
    for n in [250usize, 255] {
        let name = format!("{}.qcow2", "n".repeat(n - 6));
        assert_eq!(name.len(), n);
        let dst = dir.path().join(&name);
        assert_ok(&dc(&["convert", "-O", "qcow2", s(&raw), s(&dst)]));
        assert_eq!(
            sha256_device(open_as(&dst, Format::Qcow2).as_ref()),
            sha256_file(&raw)
        );
        // Replacing it works as well.
        assert_ok(&dc(&["convert", "-O", "qcow2", s(&raw), s(&dst)]));
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        3,
        "no temporaries left"
    );
}

#[test]
fn an_interrupted_conversion_through_a_symlink_leaves_nothing_at_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("out.raw");
    std::os::unix::fs::symlink(real.join("out.raw"), &link).unwrap();
    // -S 0 writes every byte, so the temporary file lives long enough to be seen.
    let mut child = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(["convert", "-S", "0", "-O", "raw", s(&src), s(&link)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (hang guard: minutes) until the temporary file exists next to the target.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while std::fs::read_dir(&real).unwrap().count() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no temporary file appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: signalling the child we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_eq!(
        std::fs::read_dir(&real).unwrap().count(),
        0,
        "temporary file left"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
}
