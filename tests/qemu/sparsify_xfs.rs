//! Sparsify of XFS: a real filesystem made by mkfs.xfs, files written through a loop
//! mount, a fragmenting pattern of small files and two large files deleted; the free
//! extents `xfs_db freesp -d` reports filled with junk. The scan must drop exactly the
//! free-space trees' extents, the output must pass `xfs_repair -n` and give the kept
//! files back; a dirty log, a bad AGF magic or CRC, a tree record outside its AG, a tree
//! block failing its CRC and sb_inprogress drop nothing.

use crate::common;
use crate::common::guestfs_nx as guestfs;

use std::path::{Path, PathBuf};

use crate::common::mounts::umount_retry;
use common::{run, s, sha256_file, Rng};
use guestfs::*;

const MIB: u64 = 1 << 20;

fn have_xfs() -> bool {
    have("mkfs.xfs", "xfsprogs", cfg!(no_xfs))
        && have("xfs_db", "xfsprogs", cfg!(no_xfs))
        && have("xfs_repair", "xfsprogs", cfg!(no_xfs))
}

fn write_random(path: &Path, len: u64, seed: u64) {
    let mut v = vec![0u8; len as usize];
    Rng(seed | 1).fill(&mut v);
    std::fs::write(path, v).unwrap();
}

/// `xfs_db -r` commands, output.
fn xfs_db(img: &Path, cmds: &[&str]) -> String {
    let mut args = vec!["xfs_db", "-r"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run(&args)
}

/// `name = value` fields of an xfs_db print.
fn field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} = ")))
        .map(|v| {
            let v = v.trim();
            match v.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16).unwrap(),
                None => v.parse().unwrap(),
            }
        })
        .unwrap_or_else(|| panic!("xfs_db printed no {name}: {text}"))
}

struct Geo {
    bs: u64,
    agblocks: u64,
    agcount: u64,
}

fn geometry(img: &Path) -> Geo {
    let t = xfs_db(img, &["sb 0", "print blocksize agblocks agcount"]);
    Geo {
        bs: field(&t, "blocksize"),
        agblocks: field(&t, "agblocks"),
        agcount: field(&t, "agcount"),
    }
}

/// The free extents xfs_db reports (the free-space trees and the AG free lists), bytes.
fn tool_free(img: &Path, g: &Geo) -> Vec<(u64, u64)> {
    let t = xfs_db(img, &["freesp -d"]);
    let mut v = Vec::new();
    for l in t.lines() {
        let n: Vec<u64> = l
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if n.len() == 3 && l.split_whitespace().count() == 3 {
            v.push(((n[0] * g.agblocks + n[1]) * g.bs, n[2] * g.bs));
        }
    }
    assert!(!v.is_empty(), "freesp -d listed nothing: {t}");
    merge(v)
}

/// Sum over the AGFs of (freeblks, flcount), in blocks.
fn agf_counts(img: &Path, g: &Geo) -> (u64, u64) {
    let (mut free, mut fl) = (0, 0);
    for ag in 0..g.agcount {
        let t = xfs_db(img, &[&format!("agf {ag}"), "print freeblks flcount"]);
        free += field(&t, "freeblks");
        fl += field(&t, "flcount");
    }
    (free, fl)
}

fn mount(img: &Path, mnt: &Path, ro: bool) {
    std::fs::create_dir_all(mnt).unwrap();
    let opts = if ro { "loop,ro" } else { "loop" };
    run(&["mount", "-o", opts, s(img), s(mnt)]);
}

fn umount(mnt: &Path) {
    umount_retry(mnt);
}

/// An XFS filesystem (300 MiB, mkfs's minimum) holding `keep1`, `keep2` and 600 small
/// files, after 40 + 10 MiB of large files and 600 interleaved small ones were deleted
/// (enough free extents in AG 0 for a two-level by-bno tree); returns the kept files'
/// digests.
fn build(p: &dyn Fn(&str) -> PathBuf, img: &Path, mkfs: &[&str]) -> Vec<(String, String)> {
    std::fs::File::create(img)
        .unwrap()
        .set_len(300 * MIB)
        .unwrap();
    let mut args = vec!["mkfs.xfs", "-q", "-f"];
    args.extend_from_slice(mkfs);
    args.push(s(img));
    run(&args);
    let mnt = p("mnt");
    mount(img, &mnt, false);
    write_random(&mnt.join("keep1"), 3 * MIB + 5, 1);
    write_random(&mnt.join("del1"), 40 * MIB, 2);
    let small = mnt.join("small");
    std::fs::create_dir(&small).unwrap();
    for i in 0..1200u64 {
        write_random(&small.join(i.to_string()), 4096 * (1 + i % 3), 100 + i);
    }
    write_random(&mnt.join("keep2"), MIB + 9, 3);
    write_random(&mnt.join("del2"), 10 * MIB, 4);
    run(&["sync"]);
    std::fs::remove_file(mnt.join("del1")).unwrap();
    std::fs::remove_file(mnt.join("del2")).unwrap();
    for i in (0..1200u64).step_by(2) {
        std::fs::remove_file(small.join(i.to_string())).unwrap();
    }
    let mut kept = vec![
        ("keep1".to_string(), sha256_file(&mnt.join("keep1"))),
        ("keep2".to_string(), sha256_file(&mnt.join("keep2"))),
    ];
    for i in (1..1200u64).step_by(2).step_by(50) {
        let name = format!("small/{i}");
        kept.push((name.clone(), sha256_file(&mnt.join(&name))));
    }
    umount(&mnt);
    kept
}

fn sparsify_and_check(p: &dyn Fn(&str) -> PathBuf, img: &Path, kept: &[(String, String)]) {
    let g = geometry(img);
    let free = tool_free(img, &g);
    let (freeblks, flcount) = agf_counts(img, &g);
    assert_eq!(
        total(&free),
        (freeblks + flcount) * g.bs,
        "freesp vs the AGFs"
    );
    assert!(total(&free) > 50 * MIB);
    fill_junk(img, &free, 9);
    let out = p("out.raw");
    let found = sparsify_to(img, &out);
    let part = &found.partitions[0];
    assert_eq!(part.filesystem.as_deref(), Some("xfs"), "{part:?}");
    assert_eq!(part.skipped, None, "{part:?}");
    // The trees' extents, not the free lists: exactly the AGFs' freeblks when blocks are
    // granules; with smaller blocks, less the partial granules at each extent's ends.
    let granule = found.free.granule();
    if g.bs >= granule {
        assert_eq!(part.free_bytes, freeblks * g.bs);
    } else {
        let extents = xfs_db(img, &["freesp -d"]).lines().count() as u64;
        assert!(part.free_bytes <= freeblks * g.bs);
        assert!(
            part.free_bytes + 2 * extents * granule >= freeblks * g.bs,
            "{} of {} free bytes found",
            part.free_bytes,
            freeblks * g.bs
        );
    }
    check_output(img, &out, &free, &found);
    let (ok, text) = try_run(&["xfs_repair", "-n", s(&out)]);
    assert!(ok, "xfs_repair -n on the output: {text}");
    let mnt = p("mnt-out");
    mount(&out, &mnt, true);
    for (name, sha) in kept {
        assert_eq!(&sha256_file(&mnt.join(name)), sha, "{name} reads back");
    }
    umount(&mnt);
    // The same filesystem as a partition 3 MiB into a disk: the same free runs, relative.
    let disk = p("disk.img");
    embed(img, &disk, 3 * MIB, MIB);
    let (report, runs) = scan_at(&disk, 3 * MIB, 300 * MIB);
    assert_eq!(report.skipped, None, "{report:?}");
    assert_eq!(runs, found.free.runs().collect::<Vec<_>>());
}

#[test]
#[cfg_attr(no_xfs, ignore = "needs xfsprogs (mkfs.xfs, xfs_db, xfs_repair)")]
fn deleted_files_are_dropped_and_the_filesystem_stays_clean() {
    if !have_xfs() {
        return;
    }
    let (_d, p) = tmp();
    let img = p("xfs.img");
    let kept = build(&p, &img, &[]);
    // The fragmenting deletes made AG 0's by-bno tree two levels deep.
    let t = xfs_db(&img, &["agf 0", "print bnolevel"]);
    assert!(field(&t, "bnolevel") >= 2, "{t}");
    sparsify_and_check(&p, &img, &kept);
}

#[test]
#[cfg_attr(no_xfs, ignore = "needs xfsprogs (mkfs.xfs, xfs_db, xfs_repair)")]
fn small_blocks_and_large_sectors() {
    if !have_xfs() {
        return;
    }
    // 1 KiB blocks (smaller than a granule) and then 4 KiB sectors (AGF at 4 KiB).
    for (name, mkfs) in [
        ("b1k", &["-b", "size=1024"][..]),
        ("s4k", &["-s", "size=4096"][..]),
    ] {
        let (_d, p) = tmp();
        let img = p(name);
        let kept = build(&p, &img, mkfs);
        sparsify_and_check(&p, &img, &kept);
    }
}

#[test]
#[cfg_attr(no_xfs, ignore = "needs xfsprogs (mkfs.xfs, xfs_db, xfs_repair)")]
fn v4_filesystem_without_crcs() {
    if !have_xfs() {
        return;
    }
    let (_d, p) = tmp();
    // This kernel mounts no v4 XFS: the files come from a mkfs.xfs prototype instead.
    let dir = p("src");
    std::fs::create_dir(&dir).unwrap();
    for (i, len) in [(1, 2 * MIB + 3), (2, 300_000), (3, 5 * MIB)] {
        write_random(&dir.join(format!("f{i}")), len, i);
    }
    let proto = p("proto");
    let mut spec = String::from("/dev/null\n0 0\nd--755 0 0\n");
    for i in 1..=3 {
        spec += &format!("f{i} ---644 0 0 {}\n", s(&dir.join(format!("f{i}"))));
    }
    spec += "$\n";
    std::fs::write(&proto, spec).unwrap();
    let img = p("xfs4.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 * MIB)
        .unwrap();
    run(&[
        "mkfs.xfs",
        "-q",
        "-f",
        "-m",
        "crc=0",
        "-p",
        s(&proto),
        s(&img),
    ]);
    let t = xfs_db(&img, &["sb 0", "print versionnum"]);
    assert_eq!(field(&t, "versionnum") & 0xf, 4, "{t}");
    let g = geometry(&img);
    let free = tool_free(&img, &g);
    let (freeblks, _) = agf_counts(&img, &g);
    fill_junk(&img, &free, 5);
    let out = p("out.raw");
    let found = sparsify_to(&img, &out);
    let part = &found.partitions[0];
    assert_eq!(part.skipped, None, "{part:?}");
    assert_eq!(part.free_bytes, freeblks * g.bs);
    check_output(&img, &out, &free, &found);
    let (ok, text) = try_run(&["xfs_repair", "-n", s(&out)]);
    assert!(ok, "xfs_repair -n on the output: {text}");
}

/// Re-seal a v5 metadata block's CRC32C after a patch.
fn reseal(img: &Path, at: u64, len: usize, crc_off: usize) {
    let mut b = peek(img, at, len);
    b[crc_off..crc_off + 4].fill(0);
    let crc = crc32c::crc32c(&b);
    patch(img, at + crc_off as u64, &crc.to_le_bytes());
}

#[test]
#[cfg_attr(no_xfs, ignore = "needs xfsprogs (mkfs.xfs, xfs_db, xfs_repair)")]
fn hostile_filesystems_drop_nothing() {
    if !have_xfs() {
        return;
    }
    let (_d, p) = tmp();
    let img = p("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 * MIB)
        .unwrap();
    run(&["mkfs.xfs", "-q", "-f", s(&img)]);
    let mnt = p("mnt");
    mount(&img, &mnt, false);
    write_random(&mnt.join("a"), 8 * MIB, 1);
    umount(&mnt);
    let clean = scan(&img);
    assert_eq!(clean.partitions[0].skipped, None, "{:?}", clean.partitions);
    assert!(clean.free.free_bytes() > 100 * MIB);
    let g = geometry(&img);
    let ss = 512u64;
    let ag = |n: u64| n * g.agblocks * g.bs;

    // A dirty log: the filesystem shut down with writes in flight, never unmounted cleanly.
    let dirty = p("dirty.img");
    copy(&img, &dirty);
    mount(&dirty, &mnt, false);
    write_random(&mnt.join("b"), MIB, 2);
    std::fs::create_dir(mnt.join("d")).unwrap();
    // -f: the log is forced to disk first, so it holds transactions and no unmount record.
    run(&["xfs_io", "-x", "-c", "shutdown -f", s(&mnt)]);
    umount(&mnt);
    let (ok, text) = try_run(&["xfs_repair", "-n", s(&dirty)]);
    assert!(!ok, "xfs_repair -n accepts the dirty log: {text}");
    assert_skipped(&scan(&dirty), "xfs", "log");
    let out = p("dirty.out");
    sparsify_to(&dirty, &out);
    assert_eq!(sha256_file(&out), sha256_file(&dirty), "nothing changed");

    // AG 1's AGF with a bad magic.
    let magic = p("magic.img");
    copy(&img, &magic);
    patch(&magic, ag(1) + ss, b"XAGX");
    assert_skipped(&scan(&magic), "xfs", "not XAGF");

    // AG 2's AGF failing its CRC (a spare byte changed).
    let crc = p("crc.img");
    copy(&img, &crc);
    patch(&crc, ag(2) + ss + 0x70, &[1]);
    assert_skipped(&scan(&crc), "xfs", "AGF of AG 2 fails its CRC32C");

    // AG 0's by-bno leaf with a record running past the AG (CRC re-sealed).
    let t = xfs_db(&img, &["agf 0", "print bnoroot bnolevel"]);
    assert_eq!(field(&t, "bnolevel"), 1);
    let root = ag(0) + field(&t, "bnoroot") * g.bs;
    let outside = p("outside.img");
    copy(&img, &outside);
    patch(
        &outside,
        root + 56 + 4,
        &(g.agblocks as u32 + 7).to_be_bytes(),
    );
    reseal(&outside, root, g.bs as usize, 0x34);
    assert_skipped(&scan(&outside), "xfs", "outside the AG");

    // The same leaf failing its CRC.
    let torn = p("torn.img");
    copy(&img, &torn);
    patch(&torn, root + 56 + 3, &[0x40]);
    assert_skipped(&scan(&torn), "xfs", "fails its CRC32C");

    // A record covering the leaf itself (the tree calling its own block free).
    let own = p("own.img");
    copy(&img, &own);
    let rec = peek(&own, root + 56, 8);
    let start = u32::from_be_bytes(rec[0..4].try_into().unwrap()) as u64;
    let bno = field(&t, "bnoroot");
    assert!(bno < start, "the root lies before the first free extent");
    let len = u32::from_be_bytes(rec[4..8].try_into().unwrap()) as u64 + (start - bno);
    patch(&own, root + 56, &(bno as u32).to_be_bytes());
    patch(&own, root + 60, &(len as u32).to_be_bytes());
    reseal(&own, root, g.bs as usize, 0x34);
    // ...the by-size tree saying the same (its leaf holds the same record)...
    let cnt = ag(0) + field(&xfs_db(&img, &["agf 0", "print cntroot"]), "cntroot") * g.bs;
    let leaf = peek(&own, cnt, g.bs as usize);
    let n = u16::from_be_bytes([leaf[6], leaf[7]]) as usize;
    let i = (0..n)
        .find(|&i| leaf[56 + 8 * i..56 + 8 * i + 8] == rec[..])
        .expect("the by-size leaf holds the record");
    let mut moved = (bno as u32).to_be_bytes().to_vec();
    moved.extend_from_slice(&(len as u32).to_be_bytes());
    patch(&own, cnt + 56 + 8 * i as u64, &moved);
    reseal(&own, cnt, g.bs as usize, 0x34);
    // ...and the AGF's count agreeing, so only the metadata check can catch it.
    let agf = ag(0) + ss;
    let freeblks = u32::from_be_bytes(peek(&own, agf + 0x34, 4).try_into().unwrap());
    patch(
        &own,
        agf + 0x34,
        &(freeblks + (start - bno) as u32).to_be_bytes(),
    );
    reseal(&own, agf, ss as usize, 0xd8);
    assert_skipped(&scan(&own), "xfs", &format!("covers metadata block {bno}"));

    // The by-block tree losing a block of an extent, its AGF agreeing: the by-size tree
    // no longer does.
    let shrunk = p("shrunk.img");
    copy(&img, &shrunk);
    let count = u32::from_be_bytes(rec[4..8].try_into().unwrap());
    patch(&shrunk, root + 60, &(count - 1).to_be_bytes());
    reseal(&shrunk, root, g.bs as usize, 0x34);
    let agf = ag(0) + ss;
    let freeblks = u32::from_be_bytes(peek(&shrunk, agf + 0x34, 4).try_into().unwrap());
    patch(&shrunk, agf + 0x34, &(freeblks - 1).to_be_bytes());
    reseal(&shrunk, agf, ss as usize, 0xd8);
    assert_skipped(&scan(&shrunk), "xfs", "the by-size tree holds");

    // sb_inprogress.
    let inprog = p("inprogress.img");
    copy(&img, &inprog);
    patch(&inprog, 0x7e, &[1]);
    reseal(&inprog, 0, ss as usize, 0xe0);
    assert_skipped(&scan(&inprog), "xfs", "inprogress");
}

#[test]
#[cfg_attr(no_xfs, ignore = "needs xfsprogs (mkfs.xfs, xfs_db, xfs_repair)")]
fn mutated_metadata_never_panics() {
    if !have_xfs() {
        return;
    }
    let (_d, p) = tmp();
    let img = p("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(300 * MIB)
        .unwrap();
    run(&["mkfs.xfs", "-q", "-f", s(&img)]);
    let g = geometry(&img);
    let t = xfs_db(
        &img,
        &["sb 0", "print logstart agblklog", "agf 1", "print bnoroot"],
    );
    let (logstart, agblklog) = (field(&t, "logstart"), field(&t, "agblklog"));
    let log_at = ((logstart >> agblklog) * g.agblocks + (logstart & ((1 << agblklog) - 1))) * g.bs;
    let targets = [
        (0, 512),
        (g.agblocks * g.bs + 512, 512),
        (g.agblocks * g.bs + field(&t, "bnoroot") * g.bs, 512),
        (log_at, 2048),
    ];
    let skipped = mutate_and_scan(&img, &targets, 300, 12);
    assert!(skipped > 100, "only {skipped} of 300 mutations were caught");
}
