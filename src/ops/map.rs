//! `map`: which guest ranges are allocated where, as qemu-img map prints them.
//!
//! Built on [`BlockDevice::block_status`], so the ranges are qemu's (present, zero, data,
//! compressed, backing depth, host offset) and adjacent ranges that agree are merged the
//! way qemu-img merges them, which makes the JSON equal to qemu-img's.

use std::path::{Path, PathBuf};

use crate::device::{BlockDevice, BlockStatus};
use crate::error::{Error, Result};
use crate::options::OpenOptions;

/// One entry of `map`'s answer: a maximal guest range whose status is the same throughout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MapEntry {
    /// Guest offset of the range's start.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Which image of the backing chain answers (0: this one).
    pub depth: u32,
    /// Allocated in some image of the chain.
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Stored as data.
    pub data: bool,
    /// Stored compressed.
    pub compressed: bool,
    /// Host offset of the range's start in `filename`, where it is stored uncompressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The file holding the bytes (the image, an extent, a backing image), when `offset` is set.
    #[serde(skip)]
    pub filename: Option<PathBuf>,
}

impl MapEntry {
    /// Whether `next` continues this entry (qemu-img's `entry_mergeable`).
    fn mergeable(&self, next: &MapEntry) -> bool {
        self.length > 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// The range `map` walks: from `start`, at most `max_length` bytes (default: to the end).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapRange {
    /// Guest offset to start at.
    pub start: u64,
    /// Bytes to walk at most.
    pub max_length: Option<u64>,
}

/// The merged map of `dev` over `range` (clipped to the virtual size, as qemu-img does).
/// `image` names the file in entries whose bytes are in the image itself.
pub fn map_device(dev: &dyn BlockDevice, image: &Path, range: MapRange) -> Result<Vec<MapEntry>> {
    let size = dev.virtual_size();
    let end = match range.max_length {
        Some(n) => range.start.saturating_add(n).min(size),
        None => size,
    };
    let mut out: Vec<MapEntry> = Vec::new();
    let mut off = range.start;
    while off < end {
        let st: BlockStatus = crate::device::qemu_block_status(dev, off, end - off)?;
        if st.len == 0 || st.offset != off {
            return Err(Error::corrupt(format!(
                "block status at {off:#x} answered an empty or misplaced range"
            )));
        }
        let len = st.len.min(end - off);
        let e = MapEntry {
            start: off,
            length: len,
            depth: st.depth,
            present: st.present,
            zero: st.zero,
            data: st.data,
            compressed: st.compressed,
            offset: st.host,
            filename: st.host.map(|_| {
                st.file
                    .as_deref()
                    .map_or(image.to_path_buf(), |f| beside(image, f))
            }),
        };
        match out.last_mut() {
            Some(prev) if prev.mergeable(&e) => prev.length += e.length,
            _ => out.push(e),
        }
        off += len;
    }
    Ok(out)
}

/// A file the image names, spelled from the image's path as qemu spells it (the image's
/// folder as given plus the name) when it lies in that folder; else as opened.
fn beside(image: &Path, file: &Path) -> PathBuf {
    let dir = image.parent().unwrap_or(Path::new(""));
    let dir_real = std::fs::canonicalize(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    });
    match (dir_real, file.parent(), file.file_name()) {
        (Ok(d), Some(p), Some(name)) if std::fs::canonicalize(p).is_ok_and(|p| p == d) => {
            dir.join(name)
        }
        _ => file.to_path_buf(),
    }
}

/// Open the image at `path` (backing files through `opts`' reference gate) and map it.
pub fn map(path: &Path, opts: &OpenOptions, range: MapRange) -> Result<Vec<MapEntry>> {
    let dev = super::open_source(path, opts)?;
    map_device(dev.as_ref(), path, range)
}

/// The entries as `qemu-img map --output=json` prints them, byte for byte.
pub fn map_json(entries: &[MapEntry]) -> String {
    let mut s = String::from("[");
    for (i, e) in entries.iter().enumerate() {
        s += &format!(
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        );
        if let Some(o) = e.offset {
            s += &format!(", \"offset\": {o}");
        }
        s.push('}');
        if i + 1 < entries.len() {
            s += ",\n";
        }
    }
    s += "]\n";
    s
}

/// C's `%#x`: `0` for zero, `0x..` otherwise.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// The entries as `qemu-img map` (human) prints them: data ranges only, with the host
/// offset and file. Like qemu-img it refuses an image whose data has no host offset
/// (compressed clusters, a vhdx), since the table could not say where it is; see
/// [`map_human_partial`] for the lines qemu-img prints before it stops.
pub fn map_human(entries: &[MapEntry]) -> Result<String> {
    match map_human_partial(entries) {
        (s, None) => Ok(s),
        (_, Some(e)) => Err(e),
    }
}

/// What `qemu-img map` (human) prints on stdout, and the error it stops at, if any: the
/// header and the data ranges before the first range it cannot show.
///
/// qemu-img walks the same merged ranges as the JSON output and prints those that are
/// data and not zero. It refuses a range that is data without a host offset; a range that
/// reads as zero escapes that check unless it comes first, since qemu-img marks every
/// later zero range as not data before it looks at it.
pub fn map_human_partial(entries: &[MapEntry]) -> (String, Option<Error>) {
    let mut s = format!(
        "{:<16}{:<16}{:<16}{}\n",
        "Offset", "Length", "Mapped to", "File"
    );
    for (i, e) in entries.iter().enumerate() {
        let data = e.data && (i == 0 || !e.zero);
        if data && e.offset.is_none() {
            let err =
                Error::unsupported("File contains external, encrypted or compressed clusters.");
            return (s, Some(err));
        }
        if data && !e.zero {
            let name = e.filename.as_deref().map(|p| p.display().to_string());
            s += &format!(
                "{:<16}{:<16}{:<16}{}\n",
                c_hex(e.start),
                c_hex(e.length),
                c_hex(e.offset.unwrap_or(0)),
                name.unwrap_or_default()
            );
        }
    }
    (s, None)
}
