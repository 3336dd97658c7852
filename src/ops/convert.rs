//! `convert` on files: open the source through the format dispatch, create the atomic
//! output, run the engine ([`crate::convert::convert_device`]), commit.

use std::path::Path;

use crate::convert::{convert_device, ConvertOptions, ConvertReport};
use crate::error::{Error, Result};
use crate::formats::{create_writer, open_with};
use crate::writer::AtomicOutput;

/// Convert the image at `src` into a new image at `dst`. The output is written to a
/// temporary sibling and renamed at the end, so on error nothing is left at `dst`; `src`
/// is only ever opened read-only.
pub fn convert(src: &Path, dst: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    refuse_same_file(src, dst)?;
    let dev = open_with(src, &opts.open)?;
    let mut create = opts.create.clone();
    if create.size == 0 {
        create.size = dev.virtual_size();
    }
    let (out, file) = AtomicOutput::create(dst)?;
    let writer = create_writer(opts.format, file, dst, &create)?;
    let report = convert_device(dev.as_ref(), writer, opts).map_err(|e| e.with_path(dst))?;
    out.commit(opts.sync)?;
    Ok(report)
}

fn refuse_same_file(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(Error::arg(
                "output is the same file as the input; refusing to overwrite it",
            )
            .with_path(dst));
        }
    }
    Ok(())
}
