//! Reading fixed, dynamic and differencing VHDX images.
//!
//! Open order, as the spec requires: the file identifier; both headers (the valid one with
//! the higher sequence number is current; two identical headers with the same number, as
//! Disk2VHD writes them, are accepted, as qemu does); the log, replayed in memory when the
//! current header names one ([`super::log`]); both region tables (the first valid one is
//! used; a damaged or different copy is a warning); the metadata region; the BAT; and for a
//! differencing disk the parent, opened only through the reference gate.
//!
//! Every offset and length is checked against the file (after the log replay) and against
//! every other structure: regions, the log and payload blocks may not overlap each other or
//! the header section. Memory is bounded: the BAT is held (at most [`MAX_BAT_BYTES`], and
//! never more than the file holds), sector bitmaps go through a small cache, and the log is
//! read only when it must be replayed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::header::*;
use super::log::{self, Host};
use crate::device::{check_guest_range, BlockDevice, HostFile, ImageInfo, Mapping, MappingKind};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::options::OpenOptions;

/// Largest BAT we load.
pub const MAX_BAT_BYTES: u64 = 128 << 20;
/// Sector bitmap blocks (1 MiB each) kept in memory at once.
const BITMAP_CACHE_BLOCKS: usize = 8;
/// Largest parent locator we read.
const MAX_LOCATOR_BYTES: u32 = 64 << 10;

/// What the metadata region says.
#[derive(Debug, Clone)]
pub struct Params {
    /// Payload block size.
    pub block_size: u64,
    /// Fixed disk: blocks stay allocated.
    pub leave_blocks_allocated: bool,
    /// Differencing disk.
    pub has_parent: bool,
    /// Guest size in bytes.
    pub virtual_size: u64,
    /// Logical sector size (512 or 4096): the unit of the sector bitmaps.
    pub logical_sector_size: u32,
    /// Physical sector size (512 or 4096).
    pub physical_sector_size: u32,
    /// SCSI page 83 identifier, if present.
    pub page83: Option<Guid>,
    /// The parent locator's key/value pairs (differencing disks).
    pub locator: Vec<(String, String)>,
}

/// An opened VHDX.
pub struct VhdxImage {
    host: Host,
    pub(super) header: Header,
    pub(super) params: Params,
    /// One entry per payload block.
    pub(super) payload: Vec<u64>,
    /// One entry per chunk (differencing disks only).
    bitmaps: Vec<u64>,
    pub(super) chunk_ratio: u64,
    bitmap_cache: Mutex<HashMap<u64, Arc<[u8]>>>,
    parent: Option<Box<dyn BlockDevice>>,
    creator: String,
    warnings: Vec<String>,
    /// Where the BAT region starts, which header is current (0 or 1), and whether a log
    /// was replayed in memory: what an in-place writer needs beyond the reader's view.
    pub(super) bat_offset: u64,
    pub(super) current: usize,
    pub(super) replayed: bool,
}

/// Which header is current, from the two parse results.
fn current_header(h: [Result<Header>; 2], warnings: &mut Vec<String>) -> Result<(usize, Header)> {
    let [a, b] = h;
    match (a, b) {
        (Ok(a), Ok(b)) => {
            if a.sequence_number > b.sequence_number {
                Ok((0, a))
            } else if b.sequence_number > a.sequence_number {
                Ok((1, b))
            } else if a == b {
                Ok((0, a))
            } else {
                Err(Error::corrupt(format!(
                    "both VHDX headers have sequence number {} but differ, so neither is current",
                    a.sequence_number
                ))
                .with_field("header.sequence_number")
                .at(HEADER_OFFSETS[1] + 8))
            }
        }
        (Ok(a), Err(e)) => {
            warnings.push(format!(
                "the second VHDX header (at {:#x}) is damaged: {}",
                HEADER_OFFSETS[1],
                e.message()
            ));
            Ok((0, a))
        }
        (Err(e), Ok(b)) => {
            warnings.push(format!(
                "the first VHDX header (at {:#x}) is damaged: {}",
                HEADER_OFFSETS[0],
                e.message()
            ));
            Ok((1, b))
        }
        (Err(e), Err(_)) => Err(e.at(HEADER_OFFSETS[0])),
    }
}

/// A file range another structure must not overlap.
#[derive(Debug, Clone)]
struct Span {
    start: u64,
    end: u64,
    what: String,
}

fn check_no_overlap(spans: &[Span], start: u64, end: u64, what: &str, at: u64) -> Result<()> {
    for s in spans {
        if start < s.end && s.start < end {
            return Err(Error::corrupt(format!(
                "{what} ({start:#x}..{end:#x}) overlaps {} ({:#x}..{:#x})",
                s.what, s.start, s.end
            ))
            .with_field(what.to_string())
            .at(at));
        }
    }
    Ok(())
}

/// Open a VHDX of any type.
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    Ok(Box::new(open_image(file, opts)?))
}

/// [`open`]'s image itself.
pub(super) fn open_image(file: HostFile, opts: &OpenOptions) -> Result<VhdxImage> {
    if let Some((k, _)) = opts.options.iter().next() {
        return Err(Error::arg(format!(
            "format 'vhdx' has no open option '{k}' (options: none)"
        )));
    }
    let mut warnings = Vec::new();
    let mut id = [0u8; 520];
    if file.len() < HEADER_SECTION_END {
        return Err(Error::invalid(format!(
            "file of {} bytes is shorter than a VHDX header section (1 MiB)",
            file.len()
        ))
        .with_field("file_identifier"));
    }
    file.read_exact_at(&mut id, 0, "file_identifier")?;
    if &id[..8] != FILE_SIGNATURE {
        return Err(
            Error::invalid("not a VHDX: no \"vhdxfile\" signature at offset 0")
                .with_field("file_identifier.signature")
                .at(0),
        );
    }
    let creator = {
        let units: Vec<u16> = id[8..520]
            .chunks_exact(2)
            .map(LE::read_u16)
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    };
    let headers = HEADER_OFFSETS.map(|at| {
        let mut b = vec![0u8; HEADER_SIZE];
        file.read_exact_at(&mut b, at, "header")?;
        Header::parse(&b).map_err(|e| e.at(at))
    });
    let (current, header) = current_header(headers, &mut warnings)?;
    let overlay = log::replay(&file, &header)?;
    if let Some(o) = &overlay {
        warnings.push(format!(
            "the image was not closed cleanly: {} log entries replayed in memory (the file is not changed)",
            o.entries
        ));
    }
    let replayed = overlay.is_some();
    let host = Host { file, overlay };
    let log_span = Span {
        start: header.log_offset,
        end: header.log_offset + header.log_length as u64,
        what: "the log".into(),
    };
    host.check_range(
        header.log_offset,
        header.log_length as u64,
        "header.log_offset",
    )?;

    // Region tables: the first valid copy.
    let tables = REGION_TABLE_OFFSETS.map(|at| {
        let b = host.read_vec(at, REGION_TABLE_SIZE as u64, "region_table")?;
        RegionTable::parse(&b).map_err(|e| e.at(at))
    });
    let table = match tables {
        [Ok(a), Ok(b)] => {
            if a != b {
                warnings.push("the two VHDX region tables differ; using the first".into());
            }
            a
        }
        [Ok(a), Err(e)] | [Err(e), Ok(a)] => {
            warnings.push(format!(
                "one VHDX region table is damaged ({}); using the other",
                e.message()
            ));
            a
        }
        [Err(e), Err(_)] => return Err(e),
    };
    let mut spans = vec![
        Span {
            start: 0,
            end: HEADER_SECTION_END,
            what: "the header section".into(),
        },
        log_span,
    ];
    let (mut bat, mut meta) = (None, None);
    for (i, r) in table.entries.iter().enumerate() {
        let field = format!("region_table.entry[{i}]");
        let end = r.file_offset + r.length as u64;
        host.check_range(r.file_offset, r.length as u64, &field)?;
        check_no_overlap(
            &spans,
            r.file_offset,
            end,
            &format!("region {}", guid_string(&r.guid)),
            REGION_TABLE_OFFSETS[0],
        )?;
        spans.push(Span {
            start: r.file_offset,
            end,
            what: format!("region {}", guid_string(&r.guid)),
        });
        let slot = if r.guid == BAT_GUID {
            &mut bat
        } else if r.guid == METADATA_GUID {
            &mut meta
        } else if r.required {
            return Err(Error::unsupported(format!(
                "the VHDX has a required region {} that this reader does not know",
                guid_string(&r.guid)
            ))
            .with_field(field));
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(Error::invalid(format!(
                "the VHDX region table lists region {} twice",
                guid_string(&r.guid)
            ))
            .with_field(field));
        }
        *slot = Some(*r);
    }
    let (Some(bat_r), Some(meta_r)) = (bat, meta) else {
        return Err(
            Error::invalid("the VHDX region table lacks the BAT or the metadata region")
                .with_field("region_table"),
        );
    };
    let params = read_metadata(&host, &meta_r, &mut warnings)?;

    let (payload, bitmaps, cr) = read_bat(&host, &bat_r, &params, &spans)?;
    let mut img = VhdxImage {
        host,
        header,
        params,
        payload,
        bitmaps,
        chunk_ratio: cr,
        bitmap_cache: Mutex::new(HashMap::new()),
        parent: None,
        creator,
        warnings,
        bat_offset: bat_r.file_offset,
        current,
        replayed,
    };
    if img.params.has_parent {
        img.parent = Some(open_parent(&img, opts)?);
    }
    Ok(img)
}

/// The BAT of `bat_r`, every entry checked (state, block inside the file and clear of
/// `spans`): the payload blocks' entries, the sector bitmaps' (a differencing disk's, one
/// per chunk), and the chunk ratio.
fn read_bat(
    host: &Host,
    bat_r: &Region,
    params: &Params,
    spans: &[Span],
) -> Result<(Vec<u64>, Vec<u64>, u64)> {
    let bs = params.block_size;
    let blocks = params.virtual_size.div_ceil(bs);
    let cr = chunk_ratio(params.logical_sector_size as u64, bs);
    let entries = bat_entries(blocks, cr, params.has_parent);
    let bat_bytes = entries * 8;
    if bat_bytes > bat_r.length as u64 {
        return Err(Error::corrupt(format!(
            "the VHDX BAT region holds {} entries but {} payload blocks of {bs} bytes need {entries}",
            bat_r.length / 8,
            blocks
        ))
        .with_field("region_table.bat.length")
        .at(REGION_TABLE_OFFSETS[0]));
    }
    if bat_bytes > MAX_BAT_BYTES {
        return Err(Error::limit(format!(
            "the VHDX BAT is {bat_bytes} bytes (the limit is {MAX_BAT_BYTES})"
        ))
        .with_field("region_table.bat.length"));
    }
    let raw = host.read_vec(bat_r.file_offset, bat_bytes, "BAT")?;
    let mut payload = Vec::with_capacity(blocks as usize);
    let mut bitmaps = Vec::new();
    for i in 0..entries {
        let e = LE::read_u64(&raw[i as usize * 8..]);
        let at = bat_r.file_offset + i * 8;
        let is_bitmap = (i + 1) % (cr + 1) == 0;
        let state = bat_state(e);
        let off = bat_offset(e);
        if is_bitmap {
            if !params.has_parent {
                continue;
            }
            match state {
                BITMAP_NOT_PRESENT => {}
                BITMAP_PRESENT => {
                    check_block(host, spans, off, MIB, "sector bitmap block", at)?;
                }
                s => {
                    return Err(Error::corrupt(format!(
                        "VHDX BAT entry {i} (a sector bitmap entry) has state {s}, which is not 0 (not present) or 6 (present)"
                    ))
                    .with_field("bat.state")
                    .at(at))
                }
            }
            bitmaps.push(e);
            continue;
        }
        let blk = payload.len() as u64;
        if blk >= blocks {
            continue;
        }
        match state {
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {}
            PAYLOAD_FULLY_PRESENT | PAYLOAD_PARTIALLY_PRESENT => {
                if state == PAYLOAD_PARTIALLY_PRESENT && !params.has_parent {
                    return Err(Error::corrupt(format!(
                        "VHDX BAT entry {i} says partially present, which only a differencing disk may say"
                    ))
                    .with_field("bat.state")
                    .at(at));
                }
                // Only the part of the last block inside the virtual size must be in the
                // file (qemu's fixed images end there).
                let need = bs.min(params.virtual_size - blk * bs);
                check_block(host, spans, off, need, "payload block", at)?;
            }
            s => {
                return Err(Error::corrupt(format!(
                    "VHDX BAT entry {i} (payload block {blk}) has the undefined state {s}"
                ))
                .with_field("bat.state")
                .at(at))
            }
        }
        payload.push(e);
    }
    if params.has_parent {
        while (bitmaps.len() as u64) < blocks.div_ceil(cr) {
            bitmaps.push(0);
        }
    }
    Ok((payload, bitmaps, cr))
}

/// Check a block at `off` of `len` bytes: past the header section, 1 MiB aligned, inside
/// the file, overlapping no region or the log.
fn check_block(host: &Host, spans: &[Span], off: u64, len: u64, what: &str, at: u64) -> Result<()> {
    if off < HEADER_SECTION_END {
        return Err(Error::corrupt(format!(
            "VHDX BAT entry at {at:#x}: the {what} is at {off:#x}, inside the header section"
        ))
        .with_field("bat.file_offset")
        .at(at));
    }
    host.check_range(off, len, "bat.file_offset")
        .map_err(|e| e.at(at))?;
    check_no_overlap(spans, off, off + len, what, at)
}

/// Read the metadata region: the table, then each item the reader knows; an unknown
/// required item refuses the file.
pub(super) fn read_metadata(host: &Host, r: &Region, warnings: &mut Vec<String>) -> Result<Params> {
    let base = r.file_offset;
    let tbl = host.read_vec(base, METADATA_TABLE_SIZE as u64, "metadata table")?;
    let table = MetadataTable::parse(&tbl, r.length as u64).map_err(|e| e.at(base))?;
    for m in &table.entries {
        let known = [
            FILE_PARAMETERS_GUID,
            VIRTUAL_SIZE_GUID,
            PAGE83_GUID,
            LOGICAL_SECTOR_GUID,
            PHYSICAL_SECTOR_GUID,
            PARENT_LOCATOR_GUID,
        ];
        if !known.contains(&m.item_id) && m.flags & META_IS_REQUIRED != 0 {
            return Err(Error::unsupported(format!(
                "the VHDX has a required metadata item {} that this reader does not know",
                guid_string(&m.item_id)
            ))
            .with_field("metadata.item_id")
            .at(base));
        }
    }
    let item = |id: &Guid, name: &str, min: u32| -> Result<Option<Vec<u8>>> {
        let Some(m) = table.find(id) else {
            return Ok(None);
        };
        if m.length < min {
            return Err(Error::invalid(format!(
                "the VHDX metadata item {name} is {} bytes (at least {min} needed)",
                m.length
            ))
            .with_field(format!("metadata.{name}.length"))
            .at(base));
        }
        let len = if id == &PARENT_LOCATOR_GUID {
            if m.length > MAX_LOCATOR_BYTES {
                return Err(Error::limit(format!(
                    "the VHDX parent locator is {} bytes (the limit is {MAX_LOCATOR_BYTES})",
                    m.length
                ))
                .with_field("metadata.parent_locator.length"));
            }
            m.length
        } else {
            min
        };
        host.read_vec(
            base + m.offset as u64,
            len as u64,
            &format!("metadata.{name}"),
        )
        .map(Some)
    };
    let required = |v: Option<Vec<u8>>, name: &str| {
        v.ok_or_else(|| {
            Error::invalid(format!("the VHDX metadata lacks the required item {name}"))
                .with_field(format!("metadata.{name}"))
                .at(base)
        })
    };
    let fp = required(
        item(&FILE_PARAMETERS_GUID, "file_parameters", 8)?,
        "file_parameters",
    )?;
    let vs = required(
        item(&VIRTUAL_SIZE_GUID, "virtual_disk_size", 8)?,
        "virtual_disk_size",
    )?;
    let ls = required(
        item(&LOGICAL_SECTOR_GUID, "logical_sector_size", 4)?,
        "logical_sector_size",
    )?;
    let ps = required(
        item(&PHYSICAL_SECTOR_GUID, "physical_sector_size", 4)?,
        "physical_sector_size",
    )?;
    let page83 = item(&PAGE83_GUID, "page83_data", 16)?.map(|b| b[..16].try_into().unwrap());
    if page83.is_none() {
        warnings.push("the VHDX metadata has no page 83 data item".into());
    }
    let block_size = LE::read_u32(&fp[0..]) as u64;
    let bits = LE::read_u32(&fp[4..]);
    let p = Params {
        block_size,
        leave_blocks_allocated: bits & PARAM_LEAVE_BLOCKS_ALLOCATED != 0,
        has_parent: bits & PARAM_HAS_PARENT != 0,
        virtual_size: LE::read_u64(&vs),
        logical_sector_size: LE::read_u32(&ls),
        physical_sector_size: LE::read_u32(&ps),
        page83,
        locator: Vec::new(),
    };
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Error::invalid(format!(
            "VHDX block size {block_size} is not a power of two from 1 MiB to 256 MiB"
        ))
        .with_field("metadata.file_parameters.block_size"));
    }
    for (v, name) in [
        (p.logical_sector_size, "logical_sector_size"),
        (p.physical_sector_size, "physical_sector_size"),
    ] {
        if v != 512 && v != 4096 {
            return Err(
                Error::invalid(format!("VHDX {name} is {v} (only 512 and 4096 exist)"))
                    .with_field(format!("metadata.{name}")),
            );
        }
    }
    if !p.virtual_size.is_multiple_of(p.logical_sector_size as u64)
        || p.virtual_size > MAX_VIRTUAL_SIZE
    {
        return Err(Error::invalid(format!(
            "VHDX virtual disk size {} is not a multiple of the {}-byte logical sector or exceeds 64 TiB",
            p.virtual_size, p.logical_sector_size
        ))
        .with_field("metadata.virtual_disk_size"));
    }
    let mut p = p;
    let loc = item(&PARENT_LOCATOR_GUID, "parent_locator", 20)?;
    match (p.has_parent, loc) {
        (true, Some(l)) => p.locator = parse_locator(&l)?,
        (true, None) => {
            return Err(Error::invalid(
                "the VHDX is a differencing disk (has_parent) but has no parent locator",
            )
            .with_field("metadata.parent_locator"))
        }
        (false, Some(_)) => {
            warnings.push("the VHDX has a parent locator but is not a differencing disk".into())
        }
        (false, None) => {}
    }
    Ok(p)
}

/// The parent locator's key/value pairs.
fn parse_locator(b: &[u8]) -> Result<Vec<(String, String)>> {
    let bad = |what: String| Error::invalid(what).with_field("metadata.parent_locator");
    if b[..16] != PARENT_TYPE_VHDX_GUID {
        return Err(Error::unsupported(format!(
            "the VHDX parent locator has type {}, not a VHDX parent",
            guid_string(b[..16].try_into().unwrap())
        ))
        .with_field("metadata.parent_locator.locator_type"));
    }
    let count = LE::read_u16(&b[18..]) as usize;
    if 20 + count * 12 > b.len() {
        return Err(bad(format!(
            "the parent locator's {count} entries do not fit in its {} bytes",
            b.len()
        )));
    }
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let e = &b[20 + i * 12..32 + i * 12];
        let get = |off: u32, len: u16, what: &str| -> Result<String> {
            let (s, n) = (off as usize, len as usize);
            let bytes = b.get(s..s + n).filter(|_| s >= 20).ok_or_else(|| {
                bad(format!(
                    "parent locator entry {i}: its {what} ({n} bytes at {s:#x}) lies outside the locator"
                ))
            })?;
            from_utf16le(bytes).ok_or_else(|| {
                bad(format!(
                    "parent locator entry {i}: its {what} is not valid UTF-16"
                ))
            })
        };
        let k = get(LE::read_u32(&e[0..]), LE::read_u16(&e[8..]), "key")?;
        let v = get(LE::read_u32(&e[4..]), LE::read_u16(&e[10..]), "value")?;
        out.push((k, v));
    }
    Ok(out)
}

/// Windows separators to '/', a leading "./" dropped.
fn normalize_path(p: &str) -> String {
    let p = p.replace('\\', "/");
    let mut s = p.as_str();
    while let Some(rest) = s.strip_prefix("./") {
        s = rest;
    }
    s.to_string()
}

impl VhdxImage {
    fn locator(&self, key: &str) -> Option<&str> {
        self.params
            .locator
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The parent names, most preferred first: the relative path, then the absolute ones
    /// (which the gate refuses, with its reason).
    fn parent_names(&self) -> Vec<(String, &'static str)> {
        let mut v = Vec::new();
        for (key, field) in [
            ("relative_path", "parent_locator.relative_path"),
            ("volume_path", "parent_locator.volume_path"),
            ("absolute_win32_path", "parent_locator.absolute_win32_path"),
        ] {
            if let Some(p) = self.locator(key) {
                v.push((normalize_path(p), field));
            }
        }
        v
    }
}

/// Open the parent through the reference gate, and check that it is the image this child
/// was made from (the parent's data write GUID is the locator's parent_linkage).
fn open_parent(img: &VhdxImage, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let path = img.host.file.path();
    let names = img.parent_names();
    let Some((name, field)) = names.first() else {
        return Err(Error::invalid(
            "the VHDX parent locator names no parent path (relative_path, volume_path or absolute_win32_path)",
        )
        .with_field("metadata.parent_locator"));
    };
    let resolved = opts.resolve_reference(path, name, field)?;
    if let Some(link) = img.locator("parent_linkage") {
        let pf = HostFile::open(&resolved)?;
        let mut sig = [0u8; 8];
        pf.read_exact_at(&mut sig, 0, "parent file identifier")?;
        if &sig == FILE_SIGNATURE {
            let mut w = Vec::new();
            let hs = HEADER_OFFSETS.map(|at| {
                let mut b = vec![0u8; HEADER_SIZE];
                pf.read_exact_at(&mut b, at, "parent header")?;
                Header::parse(&b)
            });
            let (_, ph) = current_header(hs, &mut w).map_err(|e| e.with_path(&resolved))?;
            let got = format!("{{{}}}", guid_string(&ph.data_write_guid));
            if !got.eq_ignore_ascii_case(link.trim()) {
                return Err(Error::corrupt(format!(
                    "the parent '{name}' has data write GUID {got}, but this differencing disk was made from {link}: the parent changed after the child was made"
                ))
                .with_field("parent_locator.parent_linkage")
                .with_path(path));
            }
        }
    }
    let parent = opts.open_reference(path, name, field, None)?;
    Ok(parent)
}

/// What a guest range is before a parent is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    /// Stored at this host offset.
    Data(u64),
    /// Reads as zeros, whatever the parent holds.
    Zero,
    /// Not stored: zeros, or the parent's bytes.
    Absent,
}

impl VhdxImage {
    fn bitmap(&self, chunk: u64) -> Result<Option<Arc<[u8]>>> {
        let e = self.bitmaps[chunk as usize];
        if bat_state(e) != BITMAP_PRESENT {
            return Ok(None);
        }
        let lock = || self.bitmap_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = lock().get(&chunk) {
            return Ok(Some(b.clone()));
        }
        let v: Arc<[u8]> = self
            .host
            .read_vec(bat_offset(e), MIB, "sector bitmap block")?
            .into();
        let mut c = lock();
        if c.len() >= BITMAP_CACHE_BLOCKS {
            c.clear();
        }
        c.insert(chunk, v.clone());
        Ok(Some(v))
    }

    /// The kind of a block's whole content by its state (None: partially present).
    fn block_kind(&self, e: u64) -> Option<Local> {
        let diff = self.params.has_parent;
        Some(match bat_state(e) {
            PAYLOAD_FULLY_PRESENT => Local::Data(bat_offset(e)),
            PAYLOAD_PARTIALLY_PRESENT => return None,
            PAYLOAD_ZERO => Local::Zero,
            PAYLOAD_UNMAPPED if !diff => Local::Zero,
            _ => Local::Absent,
        })
    }

    /// The longest run from `offset` (< `end`) of one [`Local`] kind.
    fn map_local(&self, offset: u64, end: u64) -> Result<(u64, Local)> {
        let bs = self.params.block_size;
        let blk = offset / bs;
        let e = self.payload[blk as usize];
        let block_start = blk * bs;
        let in_block = offset - block_start;
        match self.block_kind(e) {
            Some(kind) => {
                let first = match kind {
                    Local::Data(h) => Local::Data(h + in_block),
                    k => k,
                };
                let mut run_end = block_start + bs;
                while run_end < end {
                    let nb = run_end / bs;
                    let next = self.block_kind(self.payload[nb as usize]);
                    let same = match (kind, next) {
                        (Local::Data(h), Some(Local::Data(h2))) => h2 == h + (nb - blk) * bs,
                        (k, Some(k2)) => k == k2 && !matches!(k, Local::Data(_)),
                        _ => false,
                    };
                    if !same {
                        break;
                    }
                    run_end += bs;
                }
                Ok((run_end.min(end) - offset, first))
            }
            None => {
                // Partially present: the chunk's sector bitmap decides, sector by sector.
                let lss = self.params.logical_sector_size as u64;
                let chunk = blk / self.chunk_ratio;
                let bitmap = self.bitmap(chunk)?;
                let chunk_first = chunk * self.chunk_ratio * bs / lss;
                let bit = |sector: u64| -> bool {
                    let i = (sector - chunk_first) as usize;
                    bitmap
                        .as_ref()
                        .is_some_and(|b| b[i / 8] & (1 << (i % 8)) != 0)
                };
                let block_end = (block_start + bs).min(end);
                let first = offset / lss;
                let last = block_end.div_ceil(lss);
                let set = bit(first);
                let mut s = first + 1;
                while s < last && bit(s) == set {
                    s += 1;
                }
                let run_end = (s * lss).min(block_end);
                let kind = if set {
                    Local::Data(bat_offset(e) + in_block)
                } else {
                    Local::Absent
                };
                Ok((run_end - offset, kind))
            }
        }
    }

    /// The parsed metadata.
    pub fn params(&self) -> &Params {
        &self.params
    }
}

impl BlockDevice for VhdxImage {
    fn virtual_size(&self) -> u64 {
        self.params.virtual_size
    }

    /// qemu's vhdx driver has no block status: qemu-img map reports one allocated data
    /// range without a host offset, and measure counts every cluster.
    fn qemu_status_opaque(&self) -> bool {
        true
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = crate::device::map_end(self.params.virtual_size, offset, max_len)?;
        let (len, local) = self.map_local(offset, end)?;
        let kind = match local {
            Local::Data(h) => MappingKind::Data { host: Some(h) },
            Local::Zero => MappingKind::Zero,
            Local::Absent => match &self.parent {
                Some(p) if offset < p.virtual_size() => {
                    let plen = len.min(p.virtual_size() - offset);
                    let m = p.map(offset, plen)?;
                    let kind = match m.kind {
                        MappingKind::Data { .. } => MappingKind::Data { host: None },
                        k => k,
                    };
                    return Ok(Mapping {
                        offset,
                        len: m.len.clamp(1, plen),
                        kind,
                    });
                }
                _ => MappingKind::Unallocated,
            },
        };
        Ok(Mapping { offset, len, kind })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_guest_range(self.params.virtual_size, offset, buf.len())?;
        let end = offset + buf.len() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (len, local) = self.map_local(off, end)?;
            let part = &mut buf[done..done + len as usize];
            match local {
                Local::Data(h) => self.host.read_exact_at(part, h, "guest data block")?,
                Local::Zero => part.fill(0),
                Local::Absent => match &self.parent {
                    Some(p) if off < p.virtual_size() => {
                        let n = (len.min(p.virtual_size() - off)) as usize;
                        p.read_at(&mut part[..n], off)?;
                        part[n..].fill(0);
                    }
                    _ => part.fill(0),
                },
            }
            done += len as usize;
        }
        Ok(())
    }

    fn info(&self) -> ImageInfo {
        let mut info = ImageInfo {
            format: "vhdx".into(),
            virtual_size: self.params.virtual_size,
            cluster_size: Some(self.params.block_size),
            dirty: Some(false),
            warnings: self.warnings.clone(),
            ..Default::default()
        };
        if self.params.has_parent {
            let names: Vec<String> = self.parent_names().into_iter().map(|(n, _)| n).collect();
            info.backing_file = names.first().cloned();
            info.referenced_files = names;
        }
        info
    }

    fn format(&self) -> Format {
        Format::Vhdx
    }
}

impl std::fmt::Debug for VhdxImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxImage")
            .field("path", &self.host.file.path())
            .field("creator", &self.creator)
            .field("sequence_number", &self.header.sequence_number)
            .field("params", &self.params)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locator_paths_are_normalized() {
        assert_eq!(normalize_path(".\\base.vhdx"), "base.vhdx");
        assert_eq!(normalize_path("..\\d\\base.vhdx"), "../d/base.vhdx");
    }

    #[test]
    fn locator_entries_are_bounded() {
        let mut b = vec![0u8; 64];
        b[..16].copy_from_slice(&PARENT_TYPE_VHDX_GUID);
        LE::write_u16(&mut b[18..], 1);
        LE::write_u32(&mut b[20..], 32);
        LE::write_u32(&mut b[24..], 60);
        LE::write_u16(&mut b[28..], 4);
        LE::write_u16(&mut b[30..], 8);
        let e = parse_locator(&b).unwrap_err();
        assert!(e.message().contains("outside the locator"), "{e}");
        LE::write_u16(&mut b[30..], 4);
        let kv = parse_locator(&b).unwrap();
        assert_eq!(kv.len(), 1);
    }
}
