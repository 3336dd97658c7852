//! Crash safety of `diskconv resize`, proven on the real binary: strace kills the process
//! (SIGKILL, as kill -9 or a power cut would stop it) or fails the call (ENOSPC, EIO) at
//! the Nth pwrite64, ftruncate or fsync, for every N of a whole resize. After each, the
//! image must pass `qemu-img check` (where qemu-img checks the format) and read exactly as
//! before or exactly as after. The in-library sweeps (`fail_at_write`) cover the same
//! ground per format; this one covers the binary, its lock, and a kill mid-operation.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::crash::{self, have_strace};
use common::*;
use diskconv::Format;

/// The image's guest bytes and size, as qemu-img reads them.
fn guest(img: &Path, fmt: &str, to: &Path) -> (u64, Vec<u8>) {
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(img), s(to)]);
    let b = std::fs::read(to).unwrap();
    (b.len() as u64, b)
}

struct Case {
    fmt: &'static str,
    create: &'static [&'static str],
    size: u64,
    new_size: &'static str,
    shrink: bool,
}

fn sweep(case: &Case, dir: &Path) -> usize {
    let f = Format::from_name(case.fmt).unwrap();
    let raw = dir.join("g.raw");
    make_raw(&raw, case.size, 5);
    let orig = dir.join(format!("orig.{}", case.fmt));
    let mut args = vec!["convert", "-f", "raw", "-O", case.fmt];
    args.extend(case.create);
    args.extend([s(&raw), s(&orig)]);
    qemu_img(&args);
    let scratch = dir.join("scratch.raw");
    let before = guest(&orig, case.fmt, &scratch);

    let resize_args = |img: &PathBuf| {
        let mut a = vec!["resize".to_string(), "-f".into(), case.fmt.into()];
        if case.shrink {
            a.push("--shrink".into());
        }
        a.push(s(img).into());
        a.push(case.new_size.into());
        a
    };
    // The expected "after", from an undisturbed run.
    let work: PathBuf = dir.join(format!("work.{}", case.fmt));
    std::fs::copy(&orig, &work).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(resize_args(&work))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = guest(&work, case.fmt, &scratch);
    assert_ne!(before.0, after.0);

    let reset = || {
        std::fs::copy(&orig, &work).unwrap();
    };
    let calls = ["pwrite64", "ftruncate", "fsync"];
    crash::sweep(&calls, 500, &resize_args(&work), reset, |fl, o, stopped| {
        let what = format!(
            "{} {}: {} at {} #{}",
            case.fmt,
            case.create.join(" "),
            fl.fault,
            fl.call,
            fl.n
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        if stopped && fl.fault != "signal=KILL" {
            // A failed call is reported, naming the image.
            assert!(stderr.contains("work."), "{what}: {stderr}");
        }
        if matches!(case.fmt, "qcow2" | "vdi" | "vmdk") {
            assert_qemu_check_clean(&work, f);
        }
        let got = guest(&work, case.fmt, &scratch);
        assert!(
            got == before || got == after,
            "{what}: the image reads as neither before ({} bytes) nor after ({} bytes) but {} bytes",
            before.0,
            after.0,
            got.0
        );
        // Our own reader agrees with qemu-img's.
        assert_eq!(open_as(&work, f).virtual_size(), got.0, "{what}");
        if !stopped {
            // The Nth call never came: every call of the run has been tried.
            assert!(got == after, "{what}");
        }
    })
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
#[cfg_attr(
    all(no_strace, not(no_qemu)),
    ignore = "needs strace: apt-get install strace"
)]
fn a_resize_killed_or_failed_at_any_write_leaves_before_or_after() {
    if !have_qemu() || !have_strace() {
        return;
    }
    let _guard = hang_guard("crash sweep");
    let cases = [
        // L1 table must move (512 B clusters: one L1 entry covers 32 KiB).
        Case {
            fmt: "qcow2",
            create: &["-o", "cluster_size=512"],
            size: 1 << 20,
            new_size: "64M",
            shrink: false,
        },
        Case {
            fmt: "qcow2",
            create: &["-o", "cluster_size=4096,compat=0.10"],
            size: 2 << 20,
            new_size: "1M",
            shrink: true,
        },
        // The block map grows past the first data block, which must move.
        Case {
            fmt: "vdi",
            create: &[],
            size: 3 << 20,
            new_size: "300M",
            shrink: false,
        },
        Case {
            fmt: "vpc",
            create: &["-o", "subformat=dynamic"],
            size: 3 << 20,
            new_size: "300M",
            shrink: false,
        },
        Case {
            fmt: "vpc",
            create: &["-o", "subformat=fixed"],
            size: 1 << 20,
            new_size: "3M",
            shrink: false,
        },
        Case {
            fmt: "vmdk",
            create: &[],
            size: 2 << 20,
            new_size: "1G",
            shrink: false,
        },
        Case {
            fmt: "raw",
            create: &[],
            size: 1 << 20,
            new_size: "2M",
            shrink: false,
        },
    ];
    let mut runs = 0;
    for case in &cases {
        let dir = tempfile::tempdir().unwrap();
        let n = sweep(case, dir.path());
        eprintln!("{} {:?}: {n} faulted runs", case.fmt, case.create);
        runs += n;
    }
    // Every case has at least one call of each kind to fail, so the sweep did work.
    assert!(runs >= cases.len() * 9, "{runs} runs");
}
