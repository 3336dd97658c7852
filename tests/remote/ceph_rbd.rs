//! Ceph RBD through pipes, as the seeds move images in and out of a cluster:
//! `diskconv convert -O raw SRC - | rbd import --sparse-size 4096 - POOL/IMG` and
//! `rbd export POOL/IMG - | diskconv convert -f raw --size N - -O qcow2 OUT`, against a real
//! single-node Ceph 16 on 127.0.0.1 (tests/servers/ceph, started by tests/servers/up.sh,
//! which exports DISKCONV_TEST_CEPH_CONF and DISKCONV_TEST_CEPH_POOL). The `rbd` CLI and
//! qemu-img are the oracles: bytes are compared by sha256 of `rbd export`, allocation by
//! `rbd diff`, the qcow2 by `qemu-img compare` and `qemu-img check`. diskconv's peak memory
//! is GNU time's maximum resident set size. Without a cluster (`cfg(no_ceph)`, see build.rs)
//! the RBD tests are ignored; under CI a missing cluster fails them. The refusals of a pipe
//! source need no cluster and always run.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_diskconv");
const MIB: u64 = 1 << 20;
/// RBD's default object size: images are stored in 4 MiB objects.
const OBJECT: u64 = 4 * MIB;

struct Ceph {
    conf: String,
    pool: String,
}

fn ceph() -> Ceph {
    let var = |n: &str| {
        std::env::var(n).unwrap_or_else(|_| {
            panic!("{n} is not set: run the tests with scripts/test, which starts Ceph (tests/servers/up.sh)")
        })
    };
    Ceph {
        conf: var("DISKCONV_TEST_CEPH_CONF"),
        pool: var("DISKCONV_TEST_CEPH_POOL"),
    }
}

impl Ceph {
    fn rbd(&self) -> Command {
        let mut c = Command::new("rbd");
        c.env("CEPH_CONF", &self.conf);
        c
    }

    /// An image name of this test run in the pool, removed first if an earlier run left it.
    fn image(&self, name: &str) -> String {
        let spec = format!("{}/dc-{name}-{}", self.pool, std::process::id());
        let _ = self.rbd().args(["rm", "--no-progress", &spec]).output();
        spec
    }

    fn remove(&self, spec: &str) {
        ok(
            &self
                .rbd()
                .args(["rm", "--no-progress", spec])
                .output()
                .unwrap(),
            "rbd rm",
        );
    }

    fn info(&self, spec: &str) -> serde_json::Value {
        let out = self
            .rbd()
            .args(["info", "--format", "json", spec])
            .output()
            .unwrap();
        serde_json::from_slice(ok(&out, "rbd info").as_bytes()).unwrap()
    }

    /// Bytes RBD holds for the image (`rbd diff`: the extents written since creation).
    fn allocated(&self, spec: &str) -> u64 {
        let out = self
            .rbd()
            .args(["diff", "--format", "json", spec])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(ok(&out, "rbd diff").as_bytes()).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["length"].as_u64().unwrap())
            .sum()
    }

    /// sha256 and length of `rbd export SPEC -`.
    fn export_sha256(&self, spec: &str) -> (String, u64) {
        let mut child = self
            .rbd()
            .args(["export", "--no-progress", spec, "-"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let got = sha256_of(child.stdout.take().unwrap());
        assert!(child.wait().unwrap().success(), "rbd export {spec}");
        got
    }

    /// `rbd export SPEC - | diskconv ARGS` under GNU time: diskconv's output and peak RSS.
    fn export_into_diskconv(&self, spec: &str, args: &[&str], dir: &Path) -> (Output, u64) {
        let mut export = self
            .rbd()
            .args(["export", "--no-progress", spec, "-"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (out, rss) = timed(args, Stdio::from(export.stdout.take().unwrap()), dir);
        // diskconv stops reading on error: rbd then dies of the closed pipe, which is fine.
        let status = export.wait().unwrap();
        if out.status.success() {
            assert!(status.success(), "rbd export {spec} failed");
        }
        (out, rss)
    }
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_of(mut r: impl std::io::Read) -> (String, u64) {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let n = std::io::copy(&mut r, &mut h).unwrap();
    (format!("{:x}", h.finalize()), n)
}

fn sha256_file(p: &Path) -> (String, u64) {
    sha256_of(std::fs::File::open(p).unwrap())
}

/// `diskconv ARGS` under `/usr/bin/time -f %M` with `stdin`: its output and peak RSS in KiB.
fn timed(args: &[&str], stdin: Stdio, dir: &Path) -> (Output, u64) {
    let rss_file = dir.join(format!("rss-{}", rand_suffix()));
    let out = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(BIN)
        .args(args)
        .stdin(stdin)
        .output()
        .expect("GNU time (Debian package time)");
    let rss = std::fs::read_to_string(&rss_file)
        .unwrap()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS from /usr/bin/time in {rss_file:?}"));
    (out, rss)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Start `diskconv ARGS` (stdout piped) under GNU time.
fn spawn_timed(args: &[&str], dir: &Path) -> (Child, PathBuf) {
    let rss_file = dir.join(format!("rss-{}", rand_suffix()));
    let child = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("GNU time (Debian package time)");
    (child, rss_file)
}

fn read_rss(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

/// `diskconv ARGS | rbd import --sparse-size 4096 - SPEC`: diskconv's peak RSS in KiB.
fn import_from_diskconv(c: &Ceph, args: &[&str], spec: &str, dir: &Path) -> u64 {
    let (mut dc, rss_file) = spawn_timed(args, dir);
    let import = c
        .rbd()
        .args([
            "import",
            "--no-progress",
            "--sparse-size",
            "4096",
            "-",
            spec,
        ])
        .stdin(Stdio::from(dc.stdout.take().unwrap()))
        .output()
        .unwrap();
    let dc = dc.wait_with_output().unwrap();
    ok(&dc, "diskconv convert ... -");
    ok(&import, "rbd import -");
    read_rss(&rss_file)
}

/// Guest data regions of the test images: at the start, across a 4 MiB object boundary,
/// in the middle, and the image's very last bytes (its size is not a multiple of 4 MiB).
/// Regions past a small image's end are clipped to it.
fn regions(size: u64) -> Vec<(u64, u64)> {
    let mut v = vec![
        (0, MIB),
        (3 * OBJECT - 3 * 4096, 5 * MIB + 4096),
        ((size / 2) & !4095, 2 * MIB),
        (size - 5 * 512, 5 * 512),
    ];
    for r in &mut v {
        r.0 = r.0.min(size);
        r.1 = r.1.min(size - r.0);
    }
    v.retain(|r| r.1 > 0);
    v
}

/// A sparse raw image of `size` bytes holding `regions(size)` of patterned data.
fn sparse_raw(path: &Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, len) in regions(size) {
        let data: Vec<u8> = (0..len)
            .map(|j| ((j.wrapping_mul(2654435761) >> 13) as u8) | 1)
            .collect();
        f.write_all_at(&data, off).unwrap();
    }
}

/// How many bytes of whole 4 MiB objects the regions touch: the most `rbd import
/// --sparse-size 4096` may allocate for them (it writes within the objects holding data).
fn objects_touched(size: u64) -> u64 {
    let mut objs: Vec<u64> = regions(size)
        .into_iter()
        .flat_map(|(o, l)| o / OBJECT..(o + l).div_ceil(OBJECT))
        .collect();
    objs.sort();
    objs.dedup();
    objs.len() as u64 * OBJECT
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    ok(&out, &format!("qemu-img {args:?}"))
}

/// 1 GiB + 1 MiB + 1536 bytes: not a multiple of 4 MiB (the last RBD object is partial), a
/// 512-byte multiple as qcow2 needs, and far more than any buffer a bounded stream holds.
const SIZE: u64 = (1 << 30) + MIB + 1536;
/// Peak RSS allowed to diskconv for SIZE streamed through a pipe: a fraction of the data
/// it moves (9 MiB) plus the stream's bytes (1 GiB), so nothing is held beyond a few units.
const MAX_RSS_KIB: u64 = 64 * 1024;

#[test]
#[cfg_attr(no_ceph, ignore = "no Ceph cluster: run scripts/test (it starts one)")]
#[cfg_attr(
    all(no_qemu, not(no_ceph)),
    ignore = "qemu-img not installed (Debian package qemu-utils)"
)]
fn a_sparse_qcow2_piped_into_rbd_and_back_is_bit_exact_in_bounded_memory() {
    let c = ceph();
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    sparse_raw(&raw, SIZE);
    let want = sha256_file(&raw);
    let src = dir.path().join("disk.qcow2");
    let rs = raw.to_str().unwrap();
    let ss = src.to_str().unwrap();
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", rs, ss]);

    // In: normalise to raw on the pipe, rbd import keeps it sparse.
    let spec = c.image("roundtrip");
    let rss_in = import_from_diskconv(&c, &["convert", "-O", "raw", ss, "-"], &spec, dir.path());
    assert_eq!(c.info(&spec)["size"].as_u64(), Some(SIZE));
    assert_eq!(c.export_sha256(&spec), want, "rbd export after the import");
    let allocated = c.allocated(&spec);
    assert!(
        allocated > 0 && allocated <= objects_touched(SIZE),
        "rbd holds {allocated} bytes of {SIZE}; the data lives in {} bytes of objects",
        objects_touched(SIZE)
    );

    // Out: rbd export into a qcow2, the stream's length given with --size.
    let out = dir.path().join("back.qcow2");
    let os = out.to_str().unwrap();
    let size = SIZE.to_string();
    let args = [
        "convert", "-f", "raw", "--size", &size, "-", "-O", "qcow2", os,
    ];
    let (res, rss_out) = c.export_into_diskconv(&spec, &args, dir.path());
    ok(&res, "rbd export | diskconv convert -f raw -");
    qemu_img(&["check", os]);
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", rs, os]);
    // Zero blocks of the stream stay unallocated in the qcow2 (-S 4k).
    let map = qemu_img(&["map", "--output=json", os]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let data: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"].as_bool() == Some(true))
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    let real: u64 = regions(SIZE).iter().map(|r| r.1).sum();
    assert!(
        data >= real && data <= real + 4 * 64 * 1024,
        "the qcow2 holds {data} data bytes for {real} bytes of data"
    );
    c.remove(&spec);
    eprintln!("peak RSS of diskconv: {rss_in} KiB into rbd import, {rss_out} KiB from rbd export ({SIZE} bytes streamed)");
    assert!(
        rss_in < MAX_RSS_KIB,
        "diskconv into rbd import peaked at {rss_in} KiB"
    );
    assert!(
        rss_out < MAX_RSS_KIB,
        "diskconv from rbd export peaked at {rss_out} KiB"
    );
}

#[test]
#[cfg_attr(no_ceph, ignore = "no Ceph cluster: run scripts/test (it starts one)")]
#[cfg_attr(
    all(no_qemu, not(no_ceph)),
    ignore = "qemu-img not installed (Debian package qemu-utils)"
)]
fn target_size_grows_an_image_on_its_way_into_rbd() {
    let c = ceph();
    let dir = tempfile::tempdir().unwrap();
    let size = 21 * MIB + 512;
    let raw = dir.path().join("small.raw");
    sparse_raw(&raw, size);
    let src = dir.path().join("small.vmdk");
    let (rs, ss) = (raw.to_str().unwrap(), src.to_str().unwrap());
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", rs, ss]);
    let grown = 64 * MIB + 4096;
    let spec = c.image("grown");
    let target = grown.to_string();
    let args = ["convert", "-O", "raw", "--target-size", &target, ss, "-"];
    import_from_diskconv(&c, &args, &spec, dir.path());
    assert_eq!(c.info(&spec)["size"].as_u64(), Some(grown));
    // The grown image is the source followed by zeros.
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.set_len(grown).unwrap();
    assert_eq!(c.export_sha256(&spec), sha256_file(&raw));
    assert!(c.allocated(&spec) <= objects_touched(size));
    c.remove(&spec);
}

#[test]
#[cfg_attr(no_ceph, ignore = "no Ceph cluster: run scripts/test (it starts one)")]
#[cfg_attr(
    all(no_qemu, not(no_ceph)),
    ignore = "qemu-img not installed (Debian package qemu-utils)"
)]
fn an_rbd_export_of_another_length_than_size_writes_nothing() {
    let c = ceph();
    let dir = tempfile::tempdir().unwrap();
    let size = 9 * MIB + 3 * 512;
    let raw = dir.path().join("d.raw");
    sparse_raw(&raw, size);
    let spec = c.image("lengths");
    let import = c
        .rbd()
        .args(["import", "--no-progress", "--sparse-size", "4096"])
        .arg(&raw)
        .arg(&spec)
        .output()
        .unwrap();
    ok(&import, "rbd import FILE");
    let out = dir.path().join("o.qcow2");
    let os = out.to_str().unwrap();
    for (given, says) in [
        (Some(size - 512), "longer than"),
        (Some(size + 512), "ended after"),
    ] {
        let given = given.map(|g| g.to_string());
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        if let Some(g) = &given {
            args.extend(["--size", g]);
        }
        args.extend(["-", os]);
        let (res, _) = c.export_into_diskconv(&spec, &args, dir.path());
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success(), "{given:?}: {err}");
        assert!(err.contains(says), "{given:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!out.exists(), "{given:?} left {os}");
        assert_eq!(
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains("o.qcow2"))
                .count(),
            0,
            "a temporary output was left"
        );
    }
    // Without --size the stream is spooled to $TMPDIR: the plain command works.
    let args = ["convert", "-f", "raw", "-", "-O", "qcow2", os];
    let (res, _) = c.export_into_diskconv(&spec, &args, dir.path());
    ok(&res, "rbd export | diskconv convert -f raw - (spooled)");
    let rs = raw.to_str().unwrap();
    qemu_img(&["compare", "-f", "raw", "-F", "qcow2", rs, os]);
    c.remove(&spec);
}

/// Run `diskconv ARGS` with `input` on a pipe.
fn piped(args: &[&str], input: Vec<u8>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        // The reader may stop early (an error): a broken pipe is its answer.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

#[test]
fn a_pipe_source_is_raw_of_a_given_size_read_once_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let size = 3 * MIB + 512;
    let raw = dir.path().join("p.raw");
    sparse_raw(&raw, size);
    let bytes = std::fs::read(&raw).unwrap();
    let s = size.to_string();

    // Raw through a pipe both ways, and into a file, gives the same bytes.
    let out = piped(
        &["convert", "-f", "raw", "--size", &s, "-", "-O", "raw", "-"],
        bytes.clone(),
    );
    ok(&out, "stdin to stdout");
    assert_eq!(out.stdout, bytes);
    let file = dir.path().join("f.raw");
    let fs = file.to_str().unwrap();
    ok(
        &piped(
            &["convert", "-f", "raw", "--size", &s, "-", fs],
            bytes.clone(),
        ),
        "stdin to file",
    );
    assert_eq!(std::fs::read(&file).unwrap(), bytes);

    // What a pipe cannot do is refused in one line naming the way out, writing nothing.
    let q = dir.path().join("q.qcow2");
    let qs = q.to_str().unwrap();
    for (args, says) in [
        (vec!["convert", "--size", &s, "-", qs], "add -f raw"),
        (
            vec!["convert", "-f", "qcow2", "--size", &s, "-", qs],
            "add -f raw",
        ),
        (
            vec!["convert", "-f", "raw", "--size", "0", "-", qs],
            "not a positive size",
        ),
        (
            vec!["convert", "-f", "raw", "--size", &s, "--sparsify", "-", qs],
            "--sparsify",
        ),
        (
            vec!["convert", "-f", "raw", "--size", &s, fs, qs],
            "needs SRC '-'",
        ),
        // A layout planned from a first pass cannot re-read the pipe.
        (
            vec![
                "convert", "-f", "raw", "--size", &s, "-O", "qcow2", "-", "-",
            ],
            "read once",
        ),
        // Shrinking checks the tail first: the pipe is read ahead to it, within bounds.
        (
            vec![
                "convert",
                "-f",
                "raw",
                "--size",
                &s,
                "--target-size",
                "1M",
                "-",
                qs,
            ],
            "would drop data",
        ),
    ] {
        let out = piped(&args, bytes.clone());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("Options::"), "{args:?}: {err}");
        assert!(!q.exists(), "{args:?} left {qs}");
    }
}

/// A loop device over a file, detached on drop (needs root, as the tests run in CI).
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux)");
        Loop(
            ok(&out, "losetup -f --show (needs root)")
                .trim()
                .to_string(),
        )
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// The stand-in for a mapped `/dev/rbdN` (this kernel has no krbd): `rbd export` written in
/// place into a block device with `-n`, zero runs of the stream overwritten too.
#[test]
#[cfg_attr(no_ceph, ignore = "no Ceph cluster: run scripts/test (it starts one)")]
#[cfg_attr(
    all(no_lvm, not(no_ceph)),
    ignore = "losetup not installed (Debian package util-linux)"
)]
fn an_rbd_export_is_written_into_a_block_device_in_place() {
    let c = ceph();
    let dir = tempfile::tempdir().unwrap();
    let size = 9 * MIB + 3 * 512;
    let raw = dir.path().join("d.raw");
    sparse_raw(&raw, size);
    let spec = c.image("blockdev");
    let import = c
        .rbd()
        .args(["import", "--no-progress", "--sparse-size", "4096"])
        .arg(&raw)
        .arg(&spec)
        .output()
        .unwrap();
    ok(&import, "rbd import FILE");
    // The device is larger than the image and full of old bytes.
    let backing = dir.path().join("dev.img");
    std::fs::write(&backing, vec![0xa5u8; (12 * MIB) as usize]).unwrap();
    let dev = Loop::attach(&backing);
    let n = size.to_string();
    let args = [
        "convert", "-f", "raw", "--size", &n, "-n", "-O", "raw", "-", &dev.0,
    ];
    let (res, _) = c.export_into_diskconv(&spec, &args, dir.path());
    ok(&res, "rbd export | diskconv convert -n - /dev/loopN");
    drop(dev);
    let got = std::fs::read(&backing).unwrap();
    assert!(
        got[..size as usize] == std::fs::read(&raw).unwrap()[..],
        "the device does not hold the image"
    );
    assert!(
        got[size as usize..].iter().all(|&b| b == 0xa5),
        "past the image was written"
    );
    c.remove(&spec);
}
