//! Helpers of the tests of the read-only formats (tests/qemu/qcow1.rs, tests/qemu/qed.rs): our CLI
//! against qemu-img on the same image, byte for byte after JSON parsing.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use super::{qemu_img, s, sha256_file};

/// Run our binary with `args`.
pub fn ours(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .output()
        .unwrap()
}

/// Run our binary, panic with its stderr unless it succeeds, return stdout.
pub fn ours_ok(args: &[&str]) -> String {
    let o = ours(args);
    assert!(
        o.status.success(),
        "diskconv {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// `info --output=json` without the keys that name or measure the host file.
fn info_value(text: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    fn strip(v: &mut serde_json::Value) {
        if let Some(m) = v.as_object_mut() {
            m.remove("filename");
            m.remove("actual-size");
            if let Some(c) = m.get_mut("children").and_then(|c| c.as_array_mut()) {
                for child in c {
                    strip(&mut child["info"]);
                }
            }
        }
    }
    strip(&mut v);
    v
}

/// Assert our `info --output=json` of `img` equals qemu-img's (minus filename and
/// actual-size); returns ours.
pub fn assert_info_like_qemu(img: &Path, fmt: &str) -> serde_json::Value {
    let a = info_value(&ours_ok(&["info", "-f", fmt, "--output=json", s(img)]));
    let b = info_value(&qemu_img(&["info", "-f", fmt, "--output=json", s(img)]));
    assert_eq!(a, b, "info of {}", img.display());
    a
}

/// Assert our `map --output=json` of `img` equals qemu-img's (we need `extra` flags,
/// `--allow-references` for overlays).
pub fn assert_map_like_qemu(img: &Path, fmt: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["map", "-f", fmt, "--output=json"];
    args.extend_from_slice(extra);
    args.push(s(img));
    let a: serde_json::Value = serde_json::from_str(&ours_ok(&args)).unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "-f", fmt, "--output=json", s(img)])).unwrap();
    assert_eq!(a, b, "map of {}", img.display());
    a
}

/// Assert the sha256 of our `convert -O raw` of `img` equals that of qemu-img's.
pub fn assert_converts_like_qemu(img: &Path, fmt: &str, extra: &[&str], dir: &Path) {
    let a = dir.join("ours.raw");
    let b = dir.join("theirs.raw");
    let mut args = vec!["convert", "-f", fmt, "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend([s(img), s(&a)]);
    ours_ok(&args);
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(img), s(&b)]);
    assert_eq!(
        sha256_file(&a),
        sha256_file(&b),
        "guest of {}",
        img.display()
    );
    std::fs::remove_file(a).unwrap();
    std::fs::remove_file(b).unwrap();
}

/// Overwrite bytes of `path` at `off`.
pub fn patch(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// Bytes of `path` at `off`.
pub fn peek(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// `-O fmt` is refused as read only, and nothing is left at the output path.
pub fn assert_write_refused(src: &Path, fmt: &str, dir: &Path) {
    let out = dir.join(format!("refused.{fmt}"));
    let o = ours(&["convert", "-O", fmt, s(src), s(&out)]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("read only"), "{err}");
    assert!(!out.exists(), "{} left behind", out.display());
    let o = ours(&["create", "-f", fmt, s(&out), "1M"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("read only"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists(), "{} left behind", out.display());
}
