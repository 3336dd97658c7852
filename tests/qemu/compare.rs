//! compare: our exit codes and messages equal qemu-img compare's on identical, different,
//! size-mismatched and strict pairs across formats, and a comparison reads only data.
use crate::common;
use common::cmms::*;
use common::*;

use std::sync::atomic::{AtomicU64, Ordering};

use diskconv::{BlockDevice, BlockStatus, CompareOptions, CompareOutcome, Format, OpenOptions};

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn compare_equals_qemu_img() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = make_images(dir.path());
    let mut codes = [0usize; 3];
    for (i, (a, fa)) in images.iter().enumerate() {
        for (b, fb) in images.iter().skip(i) {
            for strict in [false, true] {
                let (na, nb) = (a.file_name().unwrap(), b.file_name().unwrap());
                let (na, nb) = (na.to_str().unwrap(), nb.to_str().unwrap());
                let mut args = vec!["compare", "-f", fa, "-F", fb];
                if strict {
                    args.push("-s");
                }
                args.extend([na, nb]);
                let (qc, qout, qerr) = run_in(dir.path(), "qemu-img", &args);
                args.insert(1, "--allow-references");
                let (dc, dout, derr) = run_in(dir.path(), diskconv(), &args);
                assert_eq!((qc, &qout), (dc, &dout), "{args:?}: {qerr} / {derr}");
                codes[qc as usize] += 1;
            }
        }
    }
    // Both verdicts and strict mismatches happened.
    assert!(codes[0] > 10 && codes[1] > 10, "{codes:?}");
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img")]
fn compare_open_errors_exit_2() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("a.raw");
    make_raw(&raw, 1 << 20, 1);
    for args in [
        &["compare", "missing.raw", "a.raw"][..],
        &["compare", "a.raw", "missing.raw"][..],
        &["compare", "-f", "qcow2", "a.raw", "a.raw"][..],
    ] {
        let (qc, qout, _) = run_in(dir.path(), "qemu-img", args);
        let (dc, dout, _) = run_in(dir.path(), diskconv(), args);
        assert_eq!((qc, qout), (dc, dout), "{args:?}");
        assert_eq!(dc, 2);
    }
}

/// Counts the guest bytes read through it.
struct Counting<'a> {
    dev: &'a dyn BlockDevice,
    read: AtomicU64,
}

impl BlockDevice for Counting<'_> {
    fn virtual_size(&self) -> u64 {
        self.dev.virtual_size()
    }
    fn map(&self, offset: u64, max_len: u64) -> diskconv::Result<diskconv::Mapping> {
        self.dev.map(offset, max_len)
    }
    fn block_status(&self, offset: u64, max_len: u64) -> diskconv::Result<BlockStatus> {
        self.dev.block_status(offset, max_len)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskconv::Result<()> {
        self.read.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.dev.read_at(buf, offset)
    }
    fn info(&self) -> diskconv::ImageInfo {
        self.dev.info()
    }
    fn format(&self) -> Format {
        self.dev.format()
    }
}

/// Two 1 TiB sparse images (qcow2 and vmdk) with 2 MiB of data each: the comparison
/// reads only the data ranges, and finds a one-byte difference at its sector.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn sparse_terabyte_images_read_only_their_data() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.vmdk");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&a), "1T"]);
    qemu_img(&["create", "-q", "-f", "vmdk", s(&b), "1T"]);
    for (img, fmt) in [(&a, "qcow2"), (&b, "vmdk")] {
        qemu_io(fmt, img, &["write -P 1 0 1M", "write -P 2 700G 1M"]);
    }
    let da = diskconv::open(&a, &OpenOptions::new()).unwrap();
    let db = diskconv::open(&b, &OpenOptions::new()).unwrap();
    let ca = Counting {
        dev: da.as_ref(),
        read: AtomicU64::new(0),
    };
    let cb = Counting {
        dev: db.as_ref(),
        read: AtomicU64::new(0),
    };
    let r = diskconv::compare_devices(&ca, &cb, &CompareOptions::default()).unwrap();
    assert_eq!(r.outcome, CompareOutcome::Identical);
    let (ra, rb) = (
        ca.read.load(Ordering::Relaxed),
        cb.read.load(Ordering::Relaxed),
    );
    assert_eq!((ra, rb), (2 << 20, 2 << 20));
    assert_eq!(r.bytes_read, 4 << 20);

    qemu_io("vmdk", &b, &["write -P 3 751619277800 1"]);
    let db = diskconv::open(&b, &OpenOptions::new()).unwrap();
    let r =
        diskconv::compare_devices(da.as_ref(), db.as_ref(), &CompareOptions::default()).unwrap();
    let want = (700u64 << 30) + 512;
    assert_eq!(r.outcome, CompareOutcome::ContentMismatch { offset: want });
    let (qc, qout, _) = run_in(dir.path(), "qemu-img", &["compare", "a.qcow2", "b.vmdk"]);
    assert_eq!(
        (qc, qout.trim()),
        (1, format!("Content mismatch at offset {want}!").as_str())
    );
}
