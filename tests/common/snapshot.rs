//! Helpers the internal snapshot tests share: an image's whole state as qemu-img sees it
//! (guest size and content, the snapshot list without dates, each snapshot's content),
//! and sample qcow2 images of every kind snapshots must handle.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cmms::qemu_io;
use super::{qemu_img, s, sha256_file};

/// What qemu-img sees of an image: virtual size, the active content's digest, and per
/// snapshot its listing row (dates left out: they are the clock's) and content digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub size: u64,
    pub active: String,
    pub snapshots: Vec<(serde_json::Value, String)>,
}

/// `qemu-img info`'s snapshot list with the dates removed.
pub fn listing(img: &Path) -> (u64, Vec<serde_json::Value>) {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "-f", "qcow2", "--output=json", s(img)])).unwrap();
    let mut list = v["snapshots"].as_array().cloned().unwrap_or_default();
    for sn in &mut list {
        let m = sn.as_object_mut().unwrap();
        m.remove("date-sec");
        m.remove("date-nsec");
    }
    (v["virtual-size"].as_u64().unwrap(), list)
}

/// The guest bytes of `img` (or of its snapshot `id`), by qemu-img, as a digest.
pub fn content(img: &Path, id: Option<&str>) -> String {
    let out = img.with_extension(format!("{}.raw", id.unwrap_or("active")));
    let mut a = vec!["convert", "-f", "qcow2", "-O", "raw"];
    let sel;
    if let Some(id) = id {
        sel = format!("snapshot.id={id}");
        a.extend(["-l", &sel]);
    }
    a.extend([s(img), s(&out)]);
    qemu_img(&a);
    let d = sha256_file(&out);
    std::fs::remove_file(&out).unwrap();
    d
}

impl State {
    pub fn of(img: &Path) -> State {
        let (size, list) = listing(img);
        let snapshots = list
            .into_iter()
            .map(|sn| {
                let id = sn["id"].as_str().unwrap().to_string();
                let c = content(img, Some(&id));
                (sn, c)
            })
            .collect();
        State {
            size,
            active: content(img, None),
            snapshots,
        }
    }
}

/// `qemu-img check` (json): (corruptions, leaks, check errors).
pub fn check_counts(img: &Path) -> (u64, u64, u64) {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json", s(img)])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        panic!(
            "qemu-img check {}: {}",
            img.display(),
            String::from_utf8_lossy(&o.stderr)
        )
    });
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (n("corruptions"), n("leaks"), n("check-errors"))
}

/// The sample images: (label, path), each with data, made by qemu-img and qemu-io.
/// v3 and v2 (compat=0.10), 512 B to 128 KiB clusters, compressed clusters, zero clusters
/// (plain and allocated), extended L2 entries with partly written subclusters, 64-bit
/// refcounts, and an overlay over a backing file.
pub fn variants(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mk = |name: &str, opts: &str, size: &str| {
        let p = dir.join(name);
        let mut a = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            a.extend(["-o", opts]);
        }
        a.extend([s(&p), size]);
        qemu_img(&a);
        p
    };
    let mut out = Vec::new();
    let p = mk("v3.qcow2", "", "4M");
    qemu_io(
        "qcow2",
        &p,
        &["write -P 1 0 256k", "write -P 2 1M 64k", "write -z 2M 128k"],
    );
    out.push(("v3 64k", p));
    let p = mk("v2.qcow2", "compat=0.10,cluster_size=512", "1M");
    qemu_io("qcow2", &p, &["write -P 3 0 40k", "write -P 4 600k 3k"]);
    out.push(("v2 512", p));
    // Compressed clusters (4 KiB), and one cluster rewritten uncompressed.
    let raw = dir.join("c.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&raw), "2M"]);
    qemu_io("raw", &raw, &["write -P 5 0 300k", "write -P 6 1M 100k"]);
    let p = dir.join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&raw),
        s(&p),
    ]);
    qemu_io("qcow2", &p, &["write -P 7 8k 4k"]);
    out.push(("compressed 4k", p));
    // Zero clusters that keep their allocation (write -z over data), and plain ones.
    let p = mk("zero.qcow2", "cluster_size=16384", "2M");
    qemu_io(
        "qcow2",
        &p,
        &["write -P 8 0 512k", "write -z 64k 64k", "write -z 1M 64k"],
    );
    out.push(("zero clusters 16k", p));
    let p = mk("extl2.qcow2", "extended_l2=on,cluster_size=128k", "4M");
    qemu_io(
        "qcow2",
        &p,
        &["write -P 9 4k 8k", "write -P 10 1M 256k", "write -z 2M 4k"],
    );
    out.push(("extended L2 128k", p));
    let p = mk("rc64.qcow2", "refcount_bits=64,cluster_size=4096", "1M");
    qemu_io("qcow2", &p, &["write -P 11 0 100k"]);
    out.push(("64-bit refcounts", p));
    let base = mk("base.qcow2", "", "2M");
    qemu_io("qcow2", &base, &["write -P 12 0 2M"]);
    let p = dir.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&p),
    ]);
    qemu_io("qcow2", &p, &["write -P 13 64k 64k", "write -z 1M 64k"]);
    out.push(("overlay", p));
    out
}
