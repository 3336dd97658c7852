//! OS inspection (`inspect --guest`, Glance properties) and read-only file access (`ls`,
//! `cat`, `copy-out`) over guest disks built here with the real tools: a root tree with
//! each distro's own /etc/os-release text, hostname, fstab, package database and an ELF
//! binary copied from the host, put in an ext2/3/4 filesystem by `mkfs.ext4 -d` (no
//! mount), laid out on GPT (sgdisk), MBR (sfdisk) or LVM (lvm2 on a loop device), then
//! converted by qemu-img to qcow2, vmdk, vpc and vdi: every format must inspect alike.
//! Hostile trees (symlink loops, a directory hard-linked into itself, absurd superblock
//! counts, corrupted metadata) must give clear errors, bounded work, no panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::common::guestfs::{have, run, run_status, s, Counting};
use crate::common::sparsify::{have_lvm, have_parttools, sfdisk, sgdisk};
use diskconv::guest::inspect::{glance, GuestInspection};
use diskconv::{BlockDevice, Format, OpenOptions};

const MIB: u64 = 1 << 20;

const DEBIAN_12: &str = r#"PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
SUPPORT_URL="https://www.debian.org/support"
BUG_REPORT_URL="https://bugs.debian.org/"
"#;

const UBUNTU_2204: &str = r#"PRETTY_NAME="Ubuntu 22.04.4 LTS"
NAME="Ubuntu"
VERSION_ID="22.04"
VERSION="22.04.4 LTS (Jammy Jellyfish)"
VERSION_CODENAME=jammy
ID=ubuntu
ID_LIKE=debian
HOME_URL="https://www.ubuntu.com/"
SUPPORT_URL="https://help.ubuntu.com/"
BUG_REPORT_URL="https://bugs.launchpad.net/ubuntu/"
PRIVACY_POLICY_URL="https://www.ubuntu.com/legal/terms-and-policies/privacy-policy"
UBUNTU_CODENAME=jammy
"#;

pub(crate) const ROCKY_93: &str = r#"NAME="Rocky Linux"
VERSION="9.3 (Blue Onyx)"
ID="rocky"
ID_LIKE="rhel centos fedora"
VERSION_ID="9.3"
PLATFORM_ID="platform:el9"
PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"
ANSI_COLOR="0;32"
LOGO="fedora-logo-icon"
CPE_NAME="cpe:/o:rocky:rocky:9::baseos"
HOME_URL="https://rockylinux.org/"
BUG_REPORT_URL="https://bugs.rockylinux.org/"
SUPPORT_END="2032-05-31"
ROCKY_SUPPORT_PRODUCT="Rocky-Linux-9"
ROCKY_SUPPORT_PRODUCT_VERSION="9.3"
REDHAT_SUPPORT_PRODUCT="Rocky Linux"
REDHAT_SUPPORT_PRODUCT_VERSION="9.3"
"#;

const ALPINE_319: &str = r#"NAME="Alpine Linux"
ID=alpine
VERSION_ID=3.19.1
PRETTY_NAME="Alpine Linux v3.19"
HOME_URL="https://alpinelinux.org/"
BUG_REPORT_URL="https://gitlab.alpinelinux.org/alpine/aports/-/issues"
"#;

const FEDORA_39: &str = r#"NAME="Fedora Linux"
VERSION="39 (Cloud Edition)"
ID=fedora
VERSION_ID=39
VERSION_CODENAME=""
PLATFORM_ID="platform:f39"
PRETTY_NAME="Fedora Linux 39 (Cloud Edition)"
ANSI_COLOR="0;38;2;60;110;180"
LOGO=fedora-logo-icon
CPE_NAME="cpe:/o:fedoraproject:fedora:39"
DEFAULT_HOSTNAME="fedora"
HOME_URL="https://fedoraproject.org/"
DOCUMENTATION_URL="https://docs.fedoraproject.org/en-US/fedora/f39/system-administrators-guide/"
SUPPORT_URL="https://ask.fedoraproject.org/"
BUG_REPORT_URL="https://bugzilla.redhat.com/"
REDHAT_BUGZILLA_PRODUCT="Fedora"
REDHAT_BUGZILLA_PRODUCT_VERSION=39
REDHAT_SUPPORT_PRODUCT="Fedora"
REDHAT_SUPPORT_PRODUCT_VERSION=39
SUPPORT_END=2024-11-12
VARIANT="Cloud Edition"
VARIANT_ID=cloud
"#;

const DPKG_STATUS: &str = "Package: base-files
Status: install ok installed
Priority: required
Architecture: amd64
Version: 12.4+deb12u5

Package: bash
Status: install ok installed
Architecture: amd64
Version: 5.2.15-2+b2

Package: removed-one
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
";

const APK_INSTALLED: &str = "C:Q1abc=
P:musl
V:1.2.4_git20230717-r4
A:x86_64
S:383152

C:Q1def=
P:busybox
V:1.36.1-r15
A:x86_64
";

fn tools() -> bool {
    have(
        &["mkfs.ext4", "debugfs", "qemu-img"],
        !cfg!(no_e2fsprogs) && !cfg!(no_qemu),
    )
}

fn fat_tools() -> bool {
    have(&["mkfs.fat", "mcopy"], !cfg!(no_dosfs))
}

fn write(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn link(root: &Path, rel: &str, target: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, p).unwrap();
}

/// A merged-/usr root (bin -> usr/bin) as Debian, Ubuntu, Fedora and Rocky ship: the
/// os-release under /usr/lib with /etc/os-release a relative symlink to it, /bin/sh a
/// symlink to the host's /bin/true (a real x86_64 ELF) copied as usr/bin/dash.
pub(crate) fn merged_usr_root(root: &Path, os_release: &str, hostname: &str, fstab: &str) {
    write(root, "usr/lib/os-release", os_release);
    link(root, "etc/os-release", "../usr/lib/os-release");
    write(root, "etc/hostname", &format!("{hostname}\n"));
    write(root, "etc/fstab", fstab);
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::copy("/bin/true", root.join("usr/bin/dash")).unwrap();
    link(root, "usr/bin/sh", "dash");
    link(root, "bin", "usr/bin");
    write(root, "home/user/notes.txt", "hello from the guest\n");
    // Hostile bits a walk must survive: a symlink loop and a link to its own directory.
    link(root, "etc/loop1", "loop2");
    link(root, "etc/loop2", "loop1");
    link(root, "home/user/self", ".");
    link(root, "etc/escape", "../../../../../../etc/passwd");
}

/// An ext filesystem of `size` bytes holding `tree`, made by mkfs without mounting.
fn mkfs(kind: &str, tree: &Path, img: &Path, size: u64, label: &str, uuid: &str) {
    let f = std::fs::File::create(img).unwrap();
    f.set_len(size).unwrap();
    run(&[
        &format!("mkfs.{kind}"),
        "-q",
        "-F",
        "-d",
        s(tree),
        "-L",
        label,
        "-U",
        uuid,
        "-E",
        "root_owner=0:0",
        s(img),
    ]);
}

/// Copy the filesystem image `fs` into `disk` at byte `at`.
fn place(fs: &Path, disk: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let data = std::fs::read(fs).unwrap();
    let d = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    d.write_all_at(&data, at).unwrap();
}

pub(crate) fn inspect_path(img: &Path) -> GuestInspection {
    let dev: Arc<dyn BlockDevice> = Arc::from(diskconv::open(img, &OpenOptions::new()).unwrap());
    diskconv::guest::inspect::inspect(dev).unwrap()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diskconv"))
}

/// Run the binary; (exit code, stdout, stderr).
pub(crate) fn cli(args: &[&str]) -> (i32, String, String) {
    let o = bin().args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const ROOT_UUID: &str = "6f1c1a52-3b1e-4c0e-9a57-1d2a3f4b5c6d";
const HOME_UUID: &str = "0b8e2f1a-7c3d-4e5f-8a9b-0c1d2e3f4a5b";

/// Debian 12 on GPT with an EFI system partition (so: uefi), root ext4 on partition 2.
fn debian_gpt(dir: &Path) -> PathBuf {
    let tree = dir.join("debian-root");
    merged_usr_root(
        &tree,
        DEBIAN_12,
        "deb12",
        &format!(
            "# /etc/fstab: static file system information.\nUUID={ROOT_UUID} / ext4 errors=remount-ro 0 1\n/dev/sda1 /boot/efi vfat umask=0077 0 1\n"
        ),
    );
    write(&tree, "etc/debian_version", "12.5\n");
    write(&tree, "var/lib/dpkg/status", DPKG_STATUS);
    std::fs::create_dir_all(tree.join("boot/efi")).unwrap();
    let disk = dir.join("debian.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let parts = sgdisk(
        &disk,
        &[
            "-n",
            "1:2048:+8M",
            "-t",
            "1:EF00",
            "-n",
            "2:0:0",
            "-t",
            "2:8300",
        ],
    );
    let fs = dir.join("debian-root.ext4");
    mkfs("ext4", &tree, &fs, parts[1].len, "debroot", ROOT_UUID);
    place(&fs, &disk, parts[1].start);
    // The ESP: FAT16 with a long name, filled by mtools (no mount).
    let esp = dir.join("esp.fat");
    run(&[
        "mkfs.fat",
        "-C",
        "-n",
        "EFI",
        "-i",
        "2468ACE0",
        s(&esp),
        &(parts[0].len / 1024).to_string(),
    ]);
    let efi = dir.join("efi");
    write(
        &efi,
        "EFI/debian/grub.cfg",
        "search.fs_uuid 6f1c1a52 root\n",
    );
    write(&efi, "EFI/debian/A Long Name.efi", &"z".repeat(70_000));
    run(&["mcopy", "-s", "-i", s(&esp), s(&efi.join("EFI")), "::/"]);
    place(&esp, &disk, parts[0].start);
    disk
}

#[test]
#[cfg_attr(
    any(no_qemu, no_e2fsprogs, no_parttools, no_dosfs),
    ignore = "needs qemu-img, mkfs.ext4, sgdisk, mkfs.fat, mtools"
)]
fn debian_on_gpt_inspects_alike_in_every_format() {
    if !tools() || !have_parttools() || !fat_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = debian_gpt(dir.path());
    let raw = inspect_path(&disk);
    assert_eq!(raw.partition_table, "gpt");
    let root = &raw.volumes[1];
    assert_eq!(root.location, "gpt 2");
    assert_eq!(root.filesystem.as_deref(), Some("ext4"));
    assert_eq!(root.label.as_deref(), Some("debroot"));
    assert_eq!(root.uuid.as_deref(), Some(ROOT_UUID));
    assert_eq!(
        raw.volumes[0].partition_type.as_deref(),
        Some("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
    );
    let esp = &raw.volumes[0];
    assert_eq!(
        (
            esp.filesystem.as_deref(),
            esp.label.as_deref(),
            esp.uuid.as_deref()
        ),
        (Some("vfat"), Some("EFI"), Some("2468-ACE0"))
    );
    // used from the superblock, as dumpe2fs counts it.
    let text = run(&["dumpe2fs", "-h", s(&dir.path().join("debian-root.ext4"))]);
    let field = |k: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let used = (field("Block count:") - field("Free blocks:")) * field("Block size:");
    assert_eq!(root.used, Some(used));
    assert_eq!(raw.operating_systems.len(), 1, "{raw:#?}");
    let os = &raw.operating_systems[0];
    assert_eq!(os.root, "gpt 2");
    assert_eq!(
        (os.os_type.as_str(), os.distro.as_str()),
        ("linux", "debian")
    );
    assert_eq!(
        os.product_name.as_deref(),
        Some("Debian GNU/Linux 12 (bookworm)")
    );
    assert_eq!((os.major_version, os.minor_version), (12, 5));
    assert_eq!(os.arch.as_deref(), Some(std::env::consts::ARCH));
    assert_eq!(os.hostname.as_deref(), Some("deb12"));
    assert_eq!(os.package_format.as_deref(), Some("deb"));
    assert_eq!(os.package_manager.as_deref(), Some("apt"));
    assert_eq!(os.firmware, "uefi");
    assert_eq!(os.osinfo.as_deref(), Some("debian12"));
    let apps: Vec<_> = os.applications.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(apps, ["base-files", "bash"]);
    let mps: Vec<_> = os
        .mountpoints
        .iter()
        .map(|m| (m.path.as_str(), m.volume.as_deref()))
        .collect();
    assert_eq!(mps, [("/", Some("gpt 2")), ("/boot/efi", Some("gpt 1"))]);
    assert_eq!(
        glance::properties(&raw),
        [
            ("os_type", "linux".to_string()),
            ("os_distro", "debian".to_string()),
            ("os_version", "12".to_string()),
            ("architecture", std::env::consts::ARCH.to_string()),
            ("hw_firmware_type", "uefi".to_string()),
        ]
    );
    for (fmt, name) in [
        (Format::Qcow2, "qcow2"),
        (Format::Vmdk, "vmdk"),
        (Format::Vhd, "vpc"),
        (Format::Vdi, "vdi"),
    ] {
        let img = dir.path().join(format!("debian.{name}"));
        run(&["qemu-img", "convert", "-O", name, s(&disk), s(&img)]);
        let got = inspect_path(&img);
        // vpc rounds the disk to its CHS geometry: the table and volumes are the same.
        assert_eq!(got.operating_systems, raw.operating_systems, "{fmt:?}");
        assert_eq!(got.volumes, raw.volumes, "{fmt:?}");
    }
    // The ESP through the fstab's /boot/efi: FAT, long names, case-insensitive.
    let (code, out, err) = cli(&["cat", s(&disk), "/boot/efi/efi/DEBIAN/grub.cfg"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "search.fs_uuid 6f1c1a52 root\n"),
        "{err}"
    );
    let (code, out, _) = cli(&["ls", "-l", s(&disk), "/boot/efi/EFI/debian"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(" 70000 ") && out.contains("A Long Name.efi"),
        "{out}"
    );
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let (code, _, err) = cli(&["copy-out", s(&disk), "/boot/efi/EFI", s(&out_dir)]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(out_dir.join("EFI/debian/A Long Name.efi")).unwrap(),
        "z".repeat(70_000).as_bytes()
    );
}

#[test]
#[cfg_attr(any(no_qemu, no_e2fsprogs), ignore = "needs qemu-img, mkfs.ext4")]
fn inspection_reads_metadata_and_a_few_files_only() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("root");
    merged_usr_root(&tree, UBUNTU_2204, "u", "");
    // 20 MiB of file data inspection must not read.
    write(&tree, "var/big", &"x".repeat(20 << 20));
    let img = dir.path().join("fs.raw");
    mkfs("ext4", &tree, &img, 128 * MIB, "r", ROOT_UUID);
    let dev = Arc::new(Counting {
        inner: diskconv::open(&img, &OpenOptions::new()).unwrap(),
        read: Default::default(),
    });
    let insp = diskconv::guest::inspect::inspect(dev.clone()).unwrap();
    assert_eq!(insp.operating_systems[0].distro, "ubuntu");
    let read = dev.read.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("inspecting a 128 MiB ext4 with 20 MiB of data read {read} bytes");
    assert!(read < 8 * MIB, "inspection read {read} bytes");
}

/// Ubuntu 22.04 on MBR (so: bios): root ext4 on partition 1, /home ext3 on partition 2
/// mounted by LABEL; file access reaches /home through the fstab.
#[test]
#[cfg_attr(
    any(no_qemu, no_e2fsprogs, no_parttools),
    ignore = "needs qemu-img, mkfs.ext4, sfdisk"
)]
fn ubuntu_on_mbr_with_a_separate_home_through_the_cli() {
    if !tools() || !have_parttools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tree = d.join("root");
    merged_usr_root(
        &tree,
        UBUNTU_2204,
        "jammy-host",
        &format!("UUID={ROOT_UUID} / ext4 defaults 0 1\nLABEL=home /home ext3 defaults 0 2\n"),
    );
    write(&tree, "etc/debian_version", "bookworm/sid\n");
    write(&tree, "var/lib/dpkg/status", DPKG_STATUS);
    let home = d.join("home");
    write(&home, "alice/notes.txt", "alice's notes\n");
    write(&home, "alice/deep/a/b/c.txt", "c\n");
    link(&home, "alice/link-to-notes", "notes.txt");
    let disk = d.join("ubuntu.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(80 * MIB)
        .unwrap();
    let parts = sfdisk(&disk, "label: dos\n,48M,83\n,,83\n");
    let (rootfs, homefs) = (d.join("root.ext4"), d.join("home.ext3"));
    mkfs("ext4", &tree, &rootfs, parts[0].len, "root", ROOT_UUID);
    mkfs("ext3", &home, &homefs, parts[1].len, "home", HOME_UUID);
    place(&rootfs, &disk, parts[0].start);
    place(&homefs, &disk, parts[1].start);
    let img = d.join("ubuntu.qcow2");
    run(&["qemu-img", "convert", "-O", "qcow2", s(&disk), s(&img)]);
    let (code, out, err) = cli(&["inspect", "--guest", "--output=json", s(&img)]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let os = &v["operating-systems"][0];
    assert_eq!(os["distro"], "ubuntu");
    assert_eq!(
        (os["major-version"].as_u64(), os["minor-version"].as_u64()),
        (Some(22), Some(4))
    );
    assert_eq!(os["firmware"], "bios");
    assert_eq!(os["hostname"], "jammy-host");
    assert_eq!(os["osinfo"], "ubuntu22.04");
    assert_eq!(os["mountpoints"][1]["volume"], "mbr 2");
    assert_eq!(v["volumes"][1]["filesystem"], "ext3");
    let (code, out, _) = cli(&["inspect", "--guest", "--output=glance-properties", s(&img)]);
    assert_eq!(code, 0);
    let p: BTreeMap<String, String> = serde_json::from_str(&out).unwrap();
    assert_eq!(p["os_distro"], "ubuntu");
    assert_eq!(p["os_version"], "22.04");
    assert_eq!(p["hw_firmware_type"], "bios");
    let (code, human, _) = cli(&["inspect", "--guest", s(&img)]);
    assert_eq!(code, 0);
    assert!(
        human.contains("product name: Ubuntu 22.04.4 LTS"),
        "{human}"
    );

    // cat through the fstab: /home is partition 2; symlinks resolve inside the guest.
    let (code, out, err) = cli(&["cat", s(&img), "/home/alice/link-to-notes"]);
    assert_eq!((code, out.as_str()), (0, "alice's notes\n"), "{err}");
    let (code, out, _) = cli(&["cat", s(&img), "/etc/os-release"]);
    assert_eq!((code, out.as_str()), (0, UBUNTU_2204));
    // `..` never climbs out of the root; an escaping symlink resolves inside the guest.
    // (the root's own /home/user is hidden under the /home mount, as in the guest)
    let (code, out, _) = cli(&["cat", s(&img), "/../../etc/../home/../home/alice/notes.txt"]);
    assert_eq!((code, out.as_str()), (0, "alice's notes\n"));
    let (code, _, _) = cli(&["cat", s(&img), "/home/user/notes.txt"]);
    assert_eq!(code, 1);
    let (code, out, _) = cli(&["cat", "--fs", "mbr 1", s(&img), "/home/user/notes.txt"]);
    assert_eq!((code, out.as_str()), (0, "hello from the guest\n"));
    let (code, _, err) = cli(&["cat", s(&img), "/etc/escape"]);
    assert_ne!(code, 0, "a guest path reached the host's /etc/passwd");
    assert!(err.contains("/etc/escape"), "{err}");
    // A symlink loop: an error naming it, not a hang.
    let (code, _, err) = cli(&["cat", s(&img), "/etc/loop1"]);
    assert_eq!(code, 1);
    assert!(err.contains("symbolic links"), "{err}");
    // --fs picks one volume, at /.
    let (code, out, _) = cli(&["cat", "--fs", "mbr 2", s(&img), "/alice/notes.txt"]);
    assert_eq!((code, out.as_str()), (0, "alice's notes\n"));

    // ls, ls -l, ls -R.
    let (code, out, _) = cli(&["ls", s(&img), "/home/alice"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "deep\nlink-to-notes\nnotes.txt\n")
    );
    let (code, out, _) = cli(&["ls", "-l", s(&img), "/home/alice"]);
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.ends_with("-> notes.txt")).unwrap();
    assert!(line.starts_with("lrwxrwxrwx"), "{line}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("-rw-r--r--") && l.contains(" 14 ")),
        "{out}"
    );
    let (code, out, _) = cli(&["ls", "-R", s(&img), "/home"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l == "/home/alice/deep/a/b/c.txt"),
        "{out}"
    );

    // copy-out of a tree: contents and links as in the source; nothing overwritten.
    let out_dir = d.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let (code, _, err) = cli(&["copy-out", s(&img), "/home/alice", s(&out_dir)]);
    assert_eq!(code, 0, "{err}");
    let got = out_dir.join("alice");
    assert_eq!(
        std::fs::read_to_string(got.join("deep/a/b/c.txt")).unwrap(),
        "c\n"
    );
    assert_eq!(
        std::fs::read_link(got.join("link-to-notes")).unwrap(),
        Path::new("notes.txt")
    );
    let (code, _, err) = cli(&["copy-out", s(&img), "/home/alice", s(&out_dir)]);
    assert_eq!(code, 1, "a second copy-out overwrote the first");
    assert!(err.contains("exists"), "{err}");
    // The image is never written.
    let before = crate::common::sha256_file(&img);
    let _ = cli(&["ls", "-lR", s(&img), "/"]);
    assert_eq!(crate::common::sha256_file(&img), before);
}

/// Rocky 9 on LVM (the fstab names /dev/mapper/VG-root), Alpine on a whole-disk ext4
/// (busybox through an absolute symlink), CentOS 6 with only /etc/redhat-release, and
/// Fedora 39 on ext2 in a GPT with a BIOS boot partition.
#[test]
#[cfg_attr(
    any(no_qemu, no_e2fsprogs, no_parttools, no_lvm),
    ignore = "needs qemu-img, mkfs.ext4, sfdisk, sgdisk, lvm2, losetup"
)]
fn rocky_on_lvm_alpine_centos_and_fedora() {
    if !tools() || !have_parttools() || !have_lvm() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Alpine, whole disk.
    let tree = d.join("alpine");
    write(&tree, "etc/os-release", ALPINE_319);
    write(&tree, "etc/alpine-release", "3.19.1\n");
    write(&tree, "etc/hostname", "alp\n");
    write(&tree, "etc/fstab", "/dev/vda / ext4 rw,relatime 0 1\n");
    write(&tree, "lib/apk/db/installed", APK_INSTALLED);
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::copy("/bin/true", tree.join("bin/busybox")).unwrap();
    link(&tree, "bin/sh", "/bin/busybox");
    let img = d.join("alpine.raw");
    mkfs("ext4", &tree, &img, 16 * MIB, "alpine", ROOT_UUID);
    let i = inspect_path(&img);
    assert_eq!(i.partition_table, "none");
    let os = &i.operating_systems[0];
    assert_eq!(
        (os.distro.as_str(), os.major_version, os.minor_version),
        ("alpinelinux", 3, 19)
    );
    assert_eq!(os.version.as_deref(), Some("3.19.1"));
    assert_eq!(os.arch.as_deref(), Some(std::env::consts::ARCH));
    assert_eq!(
        (os.package_format.as_deref(), os.package_manager.as_deref()),
        (Some("apk"), Some("apk"))
    );
    assert_eq!(
        os.applications
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>(),
        ["busybox", "musl"]
    );
    assert_eq!(os.osinfo.as_deref(), Some("alpinelinux3.19"));

    // CentOS 6: no os-release, only redhat-release; ext3.
    let tree = d.join("centos");
    write(&tree, "etc/redhat-release", "CentOS release 6.10 (Final)\n");
    write(
        &tree,
        "etc/sysconfig/network",
        "NETWORKING=yes\nHOSTNAME=c6.example.com\n",
    );
    write(&tree, "etc/fstab", "/dev/sda1 / ext3 defaults 1 1\n");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("var/lib/rpm")).unwrap();
    std::fs::copy("/bin/true", tree.join("bin/ls")).unwrap();
    let img = d.join("centos.raw");
    mkfs("ext3", &tree, &img, 16 * MIB, "c6", HOME_UUID);
    let os = inspect_path(&img).operating_systems.remove(0);
    assert_eq!(
        (os.distro.as_str(), os.major_version, os.minor_version),
        ("centos", 6, 10)
    );
    assert_eq!(os.hostname.as_deref(), Some("c6.example.com"));
    assert_eq!(
        (os.package_format.as_deref(), os.package_manager.as_deref()),
        (Some("rpm"), Some("yum"))
    );

    // Fedora 39 on ext2 in a GPT with a BIOS boot partition: bios.
    let tree = d.join("fedora");
    merged_usr_root(&tree, FEDORA_39, "fed", "UUID=x / ext2 defaults 0 0\n");
    std::fs::create_dir_all(tree.join("usr/lib/sysimage/rpm")).unwrap();
    let disk = d.join("fedora.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    let parts = sgdisk(&disk, &["-n", "1:2048:+1M", "-t", "1:EF02", "-n", "2:0:0"]);
    let fs = d.join("fedora.ext2");
    mkfs("ext2", &tree, &fs, parts[1].len, "fedroot", ROOT_UUID);
    place(&fs, &disk, parts[1].start);
    let i = inspect_path(&disk);
    let os = &i.operating_systems[0];
    assert_eq!((os.distro.as_str(), os.major_version), ("fedora", 39));
    assert_eq!(
        (os.firmware.as_str(), os.package_manager.as_deref()),
        ("bios", Some("dnf"))
    );
    assert_eq!(i.volumes[1].filesystem.as_deref(), Some("ext2"));

    // Rocky 9 on an LVM logical volume.
    let vg = format!("rl{}", std::process::id());
    let tree = d.join("rocky");
    merged_usr_root(
        &tree,
        ROCKY_93,
        "rocky9",
        &format!("/dev/mapper/{vg}-root / ext4 defaults 0 0\n"),
    );
    write(
        &tree,
        "etc/redhat-release",
        "Rocky Linux release 9.3 (Blue Onyx)\n",
    );
    std::fs::create_dir_all(tree.join("var/lib/rpm")).unwrap();
    let disk = d.join("rocky.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let parts = sfdisk(&disk, "label: dos\n,,8e\n");
    let pv = parts[0];
    {
        let lo = crate::common::guestfs::run(&[
            "losetup",
            "-f",
            "--show",
            "-o",
            &pv.start.to_string(),
            "--sizelimit",
            &pv.len.to_string(),
            s(&disk),
        ]);
        let lo = lo.trim().to_string();
        let cfg = "devices { use_devicesfile = 0 } backup { backup = 0 archive = 0 }";
        let lvm = |args: &[&str]| {
            let mut v = vec![args[0], "--config", cfg];
            v.extend_from_slice(&args[1..]);
            run_status(&v)
        };
        let steps = [
            lvm(&["pvcreate", "-y", "-ff", &lo]),
            lvm(&["vgcreate", "-s", "1M", &vg, &lo]),
            lvm(&[
                "lvcreate",
                "--driverloaded",
                "n",
                "-an",
                "-Zn",
                "-L",
                "40M",
                "-n",
                "root",
                &vg,
            ]),
        ];
        let _ = Command::new("losetup").args(["-d", &lo]).status();
        for (code, out) in steps {
            assert_eq!(code, 0, "{out}");
        }
    }
    // lvm2 puts the first extent 1 MiB into the PV; root is extents 0-39.
    let fs = d.join("rocky.ext4");
    mkfs("ext4", &tree, &fs, 40 * MIB, "rockyroot", HOME_UUID);
    place(&fs, &disk, pv.start + MIB);
    let img = d.join("rocky.vmdk");
    run(&["qemu-img", "convert", "-O", "vmdk", s(&disk), s(&img)]);
    let i = inspect_path(&img);
    let lvs: Vec<_> = i
        .volumes
        .iter()
        .map(|v| (v.location.as_str(), v.filesystem.as_deref()))
        .collect();
    let root = format!("lvm {vg}/root");
    assert_eq!(
        lvs,
        [
            ("mbr 1", Some("LVM2_member")),
            (root.as_str(), Some("ext4"))
        ]
    );
    let os = &i.operating_systems[0];
    assert_eq!(os.root, root);
    assert_eq!(
        (os.distro.as_str(), os.major_version, os.minor_version),
        ("rocky", 9, 3)
    );
    assert_eq!(os.mountpoints[0].volume.as_deref(), Some(root.as_str()));
    assert_eq!(
        (os.package_format.as_deref(), os.package_manager.as_deref()),
        (Some("rpm"), Some("dnf"))
    );
    assert_eq!(os.osinfo.as_deref(), Some("rocky9"));
}

/// A directory hard-linked into its own subtree (debugfs `link`), a symlink loop and
/// absurd superblock counts: clear errors, bounded work, no panic; then random damage
/// to the metadata blocks of a real filesystem, 60 rounds.
#[test]
#[cfg_attr(any(no_qemu, no_e2fsprogs), ignore = "needs mkfs.ext4, debugfs")]
fn hostile_ext_trees_give_errors_not_hangs() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tree = d.join("t");
    merged_usr_root(&tree, DEBIAN_12, "h", "");
    write(&tree, "a/b/file", "x\n");
    let img = d.join("loop.raw");
    mkfs("ext4", &tree, &img, 8 * MIB, "h", ROOT_UUID);
    run(&["debugfs", "-w", "-R", "link /a /a/b/up", s(&img)]);
    let (code, out, err) = cli(&["ls", "-R", s(&img), "/a"]);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("4096") || err.contains("too long"), "{err}");
    assert!(out.lines().count() < 2000);

    // blocks count beyond the volume: the volume reports why, nothing else breaks.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[1024 + 4..1024 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let bad = d.join("huge.raw");
    std::fs::write(&bad, &bytes).unwrap();
    let i = inspect_path(&bad);
    let e = i.volumes[0].error.as_deref().unwrap();
    assert!(
        e.contains("s_blocks_count") || e.contains("more than the"),
        "{e}"
    );
    assert!(i.operating_systems.is_empty());

    let good = std::fs::read(&img).unwrap();
    let mut x = 0x1234_5678_9abc_def1u64;
    for round in 0..60 {
        let mut m = good.clone();
        for _ in 0..1 + round % 5 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = 1024 + (x % (256 * 1024)) as usize;
            m[at] ^= (x >> 40) as u8 | 1;
        }
        let dev: Arc<dyn BlockDevice> = Arc::new(Mem(m));
        let mut g = diskconv::guest::inspect::Guest::open(dev).unwrap();
        let insp = g.inspect();
        if let Ok(fs) = g.filesystem("disk") {
            let _ = fs.read_dir("/etc");
            let _ = fs.read_file("/etc/os-release", 1 << 20);
        }
        serde_json::to_string(&insp).unwrap();
    }
}

/// A FAT cluster chain that loops back on itself, and one that runs into a free
/// cluster: errors naming them, no hang.
#[test]
#[cfg_attr(no_dosfs, ignore = "needs mkfs.fat, mtools")]
fn hostile_fat_chains_give_errors() {
    if !fat_tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.fat");
    run(&["mkfs.fat", "-C", "-s", "1", s(&img), "1024"]);
    let data = dir.path().join("BIG.BIN");
    std::fs::write(&data, vec![7u8; 5000]).unwrap();
    run(&["mcopy", "-i", s(&img), s(&data), "::/BIG.BIN"]);
    let (code, out, _) = cli(&["cat", s(&img), "/big.bin"]);
    assert_eq!((code, out.len()), (0, 5000));
    // FAT12, 1 reserved sector: the FAT at 512. BIG.BIN is clusters 2..=11; make
    // cluster 5 point back at 3.
    let good = std::fs::read(&img).unwrap();
    let set12 = |b: &mut Vec<u8>, c: usize, v: u16| {
        let o = 512 + c * 3 / 2;
        let cur = u16::from_le_bytes([b[o], b[o + 1]]);
        let new = if c.is_multiple_of(2) {
            (cur & 0xF000) | v
        } else {
            (cur & 0x000F) | (v << 4)
        };
        b[o..o + 2].copy_from_slice(&new.to_le_bytes());
    };
    let mut bad = good.clone();
    set12(&mut bad, 5, 3);
    std::fs::write(&img, &bad).unwrap();
    let (code, _, err) = cli(&["cat", s(&img), "/BIG.BIN"]);
    assert_eq!(code, 1);
    assert!(err.contains("twice (a cycle)"), "{err}");
    let mut bad = good;
    set12(&mut bad, 5, 0x700);
    std::fs::write(&img, &bad).unwrap();
    let (code, _, err) = cli(&["cat", s(&img), "/BIG.BIN"]);
    assert_eq!(code, 1);
    assert!(err.contains("outside"), "{err}");
}

/// NTFS made by mkntfs in an MBR partition, files put in by ntfscp (no mount), read
/// through qcow2: label and serial as blkid prints them, names case-insensitive, data
/// byte for byte; then random damage to its MFT records, 40 rounds, without a panic.
#[test]
#[cfg_attr(
    any(no_qemu, no_ntfs, no_parttools),
    ignore = "needs qemu-img, mkntfs, ntfscp, sfdisk"
)]
fn ntfs_volume_files_through_qcow2() {
    if !have(
        &["mkntfs", "ntfscp", "qemu-img", "blkid"],
        !cfg!(no_ntfs) && !cfg!(no_qemu),
    ) || !have_parttools()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let disk = d.join("win.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    let parts = sfdisk(&disk, "label: dos\n,,7\n");
    let vol = d.join("vol.ntfs");
    std::fs::File::create(&vol)
        .unwrap()
        .set_len(parts[0].len)
        .unwrap();
    run(&["mkntfs", "-q", "-F", "-f", "-L", "Windows", s(&vol)]);
    let small = d.join("small.txt");
    std::fs::write(&small, "resident data\n").unwrap();
    let big = d.join("big.bin");
    let data: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    run(&["ntfscp", "-f", s(&vol), s(&small), "Notes Small.txt"]);
    run(&["ntfscp", "-f", s(&vol), s(&big), "big.bin"]);
    let blkid = run(&["blkid", "-o", "export", s(&vol)]);
    let serial = blkid
        .lines()
        .find_map(|l| l.strip_prefix("UUID="))
        .unwrap()
        .to_string();
    place(&vol, &disk, parts[0].start);
    let img = d.join("win.qcow2");
    run(&["qemu-img", "convert", "-O", "qcow2", s(&disk), s(&img)]);
    let i = inspect_path(&img);
    let v = &i.volumes[0];
    assert_eq!(
        (
            v.filesystem.as_deref(),
            v.label.as_deref(),
            v.uuid.as_deref()
        ),
        (Some("ntfs"), Some("Windows"), Some(serial.as_str()))
    );
    assert!(i.operating_systems.is_empty());
    let (code, out, err) = cli(&["cat", s(&img), "/NOTES small.TXT"]);
    assert_eq!((code, out.as_str()), (0, "resident data\n"), "{err}");
    let o = bin().args(["cat", s(&img), "/big.bin"]).output().unwrap();
    assert!(o.stdout == data, "big.bin differs");
    let (code, out, _) = cli(&["ls", "-l", s(&img), "/"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(" 700000 ") && out.contains("Notes Small.txt"),
        "{out}"
    );
    assert!(!out.contains("$MFT"), "{out}");

    let good = std::fs::read(&vol).unwrap();
    let cluster = u64::from(u16::from_le_bytes([good[0x0B], good[0x0C]])) * u64::from(good[0x0D]);
    let mft = u64::from_le_bytes(good[0x30..0x38].try_into().unwrap()) * cluster;
    let mut x = 0x0dd_ba11_cafe_f00du64;
    for round in 0..40 {
        let mut m = good.clone();
        for _ in 0..1 + round % 4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (mft + x % (64 * 1024)) as usize;
            m[at] ^= (x >> 40) as u8 | 1;
        }
        let dev: Arc<dyn BlockDevice> = Arc::new(Mem(m));
        let mut g = diskconv::guest::inspect::Guest::open(dev).unwrap();
        let insp = g.inspect();
        if let Ok(fs) = g.filesystem("disk") {
            if let Ok(list) = fs.read_dir("/") {
                for e in list {
                    let _ = fs.read_file(&format!("/{}", e.name), 1 << 20);
                }
            }
        }
        serde_json::to_string(&insp).unwrap();
    }
}

/// Windows Server 2022 on NTFS in a GPT with an ESP: SOFTWARE and SYSTEM hives (written
/// by tests/common/hive.rs) put at \\Windows\\System32\\config through an ntfs-3g mount,
/// read back through vhd. The hives are also written to fuzz/corpus/guest_hive when
/// DISKCONV_WRITE_SEEDS=1.
#[test]
#[cfg_attr(
    any(no_qemu, no_ntfs, no_parttools),
    ignore = "needs qemu-img, mkntfs, ntfs-3g, sgdisk"
)]
fn windows_on_ntfs_from_its_registry() {
    use crate::common::hive;
    let (software, system) = (hive::software_2022(), hive::system("WIN-2K22-TEST"));
    if std::env::var("DISKCONV_WRITE_SEEDS").is_ok_and(|v| v == "1") {
        let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/guest_hive");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("software-2022.hive"), &software).unwrap();
        std::fs::write(d.join("system.hive"), &system).unwrap();
    }
    if !have(
        &["mkntfs", "ntfs-3g", "qemu-img"],
        !cfg!(no_ntfs) && !cfg!(no_qemu),
    ) || !have_parttools()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vol = d.join("c.ntfs");
    std::fs::File::create(&vol)
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    run(&["mkntfs", "-q", "-F", "-f", "-L", "System", s(&vol)]);
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (code, out) = run_status(&["ntfs-3g", s(&vol), s(&mnt)]);
    if code != 0 {
        assert!(
            !crate::common::oracles_required(),
            "ntfs-3g cannot mount here: {out}"
        );
        eprintln!("ntfs-3g cannot mount here (no FUSE?): skipped: {out}");
        return;
    }
    let config = mnt.join("Windows/System32/config");
    let wrote = std::fs::create_dir_all(&config)
        .and_then(|()| std::fs::write(config.join("SOFTWARE"), &software))
        .and_then(|()| std::fs::write(config.join("SYSTEM"), &system));
    let _ = Command::new("umount").arg(&mnt).status();
    wrote.unwrap();
    let disk = d.join("win.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(48 * MIB)
        .unwrap();
    let parts = sgdisk(
        &disk,
        &[
            "-n",
            "1:2048:+8M",
            "-t",
            "1:EF00",
            "-n",
            "2:0:0",
            "-t",
            "2:0700",
        ],
    );
    assert!(parts[1].len >= 32 * MIB);
    place(&vol, &disk, parts[1].start);
    let img = d.join("win.vhd");
    run(&["qemu-img", "convert", "-O", "vpc", s(&disk), s(&img)]);
    let i = inspect_path(&img);
    assert_eq!(i.operating_systems.len(), 1, "{i:#?}");
    let os = &i.operating_systems[0];
    assert_eq!(
        (os.os_type.as_str(), os.distro.as_str()),
        ("windows", "windows")
    );
    assert_eq!(
        os.product_name.as_deref(),
        Some("Windows Server 2022 Datacenter")
    );
    assert_eq!((os.major_version, os.minor_version), (10, 0));
    assert_eq!(os.build.as_deref(), Some("20348"));
    assert_eq!(os.edition.as_deref(), Some("ServerDatacenter"));
    assert_eq!(os.system_root.as_deref(), Some("C:\\Windows"));
    assert_eq!(os.hostname.as_deref(), Some("WIN-2K22-TEST"));
    assert_eq!(os.arch.as_deref(), Some("x86_64"));
    assert_eq!(os.osinfo.as_deref(), Some("win2k22"));
    assert_eq!(os.firmware, "uefi");
    assert!(os.notes.is_empty(), "{:?}", os.notes);
    let (code, out, _) = cli(&["inspect", "--guest", "--output=glance-properties", s(&img)]);
    assert_eq!(code, 0);
    let p: BTreeMap<String, String> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            p["os_type"].as_str(),
            p["os_distro"].as_str(),
            p["os_version"].as_str()
        ),
        ("windows", "windows", "10.0")
    );
    // A hive that does not validate: a note naming it, the rest still reported.
    let mut bad = software.clone();
    bad[508] ^= 1;
    let h = diskconv::guest::inspect::hive::Hive::parse(bad);
    assert!(h.err().unwrap().to_string().contains("checksum"));
}

/// The held-out real images that hold filesystems: dfvfs's ext2 in a vmdk made by
/// qemu-img in 2014, and its LVM test disk (two ext2 logical volumes) in qcow2.
#[test]
fn real_corpus_images_with_filesystems() {
    let Some(dir) = crate::common::corpus_dir() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let vmdk = crate::common::corpus_file(&dir, "dfvfs-image.vmdk", tmp.path());
    let i = inspect_path(&vmdk);
    assert_eq!(i.volumes[0].filesystem.as_deref(), Some("ext2"));
    assert_eq!(
        i.volumes[0].uuid.as_deref(),
        Some("f1f8dab8-57ef-49db-9cf5-b409570736ed")
    );
    let (code, out, _) = cli(&["ls", "-R", s(&vmdk), "/"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l == "/a_directory/another_file"),
        "{out}"
    );
    let (code, out, _) = cli(&["cat", s(&vmdk), "/a_link"]);
    let (code2, target, _) = cli(&["cat", s(&vmdk), "/a_directory/another_file"]);
    assert_eq!((code, code2), (0, 0));
    assert_eq!(out, target, "the symlink reads as its target");
    let lvm = crate::common::corpus_file(&dir, "dfvfs-lvmtest.qcow2", tmp.path());
    let i = inspect_path(&lvm);
    let v: Vec<_> = i
        .volumes
        .iter()
        .map(|v| (v.location.as_str(), v.filesystem.as_deref()))
        .collect();
    assert_eq!(
        v,
        [
            ("disk", Some("LVM2_member")),
            ("lvm vg_test/lv_test1", Some("ext2")),
            ("lvm vg_test/lv_test2", Some("ext2"))
        ]
    );
}

/// A disk in memory (the corrupted copies above).
struct Mem(Vec<u8>);

impl BlockDevice for Mem {
    fn virtual_size(&self) -> u64 {
        self.0.len() as u64
    }
    fn map(&self, offset: u64, max_len: u64) -> diskconv::Result<diskconv::Mapping> {
        Ok(diskconv::Mapping {
            offset,
            len: max_len.min(self.virtual_size() - offset),
            kind: diskconv::MappingKind::Data { host: None },
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskconv::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
    fn info(&self) -> diskconv::ImageInfo {
        diskconv::ImageInfo::default()
    }
    fn format(&self) -> Format {
        Format::Raw
    }
}
