//! Checking VHD (vpc) metadata; qemu-img has no check for this format, so what is
//! checked is ours:
//! - the footer at the end of the file: cookie, checksum, disk type; for a fixed disk,
//!   that the data before it holds the whole guest;
//! - a dynamic disk's footer copy at offset 0: cookie, checksum, equal to the footer;
//! - the dynamic header: cookie, checksum, block size; the BAT inside the file and large
//!   enough for the guest;
//! - every allocated BAT entry: its block (sector bitmap, then data) after the BAT and the
//!   headers, inside the file before the footer, overlapping no other block; and every
//!   allocated block past the guest's end is a leak (space nothing reads).
//!
//! Repair: `-r leaks` unallocates the blocks past the guest's end (one write of the BAT
//! sector holding each entry); `-r all` also restores a damaged footer from the copy at
//! offset 0, or the copy from the footer (one 512-byte write each; a footer slot that
//! lies inside the last block is not overwritten: the footer is appended after it).

use std::fs::File;
use std::path::Path;

use byteorder::{BigEndian, ByteOrder};

use super::dynheader::{DynHeader, DYN_HEADER_SIZE};
use super::footer::{
    checksum_without_field, DiskType, Footer, CHECKSUM_OFFSET, FOOTER_COOKIE, FOOTER_SIZE,
};
use crate::check::{read_padded, Repair, Tally};
use crate::device::HostFile;
use crate::error::{Error, Result};
use crate::writer::EditFile;

const UNALLOCATED: u32 = u32::MAX;
/// Largest BAT read (qemu's limit on entries times four bytes).
const MAX_BAT_BYTES: u64 = 64 << 20;

/// What a 512-byte footer slot holds.
fn footer_state(b: &[u8]) -> std::result::Result<Footer, String> {
    if &b[..8] != FOOTER_COOKIE {
        return Err("no 'conectix' cookie".into());
    }
    let stored = BigEndian::read_u32(&b[CHECKSUM_OFFSET..]);
    let computed = checksum_without_field(b, CHECKSUM_OFFSET);
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    Footer::parse(b).map_err(|e| e.message().to_string())
}

/// Check the VHD image in `file`; see the module documentation for what `repair` does.
pub fn check(file: File, path: &Path, repair: Repair, fail_at: Option<u64>) -> Result<Tally> {
    let write = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?;
    let host = HostFile::from_file(file, path)?;
    let len = host.len();
    if len < FOOTER_SIZE as u64 {
        return Err(Error::invalid(format!(
            "file of {len} bytes is too short for a VHD footer"
        )));
    }
    let mut edit = EditFile::new(write, path, fail_at);
    let mut t = Tally::default();
    let tail_at = len - FOOTER_SIZE as u64;
    let tail = host.read_vec(tail_at, FOOTER_SIZE as u64, "VHD footer")?;
    let head = host.read_vec(0, FOOTER_SIZE as u64, "VHD footer copy")?;
    let end = footer_state(&tail);
    let copy = footer_state(&head);
    let dynamic_copy = copy.as_ref().is_ok_and(|f| f.disk_type != DiskType::Fixed);
    let footer = match (&end, &copy) {
        (Ok(f), _) => f.clone(),
        (Err(_), Ok(c)) if dynamic_copy => c.clone(),
        (Err(why), _) => {
            // Nothing to check the rest against.
            t.corrupt(format!(
                "ERROR: the footer at {tail_at:#x} is unusable: {why}"
            ));
            return Ok(t);
        }
    };
    if footer.disk_type == DiskType::Fixed {
        if footer.current_size > tail_at {
            t.corrupt(format!(
                "ERROR: fixed disk of {} bytes, but only {tail_at} bytes of data before the footer",
                footer.current_size
            ));
        }
        return Ok(t);
    }
    // Dynamic or differencing: the copy, the dynamic header, the BAT, the blocks.
    let dh_raw = read_padded(
        &host,
        footer.data_offset,
        DYN_HEADER_SIZE as u64,
        "VHD dynamic header",
    );
    let dh = match dh_raw.and_then(|b| DynHeader::parse(&b)) {
        Ok(d) => Some(d),
        Err(e) => {
            t.corrupt(format!(
                "ERROR: dynamic header at {:#x}: {}",
                footer.data_offset,
                e.message()
            ));
            None
        }
    };
    let block = dh.as_ref().map(|d| u64::from(d.block_size));
    let bitmap = block.map(|b| (b / 512).div_ceil(8).next_multiple_of(512));
    let bat_len = dh
        .as_ref()
        .map_or(0, |d| u64::from(d.max_table_entries) * 4);
    let mut bat = Vec::new();
    let mut data_end = FOOTER_SIZE as u64 + DYN_HEADER_SIZE as u64;
    if let Some(d) = &dh {
        data_end = data_end.max(d.table_offset.saturating_add(bat_len.next_multiple_of(512)));
        let need = footer.current_size.div_ceil(u64::from(d.block_size));
        if u64::from(d.max_table_entries) < need {
            t.corrupt(format!(
                "ERROR: BAT has {} entries, the disk needs {need}",
                d.max_table_entries
            ));
        }
        if bat_len > MAX_BAT_BYTES || d.table_offset.saturating_add(bat_len) > len {
            t.corrupt(format!(
                "ERROR: BAT ({bat_len} bytes at {:#x}) runs past the end of the file ({len} bytes)",
                d.table_offset
            ));
        } else {
            bat = host.read_vec(d.table_offset, bat_len, "VHD BAT")?;
        }
    }
    // Where blocks may end: before the footer when the last sector is one, else the end.
    let footer_slot_ok = end.is_ok();
    let limit = if footer_slot_ok { tail_at } else { len };
    let (mut blocks, mut leaked) = (Vec::new(), Vec::new());
    if let (Some(bs), Some(bm), Some(d)) = (block, bitmap, &dh) {
        let guest_blocks = footer.current_size.div_ceil(bs);
        for (i, e) in bat.chunks_exact(4).map(BigEndian::read_u32).enumerate() {
            if e == UNALLOCATED {
                continue;
            }
            let start = u64::from(e) * 512;
            let stop = start + bm + bs;
            if i as u64 >= guest_blocks {
                leaked.push(i);
                continue;
            }
            if start < data_end {
                t.corrupt(format!(
                    "ERROR: BAT entry {i}: block at {start:#x} overlaps the headers or the BAT (which end at {data_end:#x})"
                ));
            } else if stop > limit {
                t.corrupt(format!(
                    "ERROR: BAT entry {i}: block at {start:#x}..{stop:#x} runs past the end of the image data ({limit:#x})"
                ));
            } else {
                blocks.push((start, stop, i));
            }
        }
        let _ = d;
    }
    blocks.sort();
    for w in blocks.windows(2) {
        if w[1].0 < w[0].1 {
            t.corrupt(format!(
                "ERROR: BAT entries {} and {} overlap: blocks at {:#x} and {:#x}",
                w[0].2, w[1].2, w[0].0, w[1].0
            ));
        }
    }
    let last_block_end = blocks.iter().map(|b| b.1).max().unwrap_or(0).max(data_end);

    leaked_blocks(
        &leaked,
        &mut bat,
        dh.as_ref(),
        footer.current_size,
        repair,
        &mut edit,
        &mut t,
    )?;

    // The footer and its copy.
    match (&end, &copy) {
        (Ok(f), Ok(c)) => {
            if f.to_bytes()[..] != c.to_bytes()[..] || tail != head {
                if repair.all() {
                    t.findings
                        .push("Repairing the footer copy at offset 0 from the footer".into());
                    edit.write_at(&tail, 0, "writing the VHD footer copy")?;
                    edit.sync("flushing the VHD footer copy")?;
                    t.corruptions_fixed += 1;
                } else {
                    t.corrupt("ERROR: the footer copy at offset 0 differs from the footer");
                }
            }
        }
        (Ok(_), Err(why)) => {
            if repair.all() {
                t.findings.push(format!(
                    "Repairing the footer copy at offset 0 ({why}) from the footer"
                ));
                edit.write_at(&tail, 0, "writing the VHD footer copy")?;
                edit.sync("flushing the VHD footer copy")?;
                t.corruptions_fixed += 1;
            } else {
                t.corrupt(format!("ERROR: the footer copy at offset 0: {why}"));
            }
        }
        (Err(why), Ok(_)) => {
            if repair.all() {
                // The footer goes where the last sector is not part of a block.
                let at = if tail_at >= last_block_end {
                    tail_at
                } else {
                    len
                };
                t.findings.push(format!(
                    "Repairing the footer ({why}) from its copy at offset 0, at {at:#x}"
                ));
                edit.write_at(&head, at, "writing the VHD footer")?;
                edit.sync("flushing the VHD footer")?;
                t.corruptions_fixed += 1;
            } else {
                t.corrupt(format!(
                    "ERROR: the footer at {tail_at:#x}: {why} (its copy at offset 0 is intact)"
                ));
            }
        }
        (Err(_), Err(_)) => unreachable!("returned above"),
    }
    Ok(t)
}

/// BAT entries past the guest's end: reported as leaks, or with `-r leaks` unmapped (each
/// BAT sector that changed written once, then flushed).
fn leaked_blocks(
    leaked: &[usize],
    bat: &mut [u8],
    dh: Option<&DynHeader>,
    current_size: u64,
    repair: Repair,
    edit: &mut EditFile,
    t: &mut Tally,
) -> Result<()> {
    if leaked.is_empty() {
        return Ok(());
    }
    if repair.leaks() {
        let d = dh.expect("blocks come from the BAT");
        let mut sectors: std::collections::BTreeSet<usize> = Default::default();
        for &i in leaked {
            t.findings.push(format!(
                "Repairing leaked block: BAT entry {i} is past the disk's end"
            ));
            BigEndian::write_u32(&mut bat[i * 4..], UNALLOCATED);
            sectors.insert(i * 4 / 512);
            t.leaks_fixed += 1;
        }
        for s in sectors {
            let a = s * 512;
            let b = (a + 512).min(bat.len());
            edit.write_at(&bat[a..b], d.table_offset + a as u64, "writing the VHD BAT")?;
        }
        edit.sync("flushing the VHD BAT")?;
    } else {
        for &i in leaked {
            t.leak(format!(
                "Leaked block: BAT entry {i} is past the disk's end ({} bytes)",
                current_size
            ));
        }
    }
    Ok(())
}
