//! Format detection. Used only when the caller did not name the format: a named format
//! is never second-guessed (a raw guest disk holding a qcow2 header stays raw).

use std::path::Path;

use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::formats::Format;

/// How many leading bytes probing reads: enough for every header and a vmdk descriptor's
/// first line.
pub const PROBE_HEAD: u64 = 64 * 1024;

/// Every non-raw format whose signature `head`/`tail` carry.
pub fn matching_formats(head: &[u8], tail: &[u8]) -> Vec<Format> {
    Format::ALL
        .iter()
        .copied()
        .filter(|f| f.probe(head, tail))
        .collect()
}

/// Decide the format of `file`: the single format whose signature it carries, raw when
/// none does, and an error naming them when several do (a polyglot), except that a
/// VHD footer at the end of an otherwise raw file is a VHD.
pub fn probe_file(file: &HostFile) -> Result<Format> {
    let head_len = file.len().min(PROBE_HEAD);
    let head = file.read_vec(0, head_len, "probe header")?;
    let tail_len = file.len().min(512);
    let tail = file.read_vec(file.len() - tail_len, tail_len, "probe footer")?;
    let found = matching_formats(&head, &tail);
    match found.as_slice() {
        [] => Ok(Format::Raw),
        [one] => Ok(*one),
        many => {
            let names: Vec<&str> = many.iter().map(|f| f.name()).collect();
            Err(Error::invalid(format!(
                "ambiguous image: it matches several formats ({}); name the format with -f",
                names.join(", ")
            ))
            .with_path(file.path()))
        }
    }
}

/// Detect the format of the image at `path` (see [`probe_file`]).
pub fn probe(path: &Path) -> Result<Format> {
    probe_file(&HostFile::open(path)?)
}
