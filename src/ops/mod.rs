//! The commands as library functions: each opens files through the format dispatch and
//! runs the core on them. The CLI is a thin shell over these; other crates call them too.

pub mod check;
pub mod compare;
pub mod convert;
pub mod discard;
pub mod map;
pub mod measure;
pub mod resize;
pub mod snapshot;
pub mod sparsify;
pub mod stream;

use std::path::Path;

use crate::device::BlockDevice;
use crate::error::Result;
use crate::options::OpenOptions;

/// Open a source image: a path, or with the `remote` feature an `s3://bucket/key`,
/// `swift://container/object` or `https://` URL read by ranges where it lies (configured
/// from the environment, see [`crate::remote::open_url`]).
pub fn open_source(path: &Path, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    #[cfg(feature = "remote")]
    if let Some(url) = path.to_str().filter(|p| crate::remote::is_remote_url(p)) {
        return crate::remote::open_url(url, opts);
    }
    crate::formats::open_with(path, opts)
}

/// The image at `path` (of `format`, probed when None) opened read-write for an in-place
/// change, with the editor options that carry the format and the test hook
/// (`fail_at_write`, see [`crate::options::ResizeOptions::fail_at_write`]).
pub(crate) fn open_for_edit(
    path: &Path,
    format: Option<crate::format::Format>,
    fail_at_write: Option<u64>,
) -> Result<(
    crate::format::Format,
    std::fs::File,
    crate::options::ResizeOptions,
)> {
    let format = match format {
        Some(f) => f,
        None => crate::probe::probe_file(&crate::device::HostFile::open(path)?)?,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            crate::error::Error::io("cannot open the image for writing", e).with_path(path)
        })?;
    let opts = crate::options::ResizeOptions {
        format: Some(format),
        fail_at_write,
        ..Default::default()
    };
    Ok((format, file, opts))
}
