//! The command line: qemu-img-compatible flags, one-line errors, non-zero exits.
mod common;
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
