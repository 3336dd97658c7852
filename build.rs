//! Tells the integration tests which of their external oracles are missing, so a test that
//! cannot run is reported by cargo as *ignored* rather than counted as passed.
//!
//! Sets `--cfg no_qemu` when `qemu-img` or `qemu-io` is not on PATH and `--cfg no_bzip2`
//! when `bzip2` is not (likewise `no_strace`, `no_e2fsprogs`, `no_dosfs`, `no_exfat`, `no_ntfs`,
//! `no_xfs`, `no_parttools`, `no_lvm` for the sparsify tests' filesystem tools, and `no_s3`
//! (`no_glance`, `no_keystone`, `no_swift`, `no_ceph`) when no S3 (Glance, Keystone, Swift,
//! Ceph) test server is started: `DISKCONV_TEST_S3` unset; tests/servers/up.sh sets
//! it), but only when the tools are not required: with `CI` set (to
//! anything but `false`/`0`) or `DISKCONV_REQUIRE_QEMU=1` nothing is ignored, so the tests
//! run and fail with the install command. The library and the binary never look at these.

use std::env;
use std::path::PathBuf;

fn find_on_path(tool: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn required() -> bool {
    let ci = env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    ci || env::var("DISKCONV_REQUIRE_QEMU").is_ok_and(|v| v == "1")
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "PATH",
        "CI",
        "DISKCONV_REQUIRE_QEMU",
        "DISKCONV_TEST_S3",
        "DISKCONV_TEST_GLANCE",
        "DISKCONV_TEST_KEYSTONE",
        "DISKCONV_TEST_SWIFT",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-env-changed=DISKCONV_TEST_CEPH");
    println!("cargo:rerun-if-env-changed=DISKCONV_TEST_SWIFT_KEYSTONE");
    println!("cargo:rustc-check-cfg=cfg(no_qemu)");
    println!("cargo:rustc-check-cfg=cfg(no_bzip2)");
    println!("cargo:rustc-check-cfg=cfg(no_strace)");
    println!("cargo:rustc-check-cfg=cfg(no_e2fsprogs)");
    println!("cargo:rustc-check-cfg=cfg(no_dosfs)");
    println!("cargo:rustc-check-cfg=cfg(no_exfat)");
    println!("cargo:rustc-check-cfg=cfg(no_ntfs)");
    println!("cargo:rustc-check-cfg=cfg(no_xfs)");
    println!("cargo:rustc-check-cfg=cfg(no_parttools)");
    println!("cargo:rustc-check-cfg=cfg(no_lvm)");
    println!("cargo:rustc-check-cfg=cfg(no_s3)");
    println!("cargo:rustc-check-cfg=cfg(no_ceph)");
    println!("cargo:rustc-check-cfg=cfg(no_glance)");
    println!("cargo:rustc-check-cfg=cfg(no_keystone)");
    println!("cargo:rustc-check-cfg=cfg(no_swift)");
    println!("cargo:rustc-check-cfg=cfg(no_swift_keystone)");
    let required = required();
    let have = |tool: &str| match find_on_path(tool) {
        Some(p) => {
            // Rerun when the tool is removed or replaced, so the cfg never goes stale.
            println!("cargo:rerun-if-changed={}", p.display());
            true
        }
        None => {
            // Installing the tool changes one of these folders' mtime: the cfg is then
            // recomputed without a `cargo clean` (and without rerunning on every build).
            for dir in env::var_os("PATH").iter().flat_map(env::split_paths) {
                if dir.is_dir() {
                    println!("cargo:rerun-if-changed={}", dir.display());
                }
            }
            false
        }
    };
    let qemu = have("qemu-img") & have("qemu-io");
    let bzip2 = have("bzip2");
    let strace = have("strace");
    // The guest filesystem tests' builders and checkers (e2fsprogs; dosfstools + mtools).
    let e2fsprogs = ["mkfs.ext4", "debugfs", "dumpe2fs", "e2fsck"].map(have) == [true; 4];
    let dosfs = ["mkfs.fat", "fsck.fat", "mcopy", "mdel"].map(have) == [true; 4];
    let exfat =
        ["mkfs.exfat", "fsck.exfat", "dump.exfat", "mount.exfat-fuse"].map(have) == [true; 4];
    let ntfs = have("mkntfs") & have("ntfs-3g");
    let xfs = have("mkfs.xfs") & have("xfs_db");
    // sparsify's tests: partition tables (fdisk, gdisk), swap (util-linux), LVM (lvm2).
    let parttools = have("sfdisk") & have("sgdisk") & have("mkswap");
    let lvm = have("pvcreate") & have("losetup");
    if !required {
        if !qemu {
            println!("cargo:rustc-cfg=no_qemu");
        }
        if !bzip2 {
            println!("cargo:rustc-cfg=no_bzip2");
        }
        if !strace {
            println!("cargo:rustc-cfg=no_strace");
        }
        if !e2fsprogs {
            println!("cargo:rustc-cfg=no_e2fsprogs");
        }
        if !dosfs {
            println!("cargo:rustc-cfg=no_dosfs");
        }
        if !exfat {
            println!("cargo:rustc-cfg=no_exfat");
        }
        if !ntfs {
            println!("cargo:rustc-cfg=no_ntfs");
        }
        if !xfs {
            println!("cargo:rustc-cfg=no_xfs");
        }
        if !parttools {
            println!("cargo:rustc-cfg=no_parttools");
        }
        if !lvm {
            println!("cargo:rustc-cfg=no_lvm");
        }
        // No S3 server started (tests/servers/up.sh exports where it listens).
        if env::var_os("DISKCONV_TEST_S3").is_none() {
            println!("cargo:rustc-cfg=no_s3");
        }
        // No Ceph cluster started (DISKCONV_TEST_CEPH unset; tests/servers/up.sh's ceph_up
        // exports it with where the cluster is).
        if env::var_os("DISKCONV_TEST_CEPH").is_none() {
            println!("cargo:rustc-cfg=no_ceph");
        }
        // Glance and Keystone (tests/servers/up.sh's glance_up exports where they listen).
        if env::var_os("DISKCONV_TEST_GLANCE").is_none() {
            println!("cargo:rustc-cfg=no_glance");
        }
        if env::var_os("DISKCONV_TEST_KEYSTONE").is_none() {
            println!("cargo:rustc-cfg=no_keystone");
        }
        // No Swift started (tests/servers/up.sh's swift_up exports DISKCONV_TEST_SWIFT*).
        if env::var_os("DISKCONV_TEST_SWIFT").is_none() {
            println!("cargo:rustc-cfg=no_swift");
        }
        // No Swift proxy taking Keystone tokens (swift_up after glance_up's Keystone).
        if env::var_os("DISKCONV_TEST_SWIFT_KEYSTONE").is_none() {
            println!("cargo:rustc-cfg=no_swift_keystone");
        }
    }
}
