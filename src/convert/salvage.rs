//! `--salvage`: source ranges that cannot be read become zeros and are reported, retried
//! in smaller pieces first so one bad sector costs one sector.

use crate::device::BlockDevice;
use crate::error::{Error, Result};

/// A source range [`ConvertOptions::salvage`](super::ConvertOptions::salvage) replaced with zeros.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnreadableRange {
    /// Guest offset of the first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The first error met in the range.
    pub error: String,
}

/// Sectors are the smallest unit `--salvage` retries and gives up on, as in qemu-img.
pub(super) const SALVAGE_SECTOR: u64 = 512;
/// Reads that fail are retried in pieces this long before going down to sectors, so a
/// few bad sectors inside a 1 MiB unit cost a few dozen reads, not two thousand.
const SALVAGE_STEP: u64 = 64 << 10;

/// Ranges recorded by the dispatcher and the workers, coalesced at the end.
pub(super) type Unreadable = std::sync::Mutex<Vec<UnreadableRange>>;

/// Read `buf.len()` guest bytes at `off`. With `salvage`, a failed read is retried in
/// smaller pieces down to single sectors; sectors that still fail read as zeros and are
/// recorded.
pub(super) fn read_range(
    src: &dyn BlockDevice,
    buf: &mut [u8],
    off: u64,
    salvage: bool,
    unreadable: &Unreadable,
) -> Result<()> {
    let e = match src.read_at(buf, off) {
        Ok(()) => return Ok(()),
        Err(e) if !salvage => return Err(e),
        Err(e) => e,
    };
    let step = if buf.len() as u64 > SALVAGE_STEP {
        SALVAGE_STEP
    } else if buf.len() as u64 > SALVAGE_SECTOR {
        SALVAGE_SECTOR
    } else {
        buf.fill(0);
        record(unreadable, off, buf.len() as u64, &e);
        return Ok(());
    };
    // Pieces end on multiples of `step` in guest offsets, like the sectors they cover.
    let mut p = 0usize;
    while p < buf.len() {
        let at = off + p as u64;
        let q = (((at / step + 1) * step - off) as usize).min(buf.len());
        read_range(src, &mut buf[p..q], at, true, unreadable)?;
        p = q;
    }
    Ok(())
}

pub(super) fn record(unreadable: &Unreadable, offset: u64, len: u64, e: &Error) {
    let mut v = unreadable.lock().unwrap_or_else(|p| p.into_inner());
    v.push(UnreadableRange {
        offset,
        len,
        error: e.to_string(),
    });
}

/// Sort ranges and merge touching or overlapping ones (keeping the first error).
pub(super) fn coalesce(mut v: Vec<UnreadableRange>) -> Vec<UnreadableRange> {
    v.sort_by_key(|r| r.offset);
    let mut out: Vec<UnreadableRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if last.offset + last.len >= r.offset => {
                last.len = last.len.max(r.offset + r.len - last.offset);
            }
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_merges_touching_ranges() {
        let r = |offset, len| UnreadableRange {
            offset,
            len,
            error: String::new(),
        };
        assert_eq!(
            coalesce(vec![r(1024, 512), r(0, 512), r(512, 512), r(4096, 512)]),
            vec![r(0, 1536), r(4096, 512)]
        );
    }
}
