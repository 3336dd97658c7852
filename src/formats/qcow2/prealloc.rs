//! qemu's guess that a qcow2 image was made with `preallocation=metadata`
//! (`qcow2_detect_metadata_preallocation`): then its block status looks into the file under
//! data clusters, whose holes read as zero data, and `map` must do the same to agree.

use byteorder::{BigEndian, ByteOrder};

use super::header::{get_refcount, Header};
use crate::device::HostFile;

/// Refcount table entries: the refcount block's offset in these bits.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// True when at least qemu's threshold of the file's clusters are in use (nonzero
/// refcount) although far fewer are allocated on disk: at least max(10/9 of the allocated
/// clusters, allocated + 2). Any trouble reading the refcounts answers false, as qemu's
/// error does.
pub fn metadata_preallocated(file: &HostFile, h: &Header) -> bool {
    use std::os::unix::fs::MetadataExt;
    if file.is_remote() {
        return false;
    }
    let Ok(meta) = file.file().metadata() else {
        return false;
    };
    let cs = h.cluster_size();
    let real = meta.blocks() * 512 / cs;
    let threshold = (real * 10 / 9).max(real + 2);
    let end_cluster = file.len().next_multiple_of(512).div_ceil(cs);
    count_in_use(file, h, end_cluster, threshold).is_some_and(|n| n >= threshold)
}

/// Clusters below `end_cluster` with a nonzero refcount, counting stopped at `stop`.
fn count_in_use(file: &HostFile, h: &Header, end_cluster: u64, stop: u64) -> Option<u64> {
    let cs = h.cluster_size();
    // Refcount entries per block: a cluster of (1 << refcount_order)-bit entries.
    let per_block = (cs * 8) >> h.refcount_order;
    let table_len = u64::from(h.refcount_table_clusters) * cs;
    let table = file
        .read_vec(h.refcount_table_offset, table_len, "refcount table")
        .ok()?;
    let mut count = 0u64;
    let mut i = 0u64;
    while i < end_cluster && count < stop {
        let block_index = i / per_block;
        let in_block_end = ((block_index + 1) * per_block).min(end_cluster);
        let entry = table
            .get(block_index as usize * 8..block_index as usize * 8 + 8)
            .map_or(0, BigEndian::read_u64);
        let block_off = entry & REFT_OFFSET_MASK;
        if block_off == 0 {
            i = in_block_end;
            continue;
        }
        if !block_off.is_multiple_of(cs) {
            return None;
        }
        let block = file.read_vec(block_off, cs, "refcount block").ok()?;
        while i < in_block_end && count < stop {
            let idx = (i % per_block) as usize;
            count += u64::from(get_refcount(&block, idx, h.refcount_order) != 0);
            i += 1;
        }
    }
    Some(count)
}
