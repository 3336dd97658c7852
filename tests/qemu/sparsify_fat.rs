//! Sparsify of FAT12/16/32 built by the real tools (mkfs.fat, mtools), checked by them
//! (mtools' layout and free count, fsck.fat, mcopy) and by qemu-img (map, convert).
//!
//! The free extents come from an independent reader: the layout as mtools' `minfo`
//! prints it and a plain whole-FAT read, cross-checked against `mdir`'s bytes free.

use crate::common::guestfs;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::common::mounts::umount_retry;
use guestfs::*;

const TOOLS: &[&str] = &[
    "mkfs.fat", "fsck.fat", "mcopy", "mdel", "minfo", "mdir", "mmd", "qemu-img",
];

fn tools() -> bool {
    have(TOOLS, !cfg!(no_dosfs) && !cfg!(no_qemu))
}

const MIB: u64 = 1 << 20;

/// The layout as mtools sees it.
struct Geometry {
    bits: u32,
    sector: u64,
    cluster: u64,
    fat_offset: u64,
    fat_bytes: u64,
    data: u64,
    clusters: u64,
}

fn minfo(img: &Path) -> Geometry {
    let text = run(&["minfo", "-i", s(img), "::"]);
    let num = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} not in minfo: {text}"))
            .trim()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let sector = num("sector size:");
    let cluster = num("cluster size:") * sector;
    let reserved = num("reserved (boot) sectors:");
    let fats = num("fats:");
    let root = num("max available root directory slots:");
    let small = num("small size:");
    let total = if small != 0 { small } else { num("big size:") };
    let fatlen = match num("sectors per fat:") {
        0 => num("Big fatlen="),
        n => n,
    };
    let bits = if text.contains("disk type=\"FAT32") {
        32
    } else if text.contains("disk type=\"FAT16") {
        16
    } else {
        assert!(text.contains("disk type=\"FAT12"), "{text}");
        12
    };
    let data_sec = reserved + fats * fatlen + (root * 32).div_ceil(sector);
    Geometry {
        bits,
        sector,
        cluster,
        fat_offset: reserved * sector,
        fat_bytes: fatlen * sector,
        data: data_sec * sector,
        clusters: (total - data_sec) * sector / cluster,
    }
}

/// Free clusters read plainly from the first FAT, as byte extents.
fn free_extents(img: &Path) -> Vec<(u64, u64)> {
    let g = minfo(img);
    let f = std::fs::File::open(img).unwrap();
    let mut fat = vec![0u8; g.fat_bytes as usize];
    f.read_exact_at(&mut fat, g.fat_offset).unwrap();
    let entry = |n: usize| -> u32 {
        match g.bits {
            12 => {
                let v = u16::from_le_bytes([fat[n * 3 / 2], fat[n * 3 / 2 + 1]]);
                (if n.is_multiple_of(2) {
                    v & 0xFFF
                } else {
                    v >> 4
                }) as u32
            }
            16 => u16::from_le_bytes([fat[2 * n], fat[2 * n + 1]]) as u32,
            _ => u32::from_le_bytes(fat[4 * n..4 * n + 4].try_into().unwrap()) & 0x0FFF_FFFF,
        }
    };
    (2..g.clusters as usize + 2)
        .filter(|&n| entry(n) == 0)
        .map(|n| (g.data + (n as u64 - 2) * g.cluster, g.cluster))
        .collect()
}

/// mdir's "bytes free".
fn mdir_free(img: &Path) -> u64 {
    let text = run(&["mdir", "-i", s(img), "::"]);
    let line = text.lines().find(|l| l.contains("bytes free")).unwrap();
    line.split("bytes free")
        .next()
        .unwrap()
        .replace(' ', "")
        .parse()
        .unwrap()
}

fn fsck_clean(img: &Path) {
    let (code, out) = run_status(&["fsck.fat", "-n", s(img)]);
    assert_eq!(code, 0, "fsck.fat -n {}: {out}", img.display());
    assert!(!out.contains("Dirty"), "fsck.fat: {out}");
}

struct Fs {
    dir: tempfile::TempDir,
    img: PathBuf,
    files: Vec<(String, Vec<u8>)>,
}

/// mkfs.fat with `mkfs` options, three files (one in a subdirectory) and a large file
/// written and deleted.
fn build(mkfs: &[&str], size: u64, big: usize, seed: u64) -> Fs {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fat.img");
    sparse_file(&img, size);
    let mut cmd = vec!["mkfs.fat"];
    cmd.extend_from_slice(mkfs);
    cmd.push(s(&img));
    run(&cmd);
    let mut rng = Rng(seed);
    let bigf = dir.path().join("big");
    std::fs::write(&bigf, rng.bytes(big)).unwrap();
    run(&["mcopy", "-i", s(&img), s(&bigf), "::/BIG"]);
    run(&["mmd", "-i", s(&img), "::/D"]);
    let files: Vec<(String, Vec<u8>)> = [("A", 3000usize), ("B", 200 << 10), ("D/C", 700 << 10)]
        .iter()
        .map(|&(n, len)| (n.to_string(), rng.bytes(len)))
        .collect();
    for (n, data) in &files {
        let p = dir.path().join(format!("host-{}", n.replace('/', "-")));
        std::fs::write(&p, data).unwrap();
        run(&["mcopy", "-i", s(&img), s(&p), &format!("::/{n}")]);
    }
    run(&["mdel", "-i", s(&img), "::/BIG"]);
    fsck_clean(&img);
    Fs { dir, img, files }
}

fn roundtrip(fs: &Fs, name: &str) -> u64 {
    let free = free_extents(&fs.img);
    let tool_free = mdir_free(&fs.img);
    assert_eq!(
        free.iter().map(|e| e.1).sum::<u64>(),
        tool_free,
        "the test's FAT reader vs mdir"
    );
    fill_junk(&fs.img, &free, 0xfa7);
    fsck_clean(&fs.img);
    let sp = sparsify(&fs.img, &fs.dir.path().join("out.qcow2"));
    let p = &sp.partitions[0];
    assert_eq!(p.filesystem.as_deref(), Some(name), "{p:?}");
    assert_eq!(p.skipped, None, "{p:?}");
    let back = assert_sparsified(&fs.img, &sp, &free, fs.dir.path());
    fsck_clean(&back);
    for (n, data) in &fs.files {
        let out = fs.dir.path().join(format!("out-{}", n.replace('/', "-")));
        run(&["mcopy", "-n", "-i", s(&back), &format!("::/{n}"), s(&out)]);
        assert!(std::fs::read(&out).unwrap() == *data, "file {n} differs");
    }
    let runs = merge(free).len() as u64;
    assert!(
        sp.free_bytes <= tool_free && tool_free - sp.free_bytes <= runs * 2 * sp.granule,
        "found {} free, mdir says {tool_free}",
        sp.free_bytes
    );
    sp.free_bytes
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn fat12() {
    if !tools() {
        return;
    }
    let fs = build(&["-F", "12"], 6 * MIB, 2 << 20, 1);
    assert_eq!(minfo(&fs.img).bits, 12);
    roundtrip(&fs, "fat12");
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn fat16() {
    if !tools() {
        return;
    }
    let fs = build(&["-F", "16"], 32 * MIB, 8 << 20, 2);
    assert_eq!(minfo(&fs.img).bits, 16);
    let free = roundtrip(&fs, "fat16");
    assert!(free > 20 * MIB, "{free}");
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn fat16_4k_sectors() {
    if !tools() {
        return;
    }
    let fs = build(&["-F", "16", "-S", "4096", "-s", "1"], 48 * MIB, 8 << 20, 3);
    assert_eq!(minfo(&fs.img).sector, 4096);
    roundtrip(&fs, "fat16");
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn fat32() {
    if !tools() {
        return;
    }
    // 512-byte clusters: the cluster runs straddle 4 KiB granules.
    let fs = build(&["-F", "32", "-s", "1"], 40 * MIB, 10 << 20, 4);
    assert_eq!(minfo(&fs.img).bits, 32);
    roundtrip(&fs, "fat32");
}

// ---- hostile -------------------------------------------------------------------------

fn patch(img: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn read(img: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(img).unwrap();
    let mut b = vec![0; len];
    f.read_exact_at(&mut b, offset).unwrap();
    b
}

fn small16() -> Fs {
    build(&["-F", "16"], 16 * MIB, 1 << 20, 7)
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn bad_bpb_is_skipped() {
    if !tools() {
        return;
    }
    // Total sectors past the end of the disk.
    let fs = small16();
    patch(&fs.img, 0x13, &0u16.to_le_bytes());
    patch(&fs.img, 0x20, &(64u32 << 11).to_le_bytes());
    assert_skipped(&fs.img, "BPB_TotSec");
    // FATs too small for the clusters.
    let fs = small16();
    patch(&fs.img, 0x16, &4u16.to_le_bytes());
    assert_skipped(&fs.img, "BPB_FATSz");
    // Root entries on FAT32.
    let fs = build(&["-F", "32", "-s", "1"], 40 * MIB, 1 << 20, 8);
    patch(&fs.img, 0x11, &512u16.to_le_bytes());
    assert_skipped(&fs.img, "BPB_RootEntCnt");
    // A FAT32 layout field that still validates, but disagrees with the backup boot
    // sector: one more reserved sector would shift every cluster.
    let fs = build(&["-F", "32", "-s", "1"], 40 * MIB, 1 << 20, 8);
    let r = u16::from_le_bytes(read(&fs.img, 0x0E, 2).try_into().unwrap());
    patch(&fs.img, 0x0E, &(r + 1).to_le_bytes());
    assert_skipped(&fs.img, "BPB_BkBootSec");
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn disagreeing_fat_copies_are_skipped() {
    if !tools() {
        return;
    }
    for (mkfs, size) in [
        (["-F", "16", "-s", "4"], 16 * MIB),
        (["-F", "32", "-s", "1"], 40 * MIB),
    ] {
        let fs = build(&mkfs, size, 1 << 20, 9);
        let g = minfo(&fs.img);
        // The last cluster is free in FAT 1: claim it in FAT 2 (end of chain).
        let last = g.clusters + 1;
        let w = g.bits as u64 / 8;
        let fat2 = g.fat_offset + g.fat_bytes;
        patch(&fs.img, fat2 + last * w, &[0xFF; 4][..w as usize]);
        let p = assert_skipped(&fs.img, "disagree");
        assert!(p.skipped.unwrap().contains(&format!("cluster {last}")));
    }
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn dirty_volumes_are_skipped() {
    if !tools() {
        return;
    }
    // The kernel's dirty flag in the boot sector (FAT16 at 0x25, FAT32 at 0x41).
    let fs = small16();
    patch(&fs.img, 0x25, &[1]);
    let (code, out) = run_status(&["fsck.fat", "-n", s(&fs.img)]);
    assert!(
        code != 0 || out.contains("Dirty"),
        "fsck.fat sees it: {out}"
    );
    assert_skipped(&fs.img, "dirty flag");
    let fs = build(&["-F", "32", "-s", "1"], 40 * MIB, 1 << 20, 10);
    patch(&fs.img, 0x41, &[1]);
    assert_skipped(&fs.img, "dirty flag");

    // FAT entry 1's clean-shutdown bit cleared in both copies (FAT16 bit 15, FAT32
    // bit 27).
    let fs = small16();
    let g = minfo(&fs.img);
    for k in 0..2 {
        patch(
            &fs.img,
            g.fat_offset + k * g.fat_bytes + 2,
            &0x7FFFu16.to_le_bytes(),
        );
    }
    assert_skipped(&fs.img, "clean-shutdown");
    let fs = build(&["-F", "32", "-s", "1"], 40 * MIB, 1 << 20, 11);
    let g = minfo(&fs.img);
    for k in 0..2 {
        patch(
            &fs.img,
            g.fat_offset + k * g.fat_bytes + 4,
            &0x07FF_FFFFu32.to_le_bytes(),
        );
    }
    assert_skipped(&fs.img, "clean-shutdown");
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn exfat_and_other_boot_sectors_are_not_fat() {
    if !tools() {
        return;
    }
    // A FAT boot sector renamed EXFAT is a broken exFAT: left whole.
    let fs = small16();
    patch(&fs.img, 3, b"EXFAT   ");
    let p = assert_skipped(&fs.img, "MustBeZero");
    assert_eq!(p.filesystem.as_deref(), Some("exfat"));
    // NTFS's boot sector is not FAT's business: the NTFS scanner takes it (and finds no
    // valid NTFS there), and nothing is dropped.
    let fs = small16();
    patch(&fs.img, 3, b"NTFS    ");
    let (p, free) = scan_only(&fs.img);
    assert!(!p
        .filesystem
        .as_deref()
        .is_some_and(|f| f.starts_with("fat")));
    assert_eq!(free, 0);
}

// ---- exFAT ---------------------------------------------------------------------------

const EXFAT_TOOLS: &[&str] = &[
    "mkfs.exfat",
    "fsck.exfat",
    "dump.exfat",
    "mount.exfat-fuse",
    "losetup",
    "qemu-img",
];

fn exfat_tools() -> bool {
    have(EXFAT_TOOLS, !cfg!(no_exfat) && !cfg!(no_qemu))
}

/// Mount `img` through a loop device with exfat-fuse, run `f` on the mount point.
fn with_exfat_mounted(img: &Path, mnt: &Path, f: impl FnOnce(&Path)) {
    std::fs::create_dir_all(mnt).unwrap();
    let dev = run(&["losetup", "-f", "--show", s(img)]).trim().to_string();
    let (code, out) = run_status(&["mount.exfat-fuse", &dev, s(mnt)]);
    if code != 0 {
        run(&["losetup", "-d", &dev]);
        panic!("mount.exfat-fuse failed: {out}");
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(mnt)));
    umount_retry(mnt);
    run(&["losetup", "-d", &dev]);
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// dump.exfat's "Key: value" (first word of the value).
fn dump_exfat(img: &Path, key: &str) -> u64 {
    let text = run(&["dump.exfat", s(img)]);
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("{key} not in dump.exfat: {text}"))
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

struct ExGeo {
    heap: u64,
    cluster: u64,
    clusters: u64,
    bitmap: u64,
}

fn exfat_geometry(img: &Path) -> ExGeo {
    let sector = 1u64 << dump_exfat(img, "Sector Size Bits:");
    ExGeo {
        heap: dump_exfat(img, "Cluster Heap Offset (sector offset):") * sector,
        cluster: sector << dump_exfat(img, "Sector per Cluster bits:"),
        clusters: dump_exfat(img, "Cluster Count:"),
        bitmap: dump_exfat(img, "Bitmap start cluster:"),
    }
}

/// Free clusters read plainly from the allocation bitmap (mkfs.exfat lays it out in
/// one run), as byte extents; their count must be dump.exfat's.
fn exfat_free_extents(img: &Path) -> Vec<(u64, u64)> {
    let g = exfat_geometry(img);
    let mut bm = vec![0u8; g.clusters.div_ceil(8) as usize];
    std::fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut bm, g.heap + (g.bitmap - 2) * g.cluster)
        .unwrap();
    let free: Vec<(u64, u64)> = (0..g.clusters)
        .filter(|&i| bm[(i / 8) as usize] & (1 << (i % 8)) == 0)
        .map(|i| (g.heap + i * g.cluster, g.cluster))
        .collect();
    assert_eq!(free.len() as u64, dump_exfat(img, "Free Clusters:"));
    free
}

fn exfat_fsck_clean(img: &Path) {
    let (code, out) = run_status(&["fsck.exfat", "-n", s(img)]);
    assert_eq!(code, 0, "fsck.exfat -n {}: {out}", img.display());
}

fn build_exfat(size: u64, seed: u64) -> Fs {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("exfat.img");
    sparse_file(&img, size);
    run(&["mkfs.exfat", s(&img)]);
    let mut rng = Rng(seed);
    let files: Vec<(String, Vec<u8>)> = [("a", 4000usize), ("d/b", 900 << 10)]
        .iter()
        .map(|&(n, len)| (n.to_string(), rng.bytes(len)))
        .collect();
    let big = rng.bytes(6 << 20);
    with_exfat_mounted(&img, &dir.path().join("mnt"), |m| {
        std::fs::write(m.join("big"), &big).unwrap();
        std::fs::create_dir(m.join("d")).unwrap();
        for (n, data) in &files {
            std::fs::write(m.join(n), data).unwrap();
        }
        std::fs::remove_file(m.join("big")).unwrap();
    });
    exfat_fsck_clean(&img);
    Fs { dir, img, files }
}

#[test]
#[cfg_attr(
    any(no_exfat, no_qemu),
    ignore = "needs exfatprogs, exfat-fuse and qemu-img"
)]
fn exfat() {
    if !exfat_tools() {
        return;
    }
    let fs = build_exfat(32 * MIB, 14);
    let free = exfat_free_extents(&fs.img);
    fill_junk(&fs.img, &free, 0xe7fa7);
    exfat_fsck_clean(&fs.img);
    let sp = sparsify(&fs.img, &fs.dir.path().join("out.qcow2"));
    let p = &sp.partitions[0];
    assert_eq!(
        (p.filesystem.as_deref(), p.skipped.as_deref()),
        (Some("exfat"), None),
        "{p:?}"
    );
    let back = assert_sparsified(&fs.img, &sp, &free, fs.dir.path());
    exfat_fsck_clean(&back);
    with_exfat_mounted(&back, &fs.dir.path().join("mnt2"), |m| {
        for (n, data) in &fs.files {
            assert!(
                std::fs::read(m.join(n)).unwrap() == *data,
                "file {n} differs"
            );
        }
    });
    assert!(sp.free_bytes > 20 * MIB, "{}", sp.free_bytes);
}

#[test]
#[cfg_attr(
    any(no_exfat, no_qemu),
    ignore = "needs exfatprogs, exfat-fuse and qemu-img"
)]
fn exfat_hostile() {
    if !exfat_tools() {
        return;
    }
    let fs = build_exfat(16 * MIB, 15);
    let pristine = std::fs::read(&fs.img).unwrap();
    let reset = || std::fs::write(&fs.img, &pristine).unwrap();
    // VolumeDirty (VolumeFlags bit 1, outside the boot checksum).
    patch(&fs.img, 106, &[2]);
    assert_skipped(&fs.img, "VolumeDirty");
    reset();
    // A boot sector field changed behind the boot checksum.
    patch(&fs.img, 100, b"\x01");
    assert_skipped(&fs.img, "boot checksum");
    reset();
    // The bitmap marking its own cluster free.
    let g = exfat_geometry(&fs.img);
    let off = g.heap + (g.bitmap - 2) * g.cluster + (g.bitmap - 2) / 8;
    let b = read(&fs.img, off, 1)[0];
    patch(&fs.img, off, &[b & !(1 << ((g.bitmap - 2) % 8))]);
    assert_skipped(&fs.img, "allocation bitmap marks cluster");
    reset();
    assert_eq!(scan_only(&fs.img).0.skipped, None);
}

#[test]
#[cfg_attr(
    any(no_dosfs, no_qemu),
    ignore = "needs dosfstools, mtools and qemu-img"
)]
fn scan_reads_the_fats_only_and_survives_corruption() {
    if !tools() {
        return;
    }
    let fs = build(&["-F", "32", "-s", "1"], 40 * MIB, 4 << 20, 12);
    let g = minfo(&fs.img);
    let (read, free) = scan_reads(&fs.img);
    // Boot sector, backup, and both FATs: no file data. The other scanners' probes of
    // the partition table and their own signatures (swap's page ends up to 64 KiB, the
    // LVM label, XFS and NTFS superblocks) add a bounded few blocks.
    assert!(free > 30 * MIB, "{free}");
    assert!(read <= 2 * g.fat_bytes + (128 << 10), "read {read} bytes");
    // Flips in the boot sector and the FATs: never a panic; most are caught.
    let span = g.fat_offset + 2 * g.fat_bytes;
    let skipped = scan_survives_corruption(&fs.img, &[(0, 512), (0, span)], 200, 3);
    assert!(skipped > 0);
    let fs = build(&["-F", "12"], 6 * MIB, 1 << 20, 13);
    let g = minfo(&fs.img);
    scan_survives_corruption(&fs.img, &[(0, 512), (0, g.data)], 200, 4);
}
