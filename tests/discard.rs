//! In-place discard (the write side of `sparsify --in-place`), per format, on images made
//! by qemu-img and written by qemu-io: the discarded image compares equal to a reference
//! zeroed by qemu-io `write -z`, `qemu-img check` finds it clean, qemu-img map shows the
//! runs unallocated or zero, and the file takes less room on disk. A failure at every
//! write in turn leaves an image reading as before outside the runs and free of
//! corruption (qcow2: leaks only), which a rerun completes.

mod common;

use common::discard::*;
use common::*;
use diskconv::Format;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// Data in most of an 8 MiB guest, distinct patterns per region.
const WRITES: &[(u8, u64, u64)] = &[
    (0x11, 0, MIB),
    (0x22, MIB + 512 * KIB, 3 * MIB),
    (0x33, 5 * MIB, 3 * MIB),
];
/// Runs: one inside the first region with unaligned edges, one across data and a hole,
/// one to the end of the guest (so the tail of the file becomes free).
const RUNS: &[(u64, u64)] = &[
    (60 * KIB, 900 * KIB),
    (MIB + 4 * KIB, 3 * MIB - 8 * KIB),
    (6 * MIB - 3 * KIB, 2 * MIB + 3 * KIB),
];

fn case<'a>(fmt: &'a str, create: &'a [&'a str], unit: u64, checkable: bool) -> Case<'a> {
    Case {
        fmt,
        create,
        size: 8 * MIB,
        writes: WRITES,
        runs: RUNS,
        unit,
        checkable,
        edge: 0,
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn raw_punches_whole_blocks() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run_case(dir.path(), &case("raw", &[], 4096, false));
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn qcow2_unallocates_clusters_and_frees_their_refcounts() {
    if !have_qemu_io() {
        return;
    }
    for (create, unit) in [
        (&["-o", "compat=1.1"][..], 64 * KIB),
        (&["-o", "compat=0.10"][..], 64 * KIB),
        (&["-o", "cluster_size=4096,refcount_bits=1"][..], 4096),
        (&["-o", "cluster_size=512"][..], 512),
        (&["-o", "extended_l2=on"][..], 64 * KIB),
        (&["-o", "refcount_bits=64,lazy_refcounts=on"][..], 64 * KIB),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = run_case(dir.path(), &case("qcow2", create, unit, true));
        // The freed tail is cut off: the file ends at its last data cluster or table
        // (with 512-byte clusters, L2 tables, never freed, sit between the tail's data).
        assert!(
            unit < 4096 ||
            std::fs::metadata(&img).unwrap().len() < 6 * MIB + 512 * KIB,
            "{create:?}: {} bytes",
            std::fs::metadata(&img).unwrap().len()
        );
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn qcow2_failing_every_write_leaves_at_most_leaks() {
    if !have_qemu_io() {
        return;
    }
    for create in [
        &["-o", "compat=1.1"][..],
        &["-o", "cluster_size=16384,extended_l2=on"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let unit = if create[1].contains("16384") {
            16 * KIB
        } else {
            64 * KIB
        };
        let writes = sweep(dir.path(), &case("qcow2", create, unit, true), true);
        // L2 write, flush, refcount write(s), flush, punches, truncation.
        assert!(writes >= 6, "{create:?}: only {writes} writes");
    }
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn vpc_dynamic_unmaps_blocks_and_fixed_punches_holes() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = run_case(dir.path(), &case("vpc", &["-o", "force_size=on"], 2 * MIB, false));
    // The last block was freed: the file ends with the footer behind block 2.
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(len < 6 * MIB + 64 * KIB, "{len} bytes");
    let dir = tempfile::tempdir().unwrap();
    run_case(
        dir.path(),
        &case("vpc", &["-o", "subformat=fixed,force_size=on"], 4096, false),
    );
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn vpc_failing_every_write_reads_as_before() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let writes = sweep(dir.path(), &case("vpc", &["-o", "force_size=on"], 2 * MIB, false), false);
    // BAT write, flush, punches, footer, flush, truncation.
    assert!(writes >= 5, "only {writes} writes");
    let dir = tempfile::tempdir().unwrap();
    sweep(
        dir.path(),
        &case("vpc", &["-o", "subformat=fixed,force_size=on"], 4096, false),
        false,
    );
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn vmdk_unmaps_grains_in_both_tables() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, _) = run_case(dir.path(), &case("vmdk", &[], 64 * KIB, true));
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(len < 6 * MIB + 512 * KIB, "{len} bytes: the freed tail stays");
    // The redundant tables say the same: qemu reads the primary ones, so swap the
    // directory offsets in the header and read again.
    let mut b = std::fs::read(&img).unwrap();
    let (rgd, gd) = (b[48..56].to_vec(), b[56..64].to_vec());
    b[48..56].copy_from_slice(&gd);
    b[56..64].copy_from_slice(&rgd);
    let swapped = dir.path().join("swapped.vmdk");
    std::fs::write(&swapped, &b).unwrap();
    qemu_img(&["compare", "-f", "vmdk", "-F", "vmdk", s(&img), s(&swapped)]);
    // Grains made with zeroed_grain=on too.
    let dir = tempfile::tempdir().unwrap();
    run_case(
        dir.path(),
        &case("vmdk", &["-o", "zeroed_grain=on"], 64 * KIB, true),
    );
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn vmdk_failing_every_write_reads_as_before() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let writes = sweep(dir.path(), &case("vmdk", &[], 64 * KIB, true), false);
    // Primary and redundant table, flush, punches, truncation.
    assert!(writes >= 5, "only {writes} writes");
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn vdi_dynamic_compacts_and_static_punches_holes() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (img, freed) = run_case(dir.path(), &case("vdi", &[], MIB, true));
    // Compacted: the file holds the header, the map and the blocks still in use.
    let len = std::fs::metadata(&img).unwrap().len();
    let kept = 8 * MIB - freed; // every block was written
    assert!(len <= kept + MIB, "{len} bytes for {kept} bytes of blocks");
    let info = qemu_info(&img, Format::Vdi);
    assert!(info["actual-size"].as_u64().unwrap() <= kept + MIB, "{info}");
    let dir = tempfile::tempdir().unwrap();
    // The data area starts 1 KiB into the file: the punched units' edges stay allocated.
    let c = Case {
        edge: 4096,
        ..case("vdi", &["-o", "static=on"], 4096, true)
    };
    run_case(dir.path(), &c);
}

#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img and qemu-io (apt-get install qemu-utils)")]
fn vdi_failing_every_write_reads_as_before() {
    if !have_qemu_io() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let writes = sweep(dir.path(), &case("vdi", &[], MIB, true), false);
    // Moved blocks, flush, header and map, flush, truncation.
    assert!(writes >= 4, "only {writes} writes");
    let dir = tempfile::tempdir().unwrap();
    sweep(
        dir.path(),
        &case("vdi", &["-o", "static=on"], 4096, true),
        false,
    );
}
