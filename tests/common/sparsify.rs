//! Helpers for the sparsify tests (partition tables, swap, LVM; the filesystem tests use
//! them too): build a raw disk with sfdisk or sgdisk, fill the ranges a tool reports free
//! with junk, and check a sparsified output: identical outside the free ranges, zeros
//! and unallocated inside them.

use std::path::Path;
use std::process::Command;

use super::{qemu_img, run, s};

/// A partition as sfdisk reports it, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Byte offset on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Make `path` a sparse file of `size` bytes filled with pseudo-random junk in 1 MiB
/// steps (so the table's gaps and boot areas hold data a sparsify must keep).
pub fn junk_disk(path: &Path, size: u64, seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    fill_junk(path, &[(0, size)], seed);
}

/// Overwrite the byte ranges `ranges` of `path` with pseudo-random bytes.
pub fn fill_junk(path: &Path, ranges: &[(u64, u64)], seed: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for &(off, len) in ranges {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(1 << 20) as usize;
            let buf: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            f.write_all_at(&buf, off + done).unwrap();
            done += n as u64;
        }
    }
}

/// Write a partition table with `sfdisk` from `script` (sfdisk's input format) and return
/// the partitions in table order.
pub fn sfdisk(path: &Path, script: &str) -> Vec<Part> {
    use std::io::Write;
    let mut c = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", s(path)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk runs");
    c.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(c.wait().unwrap().success(), "sfdisk failed on {script:?}");
    partitions(path)
}

/// Run `sgdisk` with `args` on `path` and return the partitions.
pub fn sgdisk(path: &Path, args: &[&str]) -> Vec<Part> {
    let mut a: Vec<&str> = args.to_vec();
    a.push(s(path));
    run(&[&["sgdisk"][..], &a].concat());
    partitions(path)
}

/// The partitions of `path` as sfdisk reads them (MBR data partitions and logicals,
/// never the extended container; GPT entries), in table order.
pub fn partitions(path: &Path) -> Vec<Part> {
    let out = Command::new("sfdisk")
        .args(["-J", s(path)])
        .output()
        .unwrap();
    assert!(out.status.success(), "sfdisk -J {}", path.display());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = &j["partitiontable"];
    let ss = t["sectorsize"].as_u64().unwrap_or(512);
    t["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !matches!(p["type"].as_str(), Some("5" | "f" | "85")))
        .map(|p| Part {
            start: p["start"].as_u64().unwrap() * ss,
            len: p["size"].as_u64().unwrap() * ss,
        })
        .collect()
}

/// Make a swap area of `len` bytes at `off` of `disk` the way mkswap does on a device
/// holding old data: only its header page is written; returns the byte range mkswap's
/// header declares usable (pages 1..=last_page), which a sparsify may drop.
pub fn mkswap_at(disk: &Path, off: u64, len: u64, dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::FileExt;
    let tmp = dir.join("swap.part");
    let f = std::fs::File::create(&tmp).unwrap();
    f.set_len(len).unwrap();
    drop(f);
    run(&["mkswap", "-q", s(&tmp)]);
    let page = std::fs::read(&tmp).unwrap()[..4096].to_vec();
    std::fs::remove_file(&tmp).unwrap();
    let last_page = u32::from_le_bytes(page[1028..1032].try_into().unwrap()) as u64;
    let f = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(&page, off).unwrap();
    (off + 4096, last_page * 4096)
}

/// The guest ranges of `img` that qemu-img maps as data.
pub fn qemu_data_ranges(img: &Path) -> Vec<(u64, u64)> {
    let j: serde_json::Value =
        serde_json::from_str(&qemu_img(&["map", "--output=json", s(img)])).unwrap();
    j.as_array()
        .unwrap()
        .iter()
        .filter(|m| m["data"].as_bool() == Some(true))
        .map(|m| (m["start"].as_u64().unwrap(), m["length"].as_u64().unwrap()))
        .collect()
}

/// The guest bytes of `img` as raw, through qemu-img (the oracle, not our reader).
pub fn qemu_raw_bytes(img: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("qemu-view.raw");
    qemu_img(&["convert", "-O", "raw", s(img), s(&raw)]);
    let b = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    b
}

/// `ranges` rounded inwards to `granule` boundaries: what must have become unallocated
/// in an output whose allocation unit is `granule`.
pub fn whole_granules(ranges: &[(u64, u64)], granule: u64) -> Vec<(u64, u64)> {
    ranges
        .iter()
        .filter_map(|&(o, l)| {
            let s = o.div_ceil(granule) * granule;
            let e = (o + l) / granule * granule;
            (e > s).then_some((s, e - s))
        })
        .collect()
}

/// Check a sparsified output against its input: every byte outside `free` is the
/// input's, every byte inside reads zero (both as qemu-img reads the output), and no
/// whole `granule` inside `free` is allocated in the output.
pub fn assert_sparsified(
    input: &Path,
    output: &Path,
    free: &[(u64, u64)],
    granule: u64,
    dir: &Path,
) {
    let want = std::fs::read(input).unwrap();
    let got = qemu_raw_bytes(output, dir);
    assert_eq!(got.len(), want.len(), "guest size of {}", output.display());
    let mut is_free = vec![false; want.len()];
    for &(o, l) in free {
        is_free[o as usize..(o + l) as usize].fill(true);
    }
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        if is_free[i] {
            assert_eq!(
                g,
                0,
                "free byte at {i:#x} of {} is not zero",
                output.display()
            );
        } else if g != w {
            panic!(
                "byte at {i:#x} of {} is {g:#04x}, the input has {w:#04x} (outside the free ranges)",
                output.display()
            );
        }
    }
    let data = qemu_data_ranges(output);
    for (fo, fl) in whole_granules(free, granule) {
        for &(d, dl) in &data {
            assert!(
                d + dl <= fo || fo + fl <= d,
                "free range {fl} bytes at {fo:#x} is allocated in {} (data {dl} bytes at {d:#x})",
                output.display()
            );
        }
    }
}

/// Run the diskconv binary with `args`; returns (success, stdout, stderr).
pub fn diskconv(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// True when sfdisk, sgdisk and mkswap are installed; tests that need them carry
/// `#[cfg_attr(no_parttools, ignore = "...")]` (build.rs); same rules as `have_qemu`.
#[track_caller]
pub fn have_parttools() -> bool {
    super::have_tool("sfdisk", "fdisk", cfg!(no_parttools))
        && super::have_tool("sgdisk", "gdisk", cfg!(no_parttools))
        && super::have_tool("mkswap", "util-linux", cfg!(no_parttools))
}

/// True when lvm2's pvcreate and losetup are installed (`no_lvm` in build.rs).
#[track_caller]
pub fn have_lvm() -> bool {
    super::have_tool("pvcreate", "lvm2", cfg!(no_lvm))
}
