//! Reading fixed, dynamic and differencing VHDs.
//!
//! Which bytes the guest sees follows qemu 10's vpc driver (so we read what qemu reads):
//! the footer at the end decides a fixed disk, the copy at offset 0 a dynamic one; the
//! virtual size comes from the CHS geometry for images made by Virtual PC ("vpc ") and
//! old qemu ("qemu") and from current_size for every other creator (Hyper-V, Azure,
//! VirtualBox, Disk2vhd, XenServer, new qemu, and any we do not know), as qemu 10 does.
//! One exception, where qemu drops guest data and we do not: when the geometry gives
//! less than current_size and the bytes between the two hold data (see [`open`]). Where
//! qemu is lax we are strict but
//! name the problem: the dynamic header checksum is verified, BAT entries must point at
//! whole blocks inside the file, and a sector whose bitmap bit is clear reads as zero (or
//! from the parent of a differencing disk), as the VHD specification says.

use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use byteorder::{BigEndian, ByteOrder};

use super::dynheader::{
    self, platform, DynHeader, ParentLocator, BLOCK_SIZE_OFFSET, DYN_HEADER_SIZE,
    MAX_TABLE_ENTRIES_OFFSET, TABLE_OFFSET_OFFSET,
};
use super::footer::{DiskType, Footer, FOOTER_COOKIE, FOOTER_SIZE};
use super::geometry::{MAX_GEOMETRY_SECTORS, MAX_SECTORS};
use crate::device::{check_guest_range, BlockDevice, HostFile, ImageInfo, Mapping, MappingKind};
use crate::error::{checked_add, checked_mul, Error, Result};
use crate::format::Format;
use crate::options::OpenOptions;

/// Largest BAT we load (entries x 4 bytes).
pub const MAX_BAT_BYTES: u64 = 32 << 20;
/// Largest parent locator we read.
const MAX_LOCATOR_BYTES: u32 = 64 << 10;
/// Bytes of sector bitmaps kept in memory at once.
const BITMAP_CACHE_BYTES: usize = 4 << 20;
/// BAT value of an unallocated block.
const UNALLOCATED: u32 = u32::MAX;

/// How the virtual size is derived (qemu's `force_size_calc` open option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeCalc {
    /// By creator application, like qemu.
    Auto,
    /// CHS geometry (unless it is the maximum geometry).
    Chs,
    /// The footer's current_size.
    CurrentSize,
}

/// Creator applications whose images are sized by their CHS geometry: Virtual PC and
/// old qemu, before it wrote "qem2" (qemu 10's `vpc_ignore_current_size`). Every other
/// creator is sized by current_size, the known ones ("win " Hyper-V, "wa\0\0" Azure, "vbox" VirtualBox,
/// "d2v " Disk2vhd, "qem2" qemu, "tap\0" XenServer, "CTXS" XenConverter) and unknown ones
/// alike: a geometry rounds down, so trusting it cuts the tail of the disk (where a
/// backup GPT lives).
const CHS_CREATORS: [&[u8; 4]; 2] = [b"vpc ", b"qemu"];

/// How many guest bytes past the geometry's size [`holds_data`] reads before it gives up
/// and counts the rest as data (real images differ by under one cylinder, about 2 MiB).
const DATA_SCAN_LIMIT: u64 = 64 << 20;
/// Most `map` calls [`holds_data`] makes before it counts the rest as data.
const DATA_SCAN_MAX_CALLS: u64 = 100_000;

/// The virtual size in bytes the footer describes, the way qemu 10 computes it.
fn virtual_size(footer: &Footer, calc: SizeCalc) -> Result<u64> {
    let use_chs = match calc {
        SizeCalc::Auto => CHS_CREATORS.contains(&&footer.creator_app),
        SizeCalc::Chs => true,
        SizeCalc::CurrentSize => false,
    };
    let chs = footer.chs_sectors();
    let sectors = if !use_chs || chs == MAX_GEOMETRY_SECTORS {
        footer.current_size / 512
    } else {
        chs
    };
    if sectors > MAX_SECTORS {
        return Err(Error::limit(format!(
            "VHD virtual size of {sectors} sectors exceeds the format's maximum of {MAX_SECTORS} sectors (2040 GiB)"
        ))
        .with_field("footer.current_size"));
    }
    Ok(sectors * 512)
}

/// current_size in whole sectors, when that is more than `size` (the geometry's size)
/// and within the format's limit: the size that keeps the bytes the geometry would drop.
fn wider_size(footer: &Footer, size: u64) -> Option<u64> {
    let cur = footer.current_size / 512;
    (cur <= MAX_SECTORS && cur * 512 > size).then_some(cur * 512)
}

/// Do guest bytes `from..to` of `img` hold anything but zeros? Unallocated ranges and
/// host-file holes are skipped; past [`DATA_SCAN_LIMIT`] bytes read or
/// [`DATA_SCAN_MAX_CALLS`] map calls the answer is yes, since what was not looked at may
/// be data and must not be dropped.
fn holds_data(img: &VhdImage, from: u64, to: u64) -> Result<bool> {
    let mut buf = vec![0u8; (1 << 20).min(to - from) as usize];
    let (mut off, mut read, mut calls) = (from, 0u64, 0u64);
    while off < to {
        calls += 1;
        if calls > DATA_SCAN_MAX_CALLS {
            return Ok(true);
        }
        let m = img.map(off, to - off)?;
        if let MappingKind::Data { .. } = m.kind {
            let end = off + m.len;
            let mut o = off;
            while o < end {
                let n = (end - o).min(buf.len() as u64);
                read += n;
                if read > DATA_SCAN_LIMIT {
                    return Ok(true);
                }
                let part = &mut buf[..n as usize];
                img.read_at(part, o)?;
                if part.iter().any(|&b| b != 0) {
                    return Ok(true);
                }
                o += n;
            }
        }
        off += m.len;
    }
    Ok(false)
}

/// Open a VHD of any type.
///
/// The size is qemu 10's (by creator application, `CHS_CREATORS` above) with one
/// deliberate difference: when the geometry rule (a "vpc " or "qemu" creator, unless
/// `force_size_calc` says otherwise) gives less than current_size and guest bytes
/// between the two sizes hold data (non-zero bytes in the file of a fixed disk, or in
/// allocated sectors of a dynamic one), the size is current_size, with a warning. qemu-img
/// drops those bytes without a word; a converter must never drop data that the image
/// stores, and a geometry only ever rounds the disk down. Real Virtual PC images keep
/// zeros there (the guest never saw past the geometry), so they read exactly as qemu reads
/// them. `force_size_calc=chs` still reads the geometry's size, with a warning when that
/// drops data. A fixed image's current_size is also checked against the bytes before its
/// footer, which it equals in every fixed VHD a tool writes.
pub fn open(file: HostFile, opts: &OpenOptions) -> Result<Box<dyn BlockDevice>> {
    let mut calc = SizeCalc::Auto;
    for (k, v) in &opts.options {
        match (k.as_str(), v.as_str()) {
            ("force_size_calc", "chs") => calc = SizeCalc::Chs,
            ("force_size_calc", "current_size") => calc = SizeCalc::CurrentSize,
            ("force_size_calc", other) => {
                return Err(Error::arg(format!(
                    "invalid force_size_calc '{other}' (use chs or current_size)"
                )))
            }
            (other, _) => {
                return Err(Error::arg(format!(
                    "format 'vpc' has no open option '{other}' (options: force_size_calc)"
                )))
            }
        }
    }
    let (footer, footer_at, mut warnings) = find_footer(&file)?;
    let size = virtual_size(&footer, calc)?;
    if footer.saved_state != 0 {
        warnings.push(
            "the footer's saved-state flag is set (the image belongs to a saved virtual machine)"
                .into(),
        );
    }
    let mut wider = wider_size(&footer, size);
    let kind = match footer.disk_type {
        DiskType::Fixed => {
            // The guest data is everything before the footer.
            if size > footer_at {
                return Err(Error::corrupt(format!(
                    "fixed VHD claims {size} bytes but only {footer_at} bytes of data precede its footer"
                ))
                .with_field("footer.current_size")
                .at(footer_at));
            }
            if footer.current_size != footer_at {
                warnings.push(format!(
                    "fixed VHD: current_size is {} bytes but {footer_at} bytes of data precede the footer",
                    footer.current_size
                ));
            }
            wider = wider.filter(|&w| w <= footer_at);
            Kind::Fixed
        }
        DiskType::Dynamic | DiskType::Differencing => {
            let sp = open_sparse(&file, &footer, size, wider, opts, &mut warnings)?;
            // The BAT may cover less than current_size; nothing is stored past it.
            wider = wider
                .map(|w| w.min(sp.bat.len() as u64 * sp.block_size))
                .filter(|&w| w > size);
            Kind::Sparse(Box::new(sp))
        }
    };
    let mut img = VhdImage {
        file,
        footer,
        size,
        kind,
        warnings,
    };
    if let Some(w) = wider {
        img.size = w;
        let data = holds_data(&img, size, w)?;
        let creator = img.footer.creator_app_str().escape_default().to_string();
        match (data, calc) {
            (false, _) => img.size = size,
            (true, SizeCalc::Chs) => {
                img.size = size;
                img.warnings.push(format!(
                    "force_size_calc=chs reads the geometry's {size} bytes; the image stores data up to its current_size of {w} bytes, which is not read"
                ));
            }
            (true, _) => img.warnings.push(format!(
                "creator '{creator}' sizes by CHS geometry ({size} bytes), but the image stores data past it up to its current_size of {w} bytes: reading {w} bytes so none is dropped (qemu-img reads {size}; force_size_calc=chs does too)"
            )),
        }
    }
    Ok(Box::new(img))
}

/// Find the footer that describes the image: a valid fixed footer at the end wins (a
/// fixed disk's guest data may itself start with "conectix"); otherwise the copy at 0 of a
/// dynamic disk, falling back to the end copy when the first is damaged. Returns the
/// footer, its file offset, and warnings.
fn find_footer(file: &HostFile) -> Result<(Footer, u64, Vec<String>)> {
    let len = file.len();
    if len < FOOTER_SIZE as u64 {
        return Err(Error::invalid(format!(
            "file of {len} bytes is too small for a VHD footer ({FOOTER_SIZE} bytes)"
        ))
        .with_field("footer"));
    }
    let tail_at = len - FOOTER_SIZE as u64;
    let mut tail = [0u8; FOOTER_SIZE];
    file.read_exact_at(&mut tail, tail_at, "VHD footer")?;
    let mut head = [0u8; FOOTER_SIZE];
    file.read_exact_at(&mut head, 0, "VHD footer copy")?;
    let tail_res = Footer::parse(&tail).map_err(|e| e.at(tail_at));
    if let Ok(f) = &tail_res {
        if f.disk_type == DiskType::Fixed {
            return Ok((f.clone(), tail_at, Vec::new()));
        }
    }
    if head[..8] == FOOTER_COOKIE[..] {
        match Footer::parse(&head) {
            Ok(f) if f.disk_type != DiskType::Fixed => return Ok((f, 0, Vec::new())),
            Ok(_) => {
                return Err(match tail_res {
                    Err(e) => e,
                    Ok(_) => Error::invalid(
                        "the footer copy at offset 0 says fixed but the footer at the end does not",
                    )
                    .with_field("footer.disk_type")
                    .at(tail_at),
                })
            }
            Err(e) => {
                if let Ok(f) = tail_res {
                    let w = format!(
                        "the footer copy at offset 0 is damaged ({}); using the footer at the end",
                        e.message()
                    );
                    return Ok((f, tail_at, vec![w]));
                }
                return Err(e.at(0));
            }
        }
    }
    if let Ok(f) = tail_res {
        return Ok((
            f,
            tail_at,
            vec!["no footer copy at offset 0; using the footer at the end".into()],
        ));
    }
    // Some old Virtual PC fixed images carry a 511-byte footer (the last reserved byte
    // missing); its checksum still covers the 511 bytes.
    if tail[1..9] == FOOTER_COOKIE[..] {
        let mut short = [0u8; FOOTER_SIZE];
        short[..FOOTER_SIZE - 1].copy_from_slice(&tail[1..]);
        if let Ok(f) = Footer::parse(&short) {
            if f.disk_type == DiskType::Fixed {
                return Ok((
                    f,
                    tail_at + 1,
                    vec!["511-byte footer (old Virtual PC quirk)".into()],
                ));
            }
        }
    }
    match tail_res {
        Err(e) if tail[..8] == FOOTER_COOKIE[..] => Err(e),
        _ => Err(Error::invalid(
            "not a VHD: no 'conectix' footer at offset 0 or in the last 512 bytes",
        )
        .with_field("footer.cookie")),
    }
}

/// The valid footer that ends a file whose last bytes are `tail` (the 512-byte footer, or
/// the 511-byte quirk of old Virtual PC fixed images), and how many bytes precede it.
fn tail_footer(tail: &[u8], file_len: u64) -> Option<(Footer, u64)> {
    if tail.len() < FOOTER_SIZE || file_len < FOOTER_SIZE as u64 {
        return None;
    }
    let t = &tail[tail.len() - FOOTER_SIZE..];
    if let Ok(f) = Footer::parse(t) {
        return Some((f, file_len - FOOTER_SIZE as u64));
    }
    let mut short = [0u8; FOOTER_SIZE];
    short[..FOOTER_SIZE - 1].copy_from_slice(&t[1..]);
    match Footer::parse(&short) {
        Ok(f) if f.disk_type == DiskType::Fixed => Some((f, file_len - FOOTER_SIZE as u64 + 1)),
        _ => None,
    }
}

/// Does the file (of `file_len` bytes, ending with `tail`) have the shape of a fixed VHD:
/// a valid footer of disk type fixed whose size is exactly the number of bytes before it
/// (its current_size, or the size its creator's rule gives, which old qemu fixed images
/// need)? Every fixed-VHD producer (Virtual PC, Hyper-V, Azure, VirtualBox, qemu) writes
/// that shape. A guest can write a valid footer into its own last sector but cannot change
/// the length of its disk, so a footer claiming another size, or a dynamic type with no
/// copy at offset 0, is guest data and the file is probed as raw. With the shape, reading
/// the file as that VHD gives the bytes before the footer, at their own offsets.
pub fn trusted_tail_footer(tail: &[u8], file_len: u64) -> bool {
    tail_footer(tail, file_len).is_some_and(|(f, data_len)| fits(&f, data_len))
}

/// Does fixed footer `f` describe exactly the `data_len` bytes before it?
fn fits(f: &Footer, data_len: u64) -> bool {
    f.disk_type == DiskType::Fixed
        && (f.current_size == data_len
            || virtual_size(f, SizeCalc::Auto).is_ok_and(|s| s == data_len))
}

/// Why a valid footer at the end of a file is not trusted (see [`trusted_tail_footer`]),
/// or None when there is no such footer or it is trusted.
pub fn describe_distrusted_tail_footer(tail: &[u8], file_len: u64) -> Option<String> {
    let (f, data_len) = tail_footer(tail, file_len)?;
    if fits(&f, data_len) {
        return None;
    }
    Some(match f.disk_type {
        DiskType::Fixed => format!(
            "the last sector holds a valid fixed-VHD footer (creator '{}') claiming a {}-byte disk, \
             but {data_len} bytes precede it: probed as raw, while a tool that trusts footers \
             would read a different disk",
            f.creator_app_str().escape_default(),
            f.current_size
        ),
        t => format!(
            "the last sector holds a valid {} VHD footer (creator '{}') but the file does not \
             start with its copy: probed as raw, while a tool that trusts footers would read a \
             {} VHD (name the format, -f vpc, to read a VHD whose first footer copy is damaged)",
            t.name(),
            f.creator_app_str().escape_default(),
            t.name()
        ),
    })
}

/// Parse the dynamic header and BAT, and attach the parent of a differencing disk.
/// `size` is the virtual size, which the BAT must cover; `wider`, a larger size the
/// caller may settle on (see [`open`]), is covered as far as the BAT reaches.
fn open_sparse(
    file: &HostFile,
    footer: &Footer,
    size: u64,
    wider: Option<u64>,
    opts: &OpenOptions,
    warnings: &mut Vec<String>,
) -> Result<Sparse> {
    let hdr_at = footer.data_offset;
    // A header cut short by the end of the file reads as zero-padded, as qemu reads it; the
    // checks below then name the first field that is wrong.
    let avail = file
        .len()
        .saturating_sub(hdr_at)
        .min(DYN_HEADER_SIZE as u64);
    if avail < 64 {
        file.check_range(hdr_at, DYN_HEADER_SIZE as u64, "footer.data_offset")?;
    }
    let mut hbuf = [0u8; DYN_HEADER_SIZE];
    file.read_exact_at(&mut hbuf[..avail as usize], hdr_at, "VHD dynamic header")?;
    if avail < DYN_HEADER_SIZE as u64 {
        warnings.push(format!(
            "the dynamic header at {hdr_at:#x} is cut short by the end of the file"
        ));
    }
    let header = DynHeader::parse(&hbuf).map_err(|e| match e.field() {
        Some("dynamic_header.block_size") => e.at(hdr_at + BLOCK_SIZE_OFFSET as u64),
        _ => e.at(hdr_at),
    })?;
    let block_size = header.block_size as u64;
    let bitmap_size = header.bitmap_size();
    let needed = size.div_ceil(block_size);
    let max_entries = header.max_table_entries as u64;
    if max_entries < needed {
        return Err(Error::corrupt(format!(
            "VHD BAT has {max_entries} entries but {size} bytes in blocks of {block_size} need {needed}"
        ))
        .with_field("dynamic_header.max_table_entries")
        .at(hdr_at + MAX_TABLE_ENTRIES_OFFSET as u64));
    }
    let bat_bytes = checked_mul(max_entries, 4, "BAT size")?;
    if bat_bytes > MAX_BAT_BYTES {
        return Err(Error::limit(format!(
            "VHD max table entries {max_entries} too large: a BAT of {bat_bytes} bytes exceeds the {} MiB limit",
            MAX_BAT_BYTES >> 20
        ))
        .with_field("dynamic_header.max_table_entries")
        .at(hdr_at + MAX_TABLE_ENTRIES_OFFSET as u64));
    }
    file.check_range(
        header.table_offset,
        bat_bytes,
        "dynamic_header.table_offset",
    )
    .map_err(|e| e.at(hdr_at + TABLE_OFFSET_OFFSET as u64))?;
    let loaded = wider.map_or(needed, |w| w.div_ceil(block_size).min(max_entries));
    let raw = file.read_vec(header.table_offset, loaded * 4, "VHD BAT")?;
    let mut bat = Vec::with_capacity(loaded as usize);
    let stride = checked_add(bitmap_size, block_size, "VHD block stride")?;
    for (i, c) in raw.chunks_exact(4).enumerate() {
        let e = BigEndian::read_u32(c);
        if e != UNALLOCATED {
            let start = e as u64 * 512;
            // Every allocated block (bitmap + data) must lie inside the file, as qemu requires.
            if start.checked_add(stride).is_none_or(|end| end > file.len()) {
                return Err(Error::corrupt(format!(
                    "VHD BAT entry {i} points at sector {e} (offset {start:#x}): its bitmap and block ({stride} bytes) run past the end of the file ({} bytes)",
                    file.len()
                ))
                .with_field(format!("BAT[{i}]"))
                .at(header.table_offset + 4 * i as u64));
            }
        }
        bat.push(e);
    }

    let mut parent_names = Vec::new();
    let mut parent = None;
    if footer.disk_type == DiskType::Differencing {
        parent_names = parent_candidates(file, &header)?;
        if parent_names.is_empty() {
            return Err(Error::corrupt(
                "differencing VHD names no parent (no locator and no parent name)",
            )
            .with_field("dynamic_header.parent_locator")
            .at(hdr_at));
        }
        let mut first_err = None;
        for name in parent_names.iter().take_while(|_| !opts.no_backing) {
            match opts.open_reference(file.path(), name, "parent_locator", Some(Format::Vhd)) {
                Ok(p) => {
                    parent = Some(p);
                    break;
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err.filter(|_| parent.is_none()) {
            return Err(e);
        }
        if let Some(p) = &parent {
            if p.virtual_size() != size {
                warnings.push(format!(
                    "parent size {} differs from this image's size {size}",
                    p.virtual_size()
                ));
            }
        }
    }
    Ok(Sparse {
        block_size,
        bitmap_size,
        bat,
        bitmaps: Mutex::new(HashMap::new()),
        parent,
        parent_names,
    })
}

/// The parent's names, best first: relative locators (W2ru, Wi2r), the header's parent
/// name (same folder), then absolute ones (W2ku, Wi2k, MacX), which the reference gate
/// refuses but which we still report.
fn parent_candidates(file: &HostFile, header: &DynHeader) -> Result<Vec<String>> {
    let mut relative = Vec::new();
    let mut absolute = Vec::new();
    for (i, l) in header.locators.iter().enumerate() {
        if l.platform == platform::NONE || l.data_length == 0 {
            continue;
        }
        let Some(text) = read_locator(file, l, i)? else {
            continue;
        };
        let path = normalize_locator_path(&text);
        if path.is_empty() {
            continue;
        }
        match l.platform {
            platform::W2RU | platform::WI2R => relative.push(path),
            _ => absolute.push(path),
        }
    }
    let mut out = relative;
    if let Some(n) = header.parent_name() {
        out.push(normalize_locator_path(&n));
    }
    out.extend(absolute);
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(p.clone()));
    Ok(out)
}

/// The text of one locator, or None for platforms whose data is not a path (Mac alias).
fn read_locator(file: &HostFile, l: &ParentLocator, i: usize) -> Result<Option<String>> {
    let field = format!("parent_locator[{i}]");
    if l.data_length > MAX_LOCATOR_BYTES {
        return Err(Error::limit(format!(
            "VHD parent locator {i} claims {} bytes (limit {MAX_LOCATOR_BYTES})",
            l.data_length
        ))
        .with_field(field));
    }
    let data = match l.platform {
        platform::W2RU | platform::W2KU | platform::WI2R | platform::WI2K | platform::MACX => {
            file.read_vec(l.data_offset, l.data_length as u64, &field)?
        }
        _ => return Ok(None),
    };
    let text = match l.platform {
        platform::W2RU | platform::W2KU => dynheader::decode_utf16_guess(&data, false),
        _ => {
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            Some(String::from_utf8_lossy(&data[..end]).into_owned())
        }
    };
    Ok(text.map(|t| {
        if l.platform == platform::MACX {
            t.strip_prefix("file://localhost")
                .or_else(|| t.strip_prefix("file://"))
                .unwrap_or(&t)
                .to_string()
        } else {
            t
        }
    }))
}

/// Windows separators to '/', and a leading "./" dropped.
fn normalize_locator_path(p: &str) -> String {
    let p = p.trim_end_matches('\0').replace('\\', "/");
    let mut s = p.as_str();
    while let Some(rest) = s.strip_prefix("./") {
        s = rest;
    }
    s.to_string()
}

/// An opened VHD.
pub struct VhdImage {
    file: HostFile,
    footer: Footer,
    size: u64,
    kind: Kind,
    warnings: Vec<String>,
}

enum Kind {
    Fixed,
    Sparse(Box<Sparse>),
}

/// The dynamic/differencing state: BAT, bitmap cache, parent.
struct Sparse {
    block_size: u64,
    bitmap_size: u64,
    /// One entry per block of the virtual size (or of the wider size `open` considered).
    bat: Vec<u32>,
    bitmaps: Mutex<HashMap<usize, Arc<[u8]>>>,
    parent: Option<Box<dyn BlockDevice>>,
    parent_names: Vec<String>,
}

/// What a guest range is, before a parent is consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    /// Stored here at this host offset.
    Data(u64),
    /// Not stored here: zero, or the parent's bytes.
    Absent,
}

impl Sparse {
    /// The sector bitmap of allocated block `blk`, through a bounded cache.
    fn bitmap(&self, file: &HostFile, blk: usize) -> Result<Arc<[u8]>> {
        let lock = || {
            self.bitmaps
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        if let Some(b) = lock().get(&blk) {
            return Ok(b.clone());
        }
        // Read without holding the lock so other threads' hits are not delayed by our I/O.
        let at = self.bat[blk] as u64 * 512;
        let v: Arc<[u8]> = file
            .read_vec(at, self.bitmap_size, "VHD block bitmap")?
            .into();
        let mut cache = lock();
        if (cache.len() + 1) * self.bitmap_size as usize > BITMAP_CACHE_BYTES {
            cache.clear();
        }
        cache.insert(blk, v.clone());
        Ok(v)
    }

    /// The longest run from `offset` (< `end`) of one [`Local`] kind.
    fn map_local(&self, file: &HostFile, offset: u64, end: u64) -> Result<(u64, Local)> {
        let bs = self.block_size;
        let blk = (offset / bs) as usize;
        let entry = self.bat[blk];
        if entry == UNALLOCATED {
            let mut e = (blk as u64 + 1) * bs;
            while e < end && self.bat[(e / bs) as usize] == UNALLOCATED {
                e += bs;
            }
            return Ok((e.min(end) - offset, Local::Absent));
        }
        let block_start = blk as u64 * bs;
        let block_end = (block_start + bs).min(end);
        let bitmap = self.bitmap(file, blk)?;
        let first = ((offset - block_start) / 512) as usize;
        let last = (block_end - block_start).div_ceil(512) as usize;
        let set = bit(&bitmap, first);
        let mut s = first + 1;
        while s < last {
            if s.is_multiple_of(8) && s + 8 <= last {
                let byte = bitmap[s / 8];
                if byte == if set { 0xff } else { 0 } {
                    s += 8;
                    continue;
                }
            }
            if bit(&bitmap, s) != set {
                break;
            }
            s += 1;
        }
        let run_end = (block_start + s as u64 * 512).min(block_end);
        let kind = if set {
            Local::Data(entry as u64 * 512 + self.bitmap_size + (offset - block_start))
        } else {
            Local::Absent
        };
        Ok((run_end - offset, kind))
    }
}

/// Bit `i` of a VHD sector bitmap (most significant bit first).
fn bit(bitmap: &[u8], i: usize) -> bool {
    bitmap
        .get(i / 8)
        .is_some_and(|b| b & (0x80 >> (i % 8)) != 0)
}

/// `lseek` with SEEK_DATA/SEEK_HOLE; None when the filesystem cannot tell.
fn seek(file: &HostFile, offset: u64, whence: libc::c_int) -> Option<u64> {
    if file.is_remote() {
        return None;
    }
    let off = i64::try_from(offset).ok()?;
    // SAFETY: lseek has no memory effects; all our I/O is positional, so moving the file
    // position is harmless.
    let r = unsafe { libc::lseek(file.file().as_raw_fd(), off, whence) };
    (r >= 0).then_some(r as u64)
}

impl VhdImage {
    /// Fixed disks: data, except holes of the host file (found cheaply with SEEK_HOLE),
    /// which read as zeros.
    fn map_fixed(&self, offset: u64, end: u64) -> Mapping {
        let data = |o: u64, e: u64| Mapping {
            offset: o,
            len: e - o,
            kind: MappingKind::Data { host: Some(o) },
        };
        match seek(&self.file, offset, libc::SEEK_DATA) {
            Some(d) if d > offset => Mapping {
                offset,
                len: d.min(end) - offset,
                kind: MappingKind::Unallocated,
            },
            Some(_) => {
                let h = seek(&self.file, offset, libc::SEEK_HOLE).unwrap_or(end);
                data(offset, h.clamp(offset + 1, end))
            }
            // ENXIO means no data after offset (the footer is data, so this is rare).
            None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => {
                Mapping {
                    offset,
                    len: end - offset,
                    kind: MappingKind::Unallocated,
                }
            }
            None => data(offset, end),
        }
    }
}

impl BlockDevice for VhdImage {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    /// qemu reports this format's unallocated blocks as allocated zeros.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<crate::device::BlockStatus> {
        let m = self.map(offset, max_len)?;
        let mut st = crate::device::BlockStatus::from_mapping(&m, true);
        if matches!(self.kind, Kind::Fixed) {
            // qemu passes a fixed image through to its file: holes are zero data at their offset.
            (st.host, st.data) = (Some(offset), true);
        }
        Ok(st)
    }

    fn map(&self, offset: u64, max_len: u64) -> Result<Mapping> {
        let end = crate::device::map_end(self.size, offset, max_len)?;
        let sp = match &self.kind {
            Kind::Fixed => return Ok(self.map_fixed(offset, end)),
            Kind::Sparse(sp) => sp,
        };
        let (len, local) = sp.map_local(&self.file, offset, end)?;
        let kind = match local {
            Local::Data(host) => MappingKind::Data { host: Some(host) },
            Local::Absent => match &sp.parent {
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
        check_guest_range(self.size, offset, buf.len())?;
        let sp = match &self.kind {
            Kind::Fixed => return self.file.read_exact_at(buf, offset, "guest data"),
            Kind::Sparse(sp) => sp,
        };
        let end = offset + buf.len() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (len, local) = sp.map_local(&self.file, off, end)?;
            let part = &mut buf[done..done + len as usize];
            match local {
                Local::Data(host) => self.file.read_exact_at(part, host, "guest data block")?,
                Local::Absent => match &sp.parent {
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
            format: "vpc".into(),
            virtual_size: self.size,
            dirty: Some(false),
            warnings: self.warnings.clone(),
            ..Default::default()
        };
        if let Kind::Sparse(sp) = &self.kind {
            info.cluster_size = Some(sp.block_size);
            if self.footer.disk_type == DiskType::Differencing {
                info.backing_file = sp.parent_names.first().cloned();
                info.referenced_files = sp.parent_names.clone();
            }
        }
        info
    }

    fn format(&self) -> Format {
        Format::Vhd
    }
}

impl std::fmt::Debug for VhdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdImage")
            .field("path", &self.file.path())
            .field("type", &self.footer.disk_type.name())
            .field("size", &self.size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_are_msb_first() {
        let b = [0x80u8, 0x01];
        assert!(bit(&b, 0));
        assert!(!bit(&b, 1));
        assert!(bit(&b, 15));
        assert!(!bit(&b, 16));
    }

    #[test]
    fn locator_paths_are_normalized() {
        assert_eq!(normalize_locator_path(".\\base.vhd"), "base.vhd");
        assert_eq!(normalize_locator_path("C:\\x\\base.vhd"), "C:/x/base.vhd");
    }

    #[test]
    fn size_rules_follow_qemu() {
        let mut f = Footer::parse(&{
            let mut b = [0u8; 512];
            b[..8].copy_from_slice(FOOTER_COOKIE);
            BigEndian::write_u32(&mut b[60..], 3);
            let s = super::super::footer::vhd_checksum(&b);
            BigEndian::write_u32(&mut b[64..], s);
            b
        })
        .unwrap();
        f.current_size = 10 << 20;
        f.cylinders = 151;
        f.heads = 4;
        f.sectors_per_track = 17;
        f.creator_app = *b"vpc ";
        assert_eq!(
            virtual_size(&f, SizeCalc::Auto).unwrap(),
            151 * 4 * 17 * 512
        );
        assert_eq!(virtual_size(&f, SizeCalc::CurrentSize).unwrap(), 10 << 20);
        f.creator_app = *b"qemu";
        assert_eq!(
            virtual_size(&f, SizeCalc::Auto).unwrap(),
            151 * 4 * 17 * 512
        );
        // Everyone else, known or not, by current_size (qemu 10's rule).
        for creator in [
            b"vbox", b"wa\0\0", b"d2v ", b"qem2", b"CTXS", b"tap\0", b"xyz!", b"win ",
        ] {
            f.creator_app = *creator;
            assert_eq!(virtual_size(&f, SizeCalc::Auto).unwrap(), 10 << 20);
        }
        assert_eq!(virtual_size(&f, SizeCalc::Chs).unwrap(), 151 * 4 * 17 * 512);
        f.cylinders = 65535;
        f.heads = 16;
        f.sectors_per_track = 255;
        assert_eq!(virtual_size(&f, SizeCalc::Chs).unwrap(), 10 << 20);
        f.current_size = 3 << 40;
        assert!(virtual_size(&f, SizeCalc::Auto).is_err());
    }
}
