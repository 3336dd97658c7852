//! In-place discard, the write side of `sparsify --in-place`: open the image read-write,
//! take the format's editor from the dispatch (which locks the file), and give back the
//! storage of guest ranges that the caller knows to be free. Which ranges those are is
//! the sparsify command's business (it scans the guest's filesystems); how each format
//! unallocates them, and in what order it writes so a crash leaves a consistent image,
//! is the format editor's.

use std::path::Path;

use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::format::Format;
use crate::formats::open_editor;
use crate::options::ResizeOptions;

/// Discard the guest ranges `runs` (ascending, disjoint `(offset, len)` pairs) of the
/// image at `path`, of `format` (probed when None), in place: whole allocation units
/// inside a run are unallocated or marked zero where the format allows, partial ones
/// are left. Returns the bytes of guest data no longer stored. A format (or subformat)
/// that cannot give space back in place is refused, named, with the reason.
/// `fail_at_write` is the test hook of [`ResizeOptions::fail_at_write`].
pub fn discard_in_place(
    path: &Path,
    format: Option<Format>,
    runs: &[(u64, u64)],
    fail_at_write: Option<u64>,
) -> Result<u64> {
    let format = match format {
        Some(f) => f,
        None => crate::probe::probe_file(&HostFile::open(path)?)?,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("cannot open the image for writing", e).with_path(path))?;
    let opts = ResizeOptions {
        format: Some(format),
        fail_at_write,
        ..Default::default()
    };
    let mut editor = open_editor(format, file, path, &opts).map_err(|e| name(e, format))?;
    editor
        .discard(runs)
        .map_err(|e| name(e, format).with_path(path))
}

/// Refusals name the format, so "cannot give back space" says of what.
fn name(e: Error, format: Format) -> Error {
    if e.kind() != crate::ErrorKind::Unsupported || e.message().contains(format.name()) {
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
