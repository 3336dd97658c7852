//! `convert ... s3://bucket/key` against a real S3 server: SeaweedFS on 127.0.0.1, started
//! by scripts/test (tests/servers/up.sh), which exports DISKCONV_TEST_S3_ENDPOINT and its
//! keys. What the server holds is checked with boto3 (tests/servers/s3tool.py), never with
//! diskconv's own client. Without a server (`cfg(no_s3)`, see build.rs) the tests are
//! ignored; under CI a missing server fails them.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_diskconv");

struct S3 {
    endpoint: String,
    access: String,
    secret: String,
}

fn s3() -> S3 {
    let var = |n: &str| {
        std::env::var(n).unwrap_or_else(|_| {
            panic!("{n} is not set: run the tests with scripts/test, which starts SeaweedFS (tests/servers/up.sh)")
        })
    };
    S3 {
        endpoint: var("DISKCONV_TEST_S3_ENDPOINT"),
        access: var("DISKCONV_TEST_S3_ACCESS_KEY"),
        secret: var("DISKCONV_TEST_S3_SECRET_KEY"),
    }
}

fn tool() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/s3tool.py")
}

impl S3 {
    /// boto3's view of the server: `s3tool.py ARGS`, stdout on success.
    fn boto(&self, args: &[&str]) -> String {
        let out = Command::new("python3")
            .arg(tool())
            .args(args)
            .env("DISKCONV_TEST_S3_ENDPOINT", &self.endpoint)
            .env("DISKCONV_TEST_S3_ACCESS_KEY", &self.access)
            .env("DISKCONV_TEST_S3_SECRET_KEY", &self.secret)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "s3tool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A fresh bucket for one test (names are per test, so tests run in parallel).
    fn bucket(&self, name: &str) -> String {
        let b = format!("dc-{name}-{}", std::process::id());
        self.boto(&["mkbucket", &b]);
        b
    }

    fn head(&self, bucket: &str, key: &str) -> serde_json::Value {
        serde_json::from_str(&self.boto(&["head", bucket, key])).unwrap()
    }

    fn uploads(&self, bucket: &str) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.boto(&["uploads", bucket])).unwrap()
    }

    fn sha256(&self, bucket: &str, key: &str) -> (String, u64) {
        let out = self.boto(&["sha256", bucket, key]);
        let (h, n) = out.trim().split_once(' ').unwrap();
        (h.to_string(), n.parse().unwrap())
    }

    /// diskconv with this server's endpoint and keys in the AWS variables (and no others).
    fn diskconv(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_ACCESS_KEY_ID", &self.access)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret)
            .env("AWS_REGION", "us-east-1");
        c
    }

    fn convert(&self, args: &[&str]) -> Output {
        self.diskconv(args).output().expect("diskconv")
    }
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "diskconv failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_file(p: &Path) -> (String, u64) {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).unwrap();
    (format!("{:x}", h.finalize()), n)
}

/// A sparse raw image of `size` bytes with a few MiB of data at the start, the middle
/// and the end (so every part boundary region is not all zeros).
fn sparse_raw(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let chunk: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    for off in [0, size / 3 + 12345, size / 2, size - (1 << 20)] {
        f.write_all_at(&chunk, off & !511).unwrap();
    }
    p
}

/// The multipart ETag S3 computes for `file` cut into parts of `part` bytes: hex
/// md5(md5(part 1) .. md5(part N)) "-N". Parts that lie in a hole are all zeros (one MD5).
fn multipart_etag(file: &Path, part: u64) -> String {
    use md5::{Digest, Md5};
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    let len = f.metadata().unwrap().len();
    let zero_md5 = Md5::digest(vec![0u8; part as usize]);
    let mut all = Md5::new();
    let mut buf = vec![0u8; part as usize];
    let mut n = 0;
    for start in (0..len).step_by(part as usize) {
        let end = (start + part).min(len);
        // SAFETY: lseek on a file we own; SEEK_DATA only moves its offset.
        let data = unsafe { libc::lseek(f.as_raw_fd(), start as i64, libc::SEEK_DATA) };
        if end - start == part && (data < 0 || data as u64 >= end) {
            all.update(zero_md5);
        } else {
            let b = &mut buf[..(end - start) as usize];
            f.read_exact_at(b, start).unwrap();
            all.update(Md5::digest(b));
        }
        n += 1;
    }
    format!("{:x}-{n}", all.finalize())
}

/// Convert a sparse qcow2 of `size` bytes (a few MiB of data) to raw straight into the
/// bucket and check what the server holds against a local `convert -O raw`: read back by
/// boto3 and compared by sha256 (`download`), or else by the server's own multipart ETag
/// (the MD5s it computed of the parts it stored) against the test's own computation, and by
/// ranged GETs of the data regions.
fn raw_upload_matches_local_convert(
    name: &str,
    size: u64,
    part_size: Option<&str>,
    parts: u64,
    download: bool,
) {
    let s3 = s3();
    let bucket = s3.bucket(name);
    let dir = tempfile::tempdir().unwrap();
    let raw = sparse_raw(dir.path(), "src.raw", size);
    let qcow = dir.path().join("src.qcow2");
    ok(&s3.convert(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow.to_str().unwrap(),
    ]));
    std::fs::remove_file(&raw).unwrap();
    let local = dir.path().join("local.raw");
    ok(&s3.convert(&[
        "convert",
        "-O",
        "raw",
        qcow.to_str().unwrap(),
        local.to_str().unwrap(),
    ]));
    let want = sha256_file(&local);
    let part = part_size.map_or(8 << 20, |_| 5 << 20);
    let want_etag = (!download).then(|| multipart_etag(&local, part));
    let ranges: Vec<(u64, String)> = [0, size / 3 + 12345, size / 2, size - (1 << 20)]
        .iter()
        .map(|&off| {
            let off = off & !511;
            let mut b = vec![0u8; 1 << 20];
            std::fs::File::open(&local)
                .unwrap()
                .read_exact_at(&mut b, off)
                .unwrap();
            (off, sha256_bytes(&b))
        })
        .collect();
    std::fs::remove_file(&local).unwrap();

    let url = format!("s3://{bucket}/big.raw");
    let mut args = vec![
        "convert",
        "-O",
        "raw",
        "--digest",
        "sha256",
        "--output=json",
    ];
    args.extend(["--metadata", "image-name=big"]);
    if let Some(p) = part_size {
        args.extend(["--part-size", p]);
    }
    args.extend([qcow.to_str().unwrap(), url.as_str()]);
    let j: serde_json::Value = serde_json::from_str(&ok(&s3.convert(&args))).unwrap();
    assert_eq!(j["parts"], parts, "{j}");
    assert_eq!(j["part-size"], part, "{j}");
    assert_eq!(j["size"], size, "{j}");
    assert_eq!(j["url"], url.as_str());
    assert_eq!(j["digests"]["sha256"], want.0.as_str(), "{j}");

    let head = s3.head(&bucket, "big.raw");
    assert_eq!(head["etag"], j["etag"], "{head}");
    assert_eq!(head["length"], size, "{head}");
    match &want_etag {
        None => assert_eq!(s3.sha256(&bucket, "big.raw"), want),
        Some(etag) => assert_eq!(head["etag"], etag.as_str(), "{head}"),
    }
    for (off, sha) in &ranges {
        let got = s3.boto(&["range", &bucket, "big.raw", &off.to_string(), "1048576"]);
        assert_eq!(got.trim(), sha, "1 MiB at {off}");
    }
    // The usual multipart form, which diskconv checked against the parts' MD5s.
    assert!(
        head["etag"]
            .as_str()
            .unwrap()
            .ends_with(&format!("-{parts}")),
        "{head}"
    );
    assert_eq!(head["metadata"]["image-name"], "big");
    assert_eq!(head["metadata"]["source-format"], "qcow2");
    assert_eq!(head["metadata"]["format"], "raw");
    // The digests, known before the first part from a first pass, and the guest size.
    assert_eq!(head["metadata"]["sha256"], want.0.as_str(), "{head}");
    assert_eq!(head["metadata"]["virtual-size"], size.to_string(), "{head}");
    assert_eq!(j["metadata"]["sha256"], want.0.as_str(), "{j}");
    assert!(s3.uploads(&bucket).is_empty());
}

fn sha256_bytes(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(b))
}

/// Many parts within CI's budget: 640 MiB of raw output in 128 parts of 5 MiB.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn sparse_image_uploads_as_many_parts_and_reads_back_identical() {
    raw_upload_matches_local_convert("many", 640 << 20, Some("5M"), 128, true);
}

/// The issue's case: a raw form over 6 GiB (6.25 GiB: 800 parts of 8 MiB, the size chosen
/// from the exact length). Checked by the server's multipart ETag (SeaweedFS's MD5s of
/// what it stored) and ranged reads rather than a download of 6.25 GiB: SeaweedFS spends
/// most of its time hashing every byte with MD5 (several times per byte), so the upload alone
/// is most of the test's time.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn big_sparse_image_uploads_as_many_parts_and_reads_back_identical() {
    raw_upload_matches_local_convert("big", 6400 << 20, None, 800, false);
}

/// Each part carries x-amz-checksum-crc32c and the server verifies it: a part whose body
/// is damaged after its checksum was computed (the library's test hook flips one byte on
/// the way out, as a network fault would) is refused by the server (BadDigest) at that
/// part, not only later by the ETag check; the upload is aborted and no object appears.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn corrupted_part_is_refused_by_the_server() {
    use diskconv::remote::{convert_to_s3, S3Url, UploadOptions};
    let s3 = s3();
    let bucket = s3.bucket("badpart");
    let dir = tempfile::tempdir().unwrap();
    let raw = sparse_raw(dir.path(), "src.raw", 40 << 20);
    let dev = diskconv::open(&raw, &diskconv::OpenOptions::new()).unwrap();
    let opts = diskconv::ConvertOptions::new(diskconv::Format::Raw);
    let url = S3Url::parse(&format!("s3://{bucket}/bad.raw")).unwrap();
    let up = UploadOptions {
        part_size: Some(5 << 20),
        corrupt_part: Some(3),
        ..Default::default()
    };
    let e = convert_to_s3(dev.as_ref(), &url, &config(&s3), &up, &opts).unwrap_err();
    let msg = e.to_string();
    // Refused by the server (the concurrent writer reports a part's failure at the next
    // write or at completion), not caught later by diskconv's own ETag check.
    assert!(msg.contains("BadDigest"), "{msg}");
    assert!(!msg.contains("does not match the parts sent"), "{msg}");
    assert!(!msg.contains(&s3.secret), "{msg}");
    assert_eq!(s3.head(&bucket, "bad.raw")["exists"], false);
    assert!(s3.uploads(&bucket).is_empty());
    // The same upload undamaged goes through.
    let up = UploadOptions {
        part_size: Some(5 << 20),
        ..Default::default()
    };
    let r = convert_to_s3(dev.as_ref(), &url, &config(&s3), &up, &opts).unwrap();
    assert_eq!(r.parts, 8);
    assert_eq!(
        s3.head(&bucket, "bad.raw")["etag"],
        r.etag.unwrap().as_str()
    );
}

/// A throttled part (503 SlowDown, the answer S3 gives under load) is sent again with
/// backoff and the upload lands whole: the test hook answers part 2's first two attempts
/// itself, the third reaches the server.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn throttled_part_is_retried_and_the_upload_lands() {
    use diskconv::remote::{convert_to_s3, FailPart, S3Url, UploadOptions};
    let s3 = s3();
    let bucket = s3.bucket("retry");
    let dir = tempfile::tempdir().unwrap();
    let raw = sparse_raw(dir.path(), "src.raw", 24 << 20);
    let dev = diskconv::open(&raw, &diskconv::OpenOptions::new()).unwrap();
    let opts = diskconv::ConvertOptions::new(diskconv::Format::Raw);
    let url = S3Url::parse(&format!("s3://{bucket}/retried.raw")).unwrap();
    let fail = FailPart {
        part: 2,
        times: 2,
        ..Default::default()
    };
    let up = UploadOptions {
        part_size: Some(5 << 20),
        fail_part: Some(fail.clone()),
        ..Default::default()
    };
    let r = convert_to_s3(dev.as_ref(), &url, &config(&s3), &up, &opts).unwrap();
    assert_eq!(fail.served.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(r.parts, 5);
    assert_eq!(
        s3.head(&bucket, "retried.raw")["etag"],
        r.etag.unwrap().as_str()
    );
    assert_eq!(s3.head(&bucket, "retried.raw")["length"], 24u64 << 20);
    assert!(s3.uploads(&bucket).is_empty());
    // More refusals than the retries allow: a clear error, nothing left behind.
    let fail = FailPart {
        part: 3,
        times: 100,
        ..Default::default()
    };
    let url = S3Url::parse(&format!("s3://{bucket}/refused.raw")).unwrap();
    let up = UploadOptions {
        part_size: Some(5 << 20),
        fail_part: Some(fail.clone()),
        ..Default::default()
    };
    let e = convert_to_s3(dev.as_ref(), &url, &config(&s3), &up, &opts).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("SlowDown") || msg.contains("503"), "{msg}");
    assert!(!msg.contains(&s3.secret), "{msg}");
    // The retry layer's 4 retries after the first try; OpenDAL's part queue may send a
    // temporary failure once more (6 measured with 0.59.5). Bounded: it gives up.
    let tries = fail.served.load(std::sync::atomic::Ordering::SeqCst);
    assert!((5..=10).contains(&tries), "{tries} tries");
    assert_eq!(s3.head(&bucket, "refused.raw")["exists"], false);
    assert!(s3.uploads(&bucket).is_empty());
}

/// Peak memory of an upload, 256 MiB and 1 GiB in 5 MiB parts (4 in flight): the same at
/// both sizes, and within the parts in flight, the part being filled, the pool of reusable
/// part buffers and the program itself. Measured on 2026-12-01 with OpenDAL 0.59: 54 and
/// 55 MiB against SeaweedFS, 51 and 56 MiB against Ceph RGW (with 0.53, whose concurrent
/// writer kept every finished part until the upload closed, 85 and 121 MiB).
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn upload_peak_memory_is_bounded_by_parts_in_flight() {
    let s3 = s3();
    let bucket = s3.bucket("rss");
    let dir = tempfile::tempdir().unwrap();
    let mut peaks = Vec::new();
    for (name, size) in [("small.raw", 256u64 << 20), ("big.raw", 1 << 30)] {
        let raw = sparse_raw(dir.path(), name, size);
        let url = format!("s3://{bucket}/{name}");
        let child = s3
            .diskconv(&[
                "convert",
                "-O",
                "raw",
                "--part-size",
                "5M",
                raw.to_str().unwrap(),
                &url,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (st, peak) = crate::common::peak_rss_kib(child);
        assert!(st.success(), "diskconv failed: {st}");
        peaks.push(peak);
        assert_eq!(s3.head(&bucket, name)["length"], size);
        std::fs::remove_file(&raw).unwrap();
    }
    eprintln!("peak RSS: 256 MiB {} KiB, 1 GiB {} KiB", peaks[0], peaks[1]);
    assert!(
        peaks[1] <= peaks[0] + 4 * 1024,
        "grows with the image: {peaks:?} KiB"
    );
    assert!(peaks[1] < 72 * 1024, "{peaks:?} KiB");
}

/// Every output format that streams goes up and comes back as the same guest bytes
/// (checked by qemu-img when installed, and by diskconv's raw conversion of the download).
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn every_streaming_format_uploads_and_reads_back() {
    let s3 = s3();
    let bucket = s3.bucket("formats");
    let dir = tempfile::tempdir().unwrap();
    let raw = sparse_raw(dir.path(), "src.raw", 48 << 20);
    let want = sha256_file(&raw);
    let cases: &[(&str, &[&str])] = &[
        ("raw", &[]),
        ("qcow2", &[]),
        ("vdi", &[]),
        ("vpc", &[]),
        ("vpc", &["-o", "subformat=fixed"]),
        ("vmdk", &["-o", "subformat=streamOptimized"]),
    ];
    for (i, (fmt, extra)) in cases.iter().enumerate() {
        let key = format!("img{i}.{fmt}");
        let url = format!("s3://{bucket}/{key}");
        let mut args = vec!["convert", "-O", fmt, "--digest", "sha256", "--output=json"];
        args.extend_from_slice(extra);
        args.extend([raw.to_str().unwrap(), url.as_str()]);
        let j: serde_json::Value = serde_json::from_str(&ok(&s3.convert(&args))).unwrap();
        let got = dir.path().join(&key);
        s3.boto(&["get", &bucket, &key, got.to_str().unwrap()]);
        let (sha, len) = sha256_file(&got);
        assert_eq!(j["size"], len, "{fmt} {extra:?}: {j}");
        assert_eq!(j["digests"]["sha256"], sha.as_str(), "{fmt} {extra:?}");
        let head = s3.head(&bucket, &key);
        assert_eq!(head["etag"], j["etag"], "{fmt}");
        if len < 8 << 20 {
            assert_eq!(j["parts"], 1);
        }
        // Single PUT, or a multipart raw or qcow2 (whose bytes a first pass predicts), the
        // object carries its digest in its metadata.
        if len < 8 << 20 || ["raw", "qcow2"].contains(fmt) {
            assert_eq!(head["metadata"]["sha256"], sha.as_str(), "{fmt} {head}");
        }
        assert_eq!(head["metadata"]["virtual-size"], "50331648", "{fmt} {head}");
        let back = dir.path().join(format!("{key}.raw"));
        ok(&s3.convert(&[
            "convert",
            "-O",
            "raw",
            got.to_str().unwrap(),
            back.to_str().unwrap(),
        ]));
        assert_eq!(
            sha256_file(&back),
            want,
            "{fmt} {extra:?}: guest bytes differ"
        );
        // (qemu reads a vpc's size from its CHS geometry, not the footer's: skipped there.)
        if *fmt != "vpc" && Command::new("qemu-img").arg("--version").output().is_ok() {
            let c = Command::new("qemu-img")
                .args([
                    "compare",
                    "-f",
                    "raw",
                    raw.to_str().unwrap(),
                    got.to_str().unwrap(),
                ])
                .output()
                .unwrap();
            assert!(c.status.success(), "qemu-img compare {fmt}: {:?}", c);
        }
    }
    assert!(s3.uploads(&bucket).is_empty());
}

fn one_line_error(out: &Output, secret: &str) -> String {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(!err.contains(secret), "secret printed: {err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(secret));
    err
}

/// Wrong credentials, a missing bucket, an unreachable server, a bad part size: one line,
/// exit non-zero, no secret printed, nothing left on the server.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn failures_are_one_line_without_secrets() {
    let s3 = s3();
    let bucket = s3.bucket("errors");
    let dir = tempfile::tempdir().unwrap();
    let raw = sparse_raw(dir.path(), "src.raw", 24 << 20);
    let src = raw.to_str().unwrap();
    let url = format!("s3://{bucket}/x.raw");

    let wrong = "wrongSecretKey0123456789";
    let out = s3
        .diskconv(&["convert", "-O", "raw", src, &url])
        .env("AWS_SECRET_ACCESS_KEY", wrong)
        .output()
        .unwrap();
    let err = one_line_error(&out, wrong);
    assert!(err.contains(&url) && err.contains("access denied"), "{err}");

    let out = s3.convert(&[
        "convert",
        "-O",
        "raw",
        src,
        "s3://dc-no-such-bucket-here/x.raw",
    ]);
    let err = one_line_error(&out, &s3.secret);
    assert!(err.contains("no such bucket"), "{err}");

    let out = s3.convert(&[
        "convert",
        "-O",
        "raw",
        "--endpoint",
        "http://127.0.0.1:9",
        src,
        &url,
    ]);
    let err = one_line_error(&out, &s3.secret);
    assert!(err.contains("cannot reach the server"), "{err}");

    for (p, why) in [("4M", "outside S3's limits"), ("6G", "outside S3's limits")] {
        let out = s3.convert(&["convert", "-O", "raw", "--part-size", p, src, &url]);
        let err = one_line_error(&out, &s3.secret);
        assert!(err.contains(why), "{p}: {err}");
    }
    // 100 GiB of raw output does not fit 10,000 parts of 5 MiB.
    let huge = dir.path().join("huge.qcow2");
    ok(&s3.convert(&[
        "create",
        "-f",
        "qcow2",
        "-q",
        huge.to_str().unwrap(),
        "100G",
    ]));
    let out = s3.convert(&[
        "convert",
        "-O",
        "raw",
        "--part-size",
        "5M",
        huge.to_str().unwrap(),
        &url,
    ]);
    let err = one_line_error(&out, &s3.secret);
    assert!(err.contains("more than S3's 10000"), "{err}");

    assert_eq!(s3.head(&bucket, "x.raw")["exists"], false);
    assert!(s3.uploads(&bucket).is_empty());
}

/// Start an upload slowed down by `-r` and wait until its multipart upload is open.
fn start_slow_upload(s3: &S3, bucket: &str, src: &str, key: &str) -> std::process::Child {
    let url = format!("s3://{bucket}/{key}");
    let child = s3
        .diskconv(&["convert", "-O", "raw", "-r", "16M", src, &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !s3.uploads(bucket).iter().any(|u| u["key"] == key) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no multipart upload opened"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    child
}

/// SIGINT and SIGTERM mid-upload: the upload is aborted (no object, no open multipart
/// upload) and diskconv dies of the signal. SIGKILL leaves no object either; its open
/// upload is what `diskconv abort-uploads` cleans.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn interrupted_upload_leaves_no_object_and_no_open_upload() {
    use std::os::unix::process::ExitStatusExt;
    let s3 = s3();
    let bucket = s3.bucket("signals");
    let dir = tempfile::tempdir().unwrap();
    // All data, so that `-r` (which counts data, not holes) slows the upload to ~16 s.
    let raw = dir.path().join("src.raw");
    let data: Vec<u8> = (0..256u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
    std::fs::write(&raw, data).unwrap();
    let src = raw.to_str().unwrap();
    for (sig, name) in [(libc::SIGINT, "int"), (libc::SIGTERM, "term")] {
        let key = format!("{name}.raw");
        let child = start_slow_upload(&s3, &bucket, src, &key);
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, sig) };
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.signal(), Some(sig), "{name}: {out:?}");
        assert_eq!(s3.head(&bucket, &key)["exists"], false, "{name}");
        assert!(
            s3.uploads(&bucket).is_empty(),
            "{name}: {:?}",
            s3.uploads(&bucket)
        );
    }
    let mut child = start_slow_upload(&s3, &bucket, src, "kill.raw");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(s3.head(&bucket, "kill.raw")["exists"], false);
    let left = s3.uploads(&bucket);
    assert_eq!(left.len(), 1, "{left:?}");
    // diskconv's own way to clean it.
    let out = ok(&s3.convert(&["abort-uploads", &format!("s3://{bucket}/kill")]));
    assert_eq!(out.trim(), format!("aborted s3://{bucket}/kill.raw"));
    assert!(s3.uploads(&bucket).is_empty());
}

fn config(s3: &S3) -> diskconv::remote::S3Config {
    diskconv::remote::S3Config {
        endpoint: Some(s3.endpoint.clone()),
        access_key_id: Some(s3.access.clone()),
        secret_access_key: Some(s3.secret.clone()),
        ..Default::default()
    }
}

/// A qcow2 held in a bucket is read where it lies: `info` fetches its header and tables
/// only, `convert` its tables and data once, and both give what the local file gives.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn qcow2_in_a_bucket_is_read_by_ranges() {
    use diskconv::remote::{open_s3, S3Url};
    let s3 = s3();
    let bucket = s3.bucket("ranges");
    let dir = tempfile::tempdir().unwrap();
    // 1 GiB guest, 24 MiB of data in six runs.
    let raw = dir.path().join("src.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(1 << 30).unwrap();
    let run: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(40503) >> 9) as u8 | 1)
        .collect();
    for k in 0..6u64 {
        f.write_all_at(&run, k * (170 << 20)).unwrap();
    }
    let qcow = dir.path().join("src.qcow2");
    ok(&s3.convert(&[
        "convert",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        qcow.to_str().unwrap(),
    ]));
    s3.boto(&["put", &bucket, "img.qcow2", qcow.to_str().unwrap()]);
    let object = std::fs::metadata(&qcow).unwrap().len();
    let url = S3Url::parse(&format!("s3://{bucket}/img.qcow2")).unwrap();

    let (dev, stats) = open_s3(&url, &config(&s3), &diskconv::OpenOptions::new()).unwrap();
    let info = dev.info();
    eprintln!(
        "info: {} bytes in {} requests, object {object}",
        stats.bytes(),
        stats.requests()
    );
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 1 << 30);
    assert!(
        stats.bytes() * 20 < object,
        "info fetched {} of a {object}-byte object",
        stats.bytes()
    );
    let out = dir.path().join("back.raw");
    let opts = diskconv::ConvertOptions::new(diskconv::Format::Raw);
    diskconv::convert_to_path(dev.as_ref(), &out, &opts).unwrap();
    assert_eq!(sha256_file(&out), sha256_file(&raw));
    eprintln!(
        "convert: {} bytes in {} requests",
        stats.bytes(),
        stats.requests()
    );
    // Data and tables once each (whole cache blocks around the tables): about the object.
    assert!(
        stats.bytes() <= object + (2 << 20),
        "convert fetched {} of a {object}-byte object in {} requests",
        stats.bytes(),
        stats.requests()
    );
    assert!(stats.requests() < 200, "{} requests", stats.requests());

    // The CLI takes s3:// as SRC the same way (AWS_* from the environment).
    let text = ok(&s3.convert(&["info", &url.to_string()]));
    assert!(text.contains("file format: qcow2"), "{text}");
    // The host "file" is the object: its length, not 0.
    assert!(
        text.contains("file length: ") && text.contains(&format!("({object} bytes)")),
        "{text}"
    );
    assert!(text.contains("protocol type: s3"), "{text}");
    let cli_out = dir.path().join("cli.raw");
    ok(&s3.convert(&[
        "convert",
        "-O",
        "raw",
        &url.to_string(),
        cli_out.to_str().unwrap(),
    ]));
    assert_eq!(sha256_file(&cli_out), sha256_file(&raw));
}

/// An object replaced while it is read is an error, never a mix of two images; a missing
/// object or a wrong key is a one-line error without the secret.
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn object_changed_between_reads_is_an_error() {
    use diskconv::remote::{open_s3, S3Url};
    let s3 = s3();
    let bucket = s3.bucket("changed");
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    std::fs::write(&a, vec![0xaa; 4 << 20]).unwrap();
    let b = dir.path().join("b.raw");
    std::fs::write(&b, vec![0xbb; 4 << 20]).unwrap();
    s3.boto(&["put", &bucket, "img.raw", a.to_str().unwrap()]);
    let url = S3Url::parse(&format!("s3://{bucket}/img.raw")).unwrap();
    let opts = diskconv::OpenOptions::new().format(diskconv::Format::Raw);
    let (dev, _) = open_s3(&url, &config(&s3), &opts).unwrap();
    let mut buf = vec![0; 4096];
    dev.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0xaa));
    s3.boto(&["put", &bucket, "img.raw", b.to_str().unwrap()]);
    let e = dev.read_at(&mut buf, 3 << 20).unwrap_err().to_string();
    assert!(e.contains("changed"), "{e}");

    let out = s3.convert(&["info", &format!("s3://{bucket}/missing.qcow2")]);
    let err = one_line_error(&out, &s3.secret);
    assert!(err.contains("not found"), "{err}");
    let wrong = "wrongSecretKey0123456789";
    let out = s3
        .diskconv(&["info", &url.to_string()])
        .env("AWS_SECRET_ACCESS_KEY", wrong)
        .output()
        .unwrap();
    let err = one_line_error(&out, wrong);
    assert!(err.contains("access denied"), "{err}");
}

/// A server that goes away mid-upload (a SeaweedFS of the test's own, stopped by its pid):
/// diskconv fails with a clear error naming the object, exits non-zero, prints no secret,
/// and says that an incomplete upload may be left (the abort could not reach the server).
#[test]
#[cfg_attr(no_s3, ignore = "no S3 server: run scripts/test (it starts SeaweedFS)")]
fn server_gone_mid_upload_is_a_clear_error() {
    let _ = s3(); // the shared server's presence says weed is installed
    let servers = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers");
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("weed");
    let started = Command::new(servers.join("start-seaweedfs.sh"))
        .arg(&run)
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    let env = std::fs::read_to_string(run.join("weed.env")).unwrap();
    let get = |k: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    let own = S3 {
        endpoint: get("S3_ENDPOINT"),
        access: get("S3_ACCESS_KEY"),
        secret: get("S3_SECRET_KEY"),
    };
    let stop = || {
        Command::new(servers.join("stop-seaweedfs.sh"))
            .arg(&run)
            .output()
            .unwrap()
    };
    let bucket = own.bucket("gone");
    let raw = dir.path().join("src.raw");
    let data: Vec<u8> = (0..128u32 << 20).map(|i| (i % 253) as u8 | 1).collect();
    std::fs::write(&raw, data).unwrap();
    let child = start_slow_upload(&own, &bucket, raw.to_str().unwrap(), "gone.raw");
    let stopped = stop();
    let out = child.wait_with_output().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains(&own.secret), "{err}");
    let last = err.trim_end().lines().last().unwrap();
    assert!(
        last.starts_with(&format!("diskconv: s3://{bucket}/gone.raw: ")),
        "{err}"
    );
    assert!(
        last.contains("cannot reach the server") || last.contains("HTTP 5"),
        "{err}"
    );
}
