//! Hostile images (issue 6), one test per class, each built byte by byte here and each
//! asserting the exact [`ErrorKind`] the library must answer with:
//!
//! - files named inside an image (backing file, data file, flat extent, differencing
//!   parent): `UnsafeReference`, with and without the opt-in for absolute and `..` names,
//!   and the secret they name never appears in any byte read;
//! - a table larger than the fixed caps (32 MiB) but inside the (sparse) file:
//!   `LimitExceeded`; a table running past the end of the file: `Corrupt`; both in a
//!   subprocess whose peak memory must stay under 64 MiB;
//! - block/grain size 0 or not a power of two: `InvalidFormat`;
//! - overlapping qcow2 metadata: reads are bounded and correct, or `Corrupt`;
//! - a raw disk holding a qcow2 header read with `-f raw` stays raw;
//! - a file matching two formats is ambiguous (`InvalidFormat` from the probe, a Polyglot
//!   finding from inspect).
//!
//! Every hostile file differs from a valid one (`*_baseline_is_valid` tests check the
//! builders against qemu-img) only in the hostile field, so the expected kind is the
//! only one that can apply. Where the format makes two kinds inherent (the vdi block map
//! of 2^32-1 entries cannot both fit before a 32-bit data offset and be under the cap),
//! the test says so and accepts exactly those two.

use crate::common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskconv::{ErrorKind, FindingKind, Format, OpenOptions};

// ---------------------------------------------------------------------------------------
// Harness

/// What a hostile image must never make us read.
const SECRET: &[u8] = b"SECRET-7d1c-diskconv-must-never-read-this-host-file";

/// A folder holding `secret` (SECRET repeated, 1 MiB) and `img/`, where images go, so
/// `../secret` from an image names the secret.
struct Sandbox {
    _dir: Option<tempfile::TempDir>,
    root: PathBuf,
    img: PathBuf,
    secret: PathBuf,
}

/// Set DISKCONV_HOSTILE_KEEP=/some/dir to keep the hostile files there (to look at them
/// with qemu-img or a hex editor).
fn sandbox() -> Sandbox {
    let (dir, root) = match std::env::var_os("DISKCONV_HOSTILE_KEEP") {
        Some(d) => {
            let kept = tempfile::Builder::new().tempdir_in(d).unwrap().keep();
            (None, kept.canonicalize().unwrap())
        }
        None => {
            let t = tempfile::tempdir().unwrap();
            let r = t.path().canonicalize().unwrap();
            (Some(t), r)
        }
    };
    let img = root.join("img");
    std::fs::create_dir(&img).unwrap();
    let secret = root.join("secret");
    let mut s = Vec::new();
    while s.len() < 1 << 20 {
        s.extend_from_slice(SECRET);
    }
    std::fs::write(&secret, &s).unwrap();
    Sandbox {
        _dir: dir,
        root,
        img,
        secret,
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Open `path` with `opts`, walk the whole map and read every data range plus the start
/// of every zero range (checked to be zeros). Returns the first error, if any, and the
/// bytes read: the whole guest content for a device of at most 16 MiB, otherwise only
/// data ranges, at most 16 MiB of them (memory stays bounded whatever the image claims).
fn read_everything(path: &Path, opts: &OpenOptions) -> (Option<diskconv::Error>, Vec<u8>) {
    const CAP: u64 = 16 << 20;
    let mut bytes = Vec::new();
    let dev = match diskconv::open(path, opts) {
        Ok(d) => d,
        Err(e) => return (Some(e), bytes),
    };
    let size = dev.virtual_size();
    let keep_all = size <= CAP;
    let mut off = 0;
    let mut calls = 0;
    while off < size && calls < 100_000 {
        calls += 1;
        let m = match dev.map(off, size - off) {
            Ok(m) => m,
            Err(e) => return (Some(e), bytes),
        };
        assert!(
            m.offset == off && m.len >= 1 && m.len <= size - off,
            "bad mapping {m:?}"
        );
        let want = if keep_all {
            m.len
        } else if m.is_zero() {
            m.len.min(65536)
        } else {
            m.len.min(CAP - bytes.len() as u64)
        };
        let mut buf = vec![0u8; want as usize];
        if let Err(e) = dev.read_at(&mut buf, off) {
            return (Some(e), bytes);
        }
        if m.is_zero() {
            assert!(buf.iter().all(|&b| b == 0), "{m:?} reads non-zero");
        }
        if keep_all || !m.is_zero() {
            bytes.extend_from_slice(&buf);
        }
        off += m.len;
    }
    (None, bytes)
}

/// The image must fail with one of `kinds` (open, map or read) and never yield SECRET.
#[track_caller]
fn assert_refused(path: &Path, opts: &OpenOptions, kinds: &[ErrorKind], what: &str) {
    let (err, bytes) = read_everything(path, opts);
    assert!(!contains(&bytes, SECRET), "{what}: THE SECRET WAS READ");
    match err {
        Some(e) => {
            assert!(
                !contains(e.to_string().as_bytes(), SECRET),
                "{what}: secret in the message"
            );
            assert!(
                kinds.contains(&e.kind()),
                "{what}: expected {kinds:?}, got {:?}: {e}",
                e.kind()
            );
        }
        None => panic!("{what}: opened and read without error; expected {kinds:?}"),
    }
}

/// The reference classes' common assertion: opening `path` as `fmt` is refused as an
/// unsafe reference with and without the opt-in (and, with `probe`, when probed too),
/// never yielding the secret, and `inspect` flags the image as naming other files.
fn assert_reference_refused(path: &Path, fmt: Format, probe: bool, what: &str) {
    let kinds = [ErrorKind::UnsafeReference];
    for opts in [OpenOptions::new(), allowed()] {
        assert_refused(path, &opts.format(fmt), &kinds, what);
    }
    if probe {
        assert_refused(path, &OpenOptions::new(), &kinds, what);
    }
    let i = diskconv::inspect(path, Some(fmt)).unwrap();
    assert!(
        i.has(FindingKind::NamesOtherFiles) && !i.safe,
        "{what}: {i:?}"
    );
}

/// Opt-in options (references confined to the image's folder).
fn allowed() -> OpenOptions {
    OpenOptions::new().allow_references(true, None)
}

/// A CLI run with its peak memory.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// Peak RSS of the diskconv process in KiB (None without /usr/bin/time).
    maxrss_kib: Option<u64>,
    /// Host bytes and read calls of the run.
    io: common::Io,
}

/// Run the diskconv binary with a 2 GiB address-space limit (so a reader that allocates
/// what a file claims dies instead of hurting the machine), counting the bytes it reads;
/// killed as hung after `common::HANG_GUARD`.
///
/// Peak memory comes from GNU time, which forks diskconv from its own small process:
/// measuring our own child directly would not work, because Linux carries the forking
/// process's peak RSS over into the child's (fork, and exec's old mm), and this test
/// process is large.
fn run_bounded(args: &[&str]) -> Run {
    let bin = env!("CARGO_BIN_EXE_diskconv");
    let time = Path::new("/usr/bin/time");
    let rss_file = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = if time.exists() {
        let mut c = Command::new(time);
        c.args(["-f", "%M", "-o"]).arg(rss_file.path()).arg(bin);
        c
    } else {
        assert!(
            !common::oracles_required(),
            "/usr/bin/time not found and CI or DISKCONV_REQUIRE_QEMU=1 is set: apt-get install time"
        );
        eprintln!("/usr/bin/time not found: peak memory not measured (apt-get install time)");
        Command::new(bin)
    };
    cmd.args(args);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    let (out, io) = common::output_with_io(&mut cmd);
    let maxrss_kib = std::fs::read_to_string(rss_file.path())
        .ok()
        .and_then(|t| t.lines().last().and_then(|l| l.trim().parse().ok()));
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        maxrss_kib,
        io,
    }
}

/// `diskconv inspect --format FMT --output=json PATH` in a bounded subprocess: it must
/// stay under 64 MiB, read no more than `common::small_file_budget` allows, and report an error of one of `kinds` (or, when
/// `may_open` says the image may open, a complete map walk). Returns the inspection.
#[track_caller]
fn assert_bounded_refusal(
    path: &Path,
    fmt: Format,
    kinds: &[ErrorKind],
    may_open: bool,
) -> serde_json::Value {
    let run = run_bounded(&[
        "inspect",
        "--format",
        fmt.name(),
        "--output=json",
        path.to_str().unwrap(),
    ]);
    let what = format!("{} as {fmt}", path.display());
    if let Some(kib) = run.maxrss_kib {
        assert!(kib < 64 * 1024, "{what}: peak RSS {kib} KiB >= 64 MiB");
    }
    let budget = common::small_file_budget(path);
    if std::env::var_os("DISKCONV_PRINT_WORK").is_some() {
        eprintln!("WORK {what}: {:?} (limit {budget})", run.io);
    }
    assert!(
        run.io.bytes_read <= budget,
        "{what}: read {} bytes in {} calls (limit {budget})",
        run.io.bytes_read,
        run.io.reads
    );
    assert!(
        matches!(run.code, Some(0) | Some(2)),
        "{what}: inspect died ({:?}): {}",
        run.code,
        run.stderr
    );
    let v: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("{what}: bad json ({e}): {}{}", run.stdout, run.stderr));
    let first_error = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|f| f["error"]["kind"].as_str().map(str::to_string));
    let names: Vec<&str> = kinds.iter().map(|k| kind_name(*k)).collect();
    match first_error {
        Some(k) => assert!(
            names.contains(&k.as_str()),
            "{what}: expected {names:?}, got {k}: {}",
            v["findings"]
        ),
        None => {
            assert!(may_open, "{what}: no error; expected {names:?}: {v}");
            assert_eq!(v["map"]["complete"], true, "{what}: {v}");
        }
    }
    v
}

fn kind_name(k: ErrorKind) -> &'static str {
    diskconv::inspect::error_kind_name(k)
}

fn sparse_file(path: &Path, len: u64, pieces: &[(u64, &[u8])]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (off, b) in pieces {
        f.write_all_at(b, *off).unwrap();
    }
}

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn put_le32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_le64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

// ---------------------------------------------------------------------------------------
// qcow2 builder (spec: qemu docs/interop/qcow2.txt; big endian; version 3, 104-byte header)

const QCOW_COPIED: u64 = 1 << 63;

struct Qcow2 {
    cluster_bits: u32,
    size: u64,
    l1_size: u32,
    l1_offset: u64,
    refcount_table_offset: u64,
    refcount_table_clusters: u32,
    incompatible: u64,
    autoclear: u64,
    backing: Option<String>,
    data_file: Option<String>,
    /// Extra bytes to place at absolute offsets (tables, data).
    pieces: Vec<(u64, Vec<u8>)>,
    /// File length (sparse beyond what is written).
    file_len: u64,
}

impl Qcow2 {
    /// A valid empty image of `size` with 64 KiB clusters: header (cluster 0), L1
    /// (cluster 1), refcount table (cluster 2), refcount block (cluster 3) covering
    /// clusters 0..=3 (plus any the caller adds via `pieces`, counted by `clusters`).
    fn valid(size: u64, clusters: u64) -> Qcow2 {
        let cs = 1u64 << 16;
        let l1_size = size.div_ceil(cs * (cs / 8)) as u32;
        let mut rc_block = vec![0u8; cs as usize];
        for i in 0..clusters.max(4) {
            rc_block[i as usize * 2..i as usize * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
        }
        let mut rc_table = vec![0u8; 8];
        put_be64(&mut rc_table, 0, 3 * cs);
        Qcow2 {
            cluster_bits: 16,
            size,
            l1_size,
            l1_offset: cs,
            refcount_table_offset: 2 * cs,
            refcount_table_clusters: 1,
            incompatible: 0,
            autoclear: 0,
            backing: None,
            data_file: None,
            pieces: vec![(2 * cs, rc_table), (3 * cs, rc_block)],
            file_len: clusters.max(4) * cs,
        }
    }

    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; 1024];
        h[0..4].copy_from_slice(b"QFI\xfb");
        put_be32(&mut h, 4, 3);
        put_be32(&mut h, 20, self.cluster_bits);
        put_be64(&mut h, 24, self.size);
        put_be32(&mut h, 36, self.l1_size);
        put_be64(&mut h, 40, self.l1_offset);
        put_be64(&mut h, 48, self.refcount_table_offset);
        put_be32(&mut h, 56, self.refcount_table_clusters);
        put_be64(&mut h, 72, self.incompatible);
        put_be64(&mut h, 88, self.autoclear);
        put_be32(&mut h, 96, 4);
        put_be32(&mut h, 100, 104);
        let mut at = 104;
        if let Some(df) = &self.data_file {
            put_be32(&mut h, at, 0x4441_5441);
            put_be32(&mut h, at + 4, df.len() as u32);
            h[at + 8..at + 8 + df.len()].copy_from_slice(df.as_bytes());
            at += 8 + df.len().div_ceil(8) * 8;
        }
        at += 8; // end of extensions (type 0, length 0)
        if let Some(b) = &self.backing {
            put_be64(&mut h, 8, at as u64);
            put_be32(&mut h, 16, b.len() as u32);
            h[at..at + b.len()].copy_from_slice(b.as_bytes());
        }
        h
    }

    fn write(&self, path: &Path) {
        let header = self.header();
        let mut pieces: Vec<(u64, &[u8])> = vec![(0, &header)];
        pieces.extend(self.pieces.iter().map(|(o, b)| (*o, b.as_slice())));
        sparse_file(path, self.file_len, &pieces);
    }
}

// ---------------------------------------------------------------------------------------
// vhd builder (Microsoft VHD spec; big endian; footer 512 bytes, dynamic header 1024)

fn vhd_checksum(b: &[u8]) -> u32 {
    !b.iter().fold(0u32, |s, &x| s.wrapping_add(x as u32))
}

/// CHS geometry per the VHD spec's algorithm.
fn vhd_geometry(size: u64) -> u32 {
    let total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth) = if total >= 65535 * 16 * 63 {
        (255, 16, total / 255)
    } else {
        let (mut s, mut c) = (17, total / 17);
        let mut h = c.div_ceil(1024).max(4);
        if c >= h * 1024 || h > 16 {
            (s, h, c) = (31, 16, total / 31);
        }
        if c >= h * 1024 {
            (s, h, c) = (63, 16, total / 63);
        }
        (s, h, c)
    };
    let cyl = (cth / heads).min(65535);
    ((cyl as u32) << 16) | ((heads as u32) << 8) | spt as u32
}

fn vhd_footer(size: u64, disk_type: u32, data_offset: u64) -> Vec<u8> {
    let mut f = vec![0u8; 512];
    f[0..8].copy_from_slice(b"conectix");
    put_be32(&mut f, 8, 2);
    put_be32(&mut f, 12, 0x0001_0000);
    put_be64(&mut f, 16, data_offset);
    f[28..32].copy_from_slice(b"win ");
    put_be32(&mut f, 32, 0x000a_0000);
    f[36..40].copy_from_slice(b"Wi2k");
    put_be64(&mut f, 40, size);
    put_be64(&mut f, 48, size);
    put_be32(&mut f, 56, vhd_geometry(size));
    put_be32(&mut f, 60, disk_type);
    // Unique id: 0x42s, except a differencing child's (its parent's is 0x42s).
    f[68..84].copy_from_slice(&[if disk_type == 4 { 0x43 } else { 0x42 }; 16]);
    let c = vhd_checksum(&f);
    put_be32(&mut f, 64, c);
    f
}

struct Vhd {
    size: u64,
    disk_type: u32,
    block_size: u32,
    max_table_entries: u32,
    parent_name: Option<String>,
    /// (platform code, path) locators.
    locators: Vec<([u8; 4], String)>,
    /// Make the file at least this long (sparse), footer at the end.
    min_len: u64,
    /// Allocated blocks: (block index, block_size bytes of guest data).
    blocks: Vec<(u32, Vec<u8>)>,
}

impl Vhd {
    fn dynamic(size: u64, block_size: u32) -> Vhd {
        Vhd {
            size,
            disk_type: 3,
            block_size,
            max_table_entries: size.div_ceil(block_size.max(1) as u64) as u32,
            parent_name: None,
            locators: Vec::new(),
            min_len: 0,
            blocks: Vec::new(),
        }
    }

    fn write(&self, path: &Path) {
        let footer = vhd_footer(self.size, self.disk_type, 512);
        let bat_offset = 1536u64;
        // The BAT (all unallocated) is written only as far as a small file needs; a huge
        // one stays a sparse hole of zeros, which is what the limit tests want.
        let bat_len = (self.max_table_entries as u64 * 4).div_ceil(512) * 512;
        let bat_written = bat_len.min(1 << 20);
        let mut bat = vec![0xffu8; bat_written as usize];
        let mut loc_data = Vec::new();
        let loc_base = bat_offset + bat_len;
        let mut h = vec![0u8; 1024];
        h[0..8].copy_from_slice(b"cxsparse");
        put_be64(&mut h, 8, u64::MAX);
        put_be64(&mut h, 16, bat_offset);
        put_be32(&mut h, 24, 0x0001_0000);
        put_be32(&mut h, 28, self.max_table_entries);
        put_be32(&mut h, 32, self.block_size);
        if self.disk_type == 4 {
            // The parent's unique id: every footer this builder writes carries 0x42s.
            h[40..56].copy_from_slice(&[0x42; 16]);
        }
        if let Some(name) = &self.parent_name {
            let mut at = 64;
            for u in name.encode_utf16().take(256) {
                h[at..at + 2].copy_from_slice(&u.to_be_bytes());
                at += 2;
            }
        }
        for (i, (code, p)) in self.locators.iter().enumerate() {
            // Windows locators are UTF-16LE; MacX is a UTF-8 file:// URL.
            let mut data: Vec<u8> = if code == b"MacX" {
                p.as_bytes().to_vec()
            } else {
                p.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
            };
            let len = data.len() as u32;
            data.resize(512, 0);
            let e = 576 + i * 24;
            h[e..e + 4].copy_from_slice(code);
            put_be32(&mut h, e + 4, 512);
            put_be32(&mut h, e + 8, len);
            put_be64(&mut h, e + 16, loc_base + loc_data.len() as u64);
            loc_data.extend_from_slice(&data);
        }
        let c = vhd_checksum(&h);
        put_be32(&mut h, 36, c);
        // Allocated blocks: a sector bitmap (all present) then the data.
        let bitmap_len = (self.block_size as u64 / 512).div_ceil(8).div_ceil(512) * 512;
        let mut block_data = Vec::new();
        let blocks_base = loc_base + loc_data.len() as u64;
        for (idx, data) in &self.blocks {
            assert_eq!(data.len() as u64, self.block_size as u64);
            let at = blocks_base + block_data.len() as u64;
            put_be32(&mut bat, *idx as usize * 4, (at / 512) as u32);
            block_data.resize(block_data.len() + bitmap_len as usize, 0xff);
            block_data.extend_from_slice(data);
        }
        let end = (blocks_base + block_data.len() as u64).max(self.min_len);
        sparse_file(
            path,
            end + 512,
            &[
                (0, &footer),
                (512, &h),
                (bat_offset, &bat),
                (loc_base, &loc_data),
                (blocks_base, &block_data),
                (end, &footer),
            ],
        );
    }
}

// ---------------------------------------------------------------------------------------
// vmdk builders (VMware Virtual Disk Format 1.1; sparse header little endian)

fn vmdk_descriptor(create_type: &str, extents: &[String]) -> String {
    let mut d = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"{create_type}\"\n\n# Extent description\n"
    );
    for e in extents {
        d += e;
        d += "\n";
    }
    d += "\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\nddb.geometry.cylinders = \"16\"\nddb.geometry.heads = \"16\"\nddb.geometry.sectors = \"63\"\nddb.adapterType = \"ide\"\n";
    d
}

struct VmdkSparse {
    capacity: u64,
    grain: u64,
    gtes_per_gt: u32,
    /// Make the file at least this long (sparse).
    min_len: u64,
}

impl VmdkSparse {
    fn write(&self, path: &Path) {
        let name = path.file_name().unwrap().to_str().unwrap();
        let desc = vmdk_descriptor(
            "monolithicSparse",
            &[format!("RW {} SPARSE \"{name}\"", self.capacity)],
        );
        let mut desc_b = desc.into_bytes();
        desc_b.resize(20 * 512, 0);
        let coverage = self.grain.max(1) * self.gtes_per_gt.max(1) as u64;
        let gd_entries = self.capacity.div_ceil(coverage);
        let gd_offset = 21u64; // sectors
        let gd_sectors = (gd_entries * 4).div_ceil(512);
        let gt_offset = gd_offset + gd_sectors;
        let gt_sectors = (self.gtes_per_gt as u64 * 4).div_ceil(512);
        // Grain tables are allocated (as VMware does) when there are few of them; all
        // their entries are 0, i.e. unallocated grains.
        let small = gd_entries <= 64;
        let mut gd = Vec::new();
        if small {
            for i in 0..gd_entries {
                gd.extend_from_slice(&((gt_offset + i * gt_sectors) as u32).to_le_bytes());
            }
        }
        let overhead = if small {
            gt_offset + gd_entries * gt_sectors
        } else {
            gt_offset
        }
        .div_ceil(128)
            * 128;
        let mut h = vec![0u8; 512];
        h[0..4].copy_from_slice(b"KDMV");
        put_le32(&mut h, 4, 1);
        put_le32(&mut h, 8, 1);
        put_le64(&mut h, 12, self.capacity);
        put_le64(&mut h, 20, self.grain);
        put_le64(&mut h, 28, 1);
        put_le64(&mut h, 36, 20);
        put_le32(&mut h, 44, self.gtes_per_gt);
        put_le64(&mut h, 48, 0);
        put_le64(&mut h, 56, gd_offset);
        put_le64(&mut h, 64, overhead);
        h[73] = b'\n';
        h[74] = b' ';
        h[75] = b'\r';
        h[76] = b'\n';
        let len = (overhead * 512).max(self.min_len);
        sparse_file(
            path,
            len,
            &[(0, &h), (512, &desc_b), (gd_offset * 512, &gd)],
        );
    }
}

// ---------------------------------------------------------------------------------------
// vdi builder (VirtualBox VDI 1.1 header; little endian)

struct Vdi {
    disk_size: u64,
    block_size: u32,
    blocks: u32,
    offset_bmap: u32,
    offset_data: u32,
    min_len: u64,
}

impl Vdi {
    fn dynamic(disk_size: u64) -> Vdi {
        let blocks = disk_size.div_ceil(1 << 20) as u32;
        let offset_data = (512 + blocks as u64 * 4).div_ceil(512) * 512;
        Vdi {
            disk_size,
            block_size: 1 << 20,
            blocks,
            offset_bmap: 512,
            offset_data: offset_data as u32,
            min_len: 0,
        }
    }
    fn write(&self, path: &Path) {
        let mut h = vec![0u8; 512];
        let text = b"<<< Oracle VM VirtualBox Disk Image >>>\n";
        h[..text.len()].copy_from_slice(text);
        put_le32(&mut h, 0x40, 0xbeda_107f);
        put_le32(&mut h, 0x44, 0x0001_0001);
        put_le32(&mut h, 0x48, 0x190);
        put_le32(&mut h, 0x4c, 1);
        put_le32(&mut h, 0x154, self.offset_bmap);
        put_le32(&mut h, 0x158, self.offset_data);
        put_le32(&mut h, 0x168, 512);
        put_le64(&mut h, 0x170, self.disk_size);
        put_le32(&mut h, 0x178, self.block_size);
        put_le32(&mut h, 0x180, self.blocks);
        h[0x188..0x198].copy_from_slice(&[0x5a; 16]);
        h[0x198..0x1a8].copy_from_slice(&[0x5b; 16]);
        let bmap_len = (self.blocks as u64 * 4).min(1 << 20) as usize;
        let bmap = vec![0xffu8; bmap_len];
        let len = (self.offset_data as u64)
            .max(self.min_len)
            .max(512 + bmap_len as u64);
        sparse_file(path, len, &[(0, &h), (self.offset_bmap as u64, &bmap)]);
    }
}

// ---------------------------------------------------------------------------------------
// The builders' valid baselines are images qemu-img accepts (so each hostile file is
// "valid except for the hostile field").

fn qemu_accepts(path: &Path, fmt: &str) {
    let out = Command::new("qemu-img")
        .args(["info", "-f", fmt, path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img rejects the baseline {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("qemu-img")
        .args(["check", "-f", fmt, path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.code() != Some(2) && out.status.code() != Some(3),
        "qemu-img check finds the baseline {} corrupt: {}",
        path.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn builder_baselines_are_valid_images() {
    if !common::have_qemu() {
        return;
    }
    let sb = sandbox();
    let p = sb.img.join("base.qcow2");
    Qcow2::valid(1 << 20, 4).write(&p);
    qemu_accepts(&p, "qcow2");
    let p = sb.img.join("base.vhd");
    Vhd::dynamic(4 << 20, 2 << 20).write(&p);
    qemu_accepts(&p, "vpc");
    let p = sb.img.join("data.vhd");
    let mut v = Vhd::dynamic(4 << 20, 2 << 20);
    v.blocks = vec![(1, vec![0x3c; 2 << 20])];
    v.write(&p);
    qemu_accepts(&p, "vpc");
    let out = common::qemu_img(&["map", "--output=json", "-f", "vpc", p.to_str().unwrap()]);
    assert!(out.contains("\"start\": 2097152, \"length\": 2097152, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true"), "{out}");
    let p = sb.img.join("base.vmdk");
    VmdkSparse {
        capacity: 128,
        grain: 128,
        gtes_per_gt: 512,
        min_len: 0,
    }
    .write(&p);
    qemu_accepts(&p, "vmdk");
    let p = sb.img.join("base.vdi");
    Vdi::dynamic(4 << 20).write(&p);
    qemu_accepts(&p, "vdi");
    // And our own readers open them (these fail only while a reader is a placeholder).
    for (name, fmt) in [
        ("base.qcow2", Format::Qcow2),
        ("base.vhd", Format::Vhd),
        ("base.vmdk", Format::Vmdk),
        ("base.vdi", Format::Vdi),
    ] {
        let (err, bytes) = read_everything(&sb.img.join(name), &OpenOptions::new().format(fmt));
        if let Some(e) = err {
            eprintln!("note: {name}: {e}");
            assert_eq!(e.kind(), ErrorKind::Unsupported, "{name}: {e}");
        } else {
            assert!(bytes.iter().all(|&b| b == 0), "{name} should read as zeros");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Class 1: files named inside an image

#[test]
fn qcow2_backing_file_naming_a_host_file_is_refused() {
    let sb = sandbox();
    let abs = sb.secret.to_str().unwrap().to_string();
    for name in [
        abs.clone(),
        "../secret".into(),
        format!("json:{{\"file.filename\":\"{abs}\"}}"),
        format!("file:{abs}"),
        "nbd://127.0.0.1:10809/secret".into(),
    ] {
        let p = sb.img.join("backing.qcow2");
        let mut q = Qcow2::valid(1 << 20, 4);
        q.backing = Some(name.clone());
        q.write(&p);
        let what = format!("qcow2 backing '{name}'");
        assert_reference_refused(&p, Format::Qcow2, true, &what);
    }
}

#[test]
fn qcow2_external_data_file_naming_a_host_file_is_refused() {
    let sb = sandbox();
    for name in [sb.secret.to_str().unwrap().to_string(), "../secret".into()] {
        for raw_bit in [0, 2] {
            let p = sb.img.join("datafile.qcow2");
            let mut q = Qcow2::valid(1 << 20, 5);
            q.incompatible = 1 << 2;
            q.autoclear = raw_bit;
            q.data_file = Some(name.clone());
            // L1[0] -> L2 at cluster 4, L2[0] -> data-file offset 0 (allocated).
            let mut l1 = vec![0u8; 8];
            put_be64(&mut l1, 0, (4 << 16) | QCOW_COPIED);
            let mut l2 = vec![0u8; 8];
            put_be64(&mut l2, 0, QCOW_COPIED);
            q.pieces.push((1 << 16, l1));
            q.pieces.push((4 << 16, l2));
            q.write(&p);
            let what = format!("qcow2 data file '{name}' (data-file-raw {})", raw_bit != 0);
            assert_reference_refused(&p, Format::Qcow2, false, &what);
        }
    }
}

#[test]
fn vmdk_flat_extent_naming_a_host_file_is_refused() {
    let sb = sandbox();
    for name in [sb.secret.to_str().unwrap().to_string(), "../secret".into()] {
        let p = sb.img.join("flat.vmdk");
        let d = vmdk_descriptor("monolithicFlat", &[format!("RW 2048 FLAT \"{name}\" 0")]);
        std::fs::write(&p, d).unwrap();
        let what = format!("vmdk FLAT extent '{name}'");
        assert_reference_refused(&p, Format::Vmdk, true, &what);
    }
}

#[test]
fn vhd_differencing_parent_naming_a_host_file_is_refused() {
    let sb = sandbox();
    let abs = sb.secret.to_str().unwrap().to_string();
    for (code, name) in [
        (*b"W2ku", abs.clone()),
        (*b"W2ru", "../secret".to_string()),
        (*b"MacX", format!("file://{abs}")),
    ] {
        let p = sb.img.join("diff.vhd");
        let mut v = Vhd::dynamic(4 << 20, 2 << 20);
        v.disk_type = 4;
        v.parent_name = Some(name.clone());
        v.locators = vec![(code, name.clone())];
        v.write(&p);
        let what = format!(
            "vhd parent locator {} '{name}'",
            String::from_utf8_lossy(&code)
        );
        assert_reference_refused(&p, Format::Vhd, false, &what);
    }
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn opt_in_follows_relative_references_inside_the_folder() {
    if !common::have_qemu() {
        return;
    }
    let sb = sandbox();
    let d = &sb.img;
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // qcow2 over a raw backing file in the same folder.
    let base = d.join("base.raw");
    common::make_raw(&base, 1 << 20, 3);
    let top = d.join("top.qcow2");
    common::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        &s(&top),
    ]);
    let want = std::fs::read(&base).unwrap();
    assert_refused(
        &top,
        &OpenOptions::new().format(Format::Qcow2),
        &[ErrorKind::UnsafeReference],
        "qcow2 backing without opt-in",
    );
    let (err, bytes) = read_everything(&top, &allowed().format(Format::Qcow2));
    assert!(err.is_none(), "qcow2 with in-folder backing: {err:?}");
    assert_eq!(
        bytes, want,
        "qcow2 with in-folder backing reads the backing data"
    );
    // vmdk flat extent in the same folder.
    let flat = d.join("disk-flat.img");
    common::make_raw(&flat, 1 << 20, 5);
    let desc = d.join("disk.vmdk");
    std::fs::write(
        &desc,
        vmdk_descriptor(
            "monolithicFlat",
            &["RW 2048 FLAT \"disk-flat.img\" 0".into()],
        ),
    )
    .unwrap();
    let (err, bytes) = read_everything(&desc, &allowed().format(Format::Vmdk));
    assert!(err.is_none(), "vmdk with in-folder flat extent: {err:?}");
    assert_eq!(bytes, std::fs::read(&flat).unwrap());
    // qcow2 with an external data file in the same folder.
    let img = d.join("df.qcow2");
    // qemu-img creates the data file relative to its working directory: run it in the
    // image's folder so the relative name in the header resolves there.
    let out = std::process::Command::new("qemu-img")
        .current_dir(d)
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.data,data_file_raw=on",
        ])
        .arg(&img)
        .arg("1M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new("qemu-io")
        .current_dir(d)
        .args(["-f", "qcow2", "-c", "write -P 0x5c 0 64k"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (err, bytes) = read_everything(&img, &allowed().format(Format::Qcow2));
    assert!(err.is_none(), "qcow2 with in-folder data file: {err:?}");
    assert!(bytes[..65536].iter().all(|&b| b == 0x5c));
}

#[test]
fn opt_in_follows_a_relative_vhd_parent_inside_the_folder() {
    let sb = sandbox();
    let parent = sb.img.join("parent.vhd");
    let mut v = Vhd::dynamic(4 << 20, 2 << 20);
    v.blocks = vec![(1, vec![0x3c; 2 << 20])];
    v.write(&parent);
    let child = sb.img.join("child.vhd");
    let mut c = Vhd::dynamic(4 << 20, 2 << 20);
    c.disk_type = 4;
    c.parent_name = Some("parent.vhd".into());
    c.locators = vec![(*b"W2ru", "parent.vhd".into())];
    c.write(&child);
    assert_refused(
        &child,
        &OpenOptions::new().format(Format::Vhd),
        &[ErrorKind::UnsafeReference],
        "vhd parent without opt-in",
    );
    let (err, bytes) = read_everything(&child, &allowed().format(Format::Vhd));
    assert!(err.is_none(), "vhd with in-folder parent: {err:?}");
    assert_eq!(bytes.len(), 4 << 20);
    assert!(bytes[..2 << 20].iter().all(|&b| b == 0));
    assert!(
        bytes[2 << 20..].iter().all(|&b| b == 0x3c),
        "parent data shows through"
    );
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn reference_chains_are_bounded_and_cycles_refused() {
    if !common::have_qemu() {
        return;
    }
    let sb = sandbox();
    let d = &sb.img;
    let p = |n: usize| d.join(format!("c{n}.qcow2"));
    let s = |p: &Path| p.to_str().unwrap().to_string();
    common::qemu_img(&["create", "-q", "-f", "qcow2", &s(&p(0)), "1M"]);
    for n in 1..=17 {
        let back = format!("c{}.qcow2", n - 1);
        common::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            &back,
            "-F",
            "qcow2",
            &s(&p(n)),
            "1M",
        ]);
    }
    // 16 images in a chain open (the top plus 15 backing files); 17 or more do not.
    let (err, _) = read_everything(&p(15), &allowed().format(Format::Qcow2));
    assert!(err.is_none(), "a chain of 16: {err:?}");
    for n in [16, 17] {
        assert_refused(
            &p(n),
            &allowed().format(Format::Qcow2),
            &[ErrorKind::LimitExceeded],
            &format!("a chain of {}", n + 1),
        );
    }
    // a -> b -> a
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    for (me, other) in [(&a, "b.qcow2"), (&b, "a.qcow2")] {
        common::qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            other,
            "-F",
            "qcow2",
            &s(me),
            "1M",
        ]);
    }
    assert_refused(
        &a,
        &allowed().format(Format::Qcow2),
        &[ErrorKind::UnsafeReference],
        "a backing cycle",
    );
}

// ---------------------------------------------------------------------------------------
// Class 2: sizes and tables the file cannot back (subprocess, < 64 MiB, < 10 s)

#[test]
fn qcow2_one_kib_claiming_a_pebibyte_with_l1_past_the_end() {
    let sb = sandbox();
    let p = sb.img.join("pib.qcow2");
    let mut q = Qcow2::valid(1 << 50, 4);
    // L1 of 2^21 entries (16 MiB: under the cap) at cluster 1, but the file is 1 KiB.
    assert_eq!(q.l1_size, 1 << 21);
    q.pieces.clear();
    q.file_len = 1024;
    q.write(&p);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1024);
    // qemu reads past the end of a file as zeros, so to qemu this is an empty 1 PiB
    // disk; mapping it as empty is as acceptable as refusing it as Corrupt.
    assert_bounded_refusal(&p, Format::Qcow2, &[ErrorKind::Corrupt], true);
    let (err, bytes) = read_everything(&p, &OpenOptions::new().format(Format::Qcow2));
    match err {
        Some(e) => assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}"),
        None => assert!(bytes.iter().all(|&b| b == 0), "reads as empty"),
    }
}

#[test]
fn qcow2_l1_table_over_the_cap_inside_the_file() {
    // 2^23 L1 entries (64 MiB > 32 MiB cap) for a 4 PiB disk, all inside a sparse file.
    let sb = sandbox();
    let p = sb.img.join("bigl1.qcow2");
    let mut q = Qcow2::valid(1 << 52, 4);
    assert_eq!(q.l1_size, 1 << 23);
    q.l1_offset = 4 << 16;
    q.file_len = (4 << 16) + (64 << 20);
    q.write(&p);
    assert_bounded_refusal(&p, Format::Qcow2, &[ErrorKind::LimitExceeded], false);
}

#[test]
fn qcow2_refcount_table_huge() {
    // A 1 GiB refcount table (16384 clusters) inside a sparse file. Reading never needs
    // refcounts, so a reader that does not load them may open this and read it correctly
    // (all zeros); one that loads them must refuse with LimitExceeded.
    let sb = sandbox();
    let p = sb.img.join("bigrc.qcow2");
    let mut q = Qcow2::valid(1 << 20, 4);
    q.refcount_table_offset = 4 << 16;
    q.refcount_table_clusters = 16384;
    q.file_len = (4 << 16) + (1 << 30);
    q.write(&p);
    assert_bounded_refusal(&p, Format::Qcow2, &[ErrorKind::LimitExceeded], true);
}

#[test]
fn vdi_blocks_in_image_all_ones() {
    // blocks_in_image = 2^32-1: a 16 GiB block map. The file (sparse) is long enough to
    // hold it, but a 32-bit offset_data cannot lie after it, so "over the cap"
    // (LimitExceeded) and "block map overlaps the data area" (Corrupt) both hold.
    let sb = sandbox();
    let p = sb.img.join("blocks.vdi");
    let mut v = Vdi::dynamic(4 << 20);
    v.blocks = u32::MAX;
    v.disk_size = u32::MAX as u64 * (1 << 20);
    v.offset_data = 0xfff0_0000;
    v.min_len = 512 + (u32::MAX as u64 + 1) * 4 + 4096;
    v.write(&p);
    assert_bounded_refusal(
        &p,
        Format::Vdi,
        &[ErrorKind::LimitExceeded, ErrorKind::Corrupt],
        false,
    );
}

#[test]
fn vhd_max_table_entries_huge() {
    // 2^30 BAT entries (4 GiB BAT) for a 2 PiB disk; the sparse file holds the BAT.
    let sb = sandbox();
    let p = sb.img.join("bat.vhd");
    let mut v = Vhd::dynamic(1 << 51, 2 << 20);
    assert_eq!(v.max_table_entries, 1 << 30);
    v.min_len = 1536 + (4 << 30);
    v.write(&p);
    assert_bounded_refusal(&p, Format::Vhd, &[ErrorKind::LimitExceeded], false);
}

#[test]
fn vmdk_grain_directory_huge() {
    // 2^40 sectors (512 TiB) in 64 KiB grains, 512 entries per table: 2^24 directory
    // entries (64 MiB > cap), inside a sparse file.
    let sb = sandbox();
    let p = sb.img.join("gd.vmdk");
    VmdkSparse {
        capacity: 1 << 40,
        grain: 128,
        gtes_per_gt: 512,
        min_len: 21 * 512 + (64 << 20) + 65536,
    }
    .write(&p);
    assert_bounded_refusal(&p, Format::Vmdk, &[ErrorKind::LimitExceeded], false);
}

// ---------------------------------------------------------------------------------------
// Class 3: block size 0 / not a power of two (the divide-by-zero class, CVE-2014-0142)

#[test]
fn vhd_block_size_zero_or_not_a_power_of_two() {
    let sb = sandbox();
    for bs in [0u32, 3 << 20, 1536] {
        let p = sb.img.join("bs.vhd");
        let mut v = Vhd::dynamic(4 << 20, bs);
        if bs == 0 {
            v.max_table_entries = 2;
        }
        v.write(&p);
        assert_refused(
            &p,
            &OpenOptions::new().format(Format::Vhd),
            &[ErrorKind::InvalidFormat],
            &format!("vhd block size {bs}"),
        );
    }
}

#[test]
fn vdi_block_size_zero_or_not_a_power_of_two() {
    let sb = sandbox();
    for bs in [0u32, 3 << 20, 1000] {
        let p = sb.img.join("bs.vdi");
        let mut v = Vdi::dynamic(4 << 20);
        v.block_size = bs;
        if bs > 0 {
            v.blocks = (4u32 << 20).div_ceil(bs);
            v.offset_data = (512 + v.blocks * 4).div_ceil(512) * 512;
        }
        v.write(&p);
        assert_refused(
            &p,
            &OpenOptions::new().format(Format::Vdi),
            &[ErrorKind::InvalidFormat],
            &format!("vdi block size {bs}"),
        );
    }
}

#[test]
fn vmdk_grain_size_zero_or_not_a_power_of_two() {
    let sb = sandbox();
    for (grain, gtes) in [(0u64, 512u32), (3, 512), (128, 0)] {
        let p = sb.img.join("grain.vmdk");
        VmdkSparse {
            capacity: 2048,
            grain,
            gtes_per_gt: gtes,
            min_len: 0,
        }
        .write(&p);
        assert_refused(
            &p,
            &OpenOptions::new().format(Format::Vmdk),
            &[ErrorKind::InvalidFormat],
            &format!("vmdk grain {grain} sectors, {gtes} entries per table"),
        );
    }
}

// ---------------------------------------------------------------------------------------
// Class 4: overlapping qcow2 metadata: bounded, and correct or Corrupt

#[test]
fn qcow2_l2_entries_pointing_at_metadata_read_correctly_or_fail_corrupt() {
    let sb = sandbox();
    // (what, L2[0] host cluster, the bytes guest cluster 0 must then read as)
    for (what, target) in [
        (
            "L2 entry at the header (offset 0: unallocated per spec)",
            0u64,
        ),
        ("L2 entry at the L1 table", 1),
        ("L2 entry at the refcount table", 2),
        ("L2 entry at the L2 table itself", 4),
    ] {
        let p = sb.img.join("overlap.qcow2");
        let mut q = Qcow2::valid(1 << 20, 5);
        let mut l1 = vec![0u8; 8];
        put_be64(&mut l1, 0, (4 << 16) | QCOW_COPIED);
        let mut l2 = vec![0u8; 16];
        put_be64(&mut l2, 0, (target << 16) | QCOW_COPIED);
        put_be64(&mut l2, 8, (4 << 16) | QCOW_COPIED); // and guest cluster 1 too
        q.pieces.push((1 << 16, l1));
        q.pieces.push((4 << 16, l2));
        q.write(&p);
        let file = std::fs::read(&p).unwrap();
        let cluster = |c: u64| -> Vec<u8> {
            if c == 0 {
                vec![0u8; 65536] // offset 0 means unallocated
            } else {
                file[(c << 16) as usize..((c + 1) << 16) as usize].to_vec()
            }
        };
        let opts = OpenOptions::new().format(Format::Qcow2);
        let (err, _) = read_everything(&p, &opts);
        match err {
            Some(e) => assert_eq!(e.kind(), ErrorKind::Corrupt, "{what}: {e}"),
            None => {
                let dev = diskconv::open(&p, &opts).unwrap();
                let mut buf = vec![0u8; 131072];
                dev.read_at(&mut buf, 0).unwrap();
                assert_eq!(
                    &buf[..65536],
                    &cluster(target)[..],
                    "{what}: guest cluster 0"
                );
                assert_eq!(&buf[65536..], &cluster(4)[..], "{what}: guest cluster 1");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Class 5 and 6: named formats are never probed; polyglots are ambiguous

#[test]
fn raw_disk_holding_a_qcow2_header_stays_raw_with_f_raw() {
    let sb = sandbox();
    let p = sb.img.join("guest.raw");
    let mut q = Qcow2::valid(1 << 30, 4);
    q.backing = Some(sb.secret.to_str().unwrap().to_string());
    q.write(&p);
    let want = std::fs::read(&p).unwrap();
    let opts = OpenOptions::new().format(Format::Raw);
    let dev = diskconv::open(&p, &opts).unwrap();
    assert_eq!(dev.format(), Format::Raw);
    assert_eq!(dev.virtual_size(), want.len() as u64);
    let (err, bytes) = read_everything(&p, &opts);
    assert!(err.is_none() && !contains(&bytes, SECRET));
    let mut all = vec![0u8; want.len()];
    dev.read_at(&mut all, 0).unwrap();
    assert!(all == want, "raw reads the file verbatim");
    // The CLI too: convert -f raw copies the bytes, whatever header they hold.
    let out = sb.img.join("out.raw");
    let run = run_bounded(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        p.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        std::fs::read(&out).unwrap() == want,
        "convert -f raw copies verbatim"
    );
    // And inspect, claimed raw, flags the mismatch (a probing consumer would see qcow2).
    let i = diskconv::inspect(&p, Some(Format::Raw)).unwrap();
    assert_eq!(i.detected_format, Some(Format::Qcow2));
    assert!(i.has(FindingKind::FormatMismatch) && !i.safe);
}

#[test]
fn polyglot_is_reported_ambiguous() {
    let sb = sandbox();
    // qcow2 header + VHD footer; KDMV header + VDI signature.
    let p1 = sb.img.join("poly1");
    Qcow2::valid(1 << 20, 4).write(&p1);
    let mut b = std::fs::read(&p1).unwrap();
    b.extend_from_slice(&vhd_footer(1 << 20, 2, u64::MAX));
    std::fs::write(&p1, &b).unwrap();
    let p2 = sb.img.join("poly2");
    VmdkSparse {
        capacity: 128,
        grain: 128,
        gtes_per_gt: 512,
        min_len: 0,
    }
    .write(&p2);
    let mut b = std::fs::read(&p2).unwrap();
    put_le32(&mut b, 0x40, 0xbeda_107f);
    std::fs::write(&p2, &b).unwrap();
    for (p, names) in [(&p1, ["qcow2", "vpc"]), (&p2, ["vmdk", "vdi"])] {
        let e = diskconv::probe(p).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e}");
        assert!(names.iter().all(|n| e.message().contains(n)), "{e}");
        let e = diskconv::open(p, &OpenOptions::new()).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidFormat, "{e}");
        let i = diskconv::inspect(p, None).unwrap();
        assert!(i.has(FindingKind::Polyglot) && !i.safe, "{i:?}");
        assert_eq!(i.detected_format, None);
        // The CLI exits 2 (unsafe) and says why.
        let run = run_bounded(&["inspect", p.to_str().unwrap()]);
        assert_eq!(run.code, Some(2), "{}{}", run.stdout, run.stderr);
        assert!(run.stdout.contains("Polyglot"), "{}", run.stdout);
    }
}

#[test]
fn inspect_cli_exit_codes() {
    let sb = sandbox();
    let p = sb.img.join("plain.raw");
    common::make_raw(&p, 1 << 20, 9);
    let run = run_bounded(&["inspect", "--format", "raw", p.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("verdict: safe"));
    let run = run_bounded(&["inspect", "-f", "vdi", "--output=json", p.to_str().unwrap()]);
    assert_eq!(run.code, Some(2));
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["safe"], false);
    assert_eq!(v["format-matches-claim"], false);
    let run = run_bounded(&["inspect", sb.root.join("missing").to_str().unwrap()]);
    assert_eq!(run.code, Some(1));
    // --max-virtual-size: a 1 MiB disk past a 512 KiB limit is unsafe, and says so; a bad
    // size is an error naming the flag.
    let path = p.to_str().unwrap();
    let run = run_bounded(&["inspect", "-f", "raw", "--max-virtual-size", "512K", path]);
    assert_eq!(run.code, Some(2), "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("ExceedsLimit"), "{}", run.stdout);
    let run = run_bounded(&["inspect", "-f", "raw", "--max-virtual-size", "1M", path]);
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let run = run_bounded(&["inspect", "--max-virtual-size", "lots", path]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("--max-virtual-size"), "{}", run.stderr);
}

// ---------------------------------------------------------------------------------------
// Real images: inspect never panics, refuses what qemu-img cannot open, flags formats we
// do not read, and passes every image a reader exists for.

#[test]
#[cfg_attr(no_bzip2, ignore = "needs bzip2 for the corpus: apt-get install bzip2")]
fn inspect_judges_the_shared_corpus() {
    let Some(dir) = common::corpus_dir() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for e in common::corpus_entries(&dir) {
        let path = common::corpus_file(&dir, &e.file, tmp.path());
        let word = e.format.split(['/', ' ']).next().unwrap();
        let claim = Format::from_name(word).ok();
        let i = common::within_small_file_budget(&e.file, &path, || {
            diskconv::inspect(&path, claim).unwrap()
        });
        let what = format!("{}: {:?}", e.file, i.findings);
        serde_json::to_string(&i).unwrap();
        if e.expected_sha().is_none() {
            assert!(
                !i.safe,
                "{what}: qemu-img cannot open it, inspect calls it safe"
            );
        } else if i.opened_as.is_some() {
            assert!(i.safe, "{what}");
            assert_eq!(i.virtual_size, e.virtual_size, "{what}");
            assert_eq!(i.map.as_ref().map(|m| m.complete), Some(true), "{what}");
        } else {
            // No reader yet on this branch: the placeholder's Unsupported is the only
            // complaint allowed.
            for f in i.unsafe_findings() {
                assert_eq!(f.kind, FindingKind::OpenFailed, "{what}");
                let k = f.error.as_ref().map(|e| e.kind.as_str());
                assert_eq!(k, Some("Unsupported"), "{what}");
            }
        }
    }
}
