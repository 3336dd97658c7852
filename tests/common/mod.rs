//! Helpers shared by the integration tests: qemu-img as the oracle, sample images,
//! the shared corpus. Each test file uses the parts it needs.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use diskconv::{BlockDevice, ConvertOptions, Format, OpenOptions};

/// True when qemu-img is installed; tests that need it return early (with a note) when not.
pub fn have_qemu() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("qemu-img not found: skipping differential test");
    }
    ok
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

/// The shared corpus folder, if present.
pub fn corpus_dir() -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus");
    if d.join("MANIFEST.tsv").exists() {
        Some(d)
    } else {
        eprintln!("../shared/corpus absent: skipping corpus test");
        None
    }
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
            .expect("bzip2");
        assert!(o.status.success());
        std::fs::write(&out, o.stdout).unwrap();
        out
    } else {
        src
    }
}
