//! qemu's `qcow2_measure`: the size a qcow2 output of a source needs, by qemu's formula
//! (metadata for a fully allocated image of the virtual size, plus the source's data
//! clusters), so the numbers equal qemu-img measure's.

use super::writer::parse_options;
use crate::device::BlockDevice;
use crate::error::Result;
use crate::options::CreateOptions;

/// qemu's `qcow2_refcount_metadata_size`: refcount blocks and table clusters needed to
/// count `clusters` clusters and themselves (the fixed point).
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u32) -> u64 {
    let per_table_cluster = cs / 8;
    let per_block = cs * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return (blocks + table) * cs;
        }
    }
}

/// qemu's `qcow2_calc_prealloc_size`: header, every L2 and L1 entry, refcounts, data.
fn prealloc_size(size: u64, cs: u64, refcount_order: u32, extended_l2: bool) -> u64 {
    let aligned = size.next_multiple_of(cs);
    let l2e = if extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).next_multiple_of(cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).next_multiple_of(cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata_size((meta + aligned) / cs, cs, refcount_order);
    meta + aligned
}

/// (required, fully allocated, bitmaps) for a qcow2 of `size` bytes with `opts`, holding
/// `src`'s data (None: `--size`, no data). Data is counted the way qemu counts it: whole
/// clusters touched by ranges that are stored as data and do not read as zeros.
pub fn measure(
    src: Option<&dyn BlockDevice>,
    size: u64,
    opts: &CreateOptions,
) -> Result<(u64, u64, Option<u64>)> {
    let mut o = opts.clone();
    o.size = size;
    let p = parse_options(&o)?;
    let cs = p.cs;
    let mut data = 0u64;
    if let Some(dev) = src {
        let end = dev.virtual_size();
        let mut off = 0u64;
        while off < end {
            let st = dev.block_status(off, end - off)?;
            let mut len = st.len.max(1);
            if !st.zero && st.data && st.present {
                len = (off + len).next_multiple_of(cs) - off;
                data += off % cs + len;
            }
            off += len;
        }
    }
    let full = prealloc_size(size, cs, p.refcount_order, p.extended_l2);
    let required = full - size.next_multiple_of(cs) + data;
    let bitmaps = (p.version >= 3
        && src.is_some_and(|d| d.format() == crate::format::Format::Qcow2))
    .then_some(0);
    Ok((required, full, bitmaps))
}
