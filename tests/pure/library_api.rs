//! The library as a dependency (issue 15), used from outside the crate the way an
//! uploader or registry crate would: inspect-then-use on one `File` under `InspectLimits`,
//! errors that say which side failed and survive `std::io`, cancellation, a writer whose
//! state comes back, the lean dependency tree, serialisable reports, and the two examples
//! (their logic included with `#[path]`, so they are run here, not only built).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use diskconv::{
    convert_device_into, convert_to_path, convert_to_writer, inspect_file, BlockDevice,
    CancelToken, ConvertOptions, CreateOptions, DeviceReader, Error, ErrorKind, FindingKind,
    Format, ImageInfo, ImageWriter, InspectLimits, Mapping, MappingKind, OpenOptions, Side,
};

#[allow(dead_code)]
#[path = "../../examples/uploader.rs"]
mod uploader;

#[allow(dead_code)]
#[path = "../../examples/registry_probe.rs"]
mod registry_probe;

const MIB: u64 = 1 << 20;

/// A raw file of `size` bytes with a distinct non-zero MiB every other MiB.
fn raw_with_data(path: &Path, size: u64) -> Vec<u8> {
    let mut v = vec![0u8; size as usize];
    for (i, chunk) in v.chunks_mut(MIB as usize).enumerate().step_by(2) {
        chunk.fill(i as u8 + 1);
    }
    std::fs::write(path, &v).unwrap();
    v
}

/// A qcow2 image holding `raw_with_data(size)`; returns the guest bytes.
fn qcow2_with_data(dir: &Path, name: &str, size: u64) -> (std::path::PathBuf, Vec<u8>) {
    let raw = dir.join(format!("{name}.raw"));
    let bytes = raw_with_data(&raw, size);
    let img = dir.join(name);
    diskconv::convert(&raw, &img, &ConvertOptions::new(Format::Qcow2)).unwrap();
    (img, bytes)
}

fn read_all(mut r: impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

// ---- 1. inspect, then use the same file ----

#[test]
fn inspect_file_hands_back_the_device_it_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bytes) = qcow2_with_data(dir.path(), "up.qcow2", 4 * MIB);
    let file = std::fs::File::open(&img).unwrap();
    let (report, dev) =
        inspect_file(file, &img, Some(Format::Qcow2), &InspectLimits::default()).unwrap();
    assert!(report.is_safe(), "{report:?}");
    assert_eq!(report.opened_as, Some(Format::Qcow2));
    let dev = dev.expect("a safe image comes with its device");
    // Another file put at the path after the check is not what the device reads.
    let other = dir.path().join("other.qcow2");
    diskconv::create(&other, Format::Qcow2, &CreateOptions::new(4 * MIB)).unwrap();
    std::fs::rename(&other, &img).unwrap();
    assert_eq!(read_all(DeviceReader::new(dev)), bytes);
}

#[test]
fn inspect_file_refuses_a_mismatched_claim_and_still_reads_as_claimed() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qcow2_with_data(dir.path(), "up.qcow2", 2 * MIB);
    let file = std::fs::File::open(&img).unwrap();
    let (report, dev) =
        inspect_file(file, &img, Some(Format::Raw), &InspectLimits::default()).unwrap();
    assert!(!report.is_safe());
    assert!(report.has(FindingKind::FormatMismatch));
    // Opened as claimed (raw): the device is the file's bytes, for a caller that wants it.
    let dev = dev.unwrap();
    assert_eq!(dev.format(), Format::Raw);
    assert_eq!(dev.virtual_size(), std::fs::metadata(&img).unwrap().len());
}

#[test]
fn a_huge_claimed_virtual_size_is_an_unsafe_finding_against_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("huge.qcow2");
    // 1 PiB claimed by a file of a few MiB (its L1 table).
    diskconv::create(&img, Format::Qcow2, &CreateOptions::new(1 << 50)).unwrap();
    assert!(std::fs::metadata(&img).unwrap().len() < 64 * MIB);
    let limits = InspectLimits::default();
    assert_eq!(limits.max_virtual_size, 64 << 40);
    let file = std::fs::File::open(&img).unwrap();
    let (report, _) = inspect_file(file, &img, Some(Format::Qcow2), &limits).unwrap();
    assert_eq!(report.virtual_size, Some(1 << 50));
    let f = report
        .findings
        .iter()
        .find(|f| f.kind == FindingKind::ExceedsLimit)
        .unwrap_or_else(|| panic!("no ExceedsLimit finding: {report:?}"));
    assert!(f.hazard && f.detail.contains("max_virtual_size"), "{f:?}");
    assert!(!report.is_safe());

    // The limit is the caller's: a small image passes the default and fails a small one.
    let (small, _) = qcow2_with_data(dir.path(), "small.qcow2", 4 * MIB);
    let open = || std::fs::File::open(&small).unwrap();
    let (ok, _) = inspect_file(open(), &small, None, &InspectLimits::default()).unwrap();
    assert!(ok.is_safe(), "{ok:?}");
    let tight = InspectLimits {
        max_virtual_size: 2 * MIB,
        ..InspectLimits::default()
    };
    let (refused, _) = inspect_file(open(), &small, None, &tight).unwrap();
    assert!(refused.has(FindingKind::ExceedsLimit) && !refused.is_safe());
    // Table entries: 4 MiB in 64 KiB clusters is 64 entries.
    let few = InspectLimits {
        max_table_entries: 63,
        ..InspectLimits::default()
    };
    let (refused, _) = inspect_file(open(), &small, None, &few).unwrap();
    assert!(refused.has(FindingKind::ExceedsLimit), "{refused:?}");
}

#[test]
fn an_unfinished_map_walk_is_unsafe_unless_the_caller_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qcow2_with_data(dir.path(), "up.qcow2", 8 * MIB);
    let open = || std::fs::File::open(&img).unwrap();
    let short = InspectLimits {
        max_map_calls: 1,
        ..InspectLimits::default()
    };
    let (r, _) = inspect_file(open(), &img, None, &short).unwrap();
    assert!(r.has(FindingKind::MapIncomplete));
    assert!(!r.is_safe(), "{r:?}");
    let lenient = InspectLimits {
        incomplete_map_is_unsafe: false,
        ..short
    };
    let (r, _) = inspect_file(open(), &img, None, &lenient).unwrap();
    assert!(r.has(FindingKind::MapIncomplete));
    assert!(r.is_safe(), "{r:?}");
}

// ---- 2. errors a caller can act on ----

/// A device of `size` bytes, all data; reads fail with `fail` (when set) and are counted.
struct TestDevice {
    size: u64,
    fail: Option<fn() -> Error>,
    read: AtomicU64,
}

impl TestDevice {
    fn new(size: u64, fail: Option<fn() -> Error>) -> Self {
        TestDevice {
            size,
            fail,
            read: AtomicU64::new(0),
        }
    }
}

impl BlockDevice for TestDevice {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn map(&self, offset: u64, max_len: u64) -> diskconv::Result<Mapping> {
        Ok(Mapping {
            offset,
            len: max_len.min(self.size - offset),
            kind: MappingKind::Data { host: None },
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskconv::Result<()> {
        if let Some(f) = self.fail {
            return Err(f());
        }
        self.read.fetch_add(buf.len() as u64, Ordering::SeqCst);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((offset + i as u64) / 4096 % 251 + 1) as u8;
        }
        Ok(())
    }
    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "raw".into(),
            virtual_size: self.size,
            ..Default::default()
        }
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

#[test]
fn errors_keep_kind_side_and_source_through_std_io() {
    let denied = || {
        Error::io(
            "reading the upload",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        )
    };
    let dev = TestDevice::new(MIB, Some(denied));
    let mut buf = [0u8; 512];
    let io = DeviceReader::new(&dev as &dyn BlockDevice)
        .read(&mut buf)
        .unwrap_err();
    assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
    let back = Error::from(io);
    assert_eq!(back.kind(), ErrorKind::Io);
    assert_eq!(back.side(), Some(Side::Source));
    assert_eq!(back.io_kind(), std::io::ErrorKind::PermissionDenied);
    let src = std::error::Error::source(&back).expect("the OS error is the source");
    let src = src.downcast_ref::<std::io::Error>().unwrap();
    assert_eq!(src.kind(), std::io::ErrorKind::PermissionDenied);

    // A bad image is InvalidData, and comes back as the same error.
    let dev = TestDevice::new(MIB, Some(|| Error::corrupt("L2 entry points past the end")));
    let io = DeviceReader::new(&dev as &dyn BlockDevice)
        .read(&mut buf)
        .unwrap_err();
    assert_eq!(io.kind(), std::io::ErrorKind::InvalidData);
    let back = Error::from(io);
    assert_eq!(back.kind(), ErrorKind::Corrupt);
    assert_eq!(back.message(), "L2 entry points past the end");

    assert_eq!(ErrorKind::Encrypted.to_string(), "encrypted image");
    assert_eq!(ErrorKind::LimitExceeded.to_string(), "limit exceeded");
    assert_eq!(FindingKind::NamesOtherFiles.to_string(), "NamesOtherFiles");
}

#[test]
fn encryption_has_its_own_kind_and_finding() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qcow2_with_data(dir.path(), "enc.qcow2", MIB);
    // crypt_method (offset 32) = 2, LUKS.
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &2u32.to_be_bytes(), 32).unwrap();
    let e = diskconv::open(&img, &OpenOptions::new()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Encrypted, "{e}");
    assert_eq!(e.io_kind(), std::io::ErrorKind::Unsupported);
    let (r, dev) = inspect_file(
        std::fs::File::open(&img).unwrap(),
        &img,
        None,
        &InspectLimits::default(),
    )
    .unwrap();
    assert!(r.has(FindingKind::Encrypted) && dev.is_none(), "{r:?}");
}

/// A sink that takes `ok` bytes, then fails like a closed connection.
struct FailingSink {
    ok: usize,
}

impl Write for FailingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.ok == 0 {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(self.ok);
        self.ok -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_sink_is_the_destination_and_a_failing_upload_the_source() {
    let dev = TestDevice::new(4 * MIB, None);
    let e = convert_to_writer(
        &dev,
        FailingSink { ok: 1 << 16 },
        &ConvertOptions::new(Format::Raw),
    )
    .unwrap_err();
    assert_eq!(e.side(), Some(Side::Destination), "{e}");
    assert_eq!(e.io_kind(), std::io::ErrorKind::BrokenPipe, "{e}");

    let bad = TestDevice::new(4 * MIB, Some(|| Error::corrupt("bad table")));
    let e =
        convert_to_writer(&bad, std::io::sink(), &ConvertOptions::new(Format::Raw)).unwrap_err();
    assert_eq!(e.side(), Some(Side::Source), "{e}");
    assert_eq!(e.kind(), ErrorKind::Corrupt);

    // Pulled through a ConvertedReader: `read` fails with the kind, `finish` typed.
    let bad: Arc<dyn BlockDevice> = Arc::new(TestDevice::new(
        4 * MIB,
        Some(|| Error::corrupt("bad table")),
    ));
    let mut body = diskconv::ConvertedReader::new(bad, ConvertOptions::new(Format::Raw)).unwrap();
    let io = body.read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(io.kind(), std::io::ErrorKind::InvalidData, "{io}");
    let e = body.finish().unwrap_err();
    assert_eq!(
        (e.kind(), e.side()),
        (ErrorKind::Corrupt, Some(Side::Source))
    );
}

#[test]
fn library_messages_name_options_not_flags() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    raw_with_data(&img, 2 * MIB);
    let e = diskconv::resize(&img, MIB, &diskconv::ResizeOptions::default()).unwrap_err();
    assert_eq!(e.option(), Some("ResizeOptions::shrink"));
    assert!(!e.to_string().contains("--"), "{e}");
    let mut o = ConvertOptions::new(Format::Raw);
    o.target_is_zero = true;
    let e = diskconv::convert(&img, &dir.path().join("b.raw"), &o).unwrap_err();
    assert!(!e.to_string().contains("--"), "{e}");
    assert_eq!(e.option(), Some("ConvertOptions::target_is_zero"));
}

// ---- 3. control ----

/// Counts what the engine hands over; its state is read back after the conversion.
#[derive(Default)]
struct CountingWriter {
    size: u64,
    bytes: u64,
    writes: u64,
    digest: Option<diskconv::writer::Digester>,
}

impl ImageWriter for CountingWriter {
    fn granularity(&self) -> u64 {
        4096
    }
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn write(&mut self, _offset: u64, data: &[u8]) -> diskconv::Result<()> {
        self.bytes += data.len() as u64;
        self.writes += 1;
        if let Some(d) = &mut self.digest {
            d.update(data);
        }
        Ok(())
    }
    fn finish(self: Box<Self>) -> diskconv::Result<()> {
        Ok(())
    }
}

#[test]
fn convert_device_into_gives_the_writer_back() {
    let dev = TestDevice::new(8 * MIB, None);
    let mut w = CountingWriter {
        size: 8 * MIB,
        digest: Some(diskconv::writer::Digester::new(&[
            diskconv::DigestAlgo::Md5,
        ])),
        ..Default::default()
    };
    let report = convert_device_into(&dev, &mut w, &ConvertOptions::new(Format::Raw)).unwrap();
    assert_eq!(report.virtual_size, 8 * MIB);
    assert_eq!(w.bytes, 8 * MIB);
    let md5 = w.digest.take().unwrap().finish();
    let mut d = diskconv::writer::Digester::new(&[diskconv::DigestAlgo::Md5]);
    d.update(&read_all(DeviceReader::new(&dev as &dyn BlockDevice)));
    assert_eq!(md5, d.finish());
}

#[test]
fn cancelling_stops_within_one_unit_and_leaves_no_output() {
    // 1 GiB of data (no holes): converting it all would read and write 1 GiB.
    let size = 1 << 30;
    let dev = TestDevice::new(size, None);
    let token = CancelToken::new();
    let stop_at = 8 * MIB;
    let seen = AtomicU64::new(0);
    let progress = |done: u64, _total: u64| {
        seen.store(done, Ordering::SeqCst);
        if done >= stop_at {
            token.cancel();
        }
    };
    let mut opts = ConvertOptions::new(Format::Raw);
    opts.threads = 2;
    opts.progress = Some(&progress);
    opts.cancel = token.clone();

    // Into a writer the test keeps: nothing is written after the unit that cancelled.
    let mut w = CountingWriter {
        size,
        ..Default::default()
    };
    let e = convert_device_into(&dev, &mut w, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert_eq!(w.bytes, stop_at, "written past the unit that cancelled");
    // Reads stop too: at most the units in flight past that point (the engine keeps
    // max(2 x threads + 2, 16) units of 1 MiB in flight, so 16 here), plus the one being
    // read when the token was cancelled.
    let read = dev.read.load(Ordering::SeqCst);
    assert!(read <= stop_at + 17 * MIB, "read {read} bytes");

    // Into a file: the conversion fails and the destination is not there.
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("out.qcow2");
    let dev = TestDevice::new(size, None);
    let token = CancelToken::new();
    let progress = |done: u64, _total: u64| {
        if done >= stop_at {
            token.cancel();
        }
    };
    let mut opts = ConvertOptions::new(Format::Qcow2);
    opts.progress = Some(&progress);
    opts.cancel = token.clone();
    let e = convert_to_path(&dev, &dst, &opts).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert_eq!(e.io_kind(), std::io::ErrorKind::Interrupted);
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "output left behind: {left:?}");
    assert!(dev.read.load(Ordering::SeqCst) < 64 * MIB);
}

#[test]
fn device_reader_takes_borrowed_boxed_and_shared_devices() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bytes) = qcow2_with_data(dir.path(), "a.qcow2", 2 * MIB);
    let boxed = diskconv::open(&img, &OpenOptions::new()).unwrap();
    assert_eq!(read_all(DeviceReader::new(boxed.as_ref())), bytes);
    let shared: Arc<dyn BlockDevice> = Arc::from(boxed);
    assert_eq!(read_all(DeviceReader::new(shared.clone())), bytes);
    let boxed = diskconv::open(&img, &OpenOptions::new()).unwrap();
    assert_eq!(read_all(DeviceReader::new(boxed)), bytes);
}

// ---- 4. a lean dependency tree ----

#[test]
fn without_default_features_no_cli_crate_is_linked() {
    let tree = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO"))
            .args(["tree", "-e", "normal", "--offline", "--prefix", "none"])
            .args(["--format", "{p}"])
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo runs");
        assert!(
            out.status.success(),
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let names: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        names
    };
    let cli_crates = ["clap", "indicatif", "ctrlc"];
    let lean = tree(&["--no-default-features"]);
    assert!(lean.iter().any(|n| n == "serde"), "{lean:?}");
    for c in cli_crates {
        assert!(!lean.iter().any(|n| n == c), "{c} without default features");
    }
    // The default build (the binary) does have the CLI's crates.
    let full = tree(&[]);
    assert!(full.iter().any(|n| n == "clap"), "{full:?}");
}

// ---- 5. a deliberate public surface ----

#[test]
fn reports_serialise_for_a_registry() {
    assert_eq!(serde_json::to_value(Format::Vhd).unwrap(), "vpc");
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qcow2_with_data(dir.path(), "a.qcow2", 2 * MIB);
    let dev = diskconv::open(&img, &OpenOptions::new()).unwrap();
    let info = serde_json::to_value(dev.info()).unwrap();
    assert_eq!(info["virtual_size"], 2 * MIB);
    let mut o = ConvertOptions::new(Format::Raw);
    o.digests = vec![diskconv::DigestAlgo::Sha512];
    let report = convert_to_path(dev.as_ref(), &dir.path().join("a.raw"), &o).unwrap();
    let v = serde_json::to_value(&report).unwrap();
    assert_eq!(v["virtual_size"], 2 * MIB);
    assert_eq!(v["digests"][0][0], "sha512");
    let (insp, _) = inspect_file(
        std::fs::File::open(&img).unwrap(),
        &img,
        None,
        &InspectLimits::default(),
    )
    .unwrap();
    let v = serde_json::to_value(&insp).unwrap();
    assert_eq!(v["opened_as"], "qcow2");
    assert_eq!(v["safe"], true);
    // Options and reports compare and clone.
    assert_eq!(report.clone(), report);
    assert_eq!(
        OpenOptions::new().format(Format::Raw),
        OpenOptions::new().format(Format::Raw)
    );
    assert_eq!(InspectLimits::default(), InspectLimits::default());
    assert!(format!("{o:?}").contains("digests"));
}

// ---- 6. the examples ----

/// A `Write` the test can look into after the conversion took it.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn digests(data: &[u8]) -> Vec<(diskconv::DigestAlgo, String)> {
    let mut d =
        diskconv::writer::Digester::new(&[diskconv::DigestAlgo::Md5, diskconv::DigestAlgo::Sha512]);
    d.update(data);
    d.finish()
}

#[test]
fn the_uploader_example_streams_a_safe_upload_with_its_digests() {
    let dir = tempfile::tempdir().unwrap();
    let (img, bytes) = qcow2_with_data(dir.path(), "up.qcow2", 4 * MIB);
    let sink = Shared::default();
    let mut log = Vec::new();
    let summary = uploader::normalise(
        img.to_str().unwrap(),
        Some(Format::Qcow2),
        sink.clone(),
        &mut log,
    )
    .unwrap()
    .expect("a safe upload is streamed");
    let sent = sink.0.lock().unwrap().clone();
    assert_eq!(sent, bytes);
    let want = digests(&bytes);
    assert_eq!(summary["md5"], want[0].1);
    assert_eq!(summary["sha512"], want[1].1);
    assert_eq!(summary["size"], 4 * MIB);
    assert_eq!(summary["format"], "qcow2");

    // A hostile upload (claimed raw, really qcow2) is refused before a byte is sent.
    let sink = Shared::default();
    let mut log = Vec::new();
    let r = uploader::normalise(
        img.to_str().unwrap(),
        Some(Format::Raw),
        sink.clone(),
        &mut log,
    )
    .unwrap();
    assert!(r.is_none());
    assert!(sink.0.lock().unwrap().is_empty());
    assert!(String::from_utf8(log).unwrap().contains("FormatMismatch"));
}

#[test]
fn the_registry_probe_example_gives_a_glance_record() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = qcow2_with_data(dir.path(), "up.qcow2", 4 * MIB);
    let (rec, safe) = registry_probe::record(img.to_str().unwrap(), None).unwrap();
    assert!(safe, "{rec}");
    let stored = std::fs::read(&img).unwrap();
    let want = digests(&stored);
    assert_eq!(rec["disk_format"], "qcow2");
    assert_eq!(rec["virtual_size"], 4 * MIB);
    assert_eq!(rec["size"], stored.len() as u64);
    assert_eq!(rec["checksum"], want[0].1);
    assert_eq!(rec["os_hash_algo"], "sha512");
    assert_eq!(rec["os_hash_value"], want[1].1);
}

#[test]
fn the_cli_turns_the_option_an_error_names_into_its_flag() {
    let dir = tempfile::tempdir().unwrap();
    let desc = dir.path().join("d.vmdk");
    std::fs::write(dir.path().join("d-flat.vmdk"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\nRW 2048 FLAT \"d-flat.vmdk\" 0\n",
    )
    .unwrap();
    // The library names its option...
    let e = diskconv::open(&desc, &OpenOptions::new()).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::UnsafeReference);
    assert_eq!(e.option(), Some("OpenOptions::allow_references"));
    assert!(!e.to_string().contains("--"), "{e}");
    // ...and the command line says which flag that is.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(["convert", "-O", "raw"])
        .arg(&desc)
        .arg(dir.path().join("out.raw"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(opt in with --allow-references)"), "{err}");
    assert!(!err.contains("OpenOptions"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

/// The items the writer, engine and check splits moved into files of their own (issue 26)
/// keep every public path they had: the module's and the crate root's name one type.
#[test]
fn moved_items_keep_their_public_paths() {
    use std::any::TypeId;
    fn same<A: 'static, B: 'static>() -> bool {
        TypeId::of::<A>() == TypeId::of::<B>()
    }
    assert!(same::<diskconv::Tally, diskconv::ops::check::Tally>());
    assert!(same::<diskconv::Repair, diskconv::ops::check::Repair>());
    assert_eq!(
        diskconv::ops::check::Repair::parse("leaks").unwrap(),
        diskconv::Repair::Leaks
    );
    let _: fn(&diskconv::device::HostFile, u64, u64, &str) -> diskconv::Result<Vec<u8>> =
        diskconv::ops::check::read_padded;
    assert!(same::<diskconv::AtomicOutput, diskconv::writer::AtomicOutput>());
    assert!(same::<diskconv::DigestAlgo, diskconv::writer::DigestAlgo>());
    assert!(same::<diskconv::Output, diskconv::writer::Output>());
    assert!(same::<diskconv::OutputKind, diskconv::writer::OutputKind>());
    assert!(same::<
        diskconv::OutputOptions,
        diskconv::writer::OutputOptions,
    >());
    let _: [fn() -> [u8; 16]; 2] = [diskconv::random_uuid_v4, diskconv::writer::random_uuid_v4];
    let _ = (
        TypeId::of::<diskconv::writer::AllocationPlan>(),
        TypeId::of::<diskconv::writer::Sink>(),
        TypeId::of::<diskconv::writer::Digester>(),
        TypeId::of::<diskconv::writer::Finished>(),
        TypeId::of::<diskconv::writer::EditFile>(),
        TypeId::of::<dyn diskconv::writer::Encoder>(),
        TypeId::of::<dyn diskconv::writer::ImageWriter>(),
        TypeId::of::<dyn diskconv::device::RangeSource>(),
    );
    let _: fn() = diskconv::writer::remove_temporaries;
    let _: fn(&std::fs::File, &Path) -> diskconv::Result<()> = diskconv::writer::lock_exclusive;
    let _: fn(&diskconv::writer::Sink, &[u8], u64, &str) -> diskconv::Result<()> =
        diskconv::writer::write_all_at;
    let _: fn(&diskconv::writer::Sink, u64, u64, &str) -> diskconv::Result<()> =
        diskconv::writer::zero_fill_at;
    assert!(same::<
        diskconv::UnreadableRange,
        diskconv::convert::UnreadableRange,
    >());
    assert!(same::<
        diskconv::ConvertOptions<'static>,
        diskconv::convert::ConvertOptions<'static>,
    >());
    assert!(diskconv::convert::default_threads() >= 1);
    assert!(diskconv::convert::is_zero(&[0u8; 64]) && !diskconv::convert::is_zero(&[1u8; 64]));
    let _ = diskconv::convert::plan_allocation;
    let _ = diskconv::convert::plan_allocation_with;
}
