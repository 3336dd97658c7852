//! Helpers shared by the integration tests: qemu-img as the oracle, sample images,
//! the corpus in tests/data, and counters of the work a test does. Each test file uses
//! the parts it needs.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use diskconv::{BlockDevice, ConvertOptions, Format, OpenOptions};

/// The install command named in every "oracle missing" message.
pub const INSTALL_HINT: &str = "apt-get install qemu-utils bzip2 time (or run ./scripts/test, \
     which installs them)";

/// True when the oracles must be there: `CI` set (to anything but `false`/`0`) or
/// `DISKCONV_REQUIRE_QEMU=1`. Then a missing tool fails the test that needs it instead of
/// skipping it; build.rs reads the same variables to decide what cargo may ignore.
pub fn oracles_required() -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    ci || std::env::var("DISKCONV_REQUIRE_QEMU").is_ok_and(|v| v == "1")
}

/// True when `tool --version` runs.
fn tool_runs(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether `tool` is installed. Missing, it panics (the install command in the message)
/// when the oracles are required or when build.rs saw it (`missing_at_build` false: the
/// test was not marked ignored, so returning would count a test that did not run as
/// passed); otherwise it notes the skip and returns false.
#[track_caller]
fn have_tool(tool: &str, missing_at_build: bool) -> bool {
    if tool_runs(tool) {
        return true;
    }
    assert!(
        !oracles_required(),
        "{tool} not found and CI or DISKCONV_REQUIRE_QEMU=1 is set: {INSTALL_HINT}"
    );
    assert!(
        missing_at_build,
        "{tool} not found, but it was there when the tests were built: {INSTALL_HINT}, \
         or rebuild so the tests that need it are ignored"
    );
    eprintln!("{tool} not found: its part of this test is skipped ({INSTALL_HINT})");
    false
}

/// True when qemu-img is installed. Tests that need it throughout carry
/// `#[cfg_attr(no_qemu, ignore = "...")]` (build.rs), so without it cargo reports them as
/// ignored; a test that only cross-checks with it runs its own part and skips the rest.
/// With the oracles required (CI), a missing qemu-img fails the test.
#[track_caller]
pub fn have_qemu() -> bool {
    have_tool("qemu-img", cfg!(no_qemu))
}

/// True when qemu-io (also from qemu-utils) is installed; same rules as [`have_qemu`].
#[track_caller]
pub fn have_qemu_io() -> bool {
    have_tool("qemu-io", cfg!(no_qemu))
}

/// True when bzip2 (which unpacks the corpus's `.bz2` files) is installed; tests that need
/// it carry `#[cfg_attr(no_bzip2, ignore = "...")]`.
#[track_caller]
pub fn have_bzip2() -> bool {
    have_tool("bzip2", cfg!(no_bzip2))
}

/// Run a command, panic with its stderr unless it succeeds, return stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `qemu-img ARGS...`.
pub fn qemu_img(args: &[&str]) -> String {
    let mut v = vec!["qemu-img"];
    v.extend_from_slice(args);
    run(&v)
}

/// Path as &str.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Deterministic xorshift for test data without a dependency.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Write a raw image of `size` bytes mixing holes, random data, written zeros and
/// compressible text in 64 KiB-ish pieces, so every mapping kind and compression path
/// is exercised. Deterministic in `seed`.
pub fn make_raw(path: &Path, size: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed | 1);
    let mut off = 0u64;
    while off < size {
        let len = (rng.next() % (192 << 10) + 1).min(size - off);
        let mut buf = vec![0u8; len as usize];
        match rng.next() % 5 {
            0 | 1 => {
                off += len;
                continue;
            }
            2 => rng.fill(&mut buf),
            3 => {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
                }
            }
            _ => {} // written zeros
        }
        f.write_all_at(&buf, off).unwrap();
        off += len;
    }
}

/// sha256 of a device's guest bytes, via the library's Read adapter, skipping the read of
/// zero ranges (hashing zeros from a static buffer).
pub fn sha256_device(dev: &dyn BlockDevice) -> String {
    let size = dev.virtual_size();
    let mut h = Sha256::new();
    let zeros = vec![0u8; 1 << 20];
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let m = dev.map(off, (size - off).min(1 << 20)).unwrap();
        assert_eq!(m.offset, off);
        let n = m.len.min(size - off).min(1 << 20) as usize;
        assert!(n > 0);
        if m.is_zero() {
            h.update(&zeros[..n]);
        } else {
            dev.read_at(&mut buf[..n], off).unwrap();
            h.update(&buf[..n]);
        }
        off += n as u64;
    }
    hex(&h.finalize())
}

/// sha256 of a file's bytes.
pub fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Open with the format named (no probing).
pub fn open_as(path: &Path, fmt: Format) -> Box<dyn BlockDevice> {
    diskconv::open(path, &OpenOptions::new().format(fmt))
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Assert our reading of `img` (format `fmt`) equals qemu-img's `convert -O raw` of it,
/// and the virtual sizes agree.
pub fn assert_reads_like_qemu(img: &Path, fmt: Format, dir: &Path) {
    let raw = dir.join(format!(
        "{}.qemu.raw",
        img.file_name().unwrap().to_string_lossy()
    ));
    qemu_img(&["convert", "-f", fmt.name(), "-O", "raw", s(img), s(&raw)]);
    let dev = open_as(img, fmt);
    assert_eq!(
        dev.virtual_size(),
        std::fs::metadata(&raw).unwrap().len(),
        "virtual size of {}",
        img.display()
    );
    assert_eq!(
        sha256_device(dev.as_ref()),
        sha256_file(&raw),
        "guest bytes of {}",
        img.display()
    );
    std::fs::remove_file(&raw).unwrap();
}

/// Convert with the library.
pub fn convert(src: &Path, dst: &Path, fmt: Format, options: &[(&str, &str)], compress: bool) {
    let mut o = ConvertOptions::new(fmt);
    for (k, v) in options {
        o.create.options.insert(k.to_string(), v.to_string());
    }
    o.create.compress = compress;
    diskconv::convert(src, dst, &o)
        .unwrap_or_else(|e| panic!("convert {} -> {}: {e}", src.display(), dst.display()));
}

/// Assert `qemu-img check` finds no errors and no leaks (formats it can check).
pub fn assert_qemu_check_clean(img: &Path, fmt: Format) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", fmt.name(), "--output=json", s(img)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-img check {} failed ({:?}): {text}{}",
        img.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
        for k in ["corruptions", "leaks", "check-errors"] {
            assert_eq!(
                v.get(k).and_then(|x| x.as_u64()).unwrap_or(0),
                0,
                "{k} in {}: {text}",
                img.display()
            );
        }
    }
}

/// Assert `qemu-img compare` says the two images hold identical guest content.
pub fn assert_qemu_identical(a: &Path, fa: Format, b: &Path, fb: Format) {
    qemu_img(&["compare", "-f", fa.name(), "-F", fb.name(), s(a), s(b)]);
}

/// qemu-img info --output=json as a value.
pub fn qemu_info(img: &Path, fmt: Format) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "-f",
        fmt.name(),
        "--output=json",
        s(img),
    ]))
    .unwrap()
}

/// The corpus of real images kept in the repository (tests/data/corpus: README.md says
/// where each came from, MANIFEST.tsv what it must read as). Always there in a clone, so
/// corpus tests never skip; the `.bz2` files need bzip2 (see [`have_bzip2`]).
pub fn corpus_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/corpus");
    assert!(
        d.join("MANIFEST.tsv").exists(),
        "{} missing: the corpus is part of the repository",
        d.display()
    );
    have_bzip2().then_some(d)
}

/// One MANIFEST.tsv row.
#[derive(Debug, Clone)]
pub struct CorpusEntry {
    pub file: String,
    pub format: String,
    pub virtual_size: Option<u64>,
    pub sha256_raw: String,
}

impl CorpusEntry {
    /// The expected guest sha256, or None for images qemu-img fails to open.
    pub fn expected_sha(&self) -> Option<&str> {
        (!self.sha256_raw.starts_with("qemu-img-fails")).then_some(self.sha256_raw.as_str())
    }
}

/// The corpus rows.
pub fn corpus_entries(dir: &Path) -> Vec<CorpusEntry> {
    let text = std::fs::read_to_string(dir.join("MANIFEST.tsv")).unwrap();
    text.lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let c: Vec<&str> = l.split('\t').collect();
            CorpusEntry {
                file: c[0].to_string(),
                format: c[4].to_string(),
                virtual_size: c[5].parse().ok(),
                sha256_raw: c[7].to_string(),
            }
        })
        .collect()
}

/// A usable path to corpus file `name`, decompressing `.bz2` into `tmp`.
pub fn corpus_file(dir: &Path, name: &str, tmp: &Path) -> PathBuf {
    let src = dir.join(name);
    if let Some(stem) = name.strip_suffix(".bz2") {
        let out = tmp.join(stem);
        let o = Command::new("bzip2")
            .args(["-dc", s(&src)])
            .output()
            .unwrap_or_else(|e| panic!("bzip2 ({INSTALL_HINT}): {e}"));
        assert!(o.status.success(), "bzip2 -dc {}: {:?}", src.display(), o.status);
        std::fs::write(&out, o.stdout).unwrap();
        out
    } else {
        src
    }
}
