//! Crash safety of the commands that change an image in place besides resize and snapshot
//! (tests/qemu/resize_crash.rs, tests/qemu/snapshot_crash.rs): `convert -n` into qcow2,
//! vpc, vdi and vmdk, and `sparsify --in-place` on the same four, each run in the real
//! binary under strace, killed (SIGKILL) or failed (ENOSPC, EIO) at the Nth pwrite64,
//! ftruncate, fallocate and fsync.
//!
//! Neither command is one transaction: `convert -n` overwrites the guest's data as it
//! goes, as `qemu-img convert -n` and `dd` do, and a large discard commits in several
//! transactions. What a fault may leave is therefore judged per sector, and the metadata
//! whole. After each fault:
//! - `qemu-img check` finds no corruption (leaked clusters are allowed), nor does our
//!   `check`, which counts a leak wherever qemu-img does (vpc, which qemu-img cannot
//!   check, by ours alone);
//! - every 512-byte sector of the guest reads, through qemu-img and through our reader
//!   alike, either as before the command or as after it;
//! - the same command run again completes, the image then reads exactly as after, and
//!   `check -r leaks` leaves it clean by both checkers.
//!
//! Every fault point is tried: 447 faulted runs, about 40 s (2026-12-07).

use crate::common;

use std::io::Read;
use std::path::Path;
use std::process::Command;

use common::crash::{self, have_strace};
use common::discard::{make, qemu_check};
use common::*;
use diskconv::Format;

const SECTOR: usize = 512;
const CALLS: [&str; 4] = ["pwrite64", "ftruncate", "fallocate", "fsync"];

/// The guest bytes of `img` as qemu-img reads them, and as our reader does (which must
/// agree).
fn guest_both(img: &Path, fmt: &str, scratch: &Path) -> Vec<u8> {
    let theirs = common::discard::guest(img, fmt, scratch);
    let dev = diskconv::open(img, &diskconv::OpenOptions::new()).unwrap();
    let mut ours = Vec::new();
    diskconv::DeviceReader::new(dev)
        .read_to_end(&mut ours)
        .unwrap();
    assert!(
        theirs == ours,
        "{}: qemu-img and diskconv read it differently",
        img.display()
    );
    theirs
}

/// The sector indexes where `got` is neither `before` nor `after`.
fn torn_sectors(got: &[u8], before: &[u8], after: &[u8]) -> Vec<usize> {
    assert_eq!(got.len(), before.len());
    (0..got.len() / SECTOR)
        .filter(|&i| {
            let r = i * SECTOR..(i + 1) * SECTOR;
            got[r.clone()] != before[r.clone()] && got[r.clone()] != after[r]
        })
        .collect()
}

/// One in-place command on a copy of `orig` (a `fmt` image), swept: returns the faulted
/// runs. `args` holds the command with `WORK` standing for the image it changes.
fn sweep_case(orig: &Path, fmt: &str, args: &[&str], dir: &Path) -> usize {
    let work = dir.join(format!("work.{fmt}"));
    let scratch = dir.join("scratch.raw");
    let cmd: Vec<String> = args
        .iter()
        .map(|a| {
            if *a == "WORK" {
                s(&work).to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let run_clean = || {
        let o = Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .args(&cmd)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let before = guest_both(orig, fmt, &scratch);
    std::fs::copy(orig, &work).unwrap();
    run_clean();
    let after = guest_both(&work, fmt, &scratch);
    assert_ne!(before, after, "{cmd:?} changed nothing");
    let checkable = fmt != "vpc"; // qemu-img has no check for vpc
    let reset = || {
        std::fs::copy(orig, &work).unwrap();
    };
    crash::sweep(&CALLS, 2000, &cmd, reset, |f, o, stopped| {
        let what = format!("{fmt} {args:?}: {} at {} #{}", f.fault, f.call, f.n);
        if !checkable {
            // Ours alone (qemu-img has no vpc check): no corruption.
            let ours = our_check_with(&work, fmt, &[]).0;
            assert!(matches!(ours, 0 | 3), "{what}: our check exits {ours}");
        }
        if checkable {
            let (corrupt, leaks) = qemu_check(&work, fmt);
            assert_eq!(corrupt, 0, "{what}");
            // Ours finds no corruption either, and a leak wherever qemu-img does; it may
            // count one qemu-img does not look for (a vmdk's redundant grain table left
            // behind by a cut-off change, told from damage by the header's
            // uncleanShutdown flag the change set).
            let ours = our_check_with(&work, fmt, &[]).0;
            assert!(
                ours == 3 || (ours == 0 && leaks == 0),
                "{what}: our check exits {ours}, qemu-img counts {leaks} leaks"
            );
        }
        let got = guest_both(&work, fmt, &scratch);
        let torn = torn_sectors(&got, &before, &after);
        assert!(
            torn.is_empty(),
            "{what}: {} sectors read neither as before nor as after, the first {}; {}",
            torn.len(),
            torn[0],
            String::from_utf8_lossy(&o.stderr)
        );
        if stopped {
            // Run again, it completes; then `check -r leaks` leaves the image clean.
            run_clean();
            assert!(guest_both(&work, fmt, &scratch) == after, "{what}: rerun");
            if !checkable {
                assert!(
                    matches!(our_check_with(&work, fmt, &["-r", "leaks"]).0, 0 | 3),
                    "{what}"
                );
                assert_eq!(
                    our_check_with(&work, fmt, &[]).0,
                    0,
                    "{what}: after check -r leaks"
                );
            }
            if checkable {
                assert_eq!(qemu_check(&work, fmt).0, 0, "{what}: rerun");
                assert!(
                    matches!(our_check_with(&work, fmt, &["-r", "leaks"]).0, 0 | 3),
                    "{what}"
                );
                assert_eq!(
                    our_check_with(&work, fmt, &[]).0,
                    0,
                    "{what}: after check -r leaks"
                );
                assert_eq!(
                    qemu_check(&work, fmt),
                    (0, 0),
                    "{what}: after check -r leaks"
                );
                assert!(
                    guest_both(&work, fmt, &scratch) == after,
                    "{what}: repaired"
                );
            }
        } else {
            assert!(got == after, "{what}");
        }
    })
}

const TARGETS: [(&str, &str); 4] = [
    ("qcow2", "cluster_size=65536"),
    ("vpc", "subformat=dynamic"),
    ("vdi", ""),
    ("vmdk", ""),
];

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
#[cfg_attr(
    all(no_strace, not(no_qemu)),
    ignore = "needs strace: apt-get install strace"
)]
fn convert_n_killed_or_failed_at_any_write_leaves_each_sector_before_or_after() {
    if !have_qemu() || !have_qemu_io() || !have_strace() {
        return;
    }
    let _guard = hang_guard("convert -n crash sweep");
    let mut runs = 0;
    for (fmt, opts) in TARGETS {
        let dir = tempfile::tempdir().unwrap();
        // The target: 64 KiB written every 192 KiB (some clusters stay unallocated).
        let writes: Vec<(u8, u64, u64)> = (0..16u64)
            .map(|i| (((7 + i) % 250 + 1) as u8, i * (192 << 10), 64 << 10))
            .collect();
        let o: &[&str] = if opts.is_empty() { &[] } else { &["-o", opts] };
        let target = make(
            dir.path(),
            &format!("target.{fmt}"),
            fmt,
            o,
            3 << 20,
            &writes,
        );
        // The source: other data over the target's whole size, a zero run in between.
        let size = qemu_info(&target, Format::from_name(fmt).unwrap())["virtual-size"]
            .as_u64()
            .unwrap();
        let src = dir.path().join("src.raw");
        let mut data = vec![0u8; size as usize];
        Rng(11).fill(&mut data);
        data[size as usize / 3..size as usize / 2].fill(0);
        std::fs::write(&src, &data).unwrap();
        let args = ["convert", "-n", "-f", "raw", "-O", fmt, s(&src), "WORK"];
        let n = sweep_case(&target, fmt, &args, dir.path());
        eprintln!("convert -n into {fmt}: {n} faulted runs");
        assert!(n >= 12, "{fmt}: {n} runs");
        runs += n;
    }
    assert!(runs >= 48, "{runs} runs");
}

#[test]
#[cfg_attr(
    any(no_qemu, no_e2fsprogs),
    ignore = "needs qemu-img and e2fsprogs: apt-get install qemu-utils e2fsprogs"
)]
#[cfg_attr(
    all(no_strace, not(any(no_qemu, no_e2fsprogs))),
    ignore = "needs strace: apt-get install strace"
)]
fn sparsify_in_place_killed_or_failed_at_any_write_leaves_each_sector_before_or_after() {
    if !have_qemu() || !have_strace() {
        return;
    }
    let _guard = hang_guard("sparsify --in-place crash sweep");
    let mut runs = 0;
    for (fmt, opts) in TARGETS {
        let dir = tempfile::tempdir().unwrap();
        // An ext4 over junk: its free blocks hold data sparsify drops.
        let raw = dir.path().join("fs.raw");
        common::sparsify::junk_disk(&raw, 8 << 20, 5);
        run(&[
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "nodiscard",
            "-b",
            "4096",
            s(&raw),
        ]);
        let img = dir.path().join(format!("orig.{fmt}"));
        let mut args = vec!["convert", "-q", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&raw), s(&img)]);
        qemu_img(&args);
        let n = sweep_case(
            &img,
            fmt,
            &["sparsify", "--in-place", "-f", fmt, "WORK"],
            dir.path(),
        );
        eprintln!("sparsify --in-place {fmt}: {n} faulted runs");
        assert!(n >= 12, "{fmt}: {n} runs");
        runs += n;
    }
    assert!(runs >= 48, "{runs} runs");
}
