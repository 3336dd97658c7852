//! Checking VDI metadata, as qemu's `vdi_co_check` does, plus the data's place in the
//! file: every allocated block-map entry must name a block index below
//! `blocks_in_image`, no two entries may name the same block, the header's
//! `blocks_allocated` must equal the allocated entries, and (beyond qemu) each allocated
//! block must lie inside the file and the block map itself too.
//!
//! Repair (`-r all`) fixes only the header's allocated-block count, in one write of the
//! header sector; qemu-img refuses `-r` for VDI. A duplicate or out-of-range entry has no
//! safe fix (which guest block owns the data is unknown) and is left for a convert.

use std::fs::File;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::{VdiHeader, HEADER_BLOCK};
use crate::check::{read_padded, Repair, Tally};
use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::writer::EditFile;

/// Entries at or above this are unallocated (0xffffffff) or discarded (0xfffffffe).
const FIRST_UNALLOCATED: u32 = 0xffff_fffe;
/// Where `blocks_allocated` sits in the header.
const BLOCKS_ALLOCATED_AT: usize = 0x184;

/// Check the VDI image in `file`; with `-r all`, fix the allocated-block count.
pub fn check(file: File, path: &Path, repair: Repair, fail_at: Option<u64>) -> Result<Tally> {
    let write = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?;
    let host = HostFile::from_file(file, path)?;
    let mut raw = host.read_vec(0, HEADER_BLOCK as u64, "VDI header")?;
    let h = VdiHeader::parse(&raw)?;
    let mut t = Tally::default();
    let n = u64::from(h.blocks_in_image);
    let bmap_off = u64::from(h.offset_bmap);
    let in_file = host.len().saturating_sub(bmap_off).min(n * 4);
    if in_file < n * 4 {
        t.corrupt(format!(
            "ERROR: block map at {bmap_off:#x} ({} bytes) runs past the end of the file ({} bytes)",
            n * 4,
            host.len()
        ));
    }
    let bmap = read_padded(&host, bmap_off, in_file, "VDI block map")?;
    let mut owner = vec![u32::MAX; n as usize];
    let mut allocated = 0u32;
    let bs = u64::from(h.block_size);
    for (block, e) in bmap.chunks_exact(4).map(LE::read_u32).enumerate() {
        if e >= FIRST_UNALLOCATED {
            continue;
        }
        if u64::from(e) >= n {
            t.corrupt(format!("ERROR: block index {block} too large, is {e}"));
            continue;
        }
        allocated += 1;
        if owner[e as usize] == u32::MAX {
            owner[e as usize] = block as u32;
        } else {
            t.corrupt(format!(
                "ERROR: block index {} also used by {block}",
                owner[e as usize]
            ));
        }
        let end = u64::from(h.offset_data) + (u64::from(e) + 1) * bs;
        if end > host.len() {
            t.corrupt(format!(
                "ERROR: block {block} (data block {e}) ends at {end}, past the end of the file ({} bytes)",
                host.len()
            ));
        }
    }
    if allocated != h.blocks_allocated {
        if repair.all() {
            t.findings.push(format!(
                "Repairing allocated blocks mismatch, is {allocated}, should be {}",
                h.blocks_allocated
            ));
            LE::write_u32(&mut raw[BLOCKS_ALLOCATED_AT..], allocated);
            let mut edit = EditFile::new(write, path, fail_at);
            edit.write_at(
                &raw[BLOCKS_ALLOCATED_AT..BLOCKS_ALLOCATED_AT + 4],
                BLOCKS_ALLOCATED_AT as u64,
                "writing the VDI header's allocated-block count",
            )?;
            edit.sync("flushing the VDI header")?;
            t.corruptions_fixed += 1;
        } else {
            t.corrupt(format!(
                "ERROR: allocated blocks mismatch, is {allocated}, should be {}",
                h.blocks_allocated
            ));
        }
    }
    Ok(t)
}
