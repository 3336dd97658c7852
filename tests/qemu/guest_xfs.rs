//! XFS file access and inspection over filesystems made by the real `mkfs.xfs`, filled
//! from a proto file (`-p`, no mount): a Rocky 9 merged-/usr root, a 60-entry directory
//! (one directory block, "XDB3"/"XD2B"), a 2000-entry one (leaf/node: data blocks,
//! leaf and free-index blocks, mapped through a B-tree data fork on v5), symlinks, a
//! 3 MiB file. v5 (CRCs) and v4. `ls -R` must list exactly the host tree, `cat` give
//! the same bytes, `inspect --guest` find Rocky 9.3 on the XFS root.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::guestfs::{have, run, s};
use crate::guest_inspect::{cli, inspect_path, merged_usr_root, ROCKY_93};

/// Proto-file lines for the entries of `dir` (mkfs.xfs(8), "-p protofile").
fn proto_entries(dir: &Path, out: &mut String) {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let m = std::fs::symlink_metadata(&p).unwrap();
        let perm = m.permissions().mode() & 0o777;
        if m.file_type().is_symlink() {
            let t = std::fs::read_link(&p).unwrap();
            out.push_str(&format!("{n} l--{perm:03o} 0 0 {}\n", t.display()));
        } else if m.is_dir() {
            out.push_str(&format!("{n} d--{perm:03o} 0 0\n"));
            proto_entries(&p, out);
            out.push_str("$\n");
        } else {
            out.push_str(&format!("{n} ---{perm:03o} 0 0 {}\n", s(&p)));
        }
    }
}

/// Every path below `dir` (symlinks not followed), as the guest names them.
fn host_paths(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let path = format!("{prefix}/{}", e.file_name().into_string().unwrap());
        if e.file_type().unwrap().is_dir() {
            host_paths(&e.path(), &path, out);
        }
        out.insert(path);
    }
}

fn xfs_db_field(img: &Path, path: &str, field: &str) -> String {
    run(&[
        "xfs_db",
        "-r",
        "-c",
        &format!("path {path}"),
        "-c",
        &format!("print {field}"),
        s(img),
    ])
    .trim()
    .to_string()
}

fn rocky_on_xfs(crc: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("root");
    merged_usr_root(
        &tree,
        ROCKY_93,
        "rocky-xfs",
        "/dev/mapper/rl-root / xfs defaults 0 0\n",
    );
    std::fs::create_dir_all(tree.join("many/block")).unwrap();
    std::fs::create_dir_all(tree.join("many/leaf")).unwrap();
    for i in 0..60 {
        std::fs::write(tree.join(format!("many/block/entry-{i:03}")), i.to_string()).unwrap();
    }
    for i in 0..2000 {
        let name = format!("many/leaf/a-rather-long-file-name-{i:05}");
        std::fs::write(tree.join(name), format!("{i}\n")).unwrap();
    }
    let mut big = vec![0u8; 3 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(tree.join("var-big"), &big).unwrap();
    let mut proto = String::from("/dev/null\n0 0\nd--755 0 0\n");
    proto_entries(&tree, &mut proto);
    proto.push_str("$\n");
    let proto_path = dir.path().join("proto");
    std::fs::write(&proto_path, proto).unwrap();
    let img = dir.path().join("xfs.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(320 << 20)
        .unwrap();
    run(&[
        "mkfs.xfs",
        "-q",
        "-f",
        "-m",
        &format!("crc={crc}"),
        "-L",
        "rockyroot",
        "-p",
        s(&proto_path),
        s(&img),
    ]);
    // The directory formats the test means to cover, as xfs_db sees them.
    assert_eq!(
        xfs_db_field(&img, "/many/block", "core.size"),
        "core.size = 4096"
    );
    let leaf_format = xfs_db_field(&img, "/many/leaf", "core.format");
    eprintln!("crc={crc}: 2000-entry directory has {leaf_format}");
    assert!(
        leaf_format.contains("extents") || leaf_format.contains("btree"),
        "{leaf_format}"
    );
    assert_eq!(
        xfs_db_field(&img, "/etc", "core.format"),
        "core.format = 1 (local)"
    );

    let (code, out, err) = cli(&["ls", "-R", s(&img), "/"]);
    assert_eq!(code, 0, "{err}");
    let listed: BTreeSet<String> = out.lines().map(str::to_string).collect();
    let mut want = BTreeSet::new();
    host_paths(&tree, "", &mut want);
    assert_eq!(listed, want);

    let (code, out, err) = cli(&["ls", "-l", s(&img), "/many/block"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 60);
    assert!(out.lines().all(|l| l.starts_with("-rw-r--r--")), "{out}");

    let big_out = dir.path().join("big.out");
    let (code, _, err) = cli(&["copy-out", s(&img), "/var-big", s(dir.path())]);
    assert_eq!(code, 0, "{err}");
    std::fs::rename(dir.path().join("var-big"), &big_out).unwrap();
    assert!(std::fs::read(&big_out).unwrap() == big, "copy-out differs");
    let (code, out, err) = cli(&["cat", s(&img), "/etc/os-release"]);
    assert_eq!((code, out.as_str()), (0, ROCKY_93), "{err}");
    let (code, out, err) = cli(&["cat", s(&img), "/many/leaf/a-rather-long-file-name-01999"]);
    assert_eq!((code, out.as_str()), (0, "1999\n"), "{err}");
    // A symlink loop is an error, not a hang.
    let (code, _, err) = cli(&["cat", s(&img), "/etc/loop1"]);
    assert_ne!(code, 0, "{err}");

    let i = inspect_path(&img);
    assert_eq!(i.volumes[0].filesystem.as_deref(), Some("xfs"));
    let os = &i.operating_systems[0];
    assert_eq!(
        (os.distro.as_str(), os.major_version, os.minor_version),
        ("rocky", 9, 3)
    );
    assert_eq!(os.hostname.as_deref(), Some("rocky-xfs"));
}

#[test]
#[cfg_attr(no_xfs, ignore = "needs mkfs.xfs, xfs_db")]
fn rocky_on_xfs_v5() {
    if !have(&["mkfs.xfs", "xfs_db"], !cfg!(no_xfs)) {
        return;
    }
    rocky_on_xfs("1");
}

#[test]
#[cfg_attr(no_xfs, ignore = "needs mkfs.xfs, xfs_db")]
fn rocky_on_xfs_v4() {
    if !have(&["mkfs.xfs", "xfs_db"], !cfg!(no_xfs)) {
        return;
    }
    rocky_on_xfs("0");
}
