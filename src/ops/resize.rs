//! `resize` on a file: open the image read-write, take the format's in-place editor from
//! the dispatch, change the size. The format's editor orders its writes so a failure at
//! any point leaves the image as it was or as asked.

use std::path::Path;

use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::formats::open_editor;
use crate::options::ResizeOptions;

/// Resize the image at `path` to `new_size` guest bytes, in place. Shrinking needs
/// [`ResizeOptions::shrink`]; a size of zero is refused, as by qemu-img.
pub fn resize(path: &Path, new_size: u64, opts: &ResizeOptions) -> Result<()> {
    if new_size == 0 {
        return Err(Error::arg("New image size must be positive").with_path(path));
    }
    let format = match opts.format {
        Some(f) => f,
        None => crate::probe::probe_file(&HostFile::open(path)?)?,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("cannot open the image for writing", e).with_path(path))?;
    let mut editor = open_editor(format, file, path, opts)?;
    editor.resize(new_size, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Preallocation;
    use crate::Format;

    fn sample(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let p = dir.join("a.raw");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 + 1).collect();
        std::fs::write(&p, &data).unwrap();
        (p, data)
    }

    #[test]
    fn raw_grows_with_holes_and_shrinks_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (p, data) = sample(dir.path());
        let o = ResizeOptions {
            format: Some(Format::Raw),
            ..Default::default()
        };
        resize(&p, 3 << 20, &o).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len(), 3 << 20);
        assert_eq!(&got[..data.len()], &data[..]);
        assert!(got[data.len()..].iter().all(|&b| b == 0));
        // The new space is a hole: far fewer blocks than bytes.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&p).unwrap().blocks() * 512 < 1 << 20);

        let e = resize(&p, 1000, &o).unwrap_err();
        assert_eq!(e.option(), Some("ResizeOptions::shrink"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap().len(), 3 << 20);
        let shrink = ResizeOptions {
            shrink: true,
            ..o.clone()
        };
        resize(&p, 1000, &shrink).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), &data[..1000]);
        assert!(resize(&p, 0, &shrink).is_err());
    }

    #[test]
    fn raw_full_preallocation_survives_a_failure_at_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let (p, data) = sample(dir.path());
        let full = ResizeOptions {
            format: Some(Format::Raw),
            preallocation: Preallocation::Full,
            ..Default::default()
        };
        let new_size = (3 << 20) + 4096;
        // Fail each write in turn until one run gets through: every failure must leave
        // the image untouched, and the run that succeeds has the hook past its last write.
        let expected_writes = (new_size - data.len() as u64).div_ceil(1 << 20) + 1;
        let mut n = 1;
        loop {
            let o = ResizeOptions {
                fail_at_write: Some(n),
                ..full.clone()
            };
            match resize(&p, new_size, &o) {
                Ok(()) => break,
                Err(e) => {
                    assert!(e.to_string().contains("test hook"), "{e}");
                    assert_eq!(std::fs::read(&p).unwrap(), data, "after failing write {n}");
                }
            }
            n += 1;
            assert!(n <= 100, "the hook never stopped failing");
        }
        assert_eq!(n, expected_writes + 1, "chunk writes plus one flush");
        let got = std::fs::read(&p).unwrap();
        assert_eq!(got.len() as u64, new_size);
        assert_eq!(&got[..data.len()], &data[..]);
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&p).unwrap().blocks() * 512 >= new_size);
    }

    #[test]
    fn subformats_without_an_editor_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.vmdk");
        let opts = crate::CreateOptions::new(1 << 20).option("subformat", "streamOptimized");
        crate::create(&p, Format::Vmdk, &opts).unwrap();
        let before = std::fs::read(&p).unwrap();
        let e = resize(&p, 2 << 20, &ResizeOptions::default()).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Unsupported);
        assert!(e.to_string().contains("ConvertOptions::target_size"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), before);
    }
}
