//! Replays every fuzz corpus seed (fuzz/corpus/<target>/) and every crash regression
//! (fuzz/artifacts/<target>/) through the fuzz targets' own entry point, so CI guards
//! them without a fuzzer. The folder name picks the target: probe, raw, qcow2, vhd, vmdk,
//! vdi, vhdx, qcow, qed, guest_scan (the partition table and filesystem scanners) and
//! guest_files (OS inspection and file access) and guest_hive (registry hives).

use std::path::{Path, PathBuf};

use diskconv::Format;

fn target_format(name: &str) -> Option<Option<Format>> {
    match name {
        "probe" => Some(None),
        other => Format::from_name(other).ok().map(Some),
    }
}

fn inputs(root: &Path) -> Vec<(Option<Format>, PathBuf)> {
    let mut out = Vec::new();
    let Ok(dirs) = std::fs::read_dir(root) else {
        return out;
    };
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        let Some(fmt) = target_format(&name) else {
            continue;
        };
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            if f.file_type().is_ok_and(|t| t.is_file()) {
                out.push((fmt, f.path()));
            }
        }
    }
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

#[test]
fn every_fuzz_input_replays_without_panicking() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut all = inputs(&fuzz.join("corpus"));
    let seeds = all.len();
    all.extend(inputs(&fuzz.join("artifacts")));
    assert!(
        seeds > 0,
        "no seeds under {}",
        fuzz.join("corpus").display()
    );
    let mut failed = Vec::new();
    for (fmt, path) in &all {
        let data = std::fs::read(path).unwrap();
        // Every input also goes through the probe target: the probe and inspect must
        // cope with whatever a format's corpus holds.
        for f in [*fmt, None] {
            let r = std::panic::catch_unwind(|| diskconv::fuzzing::exercise(&data, f));
            if r.is_err() {
                failed.push(format!("{} (as {:?})", path.display(), f));
            }
        }
    }
    assert!(failed.is_empty(), "panicked on: {failed:#?}");
    eprintln!("replayed {} inputs ({seeds} seeds)", all.len());
}

#[test]
fn every_guest_scan_input_replays_without_panicking() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut all = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let d = fuzz.join(dir).join("guest_scan");
        for f in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if f.file_type().is_ok_and(|t| t.is_file()) {
                all.push(f.path());
            }
        }
    }
    all.sort();
    assert!(all.len() >= 5, "guest_scan seeds missing: {all:?}");
    let mut failed = Vec::new();
    for path in &all {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| diskconv::fuzzing::exercise_guest_scan(&data)).is_err() {
            failed.push(path.display().to_string());
        }
        // A few deterministic mutations of each seed in its metadata (the first 8 KiB:
        // tables, labels, swap headers, LVM text), as a fuzzer's first steps would be.
        let mut x = 0x2545_f491_4f6c_dd1du64 ^ data.len() as u64;
        for round in 0..200 {
            let mut m = data.clone();
            for _ in 0..1 + round % 4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let span = m.len().clamp(1, 8192);
                if let Some(b) = m.get_mut((x % span as u64) as usize) {
                    *b ^= (x >> 32) as u8 | 1;
                }
            }
            if std::panic::catch_unwind(|| diskconv::fuzzing::exercise_guest_scan(&m)).is_err() {
                failed.push(format!("{} mutation {round}", path.display()));
            }
        }
    }
    assert!(failed.is_empty(), "panicked on: {failed:#?}");
}

#[test]
fn every_guest_files_input_replays_without_panicking() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut all = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let d = fuzz.join(dir).join("guest_files");
        for f in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if f.file_type().is_ok_and(|t| t.is_file()) {
                all.push(f.path());
            }
        }
    }
    all.sort();
    assert!(all.len() >= 3, "guest_files seeds missing: {all:?}");
    let mut failed = Vec::new();
    for path in &all {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| diskconv::fuzzing::exercise_guest_files(&data)).is_err() {
            failed.push(path.display().to_string());
        }
        // Deterministic mutations in the metadata of a small ext filesystem (superblock,
        // group descriptors, bitmaps, inode table, first directory blocks: the first
        // 48 KiB, after a partition table's first 32 KiB when there is one).
        let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ data.len() as u64;
        for round in 0..150 {
            let mut m = data.clone();
            for _ in 0..1 + round % 3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let span = m.len().clamp(1, 80 * 1024);
                if let Some(b) = m.get_mut((x % span as u64) as usize) {
                    *b ^= (x >> 32) as u8 | 1;
                }
            }
            if std::panic::catch_unwind(|| diskconv::fuzzing::exercise_guest_files(&m)).is_err() {
                failed.push(format!("{} mutation {round}", path.display()));
            }
        }
    }
    assert!(failed.is_empty(), "panicked on: {failed:#?}");
}

#[test]
fn every_guest_hive_input_replays_without_panicking() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut all = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let d = fuzz.join(dir).join("guest_hive");
        for f in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if f.file_type().is_ok_and(|t| t.is_file()) {
                all.push(f.path());
            }
        }
    }
    all.sort();
    assert!(all.len() >= 2, "guest_hive seeds missing: {all:?}");
    let mut failed = Vec::new();
    for path in &all {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| diskconv::fuzzing::exercise_hive(&data)).is_err() {
            failed.push(path.display().to_string());
        }
        // Mutations in the cells (past the base block, whose checksum would refuse them).
        let mut x = 0x5851_f42d_4c95_7f2du64 ^ data.len() as u64;
        for round in 0..300 {
            let mut m = data.clone();
            for _ in 0..1 + round % 3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let span = m.len().saturating_sub(4096).max(1);
                if let Some(b) = m.get_mut(4096 + (x % span as u64) as usize) {
                    *b ^= (x >> 32) as u8 | 1;
                }
            }
            if std::panic::catch_unwind(|| diskconv::fuzzing::exercise_hive(&m)).is_err() {
                failed.push(format!("{} mutation {round}", path.display()));
            }
        }
    }
    assert!(failed.is_empty(), "panicked on: {failed:#?}");
}
