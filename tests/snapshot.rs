//! qcow2 internal snapshots: `snapshot -l` and `info` list them as qemu-img does, and
//! `convert -l` gives the same bytes as `qemu-img convert -l` for every snapshot, on
//! images whose snapshots were made by `qemu-img snapshot -c` between qemu-io writes.
mod common;
use common::cmms::*;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::Path;

use diskconv::{Format, OpenOptions};

/// An image with three snapshots of different contents and a changed active state.
fn make(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "16M"]);
    qemu_io("qcow2", &img, &["write -P 1 0 1M", "write -P 2 8M 64k"]);
    qemu_img(&["snapshot", "-c", "first", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 3 512k 1M", "write -z 8M 64k"]);
    qemu_img(&["snapshot", "-c", "second one", s(&img)]);
    qemu_io("qcow2", &img, &["write -P 4 15M 1M"]);
    qemu_img(&["snapshot", "-c", "third", s(&img)]);
    qemu_io("qcow2", &img, &["discard 0 2M", "write -P 5 12M 4k"]);
    img
}

fn utc(dir: &Path, prog: &str, args: &[&str]) -> (i32, String, String) {
    std::env::set_var("TZ", "UTC");
    run_in(dir, prog, args)
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn list_and_info_equal_qemu_img() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    make(dir.path());
    let (qc, q, _) = utc(dir.path(), "qemu-img", &["snapshot", "-l", "s.qcow2"]);
    let (dc, d, e) = utc(dir.path(), diskconv(), &["snapshot", "-l", "s.qcow2"]);
    assert_eq!((qc, &q), (dc, &d), "{e}");
    assert_eq!(d.lines().count(), 5, "{d}");
    let (_, q, _) = utc(dir.path(), "qemu-img", &["info", "s.qcow2"]);
    let (_, d, _) = utc(dir.path(), diskconv(), &["info", "s.qcow2"]);
    assert_eq!(q, d);
    let (_, q, _) = utc(
        dir.path(),
        "qemu-img",
        &["info", "--output=json", "s.qcow2"],
    );
    let (_, d, _) = utc(
        dir.path(),
        diskconv(),
        &["info", "--output=json", "s.qcow2"],
    );
    let q: serde_json::Value = serde_json::from_str(&q).unwrap();
    let d: serde_json::Value = serde_json::from_str(&d).unwrap();
    assert_eq!(q["snapshots"], d["snapshots"]);
    assert_eq!(d["snapshots"].as_array().unwrap().len(), 3);
    // An image without snapshots prints nothing, like qemu-img.
    let plain = dir.path().join("p.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&plain), "1M"]);
    let (_, q, _) = utc(dir.path(), "qemu-img", &["snapshot", "-l", "p.qcow2"]);
    let (_, d, _) = utc(dir.path(), diskconv(), &["snapshot", "-l", "p.qcow2"]);
    assert_eq!((q.as_str(), d.as_str()), ("", ""));
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn convert_snapshot_equals_qemu_img() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path());
    let mut digests = Vec::new();
    for sel in [
        "snapshot.name=first",
        "snapshot.id=2",
        "snapshot.name=second one",
        "third",
        "",
    ] {
        let q = dir.path().join("q.raw");
        let d = dir.path().join("d.raw");
        let mut args = vec!["convert", "-O", "raw"];
        if !sel.is_empty() {
            args.extend(["-l", sel]);
        }
        let (qa, da) = (
            [&args[..], &[s(&img), s(&q)]].concat(),
            [&args[..], &[s(&img), s(&d)]].concat(),
        );
        let (qc, _, qe) = run_in(dir.path(), "qemu-img", &qa);
        let (dc, _, de) = run_in(dir.path(), diskconv(), &da);
        assert_eq!((qc, dc), (0, 0), "{sel}: {qe} / {de}");
        assert_eq!(sha256_file(&q), sha256_file(&d), "{sel}");
        digests.push(sha256_file(&d));
    }
    // Every snapshot differs from the others and from the active state.
    let distinct: std::collections::BTreeSet<_> = digests.iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "id=2 is 'second one'; the rest all differ"
    );
    // Through the library too, and an unknown snapshot names the ones there are.
    let opts = OpenOptions::new()
        .format(Format::Qcow2)
        .option("snapshot.name", "first");
    let dev = diskconv::open(&img, &opts).unwrap();
    assert_eq!(sha256_device(dev.as_ref()), digests[0]);
    let bad = OpenOptions::new().option("snapshot.id", "9");
    let e = diskconv::open(&img, &bad)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("second one"), "{e}");
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn hostile_snapshot_tables_are_refused() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path());
    let orig = std::fs::read(&img).unwrap();
    // nb_snapshots (header offset 60) past qemu's limit; the table offset (64) misaligned
    // or past the end; a snapshot's L1 table past the end of the file.
    let table = u64::from_be_bytes(orig[64..72].try_into().unwrap());
    let cases: Vec<(&str, u64, Vec<u8>)> = vec![
        ("limit", 60, 70000u32.to_be_bytes().to_vec()),
        ("aligned", 64, (table + 8).to_be_bytes().to_vec()),
        ("past the end", 64, (1u64 << 40).to_be_bytes().to_vec()),
        ("snapshot", 60, 4000u32.to_be_bytes().to_vec()),
    ];
    for (what, at, bytes) in cases {
        let bad = dir.path().join("bad.qcow2");
        std::fs::write(&bad, &orig).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&bad)
            .unwrap()
            .write_all_at(&bytes, at)
            .unwrap();
        let e = diskconv::open(&bad, &OpenOptions::new())
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains(what), "{what}: {e}");
    }
    let bad = dir.path().join("bad.qcow2");
    std::fs::write(&bad, &orig).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&bad)
        .unwrap()
        .write_all_at(&(1u64 << 40).to_be_bytes(), table)
        .unwrap();
    let opts = OpenOptions::new().option("snapshot.name", "first");
    let e = diskconv::open(&bad, &opts)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("L1 table"), "{e}");
}
