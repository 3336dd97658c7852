//! qcow2 internal snapshots: `snapshot -l` and `info` list them as qemu-img does, and
//! `convert -l` gives the same bytes as `qemu-img convert -l` for every snapshot, on
//! images whose snapshots were made by `qemu-img snapshot -c` between qemu-io writes.
//! `snapshot -c/-d/-a` change an image as qemu-img's do (same list, same contents, a clean
//! `qemu-img check`), in either tool's turn, with qemu-img's messages and exit codes, and
//! leave the image as before or as after when any of their writes fails.
use crate::common;
use common::cmms::*;
use common::snapshot::*;
use common::*;

use std::os::unix::fs::FileExt;
use std::path::Path;

use diskconv::{Format, OpenOptions, SnapshotOp, SnapshotSel};

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

/// One step of a scenario: a `snapshot` operation (its flags) or guest writes (qemu-io).
enum Step {
    Op(&'static [&'static str]),
    Io(&'static [&'static str]),
    /// `qemu-img resize` with these flags and size (qemu 5+ resizes images with snapshots,
    /// but for v2 images), so a snapshot's size differs from the active one's.
    Resize(&'static [&'static str]),
}

/// Run `snapshot ARGS IMG` with our binary: silent, exit 0.
fn ours(img: &Path, args: &[&str]) {
    let o = std::process::Command::new(diskconv())
        .arg("snapshot")
        .args(args)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "diskconv snapshot {args:?} {}: {:?} {}{}",
        img.display(),
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn theirs(img: &Path, args: &[&str]) {
    let mut a = vec!["snapshot"];
    a.extend(args);
    a.push(s(img));
    qemu_img(&a);
}

/// Every operation and its cases (duplicate names, apply by ID and by name, deleting the
/// first of two equal names, back to no snapshots) on every kind of image, by qemu-img
/// alone, by us alone, and by the two taking turns both ways: after each step every image
/// is clean by `qemu-img check` and lists and holds what qemu-img's own does.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn create_delete_apply_equal_qemu_img_in_either_turn() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let steps = [
        Step::Op(&["-c", "one"]),
        Step::Io(&["write -P 21 16k 8k", "write -P 22 900k 8k"]),
        Step::Op(&["-c", "two"]),
        Step::Resize(&["+1M"]),
        Step::Io(&["write -z 0 8k", "discard 512k 64k"]),
        Step::Op(&["-c", "one"]),
        // By name: the first "one", of the smaller size.
        Step::Op(&["-a", "one"]),
        Step::Io(&["write -P 23 24k 4k"]),
        Step::Op(&["-d", "two"]),
        // By ID: the second "one", of the larger size.
        Step::Op(&["-a", "3"]),
        Step::Op(&["-d", "one"]),
        Step::Op(&["-c", "four"]),
        Step::Resize(&["--shrink", "768k"]),
        Step::Op(&["-d", "one"]),
        Step::Op(&["-a", "four"]),
        Step::Op(&["-d", "four"]),
    ];
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let dir = tempfile::tempdir().unwrap();
    for (label, img) in variants(dir.path()) {
        // q: qemu-img alone; d: us alone; m0/m1: ours on even/odd operations.
        let copy = |n: &str| {
            let p = img.with_file_name(format!(
                "{n}-{}",
                img.file_name().unwrap().to_str().unwrap()
            ));
            std::fs::copy(&img, &p).unwrap();
            p
        };
        let (q, d, m0, m1) = (copy("q"), copy("d"), copy("m0"), copy("m1"));
        let mut k = 0;
        for (i, step) in steps.iter().enumerate() {
            match step {
                Step::Io(cmds) => {
                    for p in [&q, &d, &m0, &m1] {
                        qemu_io("qcow2", p, cmds);
                    }
                    continue;
                }
                Step::Resize(args) => {
                    for p in [&q, &d, &m0, &m1] {
                        let mut a = vec!["resize", "-q", "-f", "qcow2"];
                        a.extend(&args[..args.len() - 1]);
                        a.extend([s(p), args[args.len() - 1]]);
                        let (c, _, e) = run_in(dir.path(), "qemu-img", &a);
                        assert!(c == 0 || e.contains("v2 image"), "{label}: {e}");
                    }
                    continue;
                }
                Step::Op(args) => {
                    theirs(&q, args);
                    ours(&d, args);
                    if k % 2 == 0 {
                        ours(&m0, args);
                        theirs(&m1, args);
                    } else {
                        theirs(&m0, args);
                        ours(&m1, args);
                    }
                    k += 1;
                }
            }
            let want = State::of(&q);
            for p in [&d, &m0, &m1] {
                let what = format!("{label}, step {i} on {}", p.display());
                assert_eq!(check_counts(p), (0, 0, 0), "{what}");
                assert_eq!(State::of(p), want, "{what}");
            }
            // Our dates are the clock's, as qemu-img's.
            let v = qemu_info(&d, Format::Qcow2);
            for sn in v["snapshots"].as_array().into_iter().flatten() {
                let t = sn["date-sec"].as_u64().unwrap();
                assert!(t + 5 >= t0 && t <= t0 + 3600, "{label}: date {t}");
            }
        }
        assert!(listing(&d).1.is_empty(), "{label}");
    }
}

/// A freshly made snapshot lists as qemu-img's (ID, name cut to 255 bytes as qemu's,
/// VM state, clock, icount) and `convert -l` gives the content at its creation.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn created_snapshots_list_and_convert_as_qemu_img_s() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path());
    let q = dir.path().join("q.qcow2");
    std::fs::copy(&img, &q).unwrap();
    let long = "n".repeat(300);
    let before = content(&img, None);
    for p in [&img, &q] {
        qemu_io("qcow2", p, &["write -P 9 4M 64k"]);
    }
    let at_creation = content(&img, None);
    assert_ne!(before, at_creation);
    ours(&img, &["-c", &long]);
    theirs(&q, &["-c", &long]);
    for p in [&img, &q] {
        qemu_io("qcow2", p, &["write -P 10 4M 64k"]);
    }
    assert_eq!(listing(&img), listing(&q));
    assert_eq!(listing(&img).1[3]["name"].as_str().unwrap().len(), 255);
    assert_eq!(content(&img, Some("4")), at_creation);
    let (_, l, _) = utc(dir.path(), "qemu-img", &["snapshot", "-l", "s.qcow2"]);
    let (_, ql, _) = utc(dir.path(), "qemu-img", &["snapshot", "-l", "q.qcow2"]);
    // The text too, but the date column.
    let cut = |t: &str| -> Vec<String> {
        t.lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                if w.len() >= 7 {
                    format!("{} {} {} {} {} {}", w[0], w[1], w[2], w[3], w[6], w[7])
                } else {
                    l.to_string()
                }
            })
            .collect()
    };
    assert_eq!(cut(&l), cut(&ql));
    assert_eq!(check_counts(&img), (0, 0, 0));
}

/// Refusals and misses: the same exit code as qemu-img and its words in the message, and
/// the image not touched.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn errors_and_exit_codes_are_qemu_img_s() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let img = make(d);
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["-d", "nope"], "s.qcow2"),
        (vec!["-a", "nope"], "s.qcow2"),
        // qemu-img deletes by name only: "1" is an ID here, not a name.
        (vec!["-d", "1"], "s.qcow2"),
        (vec!["-l", "-c", "x"], "s.qcow2"),
        (vec!["-d", "x", "-a", "y"], "s.qcow2"),
        (vec!["-U", "-c", "x"], "s.qcow2"),
    ];
    for fmt in ["raw", "vmdk", "vdi", "vpc"] {
        let f = format!("i.{fmt}");
        qemu_img(&["create", "-q", "-f", fmt, s(&d.join(&f)), "1M"]);
        let f: &'static str = Box::leak(f.into_boxed_str());
        let fmt: &'static str = Box::leak(fmt.to_string().into_boxed_str());
        for op in ["-c", "-a", "-d"] {
            cases.push((vec!["-f", fmt, op, "x"], f));
        }
    }
    for (args, file) in cases {
        let p = d.join(file);
        let orig = std::fs::read(&p).unwrap();
        let mut a = vec!["snapshot"];
        a.extend(&args);
        a.push(file);
        let (qc, _, qe) = run_in(d, "qemu-img", &a);
        // qemu-img's failures change nothing either; ours must not.
        std::fs::write(&p, &orig).unwrap();
        let (dc, dout, de) = run_in(d, diskconv(), &a);
        assert_eq!((qc, dc), (1, 1), "{a:?}: {qe} / {de}");
        assert!(dout.is_empty(), "{a:?}: {dout}");
        let words = qe.lines().next().unwrap().trim_start_matches("qemu-img: ");
        assert!(
            de.contains(words),
            "{a:?}: qemu-img says {words:?}, we {de:?}"
        );
        assert!(std::fs::read(&p).unwrap() == orig, "{a:?} changed {file}");
    }
    // What qemu-img cannot do: delete by ID, with the keys convert -l takes.
    let (c, _, e) = run_in(
        d,
        diskconv(),
        &["snapshot", "-d", "snapshot.id=1", "s.qcow2"],
    );
    assert_eq!(c, 0, "{e}");
    let ids: Vec<String> = listing(&img)
        .1
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["2", "3"]);
    assert_eq!(check_counts(&img), (0, 0, 0));
}

/// Where qemu-img fails half way (1-bit refcounts cannot count a shared cluster; it
/// leaks one), we refuse before writing; applying with persistent bitmaps is refused as
/// by qemu-img, while creating and deleting keep the bitmaps whole.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn what_cannot_be_done_is_refused_before_any_write() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let one = d.join("r1.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "refcount_bits=1",
        s(&one),
        "1M",
    ]);
    qemu_io("qcow2", &one, &["write -P 1 0 64k"]);
    let orig = std::fs::read(&one).unwrap();
    let (c, _, e) = run_in(d, diskconv(), &["snapshot", "-c", "x", "r1.qcow2"]);
    assert_eq!(c, 1);
    assert!(
        e.contains("Could not create snapshot 'x': Invalid argument"),
        "{e}"
    );
    assert!(e.contains("1-bit refcounts"), "{e}");
    assert!(std::fs::read(&one).unwrap() == orig);
    assert_eq!(check_counts(&one), (0, 0, 0));

    let bm = d.join("bm.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&bm), "1M"]);
    qemu_io("qcow2", &bm, &["write -P 2 0 64k"]);
    qemu_img(&["bitmap", "--add", s(&bm), "b0"]);
    ours(&bm, &["-c", "s"]);
    qemu_io("qcow2", &bm, &["write -P 3 0 64k"]);
    let (qc, _, qe) = run_in(d, "qemu-img", &["snapshot", "-a", "s", "bm.qcow2"]);
    // (qemu-img's open and close rewrite the bitmap directory: compare from here.)
    let orig = std::fs::read(&bm).unwrap();
    let (dc, _, de) = run_in(d, diskconv(), &["snapshot", "-a", "s", "bm.qcow2"]);
    assert_eq!((qc, dc), (1, 1));
    assert!(qe.contains("Device has active dirty bitmaps"), "{qe}");
    assert!(
        de.contains("Could not apply snapshot 's': Device has active dirty bitmaps"),
        "{de}"
    );
    assert!(std::fs::read(&bm).unwrap() == orig);
    ours(&bm, &["-d", "s"]);
    assert_eq!(check_counts(&bm), (0, 0, 0));
    let v = qemu_info(&bm, Format::Qcow2);
    assert_eq!(
        v["format-specific"]["data"]["bitmaps"][0]["name"], "b0",
        "{v}"
    );

    // An external data file, an encrypted image, one marked dirty: refused, untouched.
    // (Made in its folder: qemu-img puts a relative data file in the working directory.)
    let df = d.join("df.qcow2");
    let (c, _, e) = run_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=df.raw",
            "df.qcow2",
            "1M",
        ],
    );
    assert_eq!(c, 0, "{e}");
    assert!(d.join("df.raw").exists());
    // (qemu-img's LUKS set-up takes seconds: the old AES method in the header will do.)
    let enc = d.join("enc.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&enc), "1M"]);
    let mut f = std::fs::read(&enc).unwrap();
    f[35] = 1;
    std::fs::write(&enc, &f).unwrap();
    let dirty = d.join("dirty.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        s(&dirty),
        "1M",
    ]);
    let mut f = std::fs::read(&dirty).unwrap();
    f[79] |= 1;
    std::fs::write(&dirty, &f).unwrap();
    for (p, words) in [
        (&df, "external data file"),
        (&enc, "encrypted"),
        (&dirty, "marked dirty"),
    ] {
        let orig = std::fs::read(p).unwrap();
        for op in ["-c", "-d", "-a"] {
            let (c, _, e) = run_in(d, diskconv(), &["snapshot", op, "x", s(p)]);
            assert_eq!(c, 1, "{}", p.display());
            assert!(e.contains("snapshot 'x'") && e.contains(words), "{e}");
            assert!(std::fs::read(p).unwrap() == orig);
        }
    }
}

/// The library's fault hook fails each write of each operation in turn, on several kinds
/// of image: every time the image is clean by `qemu-img check` (not even a leak) and is
/// wholly as before or wholly as after — guest, size, snapshot list and each snapshot's
/// content.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn a_failure_at_any_write_leaves_the_image_before_or_after() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let all = variants(dir.path());
    for (label, img) in all.into_iter().filter(|(l, _)| {
        matches!(
            *l,
            "v2 512" | "compressed 4k" | "extended L2 128k" | "v3 64k"
        )
    }) {
        // Two snapshots, different from each other and from the active content, and
        // (v3) of different sizes, so applying "one" changes the size back.
        theirs(&img, &["-c", "one"]);
        if label != "v2 512" {
            qemu_img(&["resize", "-q", "-f", "qcow2", s(&img), "+1M"]);
        }
        qemu_io("qcow2", &img, &["write -P 31 0 8k"]);
        ours(&img, &["-c", "two"]);
        qemu_io("qcow2", &img, &["write -P 32 4k 8k"]);
        let before = State::of(&img);
        for op in [
            SnapshotOp::Create("three"),
            SnapshotOp::Delete(SnapshotSel::Name("one")),
            SnapshotOp::Apply(SnapshotSel::IdOrName("one")),
        ] {
            let work = img.with_file_name("work.qcow2");
            std::fs::copy(&img, &work).unwrap();
            diskconv::snapshot_edit(&work, Some(Format::Qcow2), &op, None).unwrap();
            let after = State::of(&work);
            let mut n = 1;
            loop {
                std::fs::copy(&img, &work).unwrap();
                let r = diskconv::snapshot_edit(&work, Some(Format::Qcow2), &op, Some(n));
                let what = format!("{label}: {op:?} failing write {n}");
                assert_eq!(check_counts(&work), (0, 0, 0), "{what}");
                // (The states leave dates out: they differ run to run.)
                let got = State::of(&work);
                assert!(got == before || got == after, "{what}: {got:?}");
                match r {
                    Ok(()) => {
                        assert_eq!(got, after, "{what}");
                        break;
                    }
                    Err(e) => {
                        assert!(e.to_string().contains("test hook"), "{what}: {e}");
                        assert!(e.to_string().contains("snapshot"), "{what}: {e}");
                    }
                }
                n += 1;
                assert!(n < 100, "{what}: the hook never stopped failing");
            }
            // Tables, flush, header, flush at the least.
            assert!(n >= 4, "{label}: {op:?} made only {n} writes");
        }
    }
}

/// One snapshot table entry as stored: the fixed 40 bytes, extra data, ID, name.
#[derive(Debug, Clone, PartialEq)]
struct RawEntry {
    fixed: Vec<u8>,
    extra: Vec<u8>,
    id: Vec<u8>,
    name: Vec<u8>,
}

fn be32(b: &[u8]) -> usize {
    u32::from_be_bytes(b[..4].try_into().unwrap()) as usize
}

/// The snapshot table of `img`, entry by entry, and where it is.
fn raw_table(img: &Path) -> (u64, Vec<RawEntry>) {
    let f = std::fs::read(img).unwrap();
    let n = be32(&f[60..]);
    let off = u64::from_be_bytes(f[64..72].try_into().unwrap());
    let mut p = off as usize;
    let mut out = Vec::new();
    for _ in 0..n {
        p = p.next_multiple_of(8);
        let fixed = f[p..p + 40].to_vec();
        let ne = be32(&fixed[36..]);
        let ni = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
        let nn = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let mut q = p + 40;
        let extra = f[q..q + ne].to_vec();
        q += ne;
        let id = f[q..q + ni].to_vec();
        let name = f[q + ni..q + ni + nn].to_vec();
        p = q + ni + nn;
        out.push(RawEntry {
            fixed,
            extra,
            id,
            name,
        });
    }
    (off, out)
}

/// The entries with what differs between qemu-img's run and ours left out: where the
/// snapshot's L1 table is (qemu copies the active one, we hand it over) and the date.
fn comparable(t: &[RawEntry]) -> Vec<RawEntry> {
    t.iter()
        .map(|e| {
            let mut e = e.clone();
            e.fixed[0..8].fill(0);
            e.fixed[16..24].fill(0);
            e
        })
        .collect()
}

/// Entries written by older qemu (16 bytes of extra data: no icount) and by a newer one
/// (extra data qemu does not know) are rewritten exactly as qemu-img rewrites them when a
/// snapshot is created or deleted: the known fields completed, the unknown bytes kept.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn old_and_unknown_extra_data_is_rewritten_as_qemu_img_does() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = make(dir.path());
    let (off, mut t) = raw_table(&img);
    assert_eq!(t.len(), 3);
    t[0].extra.truncate(16);
    t[2].extra.extend_from_slice(b"unknown 16 bytes");
    let mut b = Vec::new();
    for e in &mut t {
        b.resize(b.len().next_multiple_of(8), 0);
        let n = e.extra.len() as u32;
        e.fixed[36..40].copy_from_slice(&n.to_be_bytes());
        b.extend_from_slice(&e.fixed);
        b.extend_from_slice(&e.extra);
        b.extend_from_slice(&e.id);
        b.extend_from_slice(&e.name);
    }
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .write_all_at(&b, off)
        .unwrap();
    assert_eq!(raw_table(&img).1, t);
    assert_eq!(check_counts(&img), (0, 0, 0));
    assert_eq!(listing(&img).1[0].get("icount"), None);
    let q = dir.path().join("q.qcow2");
    std::fs::copy(&img, &q).unwrap();
    for (ours_args, ok) in [(&["-c", "new"][..], 4), (&["-d", "first"], 3)] {
        ours(&img, ours_args);
        theirs(&q, ours_args);
        let (mine, theirs_) = (raw_table(&img).1, raw_table(&q).1);
        assert_eq!(mine.len(), ok);
        assert_eq!(comparable(&mine), comparable(&theirs_), "{ours_args:?}");
        assert!(mine.iter().any(|e| e.extra.ends_with(b"unknown 16 bytes")));
        assert!(mine.iter().all(|e| e.extra.len() >= 24));
        assert_eq!(check_counts(&img), (0, 0, 0));
        assert_eq!(State::of(&img), State::of(&q));
    }
}

/// The snapshot table is read as far as its entries reach: listing the snapshots of an
/// image whose table lies early in a long file costs KiBs, not the 64 MiB qemu allows a
/// table (which the reader used to read whole).
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img")]
fn the_table_is_read_as_far_as_its_entries_reach() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "200M"]);
    qemu_img(&["snapshot", "-c", "s", s(&img)]);
    // A long file after the table (a sparse tail: no disk space).
    std::fs::File::options()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(100 << 20)
        .unwrap();
    let opts = OpenOptions::new().format(Format::Qcow2);
    let (list, w) = measure("snapshot list", || {
        diskconv::snapshots(&img, &opts).unwrap()
    });
    assert_eq!(list.len(), 1);
    assert_work_within("snapshot list", &w, 4 << 20, 4 << 20);
}

/// Deleting a snapshot (or applying one) gives the space of the clusters it freed back
/// to the filesystem, as qemu-img does.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io")]
fn freed_clusters_give_their_space_back_as_qemu_img_s_do() {
    if !have_qemu() || !have_qemu_io() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("d.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&d), "16M"]);
    qemu_io("qcow2", &d, &["write -P 1 0 8M"]);
    theirs(&d, &["-c", "s"]);
    qemu_io("qcow2", &d, &["write -P 2 0 8M"]);
    theirs(&d, &["-c", "t"]);
    qemu_io("qcow2", &d, &["write -P 3 0 8M"]);
    let q = dir.path().join("q.qcow2");
    std::fs::copy(&d, &q).unwrap();
    let stored = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let full = stored(&d);
    for args in [&["-d", "s"][..], &["-a", "t"]] {
        ours(&d, args);
        theirs(&q, args);
        assert_eq!(State::of(&d), State::of(&q));
        assert_eq!(check_counts(&d), (0, 0, 0));
    }
    // Two of the three 8 MiB versions are gone.
    assert!(
        stored(&d) <= stored(&q) + (1 << 20) && stored(&d) + (15 << 20) < full,
        "{} bytes stored, qemu-img's {}, before {full}",
        stored(&d),
        stored(&q)
    );
}
