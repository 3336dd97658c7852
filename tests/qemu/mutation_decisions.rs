//! The decisions of tests/MUTATION.md, one test each: where the differential mutation test
//! (tests/mutation.py) found diskconv and qemu-img disagreeing, which answer is right by
//! the format's spec, pinned down on a minimal reproducer.
use crate::common;
use common::*;

use std::path::Path;

use diskconv::{ErrorKind, Format, OpenOptions};

fn patch(p: &Path, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(p).unwrap();
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(p, b).unwrap();
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

fn dc_convert(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_diskconv"))
        .args(args)
        .output()
        .unwrap()
}

/// MUTATION.md "VHD sector bitmaps": a sector whose bitmap bit is 0 was never written and
/// reads as zeros (VHD spec, "Block Bitmap"); qemu-img reads the block's bytes regardless.
#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn vhd_sector_bitmap_decides_which_sectors_hold_data() {
    assert!(have_qemu());
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("g.raw");
    std::fs::write(&raw, vec![0x5au8; 1 << 20]).unwrap();
    let vhd = dir.path().join("g.vhd");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vpc",
        "-o",
        "subformat=dynamic",
        s(&raw),
        s(&vhd),
    ]);
    // Clear the bitmap bit of the block's first sector (most significant bit first).
    let b = std::fs::read(&vhd).unwrap();
    let table = u64::from_be_bytes(b[512 + 16..512 + 24].try_into().unwrap()) as usize;
    let bitmap = be32(&b, table) as usize * 512;
    assert_eq!(b[bitmap], 0xff, "qemu-img marks written sectors present");
    patch(&vhd, bitmap, &[0x7f]);

    let dev = open_as(&vhd, Format::Vhd);
    let mut sector = vec![1u8; 1024];
    dev.read_at(&mut sector, 0).unwrap();
    assert!(
        sector[..512].iter().all(|&x| x == 0),
        "absent sector reads as zeros"
    );
    assert!(
        sector[512..].iter().all(|&x| x == 0x5a),
        "present sector reads its data"
    );

    // qemu-img ignores the bitmap and reads the stale bytes: the documented difference.
    let q = dir.path().join("q.raw");
    qemu_img(&["convert", "-f", "vpc", "-O", "raw", s(&vhd), s(&q)]);
    assert_eq!(std::fs::read(&q).unwrap()[0], 0x5a);
}

/// MUTATION.md "VMDK descriptor without parentCID": no parentCID means no parent (the
/// spec's `ffffffff`); qemu-img refuses with EINVAL, diskconv reads the extents.
#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn vmdk_descriptor_without_parent_cid_reads_its_extents() {
    assert!(have_qemu());
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("g.raw");
    make_raw(&raw, 1 << 20, 3);
    let vmdk = dir.path().join("g.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&raw),
        s(&vmdk),
    ]);
    let desc = std::fs::read_to_string(&vmdk).unwrap();
    std::fs::write(&vmdk, desc.replace("parentCID=", "pqrentCID=")).unwrap();
    let out = dir.path().join("out.raw");
    let o = dc_convert(&[
        "convert",
        "-f",
        "vmdk",
        "--allow-references",
        s(&vmdk),
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sha256_file(&out), sha256_file(&raw));
}

/// MUTATION.md "VMDK createType unknown or missing": VMware and qemu-img refuse a
/// descriptor whose createType they do not know, since the type says how to read the
/// extents; diskconv refuses exactly the types qemu-img refuses.
#[test]
#[cfg_attr(no_qemu, ignore = "needs qemu-img: apt-get install qemu-utils")]
fn vmdk_unknown_create_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("g.raw");
    make_raw(&raw, 1 << 20, 3);
    let vmdk = dir.path().join("g.vmdk");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        s(&raw),
        s(&vmdk),
    ]);
    let desc = std::fs::read_to_string(&vmdk).unwrap();
    for bad in [
        "createType=\"monolithicFlav\"",
        "createTypa=\"monolithicFlat\"",
    ] {
        std::fs::write(&vmdk, desc.replace("createType=\"monolithicFlat\"", bad)).unwrap();
        let opts = OpenOptions::new()
            .format(Format::Vmdk)
            .allow_references(true, None);
        let e = diskconv::open(&vmdk, &opts).err().expect(bad);
        assert!(
            matches!(e.kind(), ErrorKind::Unsupported | ErrorKind::InvalidFormat),
            "{bad}: {e}"
        );
    }
}

/// MUTATION.md "Tables and data past the end of the file": qemu-img reads what lies past
/// the end of a truncated image as zeros; diskconv refuses it as corrupt, naming the
/// entry, because a truncated image has lost data and a silent zero fill hides that.
#[test]
#[cfg_attr(
    no_qemu,
    ignore = "needs qemu-img and qemu-io: apt-get install qemu-utils"
)]
fn truncated_qcow2_is_corrupt_not_zero_filled() {
    assert!(have_qemu());
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("g.raw");
    std::fs::write(&raw, vec![0x33u8; 1 << 20]).unwrap();
    let img = dir.path().join("g.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
    let len = std::fs::metadata(&img).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len - 64 * 1024)
        .unwrap();
    let q = dir.path().join("q.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&q)]);
    let e = match diskconv::open(&img, &OpenOptions::new().format(Format::Qcow2)) {
        Err(e) => e,
        Ok(dev) => {
            let mut buf = vec![0u8; 1 << 20];
            dev.read_at(&mut buf, 0).expect_err("read past the end")
        }
    };
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("end of the file"), "{e}");
}
