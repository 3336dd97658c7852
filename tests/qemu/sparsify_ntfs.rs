//! Sparsify of NTFS: a real volume made by mkntfs, files written with ntfscp and through
//! an ntfs-3g mount, some deleted; the free clusters (read from `$Bitmap` by `ntfscat`,
//! counted by `ntfscluster`) filled with junk. The scan must drop exactly those, the
//! output must pass `ntfsfix -n` and give the kept files back; a dirty volume, a torn
//! MFT record, a bad record magic and a bitmap calling the MFT free drop nothing.

use crate::common;
use crate::common::guestfs_nx as guestfs;

use std::path::Path;

use crate::common::mounts::umount_retry;
use common::{run, s, sha256_file, Rng};
use guestfs::*;

const MIB: u64 = 1 << 20;

fn have_ntfs() -> bool {
    have("mkntfs", "ntfs-3g", cfg!(no_ntfs))
        && have("ntfs-3g", "ntfs-3g", cfg!(no_ntfs))
        && have("ntfscat", "ntfs-3g", cfg!(no_ntfs))
}

fn write_random(path: &Path, len: u64, seed: u64) {
    let mut v = vec![0u8; len as usize];
    Rng(seed | 1).fill(&mut v);
    std::fs::write(path, v).unwrap();
}

/// Geometry read back with ntfsinfo: (cluster size, clusters).
fn geometry(img: &Path) -> (u64, u64) {
    let info = run(&["ntfsinfo", "-m", s(img)]);
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .unwrap_or_else(|| panic!("ntfsinfo has no {name}: {info}"))
            .trim()
            .parse()
            .unwrap()
    };
    (field("Cluster Size:"), field("Volume Size in Clusters:"))
}

/// Free clusters as byte extents, from `$Bitmap` read by ntfs-3g's ntfscat.
fn tool_free(img: &Path) -> Vec<(u64, u64)> {
    let (cs, clusters) = geometry(img);
    let out = std::process::Command::new("ntfscat")
        .args([s(img), "$Bitmap"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let bm = out.stdout;
    assert!(bm.len() as u64 * 8 >= clusters);
    let mut v = Vec::new();
    for c in 0..clusters {
        if bm[(c / 8) as usize] & (1 << (c % 8)) == 0 {
            v.push((c * cs, cs));
        }
    }
    merge(v)
}

/// `ntfscluster`'s own count of free bytes.
fn ntfscluster_free(img: &Path) -> u64 {
    let info = run(&["ntfscluster", "-f", s(img)]);
    info.lines()
        .find_map(|l| l.strip_prefix("bytes of free space"))
        .and_then(|r| r.trim_start_matches([' ', ':']).trim().parse().ok())
        .unwrap_or_else(|| panic!("ntfscluster has no free count: {info}"))
}

/// An NTFS volume of `size` bytes holding `keep1` and `keep2`, after 20 + 6 MiB of other
/// files were written and deleted; returns the kept files' names and digests.
fn build(
    dir: &dyn Fn(&str) -> std::path::PathBuf,
    img: &Path,
    size: u64,
    mkntfs: &[&str],
) -> Vec<(String, String)> {
    std::fs::File::create(img).unwrap().set_len(size).unwrap();
    let mut args = vec!["mkntfs", "-F", "-Q", "-q"];
    args.extend_from_slice(mkntfs);
    args.push(s(img));
    run(&args);
    let k1 = dir("keep1");
    write_random(&k1, 3 * MIB + 123, 1);
    run(&["ntfscp", s(img), s(&k1), "keep1"]);
    let mnt = dir("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    run(&["ntfs-3g", s(img), s(&mnt)]);
    let unmount = |m: &Path| umount_retry(m);
    write_random(&mnt.join("del1"), 20 * MIB, 2);
    write_random(&mnt.join("keep2"), MIB + 7, 3);
    write_random(&mnt.join("del2"), 6 * MIB, 4);
    unmount(&mnt);
    run(&["ntfs-3g", s(img), s(&mnt)]);
    std::fs::remove_file(mnt.join("del1")).unwrap();
    std::fs::remove_file(mnt.join("del2")).unwrap();
    let k2 = sha256_file(&mnt.join("keep2"));
    unmount(&mnt);
    vec![("keep1".into(), sha256_file(&k1)), ("keep2".into(), k2)]
}

fn ntfscat_sha(img: &Path, name: &str, dir: &dyn Fn(&str) -> std::path::PathBuf) -> String {
    let out = std::process::Command::new("ntfscat")
        .args([s(img), name])
        .output()
        .unwrap();
    assert!(out.status.success(), "ntfscat {name}");
    let p = dir("cat.out");
    std::fs::write(&p, out.stdout).unwrap();
    sha256_file(&p)
}

#[test]
#[cfg_attr(no_ntfs, ignore = "needs ntfs-3g (mkntfs, ntfs-3g, ntfscat)")]
fn deleted_files_are_dropped_and_the_volume_stays_clean() {
    if have_ntfs() {
        roundtrip(&[]);
    }
}

#[test]
#[cfg_attr(no_ntfs, ignore = "needs ntfs-3g (mkntfs, ntfs-3g, ntfscat)")]
fn large_sectors_clusters_and_records() {
    // 4 KiB sectors (and so 4 KiB MFT records), 64 KiB clusters: coarser than a granule.
    if have_ntfs() {
        roundtrip(&["-s", "4096", "-c", "65536"]);
    }
}

fn roundtrip(mkntfs: &[&str]) {
    let (_d, p) = tmp();
    let img = p("ntfs.img");
    let kept = build(&p, &img, 64 * MIB, mkntfs);
    let free = tool_free(&img);
    assert_eq!(
        total(&free),
        ntfscluster_free(&img),
        "ntfscat's $Bitmap vs ntfscluster"
    );
    assert!(
        total(&free) > 25 * MIB,
        "the deleted files' clusters are free"
    );
    fill_junk(&img, &free, 7);
    let out = p("out.raw");
    let found = sparsify_to(&img, &out);
    let part = &found.partitions[0];
    assert_eq!(part.filesystem.as_deref(), Some("ntfs"), "{part:?}");
    assert_eq!(part.skipped, None, "{part:?}");
    // Clusters of 4 KiB or more and 4 KiB granules: every free cluster is dropped.
    assert_eq!(part.free_bytes, total(&free));
    assert_eq!(found.free.free_bytes(), total(&free));
    check_output(&img, &out, &free, &found);
    let (ok, text) = try_run(&["ntfsfix", "-n", s(&out)]);
    assert!(ok && text.contains("processed successfully"), "{text}");
    for (name, sha) in &kept {
        assert_eq!(&ntfscat_sha(&out, name, &p), sha, "{name} reads back");
    }
    // The same volume as a partition 1 MiB into a disk: the same free runs, relative.
    let disk = p("disk.img");
    embed(&img, &disk, MIB, MIB);
    let (report, runs) = scan_at(&disk, MIB, 64 * MIB);
    assert_eq!(report.skipped, None, "{report:?}");
    assert_eq!(runs, found.free.runs().collect::<Vec<_>>());
}

/// (cluster size, MFT byte offset, MFT mirror byte offset) from the boot sector.
fn mft_at(img: &Path) -> (u64, u64, u64) {
    let b = peek(img, 0, 512);
    let spc = u64::from(b[0x0d]);
    let cs = spc * u64::from(u16::from_le_bytes([b[0x0b], b[0x0c]]));
    let lcn = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    (cs, lcn(0x30) * cs, lcn(0x38) * cs)
}

/// Offset in a record (1 KiB) of the attribute of type `ty`.
fn attr_offset(rec: &[u8], ty: u32) -> usize {
    let mut off = u16::from_le_bytes([rec[0x14], rec[0x15]]) as usize;
    loop {
        let t = u32::from_le_bytes(rec[off..off + 4].try_into().unwrap());
        assert_ne!(t, 0xffff_ffff, "no attribute {ty:#x}");
        if t == ty {
            return off;
        }
        off += u32::from_le_bytes(rec[off + 4..off + 8].try_into().unwrap()) as usize;
    }
}

/// Offset in record 3 ($Volume) of the $VOLUME_INFORMATION flags.
fn volume_flags_offset(rec: &[u8]) -> usize {
    let off = attr_offset(rec, 0x70);
    off + u16::from_le_bytes([rec[off + 0x14], rec[off + 0x15]]) as usize + 0x0a
}

/// First LCN of MFT record `n`'s data, from ntfsinfo's runlist.
fn data_lcn(img: &Path, n: u32) -> u64 {
    let info = run(&["ntfsinfo", "-i", &n.to_string(), "-v", s(img)]);
    let mut lines = info.lines().skip_while(|l| !l.contains("Runlist:"));
    lines.next();
    let row = lines.next().expect("a run");
    let lcn = row.split_whitespace().nth(1).unwrap();
    u64::from_str_radix(lcn.trim_start_matches("0x"), 16).unwrap()
}

/// A 4 KiB $LogFile restart page (version 1.1) with its update sequence applied.
fn restart_page(lsn: u64, client_in_use: u16, flags: u16) -> Vec<u8> {
    let mut p = vec![0u8; 4096];
    p[0..4].copy_from_slice(b"RSTR");
    p[4..6].copy_from_slice(&0x1eu16.to_le_bytes());
    p[6..8].copy_from_slice(&9u16.to_le_bytes());
    p[0x10..0x14].copy_from_slice(&4096u32.to_le_bytes());
    p[0x14..0x18].copy_from_slice(&4096u32.to_le_bytes());
    p[0x18..0x1a].copy_from_slice(&0x30u16.to_le_bytes());
    p[0x1a..0x1c].copy_from_slice(&1u16.to_le_bytes());
    p[0x1c..0x1e].copy_from_slice(&1u16.to_le_bytes());
    let ra = 0x30;
    p[ra..ra + 8].copy_from_slice(&lsn.to_le_bytes());
    p[ra + 8..ra + 10].copy_from_slice(&1u16.to_le_bytes());
    p[ra + 0x0a..ra + 0x0c].copy_from_slice(&0xffffu16.to_le_bytes());
    p[ra + 0x0c..ra + 0x0e].copy_from_slice(&client_in_use.to_le_bytes());
    p[ra + 0x0e..ra + 0x10].copy_from_slice(&flags.to_le_bytes());
    // Update sequence number 1; the saved words are the (zero) stride ends.
    p[0x1e..0x20].copy_from_slice(&1u16.to_le_bytes());
    for i in 1..=8 {
        p[i * 512 - 2..i * 512].copy_from_slice(&1u16.to_le_bytes());
    }
    p
}

#[test]
#[cfg_attr(no_ntfs, ignore = "needs ntfs-3g (mkntfs, ntfs-3g, ntfscat)")]
fn hostile_volumes_drop_nothing() {
    if !have_ntfs() {
        return;
    }
    let (_d, p) = tmp();
    let img = p("ntfs.img");
    build(&p, &img, 64 * MIB, &[]);
    let (cs, mft, mirror) = mft_at(&img);
    let rs = 1024u64;
    assert_eq!(peek(&img, mft + 3 * rs, 4), b"FILE");

    // $Volume marked dirty (in $MFT and in its mirror, so only the flag differs).
    let dirty = p("dirty.img");
    copy(&img, &dirty);
    let rec = peek(&dirty, mft + 3 * rs, rs as usize);
    let at = volume_flags_offset(&rec) as u64;
    assert!(at % 512 < 510, "the flags are not under a fixup");
    let flags = u16::from_le_bytes(rec[at as usize..at as usize + 2].try_into().unwrap()) | 1;
    for base in [mft, mirror] {
        patch(&dirty, base + 3 * rs + at, &flags.to_le_bytes());
    }
    let (ok, text) = try_run(&["ntfsfix", "-n", s(&dirty)]);
    assert!(
        !ok || text.to_lowercase().contains("dirty") || text.contains("unclean"),
        "{text}"
    );
    let found = scan(&dirty);
    assert_skipped(&found, "ntfs", "dirty");
    let out = p("dirty.out");
    sparsify_to(&dirty, &out);
    assert_eq!(sha256_file(&out), sha256_file(&dirty), "nothing changed");

    // A torn write: the last two bytes of $Bitmap's record's first sector lose the USN.
    let torn = p("torn.img");
    copy(&img, &torn);
    let end = mft + 6 * rs + 510;
    let b = peek(&torn, end, 2);
    patch(&torn, end, &[b[0] ^ 0x5a, b[1]]);
    assert_skipped(&scan(&torn), "ntfs", "fixup");

    // Record 6 with a bad magic.
    let magic = p("magic.img");
    copy(&img, &magic);
    patch(&magic, mft + 6 * rs, b"FILX");
    assert_skipped(&scan(&magic), "ntfs", "not FILE");

    // $Bitmap calling the first MFT cluster free.
    let lying = p("lying.img");
    copy(&img, &lying);
    let mft_lcn = mft / cs;
    let byte = data_lcn(&lying, 6) * cs + mft_lcn / 8;
    let v = peek(&lying, byte, 1)[0];
    assert_ne!(v & (1 << (mft_lcn % 8)), 0);
    patch(&lying, byte, &[v & !(1 << (mft_lcn % 8))]);
    assert_skipped(&scan(&lying), "ntfs", "$MFT free");

    // A mirror that disagrees with the MFT.
    let mirr = p("mirror.img");
    copy(&img, &mirr);
    let b = peek(&mirr, mirror + 0x100, 1)[0];
    patch(&mirr, mirror + 0x100, &[b ^ 1]);
    assert_skipped(&scan(&mirr), "ntfs", "$MFTMirr differs");
    // A mirror copy written with another update sequence number is the same record.
    let usn = p("usn.img");
    copy(&img, &usn);
    let rec2 = mirror + 2 * rs;
    let usa = u16::from_le_bytes(peek(&usn, rec2 + 4, 2).try_into().unwrap()) as u64;
    let other =
        (u16::from_le_bytes(peek(&usn, rec2 + usa, 2).try_into().unwrap()) ^ 0x0f0f).to_le_bytes();
    for at in [usa, 510, 1022] {
        patch(&usn, rec2 + at, &other);
    }
    assert_eq!(
        scan(&usn).partitions[0].skipped,
        None,
        "a fresh USN is no mismatch"
    );

    // The volume claiming more sectors than the disk holds.
    let big = p("big.img");
    copy(&img, &big);
    patch(&big, 0x28, &(128 * MIB / 512).to_le_bytes());
    assert_skipped(&scan(&big), "ntfs", "larger than the partition");

    // $Bitmap's $DATA claiming fewer initialized bytes than the clusters need.
    let short = p("short.img");
    copy(&img, &short);
    let rec = peek(&short, mft + 6 * rs, rs as usize);
    let init = (mft + 6 * rs) + attr_offset(&rec, 0x80) as u64 + 0x38;
    assert!(init % 512 < 504, "initialized_size is not under a fixup");
    patch(&short, init, &100u64.to_le_bytes());
    assert_skipped(&scan(&short), "ntfs", "initialized bytes, fewer than");

    // $LogFile holding restart pages: a client in use without the clean flag is what
    // Windows leaves when it hibernates or fast-starts.
    let log = data_lcn(&img, 2) * cs;
    let in_use = p("inuse.img");
    copy(&img, &in_use);
    patch(&in_use, log, &restart_page(10, 0, 0));
    patch(&in_use, log + 4096, &restart_page(9, 0, 0));
    assert_skipped(&scan(&in_use), "ntfs", "did not shut down cleanly");
    // The newest copy says clean: the older one does not matter.
    let shut = p("shut.img");
    copy(&img, &shut);
    patch(&shut, log, &restart_page(12, 0xffff, 0));
    patch(&shut, log + 4096, &restart_page(11, 0, 0));
    let found = scan(&shut);
    assert_eq!(found.partitions[0].skipped, None, "{:?}", found.partitions);
    assert!(found.free.free_bytes() > 0);
    patch(&shut, log + 4096, &restart_page(13, 0, 2));
    assert_eq!(scan(&shut).partitions[0].skipped, None, "clean flag set");
    // A torn restart page.
    let mut torn_rp = restart_page(12, 0xffff, 0);
    torn_rp[1023] = 7;
    let torn_log = p("tornlog.img");
    copy(&img, &torn_log);
    patch(&torn_log, log, &torn_rp);
    assert_skipped(&scan(&torn_log), "ntfs", "restart page: fixup of sector 1");
    // Neither empty nor a restart page.
    let junk = p("junklog.img");
    copy(&img, &junk);
    patch(&junk, log, b"JUNKJUNK");
    assert_skipped(&scan(&junk), "ntfs", "not RSTR");

    // hiberfil.sys in the root: a hibernation image (non-resident, "HIBR"; resident,
    // "wake") refuses the volume, a zeroed one (Windows resumed) does not.
    for (name, head, len, why) in [
        (
            "hibr.img",
            &b"HIBR"[..],
            256 << 10,
            Some("hibernation image"),
        ),
        ("wake.img", &b"wake"[..], 200, Some("hibernation image")),
        ("zeroed.img", &[0u8; 4][..], 256 << 10, None),
    ] {
        let hib = p(name);
        copy(&img, &hib);
        let mut v = vec![0u8; len];
        Rng(5).fill(&mut v);
        v[..4].copy_from_slice(head);
        if why.is_none() {
            v.fill(0);
        }
        let src = p("hiberfil.src");
        std::fs::write(&src, &v).unwrap();
        run(&["ntfscp", s(&hib), s(&src), "hiberfil.sys"]);
        let found = scan(&hib);
        match why {
            Some(why) => assert_skipped(&found, "ntfs", why),
            None => assert_eq!(found.partitions[0].skipped, None, "{:?}", found.partitions),
        }
    }

    // The clean original still scans.
    assert_eq!(scan(&img).partitions[0].skipped, None);
}

#[test]
#[cfg_attr(no_ntfs, ignore = "needs ntfs-3g (mkntfs, ntfs-3g, ntfscat)")]
fn mutated_metadata_never_panics() {
    if !have_ntfs() {
        return;
    }
    let (_d, p) = tmp();
    let img = p("ntfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    run(&["mkntfs", "-F", "-Q", "-q", s(&img)]);
    let (cs, mft, _) = mft_at(&img);
    let targets = [
        (0, 512),
        (mft, 16 * 1024),
        (data_lcn(&img, 2) * cs, 8192),
        (data_lcn(&img, 5) * cs, 4096),
    ];
    let skipped = mutate_and_scan(&img, &targets, 300, 11);
    assert!(skipped > 100, "only {skipped} of 300 mutations were caught");
}
