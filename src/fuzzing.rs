//! The fuzz targets' shared entry point, public so `cargo test` replays the fuzz corpora
//! through exactly the code the fuzzer runs (tests/pure/fuzz_corpus.rs). Not a stable API.
//!
//! [`exercise`] treats its input as an image file and does everything a consumer would:
//! probe, open (references refused), `info()`, walk the whole map, read every data range
//! and some zero ranges. Errors are fine; panics, hangs and unbounded memory are bugs,
//! and so is a reader breaking the [`BlockDevice`] contract, which is asserted here so the
//! fuzzer reports it.

use std::fs::File;
use std::io::Write;
use std::os::unix::io::FromRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::device::{BlockDevice, MappingKind};
use crate::format::Format;
use crate::inspect::{inspect_with, InspectLimits};
use crate::options::OpenOptions;

/// Most `map()` calls per input.
pub const MAX_MAP_CALLS: u64 = 10_000;
/// Largest single read.
pub const READ_CHUNK: usize = 1 << 20;
/// Most guest bytes read per input.
pub const MAX_READ_TOTAL: u64 = 4 << 20;
/// How much of each zero/unallocated range is read back to check it is zeros.
const ZERO_CHECK: u64 = 4096;

/// Feed `data` to the readers: as `format` when given (never probing), otherwise through
/// the probe, the probing open, and [`inspect`](crate::inspect()).
pub fn exercise(data: &[u8], format: Option<Format>) {
    let Some(input) = InputFile::new(data) else {
        return; // no memory file or temp file available: nothing to test
    };
    let path = input.path();
    match format {
        Some(fmt) => {
            if let Ok(dev) = crate::open(path, &OpenOptions::new().format(fmt)) {
                assert_eq!(dev.format(), fmt, "opened as {fmt}, device says otherwise");
                exercise_device(dev.as_ref());
            }
            // Almost every mutation of a VHD breaks a checksum, which stops the fuzzer at
            // the first check; a second pass with the checksums repaired lets it reach the
            // BAT, the bitmaps and the parent locators.
            // (Once: overlapping footers of a tiny file may never all agree.)
            if fmt == Format::Vhdx && data.len() > 320 << 10 {
                // Likewise the VHDX headers and region tables (the BAT, metadata and
                // log lie past them).
                let fixed = crate::formats::vhdx::header::with_checksums_fixed(data);
                if let Some(input) = InputFile::new(&fixed) {
                    if let Ok(dev) = crate::open(input.path(), &OpenOptions::new().format(fmt)) {
                        exercise_device(dev.as_ref());
                    }
                }
            }
            if fmt == Format::Vhd {
                if let Some(fixed) = vhd_with_checksums_fixed(data) {
                    if let Some(input) = InputFile::new(&fixed) {
                        let opts = OpenOptions::new().format(fmt);
                        if let Ok(dev) = crate::open(input.path(), &opts) {
                            exercise_device(dev.as_ref());
                        }
                    }
                }
            }
        }
        None => {
            let probed = crate::probe(path);
            if let Ok(dev) = crate::open(path, &OpenOptions::new()) {
                if let Ok(f) = &probed {
                    assert_eq!(dev.format(), *f, "probe and open disagree");
                }
                exercise_device(dev.as_ref());
            }
            let limits = InspectLimits {
                max_map_calls: MAX_MAP_CALLS,
                max_map_time: Duration::from_secs(2),
                ..InspectLimits::default()
            };
            for claim in [None, Some(Format::Raw)] {
                if let Ok(i) = inspect_with(path, claim, &limits) {
                    assert_eq!(i.safe, i.is_safe());
                    serde_json::to_string(&i).expect("inspection serializes");
                    if let (Ok(f), Some(d)) = (&probed, i.detected_format) {
                        assert_eq!(*f, d, "probe and inspect disagree");
                    }
                }
            }
        }
    }
}

/// `data` with the checksums of its VHD footers (at 0 and at the end) and of the dynamic
/// header they point at recomputed, or None when they were all right (or absent).
pub fn vhd_with_checksums_fixed(data: &[u8]) -> Option<Vec<u8>> {
    use crate::formats::vhd::dynheader::{self, DYN_COOKIE, DYN_HEADER_SIZE};
    use crate::formats::vhd::footer::{self, checksum_without_field, FOOTER_COOKIE, FOOTER_SIZE};
    fn fix(buf: &mut [u8], at: usize, size: usize, cookie: &[u8], field: usize) -> bool {
        let Some(s) = buf.get_mut(at..at.saturating_add(size)) else {
            return false;
        };
        if s.len() != size || !s.starts_with(cookie) {
            return false;
        }
        let sum = checksum_without_field(s, field).to_be_bytes();
        s[field..field + 4].copy_from_slice(&sum);
        true
    }
    let mut out = data.to_vec();
    let mut dyn_at = Vec::new();
    let tail = data.len().checked_sub(FOOTER_SIZE);
    for at in [Some(0), tail].into_iter().flatten() {
        if fix(
            &mut out,
            at,
            FOOTER_SIZE,
            FOOTER_COOKIE,
            footer::CHECKSUM_OFFSET,
        ) {
            let mut o = [0u8; 8];
            o.copy_from_slice(&out[at + 16..at + 24]);
            dyn_at.push(u64::from_be_bytes(o));
        }
    }
    for at in dyn_at {
        if let Ok(at) = usize::try_from(at) {
            fix(
                &mut out,
                at,
                DYN_HEADER_SIZE,
                DYN_COOKIE,
                dynheader::CHECKSUM_OFFSET,
            );
        }
    }
    (out != data).then_some(out)
}

/// Everything a consumer does with an opened device, within fixed bounds.
pub fn exercise_device(dev: &dyn BlockDevice) {
    let info = dev.info();
    let _ = serde_json::to_string(&info.format_specific);
    let size = dev.virtual_size();
    let mut buf = vec![0u8; READ_CHUNK.min(64 << 10)];
    let mut budget = MAX_READ_TOTAL;
    let mut off = 0u64;
    let mut calls = 0u64;
    while off < size && calls < MAX_MAP_CALLS {
        calls += 1;
        let m = match dev.map(off, size - off) {
            Ok(m) => m,
            Err(e) => {
                let _ = e.to_string();
                break;
            }
        };
        assert_eq!(m.offset, off, "map returned a range starting elsewhere");
        assert!(
            m.len >= 1 && m.len <= size - off,
            "map at {off:#x} returned {} bytes (size {size})",
            m.len
        );
        let want = match m.kind {
            MappingKind::Data { .. } => m.len.min(budget),
            MappingKind::Zero | MappingKind::Unallocated => m.len.min(budget).min(ZERO_CHECK),
        };
        budget -= want;
        let mut done = 0u64;
        while done < want {
            let n = (want - done).min(buf.len() as u64) as usize;
            match dev.read_at(&mut buf[..n], off + done) {
                Ok(()) => {
                    if m.is_zero() {
                        assert!(
                            buf[..n].iter().all(|&b| b == 0),
                            "range mapped as {:?} at {:#x} reads non-zero",
                            m.kind,
                            off + done
                        );
                    }
                }
                Err(e) => {
                    let _ = e.to_string();
                    break;
                }
            }
            done += n as u64;
        }
        off += m.len;
    }
    // One read across mapping boundaries, one at the last byte, one past the end.
    let n = (size.min(buf.len() as u64)) as usize;
    let _ = dev.read_at(&mut buf[..n], 0);
    if size > 0 {
        let _ = dev.read_at(&mut buf[..1], size - 1);
    }
    assert!(
        dev.read_at(&mut buf[..1], size).is_err(),
        "reading past the virtual size must fail"
    );
}

/// The input as a file: an anonymous memory file (no cleanup, no name clashes between
/// fuzzing processes), reached through its /proc path so the normal open path is used.
struct InputFile {
    _file: File,
    path: PathBuf,
    remove: bool,
}

impl InputFile {
    fn new(data: &[u8]) -> Option<Self> {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; on success we own
        // the returned descriptor and hand it to File, which closes it.
        let fd = unsafe { libc::memfd_create(c"diskconv-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: fd is a fresh descriptor we own.
            let mut file = unsafe { File::from_raw_fd(fd) };
            file.write_all(data).ok()?;
            return Some(InputFile {
                _file: file,
                path: PathBuf::from(format!("/proc/self/fd/{fd}")),
                remove: false,
            });
        }
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "diskconv-fuzz-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = File::create(&path).ok()?;
        file.write_all(data).ok()?;
        Some(InputFile {
            _file: file,
            path,
            remove: true,
        })
    }
    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for InputFile {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A disk held in memory: what [`exercise_guest_scan`] scans.
struct MemDisk(Vec<u8>);

impl BlockDevice for MemDisk {
    fn virtual_size(&self) -> u64 {
        self.0.len() as u64
    }
    fn map(&self, offset: u64, max_len: u64) -> crate::Result<crate::device::Mapping> {
        let end = crate::device::map_end(self.virtual_size(), offset, max_len)?;
        Ok(crate::device::Mapping {
            offset,
            len: end - offset,
            kind: MappingKind::Data { host: Some(offset) },
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
        crate::device::check_guest_range(self.virtual_size(), offset, buf.len())?;
        buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn info(&self) -> crate::device::ImageInfo {
        crate::device::ImageInfo::default()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}

/// The `guest_scan` target: `data` as a raw disk, through the partition table and
/// filesystem scanners ([`crate::guest::scan()`]). Beyond not panicking, it checks the
/// safety rule: every free byte lies inside a partition that was scanned, none inside a
/// partition that was skipped or in the first sector (the table or a boot sector), and
/// the wrapper device still keeps the [`BlockDevice`] contract.
pub fn exercise_guest_scan(data: &[u8]) {
    let disk = MemDisk(data.to_vec());
    let Ok(scan) = crate::guest::scan(&disk) else {
        return;
    };
    serde_json::to_string(&scan.partitions).expect("report serializes");
    let is_pv = |p: &crate::guest::PartitionReport| p.filesystem.as_deref() == Some("LVM2_member");
    // Logical volumes' lines name where they start, not every extent: check the free
    // runs against the partitions (a PV's line covers its volumes).
    let parts: Vec<_> = scan
        .partitions
        .iter()
        .filter(|p| !p.location.starts_with("lvm "))
        .collect();
    let mut total = 0;
    for (off, len) in scan.free.runs() {
        total += len;
        assert!(off >= 512, "free run at {off:#x} covers the first sector");
        let inside =
            |p: &&&crate::guest::PartitionReport| off >= p.offset && off + len <= p.offset + p.size;
        assert!(
            parts
                .iter()
                .filter(|p| p.skipped.is_none() || is_pv(p))
                .any(|p| inside(&p)),
            "free run of {len} bytes at {off:#x} is outside every scanned partition: {:?}",
            scan.partitions
        );
        for p in parts.iter().filter(|p| p.skipped.is_some() && !is_pv(p)) {
            assert!(
                off + len <= p.offset || p.offset + p.size <= off,
                "free run at {off:#x} is inside skipped partition {}",
                p.location
            );
        }
    }
    assert_eq!(total, scan.free.free_bytes());
    let wrapped = crate::guest::GuestFree::new(Box::new(disk) as Box<dyn BlockDevice>, scan.free);
    exercise_device(&wrapped);
}

/// The `guest_files` target: `data` as a raw disk, through OS inspection
/// ([`crate::guest::inspect::Guest`]) and a bounded walk of every filesystem it opens:
/// list each directory, stat and read each file (up to 1 MiB) and link. Beyond not
/// panicking, a file read never yields more bytes than its metadata claims.
pub fn exercise_guest_files(data: &[u8]) {
    use crate::guest::files::{FileKind, FileSystem};
    fn walk(fs: &dyn FileSystem, dir: &str, depth: u32, budget: &mut u32) {
        let Ok(entries) = fs.read_dir(dir) else {
            return;
        };
        for e in entries {
            if *budget == 0 {
                return;
            }
            *budget -= 1;
            let path = format!("{}/{}", dir.trim_end_matches('/'), e.name);
            let _ = fs.metadata(&path);
            match e.meta.kind {
                FileKind::Dir if depth < 8 && !e.lossy => walk(fs, &path, depth + 1, budget),
                FileKind::Symlink => {
                    let _ = fs.read_link(&path);
                }
                FileKind::File => {
                    if let (Ok(b), Ok(m)) = (fs.read_file(&path, 1 << 20), fs.metadata(&path)) {
                        assert!(b.len() as u64 <= m.size, "{path} read past its size");
                    }
                    let _ = fs.read_prefix(&path, 64);
                }
                _ => {}
            }
        }
    }
    let dev: std::sync::Arc<dyn BlockDevice> = std::sync::Arc::new(MemDisk(data.to_vec()));
    let Ok(mut guest) = crate::guest::inspect::Guest::open(dev) else {
        return;
    };
    let insp = guest.inspect();
    serde_json::to_string(&insp).expect("inspection serializes");
    let _ = crate::guest::inspect::glance::properties(&insp);
    let mut budget = 2000;
    for v in &insp.volumes {
        if let Ok(fs) = guest.filesystem(&v.location) {
            walk(&*fs, "/", 0, &mut budget);
        }
    }
    for os in &insp.operating_systems {
        if let Ok(m) = guest.mounts(os) {
            let _ = m.resolve("/../etc/../../fstab");
        }
    }
}

/// The `guest_hive` target: `data` as a Windows registry hive, through the lookups
/// Windows inspection makes (nested keys, strings, DWORDs, the current control set).
pub fn exercise_hive(data: &[u8]) {
    use crate::guest::inspect::hive::Hive;
    let Ok(h) = Hive::parse(data.to_vec()) else {
        return;
    };
    let cv: &[&str] = &["Microsoft", "Windows NT", "CurrentVersion"];
    for name in [
        "ProductName",
        "CurrentBuild",
        "CurrentMajorVersionNumber",
        "SystemRoot",
    ] {
        let _ = h.value(cv, name);
    }
    let _ = h.dword(&["Select"], "Current");
    for set in ["ControlSet001", "ControlSet002"] {
        let _ = h.string(
            &[set, "Control", "ComputerName", "ComputerName"],
            "ComputerName",
        );
        let _ = h.string(
            &[set, "Control", "Session Manager", "Environment"],
            "PROCESSOR_ARCHITECTURE",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exercises_raw_and_probe_without_panicking() {
        let mut img = vec![0u8; 70_000];
        img[100] = 1;
        exercise(&img, Some(Format::Raw));
        exercise(&img, None);
        exercise(b"", None);
        exercise(b"", Some(Format::Raw));
        exercise(b"QFI\xfb\0\0\0\x03", None);
    }

    #[test]
    fn the_input_file_reaches_every_entry_point() {
        let input = InputFile::new(b"QFI\xfb\0\0\0\x03").unwrap();
        let i = crate::inspect(input.path(), Some(Format::Raw)).unwrap();
        assert_eq!(i.file_size, 8);
        assert_eq!(i.detected_format, Some(Format::Qcow2));
        assert_eq!(crate::probe(input.path()).unwrap(), Format::Qcow2);
        let dev = crate::open(input.path(), &OpenOptions::new().format(Format::Raw)).unwrap();
        // A raw disk is whole sectors, as qemu reads it.
        assert_eq!(dev.virtual_size(), 512);
    }

    #[test]
    fn vhd_checksum_repair_reopens_a_mutated_image() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/vhd/h-dyn4k.vhd");
        let good = std::fs::read(path).unwrap();
        assert_eq!(
            vhd_with_checksums_fixed(&good),
            None,
            "valid image left alone"
        );
        let n = good.len();
        let dyn_at = u64::from_be_bytes(good[16..24].try_into().unwrap()) as usize;
        let mut bad = good.clone();
        // Reserved bytes of both footers and of the dynamic header.
        bad[n - 1] ^= 1;
        bad[511] ^= 1;
        bad[dyn_at + 1023] ^= 1;
        let open = |d: &[u8]| {
            let input = InputFile::new(d).unwrap();
            crate::open(input.path(), &OpenOptions::new().format(Format::Vhd)).map(|_| ())
        };
        assert!(open(&bad).is_err());
        let fixed = vhd_with_checksums_fixed(&bad).unwrap();
        open(&fixed).unwrap();
        assert_eq!(
            vhd_with_checksums_fixed(&fixed),
            None,
            "repair is idempotent"
        );
        // Overlapping footers (a file under 1 KiB) never all agree: they are repaired once,
        // not forever.
        let mut tiny = good[n - 512..n - 473].to_vec();
        tiny.extend_from_slice(&good[n - 512..]);
        let once = vhd_with_checksums_fixed(&tiny).unwrap();
        assert!(vhd_with_checksums_fixed(&once).is_some());
        exercise(&tiny, Some(Format::Vhd));
    }
}
