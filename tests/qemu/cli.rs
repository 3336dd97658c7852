//! The command line: qemu-img-compatible flags, one-line errors, non-zero exits.
use crate::common;
use common::*;
use std::process::Command;

fn dc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_arguments_fail_with_one_line_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 1 << 20, 1);
    let dst = dir.path().join("b.img");
    for (args, needle) in [
        (
            vec!["convert", "-O", "nosuch", s(&src), s(&dst)],
            "unknown format 'nosuch'",
        ),
        (
            vec!["convert", "-O", "raw", "-o", "bogus=1", s(&src), s(&dst)],
            "no option 'bogus'",
        ),
        (
            vec!["convert", "-O", "raw", "-S", "12q", s(&src), s(&dst)],
            "Invalid buffer size for sparse output specified: '12q'.",
        ),
        (vec!["convert", "-O", "raw", s(&src), s(&src)], "same file"),
        (
            vec!["convert", "-O", "raw", "/nonexistent/x.raw", s(&dst)],
            "cannot open image",
        ),
        (
            vec!["info", "--output=xml", s(&src)],
            "--output must be human or json",
        ),
    ] {
        let o = dc(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(!dst.exists());
    }
    let left = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(left, 1, "no temporary files left behind");
}

#[test]
fn option_help_lists_options() {
    let o = dc(&["convert", "-O", "raw", "-o", "help", "x"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("preallocation"));
}

#[test]
fn progress_prints_percentages() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 3 << 20, 2);
    let dst = dir.path().join("b.raw");
    let o = dc(&["convert", "-p", "-O", "raw", s(&src), s(&dst)]);
    assert!(o.status.success());
    // On stdout, as qemu-img prints it.
    assert!(String::from_utf8_lossy(&o.stdout).contains("(100.00/100%)"));
    assert_eq!(sha256_file(&src), sha256_file(&dst));
}

#[test]
fn info_json_has_qemu_keys_and_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, (2 << 20) + 512, 4);
    // Settle the allocation first: until writeback, st_blocks (actual-size) can change
    // between our info and qemu-img's (seen: 4 KiB apart on a busy machine).
    std::fs::File::open(&src).unwrap().sync_all().unwrap();
    let o = dc(&["info", "--output=json", s(&src)]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["virtual-size"], (2 << 20) + 512);
    assert_eq!(v["format"], "raw");
    assert_eq!(v["dirty-flag"], false);
    assert!(v["actual-size"].as_u64().is_some());
    if have_qemu() {
        let q = qemu_info(&src, diskconv::Format::Raw);
        for k in [
            "virtual-size",
            "format",
            "actual-size",
            "dirty-flag",
            "filename",
        ] {
            assert_eq!(v[k], q[k], "{k}");
        }
    }
    let o = dc(&["info", s(&src)]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("file format: raw"), "{text}");
    assert!(
        text.contains("virtual size: 2 MiB (2097664 bytes)"),
        "{text}"
    );
}

#[test]
fn interrupted_conversion_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(64 << 30)
        .unwrap();
    let dst = dir.path().join("out.raw");
    // -S 0 writes every byte, so this runs long enough to be interrupted.
    let mut child = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(["convert", "-S", "0", "-O", "raw", s(&src), s(&dst)])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Interrupt once the temporary output exists (the handler is installed and writing
    // has begun), not after a fixed sleep that a loaded machine may outlast.
    let _guard = hang_guard("waiting for the temporary output");
    while std::fs::read_dir(dir.path()).unwrap().count() < 2 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(!status.success());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("big.raw")]);
}

#[test]
fn writer_notes_reach_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("odd.raw");
    make_raw(&src, 1000, 9);
    let dst = dir.path().join("odd.vhd");
    let o = dc(&["convert", "-O", "vpc", "-o", "azure=on", s(&src), s(&dst)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("note: Azure needs a whole number of MiB"),
        "{err}"
    );
    let dev = diskconv::open(&dst, &diskconv::OpenOptions::new()).unwrap();
    assert_eq!(dev.virtual_size(), 1 << 20);
}

#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn info_names_backing_files_without_opening_them() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let over = dir.path().join("over.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "1M"]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&over),
    ]);
    // Make the backing file unreadable as an image: info must not care.
    std::fs::write(&base, b"not an image").unwrap();
    let o = dc(&["info", "--output=json", s(&over)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["backing-filename"], "base.qcow2");
    assert_eq!(v["backing-filename-format"], "qcow2");
    // Converting still refuses the reference without the opt-in.
    let out = dir.path().join("out.raw");
    let o = dc(&["convert", "-O", "raw", s(&over), s(&out)]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unsafe reference"));
    assert!(!out.exists());
}

/// Errors speak the command line's language: its flags, in one line, each thing said once.
#[test]
fn errors_name_flags_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 1 << 20, 1);
    let dst = dir.path().join("b.raw");
    let missing = dir.path().join("nonexist");
    for (args, needle) in [
        (
            vec![
                "convert",
                "-O",
                "raw",
                "--target-size",
                "64k",
                s(&src),
                s(&dst),
            ],
            "set --shrink",
        ),
        (
            vec!["convert", "-O", "raw", "--target-is-zero", s(&src), s(&dst)],
            "--target-is-zero requires use of -n flag",
        ),
    ] {
        let o = dc(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("Options::"), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    // An image naming a host file: the flag that opts in, not the library's option.
    if have_qemu() {
        let q = dir.path().join("b.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
            s(&q),
            "1M",
        ]);
        let o = dc(&["convert", "-O", "raw", s(&q), s(&dst)]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("(opt in with --allow-references)"), "{err}");
        assert!(!err.contains("Options::"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
    // A missing image is named once, with the reason once.
    let o = dc(&["compare", s(&src), s(&missing)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("nonexist").count(), 1, "{err}");
    assert_eq!(err.matches("cannot open").count(), 1, "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
}

/// The command line's JSON has one key style, qemu's kebab-case, whichever command prints it.
#[test]
fn json_keys_are_kebab_case_everywhere() {
    fn snake_keys(v: &serde_json::Value, at: &str, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    if k.contains('_') {
                        out.push(format!("{at}.{k}"));
                    }
                    snake_keys(v, &format!("{at}.{k}"), out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| snake_keys(v, at, out)),
            _ => {}
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 1 << 20, 1);
    let q = dir.path().join("a.qcow2");
    let sp = dir.path().join("sp.raw");
    for args in [
        vec!["info", "--output=json", s(&src)],
        vec!["inspect", "--output=json", s(&src)],
        vec!["measure", "--output=json", "-O", "qcow2", s(&src)],
        vec!["convert", "--output=json", "-O", "qcow2", s(&src), s(&q)],
        vec!["check", "--output=json", s(&q)],
        vec!["map", "--output=json", s(&q)],
        vec!["sparsify", "--output=json", s(&src), s(&sp)],
    ] {
        let o = dc(&args);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // A report goes to stderr only when stdout carries the image.
        let text = if o.stdout.is_empty() {
            &o.stderr
        } else {
            &o.stdout
        };
        let v: serde_json::Value = serde_json::from_slice(text)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(text)));
        let mut bad = Vec::new();
        snake_keys(&v, args[0], &mut bad);
        assert!(bad.is_empty(), "{args:?}: snake_case keys {bad:?}");
    }
}

/// Creating a format diskconv only reads says so, and names the format to create instead.
#[test]
fn create_of_a_read_only_format_names_what_to_create() {
    let dir = tempfile::tempdir().unwrap();
    for fmt in ["qcow", "qed"] {
        let img = dir.path().join(format!("x.{fmt}"));
        let o = dc(&["create", "-f", fmt, s(&img), "1M"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("does not write {fmt}")), "{err}");
        assert!(err.contains("write qcow2 instead"), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!img.exists());
    }
}

/// Help says what the commands take and do, once each.
#[test]
fn help_texts_are_accurate() {
    let help = |args: &[&str]| {
        let o = dc(args);
        assert!(o.status.success(), "{args:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    let convert = help(&["convert", "--help"]);
    assert!(
        convert.contains("raw qcow2 vpc (alias vhd) vmdk vdi vhdx ova"),
        "{convert}"
    );
    assert!(
        !convert.contains("(default raw) [default: raw]"),
        "{convert}"
    );
    assert!(!convert.contains("order-safe"), "{convert}");
    let create = help(&["create", "--help"]);
    assert!(
        create.contains("[FILE]") && create.contains("[SIZE]"),
        "{create}"
    );
    assert!(!create.contains("(default raw) [default: raw]"), "{create}");
    let register = help(&["register", "--help"]);
    assert!(!register.contains("-O"), "{register}");
}

/// `sparsify --in-place` on a format diskconv does not change in place says what sparsify
/// cannot do and what to run instead, not a resize error, and leaves the image as it was.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn sparsify_in_place_refusal_says_what_to_run() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("v.vhdx");
    qemu_img(&["create", "-q", "-f", "vhdx", s(&v), "16M"]);
    let before = sha256_file(&v);
    let o = dc(&["sparsify", "--in-place", s(&v)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot sparsify a vhdx image in place"),
        "{err}"
    );
    assert!(err.contains("diskconv sparsify"), "{err}");
    assert!(
        !err.contains("resiz") && !err.contains("target-size"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert_eq!(sha256_file(&v), before);
}
