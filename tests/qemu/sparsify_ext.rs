//! Sparsify of ext2/ext3/ext4 built by the real tools (mkfs, debugfs), checked by them
//! (dumpe2fs's free extents, e2fsck, debugfs dump) and by qemu-img (map, convert).
//!
//! Every test fills the free blocks that dumpe2fs reports with junk, then sparsifies to
//! qcow2 through the library and checks: bytes outside those extents unchanged; the
//! extents' whole granules zero and unallocated; e2fsck clean; files identical; the free
//! bytes found equal to dumpe2fs's (granule-rounded). Hostile cases must be Skipped with a
//! reason naming the field, and nothing dropped.

use crate::common::guestfs;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::common::mounts::umount_retry;
use guestfs::*;

const TOOLS: &[&str] = &["mkfs.ext4", "debugfs", "dumpe2fs", "e2fsck", "qemu-img"];

fn tools() -> bool {
    have(TOOLS, !cfg!(no_e2fsprogs) && !cfg!(no_qemu))
}

/// dumpe2fs's "Free blocks:" lines, as byte extents.
fn dumpe2fs_free(img: &Path) -> Vec<(u64, u64)> {
    let text = run(&["dumpe2fs", s(img)]);
    let bs: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .expect("block size")
        .trim()
        .parse()
        .unwrap();
    // With bigalloc a range ends at the first block of its last free cluster.
    let cluster: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Cluster size:"))
        .map_or(bs, |v| v.trim().parse().unwrap());
    let ratio = cluster / bs;
    let mut out = Vec::new();
    for l in text.lines() {
        // The group lines are indented; the header's "Free blocks:" is the count.
        let Some(list) = l.strip_prefix("  Free blocks:") else {
            continue;
        };
        for item in list.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (a, b) = match item.split_once('-') {
                Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
                None => {
                    let a = item.parse::<u64>().unwrap();
                    (a, a)
                }
            };
            let b = (b / ratio + 1) * ratio - 1;
            out.push((a * bs, (b - a + 1) * bs));
        }
    }
    out
}

fn dumpe2fs_field(img: &Path, field: &str) -> String {
    let text = run(&["dumpe2fs", "-h", s(img)]);
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} not in dumpe2fs -h"))
        .trim()
        .to_string()
}

struct Fs {
    dir: tempfile::TempDir,
    img: PathBuf,
    files: Vec<(String, Vec<u8>)>,
}

fn debugfs_w(img: &Path, cmds: &str, dir: &Path) {
    let f = dir.join("debugfs.cmds");
    std::fs::write(&f, cmds).unwrap();
    let (code, out) = run_status(&["debugfs", "-w", "-f", s(&f), s(img)]);
    assert_eq!(code, 0, "debugfs: {out}");
    assert!(
        !out.contains("rror") && !out.contains("not found"),
        "debugfs: {out}"
    );
}

fn e2fsck_clean(img: &Path) {
    let (code, out) = run_status(&["e2fsck", "-fn", s(img)]);
    assert_eq!(code, 0, "e2fsck -fn {}: {out}", img.display());
}

/// Make a filesystem with `mkfs` (its arguments, then the image), write four files and
/// a large one, and delete the large one (its blocks are free but still hold data).
fn build(mkfs: &[&str], size: u64, seed: u64) -> Fs {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    sparse_file(&img, size);
    let mut cmd: Vec<&str> = mkfs.to_vec();
    cmd.extend(["-q", "-F", s(&img)]);
    run(&cmd);
    let mut rng = Rng(seed);
    let files: Vec<(String, Vec<u8>)> = [("a", 5000usize), ("b", 300 << 10), ("c", 1536 << 10)]
        .iter()
        .map(|&(n, len)| (n.to_string(), rng.bytes(len)))
        .collect();
    let mut cmds = String::new();
    let big = dir.path().join("big");
    std::fs::write(&big, rng.bytes(6 << 20)).unwrap();
    cmds += &format!("write {} big\n", s(&big));
    for (n, data) in &files {
        let p = dir.path().join(format!("host-{n}"));
        std::fs::write(&p, data).unwrap();
        cmds += &format!("write {} {n}\n", s(&p));
    }
    cmds += "rm big\n";
    debugfs_w(&img, &cmds, dir.path());
    e2fsck_clean(&img);
    Fs { dir, img, files }
}

/// Fill, sparsify, check everything; returns the free bytes found.
fn roundtrip(fs: &Fs, name: &str) -> u64 {
    let free = dumpe2fs_free(&fs.img);
    fill_junk(&fs.img, &free, 0x5eed);
    e2fsck_clean(&fs.img);
    let sp = sparsify(&fs.img, &fs.dir.path().join("out.qcow2"));
    let p = &sp.partitions[0];
    assert_eq!(p.filesystem.as_deref(), Some(name), "{p:?}");
    assert_eq!(p.skipped, None, "{p:?}");
    let back = assert_sparsified(&fs.img, &sp, &free, fs.dir.path());
    e2fsck_clean(&back);
    for (n, data) in &fs.files {
        let out = fs.dir.path().join(format!("dumped-{n}"));
        run(&["debugfs", "-R", &format!("dump /{n} {}", s(&out)), s(&back)]);
        assert!(std::fs::read(&out).unwrap() == *data, "file {n} differs");
    }
    // dumpe2fs's own free count agrees with what was dropped (within granule rounding).
    let bs: u64 = dumpe2fs_field(&fs.img, "Block size:").parse().unwrap();
    let free_blocks: u64 = dumpe2fs_field(&fs.img, "Free blocks:").parse().unwrap();
    let tool_free = free_blocks * bs;
    let extents = free.len() as u64;
    assert!(
        sp.free_bytes <= tool_free && tool_free - sp.free_bytes <= extents * 2 * sp.granule,
        "found {} free, dumpe2fs says {tool_free}",
        sp.free_bytes
    );
    sp.free_bytes
}

const MIB: u64 = 1 << 20;

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_default_metadata_csum_64bit_flex_bg_uninit() {
    if !tools() {
        return;
    }
    // -g 1024: 8 groups of 4 MiB, most of them BLOCK_UNINIT, their bitmaps in group 0.
    let fs = build(&["mkfs.ext4", "-b", "4096", "-g", "1024"], 32 * MIB, 1);
    let f = dumpe2fs_field(&fs.img, "Filesystem features:");
    for feat in ["metadata_csum", "64bit", "flex_bg"] {
        assert!(f.contains(feat), "{f}");
    }
    assert!(run(&["dumpe2fs", s(&fs.img)]).contains("BLOCK_UNINIT"));
    let free = roundtrip(&fs, "ext4");
    assert!(free > 16 * MIB, "{free}");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_uninit_bg_crc16_without_metadata_csum() {
    if !tools() {
        return;
    }
    let fs = build(
        &[
            "mkfs.ext4",
            "-b",
            "4096",
            "-g",
            "1024",
            "-O",
            "^metadata_csum,uninit_bg",
        ],
        32 * MIB,
        2,
    );
    assert!(dumpe2fs_field(&fs.img, "Filesystem features:").contains("uninit_bg"));
    roundtrip(&fs, "ext4");
    // 32-byte descriptors with crc16.
    let fs = build(
        &[
            "mkfs.ext4",
            "-b",
            "2048",
            "-g",
            "2048",
            "-O",
            "^64bit,^metadata_csum,uninit_bg",
        ],
        24 * MIB,
        22,
    );
    roundtrip(&fs, "ext4");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_1k_blocks_32bit_descriptors() {
    if !tools() {
        return;
    }
    // 1 KiB blocks: the first data block is 1 and groups straddle 4 KiB granules.
    let fs = build(&["mkfs.ext4", "-b", "1024", "-O", "^64bit"], 32 * MIB, 3);
    roundtrip(&fs, "ext4");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext2_and_ext3() {
    if !tools() {
        return;
    }
    let fs = build(&["mkfs.ext2", "-b", "4096", "-g", "1024"], 24 * MIB, 4);
    roundtrip(&fs, "ext2");
    let fs = build(&["mkfs.ext3", "-b", "2048"], 24 * MIB, 5);
    roundtrip(&fs, "ext3");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_meta_bg() {
    if !tools() {
        return;
    }
    let fs = build(
        &[
            "mkfs.ext4",
            "-b",
            "1024",
            "-g",
            "1024",
            "-O",
            "meta_bg,^resize_inode",
        ],
        24 * MIB,
        6,
    );
    roundtrip(&fs, "ext4");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_sparse_super2() {
    if !tools() {
        return;
    }
    let fs = build(
        &[
            "mkfs.ext4",
            "-b",
            "4096",
            "-g",
            "1024",
            "-O",
            "sparse_super2",
        ],
        24 * MIB,
        7,
    );
    roundtrip(&fs, "ext4");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_bigalloc() {
    if !tools() {
        return;
    }
    let fs = build(
        &["mkfs.ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"],
        32 * MIB,
        8,
    );
    roundtrip(&fs, "ext4");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_64k_blocks() {
    if !tools() {
        return;
    }
    let fs = build(&["mkfs.ext4", "-b", "65536"], 32 * MIB, 9);
    roundtrip(&fs, "ext4");
}

// ---- hostile -------------------------------------------------------------------------

fn small() -> Fs {
    build(&["mkfs.ext4", "-b", "4096", "-g", "1024"], 16 * MIB, 11)
}

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

/// The first "NAME at N" of dumpe2fs for group `g`.
fn group_field(img: &Path, g: u64, name: &str) -> u64 {
    let text = run(&["dumpe2fs", s(img)]);
    let start = text.find(&format!("\nGroup {g}:")).unwrap();
    let rest = &text[start..];
    let i = rest.find(name).unwrap() + name.len();
    rest[i..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Mark `n` blocks from `block` free in the bitmap (of `small()`: 1024 blocks a group)
/// with every count and checksum kept consistent, so only the metadata check can tell.
fn free_consistently(fs: &Fs, block: u64, n: u64) {
    let g = block / 1024;
    let text = run(&["dumpe2fs", s(&fs.img)]);
    let sect = &text[text.find(&format!("\nGroup {g}:")).unwrap() + 1..];
    let line = sect.lines().find(|l| l.contains(" free blocks, ")).unwrap();
    let gfree: u64 = line.trim().split(' ').next().unwrap().parse().unwrap();
    let sfree: u64 = dumpe2fs_field(&fs.img, "Free blocks:").parse().unwrap();
    // Clear BLOCK_UNINIT (else the bitmap is not written), keep the other flags.
    let head = sect.lines().next().unwrap();
    let flags = [("INODE_UNINIT", 1), ("ITABLE_ZEROED", 4)]
        .iter()
        .filter(|f| head.contains(f.0))
        .map(|f| f.1)
        .sum::<u32>();
    let cmds = format!(
        "set_bg {g} flags {flags}\nfreeb {block} {n}\nset_bg {g} free_blocks_count {}\n\
         set_bg {g} checksum calc\nssv free_blocks_count {}\n",
        gfree + n,
        sfree + n
    );
    debugfs_w(&fs.img, &cmds, fs.dir.path());
    let (_, out) = run_status(&["debugfs", "-R", &format!("testb {block}"), s(&fs.img)]);
    assert!(out.contains("not in use"), "{out}");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn corrupt_block_bitmap_checksum_is_skipped() {
    if !tools() {
        return;
    }
    let fs = small();
    let bb = group_field(&fs.img, 0, "Block bitmap at");
    let off = bb * 4096 + 100;
    let b = read(&fs.img, off, 1)[0];
    patch(&fs.img, off, &[b ^ 0x10]);
    assert_skipped(&fs.img, "bg_block_bitmap_csum");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn bitmap_claiming_its_metadata_free_is_skipped() {
    if !tools() {
        return;
    }
    // debugfs freeb keeps every count and checksum consistent: only the metadata check
    // can catch it.
    let fs = small();
    let it = group_field(&fs.img, 2, "Inode table at");
    free_consistently(&fs, it, 4);
    let p = assert_skipped(&fs.img, "inode table");
    assert!(p.skipped.unwrap().contains("group 2"));

    let fs = small();
    let bb = group_field(&fs.img, 3, "Block bitmap at");
    free_consistently(&fs, bb, 1);
    assert_skipped(&fs.img, "block bitmap (block");

    // The backup superblock of group 1 (a BLOCK_UNINIT group until then).
    let fs = small();
    free_consistently(&fs, 1024, 1);
    assert_skipped(&fs.img, "superblock and group descriptors");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn unclean_filesystems_are_skipped() {
    if !tools() {
        return;
    }
    let fs = small();
    debugfs_w(&fs.img, "feature needs_recovery\n", fs.dir.path());
    assert_skipped(&fs.img, "needs_recovery");

    let fs = small();
    debugfs_w(&fs.img, "ssv state 0\n", fs.dir.path());
    assert_skipped(&fs.img, "s_state");

    let fs = small();
    debugfs_w(&fs.img, "ssv state 3\n", fs.dir.path());
    assert_skipped(&fs.img, "errors");

    // A journal whose superblock says transactions wait (s_start != 0).
    let fs = small();
    let out = run(&["debugfs", "-R", "bmap <8> 0", s(&fs.img)]);
    let jblk: u64 = out.trim().parse().unwrap();
    patch(&fs.img, jblk * 4096 + 28, &1u32.to_be_bytes());
    assert_skipped(&fs.img, "not yet replayed");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn disagreeing_counts_and_checksums_are_skipped() {
    if !tools() {
        return;
    }
    let fs = small();
    debugfs_w(
        &fs.img,
        "set_bg 1 free_blocks_count 7\nset_bg 1 checksum calc\n",
        fs.dir.path(),
    );
    assert_skipped(&fs.img, "bg_free_blocks_count");

    let fs = small();
    debugfs_w(&fs.img, "ssv free_blocks_count 100\n", fs.dir.path());
    assert_skipped(&fs.img, "s_free_blocks_count");

    // The volume name changed behind the checksum's back.
    let fs = small();
    patch(&fs.img, 1024 + 0x78, b"X");
    assert_skipped(&fs.img, "s_checksum");

    // An unknown incompat feature (dirdata, 0x1000) is refused before the checksum.
    let fs = small();
    let inc = u32::from_le_bytes(read(&fs.img, 1024 + 0x60, 4).try_into().unwrap());
    patch(&fs.img, 1024 + 0x60, &(inc | 0x1000).to_le_bytes());
    assert_skipped(&fs.img, "unknown incompat");

    // A group descriptor changed behind its checksum (crc32c, then crc16).
    for opts in ["metadata_csum", "^metadata_csum,uninit_bg"] {
        let fs = build(
            &["mkfs.ext4", "-b", "4096", "-g", "1024", "-O", opts],
            16 * MIB,
            12,
        );
        // Group 2's bg_itable_unused_lo (offset 0x1C) in the GDT at block 1.
        let text = run(&["dumpe2fs", "-h", s(&fs.img)]);
        let desc: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Group descriptor size:"))
            .map_or(32, |v| v.trim().parse().unwrap());
        let off = 4096 + 2 * desc + 0x1C;
        let b = read(&fs.img, off, 1)[0];
        patch(&fs.img, off, &[b ^ 1]);
        assert_skipped(&fs.img, "bg_checksum");
    }
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn filesystem_larger_than_its_disk_is_skipped() {
    if !tools() {
        return;
    }
    let fs = small();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fs.img)
        .unwrap();
    f.set_len(12 * MIB).unwrap();
    assert_skipped(&fs.img, "larger than its region");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn scan_reads_metadata_only() {
    if !tools() {
        return;
    }
    let fs = build(&["mkfs.ext4", "-b", "4096", "-g", "1024"], 64 * MIB, 13);
    let (read, free) = scan_reads(&fs.img);
    // Superblock, descriptors, 16 bitmaps, the journal's superblock: no file data.
    assert!(free > 40 * MIB, "{free}");
    assert!(read < 256 << 10, "read {read} bytes");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn corrupted_metadata_never_changes_what_is_free() {
    if !tools() {
        return;
    }
    // With metadata_csum every structure the scan trusts is checksummed: whatever bytes
    // of the metadata area are flipped, the scan either gives the same free space or
    // skips the filesystem, and never panics.
    let fs = small();
    let dev = open(&fs.img);
    let want: Vec<(u64, u64)> = diskconv::guest::scan(dev.as_ref())
        .unwrap()
        .free
        .runs()
        .collect();
    drop(dev);
    assert!(!want.is_empty());
    // The superblock, the descriptors, the 4 block bitmaps, the journal's superblock.
    let bb = group_field(&fs.img, 0, "Block bitmap at");
    let out = run(&["debugfs", "-R", "bmap <8> 0", s(&fs.img)]);
    let jblk: u64 = out.trim().parse().unwrap();
    let targets = [
        (1024, 1024),
        (4096, 4096),
        (bb * 4096, 4 * 4096),
        (jblk * 4096, 1024),
    ];
    let skipped = scan_survives_corruption_with(&fs.img, &targets, 300, 5, |free| {
        assert_eq!(free, want, "a corrupted image scanned to other free space");
    });
    assert!(skipped > 100, "{skipped} of 300 skipped");
}

/// Loop-mount `img` at `mnt`; false (the test is then skipped) where this machine cannot,
/// except under CI, where it must.
fn mount(img: &Path, mnt: &Path) -> bool {
    std::fs::create_dir_all(mnt).unwrap();
    let (code, out) = run_status(&["mount", "-o", "loop", s(img), s(mnt)]);
    if code != 0 {
        let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
        assert!(!ci, "loop mount failed under CI: {out}");
        eprintln!("loop mount failed, skipped: {out}");
        return false;
    }
    true
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_written_by_the_kernel() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    sparse_file(&img, 64 * MIB);
    run(&["mkfs.ext4", "-q", "-F", s(&img)]);
    let mnt = dir.path().join("mnt");
    if !mount(&img, &mnt) {
        return;
    }
    let mut rng = Rng(21);
    let files: Vec<(String, Vec<u8>)> = [("k1", 3 << 20), ("k2", 70 << 10)]
        .iter()
        .map(|&(n, len)| (n.to_string(), rng.bytes(len)))
        .collect();
    std::fs::write(mnt.join("big"), rng.bytes(20 << 20)).unwrap();
    for (n, data) in &files {
        std::fs::write(mnt.join(n), data).unwrap();
    }
    run(&["sync"]);
    std::fs::remove_file(mnt.join("big")).unwrap();
    run(&["sync"]);
    // A copy taken while mounted: the journal is live (needs_recovery).
    let live = dir.path().join("live.img");
    std::fs::copy(&img, &live).unwrap();
    umount_retry(&mnt);
    assert_skipped(&live, "needs_recovery");

    let fs = Fs { dir, img, files };
    e2fsck_clean(&fs.img);
    let free = roundtrip(&fs, "ext4");
    assert!(free > 40 * MIB, "{free}");
}

#[test]
#[cfg_attr(any(no_e2fsprogs, no_qemu), ignore = "needs e2fsprogs and qemu-img")]
fn ext4_mmp_clean_then_in_use() {
    if !tools() {
        return;
    }
    let fs = build(
        &["mkfs.ext4", "-b", "4096", "-g", "1024", "-O", "mmp"],
        16 * MIB,
        16,
    );
    roundtrip(&fs, "ext4");
    let fs = build(
        &["mkfs.ext4", "-b", "4096", "-g", "1024", "-O", "mmp"],
        16 * MIB,
        17,
    );
    let mmp: u64 = dumpe2fs_field(&fs.img, "MMP block number:")
        .parse()
        .unwrap();
    patch(&fs.img, mmp * 4096 + 4, &7u32.to_le_bytes());
    assert_skipped(&fs.img, "mmp_seq");
}
