//! In-place discard, the write side of `sparsify --in-place`: open the image read-write,
//! take the format's editor from the dispatch (which locks the file), and give back the
//! storage of guest ranges that the caller knows to be free. Which ranges those are is
//! the sparsify command's business (it scans the guest's filesystems); how each format
//! unallocates them, and in what order it writes so a crash leaves a consistent image,
//! is the format editor's.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::Format;
use crate::formats::open_editor;

/// Discard the guest ranges `runs` (ascending, disjoint `(offset, len)` pairs) of the
/// image at `path`, of `format` (probed when None), in place: whole allocation units
/// inside a run are unallocated or marked zero where the format allows, partial ones
/// are left. Returns the bytes of guest data no longer stored. A format (or subformat)
/// that cannot give space back in place is refused, named, with the reason.
/// `fail_at_write` is the test hook of [`ResizeOptions::fail_at_write`](crate::options::ResizeOptions::fail_at_write).
pub fn discard_in_place(
    path: &Path,
    format: Option<Format>,
    runs: &[(u64, u64)],
    fail_at_write: Option<u64>,
) -> Result<u64> {
    let (format, file, opts) = super::open_for_edit(path, format, fail_at_write)?;
    let mut editor = open_editor(format, file, path, &opts).map_err(|e| name(e, format))?;
    editor
        .discard(runs)
        .map_err(|e| name(e, format).with_path(path))
}

/// Refusals name the format, so "cannot give back space" says of what.
fn name(e: Error, format: Format) -> Error {
    if e.kind() != crate::ErrorKind::Unsupported {
        return e;
    }
    let mut named = Error::unsupported(format!(
        "cannot discard in place in a {} image: {}",
        format.name(),
        e.message()
    ));
    if let Some(p) = e.path() {
        named = named.with_path(p);
    }
    if let Some(f) = e.field() {
        named = named.with_field(f.to_string());
    }
    if let Some(o) = e.offset() {
        named = named.at(o);
    }
    named
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::whole_units;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn whole_units_count_a_last_unit_the_end_cuts_short() {
        assert_eq!(whole_units(0, 4096, 4096, 1 << 20), 0..1);
        assert_eq!(whole_units(1, 8190, 4096, 1 << 20), 1..1);
        assert_eq!(whole_units(100, 10000, 4096, 1 << 20), 1..2);
        // A guest of 10000 bytes: the run to its end covers the third unit's guest part.
        assert_eq!(whole_units(4096, 10000 - 4096, 4096, 10000), 1..3);
        assert!(whole_units(5000, 10, 4096, 1 << 20).is_empty());
    }

    #[test]
    fn raw_files_get_holes_and_report_what_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let data: Vec<u8> = (0..(1u32 << 20) + 1000)
            .map(|i| (i % 253) as u8 + 1)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let blocks = std::fs::metadata(&p).unwrap().blocks();
        // The last run reaches the reader's rounded end (the partial last sector).
        let runs = [
            (100, 300_000),
            (600_000, 4096),
            ((1 << 20) - 4096, 4096 + 1024),
        ];
        let freed = discard_in_place(&p, Some(Format::Raw), &runs, None).unwrap();
        // 4096..299008, 600_000 holds no whole unit, the tail from 1 MiB - 4 KiB.
        // The file's last 1000 bytes are zeroed but stay a partial allocated block.
        assert_eq!(freed, (299_008 - 4096) + 4096);
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), data.len(), "the length never changes");
        let zero = |a: usize, b: usize| got[a..b].iter().all(|&x| x == 0);
        assert!(zero(4096, 299_008) && zero((1 << 20) - 4096, got.len()));
        assert_eq!(&got[..4096], &data[..4096]);
        assert_eq!(
            &got[299_008..(1 << 20) - 4096],
            &data[299_008..(1 << 20) - 4096]
        );
        assert!(std::fs::metadata(&p).unwrap().blocks() < blocks);
        // Again: nothing left to free.
        assert_eq!(
            discard_in_place(&p, Some(Format::Raw), &runs, None).unwrap(),
            0
        );
        // Bad runs are refused before anything changes.
        let e = discard_in_place(&p, Some(Format::Raw), &[(0, 1 << 30)], None).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument, "{e}");
    }

    #[test]
    fn a_failed_punch_leaves_the_other_runs_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let data = vec![7u8; 64 << 10];
        std::fs::write(&p, &data).unwrap();
        let runs = [(0, 8192), (16384, 8192), (32768, 8192)];
        let e = discard_in_place(&p, Some(Format::Raw), &runs, Some(2)).unwrap_err();
        assert!(e.to_string().contains("test hook"), "{e}");
        let got = std::fs::read(&p).unwrap();
        assert!(got[..8192].iter().all(|&x| x == 0), "the first run is done");
        assert_eq!(&got[8192..], &data[8192..], "the rest is untouched");
    }

    #[test]
    fn refusals_name_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.vmdk");
        let opts = crate::CreateOptions::new(1 << 20).option("subformat", "streamOptimized");
        crate::create(&p, Format::Vmdk, &opts).unwrap();
        let before = std::fs::read(&p).unwrap();
        let e = discard_in_place(&p, None, &[(0, 1 << 20)], None).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(e.to_string().contains("in a vmdk image"), "{e}");
        assert!(e.to_string().contains("streamOptimized"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }
}
