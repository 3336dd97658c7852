//! sparsify over partition tables, swap and LVM: real tables written by sfdisk and
//! sgdisk, swap headers by mkswap, LVM metadata by lvm2 itself; qemu-img reads the
//! outputs. Every disk starts full of junk, so the table's gaps and boot areas hold
//! bytes that must survive, and each test checks the bytes outside the free ranges, the
//! zeros inside, and that the free ranges are unallocated in the output.

use crate::common;

use std::path::Path;

use common::s;
use common::sparsify::*;
use diskconv::{Format, SparsifyOptions};

const MIB: u64 = 1 << 20;

fn opts(format: Format) -> SparsifyOptions<'static> {
    let mut o = SparsifyOptions::new(format);
    o.convert.open = diskconv::OpenOptions::new().format(Format::Raw);
    o
}

/// The granule each output format allocates in.
fn granule(f: Format) -> u64 {
    match f {
        Format::Qcow2 => 64 << 10,
        Format::Vhd => 2 * MIB,
        _ => 4096,
    }
}

/// An MBR disk: a primary swap, an extended partition holding two logical swaps, and a
/// primary with no filesystem, all over junk. Returns the free ranges mkswap declares.
fn mbr_disk(path: &Path, dir: &Path) -> Vec<(u64, u64)> {
    junk_disk(path, 32 * MIB, 1);
    let parts = sfdisk(
        path,
        "label: dos\n\
         p1 : size=6M, type=82\n\
         p2 : size=16M, type=5\n\
         p5 : size=6M, type=82\n\
         p6 : size=6M, type=82\n\
         p3 : size=4M, type=83\n",
    );
    assert_eq!(parts.len(), 4, "{parts:?}");
    let mut free = Vec::new();
    for p in [parts[0], parts[2], parts[3]] {
        free.push(mkswap_at(path, p.start, p.len, dir));
    }
    free
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools),
    ignore = "needs qemu-img, sfdisk, sgdisk, mkswap"
)]
fn mbr_with_logical_partitions_drops_only_the_swap_pages() {
    assert!(have_parttools());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("mbr.raw");
    let free = mbr_disk(&disk, dir.path());
    let out = dir.path().join("out.qcow2");
    let r = diskconv::sparsify(&disk, &out, &opts(Format::Qcow2)).unwrap();
    assert_eq!(r.table, "mbr");
    let locs: Vec<_> = r.partitions.iter().map(|p| p.location.as_str()).collect();
    assert_eq!(locs, ["mbr 1", "mbr 5", "mbr 6", "mbr 3"]);
    for (p, f) in r.partitions.iter().zip(&free) {
        assert_eq!(p.filesystem.as_deref(), Some("swap"));
        assert_eq!(p.free_bytes, f.1, "{}", p.location);
        assert!(p.skipped.is_none());
    }
    let no_fs = &r.partitions[3];
    assert_eq!(no_fs.skipped.as_deref(), Some("no filesystem recognised"));
    assert_eq!(r.dropped_bytes, free.iter().map(|f| f.1).sum::<u64>());
    assert_eq!(r.output_size, std::fs::metadata(&out).unwrap().len());
    assert_sparsified(&disk, &out, &free, granule(Format::Qcow2), dir.path());
    common::assert_qemu_check_clean(&out, Format::Qcow2);
}

/// A GPT disk with two swap partitions and a gap between them, over junk.
fn gpt_disk(path: &Path, dir: &Path) -> Vec<(u64, u64)> {
    junk_disk(path, 32 * MIB, 2);
    let parts = sgdisk(
        path,
        &[
            "-n",
            "1:2048:+8M",
            "-t",
            "1:8200",
            "-n",
            "2:20480:+8M",
            "-t",
            "2:8200",
        ],
    );
    assert_eq!(parts.len(), 2);
    parts
        .iter()
        .map(|p| mkswap_at(path, p.start, p.len, dir))
        .collect()
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools),
    ignore = "needs qemu-img, sfdisk, sgdisk, mkswap"
)]
fn gpt_sparsifies_into_raw_qcow2_and_vpc() {
    assert!(have_parttools());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("gpt.raw");
    let free = gpt_disk(&disk, dir.path());
    for f in [Format::Raw, Format::Qcow2, Format::Vhd] {
        let out = dir.path().join(format!("out.{}", f.name()));
        let r = diskconv::sparsify(&disk, &out, &opts(f)).unwrap();
        assert_eq!(r.table, "gpt");
        assert!(r.notes.is_empty(), "{:?}", r.notes);
        assert_eq!(r.partitions.len(), 2);
        assert_eq!(r.partitions[0].location, "gpt 1");
        assert_eq!(r.partitions[0].offset, 2048 * 512);
        assert_sparsified(&disk, &out, &free, granule(f), dir.path());
    }
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools),
    ignore = "needs qemu-img, sfdisk, sgdisk, mkswap"
)]
fn gpt_with_a_bad_primary_crc_reads_the_backup_and_both_bad_leaves_the_disk() {
    use std::os::unix::fs::FileExt;
    assert!(have_parttools());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("gpt.raw");
    let free = gpt_disk(&disk, dir.path());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    let flip = |at: u64| {
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    };
    flip(512 + 60); // the disk GUID, inside the primary header's CRC
    let out = dir.path().join("out.qcow2");
    let r = diskconv::sparsify(&disk, &out, &opts(Format::Qcow2)).unwrap();
    assert_eq!(r.table, "gpt");
    assert!(
        r.notes[0].contains("header CRC32") && r.notes[0].contains("backup"),
        "{:?}",
        r.notes
    );
    assert_sparsified(&disk, &out, &free, granule(Format::Qcow2), dir.path());

    flip(32 * MIB - 512 + 60); // and the backup's
    let r = diskconv::sparsify(&disk, &out, &opts(Format::Qcow2)).unwrap();
    assert_eq!(r.table, "untrusted");
    assert_eq!(r.dropped_bytes, 0);
    let why = r.partitions[0].skipped.as_deref().unwrap();
    assert!(why.contains("primary") && why.contains("backup"), "{why}");
    assert_sparsified(&disk, &out, &[], granule(Format::Qcow2), dir.path());
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools),
    ignore = "needs qemu-img, sfdisk, sgdisk, mkswap"
)]
fn overlapping_or_overrunning_partitions_leave_the_disk_untouched() {
    use std::os::unix::fs::FileExt;
    assert!(have_parttools());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("mbr.raw");
    junk_disk(&disk, 32 * MIB, 3);
    let parts = sfdisk(&disk, "label: dos\n,8M,82\n,8M,82\n");
    for p in &parts {
        mkswap_at(&disk, p.start, p.len, dir.path());
    }
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    // Entry 2 now starts 1 MiB inside entry 1.
    let start2 = (parts[1].start - MIB) / 512;
    f.write_all_at(&(start2 as u32).to_le_bytes(), 0x1BE + 16 + 8)
        .unwrap();
    let out = dir.path().join("out.qcow2");
    let r = diskconv::sparsify(&disk, &out, &opts(Format::Qcow2)).unwrap();
    assert_eq!(r.table, "untrusted");
    assert_eq!(r.dropped_bytes, 0);
    assert_eq!(r.partitions.len(), 2);
    for p in &r.partitions {
        let why = p.skipped.as_deref().unwrap();
        assert!(why.contains("overlaps"), "{why}");
    }
    assert_sparsified(&disk, &out, &[], granule(Format::Qcow2), dir.path());

    // Entry 2 back in place but running 1 MiB past the disk's end.
    f.write_all_at(
        &((parts[1].start / 512) as u32).to_le_bytes(),
        0x1BE + 16 + 8,
    )
    .unwrap();
    let past = (32 * MIB - parts[1].start + MIB) / 512;
    f.write_all_at(&(past as u32).to_le_bytes(), 0x1BE + 16 + 12)
        .unwrap();
    let r = diskconv::sparsify(&disk, &out, &opts(Format::Qcow2)).unwrap();
    assert_eq!(r.dropped_bytes, 0);
    assert!(
        r.partitions[1]
            .skipped
            .as_deref()
            .unwrap()
            .contains("past the end"),
        "{:?}",
        r.partitions
    );
    assert_sparsified(&disk, &out, &[], granule(Format::Qcow2), dir.path());
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools),
    ignore = "needs qemu-img, sfdisk, sgdisk, mkswap"
)]
fn a_whole_disk_swap_without_a_table() {
    assert!(have_parttools());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("swap.raw");
    junk_disk(&disk, 16 * MIB, 4);
    let free = mkswap_at(&disk, 0, 16 * MIB, dir.path());
    let out = dir.path().join("out.qcow2");
    let r = diskconv::sparsify(&disk, &out, &opts(Format::Qcow2)).unwrap();
    assert_eq!(r.table, "none");
    assert_eq!(r.partitions[0].location, "disk");
    assert_eq!(r.partitions[0].filesystem.as_deref(), Some("swap"));
    assert_eq!(r.dropped_bytes, free.1);
    assert_sparsified(&disk, &out, &[free], granule(Format::Qcow2), dir.path());
}

/// Detaches the loop device when the test ends, passed or not.
struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// lvm2 on a loop device, without device-mapper: no devices file, no backups, no
/// activation (lvcreate --driverloaded n), so nothing on the host changes.
fn lvm(args: &[&str]) {
    let cfg = "devices { use_devicesfile = 0 } backup { backup = 0 archive = 0 }";
    let mut v = vec![args[0], "--config", cfg];
    v.extend_from_slice(&args[1..]);
    let out = std::process::Command::new(v[0])
        .args(&v[1..])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{v:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools, no_lvm),
    ignore = "needs qemu-img, sfdisk, mkswap, lvm2, losetup"
)]
fn lvm_linear_volumes_are_scanned_through_their_extents() {
    assert!(have_parttools() && have_lvm());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("lvm.raw");
    junk_disk(&disk, 48 * MIB, 5);
    let parts = sfdisk(&disk, "label: dos\n,40M,8e\n");
    let pv = parts[0];
    let lo = attach(&disk, pv.start, pv.len);
    let vg = format!("sptest{}", std::process::id());
    lvm(&["pvcreate", "-y", "-ff", &lo.0]);
    lvm(&["vgcreate", "-s", "1M", &vg, &lo.0]);
    // lv1 in two pieces (a second segment after lv2), lv2 in one.
    for (name, size) in [("lv1", "4M"), ("lv2", "6M")] {
        lvm(&[
            "lvcreate",
            "--driverloaded",
            "n",
            "-an",
            "-Zn",
            "-L",
            size,
            "-n",
            name,
            &vg,
        ]);
    }
    lvm(&[
        "lvextend",
        "--driverloaded",
        "n",
        "-L",
        "+3M",
        &format!("{vg}/lv1"),
    ]);
    drop(lo);
    // lvm2's default pe_start is 1 MiB into the PV; extents are 1 MiB. lv1: PEs 0-3 and
    // 10-12; lv2: PEs 4-9. A swap in each, written where its extents are.
    let pe = |n: u64| pv.start + MIB + n * MIB;
    let lv1_swap = {
        // mkswap over the 7 MiB volume, its header on PE 0; the pages past PE 3 are
        // on PEs 10-12.
        let (_, len) = mkswap_at(&disk, pe(0), 7 * MIB, dir.path());
        assert_eq!(len, 7 * MIB - 4096);
        vec![(pe(0) + 4096, 4 * MIB - 4096), (pe(10), 3 * MIB)]
    };
    let lv2_swap = mkswap_at(&disk, pe(4), 6 * MIB, dir.path());
    let out = dir.path().join("out.qcow2");
    let r = diskconv::sparsify(&disk, &out, &opts(Format::Qcow2)).unwrap();
    let lines: Vec<_> = r
        .partitions
        .iter()
        .map(|p| (p.location.clone(), p.filesystem.clone(), p.skipped.clone()))
        .collect();
    assert_eq!(
        r.partitions[0].filesystem.as_deref(),
        Some("LVM2_member"),
        "{lines:?}"
    );
    assert_eq!(r.partitions[1].location, format!("lvm {vg}/lv1"));
    assert_eq!(r.partitions[2].location, format!("lvm {vg}/lv2"));
    assert_eq!(
        r.partitions[1].filesystem.as_deref(),
        Some("swap"),
        "{lines:?}"
    );
    assert_eq!(
        r.partitions[2].filesystem.as_deref(),
        Some("swap"),
        "{lines:?}"
    );
    // The VG's unused extents (13 up to pe_count) are free too.
    let pe_count = (pv.len - MIB) / MIB;
    let mut free = lv1_swap;
    free.push(lv2_swap);
    free.push((pe(13), (pe_count - 13) * MIB));
    assert_eq!(
        r.dropped_bytes,
        free.iter().map(|f| f.1).sum::<u64>(),
        "{:?}",
        r.partitions
    );
    assert_sparsified(&disk, &out, &free, granule(Format::Qcow2), dir.path());
}

/// Attach `len` bytes at `off` of `disk` as a loop device.
fn attach(disk: &Path, off: u64, len: u64) -> Loop {
    let dev = common::run(&[
        "losetup",
        "-f",
        "--show",
        "-o",
        &off.to_string(),
        "--sizelimit",
        &len.to_string(),
        s(disk),
    ]);
    Loop(dev.trim().to_string())
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools, no_lvm),
    ignore = "needs qemu-img, sfdisk, mkswap, lvm2, losetup"
)]
fn lvm_striped_and_spanning_volumes_are_skipped() {
    assert!(have_parttools() && have_lvm());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("two.raw");
    junk_disk(&disk, 48 * MIB, 6);
    let parts = sfdisk(&disk, "label: dos\n,20M,8e\n,20M,8e\n");
    let a = attach(&disk, parts[0].start, parts[0].len);
    let b = attach(&disk, parts[1].start, parts[1].len);
    let vg = format!("sptwo{}", std::process::id());
    lvm(&["pvcreate", "-y", "-ff", &a.0, &b.0]);
    lvm(&["vgcreate", "-s", "1M", &vg, &a.0, &b.0]);
    let new_lv = |args: &[&str]| {
        let mut v = vec!["lvcreate", "--driverloaded", "n", "-an", "-Zn"];
        v.extend_from_slice(args);
        lvm(&v);
    };
    new_lv(&["-i", "2", "-I", "64k", "-L", "4M", "-n", "st", &vg]); // PEs 0-1 of both
    new_lv(&["-L", "3M", "-n", "lin", &vg, &a.0]); // PEs 2-4 of the first
    new_lv(&["-L", "30M", "-n", "span", &vg]); // all the rest but PE 18 of the first
    drop((a, b));
    let pe = |p: &Part, n: u64| p.start + MIB + n * MIB;
    let lin = mkswap_at(&disk, pe(&parts[0], 2), 3 * MIB, dir.path());
    let out = dir.path().join("o.qcow2");
    let r = diskconv::sparsify(&disk, &out, &opts(Format::Qcow2)).unwrap();
    let find = |loc: String| {
        r.partitions
            .iter()
            .filter(|p| p.location == loc)
            .collect::<Vec<_>>()
    };
    let st = find(format!("lvm {vg}/st"));
    let span = find(format!("lvm {vg}/span"));
    assert_eq!(
        (st.len(), span.len()),
        (2, 2),
        "one line per PV: {:?}",
        r.partitions
    );
    for p in st {
        assert!(
            p.skipped.as_deref().unwrap().contains("striped over 2"),
            "{p:?}"
        );
    }
    for p in span {
        let why = p.skipped.as_deref().unwrap();
        assert!(why.contains("another physical volume"), "{p:?}");
    }
    let lins = find(format!("lvm {vg}/lin"));
    assert_eq!(lins[0].filesystem.as_deref(), Some("swap"), "{lins:?}");
    assert_eq!(lins[0].free_bytes, lin.1);
    // The one unused extent, PE 18 of the first PV, is free too; the second has none.
    let free = [lin, (pe(&parts[0], 18), MIB)];
    assert_eq!(r.dropped_bytes, lin.1 + MIB, "{:?}", r.partitions);
    assert_sparsified(&disk, &out, &free, granule(Format::Qcow2), dir.path());
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools),
    ignore = "needs qemu-img, sfdisk, sgdisk, mkswap"
)]
fn cli_reports_streams_and_converts_with_sparsify() {
    assert!(have_parttools());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("mbr.raw");
    let free = mbr_disk(&disk, dir.path());
    let d = s(&disk);

    let out = dir.path().join("a.qcow2");
    let (ok, stdout, stderr) = diskconv(&[
        "sparsify",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "--output=json",
        d,
        s(&out),
    ]);
    assert!(ok, "{stderr}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["table"], "mbr");
    assert_eq!(j["partitions"][1]["location"], "mbr 5");
    assert_eq!(j["partitions"][1]["filesystem"], "swap");
    assert_eq!(j["partitions"][1]["free-bytes"], free[1].1);
    assert_eq!(j["partitions"][3]["skipped"], "no filesystem recognised");
    assert_eq!(j["dropped-bytes"], free.iter().map(|f| f.1).sum::<u64>());
    assert_sparsified(&disk, &out, &free, granule(Format::Qcow2), dir.path());

    // Human lines, one per partition.
    let (ok, stdout, stderr) =
        diskconv(&["sparsify", "-O", "raw", d, s(&dir.path().join("b.raw"))]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("mbr ")).count(),
        4,
        "{stdout}"
    );
    assert!(
        stdout.contains("skipped: no filesystem recognised"),
        "{stdout}"
    );
    assert!(stdout.contains("partition table: mbr"), "{stdout}");

    // Streaming to stdout: the image on stdout, the report on stderr.
    let streamed = dir.path().join("c.qcow2");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(["sparsify", "-O", "qcow2", "-c", d, "-"])
        .stdout(std::fs::File::create(&streamed).unwrap())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    assert!(String::from_utf8_lossy(&st.stderr).contains("mbr 6"));
    assert_sparsified(&disk, &streamed, &free, granule(Format::Qcow2), dir.path());

    // convert --sparsify does the same.
    let conv = dir.path().join("d.vhd");
    let (ok, _, stderr) = diskconv(&["convert", "--sparsify", "-O", "vpc", d, s(&conv)]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("mbr 5"), "{stderr}");
    assert_sparsified(&disk, &conv, &free, granule(Format::Vhd), dir.path());
    let (ok, stdout, stderr) = diskconv(&[
        "convert",
        "--sparsify",
        "-q",
        "--output=json",
        "-O",
        "qcow2",
        d,
        s(&dir.path().join("json.qcow2")),
    ]);
    assert!(ok, "{stderr}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["format"], "qcow2");
    assert_eq!(j["sparsify"]["table"], "mbr");
    assert_eq!(
        j["sparsify"]["dropped-bytes"],
        free.iter().map(|f| f.1).sum::<u64>()
    );
    // Without it, convert keeps the junk.
    let plain = dir.path().join("e.qcow2");
    let (ok, _, _) = diskconv(&["convert", "-O", "qcow2", d, s(&plain)]);
    assert!(ok);
    assert_sparsified(&disk, &plain, &[], granule(Format::Qcow2), dir.path());

    // Errors exit non-zero and leave nothing.
    let (ok, _, stderr) = diskconv(&["sparsify", d]);
    assert!(!ok && stderr.contains("IN and OUT"), "{stderr}");
    let missing = dir.path().join("nope.qcow2");
    let (ok, _, _) = diskconv(&["sparsify", s(&dir.path().join("absent.raw")), s(&missing)]);
    assert!(!ok);
    assert!(!missing.exists());
}

#[test]
#[cfg_attr(
    any(no_qemu, no_parttools),
    ignore = "needs qemu-img, sfdisk, sgdisk, mkswap"
)]
fn in_place_gives_space_back_or_refuses_untouched() {
    use std::os::unix::fs::MetadataExt;
    assert!(have_parttools());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("mbr.raw");
    let free = mbr_disk(&disk, dir.path());
    let before = std::fs::read(&disk).unwrap();
    let blocks = std::fs::metadata(&disk).unwrap().blocks();
    let copy = dir.path().join("orig.raw");
    std::fs::write(&copy, &before).unwrap();
    let (ok, stdout, stderr) = diskconv(&[
        "sparsify",
        "--in-place",
        "-f",
        "raw",
        "--output=json",
        s(&disk),
    ]);
    if ok {
        let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(j["table"], "mbr");
        assert!(
            j["dropped-bytes"].as_u64().unwrap()
                >= whole_granules(&free, 4096).iter().map(|f| f.1).sum::<u64>()
        );
        assert!(std::fs::metadata(&disk).unwrap().blocks() < blocks);
        assert_sparsified(&copy, &disk, &free, 4096, dir.path());
    } else {
        // A format whose editor cannot discard yet: refused with the reason, untouched.
        assert!(
            stderr.contains("cannot sparsify this raw image in place"),
            "{stderr}"
        );
        assert_eq!(std::fs::read(&disk).unwrap(), before);
    }
    let (ok, _, stderr) = diskconv(&["sparsify", "--in-place", "-O", "qcow2", s(&disk)]);
    assert!(
        !ok && stderr.contains("--in-place takes one image"),
        "{stderr}"
    );
}
