//! Checking VHDX metadata, as qemu's `vhdx_co_check` does, plus what our reader
//! validates on open, reported as findings instead of a refusal where the rest can still
//! be checked:
//! - both headers and both region tables (signature, checksum); qemu silently uses the
//!   good copy, we count a damaged copy as a corruption;
//! - the log: a dirty log (one to replay) is refused with qemu's wording, as qemu-img
//!   check without `-r` does; qemu's `-r all` replays it into the file, we refuse that
//!   too (the in-memory replay of `convert` and `info` is the way to read such an image);
//! - the regions: inside the file, overlapping neither each other nor the header section
//!   or the log; the BAT large enough for the disk; the metadata items;
//! - every fully present BAT entry, as qemu's `vhdx_check_bat_entries`: its start and end
//!   inside the file (qemu's messages and counts), its payload block overlapping no
//!   region; and, beyond qemu 10, no two blocks overlapping each other, and no state that
//!   the spec leaves undefined.
//!
//! qemu reports no image end offset for VHDX, and neither do we.
//!
//! Repair (`-r all`) only rewrites a damaged header or region table copy from the good
//! one (one write of the slot and a flush each): readers never use the damaged copy, so
//! a failure at any write leaves an image no worse than before. Nothing else has a safe
//! fix (which of two BAT entries owns a block is unknown) and is left for a convert.

use std::fs::File;
use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::*;
use super::log::{self, Host};
use super::reader::{read_metadata, Params, MAX_BAT_BYTES};
use crate::check::{read_padded, Repair, Tally};
use crate::device::HostFile;
use crate::error::{Error, ErrorKind, Result};
use crate::writer::EditFile;

/// The two copies of a redundant structure: which one readers use, and the other.
struct Copies<T> {
    slots: [u64; 2],
    raw: [Vec<u8>; 2],
    parsed: [Result<T>; 2],
}

/// Rewrite the damaged copy at `b` from the one at `g` (`-r all`) or count it.
fn fix_copy(
    t: &mut Tally,
    edit: &mut EditFile,
    repair: Repair,
    what: &str,
    (b, g): (u64, u64),
    raw: &[u8],
    why: &str,
) -> Result<()> {
    if repair.all() {
        t.findings.push(format!(
            "Repairing the {what} at {b:#x} ({why}) from the copy at {g:#x}"
        ));
        edit.write_at(raw, b, &format!("writing the VHDX {what}"))?;
        edit.sync(&format!("flushing the VHDX {what}"))?;
        t.corruptions_fixed += 1;
    } else {
        t.corrupt(format!(
            "ERROR: the VHDX {what} at {b:#x} is damaged ({why}); the copy at {g:#x} is intact"
        ));
    }
    Ok(())
}

fn read_copies<T>(
    host: &HostFile,
    slots: [u64; 2],
    size: usize,
    what: &str,
    parse: impl Fn(&[u8]) -> Result<T>,
) -> Result<Copies<T>> {
    let raw = [
        host.read_vec(slots[0], size as u64, what)?,
        host.read_vec(slots[1], size as u64, what)?,
    ];
    let parsed = [parse(&raw[0]), parse(&raw[1])];
    Ok(Copies { slots, raw, parsed })
}

/// A file range a payload block must not overlap.
struct Span {
    start: u64,
    end: u64,
    what: String,
}

fn overlapping(spans: &[Span], start: u64, end: u64) -> Option<&Span> {
    spans.iter().find(|s| start < s.end && s.start < end)
}

/// Check the VHDX image in `file`; see the module documentation for what `repair` does.
/// The current VHDX header, after the log is found clean and a damaged copy is rewritten
/// (`-r all`) or counted; `None` when no header can be used (the finding is in `t`).
fn current_header(
    host: &HostFile,
    path: &Path,
    repair: Repair,
    edit: &mut EditFile,
    t: &mut Tally,
) -> Result<Option<Header>> {
    let h = read_copies(
        host,
        HEADER_OFFSETS,
        HEADER_SIZE,
        "VHDX header",
        Header::parse,
    )?;
    let (cur, header, damaged) = match &h.parsed {
        [Ok(a), Ok(b)] => {
            if a.sequence_number == b.sequence_number && a != b {
                t.corrupt(format!(
                    "ERROR: both VHDX headers have sequence number {} but differ, so neither is current",
                    a.sequence_number
                ));
                return Ok(None);
            }
            let cur = usize::from(b.sequence_number > a.sequence_number);
            (cur, if cur == 0 { a.clone() } else { b.clone() }, None)
        }
        [Ok(a), Err(e)] => (0, a.clone(), Some((1, e.message().to_string()))),
        [Err(e), Ok(b)] => (1, b.clone(), Some((0, e.message().to_string()))),
        [Err(a), Err(b)] => {
            t.corrupt(format!(
                "ERROR: both VHDX headers are damaged: {}; {}",
                a.message(),
                b.message()
            ));
            return Ok(None);
        }
    };
    match log::replay(host, &header) {
        Ok(None) => {}
        Ok(Some(_)) => {
            let mut msg = format!(
                "VHDX image file '{}' opened read-only, but contains a log that needs to be replayed",
                path.display()
            );
            if repair == Repair::None {
                msg.push_str(&format!(
                    "\nTo replay the log, run:\nqemu-img check -r all '{}'",
                    path.display()
                ));
            } else {
                msg.push_str(
                    "; replaying it into the file is not supported (diskconv convert reads the image with the log replayed)",
                );
            }
            return Err(Error::unsupported(msg));
        }
        Err(e) => {
            t.corrupt(format!("ERROR: VHDX log: {}", e.message()));
            return Ok(None);
        }
    }
    if let Some((bad, why)) = damaged {
        fix_copy(
            t,
            edit,
            repair,
            "header",
            (h.slots[bad], h.slots[cur]),
            &h.raw[cur][..HEADER_SIZE],
            &why,
        )?;
    }
    Ok(Some(header))
}

pub fn check(file: File, path: &Path, repair: Repair, fail_at: Option<u64>) -> Result<Tally> {
    let write = file
        .try_clone()
        .map_err(|e| Error::io("cannot duplicate the image's descriptor", e))?;
    let host = HostFile::from_file(file, path)?;
    let len = host.len();
    if len < HEADER_SECTION_END {
        return Err(Error::invalid(format!(
            "file of {len} bytes is shorter than a VHDX header section (1 MiB)"
        )));
    }
    if &host.read_vec(0, 8, "file_identifier")?[..] != FILE_SIGNATURE {
        return Err(Error::invalid(
            "not a VHDX: no \"vhdxfile\" signature at offset 0",
        ));
    }
    let mut edit = EditFile::new(write, path, fail_at);
    let mut t = Tally::default();

    // Headers: the current one first, the log before any write.
    let Some(header) = current_header(&host, path, repair, &mut edit, &mut t)? else {
        return Ok(t);
    };
    let host = Host {
        file: host,
        overlay: None,
    };

    // Region tables: readers use the first valid one.
    let rt = read_copies(
        &host.file,
        REGION_TABLE_OFFSETS,
        REGION_TABLE_SIZE,
        "VHDX region table",
        RegionTable::parse,
    )?;
    let table = match &rt.parsed {
        [Ok(a), Ok(b)] => {
            if a != b {
                fix_copy(
                    &mut t,
                    &mut edit,
                    repair,
                    "region table",
                    (rt.slots[1], rt.slots[0]),
                    &rt.raw[0],
                    "it differs from the first",
                )?;
            }
            a.clone()
        }
        [Ok(a), Err(e)] | [Err(e), Ok(a)] => {
            let bad = usize::from(rt.parsed[0].is_ok());
            let why = e.message().to_string();
            fix_copy(
                &mut t,
                &mut edit,
                repair,
                "region table",
                (rt.slots[bad], rt.slots[1 - bad]),
                &rt.raw[1 - bad],
                &why,
            )?;
            a.clone()
        }
        [Err(a), Err(b)] => {
            t.corrupt(format!(
                "ERROR: both VHDX region tables are damaged: {}; {}",
                a.message(),
                b.message()
            ));
            return Ok(t);
        }
    };

    let log_end = header
        .log_offset
        .saturating_add(u64::from(header.log_length));
    if log_end > len {
        t.corrupt(format!(
            "ERROR: the VHDX log ({:#x}..{log_end:#x}) runs past the end of the file ({len} bytes)",
            header.log_offset
        ));
    }
    let mut spans = vec![
        Span {
            start: 0,
            end: HEADER_SECTION_END,
            what: "the header section".into(),
        },
        Span {
            start: header.log_offset,
            end: log_end,
            what: "the log".into(),
        },
    ];
    let (mut bat, mut meta) = (None, None);
    for r in &table.entries {
        let name = if r.guid == BAT_GUID {
            "the BAT".to_string()
        } else if r.guid == METADATA_GUID {
            "the metadata region".to_string()
        } else if r.required {
            return Err(Error::unsupported(format!(
                "the VHDX has a required region {} that this checker does not know",
                guid_string(&r.guid)
            )));
        } else {
            format!("region {}", guid_string(&r.guid))
        };
        let end = r.file_offset + u64::from(r.length);
        if end > len {
            t.corrupt(format!(
                "ERROR: {name} ({:#x}..{end:#x}) runs past the end of the file ({len} bytes)",
                r.file_offset
            ));
        }
        if let Some(s) = overlapping(&spans, r.file_offset, end) {
            t.corrupt(format!(
                "ERROR: VHDX region {}-{end} ({name}) overlaps with region {}-{} ({})",
                r.file_offset, s.start, s.end, s.what
            ));
        }
        spans.push(Span {
            start: r.file_offset,
            end,
            what: name,
        });
        let slot = if r.guid == BAT_GUID {
            &mut bat
        } else if r.guid == METADATA_GUID {
            &mut meta
        } else {
            continue;
        };
        if slot.is_some() {
            t.corrupt(format!(
                "ERROR: the VHDX region table lists region {} twice",
                guid_string(&r.guid)
            ));
            return Ok(t);
        }
        *slot = Some(*r);
    }
    let (Some(bat_r), Some(meta_r)) = (bat, meta) else {
        t.corrupt("ERROR: the VHDX region table lacks the BAT or the metadata region");
        return Ok(t);
    };
    if meta_r.file_offset + u64::from(meta_r.length) > len {
        return Ok(t);
    }
    let params = match read_metadata(&host, &meta_r, &mut Vec::new()) {
        Ok(p) => p,
        Err(e) if e.kind() == ErrorKind::Unsupported || e.kind() == ErrorKind::LimitExceeded => {
            return Err(e)
        }
        Err(e) => {
            t.corrupt(format!("ERROR: VHDX metadata: {}", e.message()));
            return Ok(t);
        }
    };

    check_bat(&host, &bat_r, &params, &spans, &mut t)?;
    Ok(t)
}

/// Every BAT entry (see the module doc): its state, its block inside the file and
/// overlapping no region (`spans`) and no other block.
fn check_bat(
    host: &Host,
    bat_r: &Region,
    params: &Params,
    spans: &[Span],
    t: &mut Tally,
) -> Result<()> {
    let len = host.file.len();
    let bs = params.block_size;
    let vs = params.virtual_size;
    let blocks = vs.div_ceil(bs);
    let cr = chunk_ratio(u64::from(params.logical_sector_size), bs);
    let entries = bat_entries(blocks, cr, params.has_parent);
    if entries * 8 > u64::from(bat_r.length) {
        t.corrupt(format!(
            "ERROR: the VHDX BAT region holds {} entries but {blocks} payload blocks of {bs} bytes need {entries}",
            bat_r.length / 8
        ));
        return Ok(());
    }
    if entries * 8 > MAX_BAT_BYTES {
        return Err(Error::limit(format!(
            "the VHDX BAT is {} bytes (the limit is {MAX_BAT_BYTES})",
            entries * 8
        )));
    }
    let raw = read_padded(&host.file, bat_r.file_offset, entries * 8, "VHDX BAT")?;
    let mut blocks_at: Vec<(u64, u64, u64)> = Vec::new();
    for i in 0..entries {
        let e = LE::read_u64(&raw[i as usize * 8..]);
        let state = bat_state(e);
        let off = bat_offset(e);
        let is_bitmap = (i + 1) % (cr + 1) == 0;
        if is_bitmap {
            match state {
                BITMAP_NOT_PRESENT => continue,
                BITMAP_PRESENT if params.has_parent => {}
                // qemu looks at the offset of any entry in state 6, bitmap or not.
                BITMAP_PRESENT => {}
                s => {
                    if params.has_parent {
                        t.corrupt(format!(
                            "ERROR: VHDX BAT entry {i} (a sector bitmap entry) has state {s}, which is not 0 (not present) or 6 (present)"
                        ));
                    }
                    continue;
                }
            }
        } else {
            match state {
                PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                    continue
                }
                PAYLOAD_FULLY_PRESENT => {}
                PAYLOAD_PARTIALLY_PRESENT if params.has_parent => {}
                PAYLOAD_PARTIALLY_PRESENT => {
                    t.corrupt(format!(
                        "ERROR: VHDX BAT entry {i} says partially present, which only a differencing disk may say"
                    ));
                    continue;
                }
                s => {
                    t.corrupt(format!(
                        "ERROR: VHDX BAT entry {i} has the undefined state {s}"
                    ));
                    continue;
                }
            }
        }
        // qemu's arithmetic: the entry's index (bitmap entries included) times the block
        // size, so a last partial block may end inside the file.
        let block_length = bs.min(vs.wrapping_sub(i.wrapping_mul(bs)));
        if state == PAYLOAD_FULLY_PRESENT {
            if off > i64::MAX as u64 - bs {
                t.corrupt(format!("VHDX BAT entry {i} offset overflow."));
            }
            if off >= len {
                t.corrupt(format!(
                    "VHDX BAT entry {i} start offset {off} points after end of file ({len}). Image has probably been truncated."
                ));
            } else if off + block_length > len {
                t.corrupt(format!(
                    "VHDX BAT entry {i} end offset {} points after end of file ({len}). Image has probably been truncated.",
                    off + block_length - 1
                ));
            }
        } else if off.saturating_add(bs) > len {
            t.corrupt(format!(
                "ERROR: VHDX BAT entry {i} (state {state}): its block at {off} ends past the end of the file ({len})"
            ));
        }
        let span_len = if is_bitmap { MIB } else { bs };
        let end = off.saturating_add(span_len);
        if let Some(s) = overlapping(spans, off, end) {
            t.corrupt(format!(
                "VHDX BAT entry {i}: block {off}-{end} overlaps with region {}-{} ({})",
                s.start, s.end, s.what
            ));
        } else {
            blocks_at.push((off, end, i));
        }
    }
    // Two blocks in one place: a write through one entry changes the other's data.
    blocks_at.sort_unstable();
    // (end, entry, start) of the block reaching furthest so far.
    let mut reach: Option<(u64, u64, u64)> = None;
    for &(start, end, i) in &blocks_at {
        match reach {
            Some((rend, j, jstart)) if start < rend => {
                t.corrupt(format!(
                    "ERROR: VHDX BAT entries {j} and {i} overlap: blocks at {jstart:#x} and {start:#x}"
                ));
                if end > rend {
                    reach = Some((end, i, start));
                }
            }
            Some((rend, _, _)) if end <= rend => {}
            _ => reach = Some((end, i, start)),
        }
    }
    Ok(())
}
