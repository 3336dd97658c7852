//! raw: read through holes, write sparse, the engine's zero detection and -S 0.
use crate::common;
use common::*;
use diskconv::{ConvertOptions, Format, MappingKind};

#[test]
fn raw_round_trip_is_bit_exact_and_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    let dst = dir.path().join("b.raw");
    make_raw(&src, (7 << 20) + 513, 7);
    convert(&src, &dst, Format::Raw, &[], false);
    // Like qemu-img, the disk is a whole number of sectors: the last one padded with zeros.
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!(b.len() as u64, (7 << 20) + 1024);
    assert_eq!(&b[..a.len()], &a[..]);
    assert!(b[a.len()..].iter().all(|&x| x == 0));
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(used < 7 << 20, "output should keep holes, uses {used}");
}

#[test]
fn huge_hole_maps_fast_and_converts_to_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let dev = open_as(&src, Format::Raw);
    let m = dev.map(0, 1 << 40).unwrap();
    assert_eq!(
        (m.offset, m.len, m.kind),
        (0, 1 << 40, MappingKind::Unallocated)
    );
    let dst = dir.path().join("out.raw");
    convert(&src, &dst, Format::Raw, &[], false);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), 1 << 40);
}

#[test]
fn min_sparse_zero_writes_everything() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("z.raw");
    std::fs::File::create(&src)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let dst = dir.path().join("full.raw");
    let mut o = ConvertOptions::new(Format::Raw);
    o.min_sparse = 0;
    diskconv::convert(&src, &dst, &o).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 >= 1 << 20);
    assert!(std::fs::read(&dst).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn same_file_is_refused_and_failure_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 1 << 20, 3);
    let before = sha256_file(&src);
    let o = ConvertOptions::new(Format::Raw);
    let e = diskconv::convert(&src, &src, &o).unwrap_err();
    assert_eq!(e.kind(), diskconv::ErrorKind::InvalidArgument);
    assert_eq!(before, sha256_file(&src));
    let mut o = ConvertOptions::new(Format::Raw);
    o.create.options.insert("nonsense".into(), "1".into());
    let dst = dir.path().join("never.raw");
    assert!(diskconv::convert(&src, &dst, &o).is_err());
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the source may remain: {left:?}");
}

#[test]
fn reader_adapter_streams_guest_bytes() {
    use std::io::{Read, Seek, SeekFrom};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("a.raw");
    make_raw(&src, 300_001, 11);
    let dev = open_as(&src, Format::Raw);
    let mut r = diskconv::DeviceReader::new(dev);
    let mut all = Vec::new();
    r.read_to_end(&mut all).unwrap();
    let file = std::fs::read(&src).unwrap();
    // 300001 bytes read as a 300032-byte disk (whole sectors, as qemu-img reads it).
    assert_eq!(all.len(), 300_032);
    assert!(
        all[..file.len()] == file[..],
        "guest bytes differ from the file"
    );
    assert!(all[file.len()..].iter().all(|&x| x == 0));
    r.seek(SeekFrom::Start(1000)).unwrap();
    let mut b = [0u8; 10];
    r.read_exact(&mut b).unwrap();
    assert_eq!(&b[..], &all[1000..1010]);
}

#[test]
#[cfg_attr(no_bzip2, ignore = "needs bzip2 for the corpus: apt-get install bzip2")]
fn corpus_raw_reads_bit_exact() {
    let Some(dir) = corpus_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for e in corpus_entries(&dir)
        .into_iter()
        .filter(|e| e.format == "raw")
    {
        let p = corpus_file(&dir, &e.file, tmp.path());
        let dev = open_as(&p, Format::Raw);
        assert_eq!(
            Some(sha256_device(dev.as_ref())).as_deref(),
            e.expected_sha(),
            "{}",
            e.file
        );
    }
}
