//! Crash safety of `diskconv snapshot -c/-d/-a`, proven on the real binary: strace kills
//! the process (SIGKILL, as kill -9 or a power cut would stop it) or fails the call
//! (ENOSPC, EIO) at the Nth pwrite64, ftruncate, fallocate (the holes punched where
//! freed clusters were) or fsync, for every N of a whole
//! operation. After each, `qemu-img check` must find the image clean (each operation is
//! one transaction switched by one header write: not even a leak) and qemu-img must see
//! it wholly as before or wholly as after: guest size and content, the snapshot list and
//! every snapshot's content. The library's fault hook covers the same ground in
//! tests/qemu/snapshot.rs; this covers the binary, its lock, and a kill mid-operation.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::cmms::qemu_io;
use common::crash::{self, have_strace};
use common::snapshot::{check_counts, State};
use common::*;

/// Sweep every call of `snapshot ARGS` on a copy of `orig`; returns the faulted runs.
fn sweep(orig: &Path, args: &[&str], dir: &Path) -> usize {
    let before = State::of(orig);
    let work = dir.join("work.qcow2");
    std::fs::copy(orig, &work).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .arg("snapshot")
        .args(args)
        .arg(&work)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let after = State::of(&work);
    assert_ne!(before, after, "{args:?}");
    let mut cmd = vec!["snapshot".to_string()];
    cmd.extend(args.iter().map(|a| a.to_string()));
    cmd.push(s(&work).to_string());
    let calls = ["pwrite64", "ftruncate", "fallocate", "fsync"];
    let reset = || {
        std::fs::copy(orig, &work).unwrap();
    };
    crash::sweep(&calls, 100, &cmd, reset, |f, o, stopped| {
        let what = format!(
            "{} {args:?}: {} at {} #{}",
            orig.display(),
            f.fault,
            f.call,
            f.n
        );
        let stderr = String::from_utf8_lossy(&o.stderr);
        if stopped && f.fault != "signal=KILL" {
            // A failed call is reported, naming the image and the operation.
            assert!(stderr.contains("work.qcow2"), "{what}: {stderr}");
            assert!(stderr.contains("Could not"), "{what}: {stderr}");
        }
        assert_eq!(check_counts(&work), (0, 0, 0), "{what}");
        let got = State::of(&work);
        assert!(
            got == before || got == after,
            "{what}: the image is neither as before nor as after: {got:?}"
        );
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
fn a_snapshot_operation_killed_or_failed_at_any_write_leaves_before_or_after() {
    if !have_qemu() || !have_qemu_io() || !have_strace() {
        return;
    }
    let _guard = hang_guard("snapshot crash sweep");
    let mut runs = 0;
    for opts in ["cluster_size=4096", "compat=0.10,cluster_size=512"] {
        let dir = tempfile::tempdir().unwrap();
        let orig = dir.path().join("orig.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&orig), "1M"]);
        qemu_io("qcow2", &orig, &["write -P 1 0 64k", "write -P 2 512k 8k"]);
        // One snapshot by qemu-img, one by us, and a changed active content.
        qemu_img(&["snapshot", "-c", "one", s(&orig)]);
        if !opts.contains("compat=0.10") {
            // Applying "one" then also changes the guest size back.
            qemu_img(&["resize", "-q", s(&orig), "2M"]);
        }
        qemu_io("qcow2", &orig, &["write -P 3 4k 8k"]);
        let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .args(["snapshot", "-c", "two", s(&orig)])
            .output()
            .unwrap();
        assert!(o.status.success());
        qemu_io("qcow2", &orig, &["write -P 4 8k 8k"]);
        for args in [&["-c", "three"][..], &["-d", "one"], &["-a", "one"]] {
            let n = sweep(&orig, args, dir.path());
            eprintln!("{opts} {args:?}: {n} faulted runs");
            // Each operation has at least one call of each kind to fail.
            assert!(n >= 12, "{opts} {args:?}: {n} runs");
            runs += n;
        }
    }
    assert!(runs >= 72, "{runs} runs");
}
