//! The persistent dirty bitmaps an image holds, as qemu loads them on open: every entry of
//! the bitmap directory, when the bitmaps extension is there and its autoclear bit says it
//! is consistent (qemu ignores it otherwise). `measure` counts their size as qemu does.

use byteorder::{BigEndian, ByteOrder};

use super::header::{Extensions, Header, AUTOCLEAR_BITMAPS};
use crate::device::HostFile;
use crate::error::{Error, Result};

/// qemu's cap on the bitmap directory.
const MAX_DIRECTORY: u64 = 64 << 20;
/// Bytes of a directory entry before its extra data and name.
const ENTRY_HEAD: usize = 24;

/// (name, granularity in bytes) of each bitmap, in directory order.
pub fn list(file: &HostFile, h: &Header, ext: &Extensions) -> Result<Vec<(String, u64)>> {
    let Some(b) = &ext.bitmaps else {
        return Ok(Vec::new());
    };
    if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 || b.nb_bitmaps == 0 {
        return Ok(Vec::new());
    }
    if b.directory_size > MAX_DIRECTORY {
        return Err(Error::corrupt(format!(
            "bitmap directory of {} bytes is larger than 64 MiB",
            b.directory_size
        ))
        .with_field("bitmap_directory_size"));
    }
    let dir = file.read_vec(b.directory_offset, b.directory_size, "bitmap directory")?;
    let mut out = Vec::new();
    let mut p = 0usize;
    for i in 0..b.nb_bitmaps {
        let bad = |what: &str| {
            Error::corrupt(format!("bitmap directory entry {i} {what}"))
                .at(b.directory_offset + p as u64)
        };
        let e = dir
            .get(p..p + ENTRY_HEAD)
            .ok_or_else(|| bad("runs past the directory"))?;
        let granularity_bits = u32::from(e[17]);
        let name_size = BigEndian::read_u16(&e[18..]) as usize;
        let extra = BigEndian::read_u32(&e[20..]) as usize;
        let name_at = p + ENTRY_HEAD + extra;
        let name = dir
            .get(name_at..name_at + name_size)
            .ok_or_else(|| bad("has a name past the directory"))?;
        if !(9..=31).contains(&granularity_bits) {
            return Err(bad(&format!(
                "has granularity bits {granularity_bits} (9 to 31)"
            )));
        }
        out.push((
            String::from_utf8_lossy(name).into_owned(),
            1u64 << granularity_bits,
        ));
        p = (name_at + name_size).next_multiple_of(8);
    }
    Ok(out)
}
