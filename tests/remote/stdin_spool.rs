//! `cat img.raw | diskconv convert -f raw - -O qcow2 out.qcow2` with no `--size`: standard
//! input is spooled to an anonymous sparse temporary file in $TMPDIR, then converted from
//! it (src/pipe.rs `spool`). qemu-img is the oracle for the bytes; each test points TMPDIR
//! at a directory of its own and checks that nothing is ever left in it, also after
//! SIGKILL; peak memory is the diskconv process's VmHWM, sampled from /proc.

use crate::common;
use crate::common::mounts;
use common::*;

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use diskconv::Format;

const BIN: &str = env!("CARGO_BIN_EXE_diskconv");
const MIB: u64 = 1 << 20;

/// diskconv with TMPDIR set to `tmp` and stdin, stdout and stderr on pipes.
fn spawn(args: &[&str], tmp: &Path) -> Child {
    Command::new(BIN)
        .args(args)
        .env("TMPDIR", tmp)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Names in `dir` (the spool must never have one).
fn entries(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect()
}

/// A raw image of `size` bytes: data at the start, in the middle and in the last sector,
/// zeros (holes) elsewhere.
fn sparse_raw(p: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(size | 1);
    for (off, len) in [(0, 3 * 4096), (size / 2 + 123, 70_000), (size - 512, 512)] {
        let mut b = vec![0u8; len as usize];
        rng.fill(&mut b);
        f.write_all_at(&b, off).unwrap();
    }
}

/// `cat SRC | diskconv ARGS` (a real pipe, as `rbd export POOL/IMG -` gives it).
fn cat_into(src: &Path, args: &[&str], tmp: &Path) -> Output {
    let mut cat = Command::new("cat")
        .arg(src)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = Command::new(BIN)
        .args(args)
        .env("TMPDIR", tmp)
        .stdin(Stdio::from(cat.stdout.take().unwrap()))
        .output()
        .unwrap();
    cat.wait().unwrap();
    out
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
#[cfg_attr(no_qemu, ignore = "qemu-img not installed (Debian package qemu-utils)")]
fn a_sparse_raw_on_a_pipe_converts_without_size_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // Not a multiple of RBD's 4 MiB objects, nor of the spool's 64 KiB blocks.
    let size = 9 * MIB + 3 * 512;
    let raw = dir.path().join("img.raw");
    sparse_raw(&raw, size);
    let out = dir.path().join("out.qcow2");
    let o = cat_into(
        &raw,
        &["convert", "-f", "raw", "-", "-O", "qcow2", s(&out)],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", err(&o));
    qemu_img(&["check", s(&out)]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&out)]);
    assert_eq!(qemu_info(&out, Format::Qcow2)["virtual-size"], size);
    assert_eq!(entries(tmp.path()), Vec::<PathBuf>::new());

    // From the spool the source can be read twice: a qcow2 on stdout (laid out from a
    // first pass, which a --size pipe refuses) and a --target-size check of the tail.
    let o = cat_into(
        &raw,
        &["convert", "-f", "raw", "-", "-O", "qcow2", "-"],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", err(&o));
    let piped = dir.path().join("piped.qcow2");
    std::fs::write(&piped, &o.stdout).unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&piped)]);
    let o = cat_into(
        &raw,
        &["convert", "-f", "raw", "--target-size", "1M", "-", s(&out)],
        tmp.path(),
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("would drop data"), "{}", err(&o));
    assert_eq!(entries(tmp.path()), Vec::<PathBuf>::new());
    // Still only raw, and no --sparsify, checked before anything is read.
    for (args, says) in [
        (vec!["convert", "-", "-O", "qcow2", s(&piped)], "add -f raw"),
        (
            vec!["convert", "-f", "raw", "--sparsify", "-", s(&piped)],
            "--sparsify",
        ),
    ] {
        let o = cat_into(&raw, &args, tmp.path());
        assert!(!o.status.success(), "{args:?}");
        assert!(err(&o).contains(says), "{args:?}: {}", err(&o));
    }
}

/// qemu-img converts a 0-byte raw file into a qcow2 of virtual size 0 (it has no minimum
/// size), so an empty stream is that same empty image, not an error: `rbd export` of a
/// 0-byte RBD image (which Ceph allows) round-trips.
#[test]
#[cfg_attr(no_qemu, ignore = "qemu-img not installed (Debian package qemu-utils)")]
fn an_empty_stdin_is_a_zero_byte_image_as_qemu_img_makes_of_an_empty_raw() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.raw");
    std::fs::File::create(&empty).unwrap();
    let theirs = dir.path().join("qemu.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&empty), s(&theirs)]);
    let ours = dir.path().join("ours.qcow2");
    let o = cat_into(
        &empty,
        &["convert", "-f", "raw", "-", "-O", "qcow2", s(&ours)],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(qemu_info(&theirs, Format::Qcow2)["virtual-size"], 0);
    assert_eq!(qemu_info(&ours, Format::Qcow2)["virtual-size"], 0);
    qemu_img(&["compare", s(&theirs), s(&ours)]);
    let raw = dir.path().join("ours.raw");
    let o = cat_into(
        &empty,
        &["convert", "-f", "raw", "-", "-O", "raw", s(&raw)],
        tmp.path(),
    );
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 0);
    assert_eq!(entries(tmp.path()), Vec::<PathBuf>::new());
}

/// The spool's descriptor in /proc/PID/fd: the link of an O_TMPFILE file names the
/// directory it was made in, then `/#INODE (deleted)`.
fn spool_fd(pid: u32, tmp: &Path) -> Option<PathBuf> {
    let want = tmp.to_str().unwrap().to_string();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()? {
        let e = e.ok()?;
        let target = std::fs::read_link(e.path()).ok()?;
        if target.to_string_lossy().starts_with(&want) {
            return Some(e.path());
        }
    }
    None
}

#[test]
fn sigkill_mid_spool_leaves_nothing_in_tmpdir_nor_an_output() {
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.qcow2");
    let mut child = spawn(
        &["convert", "-f", "raw", "-", "-O", "qcow2", s(&out)],
        tmp.path(),
    );
    let mut stdin = child.stdin.take().unwrap();
    let mut chunk = vec![0u8; MIB as usize];
    Rng(7).fill(&mut chunk);
    for _ in 0..8 {
        stdin.write_all(&chunk).unwrap();
    }
    // Wait until the spool holds what was written (the pipe keeps the stream open).
    let guard = hang_guard("waiting for the spool to fill");
    let fd = loop {
        if let Some(fd) = spool_fd(child.id(), tmp.path()) {
            if std::fs::metadata(&fd).map(|m| m.len()).unwrap_or(0) >= 4 * MIB {
                break fd;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    drop(guard);
    let link = std::fs::read_link(&fd).unwrap();
    assert!(link.to_string_lossy().ends_with("(deleted)"), "{link:?}");
    // Mid-spool, with the file open and growing, TMPDIR has no name in it.
    assert_eq!(entries(tmp.path()), Vec::<PathBuf>::new());
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    drop(stdin);
    assert_eq!(entries(tmp.path()), Vec::<PathBuf>::new());
    assert_eq!(
        entries(dir.path()),
        Vec::<PathBuf>::new(),
        "an output was left"
    );
}

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let d = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(
            st.success(),
            "mount -t tmpfs (the tests run as root, as in CI)"
        );
        Tmpfs(d)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        mounts::umount_retry(self.0.path());
    }
}

#[test]
fn a_full_tmpdir_fails_in_one_line_leaving_no_output_and_zero_runs_take_no_space() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(4);
    let tmp = fs.0.path();
    let out = dir.path().join("out.qcow2");
    let args = ["convert", "-f", "raw", "-", "-O", "qcow2", s(&out)];

    // 64 MiB of stream with 1 MiB of data fits a 4 MiB TMPDIR: zero blocks are holes.
    let sparse = dir.path().join("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&sparse).unwrap();
        f.set_len(64 * MIB).unwrap();
        let mut b = vec![0u8; MIB as usize];
        Rng(3).fill(&mut b);
        f.write_all_at(&b, 40 * MIB + 4096).unwrap();
    }
    let o = cat_into(&sparse, &args, tmp);
    assert!(o.status.success(), "{}", err(&o));
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", s(&sparse), s(&out)]);
    std::fs::remove_file(&out).unwrap();

    // 16 MiB of data does not fit.
    let dense = dir.path().join("dense.raw");
    let mut b = vec![0u8; 16 * MIB as usize];
    Rng(5).fill(&mut b);
    std::fs::write(&dense, &b).unwrap();
    let o = cat_into(&dense, &args, tmp);
    let e = err(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    for needle in [
        "spooling standard input",
        "TMPDIR",
        "No space left",
        "nothing was written",
    ] {
        assert!(e.contains(needle), "{needle}: {e}");
    }
    assert!(e.contains(tmp.to_str().unwrap()), "{e}");
    assert!(!out.exists(), "an output was left");
    let left: Vec<_> = entries(dir.path())
        .into_iter()
        .filter(|p| p != &sparse && p != &dense)
        .collect();
    assert_eq!(left, Vec::<PathBuf>::new());
    assert_eq!(entries(tmp), Vec::<PathBuf>::new());
}

#[test]
fn a_512_mib_stream_spools_and_converts_in_bounded_memory() {
    const STREAM: u64 = 512 * MIB;
    const MAX_RSS_KIB: u64 = 64 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.qcow2");
    let mut child = spawn(
        &["convert", "-f", "raw", "-", "-O", "qcow2", s(&out)],
        tmp.path(),
    );
    let mut stdin = child.stdin.take().unwrap();
    // 1 MiB of data in every 8 MiB (64 MiB of it), the rest zeros; its sha256 as it goes.
    let feeder = std::thread::spawn(move || {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut data = vec![0u8; MIB as usize];
        let zeros = vec![0u8; MIB as usize];
        let mut rng = Rng(11);
        for i in 0..STREAM / MIB {
            let b = if i % 8 == 3 {
                rng.fill(&mut data);
                &data
            } else {
                &zeros
            };
            h.update(b);
            stdin.write_all(b).unwrap();
        }
        format!("{:x}", h.finalize())
    });
    let mut stderr = child.stderr.take().unwrap();
    let (status, rss) = peak_rss_kib(child);
    let want = feeder.join().unwrap();
    let mut e = String::new();
    stderr.read_to_string(&mut e).unwrap();
    assert!(status.success(), "{e}");
    eprintln!("peak RSS of diskconv spooling and converting {STREAM} bytes: {rss} KiB");
    assert!(rss < MAX_RSS_KIB, "peaked at {rss} KiB");
    assert_eq!(entries(tmp.path()), Vec::<PathBuf>::new());
    // The qcow2 holds the stream: diskconv's own raw of it (qemu-img compare against the
    // stream would need the 512 MiB on disk) has the stream's sha256.
    let dev = open_as(&out, Format::Qcow2);
    assert_eq!(dev.virtual_size(), STREAM);
    assert_eq!(sha256_device(dev.as_ref()), want);
}

/// `boto3` over the test server (tests/servers/s3tool.py): stdout of `s3tool.py ARGS`.
fn boto(args: &[&str]) -> String {
    let var = |n: &str| {
        std::env::var(n).unwrap_or_else(|_| {
            panic!("{n} is not set: run the tests with scripts/test, which starts SeaweedFS")
        })
    };
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/s3tool.py"))
        .args(args)
        .env(
            "DISKCONV_TEST_S3_ENDPOINT",
            var("DISKCONV_TEST_S3_ENDPOINT"),
        )
        .env(
            "DISKCONV_TEST_S3_ACCESS_KEY",
            var("DISKCONV_TEST_S3_ACCESS_KEY"),
        )
        .env(
            "DISKCONV_TEST_S3_SECRET_KEY",
            var("DISKCONV_TEST_S3_SECRET_KEY"),
        )
        .output()
        .expect("python3");
    assert!(out.status.success(), "s3tool {args:?}: {}", err(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// The upload needs the output's exact length before its first byte (it picks the part
/// size from it): the spool gives it, so `rbd export ... - | diskconv convert -f raw -
/// s3://...` works; with --size (no spool) it is refused, naming the way out.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn stdin_uploads_to_s3_through_the_spool() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let size = 9 * MIB + 3 * 512;
    let raw = dir.path().join("img.raw");
    sparse_raw(&raw, size);
    let want = format!("{:x}", Sha256::digest(std::fs::read(&raw).unwrap()));
    let bucket = format!("dc-stdin-{}", std::process::id());
    boto(&["mkbucket", &bucket]);
    let url = format!("s3://{bucket}/img.raw");
    let env = |c: &mut Command| {
        let var = |n: &str| std::env::var(n).unwrap();
        c.env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env("AWS_ENDPOINT_URL", var("DISKCONV_TEST_S3_ENDPOINT"))
            .env("AWS_ACCESS_KEY_ID", var("DISKCONV_TEST_S3_ACCESS_KEY"))
            .env("AWS_SECRET_ACCESS_KEY", var("DISKCONV_TEST_S3_SECRET_KEY"))
            .env("AWS_REGION", "us-east-1")
            .env("TMPDIR", tmp.path())
            .stdin(Stdio::from(std::fs::File::open(&raw).unwrap()));
    };
    let mut c = Command::new(BIN);
    c.args(["convert", "-f", "raw", "-", "-O", "raw", &url]);
    env(&mut c);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", err(&o));
    let got = boto(&["sha256", &bucket, "img.raw"]);
    assert_eq!(got.trim(), format!("{want} {size}"));
    assert_eq!(entries(tmp.path()), Vec::<PathBuf>::new());

    let s = size.to_string();
    let mut c = Command::new(BIN);
    c.args(["convert", "-f", "raw", "--size", &s, "-", "-O", "raw", &url]);
    env(&mut c);
    let o = c.output().unwrap();
    assert!(!o.status.success());
    assert!(err(&o).contains("drop --size"), "{}", err(&o));
}
