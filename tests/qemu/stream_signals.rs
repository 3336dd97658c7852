//! Ctrl-C while streaming (issue 14, "Bad input"): SIGINT or SIGTERM in the middle of a
//! conversion into a pipe whose reader has stalled, or into a file, ends the process by
//! that signal (as qemu-img ends), leaves no temporary file and no partial output, and,
//! sent to a whole shell pipeline as a terminal sends Ctrl-C, leaves no process behind.
use crate::common;
use common::*;

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};

/// A 64 GiB sparse source: with `-S 0` every byte is sent, so a conversion runs until it
/// is stopped.
fn big_source(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("big.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(64 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x5a; 1 << 20], 1 << 30).unwrap();
    p
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Output formats whose streams go through the planned writers and the plain ones.
const OUTPUTS: &[&[&str]] = &[
    &["-O", "raw"],
    &["-O", "qcow2"],
    &["-O", "vmdk"],
    &["-O", "vpc"],
    &["-O", "vdi"],
];

#[test]
fn a_signal_mid_stream_ends_the_process_by_that_signal_and_leaves_nothing() {
    let _g = hang_guard("signals while streaming");
    let dir = tempfile::tempdir().unwrap();
    let src = big_source(dir.path());
    for args in OUTPUTS {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let mut child = Command::new(env!("CARGO_BIN_EXE_diskconv"))
                .arg("convert")
                .args(["-S", "0"])
                .args(*args)
                .args([s(&src), "-"])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // Take the first MiB, then stall: the conversion is mid-stream, blocked on
            // the full pipe (the backpressure a slow reader gives).
            let mut out = child.stdout.take().unwrap();
            let mut mib = vec![0u8; 1 << 20];
            out.read_exact(&mut mib).unwrap();
            unsafe { libc::kill(child.id() as i32, sig) };
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            let st = child.wait().unwrap();
            drop(out);
            assert_eq!(st.signal(), Some(sig), "{args:?}: {st:?}, {err}");
            assert!(err.contains("interrupted"), "{args:?}: {err}");
            assert!(err.contains("incomplete"), "{args:?}: {err}");
            assert_eq!(names(dir.path()), vec!["big.raw"], "{args:?} {sig}");
        }
    }
}

#[test]
fn a_signal_mid_conversion_to_a_file_leaves_no_partial_output() {
    let _g = hang_guard("signals while writing a file");
    let dir = tempfile::tempdir().unwrap();
    let src = big_source(dir.path());
    for args in OUTPUTS {
        let dst = dir.path().join("out.img");
        let child = Command::new(env!("CARGO_BIN_EXE_diskconv"))
            .arg("convert")
            .args(["-S", "0"])
            .args(*args)
            .args([s(&src), s(&dst)])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the temporary output holds data: the conversion is under way.
        loop {
            let grown = std::fs::read_dir(dir.path()).unwrap().any(|e| {
                let e = e.unwrap();
                e.file_name().to_string_lossy().ends_with(".tmp")
                    && e.metadata().map(|m| m.len() > 1 << 20).unwrap_or(false)
            });
            if grown {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.signal(), Some(libc::SIGINT), "{args:?}: {err}");
        assert!(err.contains("partial output removed"), "{args:?}: {err}");
        assert_eq!(names(dir.path()), vec!["big.raw"], "{args:?}");
    }
}

/// Live processes (not zombies) whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after ')'.
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let pgrp: i32 = rest[2].parse().unwrap();
        // A zombie has ended; only its reaping is left (to init here).
        if pgrp == pgid && rest[0] != "Z" {
            v.push(pid);
        }
    }
    v
}

#[test]
fn ctrl_c_on_a_pipeline_into_a_slow_reader_stops_every_process() {
    let _g = hang_guard("Ctrl-C on a pipeline");
    let dir = tempfile::tempdir().unwrap();
    let src = big_source(dir.path());
    for (fmt, sig) in [("qcow2", libc::SIGINT), ("raw", libc::SIGTERM)] {
        let marker = dir.path().join("reading");
        // The slow reader takes 1 MiB, says so, then stalls.
        let script = format!(
            "'{}' convert -S 0 -O {fmt} '{}' - 2>/dev/null | \
             {{ head -c 1M >/dev/null; touch '{}'; sleep 600; }}",
            env!("CARGO_BIN_EXE_diskconv"),
            s(&src),
            s(&marker)
        );
        // Its own process group, like a shell job: the signal goes to the whole group,
        // as the terminal sends Ctrl-C.
        let mut sh = Command::new("bash")
            .args(["-c", &script])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = sh.id() as i32;
        while !marker.exists() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(group_members(pgid).len() >= 3, "the pipeline runs");
        unsafe { libc::kill(-pgid, sig) };
        let st = sh.wait().unwrap();
        assert!(!st.success(), "{fmt}: {st:?}");
        // Every member of the job ends (the hang guard bounds the wait; reaped by init
        // once their parent shell is gone).
        while !group_members(pgid).is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::remove_file(&marker).unwrap();
        assert_eq!(names(dir.path()), vec!["big.raw"], "{fmt}");
    }
}
